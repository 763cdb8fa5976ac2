//! Where measurement groups are written: a FHIR server, or an NDJSON directory in embedded
//! mode.
//!
//! A sink turns one flushed group into resources, the way MedTech's FHIR conversion does:
//! find the FHIR template for the type, resolve the Device and Patient, split the group into
//! observation windows, and create or merge one Observation per window. Failures come back
//! classified, because the runtime treats them differently: [`SinkError::Data`] is
//! dead-lettered at once, [`SinkError::Unavailable`] is retried until the server is back.

use std::future::Future;
use std::sync::{Arc, Mutex};

use iomt_convert::{ConvertError, ResourceIds, observation_groups, render_resource};
use iomt_core::MeasurementGroup;
use iomt_fhir::{
    FhirError, IdentityError, IdentityResolver, NdjsonStore, ObservationWriter, WriteError,
    WriteOutcome, created_device, created_patient,
};
use iomt_templates::fhir::{FhirMapping, FhirTemplate};
use serde_json::Value;

use crate::metrics::Saved;

/// Why a group could not be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SinkError {
    /// The data cannot be written as it is: no template, an unknown device, a value the
    /// template cannot use, a FHIR 4xx. Retrying cannot help; the group is dead-lettered.
    #[error("{kind}: {message}")]
    Data {
        /// MedTech's exception name.
        kind: &'static str,
        /// What went wrong.
        message: String,
        /// The FHIR template involved.
        template: Option<String>,
    },
    /// The server is unavailable, throttling, or refusing our credentials. The group is
    /// retried; the checkpoint waits for it.
    #[error("{kind}: {message}")]
    Unavailable {
        /// The metric name of the failure.
        kind: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl SinkError {
    fn convert(e: &ConvertError, template: Option<String>) -> Self {
        SinkError::Data {
            kind: e.name(),
            message: e.to_string(),
            template,
        }
    }

    fn fhir(e: FhirError, template: Option<String>) -> Self {
        match e {
            FhirError::Rejected { .. } => SinkError::Data {
                kind: e.metric_name(),
                message: e.to_string(),
                template,
            },
            other => SinkError::Unavailable {
                kind: other.metric_name(),
                message: other.to_string(),
            },
        }
    }

    fn identity(e: IdentityError) -> Self {
        match e {
            IdentityError::Fhir(f) => SinkError::fhir(f, None),
            other => SinkError::Data {
                kind: other.name(),
                message: other.to_string(),
                template: None,
            },
        }
    }

    fn write(e: WriteError, template: &str) -> Self {
        let template = Some(template.to_owned());
        match e {
            WriteError::Convert(c) => SinkError::convert(&c, template),
            WriteError::Fhir(f) => SinkError::fhir(f, template),
            WriteError::MultipleObservations(_) => SinkError::Data {
                kind: "MultipleObservationFoundException",
                message: e.to_string(),
                template,
            },
        }
    }
}

/// The resources one group write touched: (resource type, outcome).
pub type Written = Vec<(String, Saved)>;

/// A destination for measurement groups.
pub trait Sink: Send + Sync + 'static {
    /// Writes one group. Returns once the writes are done (on a server) or applied to the
    /// in-memory state that [`Sink::persist`] makes durable (NDJSON).
    fn write(
        &self,
        group: &MeasurementGroup,
    ) -> impl Future<Output = Result<Written, SinkError>> + Send;

    /// Makes every write that has returned durable. The runtime calls it before each
    /// checkpoint.
    fn persist(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// Where the output goes, for messages.
    fn describe(&self) -> String;
}

/// Names a FHIR template in messages and dead-letter records.
fn template_label(template: &FhirTemplate<'_>) -> String {
    match template {
        FhirTemplate::CodeValue(t) => format!(
            "template[{}] CodeValueFhir '{}' (line {})",
            t.index, t.type_name, t.line
        ),
        FhirTemplate::Handlebars(t) => format!(
            "template[{}] HandlebarsFhir '{}' (line {})",
            t.index, t.type_name, t.line
        ),
    }
}

fn lookup<'a>(
    mapping: &'a FhirMapping,
    group: &MeasurementGroup,
) -> Result<(FhirTemplate<'a>, String), SinkError> {
    let template = mapping.lookup(&group.type_name).ok_or_else(|| {
        SinkError::convert(
            &ConvertError::TemplateNotFound(group.type_name.to_string()),
            None,
        )
    })?;
    let label = template_label(&template);
    Ok((template, label))
}

fn saved(outcome: WriteOutcome) -> Saved {
    match outcome {
        WriteOutcome::Created => Saved::Created,
        WriteOutcome::Updated => Saved::Updated,
        WriteOutcome::Unchanged => Saved::Unchanged,
    }
}

fn resource_type(resource: &Value) -> String {
    resource["resourceType"]
        .as_str()
        .unwrap_or("Resource")
        .to_owned()
}

/// Writes to a FHIR server.
#[derive(Debug)]
pub struct FhirSink {
    mapping: Arc<FhirMapping>,
    identity: IdentityResolver,
    writer: ObservationWriter,
    url: String,
}

