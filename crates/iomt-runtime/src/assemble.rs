//! Assembling a pipeline from a [`Config`]: the sink it names (a FHIR server with its client,
//! identity resolver and writer, or an NDJSON directory), the dead-letter file and the metrics;
//! and, for `iomt run`, the Event Hub source with its checkpoint store.

use std::path::PathBuf;
use std::sync::Arc;

use crate::hub::eventhubs::{EventHubsProducer, ProducerOptions};
use azure_core::credentials::TokenCredential;
use iomt_core::{MeasurementGroup, Written};
use iomt_eventhubs::blob::{BlobAuth, BlobCheckpointStore};
use iomt_eventhubs::{EventHubSettings, EventHubsAuth};
use iomt_fhir::{
    Auth, EntraCredential, FhirClient, FhirClientConfig, IdentityConfig, IdentityMode,
    IdentityResolver, ObservationWriter,
};
use iomt_files::deadletter::DeadLetterWriter;
use iomt_normalize::Normalizer;
use iomt_store::EmbeddedStore;
use iomt_templates::device::DeviceMapping;
use iomt_templates::fhir::FhirMapping;

use crate::config::{AuthKind, Config, ConfigError, IdentityModeKind, Role, Source, StartAtKind};
use crate::convert::Converter;
use crate::sink::{Sink, SinkError};
use crate::source::eventhubs::{Carries, ProcessorSettings, StartAt};
use crate::store::{Embedded, FhirStore};
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
    /// The dead-letter file, opened.
    pub dead_letters: DeadLetterWriter,
    /// Where dead letters go.
    pub dead_letter_file: PathBuf,
    /// The tuning in effect.
    pub config: PipelineConfig,
    /// Identifies the destination (FHIR URL or output directory), so that a checkpoint is
    /// reused only for the same one.
    pub target: String,
    /// The state directory's lock, held while the pipeline runs.
    pub state_lock: std::fs::File,
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

fn fhir_client(config: &Config, url: &str) -> Result<FhirClient, ConfigError> {
    let f = &config.fhir;
    let fail = |e: iomt_fhir::FhirError| ConfigError {
        origin: "fhir".into(),
        message: e.to_string(),
    };
    let auth = match (
        f.auth,
        entra_credential(f.auth, &f.tenant_id, &f.client_id, &f.client_secret),
    ) {
        (_, Some(credential)) => Auth::entra(credential, url).map_err(fail)?,
        (AuthKind::Bearer, None) => Auth::Bearer(f.token.clone().unwrap_or_default()),
        (_, None) => Auth::None,
    };
    FhirClient::new(FhirClientConfig {
        base_url: url.to_owned(),
        auth,
        request_timeout: f.request_timeout,
        max_concurrency: f.max_concurrency,
        max_retries: f.max_retries,
        backoff_base: f.backoff_base,
        backoff_cap: f.backoff_cap,
    })
    .map_err(fail)
}

/// Builds the pipeline a validated configuration describes, over compiled templates.
/// `partitions` names the source partitions; dead letters go to `dead_letter_file` (normally
/// [`Config::dead_letter_file`]).
pub fn assemble(
    config: &Config,
    device: DeviceMapping,
    fhir: FhirMapping,
    partitions: Vec<String>,
    dead_letter_file: PathBuf,
) -> Result<Assembled, ConfigError> {
    let pipeline_config = config.pipeline_config()?;
    let state_lock = lock_state_dir(&config.output.state_dir)?;
    let mapping = Arc::new(fhir);
    let (sink, target) = match &config.fhir.url {
        // The normalize role's output is the internal hub; it writes no resources.
        _ if config.pipeline.role == Role::Normalize => {
            (ConfiguredSink::Nothing, "internal hub".to_owned())
        }
        Some(url) => {
            let client = fhir_client(config, url)?;
            let identity = IdentityResolver::new(
                client.clone(),
                IdentityConfig {
                    mode: match config.identity.mode {
                        IdentityModeKind::Lookup => IdentityMode::Lookup,
                        IdentityModeKind::LookupWithEncounter => IdentityMode::LookupWithEncounter,
                        IdentityModeKind::Create => IdentityMode::Create,
                    },
                    device_identifier_system: config.identity.device_identifier_system.clone(),
                    cache_ttl: config.identity.cache_ttl,
                    cache_capacity: config.identity.cache_capacity,
                },
            );
            let writer = ObservationWriter::new(
                client,
                config.fhir.observation_cache_capacity,
                config.fhir.observation_cache_ttl,
            );
            let store = FhirStore::new(identity, writer, url.clone());
            let sink = Converter::new(mapping.clone(), store);
            (ConfiguredSink::Fhir(Box::new(sink)), url.clone())
        }
        None => {
            let dir = &config.output.dir;
            let store = EmbeddedStore::open(dir).map_err(|e| ConfigError {
                origin: "output.dir".into(),
                message: e.to_string(),
            })?;
            let target = std::fs::canonicalize(dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| dir.display().to_string());
            let store = Embedded::new(
                Arc::new(store),
                config.identity.device_identifier_system.clone(),
            );
            (
                ConfiguredSink::Embedded(Converter::new(mapping.clone(), store)),
                target,
            )
        }
    };
    let dead_letters = DeadLetterWriter::open(&dead_letter_file).map_err(|e| ConfigError {
        origin: "output.state_dir".into(),
        message: format!("cannot open {}: {e}", dead_letter_file.display()),
    })?;
    let sink = Arc::new(sink);
    let metrics = Arc::new(Metrics::new());
    let pipeline = Pipeline::new(
        pipeline_config.clone(),
        Arc::new(Normalizer::new(device)),
        mapping,
        sink.clone(),
        metrics.clone(),
        partitions,
    );
    Ok(Assembled {
        pipeline,
        sink,
        metrics,
        dead_letters,
        dead_letter_file,
        config: pipeline_config,
        target,
        state_lock,
    })
}

