//! The running pipeline: the stages of the other crates joined by tokio tasks and bounded
//! channels, with the I/O they need and the metrics an operator watches.
//!
//! Read in the order data flows:
//!
//! * [`source`]: the source contract and the sources (capture files and standard input,
//!   dead-letter files, Event Hubs partitions), acknowledgement and checkpoints;
//! * [`pipeline`]: normalize, the internal [`hub`], group and write as tasks, with dead letters;
//! * [`convert`] and [`store`]: turning groups into resources, on a FHIR server or the
//!   embedded store, behind the [`sink`] contract;
//! * [`events`]: the change events of those writes, their outbox and their delivery to each
//!   subscription;
//! * [`assemble`](mod@assemble), [`config`], [`templates`], [`run`], [`metrics`], [`server`]:
//!   building a pipeline from its configuration and templates (reloaded while it runs),
//!   running it from a source, and what it reports.
//!
//! Stages stay pure; everything that waits, retries or touches a disk or a network is here or
//! in the I/O crates (`iomt-eventhubs`, `iomt-files`, `iomt-fhir`, `iomt-store`).
#![deny(missing_docs)]

pub mod source;

pub mod hub;
pub mod pipeline;

pub mod convert;
pub mod sink;
pub mod store;

pub mod events;

pub mod assemble;
pub mod config;
pub mod metrics;
mod process;
pub mod run;
pub mod server;
pub mod telemetry;
pub mod templates;

pub use assemble::{Assembled, ConfiguredSink, assemble};
pub use config::{Compiled, Config, ConfigError, Purpose};
pub use convert::{Converter, Store};
pub use hub::{HubConsumer, HubMessage, HubProducer, in_process};
pub use metrics::{Metrics, Summary};
pub use pipeline::{Pipeline, PipelineConfig, Report};
pub use server::{Health, serve};
pub use sink::{Sink, SinkError};
pub use source::{
    CheckpointError, CheckpointStore, Committed, FileCheckpoint, Input, Origin, PartitionFailure,
    Partitions, SourceItem,
};
pub use store::{Embedded, FhirStore};
