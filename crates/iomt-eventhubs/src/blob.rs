//! The Event Hubs checkpoint store on Azure Blob Storage, in the layout KEDA reads.
//!
//! [`BlobCheckpointStore`] implements the SDK's [`CheckpointStore`] over the Blob REST API. It
//! writes exactly what the SDK's own blob store (`azure_messaging_eventhubs_checkpointstore_blob`)
//! writes, so either can take over from the other, and what KEDA's `azure-eventhub` scaler reads
//! with `checkpointStrategy: blobMetadata`:
//!
//! | Record | Blob (in the configured container) | Metadata |
//! |---|---|---|
//! | checkpoint | `<namespace>/<event hub>/<consumer group>/checkpoint/<partition>` | `sequencenumber`, `offset` |
//! | ownership | `<namespace>/<event hub>/<consumer group>/ownership/<partition>` | `ownerid` |
//!
//! Names are used as given, in their case. KEDA lowercases the consumer group when it looks for
//! checkpoints, so a consumer group with capitals (such as `$Default`) makes KEDA miss every
//! checkpoint and scale to the maximum; [`warn_if_keda_cannot_read`] says so at startup.
//!
//! Where it is stricter than the SDK's store:
//! * **Checkpoints never move backwards.** A write reads the current blob and only replaces it,
//!   with `If-Match` on its ETag, when the new sequence number is greater. An older checkpoint
//!   (a slow pod, a replay) is dropped; a concurrent writer that got in between makes it read and
//!   decide again.
//! * **Fencing.** A store made [`with_owner`](BlobCheckpointStore::with_owner) checks, before
//!   each checkpoint write, that the ownership blob still names that owner, and refuses with
//!   [`BlobError::OwnershipLost`] otherwise ([`is_ownership_lost`] recognizes it through the
//!   SDK's error wrapping). The check and the write are two requests, so a takeover in between
//!   can still let one last write through, but never a write that moves the checkpoint back.
//!
//! Authorization: Microsoft Entra ID, SAS or Shared Key ([`BlobAuth`]), or a storage connection
//! string ([`StorageConnectionString`]).

mod auth;
mod client;
mod container;
mod error;
mod xml;

use async_trait::async_trait;
use azure_messaging_eventhubs::CheckpointStore;
use azure_messaging_eventhubs::models::{Checkpoint, Ownership};
use reqwest::Url;
use tracing::{debug, info, warn};

pub use auth::{
    BlobAuth, DEVELOPMENT_ACCOUNT_KEY, DEVELOPMENT_ACCOUNT_NAME, STORAGE_SCOPE,
    StorageConnectionString, TOKEN_REFRESH_MARGIN,
};
pub use client::BlobStoreOptions;
pub use container::BlobContainer;
pub use error::{BlobError, OWNERSHIP_LOST_CODE, is_ownership_lost};

use client::{BlobClient, BlobProperties, Condition};
use xml::ListedBlob;

/// Metadata key of the owner id on an ownership blob.
pub const OWNER_ID: &str = "ownerid";
/// Metadata key of the sequence number on a checkpoint blob; the one KEDA reads.
pub const SEQUENCE_NUMBER: &str = "sequencenumber";
/// Metadata key of the offset on a checkpoint blob.
pub const OFFSET: &str = "offset";

/// Warns (once per call, at `warn` level) when KEDA will not find this consumer group's
/// checkpoints, and returns whether it warned.
///
/// KEDA's `blobMetadata` strategy lowercases the consumer group in the blob name it reads, and
/// blob names are case-sensitive. With capitals in the name KEDA sees no checkpoint, counts the
/// whole partition as lag, and scales to the maximum. The runtime calls this at startup.
pub fn warn_if_keda_cannot_read(consumer_group: &str) -> bool {
    if !consumer_group.chars().any(char::is_uppercase) {
        return false;
    }
    warn!(
        consumer_group,
        keda_reads = %consumer_group.to_lowercase(),
        "KEDA lowercases the consumer group and will not find the checkpoints; \
         use an all-lowercase consumer group to scale on checkpoint lag"
    );
    true
}

/// The blob name of a partition's checkpoint: `<ns>/<hub>/<cg>/checkpoint/<partition>`.
pub fn checkpoint_blob_name(
    namespace: &str,
    event_hub: &str,
    consumer_group: &str,
    partition_id: &str,
) -> String {
    format!(
        "{}{partition_id}",
        prefix(namespace, event_hub, consumer_group, "checkpoint")
    )
}

