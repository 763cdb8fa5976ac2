//! The group stage's tasks: one per internal hub partition, buffering measurements by device,
//! type and window, and writing flushed groups with bounded concurrency, one at a time per
//! device and type.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iomt_core::{Backoff, Timestamp};
use iomt_files::deadletter::Stage;
use iomt_group::{Flush, FlushReason, Grouper};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::deadletters::{DeadLetters, measurement_dead_letter};
use super::{Shared, Tag, join_all, millis_between};
use crate::hub::HubConsumer;
use crate::sink::{Sink, SinkError};

fn reason_name(reason: FlushReason) -> &'static str {
    match reason {
        FlushReason::MaxEvents => "MaxEvents",
        FlushReason::MaxWait => "MaxWait",
        FlushReason::Shutdown => "Shutdown",
        FlushReason::MemoryLimit => "MemoryLimit",
    }
}

pub(super) async fn group_task<S: Sink, C: HubConsumer>(
    mut consumer: C,
    dead_letters: mpsc::Sender<DeadLetters>,
    shared: Arc<Shared<S>>,
) {
    let templates = shared.templates.clone();
    let mut grouper: Grouper<_, Tag> = Grouper::new(shared.config.group, move |t: &str| {
        templates.with(|now| now.mapping.lookup(t).map(|f| f.period_interval()))
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
                // One clock reading per batch: buffer ages are kept in milliseconds.
                let now = now_ms();
                for m in batch {
                    let tag = Tag { origin: m.origin, read_at: m.read_at };
                    if let Some(flush) = grouper.push(m.measurement, tag, now) {
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
        measurements = flush.positions.len() as i64,
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

/// Appends the events of a group's writes to the outbox, retrying until it takes them: the
/// group is acknowledged only after, so a crash before then re-runs the writes.
async fn append_events<S: Sink>(shared: &Shared<S>, written: &[iomt_core::Written]) {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), shared.config.retry_cap);
    let mut failed = false;
    while let Err(e) = shared.outbox.append(written).await {
        failed = true;
        let wait = backoff.next_delay();
        shared
            .metrics
            .outbox_lag(started.elapsed().as_millis() as i64);
        tracing::error!(error = %e, retry_in = ?wait, "cannot append to the event log; the checkpoint waits");
        tokio::time::sleep(wait).await;
    }
    if failed {
        shared.metrics.outbox_lag(0);
    }
}

async fn write_flush<S: Sink>(
    shared: &Shared<S>,
    flush: Flush<Tag>,
    dead_letters: &mpsc::Sender<DeadLetters>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), shared.config.retry_cap);
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
                append_events(shared, &written).await;
                shared.acks.ack(flush.positions.iter().map(|t| t.origin));
                return;
            }
            Err(SinkError::Unavailable { kind, message }) => {
                shared.metrics.error(kind, "FHIRConversion");
                shared.metrics.retry();
                let wait = backoff.next_delay();
                tracing::warn!(kind, retry_in = ?wait, "FHIR output unavailable; retrying the group");
                tracing::debug!(%message, "FHIR output failure");
                tokio::time::sleep(wait).await;
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
