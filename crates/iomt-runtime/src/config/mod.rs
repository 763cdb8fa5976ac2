//! Configuration: one TOML file and `IOMT__SECTION__KEY` environment overrides, taken in three
//! steps so that every problem is found before anything starts, and each is blamed on its
//! source:
//!
//! 1. **raw**: [`Config::load`] reads the file and the environment into typed sections. Each
//!    key is read on its own, so a wrong value names its file and line, or its environment
//!    variable, and the other keys still load.
//! 2. **validated**: [`Config::validate`] checks values against each other and against what the
//!    job needs ([`Purpose`]): a replay needs templates and an output, `iomt run` also the hubs
//!    of its role and a checkpoint store.
//! 3. **compiled**: [`Config::compile`] turns a valid configuration into what each part takes
//!    (client settings, credentials, the pipeline's tuning), once. `iomt config check` runs the
//!    same steps as the job it checks for.
//!
//! Precedence, lowest first: built-in defaults, the file, the environment, command-line flags
//! (applied by the binary). Environment names follow the .NET convention MedTech used (`__`
//! separates levels), so `IOMT__FHIR__URL` sets `[fhir] url`. Secrets (a bearer token, a client
//! secret) are best passed that way rather than written in the file; `iomt config print` masks
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod compile;
mod events;

pub use compile::{Compiled, CompiledEvents, DeadLetterTarget, EventLog, Live, Purpose, Target};
pub(crate) use compile::{hub_settings, token_credential};
pub use events::{CosmosDelete, CosmosPartition, Destination, Events, KafkaLog, Subscription};

/// The environment prefix of overrides.
pub const ENV_PREFIX: &str = "IOMT__";

/// Everything a run needs to know.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Mapping templates.
    pub templates: Templates,
    /// The FHIR server; without a URL the output goes to an NDJSON directory.
    pub fhir: Fhir,
    /// How Devices and Patients are resolved.
    pub identity: Identity,
    /// Group flush limits.
    pub group: Group,
    /// Runtime tuning.
    pub pipeline: PipelineSection,
    /// Local files and endpoints.
    pub output: Output,
    /// The device Event Hub (`iomt run`).
    pub source: Source,
    /// `[internal_hub]`: the Event Hub between the normalize and convert roles.
    pub internal_hub: Source,
    /// `[event_log]`: in cluster mode, the Event Hub the convert role appends change events
    /// to and the events role delivers from. Its `consumer_group` is not used: each
    /// subscription reads in its own.
    pub event_log: Source,
    /// Where `iomt run` keeps checkpoints and partition ownership.
    pub checkpoints: Checkpoints,
    /// Where items that cannot be processed go.
    pub dead_letters: DeadLetters,
    /// What iomt accepts: message, template and expression sizes.
    pub limits: iomt_core::Limits,
    /// How the changes role reads the FHIR server's history.
    pub change_feed: ChangeFeed,
    /// What change events say about their publisher.
    pub events: Events,
    /// `[[subscriptions]]`: who receives change events, and how.
    pub subscriptions: Vec<Subscription>,
}

/// Where reading starts on a partition without a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAtKind {
    /// The oldest retained event.
    #[default]
    Earliest,
    /// Events enqueued from now on.
    Latest,
}