/// The blob name of a partition's ownership: `<ns>/<hub>/<cg>/ownership/<partition>`.
pub fn ownership_blob_name(
    namespace: &str,
    event_hub: &str,
    consumer_group: &str,
    partition_id: &str,
) -> String {
    format!(
        "{}{partition_id}",
        prefix(namespace, event_hub, consumer_group, "ownership")
    )
}

fn prefix(namespace: &str, event_hub: &str, consumer_group: &str, kind: &str) -> String {
    format!("{namespace}/{event_hub}/{consumer_group}/{kind}/")
}

/// What a checkpoint write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointWrite {
    /// The partition had no checkpoint; one was created.
    Created,
    /// The checkpoint moved forward.
    Updated,
    /// The stored checkpoint is at or past this one, and was left alone.
    KeptNewer {
        /// The sequence number already stored.
        stored: i64,
    },
}

/// An Event Hubs [`CheckpointStore`] on Azure Blob Storage. See the [module docs](self).
///
/// Cheap to clone; clones share the HTTP connection pool and the token cache.
#[derive(Clone, Debug)]
pub struct BlobCheckpointStore {
    client: BlobClient,
    owner_id: Option<String>,
}

impl BlobCheckpointStore {
    /// A store on the container at `container_url`, e.g.
    /// `https://acct.blob.core.windows.net/checkpoints` or, for Azurite,
    /// `http://127.0.0.1:10000/devstoreaccount1/checkpoints`.
    pub fn new(container_url: &str, auth: BlobAuth) -> Result<Self, BlobError> {
        BlobContainer::new(container_url, auth).map(Self::on)
    }

    /// A store on `container` of the account a storage connection string names.
    pub fn from_connection_string(
        connection_string: &str,
        container: &str,
    ) -> Result<Self, BlobError> {
        BlobContainer::from_connection_string(connection_string, container).map(Self::on)
    }

    /// A store on a container URL that carries its SAS, as the portal's "Generate SAS" shows it
    /// (`https://acct.blob.core.windows.net/checkpoints?sv=…&sig=…`).
    pub fn from_sas_url(container_sas_url: &str) -> Result<Self, BlobError> {
        BlobContainer::from_sas_url(container_sas_url).map(Self::on)
    }

    /// A store on `container`.
    pub fn on(container: BlobContainer) -> Self {
        Self {
            client: container.client,
            owner_id: None,
        }
    }

    /// The container the store writes to.
    pub fn container(&self) -> BlobContainer {
        BlobContainer {
            client: self.client.clone(),
        }
    }

    /// Fences checkpoint writes: each one first checks that `owner_id` still holds the
    /// partition, and is refused with [`BlobError::OwnershipLost`] if not.
    ///
    /// Use the owner id the event processor claims with (its consumer client id).
    #[must_use]
    pub fn with_owner(mut self, owner_id: impl Into<String>) -> Self {
        self.owner_id = Some(owner_id.into());
        self
    }

    /// Replaces the timeouts and retry limits.
    #[must_use]
    pub fn with_options(mut self, options: BlobStoreOptions) -> Self {
        self.client.options = options;
        self
    }

    /// The container URL, without credentials.
    pub fn container_url(&self) -> &Url {
        self.client.container_url()
    }

    /// The owner id checkpoint writes are fenced with, if any.
    pub fn owner_id(&self) -> Option<&str> {
        self.owner_id.as_deref()
    }

    /// Creates the container if it does not exist; `Ok(true)` when it was created.
    ///
    /// The SDK's processor expects the container to exist, and a missing one only shows as
    /// `ContainerNotFound` on the first claim.
    pub async fn ensure_container(&self) -> Result<bool, BlobError> {
        let created = self.client.create_container().await?;
        if created {
            info!(container = %self.container_url(), "created the checkpoint container");
        }
        Ok(created)
    }

