//! The internal hub on Azure Event Hubs: normalized measurements go out in MedTech's wire
//! format with MedTech's device partition key, so every measurement of a device lands on one
//! partition and the convert side (which reads the hub with the partition processor) sees all
//! of them.
//!
//! Sending goes through the SDK's buffered producer, which batches per partition and reports
//! each batch's real outcome: unlike `ProducerClient::send_batch`, it does not take an AMQP
//! `Released` or `Modified` settlement for success. Each message carries a token (its message
//! id), so the outcome finds its way back to the source event it came from:
//!
//! * stored: reported as [`Delivery::Stored`], and the source event can be checkpointed;
//! * too large for an event: reported as [`Delivery::Refused`], to be dead-lettered;
//! * any other failure: reported as [`Delivery::Failed`] and sent again after a backoff, for as
//!   long as it takes. Nothing is dropped, and while the hub is down, the bounded buffer stops
//!   the normalize stage (and so the reading).
//!
//! SDK sends can hang on a link the service detached. When messages are outstanding and no
//! send completes for `stall_timeout`, the client is replaced and everything outstanding is
//! sent again. A message can then be stored twice; the convert side's writes are idempotent.

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

use iomt_core::{Backoff, wire};
use iomt_eventhubs::{EventHubSettings, OpenError};

use super::{Delivery, HubError, HubMessage, HubProducer};

/// Tuning of the producer.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// How long a batch that is not full waits for more measurements before it is sent.
    pub max_wait: Duration,
    /// Measurements buffered per hub partition before sending waits.
    pub buffered_per_partition: usize,
    /// Measurements sent and not yet stored before `send` waits (bounds memory and the
    /// normalize stage's lead over the hub).
    pub max_outstanding: usize,
    /// How long outstanding measurements may go without any send completing before the client
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

enum Command {
    Send(Vec<HubMessage>),
    Close(oneshot::Sender<()>),
}

enum Outcome {
    Stored(Vec<EventData>),
    Failed(Vec<EventData>, EventHubsError),
}

/// The producer side of an internal hub on Event Hubs.
#[derive(Debug)]
pub struct EventHubsProducer {
    commands: mpsc::Sender<Command>,
    deliveries: Option<mpsc::UnboundedReceiver<Delivery>>,
    pump: tokio::task::JoinHandle<()>,
}

impl EventHubsProducer {
    /// Opens the hub (failing fast on a hub that cannot be opened) and starts sending.
    pub async fn open(
        settings: EventHubSettings,
        options: ProducerOptions,
    ) -> Result<Self, OpenError> {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        let client = open_client(&settings, &options, &outcomes_tx).await?;
        let (commands, commands_rx) = mpsc::channel(4);
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
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
            deliveries: deliveries_tx,
        };
        Ok(Self {
            commands,
            deliveries: Some(deliveries),
            pump: tokio::spawn(pump.run(commands_rx, outcomes)),
        })
    }
}

impl HubProducer for EventHubsProducer {
    fn partitions(&self) -> usize {
        // The partition key routes each measurement; the caller need not.
        1
    }

    async fn send(&mut self, _partition: usize, batch: Vec<HubMessage>) -> Result<(), HubError> {
        self.commands
            .send(Command::Send(batch))
            .await
            .map_err(|_| HubError::Closed)
    }

    fn deliveries(&mut self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        self.deliveries.take()
    }

    async fn close(self) {
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
struct Pump {
    settings: EventHubSettings,
    options: ProducerOptions,
    client: Option<BufferedProducerClient>,
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    /// Messages enqueued and not yet stored or refused, by token.
    outstanding: HashMap<Uuid, HubMessage>,
    /// Tokens to enqueue again at `retry_at`.
    retry: VecDeque<Uuid>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// When a send last completed (or the pump last had nothing outstanding).
    last_progress: Instant,
    /// Tokens are this producer's random prefix and a counter: unique without a random draw
    /// (a system call) per measurement.
    token_prefix: u64,
    tokens_issued: u64,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

impl Pump {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
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
            tracing::warn!(hub = %self.settings.hub, error = %e, "closing the internal hub producer failed");
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
            let event = EventData::builder()
                .with_body(wire::encode(&message.measurement))
                .with_content_type("application/json".to_owned())
                .with_message_id(token)
                .build();
            let options = EnqueueEventOptions {
                partition_key: Some(message.measurement.partition_key()),
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
                let origins: Vec<_> = events
                    .iter()
                    .filter_map(|e| self.outstanding.remove(&token(e)?))
                    .map(|m| m.origin)
                    .collect();
                self.backoff.reset();
                if !origins.is_empty() {
                    self.deliveries.send(Delivery::Stored(origins)).ok();
                }
            }
            Outcome::Failed(events, error) => {
                let tokens: Vec<Uuid> = events.iter().filter_map(token).collect();
                let error = error.to_string();
                // The SDK reports an event larger than an empty batch on its own, with this
                // message; no retry can send it.
                if tokens.len() == 1 && error.contains("too large") {
                    if let Some(m) = self.outstanding.remove(&tokens[0]) {
                        self.deliveries
                            .send(Delivery::Refused {
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
        tracing::warn!(hub = %self.settings.hub, messages = tokens.len(), ?retry_in, %error, "sending to the internal hub failed");
        self.deliveries
            .send(Delivery::Failed {
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
            "internal hub sends stopped completing; replacing the client"
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
                tracing::warn!(hub = %self.settings.hub, error = %e, "cannot reopen the internal hub");
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
