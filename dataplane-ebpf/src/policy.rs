//! NetworkPolicy verdicts from maps, in constant time: for a pod some policy isolates, a new
//! connection costs one endpoint lookup, one policy-conntrack lookup, one ipcache LPM lookup and
//! at most two rule LPM lookups (the peer's identity, then "any peer"). Nothing loops over
//! policies or rules; the agent compiled them into `pol_rule4_v1`.
//!
//! Allowed connections are tracked (`pol_ct4_v2`, `pol_ct4_assured_v2`) with the Service
//! conntrack's lifecycle (`conntrack::next_state_of`, the same states and timeouts), keyed by the
//! tuple and the pod interface the decision was made for: an entry lets through only packets to
//! or from that pod, so a tuple forged or seen elsewhere opens nothing. Every entry carries the
//! policy generation it was decided under; when the agent changes what policies allow it bumps
//! the generation, and the next packet of an older connection is decided again against the
//! current rules (and cut, its entries deleted, if they no longer allow it; the cut tuples are
//! remembered in `pol_revoked4_v1` so the pod's own packets do not reopen them, until a later
//! change allows them again).
//!
//! Every pod of the node is tracked, selected or not (an unselected pod's connections are
//! allowed and tracked without events), so that a policy that starts isolating a pod keeps the
//! connections it still allows.
use aya_ebpf::{btf_maps::lpm_trie::Key, programs::TcContext};
use dataplane_common::{
    identity, stat, Ct4Key, DropReason, PolCtEntry, PolCtKey, PolRevoked, PolEndpoint, PolEvKey, PolFragKey, PolRuleKey, PolicyEvent, CT_S_ESTABLISHED, DIR_INGRESS,
    EP_F_EGRESS, EP_F_INGRESS, EV_FROM_NODE, EV_NOT_ISOLATED, EV_RULE, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PCT_F_ORIG, PCT_F_REPLY,
    PCT_F_TRANSLATED, RULE_PREFIX_FULL, VERDICT_ALLOW, VERDICT_DENY, CT_F_REPLY, CT_F_SNAT, CT_SOURCE_POLICY, DIR_EGRESS, LOCAL_HOST, LOCAL_POD,
};

use crate::{
    conntrack::{is_closed, next_state_of, now, reversed, seq_moves, source_admit, source_release, timeout_ns, SECOND},
    maps::{
        cfg4_v4, local4_v1, pol_revoked4_v1, pol_ct4_assured_v2, pol_ct4_v2, pol_drop_v1, pol_entry_scratch, pol_ep4_v1, pol_events_v2, pol_evlimit4_v1, pol_frag4_v1, pol_ipcache4_v1, pol_rule4_v1,
        pol_scratch,
    },
    parse::{self, Ipv4Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// ICMP echo in a policy tuple: the identifier is one port, this mark the other (request:
/// `(id, MARK)`, reply: `(MARK, id)`), so a reply matches its request's entry reversed and a
/// request with the same identifier does not.
const ECHO_MARK: u16 = 0xecec;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The ports a connection is known by: TCP, UDP and SCTP ports; ICMP echo's identifier (see
/// `ECHO_MARK`); none for other protocols (their entries are per address pair and protocol).
#[inline(always)]
fn policy_ports(ctx: &TcContext, p: &Ipv4Packet) -> (u16, u16) {
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (p.sport_be, p.dport_be),
        IPPROTO_ICMP => match ctx.load::<[u8; 6]>(p.l4_off) {
            Ok(h) if h[0] == ICMP_ECHO_REQUEST => (u16::from_ne_bytes([h[4], h[5]]), ECHO_MARK),
            Ok(h) if h[0] == ICMP_ECHO_REPLY => (ECHO_MARK, u16::from_ne_bytes([h[4], h[5]])),
            _ => (0, 0),
        },
        _ => (0, 0),
    }
}

#[inline(always)]
fn generation() -> u32 {
    cfg4_v4.get(0).map(|c| c.pol_generation).unwrap_or(0)
}

#[inline(always)]
fn rev(k: &PolCtKey) -> PolCtKey {
    PolCtKey { tuple: reversed(&k.tuple), ifindex: k.ifindex }
}

/// Writes `v` at `k` in the LRU map, counted (the eviction figure is created minus deleted minus
/// present).
#[inline(always)]
fn lru_insert(k: &PolCtKey, v: &PolCtEntry) -> bool {
    let ok = pol_ct4_v2.insert(k, v, 0).is_ok();
    if ok {
        stats::count(stat::POL_CT_CREATED);
    }
    ok
}

#[inline(always)]
fn lru_remove(k: &PolCtKey) {
    if pol_ct4_v2.remove(k).is_ok() {
        stats::count(stat::POL_CT_DELETED);
    }
}

/// A live policy entry.
#[derive(Clone, Copy)]
struct PHit {
    ptr: *mut PolCtEntry,
}

/// The live entry for `key` (an expired one counts as absent and is deleted).
#[inline(always)]
fn lookup(key: &PolCtKey, now: u64) -> Option<PHit> {
    if let Some(ptr) = pol_ct4_assured_v2.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        if unsafe { (*ptr).expires_ns } > now {
            return Some(PHit { ptr });
        }
        let _ = pol_ct4_assured_v2.remove(key);
    }
    if let Some(ptr) = pol_ct4_v2.get_ptr_mut(key) {
        if unsafe { (*ptr).expires_ns } > now {
            return Some(PHit { ptr });
        }
        lru_remove(key);
    }
    None
}

