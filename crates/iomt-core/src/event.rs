//! A device event as it arrives from a hub or a capture file, before any template runs.

use serde_json::{Map, Value};

use crate::time::Timestamp;

/// One event from the device hub: the raw body bytes plus the hub's metadata.
///
/// Templates are evaluated against the envelope `{"Body", "Properties", "SystemProperties"}`
/// that the normalize stage builds from this; the body is parsed there, once, so that a body
/// that is not JSON becomes a per-event error rather than a transport failure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceEvent {
    /// The event body as sent by the device (expected to be UTF-8 JSON).
    pub body: Vec<u8>,
    /// Application properties set by the sender.
    pub properties: Map<String, Value>,
    /// Properties set by Event Hubs or IoT Hub (`x-opt-enqueued-time`,
    /// `iothub-connection-device-id`, ...).
    pub system_properties: Map<String, Value>,
    /// When the hub accepted the event; becomes the measurements' ingestion time.
    pub enqueued_time: Option<Timestamp>,
}