/// `[source]`: the Event Hub devices send to (MedTech's `InputEventHub`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Source {
    /// Fully qualified namespace, e.g. `contoso.servicebus.windows.net` (Entra ID auth).
    pub namespace: Option<String>,
    /// The Event Hub.
    pub hub: Option<String>,
    /// Consumer group; keep it lower-case, because KEDA lowercases it when it reads
    /// checkpoints.
    pub consumer_group: String,
    /// A connection string with `Listen` rights; otherwise `auth` names an Entra identity.
    pub connection_string: Option<String>,
    /// Entra ID identity when there is no connection string: `workload-identity`,
    /// `managed-identity` (`client_id` for a user-assigned one) or `client-secret`. Also used
    /// for the checkpoint container when it has no key or SAS.
    pub auth: AuthKind,
    /// Entra tenant, for `client-secret`.
    pub tenant_id: Option<String>,
    /// Entra client id.
    pub client_id: Option<String>,
    /// Entra client secret.
    pub client_secret: Option<String>,
    /// `amqp://host:port` to connect to instead of the namespace (a proxy, a test broker).
    pub custom_endpoint: Option<String>,
    /// Start of partitions without a checkpoint.
    pub start_at: StartAtKind,
    /// How often partition ownership is renewed and rebalanced.
    #[serde(with = "humantime_serde")]
    pub update_interval: Duration,
    /// How long partitions of a process that stopped renewing stay owned by it.
    #[serde(with = "humantime_serde")]
    pub ownership_expiry: Duration,
    /// How long a partition may deliver nothing before the receive watchdog asks the hub
    /// whether events are waiting; a receiver still behind at the next check is rebuilt.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            namespace: None,
            hub: None,
            consumer_group: "iomt".to_owned(),
            connection_string: None,
            auth: AuthKind::None,
            tenant_id: None,
            client_id: None,
            client_secret: None,
            custom_endpoint: None,
            start_at: StartAtKind::Earliest,
            update_interval: Duration::from_secs(10),
            ownership_expiry: Duration::from_secs(30),
            stall_after: Duration::from_secs(30),
        }
    }
}

/// `[checkpoints]`: the Blob container of checkpoints and ownership (MedTech's
/// `CheckpointStorage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Checkpoints {
    /// A storage connection string (account key); `container` names the container.
    pub connection_string: Option<String>,
    /// The container's URL, with a SAS in its query, or without one to use the `[source]`
    /// Entra identity (role: Storage Blob Data Contributor).
    pub container_url: Option<String>,
    /// The container, with a connection string.
    pub container: String,
    /// Allows a plain `http://` Blob endpoint on a host that is not loopback (refused
    /// otherwise: keys, SAS and ownership records would cross the network in clear text).
    pub allow_insecure_http: bool,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            connection_string: None,
            container_url: None,
            container: "iomt-checkpoints".to_owned(),
            allow_insecure_http: false,
        }
    }
}

/// `[dead_letters]`: where items that cannot be processed go. In cluster mode they go to a
/// Blob container, because a pod removed by KEDA takes its local disk with it, and a persistent
/// volume does not fit a Deployment of many replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetters {
    /// `auto`: a Blob container for `iomt run`, the file for replays; `file`:
    /// `output.state_dir/deadletter.jsonl`; `blob`: a Blob container.
    pub store: DeadLetterStoreKind,
    /// The container, in the account of `[checkpoints]` and with its key or Entra identity.
    pub container: String,
    /// A container URL of its own instead: with a SAS in its query, or without one to use the
    /// `[source]` Entra identity (role: Storage Blob Data Contributor).
    pub container_url: Option<String>,
    /// Allows a plain `http://` `container_url` on a host that is not loopback.
    pub allow_insecure_http: bool,
}

impl Default for DeadLetters {
    fn default() -> Self {
        Self {
            store: DeadLetterStoreKind::Auto,
            container: "iomt-dead-letters".to_owned(),
            container_url: None,
            allow_insecure_http: false,
        }
    }
}

/// `[change_feed]`: how `iomt run --role changes` tails the FHIR server's history. See
/// `iomt_events::changefeed` for what settle and overlap guarantee.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangeFeed {
    /// Changes younger than this, by the server's clock, wait for the next cycle: their
    /// transaction may still be committing.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// How far below the watermark each cycle reads again, for changes that became visible
    /// late with an older `lastUpdated`. Nothing is missed while the longest transaction plus
    /// the server's clock skew stays under settle + overlap.
    #[serde(with = "humantime_serde")]
    pub overlap: Duration,
    /// How often the history is read.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Entries per history page (`_count`).
    pub page_size: usize,
    /// Read these types' histories (`Type/_history`) instead of the system history; empty:
    /// the system history, or, on a server without one, every type with a type history.
    pub resource_types: Vec<String>,
    /// Where a feed without a checkpoint starts: the whole history, or now.
    pub start_at: StartAtKind,
    /// On a server without any history interaction: `none` (refuse, naming what is missing)
    /// or `last-updated-search` (search each type by `_lastUpdated` instead, which cannot see
    /// deletions nor versions overwritten between two polls).
    pub fallback: FeedFallback,
    /// Where to listen for R4 Subscriptions Backport `id-only` rest-hook notifications
    /// (`POST /notify`), each of which starts a cycle at once; the poll stays the source of
    /// truth. None: poll only.
    pub doorbell_addr: Option<SocketAddr>,
}

