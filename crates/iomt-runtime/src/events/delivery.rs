//! One subscription's delivery: it reads the event log from its own checkpoint, filters,
//! renders and sends, retries on Event Grid's schedule, dead-letters what cannot be delivered,
//! and moves its checkpoint past an event only once the event is delivered or its dead letter
//! is durable. A dead endpoint stalls its own subscription only.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use iomt_core::Written;
use iomt_core::{Backoff, Timestamp};
use iomt_events::deadletter::{Undelivered, record};
use iomt_events::{ChangeEvent, ChangeKind, Filter, Format, Publisher, RetryPolicy, Verdict};
use iomt_store::{Change, ChangeReader, StoreError};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::destination::{Destination, Outgoing};
use crate::source::{Input, Origin, Partitions};
use crate::{Metrics, SourceItem};

/// Time as the delivery loop sees it. Retry waits are hours long; tests replace the clock to
/// check the schedule without waiting.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
    /// Completes at `at`.
    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Tokio's clock.
#[derive(Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep_until(at))
    }
}

/// A change log, read on blocking threads.
#[derive(Debug, Clone)]
pub(crate) struct Log {
    reader: Arc<Mutex<ChangeReader>>,
}

impl Log {
    pub(crate) fn new(reader: ChangeReader) -> Self {
        Self {
            reader: Arc::new(Mutex::new(reader)),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ChangeReader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            f(&reader.lock().unwrap_or_else(PoisonError::into_inner))
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    }

    async fn read(&self, after: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        self.call(move |r| r.changes(after, limit)).await
    }

    async fn last(&self) -> Result<i64, StoreError> {
        self.call(ChangeReader::last).await
    }
}

/// Where full-resource payloads are read.
#[derive(Debug, Clone)]
pub(crate) enum Resources {
    /// The embedded store's history.
    Store(Log),
    /// The FHIR server (`vread`).
    Fhir(iomt_fhir::FhirClient),
}

impl Resources {
    async fn version(&self, event: &ChangeEvent) -> Option<Value> {
        let (t, id, v) = (
            event.resource_type.clone(),
            event.resource_id.clone(),
            event.version_id.clone(),
        );
        match self {
            Resources::Store(log) => log
                .call(move |r| r.version(&t, &id, &v))
                .await
                .ok()
                .flatten()
                .and_then(|text| serde_json::from_str(&text).ok()),
            Resources::Fhir(client) => client.vread(&t, &id, &v).await.ok().flatten(),
        }
    }
}

/// What a subscription keeps between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    /// Every event at or before this log position is delivered or dead-lettered.
    position: i64,
    /// Why the subscription stopped (the endpoint answered 410 Gone); it is not resumed
    /// until this is cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled: Option<String>,
}

fn read_state(path: &Path) -> State {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_state(path: &Path, state: &State) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(state).unwrap_or_default())?;
    file.sync_data()?;
    std::fs::rename(tmp, path)
}

/// How often a subscription's checkpoint file is written while it delivers.
const STATE_EVERY: Duration = Duration::from_secs(1);

/// A subscription ready to run.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) name: String,
    pub(crate) format: Format,
    pub(crate) filter: Filter,
    pub(crate) retry: RetryPolicy,
    pub(crate) max_in_flight: usize,
    pub(crate) destination: Destination,
    pub(crate) dead_letters: EventDeadLetters,
    pub(crate) state_file: PathBuf,
}

/// What every subscription shares.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) resources: Option<Resources>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) poll_interval: Duration,
    pub(crate) drain_deadline: Duration,
}

/// Where a subscription reads its events.
#[derive(Debug)]
pub(crate) enum Feed {
    /// A change log read by position from the subscription's checkpoint file: the embedded
    /// store's, or the local event log.
    Log {
        log: Log,
        /// Bumped by the outbox after each append.
        wake: watch::Receiver<u64>,
    },
    /// Event log records from the partitions of an Event Hub or a Kafka topic this process
    /// owns for the subscription; each is acknowledged once finished, and the partitions'
    /// checkpoints follow (in the subscription's consumer group).
    Stream {
        items: mpsc::Receiver<Vec<SourceItem>>,
        buffered: VecDeque<SourceItem>,
        partitions: Partitions,
        closed: bool,
    },
}

/// An event log entry: its position, where a hub record came from, and the write.
type Entry = (i64, Option<Origin>, Option<Written>);

