//! Everything iomt does on a FHIR server: the HTTP client with its retry policy, identity
//! resolution, and Observation writes. Every write reports what it wrote ([`iomt_core::Written`]).
//!
//! Requests per observation window, compared with MedTech (search + PUT every time):
//!
//! | Situation | Requests |
//! |---|---|
//! | First write of a window this process has not seen | 1 identifier search + 1 PUT |
//! | Window written before (version cached) with new data | 1 PUT with `If-Match` |
//! | Window written before, nothing new (a replay) | none |
//! | Someone else changed it meanwhile (412/409) | 1 search + 1 PUT per retry (at most 2) |
//!
//! Identity: 1 Device search per device per cache lifetime (plus 1 Encounter search when the
//! measurement names an encounter), and in Create mode the creates.
#![deny(missing_docs)]

pub mod bulk;
pub mod client;
pub mod identity;
pub mod writer;

pub use bulk::ExportStatus;
pub use client::{
    Auth, BearerToken, EntraCredential, FhirClient, FhirClientConfig, FhirError, Outage,
    RequestObserver, TokenSource, Versioned,
};
pub use identity::{IdentityConfig, IdentityError, IdentityMode, IdentityResolver, Resolved};
pub use writer::{ObservationWriter, WriteError};
