//! Where a subscription's events go: a JSON Lines file, a webhook (Standard Webhooks
//! signatures, Event Grid and CloudEvents handshakes and headers), a Kafka topic, an Event
//! Hub, an Event Grid topic or a Cosmos DB container ([`super::cosmos`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iomt_events::webhook::Secret;
use iomt_events::{Attempt, Format, Rendered};

use crate::config::Destination as DestinationConfig;

/// One event ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// The event id: the Standard Webhooks `webhook-id`.
    pub(crate) id: String,
    /// `Type/id`, the key on partitioned transports.
    pub(crate) key: String,
    /// The version, for `aeg-data-version`.
    pub(crate) version: String,
    /// The payload.
    pub(crate) rendered: Rendered,
    /// Attempts made before this one.
    pub(crate) earlier_attempts: u32,
    /// The change.
    pub(crate) event: iomt_events::ChangeEvent,
    /// The version's resource, for formats that carry it; `None` when it could not be read.
    pub(crate) resource: Option<serde_json::Value>,
}

/// Why a destination cannot be set up or validated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DestinationError {
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// The endpoint did not accept the subscription.
    #[error("the endpoint refused the subscription handshake: {0}")]
    Handshake(String),
}

/// A subscription's destination.
#[derive(Debug)]
pub(crate) enum Destination {
    Ndjson(Ndjson),
    Webhook(Box<Webhook>),
    Kafka(Box<Kafka>),
    EventHubs(Box<EventHubs>),
    EventGrid(Box<EventGrid>),
    Cosmos(Box<super::cosmos::Cosmos>),
}

impl Destination {
    /// Builds the destination a subscription names.
    pub(crate) fn new(
        name: &str,
        format: Format,
        config: &DestinationConfig,
        origin: &str,
    ) -> Result<Self, DestinationError> {
        Ok(match config {
            DestinationConfig::Ndjson { path } => Destination::Ndjson(Ndjson {
                path: path.clone(),
                file: Arc::new(Mutex::new(None)),
            }),
            DestinationConfig::Webhook {
                url,
                secret,
                authorization,
                handshake,
                timeout,
                allow_insecure_http,
            } => {
                warn_if_insecure(name, url, *allow_insecure_http);
                let secret = secret
                    .as_deref()
                    .map(str::parse::<Secret>)
                    .transpose()
                    .map_err(|e| DestinationError::Config(e.to_string()))?;
                let client = http_client(*timeout)?;
                Destination::Webhook(Box::new(Webhook {
                    client,
                    url: url.clone(),
                    secret,
                    authorization: authorization.clone(),
                    handshake: *handshake,
                    format,
                    subscription: name.to_ascii_uppercase(),
                    origin: origin.to_owned(),
                }))
            }
            DestinationConfig::Kafka {
                brokers,
                topic,
                properties,
                timeout,
            } => Destination::Kafka(Box::new(Kafka::new(brokers, topic, properties, *timeout)?)),
            DestinationConfig::EventGrid {
                endpoint,
                key,
                auth,
                tenant_id,
                client_id,
                client_secret,
                timeout,
                allow_insecure_http,
            } => {
                warn_if_insecure(name, endpoint, *allow_insecure_http);
                let credential =
                    crate::config::token_credential(*auth, tenant_id, client_id, client_secret)
                        .map_err(DestinationError::Config)?;
                let client = http_client(*timeout)?;
                Destination::EventGrid(Box::new(EventGrid {
                    client,
                    endpoint: endpoint.clone(),
                    key: key.clone(),
                    credential,
                    format,
                }))
            }
            DestinationConfig::Cosmos {
                endpoint,
                database,
                container,
                key,
                auth,
                tenant_id,
                client_id,
                client_secret,
                partition_key,
                on_delete,
                timeout,
                allow_insecure_http,
            } => {
                warn_if_insecure(name, endpoint, *allow_insecure_http);
                let credential = match key {
                    Some(_) => None,
                    None => {
                        crate::config::token_credential(*auth, tenant_id, client_id, client_secret)
                            .map_err(DestinationError::Config)?
                    }
                };
                Destination::Cosmos(Box::new(super::cosmos::Cosmos::new(
                    super::cosmos::Settings {
                        endpoint,
                        database,
                        container,
                        key: key.as_deref(),
                        credential,
                        partition: *partition_key,
                        on_delete: *on_delete,
                        client: http_client(*timeout)?,
                    },
                )?))
            }
            DestinationConfig::EventHubs { timeout, .. } => {
                let hub = config.event_hub().unwrap_or_default();
                let settings = crate::config::hub_settings(&hub, "destination")
                    .map_err(|e| DestinationError::Config(e.message))?;
                Destination::EventHubs(Box::new(EventHubs {
                    settings,
                    timeout: *timeout,
                    producer: tokio::sync::OnceCell::new(),
                }))
            }
        })
    }

