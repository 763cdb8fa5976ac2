//! Where device events come from.
//!
//! Today: captured traffic for `iomt replay` ([`capture`]: JSON Lines and Event Hubs Capture
//! Avro) and the dead-letter sink ([`deadletter`]). The Event Hubs transport, the internal hub and checkpoint stores join this crate with
//! the pipeline runtime.
#![deny(missing_docs)]

pub mod capture;
pub mod deadletter;
