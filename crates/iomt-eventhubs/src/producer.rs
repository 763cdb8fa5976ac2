//! Sending to an Event Hub without losing or misreporting anything: the internal hub's
//! measurements and the change events of the event log and of Event Hubs subscriptions all go
//! through [`Producer`].
//!
//! It drives the SDK's buffered producer, which batches per partition and reports each
//! batch's real outcome: unlike `ProducerClient::send_batch`, it does not take an AMQP
//! `Released` or `Modified` settlement for success. Each message carries a token (its message
//! id), so each outcome finds its way back to the message it came from:
//!
//! * stored: reported as [`Sent::Stored`];
//! * too large for an event: reported as [`Sent::Refused`], for the caller to dead-letter;
//! * any other failure: reported as [`Sent::Failed`] and sent again after a backoff, for as
//!   long as it takes. Nothing is dropped, and while the hub is down the bounded number of
//!   outstanding messages makes [`Producer::send`] wait (backpressure).
//!
//! SDK sends can hang on a link the service detached. When messages are outstanding and no
//! send completes for `stall_timeout`, the client is replaced and everything outstanding is
//! sent again. A message can then be stored twice; every consumer of these hubs deduplicates
//! (idempotent writes, deterministic event ids).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use azure_core::Uuid;
use azure_messaging_eventhubs::models::{EventData, MessageId};
use azure_messaging_eventhubs::{
    BufferedProducerClient, EnqueueEventOptions, EventHubsError, SendBatchFailedContext,
    SendBatchSucceededContext,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use iomt_core::Backoff;

use crate::{EventHubSettings, OpenError};

/// A message to send: its event (the producer sets the message id) and partition key.
pub trait Outbound: Send + 'static {
    /// The event; `message_id` must be set as its message id.
    fn event(&self, message_id: Uuid) -> EventData;
    /// The partition key, which keeps related messages on one partition and in order.
    fn partition_key(&self) -> Option<String>;
}

/// What the producer reports about the messages it was given.
#[derive(Debug)]
pub enum Sent<M> {
    /// Stored durably.
    Stored(Vec<M>),
    /// Refused for good (too large for an event).
    Refused {
        /// The messages.
        messages: Vec<M>,
        /// Why.
        reason: String,
    },
    /// A send failed; the producer sends the messages again.
    Failed {
        /// How many messages the failed send carried.
        messages: usize,
        /// Why it failed.
        error: String,
    },
}

/// Why a send was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Event Hubs producer is closed")]
pub struct Closed;

/// Why a [`Confirmed`] message was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotStored {
    /// The hub refused it for good (too large for an event).
    #[error("refused: {0}")]
    Refused(String),
    /// The producer closed first.
    #[error(transparent)]
    Closed(#[from] Closed),
}

/// Tuning of the producer.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// How long a batch that is not full waits for more messages before it is sent.
    pub max_wait: Duration,
    /// Messages buffered per hub partition before sending waits.
    pub buffered_per_partition: usize,
    /// Messages sent and not yet stored before `send` waits (bounds memory and the sender's
    /// lead over the hub).
    pub max_outstanding: usize,
    /// How long outstanding messages may go without any send completing before the client
    /// is taken for hung and replaced.
    pub stall_timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_millis(50),
            buffered_per_partition: 1500,
            max_outstanding: 20_000,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

enum Command<M> {
    Send(Vec<M>),
    Close(oneshot::Sender<()>),
}

enum Outcome {
    Stored(Vec<EventData>),
    Failed(Vec<EventData>, EventHubsError),
}

/// Sends [`Outbound`] messages to one Event Hub and reports what became of each.
#[derive(Debug)]
pub struct Producer<M> {
    commands: mpsc::Sender<Command<M>>,
    reports: Option<mpsc::UnboundedReceiver<Sent<M>>>,
    pump: tokio::task::JoinHandle<()>,
}

impl<M> std::fmt::Debug for Command<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Send(_) => "Send",
            Command::Close(_) => "Close",
        })
    }
}

