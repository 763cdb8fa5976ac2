//! Azure Event Hubs and its checkpoint store: opening consumers and producers the way a
//! deployment is configured, turning received events into source events, and the Blob
//! checkpoint store ([`blob`]) in the layout KEDA reads for lag, and a producer that reports
//! what became of each message ([`producer`]).
//!
//! Authentication is a connection string (SAS), or a Microsoft Entra ID credential (workload
//! identity on AKS, a managed identity, a client secret). A custom endpoint points the AMQP
//! connection elsewhere than the namespace (a proxy, or the test broker) while the namespace
//! name still identifies the hub in checkpoints.
#![deny(missing_docs)]

pub mod blob;
pub mod producer;

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use azure_core::credentials::TokenCredential;
use azure_messaging_eventhubs::builders::BufferedProducerClientBuilder;
use azure_messaging_eventhubs::models::{AmqpSimpleValue, AmqpValue, ReceivedEventData};
use azure_messaging_eventhubs::{BufferedProducerClient, ConsumerClient};
use iomt_core::{DeviceEvent, SourceEvent, Timestamp};
use serde_json::{Map, Value, json};

/// How to authenticate to Event Hubs.
#[derive(Clone)]
pub enum EventHubsAuth {
    /// A namespace or hub connection string (`Endpoint=sb://…;SharedAccessKeyName=…;…`).
    ConnectionString(String),
    /// A Microsoft Entra ID credential (role: Azure Event Hubs Data Receiver / Sender).
    Credential(Arc<dyn TokenCredential>),
}

impl std::fmt::Debug for EventHubsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str(match self {
            EventHubsAuth::ConnectionString(_) => "ConnectionString(***)",
            EventHubsAuth::Credential(_) => "Credential",
        })
    }
}

/// One Event Hub and how to reach it.
#[derive(Debug, Clone)]
pub struct EventHubSettings {
    /// Fully qualified namespace, e.g. `contoso.servicebus.windows.net`. With a connection
    /// string, the namespace comes from its `Endpoint` and this is ignored.
    pub namespace: String,
    /// The Event Hub.
    pub hub: String,
    /// Consumer group (readers only).
    pub consumer_group: String,
    /// Credentials.
    pub auth: EventHubsAuth,
    /// `amqp://host:port` or `amqps://host:port` to connect to instead of the namespace.
    pub custom_endpoint: Option<String>,
    /// Names this client in the service's logs (the AMQP container id).
    pub application_id: Option<String>,
}

/// Why a client could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open Event Hub {hub}: {source}")]
pub struct OpenError {
    /// The hub.
    pub hub: String,
    /// The SDK's error.
    #[source]
    pub source: azure_messaging_eventhubs::EventHubsError,
}

/// Opens a client from one of the SDK's builders with `settings`' endpoint, name and
/// credentials. The builders share these methods but no trait, hence a macro; `hub` is the hub
/// as the builder's `open` takes it (owned or borrowed).
macro_rules! open_with {
    ($settings:expr, $builder:expr, $hub:expr) => {{
        let (settings, mut builder) = ($settings, $builder);
        if let Some(endpoint) = &settings.custom_endpoint {
            builder = builder.with_custom_endpoint(endpoint.clone());
        }
        if let Some(id) = &settings.application_id {
            builder = builder.with_application_id(id.clone());
        }
        let opened = match &settings.auth {
            EventHubsAuth::ConnectionString(cs) => {
                builder
                    .open_with_connection_string(cs, Some(&settings.hub))
                    .await
            }
            EventHubsAuth::Credential(credential) => {
                builder
                    .open(&settings.namespace, $hub, credential.clone())
                    .await
            }
        };
        opened.map_err(|e| settings.error(e))
    }};
}

impl EventHubSettings {
    /// The namespace as the processor and checkpoints name it: the connection string's
    /// `Endpoint` host when there is one, else the configured namespace.
    pub fn fully_qualified_namespace(&self) -> String {
        match &self.auth {
            EventHubsAuth::ConnectionString(cs) => cs
                .parse::<azure_messaging_eventhubs::ConnectionString>()
                .map(|c| c.fully_qualified_namespace)
                .unwrap_or_else(|_| self.namespace.clone()),
            EventHubsAuth::Credential(_) => self.namespace.clone(),
        }
    }

    fn error(&self, source: azure_messaging_eventhubs::EventHubsError) -> OpenError {
        OpenError {
            hub: self.hub.clone(),
            source,
        }
    }

    /// Opens a consumer (for the partition processor).
    pub async fn consumer(&self) -> Result<ConsumerClient, OpenError> {
        let builder = ConsumerClient::builder().with_consumer_group(self.consumer_group.clone());
        open_with!(self, builder, self.hub.clone())
    }

