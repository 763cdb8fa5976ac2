//! The AMQP side: connections, sessions, and one task per link.
//!
//! Each attach is routed by its address (see [`crate::address`]):
//!
//! * client senders to `$cbs` / `$management` carry requests; client receivers from the same
//!   node in the same session take the responses;
//! * client senders to a hub or a partition carry events (single messages, or batches in message
//!   format `0x80013700` whose Data sections are encoded messages);
//! * client receivers from a consumer-group partition get the stored events from the start
//!   position in their selector filter, then every new one (live tail), within link credit.
//!
//! A link the broker cannot serve is attached and then closed with an AMQP error (`amqp:not-found`,
//! `amqp:invalid-field`, `amqp:link:stolen`...), which is how the SDK learns why.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use fe2o3_amqp::{
    Receiver, Sender,
    acceptor::{
        ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerConnectionHandle,
        ListenerSessionHandle, SessionAcceptor,
        sasl_acceptor::{SaslAcceptor, SaslServerFrame},
    },
    link::{delivery::Sendable, receiver::CreditMode},
    types::{
        definitions::{self, AmqpError, Role},
        messaging::{
            Body, MessageAnnotations, Source, Target, annotations::OwnedKey,
            message::DecodeIntoMessage,
        },
        performatives::Attach,
        primitives::{Array, Symbol, Timestamp, Value},
        sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
    },
};
use serde_amqp::descriptor::Descriptor;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::{
    address::Address,
    broker::{HANDSHAKE_TIMEOUT, Kick, LinkGuard, ReaderKey, Shared, connection_forced},
    filter::StartSelector,
    latency::DelayedStream,
    nodes::{self, Node},
    store::{AmqpMessage, Partition, Record},
};

/// The message format of an Event Hubs batch: the body is one Data section per event, each an
/// encoded AMQP message.
const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

/// The link property a receiver sets for its owner level.
const EPOCH_PROPERTY: &str = "com.microsoft:epoch";

/// The source filter that carries the start position.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

/// How many stored events a reader takes from the log per lock.
const READ_CHUNK: usize = 64;

/// How long a drained producer link keeps receiving before the broker detaches it, on top of
/// four times the simulated latency (see `drain_producer`).
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Accepts any SASL exchange: ANONYMOUS (what the SDK uses, since it authorizes by CBS) and
/// PLAIN with any credentials.
#[derive(Debug, Clone, Default)]
struct AnySasl;

impl SaslAcceptor for AnySasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }
}

/// Accepts TCP connections until the broker stops.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let acceptor = Arc::new(
        ConnectionAcceptor::builder()
            .container_id("iomt-eventhubs-broker")
            .sasl_acceptor(AnySasl)
            .build(),
    );
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                debug!(%peer, "tcp connection accepted");
                let task_shared = shared.clone();
                let acceptor = acceptor.clone();
                shared.tasks.spawn(async move {
                    let stream = DelayedStream::new(stream, task_shared.latency);
                    // A client that never finishes the SASL and AMQP handshakes must not keep
                    // `stop` waiting.
                    let opened = tokio::select! {
                        () = task_shared.shutdown.cancelled() => return,
                        opened = acceptor.accept(stream) => opened,
                    };
                    match opened {
                        Ok(connection) => serve_connection(task_shared, connection).await,
                        Err(error) => debug!(%peer, %error, "amqp open failed"),
                    }
                });
            }
            // Accept errors (e.g. too many open files) are transient for a listener; pausing
            // keeps a persistent one from spinning.
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs `future` but gives up after the handshake timeout; for exchanges that need the
/// client's cooperation (detach and close replies).
async fn bounded<F: Future>(future: F) -> Option<F::Output> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, future).await.ok()
}

async fn serve_connection(shared: Arc<Shared>, mut connection: ListenerConnectionHandle) {
    let (_guard, token) = shared.register_connection();
    let session_acceptor = SessionAcceptor::new();
    info!("client connected");
    loop {
        let incoming = tokio::select! {
            () = token.cancelled() => {
                let error = connection_forced("The connection was closed by the test broker.");
                if let Some(Err(error)) = bounded(connection.close_with_error(error)).await {
                    debug!(%error, "connection close");
                }
                info!("client connection closed by the broker");
                return;
            }
            incoming = connection.next_incoming_session() => incoming,
        };
        let Some(incoming) = incoming else {
            // The client closed the connection (or it broke); the engine has answered already.
            info!("client disconnected");
            return;
        };
        match session_acceptor
            .accept_incoming_session(incoming, &mut connection)
            .await
        {
            Ok(session) => {
                shared.tasks.spawn(serve_session(shared.clone(), session));
            }
            Err(error) => {
                debug!(%error, "session begin failed");
                return;
            }
        }
    }
}

