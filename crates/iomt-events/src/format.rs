//! The payload formats a subscription can choose. The default ones carry ids and versions
//! only, never a resource: a consumer reads the resource with its own authorization.

use serde_json::{Value, json};

use crate::event::{ChangeEvent, ChangeKind, Publisher};

/// The system of the tag a full-resource payload of a deleted resource carries.
pub const DELETED_TAG_SYSTEM: &str = "https://github.com/iomt-rs/iomt/event";

/// How a subscription's events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// CloudEvents 1.0 in structured mode: the whole event as JSON
    /// (`application/cloudevents+json`).
    #[default]
    Cloudevents,
    /// CloudEvents 1.0 in binary mode: `data` as the body, the attributes as `ce_` (Kafka),
    /// `ce-` (HTTP) or `cloudEvents:` (AMQP) headers.
    CloudeventsBinary,
    /// The Event Grid schema, as Azure Health Data Services sends it.
    EventGrid,
    /// A FHIR R4 AuditEvent naming the resource, with a `version: R4` header.
    AuditEvent,
    /// `resourceType` and `id` only.
    IdOnly,
    /// The resource itself. Carries PHI: opt in per subscription.
    FullResource,
}

impl Format {
    /// Whether the payload holds the resource, which must then be read for each event.
    pub fn needs_resource(self) -> bool {
        self == Format::FullResource
    }
}

