//! Reading the device Event Hub: partitions are claimed through the SDK's event processor
//! (ownership balanced across processes through the checkpoint store), each owned partition is
//! read into the pipeline, and checkpoints go back to the same store.
//!
//! A partition lost to another process (its stream ends with `ConsumerDisconnected`) is closed
//! in the pipeline's partition table: what is in flight for it still gets written (the writes
//! are idempotent), but its checkpoints are no longer committed here, and the fenced blob store
//! would refuse them anyway. The processor's run loop exits on any dispatch error (a
//! checkpoint-store outage, say), so it is restarted with a backoff.

use std::sync::Arc;
use std::time::Duration;

use azure_messaging_eventhubs::models::{Checkpoint, StartPositions};
use azure_messaging_eventhubs::{EventProcessor, StartLocation, StartPosition};
use futures::StreamExt as _;
use iomt_hub::eventhubs::{EventHubSettings, to_captured};
use tokio::sync::{mpsc, watch};

use crate::Origin;
use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::pipeline::{Committed, Input, Partitions, SourceItem};

/// Where reading starts on a partition that has no checkpoint yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// The oldest retained event.
    #[default]
    Earliest,
    /// Only events enqueued from now on.
    Latest,
}

/// How the processor balances partitions.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
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
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            start_at: StartAt::Earliest,
            update_interval: Duration::from_secs(10),
            ownership_expiry: Duration::from_secs(30),
            prefetch: 300,
            batch: 256,
        }
    }
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The hub could not be opened.
    #[error(transparent)]
    Open(#[from] iomt_hub::eventhubs::OpenError),
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
            if let Err(e) = self.store.update_checkpoint(checkpoint).await {
                failed.push(format!("partition {}: {e}", c.partition));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Remote(failed.join("; ")))
        }
    }
}

fn sdk_duration(d: Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::try_from(d).unwrap_or(azure_core::time::Duration::MAX)
}

/// Starts [`run_source`] on a thread of its own. The SDK's partition streams are not `Send`, so
/// the readers share one single-threaded runtime; reading is I/O-bound, and the pipeline's
/// stages keep the other threads.
pub fn spawn_source(
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
pub async fn run_source(
    settings: EventHubSettings,
    processor_settings: ProcessorSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    partitions: Partitions,
    input: mpsc::Sender<Vec<SourceItem>>,
    stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    iomt_hub::blob::warn_if_keda_cannot_read(&settings.consumer_group);
    let mut backoff = Duration::from_secs(1);
    let mut first = true;
    loop {
        let outcome = run_processor(
            &settings,
            &processor_settings,
            store.clone(),
            &partitions,
            &input,
            stop.clone(),
        )
        .await;
        match outcome {
            Ok(Outcome::Stopped) => return Ok(()),
            // At startup a hub that cannot be opened is a configuration error: say so.
            Err(e) if first => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reopen the Event Hub");
            }
            // A client whose receivers cannot attach again does not heal: start over with a
            // new connection. The same owner id keeps the partitions' ownership records.
            Ok(Outcome::Broken) => tracing::warn!(
                retry_in = ?backoff,
                "partition receivers cannot reconnect; rebuilding the Event Hubs client"
            ),
        }
        first = false;
        if *stop.borrow() {
            return Ok(());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// How one processor's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The source was asked to stop.
    Stopped,
    /// A partition's receiver failed to attach again and again.
    Broken,
}

/// Consecutive stream failures, without an event in between, after which a partition's
/// receiver is taken for broken.
const MAX_STREAM_FAILURES: u32 = 3;

async fn run_processor(
    settings: &EventHubSettings,
    processor_settings: &ProcessorSettings,
    store: Arc<dyn azure_messaging_eventhubs::CheckpointStore + Send + Sync>,
    partitions: &Partitions,
    input: &mpsc::Sender<Vec<SourceItem>>,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, SourceError> {
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
        .build(consumer, store)
        .await
        .map_err(|e| SourceError::Processor(e.to_string()))?;
    let runner = {
        let processor = processor.clone();
        let mut stop = stop.clone();
        tokio::task::spawn_local(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                tokio::select! {
                    result = processor.run() => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, retry_in = ?backoff, "event processor stopped; restarting");
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        })
    };
    let mut readers = tokio::task::JoinSet::new();
    let (broken_tx, mut broken_rx) = mpsc::unbounded_channel::<()>();
    let mut opened = Vec::new();
    let outcome = loop {
        let client = tokio::select! {
            client = processor.next_partition_client() => client,
            _ = stop.wait_for(|s| *s) => break Outcome::Stopped,
            _ = broken_rx.recv() => break Outcome::Broken,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no partition client; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let partition_id = client.get_partition_id().to_owned();
        let index = partitions.open(&partition_id);
        opened.push(index);
        tracing::info!(partition = %partition_id, "partition claimed");
        let (input, partitions, stop) = (input.clone(), partitions.clone(), stop.clone());
        let broken = broken_tx.clone();
        let batch = processor_settings.batch.max(1);
        readers.spawn_local(async move {
            if read_partition(&client, &partition_id, index, batch, &input, stop).await {
                broken.send(()).ok();
            }
            partitions.close(index);
            tracing::info!(partition = %partition_id, "partition released");
        });
    };
    readers.abort_all();
    runner.abort();
    for index in opened {
        partitions.close(index);
    }
    if let Err(e) = processor.shutdown().await {
        tracing::warn!(error = %e, "event processor shutdown failed");
    }
    Ok(outcome)
}

/// Reads one owned partition until it is lost or the source stops. Other stream failures (a
/// dropped link) restart the stream after a backoff; when that keeps failing, returns `true`
/// so the client is rebuilt: giving the partition up alone would leave it owned and unread.
async fn read_partition(
    client: &azure_messaging_eventhubs::processor::PartitionClient,
    partition_id: &str,
    index: u32,
    batch: usize,
    input: &mpsc::Sender<Vec<SourceItem>>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(500);
    let mut failures = 0;
    // A receiver that recovers from a dropped link re-reads from where it was opened, so
    // events already handed over come again; the pipeline needs each position once.
    let mut last: Option<i64> = None;
    loop {
        let mut events = client.stream_events();
        let mut pending: Vec<SourceItem> = Vec::with_capacity(batch);
        let failure = loop {
            // Hand over what is there as soon as the partition goes quiet.
            let next = if pending.is_empty() {
                tokio::select! {
                    next = events.next() => next,
                    _ = stop.wait_for(|s| *s) => return false,
                }
            } else {
                match tokio::time::timeout(Duration::from_millis(20), events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        if input.send(std::mem::take(&mut pending)).await.is_err() {
                            return false;
                        }
                        continue;
                    }
                }
            };
            match next {
                Some(Ok(event)) => {
                    backoff = Duration::from_millis(500);
                    failures = 0;
                    let captured = to_captured(partition_id, &event);
                    if last.is_some_and(|l| captured.sequence_number <= l) {
                        continue;
                    }
                    last = Some(captured.sequence_number);
                    pending.push(SourceItem {
                        origin: Origin {
                            partition: index,
                            position: captured.sequence_number,
                        },
                        input: Input::Event(captured),
                    });
                    if pending.len() >= batch
                        && input.send(std::mem::take(&mut pending)).await.is_err()
                    {
                        return false;
                    }
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        if !pending.is_empty() && input.send(pending).await.is_err() {
            return false;
        }
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
                tracing::warn!(partition = %partition_id, error = %e, retry_in = ?backoff, "partition stream failed; reading again");
            }
            None => {
                tracing::debug!(partition = %partition_id, "partition stream ended; reading again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
