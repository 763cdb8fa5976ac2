//! The blob checkpoint store against Azurite (`tests/azurite`, started by `tests/run.sh`, which
//! sets `IOMT_TEST_AZURITE_URL` to the Blob endpoint, e.g. `http://127.0.0.1:PORT/devstoreaccount1`).
//! Each test works in a container of its own, so they run in parallel on one Azurite.

use std::time::Duration;

use azure_core::http::StatusCode;
use azure_messaging_eventhubs::CheckpointStore;
use azure_messaging_eventhubs::models::{Checkpoint, Ownership};
use iomt_eventhubs::blob::{
    BlobAuth, BlobCheckpointStore, BlobError, BlobStoreOptions, CheckpointWrite,
    DEVELOPMENT_ACCOUNT_KEY, is_ownership_lost,
};

const NAMESPACE: &str = "iomt-test.servicebus.windows.net";
const HUB: &str = "devicedata";
const GROUP: &str = "fhir-grouper";

/// An account SAS for Azurite's development account (all blob rights, valid 2020–2099), from
/// docs/test-services.md §2. The account key is public, so this protects nothing.
const SAS: &str = "st=2020-01-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rwdlacu&sv=2026-10-06&ss=b&srt=sco&sig=xo2cdmNrRg1Ed8rhWO/QlLvpte7TjFY122r4%2Bv2Tndo%3D";

fn azurite() -> String {
    std::env::var("IOMT_TEST_AZURITE_URL")
        .expect("IOMT_TEST_AZURITE_URL is not set: run tests/run.sh, which starts Azurite")
        .trim_end_matches('/')
        .to_owned()
}

/// A fresh container name (lowercase, 3–63 characters).
fn unique_container(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// A store on a new container, signed with the development account's Shared Key.
async fn new_store(prefix: &str) -> (BlobCheckpointStore, String) {
    let container = unique_container(prefix);
    let store = BlobCheckpointStore::new(
        &format!("{}/{container}", azurite()),
        BlobAuth::development_storage(),
    )
    .unwrap();
    assert!(store.ensure_container().await.unwrap());
    (store, container)
}

fn ownership(
    partition: &str,
    owner: Option<&str>,
    etag: Option<&azure_core::http::Etag>,
) -> Ownership {
    Ownership {
        fully_qualified_namespace: NAMESPACE.to_owned(),
        event_hub_name: HUB.to_owned(),
        consumer_group: GROUP.to_owned(),
        partition_id: partition.to_owned(),
        owner_id: owner.map(str::to_owned),
        etag: etag.cloned(),
        last_modified_time: None,
    }
}

fn checkpoint(group: &str, partition: &str, sequence_number: i64) -> Checkpoint {
    Checkpoint {
        fully_qualified_namespace: NAMESPACE.to_owned(),
        event_hub_name: HUB.to_owned(),
        consumer_group: group.to_owned(),
        partition_id: partition.to_owned(),
        offset: Some((sequence_number * 512).to_string()),
        sequence_number: Some(sequence_number),
    }
}

fn partitions(granted: &[Ownership]) -> Vec<&str> {
    granted
        .iter()
        .map(|ownership| ownership.partition_id.as_str())
        .collect()
}

async fn listed(store: &BlobCheckpointStore) -> Vec<Ownership> {
    let mut ownerships = store.list_ownerships(NAMESPACE, HUB, GROUP).await.unwrap();
    ownerships.sort_by(|a, b| a.partition_id.cmp(&b.partition_id));
    ownerships
}

fn find<'a>(ownerships: &'a [Ownership], partition: &str) -> &'a Ownership {
    ownerships
        .iter()
        .find(|ownership| ownership.partition_id == partition)
        .unwrap_or_else(|| panic!("no ownership of partition {partition}"))
}