/// An event ready for a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The message body.
    pub body: Vec<u8>,
    /// Its media type.
    pub content_type: &'static str,
    /// CloudEvents attributes carried as headers (binary mode), unprefixed: each transport
    /// adds its binding's prefix.
    pub attributes: Vec<(&'static str, String)>,
    /// Headers sent as they are.
    pub headers: Vec<(&'static str, String)>,
}

/// The four fields Azure Health Data Services puts in `data`.
fn thin_data(event: &ChangeEvent, publisher: &Publisher) -> Value {
    json!({
        "resourceType": event.resource_type,
        "resourceFhirAccount": publisher.fhir_account,
        "resourceFhirId": event.resource_id,
        "resourceVersionId": event.version_value(),
    })
}

/// The CloudEvents attributes of an event, in the order they are written.
fn cloudevent_attributes(
    event: &ChangeEvent,
    publisher: &Publisher,
) -> Vec<(&'static str, String)> {
    let mut attributes = vec![
        ("specversion", "1.0".to_owned()),
        ("id", event.id.to_string()),
        ("source", publisher.source.clone()),
        ("type", event.kind.event_type().to_owned()),
        ("subject", event.subject(publisher)),
        ("time", event.time.clone()),
        // Azure puts the version here, `#` and the number; kept for consumers written for it.
        ("dataschema", format!("#{}", event.version_id)),
    ];
    if let Some(sequence) = event.sequence_text() {
        attributes.push(("sequence", sequence));
    }
    attributes.push(("partitionkey", event.partition_key()));
    attributes.push(("traceparent", event.traceparent()));
    attributes
}

/// The event as a JSON object in `format` (for binary mode, its structured form), for dead
/// letters and filters.
pub fn to_json(
    event: &ChangeEvent,
    publisher: &Publisher,
    format: Format,
    resource: Option<&Value>,
) -> Value {
    match format {
        Format::Cloudevents | Format::CloudeventsBinary => {
            let mut object = serde_json::Map::new();
            for (name, value) in cloudevent_attributes(event, publisher) {
                object.insert(name.to_owned(), Value::String(value));
            }
            object.insert(
                "datacontenttype".to_owned(),
                Value::from("application/json"),
            );
            object.insert("data".to_owned(), thin_data(event, publisher));
            Value::Object(object)
        }
        Format::EventGrid => json!({
            "topic": publisher.source,
            "subject": event.subject(publisher),
            "eventType": event.kind.event_type(),
            "eventTime": event.time,
            "id": event.id.to_string(),
            "data": thin_data(event, publisher),
            "dataVersion": event.version_id,
            "metadataVersion": "1",
        }),
        Format::AuditEvent => audit_event(event, publisher),
        Format::IdOnly => json!({
            "resourceType": event.resource_type,
            "id": event.resource_id,
        }),
        Format::FullResource => full_resource(event, resource),
    }
}

/// Renders an event for a transport.
pub fn render(
    event: &ChangeEvent,
    publisher: &Publisher,
    format: Format,
    resource: Option<&Value>,
) -> Rendered {
    let json_body = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
    match format {
        Format::CloudeventsBinary => Rendered {
            body: json_body(&thin_data(event, publisher)),
            content_type: "application/json",
            attributes: cloudevent_attributes(event, publisher),
            headers: Vec::new(),
        },
        Format::Cloudevents => Rendered {
            body: json_body(&to_json(event, publisher, format, resource)),
            content_type: "application/cloudevents+json; charset=UTF-8",
            attributes: Vec::new(),
            headers: Vec::new(),
        },
        Format::AuditEvent => Rendered {
            body: json_body(&to_json(event, publisher, format, resource)),
            content_type: "application/fhir+json",
            attributes: Vec::new(),
            headers: vec![("version", "R4".to_owned())],
        },
        Format::FullResource => Rendered {
            body: json_body(&to_json(event, publisher, format, resource)),
            content_type: "application/fhir+json",
            attributes: Vec::new(),
            headers: Vec::new(),
        },
        Format::EventGrid | Format::IdOnly => Rendered {
            body: json_body(&to_json(event, publisher, format, resource)),
            content_type: "application/json",
            attributes: Vec::new(),
            headers: Vec::new(),
        },
    }
}

/// A FHIR R4 AuditEvent for the change, in the style of Kafka change events (icanbwell's
/// fhir-server), with the full commit time rather than a date.
fn audit_event(event: &ChangeEvent, publisher: &Publisher) -> Value {
    let verb = match event.kind {
        ChangeKind::Created => "Create",
        ChangeKind::Updated => "Change",
        ChangeKind::Deleted => "Delete",
    };
    let reference = event.partition_key();
    json!({
        "resourceType": "AuditEvent",
        "id": event.id.to_string(),
        "type": {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110100",
            "display": "Application Activity"
        },
        "action": event.kind.audit_action(),
        "period": {"start": event.time, "end": event.time},
        "recorded": event.time,
        "purposeOfEvent": [{
            "coding": [{
                "system": "https://github.com/iomt-rs/iomt/event-purpose",
                "code": format!("{} {verb}", event.resource_type)
            }]
        }],
        "agent": [{"who": {"reference": reference}, "requestor": true}],
        "source": {"site": publisher.fhir_account, "observer": {"display": publisher.source}},
        "entity": [{
            "what": {"reference": format!("{reference}/_history/{}", event.version_id)}
        }]
    })
}

/// The resource; a deleted one carries a `deleted` tag so that a store fed by these events
/// can filter it out. Without the resource (it could not be read), its type, id and version.
fn full_resource(event: &ChangeEvent, resource: Option<&Value>) -> Value {
    let mut resource = resource.cloned().unwrap_or_else(|| {
        json!({
            "resourceType": event.resource_type,
            "id": event.resource_id,
            "meta": {"versionId": event.version_id},
        })
    });
    if event.kind == ChangeKind::Deleted
        && let Some(object) = resource.as_object_mut()
    {
        let meta = object
            .entry("meta")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(meta) = meta {
            let tags = meta.entry("tag").or_insert_with(|| json!([]));
            if let Some(tags) = tags.as_array_mut() {
                tags.push(json!({"system": DELETED_TAG_SYSTEM, "code": "deleted"}));
            }
        }
    }
    resource
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> (ChangeEvent, Publisher) {
        let publisher = Publisher {
            source:
                "/subscriptions/s/resourceGroups/r/providers/Microsoft.HealthcareApis/workspaces/w"
                    .into(),
            fhir_account: "w-f.fhir.azurehealthcareapis.com".into(),
        };
        let mut e = ChangeEvent::new(
            &publisher.source,
            ChangeKind::Updated,
            "Patient",
            "p1",
            "2",
            "2024-03-05T09:00:00.0000000Z",
        );
        e.sequence = Some(7);
        (e, publisher)
    }

    fn body(r: &Rendered) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn event_grid_is_field_for_field_azure() {
        let (e, p) = event();
        let v = body(&render(&e, &p, Format::EventGrid, None));
        assert_eq!(
            v,
            json!({
                "topic": p.source,
                "subject": "w-f.fhir.azurehealthcareapis.com/Patient/p1",
                "eventType": "Microsoft.HealthcareApis.FhirResourceUpdated",
                "eventTime": "2024-03-05T09:00:00.0000000Z",
                "id": e.id.to_string(),
                "data": {
                    "resourceType": "Patient",
                    "resourceFhirAccount": "w-f.fhir.azurehealthcareapis.com",
                    "resourceFhirId": "p1",
                    "resourceVersionId": 2
                },
                "dataVersion": "2",
                "metadataVersion": "1"
            })
        );
    }

    #[test]
    fn cloudevents_structured_and_binary_carry_the_same_attributes() {
        let (e, p) = event();
        let structured = render(&e, &p, Format::Cloudevents, None);
        assert!(
            structured
                .content_type
                .starts_with("application/cloudevents+json")
        );
        let v = body(&structured);
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "Microsoft.HealthcareApis.FhirResourceUpdated");
        assert_eq!(v["dataschema"], "#2");
        assert_eq!(v["sequence"], "00000000000000000007");
        assert_eq!(v["partitionkey"], "Patient/p1");
        assert_eq!(v["data"]["resourceFhirId"], "p1");
        let binary = render(&e, &p, Format::CloudeventsBinary, None);
        assert_eq!(body(&binary), v["data"]);
        for (name, value) in &binary.attributes {
            assert_eq!(v[*name], Value::from(value.as_str()), "{name}");
        }
        assert_eq!(binary.attributes.len() + 2, v.as_object().unwrap().len());
    }

    #[test]
    fn audit_event_id_only_and_full_resource() {
        let (e, p) = event();
        let audit = render(&e, &p, Format::AuditEvent, None);
        assert_eq!(audit.headers, [("version", "R4".to_owned())]);
        let v = body(&audit);
        assert_eq!(v["action"], "U");
        assert_eq!(v["agent"][0]["who"]["reference"], "Patient/p1");
        assert_eq!(
            v["purposeOfEvent"][0]["coding"][0]["code"],
            "Patient Change"
        );
        assert_eq!(v["period"]["start"], e.time);
        assert_eq!(
            body(&render(&e, &p, Format::IdOnly, None)),
            json!({"resourceType": "Patient", "id": "p1"})
        );
        let patient = json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"}});
        assert_eq!(
            body(&render(&e, &p, Format::FullResource, Some(&patient))),
            patient
        );
        let deleted = ChangeEvent::new(&p.source, ChangeKind::Deleted, "Patient", "p1", "3", "t");
        let v = body(&render(&deleted, &p, Format::FullResource, Some(&patient)));
        assert_eq!(v["meta"]["tag"][0]["code"], "deleted");
        assert_eq!(v["meta"]["tag"][0]["system"], DELETED_TAG_SYSTEM);
    }

    #[test]
    fn default_formats_carry_no_resource_content() {
        let (e, p) = event();
        let patient =
            json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Secret"}]});
        for format in [
            Format::Cloudevents,
            Format::CloudeventsBinary,
            Format::EventGrid,
            Format::AuditEvent,
            Format::IdOnly,
        ] {
            let r = render(&e, &p, format, Some(&patient));
            assert!(
                !String::from_utf8_lossy(&r.body).contains("Secret"),
                "{format:?}"
            );
        }
    }
}
