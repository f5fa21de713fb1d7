//! A channel end: a [`Sender`] and a [`Receiver`] driven by two tasks, one
//! owning the read half of the stream and one owning the write half.
//!
//! Ownership (invariant 1, one owner, ARCHITECTURE.md): the reader task alone reads the
//! socket and alone decides the receive outcome (`End` or `PeerLost`); the
//! writer task alone writes it. Applications talk to them through bounded
//! queues and never close anything from the side.
//!
//! Flow control: the reader grants the peer `window` data credits up front and
//! more as the application consumes messages, so the reader never has more
//! data than its inbox holds and never blocks on it: control frames are read
//! and delivered however slow the application is. The writer sends control
//! frames before any queued data.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, Notify};

use crate::frame::{self, Control, Frame, FrameError, FrameRef};
use crate::state::{ChannelState, EofKind};
use crate::stats::{ChannelStats, Counters};
use crate::transport::Transport;

/// Settings of one channel end. Both ends may differ: credits are granted
/// explicitly, so each end's `window` only sizes its own inbox.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Shown in stats and logs, e.g. `node->runner-2`.
    pub name: String,
    /// Data messages the receiver buffers; the peer sends no more than this
    /// without new credit.
    pub window: u32,
    /// Largest encoded frame accepted in either direction.
    pub max_frame: usize,
    /// Bound of the outgoing control queue.
    pub control_capacity: usize,
}

impl ChannelConfig {
    pub fn named(name: impl Into<String>) -> Self {
        ChannelConfig {
            name: name.into(),
            window: 64,
            max_frame: frame::DEFAULT_MAX_FRAME,
            control_capacity: 64,
        }
    }
}

/// What [`Receiver::recv`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming<T> {
    Data(T),
    Control(Control),
    /// The peer closed its direction with `End`; every message it sent
    /// before was yielded.
    End {
        reason: String,
    },
    /// The peer went away without `End`.
    PeerLost(PeerLost),
}

/// A stream that stopped without `End`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer lost after {received} messages: {detail}")]
pub struct PeerLost {
    /// Data messages received before the loss (all of them were yielded).
    pub received: u64,
    /// What happened: EOF, a reset, or the malformed frame.
    pub detail: String,
    /// The stream just ended (EOF) without `End`: the peer process went
    /// away. False for a reset, a read error or a malformed frame, which
    /// say more than that the peer is gone.
    pub eof: bool,
}

/// A message that was not accepted, returned to the caller.
#[derive(thiserror::Error)]
pub enum SendError<T> {
    #[error("channel {channel} is {state:?}: message not sent")]
    Closed {
        msg: T,
        channel: String,
        state: ChannelState,
    },
    #[error("message not sent on channel {channel}: {error}")]
    Frame {
        msg: T,
        channel: String,
        error: FrameError,
    },
}

impl<T> SendError<T> {
    pub fn into_inner(self) -> T {
        match self {
            SendError::Closed { msg, .. } | SendError::Frame { msg, .. } => msg,
        }
    }
}

impl<T> std::fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// How the receive side ended; written once by the reader task.
#[derive(Debug, Clone)]
enum Terminal {
    End { reason: String },
    Lost(PeerLost),
}

enum Outgoing {
    Data(Vec<u8>),
    End(Vec<u8>),
}

struct Shared {
    counters: Arc<Counters>,
    max_frame: usize,
    /// Credits granted by the peer and not yet taken by the writer.
    credits: AtomicU32,
    credit_notify: Notify,
    terminal: Mutex<Option<Terminal>>,
    /// Frames handed to the socket buffer but not yet flushed.
    unflushed: std::sync::atomic::AtomicBool,
    /// Notified after every flush and when the writer stops.
    flush_notify: Notify,
}

