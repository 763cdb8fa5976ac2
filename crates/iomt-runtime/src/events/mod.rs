//! FHIR change events in a run: the outbox the pipeline appends to before its checkpoint
//! moves, and the delivery service that reads it for every subscription.
//!
//! The event log is the embedded store's change log (written in the same transaction as each
//! resource version); for runs writing to a FHIR server, the local event log in the state
//! directory; in cluster mode, an Event Hub or a Kafka topic ([`remote_log`]) read by
//! `iomt run --role events`.
//! Each is appended to after a write and before the write is acknowledged. A crash between
//! the FHIR write and the append re-runs the write; it comes back unchanged, and the append of
//! the version it names repairs the log.

pub(crate) mod cosmos;
pub mod delivery;
pub(crate) mod destination;
pub mod remote_log;

use std::path::Path;
use std::sync::Arc;

use iomt_core::Written;
use iomt_store::{ChangeReader, EventLog, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Metrics;
use crate::config::{Compiled, CompiledEvents, ConfigError, DeadLetterTarget, Role, Target};
use delivery::{
    Clock, Context, Ended, EventDeadLetters, Feed, Log, Resources, Subscription, TokioClock,
};
use destination::Destination;
use remote_log::RemoteLog;

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
    /// An Event Hub or a Kafka topic (cluster mode).
    Remote(Arc<RemoteLog>),
}

/// Why an append to the event log failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The local event log.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The event log of cluster mode.
    #[error(transparent)]
    Remote(#[from] remote_log::RemoteLogError),
}

impl Outbox {
    /// Records the changes `written` made (and, for unchanged writes, the version in place
    /// when the log lacks it); returns once they are durable.
    pub(crate) async fn append(&self, written: &[Written]) -> Result<(), OutboxError> {
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
            Outbox::Remote(log) => Ok(log.append(written).await?),
        }
    }
}

/// The subscriptions of a run, ready to deliver.
#[derive(Debug)]
pub struct EventService {
    subscriptions: Vec<Subscription>,
    context: Context,
    /// The change log they read, and the outbox's wake-ups.
    log: Log,
    wake: watch::Receiver<u64>,
}

/// How the delivery service ended, per subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsReport {
    /// Per subscription: name, checkpoint, events left unfinished, why it is disabled.
    pub subscriptions: Vec<(String, i64, usize, Option<String>)>,
}

impl EventService {
    /// Builds the outbox and the in-process delivery service a compiled configuration asks
    /// for: none without subscriptions or event log hub, or for the normalize role, which
    /// writes no resources; only the outbox when the event log is a hub, which the events
    /// role delivers from.
    pub fn build(
        config: &Compiled,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, Option<EventService>), ConfigError> {
        Self::build_with_clock(config, metrics, Arc::new(TokioClock))
    }

    /// [`EventService::build`] with another clock, for tests of retry timing.
    pub fn build_with_clock(
        config: &Compiled,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Outbox, Option<EventService>), ConfigError> {
        if matches!(config.target, Target::InternalHub) || config.role == Role::Events {
            return Ok((Outbox::None, None));
        }
        if let Some(log) = &config.event_log {
            return Ok((remote_outbox(log)?, None));
        }
        let Some(events) = &config.events else {
            return Ok((Outbox::None, None));
        };
        let fail = |origin: &str, e: &dyn std::fmt::Display| ConfigError {
            origin: origin.to_owned(),
            message: e.to_string(),
        };
        let (wake_tx, wake) = watch::channel(0);
        let (outbox, reader, resources) = match &config.target {
            Target::InternalHub | Target::Nothing => return Ok((Outbox::None, None)),
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
                let (log, reader) = local_log(config)?;
                (
                    Outbox::Local(log, wake_tx),
                    reader,
                    Some(Resources::Fhir(
                        client.clone().with_observer(metrics.clone()),
                    )),
                )
            }
        };
        let service = EventService {
            subscriptions: subscriptions(config, events)?,
            context: context(events, resources, metrics, clock),
            log: Log::new(reader),
            wake,
        };
        Ok((outbox, Some(service)))
    }

    /// The outbox and delivery of a run that publishes changes it did not write (`iomt
    /// export`): the cluster's event log, or the local one in the state directory whatever the
    /// run's target, delivered in process; full-resource events read versions from `fhir.url`
    /// when it is set.
    pub fn build_log(
        config: &Compiled,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, Option<EventService>), ConfigError> {
        if let Some(log) = &config.event_log {
            return Ok((remote_outbox(log)?, None));
        }
        let Some(events) = &config.events else {
            return Ok((Outbox::None, None));
        };
        let (log, reader) = local_log(config)?;
        let (wake_tx, wake) = watch::channel(0);
        let resources = match &config.target {
            Target::Fhir { client, .. } => Some(Resources::Fhir(
                client.clone().with_observer(metrics.clone()),
            )),
            _ => None,
        };
        let service = EventService {
            subscriptions: subscriptions(config, events)?,
            context: context(events, resources, metrics, Arc::new(TokioClock)),
            log: Log::new(reader),
            wake,
        };
        Ok((Outbox::Local(log, wake_tx), Some(service)))
    }

    /// Delivers until `stop` turns true, then drains within the drain deadline.
    pub fn spawn(self, stop: watch::Receiver<bool>) -> JoinHandle<EventsReport> {
        let (log, wake) = (self.log, self.wake);
        let tasks: Vec<JoinHandle<Ended>> = self
            .subscriptions
            .into_iter()
            .map(|s| {
                let feed = Feed::Log {
                    log: log.clone(),
                    wake: wake.clone(),
                };
                tokio::spawn(s.run(self.context.clone(), feed, stop.clone()))
            })
            .collect();
        tokio::spawn(report(tasks))
    }
}

