//! Answers Ferry builds itself, turning the packet into its own answer and sending it back out of
//! the interface it came in on (straight back to a pod, or towards the outside sender):
//! - refusing a connection the way kube-proxy does, promptly: TCP RST, or ICMP port unreachable
//!   for UDP and SCTP;
//! - ICMP fragmentation needed (RFC 1191) for a packet larger than the path MTU after
//!   translation, so its sender's path MTU discovery works.
//! Both carry `MARK_FERRY_REPLY`, so the to-pod hook lets them into an isolated client: they
//! answer the client's own packet.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{stat, DropReason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MARK_FERRY_REPLY};

use crate::{
    csum,
    parse::{Ipv4Packet, ETH_LEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
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
/// `reply` as a global BPF function (verified once; callers see a scalar): the tc action, or
/// `lb::DROP_CODE | reason`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_refuse(skb: *mut aya_ebpf::bindings::__sk_buff) -> u32 {
    match reply(&TcContext::new(skb)) {
        Ok(a) => a as u32,
        Err(r) => crate::lb::DROP_CODE | r as u32,
    }
}

/// May the node send one more refusal now? A token bucket of `NodeConfig::refusals_per_s`
/// refusals a second, `refusal_burst` deep (the kernel's icmp_msgs_per_sec and icmp_msgs_burst
/// defaults when 0), shared by every CPU. Updates race between CPUs without a lock: a few
/// refusals more or fewer than the rate at worst, never a flood.
#[inline(always)]
pub fn refusal_allowed() -> bool {
    let (mut rate, mut burst) = match crate::maps::cfg4_v4.get(0) {
        Some(c) => (c.refusals_per_s as u64, c.refusal_burst as u64),
        None => (0, 0),
    };
    if rate == dataplane_common::REFUSALS_UNLIMITED as u64 {
        return true;
    }
    if rate == 0 {
        rate = dataplane_common::REFUSALS_PER_S_DEFAULT as u64;
    }
    // Bounded so that the products below fit in 64 bits.
    rate = rate.min(10_000_000);
    if burst == 0 {
        burst = dataplane_common::REFUSAL_BURST_DEFAULT as u64;
    }
    let Some(b) = crate::maps::refusal_bucket.get_ptr_mut(0) else { return true };
    let now = crate::conntrack::now();
    // SAFETY: pointer from a successful lookup.
    let (tokens, last) = unsafe { ((*b)[0], (*b)[1]) };
    let cap = burst * 1000;
    // Thousandths of a token earned since the last refill (a full bucket the first time).
    let earned = if last == 0 { cap } else { now.saturating_sub(last).min(100_000_000_000) * rate / 1_000_000 };
    let mut t = tokens + earned;
    if t > cap {
        t = cap;
    }
    let allowed = t >= 1000;
    if allowed {
        t -= 1000;
    }
    unsafe {
        (*b)[0] = t;
        (*b)[1] = now;
    }
    allowed
}

/// `frag_needed` as a global BPF function, as [`ferry_refuse`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ferry_frag_needed(skb: *mut aya_ebpf::bindings::__sk_buff, mtu: u32) -> u32 {
    match frag_needed(&TcContext::new(skb), mtu) {
        Ok(a) => a as u32,
        Err(r) => crate::lb::DROP_CODE | r as u32,
    }
}

#[inline(always)]
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
    Ok(send_back(ctx))
}

/// Marks the answer as Ferry's own and sends it out of the interface the packet came in on.
#[inline(always)]
fn send_back(ctx: &TcContext) -> i32 {
    unsafe {
        (*ctx.skb.skb).mark = MARK_FERRY_REPLY;
        bpf_redirect((*ctx.skb.skb).ifindex, 0);
    }
    TC_ACT_REDIRECT
}

