//! Reading the device Event Hub: partitions are claimed through the SDK's event processor
//! (ownership balanced across processes through the checkpoint store), each owned partition is
//! read into the pipeline, and checkpoints go back to the same store.
//!
//! A partition lost to another process (its stream ends with `ConsumerDisconnected`) is closed
//! in the pipeline's partition table: what is in flight for it still gets written (the writes
//! are idempotent), but its checkpoints are no longer committed here, and the fenced blob store
//! would refuse them anyway. The processor's run loop exits on any dispatch error (a
//! checkpoint-store outage, say), so it is restarted with a backoff.
//!
//! After a dropped link, an SDK 0.16 partition receiver can also wedge for good: it stops
//! delivering without reporting an error. (The receivers share a connection; each one that
//! recovers by reconnecting drops whatever connection is current, including the one another
//! has just opened and is authorizing on, and that CBS authorization then waits forever.)
//! Nothing on the stream tells such a receiver from an idle partition, so a receive watchdog
//! asks the hub: a partition quiet for `stall_after` whose hub holds events past the last one
//! read is behind, and one still behind, with nothing received, at the next check is stalled;
//! the client is then rebuilt as for a receiver that keeps failing (see `judge`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use azure_messaging_eventhubs::models::ReceivedEventData;
use azure_messaging_eventhubs::models::{Checkpoint, StartPositions};
use azure_messaging_eventhubs::{ConsumerClient, EventProcessor, StartLocation, StartPosition};
use futures::{FutureExt as _, StreamExt as _};
use iomt_core::wire;
use iomt_core::{Backoff, BadRecord};
use iomt_eventhubs::{EventHubSettings, to_source_event};
use tokio::sync::{Mutex, mpsc, watch};

use super::{
    CheckpointError, CheckpointStore, Committed, Input, Origin, PartitionFailure, Partitions,
    SourceItem,
};

/// Where reading starts on a partition that has no checkpoint yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The oldest retained event.
    #[default]
    Earliest,
    /// Only events enqueued from now on.
    Latest,
}

/// What a hub's events are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Carries {
    /// Device events, to normalize (the device hub).
    #[default]
    DeviceEvents,
    /// Normalized measurements in MedTech's wire format, to group and convert (the internal
    /// hub).
    Measurements,
}

/// A received event as the pipeline's input. A body that is not a measurement is
/// dead-lettered like any unreadable record.
fn to_input(carries: Carries, partition_id: &str, event: &ReceivedEventData) -> Input {
    match carries {
        Carries::DeviceEvents => Input::Event(to_source_event(partition_id, event)),
        Carries::Measurements => {
            let body = event.event_data().body().unwrap_or_default();
            match wire::decode(body) {
                Ok(m) => Input::Measurement(Box::new(m)),
                Err(reason) => {
                    let sequence_number = event.sequence_number().unwrap_or(-1);
                    Input::Bad(BadRecord {
                        source: format!("partition {partition_id} #{sequence_number}"),
                        partition: partition_id.to_owned(),
                        sequence_number,
                        payload: body.to_vec(),
                        reason,
                    })
                }
            }
        }
    }
}

/// How the processor balances partitions.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    /// What the hub's events are.
    pub carries: Carries,
    /// Start of partitions without a checkpoint.
    pub start_at: StartAt,
    /// How often ownership is renewed and rebalanced.
    pub update_interval: Duration,
    /// How long an owner that stopped renewing keeps its partitions.
    pub ownership_expiry: Duration,
    /// Events read ahead per partition.
    pub prefetch: u32,
    /// Events handed to the pipeline at once.
    pub batch: usize,
    /// How long a partition's receiver may deliver nothing before the watchdog asks the hub
    /// whether it is behind. A stalled receiver is found after about twice this; each check of
    /// an idle partition costs one management call.
    pub stall_after: Duration,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            carries: Carries::DeviceEvents,
            start_at: StartAt::Earliest,
            update_interval: Duration::from_secs(10),
            ownership_expiry: Duration::from_secs(30),
            prefetch: 300,
            batch: 256,
            stall_after: Duration::from_secs(30),
        }
    }
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The hub could not be opened.
    #[error(transparent)]
    Open(#[from] iomt_eventhubs::OpenError),
    /// The processor could not be built.
    #[error("cannot start the event processor: {0}")]
    Processor(String),
}

/// Commits the pipeline's checkpoints to the SDK's checkpoint store (the blob store), in the
/// layout the processor reads back and KEDA reads for lag.
#[derive(Clone)]
pub struct EventHubsCheckpoints {
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    namespace: String,
    hub: String,
    consumer_group: String,
}

impl std::fmt::Debug for EventHubsCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHubsCheckpoints")
            .field("hub", &self.hub)
            .field("consumer_group", &self.consumer_group)
            .finish_non_exhaustive()
    }
}