impl Shared {
    fn terminal(&self) -> Option<Terminal> {
        self.terminal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Sending half of a channel end. Cheap to clone; all clones feed one queue.
pub struct Sender<T> {
    shared: Arc<Shared>,
    data_tx: mpsc::Sender<Outgoing>,
    ctrl_tx: mpsc::Sender<Vec<u8>>,
    writer_done: watch::Receiver<bool>,
    _msg: PhantomData<fn(T)>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            shared: self.shared.clone(),
            data_tx: self.data_tx.clone(),
            ctrl_tx: self.ctrl_tx.clone(),
            writer_done: self.writer_done.clone(),
            _msg: PhantomData,
        }
    }
}

/// Receiving half of a channel end.
pub struct Receiver<T> {
    shared: Arc<Shared>,
    data_rx: mpsc::Receiver<T>,
    ctrl_rx: mpsc::Receiver<Control>,
    ctrl_tx: mpsc::Sender<Vec<u8>>,
    window: u32,
    consumed_since_grant: u32,
    terminal_yielded: bool,
}

/// Starts a channel end over `stream`: spawns its reader and writer tasks on
/// the current tokio runtime.
pub fn channel<Out, In, S>(stream: S, config: ChannelConfig) -> (Sender<Out>, Receiver<In>)
where
    Out: Serialize + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    S: Transport,
{
    let window = config.window.max(1);
    let counters = Counters::new(config.name);
    let shared = Arc::new(Shared {
        counters,
        max_frame: config.max_frame,
        credits: AtomicU32::new(0),
        credit_notify: Notify::new(),
        terminal: Mutex::new(None),
        unflushed: std::sync::atomic::AtomicBool::new(false),
        flush_notify: Notify::new(),
    });
    let (rd, wr) = stream.into_split();
    let (data_tx, data_out_rx) = mpsc::channel::<Outgoing>(window as usize);
    let (ctrl_tx, ctrl_out_rx) = mpsc::channel::<Vec<u8>>(config.control_capacity.max(2));
    let (inbox_tx, inbox_rx) = mpsc::channel::<In>(window as usize);
    let (ctrl_in_tx, ctrl_in_rx) = mpsc::channel::<Control>(config.control_capacity.max(2));
    let (done_tx, done_rx) = watch::channel(false);
    let (recv_done_tx, recv_done_rx) = watch::channel(false);

    // The first frame grants the peer its initial window. The queue is empty
    // and has room, so this cannot fail.
    let grant = frame::encode(&FrameRef::<()>::Credit(window), usize::MAX).unwrap_or_default();
    let _ = ctrl_tx.try_send(grant);

    tokio::spawn(read_loop(
        rd,
        shared.clone(),
        inbox_tx,
        ctrl_in_tx,
        recv_done_tx,
    ));
    tokio::spawn(write_loop(
        wr,
        shared.clone(),
        data_out_rx,
        ctrl_out_rx,
        done_tx,
        recv_done_rx,
    ));

    let sender = Sender {
        shared: shared.clone(),
        data_tx,
        ctrl_tx: ctrl_tx.clone(),
        writer_done: done_rx,
        _msg: PhantomData,
    };
    let receiver = Receiver {
        shared,
        data_rx: inbox_rx,
        ctrl_rx: ctrl_in_rx,
        ctrl_tx,
        window,
        consumed_since_grant: 0,
        terminal_yielded: false,
    };
    (sender, receiver)
}

impl<T: Serialize> Sender<T> {
    /// Queues `msg` for the peer, waiting while the queue is full.
    ///
    /// Errors return the message: the channel is closing, closed or lost, or
    /// the message does not fit in a frame.
    pub async fn send(&self, msg: T) -> Result<(), SendError<T>> {
        let bytes = match frame::encode(&FrameRef::Data(&msg), self.shared.max_frame) {
            Ok(bytes) => bytes,
            Err(error) => {
                return Err(SendError::Frame {
                    msg,
                    channel: self.name(),
                    error,
                })
            }
        };
        let Ok(permit) = self.data_tx.reserve().await else {
            return Err(self.closed_error(msg));
        };
        // Deciding and enqueueing under one lock orders this message
        // strictly before or after a concurrent close's `End`.
        let counters = &self.shared.counters;
        let core = counters.core();
        if !core.accepts_data() {
            let state = core.state();
            drop(core);
            return Err(SendError::Closed {
                msg,
                channel: self.name(),
                state,
            });
        }
        counters.sent.fetch_add(1, Ordering::Relaxed);
        counters.queued.fetch_add(1, Ordering::Relaxed);
        permit.send(Outgoing::Data(bytes));
        Ok(())
    }

