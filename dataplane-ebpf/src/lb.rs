//! Service load balancing: the packet path of Service translation.
//!
//! One conntrack lookup on the packet's own tuple answers everything for a known connection
//! (forward entries translate client->Service, reply entries translate backend->client; see
//! conntrack.rs for their lifecycle). Only a miss costs more: service lookup, backend choice,
//! backend lookup. All lookups are hash or LPM map lookups: O(1) in the number of Services,
//! endpoints and connections.
use aya_ebpf::{helpers::bpf_get_prandom_u32, helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    stat, AffinityKey, AffinityValue, Ct4Entry, Ct4Key, DropReason, Frag4Key, Frag4Ports, Lb4Backend, Lb4Key, Lb4PairKey, Lb4Service, Lb4SlotKey,
    SrcRangeData, BE_F_HOST, BE_F_LOCAL, CHASH_PER_ELEMENT, CT_F_CLASH, CT_F_EXTERNAL, CT_F_FORWARD, CT_F_HAIRPIN, CT_F_LOCAL_BACKEND, CT_F_REDIRECT, CT_F_REPLY,
    CT_F_REPLY_AT_SOURCE, CT_F_SNAT, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY,
    SVC_F_EXTERNAL_IP, SVC_F_MASQ, SVC_F_RANDOM, SVC_F_SOURCE_RANGES, CFG_F_LOCAL_IFACE, LOCAL_HOST,
};

use crate::{
    conntrack,
    maps::{cfg4_v4, frag4_v1, local4_v1, path_scratch, lb4_aff_v1, lb4_be_v1, lb4_chash_flat_v1, lb4_gone_v1, lb4_slot_v1, lb4_src_v1, lb4_svc_v3, svc_cidr4_v1},
    nat,
    parse::{Ipv4Packet, TCP_ACK, TCP_SYN},
    stats,
};

/// What the entry program does with the packet after the datapath has looked at it.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Verdict {
    /// Forward as it is now (translated or not).
    Pass,
    /// Refuse: answer with a TCP RST or ICMP port unreachable.
    Reject,
    /// Translated, and its source is now an address of this node: send it out to the next hop
    /// `nat::fib_prepare` found, since the stack would drop it as martian.
    Redirect,
    /// Too big for the path it must be redirected on, and not translated: answer with ICMP
    /// fragmentation needed (`nat::fib_mtu` holds the MTU).
    TooBig,
    /// Inside the Service path only: translate with the conntrack entry found or created.
    Translate,
}

/// Where a tc program sits.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Hook {
    /// Ingress of a pod's veth: everything the pod sends.
    FromPod,
    /// Egress of a pod's veth: replies on their way into the pod.
    ToPod,
    /// Ingress of an external interface: traffic from outside the node.
    FromWorld,
    /// Egress of an external interface: what the node's own stack sends out (replies of
    /// hostNetwork endpoints).
    ToWorld,
}

/// Ports probed for a translated connection whose tuple is taken: a window of this many...
const PORT_WINDOW: u32 = 8;
/// ...three times over (free only, then safely reusable, then any finished connection's).
const PORT_TRIES: u32 = 3 * PORT_WINDOW;
/// Without a configured range, a remapped source port comes from the usual ephemeral range.
const DEFAULT_PORT_MIN: u16 = 32768;
const DEFAULT_PORT_MAX: u16 = 60999;

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
    // SAFETY: the value is copied out at once.
    unsafe { lb4_svc_v3.get(&Lb4Key { addr_be, port_be, proto, scope }).copied() }
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

