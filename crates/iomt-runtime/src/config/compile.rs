//! Steps 2 and 3 of the configuration (see the module above): validating a configuration for
//! a purpose, and compiling it into what each part of the run takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use iomt_eventhubs::blob::{BlobAuth, BlobCheckpointStore, BlobContainer};
use iomt_eventhubs::{EventHubSettings, EventHubsAuth};
use iomt_fhir::{
    Auth, EntraCredential, FhirClient, FhirClientConfig, IdentityConfig, IdentityMode,
};

use super::{
    AuthKind, Config, ConfigError, DeadLetterStoreKind, IdentityModeKind, Role, Source,
    StartAtKind, error,
};
use crate::PipelineConfig;
use crate::source::eventhubs::{Carries, ProcessorSettings, StartAt};

/// What a configuration is checked and compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A run over files (`iomt replay`, `iomt deadletter replay`): every stage, into a FHIR
    /// server or the embedded store; no hubs.
    Replay,
    /// `iomt run` in the configured role: also the hubs it reads and writes, and the checkpoint
    /// store.
    Run,
    /// `iomt export --from`: changes published to the event log and its subscriptions; no
    /// templates, no hub.
    Export,
}

/// A configuration validated and turned into what each part of a run takes.
#[derive(Debug)]
pub struct Compiled {
    /// The stages this process runs.
    pub role: Role,
    /// The device mapping file (every role but events).
    pub device_mapping: Option<PathBuf>,
    /// The FHIR mapping file (every role but events).
    pub fhir_mapping: Option<PathBuf>,
    /// How often a live run reads the template files again (zero: never).
    pub template_reload_interval: std::time::Duration,
    /// The pipeline's tuning.
    pub pipeline: PipelineConfig,
    /// Where resources are written.
    pub target: Target,
    /// Dead letters, checkpoints of replays and the process lock.
    pub state_dir: PathBuf,
    /// Where the pipeline's dead letters go.
    pub dead_letters: DeadLetterTarget,
    /// How the changes role reads the FHIR server's history.
    pub change_feed: super::ChangeFeed,
    /// Where the changes role checkpoints, in cluster mode: the `[checkpoints]` container
    /// (else a file in the state directory).
    pub change_feed_checkpoints: Option<BlobContainer>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: Option<SocketAddr>,
    /// For `iomt run`: the hubs and the checkpoint store.
    pub live: Option<Live>,
    /// Change events, when subscriptions are configured.
    pub events: Option<CompiledEvents>,
    /// The event log, in cluster mode.
    pub event_log: Option<EventLog>,
}

/// Where the event log of cluster mode is.
#[derive(Debug, Clone)]
pub enum EventLog {
    /// An Event Hub (`[event_log]`).
    Hub(EventHubSettings),
    /// A Kafka topic (`[events] kafka_log`).
    Kafka(super::KafkaLog),
}

/// The change events of a run.
#[derive(Debug, Clone)]
pub struct CompiledEvents {
    /// Who the events say they come from.
    pub publisher: iomt_events::Publisher,
    /// The `WebHook-Request-Origin` of CloudEvents handshakes: the FHIR account.
    pub origin: String,
    /// The subscriptions, validated.
    pub subscriptions: Vec<super::Subscription>,
    /// How often subscriptions look for new events.
    pub poll_interval: Duration,
    /// How long a replay waits at its end for deliveries.
    pub drain_deadline: Duration,
}

/// Where a run writes resources.
#[derive(Debug)]
pub enum Target {
    /// A FHIR server.
    Fhir {
        /// Its base URL.
        url: String,
        /// Its client, with credentials.
        client: FhirClient,
        /// How Devices and Patients are resolved.
        identity: IdentityConfig,
        /// Observations whose last written version is remembered.
        observation_cache_capacity: u64,
        /// How long a remembered version is trusted.
        observation_cache_ttl: Duration,
    },
    /// The embedded store.
    Embedded {
        /// Its directory.
        dir: PathBuf,
        /// System of Device identifiers.
        device_identifier_system: Option<String>,
    },
    /// No resources: the normalize role writes measurements to the internal hub.
    InternalHub,
    /// No resources: the events role without a FHIR server (which full-resource
    /// subscriptions read versions from).
    Nothing,
}

/// What `iomt run` reads, writes and checkpoints to.
#[derive(Debug)]
pub struct Live {
    /// The hub read: the device hub, or the internal hub for the convert role. Its
    /// `application_id` is set to the owner id when the run starts.
    pub source: EventHubSettings,
    /// Partition balancing.
    pub processor: ProcessorSettings,
    /// Checkpoints and ownership, fenced with the owner id when the run starts.
    pub checkpoints: BlobCheckpointStore,
    /// The internal hub written, for the normalize role.
    pub internal_hub: Option<EventHubSettings>,
}

/// Where the pipeline's dead letters go.
#[derive(Debug, Clone)]
pub enum DeadLetterTarget {
    /// A JSON Lines file, synced before the checkpoint passes.
    File(PathBuf),
    /// A Blob container, each batch a blob written before the checkpoint passes.
    Blob(BlobContainer),
}

