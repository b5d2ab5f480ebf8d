//! The conntrack maps from userspace: batched reads (inspection, the endpoint flush) and the
//! garbage collector.
//!
//! The datapath already treats an expired entry as absent and deletes the ones it meets; the
//! collector reclaims the rest, so that dead connections never fill the assured map (which
//! nothing evicts) and LRU pressure stays for live ones. Like Cilium's, its interval adapts to
//! what it finds: it runs more often while many entries expire, less often while few do. Each
//! run walks both maps with `BPF_MAP_LOOKUP_BATCH` (a few thousand entries per syscall), and its
//! counts are what `/metrics` reports: a scrape never walks conntrack.
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use dataplane_common::{names, Ct4Entry, Ct4Key, PolCtEntry, PolCtKey, CT_F_REPLY, PCT_F_REPLY};

use crate::error::LoadError;

/// Both conntrack maps.
pub struct Conntrack {
    /// New, unreplied and closing connections (LRU).
    pub lru: HashMap<MapData, Ct4Key, Ct4Entry>,
    /// Established connections.
    pub assured: HashMap<MapData, Ct4Key, Ct4Entry>,
    /// The same maps' descriptors, for the batched walks aya has no call for.
    fds: [OwnedFd; 2],
    caps: (u32, u32),
}

/// One conntrack entry as read back, and the map that holds it.
#[derive(Clone, Copy, Debug)]
pub struct CtRow {
    pub key: Ct4Key,
    pub entry: Ct4Entry,
    pub assured: bool,
}

impl CtRow {
    pub fn is_reply(&self) -> bool {
        self.entry.flags & CT_F_REPLY != 0
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the datapath's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

/// Calls `f` for every entry of a hash map, a batch of entries per syscall. Entries added or
/// removed meanwhile may or may not be seen, as with any walk of a live map.
fn for_each<K: aya::Pod + Default + Copy, V: aya::Pod + Default + Copy>(fd: &OwnedFd, mut f: impl FnMut(K, V)) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let fd = fd.as_raw_fd();
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The hash map's batch cursor is a bucket index.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    // Bounded: each call returns at least one entry or ends the walk; the bucket count bounds
    // the calls.
    for _ in 0..(1 << 24) {
        let mut attr = Attr {
            in_batch: if first { 0 } else { &mut token_in as *mut u32 as u64 },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut Attr, std::mem::size_of::<Attr>() as u32) };
        let err = (r != 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(BATCH);
        for i in 0..n {
            f(keys[i], values[i]);
        }
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(e),
        }
        first = false;
        token_in = token_out;
    }
    Ok(())
}