    fn closed_error(&self, msg: T) -> SendError<T> {
        SendError::Closed {
            msg,
            channel: self.name(),
            state: self.state(),
        }
    }
}

impl<T> Sender<T> {
    /// Announces the end of this direction: `End { reason }` is written after
    /// every message already accepted. Idempotent. Returns the channel state
    /// as an error when the peer is already lost.
    pub async fn close(&self, reason: impl Into<String>) -> Result<(), ChannelState> {
        let bytes = frame::encode_end(&reason.into());
        let Ok(permit) = self.data_tx.reserve().await else {
            let state = self.state();
            return if state == ChannelState::PeerLost {
                Err(state)
            } else {
                Ok(())
            };
        };
        let mut core = self.shared.counters.core();
        if core.begin_close() {
            permit.send(Outgoing::End(bytes));
            Ok(())
        } else if core.state() == ChannelState::PeerLost {
            Err(ChannelState::PeerLost)
        } else {
            Ok(())
        }
    }

    /// Sends a control frame ahead of any queued data.
    pub async fn send_control(&self, control: Control) -> Result<(), Control> {
        if self.state() == ChannelState::PeerLost {
            return Err(control);
        }
        let bytes = match frame::encode(&FrameRef::<()>::Control(&control), usize::MAX) {
            Ok(bytes) => bytes,
            Err(_) => return Err(control),
        };
        self.ctrl_tx.send(bytes).await.map_err(|_| control)
    }

