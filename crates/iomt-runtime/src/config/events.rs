//! `[events]` and `[[subscriptions]]`: the change events iomt emits for what it writes, and
//! who receives them.

use std::path::PathBuf;
use std::time::Duration;

use iomt_events::{Filter, Format, RetryPolicy};
use serde::{Deserialize, Serialize};

use super::{AuthKind, Source};

/// `[events]`: what every event says about its publisher, and delivery tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Events {
    /// The CloudEvents `source` and Event Grid `topic`; part of every event id, so keep it
    /// stable. For Azure Health Data Services look-alikes, the workspace's resource id.
    pub source: String,
    /// The FHIR service's host in `subject` and `data.resourceFhirAccount`
    /// [default: the host of fhir.url, or `localhost` for the embedded store].
    pub fhir_account: Option<String>,
    /// How often a subscription looks for new events when no write wakes it (writes by this
    /// process wake it at once).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a replay waits at its end for its events to be delivered; what is still
    /// undelivered then is delivered by the next run.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// The event log on a Kafka topic, in cluster mode (instead of `[event_log]`): writers
    /// append to it, and `iomt run --role events` reads it once per subscription, in a
    /// consumer group named after it.
    pub kafka_log: Option<KafkaLog>,
}

/// A Kafka topic as the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaLog {
    /// `host:port,…`.
    pub brokers: String,
    /// The topic; keep its retention longer than the longest outage of the events role.
    pub topic: String,
    /// More librdkafka settings (security).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            source: "iomt".to_owned(),
            fhir_account: None,
            poll_interval: Duration::from_millis(250),
            drain_deadline: Duration::from_secs(30),
            kafka_log: None,
        }
    }
}

impl Events {
    /// Replaces secrets with `***`, for printing.
    pub(crate) fn mask_secrets(&mut self) {
        if let Some(log) = &mut self.kafka_log {
            mask_properties(&mut log.properties);
        }
    }
}

fn mask_properties(properties: &mut std::collections::BTreeMap<String, String>) {
    for (key, value) in properties.iter_mut() {
        if is_secret_property(key) {
            *value = "***".to_owned();
        }
    }
}

/// One `[[subscriptions]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Names the subscription in metrics, logs, its checkpoint and its dead-letter file:
    /// letters, digits, `-` and `_`.
    pub name: String,
    /// The payload format [default: cloudevents].
    #[serde(default)]
    pub format: Format,
    /// Which events it receives [default: all].
    #[serde(default)]
    pub filter: Filter,
    /// How long and how often an event is tried [default: Event Grid's, 30 attempts in 24 h].
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where events go.
    pub destination: Destination,
    /// Where events that could not be delivered are written [default:
    /// `{state_dir}/events/{name}.deadletter.jsonl`].
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    /// Deliveries in flight at once; events of the same resource still arrive in order only
    /// with 1 [default: 64].
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// With the event log on an Event Hub: the consumer group the events role reads it in
    /// for this subscription, which must exist on the hub [default: the name, lower-cased].
    #[serde(default)]
    pub consumer_group: Option<String>,
}

