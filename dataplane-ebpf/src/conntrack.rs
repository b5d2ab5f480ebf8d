//! Connection tracking with a lifecycle, shared by the tc and XDP paths.
//!
//! Every translated connection has two entries, the forward one keyed by the client's tuple and
//! the reply one keyed by the translated tuple reversed; each entry's translation reversed is its
//! peer's key, so either finds the other with one lookup. Both carry the same lifecycle state
//! (`CT_S_*`) and expiry, refreshed together at most once a second and on every state change.
//!
//! Two maps, so that churn can never evict a live connection:
//! - `ct4_v2` (LRU) holds new, unreplied and closing connections. Under pressure the least
//!   recently used of those go first: netfilter's early drop of unassured entries.
//! - `ct4_assured_v2` (a plain hash map) holds established connections. Nothing evicts them;
//!   they leave when they close (back to the LRU map for their last packets) or time out
//!   (garbage collection by the agent, and the packet path treats an expired entry as absent).
//!
//! Timeouts are netfilter's and kube-proxy's (see `dataplane_common::ct_timeout`), configurable
//! per node through `NodeConfig::ct_timeout_s`.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    ct_timeout, stat, Ct4Entry, Ct4Key, DropReason, CT_F_REPLY, CT_S_ASSURED, CT_S_BACKEND_CLOSED_FIRST, CT_S_ESTABLISHED, CT_S_FIN_ORIG,
    CT_S_FIN_REPLY, CT_S_RST, CT_S_SEQ_ORIG, CT_S_SEQ_REPLY, CT_S_TIME_WAIT,
    CT_S_SEEN_REPLY, CT_SOURCE_SERVICE, CT_TIMEOUT_DEFAULT_S, IPPROTO_TCP,
};

use crate::{
    maps::{cfg4_v4, ct4_assured_v2, ct4_v2, ct_scratch, ct_src4_v1, src_scratch},
    parse::{Ipv4Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

pub const SECOND: u64 = 1_000_000_000;
const BPF_NOEXIST: u64 = 1;
/// A closing connection's source port may go to a new connection this long after its last packet
/// even when its last ACK was not seen (lost, or it went another way); at once after the last
/// ACK or a RST, as netfilter takes TIME_WAIT and CLOSE tuples when it needs a port.
const PORT_REUSE_AFTER_NS: u64 = 2 * SECOND;

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The key of `e`'s peer: its translated tuple, reversed.
#[inline(always)]
pub fn peer_key(e: &Ct4Entry, proto: u8) -> Ct4Key {
    Ct4Key { saddr_be: e.nat_daddr_be, daddr_be: e.nat_saddr_be, sport_be: e.nat_dport_be, dport_be: e.nat_sport_be, proto, pad: [0; 3] }
}

/// The tuple of a packet going the other way.
#[inline(always)]
pub fn reversed(k: &Ct4Key) -> Ct4Key {
    Ct4Key { saddr_be: k.daddr_be, daddr_be: k.saddr_be, sport_be: k.dport_be, dport_be: k.sport_be, proto: k.proto, pad: [0; 3] }
}

/// TCP: over (a RST, or a FIN each way). Its entries only translate stragglers now.
#[inline(always)]
pub fn is_closed(state: u32) -> bool {
    state & CT_S_RST != 0 || state & (CT_S_FIN_ORIG | CT_S_FIN_REPLY) == (CT_S_FIN_ORIG | CT_S_FIN_REPLY)
}

/// Entries being built or moved, per CPU (`maps::ct_scratch`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtScratch {
    /// A new connection's reply entry (`place_reply`).
    pub rev: Ct4Entry,
    /// The two entries of a connection moving between the maps (`move_pair`).
    pub mine: Ct4Entry,
    pub peer: Ct4Entry,
}

/// The per-CPU scratch. It always exists (an array slot); the `None` arm only satisfies the
/// verifier.
#[inline(always)]
pub fn scratch() -> Option<&'static mut CtScratch> {
    // SAFETY: per-CPU slot, used by one packet at a time on this CPU.
    ct_scratch.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A live entry found for a key, and which map holds it.
#[derive(Clone, Copy)]
pub struct Hit {
    pub ptr: *mut Ct4Entry,
    pub assured: bool,
}

/// Finds the live entry for `key`: the assured map first (most packets belong to established
/// connections), then the LRU map. An expired entry counts as absent and is deleted on the way.
#[inline(always)]
pub fn lookup(key: &Ct4Key, now: u64) -> Option<Hit> {
    if let Some(ptr) = ct4_assured_v2.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        if unsafe { (*ptr).expires_ns } > now {
            return Some(Hit { ptr, assured: true });
        }
        stats::count(stat::CT_EXPIRED);
        let _ = ct4_assured_v2.remove(key);
    }
    if let Some(ptr) = ct4_v2.get_ptr_mut(key) {
        if unsafe { (*ptr).expires_ns } > now {
            return Some(Hit { ptr, assured: false });
        }
        stats::count(stat::CT_EXPIRED);
        remove_lru(key);
    }
    None
}