/// The keys of the connection an entry belongs to: forward, reply, and (a Service connection)
/// its untranslated reply. Derived from any one of them.
#[inline(always)]
fn group(key: &PolCtKey, e: &PolCtEntry) -> [PolCtKey; 3] {
    let fwd = if e.flags & PCT_F_REPLY == 0 {
        *key
    } else if e.flags & PCT_F_ORIG == 0 {
        rev(key)
    } else {
        // The untranslated reply reversed is the client's tuple to the Service; the forward
        // entry has the backend in its place.
        let mut f = rev(key);
        f.tuple.daddr_be = e.peer_addr_be;
        f.tuple.dport_be = e.peer_port_be;
        f
    };
    let orig = if e.flags & (PCT_F_TRANSLATED | PCT_F_ORIG) != 0 {
        let service = if e.flags & PCT_F_ORIG != 0 { key.tuple } else { Ct4Key { saddr_be: e.peer_addr_be, sport_be: e.peer_port_be, ..reversed(&fwd.tuple) } };
        PolCtKey { tuple: service, ifindex: key.ifindex }
    } else {
        // No third entry: the reply key again (updated twice, harmlessly).
        rev(&fwd)
    };
    [fwd, rev(&fwd), orig]
}

/// The decision for a connection of pod `ep` with `peer` in direction `dir` to port `dport_be`.
#[derive(Clone, Copy)]
struct Decision {
    allowed: bool,
    policy_id: u32,
    reason: u8,
    identity: u32,
}

#[inline(always)]
fn rule(ep_id: u32, identity: u32, dir: u8, proto: u8, port_be: u16) -> Option<u32> {
    let key = Key::new(RULE_PREFIX_FULL, PolRuleKey { ep_id_be: ep_id.to_be(), identity_be: identity.to_be(), dir, proto, port_be });
    pol_rule4_v1.get(&key).copied()
}

#[inline(always)]
fn decide(ep: &PolEndpoint, peer_be: u32, dir: u8, proto: u8, dport_be: u16) -> Decision {
    let ingress = dir == DIR_INGRESS;
    let identity = pol_ipcache4_v1.get(&Key::new(32, peer_be)).copied().unwrap_or(identity::WORLD);
    if ep.flags & if ingress { EP_F_INGRESS } else { EP_F_EGRESS } == 0 {
        // Not isolated this way (but the other: its replies must pass).
        return Decision { allowed: true, policy_id: 0, reason: EV_NOT_ISOLATED, identity };
    }
    if ingress && identity == identity::HOST {
        // Kubernetes: a pod's own node may always reach it (kubelet probes).
        return Decision { allowed: true, policy_id: 0, reason: EV_FROM_NODE, identity };
    }
    let port_be = if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) { dport_be } else { 0 };
    match rule(ep.ep_id, identity, dir, proto, port_be).or_else(|| rule(ep.ep_id, identity::ANY, dir, proto, port_be)) {
        Some(policy_id) => Decision { allowed: true, policy_id, reason: EV_RULE, identity },
        None => Decision { allowed: false, policy_id: if ingress { ep.ingress_policy } else { ep.egress_policy }, reason: EV_RULE, identity },
    }
}

