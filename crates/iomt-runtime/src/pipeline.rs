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
//! Every event is registered with its partition's [`AckTracker`] before any of its
//! measurements leave the normalize task, with one part per measurement (plus one when it is
//! dead-lettered). A part is acknowledged only after its group was written (or its dead-letter
//! record synced), and the checkpoint task commits the trackers' positions after the sink has
//! persisted. So a checkpoint never passes an event whose output could still be lost.
//!
//! Memory is bounded by the channels (source batches, hub batches), the number of group writes
//! in flight, and a cap on buffered measurements (the oldest buffer is flushed early above it).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use iomt_core::SourceEvent;
use iomt_core::{Measurement, Timestamp};
use iomt_files::deadletter::{DeadLetter, DeadLetterWriter, Stage};
use iomt_group::{Flush, FlushReason, GroupConfig, Grouper};
use iomt_normalize::Normalizer;
use iomt_templates::fhir::FhirMapping;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::hub::{Delivery, HubConsumer, HubMessage, HubProducer, device_partition};
use crate::metrics::Metrics;
use crate::server::Health;
use crate::sink::{Sink, SinkError};
use crate::source::{Acks, CheckpointStore, Input, Origin, Partitions, SourceItem};

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
}

/// Dead-letter records and the origins to acknowledge once they are durable.
#[derive(Debug)]
struct DeadLetters {
    records: Vec<DeadLetter>,
    origins: Vec<Origin>,
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
    normalizer: Arc<Normalizer>,
    mapping: Arc<FhirMapping>,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    acks: Arc<Acks>,
    slots: Arc<Semaphore>,
    health: Arc<Health>,
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
        normalizer: Arc<Normalizer>,
        mapping: Arc<FhirMapping>,
        sink: Arc<S>,
        metrics: Arc<Metrics>,
        partitions: Vec<String>,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let acks = Arc::new(Acks::default());
        for name in &partitions {
            acks.open(name);
        }
        Self {
            shared: Arc::new(Shared {
                unmatched: None,
                config,
                normalizer,
                mapping,
                sink,
                metrics,
                acks,
                slots,
                health: Arc::default(),
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
        dead_letters: DeadLetterWriter,
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

        let dl_task = tokio::spawn(dead_letter_task(dl_rx, dead_letters, shared.clone()));
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

fn normalize_dead_letter(
    event: &SourceEvent,
    errors: &[iomt_normalize::NormalizeError],
    time: Timestamp,
) -> DeadLetter {
    let first = &errors[0];
    let mut messages: Vec<String> = Vec::new();
    for e in errors {
        let m = match (&e.template, &e.path, e.line) {
            (Some(t), Some(p), Some(l)) => format!("{t}, {p} (line {l}): {}", e.message),
            (Some(t), _, _) => format!("{t}: {}", e.message),
            _ => e.message.clone(),
        };
        // A template failing the same way on every match of an event is said once.
        if !messages.contains(&m) {
            messages.push(m);
        }
    }
    DeadLetter::event(
        event,
        (
            first.kind.name(),
            messages.join("; "),
            first.template.clone(),
        ),
        time,
    )
}

async fn normalize_task<S: Sink, P: HubProducer>(
    mut input: mpsc::Receiver<Vec<SourceItem>>,
    mut producer: P,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<bool>,
) {
    let partitions = producer.partitions();
    loop {
        let batch = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            batch = input.recv() => match batch {
                Some(b) => b,
                None => break,
            },
        };
        let span = tracing::debug_span!("normalize_batch", events = batch.len()).entered();
        let read_at = Instant::now();
        let now = Timestamp::now();
        let mut out: Vec<Vec<HubMessage>> = (0..partitions).map(|_| Vec::new()).collect();
        let mut registrations = Vec::with_capacity(batch.len());
        let mut dead = DeadLetters {
            records: Vec::new(),
            origins: Vec::new(),
        };
        let mut events = 0;
        let mut normalized = 0;
        let mut unmatched = Vec::new();
        for item in batch {
            let origin = item.origin;
            let mut route = |measurement: Measurement| {
                let p = device_partition(&measurement.device_id, partitions);
                out[p].push(HubMessage {
                    measurement,
                    origin,
                    read_at,
                });
            };
            match item.input {
                Input::Bad(bad) => {
                    events += 1;
                    shared
                        .metrics
                        .error("InvalidDataFormatException", "Normalization");
                    registrations.push((origin, 1));
                    dead.origins.push(origin);
                    dead.records.push(DeadLetter::unreadable(&bad, now));
                }
                Input::Measurement(m) => {
                    registrations.push((origin, 1));
                    route(*m);
                }
                Input::Event(mut event) => {
                    events += 1;
                    if let Some(enqueued) = event.event.enqueued_time {
                        shared
                            .metrics
                            .device_latency(millis_between(enqueued, now).max(0.0));
                    }
                    let output = shared.normalizer.normalize_owned(&mut event.event);
                    let failed = !output.errors.is_empty();
                    let n = output.measurements.len();
                    normalized += n as u64;
                    if failed {
                        for e in &output.errors {
                            shared.metrics.error(e.kind.name(), "Normalization");
                        }
                        dead.origins.push(origin);
                        dead.records
                            .push(normalize_dead_letter(&event, &output.errors, now));
                    } else if n == 0 {
                        shared.metrics.dropped();
                        unmatched.push(iomt_files::capture::to_jsonl(&event));
                    }
                    registrations.push((origin, n as u32 + u32::from(failed)));
                    for mut m in output.measurements {
                        if m.ingestion_time_utc.is_none() {
                            m.ingestion_time_utc = event.event.enqueued_time;
                        }
                        route(m);
                    }
                }
            }
        }
        drop(span);
        if let Some(file) = &shared.unmatched
            && !unmatched.is_empty()
        {
            let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
            let written = unmatched
                .iter()
                .try_for_each(|line| writeln!(file, "{line}"))
                .and_then(|()| file.flush());
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot write unmatched events");
            }
        }
        shared.metrics.events_read(events);
        shared.metrics.normalized(normalized);
        // Registered before anything can be acknowledged.
        shared.acks.register(&registrations);
        if !dead.records.is_empty() && dead_letters.send(dead).await.is_err() {
            break;
        }
        for (p, messages) in out.into_iter().enumerate() {
            if !messages.is_empty() && producer.send(p, messages).await.is_err() {
                tracing::error!(partition = p, "the internal hub closed; stopping normalize");
                return;
            }
        }
    }
    producer.close().await;
}

/// The error MedTech reports when normalized events cannot be written to its internal hub.
const HUB_SEND_ERROR: &str = "EventHubProducerClientException";

/// Acknowledges measurements a hub between processes stored, and dead-letters those it
/// refused.
async fn delivery_task<S: Sink>(
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
) {
    while let Some(delivery) = deliveries.recv().await {
        match delivery {
            Delivery::Stored(origins) => shared.acks.ack(origins),
            Delivery::Failed { messages, error } => {
                shared.metrics.error(HUB_SEND_ERROR, "Normalization");
                tracing::debug!(messages, %error, "internal hub send failed; retrying");
            }
            Delivery::Refused { messages, reason } => {
                shared.metrics.error(HUB_SEND_ERROR, "Normalization");
                let now = Timestamp::now();
                let records = messages
                    .iter()
                    .map(|m| {
                        measurement_dead_letter(
                            &shared,
                            Stage::Normalize,
                            &m.measurement,
                            m.origin,
                            (HUB_SEND_ERROR, &reason, None),
                            now,
                        )
                    })
                    .collect();
                let origins = messages.iter().map(|m| m.origin).collect();
                if dead_letters
                    .send(DeadLetters { records, origins })
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "dead-letter sink closed; refused measurements will be replayed"
                    );
                }
            }
        }
    }
}

