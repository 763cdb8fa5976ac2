//! The two places resources are written: a FHIR server, and the embedded store.

use std::sync::Arc;
use std::time::Duration;

use iomt_convert::{
    Merge, ObservationGroup, ResourceIds, SERVICE_SYSTEM, build_observation, created_device,
    created_patient, identifier_value, merge_observation, resource_id,
};
use iomt_core::{Action, MeasurementGroup, Timestamp, Written};
use iomt_fhir::{IdentityError, IdentityResolver, ObservationWriter, Resolved};
use iomt_store::{EmbeddedStore, Expect, StoreError, Stored};
use iomt_templates::fhir::CodeValueTemplate;
use moka::future::Cache;
use serde_json::Value;

use crate::convert::Store;
use crate::sink::SinkError;

/// A FHIR server: identities by MedTech's lookup or create rules, Observations through the
/// version-caching writer.
#[derive(Debug)]
pub struct FhirStore {
    identity: IdentityResolver,
    writer: ObservationWriter,
    url: String,
}

impl FhirStore {
    /// A store over a resolver and a writer sharing one client.
    pub fn new(identity: IdentityResolver, writer: ObservationWriter, url: String) -> Self {
        Self {
            identity,
            writer,
            url,
        }
    }
}

impl Store for FhirStore {
    async fn resolve(&self, group: &MeasurementGroup) -> Result<Resolved, SinkError> {
        self.identity
            .resolve(group)
            .await
            .map_err(SinkError::identity)
    }

    async fn write_observation(
        &self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ids: &ResourceIds,
    ) -> Result<Written, SinkError> {
        self.writer
            .write(template, window, ids)
            .await
            .map_err(|e| SinkError::write(e, ""))
    }

    async fn write_resource(&self, resource: Value) -> Result<Written, SinkError> {
        self.writer
            .write_resource(&resource)
            .await
            .map_err(|e| SinkError::write(e, ""))
    }

    fn describe(&self) -> String {
        format!("FHIR server {}", iomt_core::redact_url(&self.url))
    }
}

/// How many times a write that lost a race is re-read and redone.
const CONFLICT_RETRIES: usize = 3;

/// The embedded store, with MedTech's Create-mode identities: each measurement names its
/// patient, and the Patient and Device get the deterministic ids Create mode gives them, so the
/// store holds what a FHIR server in Create mode would hold.
#[derive(Debug)]
pub struct Embedded {
    store: Arc<EmbeddedStore>,
    device_system: Option<String>,
    /// Devices whose Patient and Device are stored, by (device, patient) identifier.
    resolved: Cache<(String, String), ResourceIds>,
}

impl Embedded {
    /// Writes to `store`; Devices get identifiers in `device_system`.
    pub fn new(store: Arc<EmbeddedStore>, device_system: Option<String>) -> Self {
        Self {
            store,
            device_system,
            resolved: Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<EmbeddedStore> {
        &self.store
    }
}

fn unchanged(stored: &Stored, resource_type: &str, id: &str) -> Written {
    Written {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version_id: Some(stored.version.to_string()),
        last_updated: stored.resource["meta"]["lastUpdated"]
            .as_str()
            .map(str::to_owned),
        action: Action::Unchanged,
        identity: false,
    }
}

impl Store for Embedded {
    async fn resolve(&self, group: &MeasurementGroup) -> Result<Resolved, SinkError> {
        let patient_value = group
            .patient_id
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| SinkError::identity(IdentityError::PatientIdentityNotDefined))?;
        let key = (group.device_id.clone(), patient_value.to_owned());
        if let Some(ids) = self.resolved.get(&key).await {
            return Ok(Resolved {
                ids,
                written: Vec::new(),
            });
        }
        let patient = created_patient(patient_value);
        let patient_id = patient["id"].as_str().unwrap_or_default().to_owned();
        let device = created_device(self.device_system.as_deref(), &group.device_id, &patient_id);
        let device_id = device["id"].as_str().unwrap_or_default().to_owned();
        // MedTech's Create mode refuses to move a Device to another Patient.
        let existing = self
            .store
            .read("Device", &device_id)
            .await
            .map_err(SinkError::store)?;
        if let Some(d) = existing
            && d.resource["patient"]["reference"].as_str()
                != Some(format!("Patient/{patient_id}").as_str())
        {
            return Err(SinkError::identity(IdentityError::PatientDeviceMismatch));
        }
        let mut written = Vec::with_capacity(2);
        for resource in [patient, device] {
            let w = self.store.put(resource, None, true).await;
            written.push(w.map_err(SinkError::store)?);
        }
        let ids = ResourceIds {
            patient: patient_id,
            device: device_id,
            encounter: None,
        };
        self.resolved.insert(key, ids.clone()).await;
        Ok(Resolved { ids, written })
    }

    async fn write_observation(
        &self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ids: &ResourceIds,
    ) -> Result<Written, SinkError> {
        let id = resource_id(SERVICE_SYSTEM, &identifier_value(ids, window));
        for _ in 0..CONFLICT_RETRIES {
            let current = self
                .store
                .read("Observation", &id)
                .await
                .map_err(SinkError::store)?;
            let (body, expect) = match &current {
                None => (
                    build_observation(template, window, ids, Timestamp::now())
                        .map_err(|e| SinkError::convert(&e, None))?,
                    Expect::Absent,
                ),
                Some(c) => match merge_observation(&c.resource, template, window)
                    .map_err(|e| SinkError::convert(&e, None))?
                {
                    Merge::Unchanged => return Ok(unchanged(c, "Observation", &id)),
                    Merge::Updated(o) => (o, Expect::Version(c.version)),
                },
            };
            match self.store.put(body, Some(expect), false).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other.map_err(SinkError::store),
            }
        }
        Err(SinkError::store(StoreError::Conflict {
            reference: format!("Observation/{id}"),
        }))
    }

    async fn write_resource(&self, resource: Value) -> Result<Written, SinkError> {
        self.store
            .put(resource, None, false)
            .await
            .map_err(SinkError::store)
    }

    fn describe(&self) -> String {
        let counts = self
            .store
            .counts()
            .unwrap_or_default()
            .into_iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("embedded store {} ({counts})", self.store.dir().display())
    }
}
