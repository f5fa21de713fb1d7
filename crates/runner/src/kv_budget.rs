//! The KV memory budget of an instance, kept by rank 0 in positions: the
//! attention keys and values its running tasks may hold, all ranks
//! together (each rank holds every task's positions for its own layers or
//! heads, so counting positions of the whole model bounds them all).
//!
//! Invariants (the KV budget):
//! * The positions reserved by started tasks never exceed the capacity: a
//!   task reserves its prompt plus its completion bound when it starts and
//!   gives them back when it ends.
//! * A task that could never fit (its reservation alone exceeds the
//!   capacity) is refused at start, with the numbers, and never waits.
//! * A task that does not fit now waits, first come first served, and
//!   starts when enough is given back; a later, smaller task does not
//!   overtake it (the engine thread keeps the order).

/// Whether a reservation fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    Now,
    /// Once enough running tasks give theirs back.
    Later,
    /// Not even with nothing else running.
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBudget {
    capacity: usize,
    reserved: usize,
}

/// The share of the memory available at load time the budget takes when
/// the instance names none: the rest stays for activations, the prefix
/// store, other instances and the system.
pub const DEFAULT_SHARE: f64 = 0.5;

/// Bytes of keys and values one position of the whole model holds: every
/// layer's kv heads, keys and values, f32 as the engine stores them.
pub fn bytes_per_position(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
    (n_layers * n_kv_heads * head_dim * 2 * 4).max(1)
}

/// The capacity in positions of `mb` MiB.
pub fn positions_in_mb(mb: u64, per_position: usize) -> usize {
    ((mb << 20) / per_position as u64) as usize
}

/// The default capacity: [`DEFAULT_SHARE`] of `available` bytes, counted
/// at twice each position's size because a cache buffer doubles as it
/// grows (`engine`'s `grow_and_set`), so a task holds at most twice what
/// it uses.
pub fn default_positions(available: u64, per_position: usize) -> usize {
    let bytes = available as f64 * DEFAULT_SHARE;
    (bytes / (2 * per_position) as f64) as usize
}

/// `MemAvailable` from `/proc/meminfo`, in bytes. (The cluster crate reads
/// the same file for the node's facts; the runner does not depend on it.)
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = text
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb.saturating_mul(1024))
}

impl KvBudget {
    pub fn new(capacity: usize) -> KvBudget {
        KvBudget {
            capacity,
            reserved: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn fits(&self, positions: usize) -> Fit {
        if positions > self.capacity {
            Fit::Never
        } else if self.reserved + positions <= self.capacity {
            Fit::Now
        } else {
            Fit::Later
        }
    }

    /// Reserves `positions` if they fit now; says whether they did.
    pub fn reserve(&mut self, positions: usize) -> Fit {
        let fit = self.fits(positions);
        if fit == Fit::Now {
            self.reserved += positions;
        }
        fit
    }

    /// Gives back a reservation.
    pub fn release(&mut self, positions: usize) {
        debug_assert!(positions <= self.reserved, "released more than reserved");
        self.reserved = self.reserved.saturating_sub(positions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_capacity() {
        let mut b = KvBudget::new(100);
        assert_eq!(b.reserve(60), Fit::Now);
        assert_eq!(b.fits(40), Fit::Now);
        assert_eq!(b.fits(41), Fit::Later);
        assert_eq!(
            b.reserve(41),
            Fit::Later,
            "a refused reservation takes nothing"
        );
        assert_eq!(b.reserve(40), Fit::Now);
        assert_eq!(b.fits(1), Fit::Later);
        b.release(60);
        assert_eq!(b.fits(60), Fit::Now);
        assert_eq!(b.fits(61), Fit::Later);
    }

    #[test]
    fn a_task_larger_than_the_whole_budget_never_fits() {
        let mut b = KvBudget::new(100);
        assert_eq!(b.fits(101), Fit::Never);
        assert_eq!(b.reserve(101), Fit::Never);
        assert_eq!(b.fits(100), Fit::Now);
    }

    #[test]
    fn the_default_counts_doubling_buffers_and_keeps_half_the_memory() {
        // SmolLM2-135M: 30 layers, 3 kv heads of 64: 46,080 bytes a position.
        let per = bytes_per_position(30, 3, 64);
        assert_eq!(per, 46_080);
        // 4 GiB available: 2 GiB for the budget, each position counted
        // twice: 2 GiB / 92,160 B.
        assert_eq!(
            default_positions(4 << 30, per),
            (2u64 << 30) as usize / 92_160
        );
        assert_eq!(positions_in_mb(1, per), (1 << 20) / 46_080);
    }

    #[test]
    fn mem_available_reads_this_machine() {
        // Linux always has the field (since 3.14).
        let bytes = mem_available().expect("/proc/meminfo has MemAvailable");
        assert!(bytes > 0);
    }
}
