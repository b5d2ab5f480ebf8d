//! Service load balancing with connection tracking: the packet path of ClusterIP translation.
//!
//! One conntrack lookup on the packet's own tuple answers everything for a known connection
//! (forward entries translate client->Service, reply entries translate backend->client). Only a
//! miss costs more: service lookup, slot pick, backend lookup. All lookups are hash or LPM map
//! lookups: O(1) in the number of Services, endpoints and connections.
use aya_ebpf::{helpers::bpf_get_prandom_u32, helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    stat, CHASH_TABLE_SIZE, SVC_F_RANDOM, AffinityKey, AffinityValue, Ct4Entry, Ct4Key, DropReason, Frag4Key, Frag4Ports, Lb4Backend, Lb4Key, Lb4Service,
    Lb4SlotKey, SrcRangeData, BE_F_LOCAL, CT_F_EXTERNAL, CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REDIRECT, CT_F_REPLY, CT_F_SNAT, IPPROTO_ICMP,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    maps::{cfg4_v2, ct4_v1, frag4_v1, lb4_aff_v1, lb4_be_v1, lb4_chash_v2, lb4_slot_v1, lb4_src_v1, lb4_svc_v2, svc_cidr4_v1},
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
    /// Translated, and its source is now an address of this node: send it out via a FIB
    /// lookup, since the stack would drop it as martian.
    Redirect,
}

/// Where a tc program sits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Ingress of a pod's veth: everything the pod sends.
    FromPod,
    /// Egress of a pod's veth: replies on their way into the pod.
    ToPod,
    /// Ingress of an external interface: traffic from outside the node.
    FromWorld,
}

/// Ports tried for a translated connection whose tuple collides with another's.
const PORT_TRIES: u32 = 16;
/// Without a configured range, a remapped source port comes from the usual ephemeral range.
const DEFAULT_PORT_MIN: u16 = 32768;
const DEFAULT_PORT_MAX: u16 = 60999;