impl Feed {
    /// Up to `room` entries after `after`; and whether that was all there is for now.
    async fn read(&mut self, after: i64, room: usize) -> Result<(Vec<Entry>, bool), StoreError> {
        match self {
            Feed::Log { log, .. } => {
                let changes = log.read(after, room).await?;
                let end = changes.len() < room;
                Ok((
                    changes
                        .into_iter()
                        .map(|c| (c.seq, None, Some(c.written)))
                        .collect(),
                    end,
                ))
            }
            Feed::Stream {
                items,
                buffered,
                partitions,
                closed,
            } => {
                while buffered.len() < room && !*closed {
                    match items.try_recv() {
                        Ok(batch) => buffered.extend(batch),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => *closed = true,
                    }
                }
                let n = room.min(buffered.len());
                let taken: Vec<(Origin, u32)> =
                    buffered.iter().take(n).map(|i| (i.origin, 1)).collect();
                partitions.0.register(&taken);
                let entries = buffered
                    .drain(..n)
                    .map(|item| {
                        let written = match &item.input {
                            Input::Event(e) => super::remote_log::read_record(&e.event.body),
                            _ => None,
                        };
                        (item.origin.position, Some(item.origin), written)
                    })
                    .collect();
                Ok((entries, buffered.is_empty()))
            }
        }
    }

    /// Marks an entry finished (delivered, dead-lettered or not for this subscription).
    fn finished(&self, slot: &Slot) {
        if let (Feed::Stream { partitions, .. }, Some(origin)) = (self, slot.origin) {
            partitions.0.ack([origin]);
        }
    }

    /// Completes when there may be more to read.
    async fn more(&mut self) {
        match self {
            Feed::Log { wake, .. } => {
                wake.changed().await.ok();
            }
            Feed::Stream {
                items,
                buffered,
                closed,
                ..
            } => {
                if !buffered.is_empty() {
                    return;
                }
                if *closed {
                    return std::future::pending().await;
                }
                match items.recv().await {
                    Some(batch) => buffered.extend(batch),
                    None => *closed = true,
                }
            }
        }
    }
}

/// An event waiting for delivery.
#[derive(Debug)]
struct Pending {
    event: ChangeEvent,
    attempts: u32,
    due: Instant,
    first_attempt: Option<(Instant, Timestamp)>,
}

/// A position in the window: finished, or still to deliver.
#[derive(Debug)]
struct Slot {
    seq: i64,
    origin: Option<Origin>,
    pending: Option<Pending>,
}

/// How a subscription's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    /// The subscription.
    pub(crate) name: String,
    /// Its checkpoint.
    pub(crate) position: i64,
    /// Events read but not yet finished (retries waiting) when it stopped.
    pub(crate) unfinished: usize,
    /// Why it is disabled, when it is.
    pub(crate) disabled: Option<String>,
}

