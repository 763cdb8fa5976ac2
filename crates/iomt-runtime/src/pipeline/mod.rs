//! The running pipeline: source → normalize → internal hub → group → sink, with dead letters
//! and checkpoints.
//!
//! ```text
//!  source ──batches──▶ normalize ──by device──▶ hub partition 0..n ──▶ group ──flush──▶ write ─┐
//!    ▲                    │ register                                                  │ ack   │
//!    │                    └──────────────▶ dead letters (fsync) ──────────────────────┘       │
//!    └──────────── checkpoint ◀── ack trackers ◀──────────────────────────────────────────────┘
//! ```
//!
//! Every event is registered with its partition's [`AckTracker`](iomt_core::ack::AckTracker) before any of its
//! measurements leave the normalize task, with one part per measurement (plus one when it is
//! dead-lettered). A part is acknowledged only after its group was written (or its dead-letter
//! record synced), and the checkpoint task commits the trackers' positions after the sink has
//! persisted. So a checkpoint never passes an event whose output could still be lost.
//!
//! Memory is bounded by the channels (source batches, hub batches), the number of group writes
//! in flight, and a cap on buffered measurements (the oldest buffer is flushed early above it).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iomt_core::Timestamp;
use iomt_group::GroupConfig;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::hub::{HubConsumer, HubProducer};
use crate::metrics::Metrics;
use crate::server::Health;
use crate::sink::Sink;
use crate::source::{Acks, CheckpointStore, Origin, Partitions, SourceItem};
use crate::templates::LiveTemplates;

mod checkpoint;
mod deadletters;

pub(crate) use deadletters::batch_name;
pub use deadletters::{BlobDeadLetters, DeadLetterStore, read_blob_dead_letters};
pub use iomt_eventhubs::blob::BlobContainer;
mod group;
mod normalize;

use self::checkpoint::checkpoint_task;
use self::deadletters::{DeadLetters, dead_letter_task, delivery_task};
use self::group::group_task;
use self::normalize::normalize_task;

/// Tuning of the runtime.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Group flush limits.
    pub group: GroupConfig,
    /// Internal hub partitions (group tasks) in embedded mode.
    pub hub_partitions: usize,
    /// Batches each internal hub partition holds before the normalize task waits.
    pub hub_capacity: usize,
    /// Group writes in flight at once, across partitions.
    pub max_in_flight: usize,
    /// Measurements buffered across all groups before the oldest buffers are flushed early.
    pub max_buffered: usize,
    /// How often checkpoints are committed.
    pub checkpoint_interval: Duration,
    /// How long a shutdown may take to drain before in-flight work is abandoned (it is
    /// replayed from the checkpoint on the next start).
    pub drain_deadline: Duration,
    /// Longest wait between retries of a group while the FHIR server is unavailable.
    pub retry_cap: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            group: GroupConfig::default(),
            hub_partitions: 4,
            hub_capacity: 16,
            max_in_flight: 64,
            max_buffered: 100_000,
            checkpoint_interval: Duration::from_secs(5),
            drain_deadline: Duration::from_secs(30),
            retry_cap: Duration::from_secs(30),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Report<K> {
    /// The checkpoint store, after the final commit.
    pub checkpoints: K,
    /// The last committed position per partition.
    pub positions: BTreeMap<u32, i64>,
    /// Whether the run was stopped by a shutdown signal rather than reaching the input's end.
    pub interrupted: bool,
    /// Whether the drain deadline passed with work still in flight.
    pub abandoned: bool,
    /// Items whose output is not yet written (non-zero only when abandoned).
    pub in_flight: usize,
    /// How event delivery ended, when the run delivered events.
    pub events: Option<crate::events::EventsReport>,
}

/// A measurement's origin and read time, kept beside it in the group buffer.
#[derive(Debug, Clone, Copy)]
struct Tag {
    origin: Origin,
    read_at: Instant,
}

#[derive(Debug)]
struct Shared<S> {
    /// Where events that match no template are kept, when asked.
    unmatched: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    config: PipelineConfig,
    /// The templates in use; a reload swaps them between batches.
    templates: LiveTemplates,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    acks: Arc<Acks>,
    slots: Arc<Semaphore>,
    health: Arc<Health>,
    /// Where the events of writes go before the writes are acknowledged.
    outbox: crate::events::Outbox,
}

/// A pipeline ready to run.
#[derive(Debug)]
pub struct Pipeline<S> {
    shared: Arc<Shared<S>>,
}