    /// Writes a checkpoint if it is newer than the stored one; the inherent form of
    /// [`CheckpointStore::update_checkpoint`], with the outcome (for a metric of refused
    /// regressions) and the typed error.
    ///
    /// A checkpoint needs a sequence number: it is what orders checkpoints and what KEDA reads.
    pub async fn write_checkpoint(
        &self,
        checkpoint: &Checkpoint,
    ) -> Result<CheckpointWrite, BlobError> {
        check_names(
            "checkpoint",
            &checkpoint.fully_qualified_namespace,
            &checkpoint.event_hub_name,
            &checkpoint.consumer_group,
            Some(&checkpoint.partition_id),
        )?;
        let Some(sequence_number) = checkpoint.sequence_number else {
            return Err(BlobError::InvalidInput {
                what: "checkpoint",
                detail: format!(
                    "partition {} has no sequence number: it could not be ordered against the \
                     stored one, and KEDA could not read it",
                    checkpoint.partition_id
                ),
            });
        };
        let name = checkpoint_blob_name(
            &checkpoint.fully_qualified_namespace,
            &checkpoint.event_hub_name,
            &checkpoint.consumer_group,
            &checkpoint.partition_id,
        );
        let sequence_text = sequence_number.to_string();
        let mut metadata = vec![(SEQUENCE_NUMBER, sequence_text.as_str())];
        if let Some(offset) = &checkpoint.offset {
            metadata.push((OFFSET, offset.as_str()));
        }

        let attempts = self.client.options.checkpoint_attempts.max(1);
        for attempt in 1..=attempts {
            self.check_owner(checkpoint).await?;
            let current = self.client.properties(&name).await?;
            let written = match &current {
                Some(current) => {
                    if let Some(stored) = stored_sequence_number(current, &name)
                        && stored >= sequence_number
                    {
                        debug!(
                            blob = %name,
                            stored,
                            sequence_number,
                            "checkpoint not written: the stored one is at or past it"
                        );
                        return Ok(CheckpointWrite::KeptNewer { stored });
                    }
                    match &current.etag {
                        Some(etag) => self
                            .client
                            .set_metadata(&name, &metadata, Condition::IfMatch(etag))
                            .await
                            .map(|_| CheckpointWrite::Updated),
                        None => {
                            return Err(BlobError::InvalidResponse {
                                operation: "Get Blob Properties",
                                resource: name,
                                detail: "no ETag".to_owned(),
                            });
                        }
                    }
                }
                None => self
                    .client
                    .put_empty_blob(&name, &metadata, Condition::IfNoneExists)
                    .await
                    .map(|_| CheckpointWrite::Created),
            };
            match written {
                Ok(outcome) => return Ok(outcome),
                // 412: the ETag moved; 409: someone created it first; 404: deleted under us.
                // Each means another writer acted between our read and our write: read again.
                Err(BlobError::Status {
                    status: 404 | 409 | 412,
                    code,
                    ..
                }) if code.as_deref() != Some("ContainerNotFound") => {
                    debug!(blob = %name, attempt, "checkpoint changed concurrently, reading again");
                }
                Err(error) => return Err(error),
            }
        }
        Err(BlobError::Contention {
            resource: name,
            attempts,
        })
    }

    /// Refuses when the store is fenced and the ownership blob names another owner, or none.
    async fn check_owner(&self, checkpoint: &Checkpoint) -> Result<(), BlobError> {
        let Some(expected) = &self.owner_id else {
            return Ok(());
        };
        let name = ownership_blob_name(
            &checkpoint.fully_qualified_namespace,
            &checkpoint.event_hub_name,
            &checkpoint.consumer_group,
            &checkpoint.partition_id,
        );
        let actual = self
            .client
            .properties(&name)
            .await?
            .and_then(|properties| metadata_value(&properties.metadata, OWNER_ID))
            .filter(|owner| !owner.is_empty());
        if actual.as_deref() == Some(expected.as_str()) {
            return Ok(());
        }
        warn!(
            partition_id = %checkpoint.partition_id,
            owner_id = %expected,
            current_owner = actual.as_deref().unwrap_or(""),
            sequence_number = ?checkpoint.sequence_number,
            "checkpoint refused: the partition is no longer owned by this processor"
        );
        Err(BlobError::OwnershipLost {
            partition_id: checkpoint.partition_id.clone(),
            expected: expected.clone(),
            actual,
        })
    }

