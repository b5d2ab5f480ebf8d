//! Where each frontend's consistent-hashing table lives in the flat table array
//! (`lb4_chash_flat_v1`): regions `(offset, length)` in entries, handed out by the agent. Pure
//! bookkeeping (no maps): `bpf.rs` writes the entries and the service entries that point at them.
//!
//! A region a service entry stopped pointing at may still be read: a program that read the old
//! entry reads the table after it, in the same run. Such a region is *retired*, not freed: it
//! waits in quarantine until a synchronize point that began after it was retired has passed (an
//! update of a map of maps, after which the kernel guarantees that every non-sleepable program
//! that was running has ended: `synchronize_rcu`). tc, XDP and the socket hooks are
//! non-sleepable, and a program cannot outlive its RCU read section, so after that wait no
//! program holds the old entry. Regions that no entry ever pointed at (a table written for an
//! entry whose update then failed) are freed at once.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

/// A region of the table array: `len` entries from `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    pub off: u32,
    pub len: u32,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.off as u64 + self.len as u64
    }
}

#[derive(Clone, Copy, Debug)]
struct Retired {
    region: Region,
    /// The synchronize epoch it was retired in: freed by the end of a synchronize of a later
    /// start (`begin_synchronize` returned this epoch or more).
    epoch: u64,
    at: Instant,
}

/// The allocator: best fit over the free regions (so a few large tables do not split the space
/// small ones need), neighbours merged when freed.
#[derive(Debug)]
pub struct TableArena {
    capacity: u32,
    free_by_off: BTreeMap<u32, u32>,
    free_by_len: BTreeSet<(u32, u32)>,
    quarantine: Vec<Retired>,
    epoch: u64,
    /// Entries in regions handed out and not freed (quarantine included).
    used: u64,
}

impl TableArena {
    /// An empty array of `capacity` entries.
    pub fn new(capacity: u32) -> Self {
        let mut a = TableArena { capacity, free_by_off: BTreeMap::new(), free_by_len: BTreeSet::new(), quarantine: Vec::new(), epoch: 0, used: 0 };
        if capacity > 0 {
            a.insert_free(Region { off: 0, len: capacity });
        }
        a
    }