/// The response channel of a request/response node within one session.
#[derive(Debug)]
struct NodeChannel {
    requests: mpsc::UnboundedSender<AmqpMessage>,
    responses: Option<mpsc::UnboundedReceiver<AmqpMessage>>,
}

impl NodeChannel {
    fn new() -> Self {
        let (requests, responses) = mpsc::unbounded_channel();
        Self {
            requests,
            responses: Some(responses),
        }
    }
}

/// A link acceptor without dynamic-node support (the SDK never asks for one).
type DefaultLinkAcceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// The per-session state: link acceptors and the node channels pairing request and response
/// links.
#[derive(Debug)]
struct SessionContext {
    shared: Arc<Shared>,
    /// For `$cbs` and `$management` links.
    plain: DefaultLinkAcceptor,
    /// For event links: advertises the max-message-size the SDK sizes its batches from.
    sized: DefaultLinkAcceptor,
    nodes: HashMap<Node, NodeChannel>,
}

async fn serve_session(shared: Arc<Shared>, mut session: ListenerSessionHandle) {
    let mut context = SessionContext {
        plain: LinkAcceptor::new(),
        sized: LinkAcceptor::builder()
            .max_message_size(shared.max_message_size)
            .build(),
        shared,
        nodes: HashMap::new(),
    };
    while let Some(attach) = session.next_incoming_attach().await {
        context.on_attach(&mut session, attach).await;
    }
    debug!("session ended");
}

fn source_address(attach: &Attach) -> Option<String> {
    attach.source.as_ref()?.address.clone()
}

fn target_address(attach: &Attach) -> Option<String> {
    let target = Target::try_from((**attach.target.as_ref()?).clone()).ok()?;
    target.address
}

fn link_error(
    condition: impl Into<definitions::ErrorCondition>,
    description: String,
) -> definitions::Error {
    definitions::Error::new(condition, description, None)
}

impl SessionContext {
    async fn on_attach(&mut self, session: &mut ListenerSessionHandle, attach: Attach) {
        let name = attach.name.clone();
        match attach.role {
            // The client sends, the broker receives.
            Role::Sender => {
                let address = Address::parse(&target_address(&attach).unwrap_or_default());
                debug!(link = %name, ?address, "incoming sender link");
                let acceptor = match address {
                    Address::Hub { .. } | Address::Partition { .. } => &self.sized,
                    _ => &self.plain,
                };
                let receiver = match acceptor.accept_incoming_attach(attach, session).await {
                    Ok(LinkEndpoint::Receiver(receiver)) => receiver,
                    Ok(LinkEndpoint::Sender(_)) => return, // cannot happen for role sender
                    Err(error) => {
                        debug!(link = %name, %error, "attach failed");
                        return;
                    }
                };
                self.start_receiver(receiver, address);
            }
            // The client receives, the broker sends.
            Role::Receiver => {
                let address = Address::parse(&source_address(&attach).unwrap_or_default());
                debug!(link = %name, ?address, "incoming receiver link");
                let epoch = epoch_property(&attach);
                let selector = selector_filter(&attach);
                let sender = match self.sized.accept_incoming_attach(attach, session).await {
                    Ok(LinkEndpoint::Sender(sender)) => sender,
                    Ok(LinkEndpoint::Receiver(_)) => return, // cannot happen for role receiver
                    Err(error) => {
                        debug!(link = %name, %error, "attach failed");
                        return;
                    }
                };
                self.start_sender(sender, address, epoch, selector);
            }
        }
    }

    fn node_channel(&mut self, node: Node) -> &mut NodeChannel {
        self.nodes.entry(node).or_insert_with(NodeChannel::new)
    }

