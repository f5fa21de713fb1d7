//! The node's part in a cluster: runners started for, and driven by, the
//! instances other nodes coordinate; and, as a coordinator, this node's
//! [`RemoteSpawner`].
//!
//! Each remote runner is a *link* with an id unique to its coordinator. The
//! coordinator sends the hosting node `Spawn`, then `Ops` (in order, one
//! command in flight per link); the host relays the runner's events back in
//! `Events` commands (in order, one in flight). Both sides wait for every
//! answer, so an event is either delivered or its sender learns it was not.
//!
//! Invariants:
//! * A runner never outlives its coordinator's interest in it: the host stops
//!   it when the coordinator's token disappears, stops answering pings, or
//!   refuses its events (`UnknownLink`).
//! * The coordinator's instance hears exactly one `Exited` per remote runner:
//!   the relayed one, or a synthetic one ([`ExitCause::NodeLost`]) when the
//!   host is lost or a command to it fails. Whichever comes first takes the
//!   link's event sender; the other finds it gone.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use cluster::{Cluster, ClusterConfig, MemberEvent, NodeIdentity};
use ipc::ChannelStats;
use serde::{Deserialize, Serialize};
use supervisor::instance::SupervisorContext;
use supervisor::process::ExitCause;
use supervisor::remote::{
    RemoteOp, RemoteRunner, RemoteShared, RemoteSpawner, WireEvent, WireSpec,
};
use supervisor::runner_handle::{
    runner_key, ChannelEnd, RunnerEvent, RunnerHandle, RunnerSpec, SendFailure,
};
use tokio::sync::mpsc;

pub use runner::DATA_HOST_ENV;

/// Most events or operations sent in one command.
const BATCH: usize = 256;
/// How long a host gives a runner whose coordinator is gone to stop after
/// SIGTERM before SIGKILL.
const ORPHAN_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Ping,
    Spawn {
        link: String,
        coordinator_incarnation: u64,
        spec: WireSpec,
    },
    Ops {
        link: String,
        ops: Vec<RemoteOp>,
    },
    Events {
        link: String,
        events: Vec<WireEvent>,
        stats: ChannelStats,
        stderr_tail: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Pong,
    Spawned {
        pid: u32,
    },
    Ack,
    /// The link is not (or no longer) known here.
    UnknownLink,
}

/// What `serve` passes for a clustered node.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub cluster: ClusterConfig,
    /// The address other nodes reach this node's runners on.
    pub advertise_host: String,
}

/// Coordinator side of one remote runner.
struct CoordLink {
    node: String,
    node_incarnation: u64,
    rank: u32,
    shared: Arc<RemoteShared>,
    /// Taken by whoever delivers the `Exited`.
    events: tokio::sync::Mutex<Option<mpsc::Sender<(u32, RunnerEvent)>>>,
}

/// Host side of one runner started for another node.
struct Hosted {
    coordinator: String,
    coordinator_incarnation: u64,
    pid: u32,
    ops: mpsc::Sender<RemoteOp>,
    handle: Arc<RunnerHandle>,
    /// Its coordinator is gone: its events have nowhere to go.
    orphaned: AtomicBool,
}

impl Hosted {
    /// The coordinator is lost or unreachable, or no longer knows the
    /// runner: stop it. No runner serves without its coordinator.
    fn orphan(&self, why: &str) {
        if !self.orphaned.swap(true, Ordering::AcqRel) {
            tracing::info!(runner = %self.handle.runner_id, coordinator = %self.coordinator, %why, "coordinator lost: stopping the runner");
        }
        self.handle.request_terminate(true, ORPHAN_GRACE);
    }
}