/// `change_feed.fallback`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeedFallback {
    /// No history, no feed: refuse.
    #[default]
    None,
    /// Search each type by `_lastUpdated`.
    LastUpdatedSearch,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(5),
            overlap: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            page_size: 1000,
            resource_types: Vec::new(),
            start_at: StartAtKind::Earliest,
            fallback: FeedFallback::None,
            doorbell_addr: None,
        }
    }
}

/// `dead_letters.store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterStoreKind {
    /// A Blob container for `iomt run`, the local file otherwise.
    #[default]
    Auto,
    /// The local JSON Lines file.
    File,
    /// A Blob container.
    Blob,
}

/// `[templates]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Templates {
    /// The device mapping (CollectionContent) file (MedTech's `Template:DeviceContent`);
    /// relative to the configuration file.
    pub device_mapping: Option<PathBuf>,
    /// The FHIR mapping (CollectionFhir) file (MedTech's `Template:FhirMapping`); relative
    /// to the configuration file.
    pub fhir_mapping: Option<PathBuf>,
    /// How often `iomt run` reads the files again and swaps in a changed version that
    /// compiles (`0s`: never). A mounted ConfigMap changes within about a minute of an edit.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for Templates {
    fn default() -> Self {
        Self {
            device_mapping: None,
            fhir_mapping: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// How the FHIR client authenticates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthKind {
    /// No Authorization header.
    #[default]
    None,
    /// A fixed bearer token (`token`).
    Bearer,
    /// AKS workload identity (the webhook's environment variables).
    WorkloadIdentity,
    /// A managed identity; `client_id` selects a user-assigned one.
    ManagedIdentity,
    /// An app registration: `tenant_id`, `client_id`, `client_secret`.
    ClientSecret,
}

/// `[fhir]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fhir {
    /// The FHIR R4 base URL (MedTech's `FhirService:Url`).
    pub url: Option<String>,
    /// Authentication.
    pub auth: AuthKind,
    /// Bearer token, for `auth = "bearer"`.
    pub token: Option<String>,
    /// Entra tenant, for `client-secret`.
    pub tenant_id: Option<String>,
    /// Entra client id, for `client-secret` or a user-assigned managed identity.
    pub client_id: Option<String>,
    /// Entra client secret, for `client-secret`.
    pub client_secret: Option<String>,
    /// Allows a plain `http://` URL to a host that is not loopback, with a warning at start;
    /// without it such a URL is refused, because patient data and credentials would cross
    /// the network in clear text.
    pub allow_insecure_http: bool,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight.
    pub max_concurrency: usize,
    /// Retries of 429, 5xx, timeouts and connection errors.
    pub max_retries: u32,
    /// First backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest backoff.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Observations whose last written version is remembered (MedTech's
    /// `ObservationCache:SizeLimit`).
    pub observation_cache_capacity: u64,
    /// How long a remembered version is trusted.
    #[serde(with = "humantime_serde")]
    pub observation_cache_ttl: Duration,
}

impl Default for Fhir {
    fn default() -> Self {
        Self {
            url: None,
            auth: AuthKind::None,
            token: None,
            tenant_id: None,
            client_id: None,
            client_secret: None,
            allow_insecure_http: false,
            request_timeout: Duration::from_secs(30),
            max_concurrency: 32,
            max_retries: 5,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
            observation_cache_capacity: 100_000,
            observation_cache_ttl: Duration::from_secs(3600),
        }
    }
}

/// Identity resolution mode (MedTech's `ResourceIdentity:ResourceIdentityServiceType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityModeKind {
    /// The Device must exist and name its Patient.
    #[default]
    Lookup,
    /// As lookup, and the measurement's Encounter must exist.
    LookupWithEncounter,
    /// Create missing Patients and Devices with deterministic ids.
    Create,
}

/// `[identity]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Identity {
    /// The mode.
    pub mode: IdentityModeKind,
    /// System of Device identifiers (`ResourceIdentity:DefaultDeviceIdentifierSystem`).
    pub device_identifier_system: Option<String>,
    /// How long a resolution is reused.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Devices remembered.
    pub cache_capacity: u64,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            mode: IdentityModeKind::Lookup,
            device_identifier_system: None,
            cache_ttl: Duration::from_secs(2 * 3600),
            cache_capacity: 5000,
        }
    }
}