    /// Opens a buffered producer built by `builder` (its delivery handlers set), with this
    /// hub's endpoint, name and credentials.
    pub async fn buffered_producer(
        &self,
        builder: BufferedProducerClientBuilder,
    ) -> Result<BufferedProducerClient, OpenError> {
        open_with!(self, builder, &self.hub)
    }
}

fn timestamp(time: std::time::SystemTime) -> Option<Timestamp> {
    let d = time.duration_since(UNIX_EPOCH).ok()?;
    Some(Timestamp::from_unix_ticks(
        i64::try_from(d.as_nanos() / 100).ok()?,
    ))
}

/// An application property as the JSON templates see (MedTech's `Properties`).
fn simple_json(value: &AmqpSimpleValue) -> Value {
    match value {
        AmqpSimpleValue::Null => Value::Null,
        AmqpSimpleValue::Boolean(b) => json!(b),
        AmqpSimpleValue::UByte(n) => json!(n),
        AmqpSimpleValue::Byte(n) => json!(n),
        AmqpSimpleValue::UShort(n) => json!(n),
        AmqpSimpleValue::Short(n) => json!(n),
        AmqpSimpleValue::UInt(n) => json!(n),
        AmqpSimpleValue::Int(n) => json!(n),
        AmqpSimpleValue::ULong(n) => json!(n),
        AmqpSimpleValue::Long(n) => json!(n),
        AmqpSimpleValue::Float(n) => json!(n),
        AmqpSimpleValue::Double(n) => json!(n),
        AmqpSimpleValue::Char(c) => json!(c.to_string()),
        AmqpSimpleValue::String(s) => json!(s),
        AmqpSimpleValue::Symbol(s) => json!(s.0),
        AmqpSimpleValue::Uuid(u) => json!(u.to_string()),
        AmqpSimpleValue::TimeStamp(t) => {
            t.0.and_then(timestamp)
                .map_or(Value::Null, |t| json!(t.to_string()))
        }
        AmqpSimpleValue::Binary(b) => json!(String::from_utf8_lossy(b)),
        other => json!(format!("{other:?}")),
    }
}

/// A message annotation (`x-opt-…`, IoT Hub's `iothub-…`) as JSON (MedTech's
/// `SystemProperties`).
fn annotation_json(value: &AmqpValue) -> Value {
    match value {
        AmqpValue::Null => Value::Null,
        AmqpValue::Boolean(b) => json!(b),
        AmqpValue::UByte(n) => json!(n),
        AmqpValue::Byte(n) => json!(n),
        AmqpValue::UShort(n) => json!(n),
        AmqpValue::Short(n) => json!(n),
        AmqpValue::UInt(n) => json!(n),
        AmqpValue::Int(n) => json!(n),
        AmqpValue::ULong(n) => json!(n),
        AmqpValue::Long(n) => json!(n),
        AmqpValue::Float(n) => json!(n),
        AmqpValue::Double(n) => json!(n),
        AmqpValue::Char(c) => json!(c.to_string()),
        AmqpValue::String(s) => json!(s),
        AmqpValue::Symbol(s) => json!(s.0),
        AmqpValue::Uuid(u) => json!(u.to_string()),
        AmqpValue::TimeStamp(t) => {
            t.0.and_then(timestamp)
                .map_or(Value::Null, |t| json!(t.to_string()))
        }
        AmqpValue::Binary(b) => json!(String::from_utf8_lossy(b)),
        AmqpValue::Array(items) => Value::Array(items.iter().map(annotation_json).collect()),
        other => json!(format!("{other:?}")),
    }
}

/// A received event as the envelope templates see, with its position.
pub fn to_source_event(partition: &str, event: &ReceivedEventData) -> SourceEvent {
    let data = event.event_data();
    let properties: Map<String, Value> = data
        .properties()
        .map(|p| p.iter().map(|(k, v)| (k.clone(), simple_json(v))).collect())
        .unwrap_or_default();
    let system_properties: Map<String, Value> = event
        .system_properties()
        .iter()
        .map(|(k, v)| (k.clone(), annotation_json(v)))
        .collect();
    let sequence_number = event.sequence_number().unwrap_or(-1);
    SourceEvent {
        partition: partition.to_owned(),
        sequence_number,
        offset: event.offset().clone(),
        source: format!("partition {partition} #{sequence_number}"),
        event: DeviceEvent {
            body: data.body().map(<[u8]>::to_vec).unwrap_or_default(),
            properties,
            system_properties,
            enqueued_time: event.enqueued_time().and_then(timestamp),
        },
    }
}
