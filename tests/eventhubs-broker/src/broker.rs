//! The running broker: start-up, shared state, and the handle tests drive it with.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fe2o3_amqp::types::definitions::{self, AmqpError, ConnectionError, LinkError};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info};

use crate::{
    epoch::{self, Admission, Reader, Refusal},
    error::Error,
    nodes::NodeLog,
    server,
    store::{HubConfig, PartitionState, Store, StoredEvent},
};

/// The connection string to open SDK clients with; the broker accepts any credentials, and the
/// SDK insists on a parseable SAS key.
pub const CONNECTION_STRING: &str = "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;";

/// The maximum message size the broker advertises on its links: the SDK sizes batches from it.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1024 * 1024;

/// The default simulated network latency of the broker's writes.
///
/// fe2o3-amqp 0.16, under the SDK 0.16, closes the whole connection when the broker answers the
/// detaches of the CBS links it drops after each token upload before its own session end is
/// processed; across any real network that cannot happen. 5 ms is a thousand times the usual
/// window and costs a few milliseconds per request.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(5);

/// How long the broker waits for a client to answer a detach or close it initiated, so a
/// vanished client cannot hold a task forever.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What to serve.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// The event hubs.
    pub hubs: Vec<HubConfig>,
    /// The max-message-size advertised on every link, in bytes.
    pub max_message_size: u64,
    /// How much later than written the broker's bytes reach clients. Loopback answers faster
    /// than the SDK 0.16 can cope with; see `DEFAULT_LATENCY`.
    pub latency: Duration,
}

impl BrokerConfig {
    /// Serves `hubs` on a free port of 127.0.0.1.
    pub fn new(hubs: Vec<HubConfig>) -> Self {
        Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            hubs,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            latency: DEFAULT_LATENCY,
        }
    }

    /// Listens on `port` of 127.0.0.1 instead.
    pub fn with_port(mut self, port: u16) -> Self {
        self.addr.set_port(port);
        self
    }
}

/// Why the broker detaches a link on its own initiative.
#[derive(Debug, Clone)]
pub(crate) struct Kick(pub(crate) definitions::Error);

/// Identifies the readers that compete under the epoch rules. Names are lowercased because the
/// service treats hub and consumer group names case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ReaderKey {
    pub(crate) hub: String,
    pub(crate) consumer_group: String,
    pub(crate) partition: String,
}

impl ReaderKey {
    pub(crate) fn new(hub: &str, consumer_group: &str, partition: &str) -> Self {
        Self {
            hub: hub.to_lowercase(),
            consumer_group: consumer_group.to_lowercase(),
            partition: partition.to_owned(),
        }
    }
}

#[derive(Debug)]
struct LinkEntry {
    /// The lowercased hub, for `drop_links`.
    hub: Option<String>,
    /// Taken when the link is kicked, so it is kicked once.
    kick: Option<oneshot::Sender<Kick>>,
    /// Set once the broker has sent its detach; the client may answer only later (an idle
    /// SDK sender reads its link only when it next sends).
    detaching: bool,
}

#[derive(Debug, Default)]
struct Registry {
    links: HashMap<u64, LinkEntry>,
    readers: HashMap<ReaderKey, Vec<Reader>>,
    connections: HashMap<u64, CancellationToken>,
}

impl Registry {
    fn kick(&mut self, link: u64, kick: Kick) -> bool {
        let sender = self
            .links
            .get_mut(&link)
            .and_then(|entry| entry.kick.take());
        // A send fails only when the link task already ended; that link needs no kick.
        sender.is_some_and(|s| s.send(kick).is_ok())
    }

    fn remove_link(&mut self, link: u64) {
        self.links.remove(&link);
        self.readers.retain(|_, readers| {
            readers.retain(|r| r.link != link);
            !readers.is_empty()
        });
    }
}

/// State shared by every task of one broker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) max_message_size: u64,
    pub(crate) latency: Duration,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    registry: Mutex<Registry>,
    node_log: Mutex<NodeLog>,
    next_id: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent at each step, so a panic elsewhere
    // must not take the broker down with a poisoned lock.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a link registered while its task runs.
#[derive(Debug)]
pub(crate) struct LinkGuard {
    shared: Arc<Shared>,
    pub(crate) id: u64,
}

impl LinkGuard {
    /// Records that the link's detach is about to go out, which is all
    /// [`BrokerHandle::drop_links`] waits for.
    pub(crate) fn detaching(&self) {
        if let Some(entry) = lock(&self.shared.registry).links.get_mut(&self.id) {
            entry.detaching = true;
        }
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        lock(&self.shared.registry).remove_link(self.id);
    }
}