impl<M: Outbound> Producer<M> {
    /// Opens the hub (failing fast on a hub that cannot be opened) and starts sending.
    pub async fn open(
        settings: EventHubSettings,
        options: ProducerOptions,
    ) -> Result<Self, OpenError> {
        let (mut producer, reports) = Self::start(settings, options).await?;
        producer.reports = Some(reports);
        Ok(producer)
    }

    /// Opens the hub and starts the pump; the reports are returned rather than kept.
    async fn start(
        settings: EventHubSettings,
        options: ProducerOptions,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Sent<M>>), OpenError> {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        let client = open_client(&settings, &options, &outcomes_tx).await?;
        let (commands, commands_rx) = mpsc::channel(4);
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let pump = Pump {
            settings,
            options,
            client: Some(client),
            outcomes_tx,
            outstanding: HashMap::new(),
            retry: VecDeque::new(),
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(30)),
            last_progress: Instant::now(),
            token_prefix: fastrand::u64(..),
            tokens_issued: 0,
            reports: reports_tx,
        };
        let producer = Self {
            commands,
            reports: None,
            pump: tokio::spawn(pump.run(commands_rx, outcomes)),
        };
        Ok((producer, reports))
    }

    /// Hands messages over; waits while too many are outstanding.
    pub async fn send(&self, batch: Vec<M>) -> Result<(), Closed> {
        self.commands
            .send(Command::Send(batch))
            .await
            .map_err(|_| Closed)
    }

    /// What became of the messages, taken once.
    pub fn reports(&mut self) -> Option<mpsc::UnboundedReceiver<Sent<M>>> {
        self.reports.take()
    }

    /// Waits until every message handed over is stored or refused, then closes the client.
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            closed.await.ok();
        }
        self.pump.await.ok();
    }
}

async fn open_client(
    settings: &EventHubSettings,
    options: &ProducerOptions,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) -> Result<BufferedProducerClient, OpenError> {
    let (stored, failed) = (outcomes.clone(), outcomes.clone());
    let builder = BufferedProducerClient::builder()
        .with_max_wait_time(
            azure_core::time::Duration::try_from(options.max_wait)
                .unwrap_or(azure_core::time::Duration::milliseconds(50)),
        )
        .with_max_buffered_event_count_per_partition(options.buffered_per_partition.max(1))
        .with_on_send_succeeded(move |c: SendBatchSucceededContext| {
            stored.send(Outcome::Stored(c.events)).ok();
            async {}
        })
        .with_on_send_failed(move |c: SendBatchFailedContext| {
            failed.send(Outcome::Failed(c.events, c.error)).ok();
            async {}
        });
    settings.buffered_producer(builder).await
}

/// The task that owns the client: it enqueues, matches outcomes to messages, retries and
/// replaces a hung client.
struct Pump<M> {
    settings: EventHubSettings,
    options: ProducerOptions,
    client: Option<BufferedProducerClient>,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    /// Messages enqueued and not yet stored or refused, by token.
    outstanding: HashMap<Uuid, M>,
    /// Tokens to enqueue again at `retry_at`.
    retry: VecDeque<Uuid>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// When a send last completed (or the pump last had nothing outstanding).
    last_progress: Instant,
    /// Tokens are this producer's random prefix and a counter: unique without a random draw
    /// (a system call) per message.
    token_prefix: u64,
    tokens_issued: u64,
    reports: mpsc::UnboundedSender<Sent<M>>,
}

