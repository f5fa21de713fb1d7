//! Integration tests with real processes for `process`, `statedir` and
//! `logs`.
//!
//! Invariants of these tests:
//! - Every wait is guarded by a watchdog that fails the test instead of
//!   hanging it; no test asserts an upper bound on a duration.
//! - Polling happens only here, to observe processes the code under test
//!   does not own (a grandchild, a killed group member).
//! - Every child is killed or reaped before its test ends, and the PDEATHSIG
//!   helper process exits when the test that started it goes away.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use supervisor::logs::{pump_lines, LogRing, Stream};
use supervisor::process::{ExitCause, RunnerCommand, SpawnError, SpawnedRunner, Spawner};
use supervisor::statedir::{StateDir, StateDirError};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

/// Fails a test that hangs; never a speed assertion.
const WATCHDOG: Duration = Duration::from_secs(30);
/// How long a killed process may take to disappear from /proc.
const GONE_WITHIN: Duration = Duration::from_secs(5);
/// Set in the environment of the re-executed test binary to give it a role.
const ROLE_ENV: &str = "SUPERVISOR_TEST_ROLE";
/// Prefix of the line on which the PDEATHSIG helper reports its child.
const CHILD_PID_MARKER: &str = "SUPERVISOR_TEST_CHILD_PID=";

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WATCHDOG, future).await {
        Ok(value) => value,
        Err(_) => panic!("watchdog: {what} did not finish within {WATCHDOG:?}"),
    }
}

fn spawner() -> Spawner {
    Spawner::start(tokio::runtime::Handle::current()).expect("start spawner")
}

/// `/bin/sh -c script`, with `ipc` as fd 3 and `lock` as fd 4.
fn sh(script: &str, ipc: impl Into<OwnedFd>, lock: Option<OwnedFd>) -> RunnerCommand {
    RunnerCommand {
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), script.into()],
        env: vec![("SUPERVISOR_TEST_CHILD".into(), "1".into())],
        ipc_fd: ipc.into(),
        lock_fd: lock,
        label: "runner test/0".to_owned(),
    }
}

/// Spawns `script`; returns the runner and the node's end of its socket.
async fn spawn_sh(spawner: &Spawner, script: &str) -> (SpawnedRunner, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let spawned = within("spawn", spawner.spawn(sh(script, theirs, None)))
        .await
        .expect("spawn sh");
    (spawned, ours)
}

fn lines(stdout: ChildStdout) -> Lines<BufReader<ChildStdout>> {
    BufReader::new(stdout).lines()
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    within("reading a line", lines.next_line())
        .await
        .expect("read stdout")
        .expect("a line before EOF")
}

/// True when `pid` no longer exists or is a zombie (dead, not yet reaped by
/// whoever inherited it).
fn is_gone(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the parenthesised command name, which may contain
    // spaces and parentheses itself.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    state == Some('Z')
}

/// Polls /proc every 10 ms until `pid` is gone, up to GONE_WITHIN.
async fn assert_gone_soon(pid: u32, what: &str) {
    let deadline = tokio::time::Instant::now() + GONE_WITHIN;
    while !is_gone(pid) {
        if tokio::time::Instant::now() >= deadline {
            // Do not leave the process behind the failed test.
            // SAFETY: kill only sends a signal; `pid` is a process this test
            // started (directly or through the code under test).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{what} (pid {pid}) is still alive after {GONE_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("supervisor-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- process

#[tokio::test]
async fn exit_code_is_reported() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "exit 3").await;
    let exit = within("wait", runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Code(3));
    assert_eq!(exit.to_string(), "exitcode=3");
    assert!(!exit.is_success());
    // The cause is kept after the child was reaped.
    assert_eq!(within("wait again", runner.process.wait()).await, exit);
    assert_eq!(runner.process.try_wait(), Some(exit));
}

#[tokio::test]
async fn death_by_sigkill_is_reported() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "kill -9 $$").await;
    let exit = within("wait", runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Signal(9));
    assert_eq!(exit.to_string(), "signal=9 (SIGKILL)");
}

