//! One runner process and the task that owns it.
//!
//! [`RunnerHandle::spawn`] starts the process (orphan-proof, see
//! [`crate::process`]) and a watcher task that alone owns the
//! [`RunnerProcess`] and the channel's receiving half. The watcher forwards
//! every message to the instance, answers for the heartbeat, and ends with
//! exactly one [`RunnerEvent::Exited`] once the process was reaped *and* its
//! channel reached `End` or `PeerLost` — so the instance learns of the exit
//! after every message the runner managed to send.
//!
//! Hang detection: a ping every `interval`; a ping left without a pong for
//! `timeout` means the runner is hung: it is SIGKILLed (the shutdown's kill phase) and
//! reported as [`RunnerEvent::Hung`] before its exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipc::proto::{FromRunner, ToRunner};
use ipc::{ChannelConfig, ChannelStats, Control, Incoming};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::logs::{pump_lines, LogRing, Stream};
use crate::process::{ExitCause, RunnerCommand, RunnerProcess, Spawner, StopOutcome};
use crate::statedir::StateDir;

/// After the channel was lost, how long the process may take to exit by
/// itself (a crash closes the socket a moment before the exit is seen)
/// before it is killed: a runner whose channel broke is of no use.
const EXIT_AFTER_LOSS: Duration = Duration::from_millis(200);
/// After the exit, how long to wait for the channel to reach its end (the
/// rest of what the runner sent, then EOF).
const CHANNEL_AFTER_EXIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RunnerSpec {
    pub instance_id: String,
    /// `<instance>/<rank>`.
    pub runner_id: String,
    pub rank: u32,
    pub world_size: u32,
    pub engine_config: String,
    /// The `shardvisor` binary to re-execute.
    pub program: PathBuf,
    pub heartbeat: Heartbeat,
    /// Log format the runner should use (`json`).
    pub extra_env: Vec<(String, String)>,
}

/// How a runner's channel ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelEnd {
    End,
    /// `eof`: the stream just ended (the process went away); otherwise it
    /// broke (a reset, a malformed frame), which `detail` describes.
    PeerLost {
        detail: String,
        eof: bool,
    },
    /// Still open when the watcher gave up waiting (the process was reaped).
    Open,
}

#[derive(Debug)]
pub enum RunnerEvent {
    Message(FromRunner),
    /// The runner announced the end of its stream.
    Ended {
        reason: String,
    },
    /// No pong within the timeout; the runner was SIGKILLed.
    Hung {
        silent_for: Duration,
    },
    /// Final event: the process was reaped and its channel ended.
    Exited {
        cause: ExitCause,
        channel: ChannelEnd,
        stop: Option<StopOutcome>,
    },
}

enum WatchCmd {
    Terminate { term_first: bool, grace: Duration },
}

/// Why a message did not reach a runner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendFailure {
    /// The channel is closing or gone; the runner's exit event follows.
    #[error("{0}")]
    Closed(String),
    #[error("its channel stayed full for {} ms", .0.as_millis())]
    Stuck(Duration),
}

