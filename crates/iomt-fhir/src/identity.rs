//! Resolving a measurement group's device, patient and encounter to FHIR logical ids.
//!
//! Follows MedTech's `ResourceIdentity` service: the Device is found by identifier and the
//! Patient comes from `Device.patient` (the message's patient id is not used in Lookup mode).
//! In Create mode missing Patients and Devices are created with deterministic ids (SHA-256 of
//! `"{system}_{value}"`), so concurrent creators and replays converge on one resource.

use std::time::Duration;

use iomt_convert::{ResourceIds, created_device, created_patient};
use iomt_core::{Action, MeasurementGroup, Written};
use moka::future::Cache;
use serde_json::{Value, json};

use crate::client::Versioned;

use crate::client::{FhirClient, FhirError};

/// How identities are resolved (`ResourceIdentity:ResourceIdentityServiceType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    /// Device must exist; its `patient` must be set.
    Lookup,
    /// Lookup, and every measurement must name an encounter.
    LookupWithEncounter,
    /// Create the Patient and Device when they do not exist.
    Create,
}

/// Identity settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The mode.
    pub mode: IdentityMode,
    /// System of Device identifiers (`ResourceIdentity:DefaultDeviceIdentifierSystem`).
    pub device_identifier_system: Option<String>,
    /// How long a resolution is reused (MedTech: 2 hours).
    pub cache_ttl: Duration,
    /// Devices remembered at most (MedTech: 5000).
    pub cache_capacity: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            mode: IdentityMode::Lookup,
            device_identifier_system: None,
            cache_ttl: Duration::from_secs(2 * 3600),
            cache_capacity: 5000,
        }
    }
}

/// Why identities could not be resolved; names follow MedTech's exceptions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// No Device has the identifier.
    #[error("DeviceNotFound: no Device has the identifier of this measurement's device")]
    DeviceNotFound,
    /// Several Devices have the identifier.
    #[error("MultipleDeviceFound: more than one Device has this device identifier")]
    MultipleDeviceFound,
    /// The Device has no usable `patient` reference.
    #[error("PatientNotFound: the Device has no patient reference of the form Patient/{{id}}")]
    PatientNotFound,
    /// Create mode needs a patient id in the measurement.
    #[error("PatientIdentityNotDefined: Create mode needs a patient id in the measurement")]
    PatientIdentityNotDefined,
    /// The Device already belongs to another Patient.
    #[error(
        "PatientDeviceMismatch: the Device is linked to another Patient than the measurement names"
    )]
    PatientDeviceMismatch,
    /// LookupWithEncounter needs an encounter id in the measurement.
    #[error("EncounterIdentityNotDefined: the measurement has no encounter id")]
    EncounterIdentityNotDefined,
    /// No Encounter has the identifier.
    #[error("EncounterNotFound: no Encounter has this encounter identifier")]
    EncounterNotFound,
    /// The FHIR server failed.
    #[error(transparent)]
    Fhir(#[from] FhirError),
}

impl IdentityError {
    /// MedTech's exception name, for metrics and dead-letter records.
    pub fn name(&self) -> &'static str {
        match self {
            IdentityError::DeviceNotFound => "DeviceNotFoundException",
            IdentityError::MultipleDeviceFound => "MultipleDeviceFoundException",
            IdentityError::PatientNotFound => "PatientNotFoundException",
            IdentityError::PatientIdentityNotDefined => "PatientIdentityNotDefinedException",
            IdentityError::PatientDeviceMismatch => "PatientDeviceMismatchException",
            IdentityError::EncounterIdentityNotDefined => "EncounterIdentityNotDefinedException",
            IdentityError::EncounterNotFound => "EncounterNotFoundException",
            IdentityError::Fhir(e) => e.metric_name(),
        }
    }
}

/// Resolves and caches identities.
#[derive(Debug, Clone)]
pub struct IdentityResolver {
    client: FhirClient,
    config: IdentityConfig,
    cache: Cache<(String, Option<String>), ResourceIds>,
}