/// The dead-letter record of one measurement: what failed (`kind`, `message`, `template`)
/// and the source event it came from.
fn measurement_dead_letter<S>(
    shared: &Shared<S>,
    stage: Stage,
    measurement: &Measurement,
    origin: Origin,
    failure: (&str, &str, Option<&str>),
    time: Timestamp,
) -> DeadLetter {
    let partition = shared
        .acks
        .slot(origin.partition)
        .map_or_else(|| origin.partition.to_string(), |s| s.name.clone());
    DeadLetter::measurement(
        stage,
        measurement,
        (partition, origin.position),
        failure,
        time,
    )
}

fn reason_name(reason: FlushReason) -> &'static str {
    match reason {
        FlushReason::MaxEvents => "MaxEvents",
        FlushReason::MaxWait => "MaxWait",
        FlushReason::Shutdown => "Shutdown",
        FlushReason::MemoryLimit => "MemoryLimit",
    }
}

async fn group_task<S: Sink, C: HubConsumer>(
    mut consumer: C,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
) {
    let mapping = shared.mapping.clone();
    let mut grouper: Grouper<_, Tag> = Grouper::new(shared.config.group, move |t: &str| {
        mapping.lookup(t).map(|f| f.period_interval())
    });
    let partitions = shared.config.hub_partitions.max(1);
    let limit = (shared.config.max_buffered / partitions).max(1);
    let epoch = Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let mut writes = Writes::default();
    loop {
        let deadline = grouper
            .next_deadline_ms()
            .map(|ms| tokio::time::Instant::from_std(epoch + Duration::from_millis(ms)));
        tokio::select! {
            biased;
            Some(result) = writes.tasks.join_next(), if !writes.tasks.is_empty() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "a group write failed");
                }
                writes.forget_finished_lanes();
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                if deadline.is_some() =>
            {
                for flush in grouper.expired(now_ms()) {
                    dispatch(&shared, &dead_letters, &mut writes, flush).await;
                }
            }
            batch = consumer.recv() => {
                let Some(batch) = batch else { break };
                shared.metrics.buffered(batch.len() as i64);
                for m in batch {
                    let tag = Tag { origin: m.origin, read_at: m.read_at };
                    if let Some(flush) = grouper.push(m.measurement, tag, now_ms()) {
                        dispatch(&shared, &dead_letters, &mut writes, flush).await;
                    }
                }
                while grouper.buffered() > limit {
                    let Some(flush) = grouper.flush_oldest() else { break };
                    dispatch(&shared, &dead_letters, &mut writes, flush).await;
                }
            }
        }
    }
    for flush in grouper.drain() {
        dispatch(&shared, &dead_letters, &mut writes, flush).await;
    }
    join_all(&mut writes.tasks).await;
}