impl<M: Outbound> Pump<M> {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command<M>>,
        mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    ) {
        let mut closing: Option<Option<oneshot::Sender<()>>> = None;
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        loop {
            if closing.is_some() && self.outstanding.is_empty() {
                break;
            }
            let room = self.outstanding.len() < self.options.max_outstanding;
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                Some(outcome) = outcomes.recv() => self.settle(outcome),
                command = commands.recv(), if closing.is_none() && room => match command {
                    Some(Command::Send(batch)) => {
                        let tokens = batch
                            .into_iter()
                            .map(|m| {
                                let token = self.next_token();
                                self.outstanding.insert(token, m);
                                token
                            })
                            .collect();
                        self.enqueue(tokens).await;
                    }
                    Some(Command::Close(done)) => closing = Some(Some(done)),
                    None => closing = Some(None),
                },
                () = sleep_until(retry_at), if retry_at.is_some() => {
                    self.retry_at = None;
                    let tokens = std::mem::take(&mut self.retry).into_iter().collect();
                    self.enqueue(tokens).await;
                }
                _ = watchdog.tick() => self.watch().await,
            }
        }
        if let Some(client) = self.client.take()
            && let Err(e) = client.close().await
        {
            tracing::warn!(hub = %self.settings.hub, error = %e, "closing an Event Hubs producer failed");
        }
        if let Some(Some(done)) = closing {
            done.send(()).ok();
        }
    }

    fn next_token(&mut self) -> Uuid {
        self.tokens_issued += 1;
        Uuid::from_u64_pair(self.token_prefix, self.tokens_issued)
    }

    /// Enqueues outstanding messages; what cannot be enqueued is retried.
    async fn enqueue(&mut self, tokens: Vec<Uuid>) {
        let mut tokens = tokens.into_iter();
        while let Some(token) = tokens.next() {
            let Some(message) = self.outstanding.get(&token) else {
                continue; // stored meanwhile (by a client that was replaced)
            };
            let event = message.event(token);
            let options = EnqueueEventOptions {
                partition_key: message.partition_key(),
                ..Default::default()
            };
            let error = match &self.client {
                Some(client) => match tokio::time::timeout(
                    self.options.stall_timeout,
                    client.enqueue_event(event, Some(options)),
                )
                .await
                {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "enqueueing did not finish within the stall timeout".to_owned(),
                },
                None => "the hub could not be reopened".to_owned(),
            };
            // The client is closed or hung: everything not enqueued goes with a new one.
            let rest: Vec<Uuid> = std::iter::once(token).chain(tokens).collect();
            self.fail(rest, error);
            self.replace_client().await;
            return;
        }
    }

    /// Matches a batch outcome to its messages.
    fn settle(&mut self, outcome: Outcome) {
        self.last_progress = Instant::now();
        match outcome {
            Outcome::Stored(events) => {
                let stored: Vec<M> = events
                    .iter()
                    .filter_map(|e| self.outstanding.remove(&token(e)?))
                    .collect();
                self.backoff.reset();
                if !stored.is_empty() {
                    self.reports.send(Sent::Stored(stored)).ok();
                }
            }
            Outcome::Failed(events, error) => {
                let tokens: Vec<Uuid> = events.iter().filter_map(token).collect();
                let error = error.to_string();
                // The SDK reports an event larger than an empty batch on its own, with this
                // message; no retry can send it.
                if tokens.len() == 1 && error.contains("too large") {
                    if let Some(m) = self.outstanding.remove(&tokens[0]) {
                        self.reports
                            .send(Sent::Refused {
                                messages: vec![m],
                                reason: error,
                            })
                            .ok();
                    }
                    return;
                }
                self.fail(tokens, error);
            }
        }
    }

    /// Reports a failed send and schedules its messages again.
    fn fail(&mut self, tokens: Vec<Uuid>, error: String) {
        let tokens: Vec<Uuid> = tokens
            .into_iter()
            .filter(|t| self.outstanding.contains_key(t))
            .collect();
        if tokens.is_empty() {
            return;
        }
        let retry_at = *self
            .retry_at
            .get_or_insert_with(|| Instant::now() + self.backoff.next_delay());
        let retry_in = retry_at.saturating_duration_since(Instant::now());
        tracing::warn!(hub = %self.settings.hub, messages = tokens.len(), ?retry_in, %error, "sending to an Event Hub failed");
        self.reports
            .send(Sent::Failed {
                messages: tokens.len(),
                error,
            })
            .ok();
        self.retry.extend(tokens);
    }

    /// Replaces a client whose sends stopped completing.
    async fn watch(&mut self) {
        if self.outstanding.is_empty() {
            self.last_progress = Instant::now();
            return;
        }
        if self.last_progress.elapsed() < self.options.stall_timeout {
            return;
        }
        // Everything outstanding is sent again, what was waiting for a retry included.
        self.retry.clear();
        let waiting: Vec<Uuid> = self.outstanding.keys().copied().collect();
        tracing::warn!(
            hub = %self.settings.hub,
            outstanding = self.outstanding.len(),
            stalled_for = ?self.last_progress.elapsed(),
            "Event Hub sends stopped completing; replacing the client"
        );
        self.last_progress = Instant::now();
        self.replace_client().await;
        self.fail(waiting, "sends stopped completing".to_owned());
    }

    /// Opens a new client; the old one is abandoned in the background (closing it can hang
    /// as its sends do). When the hub cannot be opened, the next retry tries again.
    async fn replace_client(&mut self) {
        if let Some(old) = self.client.take() {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(30), old.abort())
                    .await
                    .ok();
            });
        }
        match open_client(&self.settings, &self.options, &self.outcomes_tx).await {
            Ok(client) => self.client = Some(client),
            Err(e) => {
                tracing::warn!(hub = %self.settings.hub, error = %e, "cannot reopen an Event Hub");
            }
        }
    }
}