    /// Validates the subscription with the endpoint, where the destination has a handshake.
    pub(crate) async fn handshake(&self, source: &str) -> Result<(), DestinationError> {
        match self {
            Destination::Ndjson(_) | Destination::Kafka(_) | Destination::EventGrid(_) => Ok(()),
            Destination::Webhook(w) => w.handshake(source).await,
            // Opening the hub: a hub that cannot be opened is retried like a handshake.
            Destination::EventHubs(h) => h.producer().await.map(|_| ()),
            Destination::Cosmos(c) => c.handshake().await,
        }
    }

    /// Sends a batch; one attempt result per event, in order.
    pub(crate) async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        match self {
            Destination::Ndjson(n) => n.deliver(batch).await,
            Destination::Webhook(w) => {
                futures::future::join_all(batch.iter().map(|o| w.send(o))).await
            }
            Destination::Kafka(k) => k.deliver(batch).await,
            Destination::EventHubs(h) => h.deliver(batch).await,
            Destination::EventGrid(g) => g.deliver(batch).await,
            Destination::Cosmos(c) => c.deliver(batch).await,
        }
    }
}

/// Says, at start, that a subscription sends in clear text because it was allowed to.
fn warn_if_insecure(subscription: &str, url: &str, allowed: bool) {
    if allowed && iomt_core::is_insecure_remote(url) {
        tracing::warn!(subscription, endpoint = %iomt_core::redact_url(url), "plain http:// to a remote endpoint (allow_insecure_http): events travel unencrypted");
    }
}

/// An HTTP client for an endpoint: redirects are not followed (a signed request goes only where
/// it was configured to).
fn http_client(timeout: Duration) -> Result<reqwest::Client, DestinationError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| DestinationError::Config(e.to_string()))
}

/// An Event Grid custom topic.
pub(crate) struct EventGrid {
    client: reqwest::Client,
    endpoint: String,
    key: Option<String>,
    credential: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
    format: Format,
}

impl std::fmt::Debug for EventGrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventGrid")
            .field("endpoint", &iomt_core::redact_url(&self.endpoint))
            .finish_non_exhaustive()
    }
}

/// The most Event Grid takes in one publish request.
const EVENT_GRID_MAX_REQUEST: usize = 1024 * 1024;

impl EventGrid {
    /// Publishes the batch in requests of up to 1 MB; each event gets its request's outcome.
    async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        let mut attempts = Vec::with_capacity(batch.len());
        let mut start = 0;
        while start < batch.len() {
            // At least one event per request: one larger than the limit is refused (413).
            let mut end = start + 1;
            let mut size = batch[start].rendered.body.len() + 2;
            while end < batch.len()
                && size + batch[end].rendered.body.len() < EVENT_GRID_MAX_REQUEST
            {
                size += batch[end].rendered.body.len() + 1;
                end += 1;
            }
            let attempt = self.publish(&batch[start..end]).await;
            attempts.extend(std::iter::repeat_n(attempt, end - start));
            start = end;
        }
        attempts
    }

    async fn publish(&self, events: &[Outgoing]) -> Attempt {
        let mut body = Vec::with_capacity(events.iter().map(|o| o.rendered.body.len() + 1).sum());
        body.push(b'[');
        for (i, o) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&o.rendered.body);
        }
        body.push(b']');
        let content_type = match self.format {
            Format::Cloudevents => "application/cloudevents-batch+json; charset=utf-8",
            _ => "application/json",
        };
        let mut request = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, content_type);
        if let Some(key) = &self.key {
            request = request.header("aeg-sas-key", key);
        } else if let Some(credential) = &self.credential {
            match credential
                .get_token(&["https://eventgrid.azure.net/.default"], None)
                .await
            {
                Ok(token) => request = request.bearer_auth(token.token.secret()),
                // Retried: the identity endpoint may be down for a moment.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot get a token for the Event Grid topic");
                    return Attempt::SocketError;
                }
            }
        }
        match request.body(body).send().await {
            Ok(response) => Attempt::Status {
                code: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
            },
            Err(e) if e.is_timeout() => Attempt::TimedOut,
            Err(_) => Attempt::SocketError,
        }
    }
}

