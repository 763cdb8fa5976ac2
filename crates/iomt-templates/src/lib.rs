//! Customer mapping templates in the MedTech (IoT Connector for FHIR) format.
//!
//! Templates are read once, checked completely (every error is reported, each with the JSON
//! path of the field and its line and column in the file), and compiled: every JSONPath and
//! JMESPath expression is parsed here, so evaluating a message never parses anything.
//!
//! * [`device`]: device mapping templates (`CollectionContent`), which the normalize stage
//!   evaluates.
//! * [`fhir`]: FHIR mapping templates (`CollectionFhir`), which the convert stage applies.
//! * [`expr`]: the expression languages, with Newtonsoft.Json's JSONPath dialect and MedTech's
//!   JMESPath functions.
//! * [`export`]: the templates inside Azure's exports of a MedTech service.
#![deny(missing_docs)]

pub mod device;
mod error;
pub mod export;
pub mod expr;
pub mod fhir;
mod source;

pub use error::{TemplateError, TemplateErrorKind};