impl EventHubsCheckpoints {
    /// Checkpoints of `settings`' hub and consumer group in `store`.
    pub fn new(
        store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
        settings: &EventHubSettings,
    ) -> Self {
        Self {
            store,
            namespace: settings.fully_qualified_namespace(),
            hub: settings.hub.clone(),
            consumer_group: settings.consumer_group.clone(),
        }
    }
}

impl CheckpointStore for EventHubsCheckpoints {
    async fn commit(&mut self, positions: &[Committed]) -> Result<(), CheckpointError> {
        let mut failed = Vec::new();
        for c in positions {
            let checkpoint = Checkpoint {
                fully_qualified_namespace: self.namespace.clone(),
                event_hub_name: self.hub.clone(),
                consumer_group: self.consumer_group.clone(),
                partition_id: c.partition.clone(),
                offset: None,
                sequence_number: Some(c.position),
            };
            if let Err(error) = self.store.update_checkpoint(checkpoint).await {
                failed.push(PartitionFailure {
                    partition: c.partition.clone(),
                    ownership_lost: iomt_eventhubs::blob::is_ownership_lost(&error),
                    error,
                });
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Remote(failed))
        }
    }
}

fn sdk_duration(d: Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::try_from(d).unwrap_or(azure_core::time::Duration::MAX)
}

/// An Event Hub's partitions as a source: those this process owns, claimed through the
/// checkpoint store. It never reaches an end: it reads until stopped.
pub struct EventHubsSource {
    /// The hub.
    pub settings: EventHubSettings,
    /// Partition balancing.
    pub processor: ProcessorSettings,
    /// Ownership and checkpoints.
    pub store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    /// The pipeline's partition table, to claim partitions in.
    pub partitions: Partitions,
}

impl std::fmt::Debug for EventHubsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHubsSource")
            .field("hub", &self.settings.hub)
            .finish_non_exhaustive()
    }
}

impl super::Source for EventHubsSource {
    type Error = SourceError;

    async fn run(
        self,
        tx: mpsc::Sender<Vec<SourceItem>>,
        stop: watch::Receiver<bool>,
    ) -> Result<bool, SourceError> {
        let reader = spawn_source(
            self.settings,
            self.processor,
            self.store,
            self.partitions,
            tx,
            stop,
        );
        match tokio::task::spawn_blocking(move || reader.join()).await {
            Ok(Ok(result)) => result.map(|()| false),
            _ => Err(SourceError::Processor(
                "the Event Hubs source panicked".into(),
            )),
        }
    }
}

/// Starts [`run_source`] on a thread of its own. The SDK's partition streams are not `Send`, so
/// the readers share one single-threaded runtime; reading is I/O-bound, and the pipeline's
/// stages keep the other threads.
fn spawn_source(
    settings: EventHubSettings,
    processor_settings: ProcessorSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    partitions: Partitions,
    input: mpsc::Sender<Vec<SourceItem>>,
    stop: watch::Receiver<bool>,
) -> std::thread::JoinHandle<Result<(), SourceError>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Processor(format!("cannot start a runtime: {e}")))?;
        let local = tokio::task::LocalSet::new();
        local.block_on(
            &runtime,
            run_source(settings, processor_settings, store, partitions, input, stop),
        )
    })
}

/// Reads the partitions this process owns into `input` until `stop` turns true. Must run
/// inside a [`tokio::task::LocalSet`] (see [`spawn_source`]).
async fn run_source(
    settings: EventHubSettings,
    processor_settings: ProcessorSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    partitions: Partitions,
    input: mpsc::Sender<Vec<SourceItem>>,
    stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    iomt_eventhubs::blob::warn_if_keda_cannot_read(&settings.consumer_group);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut first = true;
    let mut kept = HashMap::new();
    loop {
        let started = tokio::time::Instant::now();
        let outcome = run_processor(
            &settings,
            &processor_settings,
            store.clone(),
            &partitions,
            &input,
            stop.clone(),
            &mut kept,
        )
        .await;
        // A client that served a while before breaking is a new incident, not a repeat.
        if started.elapsed() > Duration::from_secs(300) {
            backoff.reset();
        }
        let retry_in = backoff.next_delay();
        match outcome {
            Ok(Outcome::Stopped) => return Ok(()),
            // At startup a hub that cannot be opened is a configuration error: say so.
            Err(e) if first => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, ?retry_in, "cannot reopen the Event Hub");
            }
            // A client whose receivers cannot attach again, or wedged, does not heal: start
            // over with a new connection. The same owner id keeps the partitions' ownership
            // records.
            Ok(Outcome::Broken) => tracing::warn!(
                ?retry_in,
                "partition receivers failing or stalled; rebuilding the Event Hubs client"
            ),
        }
        first = false;
        if *stop.borrow() {
            return Ok(());
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// How one processor's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The source was asked to stop.
    Stopped,
    /// A partition's receiver failed to attach again and again, or stalled.
    Broken,
}