/// An Event Hub. A send counts once the hub stored it; one that takes longer than the timeout
/// is a failed attempt, though the producer may still store it (consumers deduplicate on the
/// event id).
pub(crate) struct EventHubs {
    settings: iomt_eventhubs::EventHubSettings,
    timeout: Duration,
    producer: tokio::sync::OnceCell<iomt_eventhubs::producer::Confirmed>,
}

impl std::fmt::Debug for EventHubs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHubs")
            .field("hub", &self.settings.hub)
            .finish_non_exhaustive()
    }
}

impl EventHubs {
    async fn producer(&self) -> Result<&iomt_eventhubs::producer::Confirmed, DestinationError> {
        self.producer
            .get_or_try_init(|| async {
                iomt_eventhubs::producer::Confirmed::open(
                    self.settings.clone(),
                    iomt_eventhubs::producer::ProducerOptions {
                        max_wait: Duration::from_millis(10),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| DestinationError::Handshake(e.to_string()))
            })
            .await
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        let Ok(producer) = self.producer().await else {
            return vec![Attempt::SocketError; batch.len()];
        };
        let messages = batch
            .iter()
            .map(|o| iomt_eventhubs::producer::Message {
                body: o.rendered.body.clone(),
                content_type: Some(o.rendered.content_type.to_owned()),
                properties: o
                    .rendered
                    .attributes
                    .iter()
                    .map(|(name, value)| (format!("cloudEvents_{name}"), value.clone()))
                    .chain(
                        o.rendered
                            .headers
                            .iter()
                            .map(|(name, value)| ((*name).to_owned(), value.clone())),
                    )
                    .collect(),
                partition_key: Some(o.key.clone()),
            })
            .collect();
        match tokio::time::timeout(self.timeout, producer.send(messages)).await {
            Ok(results) => results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Attempt::Status {
                        code: 200,
                        retry_after: None,
                    },
                    Err(iomt_eventhubs::producer::NotStored::Refused(_)) => Attempt::Status {
                        code: 413,
                        retry_after: None,
                    },
                    Err(iomt_eventhubs::producer::NotStored::Closed(_)) => Attempt::SocketError,
                })
                .collect(),
            Err(_) => vec![Attempt::TimedOut; batch.len()],
        }
    }
}

/// A Kafka topic. The producer is idempotent and waits for all in-sync replicas, so an
/// acknowledged event is on the brokers once, whatever librdkafka retried.
pub(crate) struct Kafka {
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Kafka {
    fn new(
        brokers: &str,
        topic: &str,
        properties: &std::collections::BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<Self, DestinationError> {
        let mut config = crate::source::kafka::client_config(brokers, properties);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        // librdkafka's messages name settings, never their values.
        let producer = config
            .create()
            .map_err(|e| DestinationError::Config(format!("Kafka producer: {e}")))?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            timeout,
        })
    }

    async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        use rdkafka::message::{Header, OwnedHeaders};
        let sends = batch.iter().map(|o| {
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(o.rendered.content_type),
            });
            let prefixed: Vec<(String, &str)> = o
                .rendered
                .attributes
                .iter()
                .map(|(name, value)| (format!("ce_{name}"), value.as_str()))
                .collect();
            for (key, value) in &prefixed {
                headers = headers.insert(Header {
                    key: key.as_str(),
                    value: Some(*value),
                });
            }
            for (key, value) in &o.rendered.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_str()),
                });
            }
            let record = rdkafka::producer::FutureRecord::to(&self.topic)
                .key(&o.key)
                .payload(&o.rendered.body)
                .headers(headers);
            self.producer.send(record, self.timeout)
        });
        futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|result| match result {
                Ok(_) => Attempt::Status {
                    code: 200,
                    retry_after: None,
                },
                Err((e, _)) => kafka_attempt(&e),
            })
            .collect()
    }
}