/// Keeps a connection registered while its task runs.
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.registry).connections.remove(&self.id);
    }
}

impl Shared {
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn node_log(&self) -> MutexGuard<'_, NodeLog> {
        lock(&self.node_log)
    }

    /// Registers a link; the receiver fires when the broker wants it detached.
    pub(crate) fn register_link(
        self: &Arc<Self>,
        hub: Option<&str>,
    ) -> (LinkGuard, oneshot::Receiver<Kick>) {
        let (sender, receiver) = oneshot::channel();
        let id = self.next_id();
        lock(&self.registry).links.insert(
            id,
            LinkEntry {
                hub: hub.map(str::to_lowercase),
                kick: Some(sender),
                detaching: false,
            },
        );
        let guard = LinkGuard {
            shared: self.clone(),
            id,
        };
        (guard, receiver)
    }

    /// Applies the epoch rules to a registered link that wants to read `key`. On admission the
    /// displaced readers are kicked with `amqp:link:stolen` before this returns.
    pub(crate) fn admit_reader(
        &self,
        link: u64,
        key: ReaderKey,
        epoch: Option<i64>,
    ) -> Result<(), definitions::Error> {
        let mut registry = lock(&self.registry);
        let readers = registry.readers.get(&key).cloned().unwrap_or_default();
        match epoch::admit(&readers, epoch) {
            Admission::Admit { evict } => {
                for old in &evict {
                    let description = match epoch {
                        Some(e) => format!("New receiver with higher epoch of '{e}' is created"),
                        None => "New receiver is created".to_owned(),
                    };
                    let error = definitions::Error::new(LinkError::Stolen, description, None);
                    registry.kick(*old, Kick(error));
                }
                let entry = registry.readers.entry(key).or_default();
                entry.retain(|r| !evict.contains(&r.link));
                entry.push(Reader { link, epoch });
                Ok(())
            }
            Admission::Refuse(refusal) => Err(match refusal {
                Refusal::LowerEpoch { current } => definitions::Error::new(
                    LinkError::Stolen,
                    format!(
                        "Receiver with epoch '{current}' already exists; the requested epoch {epoch:?} is lower"
                    ),
                    None,
                ),
                Refusal::EpochReceiverExists { current } => definitions::Error::new(
                    LinkError::Stolen,
                    format!(
                        "Receiver with epoch '{current}' already exists; a non-epoch receiver cannot join"
                    ),
                    None,
                ),
                Refusal::TooManyReaders => definitions::Error::new(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "Exceeded the maximum number of allowed receivers per partition in a consumer group, which is {}",
                        epoch::MAX_NON_EPOCH_RECEIVERS
                    ),
                    None,
                ),
            }),
        }
    }

    /// Registers a connection; the token fires when the broker wants it closed.
    pub(crate) fn register_connection(self: &Arc<Self>) -> (ConnectionGuard, CancellationToken) {
        let token = self.shutdown.child_token();
        let id = self.next_id();
        lock(&self.registry).connections.insert(id, token.clone());
        let guard = ConnectionGuard {
            shared: self.clone(),
            id,
        };
        (guard, token)
    }
}

/// A running broker. Dropping it stops the broker without waiting; [`BrokerHandle::stop`]
/// waits for every task.
#[derive(Debug)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept_task: Option<JoinHandle<()>>,
}

