//! Packet parsing: Ethernet, IPv4 (options and fragments included) and the L4 ports. Every read
//! is a bounds-checked direct read ([`at`], [`read`]) of the headers [`pull_headers`] made
//! linear, so a short packet is an error, never an out-of-bounds read, and no read is a helper
//! call.
use aya_ebpf::programs::TcContext;
use dataplane_common::{DropReason, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

// Offsets inside the IPv4 header.
pub const IP_CHECK_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;

/// What the datapath needs of an IPv4 packet. Addresses and ports are raw wire bytes (`_be`).
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    /// Offset of the L4 header (14 + IHL*4).
    pub l4_off: usize,
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    pub id_be: u16,
    pub more_frags: bool,
    /// Fragment offset in 8-byte units; non-zero for a later fragment.
    pub frag_off: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// Ports for TCP, UDP and SCTP; 0 for a later fragment until looked up, and for other protocols.
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// TCP: the sequence number that follows this segment (sequence number plus payload, SYN and
    /// FIN), host order; 0 for other protocols.
    pub tcp_next: u32,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Makes the headers of the packet in `ctx` direct-readable where they are not: a driver may
/// leave them in a page fragment (what a socket or GRO builds has them in the linear part, and
/// is left alone). Pulls only as far as the reads go: Ethernet and the IPv4 header (or an ARP
/// packet's sender address), then the L4 ports, and for TCP its flags; a pull copies, so none
/// happens for a packet already readable. Once per packet, before anything reads it (packet
/// pointers taken before are invalid after).
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    // Ethernet + a minimal IPv4 header, which also covers an ARP packet's sender address.
    let base = ETH_LEN + 20;
    if !pulled(ctx, base) {
        return;
    }
    let Ok(eth) = at::<[u8; 2]>(ctx, 12) else { return };
    if u16::from_be_bytes([eth[0], eth[1]]) != ETH_P_IP {
        return;
    }
    let Ok(ip) = at::<[u8; 10]>(ctx, ETH_LEN) else { return };
    let l4_off = ETH_LEN + ((ip[0] & 0x0f) as usize) * 4;
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & IP_OFFSET != 0;
    let want = match ip[9] {
        _ if later_fragment => ETH_LEN + 20,
        // Ports, sequence number, acknowledgment, data offset and flags.
        IPPROTO_TCP => l4_off + 14,
        IPPROTO_UDP | IPPROTO_SCTP => l4_off + 4,
        _ => l4_off,
    };
    pulled(ctx, want);
}

/// Is the frame's linear part `want` bytes long (or the whole frame, when shorter), after
/// pulling them in if it was not? A failed pull (out of memory) leaves the packet as it is:
/// the reads then find it short.
#[inline(always)]
fn pulled(ctx: &TcContext, want: usize) -> bool {
    let want = if (ctx.len() as usize) < want { ctx.len() as usize } else { want };
    ctx.data() + want <= ctx.data_end() || ctx.pull_data(want as u32).is_ok()
}

/// The `T` at `off` bytes into the frame, in place in the packet (no helper call, no copy),
/// bounds checked: `Malformed` past the linear part, which [`pull_headers`] made cover every
/// header a parse reads. `T` is a byte array (integers: [`read`]). Read only: a direct write
/// would make the verifier unclone every cloned skb (every TCP segment a socket sends) before
/// the program runs, rewritten or not; writes go through `bpf_skb_store_bytes`, which makes
/// writable only what it writes, only in packets that are rewritten (as Cilium does).
#[inline(always)]
pub fn at<T>(ctx: &TcContext, off: usize) -> Result<&T, DropReason> {
    // SAFETY: inside the packet (bounded); byte arrays have no alignment.
    bounded::<T>(ctx.data(), ctx.data_end(), off).map(|p| unsafe { &*p }).ok_or(DropReason::Malformed)
}

/// A `T` at `off` bytes into the packet `[data, data_end)`, or `None` past its end: the bounds
/// check of every direct packet access, tc's and XDP's (the verifier checks it too).
#[inline(always)]
pub fn bounded<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// [`at`], copied out: for an integer read as wire bytes.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, DropReason> {
    // SAFETY: a pointer into the packet, read unaligned.
    at::<T>(ctx, off).map(|r| unsafe { core::ptr::read_unaligned(r as *const T) })
}

/// Returns `Ok(None)` for a non-IPv4 frame (passed untouched), the parsed packet otherwise.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Result<Option<Ipv4Packet>, DropReason> {
    let eth = at::<[u8; 2]>(ctx, 12)?;
    let eth_proto = u16::from_be_bytes([eth[0], eth[1]]);
    if eth_proto != ETH_P_IP {
        return Ok(None);
    }
    let hdr = at::<[u8; 20]>(ctx, ETH_LEN)?;
    if hdr[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < 20 || tot_len < ihl || (ctx.len() as usize) < ETH_LEN + tot_len {
        return Err(DropReason::Malformed);
    }
    let frags = u16::from_be_bytes([hdr[6], hdr[7]]);
    let mut p = Ipv4Packet {
        l4_off: ETH_LEN + ihl,
        ihl,
        tot_len,
        proto: hdr[9],
        id_be: u16::from_ne_bytes([hdr[4], hdr[5]]),
        more_frags: frags & IP_MF != 0,
        frag_off: frags & IP_OFFSET,
        saddr_be: u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]),
        daddr_be: u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]),
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        tcp_next: 0,
    };
    if p.frag_off != 0 {
        // A later fragment has no L4 header; the caller finds its ports in the fragment map.
        return Ok(Some(p));
    }
    let l4_len = tot_len - ihl;
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let min = match p.proto {
                IPPROTO_TCP => 20,
                IPPROTO_UDP => 8,
                _ => 12,
            };
            // A first fragment may legitimately be shorter than a full TCP header only in
            // pathological (attack) cases; refuse those rather than translate half a header.
            if l4_len < min {
                return Err(DropReason::Malformed);
            }
            let ports = at::<[u8; 4]>(ctx, p.l4_off)?;
            p.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
            p.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
            if p.proto == IPPROTO_TCP {
                // Sequence number, acknowledgment, data offset, flags.
                let h = at::<[u8; 10]>(ctx, p.l4_off + 4)?;
                p.tcp_flags = h[9];
                let doff = ((h[8] >> 4) as usize) * 4;
                p.tcp_next = tcp_next(u32::from_be_bytes([h[0], h[1], h[2], h[3]]), l4_len.saturating_sub(doff), p.tcp_flags);
            }
        }
        IPPROTO_ICMP => {
            if l4_len < 8 {
                return Err(DropReason::Malformed);
            }
        }
        _ => {}
    }
    Ok(Some(p))
}

/// The sequence number after a TCP segment starting at `seq` with `payload` bytes (SYN and FIN
/// count one each).
#[inline(always)]
pub fn tcp_next(seq: u32, payload: usize, flags: u8) -> u32 {
    seq.wrapping_add(payload as u32).wrapping_add((flags & TCP_SYN != 0) as u32).wrapping_add((flags & TCP_FIN != 0) as u32)
}

/// Offset of the L4 checksum field inside the L4 header, for protocols whose checksum covers the
/// IPv4 pseudo-header. SCTP's CRC32c does not, so address rewrites leave it valid.
#[inline(always)]
pub fn l4_csum_off(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}