#[inline(always)]
fn remove_lru(key: &Ct4Key) {
    if ct4_v2.remove(key).is_ok() {
        stats::count(stat::CT_DELETED);
    }
}

#[inline(always)]
fn remove_from(assured: bool, key: &Ct4Key) {
    if assured {
        let _ = ct4_assured_v2.remove(key);
    } else {
        remove_lru(key);
    }
}

/// Deletes a connection: the entry at `key` (held by `hit`) and its peer.
#[inline(always)]
pub fn remove_pair(key: &Ct4Key, e: &Ct4Entry, assured: bool, proto: u8) {
    remove_from(assured, &peer_key(e, proto));
    remove_from(assured, key);
}

/// How long a connection in `state` lives without a packet.
#[inline(always)]
pub fn timeout_ns(proto: u8, state: u32) -> u64 {
    let idx = if proto == IPPROTO_TCP {
        if state & CT_S_RST != 0 {
            ct_timeout::TCP_CLOSE
        } else if is_closed(state) {
            ct_timeout::TCP_TIME_WAIT
        } else if state & (CT_S_FIN_ORIG | CT_S_FIN_REPLY) != 0 {
            ct_timeout::TCP_CLOSE_WAIT
        } else if state & CT_S_ESTABLISHED != 0 {
            ct_timeout::TCP_ESTABLISHED
        } else {
            ct_timeout::TCP_SYN
        }
    } else if state & CT_S_ESTABLISHED != 0 {
        ct_timeout::UDP_STREAM
    } else {
        ct_timeout::UDP
    };
    // Masked so the verifier sees the index in bounds.
    let idx = idx & (ct_timeout::COUNT - 1);
    let configured = cfg4_v4.get(0).map(|c| c.ct_timeout_s[idx]).unwrap_or(0);
    let s = if configured != 0 { configured } else { default_timeout_s(idx) };
    s as u64 * SECOND
}

/// `CT_TIMEOUT_DEFAULT_S[idx]`, as a match (no read-only data section for one table).
#[inline(always)]
fn default_timeout_s(idx: usize) -> u32 {
    match idx {
        ct_timeout::TCP_SYN => CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_SYN],
        ct_timeout::TCP_ESTABLISHED => CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_ESTABLISHED],
        ct_timeout::TCP_CLOSE_WAIT => CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE_WAIT],
        ct_timeout::TCP_TIME_WAIT => CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_TIME_WAIT],
        ct_timeout::TCP_CLOSE => CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE],
        ct_timeout::UDP_STREAM => CT_TIMEOUT_DEFAULT_S[ct_timeout::UDP_STREAM],
        _ => CT_TIMEOUT_DEFAULT_S[ct_timeout::UDP],
    }
}

/// The lifecycle bits after packet `p` went through entry `e`.
#[inline(always)]
fn next_state(e: &Ct4Entry, p: &Ipv4Packet, now: u64) -> u32 {
    next_state_of(e.state, e.tcp_next, e.created_ns, e.flags & CT_F_REPLY != 0, p, now)
}