    /// The state of an array whose service entries point at `regions` (a restart: read from the
    /// service map). Everything else is free. Returns the regions refused: past the array's end,
    /// or overlapping one accepted before it (a duplicate or a corrupted entry), whose frontends
    /// get a new table at the next sync.
    pub fn rebuild(capacity: u32, regions: impl IntoIterator<Item = Region>) -> (Self, Vec<Region>) {
        let mut sorted: Vec<Region> = regions.into_iter().filter(|r| r.len > 0).collect();
        sorted.sort();
        let mut a = TableArena { capacity, free_by_off: BTreeMap::new(), free_by_len: BTreeSet::new(), quarantine: Vec::new(), epoch: 0, used: 0 };
        let mut refused = Vec::new();
        let mut next = 0u64;
        for r in sorted {
            if r.end() > capacity as u64 || (r.off as u64) < next {
                refused.push(r);
                continue;
            }
            if r.off as u64 > next {
                a.insert_free(Region { off: next as u32, len: (r.off as u64 - next) as u32 });
            }
            a.used += r.len as u64;
            next = r.end();
        }
        if next < capacity as u64 {
            a.insert_free(Region { off: next as u32, len: (capacity as u64 - next) as u32 });
        }
        (a, refused)
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries handed out, quarantined ones included.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Entries waiting in quarantine.
    pub fn quarantined(&self) -> u64 {
        self.quarantine.iter().map(|r| r.region.len as u64).sum()
    }

    /// When the oldest quarantined region was retired.
    pub fn oldest_retired(&self) -> Option<Instant> {
        self.quarantine.iter().map(|r| r.at).min()
    }

    /// The largest free region (what the next allocation can get at most).
    pub fn largest_free(&self) -> u32 {
        self.free_by_len.iter().next_back().map_or(0, |(len, _)| *len)
    }

    /// A region of `len` entries (best fit), or `None` when no free region is that large.
    pub fn alloc(&mut self, len: u32) -> Option<Region> {
        if len == 0 {
            return None;
        }
        let &(flen, foff) = self.free_by_len.range((len, 0)..).next()?;
        self.free_by_len.remove(&(flen, foff));
        self.free_by_off.remove(&foff);
        if flen > len {
            let rest = Region { off: foff + len, len: flen - len };
            self.free_by_off.insert(rest.off, rest.len);
            self.free_by_len.insert((rest.len, rest.off));
        }
        self.used += len as u64;
        Some(Region { off: foff, len })
    }

    /// Frees a region no service entry ever pointed at: reusable at once.
    pub fn free(&mut self, r: Region) {
        if r.len == 0 {
            return;
        }
        self.used -= r.len as u64;
        self.insert_free(r);
    }

    /// A region a service entry pointed at until now: reusable after the next synchronize.
    pub fn retire(&mut self, r: Region, now: Instant) {
        if r.len > 0 {
            self.quarantine.push(Retired { region: r, epoch: self.epoch, at: now });
        }
    }

    /// Call right before waiting for a synchronize point; hand the result to [`Self::synchronized`]
    /// once the wait has returned.
    pub fn begin_synchronize(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch - 1
    }

    /// The synchronize begun as `epoch` has passed: every region retired before it began is
    /// free. Returns the entries freed.
    pub fn synchronized(&mut self, epoch: u64) -> u64 {
        let (done, wait): (Vec<Retired>, Vec<Retired>) = self.quarantine.drain(..).partition(|r| r.epoch <= epoch);
        self.quarantine = wait;
        let mut n = 0;
        for r in done {
            n += r.region.len as u64;
            self.free(r.region);
        }
        n
    }

    fn insert_free(&mut self, mut r: Region) {
        // Merge with the free neighbours on either side.
        if let Some((&poff, &plen)) = self.free_by_off.range(..r.off).next_back() {
            debug_assert!(poff as u64 + plen as u64 <= r.off as u64, "freeing {r:?} inside free {poff}+{plen}");
            if poff as u64 + plen as u64 == r.off as u64 {
                self.free_by_off.remove(&poff);
                self.free_by_len.remove(&(plen, poff));
                r = Region { off: poff, len: plen + r.len };
            }
        }
        if let Some(&nlen) = self.free_by_off.get(&(r.off + r.len)) {
            let noff = r.off + r.len;
            self.free_by_off.remove(&noff);
            self.free_by_len.remove(&(nlen, noff));
            r.len += nlen;
        }
        self.free_by_off.insert(r.off, r.len);
        self.free_by_len.insert((r.len, r.off));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: Region, b: Region) -> bool {
        (a.off as u64) < b.end() && (b.off as u64) < a.end()
    }

    #[test]
    fn regions_never_overlap_and_freed_space_merges_back() {
        let mut a = TableArena::new(1000);
        let r: Vec<Region> = (0..10).map(|_| a.alloc(61).unwrap()).collect();
        for (i, x) in r.iter().enumerate() {
            assert!(x.end() <= 1000);
            for y in &r[i + 1..] {
                assert!(!overlaps(*x, *y), "{x:?} {y:?}");
            }
        }
        assert_eq!(a.used(), 610);
        assert!(a.alloc(391).is_none(), "only 390 entries are left");
        assert_eq!(a.alloc(390).map(|r| r.len), Some(390));
        // Freed in any order, everything merges into one region again.
        for x in [r[3], r[0], r[9], r[1], r[2], r[8], r[4], r[6], r[5], r[7]] {
            a.free(x);
        }
        a.free(Region { off: 610, len: 390 });
        assert_eq!((a.used(), a.largest_free()), (0, 1000));
    }

    #[test]
    fn best_fit_keeps_large_regions_whole() {
        let mut a = TableArena::new(1000);
        let (x, _y, z, _w) = (a.alloc(100).unwrap(), a.alloc(100).unwrap(), a.alloc(61).unwrap(), a.alloc(500).unwrap());
        a.free(x);
        a.free(z);
        // Free: 100 at 0, 61 at 200, 239 at 761. 61 entries take the freed 61 rather than split
        // the 100, and 100 take the 100 rather than split the 239.
        assert_eq!(a.alloc(61), Some(z));
        assert_eq!(a.alloc(100), Some(x));
    }

    #[test]
    fn a_retired_region_is_reused_only_after_a_synchronize_that_began_after_it() {
        let now = Instant::now();
        let mut a = TableArena::new(200);
        let old = a.alloc(100).unwrap();
        let _other = a.alloc(100).unwrap();
        // A synchronize already running when the region was retired does not count.
        let running = a.begin_synchronize();
        a.retire(old, now);
        assert_eq!(a.quarantined(), 100);
        assert!(a.alloc(50).is_none(), "a quarantined region was handed out");
        assert_eq!(a.synchronized(running), 0);
        assert!(a.alloc(50).is_none(), "reused after a synchronize that began before the retirement");
        let e = a.begin_synchronize();
        assert_eq!(a.synchronized(e), 100);
        assert_eq!((a.quarantined(), a.used()), (0, 100));
        assert_eq!(a.alloc(100), Some(old));
    }

    #[test]
    fn rebuilt_from_the_service_entries_the_rest_is_free_and_bad_regions_are_refused() {
        let regions = [Region { off: 100, len: 61 }, Region { off: 0, len: 61 }, Region { off: 120, len: 10 }, Region { off: 990, len: 61 }, Region { off: 500, len: 0 }];
        let (mut a, refused) = TableArena::rebuild(1000, regions);
        assert_eq!(refused, vec![Region { off: 120, len: 10 }, Region { off: 990, len: 61 }]);
        assert_eq!(a.used(), 122);
        let mut got = Vec::new();
        while let Some(r) = a.alloc(1) {
            got.push(r.off);
        }
        assert_eq!(got.len(), 1000 - 122);
        assert!(got.iter().all(|o| !(0..61).contains(o) && !(100..161).contains(o)));
    }
}