    fn start_receiver(&mut self, receiver: Receiver, address: Address) {
        let shared = self.shared.clone();
        match address {
            Address::Cbs | Address::Management => {
                let node = if address == Address::Cbs {
                    Node::Cbs
                } else {
                    Node::Management
                };
                let requests = self.node_channel(node).requests.clone();
                self.shared
                    .tasks
                    .spawn(node_requests(shared, receiver, node, requests));
            }
            Address::Hub { ref hub } | Address::Partition { ref hub, .. } => {
                let partition = match &address {
                    Address::Partition { partition, .. } => Some(partition.clone()),
                    _ => None,
                };
                let found = match shared.store.hub(hub) {
                    None => Err(format!("The messaging entity '{hub}' could not be found.")),
                    Some(found) => match &partition {
                        Some(id) if found.partition(id).is_none() => Err(format!(
                            "The partition '{id}' of event hub '{hub}' could not be found."
                        )),
                        _ => Ok(()),
                    },
                };
                match found {
                    Ok(()) => {
                        let (guard, kick) = shared.register_link(Some(hub));
                        let hub = hub.clone();
                        self.shared
                            .tasks
                            .spawn(ingest(shared, receiver, hub, partition, guard, kick));
                    }
                    Err(description) => {
                        self.refuse(
                            LinkEndpoint::Receiver(receiver),
                            link_error(AmqpError::NotFound, description),
                        );
                    }
                }
            }
            Address::ConsumerPartition { .. } | Address::Unknown(_) => {
                let error = link_error(
                    AmqpError::NotFound,
                    format!("Cannot send to {address:?}: not a hub or partition address."),
                );
                self.refuse(LinkEndpoint::Receiver(receiver), error);
            }
        }
    }

    fn start_sender(
        &mut self,
        sender: Sender,
        address: Address,
        epoch: Result<Option<i64>, String>,
        selector: Result<StartSelector, String>,
    ) {
        let shared = self.shared.clone();
        match address {
            Address::Cbs | Address::Management => {
                let node = if address == Address::Cbs {
                    Node::Cbs
                } else {
                    Node::Management
                };
                let channel = self.node_channel(node);
                let responses = match channel.responses.take() {
                    Some(responses) => responses,
                    // A second response link for the node in this session: give it a fresh pair.
                    None => {
                        let (requests, responses) = mpsc::unbounded_channel();
                        channel.requests = requests;
                        responses
                    }
                };
                self.shared.tasks.spawn(node_responses(sender, responses));
            }
            Address::ConsumerPartition {
                hub,
                consumer_group,
                partition,
            } => {
                let Some(found) = shared.store.hub(&hub).and_then(|h| h.partition(&partition))
                else {
                    let description = format!(
                        "The messaging entity '{hub}/ConsumerGroups/{consumer_group}/Partitions/{partition}' could not be found."
                    );
                    self.refuse(
                        LinkEndpoint::Sender(sender),
                        link_error(AmqpError::NotFound, description),
                    );
                    return;
                };
                let (epoch, selector) = match (epoch, selector) {
                    (Ok(epoch), Ok(selector)) => (epoch, selector),
                    (Err(description), _) | (_, Err(description)) => {
                        self.refuse(
                            LinkEndpoint::Sender(sender),
                            link_error(AmqpError::InvalidField, description),
                        );
                        return;
                    }
                };
                let partition = found.clone();
                let (guard, kick) = shared.register_link(Some(&hub));
                let key = ReaderKey::new(&hub, &consumer_group, &partition.id);
                if let Err(error) = shared.admit_reader(guard.id, key, epoch) {
                    info!(%hub, %consumer_group, partition = %partition.id, ?epoch, "receiver refused");
                    drop(guard);
                    self.refuse(LinkEndpoint::Sender(sender), error);
                    return;
                }
                // Resolved now, so `@latest` means "after what is stored when the link attached".
                let start = partition.start_index(&selector);
                info!(%hub, %consumer_group, partition = %partition.id, ?epoch, %selector, start, "receiver attached");
                self.shared
                    .tasks
                    .spawn(deliver(sender, partition, start, guard, kick));
            }
            Address::Hub { .. } | Address::Partition { .. } | Address::Unknown(_) => {
                let error = link_error(
                    AmqpError::NotFound,
                    format!(
                        "Cannot receive from {address:?}: not a consumer group partition address."
                    ),
                );
                self.refuse(LinkEndpoint::Sender(sender), error);
            }
        }
    }