impl<S: Sink> Pipeline<S> {
    /// A pipeline over compiled templates and a sink. `partitions` names the source
    /// partitions; an [`Origin`]'s partition indexes this list.
    pub fn new(
        config: PipelineConfig,
        templates: LiveTemplates,
        sink: Arc<S>,
        metrics: Arc<Metrics>,
        partitions: Vec<String>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let acks = Arc::new(Acks::with_stats(metrics.partitions().clone()));
        for name in &partitions {
            acks.open(name);
        }
        Self {
            shared: Arc::new(Shared {
                unmatched: None,
                config,
                templates,
                sink,
                metrics,
                acks,
                slots,
                health: Arc::default(),
                outbox: crate::events::Outbox::None,
            }),
        }
    }

    /// Also appends every event that matches no template to `file`, as a JSON Lines capture
    /// that can be replayed once the templates cover it. Such events are only counted
    /// otherwise (`DroppedEvent`), as in MedTech.
    pub fn keep_unmatched(mut self, file: &std::path::Path) -> std::io::Result<Self> {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)?;
        let shared = Arc::get_mut(&mut self.shared).ok_or_else(|| {
            std::io::Error::other("keep_unmatched must be set before the pipeline runs")
        })?;
        shared.unmatched = Some(Mutex::new(std::io::BufWriter::new(opened)));
        Ok(self)
    }

    /// Appends the change events of every write to `outbox` before the write is acknowledged,
    /// so that the checkpoint never passes a write whose events are not durable.
    pub fn with_outbox(mut self, outbox: crate::events::Outbox) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.outbox = outbox;
        }
        self
    }

    /// The templates in use, for their reloader.
    pub fn templates(&self) -> LiveTemplates {
        self.shared.templates.clone()
    }

    /// The table of source partitions, for a source whose partitions come and go (Event Hubs
    /// ownership).
    pub fn partitions(&self) -> Partitions {
        Partitions(self.shared.acks.clone())
    }

    /// The readiness the `/readyz` endpoint reports: true while the pipeline takes input.
    pub fn health(&self) -> Arc<Health> {
        self.shared.health.clone()
    }

    /// Runs until the input ends or `shutdown` completes, then drains within the deadline and
    /// commits the final checkpoint.
    pub async fn run<P, C, K>(
        self,
        input: mpsc::Receiver<Vec<SourceItem>>,
        mut producer: P,
        consumers: Vec<C>,
        dead_letters: impl Into<DeadLetterStore>,
        checkpoints: K,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Report<K>
    where
        P: HubProducer,
        C: HubConsumer,
        K: CheckpointStore,
    {
        let shared = self.shared;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (dl_tx, dl_rx) = mpsc::channel::<DeadLetters>(64);
        let (finish_tx, finish_rx) = oneshot::channel();

        let dl_task = tokio::spawn(dead_letter_task(dl_rx, dead_letters.into(), shared.clone()));
        let checkpoint_task = tokio::spawn(checkpoint_task(shared.clone(), checkpoints, finish_rx));
        let mut stages = JoinSet::new();
        if let Some(deliveries) = producer.deliveries() {
            stages.spawn(delivery_task(deliveries, dl_tx.clone(), shared.clone()));
        }
        stages.spawn(normalize_task(
            input,
            producer,
            dl_tx.clone(),
            shared.clone(),
            stop_rx,
        ));
        for consumer in consumers {
            stages.spawn(group_task(consumer, dl_tx.clone(), shared.clone()));
        }
        drop(dl_tx);
        shared.health.set_ready(true);

        let mut interrupted = false;
        tokio::select! {
            () = join_all(&mut stages) => shared.health.set_ready(false),
            () = shutdown => {
                interrupted = true;
                shared.health.set_ready(false);
                tracing::info!(deadline = ?shared.config.drain_deadline, "shutting down: draining");
                stop_tx.send_replace(true);
            }
        }
        let abandoned = interrupted
            && tokio::time::timeout(shared.config.drain_deadline, join_all(&mut stages))
                .await
                .is_err();
        if abandoned {
            tracing::warn!("drain deadline passed; unfinished work will be replayed on restart");
            stages.abort_all();
            join_all(&mut stages).await;
            dl_task.abort();
        }
        if let Err(e) = dl_task.await
            && !e.is_cancelled()
        {
            tracing::error!(error = %e, "the dead-letter task failed");
        }
        // The checkpoint task only ends on this signal, so it is still there to receive it.
        finish_tx.send(()).ok();
        let checkpoints = match checkpoint_task.await {
            Ok(k) => k,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        Report {
            checkpoints,
            positions: shared.acks.positions(),
            interrupted,
            abandoned,
            in_flight: shared.acks.in_flight(),
            events: None,
        }
    }
}

/// Waits for every task of the set; cancel-safe, so it can be raced and resumed.
async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result
            && !e.is_cancelled()
        {
            tracing::error!(error = %e, "a pipeline task failed");
        }
    }
}

fn millis_between(earlier: Timestamp, later: Timestamp) -> f64 {
    (later.unix_ticks() - earlier.unix_ticks()) as f64 / 10_000.0
}
