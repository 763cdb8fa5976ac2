//! Checks on delivered change events, shared by the tests that deliver them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// A resource version: type, id, version.
pub type Version = (String, String, String);

/// The version a CloudEvents or Event Grid event announces.
pub fn announced(event: &Value) -> Version {
    let data = &event["data"];
    (
        data["resourceType"].as_str().unwrap().to_owned(),
        data["resourceFhirId"].as_str().unwrap().to_owned(),
        match &data["resourceVersionId"] {
            Value::String(s) => s.clone(),
            n => n.to_string(),
        },
    )
}

/// Every version in `expected` was delivered, none other, and each under one event id (a
/// redelivery is a duplicate with the same id).
pub fn assert_each_version_under_one_id(
    expected: &BTreeSet<Version>,
    delivered: impl IntoIterator<Item = (Version, String)>,
) {
    let mut ids_by_version: BTreeMap<Version, BTreeSet<String>> = BTreeMap::new();
    for (version, id) in delivered {
        ids_by_version.entry(version).or_default().insert(id);
    }
    let versions: BTreeSet<Version> = ids_by_version.keys().cloned().collect();
    let missing: Vec<&Version> = expected.difference(&versions).collect();
    let invented: Vec<&Version> = versions.difference(expected).collect();
    assert!(missing.is_empty(), "versions never delivered: {missing:?}");
    assert!(
        invented.is_empty(),
        "events of versions the server never had: {invented:?}"
    );
    for (version, ids) in &ids_by_version {
        assert_eq!(
            ids.len(),
            1,
            "{version:?} delivered under several ids: {ids:?}"
        );
    }
}
