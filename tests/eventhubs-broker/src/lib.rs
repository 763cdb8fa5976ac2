//! A test-only AMQP 1.0 broker that speaks enough of the Azure Event Hubs protocol for the real
//! Rust SDK (`azure_messaging_eventhubs` 0.16) to run against it unchanged.
//!
//! No Event Hubs emulator runs where the project's tests run (no Docker, no network), and a
//! mocked client would not catch wire-level mistakes, so the tests point the real SDK at this
//! broker through its emulator recipe:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use iomt_eventhubs_broker::{BrokerConfig, BrokerHandle, CONNECTION_STRING, HubConfig};
//!
//! let broker = BrokerHandle::start(BrokerConfig::new(vec![HubConfig::new("telemetry", 4)?])).await?;
//! // ProducerClient::builder()
//! //     .with_custom_endpoint(broker.endpoint())
//! //     .open_with_connection_string(CONNECTION_STRING, Some("telemetry"))
//! # let _ = (broker, CONNECTION_STRING);
//! # Ok(())
//! # }
//! ```
//!
//! What it implements (each module says why it behaves the way it does):
//!
//! * SASL ANONYMOUS or PLAIN, and CBS `put-token` (any token is accepted) — `nodes`;
//! * `$management` READ of event hub and partition properties — `nodes`;
//! * sends to a hub (partition by key hash, as the gateway hashes, or round robin) or to a
//!   partition, single events or batches — `server`, [`hash`];
//! * receives from a consumer-group partition from any start position, with live tailing —
//!   `filter`, `server`;
//! * epoch (owner level) rules, including the steal an `EventProcessor` relies on — `epoch`;
//! * in-memory retention of every event — `store`;
//! * fault injection ([`BrokerHandle::drop_links`], [`BrokerHandle::drop_connections`]) and
//!   introspection ([`BrokerHandle::partition_state`], [`BrokerHandle::events`]) for tests;
//! * a simulated network latency on everything it sends ([`DEFAULT_LATENCY`]) — `latency`.
//!
//! # SDK 0.16 behaviours a test (and the pipeline) must live with
//!
//! Found by running the SDK against this broker; the service would show the same.
//!
//! * A send that is in flight when its link or connection goes away never completes
//!   (fe2o3-amqp 0.16 does not fail the pending outcome). Bound every send with a timeout; the
//!   next send on the same client recovers. The broker drains producer links before it detaches
//!   them itself, so [`BrokerHandle::drop_links`] does not trigger this;
//!   [`BrokerHandle::drop_connections`] can, for a send issued before it returns.
//! * A receiver that recovers from a dropped link or connection re-attaches with the start
//!   position it was opened with, so it reads again from there: skip sequence numbers already
//!   seen (a receiver opened at `Latest` would miss what arrived in between instead).
//! * An `EventReceiver` dropped without `close()` leaves its link cached on the client, and the
//!   next `open_receiver_on_partition` for that partition silently reuses it (old start
//!   position, old epoch).
//! * `PartitionClient::stream_events()` is not `Send`: drive it on a `LocalSet` or a
//!   current-thread runtime.
//!
//! It is never part of the shipped binary: only tests and the `iomt-eventhubs-broker` binary
//! depend on it.

mod address;
mod broker;
mod epoch;
mod error;
mod filter;
pub mod hash;
mod latency;
mod nodes;
mod server;
mod store;

pub use broker::{
    BrokerConfig, BrokerHandle, CONNECTION_STRING, DEFAULT_LATENCY, DEFAULT_MAX_MESSAGE_SIZE,
};
pub use error::Error;
pub use store::{HubConfig, PartitionState, StoredEvent};
