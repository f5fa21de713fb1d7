//! The node's state directory: one node per directory, and a trail of the
//! runners it started so that a restarted node can kill the ones a crashed
//! node left behind.
//!
//! Layout: `node.lock` (the node's pid), `logs/`, and per runner
//! `runners/<key>.lock` and `runners/<key>.pid`.
//!
//! Invariants:
//! - At most one live node uses a directory: [`StateDir`] holds an exclusive
//!   `flock` on `node.lock` for its whole life. The kernel drops the lock when
//!   the node dies, SIGKILL included, so a stale `node.lock` never blocks.
//! - A runner's lock is held exactly as long as the runner lives. The node
//!   takes the `flock` on `runners/<key>.lock` and hands the descriptor to the
//!   runner as fd 4; `flock` locks belong to the open file description, which
//!   the child shares, and the node closes its own copy right after the spawn.
//!   Hence "lock held" means "a runner (or something it forked) is alive",
//!   whatever the pid file says.
//! - A pid file is written atomically (write to `.pid.tmp`, then rename), so a
//!   reader never sees a partial pid and never signals a wrong process group.
//! - The sweep only SIGKILLs a pid that really holds the runner's lock (it
//!   checks `/proc/<pid>/fd`), so a stale pid file that now names an unrelated
//!   process, after pid reuse, cannot get that process killed.
//! - Files are only removed once their lock is free (or held by us), and lock
//!   files are never removed while a runner may hold them: removing them would
//!   let a new lock on a new inode coexist with the old one.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

const NODE_LOCK_FILE: &str = "node.lock";
const RUNNERS_DIR: &str = "runners";
const LOGS_DIR: &str = "logs";
const LOCK_SUFFIX: &str = ".lock";
const PID_SUFFIX: &str = ".pid";
const PID_TMP_SUFFIX: &str = ".pid.tmp";
/// How often the sweep retries the lock of a runner it killed. `flock` has no
/// notification, and the sweep runs once per node start.
const SWEEP_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of [`StateDir`] operations.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state dir {} is in use by another node ({})", path.display(), holder_text(.pid))]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error("runner lock {} is already held: runner {key} is still running", path.display())]
    RunnerLocked { key: String, path: PathBuf },
    #[error("invalid runner key {key:?}: it must be a non-empty file name without '/'")]
    InvalidKey { key: String },
}

fn holder_text(pid: &Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

fn io_error<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(io::Error) -> StateDirError + 'p {
    move |source| StateDirError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// `error` and its sources, for a report that has no room for the chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// What [`StateDir::sweep_stale_runners`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Runners that were alive, got SIGKILL, and released their lock.
    pub killed: Vec<SweptRunner>,
    /// Files removed, relative to the state dir (`runners/<key>.lock`, ...).
    pub stale_files_removed: Vec<String>,
    pub errors: Vec<String>,
}

/// A stale runner that the sweep killed.
#[derive(Debug, Clone, Serialize)]
pub struct SweptRunner {
    pub key: String,
    pub pid: u32,
}

/// An open state directory, locked for this node.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Holds the exclusive flock on `node.lock`; closing it releases the lock.
    _node_lock: File,
}

impl StateDir {
    /// `$XDG_STATE_HOME/shardvisor`, else `~/.local/state/shardvisor`, else
    /// (no `HOME`, e.g. a bare service) `<tmp>/shardvisor-<uid>`.
    pub fn default_path() -> PathBuf {
        // The XDG spec says relative values are invalid and must be ignored.
        if let Some(state_home) = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
        {
            return state_home.join("shardvisor");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(".local/state/shardvisor");
        }
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        std::env::temp_dir().join(format!("shardvisor-{uid}"))
    }