fn default_in_flight() -> usize {
    64
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_true() -> bool {
    true
}

/// Where a subscription's events go.
#[allow(clippy::large_enum_variant)] // configuration, built once
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Destination {
    /// A JSON Lines file, one event per line (structured formats only).
    Ndjson {
        /// The file, appended to.
        path: PathBuf,
    },
    /// An HTTPS endpoint: one POST per event.
    Webhook {
        /// The endpoint.
        url: String,
        /// A Standard Webhooks secret (`whsec_…`): requests are signed with it.
        #[serde(default)]
        secret: Option<String>,
        /// An `Authorization` header value sent with every request (`Bearer …`).
        #[serde(default)]
        authorization: Option<String>,
        /// The validation handshake when the subscription starts: Event Grid's
        /// `SubscriptionValidationEvent` for the event-grid format, the CloudEvents OPTIONS
        /// handshake otherwise.
        #[serde(default = "default_true")]
        handshake: bool,
        /// How long to wait for an answer.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// Allows plain `http://` to a host that is not loopback (refused otherwise).
        #[serde(default)]
        allow_insecure_http: bool,
    },
    /// A Kafka topic (or an Event Hub through its Kafka endpoint), keyed by `Type/id` so that
    /// the events of a resource stay in order on one partition.
    Kafka {
        /// `host:port,…`.
        brokers: String,
        /// The topic.
        topic: String,
        /// More librdkafka settings, e.g. `security.protocol`, `sasl.mechanism`,
        /// `sasl.username`, `sasl.password`.
        #[serde(default)]
        properties: std::collections::BTreeMap<String, String>,
        /// How long a message may take to be acknowledged by the brokers.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// An Event Hub, through the Event Hubs SDK, with partition key `Type/id` so that the
    /// events of a resource stay in order on one partition. Binary CloudEvents carry their
    /// attributes as `cloudEvents_*` application properties (the AMQP binding).
    EventHubs {
        /// The Event Hub.
        hub: String,
        /// Fully qualified namespace (Entra ID auth).
        #[serde(default)]
        namespace: Option<String>,
        /// A connection string with `Send` rights; otherwise `auth` names an Entra identity.
        #[serde(default)]
        connection_string: Option<String>,
        /// `workload-identity`, `managed-identity` or `client-secret` without a connection
        /// string.
        #[serde(default)]
        auth: AuthKind,
        /// Entra tenant, for `client-secret`.
        #[serde(default)]
        tenant_id: Option<String>,
        /// Entra client id.
        #[serde(default)]
        client_id: Option<String>,
        /// Entra client secret.
        #[serde(default)]
        client_secret: Option<String>,
        /// `amqp://host:port` to connect to instead of the namespace.
        #[serde(default)]
        custom_endpoint: Option<String>,
        /// How long a send may take to be stored.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// An Event Grid custom topic: events are published in batches of up to 1 MB, in the
    /// Event Grid schema (format event-grid) or as CloudEvents (format cloudevents), whichever
    /// the topic's input schema is.
    EventGrid {
        /// The topic endpoint, `https://<topic>.<region>-1.eventgrid.azure.net/api/events`.
        endpoint: String,
        /// An access key of the topic, sent as `aeg-sas-key`; otherwise `auth` names an Entra
        /// identity (role: EventGrid Data Sender).
        #[serde(default)]
        key: Option<String>,
        /// `workload-identity`, `managed-identity` or `client-secret` without a key.
        #[serde(default)]
        auth: AuthKind,
        /// Entra tenant, for `client-secret`.
        #[serde(default)]
        tenant_id: Option<String>,
        /// Entra client id.
        #[serde(default)]
        client_id: Option<String>,
        /// Entra client secret.
        #[serde(default)]
        client_secret: Option<String>,
        /// How long to wait for an answer.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// Allows plain `http://` to a host that is not loopback (refused otherwise).
        #[serde(default)]
        allow_insecure_http: bool,
    },
    /// A Cosmos DB (NoSQL API) container that holds the latest version of each resource as a
    /// document (format full-resource). Document ids are `Type_id` (Cosmos ids cannot hold
    /// `/`); an older version never replaces a newer one.
    Cosmos {
        /// The account endpoint, `https://<account>.documents.azure.com:443/`.
        endpoint: String,
        /// The database.
        database: String,
        /// The container; its partition key path must be one top-level property, for example
        /// `/partitionKey` or `/resourceType`.
        container: String,
        /// A primary or secondary key of the account (master-key signatures); otherwise `auth`
        /// names an Entra identity (role: Cosmos DB Built-in Data Contributor).
        #[serde(default)]
        key: Option<String>,
        /// `workload-identity`, `managed-identity` or `client-secret` without a key.
        #[serde(default)]
        auth: AuthKind,
        /// Entra tenant, for `client-secret`.
        #[serde(default)]
        tenant_id: Option<String>,
        /// Entra client id.
        #[serde(default)]
        client_id: Option<String>,
        /// Entra client secret.
        #[serde(default)]
        client_secret: Option<String>,
        /// What the partition key holds [default: resource-type].
        #[serde(default)]
        partition_key: CosmosPartition,
        /// What a delete does to the document [default: remove].
        #[serde(default)]
        on_delete: CosmosDelete,
        /// How long to wait for an answer.
        #[serde(default = "default_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// Allows plain `http://` to a host that is not loopback (refused otherwise).
        #[serde(default)]
        allow_insecure_http: bool,
    },
}

/// The partition key value of a Cosmos DB document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CosmosPartition {
    /// The resource type: `Observation`.
    #[default]
    ResourceType,
    /// The patient compartment: `Patient/{id}` for a Patient and for resources whose
    /// `subject`, `patient` or `beneficiary` names a Patient; the resource type otherwise.
    Patient,
}

/// What a delete does to a Cosmos DB document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CosmosDelete {
    /// Removes the document.
    #[default]
    Remove,
    /// Replaces it with a tombstone (`deleted: true`, the version, no content), which also
    /// keeps a late older version from coming back.
    Mark,
}

impl Destination {
    /// What the destination is, for logs and summaries, without secrets.
    pub fn describe(&self) -> String {
        match self {
            Destination::Ndjson { path } => format!("file {}", path.display()),
            Destination::Webhook { url, .. } => {
                format!("webhook {}", iomt_core::redact_url(url))
            }
            Destination::Kafka { topic, .. } => format!("Kafka topic {topic}"),
            Destination::EventHubs { hub, .. } => format!("Event Hub {hub}"),
            Destination::EventGrid { endpoint, .. } => {
                format!("Event Grid topic {}", iomt_core::redact_url(endpoint))
            }
            Destination::Cosmos {
                database,
                container,
                ..
            } => format!("Cosmos DB container {database}/{container}"),
        }
    }

    /// An Event Hubs destination as a hub section, to validate and compile it as one.
    pub(crate) fn event_hub(&self) -> Option<Source> {
        let Destination::EventHubs {
            hub,
            namespace,
            connection_string,
            auth,
            tenant_id,
            client_id,
            client_secret,
            custom_endpoint,
            ..
        } = self
        else {
            return None;
        };
        Some(Source {
            hub: Some(hub.clone()),
            namespace: namespace.clone(),
            connection_string: connection_string.clone(),
            auth: *auth,
            tenant_id: tenant_id.clone(),
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            custom_endpoint: custom_endpoint.clone(),
            ..Source::default()
        })
    }
}

impl Subscription {
    /// The consumer group this subscription reads the event log hub in.
    pub fn consumer_group(&self) -> String {
        self.consumer_group
            .clone()
            .unwrap_or_else(|| self.name.to_ascii_lowercase())
    }

    /// Replaces secrets with `***`, for printing.
    pub(crate) fn mask_secrets(&mut self) {
        match &mut self.destination {
            Destination::Webhook {
                secret,
                authorization,
                url,
                ..
            } => {
                mask([secret, authorization]);
                *url = iomt_core::redact_url(url);
            }
            Destination::EventHubs {
                connection_string,
                client_secret,
                ..
            } => mask([connection_string, client_secret]),
            Destination::EventGrid {
                key, client_secret, ..
            }
            | Destination::Cosmos {
                key, client_secret, ..
            } => mask([key, client_secret]),
            Destination::Kafka { properties, .. } => mask_properties(properties),
            Destination::Ndjson { .. } => {}
        }
    }
}

fn mask<const N: usize>(values: [&mut Option<String>; N]) {
    for value in values {
        if value.is_some() {
            *value = Some("***".to_owned());
        }
    }
}

/// Whether a librdkafka setting holds a secret (passwords, keys, tokens).
pub(crate) fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "key", "token", "credential"]
        .iter()
        .any(|s| key.contains(s))
        && !key.ends_with(".location")
}