/// The lifecycle bits after packet `p` went through an entry in `state` of the forward or the
/// `reply` direction, whose direction last sent up to `tcp_next` and whose connection began at
/// `created_ns`. Shared by the Service and the policy conntrack.
#[inline(always)]
pub fn next_state_of(state: u32, tcp_next: u32, created_ns: u64, reply: bool, p: &Ipv4Packet, now: u64) -> u32 {
    let mut st = state;
    if reply {
        st |= CT_S_SEEN_REPLY;
    }
    if p.proto == IPPROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            // A RST closes the connection only near its sender's sequence, as a TCP endpoint
            // accepts it (RFC 5961) and netfilter checks it: one blind RST with a guessed tuple
            // must not end (and free the port of) someone's idle connection. Before a side has
            // sent anything (a backend refusing the SYN), any RST of it counts.
            let known = state & seq_bit(reply) != 0;
            let near = (p.tcp_next.wrapping_sub(tcp_next) as i32).unsigned_abs() <= RST_WINDOW;
            if !known || near {
                st |= CT_S_RST;
            } else {
                stats::count(stat::CT_RST_IGNORED);
            }
        } else {
            st |= seq_bit(reply);
        }
        // An ACK after both FINs (they were seen before this packet) is the last ACK.
        if state & (CT_S_FIN_ORIG | CT_S_FIN_REPLY) == (CT_S_FIN_ORIG | CT_S_FIN_REPLY) && p.tcp_flags & TCP_ACK != 0 {
            st |= CT_S_TIME_WAIT;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            st |= if reply { CT_S_FIN_REPLY } else { CT_S_FIN_ORIG };
            if reply && state & CT_S_FIN_ORIG == 0 {
                st |= CT_S_BACKEND_CLOSED_FIRST;
            }
        }
        // The client acknowledging the backend's reply completes the handshake.
        if !reply && st & CT_S_SEEN_REPLY != 0 && p.tcp_flags & TCP_ACK != 0 {
            st |= CT_S_ESTABLISHED;
        }
    } else if st & CT_S_SEEN_REPLY != 0 && now.saturating_sub(created_ns) >= STREAM_AFTER_NS {
        // netfilter's rule for UDP: a stream (and assured) only when still active a while after
        // it began with a reply seen. A DNS query and its answer is not, and stays evictable.
        st |= CT_S_ESTABLISHED;
    }
    st
}

/// Does `p` move the sequence a RST is judged against (each segment of this direction that moves
/// it forward; a SYN sets it: a new initial sequence number)? Stored only when it does.
#[inline(always)]
pub fn seq_moves(tcp_next: u32, old_state: u32, new_state: u32, reply: bool, p: &Ipv4Packet) -> bool {
    if p.proto != IPPROTO_TCP || p.tcp_flags & TCP_RST != 0 {
        return false;
    }
    let ahead = (p.tcp_next.wrapping_sub(tcp_next) as i32) > 0;
    ahead || p.tcp_flags & TCP_SYN != 0 || new_state & seq_bit(reply) != old_state & seq_bit(reply)
}

/// A replied UDP (SCTP, other) flow becomes a stream when a packet comes this long after its
/// first (netfilter's UDP rule).
const STREAM_AFTER_NS: u64 = 2 * SECOND;

/// How far a RST's sequence number may be from its sender's next one (reordering slack): a blind
/// attacker must guess within it, 1 in 32 768 of the sequence space.
const RST_WINDOW: u32 = 65_536;

/// The state bit saying the `tcp_next` of the forward (client) or reply (backend) entry is known.
#[inline(always)]
fn seq_bit(reply: bool) -> u32 {
    if reply { CT_S_SEQ_REPLY } else { CT_S_SEQ_ORIG }
}

