//! Running an assembled pipeline from a source: a replay of captured traffic, a replay of a
//! dead-letter file, or a live Event Hub with its roles. The command line only parses, calls
//! these and prints.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::assemble::Assembled;
use crate::config::{Compiled, ConfigError};
use crate::hub::InProcessConsumer;
use crate::hub::eventhubs::EventHubsProducer;
use crate::hub::eventhubs::ProducerOptions;
use crate::pipeline::Report;
use crate::source::deadletters::DeadLetterSource;
use crate::source::eventhubs::{EventHubsCheckpoints, EventHubsSource};
use crate::source::files::{CaptureInput, FileSource, FilesError, fingerprint};
use crate::source::{CheckpointError, CheckpointStore, Committed, FileCheckpoint, Source};
use crate::templates::{Reloader, TemplateFiles};
use crate::{SourceItem, in_process};

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration does not allow the run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The metrics endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {error}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        error: std::io::Error,
    },
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The captured traffic could not be read.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// Stopped while a dependency could still not be reached.
    #[error("stopped before {what} could be reached; the last attempt: {last}")]
    Stopped {
        /// The dependency (`checkpoints`, `internal_hub`).
        what: &'static str,
        /// Why the last attempt failed.
        last: String,
    },
}

/// Serves `/metrics`, `/healthz` and `/readyz` when the configuration names an address.
async fn serve_metrics(
    config: &Compiled,
    metrics: &Arc<crate::Metrics>,
    health: Arc<crate::Health>,
) -> Result<(), RunError> {
    if let Some(addr) = config.metrics_addr
        && health.serve_once()
    {
        let bound = crate::serve(addr, metrics.clone(), health)
            .await
            .map_err(|error| RunError::Metrics { addr, error })?;
        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    }
    Ok(())
}

/// Waits for a dependency the run cannot start without (the checkpoint container, the
/// internal hub). At start an error there is most often one of reach (DNS, a network policy, a
/// role assignment still propagating), not of configuration: it is tried again with a backoff
/// (1 s to 1 min) while `/healthz` answers and `/readyz` does not, until it succeeds or the
/// run is stopped.
async fn reach<T, E, F>(
    what: &'static str,
    stop: &mut watch::Receiver<bool>,
    mut attempt: impl FnMut() -> F,
) -> Result<T, RunError>
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>>,
{
    let mut backoff = iomt_core::Backoff::new(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    );
    loop {
        let last = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e.to_string(),
        };
        let wait = backoff.next_delay();
        tracing::warn!(dependency = what, error = %last, wait_ms = wait.as_millis() as u64, "cannot reach a dependency; trying again");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return Err(RunError::Stopped { what, last }),
        }
    }
}

