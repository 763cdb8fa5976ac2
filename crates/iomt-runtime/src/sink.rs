//! What the pipeline writes measurement groups to, and how failures are told apart.
//!
//! The runtime treats failures differently: [`SinkError::Data`] is dead-lettered at once,
//! [`SinkError::Unavailable`] is retried until the output is back.

use std::future::Future;

use iomt_convert::ConvertError;
use iomt_core::{MeasurementGroup, Written};
use iomt_fhir::{FhirError, IdentityError, WriteError};
use iomt_store::StoreError;

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
    /// The output is unavailable, throttling, or refusing our credentials. The group is
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
    pub(crate) fn convert(e: &ConvertError, template: Option<String>) -> Self {
        SinkError::Data {
            kind: e.name(),
            message: e.to_string(),
            template,
        }
    }

    pub(crate) fn fhir(e: FhirError, template: Option<String>) -> Self {
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

    pub(crate) fn identity(e: IdentityError) -> Self {
        match e {
            IdentityError::Fhir(f) => SinkError::fhir(f, None),
            other => SinkError::Data {
                kind: other.name(),
                message: other.to_string(),
                template: None,
            },
        }
    }

    pub(crate) fn write(e: WriteError, template: &str) -> Self {
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

    pub(crate) fn store(e: StoreError) -> Self {
        match e {
            StoreError::Invalid => SinkError::Data {
                kind: "InvalidResourceException",
                message: e.to_string(),
                template: None,
            },
            other => SinkError::Unavailable {
                kind: "EmbeddedStoreError",
                message: other.to_string(),
            },
        }
    }

    /// The same error, naming the FHIR template when it does not yet.
    pub(crate) fn in_template(self, label: &str) -> Self {
        match self {
            SinkError::Data {
                kind,
                message,
                template: None,
            } => SinkError::Data {
                kind,
                message,
                template: Some(label.to_owned()),
            },
            other => other,
        }
    }
}

/// A destination for measurement groups.
pub trait Sink: Send + Sync + 'static {
    /// Writes one group and reports every resource it touched. Returns once those writes are
    /// durable.
    fn write(
        &self,
        group: &MeasurementGroup,
    ) -> impl Future<Output = Result<Vec<Written>, SinkError>> + Send;

    /// Makes every write that has returned durable, for sinks that buffer. The runtime calls
    /// it before each checkpoint.
    fn persist(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// Where the output goes, for messages.
    fn describe(&self) -> String;
}