/// The peer a connection into a pod is judged on: its source, except for a connection from
/// outside that a Service translated to this node's address on its way here (a ClusterIP
/// reached from outside the cluster): the real client, from the Service conntrack's reply
/// entry, as kube-proxy with Calico judges it (before masquerade). Only the node's own traffic
/// is the node. `t`: the packet's tuple as it enters the pod.
#[inline(never)]
fn ingress_peer(t: &Ct4Key) -> u32 {
    // SAFETY: map values read in place.
    let host = unsafe { local4_v1.get(&t.saddr_be).is_some_and(|l| l.kind == LOCAL_HOST) };
    if !host {
        return t.saddr_be;
    }
    let reply = reversed(t);
    match crate::conntrack::lookup(&reply, now()) {
        // SAFETY: pointer from a successful lookup.
        Some(hit) if unsafe { (*hit.ptr).flags } & (CT_F_REPLY | CT_F_SNAT) == (CT_F_REPLY | CT_F_SNAT) => unsafe { (*hit.ptr).nat_daddr_be },
        _ => t.saddr_be,
    }
}

/// Is the connection of entry `e` (at `key`) still allowed by the current policies? Decided as
/// its first packet was: its pod, direction, peer and port.
#[inline(always)]
fn still_allowed(key: &PolCtKey, e: &PolCtEntry) -> bool {
    allowed_now(e.ep_addr_be, e.dir, &group(key, e)[0].tuple)
}

/// Would the current policies allow the connection `fwd` of pod `ep_addr_be` in direction `dir`?
#[inline(always)]
fn allowed_now(ep_addr_be: u32, dir: u8, fwd: &Ct4Key) -> bool {
    let Some(ep) = (unsafe { pol_ep4_v1.get(&ep_addr_be) }) else {
        // No policy selects the pod any more.
        return true;
    };
    let peer = if dir == DIR_INGRESS { ingress_peer(fwd) } else { fwd.daddr_be };
    decide(ep, peer, dir, fwd.proto, fwd.dport_be).allowed
}

/// When the policies changed since the connection of `key`'s entry (at `ptr`) was decided:
/// decides it again. Returns false, with every entry of the connection deleted, when the current
/// rules no longer allow it.
#[inline(never)]
fn recheck(key: &PolCtKey, ptr: *mut PolCtEntry) -> bool {
    // SAFETY: pointer from a successful lookup (read in place, not copied onto the stack).
    let e = unsafe { &*ptr };
    if still_allowed(key, e) {
        stats::count(stat::POL_RECHECKED);
        return true;
    }
    let keys = group(key, e);
    let Some(r) = pol_entry_scratch.get_ptr_mut(0) else { return false };
    // The tombstone is built in the per-CPU entry scratch (its layout's first bytes), off the
    // stack.
    let t = unsafe { &mut *(r as *mut PolRevoked) };
    t.last_seen_ns = now();
    t.fwd = keys[0].tuple;
    t.ep_addr_be = e.ep_addr_be;
    t.generation = generation();
    t.dir = e.dir;
    for k in keys.iter() {
        let _ = pol_ct4_assured_v2.remove(k);
        lru_remove(k);
        // Remembered as cut: the pod's own next packets must not reopen it (see `fresh`).
        let _ = pol_revoked4_v1.insert(k, &*t, 0);
    }
    stats::count(stat::POL_REVOKED);
    false
}

// `recheck` builds a tombstone in the entry scratch.
const _: () = assert!(core::mem::size_of::<PolRevoked>() <= core::mem::size_of::<PolCtEntry>());

