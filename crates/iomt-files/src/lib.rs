//! Files beside the pipeline: captured device traffic that `iomt replay` reads ([`capture`]:
//! JSON Lines and Event Hubs Capture Avro), and dead-letter records ([`deadletter`]) that the
//! pipeline writes and `iomt deadletter replay` reads back.
#![deny(missing_docs)]

pub mod capture;
pub mod deadletter;
