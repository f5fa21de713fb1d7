//! [`Cluster`]: one node's membership in the shardvisor cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};
use zenoh::liveliness::LivelinessToken;
use zenoh::pubsub::Subscriber;
use zenoh::qos::CongestionControl;
use zenoh::query::{ConsolidationMode, QueryTarget, Queryable};
use zenoh::sample::{Sample, SampleKind};
use zenoh::Session;

use crate::command::{self, CommandHandler, Envelope};
use crate::info::{available_cores, read_meminfo};
use crate::membership::{MemberEvent, Membership, MembershipState, Outcome};
use crate::stream::{self, ClusterPublisher, Forward, DEFAULT_STREAM_CAPACITY};
use crate::{keys, ClusterConfig, ClusterError, CommandError, NodeIdentity, NodeInfo};

/// How long [`Cluster::leave`] waits for zenoh to close the session (zenoh itself gives up
/// after 10 s).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(12);
/// Timeout of the liveliness query used to reconcile membership.
/// Membership inputs (token changes, infos) waiting for the membership task.
/// zenoh callbacks cannot wait: when it is full they drop the input and flag
/// the overflow, and the task then re-reads the live tokens.
const INPUT_CAPACITY: usize = 1024;
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra time [`Cluster::command`] waits beyond the command timeout for zenoh's own timeout
/// reply, before giving up by itself.
const COMMAND_GRACE: Duration = Duration::from_secs(1);
/// Capacity of the membership event broadcast; slow receivers see `Lagged`.
const EVENT_CAPACITY: usize = 256;

/// One node's membership in the cluster: liveliness, node info, commands and streams.
///
/// Invariants:
/// * While the `Cluster` exists, this node's liveliness token `shardvisor/node/{id}/{inc}` and
///   its command queryable are declared; the other nodes see it alive.
/// * [`Cluster::members`] always contains this node, alive.
/// * Membership is maintained by a single task fed by zenoh callbacks; callbacks never block
///   and never run user code (commands run in tasks on the runtime that called `join`).
///
/// Call [`Cluster::leave`] for a clean exit. Dropping it instead also closes the session (on a
/// helper thread, so it never blocks or panics in an async context), but without waiting.
pub struct Cluster {
    inner: Arc<Inner>,
    /// The declared zenoh entities; taken by [`Cluster::leave`].
    entities: Mutex<Option<Entities>>,
    members: watch::Receiver<Membership>,
    events: broadcast::Sender<MemberEvent>,
    shutdown: watch::Sender<bool>,
}

struct Entities {
    token: LivelinessToken,
    queryable: Queryable<()>,
    token_sub: Subscriber<()>,
    info_sub: Subscriber<()>,
}

/// State shared with background tasks (which hold it only while they use the session).
struct Inner {
    /// `Some` until `Inner` is dropped.
    session: Option<Session>,
    identity: NodeIdentity,
    /// The last info passed to `publish_info`, re-published when a node joins.
    last_info: Mutex<Option<NodeInfo>>,
}

impl Inner {
    fn session(&self) -> &Session {
        self.session
            .as_ref()
            .expect("session is present until Inner is dropped")
    }

    async fn put_info(&self, info: &NodeInfo) -> Result<(), ClusterError> {
        let bytes = postcard::to_stdvec(info).map_err(|source| ClusterError::Encode {
            what: "node info",
            source,
        })?;
        self.session()
            .put(keys::node_info(&info.id), bytes)
            .congestion_control(CongestionControl::Block)
            .await
            .map_err(|e| ClusterError::zenoh("publish node info", e))
    }

    /// The node tokens currently known to zenoh's routing tables.
    async fn live_tokens(&self) -> Vec<(String, u64)> {
        let replies = match self
            .session()
            .liveliness()
            .get(keys::ALL_NODE_TOKENS)
            .timeout(RECONCILE_TIMEOUT)
            .await
        {
            Ok(replies) => replies,
            Err(e) => {
                debug!(error = %e, "liveliness query failed");
                return Vec::new();
            }
        };
        let mut tokens = Vec::new();
        // Drain until zenoh closes the channel, so no reply is ever sent to a dropped receiver.
        while let Ok(reply) = replies.recv_async().await {
            match reply.result() {
                Ok(sample) => {
                    if let Some((id, inc)) = keys::parse_node_token(sample.key_expr().as_str()) {
                        tokens.push((id.to_owned(), inc));
                    }
                }
                Err(e) => debug!(error = %e, "liveliness query error reply"),
            }
        }
        tokens
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Dropping the last Session handle runs zenoh's blocking close (block_in_place),
            // which panics on a current-thread runtime and would stall an async worker: do it on
            // a plain thread. After `leave` the session is already closed and this is instant.
            let moved = std::thread::Builder::new()
                .name("cluster-close".into())
                .spawn(move || drop(session));
            if let Err(e) = moved {
                debug!(error = %e, "cannot spawn the session close thread");
            }
        }
    }
}

