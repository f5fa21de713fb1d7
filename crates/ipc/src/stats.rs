//! Live per-channel statistics and the per-process registry that lists them.
//!
//! Counters are plain atomics updated by the channel's own tasks; the
//! registry holds weak references, so a dropped channel disappears from
//! [`snapshot`] without any unregister call that could be forgotten.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::{ChannelState, Core};

/// A point-in-time copy of one channel's stats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelStats {
    pub name: String,
    pub state: ChannelState,
    /// Data messages accepted by `send`.
    pub sent: u64,
    /// Data messages decoded from the peer.
    pub received: u64,
    /// Data messages accepted but not yet written to the socket.
    pub queued: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Milliseconds since the last frame was written or read.
    pub idle_ms: u64,
    /// Unix time of the last activity, in milliseconds.
    pub last_activity_unix_ms: u64,
}

pub(crate) struct Counters {
    pub name: String,
    pub core: Mutex<Core>,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub queued: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Nanoseconds since `epoch()` of the last activity.
    pub last_activity: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn unix_epoch_offset_ms() -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let _ = epoch();
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            - epoch().elapsed().as_millis() as u64
    })
}

impl Counters {
    pub fn new(name: String) -> Arc<Self> {
        let counters = Arc::new(Counters {
            name,
            core: Mutex::new(Core::new()),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
        });
        counters.touch();
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&counters));
        counters
    }

    pub fn touch(&self) {
        self.last_activity
            .store(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Locks the state core. A poisoned lock still holds a consistent `Core`
    /// (every mutation is a single assignment), so poisoning is ignored.
    pub fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> ChannelStats {
        let last = self.last_activity.load(Ordering::Relaxed);
        let now = epoch().elapsed().as_nanos() as u64;
        ChannelStats {
            name: self.name.clone(),
            state: self.core().state(),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            idle_ms: now.saturating_sub(last) / 1_000_000,
            last_activity_unix_ms: unix_epoch_offset_ms() + last / 1_000_000,
        }
    }
}

fn registry() -> &'static Mutex<Vec<Weak<Counters>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<Counters>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Vec::new()))
}

/// Stats of every live channel in this process, in creation order.
pub fn snapshot() -> Vec<ChannelStats> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|w| w.strong_count() > 0);
    reg.iter()
        .filter_map(Weak::upgrade)
        .map(|c| c.snapshot())
        .collect()
}