    /// Resolves once the writer task has stopped: after `End` was flushed,
    /// or when the peer is gone.
    pub async fn finished(&self) {
        let mut done = self.writer_done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Resolves once every message accepted so far was written to the
    /// socket, or the writer stopped. Lets a process make sure its last
    /// words left before it exits.
    pub async fn flushed(&self) {
        loop {
            let notified = self.shared.flush_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let idle = self.shared.counters.queued.load(Ordering::Acquire) == 0
                && !self.shared.unflushed.load(Ordering::Acquire);
            if idle || *self.writer_done.borrow() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once our `End` reached the socket, or the writer stopped
    /// (the peer is gone). Call after [`Sender::close`].
    pub async fn end_written(&self) {
        loop {
            let notified = self.shared.flush_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let written =
                self.shared.counters.core().send_side() == crate::state::SendSide::EndWritten;
            if written || *self.writer_done.borrow() {
                return;
            }
            notified.await;
        }
    }

    pub fn state(&self) -> ChannelState {
        self.shared.counters.core().state()
    }

    pub fn stats(&self) -> ChannelStats {
        self.shared.counters.snapshot()
    }

    pub fn name(&self) -> String {
        self.shared.counters.name.clone()
    }
}

impl<T> Receiver<T> {
    /// The next event. Control frames come first; data in order; then exactly
    /// one of `End` or `PeerLost`. After that, calls return further control
    /// frames while the peer still sends them, then the same end again.
    pub async fn recv(&mut self) -> Incoming<T> {
        if self.terminal_yielded {
            return match self.ctrl_rx.recv().await {
                Some(control) => Incoming::Control(control),
                None => self.terminal(),
            };
        }
        tokio::select! {
            biased;
            Some(control) = self.ctrl_rx.recv() => Incoming::Control(control),
            data = self.data_rx.recv() => match data {
                Some(msg) => {
                    self.consumed(1).await;
                    Incoming::Data(msg)
                }
                None => {
                    self.terminal_yielded = true;
                    self.terminal()
                }
            },
        }
    }

    async fn consumed(&mut self, n: u32) {
        self.consumed_since_grant += n;
        if self.consumed_since_grant >= (self.window / 2).max(1) {
            let grant = FrameRef::<()>::Credit(self.consumed_since_grant);
            let bytes = frame::encode(&grant, usize::MAX).unwrap_or_default();
            // The writer drains this queue on its own; if it is gone, so is the
            // peer, and credit no longer matters.
            if self.ctrl_tx.send(bytes).await.is_ok() {
                self.consumed_since_grant = 0;
            }
        }
    }

    fn terminal(&self) -> Incoming<T> {
        match self.shared.terminal() {
            Some(Terminal::End { reason }) => Incoming::End { reason },
            Some(Terminal::Lost(lost)) => Incoming::PeerLost(lost),
            // The reader drops the inbox only after writing the terminal.
            None => Incoming::PeerLost(PeerLost {
                received: self.shared.counters.received.load(Ordering::Relaxed),
                detail: "reader stopped without an outcome".into(),
                eof: false,
            }),
        }
    }

    pub fn state(&self) -> ChannelState {
        self.shared.counters.core().state()
    }

    pub fn stats(&self) -> ChannelStats {
        self.shared.counters.snapshot()
    }
}

async fn read_loop<T, R>(
    mut rd: R,
    shared: Arc<Shared>,
    inbox: mpsc::Sender<T>,
    ctrl_in: mpsc::Sender<Control>,
    recv_done: watch::Sender<bool>,
) where
    T: DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    let counters = &shared.counters;
    let mut inbox = Some(inbox);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let outcome: Result<(), String> = 'read: loop {
        let mut start = 0;
        loop {
            let (frame, used) = match frame::decode::<T>(&buf[start..], shared.max_frame) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(e) => break 'read Err(e.to_string()),
            };
            start += used;
            match frame {
                Frame::Data(msg) => {
                    let Some(tx) = &inbox else {
                        break 'read Err("data frame after end".into());
                    };
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    match tx.try_send(msg) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            break 'read Err("peer exceeded its credit window".into())
                        }
                        // The application dropped its receiver: it no longer
                        // wants data, so discarding it is what it asked for.
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                Frame::End { reason } => {
                    if inbox.is_none() {
                        break 'read Err("second end frame".into());
                    }
                    counters.core().end_received();
                    *shared.terminal.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Terminal::End { reason });
                    inbox = None;
                    let _ = recv_done.send(true);
                }
                Frame::Control(control @ (Control::Ping { .. } | Control::Pong { .. })) => {
                    // Liveness probes are idempotent: when the application is
                    // so far behind that its control queue is full, a dropped
                    // probe shows up as the missed pong it really is.
                    let _ = ctrl_in.try_send(control);
                }
                Frame::Control(control) => {
                    let _ = ctrl_in.send(control).await;
                }
                Frame::Credit(n) => {
                    shared.credits.fetch_add(n, Ordering::AcqRel);
                    shared.credit_notify.notify_one();
                }
            }
        }
        buf.drain(..start);
        // Read at least the rest of the frame being assembled, in big steps.
        let want = pending_frame_len(&buf)
            .unwrap_or(0)
            .saturating_sub(buf.len())
            .max(64 * 1024);
        buf.reserve(want);
        match rd.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => break Ok(()),
            Ok(0) => break Err(format!("eof inside a frame ({} bytes buffered)", buf.len())),
            Ok(n) => {
                counters
                    .bytes_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                counters.touch();
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let kind = counters.core().eof();
    if kind == EofKind::Lost {
        let eof = outcome.is_ok();
        let detail = match outcome {
            Ok(()) => "eof without end".to_string(),
            Err(e) => e,
        };
        let received = counters.received.load(Ordering::Relaxed);
        tracing::debug!(channel = %counters.name, received, %detail, "peer lost");
        *shared.terminal.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Terminal::Lost(PeerLost {
                received,
                detail,
                eof,
            }));
    }
    drop(inbox);
    let _ = recv_done.send(true);
}