/// Runs an assembled pipeline over the items of `input`: on the in-process hub, or, with an
/// internal-hub producer (the normalize role), only up to that hub.
pub async fn run_pipeline<K: CheckpointStore>(
    config: &Compiled,
    prepared: Assembled,
    input: mpsc::Receiver<Vec<SourceItem>>,
    checkpoints: K,
    internal_hub: Option<EventHubsProducer>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Report<K>, RunError> {
    serve_metrics(config, &prepared.metrics, prepared.pipeline.health()).await?;
    let (pipeline, dead_letters) = (prepared.pipeline, prepared.dead_letters);
    let (stop_events, events_stop) = watch::channel(false);
    let events = prepared.events.map(|service| service.spawn(events_stop));
    // Two calls for the two producer types: the pipeline is generic over its hub.
    let report = match internal_hub {
        // The normalize role: its output is the internal hub; there is no group stage.
        Some(producer) => {
            let consumers: Vec<InProcessConsumer> = Vec::new();
            pipeline
                .run(
                    input,
                    producer,
                    consumers,
                    dead_letters,
                    checkpoints,
                    shutdown,
                )
                .await
        }
        None => {
            let (producer, consumers) =
                in_process(prepared.config.hub_partitions, prepared.config.hub_capacity);
            pipeline
                .run(
                    input,
                    producer,
                    consumers,
                    dead_letters,
                    checkpoints,
                    shutdown,
                )
                .await
        }
    };
    // The pipeline is done writing: deliver what its writes logged, within the drain deadline.
    stop_events.send_replace(true);
    let events = match events {
        Some(task) => task.await.ok(),
        None => None,
    };
    Ok(Report { events, ..report })
}

/// Runs a source into a pipeline; the pipeline stops on `shutdown` or when the source gives
/// up. Returns the pipeline's report and how the source ended (`Ok(true)`: at its end).
async fn run_source<S: Source, K: CheckpointStore>(
    config: &Compiled,
    prepared: Assembled,
    source: S,
    checkpoints: K,
    internal_hub: Option<EventHubsProducer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Report<K>, Result<bool, S::Error>), RunError> {
    let (tx, rx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ended_tx, ended_rx) = oneshot::channel();
    let reading = tokio::spawn(async move {
        let result = source.run(tx, stop_rx).await;
        ended_tx.send(result.is_err()).ok();
        result
    });
    let report = run_pipeline(
        config,
        prepared,
        rx,
        checkpoints,
        internal_hub,
        async move {
            tokio::select! {
                () = shutdown => {}
                // A source that fails stops the pipeline (a pod without input must not look
                // healthy); one that reaches its end lets the pipeline drain what it read.
                Ok(true) = ended_rx => {}
            }
            stop_tx.send_replace(true);
        },
    )
    .await?;
    let ended = match reading.await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    Ok((report, ended))
}

/// Where a replay starts: after the checkpoint of an unfinished run of the same input into
/// the same output (`state_dir/replay-checkpoint.json`), or at the beginning. Standard input
/// cannot be resumed.
#[derive(Debug)]
pub struct Resume {
    checkpoint: FileCheckpoint,
    resumable: bool,
    /// The record the replay resumes after (0: from the start).
    pub after: i64,
}

impl Resume {
    /// Reads the checkpoint for `inputs` written into `target` (see [`Assembled::target`]);
    /// `restart` starts from the beginning whatever it says.
    pub fn open(
        config: &Compiled,
        target: &str,
        inputs: &[CaptureInput],
        restart: bool,
    ) -> Result<Self, RunError> {
        let resumable = !inputs.contains(&CaptureInput::Stdin);
        let fingerprint = if resumable {
            fingerprint(inputs, target)?
        } else {
            "stdin".to_owned()
        };
        let file = config.state_dir.join("replay-checkpoint.json");
        let (checkpoint, positions) = FileCheckpoint::open(&file, &fingerprint)?;
        let after = match positions.get(&0) {
            Some(p) if resumable && !restart => *p,
            _ => 0,
        };
        Ok(Self {
            checkpoint,
            resumable,
            after,
        })
    }
}

/// How a replay ended.
#[derive(Debug)]
pub struct ReplayOutcome {
    /// The pipeline's report.
    pub report: Report<FileCheckpoint>,
    /// Whether every record was read and its output is durable.
    pub complete: bool,
}

/// Replays captured traffic from where `resume` says.
pub async fn replay(
    config: &Compiled,
    prepared: Assembled,
    mut source: FileSource,
    resume: Resume,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ReplayOutcome, RunError> {
    source.resume_after = resume.after;
    let (mut report, ended) =
        run_source(config, prepared, source, resume.checkpoint, None, shutdown).await?;
    let complete = ended? && !report.interrupted && report.in_flight == 0;
    if complete && resume.resumable {
        report.checkpoints.mark_complete()?;
    }
    Ok(ReplayOutcome { report, complete })
}

/// A replay of a dead-letter file is short and starts over when interrupted: nothing to store.
#[derive(Debug)]
pub struct NoCheckpoint;

impl CheckpointStore for NoCheckpoint {
    async fn commit(&mut self, _: &[Committed]) -> Result<(), CheckpointError> {
        Ok(())
    }
}

/// Re-submits the records of a dead-letter file.
pub async fn replay_dead_letters(
    config: &Compiled,
    prepared: Assembled,
    source: DeadLetterSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Report<NoCheckpoint>, RunError> {
    let (report, _) = run_source(config, prepared, source, NoCheckpoint, None, shutdown).await?;
    Ok(report)
}

/// How a live run ended.
#[derive(Debug)]
pub struct LiveOutcome {
    /// The pipeline's report.
    pub report: Report<EventHubsCheckpoints>,
    /// Why the Event Hub source gave up, when it did.
    pub source_failed: Option<String>,
}

/// Runs the pipeline on a live Event Hub in the configured role until `shutdown` or until the
/// source gives up: the device hub (or, for the convert role, the internal hub) is read with
/// partitions shared among processes through the checkpoint container, and checkpoints go
/// there. `owner_id` names this process in ownership records.
pub async fn live(
    config: &Compiled,
    prepared: Assembled,
    owner_id: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<LiveOutcome, RunError> {
    let Some(live) = &config.live else {
        return Err(RunError::Config(ConfigError {
            origin: "configuration".into(),
            message: "was not compiled for `iomt run`".into(),
        }));
    };
    // The endpoints answer from the start: alive, not ready until the pipeline runs.
    serve_metrics(config, &prepared.metrics, prepared.pipeline.health()).await?;
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        stop_tx.send_replace(true);
    });
    // The owner id names the connections: the processor claims partitions under it, and
    // checkpoints are fenced with it.
    let mut settings = live.source.clone();
    settings.application_id = Some(owner_id.clone());
    let store = live.checkpoints.clone().with_owner(owner_id.clone());
    reach("checkpoints", &mut stop, || store.ensure_container()).await?;
    let store = Arc::new(store);
    let internal_hub = match &live.internal_hub {
        Some(hub) => {
            let mut hub = hub.clone();
            hub.application_id = Some(owner_id.clone());
            let producer = reach("internal_hub", &mut stop, || {
                EventHubsProducer::open(hub.clone(), ProducerOptions::default())
            })
            .await?;
            Some(producer)
        }
        None => None,
    };
    if let (Some(device), Some(fhir)) = (&config.device_mapping, &config.fhir_mapping) {
        let files = TemplateFiles {
            device: device.clone(),
            fhir: fhir.clone(),
            reload_interval: config.template_reload_interval,
        };
        let reloader = Reloader::new(
            prepared.pipeline.templates(),
            files,
            prepared.metrics.clone(),
        );
        tokio::spawn(reloader.run(stop.clone()));
    }
    let shutdown = async move {
        // Err: the sender is gone, which only happens once it has sent.
        let _stopped = stop.wait_for(|stopped| *stopped).await;
    };
    tracing::info!(
        owner = %owner_id,
        role = ?config.role,
        hub = %settings.hub,
        "starting"
    );
    let checkpoints = EventHubsCheckpoints::new(store.clone(), &settings);
    let hub = EventHubsSource {
        settings,
        processor: live.processor.clone(),
        store: store as Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
        partitions: prepared.pipeline.partitions(),
    };
    let (report, ended) =
        run_source(config, prepared, hub, checkpoints, internal_hub, shutdown).await?;
    Ok(LiveOutcome {
        report,
        source_failed: ended.err().map(|e| e.to_string()),
    })
}

/// How a run of the events role ended.
#[derive(Debug)]
pub struct EventsOutcome {
    /// Per subscription, how its delivery ended.
    pub report: crate::events::EventsReport,
    /// Why a subscription's reader of the event log gave up, when one did.
    pub source_failed: Option<String>,
}

/// How the changes role ended.
#[derive(Debug)]
pub struct ChangesOutcome {
    /// What the feed read and appended.
    pub feed: crate::source::changefeed::FeedReport,
    /// The in-process delivery, when the event log is local.
    pub events: Option<crate::events::EventsReport>,
}

/// Runs the changes role until `shutdown`: the FHIR server's history is read into the event
/// log (the local one, whose subscriptions this process delivers, or the cluster's, which the
/// events role delivers), and the feed's checkpoint follows what the log took.
pub async fn changes_role(
    config: &Compiled,
    metrics: Arc<crate::Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ChangesOutcome, RunError> {
    use crate::config::Target;
    use crate::source::changefeed::{FeedCheckpoint, run_feed};

    let Target::Fhir { client, url, .. } = &config.target else {
        return Err(RunError::Config(ConfigError {
            origin: "fhir.url".into(),
            message: "the changes role reads this server's history".into(),
        }));
    };
    let health = Arc::new(crate::Health::default());
    serve_metrics(config, &metrics, health.clone()).await?;
    let (outbox, service) = crate::events::EventService::build(config, metrics.clone())?;
    if matches!(outbox, crate::events::Outbox::None) {
        return Err(RunError::Config(ConfigError {
            origin: "subscriptions".into(),
            message: "the changes role needs an event log: [[subscriptions]], or [event_log] / events.kafka_log in cluster mode".into(),
        }));
    }
    let bell = Arc::new(tokio::sync::Notify::new());
    if let Some(addr) = config.change_feed.doorbell_addr {
        let bound = crate::source::changefeed::serve_doorbell(addr, bell.clone())
            .await
            .map_err(|e| ConfigError {
                origin: "change_feed.doorbell_addr".into(),
                message: format!("cannot listen on {addr}: {e}"),
            })?;
        tracing::info!(%bound, "the change feed's doorbell listens on POST /notify");
    }
    let (stop_tx, stop) = watch::channel(false);
    let delivery = service.map(|s| s.spawn(stop.clone()));
    health.set_ready(true);
    let feed = tokio::spawn({
        let client = client.clone().with_observer(metrics.clone());
        let settings = config.change_feed.clone();
        let checkpoint = match &config.change_feed_checkpoints {
            Some(container) => FeedCheckpoint::in_container(container.clone(), url),
            None => FeedCheckpoint::in_dir(&config.state_dir),
        };
        let metrics = metrics.clone();
        let stop = stop.clone();
        async move { run_feed(client, &settings, checkpoint, outbox, metrics, bell, stop).await }
    });
    tokio::spawn(async move {
        shutdown.await;
        stop_tx.send_replace(true);
    });
    let feed = match feed.await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            return Err(RunError::Config(ConfigError {
                origin: "change_feed".into(),
                message: e.to_string(),
            }));
        }
        Err(e) => {
            return Err(RunError::Config(ConfigError {
                origin: "change_feed".into(),
                message: format!("the feed failed: {e}"),
            }));
        }
    };
    let events = match delivery {
        Some(task) => task.await.ok(),
        None => None,
    };
    Ok(ChangesOutcome { feed, events })
}

/// How `iomt export --from` ended.
#[derive(Debug)]
pub struct ExportOutcome {
    /// What was published.
    pub bulk: crate::source::bulk::BulkReport,
    /// The in-process delivery, when the event log is local.
    pub events: Option<crate::events::EventsReport>,
}

/// Publishes a Bulk Data export's changes to the event log, then, when the log is local,
/// delivers them to the subscriptions within the events' drain deadline (what is left is
/// delivered by the next run on the same state directory).
pub async fn export_bulk(
    config: &Compiled,
    input: &crate::source::bulk::BulkInput,
    metrics: Arc<crate::Metrics>,
) -> Result<ExportOutcome, RunError> {
    let fail = |origin: &str, message: String| {
        RunError::Config(ConfigError {
            origin: origin.into(),
            message,
        })
    };
    let (outbox, service) = crate::events::EventService::build_log(config, metrics)?;
    if matches!(outbox, crate::events::Outbox::None) {
        return Err(fail(
            "subscriptions",
            "an export needs an event log: [[subscriptions]], or [event_log] / events.kafka_log in cluster mode".into(),
        ));
    }
    let (stop_tx, stop) = watch::channel(false);
    let delivery = service.map(|s| s.spawn(stop));
    let published = input.publish(&outbox, 1000).await;
    stop_tx.send_replace(true);
    let events = match delivery {
        Some(task) => task.await.ok(),
        None => None,
    };
    let bulk = published.map_err(|e| fail("export", e.to_string()))?;
    Ok(ExportOutcome { bulk, events })
}

/// Runs the events role until `shutdown` or until a reader of the event log gives up: every
/// subscription reads the event log (an Event Hub or a Kafka topic) in its own consumer group,
/// its partitions shared among the events pods (through the checkpoint container, or the
/// Kafka group), and delivers; its checkpoints move past each event once it is delivered or
/// dead-lettered, so KEDA sees each subscription's own lag.
pub async fn events_role(
    config: &Compiled,
    owner_id: String,
    metrics: Arc<crate::Metrics>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<EventsOutcome, RunError> {
    use crate::config::EventLog;
    use crate::source::Partitions;
    use crate::source::kafka::KafkaSource;

    let fail = |origin: &str, message: String| {
        RunError::Config(ConfigError {
            origin: origin.into(),
            message,
        })
    };
    let Some(log) = &config.event_log else {
        return Err(fail(
            "event_log",
            "the events role needs an event log".into(),
        ));
    };
    let health = Arc::new(crate::Health::default());
    serve_metrics(config, &metrics, health.clone()).await?;
    let (shutdown_tx, mut shutdown) = watch::channel(false);
    tokio::spawn(async move {
        stopped.await;
        shutdown_tx.send_replace(true);
    });
    // An Event Hub log: ownership and checkpoints in the checkpoint container.
    let hub = match (log, &config.live) {
        (EventLog::Hub(_), Some(live)) => {
            let store = live.checkpoints.clone().with_owner(owner_id.clone());
            reach("checkpoints", &mut shutdown, || store.ensure_container()).await?;
            let store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync> =
                Arc::new(store);
            Some((live, store))
        }
        (EventLog::Hub(_), None) => {
            return Err(fail(
                "configuration",
                "was not compiled for `iomt run`".into(),
            ));
        }
        (EventLog::Kafka(_), _) => None,
    };
    let (subscriptions, cx) = crate::events::cluster_subscriptions(config, metrics)?;
    tracing::info!(
        owner = %owner_id,
        subscriptions = subscriptions.len(),
        "starting the events role"
    );
    let (stop_tx, stop) = watch::channel(false);
    let (failed_tx, mut failed) = mpsc::unbounded_channel::<String>();
    let mut running = Vec::new();
    for (subscription, consumer_group) in subscriptions {
        let partitions = Partitions::new();
        let reading = Reading {
            subscription,
            partitions: partitions.clone(),
            cx: cx.clone(),
            stop: stop.clone(),
            failed: failed_tx.clone(),
            interval: config.pipeline.checkpoint_interval,
        };
        running.push(match (log, &hub) {
            (EventLog::Hub(_), Some((live, store))) => {
                let mut settings = live.source.clone();
                settings.consumer_group = consumer_group;
                settings.application_id = Some(owner_id.clone());
                let checkpoints = EventHubsCheckpoints::new(store.clone(), &settings);
                let reader = EventHubsSource {
                    settings,
                    processor: live.processor.clone(),
                    store: store.clone(),
                    partitions,
                };
                reading.start(reader, checkpoints)
            }
            (EventLog::Kafka(kafka), _) => {
                let client = crate::source::kafka::client_config(&kafka.brokers, &kafka.properties);
                let (reader, checkpoints) =
                    KafkaSource::subscribe(&client, &kafka.topic, &consumer_group, partitions)
                        .map_err(|e| fail("events.kafka_log", e.to_string()))?;
                reading.start(reader, checkpoints)
            }
            (EventLog::Hub(_), None) => {
                return Err(fail(
                    "configuration",
                    "was not compiled for `iomt run`".into(),
                ));
            }
        });
    }
    health.set_ready(true);
    let source_failed = tokio::select! {
        _ = shutdown.wait_for(|stopped| *stopped) => None,
        Some(e) = failed.recv() => Some(e),
    };
    health.set_ready(false);
    stop_tx.send_replace(true);
    let (mut deliveries, mut rest) = (Vec::new(), Vec::new());
    for (delivery, reader, committer) in running {
        deliveries.push(delivery);
        rest.push((reader, committer));
    }
    let report = crate::events::report(deliveries).await;
    for (reader, (done, committer)) in rest {
        done.send(()).ok();
        committer.await.ok();
        reader.await.ok();
    }
    Ok(EventsOutcome {
        report,
        source_failed,
    })
}

/// One subscription of the events role, before it starts reading.
struct Reading {
    subscription: crate::events::delivery::Subscription,
    partitions: crate::source::Partitions,
    cx: crate::events::delivery::Context,
    stop: watch::Receiver<bool>,
    failed: mpsc::UnboundedSender<String>,
    interval: std::time::Duration,
}

/// The tasks of a running subscription: its delivery, its reader, and its committer with the
/// signal that ends it.
type Running = (
    tokio::task::JoinHandle<crate::events::delivery::Ended>,
    tokio::task::JoinHandle<()>,
    (oneshot::Sender<()>, tokio::task::JoinHandle<()>),
);

impl Reading {
    /// Starts the reader, the delivery fed by it, and the committer of its checkpoints.
    fn start<S: Source, K: CheckpointStore>(self, reader: S, checkpoints: K) -> Running {
        let (tx, items) = mpsc::channel(16);
        let (stop, failed) = (self.stop.clone(), self.failed);
        let reader = tokio::spawn(async move {
            if let Err(e) = reader.run(tx, stop).await {
                failed.send(e.to_string()).ok();
            }
        });
        let feed = crate::events::delivery::Feed::Stream {
            items,
            buffered: Default::default(),
            partitions: self.partitions.clone(),
            closed: false,
        };
        let delivery = tokio::spawn(self.subscription.run(self.cx, feed, self.stop));
        let (done_tx, done) = oneshot::channel::<()>();
        let committer = tokio::spawn(commit_subscription(
            self.partitions,
            checkpoints,
            self.interval,
            done,
        ));
        (delivery, reader, (done_tx, committer))
    }
}

/// Commits a subscription's checkpoints on a timer and once more when `done` fires.
async fn commit_subscription<K: CheckpointStore>(
    partitions: crate::source::Partitions,
    mut checkpoints: K,
    interval: std::time::Duration,
    mut done: oneshot::Receiver<()>,
) {
    let mut committed = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut done => true,
        };
        let positions = partitions.0.committable();
        if positions != committed && !positions.is_empty() {
            match checkpoints.commit(&positions).await {
                Ok(()) => committed = positions,
                Err(e) => e.log(),
            }
        }
        if last {
            return;
        }
    }
}