/// What `iomt run` reads from and checkpoints to.
#[derive(Debug)]
pub struct LiveSource {
    /// The device hub.
    pub settings: EventHubSettings,
    /// Partition balancing.
    pub processor: ProcessorSettings,
    /// Checkpoints and ownership, fenced with `owner_id`.
    pub store: Arc<BlobCheckpointStore>,
    /// This process's name in ownership records.
    pub owner_id: String,
}

/// The Entra ID identity an `auth` setting names, if it names one.
fn entra_credential(
    auth: AuthKind,
    tenant_id: &Option<String>,
    client_id: &Option<String>,
    client_secret: &Option<String>,
) -> Option<EntraCredential> {
    match auth {
        AuthKind::WorkloadIdentity => Some(EntraCredential::WorkloadIdentity),
        AuthKind::ManagedIdentity => Some(EntraCredential::ManagedIdentity {
            client_id: client_id.clone(),
        }),
        AuthKind::ClientSecret => Some(EntraCredential::ClientSecret {
            tenant_id: tenant_id.clone().unwrap_or_default(),
            client_id: client_id.clone().unwrap_or_default(),
            secret: client_secret.clone().unwrap_or_default(),
        }),
        AuthKind::None | AuthKind::Bearer => None,
    }
}

/// The Entra identity of a hub section, for Event Hubs and the checkpoint container.
fn entra(s: &Source, key: &str) -> Result<Arc<dyn TokenCredential>, ConfigError> {
    let credential = entra_credential(s.auth, &s.tenant_id, &s.client_id, &s.client_secret)
        .ok_or_else(|| ConfigError {
            origin: key.to_owned(),
            message:
                "needs a connection string, a SAS, or an auth setting naming an Entra identity"
                    .into(),
        })?;
    credential.token_credential().map_err(|e| ConfigError {
        origin: key.to_owned(),
        message: e.to_string(),
    })
}

/// The hub of section `key` (`source` or `internal_hub`) as client settings. The owner id
/// names the connection: the processor claims partitions under it, and checkpoints are fenced
/// with it.
fn hub_settings(
    section: &Source,
    key: &str,
    owner_id: &str,
) -> Result<EventHubSettings, ConfigError> {
    let auth = match &section.connection_string {
        Some(cs) => EventHubsAuth::ConnectionString(cs.clone()),
        None => EventHubsAuth::Credential(entra(section, &format!("{key}.auth"))?),
    };
    Ok(EventHubSettings {
        namespace: section.namespace.clone().unwrap_or_default(),
        hub: section.hub.clone().unwrap_or_default(),
        consumer_group: section.consumer_group.clone(),
        auth,
        custom_endpoint: section.custom_endpoint.clone(),
        application_id: Some(owner_id.to_owned()),
    })
}

/// Opens the internal hub for sending (the normalize role), from a configuration that passed
/// [`Config::validate_for_run`].
pub async fn internal_hub_producer(
    config: &Config,
    owner_id: &str,
) -> Result<EventHubsProducer, ConfigError> {
    let settings = hub_settings(&config.internal_hub, "internal_hub", owner_id)?;
    EventHubsProducer::open(settings, ProducerOptions::default())
        .await
        .map_err(|e| ConfigError {
            origin: "internal_hub".into(),
            message: e.to_string(),
        })
}

/// Builds the source of `iomt run` from a configuration that passed
/// [`Config::validate_for_run`]: the device hub, or the internal hub for the convert role.
/// `owner_id` names this process in ownership records; it must be unique per process.
pub async fn live_source(config: &Config, owner_id: String) -> Result<LiveSource, ConfigError> {
    let (key, s, carries) = match config.pipeline.role {
        Role::All | Role::Normalize => ("source", &config.source, Carries::DeviceEvents),
        Role::Convert => ("internal_hub", &config.internal_hub, Carries::Measurements),
    };
    let settings = hub_settings(s, key, &owner_id)?;
    let c = &config.checkpoints;
    let store_error = |e: iomt_eventhubs::blob::BlobError| ConfigError {
        origin: "checkpoints".into(),
        message: e.to_string(),
    };
    let store = match (&c.connection_string, &c.container_url) {
        (Some(cs), _) => BlobCheckpointStore::from_connection_string(cs, &c.container),
        (None, Some(url)) if url.contains('?') => BlobCheckpointStore::from_sas_url(url),
        (None, Some(url)) => {
            BlobCheckpointStore::new(url, BlobAuth::token(entra(s, "checkpoints.container_url")?))
        }
        (None, None) => {
            return Err(ConfigError {
                origin: "checkpoints".into(),
                message: "needs connection_string or container_url".into(),
            });
        }
    }
    .map_err(store_error)?
    .with_owner(owner_id.clone());
    store.ensure_container().await.map_err(store_error)?;
    Ok(LiveSource {
        settings,
        processor: ProcessorSettings {
            carries,
            start_at: match s.start_at {
                StartAtKind::Earliest => StartAt::Earliest,
                StartAtKind::Latest => StartAt::Latest,
            },
            update_interval: s.update_interval,
            ownership_expiry: s.ownership_expiry,
            stall_after: s.stall_after,
            ..ProcessorSettings::default()
        },
        store: Arc::new(store),
        owner_id,
    })
}
