//! Refusing a connection the way kube-proxy does, promptly: the packet is turned into its own
//! answer (TCP RST, or ICMP port unreachable for UDP and SCTP) and sent back out of the interface
//! it came in on, i.e. straight back to the pod.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{DropReason, IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    csum,
    parse::{Ipv4Packet, ETH_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const RST_LEN: usize = ETH_LEN + 20 + 20;
/// Largest quoted header: 60 bytes of IPv4 header with options plus 8 bytes of payload.
const QUOTE_MAX: usize = 68;
const ICMP_HDR_END: usize = ETH_LEN + 20 + 8;

/// Rewrites the packet into the refusal and redirects it. Returns the tc action.
///
/// A separate BPF subprogram, so its buffers do not add to the packet path's stack frame
/// (512-byte limit); it takes only the context (a subprogram gets at most five register
/// arguments) and parses the few fields it needs again: refusals are rare.
#[inline(never)]
pub fn reply(ctx: &TcContext) -> Result<i32, DropReason> {
    let p = match crate::parse::parse_ipv4(ctx)? {
        Some(p) => p,
        None => return Err(DropReason::Malformed),
    };
    let p = &p;
    if p.proto == IPPROTO_TCP {
        if p.tcp_flags & TCP_RST != 0 {
            // Never answer a reset with a reset.
            return Err(DropReason::RefusedReset);
        }
        tcp_rst(ctx, p)?;
    } else {
        icmp_unreachable(ctx, p)?;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(TC_ACT_REDIRECT)
}

#[inline(always)]
fn write_eth_ip(ctx: &TcContext, p: &Ipv4Packet, buf: &mut [u8], tot_len: u16, proto: u8) -> Result<(), DropReason> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DropReason::Malformed)?;
    buf[0..6].copy_from_slice(&macs[6..12]);
    buf[6..12].copy_from_slice(&macs[0..6]);
    buf[12] = 0x08;
    buf[13] = 0x00;
    let ip = &mut buf[ETH_LEN..ETH_LEN + 20];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&[0x40, 0]); // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&p.daddr_be.to_ne_bytes());
    ip[16..20].copy_from_slice(&p.saddr_be.to_ne_bytes());
    let c = csum::fold(csum::add(0, ip, 20));
    ip[10..12].copy_from_slice(&c);
    Ok(())
}

#[inline(always)]
fn tcp_rst(ctx: &TcContext, p: &Ipv4Packet) -> Result<(), DropReason> {
    let tcp: [u8; 16] = ctx.load(p.l4_off).map_err(|_| DropReason::Malformed)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let doff = ((tcp[12] >> 4) as usize) * 4;
    let payload = p.tot_len.saturating_sub(p.ihl + doff) as u32;
    let mut buf = [0u8; RST_LEN];
    write_eth_ip(ctx, p, &mut buf, 40, IPPROTO_TCP)?;
    let t = ETH_LEN + 20;
    buf[t..t + 2].copy_from_slice(&p.dport_be.to_ne_bytes());
    buf[t + 2..t + 4].copy_from_slice(&p.sport_be.to_ne_bytes());
    // RFC 9293 3.10.7.1: answer an ACK with its ack number as our sequence; otherwise RST|ACK
    // acknowledging everything the segment occupied.
    if p.tcp_flags & TCP_ACK != 0 {
        buf[t + 4..t + 8].copy_from_slice(&ack.to_be_bytes());
        buf[t + 13] = TCP_RST;
    } else {
        let mut len = payload;
        if p.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        buf[t + 8..t + 12].copy_from_slice(&seq.wrapping_add(len).to_be_bytes());
        buf[t + 13] = TCP_RST | TCP_ACK;
    }
    buf[t + 12] = 5 << 4;
    // Pseudo-header: addresses, protocol, TCP length.
    let mut sum = csum::add(0, &buf[ETH_LEN + 12..ETH_LEN + 20], 8);
    sum += IPPROTO_TCP as u32 + 20;
    let c = csum::fold(csum::add(sum, &buf[t..t + 20], 20));
    buf[t + 16..t + 18].copy_from_slice(&c);
    resize(ctx, RST_LEN)?;
    ctx.store(0, &buf, 0).map_err(|_| DropReason::Rewrite)
}

#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, p: &Ipv4Packet) -> Result<(), DropReason> {
    // RFC 792/1812: quote the offending IP header (options included) and 8 bytes of its payload.
    // IHL*4 + 8 is a multiple of 4, so the quote is copied in 4-byte words: a loop with a constant
    // bound keeps every access provably inside the stack buffer (the verifier cannot follow a
    // variable-length bpf_skb_load_bytes into the buffer here).
    let quote = p.ihl + 8;
    if quote > QUOTE_MAX || quote > p.tot_len {
        return Err(DropReason::Malformed);
    }
    let mut buf = [0u8; ICMP_HDR_END + QUOTE_MAX];
    let mut i = 0;
    while i < QUOTE_MAX / 4 {
        if i * 4 >= quote {
            break;
        }
        let w: [u8; 4] = ctx.load(ETH_LEN + i * 4).map_err(|_| DropReason::Malformed)?;
        buf[ICMP_HDR_END + i * 4..ICMP_HDR_END + i * 4 + 4].copy_from_slice(&w);
        i += 1;
    }
    let total = ICMP_HDR_END + quote;
    write_eth_ip(ctx, p, &mut buf, (total - ETH_LEN) as u16, IPPROTO_ICMP)?;
    let h = ETH_LEN + 20;
    buf[h] = 3; // destination unreachable
    buf[h + 1] = 3; // port unreachable
    let c = csum::fold(csum::add(0, &buf[h..], 8 + quote));
    buf[h + 2..h + 4].copy_from_slice(&c);
    resize(ctx, total)?;
    let head: [u8; ICMP_HDR_END] = buf[..ICMP_HDR_END].try_into().unwrap_or([0; ICMP_HDR_END]);
    ctx.store(0, &head, 0).map_err(|_| DropReason::Rewrite)?;
    let mut i = 0;
    while i < QUOTE_MAX / 4 {
        if i * 4 >= quote {
            break;
        }
        let mut w = [0u8; 4];
        w.copy_from_slice(&buf[ICMP_HDR_END + i * 4..ICMP_HDR_END + i * 4 + 4]);
        ctx.store(ICMP_HDR_END + i * 4, &w, 0).map_err(|_| DropReason::Rewrite)?;
        i += 1;
    }
    Ok(())
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), DropReason> {
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret != 0 {
        return Err(DropReason::Rewrite);
    }
    Ok(())
}