/// The membership task's input queue: bounded (`INPUT_CAPACITY`); the
/// callbacks set `overflow` when they had to drop an input.
struct InputQueue {
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    overflow: Arc<AtomicBool>,
}

/// Inputs of the membership task.
enum Input {
    Token {
        kind: SampleKind,
        id: String,
        incarnation: u64,
    },
    Info(NodeInfo),
    Reconciled {
        started: u64,
        tokens: Vec<(String, u64)>,
    },
}

impl Cluster {
    /// Joins the cluster: opens the zenoh session, declares this node's liveliness token and
    /// command queryable, and starts following the other nodes' tokens and infos.
    ///
    /// Returns once the session is open; connections to `config.peers` are made in the
    /// background (retried forever), so other nodes show up in [`Cluster::members`] later.
    /// Must be called inside a multi-threaded tokio runtime; command handlers run on it.
    pub async fn join(
        config: &ClusterConfig,
        identity: NodeIdentity,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<Cluster, ClusterError> {
        let runtime = Handle::try_current().map_err(|_| ClusterError::Runtime)?;
        if runtime.runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Err(ClusterError::Runtime);
        }
        if !keys::is_valid_node_id(&identity.id) {
            return Err(ClusterError::InvalidNodeId(identity.id));
        }
        let zconfig = config.zenoh_config()?;
        let session = zenoh::open(zconfig)
            .await
            .map_err(|e| ClusterError::zenoh("open the session", e))?;
        debug!(id = %identity.id, incarnation = identity.incarnation, zid = %session.zid(), "zenoh session open");

        let inner = Arc::new(Inner {
            session: Some(session),
            identity: identity.clone(),
            last_info: Mutex::new(None),
        });
        // On error, `inner` is dropped and the session closed by `Inner::drop`.
        let (input_tx, input_rx) = mpsc::channel(INPUT_CAPACITY);
        let overflow = Arc::new(AtomicBool::new(false));
        let state = MembershipState::new(identity.clone());
        let (members_tx, members_rx) = watch::channel(state.members().clone());
        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let session = inner.session();

        // Followers first, so nothing is missed; then the queryable before the token, so a
        // node seen alive can be commanded.
        let token_sub = {
            let tx = input_tx.clone();
            let overflow = overflow.clone();
            session
                .liveliness()
                .declare_subscriber(keys::ALL_NODE_TOKENS)
                .history(true)
                .callback(move |sample: Sample| {
                    if let Some((id, incarnation)) =
                        keys::parse_node_token(sample.key_expr().as_str())
                    {
                        let token = Input::Token {
                            kind: sample.kind(),
                            id: id.to_owned(),
                            incarnation,
                        };
                        if let Err(TrySendError::Full(_)) = tx.try_send(token) {
                            overflow.store(true, Ordering::Release);
                        }
                    }
                })
                .await
                .map_err(|e| ClusterError::zenoh("declare the liveliness subscriber", e))?
        };
        let info_sub = {
            let tx = input_tx.clone();
            let overflow = overflow.clone();
            session
                .declare_subscriber(keys::ALL_INFOS)
                .callback(move |sample: Sample| {
                    if let Some(info) = decode_info(&sample) {
                        if let Err(TrySendError::Full(_)) = tx.try_send(Input::Info(info)) {
                            overflow.store(true, Ordering::Release);
                        }
                    }
                })
                .await
                .map_err(|e| ClusterError::zenoh("declare the node info subscriber", e))?
        };
        let queryable = {
            let runtime = runtime.clone();
            session
                .declare_queryable(keys::node_command(&identity.id))
                .callback(move |query| {
                    // Never run the handler on zenoh's thread.
                    runtime.spawn(command::serve(query, Arc::clone(&handler)));
                })
                .await
                .map_err(|e| ClusterError::zenoh("declare the command queryable", e))?
        };
        let token = session
            .liveliness()
            .declare_token(keys::node_token(&identity.id, identity.incarnation))
            .await
            .map_err(|e| ClusterError::zenoh("declare the liveliness token", e))?;

        runtime.spawn(run_membership(
            state,
            InputQueue {
                rx: input_rx,
                tx: input_tx,
                overflow,
            },
            Arc::downgrade(&inner),
            members_tx,
            events_tx.clone(),
            shutdown_rx,
        ));
        info!(id = %identity.id, incarnation = identity.incarnation, "joined the cluster");

        Ok(Cluster {
            inner,
            entities: Mutex::new(Some(Entities {
                token,
                queryable,
                token_sub,
                info_sub,
            })),
            members: members_rx,
            events: events_tx,
            shutdown: shutdown_tx,
        })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.inner.identity.id
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.inner.identity
    }