/// The group writes of one partition in flight.
///
/// Writes of the same device and type run one after another, in flush order: two flushes of
/// one observation window written at once would both find no Observation and both create it,
/// and the second PUT would replace the first one's values. Writes of other devices run
/// concurrently.
#[derive(Debug, Default)]
struct Writes {
    tasks: JoinSet<()>,
    /// Per device and type, completion of the last write started (its sender is dropped when
    /// that write ends).
    lanes: HashMap<(Arc<str>, String), oneshot::Receiver<()>>,
}

impl Writes {
    /// Returns what the next write of `group`'s device and type must wait for, and the
    /// sender whose drop releases the write after it.
    fn enter(
        &mut self,
        group: &iomt_core::MeasurementGroup,
    ) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (done, next) = oneshot::channel();
        let previous = self
            .lanes
            .insert((group.type_name.clone(), group.device_id.clone()), next);
        (previous, done)
    }

    /// Drops lanes whose last write has ended, so the map holds only devices being written.
    fn forget_finished_lanes(&mut self) {
        if self.lanes.len() > 2 * self.tasks.len() + 64 {
            self.lanes.retain(|_, last| {
                matches!(last.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            });
        }
    }
}

/// Starts the write of a flushed group once a write slot is free (the wait is backpressure).
async fn dispatch<S: Sink>(
    shared: &Arc<Shared<S>>,
    dead_letters: &mpsc::Sender<DeadLetters>,
    writes: &mut Writes,
    flush: Flush<Tag>,
) {
    shared.metrics.buffered(-(flush.positions.len() as i64));
    let permit = shared.slots.clone().acquire_owned().await;
    let (previous, done) = writes.enter(&flush.group);
    let (shared, dead_letters) = (shared.clone(), dead_letters.clone());
    // Type names and counts only: device and patient ids stay out of info-level telemetry.
    let span = tracing::info_span!(
        "write_group",
        r#type = %flush.group.type_name,
        measurements = flush.positions.len(),
        reason = reason_name(flush.reason),
    );
    writes.tasks.spawn(
        async move {
            if let Some(previous) = previous {
                // Err only means the previous write's task ended, which is what we wait for.
                previous.await.ok();
            }
            write_flush(&shared, flush, &dead_letters).await;
            drop((permit, done));
        }
        .instrument(span),
    );
}

