//! Where device events come from.
//!
//! Captured traffic for `iomt replay` ([`capture`]: JSON Lines and Event Hubs Capture Avro),
//! the dead-letter sink ([`deadletter`]), and the internal hub's contract with its in-process
//! implementation ([`internal`]).
#![deny(missing_docs)]

pub mod blob;
pub mod capture;
pub mod deadletter;
pub mod eventhubs;
pub mod internal;