#[tokio::test]
async fn death_by_sigabrt_is_reported() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "kill -6 $$").await;
    let exit = within("wait", runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Signal(6));
    assert_eq!(exit.to_string(), "signal=6 (SIGABRT)");
}

#[tokio::test]
async fn fd3_is_the_ipc_socket() {
    let spawner = spawner();
    let (mut runner, mut ipc) = spawn_sh(&spawner, "echo hello >&3").await;
    assert_eq!(
        within("wait", runner.process.wait()).await,
        ExitCause::Code(0)
    );
    // The node closed its copy of the child's end at spawn, and the child has
    // exited, so this read ends at EOF.
    ipc.set_read_timeout(Some(WATCHDOG)).expect("set timeout");
    let mut received = String::new();
    ipc.read_to_string(&mut received).expect("read from fd 3");
    assert_eq!(received, "hello\n");
}

#[tokio::test]
async fn fd3_and_fd4_are_the_socket_and_the_lock() {
    let dir = TempDir::new("fd4");
    let state = StateDir::open(dir.path()).expect("open state dir");
    let lock = state.runner_lock("fd4-0").expect("runner lock");
    let (_ours, theirs) = UnixStream::pair().expect("socketpair");
    let script = "readlink /proc/self/fd/3; readlink /proc/self/fd/4";
    // Bound, not a temporary: dropping the spawner would SIGKILL the child.
    let spawner = spawner();
    let spawned = within("spawn", spawner.spawn(sh(script, theirs, Some(lock))))
        .await
        .expect("spawn sh");
    let SpawnedRunner {
        mut process,
        stdout,
        ..
    } = spawned;
    let mut stdout = lines(stdout);
    assert!(next_line(&mut stdout).await.starts_with("socket:["));
    let lock_path = dir.path().join("runners/fd4-0.lock");
    assert_eq!(
        PathBuf::from(next_line(&mut stdout).await),
        lock_path.canonicalize().expect("canonical lock path")
    );
    assert_eq!(within("wait", process.wait()).await, ExitCause::Code(0));
}

#[tokio::test]
async fn wait_is_cancel_safe() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "echo ready; exec sleep 1000").await;
    let mut stdout = lines(runner.stdout);
    assert_eq!(next_line(&mut stdout).await, "ready");
    assert_eq!(runner.process.try_wait(), None);
    // Dropping a pending wait must not lose the exit that comes later.
    let early = tokio::time::timeout(Duration::from_millis(20), runner.process.wait()).await;
    assert!(early.is_err(), "sleep 1000 exited early: {early:?}");
    runner.process.signal_group(libc::SIGKILL).expect("kill");
    assert_eq!(
        within("wait", runner.process.wait()).await,
        ExitCause::Signal(9)
    );
    // Signalling a reaped child is a no-op, not an error.
    runner.process.signal_group(libc::SIGKILL).expect("no-op");
}

#[tokio::test]
async fn terminate_lets_a_runner_exit_on_sigterm() {
    let spawner = spawner();
    let script = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done";
    let (mut runner, _ipc) = spawn_sh(&spawner, script).await;
    let mut stdout = lines(runner.stdout);
    // The trap is installed once "ready" is printed.
    assert_eq!(next_line(&mut stdout).await, "ready");
    let started = std::time::Instant::now();
    let outcome = within(
        "terminate",
        runner.process.terminate(true, Duration::from_secs(20)),
    )
    .await;
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert!(outcome.sent_sigterm, "{outcome:?}");
    assert!(!outcome.sent_sigkill, "{outcome:?}");
    assert_eq!(outcome.exit, ExitCause::Code(0));
    // The reported wait is real: some time passed between SIGTERM and the
    // exit, and no more than the call took by an independent clock.
    assert!(
        outcome.waited_ms > 0.0 && outcome.waited_ms <= wall_ms,
        "waited {} ms in a call of {wall_ms} ms",
        outcome.waited_ms
    );
}

