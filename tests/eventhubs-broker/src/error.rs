//! Errors of the broker's own API (start-up and test introspection).
//!
//! Problems caused by clients never surface here: they go back to the client as AMQP errors
//! (link detach, rejected delivery or a management status code) and the broker keeps serving.

/// A broker API error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A hub specification is invalid.
    #[error("invalid event hub {spec:?}: {reason}")]
    InvalidHub {
        /// The specification as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No hub has this name.
    #[error("no event hub named {0:?}")]
    UnknownHub(String),
    /// The hub has no partition with this id.
    #[error("event hub {hub:?} has no partition {partition:?}")]
    UnknownPartition {
        /// The hub.
        hub: String,
        /// The partition id asked for.
        partition: String,
    },
}