/// How long a cut connection's tuple stays remembered after its last packet.
const REVOKED_FOR_NS: u64 = 120 * SECOND;

/// Was the connection of `key` (on this pod interface) cut by a policy change, and has it been
/// seen within `REVOKED_FOR_NS`? Refreshes the memory when so.
/// Once the policies changed again, the cut connection is decided again as it was first: if the
/// current policies allow it, it is forgotten and may reopen.
#[inline(never)]
fn was_revoked(key: &PolCtKey, now: u64) -> bool {
    let Some(t) = pol_revoked4_v1.get_ptr_mut(key) else { return false };
    // SAFETY: pointer from a successful lookup; fields read in place.
    let t = unsafe { &mut *t };
    if now.saturating_sub(t.last_seen_ns) >= REVOKED_FOR_NS {
        return false;
    }
    let gen = generation();
    if t.generation != gen {
        if allowed_now(t.ep_addr_be, t.dir, &t.fwd) {
            let _ = pol_revoked4_v1.remove(key);
            return false;
        }
        t.generation = gen;
    }
    t.last_seen_ns = now;
    true
}

/// A packet of the connection of `key`'s entry: when the policies changed since it was decided,
/// the decision again (`recheck`), then its lifecycle (`track`). Returns false when the
/// connection is no longer allowed: its entries are gone and the packet must be decided as new.
#[inline(always)]
fn follow(key: &PolCtKey, hit: &PHit, p: &Ipv4Packet, now: u64) -> bool {
    // SAFETY: pointer from a successful lookup.
    if unsafe { (*hit.ptr).generation } != generation() && !recheck(key, hit.ptr) {
        return false;
    }
    track(key, hit, p, now);
    true
}

/// Applies the connection of `key`'s entry to this packet: its lifecycle (state and expiry,
/// refreshed at most once a second and on every change, and the policy generation, in every
/// entry of the connection; the move to the assured map once established, back when closing).
// Separate BPF subprograms (`recheck` too), called side by side: their frames never stack.
#[inline(never)]
fn track(key: &PolCtKey, hit: &PHit, p: &Ipv4Packet, now: u64) {
    let ptr = hit.ptr;
    let gen = generation();
    // SAFETY: pointer from a successful lookup; fields read one by one (no copy on the stack).
    let (e_gen, flags, state, tcp_next, created, last_seen) =
        unsafe { ((*ptr).generation, (*ptr).flags, (*ptr).state, (*ptr).tcp_next, (*ptr).created_ns, (*ptr).last_seen_ns) };
    let reply = flags & PCT_F_REPLY != 0;
    let st = next_state_of(state, tcp_next, created, reply, p, now);
    if seq_moves(tcp_next, state, st, reply, p) {
        unsafe { (*ptr).tcp_next = p.tcp_next };
    }
    if st == state && e_gen == gen && now.saturating_sub(last_seen) < SECOND {
        return;
    }
    let expires = now + timeout_ns(p.proto, st);
    let mut want_assured = st & CT_S_ESTABLISHED != 0 && !(p.proto == IPPROTO_TCP && is_closed(st));
    // SAFETY: as above.
    let keys = group(key, unsafe { &*ptr });
    // The connection moves as a whole; its source (the forward tuple's) is counted against
    // `--conntrack-max-per-source`.
    let src = keys[0].tuple.saddr_be;
    let assured_now = pol_ct4_assured_v2.get_ptr(&keys[0]).is_some();
    if want_assured && !assured_now && !source_admit(src, CT_SOURCE_POLICY) {
        want_assured = false;
    } else if !want_assured && assured_now {
        source_release(src, CT_SOURCE_POLICY);
    }
    for k in keys.iter() {
        let (from_assured, ptr) = match pol_ct4_assured_v2.get_ptr_mut(k) {
            Some(ptr) => (true, ptr),
            None => match pol_ct4_v2.get_ptr_mut(k) {
                Some(ptr) => (false, ptr),
                None => continue,
            },
        };
        // SAFETY: pointer from a successful lookup.
        unsafe {
            (*ptr).state = st;
            (*ptr).generation = gen;
            (*ptr).last_seen_ns = now;
            (*ptr).expires_ns = expires;
        }
        if want_assured != from_assured {
            // SAFETY: a map value, copied by the update.
            let v = unsafe { &*ptr };
            if want_assured {
                if pol_ct4_assured_v2.insert(k, v, 0).is_ok() {
                    lru_remove(k);
                } else {
                    stats::count(stat::POL_CT_ASSURED_FULL);
                }
            } else if lru_insert(k, v) {
                let _ = pol_ct4_assured_v2.remove(k);
            }
        }
    }
}

