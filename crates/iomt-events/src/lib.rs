//! FHIR change events, without I/O: the event iomt emits for each resource version it
//! creates, updates or deletes ([`event`]), the formats a subscription can receive it in
//! ([`format`]), subscription filters with Event Grid's semantics ([`filter`]), Event Grid's
//! delivery retry policy ([`retry`]), Standard Webhooks signatures ([`webhook`]) and Event
//! Grid's dead-letter records ([`deadletter`]), and the change feed read from a FHIR server's
//! `_history` ([`changefeed`]).
//!
//! The event log, the subscriptions' checkpoints and the destinations are I/O and live in
//! `iomt-runtime`.

pub mod changefeed;
pub mod deadletter;
pub mod event;
pub mod filter;
pub mod format;
pub mod retry;
pub mod webhook;

pub use event::{ChangeEvent, ChangeKind, Publisher};
pub use filter::Filter;
pub use format::{Format, Rendered, render};
pub use retry::{Attempt, RetryPolicy, Verdict};
