//! Per-CPU counters in reserved slots (Katran's habit): one increment per event, no locking.
use dataplane_common::SvcCounters;

use crate::maps::{lb4_svc_name_v1, lb4_svc_stat_v1, stats_v1};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(v) = stats_v1.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *v += 1 };
    }
}

/// Counts a packet of `ip_len` bytes for frontend `svc_id`. A frontend's first packet makes
/// its counters, while the frontend has a name (the agent writes it with the frontend and
/// removes it with it: the connections of a removed frontend make none): the agent's sync does
/// not, as a per-CPU map's insert costs it 20 µs (0.2 s of a 10,000-Service sync), and a
/// frontend without traffic holds no per-CPU memory.
#[inline(always)]
pub fn count_service(svc_id: u32, ip_len: usize) {
    if let Some(v) = lb4_svc_stat_v1.get_ptr_mut(&svc_id) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += ip_len as u64;
        }
        return;
    }
    first_packet(svc_id, ip_len);
}

#[inline(never)]
fn first_packet(svc_id: u32, ip_len: usize) {
    if lb4_svc_name_v1.get_ptr(&svc_id).is_none() {
        return;
    }
    let first = SvcCounters { packets: 1, bytes: ip_len as u64 };
    // Another CPU's first packet may make them first (EEXIST): this one is added to theirs. (A
    // full map: not counted.)
    if lb4_svc_stat_v1.insert(&svc_id, &first, BPF_NOEXIST).is_err() {
        if let Some(v) = lb4_svc_stat_v1.get_ptr_mut(&svc_id) {
            // SAFETY: as above.
            unsafe {
                (*v).packets += 1;
                (*v).bytes += ip_len as u64;
            }
        }
        return;
    }
    // The agent removes a frontend's name, then its counters: made between the two, they
    // would outlive it. Named no more now: they go again.
    if lb4_svc_name_v1.get_ptr(&svc_id).is_none() {
        let _ = lb4_svc_stat_v1.remove(&svc_id);
    }
}

const BPF_NOEXIST: u64 = 1;