/// Records an allowed new connection of pod `ep_addr_be` in direction `dir` (packed in `ep_dir`:
/// address << 8 | direction), allowed by `policy_id`: its forward entry at `fwd` (the packet's
/// tuple on this pod's interface), its reply, and for a Service connection translated on its way
/// out of this pod (`orig`: the tuple before translation) the reply as it arrives translated
/// back. The entry is built in a per-CPU scratch slot, off the stack.
#[inline(never)]
fn remember(fwd: &PolCtKey, orig: &Ct4Key, p: &Ipv4Packet, policy_id: u32, ep_dir: u64) {
    let Some(ptr) = pol_entry_scratch.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, not shared while the program runs.
    let e = unsafe { &mut *ptr };
    let now = now();
    let translated = orig.proto != 0 && ((orig.daddr_be ^ fwd.tuple.daddr_be) | (orig.dport_be ^ fwd.tuple.dport_be) as u32) != 0;
    let state = next_state_of(0, 0, now, false, p, now);
    e.dir = ep_dir as u8;
    e.ep_addr_be = (ep_dir >> 8) as u32;
    e.policy_id = policy_id;
    e.generation = generation();
    e.state = state;
    e.tcp_next = p.tcp_next;
    e.created_ns = now;
    e.last_seen_ns = now;
    e.expires_ns = now + timeout_ns(p.proto, state);
    e.flags = 0;
    e.peer_addr_be = 0;
    e.peer_port_be = 0;
    if translated {
        e.flags = PCT_F_TRANSLATED;
        e.peer_addr_be = orig.daddr_be;
        e.peer_port_be = orig.dport_be;
    }
    lru_insert(fwd, e);
    e.flags |= PCT_F_REPLY;
    e.tcp_next = 0;
    lru_insert(&rev(fwd), e);
    if translated {
        e.flags = PCT_F_REPLY | PCT_F_ORIG;
        e.peer_addr_be = fwd.tuple.daddr_be;
        e.peer_port_be = fwd.tuple.dport_be;
        lru_insert(&PolCtKey { tuple: reversed(orig), ifindex: fwd.ifindex }, e);
    }
}

/// A verdict event for the monitor: every allow of a new connection; denies at most once a
/// second per pod, peer, port and direction (the rest counted as suppressed). A full ring loses
/// the event (counted), never the packet.
#[inline(never)]
fn event(key: &Ct4Key, dir: u8, d: &Decision, ep_be: u32, now: u64) {
    let verdict = if d.allowed { VERDICT_ALLOW } else { VERDICT_DENY };
    if !d.allowed {
        let peer_be = if key.saddr_be == ep_be { key.daddr_be } else { key.saddr_be };
        let lk = PolEvKey { ep_be, peer_be, port_be: key.dport_be, proto: key.proto, dir };
        if let Some(last) = pol_evlimit4_v1.get_ptr_mut(&lk) {
            // SAFETY: pointer from a successful lookup.
            if now.saturating_sub(unsafe { *last }) < SECOND {
                stats::count(stat::POL_EVENTS_SUPPRESSED);
                return;
            }
            unsafe { *last = now };
        } else {
            let _ = pol_evlimit4_v1.insert(&lk, &now, 0);
        }
    }
    let ev = PolicyEvent {
        ts_ns: now,
        saddr_be: key.saddr_be,
        daddr_be: key.daddr_be,
        sport_be: key.sport_be,
        dport_be: key.dport_be,
        proto: key.proto,
        dir,
        verdict,
        reason: d.reason,
        policy_id: d.policy_id,
        identity: d.identity,
    };
    if pol_events_v2.output(&ev, 0).is_err() {
        stats::count(stat::POL_EVENTS_LOST);
    }
}