/// Header and ICMP bytes the fragmentation-needed answer puts in front of the quoted packet.
const OUTER: usize = 20 + 8;
/// Bytes of the quoted packet's L4 header kept: TCP up to and including its checksum field
/// (see below), 8 for the rest (RFC 792's minimum, UDP's whole header).
const QUOTE_TCP: usize = 20;
const QUOTE_OTHER: usize = 8;
const BPF_ADJ_ROOM_NET: u32 = 0;
const BPF_F_RECOMPUTE_CSUM: u64 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// Turns the packet (untranslated, as its sender sent it) into ICMP fragmentation needed with
/// next-hop MTU `mtu`, from the address it was sent to, and sends it back. Returns the tc action.
///
/// Built in place, and robust to the packet's checksum offload state, which BPF cannot read or
/// reset: a packet from a local stack or merged by GRO is CHECKSUM_PARTIAL, and whoever transmits
/// it later writes the one's-complement sum of everything from the L4 header it started with at
/// that header's checksum offset. So the original L4 bytes stay where they are (the new headers
/// are inserted after the first 20 bytes of the IP header, which BPF_ADJ_ROOM_NET does), and the
/// quoted L4 checksum field is set to the one value that such a completion writes back
/// unchanged. Whether or not the completion happens, the bytes on the wire are the same.
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, mtu: u32) -> Result<i32, DropReason> {
    let p = match crate::parse::parse_ipv4(ctx)? {
        Some(p) => p,
        None => return Err(DropReason::Malformed),
    };
    // Ferry cannot fragment after translation, as the kernel would for a packet without DF.
    // Such a packet is answered too, if it carries its L4 header (an unfragmented one or a first
    // fragment): Linux lowers its path MTU on fragmentation needed whatever DF said, so the sender
    // fragments smaller from then on, where a drop alone would lose its large datagrams for good.
    // A later fragment carries nothing to quote: dropped and counted (its first fragment, too
    // big as well, was answered).
    let quote_l4 = if p.proto == IPPROTO_TCP { QUOTE_TCP } else { QUOTE_OTHER };
    if p.frag_off != 0 || p.ihl > 60 || p.tot_len < p.ihl + quote_l4 {
        return Err(DropReason::FragNeeded);
    }
    // The sender's IP header, before it moves.
    let base: [u8; 20] = ctx.load(ETH_LEN).map_err(|_| DropReason::Malformed)?;
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DropReason::Malformed)?;
    // Trim to the quote (this also ends GSO), then make room for the new headers. After that the
    // packet is [ETH][old IP base][28 zero bytes][old IP options][quoted L4], and the L4 bytes
    // are where they were.
    resize(ctx, ETH_LEN + p.ihl + quote_l4)?;
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, OUTER as i32, BPF_ADJ_ROOM_NET, 0) } != 0 {
        return Err(DropReason::Rewrite);
    }
    let q = ETH_LEN + OUTER; // the quoted IP header
    let l4 = q + p.ihl;
    ctx.store(q, &base, BPF_F_RECOMPUTE_CSUM).map_err(|_| DropReason::Rewrite)?;
    // The quoted L4 checksum field: V with V = ~(R + V) in one's complement, R the sum of the
    // other quoted L4 bytes, i.e. V = rotr1(~R). A CHECKSUM_PARTIAL completion computes exactly
    // ~(R + V) and stores it over V.
    let (ck, words): (usize, [u8; QUOTE_TCP]) = if p.proto == IPPROTO_TCP {
        (16, ctx.load(l4).map_err(|_| DropReason::Malformed)?)
    } else {
        let w: [u8; QUOTE_OTHER] = ctx.load(l4).map_err(|_| DropReason::Malformed)?;
        let mut all = [0u8; QUOTE_TCP];
        all[..QUOTE_OTHER].copy_from_slice(&w);
        (6, all)
    };
    if p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP {
        let mut r = 0u32;
        let mut i = 0;
        while i < QUOTE_TCP / 2 {
            if i * 2 != ck && i * 2 < quote_l4 {
                r += u16::from_be_bytes([words[i * 2], words[i * 2 + 1]]) as u32;
            }
            i += 1;
        }
        r = (r & 0xffff) + (r >> 16);
        r = (r & 0xffff) + (r >> 16);
        let v = (!(r as u16)).rotate_right(1);
        ctx.store(l4 + ck, &v.to_be_bytes(), BPF_F_RECOMPUTE_CSUM).map_err(|_| DropReason::Rewrite)?;
    }
    // The ICMP checksum covers its header and the whole quote, read back as it now stands (in
    // 4-byte words: IHL*4 and both quote lengths are multiples of 4, and a constant bound keeps
    // every access provably inside the buffer).
    let quote = p.ihl + quote_l4;
    let mut sum = ((ICMP_DEST_UNREACH as u32) << 8 | ICMP_FRAG_NEEDED as u32) + (mtu & 0xffff);
    let mut i = 0;
    while i < (60 + QUOTE_TCP) / 4 {
        if i * 4 >= quote {
            break;
        }
        let w: [u8; 4] = ctx.load(q + i * 4).map_err(|_| DropReason::Malformed)?;
        sum += u16::from_be_bytes([w[0], w[1]]) as u32 + u16::from_be_bytes([w[2], w[3]]) as u32;
        i += 1;
    }
    let mut icmp = [0u8; 8];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[6..8].copy_from_slice(&(mtu as u16).to_be_bytes());
    let c = csum::fold(sum);
    icmp[2..4].copy_from_slice(&c);
    // The new IP header, from the address the packet was sent to, back to its sender.
    let mut head = [0u8; ETH_LEN + 20];
    head[0..6].copy_from_slice(&macs[6..12]);
    head[6..12].copy_from_slice(&macs[0..6]);
    head[12] = 0x08;
    let ip = &mut head[ETH_LEN..];
    ip[0] = 0x45;
    ip[1] = base[1];
    ip[2..4].copy_from_slice(&((20 + 8 + quote) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = IPPROTO_ICMP;
    ip[12..16].copy_from_slice(&base[16..20]);
    ip[16..20].copy_from_slice(&base[12..16]);
    let c = csum::fold(csum::add(0, ip, 20));
    ip[10..12].copy_from_slice(&c);
    ctx.store(0, &head, BPF_F_RECOMPUTE_CSUM).map_err(|_| DropReason::Rewrite)?;
    ctx.store(ETH_LEN + 20, &icmp, BPF_F_RECOMPUTE_CSUM).map_err(|_| DropReason::Rewrite)?;
    stats::count(stat::ICMP_FRAG_NEEDED);
    Ok(send_back(ctx))
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
