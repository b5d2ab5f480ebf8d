//! Packet rewrites with incremental checksum updates (`bpf_l3_csum_replace` and
//! `bpf_l4_csum_replace`), so the kernel's own checksum state (CHECKSUM_PARTIAL on veth) stays
//! consistent. Addresses and ports are raw wire bytes throughout.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use dataplane_common::{stat, Ct4Entry, DropReason, IPPROTO_SCTP, IPPROTO_UDP};

use crate::stats;

use crate::parse::{l4_csum_off, Ipv4Packet, ETH_LEN, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

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
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Ipv4Packet, e: &Ct4Entry) -> Result<(), DropReason> {
    let ip_check = ETH_LEN + IP_CHECK_OFF;
    // Offset of the L4 checksum, 0 for none. Not an Option: LLVM may spill the undefined payload
    // of a None, and the verifier rejects reading an uninitialised register.
    let l4_check = match (p.frag_off, l4_csum_off(p.proto)) {
        (0, Some(o)) => p.l4_off + o,
        _ => 0,
    };
    let flags = l4_flags(p.proto);
    if e.nat_saddr_be != p.saddr_be {
        if l4_check != 0 {
            ctx.l4_csum_replace(l4_check, p.saddr_be as u64, e.nat_saddr_be as u64, 4 | BPF_F_PSEUDO_HDR | flags)
                .map_err(|_| DropReason::Rewrite)?;
        }
        store_u32_fix(ctx, ETH_LEN + IP_SADDR_OFF, ip_check, p.saddr_be, e.nat_saddr_be)?;
    }
    if e.nat_daddr_be != p.daddr_be {
        if l4_check != 0 {
            ctx.l4_csum_replace(l4_check, p.daddr_be as u64, e.nat_daddr_be as u64, 4 | BPF_F_PSEUDO_HDR | flags)
                .map_err(|_| DropReason::Rewrite)?;
        }
        store_u32_fix(ctx, ETH_LEN + IP_DADDR_OFF, ip_check, p.daddr_be, e.nat_daddr_be)?;
    }
    if p.frag_off != 0 {
        return Ok(());
    }
    let mut ports_changed = false;
    for (off, from, to) in [(0usize, p.sport_be, e.nat_sport_be), (2usize, p.dport_be, e.nat_dport_be)] {
        if from == to {
            continue;
        }
        ports_changed = true;
        if l4_check != 0 {
            ctx.l4_csum_replace(l4_check, from as u64, to as u64, 2 | flags).map_err(|_| DropReason::Rewrite)?;
        }
        ctx.store(p.l4_off + off, &to, 0).map_err(|_| DropReason::Rewrite)?;
    }
    if ports_changed && p.proto == IPPROTO_SCTP {
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

/// Sends the (already translated) packet out of the interface the FIB picks for its destination,
/// with the next hop's MAC (or the kernel's neighbour resolution when it is not known yet).
/// Needed when the new source is an address of this node: the input path would drop it as a
/// martian. Falls back to the stack (TC_ACT_OK) when the FIB has no answer.
// A separate BPF subprogram: its stack frame is not added to its siblings' (512-byte limit).
#[inline(never)]
pub fn fib_redirect(ctx: &TcContext) -> Result<i32, DropReason> {
    let hdr: [u8; 20] = ctx.load(ETH_LEN).map_err(|_| DropReason::Malformed)?;
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    params.l4_protocol = hdr[9];
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let ret = unsafe { fib_lookup(ctx.skb.skb as *mut _, &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        ctx.store(0, &params.dmac, 0).map_err(|_| DropReason::Rewrite)?;
        ctx.store(6, &params.smac, 0).map_err(|_| DropReason::Rewrite)?;
        stats::count(stat::FIB_REDIRECT);
        return Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32);
    }
    if ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        stats::count(stat::FIB_REDIRECT);
        return Ok(unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(TC_ACT_OK)
}
