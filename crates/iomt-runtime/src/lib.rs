//! The running pipeline: the stages of the other crates joined by tokio tasks and bounded
//! channels, with the I/O they need (sinks, dead letters, checkpoints) and the metrics an
//! operator watches.
//!
//! Stages stay pure; everything that waits, retries or touches a disk or a network is here or
//! in the fhir and hub crates.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod embedded;
pub mod eventhubs;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod sink;
pub mod store;

pub use checkpoint::{CheckpointError, CheckpointStore, FileCheckpoint};
pub use config::{Config, ConfigError};
pub use convert::{Converter, Store};
pub use embedded::{
    Assembled, ConfiguredSink, LiveSource, assemble, internal_hub_producer, live_source,
};
pub use iomt_hub::internal as hub;
pub use iomt_hub::internal::{HubConsumer, HubMessage, HubProducer, Origin, in_process};
pub use metrics::{Metrics, Summary};
pub use pipeline::{Committed, Input, Partitions, Pipeline, PipelineConfig, Report, SourceItem};
pub use server::{Health, serve};
pub use sink::{Sink, SinkError};
pub use store::{Embedded, FhirStore};