/// `[group]` (MedTech's `EventBatching:MaxEvents` and `FlushTimespan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Group {
    /// Measurements per buffer before it is flushed.
    pub max_events: usize,
    /// Longest a buffer stays open (100 ms at least).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for Group {
    fn default() -> Self {
        Self {
            max_events: 1000,
            max_wait: Duration::from_secs(300),
        }
    }
}

/// Which stages `iomt run` runs (MedTech runs them as separate jobs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything in one process, over the in-process hub: `[source]` to FHIR.
    #[default]
    All,
    /// `[source]` to `[internal_hub]`: normalize only.
    Normalize,
    /// `[internal_hub]` to FHIR: group and convert only.
    Convert,
    /// `[event_log]` to the subscriptions: change event delivery only.
    Events,
    /// The FHIR server's history to the event log: a change feed of every resource the server
    /// holds (`[change_feed]`), delivered in process or by the events role.
    Changes,
}

impl Role {
    /// The hub this role reads.
    pub fn reads(self) -> &'static str {
        match self {
            Role::All | Role::Normalize => "source",
            Role::Convert => "internal_hub",
            Role::Events => "event_log",
            Role::Changes => "fhir",
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    /// Which stages `iomt run` runs.
    pub role: Role,
    /// Internal hub partitions (group tasks) in embedded mode.
    pub hub_partitions: usize,
    /// Batches each internal hub partition holds.
    pub hub_capacity: usize,
    /// Group writes in flight.
    pub max_in_flight: usize,
    /// Measurements buffered in all before the oldest buffers flush early.
    pub max_buffered: usize,
    /// How often checkpoints are committed.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How long a shutdown may drain.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Longest wait between retries while the FHIR server is unavailable.
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
}

impl Default for PipelineSection {
    fn default() -> Self {
        let d = crate::PipelineConfig::default();
        Self {
            role: Role::All,
            hub_partitions: d.hub_partitions,
            hub_capacity: d.hub_capacity,
            max_in_flight: d.max_in_flight,
            max_buffered: d.max_buffered,
            checkpoint_interval: Duration::from_secs(2),
            drain_deadline: d.drain_deadline,
            retry_cap: d.retry_cap,
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Output {
    /// The embedded store (and its NDJSON export), used when no FHIR URL is set.
    pub dir: PathBuf,
    /// Dead letters and checkpoints.
    pub state_dir: PathBuf,
    /// Address of `/metrics`, `/healthz` and `/readyz`, e.g. `0.0.0.0:9090`.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for Output {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("iomt-out"),
            state_dir: PathBuf::from(".iomt"),
            metrics_addr: None,
        }
    }
}

/// One configuration problem and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    /// The file (with line when known), the environment variable, or the key.
    pub origin: String,
    /// What is wrong.
    pub message: String,
}

fn error(origin: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        origin: origin.into(),
        message: message.into(),
    }
}

/// Reads an environment value as TOML when it is a number or a boolean, else as a string.
fn env_value(raw: &str) -> toml::Value {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))) => v,
        _ => toml::Value::String(raw.to_owned()),
    }
}

/// The sections, in the order they are printed.
const SECTIONS: [&str; 14] = [
    "templates",
    "fhir",
    "identity",
    "group",
    "pipeline",
    "output",
    "source",
    "internal_hub",
    "event_log",
    "checkpoints",
    "dead_letters",
    "limits",
    "change_feed",
    "events",
];

/// One value for a section's key, and where it was set.
struct Setting {
    key: String,
    value: toml::Value,
    origin: String,
}

/// Reads a section from its settings, file ones first, then environment ones. Each setting is
/// tried alone first, so a bad one is reported with its own origin and left out, and the others
/// still apply.
fn section<T: DeserializeOwned + Default>(
    name: &str,
    settings: Vec<Setting>,
    errors: &mut Vec<ConfigError>,
) -> T {
    let mut good = toml::Table::new();
    for Setting { key, value, origin } in settings {
        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
        match toml::Value::Table(alone).try_into::<T>() {
            Ok(_) => {
                good.insert(key, value);
            }
            // toml's own text ends with "in `key`", which the message already names.
            Err(e) => errors.push(error(origin, format!("{name}.{key}: {}", e.message()))),
        }
    }
    toml::Value::Table(good).try_into().unwrap_or_else(|e| {
        errors.push(error(name, e.message().to_owned()));
        T::default()
    })
}