impl BrokerHandle {
    /// Binds the listener and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<Self, Error> {
        let store = Store::new(&config.hubs)?;
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.addr,
            source,
        })?;
        let shared = Arc::new(Shared {
            store,
            max_message_size: config.max_message_size,
            latency: config.latency,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            registry: Mutex::new(Registry::default()),
            node_log: Mutex::new(NodeLog::default()),
            next_id: AtomicU64::new(1),
        });
        let accept_task = tokio::spawn(server::accept_loop(shared.clone(), listener));
        info!(%local_addr, hubs = config.hubs.len(), "broker listening");
        Ok(Self {
            shared,
            local_addr,
            accept_task: Some(accept_task),
        })
    }

    /// The address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL for the SDK's `with_custom_endpoint`: `amqp://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("amqp://{}", self.local_addr)
    }

    /// The partition ids of `hub`.
    pub fn partition_ids(&self, hub: &str) -> Result<Vec<String>, Error> {
        let found = self
            .shared
            .store
            .hub(hub)
            .ok_or_else(|| Error::UnknownHub(hub.to_owned()))?;
        Ok(found.partitions.iter().map(|p| p.id.clone()).collect())
    }

    /// The position summary of one partition.
    pub fn partition_state(&self, hub: &str, partition: &str) -> Result<PartitionState, Error> {
        Ok(self.shared.store.partition(hub, partition)?.state())
    }

    /// Every event stored in one partition, in sequence order.
    pub fn events(&self, hub: &str, partition: &str) -> Result<Vec<StoredEvent>, Error> {
        Ok(self.shared.store.partition(hub, partition)?.events())
    }

    /// How many receivers are attached to a partition for a consumer group; tests wait on it
    /// before sending to a receiver that starts at the latest event.
    pub fn reader_count(&self, hub: &str, consumer_group: &str, partition: &str) -> usize {
        let key = ReaderKey::new(hub, consumer_group, partition);
        lock(&self.shared.registry)
            .readers
            .get(&key)
            .map_or(0, Vec::len)
    }

    /// The audiences of every CBS token uploaded so far.
    pub fn cbs_audiences(&self) -> Vec<String> {
        self.shared.node_log().audiences.clone()
    }

    /// How many client connections are open.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.registry).connections.len()
    }

    /// Detaches every sender and receiver link of `hub` with `amqp:link:detach-forced`, as the
    /// service does when it moves a partition, and returns how many links it detached once every
    /// detach is on its way. Clients must re-attach.
    ///
    /// Producer links are drained first and keep storing what is already on the way (see
    /// `server::drain_producer`), so this takes a little over 100 ms when producers are attached;
    /// no event that a client saw accepted is lost.
    pub async fn drop_links(&self, hub: &str) -> usize {
        let hub = hub.to_lowercase();
        let kicked: Vec<u64> = {
            let mut registry = lock(&self.shared.registry);
            let targets: Vec<u64> = registry
                .links
                .iter()
                .filter(|(_, entry)| entry.hub.as_deref() == Some(hub.as_str()))
                .map(|(id, _)| *id)
                .collect();
            let error = || {
                definitions::Error::new(
                    LinkError::DetachForced,
                    "The link was detached by the test broker (fault injection).".to_owned(),
                    None,
                )
            };
            targets
                .into_iter()
                .filter(|id| registry.kick(*id, Kick(error())))
                .collect()
        };
        self.wait_until_gone(|registry| {
            kicked
                .iter()
                .any(|id| registry.links.get(id).is_some_and(|entry| !entry.detaching))
        })
        .await;
        debug!(%hub, dropped = kicked.len(), "links dropped");
        kicked.len()
    }

    /// Closes every client connection with `amqp:connection:forced` and returns how many it
    /// closed once the clients have answered (or after a timeout). Clients must reconnect.
    ///
    /// Unlike [`BrokerHandle::drop_links`] this is abrupt, like a gateway restart: an SDK 0.16
    /// send that is in flight when its connection closes never completes (its outcome is lost
    /// with the connection and fe2o3-amqp 0.16 does not fail it), so a test that sends during
    /// the drop must bound its sends with a timeout. Waiting for this call to return before
    /// sending again avoids that.
    pub async fn drop_connections(&self) -> usize {
        let closed: Vec<u64> = {
            let registry = lock(&self.shared.registry);
            for token in registry.connections.values() {
                token.cancel();
            }
            registry.connections.keys().copied().collect()
        };
        self.wait_until_gone(|registry| {
            closed
                .iter()
                .any(|id| registry.connections.contains_key(id))
        })
        .await;
        debug!(dropped = closed.len(), "connections dropped");
        closed.len()
    }

    /// Polls until `pending` is false: the kicked links or connections have finished their
    /// closing handshakes, which are themselves bounded by [`HANDSHAKE_TIMEOUT`].
    async fn wait_until_gone(&self, pending: impl Fn(&Registry) -> bool) {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT * 2;
        loop {
            let busy = pending(&lock(&self.shared.registry));
            if !busy || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops listening, closes every connection and waits for all tasks to end.
    pub async fn stop(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.accept_task.take() {
            // The accept loop only ends by cancellation; a join error means it panicked, and
            // there is nothing left to stop in that case.
            if let Err(error) = task.await {
                debug!(%error, "accept loop ended abnormally");
            }
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        info!(local_addr = %self.local_addr, "broker stopped");
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The error a connection is closed with when the broker drops it or stops.
pub(crate) fn connection_forced(description: &str) -> definitions::Error {
    definitions::Error::new(
        ConnectionError::ConnectionForced,
        description.to_owned(),
        None,
    )
}
