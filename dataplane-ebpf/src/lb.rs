//! Service load balancing with connection tracking: the packet path of ClusterIP translation.
//!
//! One conntrack lookup on the packet's own tuple answers everything for a known connection
//! (forward entries translate client->Service, reply entries translate backend->client). Only a
//! miss costs more: service lookup, slot pick, backend lookup. All lookups are hash or LPM map
//! lookups: O(1) in the number of Services, endpoints and connections.
use aya_ebpf::{helpers::bpf_get_prandom_u32, helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    stat, AffinityKey, AffinityValue, Ct4Entry, Ct4Key, DropReason, Frag4Key, Frag4Ports, Lb4Backend, Lb4Key, Lb4Service,
    Lb4SlotKey, SrcRangeData, CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REPLY, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    SCOPE_INTERNAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES,
};

use crate::{
    maps::{ct4_v1, frag4_v1, lb4_aff_v1, lb4_be_v1, lb4_slot_v1, lb4_src_v1, lb4_svc_v2, svc_cidr4_v1},
    nat,
    parse::{Ipv4Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// What the entry program does with the packet after the datapath has looked at it.
pub enum Verdict {
    /// Forward as it is now (translated or not).
    Pass,
    /// Refuse: answer with a TCP RST or ICMP port unreachable.
    Reject,
}

const BPF_NOEXIST: u64 = 1;

#[inline(always)]
pub fn ct_key(p: &Ipv4Packet) -> Ct4Key {
    Ct4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, sport_be: p.sport_be, dport_be: p.dport_be, proto: p.proto, pad: [0; 3] }
}

#[inline(always)]
fn frag_key(p: &Ipv4Packet) -> Frag4Key {
    Frag4Key { saddr_be: p.saddr_be, daddr_be: p.daddr_be, id_be: p.id_be, proto: p.proto, pad: 0 }
}

/// Looks up the Service frontend for `addr:port/proto` as seen from `scope`.
#[inline(always)]
pub fn lb4_lookup_service(addr_be: u32, port_be: u16, proto: u8, scope: u8) -> Option<Lb4Service> {
    let key = Lb4Key { addr_be, port_be, proto, scope };
    // SAFETY: the value is copied out at once.
    unsafe { lb4_svc_v2.get(&key).copied() }
}

/// Is `client` allowed by the frontend's loadBalancerSourceRanges (when it has any)?
#[inline(always)]
pub fn lb4_source_allowed(svc: &Lb4Service, client_be: u32) -> bool {
    if svc.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(64, SrcRangeData { svc_id: svc.svc_id, addr_be: client_be });
    lb4_src_v1.get(&key).is_some()
}

/// What a frontend with no usable backend does: refuse, or (traffic policy Local) drop.
#[inline(always)]
pub fn lb4_empty(svc: &Lb4Service) -> Result<Verdict, DropReason> {
    if svc.flags & SVC_F_DROP_EMPTY != 0 {
        Err(DropReason::NoLocalEndpoint)
    } else {
        Ok(Verdict::Reject)
    }
}

/// Chooses the backend of a new connection from `client`: its session-affinity backend while that
/// is fresh and still a backend, otherwise a random one (then remembered, with affinity).
#[inline(always)]
pub fn lb4_choose_backend(svc: &Lb4Service, client_be: u32) -> Result<(u32, Lb4Backend), DropReason> {
    if svc.affinity_timeout_s == 0 {
        return lb4_select_backend(svc);
    }
    let key = AffinityKey { svc_id: svc.svc_id, client_be };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(a) = lb4_aff_v1.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup.
        let (id, last) = unsafe { ((*a).backend_id, (*a).last_used_ns) };
        if now.saturating_sub(last) < svc.affinity_timeout_s as u64 * 1_000_000_000 {
            if let Some(be) = unsafe { lb4_be_v1.get(&id).copied() } {
                unsafe { (*a).last_used_ns = now };
                return Ok((id, be));
            }
        }
    }
    let (id, be) = lb4_select_backend(svc)?;
    let _ = lb4_aff_v1.insert(&key, &AffinityValue { backend_id: id, pad: 0, last_used_ns: now }, 0);
    Ok((id, be))
}