impl std::fmt::Display for DeadLetterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadLetterTarget::File(path) => write!(f, "{}", path.display()),
            DeadLetterTarget::Blob(container) => write!(f, "{}", container.url()),
        }
    }
}

impl Config {
    /// The stages a job runs: a replay runs them all; an export, like the changes role,
    /// publishes changes it did not write.
    fn role_for(&self, purpose: Purpose) -> Role {
        match purpose {
            Purpose::Replay => Role::All,
            Purpose::Run => self.pipeline.role,
            Purpose::Export => Role::Changes,
        }
    }

    /// Checks values against each other and their ranges, and that what `purpose` needs is
    /// there; every problem is listed.
    pub fn validate(&self, purpose: Purpose) -> Vec<ConfigError> {
        let role = self.role_for(purpose);
        let mut errors = Vec::new();
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                errors.push(error(key, message));
            }
        };
        check(
            self.templates.device_mapping.is_some() || matches!(role, Role::Events | Role::Changes),
            "templates.device_mapping",
            "is required (or --device-mapping)",
        );
        check(
            self.templates.fhir_mapping.is_some() || matches!(role, Role::Events | Role::Changes),
            "templates.fhir_mapping",
            "is required (or --fhir-mapping)",
        );
        for (key, message) in self.limits.problems() {
            check(false, &format!("limits.{key}"), &message);
        }
        if let Some(url) = &self.fhir.url {
            let valid = reqwest_like_url(url);
            check(valid, "fhir.url", "must be an http:// or https:// URL");
            check(
                !iomt_core::is_insecure_remote(url) || self.fhir.allow_insecure_http,
                "fhir.url",
                "plain http:// to a host that is not loopback is refused: use https://, or set fhir.allow_insecure_http = true",
            );
        }
        let f = &self.fhir;
        match f.auth {
            AuthKind::Bearer => check(
                f.token.is_some(),
                "fhir.token",
                "is required with auth = \"bearer\"",
            ),
            AuthKind::ClientSecret => {
                for (value, key) in [
                    (&f.tenant_id, "fhir.tenant_id"),
                    (&f.client_id, "fhir.client_id"),
                    (&f.client_secret, "fhir.client_secret"),
                ] {
                    check(
                        value.is_some(),
                        key,
                        "is required with auth = \"client-secret\"",
                    );
                }
            }
            AuthKind::None | AuthKind::WorkloadIdentity | AuthKind::ManagedIdentity => {}
        }
        // The normalize role writes no resources, so a shared configuration may name the FHIR
        // identity without the URL there.
        check(
            f.auth == AuthKind::None || f.url.is_some() || role == Role::Normalize,
            "fhir.auth",
            "needs fhir.url",
        );
        check(
            f.max_concurrency >= 1,
            "fhir.max_concurrency",
            "must be at least 1",
        );
        check(
            !f.request_timeout.is_zero(),
            "fhir.request_timeout",
            "must be positive",
        );
        check(
            self.group.max_events >= 1,
            "group.max_events",
            "must be at least 1",
        );
        check(
            self.group.max_wait >= Duration::from_millis(100),
            "group.max_wait",
            "must be at least 100ms",
        );
        let p = &self.pipeline;
        for (value, key) in [
            (p.hub_partitions, "pipeline.hub_partitions"),
            (p.hub_capacity, "pipeline.hub_capacity"),
            (p.max_in_flight, "pipeline.max_in_flight"),
            (p.max_buffered, "pipeline.max_buffered"),
        ] {
            check(value >= 1, key, "must be at least 1");
        }
        check(
            !p.checkpoint_interval.is_zero(),
            "pipeline.checkpoint_interval",
            "must be positive",
        );
        if purpose == Purpose::Run {
            self.run_errors(role, &mut errors);
        }
        // Writers append to the event log wherever it is configured.
        if self.event_log.hub.is_some() && matches!(role, Role::All | Role::Convert | Role::Changes)
        {
            hub_errors(&self.event_log, "event_log", false, &mut errors);
        }
        if let Some(log) = &self.events.kafka_log {
            if self.event_log.hub.is_some() {
                errors.push(error(
                    "events.kafka_log",
                    "the event log is either [event_log] (an Event Hub) or events.kafka_log, not both",
                ));
            }
            if log.brokers.trim().is_empty() || log.topic.trim().is_empty() {
                errors.push(error("events.kafka_log", "needs brokers and topic"));
            }
        }
        self.subscription_errors(role, &mut errors);
        errors
    }

    /// Problems of `[[subscriptions]]`, each named by its subscription.
    fn subscription_errors(&self, role: Role, errors: &mut Vec<ConfigError>) {
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.subscriptions.iter().enumerate() {
            let at = format!("subscriptions[{i}] ({})", s.name);
            let valid_name = !s.name.is_empty()
                && s.name.len() <= 64
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name {
                errors.push(error(
                    &at,
                    "name must be 1 to 64 letters, digits, '-' or '_'",
                ));
            } else if !names.insert(s.name.to_ascii_lowercase()) {
                errors.push(error(&at, "another subscription has this name"));
            }
            if let Err(e) = s.filter.validate() {
                errors.push(error(format!("{at}.filter"), e.to_string()));
            }
            if let Err(e) = s.retry.validate() {
                errors.push(error(format!("{at}.retry"), e));
            }
            if role == Role::Events && s.format.needs_resource() && self.fhir.url.is_none() {
                errors.push(error(
                    format!("{at}.format"),
                    "full-resource events in the events role read each version from fhir.url, which is not set",
                ));
            }
            if s.max_in_flight == 0 {
                errors.push(error(format!("{at}.max_in_flight"), "must be at least 1"));
            }
            match &s.destination {
                super::Destination::Ndjson { .. }
                    if s.format == iomt_events::Format::CloudeventsBinary =>
                {
                    errors.push(error(
                        format!("{at}.format"),
                        "an ndjson file holds whole events: choose cloudevents, not cloudevents-binary",
                    ));
                }
                super::Destination::Webhook {
                    url,
                    secret,
                    allow_insecure_http,
                    ..
                } => {
                    url_errors(
                        &format!("{at}.destination.url"),
                        url,
                        *allow_insecure_http,
                        errors,
                    );
                    if let Some(secret) = secret
                        && let Err(e) = secret.parse::<iomt_events::webhook::Secret>()
                    {
                        errors.push(error(format!("{at}.destination.secret"), e.to_string()));
                    }
                }
                super::Destination::Kafka { brokers, topic, .. } => {
                    if brokers.trim().is_empty() || topic.trim().is_empty() {
                        errors.push(error(
                            format!("{at}.destination"),
                            "a Kafka destination needs brokers and topic",
                        ));
                    }
                }
                super::Destination::EventGrid {
                    endpoint,
                    key,
                    auth,
                    tenant_id,
                    client_id,
                    client_secret,
                    allow_insecure_http,
                    ..
                } => {
                    url_errors(
                        &format!("{at}.destination.endpoint"),
                        endpoint,
                        *allow_insecure_http,
                        errors,
                    );
                    if !matches!(
                        s.format,
                        iomt_events::Format::EventGrid | iomt_events::Format::Cloudevents
                    ) {
                        errors.push(error(
                            format!("{at}.format"),
                            "an Event Grid topic takes event-grid or cloudevents",
                        ));
                    }
                    entra_errors(
                        &format!("{at}.destination"),
                        key.is_some(),
                        *auth,
                        tenant_id,
                        client_id,
                        client_secret,
                        errors,
                    );
                }
                super::Destination::Cosmos {
                    endpoint,
                    database,
                    container,
                    key,
                    auth,
                    tenant_id,
                    client_id,
                    client_secret,
                    allow_insecure_http,
                    ..
                } => {
                    url_errors(
                        &format!("{at}.destination.endpoint"),
                        endpoint,
                        *allow_insecure_http,
                        errors,
                    );
                    if s.format != iomt_events::Format::FullResource {
                        errors.push(error(
                            format!("{at}.format"),
                            "a Cosmos DB container holds resources: set format = \"full-resource\"",
                        ));
                    }
                    for (name, value) in [("database", database), ("container", container)] {
                        if value.is_empty() || value.contains(['/', '\\', '?', '#']) {
                            errors.push(error(
                                format!("{at}.destination.{name}"),
                                "must be a non-empty name without '/', '\\', '?' or '#'",
                            ));
                        }
                    }
                    if let Some(key) = key
                        && let Err(e) = crate::events::cosmos::MasterKey::new(key)
                    {
                        errors.push(error(format!("{at}.destination.key"), e));
                    }
                    entra_errors(
                        &format!("{at}.destination"),
                        key.is_some(),
                        *auth,
                        tenant_id,
                        client_id,
                        client_secret,
                        errors,
                    );
                }
                super::Destination::EventHubs { .. } => {
                    if let Some(hub) = s.destination.event_hub() {
                        hub_errors(&hub, &format!("{at}.destination"), false, errors);
                    }
                }
                super::Destination::Ndjson { .. } => {}
            }
        }
    }

    /// What `iomt run` needs: the hubs its role reads and writes, and a checkpoint store.
    fn run_errors(&self, role: Role, errors: &mut Vec<ConfigError>) {
        if role == Role::Changes {
            let f = &self.change_feed;
            if self.fhir.url.is_none() {
                errors.push(error(
                    "fhir.url",
                    "the changes role reads this server's history",
                ));
            }
            if !(1..=10_000).contains(&f.page_size) {
                errors.push(error("change_feed.page_size", "must be 1 to 10000"));
            }
            if f.poll_interval < Duration::from_millis(100) {
                errors.push(error("change_feed.poll_interval", "must be at least 100ms"));
            }
            // Its checkpoint is a blob of [checkpoints] when set, else a file in the state
            // directory.
            return;
        }
        if role == Role::Events {
            if self.events.kafka_log.is_none() {
                hub_errors(&self.event_log, "event_log", true, errors);
            }
            if self.subscriptions.is_empty() {
                errors.push(error(
                    "subscriptions",
                    "the events role needs at least one [[subscriptions]] entry",
                ));
            }
        }
        if matches!(role, Role::All | Role::Normalize) {
            hub_errors(&self.source, "source", true, errors);
        }
        if matches!(role, Role::Normalize | Role::Convert) {
            hub_errors(
                &self.internal_hub,
                "internal_hub",
                role == Role::Convert,
                errors,
            );
        }
        let c = &self.checkpoints;
        // A Kafka event log keeps the events role's checkpoints in its consumer groups.
        let kafka_events = role == Role::Events && self.events.kafka_log.is_some();
        if c.connection_string.is_none() && c.container_url.is_none() && !kafka_events {
            errors.push(error(
                "checkpoints",
                "needs connection_string (with container) or container_url",
            ));
        }
    }

    /// Validates the configuration for `purpose` and compiles it; every problem is listed.
    pub fn compile(&self, purpose: Purpose) -> Result<Compiled, Vec<ConfigError>> {
        let mut errors = self.validate(purpose);
        if !errors.is_empty() {
            return Err(errors);
        }
        let role = self.role_for(purpose);
        let pipeline = keep(self.pipeline_config(), &mut errors);
        let target = keep(self.target(role), &mut errors);
        let live = match purpose {
            Purpose::Replay | Purpose::Export => Some(None),
            // A Kafka event log is all the events role reads.
            Purpose::Run if role == Role::Events && self.events.kafka_log.is_some() => Some(None),
            // The changes role reads no hub.
            Purpose::Run if role == Role::Changes => Some(None),
            Purpose::Run => keep(self.live(role), &mut errors).map(Some),
        };
        let (Some(pipeline), Some(target), Some(live)) = (pipeline, target, live) else {
            return Err(errors);
        };
        let event_log = match (&self.event_log.hub, &self.events.kafka_log) {
            _ if role == Role::Normalize => Some(None),
            (_, Some(kafka)) => Some(Some(EventLog::Kafka(kafka.clone()))),
            (Some(_), None) => keep(hub_settings(&self.event_log, "event_log"), &mut errors)
                .map(|hub| Some(EventLog::Hub(hub))),
            (None, None) => Some(None),
        };
        let Some(event_log) = event_log else {
            return Err(errors);
        };
        let Some(dead_letters) = keep(self.dead_letter_target(purpose), &mut errors) else {
            return Err(errors);
        };
        let change_feed_checkpoints = match role {
            Role::Changes => keep(self.checkpoint_container(), &mut errors),
            _ => Some(None),
        };
        let Some(change_feed_checkpoints) = change_feed_checkpoints else {
            return Err(errors);
        };
        let events = self.compiled_events(&target);
        Ok(Compiled {
            events,
            event_log,
            role,
            device_mapping: self.templates.device_mapping.clone(),
            fhir_mapping: self.templates.fhir_mapping.clone(),
            template_reload_interval: self.templates.reload_interval,
            pipeline,
            target,
            state_dir: self.output.state_dir.clone(),
            dead_letters,
            change_feed: self.change_feed.clone(),
            change_feed_checkpoints,
            metrics_addr: self.output.metrics_addr,
            live,
        })
    }

    /// The events of a run that writes resources, when subscriptions are configured.
    fn compiled_events(&self, target: &Target) -> Option<CompiledEvents> {
        if self.subscriptions.is_empty() {
            return None;
        }
        let e = &self.events;
        let publisher = match (&e.fhir_account, target) {
            (Some(account), _) => iomt_events::Publisher {
                source: e.source.clone(),
                fhir_account: account.clone(),
            },
            (None, Target::Fhir { url, .. }) => {
                iomt_events::Publisher::for_fhir_url(e.source.clone(), url)
            }
            (None, _) => iomt_events::Publisher {
                source: e.source.clone(),
                fhir_account: "localhost".to_owned(),
            },
        };
        Some(CompiledEvents {
            origin: publisher.fhir_account.clone(),
            publisher,
            subscriptions: self.subscriptions.clone(),
            poll_interval: e.poll_interval,
            drain_deadline: e.drain_deadline,
        })
    }

    fn pipeline_config(&self) -> Result<PipelineConfig, ConfigError> {
        let group = iomt_group::GroupConfig::new(self.group.max_events, self.group.max_wait)
            .map_err(|e| error("group", e.to_string()))?;
        let p = &self.pipeline;
        Ok(PipelineConfig {
            group,
            hub_partitions: p.hub_partitions,
            hub_capacity: p.hub_capacity,
            max_in_flight: p.max_in_flight,
            max_buffered: p.max_buffered,
            checkpoint_interval: p.checkpoint_interval,
            drain_deadline: p.drain_deadline,
            retry_cap: p.retry_cap,
        })
    }

    fn target(&self, role: Role) -> Result<Target, ConfigError> {
        let identity = &self.identity;
        Ok(match &self.fhir.url {
            _ if role == Role::Normalize => Target::InternalHub,
            None if matches!(role, Role::Events | Role::Changes) => Target::Nothing,
            Some(url) => Target::Fhir {
                url: url.clone(),
                client: self.fhir_client(url)?,
                identity: IdentityConfig {
                    mode: match identity.mode {
                        IdentityModeKind::Lookup => IdentityMode::Lookup,
                        IdentityModeKind::LookupWithEncounter => IdentityMode::LookupWithEncounter,
                        IdentityModeKind::Create => IdentityMode::Create,
                    },
                    device_identifier_system: identity.device_identifier_system.clone(),
                    cache_ttl: identity.cache_ttl,
                    cache_capacity: identity.cache_capacity,
                },
                observation_cache_capacity: self.fhir.observation_cache_capacity,
                observation_cache_ttl: self.fhir.observation_cache_ttl,
            },
            None => Target::Embedded {
                dir: self.output.dir.clone(),
                device_identifier_system: identity.device_identifier_system.clone(),
            },
        })
    }

    fn fhir_client(&self, url: &str) -> Result<FhirClient, ConfigError> {
        let f = &self.fhir;
        if iomt_core::is_insecure_remote(url) {
            tracing::warn!(url = %iomt_core::redact_url(url), "plain http:// to a remote FHIR server (fhir.allow_insecure_http): patient data and credentials travel unencrypted");
        }
        let fail = |e: iomt_fhir::FhirError| error("fhir", e.to_string());
        let auth = match (
            f.auth,
            entra_credential(f.auth, &f.tenant_id, &f.client_id, &f.client_secret),
        ) {
            (_, Some(credential)) => Auth::entra(credential, url).map_err(fail)?,
            (AuthKind::Bearer, None) => {
                Auth::Bearer(iomt_core::Secret::new(f.token.clone().unwrap_or_default()))
            }
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

    fn live(&self, role: Role) -> Result<Live, ConfigError> {
        let (key, s, carries) = match role {
            Role::All | Role::Normalize => ("source", &self.source, Carries::DeviceEvents),
            Role::Convert => ("internal_hub", &self.internal_hub, Carries::Measurements),
            // Event log records are read as raw bodies.
            // The changes role reads no hub (see `compile`).
            Role::Events | Role::Changes => ("event_log", &self.event_log, Carries::DeviceEvents),
        };
        let c = &self.checkpoints;
        let checkpoints = match (&c.connection_string, &c.container_url) {
            (Some(cs), _) => BlobCheckpointStore::from_connection_string(cs, &c.container),
            (None, Some(url)) if url.contains('?') => BlobCheckpointStore::from_sas_url(url),
            (None, Some(url)) => BlobCheckpointStore::new(
                url,
                BlobAuth::token(entra(s, "checkpoints.container_url")?),
            ),
            (None, None) => unreachable!("validate() requires a checkpoint store"),
        }
        .map_err(|e| error("checkpoints", e.to_string()))?;
        let endpoint = checkpoints.container_url().as_str();
        if iomt_core::is_insecure_remote(endpoint) {
            if !c.allow_insecure_http {
                return Err(error(
                    "checkpoints",
                    "a plain http:// Blob endpoint on a host that is not loopback is refused: use https://, or set checkpoints.allow_insecure_http = true",
                ));
            }
            tracing::warn!(container = %iomt_core::redact_url(endpoint), "plain http:// to a remote Blob endpoint (checkpoints.allow_insecure_http)");
        }
        let internal_hub = match role {
            Role::Normalize => Some(hub_settings(&self.internal_hub, "internal_hub")?),
            Role::All | Role::Convert | Role::Events | Role::Changes => None,
        };
        Ok(Live {
            source: hub_settings(s, key)?,
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
            checkpoints,
            internal_hub,
        })
    }
}

impl Config {
    /// Where dead letters go (the pipeline's, and the subscriptions' that name no file): with
    /// `auto`, a Blob container for `iomt run` (in the checkpoints' account), the local file
    /// for replays. An events role reading a Kafka log may have no Blob storage at all: then
    /// the file.
    fn dead_letter_target(&self, purpose: Purpose) -> Result<DeadLetterTarget, ConfigError> {
        let d = &self.dead_letters;
        let c = &self.checkpoints;
        let has_blob =
            d.container_url.is_some() || c.connection_string.is_some() || c.container_url.is_some();
        let blob = match d.store {
            DeadLetterStoreKind::File => false,
            DeadLetterStoreKind::Blob => true,
            DeadLetterStoreKind::Auto => purpose == Purpose::Run && has_blob,
        };
        if !blob {
            return Ok(DeadLetterTarget::File(
                self.output.state_dir.join("deadletter.jsonl"),
            ));
        }
        self.dead_letter_container().map(DeadLetterTarget::Blob)
    }

    /// The `[checkpoints]` container, when one is configured (SAS, key or the `[source]`
    /// Entra identity), held to the plain-HTTP rule.
    fn checkpoint_container(&self) -> Result<Option<BlobContainer>, ConfigError> {
        let c = &self.checkpoints;
        let container = match (&c.connection_string, &c.container_url) {
            (Some(cs), _) => BlobContainer::from_connection_string(cs, &c.container),
            (None, Some(url)) if url.contains('?') => BlobContainer::from_sas_url(url),
            (None, Some(url)) => BlobContainer::new(
                url,
                BlobAuth::token(entra(&self.source, "checkpoints.container_url")?),
            ),
            (None, None) => return Ok(None),
        }
        .map_err(|e| error("checkpoints", e.to_string()))?;
        if iomt_core::is_insecure_remote(container.url().as_str()) && !c.allow_insecure_http {
            return Err(error(
                "checkpoints",
                "a plain http:// Blob endpoint on a host that is not loopback is refused: use https://, or set checkpoints.allow_insecure_http = true",
            ));
        }
        Ok(Some(container))
    }

    /// The Blob container of dead letters: `dead_letters.container_url`, or
    /// `dead_letters.container` in the account of `[checkpoints]`.
    pub fn dead_letter_container(&self) -> Result<BlobContainer, ConfigError> {
        let d = &self.dead_letters;
        let c = &self.checkpoints;
        let container = match &d.container_url {
            Some(url) if url.contains('?') => BlobContainer::from_sas_url(url),
            Some(url) => BlobContainer::new(
                url,
                BlobAuth::token(entra(&self.source, "dead_letters.container_url")?),
            ),
            None => match self.checkpoint_container()? {
                Some(checkpoints) => checkpoints.sibling(&d.container),
                None => {
                    return Err(error(
                        "dead_letters",
                        "a Blob store needs dead_letters.container_url or a [checkpoints] container; or set dead_letters.store = \"file\"",
                    ));
                }
            },
        }
        .map_err(|e| error("dead_letters", e.to_string()))?;
        let endpoint = container.url().as_str();
        if iomt_core::is_insecure_remote(endpoint) {
            if !(d.allow_insecure_http || (c.allow_insecure_http && d.container_url.is_none())) {
                return Err(error(
                    "dead_letters",
                    "a plain http:// Blob endpoint on a host that is not loopback is refused: use https://, or set dead_letters.allow_insecure_http = true",
                ));
            }
            tracing::warn!(container = %iomt_core::redact_url(endpoint), "plain http:// to a remote Blob endpoint for dead letters");
        }
        Ok(container)
    }
}

/// The value, or `None` with the error recorded.
fn keep<T>(result: Result<T, ConfigError>, errors: &mut Vec<ConfigError>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
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
            secret: iomt_core::Secret::new(client_secret.clone().unwrap_or_default()),
        }),
        AuthKind::None | AuthKind::Bearer => None,
    }
}