impl Subscription {
    /// Delivers until `stop` turns true, then drains what the log holds within the drain
    /// deadline.
    pub(crate) async fn run(
        self,
        cx: Context,
        mut feed: Feed,
        mut stop: watch::Receiver<bool>,
    ) -> Ended {
        let mut state = read_state(&self.state_file);
        let ended = |state: &State, unfinished| Ended {
            name: self.name.clone(),
            position: state.position,
            unfinished,
            disabled: state.disabled.clone(),
        };
        if let Some(reason) = &state.disabled {
            tracing::warn!(subscription = %self.name, %reason, "subscription disabled; not delivering");
            return ended(&state, 0);
        }
        // The log may have been replaced (a new store); its positions start over.
        if let Feed::Log { log, .. } = &feed
            && log.last().await.is_ok_and(|last| last < state.position)
        {
            tracing::warn!(subscription = %self.name, "the event log is behind the subscription's checkpoint: starting from its beginning");
            state.position = 0;
        }
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        while let Err(e) = self.destination.handshake(&cx.publisher.source).await {
            let wait = backoff.next_delay();
            tracing::warn!(subscription = %self.name, error = %e, retry_in = ?wait, "subscription handshake failed");
            tokio::select! {
                () = cx.clock.sleep_until(cx.clock.now() + wait) => {}
                _ = stop.wait_for(|s| *s) => return ended(&state, 0),
            }
        }
        let mut window: VecDeque<Slot> = VecDeque::new();
        let mut read_to = state.position;
        let mut drain_by: Option<Instant> = None;
        // The checkpoint file is written at most once per STATE_EVERY (and when the run
        // ends), not after every batch: a crash redelivers at most that much, under the same
        // event ids.
        let mut saved = (state.position, cx.clock.now());
        let save = |state: &State, saved: &mut (i64, Instant), force: bool| {
            let now = cx.clock.now();
            if state.position == saved.0 || (!force && now < saved.1 + STATE_EVERY) {
                return;
            }
            match write_state(&self.state_file, state) {
                Ok(()) => *saved = (state.position, now),
                Err(e) => {
                    tracing::error!(subscription = %self.name, error = %e, "cannot write the subscription checkpoint");
                }
            }
        };
        loop {
            if *stop.borrow() && drain_by.is_none() {
                drain_by = Some(cx.clock.now() + cx.drain_deadline);
            }
            // Fill the window from the log.
            let room = self.max_in_flight.max(1).saturating_sub(window.len());
            let mut log_end = false;
            // An append after this read wakes the wait below.
            if let Feed::Log { wake, .. } = &mut feed {
                wake.borrow_and_update();
            }
            if room > 0 {
                match feed.read(read_to, room).await {
                    Ok((entries, end)) => {
                        log_end = end;
                        for (seq, origin, written) in entries {
                            read_to = seq;
                            window.push_back(self.admit(&cx, seq, origin, written));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(subscription = %self.name, error = %e, "cannot read the event log");
                    }
                }
            }
            // Deliver what is due.
            let now = cx.clock.now();
            let due: Vec<usize> = window
                .iter()
                .enumerate()
                .filter(|(_, s)| s.pending.as_ref().is_some_and(|p| p.due <= now))
                .map(|(i, _)| i)
                .collect();
            if !due.is_empty() && self.deliver(&cx, &mut window, &due, &mut state).await {
                write_state(&self.state_file, &state).ok();
                return ended(&state, window.len());
            }
            // Move the checkpoint past what is finished.
            let before = state.position;
            while window.front().is_some_and(|s| s.pending.is_none()) {
                if let Some(slot) = window.pop_front() {
                    feed.finished(&slot);
                    state.position = slot.seq;
                }
            }
            if let Feed::Log { log, .. } = &feed {
                if state.position != before {
                    save(&state, &mut saved, false);
                }
                // At the log's end, what was read is all there is.
                let last = match log_end {
                    true => Ok(read_to),
                    false => log.last().await,
                };
                if let Ok(last) = last {
                    cx.metrics
                        .event_backlog(&self.name, (last - state.position).max(0));
                }
            }
            let unfinished = window.len();
            if let Some(deadline) = drain_by
                && ((window.is_empty() && log_end) || cx.clock.now() >= deadline)
            {
                if let Feed::Log { .. } = &feed {
                    save(&state, &mut saved, true);
                }
                return ended(&state, unfinished);
            }
            // More to read or send now: go on at once.
            let next_due = window
                .iter()
                .filter_map(|s| s.pending.as_ref().map(|p| p.due))
                .min();
            let now = cx.clock.now();
            if next_due.is_some_and(|d| d <= now) || (!log_end && room > 0) {
                continue;
            }
            let mut wake_at = now + cx.poll_interval;
            if let Some(due) = next_due {
                wake_at = wake_at.min(due);
            }
            if let Some(deadline) = drain_by {
                wake_at = wake_at.min(deadline);
            }
            tokio::select! {
                () = feed.more() => {}
                () = cx.clock.sleep_until(wake_at) => {}
                _ = stop.wait_for(|s| *s), if drain_by.is_none() => {}
            }
        }
    }

    /// A log entry as a slot: to deliver when the filter matches it.
    fn admit(
        &self,
        cx: &Context,
        seq: i64,
        origin: Option<Origin>,
        written: Option<Written>,
    ) -> Slot {
        let finished = Slot {
            seq,
            origin,
            pending: None,
        };
        let Some(written) = written else {
            // Not an event log record: nothing can be delivered for it.
            cx.metrics.event_dropped(&self.name, "UnreadableLogRecord");
            return finished;
        };
        let Some(mut event) = ChangeKind::of(written.action)
            .map(|k| ChangeEvent::of_version(&cx.publisher.source, &written, k))
        else {
            return finished;
        };
        event.sequence = u64::try_from(seq).ok();
        if !self.filter.matches(&event, &cx.publisher) {
            return finished;
        }
        cx.metrics.event_matched(&self.name);
        Slot {
            seq,
            origin,
            pending: Some(Pending {
                event,
                attempts: 0,
                due: cx.clock.now(),
                first_attempt: None,
            }),
        }
    }

    /// Sends the due slots and applies the verdicts. Returns `true` when the subscription
    /// must stop (its endpoint is gone).
    async fn deliver(
        &self,
        cx: &Context,
        window: &mut VecDeque<Slot>,
        due: &[usize],
        state: &mut State,
    ) -> bool {
        let mut batch = Vec::with_capacity(due.len());
        for &i in due {
            let Some(p) = window[i].pending.as_ref() else {
                continue;
            };
            let resource = match (&cx.resources, self.format.needs_resource()) {
                (Some(r), true) => r.version(&p.event).await,
                _ => None,
            };
            batch.push(Outgoing {
                id: p.event.id.to_string(),
                key: p.event.partition_key(),
                version: p.event.version_id.clone(),
                rendered: iomt_events::render(
                    &p.event,
                    &cx.publisher,
                    self.format,
                    resource.as_ref(),
                ),
                earlier_attempts: p.attempts,
                event: p.event.clone(),
                resource,
            });
        }
        let results = self.destination.deliver(&batch).await;
        let now = cx.clock.now();
        let wall = Timestamp::now();
        let mut dead = Vec::new();
        let mut gone = None;
        for (&i, attempt) in due.iter().zip(&results) {
            let slot = &mut window[i];
            let Some(p) = slot.pending.as_mut() else {
                continue;
            };
            p.attempts += 1;
            let (first, first_wall) = *p.first_attempt.get_or_insert((now, wall));
            let verdict = self.retry.after(p.attempts, attempt, now - first);
            match verdict {
                Verdict::Delivered => {
                    let latency = Timestamp::parse(&p.event.time)
                        .ok()
                        .map(|t| (wall.unix_millis() - t.unix_millis()).max(0) as u64);
                    cx.metrics.event_delivered(&self.name, latency);
                    slot.pending = None;
                }
                Verdict::Retry(wait) => {
                    cx.metrics
                        .event_attempt_failed(&self.name, attempt.outcome());
                    p.due = now + wait;
                }
                Verdict::DeadLetter(_) | Verdict::Disable => {
                    cx.metrics
                        .event_attempt_failed(&self.name, attempt.outcome());
                    let reason = match verdict {
                        Verdict::DeadLetter(r) => r,
                        _ => "UndeliverableDueToHttpGone",
                    };
                    if verdict == Verdict::Disable {
                        gone = Some(reason);
                    }
                    let undelivered = Undelivered {
                        reason: reason.to_owned(),
                        attempts: p.attempts,
                        last_outcome: attempt.outcome().to_owned(),
                        last_status: attempt.status(),
                        publish_time: first_wall.to_string(),
                        last_attempt_time: wall.to_string(),
                    };
                    // By window index: positions repeat across a hub's partitions.
                    dead.push((
                        record(&p.event, &cx.publisher, self.format, &undelivered),
                        reason,
                        i,
                    ));
                }
            }
        }
        if !dead.is_empty() {
            let lines: Vec<&Value> = dead.iter().map(|(v, _, _)| v).collect();
            match self.dead_letters.write(&lines).await {
                Ok(()) => {
                    for (_, reason, i) in &dead {
                        cx.metrics.event_dead_lettered(&self.name, reason);
                        window[*i].pending = None;
                    }
                }
                // The events stay in the window and are tried again; nothing moves past them.
                Err(e) => {
                    tracing::error!(subscription = %self.name, store = %self.dead_letters, error = %e, "cannot write dead letters; retrying the events");
                    for (_, _, i) in &dead {
                        if let Some(p) = window[*i].pending.as_mut() {
                            p.due = now + Duration::from_secs(10);
                        }
                    }
                    gone = None;
                }
            }
        }
        if let Some(reason) = gone {
            tracing::error!(subscription = %self.name, "the endpoint answered 410 Gone: subscription disabled");
            cx.metrics.event_dropped(&self.name, "SubscriptionDisabled");
            state.disabled = Some(reason.to_owned());
            return true;
        }
        false
    }
}

/// Where a subscription's dead letters go.
#[derive(Debug)]
pub(crate) enum EventDeadLetters {
    /// A JSON Lines file, synced before the events are let go.
    File(PathBuf),
    /// A Blob container (cluster mode): each batch one blob under `prefix`, written before the
    /// events are let go.
    Blob {
        container: Box<crate::pipeline::BlobContainer>,
        prefix: String,
    },
}

impl std::fmt::Display for EventDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Blob { container, prefix } => write!(f, "{}/{prefix}", container.url()),
        }
    }
}

impl EventDeadLetters {
    async fn write(&self, lines: &[&Value]) -> Result<(), String> {
        match self {
            Self::File(path) => append_lines(path, lines).map_err(|e| e.to_string()),
            Self::Blob { container, prefix } => {
                let mut text = Vec::new();
                for line in lines {
                    serde_json::to_writer(&mut text, line).map_err(|e| e.to_string())?;
                    text.push(b'\n');
                }
                // Named after its time and content; a reader keys records by event id.
                let name = format!(
                    "{prefix}{}",
                    crate::pipeline::batch_name(Timestamp::now(), &text)
                );
                let put = async {
                    container.ensure().await?;
                    container.put_once(&name, text).await
                };
                put.await.map(drop).map_err(|e| e.to_string())
            }
        }
    }
}

/// Appends JSON lines to a file and syncs it.
fn append_lines(path: &Path, lines: &[&Value]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut text = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut text, line)?;
        text.push(b'\n');
    }
    file.write_all(&text)?;
    file.sync_data()
}