/// Consecutive stream failures, without an event in between, after which a partition's
/// receiver is taken for broken.
const MAX_STREAM_FAILURES: u32 = 3;

/// A partition's slot in the pipeline, and the last position its reader handed over.
///
/// Rebuilding the client is not a loss of ownership: the slots of the partitions being read
/// are kept (`kept`, by partition id), and the rebuilt processor's reader of a partition
/// continues its slot, skipping what was handed over before. A new slot would start over from
/// the last committed checkpoint, feed the pipeline every event still in flight a second time,
/// and its acknowledgements would never commit the old slot's. A kept partition the rebuilt
/// processor does not claim again within `ownership_expiry` has gone to another process: its
/// slot is closed then.
#[derive(Debug, Clone)]
struct Reading {
    index: u32,
    /// Set only once a batch is in the pipeline's channel: a reader aborted with a batch not
    /// yet sent has not handed it over, and its successor reads it again.
    handed: Rc<Cell<Option<i64>>>,
}

async fn run_processor(
    settings: &EventHubSettings,
    processor_settings: &ProcessorSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    partitions: &Partitions,
    input: &mpsc::Sender<Vec<SourceItem>>,
    stop: watch::Receiver<bool>,
    kept: &mut HashMap<String, Reading>,
) -> Result<Outcome, SourceError> {
    let mut run =
        ProcessorRun::start(settings, processor_settings, store, partitions, input, stop).await?;
    let outcome = run.serve(kept).await;
    run.finish(outcome, kept).await;
    Ok(outcome)
}

/// One event processor, from building it to shutting it down, and the readers of the
/// partitions it hands out.
struct ProcessorRun<'a> {
    settings: &'a ProcessorSettings,
    processor: Arc<EventProcessor>,
    /// Restarts the processor's ownership loop when it fails.
    runner: tokio::task::JoinHandle<()>,
    /// Asks the hub for the owned partitions' newest events, for their lag; stopped by
    /// `lag_done`.
    lag: tokio::task::JoinHandle<()>,
    lag_done: watch::Sender<bool>,
    probe: Rc<HubProbe>,
    readers: tokio::task::JoinSet<()>,
    shared: Rc<ReaderShared>,
    /// Turns readable when a reader finds the client broken.
    broken: mpsc::UnboundedReceiver<()>,
    stop: watch::Receiver<bool>,
    /// The pipeline slots opened by this run.
    opened: Vec<u32>,
    /// Partition clients handed out so far, to number them (see [`hand_back`]).
    handed_out: u64,
}

/// What every reader of one processor run shares.
struct ReaderShared {
    partitions: Partitions,
    input: mpsc::Sender<Vec<SourceItem>>,
    broken: mpsc::UnboundedSender<()>,
    /// The partitions being read, by id: what is left in it when the client breaks is kept.
    live: RefCell<HashMap<String, Reading>>,
    /// The newest client handed out per partition, by number.
    newest: RefCell<HashMap<String, u64>>,
}

