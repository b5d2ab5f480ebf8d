//! Per-CPU counters in reserved slots (Katran's habit): one increment per event, no locking.
use crate::maps::{lb4_svc_stat_v1, stats_v1};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(v) = stats_v1.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *v += 1 };
    }
}

/// Counts a packet of `ip_len` bytes for frontend `svc_id` (no entry: not counted).
#[inline(always)]
pub fn count_service(svc_id: u32, ip_len: usize) {
    if let Some(v) = lb4_svc_stat_v1.get_ptr_mut(&svc_id) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += ip_len as u64;
        }
    }
}
