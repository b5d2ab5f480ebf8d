//! Backend selection math, pure (no maps): consistent-hashing lookup tables.
//!
//! Every frontend with consistent hashing gets a table of `M` entries (M prime), each naming a
//! backend; the datapath picks `table[hash(flow) % M]`, one lookup whatever the number of
//! backends. A table depends only on the set of backend addresses, so every node and every
//! restart computes the same one, and a flow picks the same backend on every node. Two builders:
//!
//! - **rendezvous** (the default): each entry goes to the backend with the highest hash of
//!   (entry, backend), i.e. highest-random-weight hashing per entry. Removing a backend changes
//!   exactly the entries it held (their second choices take them) and no other; adding one takes
//!   only entries from others. The spread is binomial: about ±3/sqrt(M/N) per backend.
//! - **maglev** (Eisenbud et al., NSDI 2016): near-perfect spread, but the table is rebuilt from
//!   its permutations, so a removal also moves a few percent of other entries.
use crate::model::L4Addr;

/// Entries per table. Prime; about 100 entries per backend keep the spread within ~1% up to ten
/// backends and within a few percent up to a hundred.
pub const TABLE_M: usize = dataplane_common::CHASH_TABLE_SIZE as usize;

/// FNV-1a, 64-bit, with a seed: stable across builds and machines (unlike std's hashers).
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x100_0000_01b3);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The Maglev table for `backends` (any order; they are sorted first): for each entry, the
/// index of its backend in the sorted list. Empty for no backends.
pub fn maglev_table(backends: &[L4Addr], m: usize) -> Vec<usize> {
    let mut sorted: Vec<L4Addr> = backends.to_vec();
    sorted.sort();
    sorted.dedup();
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|b| {
            let key = format!("{}:{}/{}", b.addr, b.port, b.proto);
            let offset = (fnv1a(0x6d61_676c, key.as_bytes()) % m as u64) as usize;
            let skip = (fnv1a(0x6576_3231, key.as_bytes()) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut entry = vec![usize::MAX; m];
    let mut filled = 0;
    loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while entry[c] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c] = i;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return entry;
            }
        }
    }
}

/// The rendezvous table for `backends` (any order; they are sorted first): for each entry, the
/// index of its backend in the sorted list. Empty for no backends.
pub fn rendezvous_table(backends: &[L4Addr], m: usize) -> Vec<usize> {
    let sorted = sorted_backends(backends);
    if sorted.is_empty() {
        return Vec::new();
    }
    let keys: Vec<u64> = sorted.iter().map(|b| fnv1a(0x7265_6e64, format!("{}:{}/{}", b.addr, b.port, b.proto).as_bytes())).collect();
    (0..m)
        .map(|slot| {
            let mut best = 0;
            let mut best_w = 0u64;
            for (i, k) in keys.iter().enumerate() {
                let w = mix64(*k ^ (slot as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                if i == 0 || w > best_w {
                    best = i;
                    best_w = w;
                }
            }
            best
        })
        .collect()
}

/// A 64-bit finalizer (splitmix64): independent-looking weights for every (entry, backend).
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The sorted backend list a table's indices refer to.
pub fn sorted_backends(backends: &[L4Addr]) -> Vec<L4Addr> {
    let mut v = backends.to_vec();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;
    use std::net::Ipv4Addr;

    type Builder = fn(&[L4Addr], usize) -> Vec<usize>;

    /// Each entry's backend (not index) in the table `build` makes for `backends`.
    fn entries(build: Builder, backends: &[L4Addr]) -> Vec<L4Addr> {
        let order = sorted_backends(backends);
        build(backends, TABLE_M).iter().map(|i| order[*i]).collect()
    }

    /// Tables for ten backends and for the same without `be(4)`, and how many entries of the
    /// other nine changed; asserts that none still points at the removed backend.
    fn others_moved_on_removal(build: Builder) -> usize {
        let all: Vec<L4Addr> = (1..=10).map(be).collect();
        let gone = be(4);
        let rest: Vec<L4Addr> = all.iter().copied().filter(|b| *b != gone).collect();
        let (before, after) = (entries(build, &all), entries(build, &rest));
        assert!(after.iter().all(|a| *a != gone));
        before.iter().zip(&after).filter(|(b, a)| **b != gone && b != a).count()
    }

    fn be(i: u32) -> L4Addr {
        L4Addr { addr: Ipv4Addr::from(0x0a00_0000 + i), port: 8080, proto: Proto::Tcp }
    }

    #[test]
    fn every_entry_filled_and_spread_evenly() {
        for n in [1usize, 2, 3, 7, 10] {
            let backends: Vec<L4Addr> = (1..=n as u32).map(be).collect();
            let t = maglev_table(&backends, TABLE_M);
            assert_eq!(t.len(), TABLE_M);
            let mut counts = vec![0usize; n];
            for i in &t {
                counts[*i] += 1;
            }
            let ideal = TABLE_M as f64 / n as f64;
            for c in counts {
                assert!((c as f64 - ideal).abs() <= ideal * 0.02 + 1.0, "n={n}: {c} vs {ideal}");
            }
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table_in_any_order() {
        let a: Vec<L4Addr> = (1..=5).map(be).collect();
        let mut b = a.clone();
        b.reverse();
        assert_eq!(maglev_table(&a, TABLE_M), maglev_table(&b, TABLE_M));
    }

    #[test]
    fn rendezvous_moves_exactly_the_removed_backends_entries() {
        assert_eq!(others_moved_on_removal(rendezvous_table), 0, "an entry of another backend moved");
        // And adding one takes entries only for itself.
        let all: Vec<L4Addr> = (1..=10).map(be).collect();
        let more: Vec<L4Addr> = all.iter().copied().chain([be(11)]).collect();
        for (b, a) in entries(rendezvous_table, &all).iter().zip(&entries(rendezvous_table, &more)) {
            assert!(a == b || *a == be(11));
        }
    }

    #[test]
    fn rendezvous_spreads_within_binomial_bounds() {
        for n in [2usize, 3, 5, 10] {
            let backends: Vec<L4Addr> = (1..=n as u32).map(be).collect();
            let mut counts = vec![0usize; n];
            for i in rendezvous_table(&backends, TABLE_M) {
                counts[i] += 1;
            }
            let ideal = TABLE_M as f64 / n as f64;
            let sigma = (ideal * (1.0 - 1.0 / n as f64)).sqrt();
            for c in counts {
                assert!((c as f64 - ideal).abs() <= 4.0 * sigma, "n={n}: {c} vs {ideal} (sigma {sigma:.1})");
            }
        }
    }

    #[test]
    fn removing_one_backend_moves_its_entries_and_few_others() {
        // Maglev's minimal disruption: a handful of entries that were not on the removed
        // backend move too (the table is rebuilt from scratch, not patched).
        let moved = others_moved_on_removal(maglev_table);
        assert!((moved as f64 / TABLE_M as f64) < 0.05, "{moved} of {TABLE_M} entries of other backends moved");
    }
}
