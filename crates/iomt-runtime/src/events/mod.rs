//! FHIR change events in a run: the outbox the pipeline appends to before its checkpoint
//! moves, and the delivery service that reads it for every subscription.
//!
//! The event log is the embedded store's change log (written in the same transaction as each
//! resource version), or, for runs writing to a FHIR server, the local event log in the state
//! directory, appended to after each write and before the write is acknowledged. A crash
//! between the FHIR write and the append re-runs the write; it comes back unchanged, and the
//! append of the version it names repairs the log.

pub mod delivery;
pub(crate) mod destination;

use std::path::Path;
use std::sync::Arc;

use iomt_core::Written;
use iomt_store::{ChangeReader, EventLog, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Metrics;
use crate::config::{Compiled, ConfigError, Target};
use delivery::{Clock, Context, Ended, Log, Resources, Subscription, TokioClock};
use destination::Destination;

/// Where the pipeline puts the events of its writes before acknowledging them.
#[derive(Debug, Clone, Default)]
pub enum Outbox {
    /// No subscriptions.
    #[default]
    None,
    /// The embedded store's change log, written with the resources: appending only wakes
    /// the delivery service.
    Store(watch::Sender<u64>),
    /// The local event log.
    Local(Arc<EventLog>, watch::Sender<u64>),
}

impl Outbox {
    /// Records the changes `written` made (and, for unchanged writes, the version in place
    /// when the log lacks it); returns once they are durable.
    pub(crate) async fn append(&self, written: &[Written]) -> Result<(), StoreError> {
        match self {
            Outbox::None => Ok(()),
            Outbox::Store(wake) => {
                wake.send_modify(|n| *n += 1);
                Ok(())
            }
            Outbox::Local(log, wake) => {
                let (log, written) = (log.clone(), written.to_vec());
                tokio::task::spawn_blocking(move || log.append(&written))
                    .await
                    .unwrap_or(Err(StoreError::Closed))?;
                wake.send_modify(|n| *n += 1);
                Ok(())
            }
        }
    }
}

/// The subscriptions of a run, ready to deliver.
#[derive(Debug)]
pub struct EventService {
    subscriptions: Vec<Subscription>,
    context: Context,
}

/// How the delivery service ended, per subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsReport {
    /// Per subscription: name, checkpoint, events left unfinished, why it is disabled.
    pub subscriptions: Vec<(String, i64, usize, Option<String>)>,
}

impl EventService {
    /// Builds the outbox and the delivery service a compiled configuration asks for; `None`
    /// without subscriptions (or for the normalize role, which writes no resources).
    pub fn build(
        config: &Compiled,
        metrics: Arc<Metrics>,
    ) -> Result<Option<(Outbox, EventService)>, ConfigError> {
        Self::build_with_clock(config, metrics, Arc::new(TokioClock))
    }

    /// [`EventService::build`] with another clock, for tests of retry timing.
    pub fn build_with_clock(
        config: &Compiled,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Option<(Outbox, EventService)>, ConfigError> {
        let Some(events) = &config.events else {
            return Ok(None);
        };
        let fail = |origin: &str, e: &dyn std::fmt::Display| ConfigError {
            origin: origin.to_owned(),
            message: e.to_string(),
        };
        let (wake_tx, wake) = watch::channel(0);
        let (outbox, reader, resources) = match &config.target {
            Target::InternalHub => return Ok(None),
            Target::Embedded { dir, .. } => {
                let reader = ChangeReader::store(dir).map_err(|e| fail("output.dir", &e))?;
                let resources = ChangeReader::store(dir).map_err(|e| fail("output.dir", &e))?;
                (
                    Outbox::Store(wake_tx),
                    reader,
                    Some(Resources::Store(Log::new(resources))),
                )
            }
            Target::Fhir { client, .. } => {
                let log =
                    EventLog::open(&config.state_dir).map_err(|e| fail("output.state_dir", &e))?;
                let reader = ChangeReader::event_log(&config.state_dir)
                    .map_err(|e| fail("output.state_dir", &e))?;
                (
                    Outbox::Local(Arc::new(log), wake_tx),
                    reader,
                    Some(Resources::Fhir(client.clone())),
                )
            }
        };
        let dir = config.state_dir.join("events");
        let mut subscriptions = Vec::new();
        for s in &events.subscriptions {
            let origin = format!("subscriptions.{}", s.name);
            let destination = Destination::new(&s.name, s.format, &s.destination, &events.origin)
                .map_err(|e| fail(&origin, &e))?;
            subscriptions.push(Subscription {
                name: s.name.clone(),
                format: s.format,
                filter: s.filter.clone(),
                retry: s.retry,
                max_in_flight: s.max_in_flight,
                destination,
                dead_letter_file: s
                    .dead_letter
                    .clone()
                    .unwrap_or_else(|| dead_letter_file(&dir, &s.name)),
                state_file: dir.join(format!("{}.json", s.name)),
            });
        }
        let context = Context {
            publisher: Arc::new(events.publisher.clone()),
            log: Log::new(reader),
            resources,
            metrics,
            clock,
            wake,
            poll_interval: events.poll_interval,
            drain_deadline: events.drain_deadline,
        };
        Ok(Some((
            outbox,
            EventService {
                subscriptions,
                context,
            },
        )))
    }

    /// Delivers until `stop` turns true, then drains within the drain deadline.
    pub fn spawn(self, stop: watch::Receiver<bool>) -> JoinHandle<EventsReport> {
        let tasks: Vec<JoinHandle<Ended>> = self
            .subscriptions
            .into_iter()
            .map(|s| tokio::spawn(s.run(self.context.clone(), stop.clone())))
            .collect();
        tokio::spawn(async move {
            let mut subscriptions = Vec::new();
            for task in tasks {
                match task.await {
                    Ok(e) => subscriptions.push((e.name, e.position, e.unfinished, e.disabled)),
                    Err(e) => tracing::error!(error = %e, "a subscription's delivery failed"),
                }
            }
            EventsReport { subscriptions }
        })
    }
}

/// Where a subscription's dead letters go by default.
pub fn dead_letter_file(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!("{name}.deadletter.jsonl"))
}
