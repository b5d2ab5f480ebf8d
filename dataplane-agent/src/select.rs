//! Backend selection math, pure (no maps): consistent-hashing lookup tables.
//!
//! Every frontend with consistent hashing gets a table of `M` entries (M prime, chosen by the
//! number of backends: [`table_size`]), each naming a backend; the datapath picks
//! `table[hash(flow) % M]`, one lookup whatever the number of backends. A table depends only on
//! the set of backend addresses, so every node and every restart computes the same one, and a
//! flow picks the same backend on every node. Two builders:
//!
//! - **maglev** (the default): Maglev's per-backend permutations of the table (Eisenbud et al.,
//!   NSDI 2016), filled in lockstep instead of in turns: at step `r` every backend with room
//!   claims the `r`-th entry of its permutation if it is still free. Each backend has room for
//!   `floor(M/N)` or `ceil(M/N)` entries, so with `M >= 10 N` the busiest has at most 1.1x the
//!   mean and every backend has entries. Removing a backend moves its entries and a few of the
//!   others': at most 5.2% of them up to 25 backends (251 entries), 3.9% from 26 to 1000 (the
//!   worst near 45 backends in 1021 entries; 2.7% at 100, 0.9% at 300, 0.5% at 1000). Maglev's own
//!   turn-by-turn filling, where a backend whose choice is taken takes its next free entry at
//!   once, gives the same spread but moves up to twice as many (7.4%): each skip shifts the
//!   choices after it.
//! - **rendezvous**: each entry goes to the backend with the highest hash of (entry, backend).
//!   Removing a backend moves exactly its entries and adding one takes entries only for itself,
//!   but the spread is binomial (about ±3·sqrt(N/M) of the mean): within 10% up to about 10
//!   backends, the busiest at 1.5x the mean at 50 and about 2x from 100.
//!
//! When the number of backends crosses a size threshold the table is rebuilt at the new size and
//! `hash % M` changes for every flow: new connections of most flows go elsewhere once (tracked
//! connections keep their backend).
use crate::{model::L4Addr, reconcile::Algorithm};

/// The table sizes, smallest first: primes, each about four times the last, so a Service
/// crosses few thresholds as it grows. They start at 251 (up to 25 backends): every table lives
/// in one array (`lb4_chash_flat_v1`) whose memory is fixed at load time, and most Services have
/// a few endpoints (1021 entries for 3 backends took 100 000 Services to 408 MB, 817 MB with the
/// 8-byte elements of the per-frontend arrays before). Not smaller: a table of 61 or 127
/// entries moves up to 7% of the other backends' entries when a backend of five goes (each
/// entry is 1.6% of a 61-entry table), 251 moves 2.5% in that case, 1021 2.7%.
pub const TABLE_SIZES: [usize; 5] = [251, 1021, 4093, 16381, 65521];

/// Entries per backend a table must have. The default table gives every backend `floor(M/N)` or
/// `ceil(M/N)` entries, so the busiest has at most `(M/N + 1) / (M/N)` of the mean: 1.1x at 10.
pub const MIN_ENTRIES_PER_BACKEND: usize = 10;

/// The table size for `n` backends: the smallest of [`TABLE_SIZES`] with at least
/// [`MIN_ENTRIES_PER_BACKEND`] entries per backend (up to 6552 backends), else the largest. A
/// function of `n` alone, so every node picks the same.
pub fn table_size(n: usize) -> usize {
    TABLE_SIZES.iter().copied().find(|m| *m >= n.saturating_mul(MIN_ENTRIES_PER_BACKEND)).unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// The table `algorithm` builds for `backends`, at [`table_size`]: for each entry, the index of
/// its backend in [`sorted_backends`]. Empty for no backends, and for `Random` (no table).
pub fn build_table(algorithm: Algorithm, backends: &[L4Addr]) -> Vec<usize> {
    let m = table_size(sorted_backends(backends).len());
    match algorithm {
        Algorithm::Maglev => maglev_table(backends, m),
        Algorithm::Rendezvous => rendezvous_table(backends, m),
        Algorithm::Random => Vec::new(),
    }
}

/// FNV-1a, 64-bit, with a seed: stable across builds and machines (unlike std's hashers).
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x100_0000_01b3);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// What a backend is hashed by: its address alone, never an id, which differs between nodes.
fn backend_key(b: &L4Addr) -> String {
    format!("{}:{}/{}", b.addr, b.port, b.proto)
}