/// The line of every `section.key` in a file, for error messages.
fn key_lines(text: &str) -> std::collections::HashMap<(String, String), usize> {
    let line = |offset: usize| text[..offset.min(text.len())].lines().count().max(1);
    let mut lines = std::collections::HashMap::new();
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return lines;
    };
    for (section, value) in root.get_ref() {
        if let toml::de::DeValue::Table(table) = value.get_ref() {
            for (key, _) in table {
                lines.insert(
                    (section.get_ref().to_string(), key.get_ref().to_string()),
                    // A key at the very start of a line is counted on that line.
                    line(key.span().start + 1),
                );
            }
        }
    }
    lines
}

impl Config {
    /// Loads the file (when given) and applies `IOMT__…` overrides from `env`. Every problem
    /// found is returned, not only the first: a wrong value in the file names the file and the
    /// line, one from the environment names the variable.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let origin = file.map_or_else(|| "configuration".to_owned(), |f| f.display().to_string());
        let mut settings: std::collections::BTreeMap<String, Vec<Setting>> = SECTIONS
            .iter()
            .map(|s| ((*s).to_owned(), Vec::new()))
            .collect();
        let mut subscriptions = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| vec![error(&origin, format!("cannot read: {e}"))])?;
            let table = text.parse::<toml::Table>().map_err(|e| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
                let at = line.map_or_else(|| origin.clone(), |l| format!("{origin}:{l}"));
                vec![error(at, e.message().to_owned())]
            })?;
            let lines = key_lines(&text);
            for (name, value) in table {
                if name == "subscriptions" {
                    subscriptions = read_subscriptions(value, &origin, &text, &mut errors);
                    continue;
                }
                let Some(into) = settings.get_mut(&name) else {
                    errors.push(error(
                        &origin,
                        format!(
                            "unknown section [{name}]; expected {} or [[subscriptions]]",
                            SECTIONS.join(", ")
                        ),
                    ));
                    continue;
                };
                let toml::Value::Table(keys) = value else {
                    errors.push(error(&origin, format!("[{name}] must be a section")));
                    continue;
                };
                for (key, mut value) in keys {
                    // Template paths in a file are relative to the file.
                    if name == "templates"
                        && key.ends_with("_mapping")
                        && let (Some(base), toml::Value::String(p)) = (path.parent(), &mut value)
                        && Path::new(p.as_str()).is_relative()
                    {
                        *p = base.join(&*p).display().to_string();
                    }
                    let origin = match lines.get(&(name.clone(), key.clone())) {
                        Some(line) => format!("{origin}:{line}"),
                        None => origin.clone(),
                    };
                    into.push(Setting { key, value, origin });
                }
            }
        }
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let [name, key] = parts.as_slice() else {
                errors.push(error(
                    &var,
                    "expected IOMT__<SECTION>__<KEY>, e.g. IOMT__FHIR__URL",
                ));
                continue;
            };
            let Some(into) = settings.get_mut(name) else {
                errors.push(error(
                    &var,
                    format!("unknown section [{name}]; expected {}", SECTIONS.join(", ")),
                ));
                continue;
            };
            into.push(Setting {
                key: key.clone(),
                value: env_value(&raw),
                origin: var,
            });
        }
        let mut take = |name: &str| settings.remove(name).unwrap_or_default();
        let config = Config {
            templates: section("templates", take("templates"), &mut errors),
            fhir: section("fhir", take("fhir"), &mut errors),
            identity: section("identity", take("identity"), &mut errors),
            group: section("group", take("group"), &mut errors),
            pipeline: section("pipeline", take("pipeline"), &mut errors),
            output: section("output", take("output"), &mut errors),
            source: section("source", take("source"), &mut errors),
            internal_hub: section("internal_hub", take("internal_hub"), &mut errors),
            event_log: section("event_log", take("event_log"), &mut errors),
            checkpoints: section("checkpoints", take("checkpoints"), &mut errors),
            dead_letters: section("dead_letters", take("dead_letters"), &mut errors),
            limits: section("limits", take("limits"), &mut errors),
            change_feed: section("change_feed", take("change_feed"), &mut errors),
            events: section("events", take("events"), &mut errors),
            subscriptions,
        };
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// The effective configuration as TOML: every key of every section, defaults included
    /// (a key without a value as a comment), secrets masked. It loads back to the same
    /// configuration.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        let mut shown = self.clone();
        for secret in [
            &mut shown.fhir.token,
            &mut shown.fhir.client_secret,
            &mut shown.source.connection_string,
            &mut shown.source.client_secret,
            &mut shown.internal_hub.connection_string,
            &mut shown.internal_hub.client_secret,
            &mut shown.event_log.connection_string,
            &mut shown.event_log.client_secret,
            &mut shown.checkpoints.connection_string,
        ] {
            if secret.is_some() {
                *secret = Some("***".to_owned());
            }
        }
        // A FHIR URL may carry user info or a gateway key in its query.
        if let Some(url) = &mut shown.fhir.url {
            *url = iomt_core::redact_url(url);
        }
        for url in [
            &mut shown.checkpoints.container_url,
            &mut shown.dead_letters.container_url,
        ] {
            if let Some(url) = url
                && let Some(at) = url.find('?')
            {
                // The query of a container URL is its SAS.
                url.replace_range(at.., "?***");
            }
        }
        for subscription in &mut shown.subscriptions {
            subscription.mask_secrets();
        }
        shown.events.mask_secrets();
        // JSON keeps the keys of unset options (TOML has no null), so every key is listed.
        let serde_json::Value::Object(sections) = serde_json::to_value(&shown).unwrap_or_default()
        else {
            return "# cannot print the configuration\n".to_owned();
        };
        let mut out = String::new();
        for (name, keys) in sections {
            if name == "subscriptions" {
                continue;
            }
            let serde_json::Value::Object(keys) = keys else {
                continue;
            };
            if !out.is_empty() {
                out.push('\n');
            }
            writeln!(out, "[{name}]").ok();
            for (key, value) in keys {
                match toml::Value::try_from(&value) {
                    Ok(value) => writeln!(out, "{key} = {value}"),
                    _ => writeln!(out, "# {key} = (not set)"),
                }
                .ok();
            }
        }
        if !shown.subscriptions.is_empty() {
            let table = toml::Table::from_iter([(
                "subscriptions".to_owned(),
                toml::Value::try_from(&shown.subscriptions)
                    .unwrap_or_else(|e| toml::Value::String(format!("cannot print: {e}"))),
            )]);
            out.push('\n');
            out.push_str(&toml::to_string(&table).unwrap_or_default());
        }
        out
    }
}