/// A Kafka error as an attempt: a message the brokers can never take is a 413, anything else
/// is retried on the schedule.
fn kafka_attempt(e: &rdkafka::error::KafkaError) -> Attempt {
    use rdkafka::types::RDKafkaErrorCode;
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            Attempt::Status {
                code: 413,
                retry_after: None,
            }
        }
        Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut) => {
            Attempt::TimedOut
        }
        _ => Attempt::SocketError,
    }
}

/// A JSON Lines file; each batch is appended and synced before it counts as delivered.
///
/// A process killed in the middle of an append can leave a torn last line. Its events were not
/// acknowledged, so they are delivered again; the torn bytes are cut off when the file is
/// opened, so that the redelivered lines do not start in the middle of one.
#[derive(Debug)]
pub(crate) struct Ndjson {
    path: PathBuf,
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl Ndjson {
    async fn deliver(&self, batch: &[Outgoing]) -> Vec<Attempt> {
        let mut text = Vec::new();
        for o in batch {
            text.extend_from_slice(&o.rendered.body);
            text.push(b'\n');
        }
        let (path, file) = (self.path.clone(), self.file.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            if file.is_none() {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut opened = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&path)?;
                cut_torn_line(&mut opened)?;
                *file = Some(opened);
            }
            let Some(f) = file.as_mut() else {
                return Err(std::io::Error::other("the file is not open"));
            };
            f.write_all(&text)?;
            f.sync_data()
        })
        .await;
        let ok = matches!(written, Ok(Ok(())));
        if let Ok(Err(e)) = &written {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write events");
        }
        batch
            .iter()
            .map(|_| {
                if ok {
                    Attempt::Status {
                        code: 200,
                        retry_after: None,
                    }
                } else {
                    Attempt::SocketError
                }
            })
            .collect()
    }
}

/// Cuts what follows the last newline of a JSON Lines file: a line an interrupted append left
/// unfinished. Reads backwards from the end, a block at a time.
fn cut_torn_line(file: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const BLOCK: u64 = 64 * 1024;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut block = vec![0; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let part = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(
                    bytes = len - keep,
                    "cut an unfinished last line off an events file; its events are delivered again"
                );
                file.set_len(keep)?;
            }
            return Ok(());
        }
        end = start;
    }
    if len > 0 {
        tracing::warn!(
            bytes = len,
            "cut an unfinished line off an events file; its events are delivered again"
        );
        file.set_len(0)?;
    }
    Ok(())
}

/// An HTTPS endpoint.
pub(crate) struct Webhook {
    client: reqwest::Client,
    url: String,
    secret: Option<Secret>,
    authorization: Option<String>,
    handshake: bool,
    format: Format,
    /// The subscription name, upper-cased as Event Grid sends it.
    subscription: String,
    /// The `WebHook-Request-Origin` of the CloudEvents handshake.
    origin: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &iomt_core::redact_url(&self.url))
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes a CloudEvents HTTP header value: space, `"`, `%` and non-ASCII, with
/// upper-case hex (the HTTP binding's rule).
fn header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte == b' ' || byte == b'"' || byte == b'%' || !byte.is_ascii() || byte < 0x20 {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(byte as char);
        }
    }
    out
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