/// `egress_pre`'s answers: no decision (a pod not tracked), a decision after Service
/// translation, or a reply of a connection into the pod (decided only if translation sends it
/// to a new destination: `dst_changed`).
pub const PRE_NONE: u32 = 0;
pub const PRE_DECIDE: u32 = 1;
pub const PRE_REPLY: u32 = 2;

/// Is `addr_be` a pod whose connections the policy conntrack tracks? A pod some policy selects,
/// or any pod of this node the agent knows: connections are tracked before a policy isolates
/// the pod, so those it still allows keep flowing when one does.
#[inline(always)]
fn tracked(addr_be: u32) -> Option<u32> {
    if let Some(ep) = unsafe { pol_ep4_v1.get(&addr_be) } {
        return Some(ep.flags);
    }
    match unsafe { local4_v1.get(&addr_be) } {
        Some(l) if l.kind == LOCAL_POD => Some(0),
        _ => None,
    }
}

/// On a packet leaving a pod, before Service translation: `PRE_NONE`, `PRE_REPLY` (the reply of
/// a connection into the pod, which must be judged before it is translated back to the Service
/// address), or `PRE_DECIDE`; the untranslated tuple saved for `check` and `dst_changed`.
#[inline(never)]
pub fn egress_pre(ctx: &TcContext) -> u32 {
    let p = match parse::parse_ipv4(ctx) {
        Ok(Some(p)) => p,
        _ => return PRE_NONE,
    };
    if tracked(p.saddr_be).is_none() {
        return PRE_NONE;
    }
    let (sport_be, dport_be) = if p.frag_off != 0 { (0, 0) } else { policy_ports(ctx, &p) };
    let orig = Ct4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, sport_be, dport_be, proto: p.proto, pad: [0; 3] };
    // Kept per CPU until `check` runs on the same packet (the program is not preempted on this
    // CPU in between); not on the stack, whose 512 bytes the Service path already needs.
    if let Some(slot) = pol_scratch.get_ptr_mut(0) {
        unsafe { *slot = orig };
    }
    if p.frag_off != 0 {
        return PRE_DECIDE;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = PolCtKey { tuple: orig, ifindex };
    let now = now();
    if let Some(hit) = lookup(&key, now) {
        // SAFETY: pointer from a successful lookup.
        let flags = unsafe { (*hit.ptr).flags };
        if flags & (PCT_F_REPLY | PCT_F_ORIG) == PCT_F_REPLY && follow(&key, &hit, &p, now) {
            if p.more_frags {
                // Its later fragments carry no ports: they follow this verdict.
                let _ = pol_frag4_v1.insert(&PolFragKey { saddr_be: p.saddr_be, daddr_be: p.daddr_be, ifindex, id_be: p.id_be, proto: p.proto, dir: DIR_EGRESS }, &1, 0);
            }
            return PRE_REPLY;
        }
    }
    PRE_DECIDE
}

/// After the Service path: did it send the packet to a Service's backend (a forward
/// translation: the pod addressed a Service frontend, and the destination changed)? A reply's
/// reverse translation (back to a masqueraded client) is not one.
#[inline(never)]
pub fn dst_changed(ctx: &TcContext) -> bool {
    let Ok(Some(p)) = parse::parse_ipv4(ctx) else { return false };
    let Some(orig) = pol_scratch.get(0) else { return false };
    let changed = p.daddr_be != orig.daddr_be || (p.frag_off == 0 && matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) && p.dport_be != orig.dport_be);
    changed
        && (crate::lb::lb4_lookup_service(orig.daddr_be, orig.dport_be, orig.proto, dataplane_common::SCOPE_INTERNAL).is_some()
            || crate::lb::lb4_lookup_service(orig.daddr_be, 0, 0, dataplane_common::SCOPE_INTERNAL).is_some())
}