#[tokio::test]
async fn terminate_escalates_to_sigkill_for_the_whole_group() {
    let spawner = spawner();
    let script = "trap '' TERM; sleep 1000 & echo $!; while :; do sleep 0.05; done";
    let (mut runner, _ipc) = spawn_sh(&spawner, script).await;
    let mut stdout = lines(runner.stdout);
    let background_pid: u32 = next_line(&mut stdout).await.parse().expect("pid");
    assert!(!is_gone(background_pid));
    let outcome = within(
        "terminate",
        runner.process.terminate(true, Duration::from_millis(200)),
    )
    .await;
    assert!(outcome.sent_sigterm, "{outcome:?}");
    assert!(outcome.sent_sigkill, "{outcome:?}");
    assert_eq!(outcome.exit, ExitCause::Signal(9));
    assert_eq!(outcome.exit.to_string(), "signal=9 (SIGKILL)");
    assert_gone_soon(background_pid, "the runner's background child").await;
}

#[tokio::test]
async fn terminate_without_sigterm_kills_at_once() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "exec sleep 1000").await;
    let outcome = within(
        "terminate",
        runner.process.terminate(false, Duration::from_secs(20)),
    )
    .await;
    assert!(!outcome.sent_sigterm && outcome.sent_sigkill, "{outcome:?}");
    assert_eq!(outcome.exit, ExitCause::Signal(9));
}

#[tokio::test]
async fn terminate_after_exit_only_reaps() {
    let spawner = spawner();
    let (mut runner, _ipc) = spawn_sh(&spawner, "exit 0").await;
    assert_eq!(
        within("wait", runner.process.wait()).await,
        ExitCause::Code(0)
    );
    let outcome = within(
        "terminate",
        runner.process.terminate(true, Duration::from_secs(20)),
    )
    .await;
    assert!(
        !outcome.sent_sigterm && !outcome.sent_sigkill,
        "{outcome:?}"
    );
    assert_eq!(outcome.exit, ExitCause::Code(0));
}

