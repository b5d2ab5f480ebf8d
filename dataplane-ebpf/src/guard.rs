//! Checks that come before anything else on a pod's interface and on the node's external ones:
//! anti-spoofing, and frames Ferry does not decide (not IPv4) kept away from isolated pods.
//!
//! - A pod sends only with its own address: the source of its IPv4 packets and the sender of its
//!   ARP packets must be the address `local4_v1` gives its interface. An address the agent has
//!   not told the datapath about yet (a pod that just started) must at least route back out of
//!   the interface it came in on: strict reverse-path filtering, by FIB lookup, as Calico does.
//!   Cilium drops the same packets (`DROP_INVALID_SIP`).
//! - Nothing arriving from outside the node (another node, a client) may claim the address of a
//!   pod of this node, of the node itself or of a Service; a pod of another node only where the
//!   route back to it leaves (strict reverse path).
//! - A pod's interface carries untagged frames only: a VLAN tag (even VLAN 0, which the kernel
//!   strips and delivers as untagged) would carry a packet past every check that parses
//!   untagged frames.
//! - Ferry decides IPv4 only. A frame that is not IPv4 or ARP (IPv6, any other ethertype) into a
//!   pod isolated for ingress, or out of one isolated for egress, is dropped: until the IPv6
//!   datapath exists nothing reaches an isolated pod unpoliced. ARP passes (a pod must resolve
//!   its gateway), checked as above when it comes from a pod.
use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::TcContext,
};
use dataplane_common::{DropReason, CFG_F_EXTERNAL_STRICT, CFG_F_SOURCE_CHECK, EP_F_EGRESS, EP_F_INGRESS, LOCAL_POD};

use crate::{
    lb::Hook,
    maps::{cfg4_v4, local4_v1, pod_if4_v1, pol_ep4_v1, pol_podname4_v1, svc_cidr4_v1},
    parse::{read, ETH_LEN, ETH_P_IP},
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The IPv4 source address in an Ethernet frame.
const SADDR_OFF: usize = ETH_LEN + 12;
/// The sender protocol address of an Ethernet/IPv4 ARP packet.
const ARP_SPA_OFF: usize = ETH_LEN + 14;

/// The guard for `hook` (`Hook as u32`): 0 to go on, or the drop reason's code. A global BPF
/// function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_guard(skb: *mut aya_ebpf::bindings::__sk_buff, hook: u32) -> u32 {
    let ctx = TcContext::new(skb);
    match guard(&ctx, Hook::from_u32(hook)) {
        Ok(()) => 0,
        Err(r) => r as u32,
    }
}

#[inline(always)]
fn guard(ctx: &TcContext, hook: Hook) -> Result<(), DropReason> {
    let eth_proto = read::<[u8; 2]>(ctx, 12).map(u16::from_be_bytes)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match hook {
        Hook::FromWorld => {
            if eth_proto == ETH_P_IP {
                let saddr: u32 = read(ctx, SADDR_OFF)?;
                if !world_source_ok(ctx, ifindex, saddr) {
                    return Err(DropReason::SpoofedSource);
                }
            }
            Ok(())
        }
        Hook::FromPod => {
            if unsafe { (*ctx.skb.skb).vlan_present } != 0 || eth_proto == ETH_P_8021Q || eth_proto == ETH_P_8021AD {
                return Err(DropReason::VlanFromPod);
            }
            match eth_proto {
                ETH_P_IP => {
                    let saddr: u32 = read(ctx, SADDR_OFF)?;
                    if source_ok(ctx, ifindex, saddr) { Ok(()) } else { Err(DropReason::SpoofedSource) }
                }
                ETH_P_ARP => {
                    let spa: u32 = read(ctx, ARP_SPA_OFF)?;
                    // 0.0.0.0: an address probe (RFC 5227), which claims nothing.
                    if spa == 0 || source_ok(ctx, ifindex, spa) { Ok(()) } else { Err(DropReason::SpoofedArp) }
                }
                _ if isolated(ifindex, EP_F_EGRESS) => Err(DropReason::NotIpv4Isolated),
                _ => Ok(()),
            }
        }
        Hook::ToPod => match eth_proto {
            ETH_P_IP | ETH_P_ARP => Ok(()),
            _ if isolated(ifindex, EP_F_INGRESS) => Err(DropReason::NotIpv4Isolated),
            _ => Ok(()),
        },
        Hook::ToWorld => Ok(()),
    }
}