impl Webhook {
    fn base(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, &self.url);
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        request
    }

    /// Event Grid's validation for the event-grid format; the CloudEvents abuse-protection
    /// handshake otherwise.
    async fn handshake(&self, source: &str) -> Result<(), DestinationError> {
        if !self.handshake {
            return Ok(());
        }
        let fail = |m: String| DestinationError::Handshake(m);
        if self.format == Format::EventGrid {
            let code = uuid::Uuid::new_v4().to_string();
            let body = serde_json::json!([{
                "id": uuid::Uuid::new_v4().to_string(),
                "topic": source,
                "subject": "",
                "data": {"validationCode": code},
                "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                "eventTime": iomt_core::Timestamp::now().to_string(),
                "metadataVersion": "1",
                "dataVersion": "2"
            }]);
            let response = self
                .base(reqwest::Method::POST)
                .header("aeg-event-type", "SubscriptionValidation")
                .header("aeg-subscription-name", &self.subscription)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| fail(e.without_url().to_string()))?;
            let status = response.status();
            if status != reqwest::StatusCode::OK {
                return Err(fail(format!("answered {status}, expected 200")));
            }
            let answer = response
                .bytes()
                .await
                .map_err(|e| fail(e.without_url().to_string()))?;
            let answer: serde_json::Value = serde_json::from_slice(&answer)
                .map_err(|e| fail(format!("the answer is not JSON: {e}")))?;
            if answer["validationResponse"] != code.as_str() {
                return Err(fail(
                    "validationResponse does not echo validationCode".into(),
                ));
            }
            return Ok(());
        }
        let response = self
            .base(reqwest::Method::OPTIONS)
            .header("WebHook-Request-Origin", &self.origin)
            .send()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(fail(format!("OPTIONS answered {status}")));
        }
        let allowed = response
            .headers()
            .get("WebHook-Allowed-Origin")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if allowed != "*" && !allowed.eq_ignore_ascii_case(&self.origin) {
            return Err(fail(format!(
                "WebHook-Allowed-Origin is {allowed:?}, expected {:?} or \"*\"",
                self.origin
            )));
        }
        Ok(())
    }

    async fn send(&self, o: &Outgoing) -> Attempt {
        // Event Grid always posts an array.
        let body = if self.format == Format::EventGrid {
            let mut b = Vec::with_capacity(o.rendered.body.len() + 2);
            b.push(b'[');
            b.extend_from_slice(&o.rendered.body);
            b.push(b']');
            b
        } else {
            o.rendered.body.clone()
        };
        let mut request = self
            .base(reqwest::Method::POST)
            .header(reqwest::header::CONTENT_TYPE, o.rendered.content_type)
            .header("aeg-event-type", "Notification")
            .header("aeg-subscription-name", &self.subscription)
            .header("aeg-delivery-count", o.earlier_attempts.to_string())
            .header("aeg-data-version", &o.version)
            .header("aeg-metadata-version", "1");
        if self.handshake && self.format != Format::EventGrid {
            request = request.header("WebHook-Request-Origin", &self.origin);
        }
        for (name, value) in &o.rendered.attributes {
            request = request.header(format!("ce-{name}"), header_value(value));
        }
        for (name, value) in &o.rendered.headers {
            request = request.header(*name, value);
        }
        if let Some(secret) = &self.secret {
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            request = request
                .header("webhook-id", &o.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", secret.sign(&o.id, timestamp, &body));
        }
        match request.body(body).send().await {
            Ok(response) => Attempt::Status {
                code: response.status().as_u16(),
                retry_after: retry_after(response.headers()),
            },
            Err(e) if e.is_timeout() => Attempt::TimedOut,
            Err(_) => Attempt::SocketError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevents_header_values_are_percent_encoded() {
        assert_eq!(header_value("a b\"c%dé"), "a%20b%22c%25d%C3%A9");
        assert_eq!(header_value("/subscriptions/x"), "/subscriptions/x");
    }

    #[test]
    fn a_torn_last_line_is_cut_and_whole_lines_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.ndjson");
        let long = "x".repeat(200_000);
        for (before, after) in [
            ("{\"a\":1}\n{\"b\":".to_owned(), "{\"a\":1}\n".to_owned()),
            ("{\"a\":1}\n".to_owned(), "{\"a\":1}\n".to_owned()),
            (format!("{{\"a\":1}}\n{long}"), "{\"a\":1}\n".to_owned()),
            (long, String::new()),
            (String::new(), String::new()),
        ] {
            std::fs::write(&path, &before).unwrap();
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .unwrap();
            cut_torn_line(&mut file).unwrap();
            // Appends go after what is kept.
            file.write_all(b"{\"c\":3}\n").unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("{after}{{\"c\":3}}\n")
            );
        }
    }
}