/// The token a message was sent with.
fn token(event: &EventData) -> Option<Uuid> {
    match event.message_id()? {
        MessageId::Uuid(u) => Some(*u),
        _ => None,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A message whose sender waits for its outcome (see [`Confirmed`]).
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The body.
    pub body: Vec<u8>,
    /// Its media type.
    pub content_type: Option<String>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
    /// Keeps related messages on one partition, in order.
    pub partition_key: Option<String>,
}

struct Tracked {
    message: Message,
    done: oneshot::Sender<Result<(), NotStored>>,
}

impl Outbound for Tracked {
    fn event(&self, message_id: Uuid) -> EventData {
        let m = &self.message;
        let mut builder = EventData::builder()
            .with_body(m.body.clone())
            .with_message_id(message_id);
        if let Some(content_type) = &m.content_type {
            builder = builder.with_content_type(content_type.clone());
        }
        for (key, value) in &m.properties {
            builder = builder.add_property(key.clone(), value.clone());
        }
        builder.build()
    }

    fn partition_key(&self) -> Option<String> {
        self.message.partition_key.clone()
    }
}

/// A [`Producer`] whose `send` returns what became of each message: for callers that must
/// know a message is stored before they go on (an outbox append, a subscription delivery).
#[derive(Debug)]
pub struct Confirmed {
    producer: Producer<Tracked>,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracked")
    }
}

impl Confirmed {
    /// Opens the hub (failing fast on a hub that cannot be opened) and starts sending.
    pub async fn open(
        settings: EventHubSettings,
        options: ProducerOptions,
    ) -> Result<Self, OpenError> {
        let (producer, mut reports) = Producer::<Tracked>::start(settings, options).await?;
        let dispatcher = tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                match report {
                    Sent::Stored(done) => {
                        for t in done {
                            t.done.send(Ok(())).ok();
                        }
                    }
                    Sent::Refused { messages, reason } => {
                        for t in messages {
                            t.done.send(Err(NotStored::Refused(reason.clone()))).ok();
                        }
                    }
                    // The producer sends them again and has said so.
                    Sent::Failed { .. } => {}
                }
            }
        });
        Ok(Self {
            producer,
            dispatcher,
        })
    }

    /// Sends `messages`; one result per message, in order: `Ok` once it is stored, the reason
    /// when the hub refused it for good. Failed sends are retried meanwhile, for as long as it
    /// takes: bound the wait with a timeout where that matters.
    pub async fn send(&self, messages: Vec<Message>) -> Vec<Result<(), NotStored>> {
        let (tracked, waits): (Vec<Tracked>, Vec<_>) = messages
            .into_iter()
            .map(|message| {
                let (done, wait) = oneshot::channel();
                (Tracked { message, done }, wait)
            })
            .unzip();
        if self.producer.send(tracked).await.is_err() {
            return waits.iter().map(|_| Err(Closed.into())).collect();
        }
        let mut results = Vec::with_capacity(waits.len());
        for wait in waits {
            results.push(wait.await.unwrap_or(Err(NotStored::Closed(Closed))));
        }
        results
    }

    /// Waits for what is outstanding, then closes the client.
    pub async fn close(self) {
        self.producer.close().await;
        self.dispatcher.await.ok();
    }
}