/// The Entra identity `auth` names, as a credential; `None` for none.
pub(crate) fn token_credential(
    auth: AuthKind,
    tenant_id: &Option<String>,
    client_id: &Option<String>,
    client_secret: &Option<String>,
) -> Result<Option<Arc<dyn TokenCredential>>, String> {
    entra_credential(auth, tenant_id, client_id, client_secret)
        .map(|c| c.token_credential().map_err(|e| e.to_string()))
        .transpose()
}

/// The Entra identity of a hub section, for Event Hubs and the checkpoint container.
fn entra(s: &Source, key: &str) -> Result<Arc<dyn TokenCredential>, ConfigError> {
    let credential = entra_credential(s.auth, &s.tenant_id, &s.client_id, &s.client_secret)
        .ok_or_else(|| {
            error(
                key,
                "needs a connection string, a SAS, or an auth setting naming an Entra identity",
            )
        })?;
    credential
        .token_credential()
        .map_err(|e| error(key, e.to_string()))
}

/// The hub of section `key` (`source` or `internal_hub`) as client settings.
pub(crate) fn hub_settings(section: &Source, key: &str) -> Result<EventHubSettings, ConfigError> {
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
        application_id: None,
    })
}

/// Problems of a hub section `key`; `read` when the role reads it with the partition
/// processor.
fn hub_errors(s: &Source, key: &str, read: bool, errors: &mut Vec<ConfigError>) {
    let at = |field: &str| format!("{key}.{field}");
    if s.hub.is_none() {
        errors.push(error(at("hub"), "is required"));
    }
    match (&s.connection_string, s.auth) {
        (Some(_), _) => {}
        (None, AuthKind::None | AuthKind::Bearer) => errors.push(error(
            at("connection_string"),
            format!("is required unless {key}.auth names an Entra identity"),
        )),
        (None, _) if s.namespace.is_none() => {
            errors.push(error(at("namespace"), "is required with an Entra identity"));
        }
        (None, _) => {}
    }
    if s.auth == AuthKind::ClientSecret {
        for (value, field) in [
            (&s.tenant_id, "tenant_id"),
            (&s.client_id, "client_id"),
            (&s.client_secret, "client_secret"),
        ] {
            if value.is_none() {
                errors.push(error(
                    at(field),
                    "is required with auth = \"client-secret\"",
                ));
            }
        }
    }
    if read && s.ownership_expiry <= s.update_interval {
        errors.push(error(
            at("ownership_expiry"),
            format!("must be longer than {key}.update_interval (twice as long is advised)"),
        ));
    }
    // Every check of a quiet partition is a management call.
    if read && s.stall_after < Duration::from_secs(1) {
        errors.push(error(at("stall_after"), "must be at least 1s"));
    }
}