/// Applies packet `p` to its connection (found at `key` through `hit`): lifecycle bits, expiry
/// (refreshed at most once a second, and on every change, in both entries), and the move between
/// the maps when the connection becomes established or closes. Returns the entry to translate
/// the packet with.
///
/// The entry is written to `out`. `now` is the time the lookup used (one clock read per packet).
// A separate BPF subprogram (the tc and XDP paths, and its moves between maps, would otherwise
// multiply into every path that follows); `&mut` arguments only, see lb::handle_ipv4.
#[inline(never)]
pub fn track(hit: &mut Hit, key: &mut Ct4Key, p: &mut Ipv4Packet, out: &mut Ct4Entry, now: u64) {
    // SAFETY: pointer from a successful lookup; copied (into the caller's scratch) before use.
    *out = unsafe { *hit.ptr };
    let st = next_state(out, p, now);
    if seq_moves(out.tcp_next, out.state, st, out.flags & CT_F_REPLY != 0, p) {
        out.tcp_next = p.tcp_next;
        unsafe { (*hit.ptr).tcp_next = p.tcp_next };
    }
    let want_assured = st & CT_S_ESTABLISHED != 0 && !(p.proto == IPPROTO_TCP && is_closed(st));
    let moving = want_assured != hit.assured;
    // Writes (and a move between the maps) happen on a state change, else at most once a second:
    // a connection that could not move (the assured map full) retries at that pace, not per packet.
    if st == out.state && now.saturating_sub(out.last_seen_ns) < SECOND {
        return;
    }
    out.state = st;
    out.last_seen_ns = now;
    out.expires_ns = now + timeout_ns(p.proto, st);
    let pkey = peer_key(out, p.proto);
    // The move to the assured map is counted against the connection's source
    // (`--conntrack-max-per-source`), in calls beside `move_pair`'s, not inside it: the deepest
    // call chain (ICMP errors) ends there with no stack to spare.
    if moving && (!want_assured || admit_pair(key, &pkey, out)) {
        if move_pair(key, &pkey, out, want_assured) {
            out.state ^= CT_S_ASSURED;
            if !want_assured {
                release_pair(key, &pkey, out);
            }
            return;
        }
        if want_assured {
            release_pair(key, &pkey, out);
        }
    }
    // SAFETY: as above; written field by field so a concurrent update of the translation (a
    // reopened tuple) is not undone.
    unsafe {
        (*hit.ptr).state = st;
        (*hit.ptr).last_seen_ns = now;
        (*hit.ptr).expires_ns = out.expires_ns;
    }
    let peer = if hit.assured { ct4_assured_v2.get_ptr_mut(&pkey) } else { ct4_v2.get_ptr_mut(&pkey) };
    if let Some(pp) = peer {
        unsafe {
            (*pp).state = st;
            (*pp).last_seen_ns = now;
            (*pp).expires_ns = out.expires_ns;
        }
    }
}

/// `source_admit`'s key and value, built in a per-CPU slot.
#[repr(C)]
pub struct SrcScratch {
    pub key: u32,
    pub val: [u32; 2],
}

/// May source `src_be` hold one more assured connection in conntrack `table`
/// (`CT_SOURCE_SERVICE`, `CT_SOURCE_POLICY`)? Counts it if so; if not (its
/// `--conntrack-max-per-source` reached) the connection stays in the LRU map, counted. The
/// garbage collector recounts from the maps, so what the datapath misses (expiry) heals.
#[inline(always)]
pub fn source_admit(src_be: u32, table: usize) -> bool {
    let max = cfg4_v4.get(0).map(|c| c.ct_per_source_max).unwrap_or(0);
    if max == 0 || table > 1 {
        return true;
    }
    let Some(sc) = src_scratch.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's slot.
    let sc = unsafe { &mut *sc };
    sc.key = src_be;
    match ct_src4_v1.get_ptr_mut(&sc.key) {
        Some(c) => {
            // SAFETY: pointer from a successful lookup.
            let n = unsafe { (*c)[table] };
            if n >= max {
                stats::count(stat::CT_SOURCE_LIMIT);
                return false;
            }
            unsafe { (*c)[table] = n + 1 };
        }
        None => {
            sc.val = [0, 0];
            sc.val[table] = 1;
            let _ = ct_src4_v1.insert(&sc.key, &sc.val, 0);
        }
    }
    true
}

/// An assured connection of `src_be` left conntrack `table`'s assured map.
#[inline(always)]
pub fn source_release(src_be: u32, table: usize) {
    if table > 1 {
        return;
    }
    let Some(sc) = src_scratch.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot.
    let sc = unsafe { &mut *sc };
    sc.key = src_be;
    if let Some(c) = ct_src4_v1.get_ptr_mut(&sc.key) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*c)[table] = (*c)[table].saturating_sub(1) };
    }
}

/// `source_admit` for the connection of entry `e` at `key` (its peer at `pkey`).
#[inline(never)]
fn admit_pair(key: &Ct4Key, pkey: &Ct4Key, e: &Ct4Entry) -> bool {
    source_admit(if e.flags & CT_F_REPLY == 0 { key.saddr_be } else { pkey.saddr_be }, CT_SOURCE_SERVICE)
}

