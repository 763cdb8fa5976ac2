//! The convert stage's orchestration, the same whatever the output: find the FHIR template
//! for a group's type, resolve its Device and Patient, split it into observation windows, and
//! create or merge one resource per window. Only reading and writing resources differs between
//! a FHIR server and the embedded store, behind [`Store`].

use std::future::Future;

use iomt_convert::{
    ConvertError, ObservationGroup, ResourceIds, observation_groups, render_resource,
};
use iomt_core::{MeasurementGroup, Written};
use iomt_fhir::Resolved;
use iomt_templates::fhir::{CodeValueTemplate, FhirTemplate};
use serde_json::Value;

use crate::sink::{Sink, SinkError};
use crate::templates::LiveTemplates;

/// Where resources are read and written.
pub trait Store: Send + Sync + 'static {
    /// The FHIR ids of a group's Patient, Device and Encounter, and what was written to
    /// resolve them.
    fn resolve(
        &self,
        group: &MeasurementGroup,
    ) -> impl Future<Output = Result<Resolved, SinkError>> + Send;

    /// Creates or merges the Observation of one window.
    fn write_observation(
        &self,
        template: &CodeValueTemplate,
        window: &ObservationGroup<'_>,
        ids: &ResourceIds,
    ) -> impl Future<Output = Result<Written, SinkError>> + Send;

    /// Writes a resource a `HandlebarsFhir` template rendered, unless the store holds the same
    /// content already.
    fn write_resource(
        &self,
        resource: Value,
    ) -> impl Future<Output = Result<Written, SinkError>> + Send;

    /// Where the resources go, for messages.
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

/// Converts groups with a FHIR mapping and writes them to a [`Store`].
#[derive(Debug)]
pub struct Converter<S> {
    templates: LiveTemplates,
    store: S,
}

impl<S: Store> Converter<S> {
    /// A converter over the templates in use.
    pub fn new(templates: LiveTemplates, store: S) -> Self {
        Self { templates, store }
    }

    /// The store written to.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: Store> Sink for Converter<S> {
    async fn write(&self, group: &MeasurementGroup) -> Result<Vec<Written>, SinkError> {
        // One version for the whole group, even if a reload lands during its writes.
        let templates = self.templates.current();
        let template = templates.mapping.lookup(&group.type_name).ok_or_else(|| {
            SinkError::convert(
                &ConvertError::TemplateNotFound(group.type_name.to_string()),
                None,
            )
        })?;
        let label = template_label(&template);
        let Resolved { ids, mut written } = self.store.resolve(group).await?;
        let windows = observation_groups(template.period_interval(), group)
            .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
        written.reserve(windows.len());
        for window in &windows {
            let result = match template {
                FhirTemplate::CodeValue(t) => self.store.write_observation(t, window, &ids).await,
                FhirTemplate::Handlebars(t) => {
                    let resource = render_resource(t, window, &ids, group)
                        .map_err(|e| SinkError::convert(&e, Some(label.clone())))?;
                    self.store.write_resource(resource).await
                }
            };
            written.push(result.map_err(|e| e.in_template(&label))?);
        }
        Ok(written)
    }

    fn describe(&self) -> String {
        self.store.describe()
    }
}
