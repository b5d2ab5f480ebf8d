//! Packet rewrites with incremental checksum updates (`bpf_l4_csum_replace` for the L4 checksum,
//! so the kernel's own checksum state, CHECKSUM_PARTIAL on veth, stays consistent; RFC 1624 in
//! software for the IPv4 header's), written with `bpf_skb_store_bytes`. Addresses and ports are
//! raw wire bytes throughout.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use dataplane_common::{stat, Ct4Entry, DropReason, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::{maps::fib_scratch, stats};

use crate::{
    csum::csum_replace4,
    parse::{l4_csum_off, read, Ipv4Packet, ETH_LEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// Replaces a 4-byte field at `off` and fixes the checksum at `check_off` (plain, no pseudo-header).
#[inline(always)]
pub fn store_u32_fix(ctx: &TcContext, off: usize, check_off: usize, from: u32, to: u32) -> Result<(), DropReason> {
    ctx.l3_csum_replace(check_off, from as u64, to as u64, 4).map_err(|_| DropReason::Rewrite)?;
    ctx.store(off, &to, 0).map_err(|_| DropReason::Rewrite)
}

/// Replaces a 2-byte field at `off` and fixes the checksum at `check_off`.
#[inline(always)]
pub fn store_u16_fix(ctx: &TcContext, off: usize, check_off: usize, from: u16, to: u16) -> Result<(), DropReason> {
    ctx.l3_csum_replace(check_off, from as u64, to as u64, 2).map_err(|_| DropReason::Rewrite)?;
    ctx.store(off, &to, 0).map_err(|_| DropReason::Rewrite)
}

#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 }
}

/// Rewrites the packet's addresses (and, on a packet that carries its L4 header, its ports) to
/// the tuple in `e`. Later fragments get the address rewrite only: they carry no L4 header, and
/// the first fragment's L4 checksum already accounts for the whole datagram.
///
/// The L4 checksum goes through the kernel's helper, which keeps the skb's checksum state
/// consistent (`skb->csum` under CHECKSUM_COMPLETE, the pseudo-header sum under
/// CHECKSUM_PARTIAL). The IPv4 checksum is updated in software (RFC 1624) and written with both
/// addresses in one store (bytes 10 to 19 of the header), the ports in another: an address
/// change and its IPv4 checksum change cancel out in any sum over the header, as a port change
/// and its L4 checksum change do, so this is what a store and a `bpf_l3_csum_replace` per field
/// did, in fewer helper calls.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Ipv4Packet, e: &Ct4Entry) -> Result<(), DropReason> {
    const _: () = assert!(IP_SADDR_OFF == IP_CHECK_OFF + 2 && IP_DADDR_OFF == IP_SADDR_OFF + 4);
    // Offset of the L4 checksum, 0 for none. Not an Option: LLVM may spill the undefined payload
    // of a None, and the verifier rejects reading an uninitialised register.
    let l4_check = match (p.frag_off, l4_csum_off(p.proto)) {
        (0, Some(o)) => p.l4_off + o,
        _ => 0,
    };
    let flags = l4_flags(p.proto);
    let addrs = [(p.saddr_be, e.nat_saddr_be), (p.daddr_be, e.nat_daddr_be)];
    if addrs.iter().any(|(from, to)| from != to) {
        let old: [u8; 2] = read(ctx, ETH_LEN + IP_CHECK_OFF).map_err(|_| DropReason::Rewrite)?;
        let mut check = u16::from_be_bytes(old);
        for (from, to) in addrs {
            if from == to {
                continue;
            }
            if l4_check != 0 {
                ctx.l4_csum_replace(l4_check, from as u64, to as u64, 4 | BPF_F_PSEUDO_HDR | flags).map_err(|_| DropReason::Rewrite)?;
            }
            check = csum_replace4(check, from, to);
        }
        let c = check.to_be_bytes();
        let (s, d) = (e.nat_saddr_be.to_ne_bytes(), e.nat_daddr_be.to_ne_bytes());
        let hdr: [u8; 10] = [c[0], c[1], s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]];
        ctx.store(ETH_LEN + IP_CHECK_OFF, &hdr, 0).map_err(|_| DropReason::Rewrite)?;
    }
    if p.frag_off != 0 || (p.sport_be == e.nat_sport_be && p.dport_be == e.nat_dport_be) {
        return Ok(());
    }
    if l4_check != 0 {
        for (from, to) in [(p.sport_be, e.nat_sport_be), (p.dport_be, e.nat_dport_be)] {
            if from != to {
                ctx.l4_csum_replace(l4_check, from as u64, to as u64, 2 | flags).map_err(|_| DropReason::Rewrite)?;
            }
        }
    }
    let (s, d) = (e.nat_sport_be.to_ne_bytes(), e.nat_dport_be.to_ne_bytes());
    ctx.store(p.l4_off, &[s[0], s[1], d[0], d[1]], 0).map_err(|_| DropReason::Rewrite)?;
    if p.proto == IPPROTO_SCTP {
        if p.more_frags {
            // The CRC covers the whole datagram, whose length a first fragment does not give.
            return Err(DropReason::SctpPortNat);
        }
        let old = (p.sport_be as u32) | ((p.dport_be as u32) << 16);
        let new = (e.nat_sport_be as u32) | ((e.nat_dport_be as u32) << 16);
        crate::sctp::patch_crc(ctx, p.l4_off, p.tot_len - p.ihl, old, new)?;
    }
    Ok(())
}