    /// Closes a just-attached link with `error`, in the background so the session keeps
    /// accepting links while the client answers.
    ///
    /// A producer link already holds credit (the acceptor grants it on attach), so it is drained
    /// first and whatever the client sent meanwhile is rejected with the same error (see
    /// [`drain_producer`]).
    fn refuse(&self, link: LinkEndpoint, error: definitions::Error) {
        debug!(condition = ?error.condition, description = ?error.description, "link refused");
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            let closed = match link {
                LinkEndpoint::Sender(sender) => bounded(sender.close_with_error(error)).await,
                LinkEndpoint::Receiver(mut receiver) => {
                    drain_producer(&shared, &mut receiver, Leftovers::Reject(&error)).await;
                    bounded(receiver.close_with_error(error)).await
                }
            };
            if let Some(Err(error)) = closed {
                debug!(%error, "refused link close");
            }
        });
    }
}

/// Reads `com.microsoft:epoch`; the service requires a long.
fn epoch_property(attach: &Attach) -> Result<Option<i64>, String> {
    let Some(value) = attach
        .properties
        .as_ref()
        .and_then(|p| p.get(&Symbol::from(EPOCH_PROPERTY)))
    else {
        return Ok(None);
    };
    match value {
        Value::Long(epoch) => Ok(Some(*epoch)),
        Value::Int(epoch) => Ok(Some(i64::from(*epoch))),
        other => Err(format!(
            "The link property {EPOCH_PROPERTY} must be a long, not {other:?}."
        )),
    }
}

/// Reads the start-position selector; no filter means the end of the stream.
fn selector_filter(attach: &Attach) -> Result<StartSelector, String> {
    let Some(filter) = attach.source.as_ref().and_then(|s| s.filter.as_ref()) else {
        return Ok(StartSelector::LATEST);
    };
    let Some(value) = filter.get(&Symbol::from(SELECTOR_FILTER)) else {
        return Ok(StartSelector::LATEST);
    };
    let expression = match value {
        Value::Described(described) => match (&described.descriptor, &described.value) {
            (Descriptor::Code(SELECTOR_FILTER_CODE), Value::String(e)) => e,
            (Descriptor::Name(name), Value::String(e)) if name.as_str() == SELECTOR_FILTER => e,
            _ => {
                return Err(format!(
                    "Unsupported {SELECTOR_FILTER} value {described:?}."
                ));
            }
        },
        Value::String(e) => e,
        other => return Err(format!("Unsupported {SELECTOR_FILTER} value {other:?}.")),
    };
    StartSelector::parse(expression).map_err(|e| e.to_string())
}

/// Serves the request side of `$cbs` / `$management`: accept each request and queue the answer
/// for the response link of the same session.
async fn node_requests(
    shared: Arc<Shared>,
    mut receiver: Receiver,
    node: Node,
    responses: mpsc::UnboundedSender<AmqpMessage>,
) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(delivery) => delivery,
            Err(error) => {
                debug!(?node, %error, "request link ended");
                break;
            }
        };
        if let Err(error) = receiver.accept(&delivery).await {
            debug!(?node, %error, "request accept failed");
            break;
        }
        let request = delivery.into_message();
        let response = nodes::respond(&shared.store, &mut shared.node_log(), node, &request);
        if responses.send(response).is_err() {
            debug!(?node, "no response link; answer dropped");
        }
    }
    if let Some(Err(error)) = bounded(receiver.close()).await {
        debug!(?node, %error, "request link close");
    }
}

/// Serves the response side of `$cbs` / `$management`.
async fn node_responses(mut sender: Sender, mut responses: mpsc::UnboundedReceiver<AmqpMessage>) {
    loop {
        let response = tokio::select! {
            response = responses.recv() => response,
            error = sender.on_detach() => {
                debug!(%error, "response link detached");
                return;
            }
        };
        let Some(response) = response else {
            // The request link is gone; wait for the client to detach this one.
            if let Some(error) = bounded(sender.on_detach()).await {
                debug!(%error, "response link detached");
            }
            return;
        };
        let sendable = Sendable::builder().message(response).settled(true).build();
        if let Err(error) = sender.send(sendable).await {
            debug!(%error, "response send failed");
            return;
        }
    }
}