impl Conntrack {
    pub fn from_maps(lru: Map, assured: Map) -> Result<Self, LoadError> {
        let fd_and_cap = |m: &Map, name: &'static str| -> Result<(OwnedFd, u32), LoadError> {
            let data = match m {
                Map::LruHashMap(d) | Map::HashMap(d) => d,
                _ => return Err(LoadError::Map { name, source: MapError::InvalidMapType { map_type: 0 } }),
            };
            let fd = data.fd().as_fd().try_clone_to_owned()?;
            Ok((fd, data.info().map(|i| i.max_entries()).unwrap_or(0)))
        };
        let (lru_fd, lru_cap) = fd_and_cap(&lru, names::CONNTRACK)?;
        let (assured_fd, assured_cap) = fd_and_cap(&assured, names::CONNTRACK_ASSURED)?;
        Ok(Conntrack {
            lru: HashMap::try_from(lru).map_err(|source| LoadError::Map { name: names::CONNTRACK, source })?,
            assured: HashMap::try_from(assured).map_err(|source| LoadError::Map { name: names::CONNTRACK_ASSURED, source })?,
            fds: [lru_fd, assured_fd],
            caps: (lru_cap, assured_cap),
        })
    }

    pub fn from_pins(dir: &Path) -> Result<Self, LoadError> {
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(|source| LoadError::Map { name, source });
        Self::from_maps(Map::LruHashMap(open(names::CONNTRACK)?), Map::HashMap(open(names::CONNTRACK_ASSURED)?))
    }

    /// Every entry of both maps (batched reads).
    pub fn rows(&self) -> Vec<CtRow> {
        let mut out = Vec::new();
        for (fd, assured) in [(&self.fds[1], true), (&self.fds[0], false)] {
            let _ = for_each::<Ct4Key, Ct4Entry>(fd, |key, entry| out.push(CtRow { key, entry, assured }));
        }
        out
    }

    /// Deletes the entry at `key` in whichever map holds it. Returns whether one was deleted
    /// from the LRU map (for the eviction count).
    pub fn remove(&mut self, row: &CtRow) -> Result<bool, MapError> {
        let map = if row.assured { &mut self.assured } else { &mut self.lru };
        match map.remove(&row.key) {
            Ok(()) => Ok(!row.assured),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Capacities (max_entries) of the LRU and the assured map.
    pub fn capacities(&self) -> (u32, u32) {
        self.caps
    }
}

/// Adds `n` to the agent's own counter of LRU entries it deleted (`slot`:
/// `stat::CT_AGENT_DELETED` or `stat::POL_CT_AGENT_DELETED`, slots no program writes), kept in the pinned stats map so the eviction estimate survives
/// restarts.
pub fn count_agent_deletes(stats: &mut PerCpuArray<MapData, u64>, slot: u32, n: u64) {
    if n == 0 {
        return;
    }
    if let Ok(mut v) = stats.get(&slot, 0) {
        let mut vals: Vec<u64> = v.iter().copied().collect();
        if let Some(first) = vals.first_mut() {
            *first += n;
        }
        if let Ok(pv) = PerCpuValues::try_from(vals) {
            v = pv;
            let _ = stats.set(slot, v, 0);
        }
    }
}

/// The figures of one collector run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcRun {
    /// Live entries left in the LRU and the assured map.
    pub live_lru: u64,
    pub live_assured: u64,
    /// Expired entries deleted from each.
    pub deleted_lru: u64,
    pub deleted_assured: u64,
    /// Live forward entries (connections) by (protocol, state name).
    pub connections: std::collections::BTreeMap<(u8, &'static str), u64>,
    /// Assured connections by source address (network order): `--conntrack-max-per-source`'s
    /// counts, recounted.
    pub sources: std::collections::BTreeMap<u32, u32>,
    pub took: Duration,
}

/// A connection's state as an operator reads it.
pub fn state_name(e: &Ct4Entry, proto: u8) -> &'static str {
    use dataplane_common::{CT_S_ESTABLISHED, CT_S_FIN_ORIG, CT_S_FIN_REPLY, CT_S_RST, CT_S_SEEN_REPLY, IPPROTO_TCP};
    let s = e.state;
    if proto == IPPROTO_TCP {
        if s & CT_S_RST != 0 {
            "closed"
        } else if s & (CT_S_FIN_ORIG | CT_S_FIN_REPLY) == (CT_S_FIN_ORIG | CT_S_FIN_REPLY) {
            "time_wait"
        } else if s & (CT_S_FIN_ORIG | CT_S_FIN_REPLY) != 0 {
            "closing"
        } else if s & CT_S_ESTABLISHED != 0 {
            "established"
        } else {
            "syn_sent"
        }
    } else if s & CT_S_ESTABLISHED != 0 {
        "stream"
    } else if s & CT_S_SEEN_REPLY != 0 {
        "replied"
    } else {
        "unreplied"
    }
}

/// One collector pass at `now`: deletes every expired entry of both maps (each checked again
/// just before its deletion, so an entry the datapath refreshed or re-created meanwhile stays).
pub fn collect(ct: &mut Conntrack, now: u64) -> GcRun {
    let started = Instant::now();
    let mut run = GcRun::default();
    for row in ct.rows() {
        if row.entry.expires_ns > now {
            if row.assured {
                run.live_assured += 1;
            } else {
                run.live_lru += 1;
            }
            if !row.is_reply() {
                *run.connections.entry((row.key.proto, state_name(&row.entry, row.key.proto))).or_default() += 1;
                if row.assured {
                    *run.sources.entry(row.key.saddr_be).or_default() += 1;
                }
            }
            continue;
        }
        let map = if row.assured { &ct.assured } else { &ct.lru };
        let still_expired = map.get(&row.key, 0).is_ok_and(|e| e.expires_ns <= now);
        if still_expired && ct.remove(&row).is_ok() {
            if row.assured {
                run.deleted_assured += 1;
            } else {
                run.deleted_lru += 1;
            }
        }
    }
    run.took = started.elapsed();
    run
}

/// The policy conntrack maps (`pol_ct4_v2`, LRU, and `pol_ct4_assured_v2`), collected the same
/// way: every entry past its expiry is deleted, checked again just before.
pub struct PolicyConntrack {
    lru: HashMap<MapData, PolCtKey, PolCtEntry>,
    assured: HashMap<MapData, PolCtKey, PolCtEntry>,
    fds: [OwnedFd; 2],
    /// Capacities of the LRU and the assured map.
    pub caps: (u32, u32),
}

impl PolicyConntrack {
    pub fn from_pins(dir: &Path) -> Result<Self, LoadError> {
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(|source| LoadError::Map { name, source });
        let (lru, assured) = (open(names::POL_CONNTRACK)?, open(names::POL_CONNTRACK_ASSURED)?);
        let fds = [lru.fd().as_fd().try_clone_to_owned()?, assured.fd().as_fd().try_clone_to_owned()?];
        let cap = |m: &MapData| m.info().map(|i| i.max_entries()).unwrap_or(0);
        let caps = (cap(&lru), cap(&assured));
        Ok(PolicyConntrack {
            caps,
            lru: HashMap::try_from(Map::LruHashMap(lru)).map_err(|source| LoadError::Map { name: names::POL_CONNTRACK, source })?,
            assured: HashMap::try_from(Map::HashMap(assured)).map_err(|source| LoadError::Map { name: names::POL_CONNTRACK_ASSURED, source })?,
            fds,
        })
    }