    /// The membership view; updated on every change (see [`crate::membership`] for the rules).
    pub fn members(&self) -> watch::Receiver<Membership> {
        self.members.clone()
    }

    /// Membership changes from now on. Receivers that fall more than 256 events behind get
    /// `Lagged` and should re-read [`Cluster::members`].
    ///
    /// Ordering: the [`Cluster::members`] view is updated *before* the event is sent, so when
    /// an event is handled the view already reflects it. The flip side: a receiver created
    /// just after a change became visible in the view may still receive that change's event.
    /// Subscribe first, then read the view, and treat events idempotently.
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    /// A [`NodeInfo`] for this node with current cores and memory figures.
    pub fn local_node_info(&self, api_addr: impl Into<String>, runners: u32) -> NodeInfo {
        let (mem_total_bytes, mem_free_bytes) = read_meminfo();
        NodeInfo {
            id: self.inner.identity.id.clone(),
            incarnation: self.inner.identity.incarnation,
            api_addr: api_addr.into(),
            cores: available_cores(),
            mem_total_bytes,
            mem_free_bytes,
            runners,
            instances: Vec::new(),
        }
    }

    /// Publishes this node's info to every node (this one included). `id` and `incarnation`
    /// are overwritten with this node's identity. The info is re-published automatically
    /// whenever a node joins, because zenoh does not replay old publications to new peers.
    pub async fn publish_info(&self, info: &NodeInfo) -> Result<(), ClusterError> {
        let mut info = info.clone();
        info.id.clone_from(&self.inner.identity.id);
        info.incarnation = self.inner.identity.incarnation;
        *self
            .inner
            .last_info
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(info.clone());
        self.inner.put_info(&info).await
    }

    /// Sends `request` to `node`'s command handler and waits up to `timeout` for its answer.
    /// The handler learns this node's id as `from` (self-reported, not authenticated).
    ///
    /// [`CommandError::NoSuchNode`] comes back at once when no handler is reachable under that
    /// id. The remote handler is cancelled shortly before `timeout` expires.
    pub async fn command(
        &self,
        node: &str,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CommandError> {
        if !keys::is_valid_node_id(node) {
            return Err(CommandError::NoSuchNode(node.to_owned()));
        }
        let envelope =
            postcard::to_stdvec(&Envelope::new(self.id(), timeout, request)).map_err(|e| {
                CommandError::Codec {
                    node: node.to_owned(),
                    message: format!("cannot encode the command envelope: {e}"),
                }
            })?;
        let replies = self
            .inner
            .session()
            .get(keys::node_command(node))
            .payload(envelope)
            .target(QueryTarget::All)
            .consolidation(ConsolidationMode::None)
            .timeout(timeout)
            .await
            .map_err(|e| {
                CommandError::Transport(format!("cannot send a command to node {node}: {e}"))
            })?;

        // zenoh closes the channel after the final reply, or right away when no queryable
        // matches. Drain it fully so no late reply goes to a dropped receiver (zenoh ERROR log).
        let collect = async {
            let mut outcome: Option<Result<Vec<u8>, CommandError>> = None;
            while let Ok(reply) = replies.recv_async().await {
                let result = match reply.result() {
                    Ok(sample) => Ok(sample.payload().to_bytes().into_owned()),
                    Err(err) => Err(command::error_from_reply(node, timeout, err)),
                };
                // Keep the first success, else the first error.
                if !matches!(outcome, Some(Ok(_))) && (outcome.is_none() || result.is_ok()) {
                    outcome = Some(result);
                }
            }
            outcome
        };
        match tokio::time::timeout(timeout.saturating_add(COMMAND_GRACE), collect).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(CommandError::NoSuchNode(node.to_owned())),
            Err(_) => Err(CommandError::Timeout {
                node: node.to_owned(),
                after: timeout,
            }),
        }
    }

