//! Socket-level Service translation for processes of the node itself (host network), attached
//! to a cgroup: the destination is rewritten once at connect()/sendmsg() instead of per packet,
//! which is how Cilium's socket LB serves host processes, and works without any route to the
//! service CIDR. Replies need no packet translation: the socket is connected to the backend.
//! recvmsg4 and getpeername4 report the Service address back, so applications see what they
//! asked for.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use dataplane_common::{stat, SockRevKey, SockRevValue, SCOPE_INTERNAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY, SVC_F_SOURCE_RANGES};

use crate::{
    lb::{lb4_choose_backend, lb4_lookup_service, lb4_source_allowed, lb4_unserved, Unserved},
    maps::{cfg4_v4, sock_rev4_v1},
    stats,
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// Allow the syscall (possibly with a rewritten address).
const ALLOW: i32 = 1;

#[inline(always)]
fn refuse(errno: i32) -> i32 {
    // Needs kernel 5.18+ for bpf_set_retval in cgroup sock_addr programs; older kernels report
    // EPERM for every refusal.
    unsafe { bpf_set_retval(-errno) };
    stats::count(stat::SOCK_REJECT);
    0
}

/// connect4 and sendmsg4: translate a Service address to a backend.
#[inline(always)]
pub fn sock4_xlate(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (family, proto, addr, port) = unsafe { ((*sa).user_family, (*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port as u16) };
    if family != AF_INET || !host_socket(ctx) {
        return ALLOW;
    }
    let svc = match lb4_lookup_service(addr, port, proto, SCOPE_INTERNAL) {
        Some(s) if s.flags & SVC_F_ADDR_ONLY == 0 => s,
        _ => {
            return match lb4_unserved(addr) {
                Unserved::UnexposedPort => refuse(ECONNREFUSED),
                // Nothing to answer with at socket level: refuse locally rather than let the
                // packet leave the node towards an address no Service holds.
                Unserved::NoService => refuse(EPERM),
                Unserved::NotService => ALLOW,
            };
        }
    };
    // loadBalancerSourceRanges apply to the node's own connections as kube-proxy applies them
    // (its firewall chain runs on the output path too): by the source the connection will have,
    // the socket's bound address, else the node's primary address (the one kube-proxy's
    // allowFromNode adds the Service address for). Outside them: not delivered.
    // Only frontends with ranges pay for finding the source.
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        let sk = unsafe { (*sa).__bindgen_anon_1.sk };
        let bound = if sk.is_null() { 0 } else { unsafe { (*sk).src_ip4 } };
        let src = if bound != 0 { bound } else { cfg4_v4.get(0).map(|c| c.snat_addr_be).unwrap_or(0) };
        if !lb4_source_allowed(&svc, src) {
            stats::count(dataplane_common::DropReason::SourceRange.stat());
            return refuse(EPERM);
        }
    }
    if svc.count == 0 && svc.flags & SVC_F_DROP_EMPTY != 0 {
        return refuse(EPERM);
    }
    // Affinity per client: every process of the node is the same client (the node).
    // No source port exists yet at connect(): the table is indexed at random.
    let Ok((_, be)) = lb4_choose_backend(&svc, 0, unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() }) else {
        return refuse(ECONNREFUSED);
    };
    unsafe {
        (*sa).user_ip4 = be.addr_be;
        (*sa).user_port = be.port_be as u32;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let key = SockRevKey { cookie, addr_be: be.addr_be, port_be: be.port_be, pad: 0 };
    let _ = sock_rev4_v1.insert(&key, &SockRevValue { addr_be: addr, port_be: port, pad: 0 }, 0);
    stats::count(stat::SOCK_XLATE);
    ALLOW
}

/// Is this a socket of the node's own network namespace? Pods live in the same cgroup hierarchy
/// (the hooks sit on its root), but their traffic takes the tc path: with conntrack, policy, and
/// an immediate move off a removed endpoint.
#[inline(always)]
fn host_socket(ctx: &SockAddrContext) -> bool {
    let host = cfg4_v4.get(0).map(|c| c.host_netns_cookie).unwrap_or(0);
    host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) } == host
}

/// recvmsg4 and getpeername4: report the Service address instead of the backend's.
#[inline(always)]
pub fn sock4_rev(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (family, addr, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port as u16) };
    if family != AF_INET {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    let key = SockRevKey { cookie, addr_be: addr, port_be: port, pad: 0 };
    if let Some(v) = unsafe { sock_rev4_v1.get(&key).copied() } {
        unsafe {
            (*sa).user_ip4 = v.addr_be;
            (*sa).user_port = v.port_be as u32;
        }
    }
    ALLOW
}
