//! NetworkPolicy verdicts from maps, in constant time: for a pod some policy isolates, a new
//! connection costs one endpoint lookup, one policy-conntrack lookup, one ipcache LPM lookup and
//! at most two rule LPM lookups (the peer's identity, then "any peer"). Nothing loops over
//! policies or rules; the agent compiled them into `pol_rule4_v1`.
use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    identity, Ct4Key, DropReason, PolCtValue, PolRuleKey, PolicyEvent, DIR_INGRESS, EP_F_EGRESS, EP_F_INGRESS, EV_FROM_NODE,
    EV_NOT_ISOLATED, EV_RULE, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PCT_F_EGRESS, PCT_F_INGRESS, PCT_F_REPLY, RULE_PREFIX_FULL,
    VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    maps::{pol_ct4_v1, pol_drop_v1, pol_ep4_v1, pol_events_v1, pol_ipcache4_v1, pol_rule4_v1, pol_scratch},
    parse,
};

#[inline(always)]
fn event(key: &Ct4Key, dir: u8, verdict: u8, reason: u8, policy_id: u32, identity: u32) {
    let ev = PolicyEvent {
        saddr_be: key.saddr_be,
        daddr_be: key.daddr_be,
        sport_be: key.sport_be,
        dport_be: key.dport_be,
        proto: key.proto,
        dir,
        verdict,
        reason,
        policy_id,
        identity,
        pad: 0,
    };
    // A full ring loses the event, never the packet.
    let _ = pol_events_v1.output(&ev, 0);
}

#[inline(always)]
fn reverse(k: &Ct4Key) -> Ct4Key {
    Ct4Key { saddr_be: k.daddr_be, daddr_be: k.saddr_be, sport_be: k.dport_be, dport_be: k.sport_be, proto: k.proto, pad: [0; 3] }
}

/// Records an allowed connection: the checked direction on the tuple, and its reply. `orig`:
/// the tuple before Service translation (egress), whose reverse is how a reply translated back
/// on this node arrives; `proto == 0` when there is none.
#[inline(always)]
fn remember(key: &Ct4Key, dir_flag: u32, policy_id: u32, orig: &Ct4Key) {
    let now = unsafe { bpf_ktime_get_ns() };
    let flags = match pol_ct4_v1.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        Some(v) => unsafe { (*v).flags | dir_flag },
        None => dir_flag,
    };
    let _ = pol_ct4_v1.insert(key, &PolCtValue { flags, policy_id, created_ns: now }, 0);
    let _ = pol_ct4_v1.insert(&reverse(key), &PolCtValue { flags: PCT_F_REPLY, policy_id, created_ns: now }, 0);
    remember_orig(key, policy_id, orig, now);
}

/// For a connection translated on its way out (a Service): the untranslated tuple is allowed
/// too (later packets skip the check before translation), and so is its reverse, which is how
/// the reply arrives once translated back on this node.
#[inline(always)]
fn remember_orig(key: &Ct4Key, policy_id: u32, orig: &Ct4Key, now: u64) {
    let same = (orig.daddr_be ^ key.daddr_be) | (orig.saddr_be ^ key.saddr_be) | (orig.dport_be ^ key.dport_be) as u32 | (orig.sport_be ^ key.sport_be) as u32;
    if orig.proto == 0 || same == 0 {
        return;
    }
    let _ = pol_ct4_v1.insert(orig, &PolCtValue { flags: PCT_F_EGRESS, policy_id, created_ns: now }, 0);
    let _ = pol_ct4_v1.insert(&reverse(orig), &PolCtValue { flags: PCT_F_REPLY, policy_id, created_ns: now }, 0);
}

/// On a packet leaving a pod, before Service translation: 0 when no egress decision is needed
/// (no policy selects the pod, or the tuple belongs to an allowed connection or is its reply;
/// a backend's reply must be judged before it is translated back to the Service address),
/// otherwise 1, with the tuple saved for `check`.
#[inline(never)]
pub fn egress_pre(ctx: &TcContext) -> u32 {
    let p = match parse::parse_ipv4(ctx) {
        Ok(Some(p)) => p,
        _ => return 0,
    };
    if p.frag_off != 0 || pol_ep4_v1.get_ptr(&p.saddr_be).is_none() {
        return 0;
    }
    let orig = Ct4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, sport_be: p.sport_be, dport_be: p.dport_be, proto: p.proto, pad: [0; 3] };
    if let Some(v) = unsafe { pol_ct4_v1.get(&orig) } {
        if v.flags & (PCT_F_EGRESS | PCT_F_REPLY) != 0 {
            return 0;
        }
    }
    // Kept per CPU until `check` runs on the same packet (the program is not preempted on this
    // CPU in between); not on the stack, whose 512 bytes the Service path already needs.
    if let Some(slot) = pol_scratch.get_ptr_mut(0) {
        unsafe { *slot = orig };
    }
    1
}

