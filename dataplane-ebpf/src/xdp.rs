//! NodePort acceleration (`--nodeport-acceleration=xdp`): the external-scope part of the tc
//! from-world path, run at the driver level on the node's external interfaces.
//!
//! It handles what it can finish in XDP and passes everything else, untouched, to the tc path,
//! which stays attached as the fallback: TCP and UDP without IP options or fragments, to a
//! NodePort, LoadBalancer or external IP frontend, or belonging to a connection such a frontend
//! opened. A translation that only changes the destination (a backend on this node) is done
//! here and handed to the stack. One that needs the packet sent out again (source translation to
//! a backend on another node, or a reply leaving as the NodePort) is finished here only when the
//! FIB sends it back out the interface it came in on (XDP_TX, the one-armed load balancer);
//! otherwise tc translates it from the same conntrack entry and redirects it with the
//! neighbour resolution XDP lacks. Conntrack, Services and hashing tables are the maps the tc
//! programs use, so the two paths agree on every flow.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use dataplane_common::{
    stat, Ct4Entry, DropReason, CT_F_EXTERNAL, CT_F_FORWARD, CT_F_LOCAL_BACKEND, CT_F_REDIRECT, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL,
    SVC_F_ADDR_ONLY,
};

use crate::{
    csum::{csum_replace2, csum_replace4},
    conntrack,
    lb::{backend_alive, ct_key, left_service, lb4_lookup_service, lb4_new_connection, lb4_source_allowed, masquerade, source_local, Hook, Verdict, DROP_CODE, LOCAL_YES},
    maps::{local4_v1, path_scratch},
    parse::{Ipv4Packet, ETH_LEN, TCP_SYN},
    stats,
};

const PASS: u32 = xdp_action::XDP_PASS;

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    crate::parse::bounded(ctx.data(), ctx.data_end(), off)
}

#[inline(always)]
fn port(p: u16) -> u16 {
    u16::from_be(p)
}

/// Rewrites addresses and ports to `e`'s tuple, with the IPv4 and TCP/UDP checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Ipv4Packet, e: &Ct4Entry) -> Option<()> {
    let csum_off = if p.proto == IPPROTO_TCP { 16 } else { 6 };
    // SAFETY: each pointer was bounds-checked against data_end by ptr_at; the regions are
    // disjoint (IP header, L4 ports, L4 checksum).
    let (ip, l4, l4c) = unsafe {
        (
            &mut *ptr_at::<[u8; 20]>(ctx, ETH_LEN)?,
            &mut *ptr_at::<[u8; 4]>(ctx, p.l4_off)?,
            &mut *ptr_at::<[u8; 2]>(ctx, p.l4_off + csum_off)?,
        )
    };
    {
        let mut ipc = u16::from_be_bytes([ip[10], ip[11]]);
        ipc = csum_replace4(ipc, p.saddr_be, e.nat_saddr_be);
        ipc = csum_replace4(ipc, p.daddr_be, e.nat_daddr_be);
        ip[10..12].copy_from_slice(&ipc.to_be_bytes());
        ip[12..16].copy_from_slice(&e.nat_saddr_be.to_ne_bytes());
        ip[16..20].copy_from_slice(&e.nat_daddr_be.to_ne_bytes());
        let old = u16::from_be_bytes(*l4c);
        // UDP: a zero checksum means none, and a computed zero is sent as all ones.
        if !(p.proto == IPPROTO_UDP && old == 0) {
            let mut c = csum_replace4(old, p.saddr_be, e.nat_saddr_be);
            c = csum_replace4(c, p.daddr_be, e.nat_daddr_be);
            c = csum_replace2(c, port(p.sport_be), port(e.nat_sport_be));
            c = csum_replace2(c, port(p.dport_be), port(e.nat_dport_be));
            if p.proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            *l4c = c.to_be_bytes();
        }
        l4[0..2].copy_from_slice(&e.nat_sport_be.to_ne_bytes());
        l4[2..4].copy_from_slice(&e.nat_dport_be.to_ne_bytes());
    }
    Some(())
}

/// Finishes a translated flow in XDP when it can, else passes it untouched to tc. Returns the XDP
/// action, `UNTOUCHED` (an XDP_PASS that leaves the packet to tc), or `lb::DROP_CODE | reason`.
// A separate BPF subprogram: its frame (the FIB lookup's parameters) stays off the one that
// creates connections (512 bytes for the whole call chain).
#[inline(never)]
fn forward(ctx: &XdpContext, p: &mut Ipv4Packet, e: &mut Ct4Entry) -> u32 {
    match forward_inner(ctx, p, e) {
        Ok(a) => a,
        Err(r) => DROP_CODE | r as u32,
    }
}