/// The `x-opt-partition-key` annotation of a message.
fn partition_key(message: &AmqpMessage) -> Option<String> {
    let annotations = message.message_annotations.as_ref()?;
    match annotations
        .0
        .get(&OwnedKey::Symbol(Symbol::from("x-opt-partition-key")))?
    {
        Value::String(key) => Some(key.clone()),
        _ => None,
    }
}

/// Splits a delivery into the events it carries.
fn unpack(message_format: u32, message: AmqpMessage) -> Result<Vec<AmqpMessage>, String> {
    if message_format != BATCH_MESSAGE_FORMAT {
        return Ok(vec![message]);
    }
    let Body::Data(sections) = message.body else {
        return Err("A batch (message format 0x80013700) must have Data sections.".to_owned());
    };
    sections
        .iter()
        .enumerate()
        .map(|(index, section)| {
            let reader = serde_amqp::read::SliceReader::new(&section.0);
            Body::<Value>::decode_message_from_reader(reader).map_err(|e| {
                format!("Data section {index} of the batch is not an AMQP message: {e}")
            })
        })
        .collect()
}

/// Takes events from a producer link and appends them.
async fn ingest(
    shared: Arc<Shared>,
    mut receiver: Receiver,
    hub: String,
    partition: Option<String>,
    guard: LinkGuard,
    mut kick: oneshot::Receiver<Kick>,
) {
    let close_error = loop {
        let delivery = tokio::select! {
            kicked = &mut kick => break kicked.ok().map(|k| k.0),
            delivery = receiver.recv::<Body<Value>>() => delivery,
        };
        if store_delivery(&shared, &mut receiver, &hub, partition.as_deref(), delivery)
            .await
            .is_err()
        {
            break None;
        }
    };
    let closed = match close_error {
        Some(error) => {
            let leftovers = Leftovers::Store {
                hub: &hub,
                partition: partition.as_deref(),
            };
            drain_producer(&shared, &mut receiver, leftovers).await;
            guard.detaching();
            bounded(receiver.close_with_error(error)).await
        }
        None => bounded(receiver.close()).await,
    };
    if let Some(Err(error)) = closed {
        debug!(%error, "producer link close");
    }
}

/// What a draining producer link does with the deliveries still on the way.
#[derive(Debug, Clone, Copy)]
enum Leftovers<'a> {
    /// Store them: the link worked until now.
    Store {
        hub: &'a str,
        partition: Option<&'a str>,
    },
    /// Reject them with this error: the link was refused.
    Reject(&'a definitions::Error),
}

/// Takes back a producer's credit before the broker detaches its link.
///
/// fe2o3-amqp 0.16 (under the SDK) sends on any credit it holds even when a detach is waiting,
/// and then waits forever for an outcome that cannot come (the same hang as fe2o3-amqp issue
/// #200, where the service detaches an idle link). A drain makes the client give up its credit;
/// its next send then waits for credit, sees the detach instead, and fails or re-attaches. The
/// client answers a drain at once but the broker cannot observe the answer, so it keeps taking
/// deliveries for a grace period that covers the round trip.
async fn drain_producer(shared: &Shared, receiver: &mut Receiver, leftovers: Leftovers<'_>) {
    receiver.set_credit_mode(CreditMode::Manual);
    if let Err(error) = receiver.drain().await {
        debug!(%error, "drain failed");
        return;
    }
    let grace = tokio::time::sleep(shared.latency * 4 + DRAIN_GRACE);
    tokio::pin!(grace);
    loop {
        let delivery = tokio::select! {
            () = &mut grace => return,
            delivery = receiver.recv::<Body<Value>>() => delivery,
        };
        let settled = match leftovers {
            Leftovers::Store { hub, partition } => {
                store_delivery(shared, receiver, hub, partition, delivery).await
            }
            Leftovers::Reject(error) => match delivery {
                Ok(delivery) => receiver
                    .reject(&delivery, error.clone())
                    .await
                    .map_err(|error| {
                        debug!(%error, "reject failed");
                    }),
                Err(error) => {
                    debug!(%error, "refused producer link ended");
                    Err(())
                }
            },
        };
        if settled.is_err() {
            return;
        }
    }
}

