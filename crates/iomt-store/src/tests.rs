use std::sync::Arc;

use super::*;

fn observation(id: &str, value: i64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "valueQuantity": {"value": value}})
}

#[tokio::test]
async fn versions_history_and_change_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let first = store
        .put(observation("o1", 70), Some(Expect::Absent), false)
        .await
        .unwrap();
    assert_eq!(first.action, Action::Created);
    assert_eq!(first.version_id.as_deref(), Some("1"));
    assert_eq!(first.reference(), "Observation/o1");
    let same = store.put(observation("o1", 70), None, false).await.unwrap();
    assert_eq!(same.action, Action::Unchanged);
    assert_eq!(same.version_id.as_deref(), Some("1"));
    assert_eq!(same.last_updated, first.last_updated);
    let second = store
        .put(observation("o1", 71), Some(Expect::Version(1)), false)
        .await
        .unwrap();
    assert_eq!(
        (second.action, second.version_id.as_deref()),
        (Action::Updated, Some("2"))
    );
    // A stale writer is refused.
    let stale = store
        .put(observation("o1", 72), Some(Expect::Version(1)), false)
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert!(matches!(
        store
            .put(observation("o1", 72), Some(Expect::Absent), false)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    let stored = store.read("Observation", "o1").await.unwrap().unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(stored.resource["meta"]["versionId"], "2");
    assert_eq!(stored.resource["valueQuantity"]["value"], 71);
    assert!(store.read("Observation", "nope").await.unwrap().is_none());
    // The change log has one row per version, in order, and none for the unchanged write.
    let log = ChangeReader::store(dir.path())
        .unwrap()
        .changes(0, 100)
        .unwrap();
    let seen: Vec<(i64, Action, Option<&str>)> = log
        .iter()
        .map(|c| (c.seq, c.written.action, c.written.version_id.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, Action::Created, Some("1")),
            (2, Action::Updated, Some("2"))
        ]
    );
    assert_eq!(
        ChangeReader::store(dir.path())
            .unwrap()
            .changes(1, 100)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.counts().unwrap(), vec![("Observation".to_owned(), 1)]);
    assert!(matches!(
        store.put(json!({"id": "x"}), None, false).await,
        Err(StoreError::Invalid)
    ));
}

#[tokio::test]
async fn concurrent_writes_commit_together_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.spawn(async move {
            store
                .put(observation(&format!("o{i}"), i), None, false)
                .await
                .unwrap()
        });
    }
    let mut created = 0;
    while let Some(w) = tasks.join_next().await {
        assert_eq!(w.unwrap().action, Action::Created);
        created += 1;
    }
    assert_eq!(created, 200);
    drop(tasks);
    let store = Arc::into_inner(store).unwrap();
    drop(store);
    let again = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        again.counts().unwrap(),
        vec![("Observation".to_owned(), 200)]
    );
    assert_eq!(
        ChangeReader::store(dir.path())
            .unwrap()
            .changes(0, 1000)
            .unwrap()
            .len(),
        200
    );
}

#[tokio::test]
async fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedStore::open(dir.path()).unwrap();
    let second = EmbeddedStore::open(dir.path());
    assert!(
        matches!(&second, Err(StoreError::Locked { dir: d }) if d == dir.path()),
        "{second:?}"
    );
    assert!(
        second
            .unwrap_err()
            .to_string()
            .contains("in use by another iomt process")
    );
}

#[tokio::test]
async fn exports_the_bulk_data_layout() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    for (t, id) in [
        ("Patient", "p1"),
        ("Observation", "b"),
        ("Observation", "a"),
    ] {
        store
            .put(json!({"resourceType": t, "id": id}), None, false)
            .await
            .unwrap();
    }
    let out = dir.path().join("ndjson");
    let counts = export_ndjson(dir.path(), &out).unwrap();
    assert_eq!(
        counts,
        vec![("Observation".to_owned(), 2), ("Patient".to_owned(), 1)]
    );
    let text = std::fs::read_to_string(out.join("Observation.ndjson")).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(out.join("Patient.ndjson").is_file());
    assert!(export_ndjson(&dir.path().join("empty"), &out).is_err());
}