/// Reads `[[subscriptions]]`; an entry that cannot be read is reported with its file and line
/// and left out.
fn read_subscriptions(
    value: toml::Value,
    origin: &str,
    text: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Subscription> {
    let toml::Value::Array(entries) = value else {
        errors.push(error(
            origin,
            "subscriptions must be an array of tables: [[subscriptions]]",
        ));
        return Vec::new();
    };
    // The line of each `[[subscriptions]]` header, in order, for messages.
    let headers: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[subscriptions]]"))
        .map(|(i, _)| i + 1)
        .collect();
    let mut read = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let at = headers
            .get(i)
            .map_or_else(|| origin.to_owned(), |l| format!("{origin}:{l}"));
        match entry.try_into::<Subscription>() {
            Ok(s) => read.push(s),
            Err(e) => errors.push(error(at, format!("subscriptions[{i}]: {}", e.message()))),
        }
    }
    read
}

#[cfg(test)]
pub(crate) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iomt.toml");
        std::fs::write(
            &file,
            "[fhir]\nurl = \"http://fhir.local\"\nmax_retries = 2\n[group]\nmax_wait = \"1s\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("IOMT__FHIR__MAX_RETRIES", "7"),
                ("IOMT__IDENTITY__MODE", "create"),
                ("IOMT__OUTPUT__METRICS_ADDR", "127.0.0.1:9090"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.fhir.url.as_deref(), Some("http://fhir.local"));
        assert_eq!(config.fhir.max_retries, 7);
        assert_eq!(config.identity.mode, IdentityModeKind::Create);
        assert_eq!(config.group.max_wait, Duration::from_secs(1));
        assert_eq!(config.group.max_events, 1000);
        assert_eq!(
            config.output.metrics_addr,
            Some("127.0.0.1:9090".parse().unwrap())
        );
    }

    #[test]
    fn print_lists_every_key_and_reads_back() {
        let config = Config::load(
            None,
            env(&[
                ("IOMT__FHIR__URL", "http://fhir.local"),
                ("IOMT__FHIR__AUTH", "bearer"),
                ("IOMT__FHIR__TOKEN", "secret-token"),
                (
                    "IOMT__CHECKPOINTS__CONTAINER_URL",
                    "https://a.blob.core.windows.net/c?sig=secret-sas",
                ),
                (
                    "IOMT__EVENT_LOG__CONNECTION_STRING",
                    "Endpoint=sb://x/;SharedAccessKey=secret-log-key",
                ),
            ]),
        )
        .unwrap();
        let printed = config.to_toml();
        assert!(
            !printed.contains("secret-token")
                && !printed.contains("secret-sas")
                && !printed.contains("secret-log-key"),
            "{printed}"
        );
        // Every key of every section, set or not.
        let defaults: serde_json::Value = serde_json::to_value(Config::default()).unwrap();
        for (section, keys) in defaults.as_object().unwrap() {
            // `[[subscriptions]]` is a list, empty by default: tested with the events config.
            let Some(keys) = keys.as_object() else {
                continue;
            };
            assert!(printed.contains(&format!("[{section}]\n")), "{section}");
            for key in keys.keys() {
                assert!(
                    printed.contains(&format!("\n{key} = "))
                        || printed.contains(&format!("\n# {key} = (not set)")),
                    "{section}.{key} missing from\n{printed}"
                );
            }
        }
        assert!(
            printed.contains("# device_mapping = (not set)"),
            "{printed}"
        );
        assert!(printed.contains("max_wait = \"5m\""), "{printed}");
        // What is printed reads back to the same configuration, secrets aside.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("printed.toml");
        std::fs::write(&file, &printed).unwrap();
        let mut read = Config::load(Some(&file), []).unwrap();
        read.fhir.token = config.fhir.token.clone();
        read.checkpoints.container_url = config.checkpoints.container_url.clone();
        read.event_log.connection_string = config.event_log.connection_string.clone();
        assert_eq!(read, config);
    }

    #[test]
    fn subscriptions_print_without_secrets_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iomt.toml");
        std::fs::write(
            &file,
            r#"
[events]
kafka_log = { brokers = "k:9092", topic = "changes", properties = { "sasl.password" = "logpw" } }

[[subscriptions]]
name = "alerts"
format = "event-grid"
filter = { included_event_types = ["Microsoft.HealthcareApis.FhirResourceCreated"] }
destination = { kind = "webhook", url = "https://user:pw@hooks.example/in", secret = "whsec_c2VjcmV0", authorization = "Bearer tok" }

[[subscriptions]]
name = "lake"
destination = { kind = "kafka", brokers = "127.0.0.1:9092", topic = "fhir", properties = { "sasl.password" = "kpw", "ssl.key.location" = "/k.pem" } }
"#,
        )
        .unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        assert_eq!(config.subscriptions.len(), 2);
        let printed = config.to_toml();
        for secret in ["whsec_c2VjcmV0", "Bearer tok", "kpw", ":pw@", "logpw"] {
            assert!(!printed.contains(secret), "{secret} in\n{printed}");
        }
        assert!(printed.contains("/k.pem"), "{printed}");
        let again = dir.path().join("printed.toml");
        std::fs::write(&again, &printed).unwrap();
        let read = Config::load(Some(&again), []).unwrap();
        let names: Vec<_> = read.subscriptions.iter().map(|s| &s.name).collect();
        assert_eq!(names, ["alerts", "lake"]);
        assert_eq!(read.subscriptions[0].format, config.subscriptions[0].format);
        assert_eq!(read.subscriptions[0].filter, config.subscriptions[0].filter);
        let log = read.events.kafka_log.expect("kafka_log printed");
        assert_eq!(
            (log.brokers.as_str(), log.topic.as_str()),
            ("k:9092", "changes")
        );
    }

    #[test]
    fn cosmos_destinations_are_checked_and_print_without_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iomt.toml");
        std::fs::write(
            &file,
            r#"
[[subscriptions]]
name = "good"
format = "full-resource"
destination = { kind = "cosmos", endpoint = "https://acct.documents.azure.com:443/", database = "fhir", container = "resources", key = "c2VjcmV0a2V5", partition_key = "patient", on_delete = "mark" }

[[subscriptions]]
name = "bad"
destination = { kind = "cosmos", endpoint = "http://acct.example:443/", database = "a/b", container = "", key = "not base64!" }

[[subscriptions]]
name = "nokey"
format = "full-resource"
destination = { kind = "cosmos", endpoint = "https://acct.documents.azure.com/", database = "fhir", container = "c" }
"#,
        )
        .unwrap();
        let config = Config::load(Some(&file), []).unwrap();
        let printed = config.to_toml();
        assert!(!printed.contains("c2VjcmV0a2V5"), "{printed}");
        assert_eq!(
            config.subscriptions[0].destination.describe(),
            "Cosmos DB container fhir/resources"
        );
        let errors = config.validate(Purpose::Replay);
        let found: Vec<(&str, &str)> = errors
            .iter()
            .filter(|e| e.origin.starts_with("subscriptions"))
            .map(|e| (e.origin.as_str(), e.message.as_str()))
            .collect();
        let origins: Vec<&str> = found.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            origins,
            [
                "subscriptions[1] (bad).destination.endpoint",
                "subscriptions[1] (bad).format",
                "subscriptions[1] (bad).destination.database",
                "subscriptions[1] (bad).destination.container",
                "subscriptions[1] (bad).destination.key",
                "subscriptions[2] (nokey).destination",
            ],
            "{found:?}"
        );
        assert!(!format!("{found:?}").contains("not base64!"), "{found:?}");
    }

    #[test]
    fn every_error_is_reported_at_once_where_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iomt.toml");
        std::fs::write(
            &file,
            "[fhir]\nurl = 5\n\n[group]\nmax_events = 10\nmax_wait = \"soon\"\n[grouping]\nx = 1\n",
        )
        .unwrap();
        let origin = file.display().to_string();
        let errors = Config::load(
            Some(&file),
            env(&[
                ("IOMT__FHIR", "x"),
                ("IOMT__FHIR__MAX_RETRIES", "many"),
                ("IOMT__FHIR__MAX_RETRYS", "3"),
                ("IOMT__GROUPING__X", "1"),
                ("IOMT__GROUP__MAX_EVENTS", "20"),
            ]),
        )
        .unwrap_err();
        let found: Vec<(String, String)> = errors
            .iter()
            .map(|e| (e.origin.clone(), e.message.clone()))
            .collect();
        let origins: Vec<&str> = found.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(
            origins,
            [
                origin.as_str(),
                "IOMT__FHIR",
                "IOMT__GROUPING__X",
                &format!("{origin}:2"),
                "IOMT__FHIR__MAX_RETRIES",
                "IOMT__FHIR__MAX_RETRYS",
                &format!("{origin}:6"),
            ],
            "{found:#?}"
        );
        assert!(found[0].1.contains("unknown section [grouping]"));
        assert!(
            found[3].1.starts_with("fhir.url: invalid type"),
            "{found:?}"
        );
        assert!(found[4].1.contains("\"many\""), "{found:?}");
        assert!(
            found[5].1.contains("unknown field `max_retrys`"),
            "{found:?}"
        );
        assert!(found[6].1.starts_with("group.max_wait:"), "{found:?}");
    }

    #[test]
    fn a_bad_key_leaves_the_others_loaded() {
        let errors = Config::load(
            None,
            env(&[
                ("IOMT__GROUP__MAX_EVENTS", "20"),
                ("IOMT__GROUP__MAX_WAIT", "later"),
            ]),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].origin, "IOMT__GROUP__MAX_WAIT");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[fhir]\nurl = \"x\"\nurl = \n").unwrap();
        let errors = Config::load(Some(&file), []).unwrap_err();
        assert!(errors[0].origin.ends_with("bad.toml:3"), "{errors:?}");
    }
}
