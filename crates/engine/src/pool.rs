//! Writing one output buffer from candle's worker pool.
//!
//! Kept here because candle's `barrier_pool().execute_chunked` hands each
//! worker a range of work items but no part of an output: the kernels that
//! use it (`q8tiles`, the decode attention of `model::forward`) write
//! disjoint slots of one buffer through this pointer.
//!
//! Invariant: every user writes each slot from exactly one work item, and
//! the buffer outlives the pool's execution (which returns only when every
//! worker is done), so no two writes race and none dangles.

/// The output buffer, written by the pool's workers at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: workers write disjoint slots (the module invariant).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