/// What a miss on the service map means for this destination address.
pub enum Unserved {
    /// A ClusterIP, but not on this port/protocol: refuse (kube-proxy nftables mode).
    UnexposedPort,
    /// Inside the service CIDRs but held by no Service: drop.
    NoService,
    /// Not a service address at all.
    NotService,
}

#[inline(always)]
pub fn lb4_unserved(addr_be: u32) -> Unserved {
    if let Some(s) = lb4_lookup_service(addr_be, 0, 0, SCOPE_INTERNAL) {
        if s.flags & SVC_F_ADDR_ONLY != 0 {
            return Unserved::UnexposedPort;
        }
    }
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(32, addr_be);
    if svc_cidr4_v1.get(&key).is_some() {
        return Unserved::NoService;
    }
    Unserved::NotService
}

/// Picks a backend of `svc` uniformly at random (kube-proxy's iptables `statistic random` mode).
#[inline(always)]
pub fn lb4_select_backend(svc: &Lb4Service) -> Result<(u32, Lb4Backend), DropReason> {
    let count = svc.count as u32;
    if count == 0 {
        return Err(DropReason::NoBackend);
    }
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let id = unsafe { lb4_slot_v1.get(&Lb4SlotKey { svc_id: svc.svc_id, slot }).copied() }.ok_or(DropReason::NoBackend)?;
    let be = unsafe { lb4_be_v1.get(&id).copied() }.ok_or(DropReason::NoBackend)?;
    Ok((id, be))
}

/// Is the backend this connection was pinned to still a backend (same id, same address)?
#[inline(always)]
fn backend_alive(e: &Ct4Entry) -> bool {
    match unsafe { lb4_be_v1.get(&e.backend_id) } {
        Some(be) => be.addr_be == e.nat_daddr_be && be.port_be == e.nat_dport_be,
        None => false,
    }
}

/// The packet path for tc. `new_allowed` is false on the to-pod hook, which only translates
/// replies: new connections are always seen first where the client sends them.
#[inline(always)]
pub fn handle_ipv4(ctx: &TcContext, mut p: Ipv4Packet, new_allowed: bool) -> Result<Verdict, DropReason> {
    if p.frag_off != 0 {
        // A later fragment: take the ports its first fragment recorded.
        match unsafe { frag4_v1.get(&frag_key(&p)).copied() } {
            Some(ports) => {
                p.sport_be = ports.sport_be;
                p.dport_be = ports.dport_be;
            }
            None => {
                // Not ours unless it is headed for a service address we would have translated.
                return match lb4_unserved(p.daddr_be) {
                    Unserved::NotService => Ok(Verdict::Pass),
                    _ => Err(DropReason::FragUnknown),
                };
            }
        }
        let key = ct_key(&p);
        if let Some(e) = unsafe { ct4_v1.get(&key).copied() } {
            nat::rewrite(ctx, &p, &e)?;
            stats::count(stat::FRAGMENT);
        }
        return Ok(Verdict::Pass);
    }
    if p.proto == IPPROTO_ICMP {
        return crate::icmp::handle_icmp(ctx, &p);
    }
    if !matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(Verdict::Pass);
    }
    if p.more_frags {
        // First fragment of a datagram: remember its ports for the fragments that follow.
        let ports = Frag4Ports { sport_be: p.sport_be, dport_be: p.dport_be };
        let _ = frag4_v1.insert(&frag_key(&p), &ports, 0);
    }
    let key = ct_key(&p);
    if let Some(ep) = ct4_v1.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; copied before use.
        let e = unsafe { *ep };
        let reopen = e.flags & CT_F_FORWARD != 0 && new_allowed && !backend_alive(&e)
            // TCP: an established connection keeps its backend until it ends (graceful
            // termination, as with kube-proxy); only a new SYN on the same tuple moves.
            && (p.proto != IPPROTO_TCP || (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN);
        if !reopen {
            unsafe { (*ep).last_seen_ns = bpf_ktime_get_ns() };
            nat::rewrite(ctx, &p, &e)?;
            stats::count(if e.flags & CT_F_REPLY != 0 { stat::CT_REPLY } else { stat::CT_FORWARD });
            return Ok(Verdict::Pass);
        }
    }
    if !new_allowed {
        return Ok(Verdict::Pass);
    }
    let svc = match lb4_lookup_service(p.daddr_be, p.dport_be, p.proto, SCOPE_INTERNAL) {
        Some(s) if s.flags & SVC_F_ADDR_ONLY == 0 => s,
        _ => {
            return match lb4_unserved(p.daddr_be) {
                Unserved::UnexposedPort => Ok(Verdict::Reject),
                Unserved::NoService => Err(DropReason::NoService),
                Unserved::NotService => {
                    stats::count(stat::PASS);
                    Ok(Verdict::Pass)
                }
            };
        }
    };
    if !lb4_source_allowed(&svc, p.saddr_be) {
        return Err(DropReason::SourceRange);
    }
    if svc.count == 0 {
        return lb4_empty(&svc);
    }
    let e = lb4_new_connection(&p, &svc)?;
    nat::rewrite(ctx, &p, &e)?;
    stats::count(stat::CT_NEW);
    Ok(Verdict::Pass)
}