    /// [`Cluster::command`] with postcard-encoded request and response (see
    /// [`crate::typed_handler`] for the serving side).
    pub async fn command_typed<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        node: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CommandError> {
        let bytes = postcard::to_stdvec(request).map_err(|e| CommandError::Codec {
            node: node.to_owned(),
            message: format!("cannot encode the request: {e}"),
        })?;
        let response = self.command(node, bytes, timeout).await?;
        postcard::from_bytes(&response).map_err(|e| CommandError::Codec {
            node: node.to_owned(),
            message: format!("cannot decode the response: {e}"),
        })
    }

    /// A reliable, ordered publisher on `key` (`CongestionControl::Block`).
    pub async fn publisher(&self, key: &str) -> Result<ClusterPublisher, ClusterError> {
        let publisher = self
            .inner
            .session()
            .declare_publisher(key.to_owned())
            .congestion_control(CongestionControl::Block)
            .await
            .map_err(|e| ClusterError::zenoh(format!("declare a publisher on {key}"), e))?;
        Ok(ClusterPublisher {
            key: key.to_owned(),
            publisher,
        })
    }

    /// Subscribes to `key_expr`, yielding `(key, payload)` in arrival order, with a buffer of
    /// [`DEFAULT_STREAM_CAPACITY`] messages. See [`crate::stream`] for the overflow policy:
    /// a reader that falls behind by a full buffer gets the stream **ended**, never a gap.
    /// Dropping the receiver undeclares the subscription.
    pub async fn subscribe(
        &self,
        key_expr: &str,
    ) -> Result<mpsc::Receiver<(String, Vec<u8>)>, ClusterError> {
        self.subscribe_with_capacity(key_expr, DEFAULT_STREAM_CAPACITY)
            .await
    }

    /// [`Cluster::subscribe`] with an explicit buffer size (at least 1).
    pub async fn subscribe_with_capacity(
        &self,
        key_expr: &str,
        capacity: usize,
    ) -> Result<mpsc::Receiver<(String, Vec<u8>)>, ClusterError> {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let forward = Forward::new(key_expr, tx.clone(), capacity);
        let subscriber = {
            let forward = Arc::clone(&forward);
            self.inner
                .session()
                .declare_subscriber(key_expr.to_owned())
                .callback(move |sample| forward.push(sample))
                .await
                .map_err(|e| ClusterError::zenoh(format!("subscribe to {key_expr}"), e))?
        };
        tokio::spawn(stream::watch_subscription(
            forward,
            subscriber,
            tx,
            self.shutdown.subscribe(),
        ));
        Ok(rx)
    }