/// Stores the events of one delivery and settles it. `Err` means the link is unusable.
async fn store_delivery(
    shared: &Shared,
    receiver: &mut Receiver,
    hub_name: &str,
    partition: Option<&str>,
    delivery: Result<
        fe2o3_amqp::link::delivery::Delivery<Body<Value>>,
        fe2o3_amqp::link::RecvError,
    >,
) -> Result<(), ()> {
    let delivery = delivery.map_err(|error| {
        debug!(hub = %hub_name, %error, "producer link ended");
    })?;
    let format = delivery.message_format().unwrap_or(0);
    let (info, message) = delivery.into_parts();
    let envelope_key = partition_key(&message);
    let events = match unpack(format, message) {
        Ok(events) if !events.is_empty() => events,
        result => {
            let description = result
                .err()
                .unwrap_or_else(|| "A batch must hold at least one event.".to_owned());
            warn!(hub = %hub_name, %description, "delivery rejected");
            let error = link_error(AmqpError::DecodeError, description);
            return receiver.reject(info, error).await.map_err(|error| {
                debug!(%error, "reject failed");
            });
        }
    };
    // The hub and the partition were checked at attach time, and the set never changes.
    let hub = shared.store.hub(hub_name).ok_or(())?;
    let key = envelope_key.or_else(|| events.first().and_then(partition_key));
    let target = match partition {
        Some(id) => hub.partition(id).ok_or(())?,
        None => hub.route(key.as_deref()),
    };
    let count = events.len();
    let events = events
        .into_iter()
        .map(|m| (partition_key(&m).or_else(|| key.clone()), m))
        .collect();
    let first = target.append(events);
    debug!(hub = %hub.name, partition = %target.id, first, count, "events stored");
    receiver.accept(info).await.map_err(|error| {
        debug!(%error, "accept failed");
    })
}

/// A stored event as a consumer receives it: the producer's message plus the system
/// annotations.
fn annotate(record: &Record) -> AmqpMessage {
    let mut message: AmqpMessage = record.message.clone();
    message.delivery_annotations = None;
    let annotations = message
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations::builder().build());
    let mut put = |key: &str, value: Value| {
        annotations
            .0
            .insert(OwnedKey::Symbol(Symbol::from(key)), value);
    };
    put("x-opt-sequence-number", Value::Long(record.sequence_number));
    put("x-opt-offset", Value::String(record.offset.to_string()));
    put(
        "x-opt-enqueued-time",
        Value::Timestamp(Timestamp::from_milliseconds(record.enqueued_time_ms)),
    );
    if let Some(key) = &record.partition_key {
        put("x-opt-partition-key", Value::String(key.clone()));
    }
    message
}

/// What woke an idle reader.
enum Wake {
    Kicked(Option<definitions::Error>),
    Detached,
    Appended,
}

/// Sends stored events from `start` on, then each new one, to a consumer link.
async fn deliver(
    mut sender: Sender,
    partition: Arc<Partition>,
    start: usize,
    guard: LinkGuard,
    mut kick: oneshot::Receiver<Kick>,
) {
    let mut next = start;
    let mut appended = partition.subscribe();
    let close_error = 'serve: loop {
        let records = partition.read(next, READ_CHUNK);
        if records.is_empty() {
            let wake = tokio::select! {
                kicked = &mut kick => Wake::Kicked(kicked.ok().map(|k| k.0)),
                error = sender.on_detach() => {
                    debug!(partition = %partition.id, %error, "consumer link detached");
                    Wake::Detached
                }
                changed = appended.changed() => match changed {
                    Ok(()) => Wake::Appended,
                    Err(_) => Wake::Kicked(None),
                },
            };
            match wake {
                Wake::Appended => continue,
                Wake::Detached => return,
                Wake::Kicked(error) => break 'serve error,
            }
        }
        for record in records {
            let sendable = Sendable::builder()
                .message(annotate(&record))
                .settled(true)
                .build();
            // `send` waits for link credit, and returns an error if the client detaches meanwhile.
            let sent = tokio::select! {
                kicked = &mut kick => break 'serve kicked.ok().map(|k| k.0),
                sent = sender.send(sendable) => sent,
            };
            if let Err(error) = sent {
                debug!(partition = %partition.id, %error, "consumer link ended");
                break 'serve None;
            }
            next += 1;
        }
    };
    let closed = match close_error {
        Some(error) => {
            guard.detaching();
            bounded(sender.close_with_error(error)).await
        }
        None => bounded(sender.close()).await,
    };
    if let Some(Err(error)) = closed {
        debug!(%error, "consumer link close");
    }
}
