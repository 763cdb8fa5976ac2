//! Assembling a pipeline from a [`Compiled`] configuration: the sink it names (a FHIR server
//! with its identity resolver and writer, or the embedded store), the dead-letter file, the
//! metrics and the state directory's lock.

use std::sync::Arc;

use iomt_core::{MeasurementGroup, Written};
use iomt_fhir::{IdentityResolver, ObservationWriter};
use iomt_store::EmbeddedStore;

use crate::config::{Compiled, ConfigError, DeadLetterTarget, Target};
use crate::convert::Converter;
use crate::events::EventService;
use crate::pipeline::DeadLetterStore;
use crate::sink::{Sink, SinkError};
use crate::store::{Embedded, FhirStore};
use crate::templates::{LiveTemplates, Templates};
use crate::{Metrics, Pipeline, PipelineConfig};

/// The sink a configuration names.
#[derive(Debug)]
pub enum ConfiguredSink {
    /// A FHIR server.
    Fhir(Box<Converter<FhirStore>>),
    /// The embedded store.
    Embedded(Converter<Embedded>),
    /// None: the normalize role, whose pipeline has no group stage and so never writes.
    Nothing,
}

impl ConfiguredSink {
    /// The embedded store, when that is the output.
    pub fn embedded(&self) -> Option<&Arc<EmbeddedStore>> {
        match self {
            ConfiguredSink::Embedded(c) => Some(c.store().store()),
            _ => None,
        }
    }
}

impl Sink for ConfiguredSink {
    async fn write(&self, group: &MeasurementGroup) -> Result<Vec<Written>, SinkError> {
        match self {
            ConfiguredSink::Fhir(s) => s.write(group).await,
            ConfiguredSink::Embedded(s) => s.write(group).await,
            ConfiguredSink::Nothing => Err(SinkError::Data {
                kind: "GeneralError",
                message: "the normalize role writes no resources".into(),
                template: None,
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            ConfiguredSink::Nothing => "none".to_owned(),
            ConfiguredSink::Fhir(s) => s.describe(),
            ConfiguredSink::Embedded(s) => s.describe(),
        }
    }
}

/// A pipeline ready to run, with the handles a command reports from.
#[derive(Debug)]
pub struct Assembled {
    /// The pipeline.
    pub pipeline: Pipeline<ConfiguredSink>,
    /// Its sink.
    pub sink: Arc<ConfiguredSink>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// The dead-letter store, opened.
    pub dead_letters: DeadLetterStore,
    /// The tuning in effect.
    pub config: PipelineConfig,
    /// Identifies the destination (FHIR URL or output directory), so that a checkpoint is
    /// reused only for the same one.
    pub target: String,
    /// The state directory's lock, held while the pipeline runs.
    pub state_lock: std::fs::File,
    /// The delivery of change events, when subscriptions are configured.
    pub events: Option<EventService>,
}

/// Takes the state directory for this process: two processes appending to one dead-letter
/// file and moving one checkpoint would corrupt both.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, ConfigError> {
    let fail = |message: String| ConfigError {
        origin: "output.state_dir".into(),
        message,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("iomt.lock"))
        .map_err(|e| fail(format!("cannot open {}: {e}", dir.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(format!(
            "{} is in use by another iomt process; wait for it to end or choose another --state-dir",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(fail(format!("cannot lock {}: {e}", dir.display())))
        }
    }
}

/// Builds the pipeline a compiled configuration describes, over compiled templates.
/// `partitions` names the source partitions; dead letters go to `dead_letters` (normally
/// [`Compiled::dead_letters`]).
pub fn assemble(
    config: &Compiled,
    templates: Templates,
    partitions: Vec<String>,
    dead_letters: &DeadLetterTarget,
) -> Result<Assembled, ConfigError> {
    let state_lock = lock_state_dir(&config.state_dir)?;
    let metrics = Arc::new(Metrics::new());
    metrics.template_version(None, &templates.version);
    let templates = LiveTemplates::new(templates);
    let (sink, target) = match &config.target {
        Target::InternalHub => (ConfiguredSink::Nothing, "internal hub".to_owned()),
        Target::Nothing => (ConfiguredSink::Nothing, "nothing".to_owned()),
        Target::Fhir {
            url,
            client,
            identity,
            observation_cache_capacity,
            observation_cache_ttl,
        } => {
            let client = client.clone().with_observer(metrics.clone());
            let identity = IdentityResolver::new(client.clone(), identity.clone());
            let writer =
                ObservationWriter::new(client, *observation_cache_capacity, *observation_cache_ttl);
            let store = FhirStore::new(identity, writer, url.clone());
            let sink = Converter::new(templates.clone(), store);
            (
                ConfiguredSink::Fhir(Box::new(sink)),
                iomt_core::redact_url(url),
            )
        }
        Target::Embedded {
            dir,
            device_identifier_system,
        } => {
            let store = EmbeddedStore::open(dir).map_err(|e| ConfigError {
                origin: "output.dir".into(),
                message: e.to_string(),
            })?;
            let target = std::fs::canonicalize(dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| dir.display().to_string());
            let store = Embedded::new(Arc::new(store), device_identifier_system.clone());
            (
                ConfiguredSink::Embedded(Converter::new(templates.clone(), store)),
                target,
            )
        }
    };
    let dead_letters = DeadLetterStore::open(dead_letters).map_err(|e| ConfigError {
        origin: "output.state_dir".into(),
        message: format!("cannot open {dead_letters}: {e}"),
    })?;
    let sink = Arc::new(sink);
    let (outbox, events) = EventService::build(config, metrics.clone())?;
    let pipeline = Pipeline::new(
        config.pipeline.clone(),
        templates,
        sink.clone(),
        metrics.clone(),
        partitions,
    )
    .with_outbox(outbox);
    Ok(Assembled {
        pipeline,
        sink,
        metrics,
        dead_letters,
        config: config.pipeline.clone(),
        target,
        state_lock,
        events,
    })
}
