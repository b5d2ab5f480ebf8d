//! Ferry's kernel programs: thin entries that count, delegate to `try_` functions, and turn the
//! result into a verdict in exactly one place.
#![no_std]
#![no_main]
#![allow(non_upper_case_globals)]

mod conntrack;
mod csum;
mod guard;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod policy;
mod reject;
mod sctp;
mod sock;
mod stats;
mod xdp;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use dataplane_common::{stat, DropReason, MARK_FERRY_REPLY};
use lb::{Hook, Verdict};

/// tc ingress on the host side of a pod's veth: everything the pod sends.
#[classifier]
pub fn ferry_from_pod(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::FromPod)
}

/// tc egress on the host side of a pod's veth: everything about to reach the pod. Translates
/// replies whose connection this node set up (the backend may be on another node).
#[classifier]
pub fn ferry_to_pod(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::ToPod)
}

/// tc ingress on the node's external interfaces: NodePort, LoadBalancer and external IP traffic
/// from outside the node, and the replies of connections it sent to other nodes.
#[classifier]
pub fn ferry_from_world(ctx: TcContext) -> i32 {
    tc_entry(&ctx, Hook::FromWorld)
}

/// tc egress on the node's external interfaces: the node's own stack replying as a hostNetwork
/// endpoint to a connection translated to it (a NodePort from outside whose endpoint is this
/// node) leaves here, and only here can the reply be translated back.
#[classifier]
pub fn ferry_to_world(ctx: TcContext) -> i32 {
    // Only what the node's own stack sends (no input interface): forwarded packets, pods' and
    // those Ferry translated and redirected, were handled where they entered.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    tc_entry(&ctx, Hook::ToWorld)
}

/// Does nothing: the floor `cargo xtask bench` measures beside the real programs, in the same
/// object and the same run. Never attached.
#[classifier]
pub fn ferry_bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Never loaded: it only refers to the name maps (the agent's; the packet path reads only
/// `lb4_svc_name_v1`, at a frontend's first packet), so that they stay in the object and are
/// created with their BTF, like every other map.
#[classifier]
pub fn ferry_keep_maps(_ctx: TcContext) -> i32 {
    let id = 0u32;
    let mut found = maps::lb4_svc_name_v1.get_ptr(&id).is_some() as u32;
    found += maps::pol_name_v1.get_ptr(&id).is_some() as u32;
    found += maps::pol_podname4_v1.get_ptr(&id).is_some() as u32;
    found += maps::pol_idname_v1.get_ptr(&id).is_some() as u32;
    if found > 4 {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// Does nothing: the XDP floor of `cargo xtask bench`, and the XDP_PASS program the lab puts on a
/// veth peer so that it drains the XDP_TX frames sent to it (`bpf_tests::lab::xdp_pass_on`).
#[xdp]
pub fn ferry_bench_empty_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn tc_entry(ctx: &TcContext, hook: Hook) -> i32 {
    stats::count(stat::PACKETS);
    // Every parse below reads the headers in place.
    parse::pull_headers(ctx);
    // Anti-spoofing, and frames that are not IPv4 kept from isolated pods: before anything else
    // (see guard.rs).
    if hook != Hook::ToWorld {
        let code = guard::ferry_guard(ctx.skb.skb, hook as u32);
        if code != 0 {
            return drop(DropReason::from_code(code));
        }
    }
    // NetworkPolicy ingress: on the packet as it arrives at the pod (already translated by
    // whichever node translated it; replies not yet translated back).
    if hook == Hook::ToPod {
        // Ferry's own answer to the pod's packet (a refusal, fragmentation needed), sent back
        // out of this veth: it answers the pod and is not a connection into it.
        if unsafe { (*ctx.skb.skb).mark } == MARK_FERRY_REPLY {
            unsafe { (*ctx.skb.skb).mark = 0 };
            return TC_ACT_OK;
        }
        let code = policy::check(ctx, dataplane_common::DIR_INGRESS);
        if code != 0 {
            return drop(DropReason::from_code(code));
        }
    }
    // NetworkPolicy egress is decided after Service translation; whether a decision is needed at
    // all (and the untranslated tuple) is known only before it.
    let pre = if hook == Hook::FromPod { policy::egress_pre(ctx) } else { policy::PRE_NONE };
    // The Service path, the policy check and the answers are global BPF functions: each is
    // verified once, on its own, and here they are opaque calls with scalar results, so the
    // verifier's work adds up instead of multiplying.
    let code = lb::ferry_service_path(ctx.skb.skb, hook);
    if code == lb::NOT_IPV4 {
        // Not IPv4 (ARP, IPv6): not ours in this version.
        return TC_ACT_OK;
    }
    // NetworkPolicy egress: on the packet as it leaves the pod, after Service translation
    // (policies see the backend, as Kubernetes requires); its drop reason as the check gives it
    // (policy_egress, or frag_unknown for a later fragment without its first).
    // A reply of a connection into the pod needs no decision, unless the Service path just sent
    // it somewhere new (a forged "reply" from a Service address would otherwise take the pod to
    // that Service's backends unchecked).
    let decide = pre == policy::PRE_DECIDE || (pre == policy::PRE_REPLY && policy::dst_changed(ctx));
    let denied = if decide && matches!(Verdict::decode(code), Ok(Verdict::Pass | Verdict::Redirect)) { policy::check(ctx, dataplane_common::DIR_EGRESS) } else { 0 };
    let result = match Verdict::decode(code) {
        _ if denied != 0 => denied | lb::DROP_CODE,
        Ok(Verdict::Redirect) => return nat::fib_redirect(ctx).unwrap_or_else(drop),
        Ok(Verdict::TooBig | Verdict::Reject) if !reject::refusal_allowed() => DropReason::RefusalLimited as u32 | lb::DROP_CODE,
        Ok(Verdict::TooBig) => reject::ferry_frag_needed(ctx.skb.skb, nat::fib_mtu()),
        Ok(Verdict::Reject) => {
            let r = reject::ferry_refuse(ctx.skb.skb);
            if r & lb::DROP_CODE == 0 {
                stats::count(stat::REJECT);
            }
            r
        }
        // `Translate` never leaves the Service path.
        Ok(Verdict::Pass | Verdict::Translate) => TC_ACT_OK as u32,
        Err(reason) => reason as u32 | lb::DROP_CODE,
    };
    if result & lb::DROP_CODE != 0 {
        return drop(DropReason::from_code(result & 0xff));
    }
    result as i32
}

/// XDP on the node's external interfaces (`--nodeport-acceleration=xdp`): the NodePort path at
/// the driver level; whatever it does not finish goes on to `ferry_from_world`.
#[xdp]
pub fn ferry_xdp_nodeport(ctx: XdpContext) -> u32 {
    match xdp::try_nodeport(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn drop(reason: DropReason) -> i32 {
    stats::count(stat::DROP);
    stats::count(reason.stat());
    TC_ACT_SHOT
}

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    sock::sock4_xlate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ferry_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sock4_xlate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ferry_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::sock4_rev(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeer4(ctx: SockAddrContext) -> i32 {
    sock::sock4_rev(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