#[tokio::test]
async fn spawn_error_names_runner_and_program_and_closes_fds() {
    let spawner = spawner();
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut cmd = sh("", theirs, None);
    cmd.program = PathBuf::from("/nonexistent/shardvisor");
    let error = within("spawn", spawner.spawn(cmd))
        .await
        .expect_err("spawn must fail");
    assert!(matches!(error, SpawnError::Spawn { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "cannot spawn runner test/0 (/nonexistent/shardvisor)"
    );
    // The child's end was closed with the failed command.
    ours.set_read_timeout(Some(WATCHDOG)).expect("set timeout");
    assert_eq!(ours.read(&mut [0; 1]).expect("read"), 0);
}

/// Not a test on its own: in the `parent` role (set by
/// `pdeathsig_kills_runners_of_a_dead_node`) this process plays a node that
/// spawns a runner and then gets SIGKILLed.
#[test]
fn pdeathsig_helper_parent() {
    if std::env::var(ROLE_ENV).as_deref() != Ok("parent") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let spawner = Spawner::start(runtime.handle().clone()).expect("spawner");
    let (_ours, theirs) = UnixStream::pair().expect("socketpair");
    let spawned = runtime
        .block_on(spawner.spawn(sh("exec sleep 1000", theirs, None)))
        .expect("spawn");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{CHILD_PID_MARKER}{}", spawned.process.pid()).expect("print pid");
    stdout.flush().expect("flush");
    // Block until killed. Should the outer test die first, its end of our
    // stdin closes, we return, and the runner goes with us.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[tokio::test]
async fn pdeathsig_kills_runners_of_a_dead_node() {
    let test_binary = std::env::current_exe().expect("current exe");
    // The same arguments nextest uses, so this works under nextest and
    // `cargo test` alike.
    let mut helper = tokio::process::Command::new(test_binary)
        .args(["pdeathsig_helper_parent", "--exact", "--nocapture"])
        .env(ROLE_ENV, "parent")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("re-exec the test binary");
    let helper_stdout = helper.stdout.take().expect("helper stdout");
    let mut helper_lines = BufReader::new(helper_stdout).lines();
    let runner_pid: u32 = within("the helper's runner pid", async {
        while let Some(line) = helper_lines.next_line().await.expect("read helper") {
            if let Some(pid) = line.strip_prefix(CHILD_PID_MARKER) {
                return pid.trim().parse().expect("pid");
            }
        }
        panic!("the helper ended without printing its runner's pid");
    })
    .await;
    assert!(!is_gone(runner_pid), "the runner died before its node");

    helper.start_kill().expect("SIGKILL the helper node");
    let helper_exit = within("helper exit", helper.wait())
        .await
        .expect("wait helper");
    assert!(!helper_exit.success());
    assert_gone_soon(runner_pid, "the runner of a SIGKILLed node").await;
}

// --------------------------------------------------------------- statedir

#[test]
fn state_dir_is_exclusive_to_one_node() {
    let dir = TempDir::new("exclusive");
    let first = StateDir::open(dir.path()).expect("first open");
    assert!(dir.path().join("runners").is_dir());
    assert!(dir.path().join("logs").is_dir());
    assert_eq!(first.logs_dir(), dir.path().join("logs"));

    let error = StateDir::open(dir.path()).expect_err("second open must fail");
    assert!(
        matches!(error, StateDirError::InUse { pid: Some(pid), .. } if pid == std::process::id()),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "state dir {} is in use by another node (pid {})",
            dir.path().display(),
            std::process::id()
        )
    );
    drop(first);
    StateDir::open(dir.path()).expect("open after the first node is gone");
}

#[test]
fn runner_keys_cannot_escape_the_runners_dir() {
    let dir = TempDir::new("keys");
    let state = StateDir::open(dir.path()).expect("open");
    for key in ["", "a/b", "..", ".hidden"] {
        assert!(
            matches!(
                state.runner_lock(key),
                Err(StateDirError::InvalidKey { .. })
            ),
            "{key:?}"
        );
    }
}

#[test]
fn runner_lock_is_exclusive_until_forgotten() {
    let dir = TempDir::new("runner-lock");
    let state = StateDir::open(dir.path()).expect("open");
    let lock = state.runner_lock("i-1-0").expect("first lock");
    assert!(matches!(
        state.runner_lock("i-1-0"),
        Err(StateDirError::RunnerLocked { .. })
    ));
    state.record_runner_pid("i-1-0", 4242).expect("record pid");
    let pid_file = dir.path().join("runners/i-1-0.pid");
    assert_eq!(std::fs::read_to_string(&pid_file).expect("pid"), "4242\n");
    drop(lock);
    state.forget_runner("i-1-0");
    assert!(!pid_file.exists());
    assert!(!dir.path().join("runners/i-1-0.lock").exists());
}

#[test]
fn sweep_removes_stale_files_without_killing() {
    let dir = TempDir::new("sweep-stale");
    let state = StateDir::open(dir.path()).expect("open");
    // A runner whose lock is free: it died, and so did its node.
    drop(state.runner_lock("i-2-0").expect("lock"));
    state.record_runner_pid("i-2-0", 999_999).expect("pid");
    // A leftover pid file without a lock file.
    std::fs::write(dir.path().join("runners/i-3-0.pid"), "1\n").expect("write");

    let report = state.sweep_stale_runners(Duration::from_secs(5));
    assert!(report.killed.is_empty(), "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    let removed: BTreeSet<&str> = report
        .stale_files_removed
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        removed,
        BTreeSet::from([
            "runners/i-2-0.lock",
            "runners/i-2-0.pid",
            "runners/i-3-0.pid"
        ])
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("runners"))
        .expect("read runners")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn sweep_kills_a_runner_left_by_a_crashed_node() {
    let dir = TempDir::new("sweep-live");
    let spawner = spawner();
    let state = StateDir::open(dir.path()).expect("open");
    let lock = state.runner_lock("i-4-1").expect("lock");
    let (_ours, theirs) = UnixStream::pair().expect("socketpair");
    let script = "echo ready; exec sleep 1000";
    let spawned = within("spawn", spawner.spawn(sh(script, theirs, Some(lock))))
        .await
        .expect("spawn");
    let mut runner = spawned.process;
    let pid = runner.pid();
    state.record_runner_pid("i-4-1", pid).expect("record pid");
    assert_eq!(next_line(&mut lines(spawned.stdout)).await, "ready");

    // The node "crashes": its state dir lock goes, the runner lives on and
    // still holds its own lock.
    drop(state);
    let state = StateDir::open(dir.path()).expect("reopen after the crash");
    let report = tokio::task::spawn_blocking(move || state.sweep_stale_runners(WATCHDOG))
        .await
        .expect("sweep");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.killed.len(), 1, "{report:?}");
    assert_eq!(report.killed[0].key, "i-4-1");
    assert_eq!(report.killed[0].pid, pid);
    assert!(report
        .stale_files_removed
        .contains(&"runners/i-4-1.lock".to_owned()));
    assert!(!dir.path().join("runners/i-4-1.lock").exists());
    assert!(!dir.path().join("runners/i-4-1.pid").exists());
    // We are still its parent here, so we reap it and see how it died.
    assert_eq!(within("wait", runner.wait()).await, ExitCause::Signal(9));
    assert!(is_gone(pid));
}

// ------------------------------------------------------------------- logs

#[tokio::test]
async fn stdout_and_stderr_are_pumped_into_one_file_and_ring() {
    const N_LINES: usize = 200;
    const RING_CAPACITY: usize = 10;
    let dir = TempDir::new("pump");
    let log_path = dir.path().join("runner.log");
    let spawner = spawner();
    let script =
        format!("i=1; while [ $i -le {N_LINES} ]; do echo out$i; echo err$i >&2; i=$((i+1)); done");
    let (spawned, _ipc) = spawn_sh(&spawner, &script).await;
    let SpawnedRunner {
        mut process,
        stdout,
        stderr,
    } = spawned;
    let ring = LogRing::new(RING_CAPACITY);
    let seen = Arc::new(Mutex::new(Vec::new()));
    type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
    let pump = |reader: Reader, stream| {
        let seen = Arc::clone(&seen);
        pump_lines(
            reader,
            stream,
            log_path.clone(),
            ring.clone(),
            move |s, line| {
                seen.lock().expect("seen").push((s, line.to_owned()));
            },
        )
    };
    let out = tokio::spawn(pump(Box::new(stdout), Stream::Stdout));
    let err = tokio::spawn(pump(Box::new(stderr), Stream::Stderr));
    within("stdout pump", out).await.expect("stdout pump");
    within("stderr pump", err).await.expect("stderr pump");
    assert_eq!(within("wait", process.wait()).await, ExitCause::Code(0));

    let expected_out: Vec<String> = (1..=N_LINES).map(|i| format!("out{i}")).collect();
    let expected_err: Vec<String> = (1..=N_LINES).map(|i| format!("err{i}")).collect();
    // Each stream keeps its order in the file and in the callback.
    let file = std::fs::read_to_string(&log_path).expect("read log file");
    let in_file: Vec<&str> = file.lines().collect();
    assert_eq!(in_file.len(), 2 * N_LINES);
    let of = |prefix: &str| -> Vec<String> {
        in_file
            .iter()
            .filter(|line| line.starts_with(prefix))
            .map(|line| (*line).to_owned())
            .collect()
    };
    assert_eq!(of("out"), expected_out);
    assert_eq!(of("err"), expected_err);
    let seen = seen.lock().expect("seen").clone();
    let seen_of = |stream: Stream| -> Vec<String> {
        seen.iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, line)| line.clone())
            .collect()
    };
    assert_eq!(seen_of(Stream::Stdout), expected_out);
    assert_eq!(seen_of(Stream::Stderr), expected_err);
    // The ring holds the last lines pushed, in order.
    let last = ring.last(100);
    let pushed_last: Vec<String> = seen[seen.len() - RING_CAPACITY..]
        .iter()
        .map(|(_, line)| line.clone())
        .collect();
    assert_eq!(last, pushed_last);
}
