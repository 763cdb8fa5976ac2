//! `[events]` and `[[subscriptions]]`: the change events iomt emits for what it writes, and
//! who receives them.

use std::path::PathBuf;
use std::time::Duration;

use iomt_events::{Filter, Format, RetryPolicy};
use serde::{Deserialize, Serialize};

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
}

impl Default for Events {
    fn default() -> Self {
        Self {
            source: "iomt".to_owned(),
            fhir_account: None,
            poll_interval: Duration::from_millis(250),
            drain_deadline: Duration::from_secs(30),
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
        }
    }
}

impl Subscription {
    /// Replaces secrets with `***`, for printing.
    pub(crate) fn mask_secrets(&mut self) {
        if let Destination::Webhook {
            secret,
            authorization,
            url,
            ..
        } = &mut self.destination
        {
            for value in [secret, authorization] {
                if value.is_some() {
                    *value = Some("***".to_owned());
                }
            }
            *url = iomt_core::redact_url(url);
        }
        if let Destination::Kafka { properties, .. } = &mut self.destination {
            for (key, value) in properties.iter_mut() {
                if is_secret_property(key) {
                    *value = "***".to_owned();
                }
            }
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