/// A destination's URL: http(s), and https to hosts that are not loopback unless allowed.
fn url_errors(at: &str, url: &str, allow_insecure_http: bool, errors: &mut Vec<ConfigError>) {
    if !reqwest_like_url(url) {
        errors.push(error(at, "must be an http:// or https:// URL"));
    } else if iomt_core::is_insecure_remote(url) && !allow_insecure_http {
        errors.push(error(
            at,
            "plain http:// to a host that is not loopback is refused: use https://, or set allow_insecure_http = true in the destination",
        ));
    }
}

/// A destination's credentials: a key, or a complete Entra identity.
fn entra_errors(
    at: &str,
    has_key: bool,
    auth: AuthKind,
    tenant_id: &Option<String>,
    client_id: &Option<String>,
    client_secret: &Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    if !has_key && entra_credential(auth, tenant_id, client_id, client_secret).is_none() {
        errors.push(error(
            at,
            "needs a key, or an auth naming an Entra identity",
        ));
    }
    if auth == AuthKind::ClientSecret
        && (tenant_id.is_none() || client_id.is_none() || client_secret.is_none())
    {
        errors.push(error(
            at,
            "auth = \"client-secret\" needs tenant_id, client_id and client_secret",
        ));
    }
}

fn reqwest_like_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Fhir, Group, env};

    /// What every job needs: both templates.
    const TEMPLATES: [(&str, &str); 2] = [
        ("IOMT__TEMPLATES__DEVICE_MAPPING", "devicecontent.json"),
        ("IOMT__TEMPLATES__FHIR_MAPPING", "fhirmapping.json"),
    ];

    fn load(pairs: &[(&str, &str)]) -> Config {
        Config::load(None, env(&[TEMPLATES.as_slice(), pairs].concat())).unwrap()
    }

    fn origins(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.origin.as_str()).collect()
    }

    const DEVICE_HUB: [(&str, &str); 3] = [
        (
            "IOMT__CHECKPOINTS__CONNECTION_STRING",
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
        ),
        ("IOMT__SOURCE__HUB", "devices"),
        (
            "IOMT__SOURCE__CONNECTION_STRING",
            "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v",
        ),
    ];

    #[test]
    fn plain_http_blob_endpoints_must_be_loopback_or_allowed() {
        let remote = [
            DEVICE_HUB[1],
            DEVICE_HUB[2],
            (
                "IOMT__CHECKPOINTS__CONTAINER_URL",
                "http://storage.example.org/checkpoints?sv=1&sig=x",
            ),
        ];
        let errors = load(&remote).compile(Purpose::Run).unwrap_err();
        assert!(
            errors[0].message.contains("allow_insecure_http"),
            "{errors:?}"
        );
        let allowed = [
            &remote[..],
            &[("IOMT__CHECKPOINTS__ALLOW_INSECURE_HTTP", "true")],
        ]
        .concat();
        assert!(load(&allowed).compile(Purpose::Run).is_ok());
        // Azurite on loopback, as in the tests.
        assert!(load(&DEVICE_HUB).compile(Purpose::Run).is_ok());
    }

    #[test]
    fn each_role_needs_the_hubs_it_reads_and_writes() {
        let all = load(&DEVICE_HUB);
        assert_eq!(all.pipeline.role, Role::All);
        let compiled = all.compile(Purpose::Run).unwrap();
        let live = compiled.live.as_ref().unwrap();
        assert_eq!(live.source.hub, "devices");
        assert_eq!(live.processor.carries, Carries::DeviceEvents);
        assert!(live.internal_hub.is_none());
        assert!(matches!(compiled.target, Target::Embedded { .. }));
        // A replay needs no hub at all.
        let replay = load(&[]).compile(Purpose::Replay).unwrap();
        assert!(replay.live.is_none());

        let normalize = load(
            &[
                DEVICE_HUB.as_slice(),
                &[("IOMT__PIPELINE__ROLE", "normalize")],
            ]
            .concat(),
        );
        assert_eq!(
            origins(&normalize.validate(Purpose::Run)),
            ["internal_hub.hub", "internal_hub.connection_string"]
        );
        assert!(normalize.validate(Purpose::Replay).is_empty());
        let normalize = load(
            &[
                DEVICE_HUB.as_slice(),
                &[
                    ("IOMT__PIPELINE__ROLE", "normalize"),
                    ("IOMT__INTERNAL_HUB__HUB", "normalized"),
                    (
                        "IOMT__INTERNAL_HUB__CONNECTION_STRING",
                        "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v",
                    ),
                ],
            ]
            .concat(),
        )
        .compile(Purpose::Run)
        .unwrap();
        assert!(matches!(normalize.target, Target::InternalHub));
        let live = normalize.live.unwrap();
        assert_eq!(
            live.internal_hub.map(|h| h.hub).as_deref(),
            Some("normalized")
        );

        // The convert role reads only the internal hub, with its own Entra identity.
        let convert = load(&[
            ("IOMT__PIPELINE__ROLE", "convert"),
            (
                "IOMT__CHECKPOINTS__CONNECTION_STRING",
                "UseDevelopmentStorage=true",
            ),
            ("IOMT__INTERNAL_HUB__HUB", "normalized"),
            ("IOMT__INTERNAL_HUB__AUTH", "client-secret"),
            ("IOMT__INTERNAL_HUB__UPDATE_INTERVAL", "30s"),
        ]);
        assert_eq!(
            origins(&convert.compile(Purpose::Run).unwrap_err()),
            [
                "internal_hub.namespace",
                "internal_hub.tenant_id",
                "internal_hub.client_id",
                "internal_hub.client_secret",
                "internal_hub.ownership_expiry",
            ]
        );
    }

    #[test]
    fn values_are_checked_against_each_other() {
        let config = Config {
            fhir: Fhir {
                url: Some("fhir.local".into()),
                auth: AuthKind::ClientSecret,
                ..Fhir::default()
            },
            group: Group {
                max_events: 0,
                max_wait: Duration::from_millis(5),
            },
            ..Config::default()
        };
        assert_eq!(
            origins(&config.compile(Purpose::Replay).unwrap_err()),
            [
                "templates.device_mapping",
                "templates.fhir_mapping",
                "fhir.url",
                "fhir.tenant_id",
                "fhir.client_id",
                "fhir.client_secret",
                "group.max_events",
                "group.max_wait"
            ]
        );
    }

    #[test]
    fn a_fhir_url_compiles_to_a_client_with_its_identity_mode() {
        let compiled = load(&[
            ("IOMT__FHIR__URL", "http://127.0.0.1:1/fhir"),
            ("IOMT__IDENTITY__MODE", "create"),
            ("IOMT__GROUP__MAX_EVENTS", "10"),
        ])
        .compile(Purpose::Replay)
        .unwrap();
        let Target::Fhir { url, identity, .. } = &compiled.target else {
            panic!("{:?}", compiled.target);
        };
        assert_eq!(url, "http://127.0.0.1:1/fhir");
        assert_eq!(identity.mode, IdentityMode::Create);
        assert_eq!(compiled.pipeline.group.max_events(), 10);
        assert!(
            matches!(&compiled.dead_letters, DeadLetterTarget::File(f) if f == &PathBuf::from(".iomt/deadletter.jsonl")),
            "{:?}",
            compiled.dead_letters
        );
    }

    #[test]
    fn dead_letters_of_iomt_run_go_to_a_container_of_the_checkpoint_account() {
        let blob =
            |pairs: &[(&str, &str)], purpose| match load(&[DEVICE_HUB.as_slice(), pairs].concat())
                .compile(purpose)
                .map(|c| c.dead_letters)
            {
                Ok(DeadLetterTarget::Blob(c)) => Ok(Some(c.url().to_string())),
                Ok(DeadLetterTarget::File(_)) => Ok(None),
                Err(e) => Err(e),
            };
        assert_eq!(
            blob(&[], Purpose::Run).unwrap().as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1/iomt-dead-letters")
        );
        assert_eq!(blob(&[], Purpose::Replay).unwrap(), None);
        assert_eq!(
            blob(&[("IOMT__DEAD_LETTERS__STORE", "file")], Purpose::Run).unwrap(),
            None
        );
        assert_eq!(
            blob(&[("IOMT__DEAD_LETTERS__CONTAINER", "poison")], Purpose::Run)
                .unwrap()
                .as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1/poison")
        );
        // A container of its own, with its SAS, which no URL shown carries.
        assert_eq!(
            blob(
                &[(
                    "IOMT__DEAD_LETTERS__CONTAINER_URL",
                    "https://dl.blob.core.windows.net/letters?sv=1&sig=secret"
                )],
                Purpose::Run
            )
            .unwrap()
            .as_deref(),
            Some("https://dl.blob.core.windows.net/letters")
        );
        // Plain http:// to a remote host is refused unless allowed.
        let remote = [(
            "IOMT__DEAD_LETTERS__CONTAINER_URL",
            "http://dl.example.org/letters?sv=1&sig=secret",
        )];
        let errors = blob(&remote, Purpose::Run).unwrap_err();
        assert_eq!(origins(&errors), ["dead_letters"]);
        let allowed = [
            remote[0],
            ("IOMT__DEAD_LETTERS__ALLOW_INSECURE_HTTP", "true"),
        ];
        assert!(blob(&allowed, Purpose::Run).unwrap().is_some());
        // Asked for, a Blob store needs a container.
        let errors = load(&[("IOMT__DEAD_LETTERS__STORE", "blob")])
            .compile(Purpose::Replay)
            .unwrap_err();
        assert_eq!(origins(&errors), ["dead_letters"]);
    }

    #[test]
    fn the_receive_watchdog_period_is_read_and_must_be_a_second_or_more() {
        let with = |stall_after: &str| {
            load(
                &[
                    DEVICE_HUB.as_slice(),
                    &[("IOMT__SOURCE__STALL_AFTER", stall_after)],
                ]
                .concat(),
            )
        };
        assert_eq!(
            Config::default().source.stall_after,
            Duration::from_secs(30)
        );
        let compiled = with("2s").compile(Purpose::Run).unwrap();
        assert_eq!(
            compiled.live.unwrap().processor.stall_after,
            Duration::from_secs(2)
        );
        let errors = with("500ms").validate(Purpose::Run);
        assert_eq!(origins(&errors), ["source.stall_after"]);
    }
}