/// `source_release` for the connection of entry `e` at `key` (its peer at `pkey`).
#[inline(never)]
fn release_pair(key: &Ct4Key, pkey: &Ct4Key, e: &Ct4Entry) {
    source_release(if e.flags & CT_F_REPLY == 0 { key.saddr_be } else { pkey.saddr_be }, CT_SOURCE_SERVICE)
}

/// Moves a connection's two entries to the assured map (`to_assured`) or back to the LRU map,
/// the new copies first so a packet on another CPU always finds one. Returns false (and leaves
/// everything where it was) when the assured map is full.
// A separate BPF subprogram; the entries it moves are copied through the per-CPU scratch, not
// its stack.
#[inline(never)]
fn move_pair(key: &Ct4Key, pkey: &Ct4Key, e: &Ct4Entry, to_assured: bool) -> bool {
    let Some(sc) = scratch() else { return false };
    let state = if to_assured { e.state | CT_S_ASSURED } else { e.state & !CT_S_ASSURED };
    sc.mine = *e;
    sc.mine.state = state;
    let src = if to_assured { ct4_v2.get_ptr(pkey) } else { ct4_assured_v2.get_ptr(pkey) };
    let have_peer = match src {
        Some(p) => {
            // SAFETY: pointer from a successful lookup.
            sc.peer = unsafe { *p };
            sc.peer.state = state;
            sc.peer.last_seen_ns = e.last_seen_ns;
            sc.peer.expires_ns = e.expires_ns;
            true
        }
        None => false,
    };
    // The connection's source: the original direction's.
    if to_assured {
        if ct4_assured_v2.insert(key, &sc.mine, 0).is_err() {
            stats::count(stat::CT_ASSURED_FULL);
            return false;
        }
        if have_peer && ct4_assured_v2.insert(pkey, &sc.peer, 0).is_err() {
            let _ = ct4_assured_v2.remove(key);
            stats::count(stat::CT_ASSURED_FULL);
            return false;
        }
        remove_lru(pkey);
        remove_lru(key);
        stats::count(stat::CT_ASSURED);
    } else {
        if ct4_v2.insert(key, &sc.mine, 0).is_ok() {
            stats::count(stat::CT_CREATED);
        }
        if have_peer && ct4_v2.insert(pkey, &sc.peer, 0).is_ok() {
            stats::count(stat::CT_CREATED);
        }
        let _ = ct4_assured_v2.remove(pkey);
        let _ = ct4_assured_v2.remove(key);
        stats::count(stat::CT_CLOSING);
    }
    true
}

/// What `place_reply` found at a translated tuple.
pub const PLACED: u32 = 0;
pub const TAKEN: u32 = 1;

/// Records the reply entry of a new connection (built in the per-CPU scratch, `rev`) at its
/// translated tuple `rev_key`, which must be unique. The tuple may be held by:
/// - this very connection (a retransmitted first packet): refreshed;
/// - an expired connection, or one closed at least two seconds ago (netfilter reuses TIME_WAIT
///   tuples the same way when it runs out of ports): taken over, its forward entry deleted so
///   its stragglers cannot be translated onto the new connection;
/// - a live connection: `TAKEN`, the caller tries another source port.
///
/// `mode` says which held tuples may be taken (the caller widens it as tries fail, so a free
/// port always wins over a finished connection's, as in netfilter, which takes TIME_WAIT and
/// CLOSE tuples only when it runs out of free ones): `TAKE_NONE`, `TAKE_SAFE` (expired; ended by a
/// RST; or in TIME_WAIT with the client having closed first, so no backend socket holds the tuple),
/// `TAKE_ANY` (also the backend closed first and holds TIME_WAIT on it, or closed two seconds ago
/// without a last ACK seen).
#[inline(always)]
pub fn place_reply(rev_key: &Ct4Key, mode: u32) -> u32 {
    ferry_ct_place_reply(rev_key.saddr_be, rev_key.daddr_be, ((rev_key.sport_be as u32) << 16) | rev_key.dport_be as u32, rev_key.proto as u32, mode)
}

pub const TAKE_NONE: u32 = 0;
pub const TAKE_SAFE: u32 = 1;
pub const TAKE_ANY: u32 = 2;