/// Chooses a backend and records both directions of the connection. Returns the forward entry.
#[inline(always)]
fn lb4_new_connection(p: &Ipv4Packet, svc: &Lb4Service) -> Result<Ct4Entry, DropReason> {
    let (backend_id, be) = lb4_choose_backend(svc, p.saddr_be)?;
    if p.proto == IPPROTO_SCTP && be.port_be != p.dport_be {
        return Err(DropReason::SctpPortNat);
    }
    let hairpin = be.addr_be == p.saddr_be;
    let now = unsafe { bpf_ktime_get_ns() };
    let nat_saddr = if hairpin { p.daddr_be } else { p.saddr_be };
    let fwd = Ct4Entry {
        nat_saddr_be: nat_saddr,
        nat_daddr_be: be.addr_be,
        nat_sport_be: p.sport_be,
        nat_dport_be: be.port_be,
        svc_id: svc.svc_id,
        backend_id,
        flags: CT_F_FORWARD | if hairpin { CT_F_HAIRPIN } else { 0 },
        created_ns: now,
        last_seen_ns: now,
    };
    let rev_key = Ct4Key { saddr_be: be.addr_be, daddr_be: nat_saddr, sport_be: be.port_be, dport_be: p.sport_be, proto: p.proto, pad: [0; 3] };
    let rev = Ct4Entry {
        nat_saddr_be: p.daddr_be,
        nat_daddr_be: p.saddr_be,
        nat_sport_be: p.dport_be,
        nat_dport_be: p.sport_be,
        svc_id: svc.svc_id,
        backend_id,
        flags: CT_F_REPLY | if hairpin { CT_F_HAIRPIN } else { 0 },
        created_ns: now,
        last_seen_ns: now,
    };
    // Reply entry first: once the forward entry exists, replies may come back at any moment.
    ct4_v1.insert(&rev_key, &rev, 0).map_err(|_| DropReason::CtInsert)?;
    let key = ct_key(p);
    if ct4_v1.insert(&key, &fwd, BPF_NOEXIST).is_err() {
        // Another CPU created this connection at the same moment (a UDP burst): use its choice so
        // every packet of the flow goes to one backend. Otherwise (a re-opened tuple), replace.
        if let Some(existing) = unsafe { ct4_v1.get(&key).copied() } {
            if backend_alive(&existing) {
                return Ok(existing);
            }
        }
        ct4_v1.insert(&key, &fwd, 0).map_err(|_| DropReason::CtInsert)?;
    }
    Ok(fwd)
}