async fn write_flush<S: Sink>(
    shared: &Shared<S>,
    flush: Flush<Tag>,
    dead_letters: &mpsc::Sender<DeadLetters>,
) {
    let mut backoff = Duration::from_millis(250);
    let error = loop {
        match shared.sink.write(&flush.group).await {
            Ok(written) => {
                let now = Timestamp::now();
                let latencies: Vec<Duration> = flush
                    .positions
                    .iter()
                    .map(|t| t.read_at.elapsed())
                    .collect();
                for m in &flush.group.measurements {
                    if let Some(ingested) = m.ingestion_time_utc {
                        shared
                            .metrics
                            .ingestion_latency(millis_between(ingested, now).max(0.0));
                    }
                }
                shared.metrics.group_written(
                    reason_name(flush.reason),
                    flush.group.measurements.len() as u64,
                    &latencies,
                );
                // What the FHIR mapping produced; identity writes are not counted, as in
                // MedTech's `FhirResourceSaved`.
                for w in written.iter().filter(|w| !w.identity) {
                    shared.metrics.written(w);
                }
                shared.acks.ack(flush.positions.iter().map(|t| t.origin));
                return;
            }
            Err(SinkError::Unavailable { kind, message }) => {
                shared.metrics.error(kind, "FHIRConversion");
                shared.metrics.retry();
                tracing::warn!(kind, retry_in = ?backoff, "FHIR output unavailable; retrying the group");
                tracing::debug!(%message, "FHIR output failure");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_cap);
            }
            Err(e @ SinkError::Data { .. }) => break e,
        }
    };
    let SinkError::Data {
        kind,
        message,
        template,
    } = error
    else {
        return;
    };
    shared.metrics.error(kind, "FHIRConversion");
    tracing::debug!(
        kind,
        template = template.as_deref().unwrap_or(""),
        measurements = flush.group.measurements.len(),
        "group dead-lettered"
    );
    let now = Timestamp::now();
    let records = flush
        .group
        .measurements
        .iter()
        .zip(&flush.positions)
        .map(|(m, tag)| {
            measurement_dead_letter(
                shared,
                Stage::Convert,
                m,
                tag.origin,
                (kind, &message, template.as_deref()),
                now,
            )
        })
        .collect();
    let origins = flush.positions.iter().map(|t| t.origin).collect();
    if dead_letters
        .send(DeadLetters { records, origins })
        .await
        .is_err()
    {
        // Only after the drain deadline: the group stays unacknowledged and is replayed.
        tracing::warn!("dead-letter sink closed; the group will be replayed");
    }
}

async fn dead_letter_task<S: Sink>(
    mut rx: mpsc::Receiver<DeadLetters>,
    mut writer: DeadLetterWriter,
    shared: Arc<Shared<S>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        while batches.len() < 64 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let records: Vec<DeadLetter> = batches
            .iter_mut()
            .flat_map(|b| std::mem::take(&mut b.records))
            .collect();
        let mut wait = Duration::from_millis(100);
        loop {
            let (w, result) = match tokio::task::spawn_blocking({
                let records = records.clone();
                move || {
                    let result = writer.write(&records);
                    (writer, result)
                }
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "dead-letter writer failed");
                    return;
                }
            };
            writer = w;
            match result {
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(path = %writer.path().display(), error = %e, "cannot write dead letters; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
        for r in &records {
            shared.metrics.dead_letter(r.stage.name(), &r.kind, 1);
        }
        for b in batches {
            shared.acks.ack(b.origins);
        }
    }
}

async fn checkpoint_task<S: Sink, K: CheckpointStore>(
    shared: Arc<Shared<S>>,
    mut store: K,
    mut finish: oneshot::Receiver<()>,
) -> K {
    let mut tick = tokio::time::interval(shared.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => commit(&shared, &mut store).await,
            _ = &mut finish => break,
        }
    }
    commit(&shared, &mut store).await;
    store
}

/// Commits what is safe: positions are read before the sink persists, so every write they
/// cover is durable when they are stored.
async fn commit<S: Sink, K: CheckpointStore>(shared: &Shared<S>, store: &mut K) {
    let positions = shared.acks.committable();
    if let Err(e) = shared.sink.persist().await {
        tracing::error!(error = %e, "cannot persist the output; the checkpoint waits");
        return;
    }
    if positions.is_empty() {
        return;
    }
    if let Err(e) = store.commit(&positions).await {
        tracing::error!(error = %e, "cannot commit the checkpoint");
    }
}