/// `place_reply` as a global BPF function, called from a loop over candidate ports: verified
/// once, not once per iteration. Scalars only (the tuple, ports packed as `sport << 16 | dport`
/// in wire order); the entry comes through the scratch.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_ct_place_reply(saddr_be: u32, daddr_be: u32, ports: u32, proto: u32, mode: u32) -> u32 {
    let rev_key = &Ct4Key { saddr_be, daddr_be, sport_be: (ports >> 16) as u16, dport_be: ports as u16, proto: proto as u8, pad: [0; 3] };
    let Some(sc) = scratch() else { return TAKEN };
    let rev = &sc.rev;
    let now = rev.created_ns;
    let proto = rev_key.proto;
    // The assured map first: a tuple it holds must not be shadowed by a new LRU entry.
    let (old, assured) = match ct4_assured_v2.get_ptr(rev_key) {
        // SAFETY: pointer from a successful lookup.
        Some(o) => (unsafe { *o }, true),
        None => {
            if ct4_v2.insert(rev_key, rev, BPF_NOEXIST).is_ok() {
                stats::count(stat::CT_CREATED);
                return PLACED;
            }
            match ct4_v2.get_ptr(rev_key) {
                Some(o) => (unsafe { *o }, false),
                // Gone in between (evicted): take the tuple.
                None => {
                    return if ct4_v2.insert(rev_key, rev, 0).is_ok() { PLACED } else { TAKEN };
                }
            }
        }
    };
    // Compared with XOR/OR: a field-by-field `==` chain becomes a bcmp() call, which the BPF
    // target can only emit as a subprogram the verifier rejects here.
    let same = ((old.nat_daddr_be ^ rev.nat_daddr_be)
        | (old.nat_saddr_be ^ rev.nat_saddr_be)
        | ((old.nat_dport_be ^ rev.nat_dport_be) as u32)
        | ((old.nat_sport_be ^ rev.nat_sport_be) as u32))
        == 0;
    let expired = old.expires_ns <= now;
    let closed = proto == IPPROTO_TCP && is_closed(old.state);
    let safe = expired
        || (closed && (old.state & CT_S_RST != 0 || (old.state & CT_S_TIME_WAIT != 0 && old.state & CT_S_BACKEND_CLOSED_FIRST == 0)));
    let any = closed && (old.state & CT_S_TIME_WAIT != 0 || now.saturating_sub(old.last_seen_ns) >= PORT_REUSE_AFTER_NS);
    let takeable = (mode >= TAKE_SAFE && safe) || (mode >= TAKE_ANY && any);
    if !same && !takeable {
        return TAKEN;
    }
    if !same {
        // The old connection's forward entry would translate its stragglers onto this tuple.
        remove_from(assured, &peer_key(&old, proto));
        stats::count(stat::PORT_REUSE);
    }
    if assured {
        let _ = ct4_assured_v2.remove(rev_key);
        if ct4_v2.insert(rev_key, rev, 0).is_ok() {
            stats::count(stat::CT_CREATED);
        }
    } else if ct4_v2.insert(rev_key, rev, 0).is_err() {
        return TAKEN;
    }
    PLACED
}

/// Records the forward entry `fwd` of a new connection (its reply entry is in place). When
/// another CPU created the same connection at the same moment (a UDP burst), `fwd` becomes its
/// entry, so every packet of the flow goes one way. Returns 0 or the drop reason's code.
#[inline(always)]
pub fn place_forward(key: &Ct4Key, fwd: &mut Ct4Entry, alive: impl Fn(&Ct4Entry) -> bool) -> u32 {
    if ct4_v2.insert(key, &*fwd, BPF_NOEXIST).is_ok() {
        stats::count(stat::CT_CREATED);
        return 0;
    }
    if let Some(existing) = ct4_v2.get_ptr(key) {
        // SAFETY: pointer from a successful lookup.
        let existing = unsafe { &*existing };
        if existing.expires_ns > fwd.created_ns && alive(existing) && !is_closed(existing.state) {
            *fwd = *existing;
            return 0;
        }
    }
    match ct4_v2.insert(key, &*fwd, 0) {
        Ok(()) => 0,
        Err(_) => DropReason::CtInsert as u32,
    }
}