/// May a packet arriving from outside the node on `ifindex` carry source `saddr_be`? Never an
/// address of this node or of its pods, nor a Service address (nothing outside sends from a
/// ClusterIP: a forged "reply" from one would take a pod to that Service's backends). A pod of
/// another node only by the route back to it (strict reverse path, as Calico does for workload
/// addresses) with `--external-source-check strict`: its traffic comes in where the route to its
/// node leaves, a host elsewhere claiming its address does not. (The lookup follows one next
/// hop, so nodes with several equal-cost routes to each other need the default, loose.)
#[inline(always)]
pub fn world_source_ok(ctx: &TcContext, ifindex: u32, saddr_be: u32) -> bool {
    if unsafe { local4_v1.get(&saddr_be) }.is_some() || svc_cidr4_v1.get(&Key::new(32, saddr_be)).is_some() {
        return false;
    }
    if cfg4_v4.get(0).is_some_and(|c| c.flags & CFG_F_EXTERNAL_STRICT != 0) && unsafe { pol_podname4_v1.get(&saddr_be) }.is_some() {
        // As the kernel's rp_filter looks the source up: from the packet's destination, so
        // source-based routing rules apply.
        let daddr: u32 = ctx.load(SADDR_OFF + 4).unwrap_or(0);
        return reverse_path(ctx, ifindex, saddr_be, daddr) == ifindex;
    }
    true
}

/// May the pod behind `ifindex` send with source `saddr_be`? (Always, with `--pod-source-check
/// off`, for a bridge CNI, where no route leads to a pod's own interface.)
#[inline(always)]
fn source_ok(ctx: &TcContext, ifindex: u32, saddr_be: u32) -> bool {
    if cfg4_v4.get(0).is_none_or(|c| c.flags & CFG_F_SOURCE_CHECK == 0) {
        return true;
    }
    match unsafe { local4_v1.get(&saddr_be) } {
        // A known address: only its own pod's interface may use it, never the node's.
        Some(l) => l.kind == LOCAL_POD && l.ifindex == ifindex,
        // Not one the agent knows (yet): the route back to it must leave by this interface.
        None => reverse_path(ctx, ifindex, saddr_be, 0) == ifindex,
    }
}

/// The interface the route to `addr_be` leaves by, as the stack would forward a packet that came
/// in on `ifindex` (0 when there is no forwarding route: a local, broadcast or unreachable
/// address). A separate BPF subprogram: its 64-byte lookup frame is not added to the caller's.
#[inline(never)]
fn reverse_path(ctx: &TcContext, ifindex: u32, addr_be: u32, from_be: u32) -> u32 {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    // A length (any below the MTU) so the MTU is not checked against this packet.
    params.__bindgen_anon_1.tot_len = 20;
    params.ifindex = ifindex;
    params.__bindgen_anon_4.ipv4_dst = addr_be;
    params.__bindgen_anon_3.ipv4_src = from_be;
    let ret = unsafe { fib_lookup(ctx.skb.skb as *mut _, &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, BPF_FIB_LOOKUP_SKIP_NEIGH) };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED => params.ifindex,
        _ => 0,
    }
}

/// Is the pod behind `ifindex` isolated in the direction `flag` (`EP_F_*`)?
#[inline(always)]
fn isolated(ifindex: u32, flag: u32) -> bool {
    let Some(pod) = (unsafe { pod_if4_v1.get(&ifindex) }) else { return false };
    unsafe { pol_ep4_v1.get(&pod.addr_be) }.is_some_and(|ep| ep.flags & flag != 0)
}
