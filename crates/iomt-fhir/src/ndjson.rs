//! FHIR output to a directory instead of a server: one `{ResourceType}.ndjson` file per
//! resource type, as in the FHIR Bulk Data export layout.
//!
//! This is the embedded default when no FHIR URL is configured. Observations are merged across
//! the whole run exactly as on a server (same ids, same SampledData merge), so the files hold
//! what a server would hold. [`NdjsonStore::persist`] replaces the files atomically (write,
//! sync, rename); a replay checkpoints only after it, and [`NdjsonStore::open`] loads what is
//! there, so a killed replay resumes into the same state.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use iomt_convert::{
    ConvertError, Merge, ObservationGroup, ResourceIds, SERVICE_SYSTEM, build_observation,
    identifier_value, merge_observation, resource_id,
};
use iomt_core::Timestamp;
use iomt_templates::fhir::CodeValueTemplate;
use serde_json::Value;

use crate::writer::WriteOutcome;

/// Resources by type and id, mirrored to `{dir}/{type}.ndjson`.
#[derive(Debug)]
pub struct NdjsonStore {
    dir: PathBuf,
    resources: BTreeMap<String, BTreeMap<String, Value>>,
    dirty: bool,
}

impl NdjsonStore {
    /// Opens an output directory, loading the resources already written there.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut resources: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "ndjson") {
                continue;
            }
            for (i, line) in std::fs::read_to_string(&path)?.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let resource: Value = serde_json::from_str(line).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}:{}: {e}", path.display(), i + 1),
                    )
                })?;
                let (Some(t), Some(id)) =
                    (resource["resourceType"].as_str(), resource["id"].as_str())
                else {
                    continue;
                };
                resources
                    .entry(t.to_owned())
                    .or_default()
                    .insert(id.to_owned(), resource);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            resources,
            dirty: false,
        })
    }

    /// A stored resource.
    pub fn get(&self, resource_type: &str, id: &str) -> Option<&Value> {
        self.resources.get(resource_type)?.get(id)
    }

    /// Resources stored per type.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        self.resources
            .iter()
            .map(|(t, r)| (t.as_str(), r.len()))
            .collect()
    }

    /// Creates or merges the Observation for one window, as on a FHIR server.
    pub fn write_observation(
        &mut self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ids: &ResourceIds,
    ) -> Result<WriteOutcome, ConvertError> {
        let id = resource_id(SERVICE_SYSTEM, &identifier_value(ids, window));
        let observations = self.resources.entry("Observation".to_owned()).or_default();
        let (resource, outcome) = match observations.get(&id) {
            None => (
                build_observation(template, window, ids, Timestamp::now())?,
                WriteOutcome::Created,
            ),
            Some(existing) => match merge_observation(existing, template, window)? {
                Merge::Unchanged => return Ok(WriteOutcome::Unchanged),
                Merge::Updated(o) => (o, WriteOutcome::Updated),
            },
        };
        observations.insert(id, resource);
        self.dirty = true;
        Ok(outcome)
    }

    /// Stores a rendered resource (handlebars templates), replacing one with the same id.
    pub fn write_resource(&mut self, resource: Value) -> WriteOutcome {
        let (Some(t), Some(id)) = (resource["resourceType"].as_str(), resource["id"].as_str())
        else {
            return WriteOutcome::Unchanged;
        };
        let (t, id) = (t.to_owned(), id.to_owned());
        let by_id = self.resources.entry(t).or_default();
        let outcome = match by_id.get(&id) {
            Some(existing) if *existing == resource => return WriteOutcome::Unchanged,
            Some(_) => WriteOutcome::Updated,
            None => WriteOutcome::Created,
        };
        by_id.insert(id, resource);
        self.dirty = true;
        outcome
    }

    /// Writes every changed type's file atomically and durably.
    pub fn persist(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        for (resource_type, by_id) in &self.resources {
            let path = self.dir.join(format!("{resource_type}.ndjson"));
            let tmp = self.dir.join(format!(".{resource_type}.ndjson.tmp"));
            let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for resource in by_id.values() {
                serde_json::to_writer(&mut file, resource)?;
                file.write_all(b"\n")?;
            }
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use iomt_convert::observation_groups;
    use iomt_core::{Measurement, MeasurementGroup, MeasurementProperty};
    use iomt_templates::fhir::FhirMapping;

    use super::*;

    fn group(time: &str, hr: &str) -> MeasurementGroup {
        MeasurementGroup::group(vec![Measurement {
            type_name: Arc::from("heartrate"),
            occurrence_time_utc: Timestamp::parse(time).unwrap(),
            ingestion_time_utc: None,
            device_id: "dev".into(),
            patient_id: Some("pat".into()),
            encounter_id: None,
            correlation_id: None,
            properties: vec![MeasurementProperty {
                name: Arc::from("hr"),
                value: hr.into(),
            }],
        }])
        .remove(0)
    }

    #[test]
    fn merges_across_the_run_and_resumes_from_disk() {
        let fhir = FhirMapping::parse(
            r#"{"templateType": "CollectionFhir", "template": [{"templateType": "CodeValueFhir", "template": {
            "typeName": "heartrate", "periodInterval": 60, "codes": [{"code": "8867-4"}],
            "value": {"valueName": "hr", "valueType": "SampledData", "defaultPeriod": 60000}}}]}"#,
        )
        .unwrap();
        let t = fhir.template("heartrate").unwrap();
        let ids = ResourceIds {
            patient: "pat".into(),
            device: "dev".into(),
            encounter: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut store = NdjsonStore::open(dir.path()).unwrap();
        let g = group("2026-11-20T08:01:00Z", "70");
        let w = &observation_groups(t.period_interval, &g).unwrap()[0];
        assert_eq!(
            store.write_observation(t, w, &ids).unwrap(),
            WriteOutcome::Created
        );
        assert_eq!(
            store.write_observation(t, w, &ids).unwrap(),
            WriteOutcome::Unchanged
        );
        store.persist().unwrap();

        // A new process picks up the file and keeps merging into the same Observation.
        let mut store = NdjsonStore::open(dir.path()).unwrap();
        let g = group("2026-11-20T08:02:00Z", "71");
        let w = &observation_groups(t.period_interval, &g).unwrap()[0];
        assert_eq!(
            store.write_observation(t, w, &ids).unwrap(),
            WriteOutcome::Updated
        );
        store.persist().unwrap();
        let text = std::fs::read_to_string(dir.path().join("Observation.ndjson")).unwrap();
        assert_eq!(text.lines().count(), 1);
        let o: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert!(
            o["valueSampledData"]["data"]
                .as_str()
                .unwrap()
                .starts_with("E 70 71 E")
        );
        assert_eq!(store.counts()["Observation"], 1);
    }
}