pub struct Mesh {
    this: Weak<Mesh>,
    cluster: Cluster,
    lease: Duration,
    advertise_host: String,
    program: PathBuf,
    ctx: OnceLock<Weak<SupervisorContext>>,
    links: Mutex<HashMap<String, Arc<CoordLink>>>,
    hosted: Mutex<HashMap<String, Arc<Hosted>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mesh {
    /// Joins the cluster as `identity`. The mesh serves runner commands once
    /// [`Mesh::attach`] gave it the node's supervisor context.
    pub async fn join(
        config: &MeshConfig,
        identity: NodeIdentity,
        program: PathBuf,
    ) -> anyhow::Result<Arc<Mesh>> {
        let slot: Arc<OnceLock<Weak<Mesh>>> = Arc::new(OnceLock::new());
        let handler = {
            let slot = slot.clone();
            cluster::typed_handler(move |from: Option<String>, req: Request| {
                let mesh = slot.get().and_then(Weak::upgrade);
                async move {
                    let mesh = mesh.ok_or("this node is starting or stopping")?;
                    mesh.handle(from.unwrap_or_default(), req).await
                }
            })
        };
        let cluster = Cluster::join(&config.cluster, identity, Arc::new(handler)).await?;
        let mesh = Arc::new_cyclic(|this| Mesh {
            this: this.clone(),
            cluster,
            lease: config.cluster.lease,
            advertise_host: config.advertise_host.clone(),
            program,
            ctx: OnceLock::new(),
            links: Mutex::new(HashMap::new()),
            hosted: Mutex::new(HashMap::new()),
        });
        let _ = slot.set(Arc::downgrade(&mesh));
        tokio::spawn(watch_members(Arc::downgrade(&mesh), mesh.cluster.events()));
        tokio::spawn(ping_peers(Arc::downgrade(&mesh)));
        Ok(mesh)
    }

    pub fn attach(&self, ctx: &Arc<SupervisorContext>) {
        let _ = self.ctx.set(Arc::downgrade(ctx));
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn id(&self) -> &str {
        self.cluster.id()
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn advertise_host(&self) -> &str {
        &self.advertise_host
    }

    /// Runners this node hosts for other nodes' instances.
    pub fn hosted_count(&self) -> usize {
        lock(&self.hosted).len()
    }

    /// `(link, runner pid, coordinator)` of every runner hosted for others.
    pub fn hosted(&self) -> Vec<(String, u32, String)> {
        lock(&self.hosted)
            .iter()
            .map(|(link, h)| (link.clone(), h.pid, h.coordinator.clone()))
            .collect()
    }

    fn alive_incarnation(&self, node: &str) -> Option<u64> {
        self.cluster
            .members()
            .borrow()
            .get(node)
            .filter(|m| m.alive)
            .map(|m| m.incarnation)
    }

    fn command_timeout(&self) -> Duration {
        (self.lease * 2).max(Duration::from_secs(2))
    }

    async fn call(&self, node: &str, req: &Request, timeout: Duration) -> Result<Response, String> {
        self.cluster
            .command_typed::<Request, Response>(node, req, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn handle(self: Arc<Self>, from: String, req: Request) -> Result<Response, String> {
        match req {
            Request::Ping => Ok(Response::Pong),
            Request::Spawn {
                link,
                coordinator_incarnation,
                spec,
            } => {
                self.host_spawn(from, link, coordinator_incarnation, spec)
                    .await
            }
            Request::Ops { link, ops } => {
                let hosted = lock(&self.hosted).get(&link).cloned();
                let Some(hosted) = hosted else {
                    return Ok(Response::UnknownLink);
                };
                if hosted.coordinator != from {
                    return Err(format!("link {link} does not belong to node {from}"));
                }
                for op in ops {
                    if hosted.ops.send(op).await.is_err() {
                        return Ok(Response::UnknownLink);
                    }
                }
                Ok(Response::Ack)
            }
            Request::Events {
                link,
                events,
                stats,
                stderr_tail,
            } => {
                let entry = lock(&self.links).get(&link).cloned();
                let Some(entry) = entry else {
                    return Ok(Response::UnknownLink);
                };
                if entry.node != from {
                    return Err(format!("link {link} is not hosted by node {from}"));
                }
                entry.shared.update(stats, stderr_tail);
                let mut sender = entry.events.lock().await;
                let Some(tx) = sender.as_ref() else {
                    return Ok(Response::UnknownLink);
                };
                for event in events {
                    let last = event.is_exit();
                    // The instance drops its receiver only after every
                    // runner's exit; if it is gone, so is the link.
                    let _ = tx.send((entry.rank, event.into())).await;
                    if last {
                        *sender = None;
                        lock(&self.links).remove(&link);
                        break;
                    }
                }
                Ok(Response::Ack)
            }
        }
    }

    // ---- host side ----

    async fn host_spawn(
        self: Arc<Self>,
        from: String,
        link: String,
        coordinator_incarnation: u64,
        spec: WireSpec,
    ) -> Result<Response, String> {
        if let Some(hosted) = lock(&self.hosted).get(&link) {
            return Ok(Response::Spawned { pid: hosted.pid });
        }
        if self.alive_incarnation(&from) != Some(coordinator_incarnation) {
            return Err(format!(
                "node {from} (incarnation {coordinator_incarnation}) is not a live member as seen from node {}",
                self.id()
            ));
        }
        let ctx = self
            .ctx
            .get()
            .and_then(Weak::upgrade)
            .ok_or("this node is starting or stopping")?;
        let mut spec: RunnerSpec = spec.into_spec(self.program.clone());
        spec.extra_env.retain(|(k, _)| k != DATA_HOST_ENV);
        spec.extra_env
            .push((DATA_HOST_ENV.into(), self.advertise_host.clone()));
        let runner_id = spec.runner_id.clone();
        let (events_tx, events_rx) = mpsc::channel(1024);
        let handle = RunnerHandle::spawn(&ctx.spawner, &ctx.state_dir, spec, events_tx)
            .await
            .map_err(|e| format!("node {}: {e}", self.id()))?;
        let pid = handle.pid;
        let handle = Arc::new(handle);
        let (ops_tx, ops_rx) = mpsc::channel(BATCH);
        let hosted = Arc::new(Hosted {
            coordinator: from.clone(),
            coordinator_incarnation,
            pid,
            ops: ops_tx,
            handle: handle.clone(),
            orphaned: AtomicBool::new(false),
        });
        lock(&self.hosted).insert(link.clone(), hosted.clone());
        tracing::info!(runner = %runner_id, pid, coordinator = %from, "runner started for another node");
        tokio::spawn(apply_ops(handle, ops_rx));
        tokio::spawn(self.clone().uplink(link, hosted, events_rx));
        Ok(Response::Spawned { pid })
    }

    /// Relays a hosted runner's events to its coordinator, in order, until
    /// its exit. A coordinator that cannot be reached or no longer knows the
    /// runner gets it stopped; an orphan's events have nowhere to go, but its
    /// exit is still reported (a coordinator that missed one batch then
    /// learns the runner is gone instead of waiting for it).
    async fn uplink(
        self: Arc<Self>,
        link: String,
        hosted: Arc<Hosted>,
        mut events: mpsc::Receiver<(u32, RunnerEvent)>,
    ) {
        let handle = &hosted.handle;
        while let Some((_, first)) = events.recv().await {
            let mut batch = vec![WireEvent::from(first)];
            while batch.len() < BATCH {
                match events.try_recv() {
                    Ok((_, e)) => batch.push(e.into()),
                    Err(_) => break,
                }
            }
            let exited = batch.iter().any(WireEvent::is_exit);
            if hosted.orphaned.load(Ordering::Acquire) {
                batch.retain(WireEvent::is_exit);
            }
            if !batch.is_empty() {
                let tokens_only = batch
                    .iter()
                    .all(|e| matches!(e, WireEvent::Message(ipc::proto::FromRunner::Token { .. })));
                let req = Request::Events {
                    link: link.clone(),
                    events: batch,
                    stats: handle.channel_stats(),
                    stderr_tail: if tokens_only {
                        Vec::new()
                    } else {
                        handle.stderr_tail(5)
                    },
                };
                let coordinator = &hosted.coordinator;
                let why = match self.call(coordinator, &req, self.command_timeout()).await {
                    Ok(Response::Ack) => None,
                    Ok(Response::UnknownLink) => {
                        Some(format!("node {coordinator} no longer knows it"))
                    }
                    Ok(other) => Some(format!("unexpected answer {other:?}")),
                    Err(e) => Some(e),
                };
                if let (Some(why), false) = (why, exited) {
                    hosted.orphan(&why);
                }
            }
            if exited {
                break;
            }
        }
        lock(&self.hosted).remove(&link);
    }

    /// Stops every runner hosted for `node` (incarnations up to
    /// `incarnation`, or all).
    fn orphan_runners_of(&self, node: &str, incarnation: Option<u64>, why: &str) {
        let hosted: Vec<Arc<Hosted>> = lock(&self.hosted)
            .values()
            .filter(|h| {
                h.coordinator == node && incarnation.is_none_or(|i| h.coordinator_incarnation <= i)
            })
            .cloned()
            .collect();
        for h in hosted {
            h.orphan(why);
        }
    }

    // ---- coordinator side ----

    async fn spawn_remote(
        self: Arc<Self>,
        node: String,
        spec: RunnerSpec,
        events: mpsc::Sender<(u32, RunnerEvent)>,
        timeout: Duration,
    ) -> Result<RemoteRunner, String> {
        let Some(node_incarnation) = self.alive_incarnation(&node) else {
            return Err(format!("node {node} is not a live member of the cluster"));
        };
        let link = format!(
            "{}.{}.{:08x}",
            self.id(),
            runner_key(&spec.runner_id),
            fastrand::u32(..)
        );
        let shared = Arc::new(RemoteShared::default());
        lock(&self.links).insert(
            link.clone(),
            Arc::new(CoordLink {
                node: node.clone(),
                node_incarnation,
                rank: spec.rank,
                shared: shared.clone(),
                events: tokio::sync::Mutex::new(Some(events)),
            }),
        );
        let req = Request::Spawn {
            link: link.clone(),
            coordinator_incarnation: self.cluster.identity().incarnation,
            spec: WireSpec::of(&spec),
        };
        let pid = match self.call(&node, &req, timeout).await {
            Ok(Response::Spawned { pid }) => pid,
            Ok(other) => {
                lock(&self.links).remove(&link);
                return Err(format!("node {node} answered {other:?}"));
            }
            Err(e) => {
                lock(&self.links).remove(&link);
                return Err(e);
            }
        };
        let (ops_tx, ops_rx) = mpsc::channel(BATCH);
        tokio::spawn(self.clone().downlink(link, node.clone(), ops_rx));
        Ok(RemoteRunner::new(
            node,
            pid,
            ops_tx,
            shared,
            spec.heartbeat.timeout,
        ))
    }

    /// Sends a remote runner's operations to its host, in order.
    async fn downlink(
        self: Arc<Self>,
        link: String,
        node: String,
        mut ops: mpsc::Receiver<RemoteOp>,
    ) {
        while let Some(first) = ops.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let req = Request::Ops {
                link: link.clone(),
                ops: batch,
            };
            match self.call(&node, &req, self.command_timeout()).await {
                Ok(Response::Ack) => {}
                // The runner's exit is delivered, or on its way: if it never
                // comes, this link is lost.
                Ok(_) => {
                    self.lose_link(&link, format!("node {node} no longer hosts it"))
                        .await;
                    return;
                }
                Err(e) => {
                    self.lose_link(&link, format!("a command to it failed: {e}"))
                        .await;
                    return;
                }
            }
        }
    }

    /// Ends a remote runner as lost, unless its exit was delivered already.
    async fn lose_link(&self, link: &str, detail: String) {
        let entry = lock(&self.links).remove(link);
        let Some(entry) = entry else { return };
        let tx = entry.events.lock().await.take();
        if let Some(tx) = tx {
            let _ = tx
                .send((
                    entry.rank,
                    RunnerEvent::Exited {
                        cause: ExitCause::NodeLost,
                        channel: ChannelEnd::PeerLost { detail, eof: false },
                        stop: None,
                    },
                ))
                .await;
        }
    }

    /// Everything this node does when `node` is lost.
    async fn node_lost(&self, node: &str, incarnation: Option<u64>, why: &str) {
        let links: Vec<String> = lock(&self.links)
            .iter()
            .filter(|(_, l)| l.node == node && incarnation.is_none_or(|i| l.node_incarnation <= i))
            .map(|(k, _)| k.clone())
            .collect();
        if !links.is_empty() {
            tracing::info!(%node, %why, runners = links.len(), "node lost: failing its runners");
        }
        for link in links {
            self.lose_link(&link, why.to_string()).await;
        }
        self.orphan_runners_of(node, incarnation, why);
    }

    /// The nodes this one depends on: hosts of its remote runners and
    /// coordinators of the runners it hosts.
    fn peers_in_use(&self) -> Vec<String> {
        let mut nodes: Vec<String> = lock(&self.links).values().map(|l| l.node.clone()).collect();
        nodes.extend(lock(&self.hosted).values().map(|h| h.coordinator.clone()));
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Stops every runner hosted for others (the node is stopping).
    pub fn stop_hosted(&self) {
        for h in lock(&self.hosted).values() {
            h.handle.request_terminate(true, ORPHAN_GRACE);
        }
    }

    /// Waits (bounded) until no hosted runner is left.
    pub async fn wait_hosted_gone(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.hosted_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One control-plane round trip to `node`'s command handler.
    pub async fn ping(&self, node: &str) -> Result<Duration, String> {
        let start = std::time::Instant::now();
        match self
            .call(node, &Request::Ping, self.command_timeout())
            .await?
        {
            Response::Pong => Ok(start.elapsed()),
            other => Err(format!("node {node} answered {other:?} to a ping")),
        }
    }

    pub async fn leave(&self) {
        self.cluster.leave().await;
    }
}

impl RemoteSpawner for Mesh {
    fn spawn(
        &self,
        node: String,
        spec: RunnerSpec,
        events: mpsc::Sender<(u32, RunnerEvent)>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<RemoteRunner, String>> + Send>> {
        let this = self.this.upgrade();
        Box::pin(async move {
            let mesh = this.ok_or("this node is stopping")?;
            mesh.spawn_remote(node, spec, events, timeout).await
        })
    }
}

/// Applies a coordinator's operations to a hosted runner, in order.
async fn apply_ops(handle: Arc<RunnerHandle>, mut ops: mpsc::Receiver<RemoteOp>) {
    while let Some(op) = ops.recv().await {
        match op {
            RemoteOp::Send(msg) => {
                if let Err(e @ SendFailure::Stuck(_)) = handle.send(msg).await {
                    // The coordinator would fail it for this; its exit tells.
                    tracing::info!(runner = %handle.runner_id, error = %e, "runner stuck: killing it");
                    handle.request_terminate(false, Duration::ZERO);
                }
            }
            RemoteOp::Control(c) => {
                handle.control(c).await;
            }
            RemoteOp::Close(reason) => handle.close(&reason).await,
            RemoteOp::Terminate {
                term_first,
                grace_ms,
            } => handle.request_terminate(term_first, Duration::from_millis(grace_ms)),
        }
    }
}

/// Turns membership changes into node losses.
async fn watch_members(
    mesh: Weak<Mesh>,
    mut events: tokio::sync::broadcast::Receiver<MemberEvent>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = events.recv().await;
        let Some(mesh) = mesh.upgrade() else { return };
        match event {
            Ok(MemberEvent::Left { id, incarnation }) => {
                mesh.node_lost(&id, Some(incarnation), "its liveliness token disappeared")
                    .await
            }
            Ok(MemberEvent::Joined { .. }) => {}
            Err(RecvError::Lagged(_)) => {
                // Re-read the view: any node in use that is not alive is lost.
                for node in mesh.peers_in_use() {
                    if mesh.alive_incarnation(&node).is_none() {
                        mesh.node_lost(&node, None, "its liveliness token disappeared")
                            .await;
                    }
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// A token proves a connection, not a working node: every node this one
/// depends on is pinged every half lease; one that does not answer within
/// two leases is lost.
async fn ping_peers(mesh: Weak<Mesh>) {
    let interval = match mesh.upgrade() {
        Some(m) => m.lease / 2,
        None => return,
    };
    let in_flight: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    loop {
        tokio::time::sleep(interval).await;
        let Some(m) = mesh.upgrade() else { return };
        for node in m.peers_in_use() {
            if !lock(&in_flight).insert(node.clone()) {
                continue;
            }
            let m = m.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let timeout = m.command_timeout();
                let result = m.call(&node, &Request::Ping, timeout).await;
                if let Err(e) = result {
                    let why = format!("its ping failed: {e}");
                    m.node_lost(&node, None, &why).await;
                }
                lock(&in_flight).remove(&node);
            });
        }
    }
}
