//! The change event: one per resource version iomt creates, updates or deletes.
//!
//! Everything in it is derived from the write, so that the same write reported twice (after a
//! crash between the write and the event log append, or read from the log twice) is the same
//! event: consumers de-duplicate on [`ChangeEvent::id`]. It carries ids and versions only; the
//! resource itself is added at delivery, for subscriptions that ask for it.

use iomt_core::{Action, Written};
use uuid::Uuid;

/// The namespace of event ids (UUIDv5 of the URL below), fixed so that ids stay stable across
/// versions of iomt.
fn namespace() -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        b"https://github.com/iomt-rs/iomt/events",
    )
}

/// What happened to the resource, named as Azure Health Data Services names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ChangeKind {
    /// A resource was created.
    Created,
    /// A resource was updated.
    Updated,
    /// A resource was deleted.
    Deleted,
}

impl ChangeKind {
    /// The Event Grid `eventType`, also the CloudEvents `type`.
    pub fn event_type(self) -> &'static str {
        match self {
            ChangeKind::Created => "Microsoft.HealthcareApis.FhirResourceCreated",
            ChangeKind::Updated => "Microsoft.HealthcareApis.FhirResourceUpdated",
            ChangeKind::Deleted => "Microsoft.HealthcareApis.FhirResourceDeleted",
        }
    }

    /// The FHIR AuditEvent action code.
    pub fn audit_action(self) -> &'static str {
        match self {
            ChangeKind::Created => "C",
            ChangeKind::Updated => "U",
            ChangeKind::Deleted => "D",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ChangeKind::Created => "Created",
            ChangeKind::Updated => "Updated",
            ChangeKind::Deleted => "Deleted",
        }
    }

    /// The kind of a write's action; an unchanged write is no change.
    pub fn of(action: Action) -> Option<Self> {
        match action {
            Action::Created => Some(ChangeKind::Created),
            Action::Updated => Some(ChangeKind::Updated),
            Action::Deleted => Some(ChangeKind::Deleted),
            Action::Unchanged => None,
        }
    }
}

/// Who publishes the events, as consumers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publisher {
    /// The CloudEvents `source` and Event Grid `topic` (for Azure, the workspace's resource
    /// id). Part of every event id.
    pub source: String,
    /// The FHIR service's host, without a scheme: `resourceFhirAccount`, and the start of
    /// `subject`.
    pub fhir_account: String,
}

impl Publisher {
    /// A publisher whose FHIR account is the host (and port) of `fhir_url`.
    pub fn for_fhir_url(source: impl Into<String>, fhir_url: &str) -> Self {
        let rest = fhir_url
            .split_once("://")
            .map_or(fhir_url, |(_, rest)| rest);
        let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        // Credentials in a URL are never part of an event.
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        Self {
            source: source.into(),
            fhir_account: host.to_owned(),
        }
    }
}

/// One change of one resource version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// UUIDv5 of the source, `Type/id/_history/versionId` and the kind: the same change always
    /// has the same id.
    pub id: Uuid,
    /// What happened.
    pub kind: ChangeKind,
    /// `Observation`, `Patient`, …
    pub resource_type: String,
    /// The logical id.
    pub resource_id: String,
    /// The version the change produced (for a delete, the deleted version).
    pub version_id: String,
    /// When the change was committed: the version's `meta.lastUpdated`.
    pub time: String,
    /// The event's position in the event log, in the log partition of its partition key; set
    /// when the event is read from the log. Increases with each event of a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
}

impl ChangeEvent {
    /// The event of a change; the id follows from `source` and the change.
    pub fn new(
        source: &str,
        kind: ChangeKind,
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
        version_id: impl Into<String>,
        time: impl Into<String>,
    ) -> Self {
        let (resource_type, resource_id, version_id) =
            (resource_type.into(), resource_id.into(), version_id.into());
        let name = format!(
            "{source}\n{resource_type}/{resource_id}/_history/{version_id}\n{}",
            kind.name()
        );
        Self {
            id: Uuid::new_v5(&namespace(), name.as_bytes()),
            kind,
            resource_type,
            resource_id,
            version_id,
            time: time.into(),
            sequence: None,
        }
    }

    /// The event of a write, `None` for an unchanged one. A server that reports no version or
    /// time gets `0` and an empty time: the event still names the resource.
    pub fn of_write(source: &str, written: &Written) -> Option<Self> {
        ChangeKind::of(written.action).map(|kind| Self::of_version(source, written, kind))
    }