/// For an ICMP error (unreachable, time exceeded, parameter problem): the tuple of the flow it is
/// about (the quoted header reversed).
#[inline(always)]
fn icmp_related(ctx: &TcContext, l4_off: usize) -> Option<Ct4Key> {
    let icmp_type: u8 = ctx.load(l4_off).ok()?;
    if !matches!(icmp_type, 3 | 11 | 12) {
        return None;
    }
    let inner: [u8; 20] = ctx.load(l4_off + 8).ok()?;
    let ihl = ((inner[0] & 0x0f) as usize) * 4;
    if !(20..=60).contains(&ihl) || !matches!(inner[9], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return None;
    }
    let ports: [u8; 4] = ctx.load(l4_off + 8 + ihl).ok()?;
    Some(Ct4Key {
        saddr_be: u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]),
        daddr_be: u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]),
        sport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        dport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        proto: inner[9],
        pad: [0; 3],
    })
}

/// A packet no entry of this pod's interface knows: an ICMP error about a connection of this
/// very pod (related, for that connection only), or a new connection, decided, announced and,
/// when allowed, remembered. A subprogram of its own: its frame is not stacked on `track`'s.
#[inline(never)]
fn fresh(ctx: &TcContext, key: &PolCtKey, p: &Ipv4Packet, dir: u32) -> bool {
    let dir = dir as u8;
    let ingress = dir == DIR_INGRESS;
    let now = now();
    if p.proto == IPPROTO_ICMP && related(ctx, p.l4_off, key.ifindex, p.daddr_be) {
        return true;
    }
    let none = Ct4Key::default();
    let orig = match pol_scratch.get(0) {
        Some(k) if !ingress => k,
        _ => &none,
    };
    let ep_addr = if ingress { p.daddr_be } else if orig.proto != 0 { orig.saddr_be } else { p.saddr_be };
    // A pod `ferry_policy_check` found tracked: selected by a policy, or not (then open both ways).
    let unselected = PolEndpoint { ep_id: 0, flags: 0, ingress_policy: 0, egress_policy: 0 };
    // SAFETY: map value read in place.
    let selected = unsafe { pol_ep4_v1.get(&ep_addr) };
    let peer = if ingress { ingress_peer(&key.tuple) } else { p.daddr_be };
    let d = decide(selected.unwrap_or(&unselected), peer, dir, p.proto, key.tuple.dport_be);
    if selected.is_some() {
        event(&key.tuple, dir, &d, ep_addr, now);
    }
    // A packet of a connection a policy change cut opens it again only if a rule allows this
    // very direction (or it is a new TCP connection): the pod's own next packets, passing
    // because their direction is open, must not let the cut peer back in as their replies.
    // Anything else no entry knows (expired, evicted, older than Ferry) opens as usual.
    let opens = d.reason == EV_RULE || (p.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) || !was_revoked(key, now);
    if d.allowed {
        if opens {
            remember(key, orig, p, d.policy_id, (ep_addr as u64) << 8 | dir as u64);
        }
    } else if let Some(c) = pol_drop_v1.get_ptr_mut(d.policy_id * 2 + dir as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    d.allowed
}

/// Does the entry at `hit` hold this connection as it was addressed? A packet a Service
/// translated on its way out of the pod (`orig`: its tuple before) matches only an entry made
/// through that same Service address: a connection that reuses the tuple of an earlier direct
/// one (or of one through another Service) is new, and its reply entries are made for it.
#[inline(always)]
fn same_service(hit: &PHit, orig: &Ct4Key, key: &PolCtKey) -> bool {
    if orig.proto == 0 || (orig.daddr_be == key.tuple.daddr_be && orig.dport_be == key.tuple.dport_be) {
        return true;
    }
    // SAFETY: pointer from a successful lookup.
    let (flags, addr, port) = unsafe { ((*hit.ptr).flags, (*hit.ptr).peer_addr_be, (*hit.ptr).peer_port_be) };
    flags & PCT_F_TRANSLATED != 0 && addr == orig.daddr_be && port == orig.dport_be
}

/// Is the ICMP packet at `l4_off` an error about a connection this pod interface (`ifindex`)
/// tracks? Related to that connection only: its quoted tuple must be an entry here.
#[inline(never)]
fn related(ctx: &TcContext, l4_off: usize, ifindex: u32, daddr_be: u32) -> bool {
    let Some(t) = icmp_related(ctx, l4_off) else { return false };
    // Sent to whoever sent the quoted packet, as netfilter requires: an error carried to anyone
    // else (with any payload) is not related to anything.
    if daddr_be != t.daddr_be {
        return false;
    }
    let now = now();
    let rk = PolCtKey { tuple: t, ifindex };
    lookup(&rk, now).is_some() || lookup(&rev(&rk), now).is_some()
}

/// Checks the packet in `ctx` against the policies of the local pod it enters (`DIR_INGRESS`)
/// or leaves (`DIR_EGRESS`, after Service translation and `egress_pre`). Returns 0 to
/// let it through, or the drop reason's code.
#[inline(always)]
pub fn check(ctx: &TcContext, dir: u8) -> u32 {
    ferry_policy_check(ctx.skb.skb, dir as u32)
}

/// `check` as a global BPF function: the verifier checks it once, on its own, instead of once
/// for every state in which the Service path can reach it. It may take only the context and
/// scalars.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_policy_check(skb: *mut aya_ebpf::bindings::__sk_buff, dir: u32) -> u32 {
    let ctx = &TcContext::new(skb);
    let dir = dir as u8;
    let p = match parse::parse_ipv4(ctx) {
        Ok(Some(p)) => p,
        // Not IPv4 (guard.rs keeps it from isolated pods), or malformed (the Service path drops
        // and counts it).
        _ => return 0,
    };
    let ingress = dir == DIR_INGRESS;
    let none = Ct4Key::default();
    let orig = match pol_scratch.get(0) {
        Some(k) if !ingress => k,
        _ => &none,
    };
    // The pod: the destination into it; the source out of it, as it sent the packet (a reply
    // translated back leaves with the Service address as source).
    let ep_addr = if ingress { p.daddr_be } else if orig.proto != 0 { orig.saddr_be } else { p.saddr_be };
    let Some(ep_flags) = tracked(ep_addr) else { return 0 };
    let ifindex = unsafe { (*skb).ifindex };
    // A local pod's address on another pod's interface (anti-spoofing off): never decided, nor
    // tracked, as that pod's.
    if let Some(l) = unsafe { local4_v1.get(&ep_addr) } {
        if l.kind == LOCAL_POD && l.ifindex != 0 && l.ifindex != ifindex {
            return DropReason::SpoofedSource as u32;
        }
    }
    let isolated = ep_flags & if ingress { EP_F_INGRESS } else { EP_F_EGRESS } != 0;
    let denied = if ingress { DropReason::PolicyIngress } else { DropReason::PolicyEgress } as u32;
    // Fragments are known by their addresses as the pod sent them (egress: before translation,
    // as `egress_pre` records a reply's), as they arrive (ingress).
    let (fsrc, fdst) = if orig.proto != 0 { (orig.saddr_be, orig.daddr_be) } else { (p.saddr_be, p.daddr_be) };
    let fkey = PolFragKey { saddr_be: fsrc, daddr_be: fdst, ifindex, id_be: p.id_be, proto: p.proto, dir };
    if p.frag_off != 0 {
        // A later fragment carries no ports: it gets its first fragment's verdict.
        if !isolated || pol_frag4_v1.get_ptr(&fkey).is_some() {
            return 0;
        }
        return DropReason::FragUnknown as u32;
    }
    let (sport_be, dport_be) = policy_ports(ctx, &p);
    let key = PolCtKey { tuple: Ct4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, sport_be, dport_be, proto: p.proto, pad: [0; 3] }, ifindex };
    let now = now();
    let allowed = match lookup(&key, now) {
        Some(hit) if same_service(&hit, orig, &key) && follow(&key, &hit, &p, now) => true,
        _ => fresh(ctx, &key, &p, dir as u32),
    };
    if !allowed {
        return denied;
    }
    if p.more_frags {
        let _ = pol_frag4_v1.insert(&fkey, &1, 0);
    }
    0
}