#[inline(always)]
fn verdict_after(e: &Ct4Entry) -> Verdict {
    if e.flags & CT_F_REDIRECT != 0 { Verdict::Redirect } else { Verdict::Pass }
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

/// A hash of the flow's 5-tuple (murmur3's finalizer over the mixed words): the same flow gets
/// the same value on every node, so with the same hashing table it picks the same backend.
#[inline(always)]
pub fn flow_hash(p: &Ipv4Packet) -> u32 {
    let mut h = p.saddr_be
        ^ p.daddr_be.rotate_left(13)
        ^ (((p.sport_be as u32) << 16) | p.dport_be as u32).rotate_left(7)
        ^ (p.proto as u32).wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Chooses the backend of a new connection from `client`: its session-affinity backend while that
/// is fresh and still a backend, otherwise one by `hash` (then remembered, with affinity).
#[inline(always)]
pub fn lb4_choose_backend(svc: &Lb4Service, client_be: u32, hash: u32) -> Result<(u32, Lb4Backend), DropReason> {
    if svc.affinity_timeout_s == 0 {
        return lb4_select_backend(svc, hash);
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
    let (id, be) = lb4_select_backend(svc, hash)?;
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

/// Picks a backend of `svc`: by its consistent-hashing table at `hash` (the default), or
/// uniformly at random (kube-proxy's `statistic random`) when the frontend says so or has no
/// table yet.
#[inline(always)]
pub fn lb4_select_backend(svc: &Lb4Service, hash: u32) -> Result<(u32, Lb4Backend), DropReason> {
    let count = svc.count as u32;
    if count == 0 {
        return Err(DropReason::NoBackend);
    }
    if svc.flags & SVC_F_RANDOM == 0 {
        // 0: written by an agent from before table sizes varied, whose tables all had 1021
        // entries. Between the agent swapping in a table of another size and rewriting this
        // entry, an index past the array's end misses (random pick below) and a smaller size
        // uses the array's start: every id in it is a live backend either way.
        let size = if svc.table_size == 0 { CHASH_TABLE_SIZE } else { svc.table_size };
        let idx = hash % size;
        // SAFETY: the value is copied out at once.
        if let Some(id) = unsafe { lb4_chash_v2.get_value(&svc.svc_id, &idx).copied() } {
            if let Some(be) = unsafe { lb4_be_v1.get(&id).copied() } {
                return Ok((id, be));
            }
        }
    }
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let id = unsafe { lb4_slot_v1.get(&Lb4SlotKey { svc_id: svc.svc_id, slot }).copied() }.ok_or(DropReason::NoBackend)?;
    let be = unsafe { lb4_be_v1.get(&id).copied() }.ok_or(DropReason::NoBackend)?;
    Ok((id, be))
}

/// Is the backend this connection was pinned to still a backend (same id, same address)?
#[inline(always)]
pub fn backend_alive(e: &Ct4Entry) -> bool {
    match unsafe { lb4_be_v1.get(&e.backend_id) } {
        Some(be) => be.addr_be == e.nat_daddr_be && be.port_be == e.nat_dport_be,
        None => false,
    }
}

/// The packet path for tc. The to-pod hook only translates replies: new connections are always
/// seen first where the client sends them (a pod's veth, or an external interface).
// A separate BPF subprogram: its stack frame is not added to its siblings' (512-byte limit).
#[inline(never)]
pub fn handle_ipv4(ctx: &TcContext, p: &mut Ipv4Packet, hook: Hook) -> Result<Verdict, DropReason> {
    // `&mut`, updated in place: a BPF subprogram takes at most five register arguments, and LLVM
    // would split a read-only struct pointer into one argument per field it reads.
    let new_allowed = hook != Hook::ToPod;
    if p.frag_off != 0 {
        // A later fragment: take the ports its first fragment recorded.
        match unsafe { frag4_v1.get(&frag_key(p)).copied() } {
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
        let key = ct_key(p);
        if let Some(e) = unsafe { ct4_v1.get(&key).copied() } {
            nat::rewrite(ctx, p, &e)?;
            stats::count(stat::FRAGMENT);
            stats::count_service(e.svc_id, p.tot_len);
            return Ok(verdict_after(&e));
        }
        return Ok(Verdict::Pass);
    }
    if p.proto == IPPROTO_ICMP {
        return crate::icmp::handle_icmp(ctx, p);
    }
    if !matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok(Verdict::Pass);
    }
    if p.more_frags {
        // First fragment of a datagram: remember its ports for the fragments that follow.
        let ports = Frag4Ports { sport_be: p.sport_be, dport_be: p.dport_be };
        let _ = frag4_v1.insert(&frag_key(p), &ports, 0);
    }
    let key = ct_key(p);
    if let Some(ep) = ct4_v1.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; copied before use.
        let e = unsafe { *ep };
        if hook == Hook::FromWorld && e.flags & CT_F_EXTERNAL == 0 {
            // A reply to a pod's own connection that crosses the external interface: it is
            // translated on the pod's veth, after routing (here its new source, possibly a node
            // address, would make the stack drop it as martian).
            return Ok(Verdict::Pass);
        }
        let reopen = e.flags & CT_F_FORWARD != 0 && new_allowed && !backend_alive(&e)
            // TCP: an established connection keeps its backend until it ends (graceful
            // termination, as with kube-proxy); only a new SYN on the same tuple moves.
            && (p.proto != IPPROTO_TCP || (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN);
        if !reopen {
            unsafe { (*ep).last_seen_ns = bpf_ktime_get_ns() };
            nat::rewrite(ctx, p, &e)?;
            stats::count(if e.flags & CT_F_REPLY != 0 { stat::CT_REPLY } else { stat::CT_FORWARD });
            stats::count_service(e.svc_id, p.tot_len);
            return Ok(verdict_after(&e));
        }
    }
    if !new_allowed {
        return Ok(Verdict::Pass);
    }
    let scope = if hook == Hook::FromWorld { SCOPE_EXTERNAL } else { SCOPE_INTERNAL };
    let mut masq = Masq::RemoteBackend;
    let svc = match lb4_lookup_service(p.daddr_be, p.dport_be, p.proto, scope) {
        Some(s) if s.flags & SVC_F_ADDR_ONLY == 0 => s,
        // From outside: NodePort, LoadBalancer and external IP frontends, and ClusterIPs as
        // kube-proxy serves them (translated; masqueraded when the source is not in-cluster).
        _ if hook == Hook::FromWorld => match cluster_ip_from_outside(p) {
            Some((s, always)) => {
                masq = if always { Masq::Always } else { Masq::Never };
                s
            }
            None => return Ok(Verdict::Pass),
        },
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
    let e = lb4_new_connection(p, &svc, hook, masq)?;
    nat::rewrite(ctx, p, &e)?;
    stats::count(if hook == Hook::FromWorld { stat::EXTERNAL_NEW } else { stat::CT_NEW });
    stats::count_service(e.svc_id, p.tot_len);
    Ok(verdict_after(&e))
}

/// The ClusterIP frontend a packet from outside the node is addressed to, and whether its source
/// must be masqueraded: kube-proxy does so when the source is not in-cluster (outside
/// `--cluster-cidr`, or the node's podCIDR), and not at all when it cannot tell (not set).
#[inline(always)]
fn cluster_ip_from_outside(p: &Ipv4Packet) -> Option<(Lb4Service, bool)> {
    let svc = lb4_lookup_service(p.daddr_be, p.dport_be, p.proto, SCOPE_INTERNAL).filter(|s| s.flags & SVC_F_ADDR_ONLY == 0)?;
    let cfg = cfg4_v2.get(0).copied().unwrap_or_default();
    Some((svc, cfg.cluster_mask_be != 0 && p.saddr_be & cfg.cluster_mask_be != cfg.cluster_cidr_be))
}

/// When a connection from outside the node gets this node's address as its source.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Masq {
    /// NodePort, LoadBalancer, external IPs: when the backend is on another node (its reply
    /// must come back through here).
    RemoteBackend,
    /// A ClusterIP from a source that is not in-cluster (kube-proxy's clusterCIDR rule).
    Always,
    /// A ClusterIP from an in-cluster source.
    Never,
}

#[inline(always)]
fn random_port(min: u16, max: u16) -> u16 {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    (min as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16
}

/// Chooses a backend and records both directions of the connection. Returns the forward entry.
///
/// The reply entry is keyed by the translated tuple, which must be unique: two clients' flows
/// can become identical after translation (one client port reaching one backend through two
/// Services, or through two nodes' NodePorts after source translation). Then another source port
/// is chosen for the new connection instead of breaking the existing one.
#[inline(always)]
pub fn lb4_new_connection(p: &Ipv4Packet, svc: &Lb4Service, hook: Hook, masq: Masq) -> Result<Ct4Entry, DropReason> {
    let (backend_id, be) = lb4_choose_backend(svc, p.saddr_be, flow_hash(p))?;
    let cfg = cfg4_v2.get(0).copied().unwrap_or_default();
    let (port_min, port_max) = if cfg.snat_port_min != 0 && cfg.snat_port_max >= cfg.snat_port_min {
        (cfg.snat_port_min, cfg.snat_port_max)
    } else {
        (DEFAULT_PORT_MIN, DEFAULT_PORT_MAX)
    };
    let hairpin = be.addr_be == p.saddr_be;
    // From outside to a backend on another node (externalTrafficPolicy Cluster): the reply must
    // come back through this node, so the source becomes this node's address.
    let snat = hook == Hook::FromWorld
        && match masq {
            Masq::RemoteBackend => be.flags & BE_F_LOCAL == 0,
            Masq::Always => true,
            Masq::Never => false,
        };
    let nat_saddr = if snat {
        if cfg.snat_addr_be == 0 {
            return Err(DropReason::NoNodeAddress);
        }
        cfg.snat_addr_be
    } else if hairpin {
        p.daddr_be
    } else {
        p.saddr_be
    };
    let mut fwd_flags = CT_F_FORWARD;
    let mut rev_flags = CT_F_REPLY;
    if hairpin && !snat {
        fwd_flags |= CT_F_HAIRPIN;
        rev_flags |= CT_F_HAIRPIN;
    }
    if snat {
        fwd_flags |= CT_F_SNAT | CT_F_REDIRECT;
        rev_flags |= CT_F_SNAT;
    }
    if hook == Hook::FromWorld {
        // Replies leave with the frontend (often a node address) as their source.
        rev_flags |= CT_F_REDIRECT | CT_F_EXTERNAL;
        fwd_flags |= CT_F_EXTERNAL;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let rev = Ct4Entry {
        nat_saddr_be: p.daddr_be,
        nat_daddr_be: p.saddr_be,
        nat_sport_be: p.dport_be,
        nat_dport_be: p.sport_be,
        svc_id: svc.svc_id,
        backend_id,
        flags: rev_flags,
        created_ns: now,
        last_seen_ns: now,
    };
    // Reply entry first: once the forward entry exists, replies may come back at any moment.
    let mut sport = if snat { random_port(port_min, port_max).to_be() } else { p.sport_be };
    let mut placed = false;
    let mut i = 0;
    while i < PORT_TRIES {
        let rev_key = Ct4Key { saddr_be: be.addr_be, daddr_be: nat_saddr, sport_be: be.port_be, dport_be: sport, proto: p.proto, pad: [0; 3] };
        if ct4_v1.insert(&rev_key, &rev, BPF_NOEXIST).is_ok() {
            placed = true;
            break;
        }
        // Taken. By this very connection (a retransmitted first packet)? Then refresh it.
        if let Some(old) = unsafe { ct4_v1.get(&rev_key).copied() } {
            // Compared with XOR/OR: a field-by-field `==` chain becomes a bcmp() call, which the
            // BPF target can only emit as a subprogram the verifier rejects here.
            let diff = (old.nat_daddr_be ^ rev.nat_daddr_be)
                | (old.nat_saddr_be ^ rev.nat_saddr_be)
                | ((old.nat_dport_be ^ rev.nat_dport_be) as u32)
                | ((old.nat_sport_be ^ rev.nat_sport_be) as u32);
            if diff == 0 {
                ct4_v1.insert(&rev_key, &rev, 0).map_err(|_| DropReason::CtInsert)?;
                placed = true;
                break;
            }
        }
        stats::count(stat::PORT_REMAP);
        sport = random_port(port_min, port_max).to_be();
        i += 1;
    }
    if !placed {
        return Err(DropReason::NatPorts);
    }
    let fwd = Ct4Entry {
        nat_saddr_be: nat_saddr,
        nat_daddr_be: be.addr_be,
        nat_sport_be: sport,
        nat_dport_be: be.port_be,
        svc_id: svc.svc_id,
        backend_id,
        flags: fwd_flags,
        created_ns: now,
        last_seen_ns: now,
    };
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