impl<'a> ProcessorRun<'a> {
    async fn start(
        settings: &EventHubSettings,
        processor_settings: &'a ProcessorSettings,
        store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
        partitions: &Partitions,
        input: &mpsc::Sender<Vec<SourceItem>>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, SourceError> {
        let consumer = settings.consumer().await?;
        let location = match processor_settings.start_at {
            StartAt::Earliest => StartLocation::Earliest,
            StartAt::Latest => StartLocation::Latest,
        };
        let processor = EventProcessor::builder()
            .with_start_positions(StartPositions {
                default: StartPosition {
                    location,
                    inclusive: false,
                },
                ..StartPositions::default()
            })
            .with_update_interval(sdk_duration(processor_settings.update_interval))
            .with_partition_expiration_duration(sdk_duration(processor_settings.ownership_expiry))
            .with_prefetch(processor_settings.prefetch)
            .build(consumer, store.clone())
            .await
            .map_err(|e| SourceError::Processor(e.to_string()))?;
        let probe = Rc::new(HubProbe {
            settings: settings.clone(),
            store,
            start_at: processor_settings.start_at,
            client: Mutex::new(None),
        });
        let (broken_tx, broken) = mpsc::unbounded_channel();
        let shared = Rc::new(ReaderShared {
            partitions: partitions.clone(),
            input: input.clone(),
            broken: broken_tx,
            live: RefCell::default(),
            newest: RefCell::default(),
        });
        let (lag_done, done) = watch::channel(false);
        Ok(Self {
            settings: processor_settings,
            runner: tokio::task::spawn_local(keep_running(processor.clone(), stop.clone())),
            lag: tokio::task::spawn_local(report_lag(
                probe.clone(),
                shared.clone(),
                processor_settings.update_interval,
                done,
            )),
            lag_done,
            processor,
            probe,
            readers: tokio::task::JoinSet::new(),
            shared,
            broken,
            stop,
            opened: Vec::new(),
            handed_out: 0,
        })
    }

    /// Reads every partition the processor hands out until the source stops or the client
    /// breaks. Kept partitions not claimed again by `ownership_expiry` are closed.
    async fn serve(&mut self, kept: &mut HashMap<String, Reading>) -> Outcome {
        let reclaim_by = tokio::time::Instant::now() + self.settings.ownership_expiry;
        let mut stop = self.stop.clone();
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let client = tokio::select! {
                client = self.processor.next_partition_client() => client,
                _ = stop.wait_for(|s| *s) => return Outcome::Stopped,
                _ = self.broken.recv() => return Outcome::Broken,
                () = tokio::time::sleep_until(reclaim_by), if !kept.is_empty() => {
                    for (_, reading) in kept.drain() {
                        self.shared.partitions.close(reading.index);
                    }
                    continue;
                }
            };
            match client {
                Ok(client) => {
                    backoff.reset();
                    self.claim(client, kept);
                }
                Err(e) => {
                    let retry_in = backoff.next_delay();
                    tracing::warn!(error = %e, ?retry_in, "no partition client; retrying");
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    /// Starts reading a partition handed out by the processor, in the slot it had if it is
    /// kept from a broken client.
    fn claim(
        &mut self,
        client: Arc<azure_messaging_eventhubs::processor::PartitionClient>,
        kept: &mut HashMap<String, Reading>,
    ) {
        let partition_id = client.get_partition_id().to_owned();
        let reading = kept.remove(&partition_id).unwrap_or_else(|| Reading {
            index: self.shared.partitions.open(&partition_id),
            handed: Rc::default(),
        });
        self.opened.push(reading.index);
        self.shared
            .live
            .borrow_mut()
            .insert(partition_id.clone(), reading.clone());
        tracing::info!(partition = %partition_id, "partition claimed");
        self.handed_out += 1;
        self.shared
            .newest
            .borrow_mut()
            .insert(partition_id, self.handed_out);
        let reader = PartitionReader {
            client,
            reading,
            number: self.handed_out,
            shared: self.shared.clone(),
            watchdog: Watchdog {
                probe: self.probe.clone(),
                stall_after: self.settings.stall_after,
                start: None,
            },
        };
        let (batch, carries) = (self.settings.batch.max(1), self.settings.carries);
        self.readers
            .spawn_local(reader.run(batch, carries, self.stop.clone()));
    }

    /// Stops the readers and the processor. After a broken client, the slots of the
    /// partitions being read are kept for the rebuilt one; the others opened here are closed.
    async fn finish(mut self, outcome: Outcome, kept: &mut HashMap<String, Reading>) {
        self.readers.abort_all();
        // Wait for the readers to go: they hold the probe, whose connection is closed below.
        while self.readers.join_next().await.is_some() {}
        self.runner.abort();
        // The probe below is closed only once the lag task, which holds it, is gone; it
        // ends after the question it is asking, if any (at most PROBE_TIMEOUT).
        self.lag_done.send_replace(true);
        let _ended = (&mut self.lag).await;
        match outcome {
            Outcome::Broken => {
                kept.extend(self.shared.live.take());
                for index in &self.opened {
                    if !kept.values().any(|r| r.index == *index) {
                        self.shared.partitions.close(*index);
                    }
                }
            }
            // The partitions read until now stay open: shutting the processor down does not
            // give up their ownership, so the pipeline's final checkpoint covers what it
            // drains. Kept partitions not claimed again may belong to another process by now.
            Outcome::Stopped => {
                for (_, reading) in kept.drain() {
                    self.shared.partitions.close(reading.index);
                }
            }
        }
        if let Err(e) = self.processor.shutdown().await {
            tracing::warn!(error = %e, "event processor shutdown failed");
        }
        // A dropped client leaves its connection open; closing one on a broken network may
        // hang.
        if let Some(client) = Rc::into_inner(self.probe).and_then(|p| p.client.into_inner()) {
            match tokio::time::timeout(PROBE_TIMEOUT, client.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "closing the watchdog's client failed"),
                Err(_) => tracing::debug!("closing the watchdog's client timed out"),
            }
        }
    }
}

/// Runs the processor's ownership loop, restarting it with a backoff when it fails (on a
/// checkpoint-store outage, say), until the source stops.
async fn keep_running(processor: Arc<EventProcessor>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let result = tokio::select! {
            result = processor.run() => result,
            _ = stop.wait_for(|s| *s) => return,
        };
        let retry_in = backoff.next_delay();
        if let Err(e) = result {
            tracing::warn!(error = %e, ?retry_in, "event processor stopped; restarting");
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// Asks the hub for the newest event of every partition being read, each `every` (the
/// processor's ownership update interval), for the partitions' lag metric, until `done` turns
/// true. It stops between questions, never during one: an SDK call abandoned halfway can leave
/// the probe's connection unusable, and a client dropped while taken out of the probe would
/// leave its connection open. A partition that does not answer keeps its last figure; the
/// watchdog reports the failure.
async fn report_lag(
    probe: Rc<HubProbe>,
    shared: Rc<ReaderShared>,
    every: Duration,
    mut done: watch::Receiver<bool>,
) {
    if !shared.partitions.reports_lag() {
        return;
    }
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|d| *d) => return,
        }
        let partitions: Vec<String> = shared.live.borrow().keys().cloned().collect();
        for partition in partitions {
            if *done.borrow() {
                return;
            }
            if let Ok(newest) = probe.newest(&partition).await {
                shared.partitions.newest(&partition, newest);
            }
        }
    }
}

/// The reader of one partition client handed out by the processor.
struct PartitionReader {
    client: Arc<azure_messaging_eventhubs::processor::PartitionClient>,
    reading: Reading,
    /// Which client of its partition this is, in the order they were handed out.
    number: u64,
    shared: Rc<ReaderShared>,
    watchdog: Watchdog,
}

impl PartitionReader {
    async fn run(self, batch: usize, carries: Carries, stop: watch::Receiver<bool>) {
        let Self {
            client,
            reading,
            number,
            shared,
            watchdog,
        } = self;
        let stopping = stop.clone();
        let failed = read_partition(
            &client,
            &reading,
            batch,
            carries,
            watchdog,
            &shared.input,
            stop,
        )
        .await;
        // Stopping is not losing the partition: its slot stays open, so the pipeline's final
        // checkpoint covers what it drains.
        if *stopping.borrow() {
            return;
        }
        let partition_id = client.get_partition_id().to_owned();
        // A failed reader's slot goes on with the rebuilt client.
        if !failed {
            shared.release(&partition_id, reading.index);
        }
        let is_newest = shared.newest.borrow().get(&partition_id) == Some(&number);
        if failed || (is_newest && !hand_back(client).await) {
            shared.broken.send(()).ok();
        }
    }
}

impl ReaderShared {
    /// Closes a partition's slot: the partition was lost, or its stream ended.
    fn release(&self, partition_id: &str, index: u32) {
        self.partitions.close(index);
        let mut live = self.live.borrow_mut();
        if live.get(partition_id).is_some_and(|r| r.index == index) {
            live.remove(partition_id);
        }
        tracing::info!(partition = %partition_id, "partition released");
    }
}

/// Hands a partition whose reading ended back to the processor, so that the processor opens it
/// again while this process owns it. Returns `false` when that failed and the client must be
/// rebuilt.
///
/// The processor opens a partition only when its table of partition clients has no entry for
/// it, and a client dropped without `close` leaves its entry there. Another process's receiver
/// can displace ours while the ownership stays ours (it claimed the partition in the same
/// round, lost the claim to us, and opened its receiver anyway): with the entry left there,
/// the processor would renew the ownership forever and nobody would read the partition. `close`
/// detaches the receiver and removes the entry. Only the newest client of a partition may be
/// closed: `close` detaches by partition address, and would detach its successor's receiver.
async fn hand_back(client: Arc<azure_messaging_eventhubs::processor::PartitionClient>) -> bool {
    // The processor holds the client only while revoking it, which removes the entry anyway.
    let Some(client) = Arc::into_inner(client) else {
        return true;
    };
    let partition_id = client.get_partition_id().to_owned();
    // Detaching goes over the network, which may be what ended the reading.
    match tokio::time::timeout(PROBE_TIMEOUT, client.close()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(partition = %partition_id, error = %e, "cannot hand the partition back to the event processor");
            false
        }
        Err(_) => {
            tracing::warn!(partition = %partition_id, "handing the partition back to the event processor timed out");
            false
        }
    }
}

/// Reads one owned partition until it is lost or the source stops. Other stream failures (a
/// dropped link) restart the stream after a backoff; when that keeps failing, returns `true`
/// so the client is rebuilt: giving the partition up alone would leave it owned and unread.
/// A receiver the watchdog finds stalled is treated the same way.
async fn read_partition(
    client: &azure_messaging_eventhubs::processor::PartitionClient,
    reading: &Reading,
    batch: usize,
    carries: Carries,
    mut watchdog: Watchdog,
    input: &mpsc::Sender<Vec<SourceItem>>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let partition_id = client.get_partition_id();
    let index = reading.index;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0;
    // A receiver that recovers from a dropped link re-reads from where it was opened, and one
    // opened by a rebuilt client from the last checkpoint, so events already handed over come
    // again; the pipeline needs each position once.
    let mut last: Option<i64> = reading.handed.get();
    loop {
        let mut events = client.stream_events();
        let mut pending: Vec<SourceItem> = Vec::with_capacity(batch);
        let failure = loop {
            // Hand over what is there as soon as the partition goes quiet.
            let next = if pending.is_empty() {
                match watchdog
                    .next(partition_id, &mut events, &mut stop, last)
                    .await
                {
                    Waited::Next(next) => next,
                    Waited::Stop => return false,
                    Waited::Stalled => return true,
                }
            } else {
                match tokio::time::timeout(Duration::from_millis(20), events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if !hand_over(input, std::mem::take(&mut pending), reading).await {
                            return false;
                        }
                        continue;
                    }
                }
            };
            match next {
                Some(Ok(event)) => {
                    backoff.reset();
                    failures = 0;
                    let position = event.sequence_number().unwrap_or(-1);
                    if last.is_some_and(|l| position <= l) {
                        continue;
                    }
                    last = Some(position);
                    pending.push(SourceItem {
                        origin: Origin {
                            partition: index,
                            position,
                        },
                        input: to_input(carries, partition_id, &event),
                    });
                    if pending.len() >= batch
                        && !hand_over(input, std::mem::take(&mut pending), reading).await
                    {
                        return false;
                    }
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        if !pending.is_empty() && !hand_over(input, pending, reading).await {
            return false;
        }
        let retry_in = backoff.next_delay();
        match failure {
            Some(e)
                if matches!(
                    e.kind,
                    azure_messaging_eventhubs::error::ErrorKind::ConsumerDisconnected(_)
                ) =>
            {
                tracing::info!(partition = %partition_id, "partition taken by another owner");
                return false;
            }
            Some(e) => {
                failures += 1;
                if failures >= MAX_STREAM_FAILURES {
                    tracing::warn!(partition = %partition_id, error = %e, "partition stream keeps failing");
                    return true;
                }
                tracing::warn!(partition = %partition_id, error = %e, ?retry_in, "partition stream failed; reading again");
            }
            None => {
                tracing::debug!(partition = %partition_id, "partition stream ended; reading again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Sends a batch to the pipeline and records it as handed over; `false` when the pipeline is
/// gone.
async fn hand_over(
    input: &mpsc::Sender<Vec<SourceItem>>,
    items: Vec<SourceItem>,
    reading: &Reading,
) -> bool {
    let position = items.last().map(|item| item.origin.position);
    if input.send(items).await.is_err() {
        return false;
    }
    if position.is_some() {
        reading.handed.set(position);
    }
    true
}

/// Bound on each call the watchdog makes (and on closing its client): the calls go over the
/// same network that may have wedged the receiver, and must not wedge the reader with it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the watchdog could not tell whether a receiver is behind.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no answer within {PROBE_TIMEOUT:?}")]
    TimedOut,
    #[error(transparent)]
    Open(#[from] iomt_eventhubs::OpenError),
    #[error("cannot read the partition's properties: {0}")]
    Hub(#[from] azure_messaging_eventhubs::EventHubsError),
    #[error("cannot list checkpoints: {0}")]
    Checkpoints(#[from] azure_core::Error),
}

/// The questions the watchdog and the lag metric ask the hub and the checkpoint store, shared
/// by one processor's readers.
struct HubProbe {
    settings: EventHubSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    start_at: StartAt,
    /// A client of its own, opened at the first question: the SDK does not hand out the
    /// processor's client. One call at a time: the processor's readers share it.
    client: Mutex<Option<ConsumerClient>>,
}

impl HubProbe {
    /// The sequence number of the partition's newest event; `None` when it holds none.
    async fn newest(&self, partition_id: &str) -> Result<Option<i64>, ProbeError> {
        let mut slot = self.client.lock().await;
        let client = match slot.take() {
            Some(client) => client,
            None => tokio::time::timeout(PROBE_TIMEOUT, self.settings.consumer())
                .await
                .map_err(|_| ProbeError::TimedOut)??,
        };
        let asked =
            tokio::time::timeout(PROBE_TIMEOUT, client.get_partition_properties(partition_id))
                .await;
        match asked {
            Ok(Ok(properties)) => {
                *slot = Some(client);
                Ok((!properties.is_empty).then_some(properties.last_enqueued_sequence_number))
            }
            // A call that failed or was cut short can leave the connection unusable (an SDK
            // request abandoned halfway, a recovery that never ends): the next check opens a
            // new one.
            Ok(Err(e)) => {
                discard(client);
                Err(e.into())
            }
            Err(_) => {
                discard(client);
                Err(ProbeError::TimedOut)
            }
        }
    }

    /// Where the processor opened the partition's receiver, from the checkpoint it read when
    /// it claimed the partition. Asked only before the reader has read anything, so this
    /// process has committed nothing for the partition since.
    async fn start(&self, partition_id: &str) -> Result<Start, ProbeError> {
        let namespace = self.settings.fully_qualified_namespace();
        let ask = self.store.list_checkpoints(
            &namespace,
            &self.settings.hub,
            &self.settings.consumer_group,
        );
        let checkpoints = tokio::time::timeout(PROBE_TIMEOUT, ask)
            .await
            .map_err(|_| ProbeError::TimedOut)??;
        Ok(
            match checkpoints.iter().find(|c| c.partition_id == partition_id) {
                // A checkpoint with only an offset (another tool's) names no sequence number.
                Some(c) => c.sequence_number.map_or(Start::Unknown, Start::After),
                None => match self.start_at {
                    StartAt::Earliest => Start::Oldest,
                    StartAt::Latest => Start::Unknown,
                },
            },
        )
    }
}

/// Closes a client in the background: a dropped one would leave its connection open, and
/// closing may hang on the network that broke it.
fn discard(client: ConsumerClient) {
    tokio::task::spawn_local(async move {
        if tokio::time::timeout(PROBE_TIMEOUT, client.close())
            .await
            .is_err()
        {
            tracing::debug!("closing the watchdog's client timed out");
        }
    });
}

/// Where a partition's receiver started reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// After a checkpoint.
    After(i64),
    /// At the oldest retained event (no checkpoint, `StartAt::Earliest`).
    Oldest,
    /// Unknown: at the end of the partition as it was when the receiver opened
    /// (`StartAt::Latest`), or at a checkpoint without a sequence number.
    Unknown,
}

impl Start {
    /// What a reader that has read nothing since this start has consumed, given the hub's
    /// newest event. An unknown start is taken to be that newest event, and remembered: the
    /// conservative reading, which can only miss events that were already there (a stall is
    /// then found once newer ones arrive), never rebuild a client for an idle partition.
    fn consumed(&mut self, newest: Option<i64>) -> Consumed {
        match *self {
            Start::After(seq) => Consumed::UpTo(seq),
            Start::Oldest => Consumed::Nothing,
            Start::Unknown => {
                let seq = newest.unwrap_or(-1);
                *self = Start::After(seq);
                Consumed::UpTo(seq)
            }
        }
    }
}

/// How far a reader is known to have consumed its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumed {
    /// Every event up to this sequence number.
    UpTo(i64),
    /// Nothing: every retained event is still to be read.
    Nothing,
}

/// What a check of a quiet partition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The hub has nothing the reader has not read: a quiet partition.
    Idle,
    /// The hub has newer events; one may have been enqueued a moment ago, so the receiver
    /// gets until the next check.
    Behind,
    /// Behind at two checks in a row with nothing received in between: the receiver delivers
    /// nothing although the hub has events for it.
    Stalled,
}

/// Judges a partition whose receiver delivered nothing for a while, from what the reader has
/// consumed, the hub's newest event (`None`: the partition is empty) and whether the previous
/// check, with nothing received since, found it behind.
fn judge(consumed: Consumed, newest: Option<i64>, behind_before: bool) -> Verdict {
    let behind = match (consumed, newest) {
        (_, None) => false,
        (Consumed::Nothing, Some(_)) => true,
        (Consumed::UpTo(seq), Some(newest)) => newest > seq,
    };
    match (behind, behind_before) {
        (false, _) => Verdict::Idle,
        (true, false) => Verdict::Behind,
        (true, true) => Verdict::Stalled,
    }
}

/// How waiting for a partition's next event ended.
enum Waited<T> {
    /// The stream yielded (or ended).
    Next(Option<T>),
    /// The source is stopping.
    Stop,
    /// The watchdog found the receiver stalled.
    Stalled,
}

/// The receive watchdog of one partition reader.
struct Watchdog {
    probe: Rc<HubProbe>,
    stall_after: Duration,
    /// Where the receiver started, once asked (only while nothing has been read).
    start: Option<Start>,
}

impl Watchdog {
    /// Waits for the stream's next item, checking on the hub each time it has been quiet for
    /// `stall_after`. The quiet time counts only this wait, so a pipeline that holds the reader
    /// back (a full input channel) never looks like a stalled receiver. `last` is the last
    /// sequence number read.
    async fn next<S: futures::Stream + Unpin>(
        &mut self,
        partition_id: &str,
        events: &mut S,
        stop: &mut watch::Receiver<bool>,
        last: Option<i64>,
    ) -> Waited<S::Item> {
        let mut behind = false;
        loop {
            tokio::select! {
                next = events.next() => return Waited::Next(next),
                _ = stop.wait_for(|s| *s) => return Waited::Stop,
                () = tokio::time::sleep(self.stall_after) => {}
            }
            // The check runs to its end (each call is bounded): the SDK's calls are not safe to
            // abandon halfway. An event that came meanwhile outranks its verdict.
            let verdict = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Waited::Stop,
                verdict = self.check(partition_id, last, behind) => verdict,
            };
            if let Some(next) = events.next().now_or_never() {
                return Waited::Next(next);
            }
            let Some((verdict, consumed, newest)) = verdict else {
                // Cannot tell: judge again at the next check.
                continue;
            };
            match verdict {
                Verdict::Idle => behind = false,
                Verdict::Behind => {
                    tracing::debug!(
                        partition = %partition_id, ?consumed, ?newest,
                        "partition quiet although the hub has newer events"
                    );
                    behind = true;
                }
                Verdict::Stalled => {
                    tracing::warn!(
                        partition = %partition_id, ?consumed, ?newest,
                        "partition receiver delivers nothing although the hub has newer events"
                    );
                    return Waited::Stalled;
                }
            }
        }
    }

    /// Asks the hub and judges, with what the reader has consumed and the hub's newest event;
    /// `None` when the hub or the checkpoint store did not answer.
    async fn check(
        &mut self,
        partition_id: &str,
        last: Option<i64>,
        behind: bool,
    ) -> Option<(Verdict, Consumed, Option<i64>)> {
        let failed = |e: ProbeError| {
            tracing::warn!(partition = %partition_id, error = %e, "receive watchdog cannot check the partition");
            None
        };
        if last.is_none() && self.start.is_none() {
            match self.probe.start(partition_id).await {
                Ok(start) => self.start = Some(start),
                Err(e) => return failed(e),
            }
        }
        let newest = match self.probe.newest(partition_id).await {
            Ok(newest) => newest,
            Err(e) => return failed(e),
        };
        let consumed = match (last, self.start.as_mut()) {
            (Some(seq), _) => Consumed::UpTo(seq),
            (None, Some(start)) => start.consumed(newest),
            (None, None) => return None,
        };
        Some((judge(consumed, newest, behind), consumed, newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_partition_with_nothing_unread_is_idle_at_every_check() {
        for behind_before in [false, true] {
            assert_eq!(
                judge(Consumed::UpTo(41), Some(41), behind_before),
                Verdict::Idle
            );
            assert_eq!(
                judge(Consumed::UpTo(41), None, behind_before),
                Verdict::Idle
            );
            assert_eq!(judge(Consumed::Nothing, None, behind_before), Verdict::Idle);
        }
        // A hub that went back (recreated) holds nothing this reader has not seen.
        assert_eq!(judge(Consumed::UpTo(41), Some(7), true), Verdict::Idle);
    }

    #[test]
    fn a_receiver_behind_the_hub_is_stalled_only_at_the_second_check() {
        assert_eq!(judge(Consumed::UpTo(41), Some(42), false), Verdict::Behind);
        assert_eq!(judge(Consumed::UpTo(41), Some(42), true), Verdict::Stalled);
        assert_eq!(judge(Consumed::Nothing, Some(0), false), Verdict::Behind);
        assert_eq!(judge(Consumed::Nothing, Some(0), true), Verdict::Stalled);
    }

    #[test]
    fn a_reader_that_read_nothing_is_judged_from_where_its_receiver_started() {
        // After a checkpoint: events past it are unread.
        let mut start = Start::After(41);
        assert_eq!(start.consumed(Some(41)), Consumed::UpTo(41));
        assert_eq!(
            judge(start.consumed(Some(45)), Some(45), false),
            Verdict::Behind
        );
        // From the oldest event: anything retained is unread.
        assert_eq!(Start::Oldest.consumed(Some(3)), Consumed::Nothing);
        assert_eq!(Start::Oldest.consumed(None), Consumed::Nothing);
    }

    #[test]
    fn an_unknown_start_is_taken_as_the_hub_end_at_the_first_check_and_kept() {
        let mut start = Start::Unknown;
        let consumed = start.consumed(Some(50));
        assert_eq!(consumed, Consumed::UpTo(50));
        assert_eq!(judge(consumed, Some(50), false), Verdict::Idle);
        assert_eq!(start, Start::After(50));
        // Events enqueued after that first check are owed by the receiver.
        assert_eq!(
            judge(start.consumed(Some(51)), Some(51), false),
            Verdict::Behind
        );
        assert_eq!(
            judge(start.consumed(Some(51)), Some(51), true),
            Verdict::Stalled
        );

        // On an empty partition, its first event is owed.
        let mut start = Start::Unknown;
        assert_eq!(judge(start.consumed(None), None, false), Verdict::Idle);
        assert_eq!(
            judge(start.consumed(Some(0)), Some(0), false),
            Verdict::Behind
        );
    }
}
