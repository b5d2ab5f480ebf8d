//! Per-CPU counters in reserved slots (Katran's habit): one increment per event, no locking.
use crate::maps::stats_v1;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(v) = stats_v1.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *v += 1 };
    }
}