    /// Claims ownerships; the inherent form of [`CheckpointStore::claim_ownership`].
    ///
    /// A claim with an ETag updates the ownership blob only if it still has that ETag; a claim
    /// without one creates the blob only if it does not exist. A claim that loses (412, 409, or
    /// 404 when the blob vanished) is left out of the result, which is how the SDK's load
    /// balancer learns it did not get the partition. Granted claims come back with the new ETag
    /// and last-modified time.
    ///
    /// Any other failure fails the whole call, as in the SDK's store; claims already made by
    /// then stay, and the next `list_ownerships` shows them.
    pub async fn claim(&self, ownerships: &[Ownership]) -> Result<Vec<Ownership>, BlobError> {
        let mut granted = Vec::with_capacity(ownerships.len());
        for ownership in ownerships {
            check_names(
                "ownership",
                &ownership.fully_qualified_namespace,
                &ownership.event_hub_name,
                &ownership.consumer_group,
                Some(&ownership.partition_id),
            )?;
            let name = ownership_blob_name(
                &ownership.fully_qualified_namespace,
                &ownership.event_hub_name,
                &ownership.consumer_group,
                &ownership.partition_id,
            );
            // No owner id is how the SDK gives a partition up: the blob keeps no `ownerid`.
            let metadata: Vec<(&str, &str)> = ownership
                .owner_id
                .as_deref()
                .map(|owner| vec![(OWNER_ID, owner)])
                .unwrap_or_default();
            let result = match &ownership.etag {
                Some(etag) => {
                    self.client
                        .set_metadata(&name, &metadata, Condition::IfMatch(etag.as_ref()))
                        .await
                }
                None => {
                    self.client
                        .put_empty_blob(&name, &metadata, Condition::IfNoneExists)
                        .await
                }
            };
            let written = match result {
                Ok(written) => written,
                Err(BlobError::Status {
                    status: status @ (404 | 409 | 412),
                    code,
                    ..
                }) if code.as_deref() != Some("ContainerNotFound") => {
                    debug!(
                        partition_id = %ownership.partition_id,
                        owner_id = ownership.owner_id.as_deref().unwrap_or(""),
                        status,
                        "ownership claim lost to another processor"
                    );
                    continue;
                }
                Err(error) => return Err(error),
            };
            let Some(etag) = written.etag else {
                warn!(
                    partition_id = %ownership.partition_id,
                    "the ownership write returned no ETag; the claim is reported as not granted"
                );
                continue;
            };
            granted.push(Ownership {
                etag: Some(etag.into()),
                last_modified_time: written.last_modified,
                ..ownership.clone()
            });
        }
        Ok(granted)
    }

    /// Lists the checkpoints of a consumer group; the inherent form of
    /// [`CheckpointStore::list_checkpoints`].
    pub async fn checkpoints(
        &self,
        namespace: &str,
        event_hub: &str,
        consumer_group: &str,
    ) -> Result<Vec<Checkpoint>, BlobError> {
        check_names("checkpoint", namespace, event_hub, consumer_group, None)?;
        let prefix = prefix(namespace, event_hub, consumer_group, "checkpoint");
        let blobs = self.client.list(&prefix).await?;
        Ok(partitions(&prefix, blobs)
            .map(|(partition_id, blob)| Checkpoint {
                fully_qualified_namespace: namespace.to_owned(),
                event_hub_name: event_hub.to_owned(),
                consumer_group: consumer_group.to_owned(),
                sequence_number: listed_sequence_number(&blob),
                offset: metadata_value(&blob.metadata, OFFSET),
                partition_id,
            })
            .collect())
    }

    /// Lists the ownerships of a consumer group; the inherent form of
    /// [`CheckpointStore::list_ownerships`].
    pub async fn ownerships(
        &self,
        namespace: &str,
        event_hub: &str,
        consumer_group: &str,
    ) -> Result<Vec<Ownership>, BlobError> {
        check_names("ownership", namespace, event_hub, consumer_group, None)?;
        let prefix = prefix(namespace, event_hub, consumer_group, "ownership");
        let blobs = self.client.list(&prefix).await?;
        Ok(partitions(&prefix, blobs)
            .map(|(partition_id, blob)| Ownership {
                fully_qualified_namespace: namespace.to_owned(),
                event_hub_name: event_hub.to_owned(),
                consumer_group: consumer_group.to_owned(),
                owner_id: metadata_value(&blob.metadata, OWNER_ID)
                    .filter(|owner| !owner.is_empty()),
                etag: blob.etag.map(Into::into),
                last_modified_time: blob.last_modified,
                partition_id,
            })
            .collect())
    }
}