/// The outbox of cluster mode: the event log hub or topic.
fn remote_outbox(log: &crate::config::EventLog) -> Result<Outbox, ConfigError> {
    let log = RemoteLog::new(log).map_err(|e| ConfigError {
        origin: "event log".into(),
        message: e.to_string(),
    })?;
    Ok(Outbox::Remote(Arc::new(log)))
}

/// The local event log in the state directory, and a reader of it.
fn local_log(config: &Compiled) -> Result<(Arc<EventLog>, ChangeReader), ConfigError> {
    let fail = |e: StoreError| ConfigError {
        origin: "output.state_dir".into(),
        message: e.to_string(),
    };
    let log = EventLog::open(&config.state_dir).map_err(fail)?;
    let reader = ChangeReader::event_log(&config.state_dir).map_err(fail)?;
    Ok((Arc::new(log), reader))
}

/// The events role's subscriptions: each reads the event log hub through its own consumer
/// group (its configured one, or its name), with its own checkpoints.
pub(crate) fn cluster_subscriptions(
    config: &Compiled,
    metrics: Arc<Metrics>,
) -> Result<(Vec<(Subscription, String)>, Context), ConfigError> {
    let Some(events) = &config.events else {
        return Err(ConfigError {
            origin: "subscriptions".into(),
            message: "the events role needs at least one [[subscriptions]] entry".into(),
        });
    };
    let resources = match &config.target {
        Target::Fhir { client, .. } => Some(Resources::Fhir(
            client.clone().with_observer(metrics.clone()),
        )),
        _ => None,
    };
    let groups = events.subscriptions.iter().map(|s| s.consumer_group());
    let subscriptions = subscriptions(config, events)?
        .into_iter()
        .zip(groups)
        .collect();
    Ok((
        subscriptions,
        context(events, resources, metrics, Arc::new(TokioClock)),
    ))
}

/// Waits for the subscriptions' tasks; how each ended.
pub(crate) async fn report(tasks: Vec<JoinHandle<Ended>>) -> EventsReport {
    let mut subscriptions = Vec::new();
    for task in tasks {
        match task.await {
            Ok(e) => subscriptions.push((e.name, e.position, e.unfinished, e.disabled)),
            Err(e) => tracing::error!(error = %e, "a subscription's delivery failed"),
        }
    }
    EventsReport { subscriptions }
}

fn context(
    events: &CompiledEvents,
    resources: Option<Resources>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) -> Context {
    Context {
        publisher: Arc::new(events.publisher.clone()),
        resources,
        metrics,
        clock,
        poll_interval: events.poll_interval,
        drain_deadline: events.drain_deadline,
    }
}

/// The configured subscriptions, their destinations built.
fn subscriptions(
    config: &Compiled,
    events: &CompiledEvents,
) -> Result<Vec<Subscription>, ConfigError> {
    let dir = config.state_dir.join("events");
    let mut subscriptions = Vec::new();
    for s in &events.subscriptions {
        let origin = format!("subscriptions.{}", s.name);
        let destination = Destination::new(&s.name, s.format, &s.destination, &events.origin)
            .map_err(|e| ConfigError {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        subscriptions.push(Subscription {
            name: s.name.clone(),
            format: s.format,
            filter: s.filter.clone(),
            retry: s.retry,
            max_in_flight: s.max_in_flight,
            destination,
            // In cluster mode, with the pipeline's, in the dead-letter container.
            dead_letters: match (&s.dead_letter, &config.dead_letters) {
                (Some(file), _) => EventDeadLetters::File(file.clone()),
                (None, DeadLetterTarget::Blob(container)) => EventDeadLetters::Blob {
                    container: Box::new(container.clone()),
                    prefix: format!("events/{}/", s.name),
                },
                (None, DeadLetterTarget::File(_)) => {
                    EventDeadLetters::File(dead_letter_file(&dir, &s.name))
                }
            },
            state_file: dir.join(format!("{}.json", s.name)),
        });
    }
    Ok(subscriptions)
}

/// Where a subscription's dead letters go by default.
pub fn dead_letter_file(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!("{name}.deadletter.jsonl"))
}