/// For an ICMP error (unreachable, time exceeded, parameter problem): the tuple of the flow it is
/// about (the quoted header reversed), so an error about an allowed connection passes as related.
#[inline(always)]
fn icmp_related(ctx: &TcContext, l4_off: usize) -> Option<Ct4Key> {
    let icmp_type: u8 = ctx.load(l4_off).ok()?;
    if !matches!(icmp_type, 3 | 11 | 12) {
        return None;
    }
    let inner: [u8; 20] = ctx.load(l4_off + 8).ok()?;
    let ihl = ((inner[0] & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > 60 || !matches!(inner[9], IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
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

#[inline(always)]
fn rule(ep_id: u32, identity: u32, dir: u8, proto: u8, port_be: u16) -> Option<u32> {
    let key = Key::new(RULE_PREFIX_FULL, PolRuleKey { ep_id_be: ep_id.to_be(), identity_be: identity.to_be(), dir, proto, port_be });
    pol_rule4_v1.get(&key).copied()
}

/// Checks the packet in `ctx` against the policies of the local pod it enters (`DIR_INGRESS`)
/// or leaves (`DIR_EGRESS`, after Service translation and `egress_pre`). Returns 0 to
/// let it through, or the drop reason's code. A separate
/// subprogram taking only the context: its cost is added once, not multiplied into the paths of
/// the Service code.
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
        // Not IPv4, or malformed: the Service path decides (and counts) those.
        _ => return 0,
    };
    // A later fragment carries no ports: its first fragment was checked.
    if p.frag_off != 0 {
        return 0;
    }
    let ingress = dir == DIR_INGRESS;
    let none = Ct4Key::default();
    let orig = match pol_scratch.get(0) {
        Some(k) if !ingress => k,
        _ => &none,
    };
    let (ep_addr, peer) = if ingress { (p.daddr_be, p.saddr_be) } else { (p.saddr_be, p.daddr_be) };
    let Some(ep) = (unsafe { pol_ep4_v1.get(&ep_addr).copied() }) else { return 0 };
    let key = Ct4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, sport_be: p.sport_be, dport_be: p.dport_be, proto: p.proto, pad: [0; 3] };
    let dir_flag = if ingress { PCT_F_INGRESS } else { PCT_F_EGRESS };
    if let Some(v) = unsafe { pol_ct4_v1.get(&key).copied() } {
        if v.flags & (dir_flag | PCT_F_REPLY) != 0 {
            // The same backend tuple reached through a Service for the first time.
            remember_orig(&key, v.policy_id, orig, unsafe { bpf_ktime_get_ns() });
            return 0;
        }
    }
    if p.proto == IPPROTO_ICMP {
        if let Some(related) = icmp_related(ctx, p.l4_off) {
            if pol_ct4_v1.get_ptr(&related).is_some() {
                return 0;
            }
        }
    }
    let isolated = ep.flags & if ingress { EP_F_INGRESS } else { EP_F_EGRESS } != 0;
    let ident = pol_ipcache4_v1.get(&Key::new(32, peer)).copied().unwrap_or(identity::WORLD);
    if !isolated {
        // Not isolated this way, but isolated the other: its replies must pass.
        remember(&key, dir_flag, 0, orig);
        event(&key, dir, VERDICT_ALLOW, EV_NOT_ISOLATED, 0, ident);
        return 0;
    }
    if ingress && ident == identity::HOST {
        // Kubernetes: a pod's own node may always reach it (kubelet probes).
        remember(&key, dir_flag, 0, orig);
        event(&key, dir, VERDICT_ALLOW, EV_FROM_NODE, 0, ident);
        return 0;
    }
    let port_be = if matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) { p.dport_be } else { 0 };
    let allowed = match rule(ep.ep_id, ident, dir, p.proto, port_be) {
        Some(id) => Some(id),
        None => rule(ep.ep_id, identity::ANY, dir, p.proto, port_be),
    };
    match allowed {
        Some(policy_id) => {
            remember(&key, dir_flag, policy_id, orig);
            event(&key, dir, VERDICT_ALLOW, EV_RULE, policy_id, ident);
            0
        }
        None => {
            let policy_id = if ingress { ep.ingress_policy } else { ep.egress_policy };
            if let Some(c) = pol_drop_v1.get_ptr_mut(policy_id * 2 + dir as u32) {
                // SAFETY: per-CPU slot.
                unsafe { *c += 1 };
            }
            event(&key, dir, VERDICT_DENY, EV_RULE, policy_id, ident);
            let reason = if ingress { DropReason::PolicyIngress } else { DropReason::PolicyEgress };
            reason as u32
        }
    }
}
