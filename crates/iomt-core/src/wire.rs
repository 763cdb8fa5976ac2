//! The internal hub's wire format of a measurement: MedTech's, so that tooling that reads a MedTech internal
//! hub (and captures of one) reads ours, and a convert stage of either system reads the
//! other's normalized events.
//!
//! One event per measurement, the Newtonsoft-serialized .NET `Measurement`: PascalCase names,
//! nulls written out, properties as `[{"Name": …, "Value": …}]`.

use crate::{Measurement, Timestamp};
use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Wire<'a> {
    #[serde(rename = "Type")]
    type_name: &'a str,
    occurrence_time_utc: &'a Timestamp,
    ingestion_time_utc: &'a Option<Timestamp>,
    device_id: &'a str,
    patient_id: &'a Option<String>,
    encounter_id: &'a Option<String>,
    correlation_id: &'a Option<String>,
    properties: Vec<WireProperty<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireProperty<'a> {
    name: &'a str,
    value: &'a str,
}

/// The event body of a measurement.
pub fn encode(m: &Measurement) -> Vec<u8> {
    let wire = Wire {
        type_name: &m.type_name,
        occurrence_time_utc: &m.occurrence_time_utc,
        ingestion_time_utc: &m.ingestion_time_utc,
        device_id: &m.device_id,
        patient_id: &m.patient_id,
        encounter_id: &m.encounter_id,
        correlation_id: &m.correlation_id,
        properties: m
            .properties
            .iter()
            .map(|p| WireProperty {
                name: &p.name,
                value: &p.value,
            })
            .collect(),
    };
    // Serializing borrowed strings and timestamps into a Vec cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// The measurement in an event body; `Err` says what is wrong with it.
pub fn decode(body: &[u8]) -> Result<Measurement, String> {
    serde_json::from_slice(body).map_err(|e| format!("not a normalized measurement: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_medtech_pascal_case_with_nulls_and_reads_it_back() {
        let medtech = r#"{"Type":"heartrate","OccurrenceTimeUtc":"2019-02-01T22:46:01.875Z","IngestionTimeUtc":"2019-02-01T22:46:02.11Z","DeviceId":"device123","PatientId":null,"EncounterId":null,"CorrelationId":null,"Properties":[{"Name":"hr","Value":"78"}]}"#;
        let m = decode(medtech.as_bytes()).unwrap();
        assert_eq!(&*m.type_name, "heartrate");
        assert_eq!(m.properties[0].value, "78");
        assert_eq!(String::from_utf8(encode(&m)).unwrap(), medtech);
        assert_eq!(decode(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn says_what_is_wrong_with_a_body() {
        let e = decode(br#"{"Type":"hr"}"#).unwrap_err();
        assert!(
            e.starts_with("not a normalized measurement: missing field"),
            "{e}"
        );
        assert!(decode(b"\xff").is_err());
    }
}