/// A group's identities, and the Patient and Device writes that resolving them took (Create
/// mode, on the first resolution of a device only).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The FHIR ids.
    pub ids: ResourceIds,
    /// What was written to resolve them.
    pub written: Vec<Written>,
}

impl IdentityResolver {
    /// A resolver over `client`.
    pub fn new(client: FhirClient, config: IdentityConfig) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.cache_capacity)
            .time_to_live(config.cache_ttl)
            .build();
        Self {
            client,
            config,
            cache,
        }
    }

    /// The FHIR ids for a group, from the cache when possible.
    pub async fn resolve(&self, group: &MeasurementGroup) -> Result<Resolved, IdentityError> {
        let key = (group.device_id.clone(), group.encounter_id.clone());
        // Concurrent resolutions of one device share a single lookup (and, in Create mode, a
        // single create), instead of each group of a burst doing its own. Only the call that
        // resolved reports the writes; the others find the ids cached.
        let mut written = Vec::new();
        let entry = self
            .cache
            .entry(key)
            .or_try_insert_with(async {
                let (ids, w) = self.resolve_uncached(group).await?;
                written = w;
                Ok::<_, IdentityError>(ids)
            })
            .await
            .map_err(|e| (*e).clone())?;
        if !entry.is_fresh() {
            written.clear();
        }
        Ok(Resolved {
            ids: entry.into_value(),
            written,
        })
    }

    /// Forgets a device's resolution (after a 404 on a referenced resource, for example).
    pub async fn forget(&self, group: &MeasurementGroup) {
        self.cache
            .invalidate(&(group.device_id.clone(), group.encounter_id.clone()))
            .await;
    }

    fn device_identifier(&self, device_id: &str) -> String {
        match &self.config.device_identifier_system {
            Some(system) => format!("{system}|{device_id}"),
            None => device_id.to_owned(),
        }
    }

    async fn find_device(&self, device_id: &str) -> Result<Option<Value>, IdentityError> {
        let found = self
            .client
            .search(
                "Device",
                &[("identifier", &self.device_identifier(device_id))],
                2,
            )
            .await?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.into_iter().next()),
            _ => Err(IdentityError::MultipleDeviceFound),
        }
    }

    async fn resolve_uncached(
        &self,
        group: &MeasurementGroup,
    ) -> Result<(ResourceIds, Vec<Written>), IdentityError> {
        let device = self.find_device(&group.device_id).await?;
        // Every mode first looks the device and its patient up, then the encounter; only when
        // that lookup fails for the device or patient does Create mode create them, and then it
        // resolves no encounter.
        let mut written = Vec::new();
        let (device_id, patient_id, looked_up) = match (device, self.config.mode) {
            (Some(d), mode) if patient_of(&d).is_some() => {
                let patient = patient_of(&d).unwrap_or_default();
                if mode == IdentityMode::Create {
                    self.found_own(group, &d, &patient, &mut written).await?;
                }
                (id_of(&d)?, patient, true)
            }
            (Some(d), IdentityMode::Create) => {
                let (device, patient) =
                    self.create_identities(group, Some(d), &mut written).await?;
                (device, patient, false)
            }
            (Some(_), _) => return Err(IdentityError::PatientNotFound),
            (None, IdentityMode::Create) => {
                let (device, patient) = self.create_identities(group, None, &mut written).await?;
                (device, patient, false)
            }
            (None, _) => return Err(IdentityError::DeviceNotFound),
        };
        // MedTech tests ids with `string.IsNullOrWhiteSpace`: a blank encounter id is none.
        let encounter_id = group
            .encounter_id
            .as_deref()
            .filter(|e| !e.trim().is_empty());
        let encounter = match encounter_id {
            Some(encounter) if looked_up => {
                let found = self
                    .client
                    .search("Encounter", &[("identifier", encounter)], 2)
                    .await?;
                let first = found.first().ok_or(IdentityError::EncounterNotFound)?;
                Some(id_of(first)?)
            }
            _ => None,
        };
        if self.config.mode == IdentityMode::LookupWithEncounter && encounter_id.is_none() {
            return Err(IdentityError::EncounterIdentityNotDefined);
        }
        let ids = ResourceIds {
            patient: patient_id,
            device: device_id,
            encounter,
        };
        Ok((ids, written))
    }

    /// Create mode, device and patient found: those that carry the ids Create mode gives are
    /// reported as unchanged writes. A run that created them and stopped before their change
    /// events were appended to the event log is then repaired by the next one; resources
    /// someone else created are not iomt's writes and are not reported.
    async fn found_own(
        &self,
        group: &MeasurementGroup,
        device: &Value,
        patient_id: &str,
        written: &mut Vec<Written>,
    ) -> Result<(), IdentityError> {
        let own_device = created_device(
            self.config.device_identifier_system.as_deref(),
            &group.device_id,
            patient_id,
        );
        if device["id"] != own_device["id"] {
            return Ok(());
        }
        written.push(Versioned::of(device.clone()).written(Action::Unchanged, true));
        let own_patient = group
            .patient_id
            .as_deref()
            .is_some_and(|p| created_patient(p)["id"] == patient_id);
        if own_patient && let Some(patient) = self.client.read("Patient", patient_id).await? {
            written.push(patient.written(Action::Unchanged, true));
        }
        Ok(())
    }

    /// Create mode: find or create the Patient by identifier, then find, link or create the
    /// Device, all with deterministic ids.
    async fn create_identities(
        &self,
        group: &MeasurementGroup,
        device: Option<Value>,
        written: &mut Vec<Written>,
    ) -> Result<(String, String), IdentityError> {
        let patient_value = group
            .patient_id
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .ok_or(IdentityError::PatientIdentityNotDefined)?;
        let patients = self
            .client
            .search("Patient", &[("identifier", patient_value)], 1)
            .await?;
        let patient_id = match patients.first() {
            Some(p) => {
                if p["id"] == created_patient(patient_value)["id"] {
                    written.push(Versioned::of(p.clone()).written(Action::Unchanged, true));
                }
                id_of(p)?
            }
            None => {
                let put = self
                    .client
                    .put(&created_patient(patient_value), None)
                    .await?;
                id_of(&record(put, written).resource)?
            }
        };
        let reference = format!("Patient/{patient_id}");
        let device_id = match device {
            Some(d) if patient_of(&d).is_some_and(|p| p != patient_id) => {
                return Err(IdentityError::PatientDeviceMismatch);
            }
            Some(mut d) => {
                d["patient"] = json!({"reference": reference});
                id_of(&record(self.client.put(&d, None).await?, written).resource)?
            }
            None => {
                let device = created_device(
                    self.config.device_identifier_system.as_deref(),
                    &group.device_id,
                    &patient_id,
                );
                id_of(&record(self.client.put(&device, None).await?, written).resource)?
            }
        };
        Ok((device_id, patient_id))
    }
}

/// Notes an identity write.
fn record(put: (Versioned, bool), written: &mut Vec<Written>) -> Versioned {
    let (versioned, created) = put;
    let action = if created {
        Action::Created
    } else {
        Action::Updated
    };
    written.push(versioned.written(action, true));
    versioned
}

fn id_of(resource: &Value) -> Result<String, IdentityError> {
    resource["id"].as_str().map(str::to_owned).ok_or_else(|| {
        IdentityError::Fhir(FhirError::InvalidResponse("a resource without id".into()))
    })
}

/// The Patient id of `Device.patient` when it is a relative `Patient/{id}` reference.
fn patient_of(device: &Value) -> Option<String> {
    let reference = device["patient"]["reference"].as_str()?;
    let id = reference.strip_prefix("Patient/")?;
    let valid = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-~#".contains(c));
    valid.then(|| id.to_owned())
}