    /// The event of the version a write found in place: what the original write of that
    /// version emitted, when the resource was last changed by `kind`. A write redone after a
    /// crash comes back unchanged; emitting this again delivers the event the crash may have
    /// lost, under the same id.
    pub fn of_version(source: &str, written: &Written, kind: ChangeKind) -> Self {
        Self::new(
            source,
            kind,
            written.resource_type.clone(),
            written.id.clone(),
            written.version_id.clone().unwrap_or_else(|| "0".to_owned()),
            written.last_updated.clone().unwrap_or_default(),
        )
    }

    /// `Type/id`: the partition key, so that the events of a resource stay in order.
    pub fn partition_key(&self) -> String {
        format!("{}/{}", self.resource_type, self.resource_id)
    }

    /// `{fhir account}/{Type}/{id}`, as Azure Health Data Services writes `subject`.
    pub fn subject(&self, publisher: &Publisher) -> String {
        format!(
            "{}/{}/{}",
            publisher.fhir_account, self.resource_type, self.resource_id
        )
    }

    /// A W3C `traceparent` derived from the event id: the same event always carries the same
    /// trace, so a consumer can join the deliveries of one change.
    pub fn traceparent(&self) -> String {
        let hex = self.id.simple().to_string();
        format!("00-{hex}-{}-01", &hex[..16])
    }

    /// The version as a number when it is one (as Azure sends `resourceVersionId`), else as
    /// text (servers such as Medplum use UUIDs).
    pub fn version_value(&self) -> serde_json::Value {
        match self.version_id.parse::<u64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::from(self.version_id.clone()),
        }
    }

    /// The sequence as CloudEvents wants it: a string that sorts in order.
    pub fn sequence_text(&self) -> Option<String> {
        self.sequence.map(|s| format!("{s:020}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(action: Action, version: &str) -> Written {
        Written {
            resource_type: "Observation".into(),
            id: "abc".into(),
            version_id: Some(version.into()),
            last_updated: Some("2024-03-05T09:00:00.000Z".into()),
            action,
            identity: false,
        }
    }

    #[test]
    fn ids_are_deterministic_and_differ_by_version_kind_and_source() {
        let a = ChangeEvent::of_write("iomt", &written(Action::Updated, "2")).unwrap();
        let b = ChangeEvent::of_write("iomt", &written(Action::Updated, "2")).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.id.get_version_num(), 5);
        let others = [
            ChangeEvent::of_write("iomt", &written(Action::Updated, "3")).unwrap(),
            ChangeEvent::of_write("iomt", &written(Action::Deleted, "2")).unwrap(),
            ChangeEvent::of_write("other", &written(Action::Updated, "2")).unwrap(),
        ];
        for other in others {
            assert_ne!(a.id, other.id);
        }
        assert!(ChangeEvent::of_write("iomt", &written(Action::Unchanged, "2")).is_none());
        // A repeat of the version found in place is the original event.
        let repeat = ChangeEvent::of_version(
            "iomt",
            &written(Action::Unchanged, "2"),
            ChangeKind::Updated,
        );
        assert_eq!(repeat, a);
    }

    #[test]
    fn subject_key_trace_and_publisher() {
        let publisher = Publisher::for_fhir_url(
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.HealthcareApis/workspaces/w",
            "https://user:pass@ws-fhir.fhir.azurehealthcareapis.com/fhir?x=1",
        );
        assert_eq!(
            publisher.fhir_account,
            "ws-fhir.fhir.azurehealthcareapis.com"
        );
        let e = ChangeEvent::of_write("iomt", &written(Action::Created, "1")).unwrap();
        assert_eq!(
            e.subject(&publisher),
            "ws-fhir.fhir.azurehealthcareapis.com/Observation/abc"
        );
        assert_eq!(e.partition_key(), "Observation/abc");
        let trace = e.traceparent();
        assert_eq!(trace.len(), 55, "{trace}");
        assert!(trace.starts_with("00-") && trace.ends_with("-01"));
        assert_eq!(e.version_value(), serde_json::json!(1));
        let uuid_version = ChangeEvent::new("s", ChangeKind::Updated, "Device", "d", "a-b", "");
        assert_eq!(uuid_version.version_value(), serde_json::json!("a-b"));
        let mut sequenced = e;
        sequenced.sequence = Some(42);
        assert_eq!(
            sequenced.sequence_text().as_deref(),
            Some("00000000000000000042")
        );
    }
}
