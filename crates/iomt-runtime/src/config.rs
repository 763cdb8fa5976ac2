//! Configuration: one TOML file, `IOMT__SECTION__KEY` environment overrides, validated up
//! front with every error reported at once.
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
    /// Where `iomt run` keeps checkpoints and partition ownership.
    pub checkpoints: Checkpoints,
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
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            connection_string: None,
            container_url: None,
            container: "iomt-checkpoints".to_owned(),
        }
    }
}

/// `[templates]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Templates {
    /// The device mapping (CollectionContent) file (MedTech's `Template:DeviceContent`);
    /// relative to the configuration file.
    pub device_mapping: Option<PathBuf>,
    /// The FHIR mapping (CollectionFhir) file (MedTech's `Template:FhirMapping`); relative
    /// to the configuration file.
    pub fhir_mapping: Option<PathBuf>,
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
}

impl Role {
    /// The hub this role reads.
    pub fn reads(self) -> &'static str {
        match self {
            Role::All | Role::Normalize => "source",
            Role::Convert => "internal_hub",
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

fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    name: &str,
    origin: &str,
    errors: &mut Vec<ConfigError>,
) -> T {
    match table.remove(name) {
        None => T::default(),
        Some(value) => value.try_into().unwrap_or_else(|e: toml::de::Error| {
            errors.push(error(format!("{origin} [{name}]"), e.message().to_owned()));
            T::default()
        }),
    }
}

impl Config {
    /// Loads the file (when given) and applies `IOMT__…` overrides from `env`. Every problem
    /// found is returned, not only the first.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let origin = file.map_or_else(|| "configuration".to_owned(), |f| f.display().to_string());
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => return Err(vec![error(&origin, format!("cannot read: {e}"))]),
                Ok(text) => match text.parse::<toml::Table>() {
                    Ok(t) => t,
                    Err(e) => {
                        let line = e
                            .span()
                            .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
                        let at = line.map_or_else(|| origin.clone(), |l| format!("{origin}:{l}"));
                        return Err(vec![error(at, e.message().to_owned())]);
                    }
                },
            },
        };
        // Template paths in a file are relative to the file.
        if let (Some(base), Some(toml::Value::Table(t))) =
            (file.and_then(Path::parent), table.get_mut("templates"))
        {
            for key in ["device_mapping", "fhir_mapping"] {
                if let Some(toml::Value::String(p)) = t.get_mut(key)
                    && Path::new(p.as_str()).is_relative()
                {
                    *p = base.join(&*p).display().to_string();
                }
            }
        }
        for (key, raw) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let [section, field] = parts.as_slice() else {
                errors.push(error(
                    &key,
                    "expected IOMT__<SECTION>__<KEY>, e.g. IOMT__FHIR__URL",
                ));
                continue;
            };
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(field.clone(), env_value(&raw));
                }
                _ => errors.push(error(&key, format!("[{section}] is not a section"))),
            }
        }
        let config = Config {
            templates: section(&mut table, "templates", &origin, &mut errors),
            fhir: section(&mut table, "fhir", &origin, &mut errors),
            identity: section(&mut table, "identity", &origin, &mut errors),
            group: section(&mut table, "group", &origin, &mut errors),
            pipeline: section(&mut table, "pipeline", &origin, &mut errors),
            output: section(&mut table, "output", &origin, &mut errors),
            source: section(&mut table, "source", &origin, &mut errors),
            internal_hub: section(&mut table, "internal_hub", &origin, &mut errors),
            checkpoints: section(&mut table, "checkpoints", &origin, &mut errors),
        };
        for unknown in table.keys() {
            errors.push(error(
                &origin,
                format!(
                    "unknown section [{unknown}]; expected templates, fhir, identity, group, pipeline, output, source, internal_hub or checkpoints"
                ),
            ));
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Checks values against each other and their ranges; every problem is listed.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                errors.push(error(key, message));
            }
        };
        check(
            self.templates.device_mapping.is_some(),
            "templates.device_mapping",
            "is required (or --device-mapping)",
        );
        check(
            self.templates.fhir_mapping.is_some(),
            "templates.fhir_mapping",
            "is required (or --fhir-mapping)",
        );
        if let Some(url) = &self.fhir.url {
            let valid = reqwest_like_url(url);
            check(valid, "fhir.url", "must be an http:// or https:// URL");
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
            f.auth == AuthKind::None || f.url.is_some() || self.pipeline.role == Role::Normalize,
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
        errors
    }

    /// What `iomt run` needs beyond [`Config::validate`]: the hubs its role reads and writes,
    /// and a checkpoint store.
    pub fn validate_for_run(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let role = self.pipeline.role;
        if matches!(role, Role::All | Role::Normalize) {
            hub_errors(&self.source, "source", true, &mut errors);
        }
        if matches!(role, Role::Normalize | Role::Convert) {
            hub_errors(
                &self.internal_hub,
                "internal_hub",
                role == Role::Convert,
                &mut errors,
            );
        }
        let c = &self.checkpoints;
        if c.connection_string.is_none() && c.container_url.is_none() {
            errors.push(error(
                "checkpoints",
                "needs connection_string (with container) or container_url",
            ));
        }
        errors
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for secret in [
            &mut shown.fhir.token,
            &mut shown.fhir.client_secret,
            &mut shown.source.connection_string,
            &mut shown.source.client_secret,
            &mut shown.internal_hub.connection_string,
            &mut shown.internal_hub.client_secret,
            &mut shown.checkpoints.connection_string,
        ] {
            if secret.is_some() {
                *secret = Some("***".to_owned());
            }
        }
        if let Some(url) = &mut shown.checkpoints.container_url
            && let Some(at) = url.find('?')
        {
            // The query of a container URL is its SAS.
            url.replace_range(at.., "?***");
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The dead-letter file of embedded runs.
    pub fn dead_letter_file(&self) -> PathBuf {
        self.output.state_dir.join("deadletter.jsonl")
    }

    /// The runtime tuning this configuration asks for.
    pub fn pipeline_config(&self) -> Result<crate::PipelineConfig, ConfigError> {
        let group = iomt_group::GroupConfig::new(self.group.max_events, self.group.max_wait)
            .map_err(|e| error("group", e.to_string()))?;
        let p = &self.pipeline;
        Ok(crate::PipelineConfig {
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

fn reqwest_like_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn keys(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.origin.as_str()).collect()
    }

    #[test]
    fn each_role_needs_the_hubs_it_reads_and_writes() {
        let base = [
            (
                "IOMT__CHECKPOINTS__CONNECTION_STRING",
                "UseDevelopmentStorage=true",
            ),
            ("IOMT__SOURCE__HUB", "devices"),
            (
                "IOMT__SOURCE__CONNECTION_STRING",
                "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v",
            ),
        ];
        let all = Config::load(None, env(&base)).unwrap();
        assert_eq!(all.pipeline.role, Role::All);
        assert!(all.validate_for_run().is_empty());

        let normalize = Config::load(
            None,
            env(&[base.as_slice(), &[("IOMT__PIPELINE__ROLE", "normalize")]].concat()),
        )
        .unwrap();
        assert_eq!(
            keys(&normalize.validate_for_run()),
            ["internal_hub.hub", "internal_hub.connection_string"]
        );

        // The convert role reads only the internal hub, with its own Entra identity.
        let convert = Config::load(
            None,
            env(&[
                ("IOMT__PIPELINE__ROLE", "convert"),
                (
                    "IOMT__CHECKPOINTS__CONNECTION_STRING",
                    "UseDevelopmentStorage=true",
                ),
                ("IOMT__INTERNAL_HUB__HUB", "normalized"),
                ("IOMT__INTERNAL_HUB__AUTH", "client-secret"),
                ("IOMT__INTERNAL_HUB__UPDATE_INTERVAL", "30s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            keys(&convert.validate_for_run()),
            [
                "internal_hub.namespace",
                "internal_hub.tenant_id",
                "internal_hub.client_id",
                "internal_hub.client_secret",
                "internal_hub.ownership_expiry",
            ]
        );
        let shown = Config::load(
            None,
            env(&[(
                "IOMT__INTERNAL_HUB__CONNECTION_STRING",
                "Endpoint=sb://x/;SharedAccessKey=secret",
            )]),
        )
        .unwrap()
        .to_toml();
        assert!(
            shown.contains("[internal_hub]") && !shown.contains("secret"),
            "{shown}"
        );
    }

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
        // What is printed reads back to the same configuration.
        let printed = dir.path().join("printed.toml");
        std::fs::write(&printed, config.to_toml()).unwrap();
        assert_eq!(Config::load(Some(&printed), []).unwrap(), config);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("iomt.toml");
        std::fs::write(
            &file,
            "[fhir]\nurl = 5\n[group]\nmax_wait = \"soon\"\n[grouping]\nx = 1\n",
        )
        .unwrap();
        let errors = Config::load(Some(&file), env(&[("IOMT__FHIR", "x")])).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{text:#?}");
        assert!(text.iter().any(|e| e.contains("[fhir]")));
        assert!(text.iter().any(|e| e.contains("[group]")));
        assert!(
            text.iter()
                .any(|e| e.contains("unknown section [grouping]"))
        );
        assert!(text.iter().any(|e| e.starts_with("IOMT__FHIR:")));

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
        let keys: Vec<String> = config.validate().into_iter().map(|e| e.origin).collect();
        assert_eq!(
            keys,
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
    fn syntax_errors_name_the_line_and_secrets_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[fhir]\nurl = \"x\"\nurl = \n").unwrap();
        let errors = Config::load(Some(&file), []).unwrap_err();
        assert!(errors[0].origin.ends_with("bad.toml:3"), "{errors:?}");
        let config = Config {
            fhir: Fhir {
                token: Some("secret-token".into()),
                ..Fhir::default()
            },
            ..Config::default()
        };
        assert!(!config.to_toml().contains("secret-token"));
    }

    #[test]
    fn the_receive_watchdog_period_is_read_and_must_be_a_second_or_more() {
        let load = |stall_after: &str| {
            Config::load(
                None,
                env(&[
                    (
                        "IOMT__CHECKPOINTS__CONNECTION_STRING",
                        "UseDevelopmentStorage=true",
                    ),
                    ("IOMT__SOURCE__HUB", "devices"),
                    (
                        "IOMT__SOURCE__CONNECTION_STRING",
                        "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v",
                    ),
                    ("IOMT__SOURCE__STALL_AFTER", stall_after),
                ]),
            )
            .unwrap()
        };
        assert_eq!(
            Config::default().source.stall_after,
            Duration::from_secs(30)
        );
        let config = load("2s");
        assert_eq!(config.source.stall_after, Duration::from_secs(2));
        assert!(config.validate_for_run().is_empty());
        let errors = load("500ms").validate_for_run();
        let origins: Vec<&str> = errors.iter().map(|e| e.origin.as_str()).collect();
        assert_eq!(origins, ["source.stall_after"]);
    }
}
