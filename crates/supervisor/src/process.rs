//! Orphan-proof runner processes: spawning, exit detection and stop
//! escalation.
//!
//! Invariants:
//! - Every runner is forked from the one long-lived thread owned by a
//!   [`Spawner`], never from a Tokio worker or blocking-pool thread.
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//!   and Tokio's blocking threads exit when idle; a dedicated thread only exits
//!   when the [`Spawner`] is dropped (or the node dies), and then every runner
//!   it spawned is SIGKILLed by the kernel. Keep the [`Spawner`] alive for the
//!   node's whole life.
//! - A child either runs with `PR_SET_PDEATHSIG(SIGKILL)` armed while its parent
//!   is alive, or exits before `exec`: after arming, it compares `getppid()`
//!   with the parent pid captured before the fork, which catches a parent that
//!   died in between.
//! - In the child, fd 3 is the IPC socket and fd 4 the runner lock (when one is
//!   given); both are inheritable there and nothing else of ours is. The
//!   sources are first duplicated to fds >= 5 with `FD_CLOEXEC`, so a `dup2` in
//!   the child can never clobber the other source or the stdio fds. The spawner
//!   also holds fds 3 and 4 of the node process while they are free when it
//!   starts, so the close-on-exec error pipe that std creates for every fork
//!   cannot land on 3 or 4 and be overwritten by the `dup2`.
//! - Each runner leads its own process group (pgid = pid), so signals reach the
//!   runner and everything it started, and a Ctrl-C on the node's terminal
//!   does not reach the runners directly.
//! - A [`RunnerProcess`] has exactly one owner and is the only thing that reaps
//!   its child. Exit is observed through Tokio's child reaper (pidfd or
//!   SIGCHLD), never by polling. Once the exit is reaped the process group is
//!   never signalled again, because the pid may have been reused.
//! - Dropping a [`RunnerProcess`] does not kill the child (`kill_on_drop(false)`);
//!   its owner decides. Tokio's orphan queue still reaps it, so no zombie stays.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Serialize, Serializer};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The fd on which a runner finds its IPC socket.
pub const IPC_FD: RawFd = 3;
/// The fd on which a runner finds its lock file (see `statedir`).
pub const LOCK_FD: RawFd = 4;
/// Sources are moved to at least this fd before the fork, above both targets.
const FIRST_SOURCE_FD: RawFd = 5;
/// Exit code of a child whose parent died between `fork` and `prctl`; nobody
/// is left to read it, but a distinctive value helps when tracing by hand.
const PARENT_GONE_EXIT_CODE: libc::c_int = 125;

/// What to run as a runner process.
#[derive(Debug)]
pub struct RunnerCommand {
    /// Normally `std::env::current_exe()`.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to the node's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Becomes fd 3 in the child; the node's copy is closed after the spawn.
    pub ipc_fd: OwnedFd,
    /// Becomes fd 4 in the child if given; the node's copy is closed after the
    /// spawn, so the child alone holds the lock.
    pub lock_fd: Option<OwnedFd>,
    /// Names the runner in errors and logs, e.g. `"runner i-3f/2"`.
    pub label: String,
}

/// Errors returned by [`Spawner::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The spawner thread is gone (it panicked); nothing can be spawned.
    #[error("cannot spawn {label}: the spawner thread has stopped")]
    SpawnerStopped { label: String },
    /// Duplicating the fds to pass to the child failed (e.g. fd limit).
    #[error("cannot prepare the inherited fds of {label} ({})", program.display())]
    PrepareFds {
        label: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `fork`/`exec` failed, or the child failed its setup before `exec`.
    #[error("cannot spawn {label} ({})", program.display())]
    Spawn {
        label: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How a runner process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// The exit could not be observed: the child was reaped behind our back
    /// (someone else called `waitpid`) or the runtime is shutting down. The
    /// error is logged where it happens.
    Unknown,
    /// The runner ran on another node that was lost (gone from the cluster,
    /// or not answering): the process died with it (its parent death signal)
    /// or was stopped by that node's own supervisor; either way it is gone.
    NodeLost,
}

impl ExitCause {
    /// True only for exit code 0.
    pub fn is_success(&self) -> bool {
        *self == ExitCause::Code(0)
    }

    fn from_status(status: ExitStatus) -> ExitCause {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCause::Code(code),
            (None, Some(signal)) => ExitCause::Signal(signal),
            // `waitpid` without WUNTRACED/WCONTINUED only reports exits and
            // deaths by signal, so this is unreachable in practice.
            (None, None) => ExitCause::Unknown,
        }
    }
}

/// The name of the signals a runner commonly dies of.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

