//! Domain types shared by every stage of the iomt pipeline.
//!
//! Nothing here does I/O. The types mirror the wire formats of the MedTech service
//! (formerly IoT Connector for FHIR) so that data written by either system reads the same.
#![deny(missing_docs)]

pub mod ack;
pub mod backoff;
pub mod event;
pub mod json_date;
pub mod limits;
pub mod measurement;
pub mod redact;
pub mod source;
pub mod time;
pub mod wire;
pub mod written;

pub use backoff::Backoff;
pub use event::DeviceEvent;
pub use json_date::{DateKind, JsonDate};
pub use limits::{Limits, limits, set_limits};
pub use measurement::{Measurement, MeasurementGroup, MeasurementProperty};
pub use redact::{Secret, is_insecure_remote, log_phi, redact_url, set_log_phi};
pub use source::{BadRecord, SourceEvent};
pub use time::Timestamp;
pub use written::{Action, Written};