    /// Every entry of both maps: (key, entry, in the assured map).
    pub fn rows(&self) -> Vec<(PolCtKey, PolCtEntry, bool)> {
        let mut out = Vec::new();
        for (fd, assured) in [(&self.fds[1], true), (&self.fds[0], false)] {
            let _ = for_each::<PolCtKey, PolCtEntry>(fd, |k, e| out.push((k, e, assured)));
        }
        out
    }

    /// One collector pass at `now` (live and deleted counts per map, in a `GcRun`).
    pub fn collect(&mut self, now: u64) -> GcRun {
        let started = Instant::now();
        let mut run = GcRun::default();
        for (key, entry, assured) in self.rows() {
            let map = if assured { &mut self.assured } else { &mut self.lru };
            let (live, deleted) = if assured { (&mut run.live_assured, &mut run.deleted_assured) } else { (&mut run.live_lru, &mut run.deleted_lru) };
            if entry.expires_ns > now {
                *live += 1;
                if assured && entry.flags & PCT_F_REPLY == 0 {
                    *run.sources.entry(key.tuple.saddr_be).or_default() += 1;
                }
            } else if map.get(&key, 0).is_ok_and(|e| e.expires_ns <= now) && map.remove(&key).is_ok() {
                *deleted += 1;
            }
        }
        run.took = started.elapsed();
        run
    }
}

/// The per-source counts of assured connections (`ct_src4_v1`), which the datapath keeps as
/// connections move in and out of the assured maps and the collector sets to what the maps
/// hold after each run (expiries and deletions the datapath does not count heal there).
pub struct SourceCounts {
    map: HashMap<MapData, u32, [u32; 2]>,
}

impl SourceCounts {
    pub fn from_pins(dir: &Path) -> Result<Self, LoadError> {
        let data = MapData::from_pin(dir.join(names::CT_SOURCES)).map_err(|source| LoadError::Map { name: names::CT_SOURCES, source })?;
        Ok(SourceCounts { map: HashMap::try_from(Map::LruHashMap(data)).map_err(|source| LoadError::Map { name: names::CT_SOURCES, source })? })
    }

    /// Sets every source's counts to `service` and `policy` (from one collector run each);
    /// sources with none are removed. Returns the highest count of any source in each.
    pub fn recount(&mut self, service: &std::collections::BTreeMap<u32, u32>, policy: &std::collections::BTreeMap<u32, u32>) -> (u32, u32) {
        let have: Vec<u32> = self.map.keys().flatten().collect();
        for src in have {
            if !service.contains_key(&src) && !policy.contains_key(&src) {
                let _ = self.map.remove(&src);
            }
        }
        for src in service.keys().chain(policy.keys()) {
            let want = [service.get(src).copied().unwrap_or(0), policy.get(src).copied().unwrap_or(0)];
            if self.map.get(src, 0).ok() != Some(want) {
                let _ = self.map.insert(src, want, 0);
            }
        }
        (service.values().copied().max().unwrap_or(0), policy.values().copied().max().unwrap_or(0))
    }
}

/// The collector's adaptive interval (Cilium's rule): halved while a run reclaims more than a
/// quarter of a map's capacity, grown by half while it reclaims less than 5%.
#[derive(Clone, Copy, Debug)]
pub struct Interval {
    pub now: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl Default for Interval {
    fn default() -> Self {
        // Starts short, so the first figures come soon after start-up; quiet runs lengthen it.
        Interval { now: Duration::from_secs(2), min: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

impl Interval {
    pub fn after(&mut self, run: &GcRun, caps: (u32, u32)) -> Duration {
        let ratio = |deleted: u64, cap: u32| if cap == 0 { 0.0 } else { deleted as f64 / cap as f64 };
        let r = ratio(run.deleted_lru, caps.0).max(ratio(run.deleted_assured, caps.1));
        if r > 0.25 {
            self.now /= 2;
        } else if r < 0.05 {
            self.now = self.now.mul_f64(1.5);
        }
        self.now = self.now.clamp(self.min, self.max);
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_adapts_within_bounds() {
        let mut i = Interval::default();
        let busy = GcRun { deleted_lru: 600, ..Default::default() };
        let quiet = GcRun { deleted_lru: 1, ..Default::default() };
        assert_eq!(i.after(&busy, (1000, 1000)), Duration::from_secs(1));
        for _ in 0..10 {
            i.after(&busy, (1000, 1000));
        }
        assert_eq!(i.now, Duration::from_secs(1));
        for _ in 0..20 {
            i.after(&quiet, (1000, 1000));
        }
        assert_eq!(i.now, Duration::from_secs(60));
        // Between 5% and 25%: unchanged.
        let mid = GcRun { deleted_assured: 100, ..Default::default() };
        assert_eq!(i.after(&mid, (1000, 1000)), Duration::from_secs(60));
    }
}