impl fmt::Display for ExitCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitCause::Code(code) => write!(f, "exitcode={code}"),
            ExitCause::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "signal={signal} ({name})"),
                None => write!(f, "signal={signal}"),
            },
            ExitCause::Unknown => f.write_str("exit=unknown"),
            ExitCause::NodeLost => f.write_str("node lost"),
        }
    }
}

/// Serialized as its display string, the same text the logs show.
impl Serialize for ExitCause {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What [`RunnerProcess::terminate`] did.
#[derive(Debug, Clone, Serialize)]
pub struct StopOutcome {
    pub exit: ExitCause,
    pub sent_sigterm: bool,
    pub sent_sigkill: bool,
    /// From the start of `terminate` until the exit was reaped.
    pub waited_ms: f64,
}

/// A freshly spawned runner with its output pipes.
#[derive(Debug)]
pub struct SpawnedRunner {
    pub process: RunnerProcess,
    pub stdout: ChildStdout,
    pub stderr: ChildStderr,
}

struct SpawnRequest {
    cmd: RunnerCommand,
    reply: oneshot::Sender<Result<SpawnedRunner, SpawnError>>,
}

/// Owns the one thread from which every runner is forked.
///
/// Dropping it stops that thread, and the kernel then SIGKILLs every runner
/// it spawned (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub struct Spawner {
    requests: mpsc::Sender<SpawnRequest>,
    /// Fds 3 and 4 of this process when they were free at start, held open so
    /// std's per-fork error pipe cannot take them (see the module doc).
    _reserved_fds: Vec<OwnedFd>,
}

impl Spawner {
    /// Starts the spawner thread; `handle` is the Tokio runtime used to drive
    /// child exit notification and the output pipes.
    pub fn start(handle: tokio::runtime::Handle) -> io::Result<Spawner> {
        let reserved_fds = reserve_child_fd_numbers()?;
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        // Captured before any fork: the child compares it with `getppid()`.
        let parent_pid = std::process::id() as libc::pid_t;
        std::thread::Builder::new()
            .name("runner-spawner".to_owned())
            .spawn(move || {
                // Entering the runtime makes `tokio::process::Command::spawn`
                // register each child (and its pipes) with that runtime.
                let _runtime = handle.enter();
                for request in incoming {
                    let result = spawn_one(request.cmd, parent_pid);
                    if let Err(Ok(unwanted)) = request.reply.send(result) {
                        // The caller gave up (its future was dropped); nobody
                        // would own this child, so it must not outlive this.
                        tracing::debug!(
                            pid = unwanted.process.pid(),
                            runner = %unwanted.process.label,
                            "spawn was cancelled, killing the new runner"
                        );
                        let _ = unwanted.process.signal_group(libc::SIGKILL);
                    }
                }
            })?;
        Ok(Spawner {
            requests,
            _reserved_fds: reserved_fds,
        })
    }

    /// Spawns `cmd` on the spawner thread. Cancelling the returned future
    /// kills the child if it was already forked.
    pub async fn spawn(&self, cmd: RunnerCommand) -> Result<SpawnedRunner, SpawnError> {
        let label = cmd.label.clone();
        let (reply, result) = oneshot::channel();
        if self.requests.send(SpawnRequest { cmd, reply }).is_err() {
            return Err(SpawnError::SpawnerStopped { label });
        }
        result
            .await
            .unwrap_or(Err(SpawnError::SpawnerStopped { label }))
    }
}

/// Holds fds 3 and 4 of this process if they are free, with `/dev/null`.
fn reserve_child_fd_numbers() -> io::Result<Vec<OwnedFd>> {
    let dev_null = std::fs::File::open("/dev/null")?;
    let mut reserved = Vec::new();
    for target in [IPC_FD, LOCK_FD] {
        // `F_DUPFD_CLOEXEC` returns the lowest free fd >= target: exactly
        // `target` if it was free, otherwise some higher fd we do not need.
        let fd = dup_at_least(dev_null.as_raw_fd(), target)?;
        if fd.as_raw_fd() == target {
            reserved.push(fd);
        }
    }
    Ok(reserved)
}