impl FhirSink {
    /// A sink over a resolver and a writer sharing one client.
    pub fn new(
        mapping: Arc<FhirMapping>,
        identity: IdentityResolver,
        writer: ObservationWriter,
        url: String,
    ) -> Self {
        Self {
            mapping,
            identity,
            writer,
            url,
        }
    }
}

impl Sink for FhirSink {
    async fn write(&self, group: &MeasurementGroup) -> Result<Written, SinkError> {
        let (template, label) = lookup(&self.mapping, group)?;
        let ids = self
            .identity
            .resolve(group)
            .await
            .map_err(SinkError::identity)?;
        let windows = observation_groups(template.period_interval(), group)
            .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
        let mut written = Vec::with_capacity(windows.len());
        for window in &windows {
            match template {
                FhirTemplate::CodeValue(t) => {
                    let outcome = self
                        .writer
                        .write(t, window, &ids)
                        .await
                        .map_err(|e| SinkError::write(e, &label))?;
                    written.push(("Observation".to_owned(), saved(outcome)));
                }
                FhirTemplate::Handlebars(t) => {
                    let resource = render_resource(t, window, &ids, group)
                        .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
                    let outcome = self
                        .writer
                        .write_resource(&resource)
                        .await
                        .map_err(|e| SinkError::write(e, &label))?;
                    written.push((resource_type(&resource), saved(outcome)));
                }
            }
        }
        Ok(written)
    }

    fn describe(&self) -> String {
        format!("FHIR server {}", self.url)
    }
}

/// Writes FHIR NDJSON files (Bulk Data layout) to a directory, merging across the run.
///
/// Identities follow MedTech's Create mode: each measurement must name its patient, and the
/// Patient and Device are written with the deterministic ids Create mode gives them, so the
/// directory holds what a server in Create mode would hold.
#[derive(Debug)]
pub struct NdjsonSink {
    mapping: Arc<FhirMapping>,
    store: Mutex<NdjsonStore>,
    device_system: Option<String>,
    dir: String,
}

impl NdjsonSink {
    /// A sink over an opened store.
    pub fn new(
        mapping: Arc<FhirMapping>,
        store: NdjsonStore,
        device_system: Option<String>,
        dir: String,
    ) -> Self {
        Self {
            mapping,
            store: Mutex::new(store),
            device_system,
            dir,
        }
    }

    /// Resources stored per type.
    pub fn counts(&self) -> Vec<(String, usize)> {
        self.store
            .lock()
            .map(|s| {
                s.counts()
                    .into_iter()
                    .map(|(t, n)| (t.to_owned(), n))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn write_sync(&self, group: &MeasurementGroup) -> Result<Written, SinkError> {
        let (template, label) = lookup(&self.mapping, group)?;
        let patient_value = group
            .patient_id
            .as_deref()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| SinkError::identity(IdentityError::PatientIdentityNotDefined))?;
        let patient = created_patient(patient_value);
        let patient_id = patient["id"].as_str().unwrap_or_default().to_owned();
        let device = created_device(self.device_system.as_deref(), &group.device_id, &patient_id);
        let ids = ResourceIds {
            patient: patient_id,
            device: device["id"].as_str().unwrap_or_default().to_owned(),
            encounter: None,
        };
        let windows = observation_groups(template.period_interval(), group)
            .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
        let mut store = self.store.lock().map_err(|_| SinkError::Unavailable {
            kind: "NdjsonStorePoisoned",
            message: "an earlier write panicked".into(),
        })?;
        // Identities are written but not counted: the summary and `FhirResourceSaved` count
        // what the FHIR mapping produces, as with a server.
        store.write_resource(patient);
        store.write_resource(device);
        let mut written = Vec::with_capacity(windows.len());
        for window in &windows {
            match template {
                FhirTemplate::CodeValue(t) => {
                    let outcome = store
                        .write_observation(t, window, &ids)
                        .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
                    written.push(("Observation".to_owned(), saved(outcome)));
                }
                FhirTemplate::Handlebars(t) => {
                    let resource = render_resource(t, window, &ids, group)
                        .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
                    let kind = resource_type(&resource);
                    written.push((kind, saved(store.write_resource(resource))));
                }
            }
        }
        Ok(written)
    }
}

impl Sink for NdjsonSink {
    async fn write(&self, group: &MeasurementGroup) -> Result<Written, SinkError> {
        self.write_sync(group)
    }

    async fn persist(&self) -> Result<(), SinkError> {
        let mut store = self.store.lock().map_err(|_| SinkError::Unavailable {
            kind: "NdjsonStorePoisoned",
            message: "an earlier write panicked".into(),
        })?;
        store.persist().map_err(|e| SinkError::Unavailable {
            kind: "NdjsonWriteError",
            message: format!("cannot write {}: {e}", self.dir),
        })
    }

    fn describe(&self) -> String {
        format!("NDJSON directory {}", self.dir)
    }
}
