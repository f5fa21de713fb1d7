//! The data plane between runners: TCP links (`TCP_NODELAY`) carrying
//! [`LinkMsg`] over `ipc` channels, so they get the same framing, `End` /
//! `PeerLost` semantics and flow control as the node channel.
//!
//! Topologies: a **ring** for pipelines (rank i sends to i+1, the last rank
//! sends the sampled token back to rank 0) and a **star** for tensor
//! parallelism (every rank linked to rank 0, which sums the partials).
//! Links are set up during `Connecting`, the dialing side retrying with
//! backoff until the phase deadline; each side names itself first (`Hello`).
//!
//! The engine thread is synchronous: it drives links through a runtime
//! handle (`Handle::block_on`) while the runner's main thread keeps the
//! runtime turning. Every wait is bounded by the caller's deadline or ends
//! with the link (`End` or `PeerLost`).

use std::time::{Duration, Instant};

use engine::sampler::Scored;
use engine::EngineError;
use ipc::{Blob, ChannelConfig, Incoming};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

use ipc::proto::Sampling;

use crate::prefix::Reuse;

/// Activations can be large (a long prompt's prefill): raise the frame cap.
const LINK_MAX_FRAME: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LinkMsg {
    /// First message on every link: who is speaking.
    Hello {
        rank: u32,
    },
    /// Pipeline: the hidden states of one batched step, the rows of `seqs`
    /// stacked in order, for the next stage; each sequence's sampling rides
    /// along until the last stage samples.
    Activations {
        seqs: Vec<SeqMeta>,
        data: Blob,
    },
    /// Pipeline: what the last stage made of each sequence of a step, in
    /// the step's order, back to rank 0.
    Results {
        results: Vec<SeqResult>,
    },
    /// The task is over: free its KV cache.
    Finish {
        task_id: String,
    },
    /// Tensor: rank 0 starts a batched step on every rank: `tokens` are the
    /// sequences' next tokens, stacked in order.
    TpStep {
        seqs: Vec<TpSeq>,
        tokens: Vec<u32>,
    },
    /// Tensor: a rank's partial sum, and the reduced sum back.
    Partial {
        data: Blob,
    },
    Reduced {
        data: Blob,
    },
    /// A stage could not compute a step: every sequence of it fails.
    Failed {
        cause: String,
    },
    /// Prefix reuse (`crate::prefix`): keep the first `len` positions of a
    /// task's KV as an entry, and drop entries evicted. Sent by rank 0 after
    /// the task's prompt landed, passed on down a pipeline.
    Prefix {
        keep: Option<Keep>,
        forget: Vec<u64>,
    },
}

/// A prompt prefix to keep for reuse.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Keep {
    pub task_id: String,
    pub entry: u64,
    pub len: u32,
}

/// One sequence of a pipeline step: `len` rows at positions `pos..`.
/// `sample` is false for a chunk of a prompt that is not its last: the last
/// stage then answers `Prefilled` instead of sampling. With `score`, the
/// last stage also scores the prompt tokens that follow the chunk's
/// positions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeqMeta {
    pub task_id: String,
    pub pos: u32,
    pub len: u32,
    /// A sequence's first step that starts from a kept prefix: the entry
    /// and how many of its positions (`pos` is then that many).
    pub reuse: Option<Reuse>,
    pub sampling: Sampling,
    pub sample: bool,
    pub score: Option<ScoreTargets>,
}

/// One sequence of a tensor step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TpSeq {
    pub task_id: String,
    pub pos: u32,
    pub len: u32,
    /// As [`SeqMeta::reuse`].
    pub reuse: Option<Reuse>,
}

/// The last stage's answer for one sequence of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeqResult {
    pub task_id: String,
    pub outcome: Result<SeqDone, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SeqDone {
    /// The token sampled, with its log-probabilities when the task asked
    /// (see `engine::sampler::Sampled`) and the chunk's scores when asked.
    Token {
        token: u32,
        logprobs: Option<Scored>,
        scores: Vec<Scored>,
    },
    /// A prompt chunk was processed (no token), with its scores when asked.
    Prefilled { scores: Vec<Scored> },
}

/// The prompt tokens a chunk's logits score: `targets[i]` under the logits
/// after the chunk's `i`-th position, with the `top` most likely
/// alternatives (see `engine::sampler::score_rows`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreTargets {
    pub top: u8,
    pub targets: Vec<u32>,
}

/// How a link stopped yielding messages.
#[derive(Debug)]
pub enum LinkEnd {
    /// The peer announced the end (graceful).
    Ended,
    /// The peer vanished; the text names the peer and what happened. As an
    /// error it is `EngineError::Link`, so the node can tell an echo of a
    /// peer's death from a failure of the runner itself.
    Lost(String),
}

pub struct Link {
    pub peer_rank: u32,
    tx: ipc::Sender<LinkMsg>,
    rx: ipc::Receiver<LinkMsg>,
}

impl Link {
    pub fn send(&self, handle: &Handle, msg: LinkMsg) -> Result<(), EngineError> {
        handle
            .block_on(self.tx.send(msg))
            .map_err(|e| EngineError::Link(format!("link to rank {} lost: {e}", self.peer_rank)))
    }

    /// The next message; control frames are skipped.
    pub fn recv(&mut self, handle: &Handle) -> Result<LinkMsg, LinkEnd> {
        handle.block_on(async {
            loop {
                match self.rx.recv().await {
                    Incoming::Data(msg) => return Ok(msg),
                    Incoming::Control(_) => {}
                    Incoming::End { .. } => return Err(LinkEnd::Ended),
                    Incoming::PeerLost(lost) => {
                        return Err(LinkEnd::Lost(format!(
                            "link to rank {} lost: {lost}",
                            self.peer_rank
                        )))
                    }
                }
            }
        })
    }