    /// Leaves the cluster cleanly: withdraws the token (the other nodes see this node leave at
    /// once), the queryable and the subscribers, ends all streams, then closes the session
    /// (bounded by a timeout; failures are logged).
    /// A second call does nothing.
    pub async fn leave(&self) {
        let _ = self.shutdown.send(true);
        let Some(entities) = self
            .entities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if let Err(e) = entities.token.undeclare().await {
            debug!(error = %e, "undeclaring the liveliness token failed");
        }
        if let Err(e) = entities.queryable.undeclare().await {
            debug!(error = %e, "undeclaring the command queryable failed");
        }
        for sub in [entities.token_sub, entities.info_sub] {
            if let Err(e) = sub.undeclare().await {
                debug!(error = %e, "undeclaring a subscriber failed");
            }
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, self.inner.session().close()).await {
            Ok(Ok(())) => info!(id = %self.id(), "left the cluster"),
            Ok(Err(e)) => warn!(id = %self.id(), error = %e, "closing the zenoh session failed"),
            Err(_) => {
                warn!(id = %self.id(), "closing the zenoh session timed out after {CLOSE_TIMEOUT:?}")
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stops the membership task and the stream watchers. The zenoh entities undeclare
        // themselves when dropped; the session is closed by `Inner::drop`.
        let _ = self.shutdown.send(true);
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

fn decode_info(sample: &Sample) -> Option<NodeInfo> {
    if sample.kind() != SampleKind::Put {
        return None;
    }
    let key = sample.key_expr().as_str();
    let id = keys::parse_node_info(key)?;
    match postcard::from_bytes::<NodeInfo>(&sample.payload().to_bytes()) {
        Ok(info) if info.id == id => Some(info),
        Ok(info) => {
            debug!(key, claimed = %info.id, "node info published under another node's key");
            None
        }
        Err(e) => {
            debug!(key, error = %e, "undecodable node info");
            None
        }
    }
}

/// The membership task: the only writer of the membership view.
///
/// Reconciliation: after every change (Joined or Left of another node) the task re-reads the
/// live tokens with `liveliness().get` and merges them. Why: when a link drops and comes back,
/// zenoh delivers the Delete of the old link and the re-sent Put of the new one through
/// different transports, so they can reach us in the wrong order (Put, then a stale Delete),
/// and a duplicate link (two dialers racing, or gossip autoconnect racing a configured connect)
/// being torn down can also produce a Delete for a token that is still live. The subscriber
/// alone would then report a live node as lost, forever. The get reads zenoh's current routing
/// tables and repairs that; merging respects changes seen after the get started (see
/// [`MembershipState::reconcile`]), and at most one get runs at a time.
async fn run_membership(
    mut state: MembershipState,
    mut queue: InputQueue,
    inner: Weak<Inner>,
    members_tx: watch::Sender<Membership>,
    events_tx: broadcast::Sender<MemberEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = state.me().id.clone();
    let mut reconciling = false;
    let mut reconcile_again = false;
    loop {
        if queue.overflow.swap(false, Ordering::AcqRel) {
            // Inputs were dropped: the live tokens are read again, and the
            // infos come back with their next publication.
            debug!(id = %me, "membership inputs overflowed: reconciling");
            if reconciling {
                reconcile_again = true;
            } else {
                reconciling = start_reconcile(&inner, state.seq(), &queue.tx);
            }
        }
        let input = tokio::select! {
            biased;
            // The flag only ever goes false -> true; an error means the Cluster is gone.
            _ = shutdown.changed() => break,
            input = queue.rx.recv() => match input {
                Some(input) => input,
                None => break,
            },
        };
        let outcome: Outcome = match input {
            Input::Token {
                kind: SampleKind::Put,
                id,
                incarnation,
            } => state.on_put(&id, incarnation),
            Input::Token {
                kind: SampleKind::Delete,
                id,
                incarnation,
            } => state.on_delete(&id, incarnation),
            Input::Info(info) => {
                if state.on_info(info) {
                    members_tx.send_replace(state.members().clone());
                }
                continue;
            }
            Input::Reconciled { started, tokens } => {
                reconciling = false;
                let outcome = state.reconcile(started, &tokens);
                if reconcile_again {
                    reconcile_again = false;
                    reconciling = start_reconcile(&inner, state.seq(), &queue.tx);
                }
                outcome
            }
        };
        if let Some(incarnation) = outcome.id_conflict {
            warn!(id = %me, incarnation, "another process announces this node's id; node ids must be unique");
        }
        if outcome.events.is_empty() {
            continue;
        }
        members_tx.send_replace(state.members().clone());
        for event in outcome.events {
            match &event {
                MemberEvent::Joined { id, incarnation } => {
                    info!(local = %me, node = %id, incarnation, "node joined");
                    republish_info(&inner);
                }
                MemberEvent::Left { id, incarnation } => {
                    info!(local = %me, node = %id, incarnation, "node left");
                }
            }
            let _ = events_tx.send(event);
        }
        if reconciling {
            reconcile_again = true;
        } else {
            reconciling = start_reconcile(&inner, state.seq(), &queue.tx);
        }
    }
    debug!(id = %me, "membership task stopped");
}

/// Starts a reconciliation query; false if the cluster is gone.
fn start_reconcile(inner: &Weak<Inner>, started: u64, tx: &mpsc::Sender<Input>) -> bool {
    let Some(inner) = inner.upgrade() else {
        return false;
    };
    let tx = tx.clone();
    tokio::spawn(async move {
        let tokens = inner.live_tokens().await;
        drop(inner);
        let _ = tx.send(Input::Reconciled { started, tokens }).await;
    });
    true
}

/// New peers do not receive earlier publications, so send our last info again.
fn republish_info(inner: &Weak<Inner>) {
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let Some(info) = inner
        .last_info
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    else {
        return;
    };
    tokio::spawn(async move {
        if let Err(e) = inner.put_info(&info).await {
            debug!(error = %e, "re-publishing node info failed");
        }
    });
}