    /// Creates the directory (and `runners/`, `logs/`) and takes an exclusive
    /// non-blocking flock on `node.lock`, writing our pid into it.
    pub fn open(path: &Path) -> Result<StateDir, StateDirError> {
        for dir in [path.to_owned(), path.join(RUNNERS_DIR), path.join(LOGS_DIR)] {
            fs::create_dir_all(&dir).map_err(io_error("create directory", &dir))?;
        }
        let lock_path = path.join(NODE_LOCK_FILE);
        let Some(lock) = open_locked(&lock_path)? else {
            return Err(StateDirError::InUse {
                path: path.to_owned(),
                pid: read_pid(&lock_path),
            });
        };
        // Only the lock holder writes, so truncating cannot race a writer; a
        // reader may briefly see an empty file and then says "pid unknown".
        let pid_line = format!("{}\n", std::process::id());
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(pid_line.as_bytes(), 0))
            .map_err(io_error("write", &lock_path))?;
        Ok(StateDir {
            path: path.to_owned(),
            _node_lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.path.join(LOGS_DIR)
    }

    fn runner_file(&self, key: &str, suffix: &str) -> PathBuf {
        self.path.join(RUNNERS_DIR).join(format!("{key}{suffix}"))
    }

    /// Creates `runners/<key>.lock` with an exclusive flock held on it, and an
    /// empty `runners/<key>.pid`. Pass the returned fd as the runner's
    /// `lock_fd`: the runner then holds the lock for its whole life. Should
    /// the spawn fail, the fd is closed with the command and
    /// [`StateDir::forget_runner`] removes the files.
    pub fn runner_lock(&self, key: &str) -> Result<OwnedFd, StateDirError> {
        validate_key(key)?;
        let lock_path = self.runner_file(key, LOCK_SUFFIX);
        let Some(lock) = open_locked(&lock_path)? else {
            return Err(StateDirError::RunnerLocked {
                key: key.to_owned(),
                path: lock_path,
            });
        };
        // Created after the lock, so a pid file always has its lock file; an
        // old pid from an earlier runner with this key is cleared.
        let pid_path = self.runner_file(key, PID_SUFFIX);
        File::create(&pid_path).map_err(io_error("create", &pid_path))?;
        Ok(OwnedFd::from(lock))
    }

    /// Records the pid of the runner spawned with [`StateDir::runner_lock`].
    pub fn record_runner_pid(&self, key: &str, pid: u32) -> Result<(), StateDirError> {
        validate_key(key)?;
        let tmp_path = self.runner_file(key, PID_TMP_SUFFIX);
        let pid_path = self.runner_file(key, PID_SUFFIX);
        File::create(&tmp_path)
            .and_then(|mut file| file.write_all(format!("{pid}\n").as_bytes()))
            .map_err(io_error("write", &tmp_path))?;
        fs::rename(&tmp_path, &pid_path).map_err(io_error("rename into place", &pid_path))
    }

    /// Removes the runner's pid and lock files, after its exit was reaped.
    pub fn forget_runner(&self, key: &str) {
        if validate_key(key).is_err() {
            return;
        }
        // The pid file goes first so that no pid file is ever left without
        // its lock file.
        for suffix in [PID_TMP_SUFFIX, PID_SUFFIX, LOCK_SUFFIX] {
            let path = self.runner_file(key, suffix);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "cannot remove runner file")
                }
            }
        }
    }

    /// At node start, before spawning runners: kills every runner that a
    /// previous node left alive and removes the files of every stale entry.
    ///
    /// A runner is alive when its lock is still held. Its pid file names the
    /// process whose group gets SIGKILL; the sweep then polls every 10 ms, up
    /// to `timeout` in total, until every such lock is free. This blocks the
    /// calling thread: call it before serving, or through `spawn_blocking`.
    pub fn sweep_stale_runners(&self, timeout: Duration) -> SweepReport {
        let mut report = SweepReport::default();
        let keys = match self.runner_keys() {
            Ok(keys) => keys,
            Err(error) => {
                report.errors.push(error_chain(&error));
                return report;
            }
        };
        let mut held = Vec::new();
        for key in keys {
            let lock_path = self.runner_file(&key, LOCK_SUFFIX);
            let lock = match OpenOptions::new().read(true).write(true).open(&lock_path) {
                Ok(lock) => lock,
                // Only a pid file is left: nothing can be running for it.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    self.remove_runner_files(&key, &mut report);
                    continue;
                }
                Err(error) => {
                    report
                        .errors
                        .push(format!("cannot open {}: {error}", lock_path.display()));
                    continue;
                }
            };
            match try_lock(&lock) {
                // Free: its runner is gone. Our lock is held while removing.
                Ok(true) => self.remove_runner_files(&key, &mut report),
                Ok(false) => held.push(self.kill_lock_holder(key, lock, &lock_path)),
                Err(error) => report
                    .errors
                    .push(format!("cannot lock {}: {error}", lock_path.display())),
            }
        }

        let deadline = Instant::now() + timeout;
        loop {
            held.retain(|entry| match try_lock(&entry.lock) {
                Ok(true) => {
                    if let Some(pid) = entry.killed_pid {
                        report.killed.push(SweptRunner {
                            key: entry.key.clone(),
                            pid,
                        });
                    }
                    self.remove_runner_files(&entry.key, &mut report);
                    false
                }
                Ok(false) => true,
                Err(error) => {
                    report.errors.push(format!(
                        "cannot lock {}: {error}",
                        self.runner_file(&entry.key, LOCK_SUFFIX).display()
                    ));
                    false
                }
            });
            if held.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(SWEEP_POLL_INTERVAL);
        }
        for entry in held {
            report.errors.push(format!(
                "runner {} still holds {} after {timeout:?}: {}",
                entry.key,
                self.runner_file(&entry.key, LOCK_SUFFIX).display(),
                entry.note
            ));
        }
        for error in &report.errors {
            tracing::warn!(%error, "stale runner sweep");
        }
        report
    }

    /// Keys of every runner with any file in `runners/`, sorted.
    fn runner_keys(&self) -> Result<BTreeSet<String>, StateDirError> {
        let dir = self.path.join(RUNNERS_DIR);
        let mut keys = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // `.pid.tmp` before `.pid`: the longer suffix must win.
            let key = [PID_TMP_SUFFIX, PID_SUFFIX, LOCK_SUFFIX]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix));
            if let Some(key) = key.filter(|key| validate_key(key).is_ok()) {
                keys.insert(key.to_owned());
            }
        }
        Ok(keys)
    }

    /// SIGKILLs the process named by the pid file if it really holds `lock`.
    fn kill_lock_holder(&self, key: String, lock: File, lock_path: &Path) -> HeldLock {
        let pid_path = self.runner_file(&key, PID_SUFFIX);
        let Some(pid) = read_pid(&pid_path).filter(|&pid| pid > 1 && pid != std::process::id())
        else {
            // A node that died between spawn and recording the pid: its runner
            // got PR_SET_PDEATHSIG, so the lock should come free by itself.
            return HeldLock {
                key,
                lock,
                killed_pid: None,
                note: format!("{} names no pid", pid_path.display()),
            };
        };
        match holds_file(pid, &lock) {
            Ok(true) => {}
            Ok(false) => {
                return HeldLock {
                    key,
                    lock,
                    killed_pid: None,
                    note: format!("pid {pid} does not hold it, so it was not killed"),
                }
            }
            Err(error) => {
                return HeldLock {
                    key,
                    lock,
                    killed_pid: None,
                    note: format!("cannot tell whether pid {pid} holds it: {error}"),
                }
            }
        }
        tracing::warn!(runner = %key, pid, lock = %lock_path.display(), "killing stale runner");
        // The runner leads its own group; the second kill covers a runner that
        // left it. ESRCH (it died meanwhile) needs no handling: the lock wait
        // below sees the result either way.
        // SAFETY: killpg and kill only send signals; `pid` > 1 was checked to
        // hold this runner's lock, so it is that runner and not a reused pid.
        unsafe {
            libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        HeldLock {
            key,
            lock,
            killed_pid: Some(pid),
            note: format!("pid {pid} got SIGKILL"),
        }
    }

    /// Removes every file of `key`, noting each removal or failure.
    fn remove_runner_files(&self, key: &str, report: &mut SweepReport) {
        for suffix in [PID_TMP_SUFFIX, PID_SUFFIX, LOCK_SUFFIX] {
            let path = self.runner_file(key, suffix);
            match fs::remove_file(&path) {
                Ok(()) => report
                    .stale_files_removed
                    .push(format!("{RUNNERS_DIR}/{key}{suffix}")),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => report
                    .errors
                    .push(format!("cannot remove {}: {error}", path.display())),
            }
        }
    }
}