/// Duplicates `fd` to the lowest free fd >= `min`, close-on-exec.
fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `F_DUPFD_CLOEXEC` only reads `fd` and creates a new descriptor;
    // an invalid `fd` makes it fail with EBADF, which we report.
    let new_fd = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if new_fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new_fd` was just created by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new_fd) })
}

/// Runs on the spawner thread: forks, sets the child up, and wraps the result.
fn spawn_one(cmd: RunnerCommand, parent_pid: libc::pid_t) -> Result<SpawnedRunner, SpawnError> {
    let prepare_error = |source| SpawnError::PrepareFds {
        label: cmd.label.clone(),
        program: cmd.program.clone(),
        source,
    };
    let ipc_source =
        dup_at_least(cmd.ipc_fd.as_raw_fd(), FIRST_SOURCE_FD).map_err(prepare_error)?;
    let lock_source = match &cmd.lock_fd {
        Some(fd) => Some(dup_at_least(fd.as_raw_fd(), FIRST_SOURCE_FD).map_err(prepare_error)?),
        None => None,
    };
    let ipc_raw = ipc_source.as_raw_fd();
    let lock_raw = lock_source.as_ref().map(AsRawFd::as_raw_fd);

    let mut command = tokio::process::Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe functions may be called. It calls only `prctl`,
    // `getppid`, `_exit` and `dup2` (plain syscalls), reads errno through
    // `io::Error::last_os_error` (no allocation), and touches no lock, no
    // allocator and no state shared with other threads; the fds it uses stay
    // open in the parent until `spawn` has returned.
    unsafe {
        command.pre_exec(move || setup_child(parent_pid, ipc_raw, lock_raw));
    }
    let spawn_error = |source| SpawnError::Spawn {
        label: cmd.label.clone(),
        program: cmd.program.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    // The child has its own copies now; the node's copies (the caller's and
    // ours) close here, so the child alone holds the socket end and the lock.
    drop((ipc_source, lock_source, cmd.ipc_fd, cmd.lock_fd));

    let (Some(pid), Some(stdout), Some(stderr)) =
        (child.id(), child.stdout.take(), child.stderr.take())
    else {
        // Unreachable: a just-spawned child has a pid and the pipes we asked
        // for. Kill it rather than leave a child without an owner.
        let _ = child.start_kill();
        return Err(spawn_error(io::Error::other(
            "the spawned child has no pid or no output pipes",
        )));
    };
    tracing::debug!(pid, runner = %cmd.label, program = %cmd.program.display(), "spawned runner");
    Ok(SpawnedRunner {
        process: RunnerProcess {
            child,
            pid,
            label: cmd.label,
            exit: None,
        },
        stdout,
        stderr,
    })
}

/// The part of the child's setup that runs between `fork` and `exec`.
///
/// Must stay async-signal-safe: no allocation, no locks.
fn setup_child(parent_pid: libc::pid_t, ipc: RawFd, lock: Option<RawFd>) -> io::Result<()> {
    // SAFETY: `prctl(PR_SET_PDEATHSIG)` only changes this process's death
    // signal; the variadic arguments are the documented `unsigned long`s.
    let armed = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if armed == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `getppid` has no preconditions.
    if unsafe { libc::getppid() } != parent_pid {
        // The node died between fork and prctl, so the death signal will never
        // come; nobody is left to report an error to.
        // SAFETY: `_exit` ends this forked child without running atexit
        // handlers or destructors that belong to the parent's state.
        unsafe { libc::_exit(PARENT_GONE_EXIT_CODE) };
    }
    // The sources are >= FIRST_SOURCE_FD, so neither equals a target and the
    // first dup2 cannot overwrite the second source. dup2 clears FD_CLOEXEC
    // on the new descriptor, which makes it inheritable across exec.
    for (source, target) in [(Some(ipc), IPC_FD), (lock, LOCK_FD)] {
        let Some(source) = source else { continue };
        // SAFETY: both fds are valid in the child (inherited from the parent,
        // which keeps them open until spawn returns); dup2 is a plain syscall.
        if unsafe { libc::dup2(source, target) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A running (or exited) runner process; its single owner reaps it.
#[derive(Debug)]
pub struct RunnerProcess {
    child: Child,
    pid: u32,
    label: String,
    /// Set once the exit was reaped; never unset.
    exit: Option<ExitCause>,
}

impl RunnerProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The label given in [`RunnerCommand::label`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Waits for the exit, driven by Tokio's child reaper (an exit event, not
    /// a polling loop). Cancel-safe; after the first exit it returns the same
    /// cause again.
    pub async fn wait(&mut self) -> ExitCause {
        if let Some(cause) = self.exit {
            return cause;
        }
        // Tokio's `Child::wait` is cancel-safe, and the cause is cached in the
        // same poll that reaps the child.
        match self.child.wait().await {
            Ok(status) => self.record_exit(status),
            Err(error) => self.exit_unobservable(&error),
        }
    }

    /// Returns the exit if it already happened, reaping the child.
    pub fn try_wait(&mut self) -> Option<ExitCause> {
        if let Some(cause) = self.exit {
            return Some(cause);
        }
        match self.child.try_wait() {
            Ok(Some(status)) => Some(self.record_exit(status)),
            Ok(None) => None,
            Err(error) => Some(self.exit_unobservable(&error)),
        }
    }

    fn record_exit(&mut self, status: ExitStatus) -> ExitCause {
        let cause = ExitCause::from_status(status);
        self.exit = Some(cause);
        cause
    }

    /// Only reachable when an invariant of the node is broken (another part
    /// of the process reaps children, or the runtime is shutting down), so the
    /// cause is not cached: the child may in fact still be running.
    fn exit_unobservable(&self, error: &io::Error) -> ExitCause {
        tracing::error!(pid = self.pid, runner = %self.label, %error, "cannot observe runner exit");
        ExitCause::Unknown
    }

    /// Sends `signal` to the child's whole process group; ESRCH (already gone)
    /// is Ok. Does nothing once the exit was reaped, as the pid may have been
    /// reused since.
    pub fn signal_group(&self, signal: i32) -> io::Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        // SAFETY: killpg only sends a signal; the group id is our unreaped
        // child's pid, which cannot have been reused.
        let result = unsafe { libc::killpg(self.pid as libc::pid_t, signal) };
        self.signal_result(result, signal, "process group")
    }

    /// Sends `signal` to the runner itself, for a runner that left its group.
    fn signal_leader(&self, signal: i32) -> io::Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        // SAFETY: kill only sends a signal to our unreaped child.
        let result = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        self.signal_result(result, signal, "process")
    }

    fn signal_result(&self, result: libc::c_int, signal: i32, target: &str) -> io::Result<()> {
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(io::Error::new(
            error.kind(),
            format!(
                "cannot send signal {signal} to {target} {} of {}: {error}",
                self.pid, self.label
            ),
        ))
    }

    /// Stop escalation: if `term_first`, SIGTERM the group and wait up to
    /// `grace` for the exit; then SIGKILL the group; always waits for (reaps)
    /// the exit. A child that already exited is only reaped.
    pub async fn terminate(&mut self, term_first: bool, grace: Duration) -> StopOutcome {
        let started = Instant::now();
        let mut sent_sigterm = false;
        let mut sent_sigkill = false;
        // `self.exit` (not a returned cause) says whether the child was really
        // reaped, so an unobservable exit still gets the signals.
        let _ = self.try_wait();
        if term_first && self.exit.is_none() {
            match self.signal_group(libc::SIGTERM) {
                Ok(()) => sent_sigterm = true,
                Err(error) => tracing::warn!(%error, "cannot ask the runner to stop"),
            }
            // A timeout here only means the runner ignored SIGTERM.
            let _ = tokio::time::timeout(grace, self.wait()).await;
            // It may have exited just after the grace period ended.
            let _ = self.try_wait();
        }
        if self.exit.is_none() {
            match self.signal_group(libc::SIGKILL) {
                Ok(()) => sent_sigkill = true,
                Err(error) => tracing::warn!(%error, "cannot kill the runner's process group"),
            }
            // The runner may have moved itself out of its group; SIGKILL twice
            // is harmless.
            if let Err(error) = self.signal_leader(libc::SIGKILL) {
                tracing::warn!(%error, "cannot kill the runner");
            }
        }
        let exit = self.wait().await;
        StopOutcome {
            exit,
            sent_sigterm,
            sent_sigkill,
            waited_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_cause_display_names_common_signals() {
        assert_eq!(ExitCause::Code(3).to_string(), "exitcode=3");
        assert_eq!(ExitCause::Signal(9).to_string(), "signal=9 (SIGKILL)");
        assert_eq!(ExitCause::Signal(6).to_string(), "signal=6 (SIGABRT)");
        assert_eq!(ExitCause::Signal(15).to_string(), "signal=15 (SIGTERM)");
        assert_eq!(ExitCause::Signal(11).to_string(), "signal=11 (SIGSEGV)");
        assert_eq!(ExitCause::Signal(64).to_string(), "signal=64");
        assert_eq!(ExitCause::Unknown.to_string(), "exit=unknown");
    }

    #[test]
    fn exit_cause_serializes_as_display() {
        let json = serde_json::to_string(&ExitCause::Signal(9)).unwrap();
        assert_eq!(json, r#""signal=9 (SIGKILL)""#);
        let outcome = StopOutcome {
            exit: ExitCause::Code(0),
            sent_sigterm: true,
            sent_sigkill: false,
            waited_ms: 1.5,
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["exit"], "exitcode=0");
    }

    #[test]
    fn only_exit_code_zero_is_success() {
        assert!(ExitCause::Code(0).is_success());
        assert!(!ExitCause::Code(1).is_success());
        assert!(!ExitCause::Signal(15).is_success());
        assert!(!ExitCause::Unknown.is_success());
    }
}