    /// Like [`Link::recv`], but an end of the link is an engine error.
    pub fn expect(&mut self, handle: &Handle) -> Result<LinkMsg, EngineError> {
        self.recv(handle).map_err(|end| match end {
            LinkEnd::Ended => EngineError::Link(format!("rank {} ended its link", self.peer_rank)),
            LinkEnd::Lost(detail) => EngineError::Link(detail),
        })
    }

    /// Announces the end of our direction and waits (bounded) until the
    /// `End` frame reached the socket, so it is not lost when this process
    /// exits right after.
    pub fn close(&self, handle: &Handle) {
        handle.block_on(async {
            let _ = self.tx.close("shutdown").await;
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tx.end_written()).await;
        });
    }
}

/// The env var naming the address to bind the data-plane listener on: one
/// the other nodes reach (set by the node; loopback when unset).
pub const DATA_HOST_ENV: &str = "SHARDVISOR_DATA_HOST";

/// Binds the listener peers dial. Called from the runtime's own thread
/// (inside its context), so it does not block on the runtime.
pub fn listen() -> std::io::Result<(TcpListener, String)> {
    let host = std::env::var(DATA_HOST_ENV).unwrap_or_else(|_| "127.0.0.1".into());
    let listener = std::net::TcpListener::bind((host.as_str(), 0))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    Ok((TcpListener::from_std(listener)?, addr))
}

fn link_config(rank: u32, peer: u32) -> ChannelConfig {
    let mut config = ChannelConfig::named(format!("link:{rank}<->{peer}"));
    config.max_frame = LINK_MAX_FRAME;
    config.window = 16;
    config
}

async fn dial(rank: u32, peer: u32, addr: &str, deadline: Instant) -> Result<Link, EngineError> {
    let mut backoff = Duration::from_millis(10);
    let stream = loop {
        match TcpStream::connect(addr).await {
            Ok(stream) => break stream,
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::debug!(peer, %addr, error = %e, "link connect retry");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(EngineError::Link(format!(
                    "cannot connect to rank {peer} at {addr} before the deadline: {e}"
                )))
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let (tx, rx) = ipc::channel::<LinkMsg, LinkMsg, _>(stream, link_config(rank, peer));
    tx.send(LinkMsg::Hello { rank })
        .await
        .map_err(|e| EngineError::Link(format!("link to rank {peer}: {e}")))?;
    Ok(Link {
        peer_rank: peer,
        tx,
        rx,
    })
}

async fn accept(rank: u32, listener: &TcpListener, deadline: Instant) -> Result<Link, EngineError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let (stream, from) = tokio::time::timeout(left, listener.accept())
        .await
        .map_err(|_| EngineError::Link("no peer connected before the deadline".into()))?
        .map_err(|e| EngineError::Link(format!("accepting a link: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = ipc::channel::<LinkMsg, LinkMsg, _>(stream, link_config(rank, u32::MAX));
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, rx.recv()).await {
        Ok(Incoming::Data(LinkMsg::Hello { rank: peer_rank })) => Ok(Link { peer_rank, tx, rx }),
        Ok(other) => Err(EngineError::Link(format!(
            "link from {from} did not start with hello: {other:?}"
        ))),
        Err(_) => Err(EngineError::Link(format!(
            "link from {from} sent no hello before the deadline"
        ))),
    }
}

fn peer_addr(peers: &[String], rank: u32) -> Result<&str, EngineError> {
    peers
        .get(rank as usize)
        .filter(|a| !a.is_empty())
        .map(String::as_str)
        .ok_or_else(|| EngineError::Link(format!("no data-plane address for rank {rank}")))
}

/// Pipeline ring: returns (prev, next). With one rank there is no link.
pub fn connect_ring(
    handle: &Handle,
    listener: &TcpListener,
    rank: u32,
    world: u32,
    peers: &[String],
    deadline: Instant,
) -> Result<Option<(Link, Link)>, EngineError> {
    if world < 2 {
        return Ok(None);
    }
    let next_rank = (rank + 1) % world;
    let prev_rank = (rank + world - 1) % world;
    let next_addr = peer_addr(peers, next_rank)?.to_string();
    handle.block_on(async {
        let (next, prev) = tokio::join!(
            dial(rank, next_rank, &next_addr, deadline),
            accept(rank, listener, deadline)
        );
        let (next, prev) = (next?, prev?);
        if prev.peer_rank != prev_rank {
            return Err(EngineError::Link(format!(
                "expected the link from rank {prev_rank}, rank {} connected",
                prev.peer_rank
            )));
        }
        Ok(Some((prev, next)))
    })
}

/// Tensor star: rank 0 gets a link to every other rank (in rank order);
/// every other rank one link, to rank 0.
pub fn connect_star(
    handle: &Handle,
    listener: &TcpListener,
    rank: u32,
    world: u32,
    peers: &[String],
    deadline: Instant,
) -> Result<Vec<Link>, EngineError> {
    if world < 2 {
        return Ok(Vec::new());
    }
    if rank != 0 {
        let addr = peer_addr(peers, 0)?.to_string();
        return handle.block_on(async { Ok(vec![dial(rank, 0, &addr, deadline).await?]) });
    }
    handle.block_on(async {
        let mut links = Vec::new();
        for _ in 1..world {
            links.push(accept(rank, listener, deadline).await?);
        }
        links.sort_by_key(|l| l.peer_rank);
        let ranks: Vec<u32> = links.iter().map(|l| l.peer_rank).collect();
        if ranks != (1..world).collect::<Vec<_>>() {
            return Err(EngineError::Link(format!(
                "unexpected peers linked to rank 0: {ranks:?}"
            )));
        }
        Ok(links)
    })
}