/// A runner lock that was held when the sweep looked at it.
struct HeldLock {
    key: String,
    /// Our own open file description of the lock file, to retry the lock on.
    lock: File,
    killed_pid: Option<u32>,
    /// Why the lock may still be held, for the error at the deadline.
    note: String,
}

/// Keys become file names, so they must not escape `runners/`.
fn validate_key(key: &str) -> Result<(), StateDirError> {
    if key.is_empty() || key.starts_with('.') || key.contains(['/', '\0']) {
        return Err(StateDirError::InvalidKey {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// Opens (creating) a lock file and takes its exclusive flock; `None` when
/// someone else holds it.
fn open_locked(path: &Path) -> Result<Option<File>, StateDirError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_error("open", path))?;
    let locked = try_lock(&file).map_err(io_error("lock", path))?;
    Ok(locked.then_some(file))
}

/// Takes an exclusive flock without blocking; `Ok(false)` when another open
/// file description holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock only operates on the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(error)
    }
}

/// The pid written in `path`, if it holds one.
fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether process `pid` has `file` (same device and inode) open.
fn holds_file(pid: u32, file: &File) -> io::Result<bool> {
    let target = file.metadata()?;
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = match fs::read_dir(&fd_dir) {
        Ok(entries) => entries,
        // The process is gone, so it holds nothing.
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    for entry in entries.flatten() {
        // `metadata` follows the magic link to the open file itself; fds that
        // closed meanwhile just fail and are skipped.
        if let Ok(meta) = fs::metadata(entry.path()) {
            if meta.dev() == target.dev() && meta.ino() == target.ino() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