/// Where a translated packet goes next, found by `fib_prepare` before it was translated.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FibNext {
    pub ifindex: u32,
    /// `NEXT_MAC` (the next hop's MAC is known) or `NEXT_NEIGH` (let the kernel resolve it).
    pub kind: u32,
    /// The path MTU when the packet was too big for it.
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

const NEXT_MAC: u32 = 1;
const NEXT_NEIGH: u32 = 2;

/// `fib_prepare`: the next hop is in the scratch map.
pub const FIB_GO: u32 = 0;
/// `fib_prepare`: no forwarding answer (a local or unreachable destination): the stack decides.
pub const FIB_STACK: u32 = 1;
/// `fib_prepare`: larger than the path MTU, which the scratch map's `mtu` holds.
pub const FIB_TOO_BIG: u32 = 2;

/// Looks up where the packet goes once its addresses are `saddr_be -> daddr_be` (before they are
/// rewritten, so that a packet too big for the path can still be answered as its sender sent
/// it), and checks its size against the route's MTU. For a GSO/GRO super-packet that is the size
/// of one of its segments (IP and L4 headers plus `gso_size`), not of the super-packet, which
/// is segmented on the way out: passing the IP total length made every super-packet "too big".
/// The next hop is left in `fib_scratch` for [`fib_redirect`].
// A separate BPF subprogram taking only scalars besides the context: its frame (the 64-byte
// lookup parameters) is not added to the packet path's.
#[inline(never)]
pub fn fib_prepare(ctx: &TcContext, saddr_be: u32, daddr_be: u32) -> u32 {
    let Ok(hdr) = ctx.load::<[u8; 20]>(ETH_LEN) else { return FIB_STACK };
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as u32;
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let seg_len = if gso_size == 0 {
        tot_len
    } else {
        let l4_hdr = match hdr[9] {
            IPPROTO_TCP => ctx.load::<u8>(ETH_LEN + ihl + 12).map(|d| ((d >> 4) as u32) * 4).unwrap_or(20),
            IPPROTO_UDP => 8,
            _ => 0,
        };
        ihl as u32 + l4_hdr + gso_size
    };
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    params.l4_protocol = hdr[9];
    params.__bindgen_anon_1.tot_len = seg_len.min(0xffff) as u16;
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = saddr_be;
    params.__bindgen_anon_4.ipv4_dst = daddr_be;
    let ret = unsafe { fib_lookup(ctx.skb.skb as *mut _, &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    let Some(next) = fib_scratch.get_ptr_mut(0) else { return FIB_STACK };
    // SAFETY: per-CPU slot, used by this packet only.
    let next = unsafe { &mut *next };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            next.kind = NEXT_MAC;
            next.ifindex = params.ifindex;
            next.smac = params.smac;
            next.dmac = params.dmac;
            FIB_GO
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            next.kind = NEXT_NEIGH;
            next.ifindex = params.ifindex;
            FIB_GO
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // The union's other half: the MTU that was exceeded.
            next.mtu = unsafe { params.__bindgen_anon_1.mtu_result } as u32;
            FIB_TOO_BIG
        }
        _ => FIB_STACK,
    }
}

/// Sends the (now translated) packet to the next hop `fib_prepare` found: with the next hop's
/// MAC, or through the kernel's neighbour resolution when it is not known yet. Needed when the
/// new source is an address of this node: the input path would drop it as a martian.
// A separate BPF subprogram: its stack frame is not added to its siblings' (512-byte limit).
#[inline(never)]
pub fn fib_redirect(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(next) = fib_scratch.get(0).copied() else { return Ok(TC_ACT_OK) };
    stats::count(stat::FIB_REDIRECT);
    if next.kind == NEXT_NEIGH {
        return Ok(unsafe { bpf_redirect_neigh(next.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    ctx.store(0, &next.dmac, 0).map_err(|_| DropReason::Rewrite)?;
    ctx.store(6, &next.smac, 0).map_err(|_| DropReason::Rewrite)?;
    Ok(unsafe { bpf_redirect(next.ifindex, 0) } as i32)
}

/// The path MTU `fib_prepare` found exceeded.
#[inline(always)]
pub fn fib_mtu() -> u32 {
    fib_scratch.get(0).map(|n| n.mtu).unwrap_or(0)
}