/// A hash of the flow's 5-tuple: MurmurHash3 (x86, 32-bit) over its four words. Each word goes
/// through the block mix before it is combined, so fields cannot cancel each other out (XORing
/// address and ports first gave many flows of one client the same hash, and so the same backend).
/// The same flow gets the same value on every node, so with the same hashing table it picks the
/// same backend.
#[inline(always)]
pub fn flow_hash(p: &Ipv4Packet) -> u32 {
    #[inline(always)]
    fn block(h: u32, k: u32) -> u32 {
        let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
        (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
    }
    let mut h = block(0, p.saddr_be);
    h = block(h, p.daddr_be);
    h = block(h, ((p.sport_be as u32) << 16) | p.dport_be as u32);
    h = block(h, p.proto as u32);
    h ^= 16;
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
        if now.saturating_sub(last) < svc.affinity_timeout_s as u64 * 1_000_000_000 && !pair_gone(svc.svc_id, id) {
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

// A separate BPF subprogram: called from several paths, and its result is a plain scalar (inlined,
// LLVM folded the service entry's pointer into the caller's return value, which the verifier
// rejects as pointer arithmetic).
#[inline(never)]
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
    if svc.flags & SVC_F_RANDOM == 0 && svc.table_len != 0 {
        // The frontend's region of the flat table array. An entry past the array's end (never
        // written so by the agent) misses and falls back to the random pick below; the agent
        // reuses a region only after every program that may have read the old entry has ended.
        let idx = svc.table_off.wrapping_add(hash % svc.table_len);
        if let Some(pair) = lb4_chash_flat_v1.get(idx / CHASH_PER_ELEMENT) {
            let id = pair[(idx % CHASH_PER_ELEMENT) as usize];
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

/// Has the agent taken this backend out of this frontend (`lb4_gone_v1`)?
#[inline(always)]
pub fn pair_gone(svc_id: u32, backend_id: u32) -> bool {
    // SAFETY: presence only.
    unsafe { lb4_gone_v1.get(&Lb4PairKey { svc_id, backend_id }).is_some() }
}

/// A UDP or SCTP connection whose backend left its Service (still a backend of another one, or
/// not): it moves at its next packet, as after kube-proxy's conntrack flush. TCP connections keep
/// their backend until they end (graceful termination), so this is never asked for them.
#[inline(always)]
pub fn left_service(e: &Ct4Entry, proto: u8) -> bool {
    proto != IPPROTO_TCP && e.flags & CT_F_CLASH == 0 && pair_gone(e.svc_id, e.backend_id)
}

/// Is the backend this connection was pinned to still a backend (same id, same address)?
/// A remapped direct flow (`CT_F_CLASH`) has no backend and is always alive.
#[inline(always)]
pub fn backend_alive(e: &Ct4Entry) -> bool {
    if e.flags & CT_F_CLASH != 0 {
        return true;
    }
    match unsafe { lb4_be_v1.get(&e.backend_id) } {
        Some(be) => be.addr_be == e.nat_daddr_be && be.port_be == e.nat_dport_be,
        None => false,
    }
}

/// The packet path for tc: the Service path of a tc program, one global BPF function per hook.
/// The verifier checks each once, on its own, with its hook a constant, and its caller sees only
/// a scalar result (they may take only the context and scalars).
///
/// Its steps are separate subprograms called one after the other, not inside each other, so
/// their stack frames never add up past the 512 bytes BPF allows: `classify` finds the
/// connection (tracking it), or says a new one is wanted; `lb4_new_connection` creates it;
/// `translate` rewrites the packet. The to-pod and to-world hooks only translate replies: new
/// connections are always seen first where the client sends them (a pod's veth, or an external
/// interface).
///
/// Each returns one scalar, `Verdict as u32`, `DROP_CODE | reason` or `NOT_IPV4`: a `Result`
/// returned from a subprogram leaves the unused half of the register undefined, and LLVM may
/// fill it from any register, pointers included, which the verifier rejects.
#[inline(always)]
fn service_path(skb: *mut aya_ebpf::bindings::__sk_buff, hook: Hook) -> u32 {
    let ctx = &TcContext::new(skb);
    let Some(sc) = path_scratch.get_ptr_mut(0) else { return DROP_CODE | DropReason::CtInsert as u32 };
    // SAFETY: per-CPU slot, used by this packet only.
    let sc = unsafe { &mut *sc };
    sc.p = match crate::parse::parse_ipv4(ctx) {
        Ok(Some(p)) => p,
        Ok(None) => return NOT_IPV4,
        Err(r) => return DROP_CODE | r as u32,
    };
    let p = &mut sc.p;
    if p.proto == IPPROTO_ICMP && p.frag_off == 0 {
        return crate::icmp::handle_icmp(ctx, p, hook as u32);
    }
    // `&mut` everywhere: a BPF subprogram takes at most five register arguments, and LLVM would
    // split a read-only struct pointer into one argument per field it reads.
    let step = classify(p, hook as u32, &mut sc.e, &mut sc.svc);
    if step & STEP_NEW != 0 {
        let code = lb4_new_connection(p, &mut sc.svc, hook as u32, step & !STEP_NEW, &mut sc.e);
        if code != 0 {
            return DROP_CODE | code;
        }
    } else if step == STEP_CLASH {
        if !direct_flow_clash(p, &mut sc.e) {
            return Verdict::Pass as u32;
        }
    } else if step != Verdict::Translate as u32 {
        return step;
    }
    translate(ctx, p, &mut sc.e, hook as u32)
}

/// What the Service path's steps hand each other, per CPU (`maps::path_scratch`): off the stack,
/// which the deepest chain of steps fills.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PathScratch {
    /// The packet, parsed.
    pub p: crate::parse::Ipv4Packet,
    /// The connection entry the packet is translated with.
    pub e: Ct4Entry,
    /// The frontend of a new connection.
    pub svc: Lb4Service,
}

/// Marks a drop reason in the Service path's result.
pub const DROP_CODE: u32 = 0x100;
/// The Service path's result: not an IPv4 packet.
pub const NOT_IPV4: u32 = 0x200;
/// `classify`: a new connection is wanted, to the frontend it wrote; `| Masq as u32`.
const STEP_NEW: u32 = 0x400;
/// `classify`: a pod's direct flow that may clash with a Service connection (`direct_flow_clash`).
const STEP_CLASH: u32 = 0x800;

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_service_from_pod(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    service_path(skb, Hook::FromPod)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_service_to_pod(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    service_path(skb, Hook::ToPod)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_service_from_world(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    service_path(skb, Hook::FromWorld)
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_service_to_world(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    service_path(skb, Hook::ToWorld)
}

/// The Service path for `hook`.
#[inline(always)]
pub fn ferry_service_path(skb: *mut aya_ebpf::bindings::__sk_buff, hook: Hook) -> u32 {
    match hook {
        Hook::FromPod => ferry_service_from_pod(skb),
        Hook::ToPod => ferry_service_to_pod(skb),
        Hook::FromWorld => ferry_service_from_world(skb),
        Hook::ToWorld => ferry_service_to_world(skb),
    }
}

impl Verdict {
    /// Back from the Service path's scalar.
    #[inline(always)]
    pub fn decode(code: u32) -> Result<Verdict, DropReason> {
        if code & DROP_CODE != 0 {
            return Err(DropReason::from_code(code & 0xff));
        }
        Ok(match code {
            c if c == Verdict::Reject as u32 => Verdict::Reject,
            c if c == Verdict::Redirect as u32 => Verdict::Redirect,
            c if c == Verdict::TooBig as u32 => Verdict::TooBig,
            _ => Verdict::Pass,
        })
    }
}

impl Verdict {
    /// An XDP action (or `DROP_CODE | reason`) back from a scalar.
    #[inline(always)]
    pub fn decode_xdp(code: u32) -> Result<u32, DropReason> {
        if code & DROP_CODE != 0 {
            return Err(DropReason::from_code(code & 0xff));
        }
        Ok(code)
    }
}

impl Hook {
    #[inline(always)]
    pub fn from_u32(h: u32) -> Hook {
        match h {
            h if h == Hook::ToPod as u32 => Hook::ToPod,
            h if h == Hook::FromWorld as u32 => Hook::FromWorld,
            h if h == Hook::ToWorld as u32 => Hook::ToWorld,
            _ => Hook::FromPod,
        }
    }
}

/// Translates the packet by `e` and says where it goes. A packet that will need a redirect
/// (its source becomes a node address) has its next hop and path MTU checked first, while it is
/// still as its sender sent it: one that is too big is answered, not translated. Returns the
/// Service path's scalar.
#[inline(never)]
fn translate(ctx: &TcContext, p: &mut Ipv4Packet, e: &mut Ct4Entry, hook: u32) -> u32 {
    let mut verdict = Verdict::Pass;
    if e.flags & CT_F_REDIRECT != 0 && hook != Hook::ToWorld as u32 {
        match nat::fib_prepare(ctx, e.nat_saddr_be, e.nat_daddr_be) {
            nat::FIB_GO => verdict = Verdict::Redirect,
            nat::FIB_TOO_BIG => return Verdict::TooBig as u32,
            // No forwarding answer: as before, the stack decides.
            _ => {}
        }
    }
    if let Err(r) = nat::rewrite(ctx, p, e) {
        return DROP_CODE | r as u32;
    }
    stats::count_service(e.svc_id, p.tot_len);
    if hook == Hook::ToWorld as u32 {
        stats::count(stat::HOST_REPLY);
    }
    verdict as u32
}

/// Finds the connection the packet belongs to and tracks it, leaving its entry in `out`
/// (`Verdict::Translate`); or, for a packet that opens a new connection, the frontend in `svc`
/// (`STEP_NEW | masq`); or the verdict (or `DROP_CODE | reason`) for a packet not translated.
// A separate BPF subprogram (see service_path).
#[inline(never)]
fn classify(p: &mut Ipv4Packet, hook: u32, out: &mut Ct4Entry, svc: &mut Lb4Service) -> u32 {
    match classify_inner(p, Hook::from_u32(hook), out, svc) {
        Ok(code) => code,
        Err(r) => DROP_CODE | r as u32,
    }
}

#[inline(always)]
fn classify_inner(p: &mut Ipv4Packet, hook: Hook, out: &mut Ct4Entry, svc_out: &mut Lb4Service) -> Result<u32, DropReason> {
    let translate = Verdict::Translate as u32;
    let pass = Verdict::Pass as u32;
    let new_allowed = hook == Hook::FromPod || hook == Hook::FromWorld;
    let now = conntrack::now();
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
                    Unserved::NotService => Ok(pass),
                    _ => Err(DropReason::FragUnknown),
                };
            }
        }
        let key = ct_key(p);
        if let Some(hit) = conntrack::lookup(&key, now) {
            *out = unsafe { *hit.ptr };
            stats::count(stat::FRAGMENT);
            return Ok(translate);
        }
        return Ok(pass);
    }
    if !matches!(p.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return if new_allowed { other_protocol(p.daddr_be) } else { Ok(pass) };
    }
    if p.more_frags {
        // First fragment of a datagram: remember its ports for the fragments that follow.
        let ports = Frag4Ports { sport_be: p.sport_be, dport_be: p.dport_be };
        let _ = frag4_v1.insert(&frag_key(p), &ports, 0);
    }
    let mut key = ct_key(p);
    let syn_only = p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
    if let Some(mut hit) = conntrack::lookup(&key, now) {
        // A reply leaving a pod's veth: translated here, from now on never again into the client.
        if hook == Hook::FromPod && unsafe { (*hit.ptr).flags } & (CT_F_REPLY | CT_F_REPLY_AT_SOURCE) == CT_F_REPLY {
            mark_reply_at_source(hit.ptr, p.proto);
        }
        // SAFETY: pointer from a successful lookup; read in place.
        let e = unsafe { &*hit.ptr };
        if hook == Hook::FromWorld && e.flags & CT_F_EXTERNAL == 0 && e.flags & (CT_F_SNAT | CT_F_REPLY) != CT_F_SNAT | CT_F_REPLY {
            // A reply to a pod's own connection that crosses the external interface: it is
            // translated on the pod's veth, after routing (here its new source, possibly a node
            // address, would make the stack drop it as martian). Unless the pod's connection was
            // masqueraded: then the reply is addressed to this node, and only here can it be
            // turned back towards the pod.
            return Ok(pass);
        }
        if hook == Hook::ToPod && e.flags & CT_F_REPLY_AT_SOURCE != 0 {
            // Translated where it left the backend pod already. Only then: a backend behind a
            // link without Ferry's programs (another CNI's naming, a bridge, a tunnel) sends its
            // replies past every from-pod hook, and this is the first place that sees them.
            return Ok(pass);
        }
        if !new_allowed && e.flags & CT_F_REPLY == 0 {
            // Into a pod or out of the node: only replies are translated there. (A forward
            // entry on this tuple is a remapped direct flow's, not this packet's.)
            return Ok(pass);
        }
        let closed = p.proto == IPPROTO_TCP && conntrack::is_closed(e.state);
        if e.flags & CT_F_REPLY != 0 && closed && p.tcp_flags & TCP_SYN != 0 {
            // A SYN or SYN-ACK on the reply tuple of a closed connection belongs to an unrelated
            // connection on the same tuple (a pod reaching the backend directly from the port
            // it once used for the Service): the stale entries must not hijack it.
            conntrack::remove_pair(&key, e, hit.assured, p.proto);
            stats::count(stat::CT_STALE);
            return Ok(pass);
        }
        let reopen = e.flags & CT_F_FORWARD != 0
            && new_allowed
            // TCP: an established connection keeps its backend until it ends (graceful
            // termination, as with kube-proxy); only a new SYN on the same tuple moves. A SYN on
            // a closed connection's tuple starts a new connection (netfilter reopens TIME_WAIT).
            && (((p.proto != IPPROTO_TCP || syn_only) && !backend_alive(e)) || left_service(e, p.proto) || (syn_only && closed));
        if !reopen {
            conntrack::track(&mut hit, &mut key, p, out, now);
            stats::count(if out.flags & CT_F_REPLY != 0 { stat::CT_REPLY } else { stat::CT_FORWARD });
            return Ok(translate);
        }
        conntrack::remove_pair(&key, e, hit.assured, p.proto);
        stats::count(stat::CT_REOPEN);
    }
    if !new_allowed {
        return Ok(pass);
    }
    // Traffic the local detector calls local (kube-proxy's `--detect-local-mode`) sees the
    // internal frontends: ClusterIPs, and every endpoint behind an external address whatever its
    // externalTrafficPolicy (kube-proxy's short-circuit of pod traffic). Anything else sees the
    // external frontends first (externalTrafficPolicy Local: this node's endpoints only), and
    // ClusterIPs, masqueraded when a detector says the source is not local.
    let local = source_local(hook, p.saddr_be);
    let scope = if local == LOCAL_YES { SCOPE_INTERNAL } else { SCOPE_EXTERNAL };
    // Read straight into the caller's scratch: a copy in this frame would push the deepest call
    // chain (from_pod -> service path -> classify -> conntrack) past the verifier's 512 bytes.
    let found = (lookup_into(p.daddr_be, p.dport_be, p.proto, scope, svc_out) && svc_out.flags & SVC_F_ADDR_ONLY == 0)
        || (scope == SCOPE_EXTERNAL && cluster_ip_into(p, svc_out));
    if !found {
        return match lb4_unserved(p.daddr_be) {
            Unserved::UnexposedPort => Ok(Verdict::Reject as u32),
            Unserved::NoService => Err(DropReason::NoService),
            Unserved::NotService => {
                stats::count(stat::PASS);
                if hook == Hook::FromPod && (syn_only || p.proto != IPPROTO_TCP) {
                    return Ok(STEP_CLASH);
                }
                Ok(pass)
            }
        };
    }
    let svc: &Lb4Service = svc_out;
    let masq = masquerade(svc, local);
    if !lb4_source_allowed(svc, p.saddr_be) {
        return Err(DropReason::SourceRange);
    }
    if svc.count == 0 {
        return lb4_empty(svc).map(|v| v as u32);
    }
    stats::count(if hook == Hook::FromWorld { stat::EXTERNAL_NEW } else { stat::CT_NEW });
    Ok(STEP_NEW | masq as u32)
}

/// A reply entry met on a pod's veth, on its way out of the backend: its replies are translated
/// there, never again going into the client (`CT_F_REPLY_AT_SOURCE`). A remapped direct flow's
/// reply (`CT_F_CLASH`) becomes the Service connection's reply tuple once translated: that
/// connection's replies leave the same backend through the same veth, so its reply entry is
/// marked too, before the to-pod hook can take this packet for one of them.
// A separate BPF subprogram: once per connection, off the per-packet path.
#[inline(never)]
fn mark_reply_at_source(e: *mut Ct4Entry, proto: u8) {
    // SAFETY: pointer from a successful lookup; a lost race only writes the same bit twice.
    let e = unsafe { &mut *e };
    e.flags |= CT_F_REPLY_AT_SOURCE;
    if e.flags & CT_F_CLASH == 0 {
        return;
    }
    let key = Ct4Key { saddr_be: e.nat_saddr_be, daddr_be: e.nat_daddr_be, sport_be: e.nat_sport_be, dport_be: e.nat_dport_be, proto, pad: [0; 3] };
    if let Some(hit) = conntrack::lookup(&key, conntrack::now()) {
        // SAFETY: as above.
        let svc = unsafe { &mut *hit.ptr };
        if svc.flags & CT_F_REPLY != 0 {
            svc.flags |= CT_F_REPLY_AT_SOURCE;
        }
    }
}

/// [`source_local`]: the source is local traffic.
pub const LOCAL_YES: u32 = 1;
/// [`source_local`]: the source is not local traffic.
pub const LOCAL_NO: u32 = 0;
/// [`source_local`]: there is no local detector (no cluster CIDR): nothing is known.
pub const LOCAL_UNKNOWN: u32 = 2;

/// Is the packet local traffic, as kube-proxy's local traffic detector says? By the interface
/// it came in on (BridgeInterface, InterfaceNamePrefix: a pod's), or by its source address
/// (ClusterCIDR, NodeCIDR); `LOCAL_UNKNOWN` without a detector.
#[inline(always)]
pub fn source_local(hook: Hook, saddr_be: u32) -> u32 {
    let Some(cfg) = cfg4_v4.get(0) else { return LOCAL_UNKNOWN };
    if cfg.flags & CFG_F_LOCAL_IFACE != 0 {
        return if hook == Hook::FromPod { LOCAL_YES } else { LOCAL_NO };
    }
    if cfg.cluster_mask_be == 0 {
        return LOCAL_UNKNOWN;
    }
    if saddr_be & cfg.cluster_mask_be == cfg.cluster_cidr_be { LOCAL_YES } else { LOCAL_NO }
}

/// Is a new connection to `svc` masqueraded (its source becomes this node's address), as
/// kube-proxy marks it: always for the frontends the agent flagged (external addresses of
/// Services with externalTrafficPolicy Cluster; every ClusterIP with `--masquerade-all`), and a
/// ClusterIP reached by traffic a local detector calls not local.
#[inline(always)]
pub fn masquerade(svc: &Lb4Service, local: u32) -> Masq {
    if svc.flags & SVC_F_MASQ != 0 || (svc.flags & SVC_F_EXTERNAL_IP == 0 && local == LOCAL_NO) {
        Masq::Always
    } else {
        Masq::Never
    }
}

/// The ClusterIP frontend a packet that found no external frontend is addressed to (the external
/// scope holds no ClusterIP, so traffic that is not local looks there next), into `out`.
#[inline(always)]
fn cluster_ip_into(p: &Ipv4Packet, out: &mut Lb4Service) -> bool {
    lookup_into(p.daddr_be, p.dport_be, p.proto, SCOPE_INTERNAL, out) && out.flags & SVC_F_ADDR_ONLY == 0 && out.flags & SVC_F_EXTERNAL_IP == 0
}

/// [`lb4_lookup_service`] into `out` (left as it was when there is none).
#[inline(always)]
fn lookup_into(addr_be: u32, port_be: u16, proto: u8, scope: u8, out: &mut Lb4Service) -> bool {
    lb4_lookup_service(addr_be, port_be, proto, scope).map(|s| *out = s).is_some()
}

/// A new packet of a protocol Services do not carry (ICMP echo, GRE, ...): kube-proxy's
/// nftables rules refuse it at a ClusterIP and drop it elsewhere in the service CIDRs.
#[inline(always)]
pub fn other_protocol(daddr_be: u32) -> Result<u32, DropReason> {
    match lb4_unserved(daddr_be) {
        Unserved::UnexposedPort => Ok(Verdict::Reject as u32),
        Unserved::NoService => Err(DropReason::NoService),
        Unserved::NotService => Ok(Verdict::Pass as u32),
    }
}

/// A pod's new direct (untranslated) flow whose reply tuple is a Service connection's
/// translated tuple: the pod reaches a backend directly from the port it uses, or used, for the
/// Service. A closed connection there is stale and goes; a live one stays, and the new flow gets
/// another source port, as netfilter does on such a clash. Returns whether the flow was remapped
/// (its forward entry in `out`).
// A separate BPF subprogram: rare, and its connection setup is not multiplied into the path.
#[inline(never)]
fn direct_flow_clash(p: &mut Ipv4Packet, out: &mut Ct4Entry) -> bool {
    let now = conntrack::now();
    let rkey = conntrack::reversed(&ct_key(p));
    let Some(hit) = conntrack::lookup(&rkey, now) else { return false };
    // SAFETY: pointer from a successful lookup.
    let e = unsafe { &*hit.ptr };
    if e.flags & CT_F_REPLY == 0 {
        return false;
    }
    if p.proto == IPPROTO_TCP && conntrack::is_closed(e.state) {
        conntrack::remove_pair(&rkey, e, hit.assured, p.proto);
        stats::count(stat::CT_STALE);
        return false;
    }
    stats::count(stat::CT_CLASH);
    let cfg = cfg4_v4.get(0).copied().unwrap_or_default();
    let (port_min, port_max) = port_range(&cfg);
    let mut spec = PairSpec {
        be: Lb4Backend { addr_be: p.daddr_be, port_be: p.dport_be, proto: p.proto, flags: 0 },
        svc_id: 0,
        backend_id: 0,
        nat_saddr_be: p.saddr_be,
        port_min,
        port_max,
        flags: CT_F_CLASH,
    };
    create_pair(p, &mut spec, out) == 0
}

#[inline(always)]
fn port_range(cfg: &dataplane_common::NodeConfig) -> (u16, u16) {
    if cfg.snat_port_min != 0 && cfg.snat_port_max >= cfg.snat_port_min {
        (cfg.snat_port_min, cfg.snat_port_max)
    } else {
        (DEFAULT_PORT_MIN, DEFAULT_PORT_MAX)
    }
}

/// Whether a new connection gets this node's address as its source ([`masquerade`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Masq {
    Never,
    Always,
}

/// The `i`th port of a window starting at random offset `start` in `min..=max` (wrapping).
#[inline(always)]
fn window_port(min: u16, max: u16, start: u32, i: u32) -> u16 {
    let span = (max as u32).saturating_sub(min as u32) + 1;
    (min as u32 + (start + i) % span) as u16
}

/// Chooses a backend and records both directions of the connection, the forward entry in `out`.
/// Returns 0, or the drop reason's code. `hook` and `masq` are `Hook` and `Masq` as numbers.
// A separate BPF subprogram returning a scalar (tc and XDP call it); see service_path.
#[inline(never)]
pub fn lb4_new_connection(p: &mut Ipv4Packet, svc: &mut Lb4Service, hook: u32, masq: u32, out: &mut Ct4Entry) -> u32 {
    let from_world = hook == Hook::FromWorld as u32;
    let (backend_id, be) = match lb4_choose_backend(svc, p.saddr_be, flow_hash(p)) {
        Ok(b) => b,
        Err(r) => return r as u32,
    };
    let Some(cfg) = cfg4_v4.get(0) else { return DropReason::NoNodeAddress as u32 };
    // Masqueraded: the source becomes this node's address, so the reply comes back through this
    // node whichever backend was picked. Never towards the node itself (a hostNetwork endpoint):
    // the packet is delivered here (kube-proxy's mark is never applied to delivered packets),
    // and one from the node to itself arriving from outside would be a martian.
    let snat = masq == Masq::Always as u32 && be.flags & BE_F_HOST == 0;
    let hairpin = be.addr_be == p.saddr_be;
    let nat_saddr = if snat {
        if cfg.snat_addr_be == 0 {
            return DropReason::NoNodeAddress as u32;
        }
        cfg.snat_addr_be
    } else if hairpin {
        p.daddr_be
    } else {
        p.saddr_be
    };
    let mut flags = 0;
    if hairpin && !snat {
        flags |= CT_F_HAIRPIN;
    }
    if snat {
        flags |= CT_F_SNAT;
    }
    if from_world {
        flags |= CT_F_EXTERNAL;
    } else if !snat && unsafe { local4_v1.get(&p.daddr_be) }.is_some_and(|l| l.kind == LOCAL_HOST) {
        // A pod reaching a frontend that is an address of this node (a NodePort, an external
        // IP on the node) without masquerade: the replies leave with that address as their
        // source (and a hairpin's requests too), which the stack would drop as martian on the
        // pod's veth. Both directions go straight to their next hop instead.
        flags |= CT_F_REDIRECT;
    }
    if be.flags & BE_F_LOCAL != 0 && be.flags & BE_F_HOST == 0 {
        flags |= CT_F_LOCAL_BACKEND;
    }
    // A source port is chosen from the range for translated sources; others keep the client's
    // port unless their translated tuple is taken.
    let (port_min, port_max) = if snat { port_range(cfg) } else { (0, 0) };
    let mut spec = PairSpec { be, svc_id: svc.svc_id, backend_id, nat_saddr_be: nat_saddr, port_min, port_max, flags };
    create_pair(p, &mut spec, out)
}

/// A new connection's translation, for [`create_pair`].
pub struct PairSpec {
    pub be: Lb4Backend,
    pub svc_id: u32,
    pub backend_id: u32,
    /// The source after translation.
    pub nat_saddr_be: u32,
    /// Range for a new source port; `port_min == 0`: keep the client's unless its tuple is taken.
    pub port_min: u16,
    pub port_max: u16,
    /// `CT_F_*` beyond the direction flags.
    pub flags: u32,
}

/// Records both directions of a new connection from `p` as `spec` says; the forward entry in
/// `out`. Returns 0 or the drop reason's code.
///
/// The reply entry is keyed by the translated tuple, which must be unique: two clients' flows
/// can become identical after translation (one client port reaching one backend through two
/// Services, or through two nodes' NodePorts after source translation). Then another source port
/// is chosen for the new connection instead of breaking the existing one.
// Inlined into its two callers (themselves subprograms): one frame less on the deepest call
// chain. The reply entry is built in the per-CPU scratch.
#[inline(always)]
fn create_pair(p: &mut Ipv4Packet, spec: &mut PairSpec, out: &mut Ct4Entry) -> u32 {
    let Some(sc) = conntrack::scratch() else { return DropReason::CtInsert as u32 };
    let now = conntrack::now();
    let new_port = spec.port_min != 0;
    let (port_min, port_max) = if new_port { (spec.port_min, spec.port_max) } else { (DEFAULT_PORT_MIN, DEFAULT_PORT_MAX) };
    let mut fwd_flags = CT_F_FORWARD | spec.flags;
    let mut rev_flags = CT_F_REPLY | spec.flags;
    if spec.flags & CT_F_SNAT != 0 {
        fwd_flags |= CT_F_REDIRECT;
    }
    if spec.flags & (CT_F_EXTERNAL | CT_F_SNAT) != 0 {
        // Replies leave with the frontend (often a node address) as their source, or come back
        // to this node's address and go on to a pod of it.
        rev_flags |= CT_F_REDIRECT;
    }
    let expires_ns = now + conntrack::timeout_ns(p.proto, 0);
    // Written field by field, in place: a struct literal would be built on the stack first.
    let r = &mut sc.rev;
    r.nat_saddr_be = p.daddr_be;
    r.nat_daddr_be = p.saddr_be;
    r.nat_sport_be = p.dport_be;
    r.nat_dport_be = p.sport_be;
    r.svc_id = spec.svc_id;
    r.backend_id = spec.backend_id;
    r.flags = rev_flags;
    r.state = if p.proto == IPPROTO_TCP { dataplane_common::CT_S_SEQ_ORIG } else { 0 };
    r.tcp_next = 0;
    r.created_ns = now;
    r.last_seen_ns = now;
    r.expires_ns = expires_ns;
    let r_state = sc.rev.state;
    // Reply entry first: once the forward entry exists, replies may come back at any moment.
    // Candidate ports: the client's own first (unless a new one is wanted), then a window of
    // consecutive ports at a random place in the range, three times over: free ports only, then
    // ones a finished connection can safely give up, then any finished connection's (netfilter
    // probes from a random offset too, and takes TIME_WAIT tuples only when it runs out).
    let start = unsafe { bpf_get_prandom_u32() };
    let mut sport = if new_port { window_port(port_min, port_max, start, 0).to_be() } else { p.sport_be };
    let mut placed = false;
    let mut i = 0;
    while i < PORT_TRIES {
        let rev_key = Ct4Key {
            saddr_be: spec.be.addr_be,
            daddr_be: spec.nat_saddr_be,
            sport_be: spec.be.port_be,
            dport_be: sport,
            proto: p.proto,
            pad: [0; 3],
        };
        let mode = match i / PORT_WINDOW {
            0 => conntrack::TAKE_NONE,
            1 => conntrack::TAKE_SAFE,
            _ => conntrack::TAKE_ANY,
        };
        if conntrack::place_reply(&rev_key, mode) == conntrack::PLACED {
            placed = true;
            break;
        }
        stats::count(stat::PORT_REMAP);
        i += 1;
        sport = window_port(port_min, port_max, start, i % PORT_WINDOW).to_be();
    }
    if !placed {
        return DropReason::NatPorts as u32;
    }
    out.nat_saddr_be = spec.nat_saddr_be;
    out.nat_daddr_be = spec.be.addr_be;
    out.nat_sport_be = sport;
    out.nat_dport_be = spec.be.port_be;
    out.svc_id = spec.svc_id;
    out.backend_id = spec.backend_id;
    out.flags = fwd_flags;
    out.state = r_state;
    out.tcp_next = p.tcp_next;
    out.created_ns = now;
    out.last_seen_ns = now;
    out.expires_ns = expires_ns;
    conntrack::place_forward(&ct_key(p), out, backend_alive)
}