#[async_trait]
impl CheckpointStore for BlobCheckpointStore {
    async fn claim_ownership(
        &self,
        ownerships: &[Ownership],
    ) -> azure_core::Result<Vec<Ownership>> {
        Ok(self.claim(ownerships).await?)
    }

    async fn list_checkpoints(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Checkpoint>> {
        Ok(self
            .checkpoints(namespace, event_hub_name, consumer_group)
            .await?)
    }

    async fn list_ownerships(
        &self,
        namespace: &str,
        event_hub_name: &str,
        consumer_group: &str,
    ) -> azure_core::Result<Vec<Ownership>> {
        Ok(self
            .ownerships(namespace, event_hub_name, consumer_group)
            .await?)
    }

    async fn update_checkpoint(&self, checkpoint: Checkpoint) -> azure_core::Result<()> {
        self.write_checkpoint(&checkpoint).await?;
        Ok(())
    }
}

/// Refuses empty names, and names with `/`, which would put records where neither KEDA nor the
/// listing finds them.
fn check_names(
    what: &'static str,
    namespace: &str,
    event_hub: &str,
    consumer_group: &str,
    partition_id: Option<&str>,
) -> Result<(), BlobError> {
    let mut fields = vec![
        ("namespace", namespace),
        ("event hub", event_hub),
        ("consumer group", consumer_group),
    ];
    if let Some(partition_id) = partition_id {
        fields.push(("partition id", partition_id));
    }
    for (field, value) in fields {
        if value.is_empty() || value.contains('/') {
            return Err(BlobError::InvalidInput {
                what,
                detail: format!("the {field} {value:?} is empty or contains '/'"),
            });
        }
    }
    Ok(())
}

/// The listed blobs that are records of one partition each, with their partition id. Anything
/// deeper under the prefix is not the store's and is skipped.
fn partitions(prefix: &str, blobs: Vec<ListedBlob>) -> impl Iterator<Item = (String, ListedBlob)> {
    blobs.into_iter().filter_map(move |blob| {
        let partition_id = blob.name.strip_prefix(prefix)?;
        if partition_id.is_empty() || partition_id.contains('/') {
            return None;
        }
        Some((partition_id.to_owned(), blob))
    })
}

/// A metadata value by key, ignoring case: metadata names are case-insensitive to the service,
/// and writers differ in the case they use (Go's HTTP client, as in KEDA, canonicalizes
/// `x-ms-meta-sequencenumber` to `Sequencenumber`).
fn metadata_value(metadata: &[(String, String)], key: &str) -> Option<String> {
    metadata
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(key))
        .map(|(_, value)| value.clone())
}

fn listed_sequence_number(blob: &ListedBlob) -> Option<i64> {
    parse_sequence_number(&blob.metadata, &blob.name)
}

fn stored_sequence_number(properties: &BlobProperties, name: &str) -> Option<i64> {
    parse_sequence_number(&properties.metadata, name)
}