/// Reads a blob's headers the way KEDA does (Get Blob Properties on the exact name), outside
/// the store, with the SAS.
async fn raw_head(container: &str, name: &str) -> reqwest::Response {
    reqwest::Client::new()
        .head(format!("{}/{container}/{name}?{SAS}", azurite()))
        .header("x-ms-version", "2021-08-06")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn ownership_claims_are_granted_once() {
    let (store, _) = new_store("claims").await;
    let a = store.clone().with_owner("pod-a");
    let b = store.clone().with_owner("pod-b");

    let granted_a = a
        .claim_ownership(&[
            ownership("0", Some("pod-a"), None),
            ownership("1", Some("pod-a"), None),
        ])
        .await
        .unwrap();
    assert_eq!(partitions(&granted_a), ["0", "1"]);
    assert!(
        granted_a
            .iter()
            .all(|o| o.etag.is_some() && o.last_modified_time.is_some())
    );

    // New claims (If-None-Match: *) on blobs that exist lose; the one free partition is won.
    let granted_b = b
        .claim_ownership(&[
            ownership("1", Some("pod-b"), None),
            ownership("2", Some("pod-b"), None),
        ])
        .await
        .unwrap();
    assert_eq!(partitions(&granted_b), ["2"]);

    // Racing first claims of one partition: exactly one wins.
    let (claim_a, claim_b) = (
        [ownership("3", Some("pod-a"), None)],
        [ownership("3", Some("pod-b"), None)],
    );
    let (race_a, race_b) = tokio::join!(a.claim_ownership(&claim_a), b.claim_ownership(&claim_b));
    let (race_a, race_b) = (race_a.unwrap(), race_b.unwrap());
    assert_eq!(race_a.len() + race_b.len(), 1, "{race_a:?} {race_b:?}");
    let winner = if race_a.is_empty() { "pod-b" } else { "pod-a" };

    let ownerships = listed(&store).await;
    assert_eq!(partitions(&ownerships), ["0", "1", "2", "3"]);
    let owners: Vec<_> = ownerships.iter().map(|o| o.owner_id.as_deref()).collect();
    assert_eq!(
        owners,
        [Some("pod-a"), Some("pod-a"), Some("pod-b"), Some(winner)]
    );
    // The listing's ETags are the ones the claims returned, in the same (quoted) form.
    assert_eq!(find(&ownerships, "0").etag, granted_a[0].etag);
    assert_eq!(find(&ownerships, "2").etag, granted_b[0].etag);
    let now = azure_core::time::OffsetDateTime::now_utc();
    for listed in &ownerships {
        assert_eq!(listed.fully_qualified_namespace, NAMESPACE);
        assert_eq!(listed.consumer_group, GROUP);
        let modified = listed.last_modified_time.expect("a last-modified time");
        assert!(
            (now - modified).abs() < azure_core::time::Duration::minutes(5),
            "{modified}"
        );
    }

    // Renewal with the current ETag is granted and moves the ETag; the old ETag is then stale.
    let old = granted_a[0].etag.clone();
    let renewed = a
        .claim_ownership(&[ownership("0", Some("pod-a"), old.as_ref())])
        .await
        .unwrap();
    assert_eq!(partitions(&renewed), ["0"]);
    assert_ne!(renewed[0].etag, old);
    let stale = a
        .claim_ownership(&[ownership("0", Some("pod-a"), old.as_ref())])
        .await
        .unwrap();
    assert!(stale.is_empty(), "{stale:?}");

    // Taking over: B claims partition 1 with the ETag it listed; A's renewal then loses.
    let stolen = b
        .claim_ownership(&[ownership(
            "1",
            Some("pod-b"),
            find(&ownerships, "1").etag.as_ref(),
        )])
        .await
        .unwrap();
    assert_eq!(partitions(&stolen), ["1"]);
    let lost = a
        .claim_ownership(&[ownership("1", Some("pod-a"), granted_a[1].etag.as_ref())])
        .await
        .unwrap();
    assert!(lost.is_empty());

    // Giving up: a claim without owner id leaves the partition unowned.
    let released = b
        .claim_ownership(&[ownership("2", None, granted_b[0].etag.as_ref())])
        .await
        .unwrap();
    assert_eq!(partitions(&released), ["2"]);

    let ownerships = listed(&store).await;
    assert_eq!(find(&ownerships, "1").owner_id.as_deref(), Some("pod-b"));
    assert_eq!(find(&ownerships, "2").owner_id, None);
}

#[tokio::test]
async fn checkpoints_are_where_keda_reads_them() {
    let (store, container) = new_store("layout").await;
    assert_eq!(
        store
            .write_checkpoint(&checkpoint(GROUP, "0", 42))
            .await
            .unwrap(),
        CheckpointWrite::Created
    );
    store
        .update_checkpoint(checkpoint(GROUP, "1", 7))
        .await
        .unwrap();

    let mut checkpoints = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    checkpoints.sort_by(|a, b| a.partition_id.cmp(&b.partition_id));
    let found: Vec<_> = checkpoints
        .iter()
        .map(|c| {
            (
                c.partition_id.as_str(),
                c.sequence_number,
                c.offset.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [("0", Some(42), Some("21504")), ("1", Some(7), Some("3584"))]
    );

    // KEDA (blobMetadata) reads `<ns>/<hub>/<cg>/checkpoint/<pid>`, metadata `sequencenumber`.
    let name = format!("{NAMESPACE}/{HUB}/{GROUP}/checkpoint/0");
    let head = raw_head(&container, &name).await;
    assert_eq!(head.status(), 200);
    let meta = |key: &str| {
        head.headers()
            .get(key)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(meta("x-ms-meta-sequencenumber").as_deref(), Some("42"));
    assert_eq!(meta("x-ms-meta-offset").as_deref(), Some("21504"));

    // The stored name has real slashes (not %2F): a raw listing shows it as written.
    let listing = reqwest::Client::new()
        .get(format!(
            "{}/{container}?restype=container&comp=list&{SAS}",
            azurite()
        ))
        .header("x-ms-version", "2021-08-06")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listing.contains(&format!("<Name>{name}</Name>")),
        "{listing}"
    );
    assert!(!listing.contains("%2F"), "{listing}");

    // `$Default` (with a `$` and capitals) round-trips as is.
    store
        .update_checkpoint(checkpoint("$Default", "3", 9))
        .await
        .unwrap();
    let default = store
        .list_checkpoints(NAMESPACE, HUB, "$Default")
        .await
        .unwrap();
    assert_eq!(default.len(), 1);
    assert_eq!(
        (default[0].partition_id.as_str(), default[0].sequence_number),
        ("3", Some(9))
    );
    let head = raw_head(
        &container,
        &format!("{NAMESPACE}/{HUB}/$Default/checkpoint/3"),
    )
    .await;
    assert_eq!(head.status(), 200);
    // ...which is exactly why KEDA, looking under `$default`, finds nothing.
    let keda = raw_head(
        &container,
        &format!("{NAMESPACE}/{HUB}/$default/checkpoint/3"),
    )
    .await;
    assert_eq!(keda.status(), 404);
}

#[tokio::test]
async fn checkpoints_never_move_backwards() {
    let (store, container) = new_store("monotonic").await;
    let name = format!("{NAMESPACE}/{HUB}/{GROUP}/checkpoint/0");
    let etag =
        |response: reqwest::Response| response.headers()["etag"].to_str().unwrap().to_owned();

    assert_eq!(
        store
            .write_checkpoint(&checkpoint(GROUP, "0", 100))
            .await
            .unwrap(),
        CheckpointWrite::Created
    );
    let before = etag(raw_head(&container, &name).await);
    assert_eq!(
        store
            .write_checkpoint(&checkpoint(GROUP, "0", 50))
            .await
            .unwrap(),
        CheckpointWrite::KeptNewer { stored: 100 }
    );
    assert_eq!(
        store
            .write_checkpoint(&checkpoint(GROUP, "0", 100))
            .await
            .unwrap(),
        CheckpointWrite::KeptNewer { stored: 100 }
    );
    // Through the SDK trait an older checkpoint is not an error, just not written.
    store
        .update_checkpoint(checkpoint(GROUP, "0", 99))
        .await
        .unwrap();
    assert_eq!(
        etag(raw_head(&container, &name).await),
        before,
        "the blob was rewritten"
    );
    assert_eq!(
        store
            .write_checkpoint(&checkpoint(GROUP, "0", 101))
            .await
            .unwrap(),
        CheckpointWrite::Updated
    );
    let stored = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    assert_eq!(stored[0].sequence_number, Some(101));

    // Concurrent writers of one partition: whatever the interleaving, the highest one stays.
    let writers: Vec<_> = (1..=6)
        .map(|sequence_number| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write_checkpoint(&checkpoint(GROUP, "1", sequence_number))
                    .await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let stored = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    let one = stored.iter().find(|c| c.partition_id == "1").unwrap();
    assert_eq!(one.sequence_number, Some(6));
}

#[tokio::test]
async fn a_stale_owner_cannot_checkpoint() {
    let (store, _) = new_store("fencing").await;
    let a = store.clone().with_owner("pod-a");
    let b = store.clone().with_owner("pod-b");

    let claimed = a
        .claim_ownership(&[ownership("0", Some("pod-a"), None)])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    a.update_checkpoint(checkpoint(GROUP, "0", 10))
        .await
        .unwrap();

    // B takes partition 0 over (as the load balancer does with an expired or stolen claim).
    let current = listed(&store).await;
    let taken = b
        .claim_ownership(&[ownership(
            "0",
            Some("pod-b"),
            find(&current, "0").etag.as_ref(),
        )])
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    b.update_checkpoint(checkpoint(GROUP, "0", 20))
        .await
        .unwrap();

    // A does not know yet: its next checkpoint, though newer, is refused.
    let error = a
        .update_checkpoint(checkpoint(GROUP, "0", 30))
        .await
        .unwrap_err();
    assert_eq!(error.http_status(), Some(StatusCode::PreconditionFailed));
    assert!(is_ownership_lost(&error), "{error}");
    let typed = a
        .write_checkpoint(&checkpoint(GROUP, "0", 30))
        .await
        .unwrap_err();
    assert!(
        matches!(&typed, BlobError::OwnershipLost { actual: Some(owner), .. } if owner == "pod-b"),
        "{typed}"
    );
    assert!(!typed.is_transient());

    let stored = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    assert_eq!(
        stored[0].sequence_number,
        Some(20),
        "B's checkpoint must stay"
    );

    // A partition nobody claimed is not A's either.
    let unowned = a
        .write_checkpoint(&checkpoint(GROUP, "5", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(unowned, BlobError::OwnershipLost { actual: None, .. }),
        "{unowned}"
    );

    // A store without an owner id does not fence.
    store
        .update_checkpoint(checkpoint(GROUP, "5", 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn listing_follows_pages() {
    let (store, _) = new_store("paging").await;
    let store = store.with_options(BlobStoreOptions {
        list_page_size: Some(2),
        ..BlobStoreOptions::default()
    });
    let claims: Vec<_> = (0..5)
        .map(|p| ownership(&p.to_string(), Some("pod-a"), None))
        .collect();
    assert_eq!(store.claim_ownership(&claims).await.unwrap().len(), 5);
    for partition in 0..5 {
        store
            .update_checkpoint(checkpoint(GROUP, &partition.to_string(), partition + 1))
            .await
            .unwrap();
    }
    assert_eq!(listed(&store).await.len(), 5);
    let mut sequence_numbers: Vec<_> = store
        .list_checkpoints(NAMESPACE, HUB, GROUP)
        .await
        .unwrap()
        .iter()
        .map(|c| c.sequence_number.unwrap())
        .collect();
    sequence_numbers.sort_unstable();
    assert_eq!(sequence_numbers, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_missing_container_is_an_error_not_a_lost_claim() {
    let store = BlobCheckpointStore::new(
        &format!("{}/{}", azurite(), unique_container("absent")),
        BlobAuth::development_storage(),
    )
    .unwrap();
    let claim = store
        .claim(&[ownership("0", Some("pod-a"), None)])
        .await
        .unwrap_err();
    assert_eq!(claim.status(), Some(404), "{claim}");
    let write = store
        .write_checkpoint(&checkpoint(GROUP, "0", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&write, BlobError::Status { status: 404, code: Some(code), .. } if code == "ContainerNotFound"),
        "{write}"
    );
    assert_eq!(
        store
            .checkpoints(NAMESPACE, HUB, GROUP)
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );

    assert!(store.ensure_container().await.unwrap());
    assert!(
        !store.ensure_container().await.unwrap(),
        "a second call finds it"
    );
    assert!(
        store
            .claim(&[ownership("0", Some("pod-a"), None)])
            .await
            .unwrap()
            .len()
            == 1
    );
}

/// Writes and reads back through a store, as a check that its authorization works end to end.
async fn round_trip(store: &BlobCheckpointStore) {
    store.ensure_container().await.unwrap();
    let granted = store
        .claim_ownership(&[ownership("0", Some("pod-a"), None)])
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    store
        .update_checkpoint(checkpoint(GROUP, "0", 5))
        .await
        .unwrap();
    let stored = store.list_checkpoints(NAMESPACE, HUB, GROUP).await.unwrap();
    assert_eq!(stored[0].sequence_number, Some(5));
    assert_eq!(listed(store).await[0].owner_id.as_deref(), Some("pod-a"));
}

#[tokio::test]
async fn shared_key_and_connection_string() {
    let shared_key = BlobCheckpointStore::new(
        &format!("{}/{}", azurite(), unique_container("sharedkey")),
        BlobAuth::shared_key("devstoreaccount1", DEVELOPMENT_ACCOUNT_KEY).unwrap(),
    )
    .unwrap();
    round_trip(&shared_key).await;

    let connection_string = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
         AccountKey={DEVELOPMENT_ACCOUNT_KEY};BlobEndpoint={}/;",
        azurite()
    );
    let from_connection_string = BlobCheckpointStore::from_connection_string(
        &connection_string,
        &unique_container("connstr"),
    )
    .unwrap();
    round_trip(&from_connection_string).await;

    // A wrong key is refused by the service, not retried, and reported with its status.
    let wrong_key = BlobCheckpointStore::new(
        &format!("{}/{}", azurite(), unique_container("wrongkey")),
        BlobAuth::shared_key("devstoreaccount1", "d3Jvbmcga2V5").unwrap(),
    )
    .unwrap();
    let error = wrong_key.ensure_container().await.unwrap_err();
    assert_eq!(error.status(), Some(403), "{error}");
    assert!(!error.is_transient());
}

#[tokio::test]
async fn shared_access_signature() {
    let url = format!("{}/{}?{SAS}", azurite(), unique_container("sas"));
    let store = BlobCheckpointStore::from_sas_url(&url).unwrap();
    round_trip(&store).await;

    let container = format!("{}/{}", azurite(), unique_container("sas"));
    let explicit =
        BlobCheckpointStore::new(&container, BlobAuth::sas(&format!("?{SAS}")).unwrap()).unwrap();
    round_trip(&explicit).await;

    let tampered = SAS.replace("sig=xo2", "sig=xo3");
    let refused = BlobCheckpointStore::new(&container, BlobAuth::sas(&tampered).unwrap())
        .unwrap()
        .with_options(BlobStoreOptions {
            request_timeout: Duration::from_secs(5),
            ..BlobStoreOptions::default()
        });
    let error: azure_core::Error = refused
        .list_checkpoints(NAMESPACE, HUB, GROUP)
        .await
        .unwrap_err();
    assert_eq!(error.http_status(), Some(StatusCode::Forbidden), "{error}");
    assert!(!is_ownership_lost(&error));
}
