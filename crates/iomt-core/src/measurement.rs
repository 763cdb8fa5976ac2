//! The normalized measurement: what the normalize stage emits and the group stage consumes.
//!
//! The serialized form follows the MedTech mapping debugger (camelCase: `type`,
//! `occurrenceTimeUtc`, `deviceId`, `properties[{name, value}]`). Reading also accepts the
//! PascalCase that the .NET connector puts on its internal Event Hub, so captured traffic from
//! a running MedTech deployment can be replayed into iomt.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// One reading of one type from one device at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// The template's `typeName`; binds the measurement to a FHIR mapping template. Shared
    /// with the template (and every other measurement of the type) rather than copied.
    #[serde(rename = "type", alias = "Type")]
    pub type_name: Arc<str>,
    /// When the reading was taken (the template's timestamp expression).
    #[serde(alias = "OccurrenceTimeUtc")]
    pub occurrence_time_utc: Timestamp,
    /// When the source event reached the device hub; absent when the event was not read from a
    /// hub (for example `iomt mapping test --message`).
    #[serde(default, alias = "IngestionTimeUtc")]
    pub ingestion_time_utc: Option<Timestamp>,
    /// The device's business identifier, as found in the message.
    #[serde(alias = "DeviceId")]
    pub device_id: String,
    /// The patient's business identifier, when the template extracts one.
    #[serde(default, alias = "PatientId")]
    pub patient_id: Option<String>,
    /// The encounter's business identifier, when the template extracts one.
    #[serde(default, alias = "EncounterId")]
    pub encounter_id: Option<String>,
    /// Groups measurements into one observation when the FHIR template's period is
    /// `CorrelationId`.
    #[serde(default, alias = "CorrelationId")]
    pub correlation_id: Option<String>,
    /// Extracted values, in the template's `values` order. Values are always strings, as in
    /// MedTech, so that a FHIR template decides how to interpret them.
    #[serde(default, alias = "Properties")]
    pub properties: Vec<MeasurementProperty>,
}

/// One named value of a measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasurementProperty {
    /// The template's `valueName`, shared with the template.
    #[serde(alias = "Name")]
    pub name: Arc<str>,
    /// The value as text, converted the way .NET converts JSON tokens to strings.
    #[serde(alias = "Value")]
    pub value: String,
}

impl Measurement {
    /// The internal-hub partition key MedTech uses for this measurement's device.
    ///
    /// Every measurement of a device must land on the same partition so that the group stage
    /// sees all of them; MedTech spreads devices over 256 keys with a Java-style string hash of
    /// the lower-cased device id. Using the same function keeps a device's partition stable
    /// when a deployment switches between the two systems.
    pub fn partition_key(&self) -> String {
        partition_key(&self.device_id)
    }

    /// What MedTech groups measurements by: the text
    /// `{device}-{type}-{patient}-{encounter}-{correlation id}`, in which a missing id prints as
    /// nothing. A missing id and an empty one therefore share a group (whose ids are those of
    /// its first measurement); blank ids that differ do not.
    pub fn group_ids(&self) -> [&str; 5] {
        [
            &self.device_id,
            &self.type_name,
            self.patient_id.as_deref().unwrap_or_default(),
            self.encounter_id.as_deref().unwrap_or_default(),
            self.correlation_id.as_deref().unwrap_or_default(),
        ]
    }
}

/// The measurements of one device, patient, encounter, correlation id and type: the unit the
/// convert stage turns into Observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementGroup {
    /// The measurement type, as the device mapping produced it.
    pub type_name: Arc<str>,
    /// The device's business identifier.
    pub device_id: String,
    /// The patient's business identifier, if the mapping extracted one.
    pub patient_id: Option<String>,
    /// The encounter's business identifier, if the mapping extracted one.
    pub encounter_id: Option<String>,
    /// The correlation id, if the mapping extracted one.
    pub correlation_id: Option<String>,
    /// The measurements, in arrival order.
    pub measurements: Vec<Measurement>,
}

impl MeasurementGroup {
    /// Groups measurements by [`Measurement::group_ids`], keeping the order in which each group
    /// first appears.
    pub fn group(measurements: impl IntoIterator<Item = Measurement>) -> Vec<MeasurementGroup> {
        let mut groups: Vec<MeasurementGroup> = Vec::new();
        for m in measurements {
            let found = groups
                .iter_mut()
                .find(|g| g.measurements[0].group_ids() == m.group_ids());
            match found {
                Some(g) => g.measurements.push(m),
                None => groups.push(MeasurementGroup {
                    type_name: m.type_name.clone(),
                    device_id: m.device_id.clone(),
                    patient_id: m.patient_id.clone(),
                    encounter_id: m.encounter_id.clone(),
                    correlation_id: m.correlation_id.clone(),
                    measurements: vec![m],
                }),
            }
        }
        groups
    }
}

/// MedTech's device partition key: `h = 31*h + c` over the UTF-16 code units of the
/// lower-cased id in wrapping 32-bit arithmetic, then `|h| % 256` in decimal.
///
/// .NET would throw on `abs(int.MinValue)`; here that one value maps to key `0`.
pub fn partition_key(device_id: &str) -> String {
    let mut hash: i32 = 0;
    for ch in device_id.chars() {
        // ToLowerInvariant maps each UTF-16 unit on its own; keep characters whose lower
        // case is not a single character as they are.
        let mut lower = ch.to_lowercase();
        let ch = match (lower.next(), lower.next()) {
            (Some(l), None) => l,
            _ => ch,
        };
        let mut units = [0u16; 2];
        for unit in ch.encode_utf16(&mut units) {
            hash = hash.wrapping_mul(31).wrapping_add(i32::from(*unit));
        }
    }
    (hash.unsigned_abs() % 256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_out_pascal_case_in() {
        let json = r#"{"Type":"heartrate","OccurrenceTimeUtc":"2019-02-01T22:46:01.875Z","IngestionTimeUtc":"2019-02-01T22:46:02.11Z","DeviceId":"device123","PatientId":null,"EncounterId":null,"CorrelationId":null,"Properties":[{"Name":"hr","Value":"78"}]}"#;
        let m: Measurement = serde_json::from_str(json).unwrap();
        assert_eq!(&*m.type_name, "heartrate");
        assert_eq!(m.properties[0].value, "78");
        let out = serde_json::to_string(&m).unwrap();
        assert_eq!(
            out,
            r#"{"type":"heartrate","occurrenceTimeUtc":"2019-02-01T22:46:01.875Z","ingestionTimeUtc":"2019-02-01T22:46:02.11Z","deviceId":"device123","patientId":null,"encounterId":null,"correlationId":null,"properties":[{"name":"hr","value":"78"}]}"#
        );
        let again: Measurement = serde_json::from_str(&out).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn partition_key_matches_java_hash() {
        // "abc".hashCode() == 96354 in Java; 96354 % 256 == 98.
        assert_eq!(partition_key("abc"), "98");
        assert_eq!(partition_key("ABC"), "98");
        // "Device123".hashCode() == "device123".hashCode() == 25163804; 25163804 % 256 == 28.
        assert_eq!(partition_key("Device123"), "28");
        // A negative hash: "polygenelubricants".hashCode() == Integer.MIN_VALUE.
        assert_eq!(partition_key("polygenelubricants"), "0");
        assert_eq!(partition_key(""), "0");
    }
}