#[inline(always)]
fn forward_inner(ctx: &XdpContext, p: &Ipv4Packet, e: &Ct4Entry) -> Result<u32, DropReason> {
    if e.flags & CT_F_REDIRECT == 0 {
        rewrite(ctx, p, e).ok_or(DropReason::Malformed)?;
        stats::count(stat::XDP_FORWARD);
        stats::count_service(e.svc_id, p.tot_len);
        return Ok(PASS);
    }
    if e.flags & CT_F_LOCAL_BACKEND != 0 {
        // Masqueraded to a pod of this node: it goes into the pod's veth, which only tc can
        // redirect to. No FIB lookup needed to know that.
        return Ok(UNTOUCHED);
    }
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    params.l4_protocol = p.proto;
    params.__bindgen_anon_1.tot_len = p.tot_len as u16;
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = e.nat_saddr_be;
    params.__bindgen_anon_4.ipv4_dst = e.nat_daddr_be;
    let ret = unsafe { fib_lookup(ctx.ctx as *mut _, &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if ret != BPF_FIB_LKUP_RET_SUCCESS as i64 || params.ifindex != ingress {
        return Ok(UNTOUCHED);
    }
    rewrite(ctx, p, e).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let mac = unsafe { &mut *ptr_at::<[u8; 12]>(ctx, 0).ok_or(DropReason::Malformed)? };
    mac[0..6].copy_from_slice(&params.dmac);
    mac[6..12].copy_from_slice(&params.smac);
    stats::count(stat::XDP_TX);
    stats::count_service(e.svc_id, p.tot_len);
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
pub fn try_nodeport(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(eth) = ptr_at::<[u8; 14]>(ctx, 0) else { return Ok(PASS) };
    if unsafe { (*eth)[12] != 0x08 || (*eth)[13] != 0x00 } {
        return Ok(PASS);
    }
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_LEN) else { return Ok(PASS) };
    let ip = unsafe { *ip };
    // Options, fragments, other protocols: the tc path's business.
    let frags = u16::from_be_bytes([ip[6], ip[7]]);
    if ip[0] != 0x45 || frags & 0x3fff != 0 || !matches!(ip[9], IPPROTO_TCP | IPPROTO_UDP) {
        return Ok(PASS);
    }
    // Nothing from outside may claim an address of this node or of its pods (see guard.rs).
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    if unsafe { local4_v1.get(&saddr) }.is_some() {
        return Err(DropReason::SpoofedSource);
    }
    // A pod of another node, or a Service address: the tc path's guard checks the route back.
    if unsafe { crate::maps::pol_podname4_v1.get(&saddr) }.is_some() || crate::maps::svc_cidr4_v1.get(&aya_ebpf::btf_maps::lpm_trie::Key::new(32, saddr)).is_some() {
        return Ok(PASS);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let l4_off = ETH_LEN + 20;
    let min = if ip[9] == IPPROTO_TCP { 20 } else { 8 };
    if tot_len < 20 + min || ctx.data() + ETH_LEN + tot_len > ctx.data_end() {
        return Ok(PASS);
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4_off) else { return Ok(PASS) };
    let ports = unsafe { *ports };
    let (tcp_flags, tcp_next) = if ip[9] == IPPROTO_TCP {
        // Sequence number, acknowledgment, data offset, flags.
        let Some(h) = ptr_at::<[u8; 10]>(ctx, l4_off + 4) else { return Ok(PASS) };
        let h = unsafe { *h };
        let doff = ((h[8] >> 4) as usize) * 4;
        (h[9], crate::parse::tcp_next(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), (tot_len - 20).saturating_sub(doff), h[9]))
    } else {
        (0, 0)
    };
    let p = Ipv4Packet {
        l4_off,
        ihl: 20,
        tot_len,
        proto: ip[9],
        id_be: u16::from_ne_bytes([ip[4], ip[5]]),
        more_frags: false,
        frag_off: 0,
        saddr_be: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr_be: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        tcp_flags,
        tcp_next,
    };
    let mut p = p;
    let Some(sc) = path_scratch.get_ptr_mut(0) else { return Ok(PASS) };
    // SAFETY: per-CPU slot, used by this packet only.
    let sc = unsafe { &mut *sc };
    let mut key = ct_key(&p);
    let now = conntrack::now();
    if let Some(mut hit) = conntrack::lookup(&key, now) {
        // SAFETY: pointer from a successful lookup.
        let e = unsafe { &*hit.ptr };
        // Connections pods opened, ones whose backend left (tc re-balances them), and a SYN on a
        // closed connection's tuple (tc reopens it or retires stale entries) go to tc.
        let syn_on_closed = p.proto == IPPROTO_TCP && p.tcp_flags & TCP_SYN != 0 && conntrack::is_closed(e.state);
        if e.flags & CT_F_EXTERNAL == 0 || (e.flags & CT_F_FORWARD != 0 && (!backend_alive(e) || left_service(e, p.proto))) || syn_on_closed {
            return Ok(PASS);
        }
        // Translated (the tuple does not depend on the lifecycle) and only then tracked, when
        // XDP finishes the packet: one it leaves to tc is tracked there, once.
        sc.e = *e;
        let code = forward(ctx, &mut p, &mut sc.e);
        if code == UNTOUCHED {
            return Ok(PASS);
        }
        // The scratch entry was used; tracking may overwrite it.
        conntrack::track(&mut hit, &mut key, &mut p, &mut sc.e, now);
        return Verdict::decode_xdp(code);
    }
    let local = source_local(Hook::FromWorld, p.saddr_be);
    if local == LOCAL_YES {
        // Local traffic (a pod of another node): it sees the internal frontends, in tc.
        return Ok(PASS);
    }
    let svc = match lb4_lookup_service(p.daddr_be, p.dport_be, p.proto, SCOPE_EXTERNAL) {
        Some(s) if s.flags & SVC_F_ADDR_ONLY == 0 => s,
        _ => return Ok(PASS),
    };
    if !lb4_source_allowed(&svc, p.saddr_be) {
        return Err(DropReason::SourceRange);
    }
    if svc.count == 0 {
        // A refusal or a traffic-policy drop: tc answers and counts it.
        return Ok(PASS);
    }
    sc.svc = svc;
    let code = lb4_new_connection(&mut p, &mut sc.svc, Hook::FromWorld as u32, masquerade(&svc, local) as u32, &mut sc.e);
    if code != 0 {
        return Err(DropReason::from_code(code));
    }
    stats::count(stat::EXTERNAL_NEW);
    match forward(ctx, &mut p, &mut sc.e) {
        UNTOUCHED => Ok(PASS),
        code => Verdict::decode_xdp(code),
    }
}

/// `forward`: XDP did not finish the packet; tc will, from the same conntrack entry.
const UNTOUCHED: u32 = 0x400;