/// The default table of `m` entries (m prime) for `backends` (any order; they are sorted
/// first): for each entry, the index of its backend in the sorted list. Empty for no backends.
///
/// Backend `b` prefers the entries in the order of its Maglev permutation `offset_b + r * skip_b
/// (mod m)`. At step `r` every backend with room claims its `r`-th entry if no earlier step
/// filled it; when several claim one entry at the same step, the highest hash of (entry,
/// backend) wins and the others try again at the next step. The result is the unique greedy
/// matching in the order (step, hash), so it does not depend on the order backends are visited
/// in, and a removed backend's entries go to whoever reaches them first while the rest mostly
/// stays put. Room: `floor(m/n)` each, and one more for the `m % n` backends with the lowest
/// hash.
///
/// Ends: the free entries and the room left are always equal in number, so some backend has
/// room, and within `m` steps its permutation reaches every free entry. In practice about `m`
/// steps, each visiting the backends with room.
pub fn maglev_table(backends: &[L4Addr], m: usize) -> Vec<usize> {
    let sorted = sorted_backends(backends);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let keys: Vec<String> = sorted.iter().map(backend_key).collect();
    // With m prime every skip in 1..m visits every entry.
    let perms: Vec<(usize, usize)> = keys
        .iter()
        .map(|k| ((fnv1a(0x6d61_676c, k.as_bytes()) % m as u64) as usize, (fnv1a(0x6576_3231, k.as_bytes()) % (m as u64 - 1)) as usize + 1))
        .collect();
    let ties: Vec<u64> = keys.iter().map(|k| fnv1a(0x7469_6573, k.as_bytes())).collect();
    let mut room = vec![m / n; n];
    let mut by_hash: Vec<usize> = (0..n).collect();
    by_hash.sort_by_key(|i| (mix64(ties[*i]), *i));
    for i in by_hash.into_iter().take(m % n) {
        room[i] += 1;
    }
    let mut owner = vec![usize::MAX; m];
    // The step and hash of the claim holding each entry: only a claim of the same step competes.
    let mut claim = vec![(usize::MAX, 0u64); m];
    let mut active: Vec<usize> = (0..n).filter(|i| room[*i] > 0).collect();
    let mut free = m;
    let mut step = 0usize;
    while free > 0 {
        let r = step % m;
        for &i in &active {
            let (offset, skip) = perms[i];
            let e = (offset + r * skip) % m;
            let w = mix64(ties[i] ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            if owner[e] == usize::MAX {
                free -= 1;
            } else if claim[e].0 == step && w > claim[e].1 {
                room[owner[e]] += 1;
            } else {
                continue;
            }
            owner[e] = i;
            claim[e] = (step, w);
            room[i] -= 1;
        }
        active.retain(|i| room[*i] > 0);
        step += 1;
    }
    owner
}

/// The rendezvous table of `m` entries for `backends` (any order; they are sorted first): for
/// each entry, the index of its backend in the sorted list. Empty for no backends.
pub fn rendezvous_table(backends: &[L4Addr], m: usize) -> Vec<usize> {
    let sorted = sorted_backends(backends);
    if sorted.is_empty() {
        return Vec::new();
    }
    let keys: Vec<u64> = sorted.iter().map(|b| fnv1a(0x7265_6e64, backend_key(b).as_bytes())).collect();
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

    fn be(i: u32) -> L4Addr {
        L4Addr { addr: Ipv4Addr::from(0x0a00_0000 + i), port: 8080, proto: Proto::Tcp }
    }

    fn backends(n: u32) -> Vec<L4Addr> {
        (1..=n).map(be).collect()
    }

    /// Each entry's backend (not index) in the table `algorithm` builds for `backends`.
    fn entries(algorithm: Algorithm, backends: &[L4Addr]) -> Vec<L4Addr> {
        let order = sorted_backends(backends);
        build_table(algorithm, backends).iter().map(|i| order[*i]).collect()
    }

    /// Entries per backend of the table `algorithm` builds for `n` backends.
    fn counts(algorithm: Algorithm, n: u32) -> Vec<usize> {
        let mut counts = vec![0usize; n as usize];
        for i in build_table(algorithm, &backends(n)) {
            counts[i] += 1;
        }
        counts
    }

    /// Out of the table's entries, the fraction that belonged to a backend other than `gone` and
    /// changed backend when `gone` was removed from `all`. Asserts that the removed backend holds
    /// no entry afterwards.
    fn others_moved(algorithm: Algorithm, all: &[L4Addr], gone: L4Addr) -> f64 {
        let rest: Vec<L4Addr> = all.iter().copied().filter(|b| *b != gone).collect();
        let (before, after) = (entries(algorithm, all), entries(algorithm, &rest));
        assert_eq!(before.len(), after.len(), "the removal crossed a table size");
        assert!(after.iter().all(|a| *a != gone));
        before.iter().zip(&after).filter(|(b, a)| **b != gone && b != a).count() as f64 / before.len() as f64
    }

    #[test]
    fn table_sizes_are_prime_and_give_ten_entries_per_backend() {
        for m in TABLE_SIZES {
            assert!((2..m).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m} is not prime");
        }
        for (n, m) in [(0, 251), (1, 251), (25, 251), (26, 1021), (102, 1021), (103, 4093), (409, 4093), (410, 16381), (1000, 16381), (1638, 16381), (1639, 65521), (100_000, 65521)] {
            assert_eq!(table_size(n), m, "n={n}");
        }
        for n in 1..=6552 {
            assert!(table_size(n) >= n * MIN_ENTRIES_PER_BACKEND, "n={n}");
        }
    }

    #[test]
    fn the_default_gives_every_backend_entries_and_the_busiest_at_most_1_1x_the_mean() {
        // The counts, and both sides of each size threshold (the tightest cases). With
        // the fixed 1021 entries, 300 backends left 13 without traffic and one at 3.5x.
        for n in [1, 2, 3, 7, 10, 25, 26, 50, 100, 102, 103, 300, 409, 410, 1000] {
            let c = counts(Algorithm::default(), n);
            let mean = table_size(n as usize) as f64 / n as f64;
            let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            assert!(min > 0, "n={n}: a backend has no entry");
            assert!(max as f64 <= 1.1 * mean, "n={n}: the busiest backend has {max} entries, {:.3}x the mean", max as f64 / mean);
            // Exactly floor or ceil of the mean: the room each backend is given.
            assert!(max - min <= 1, "n={n}: {min}..{max} entries");
        }
    }

    #[test]
    fn the_default_removing_a_backend_moves_its_entries_and_few_others() {
        // Measured (the largest of these three removals): 0.98% at 3 backends, 2.74% at 100,
        // 0.88% at 300, 0.45% at 1000; over every count from 2 to 1000 the worst is 3.92% (45).
        for (n, bound) in [(3u32, 0.012), (45, 0.04), (100, 0.03), (300, 0.01), (1000, 0.005)] {
            let all = backends(n);
            for gone in [1, n / 2 + 1, n] {
                let moved = others_moved(Algorithm::default(), &all, be(gone));
                assert!(moved <= bound, "n={n}, removing backend {gone}: {:.2}% of the other entries moved", moved * 100.0);
            }
        }
    }

    #[test]
    fn the_same_backends_give_the_same_table_in_any_order() {
        let a = backends(5);
        let mut b = a.clone();
        b.reverse();
        b.push(a[0]);
        for algorithm in [Algorithm::Maglev, Algorithm::Rendezvous] {
            assert_eq!(build_table(algorithm, &a), build_table(algorithm, &b));
        }
        assert!(build_table(Algorithm::Random, &a).is_empty());
        assert!(build_table(Algorithm::Maglev, &[]).is_empty());
    }

    #[test]
    fn rendezvous_moves_exactly_the_removed_backends_entries() {
        for n in [10, 300] {
            assert_eq!(others_moved(Algorithm::Rendezvous, &backends(n), be(4)), 0.0, "n={n}: an entry of another backend moved");
        }
        // And adding one takes entries only for itself.
        let all = backends(10);
        let more: Vec<L4Addr> = all.iter().copied().chain([be(11)]).collect();
        for (b, a) in entries(Algorithm::Rendezvous, &all).iter().zip(&entries(Algorithm::Rendezvous, &more)) {
            assert!(a == b || *a == be(11));
        }
    }

    #[test]
    fn rendezvous_spreads_within_binomial_bounds() {
        for n in [2u32, 3, 5, 10, 100] {
            let ideal = table_size(n as usize) as f64 / n as f64;
            let sigma = (ideal * (1.0 - 1.0 / n as f64)).sqrt();
            for c in counts(Algorithm::Rendezvous, n) {
                assert!((c as f64 - ideal).abs() <= 4.0 * sigma, "n={n}: {c} vs {ideal} (sigma {sigma:.1})");
            }
        }
    }
}