/// The `sequencenumber` of a checkpoint blob. A value that is not a number is reported and
/// treated as absent: the processor then starts from the offset, and the next write replaces it.
fn parse_sequence_number(metadata: &[(String, String)], name: &str) -> Option<i64> {
    let text = metadata_value(metadata, SEQUENCE_NUMBER)?;
    match text.trim().parse() {
        Ok(sequence_number) => Some(sequence_number),
        Err(_) => {
            warn!(blob = %name, value = %text, "checkpoint sequence number is not a number; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_names_match_the_sdk_layout() {
        assert_eq!(
            checkpoint_blob_name("ns.servicebus.windows.net", "hub", "$Default", "3"),
            Checkpoint::get_checkpoint_blob_name(
                "ns.servicebus.windows.net",
                "hub",
                "$Default",
                "3"
            )
            .unwrap()
        );
        assert_eq!(
            ownership_blob_name("ns.servicebus.windows.net", "hub", "$Default", "3"),
            Ownership::get_ownership_name("ns.servicebus.windows.net", "hub", "$Default", "3")
                .unwrap()
        );
        assert_eq!(
            checkpoint_blob_name("ns", "Hub", "fhir-grouper", "0"),
            "ns/Hub/fhir-grouper/checkpoint/0"
        );
    }

    #[test]
    fn keda_warning_only_for_capitals() {
        assert!(warn_if_keda_cannot_read("$Default"));
        assert!(warn_if_keda_cannot_read("FhirGrouper"));
        assert!(!warn_if_keda_cannot_read("fhir-grouper"));
        assert!(!warn_if_keda_cannot_read("$default"));
    }

    #[test]
    fn metadata_keys_match_in_any_case() {
        let metadata = vec![
            ("SequenceNumber".to_owned(), "41".to_owned()),
            ("OFFSET".to_owned(), "1024".to_owned()),
        ];
        assert_eq!(parse_sequence_number(&metadata, "b"), Some(41));
        assert_eq!(metadata_value(&metadata, OFFSET).as_deref(), Some("1024"));
        assert_eq!(metadata_value(&metadata, OWNER_ID), None);
        let garbage = vec![("sequencenumber".to_owned(), "forty".to_owned())];
        assert_eq!(parse_sequence_number(&garbage, "b"), None);
    }

    #[test]
    fn listing_keeps_only_partition_records() {
        let blob = |name: &str| ListedBlob {
            name: name.to_owned(),
            ..ListedBlob::default()
        };
        let found: Vec<String> = partitions(
            "ns/hub/cg/checkpoint/",
            vec![
                blob("ns/hub/cg/checkpoint/0"),
                blob("ns/hub/cg/checkpoint/"),
                blob("ns/hub/cg/checkpoint/1/extra"),
                blob("ns/hub/cg/checkpoint/10"),
                blob("elsewhere/0"),
            ],
        )
        .map(|(partition, _)| partition)
        .collect();
        assert_eq!(found, ["0", "10"]);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_names("checkpoint", "ns", "hub", "cg", Some("0")).is_ok());
        assert!(check_names("checkpoint", "ns", "hub", "cg", Some("")).is_err());
        assert!(check_names("checkpoint", "ns", "a/b", "cg", None).is_err());
        assert!(check_names("ownership", "", "hub", "cg", None).is_err());
    }

    /// A loopback HTTP/1.1 server that answers connections from a script, one response per
    /// connection (`Connection: close`), and records each request head in lowercase.
    struct FakeServer {
        base: String,
        heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        thread: std::thread::JoinHandle<()>,
    }

    impl FakeServer {
        fn start(script: Vec<(u16, &'static str, &'static str)>) -> Self {
            use std::io::{Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let recorded = heads.clone();
            let thread = std::thread::spawn(move || {
                for (status, extra_headers, body) in script {
                    let (mut stream, _) = listener.accept().unwrap();
                    let mut head = Vec::new();
                    let mut byte = [0_u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                        head.push(byte[0]);
                    }
                    recorded
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).to_lowercase());
                    let response = format!(
                        "HTTP/1.1 {status} Scripted\r\ncontent-type: application/xml\r\n\
                         content-length: {}\r\nconnection: close\r\n{extra_headers}\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).unwrap();
                }
            });
            Self {
                base,
                heads,
                thread,
            }
        }

        fn container(&self) -> String {
            format!("{}/devstoreaccount1/checkpoints", self.base)
        }

        fn finish(self) -> Vec<String> {
            self.thread.join().unwrap();
            std::sync::Arc::try_unwrap(self.heads)
                .unwrap()
                .into_inner()
                .unwrap()
        }
    }

    const EMPTY_LIST: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults>\
        <Blobs/><NextMarker/></EnumerationResults>";

    #[derive(Debug)]
    struct FixedCredential(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl azure_core::credentials::TokenCredential for FixedCredential {
        async fn get_token(
            &self,
            scopes: &[&str],
            _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            assert_eq!(scopes, ["https://storage.azure.com/.default"]);
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(azure_core::credentials::AccessToken::new(
                "fake-entra-token",
                azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
            ))
        }
    }

    #[tokio::test]
    async fn entra_id_requests_carry_a_cached_bearer_token() {
        let server = FakeServer::start(vec![(200, "", EMPTY_LIST), (200, "", EMPTY_LIST)]);
        let credential = std::sync::Arc::new(FixedCredential(0.into()));
        let store =
            BlobCheckpointStore::new(&server.container(), BlobAuth::token(credential.clone()))
                .unwrap();
        for _ in 0..2 {
            assert!(
                store
                    .ownerships("ns", "hub", "cg")
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
        let heads = server.finish();
        assert_eq!(heads.len(), 2);
        for head in &heads {
            assert!(
                head.starts_with(
                    "get /devstoreaccount1/checkpoints?restype=container&comp=list\
                     &include=metadata&prefix=ns%2fhub%2fcg%2fownership%2f http/1.1\r\n"
                ),
                "{head}"
            );
            assert!(
                head.contains("\r\nauthorization: bearer fake-entra-token\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nx-ms-version: 2021-08-06\r\n"), "{head}");
            assert!(head.contains("\r\nx-ms-date: "), "{head}");
        }
        assert_eq!(credential.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn entra_id_tokens_are_not_sent_over_plain_http_to_other_hosts() {
        let credential = std::sync::Arc::new(FixedCredential(0.into()));
        let error = BlobCheckpointStore::new(
            "http://acct.example/checkpoints",
            BlobAuth::token(credential),
        )
        .unwrap_err();
        assert!(matches!(error, BlobError::Config(_)), "{error}");
    }

    fn quick_retries(max_retries: u32) -> BlobStoreOptions {
        BlobStoreOptions {
            max_retries,
            retry_base_delay: std::time::Duration::from_millis(1),
            ..BlobStoreOptions::default()
        }
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let server = FakeServer::start(vec![
            (503, "x-ms-error-code: ServerBusy\r\n", ""),
            (500, "retry-after: 0\r\n", ""),
            (200, "", EMPTY_LIST),
        ]);
        let store = BlobCheckpointStore::new(&server.container(), BlobAuth::development_storage())
            .unwrap()
            .with_options(quick_retries(3));
        assert!(
            store
                .checkpoints("ns", "hub", "cg")
                .await
                .unwrap()
                .is_empty()
        );
        let heads = server.finish();
        assert_eq!(heads.len(), 3);
        // Every attempt is signed afresh.
        assert!(
            heads
                .iter()
                .all(|head| head.contains("authorization: sharedkey devstoreaccount1:"))
        );
    }

    #[tokio::test]
    async fn retries_give_up_with_the_last_status() {
        let busy = (503, "x-ms-error-code: ServerBusy\r\n", "");
        let server = FakeServer::start(vec![busy, busy, busy]);
        let store = BlobCheckpointStore::new(&server.container(), BlobAuth::development_storage())
            .unwrap()
            .with_options(quick_retries(2));
        let error = store.checkpoints("ns", "hub", "cg").await.unwrap_err();
        assert_eq!(error.status(), Some(503));
        assert!(error.is_transient());
        let core: azure_core::Error = error.into();
        assert_eq!(
            core.http_status(),
            Some(azure_core::http::StatusCode::ServiceUnavailable)
        );
        assert_eq!(server.finish().len(), 3);
    }

    #[tokio::test]
    async fn an_unreadable_listing_is_an_error_not_a_panic() {
        let server = FakeServer::start(vec![(200, "", "<html>captive portal</html>")]);
        let store =
            BlobCheckpointStore::new(&server.container(), BlobAuth::development_storage()).unwrap();
        let error = store.ownerships("ns", "hub", "cg").await.unwrap_err();
        assert!(
            matches!(error, BlobError::InvalidResponse { .. }),
            "{error}"
        );
        server.finish();
    }

    #[tokio::test]
    async fn a_checkpoint_without_sequence_number_is_refused_before_any_request() {
        // Port 9 (discard) on loopback: nothing is listening, and nothing must be sent.
        let store = BlobCheckpointStore::new(
            "http://127.0.0.1:9/devstoreaccount1/checkpoints",
            BlobAuth::development_storage(),
        )
        .unwrap();
        let checkpoint = Checkpoint {
            fully_qualified_namespace: "ns".to_owned(),
            event_hub_name: "hub".to_owned(),
            consumer_group: "cg".to_owned(),
            partition_id: "0".to_owned(),
            offset: Some("12".to_owned()),
            sequence_number: None,
        };
        let error = store.write_checkpoint(&checkpoint).await.unwrap_err();
        assert!(matches!(error, BlobError::InvalidInput { .. }), "{error}");
    }
}