/// The node's side of one runner.
pub struct RunnerHandle {
    pub rank: u32,
    pub runner_id: String,
    pub pid: u32,
    tx: ipc::Sender<ToRunner>,
    cmds: mpsc::Sender<WatchCmd>,
    ring: Arc<LogRing>,
    send_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerSpawnError {
    #[error("cannot create the channel socket for runner {runner}: {source}")]
    Socket {
        runner: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    StateDir(#[from] crate::statedir::StateDirError),
    #[error(transparent)]
    Spawn(#[from] crate::process::SpawnError),
}

impl RunnerHandle {
    /// Spawns the runner and its watcher. Events arrive on `events` tagged
    /// with the rank; the last one for this runner is `Exited`.
    pub async fn spawn(
        spawner: &Spawner,
        state_dir: &Arc<StateDir>,
        spec: RunnerSpec,
        events: mpsc::Sender<(u32, RunnerEvent)>,
    ) -> Result<RunnerHandle, RunnerSpawnError> {
        let socket_error = |source| RunnerSpawnError::Socket {
            runner: spec.runner_id.clone(),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(socket_error)?;
        ours.set_nonblocking(true).map_err(socket_error)?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(socket_error)?;
        let key = runner_key(&spec.runner_id);
        let lock_fd = state_dir.runner_lock(&key)?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "runner".into(),
            "--instance".into(),
            spec.instance_id.clone().into(),
            "--runner-id".into(),
            spec.runner_id.clone().into(),
            "--rank".into(),
            spec.rank.to_string().into(),
            "--world-size".into(),
            spec.world_size.to_string().into(),
            "--engine-config".into(),
            spec.engine_config.clone().into(),
        ];
        args.shrink_to_fit();
        let command = RunnerCommand {
            program: spec.program.clone(),
            args,
            // A panic's message, not its backtrace, belongs in the last
            // stderr lines a failure report quotes; RUST_BACKTRACE in the
            // runner env (extra_env) overrides this.
            env: std::iter::once(("RUST_BACKTRACE".into(), "0".into()))
                .chain(spec.extra_env.iter().map(|(k, v)| (k.into(), v.into())))
                .collect(),
            ipc_fd: theirs.into(),
            lock_fd: Some(lock_fd),
            label: format!("runner {}", spec.runner_id),
        };
        let spawned = spawner.spawn(command).await?;
        let pid = spawned.process.pid();
        state_dir.record_runner_pid(&key, pid)?;
        let (tx, rx) = ipc::channel::<ToRunner, FromRunner, _>(
            ours,
            ChannelConfig::named(format!("node->runner:{}", spec.runner_id)),
        );
        let ring = LogRing::new(200);
        let log_file = state_dir.logs_dir().join(format!("{key}.log"));
        let mut pumps = Vec::new();
        for (reader, stream) in [
            (
                Box::new(spawned.stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                Stream::Stdout,
            ),
            (Box::new(spawned.stderr), Stream::Stderr),
        ] {
            let runner_id = spec.runner_id.clone();
            pumps.push(tokio::spawn(pump_lines(
                reader,
                stream,
                log_file.clone(),
                ring.clone(),
                move |stream, line| reemit(&runner_id, stream, line),
            )));
        }
        let (cmds, cmd_rx) = mpsc::channel(4);
        let watcher = Watcher {
            rank: spec.rank,
            runner_id: spec.runner_id.clone(),
            key,
            state_dir: state_dir.clone(),
            process: spawned.process,
            rx,
            tx: tx.clone(),
            events,
            heartbeat: spec.heartbeat,
            pumps,
        };
        tokio::spawn(watcher.run(cmd_rx));
        Ok(RunnerHandle {
            rank: spec.rank,
            runner_id: spec.runner_id,
            pid,
            tx,
            cmds,
            ring,
            send_timeout: spec.heartbeat.timeout,
        })
    }

    /// Sends a message, waiting at most the heartbeat timeout for room: a
    /// runner that consumes nothing for that long is stuck, and its owner
    /// must not be stuck with it.
    pub async fn send(&self, msg: ToRunner) -> Result<(), SendFailure> {
        match tokio::time::timeout(self.send_timeout, self.tx.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SendFailure::Closed(e.to_string())),
            Err(_) => Err(SendFailure::Stuck(self.send_timeout)),
        }
    }

    /// Sends a control message; false when the runner can no longer be
    /// reached or its control queue stayed full for the heartbeat timeout.
    pub async fn control(&self, control: Control) -> bool {
        matches!(
            tokio::time::timeout(self.send_timeout, self.tx.send_control(control)).await,
            Ok(Ok(()))
        )
    }

    /// Announces the end of the node's stream to this runner.
    pub async fn close(&self, reason: &str) {
        let _ = self.tx.close(reason).await;
    }

    /// Starts the stop escalation (SIGTERM, grace, SIGKILL; or SIGKILL
    /// alone). Its outcome arrives with the runner's `Exited` event. A
    /// runner already reaped needs no stop, so a closed watcher is fine.
    pub fn request_terminate(&self, term_first: bool, grace: Duration) {
        let _ = self
            .cmds
            .try_send(WatchCmd::Terminate { term_first, grace });
    }

    pub fn stderr_tail(&self, n: usize) -> Vec<String> {
        self.ring.last(n)
    }

    pub fn channel_stats(&self) -> ChannelStats {
        self.tx.stats()
    }
}

/// File-name-safe key of a runner id (`i-ab12/3` → `i-ab12-3`).
pub fn runner_key(runner_id: &str) -> String {
    runner_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Re-emits one line of runner output as a node log event with the runner's
/// context, at the level the runner logged it.
fn reemit(runner_id: &str, stream: Stream, line: &str) {
    let parsed: Option<serde_json::Value> = line
        .starts_with('{')
        .then(|| serde_json::from_str(line).ok())
        .flatten();
    let Some(json) = parsed else {
        let stream = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        tracing::info!(runner = %runner_id, stream, "{line}");
        return;
    };
    let level = json.get("level").and_then(|l| l.as_str()).unwrap_or("INFO");
    let fields = json.get("fields");
    let message = fields
        .and_then(|f| f.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let rest = fields
        .and_then(|f| f.as_object())
        .map(|o| {
            o.iter()
                .filter(|(k, _)| *k != "message")
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    match level {
        "ERROR" => tracing::error!(runner = %runner_id, "{message} {rest}"),
        "WARN" => tracing::warn!(runner = %runner_id, "{message} {rest}"),
        "DEBUG" => tracing::debug!(runner = %runner_id, "{message} {rest}"),
        "TRACE" => tracing::trace!(runner = %runner_id, "{message} {rest}"),
        _ => tracing::info!(runner = %runner_id, "{message} {rest}"),
    }
}

struct Watcher {
    rank: u32,
    runner_id: String,
    key: String,
    state_dir: Arc<StateDir>,
    process: RunnerProcess,
    rx: ipc::Receiver<FromRunner>,
    tx: ipc::Sender<ToRunner>,
    events: mpsc::Sender<(u32, RunnerEvent)>,
    heartbeat: Heartbeat,
    /// The stdout and stderr pumps; they end at EOF, right after the exit.
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    async fn emit(&self, event: RunnerEvent) {
        // The instance drops its receiver only after every runner's Exited;
        // if it is gone anyway, nobody is left to tell.
        let _ = self.events.send((self.rank, event)).await;
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<WatchCmd>) {
        let mut exit: Option<ExitCause> = None;
        let mut channel: Option<ChannelEnd> = None;
        let mut stop: Option<StopOutcome> = None;
        let mut ping = tokio::time::interval(self.heartbeat.interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        // The oldest ping not yet answered.
        let mut outstanding: Option<(u64, Instant)> = None;
        let mut pairing_deadline: Option<Instant> = None;
        loop {
            if exit.is_some() && channel.is_some() {
                break;
            }
            let heartbeat_on = exit.is_none() && channel.is_none();
            tokio::select! {
                biased;
                cause = self.process.wait(), if exit.is_none() => {
                    exit = Some(cause);
                    pairing_deadline = Some(Instant::now() + CHANNEL_AFTER_EXIT);
                }
                incoming = self.rx.recv(), if channel.is_none() => match incoming {
                    Incoming::Data(msg) => self.emit(RunnerEvent::Message(msg)).await,
                    Incoming::Control(Control::Pong { seq: answered }) => {
                        if outstanding.is_some_and(|(s, _)| answered >= s) {
                            outstanding = None;
                        }
                    }
                    Incoming::Control(_) => {}
                    Incoming::End { reason } => {
                        channel = Some(ChannelEnd::End);
                        self.emit(RunnerEvent::Ended { reason }).await;
                    }
                    Incoming::PeerLost(lost) => {
                        channel = Some(ChannelEnd::PeerLost {
                            detail: lost.to_string(),
                            eof: lost.eof,
                        });
                        pairing_deadline.get_or_insert(Instant::now() + EXIT_AFTER_LOSS);
                    }
                },
                Some(cmd) = cmds.recv() => match cmd {
                    WatchCmd::Terminate { term_first, grace } => {
                        if exit.is_none() {
                            let outcome = self.process.terminate(term_first, grace).await;
                            exit = Some(outcome.exit);
                            stop = Some(outcome);
                            pairing_deadline = Some(Instant::now() + CHANNEL_AFTER_EXIT);
                        }
                    }
                },
                _ = ping.tick(), if heartbeat_on => {
                    if let Some((_, sent)) = outstanding {
                        let silent_for = sent.elapsed();
                        if silent_for >= self.heartbeat.timeout {
                            tracing::debug!(runner = %self.runner_id, ?silent_for, "no pong: killing");
                            self.emit(RunnerEvent::Hung { silent_for }).await;
                            let outcome = self.process.terminate(false, Duration::ZERO).await;
                            exit = Some(outcome.exit);
                            stop = Some(outcome);
                            pairing_deadline = Some(Instant::now() + CHANNEL_AFTER_EXIT);
                            continue;
                        }
                    } else {
                        seq += 1;
                        if self.tx.send_control(Control::Ping { seq }).await.is_ok() {
                            outstanding = Some((seq, Instant::now()));
                        }
                    }
                }
                _ = sleep_until_opt(pairing_deadline) => {
                    // One of the pair did not follow: a process that closed
                    // its channel without exiting is killed; a channel still
                    // open after the exit is given up on.
                    if exit.is_none() {
                        let outcome = self.process.terminate(false, Duration::ZERO).await;
                        exit = Some(outcome.exit);
                        stop = Some(outcome);
                        pairing_deadline = Some(Instant::now() + CHANNEL_AFTER_EXIT);
                    } else if channel.is_none() {
                        channel = Some(ChannelEnd::Open);
                        pairing_deadline = None;
                    }
                }
            }
        }
        // Let the output pumps read to EOF, so the last lines are in the ring
        // and the pipes are closed before the instance hears of the exit.
        let pumps = std::mem::take(&mut self.pumps);
        let _ = tokio::time::timeout(CHANNEL_AFTER_EXIT, futures_join_all(pumps)).await;
        self.state_dir.forget_runner(&self.key);
        let cause = exit.unwrap_or(ExitCause::Code(-1));
        let channel = channel.unwrap_or(ChannelEnd::Open);
        self.emit(RunnerEvent::Exited {
            cause,
            channel,
            stop,
        })
        .await;
    }
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