fn pending_frame_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; frame::HEADER_LEN] = buf.get(..frame::HEADER_LEN)?.try_into().ok()?;
    Some(frame::HEADER_LEN + u32::from_le_bytes(header) as usize)
}

async fn write_loop<W>(
    wr: W,
    shared: Arc<Shared>,
    mut data_rx: mpsc::Receiver<Outgoing>,
    mut ctrl_rx: mpsc::Receiver<Vec<u8>>,
    done: watch::Sender<bool>,
    mut recv_done: watch::Receiver<bool>,
) where
    W: tokio::io::AsyncWrite + Unpin,
{
    let counters = &shared.counters;
    let mut wr = BufWriter::with_capacity(64 * 1024, wr);
    let mut credits: u32 = 0;
    let mut data_open = true;
    let mut ctrl_open = true;
    let mut end_written = false;
    let result: std::io::Result<()> = async {
        loop {
            credits += shared.credits.swap(0, Ordering::AcqRel);
            let recv_finished = *recv_done.borrow();
            if recv_finished && counters.core().state() == ChannelState::PeerLost {
                return Ok(());
            }
            let no_more_data = end_written || !data_open;
            // Control frames only matter while the peer may still send data.
            if no_more_data && (!ctrl_open || recv_finished) {
                return Ok(());
            }
            let want_data = data_open && !end_written;
            tokio::select! {
                biased;
                control = ctrl_rx.recv(), if ctrl_open => match control {
                    Some(bytes) => write_counted(&mut wr, &shared, &bytes).await?,
                    None => ctrl_open = false,
                },
                out = data_rx.recv(), if want_data && credits > 0 => match out {
                    Some(Outgoing::Data(bytes)) => {
                        credits -= 1;
                        // Mark unflushed before the queue looks empty, so
                        // `flushed` never sees neither.
                        shared.unflushed.store(true, Ordering::Release);
                        counters.queued.fetch_sub(1, Ordering::AcqRel);
                        write_counted(&mut wr, &shared, &bytes).await?;
                    }
                    Some(Outgoing::End(bytes)) => {
                        write_counted(&mut wr, &shared, &bytes).await?;
                        wr.flush().await?;
                        end_written = true;
                        counters.core().end_written();
                        shared.unflushed.store(false, Ordering::Release);
                        shared.flush_notify.notify_waiters();
                    }
                    None => data_open = false,
                },
                _ = shared.credit_notify.notified(), if want_data && credits == 0 => {}
                _ = recv_done.changed(), if !recv_finished => {}
            }
            let data_ready = want_data && credits > 0 && !data_rx.is_empty();
            if ctrl_rx.is_empty() && !data_ready && shared.unflushed.load(Ordering::Acquire) {
                wr.flush().await?;
                shared.unflushed.store(false, Ordering::Release);
                shared.flush_notify.notify_waiters();
            }
        }
    }
    .await;
    let flushed = match result {
        Ok(()) => wr.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = flushed {
        if counters.core().write_failed() == EofKind::Lost {
            tracing::debug!(channel = %counters.name, error = %e, "write failed: peer lost");
        }
    }
    let _ = wr.into_inner().shutdown().await;
    shared.unflushed.store(false, Ordering::Release);
    // Whatever is still queued can no longer be written; closing the queue
    // makes every later send fail with its message returned.
    data_rx.close();
    let _ = done.send(true);
    shared.flush_notify.notify_waiters();
}

async fn write_counted<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    shared: &Shared,
    bytes: &[u8],
) -> std::io::Result<()> {
    let counters = &shared.counters;
    shared.unflushed.store(true, Ordering::Release);
    wr.write_all(bytes).await?;
    counters
        .bytes_sent
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    counters.touch();
    Ok(())
}
