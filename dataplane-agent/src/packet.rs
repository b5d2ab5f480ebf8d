//! Packet builders and parsers (etherparse) for pushing flows through the programs with
//! `BPF_PROG_TEST_RUN`: used by `trace` and by the bpf-tests.
use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice, NetSlice, Ipv4HeaderSlice};

pub const MAC_POD: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const MAC_HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv4(src.0.octets(), dst.0.octets(), 64);
    let mut t = b.tcp(src.1, dst.1, 1000, 65535);
    if syn {
        t = t.syn();
    } else {
        t = t.ack(5000);
    }
    let mut v = Vec::new();
    t.write(&mut v, payload).unwrap();
    v
}

/// A TCP segment with the flags named in `flags` (`S` SYN, `A` ACK, `F` FIN, `R` RST, `P` PSH),
/// sequence number 1000.
pub fn tcp_flags(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: &str, payload: &[u8]) -> Vec<u8> {
    tcp_seq(src, dst, flags, 1000, payload)
}

/// As [`tcp_flags`], with sequence number `seq`.
pub fn tcp_seq(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: &str, seq: u32, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv4(src.0.octets(), dst.0.octets(), 64);
    let mut t = b.tcp(src.1, dst.1, seq, 65535);
    for f in flags.chars() {
        t = match f {
            'S' => t.syn(),
            'A' => t.ack(5000),
            'F' => t.fin(),
            'R' => t.rst(),
            'P' => t.psh(),
            other => panic!("tcp flag {other:?}: use S, A, F, R or P"),
        };
    }
    let mut v = Vec::new();
    t.write(&mut v, payload).unwrap();
    v
}

pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv4(src.0.octets(), dst.0.octets(), 64).udp(src.1, dst.1);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

/// The 5-tuple of an Ethernet/IPv4 packet (ports 0 when there are none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
}

pub fn tuple(pkt: &[u8]) -> Tuple {
    try_tuple(pkt).expect("an IPv4 packet")
}

pub fn try_tuple(pkt: &[u8]) -> Option<Tuple> {
    let s = SlicedPacket::from_ethernet(pkt).ok()?;
    let Some(NetSlice::Ipv4(ip)) = s.net else { return None };
    let h = ip.header();
    let (sport, dport) = match s.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => {
            // SCTP (and anything else with ports first): read them raw.
            let l4 = &pkt[14 + h.slice().len()..];
            if h.protocol().0 == IPPROTO_SCTP && l4.len() >= 4 {
                (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
            } else {
                (0, 0)
            }
        }
    };
    Some(Tuple { src: h.source_addr(), sport, dst: h.destination_addr(), dport, proto: h.protocol().0 })
}

/// Checks the IPv4 header checksum and the TCP/UDP/SCTP checksum of `pkt`; names the bad one.
pub fn check_checksums(pkt: &[u8]) -> Result<(), String> {
    let ip = Ipv4HeaderSlice::from_slice(pkt.get(14..).ok_or("short")?).map_err(|e| e.to_string())?;
    let h = ip.to_header();
    if ip.header_checksum() != h.calc_header_checksum() {
        return Err("bad IPv4 header checksum".into());
    }
    let l4 = &pkt[14 + ip.slice().len()..];
    let s = SlicedPacket::from_ethernet(pkt).map_err(|e| e.to_string())?;
    match s.transport {
        Some(TransportSlice::Tcp(t)) => {
            if t.checksum() != t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap() {
                return Err("bad TCP checksum".into());
            }
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 && u.checksum() != u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap() {
                return Err("bad UDP checksum".into());
            }
        }
        _ if h.protocol.0 == IPPROTO_SCTP && l4.len() >= 12 => {
            let mut z = l4.to_vec();
            z[8..12].copy_from_slice(&[0; 4]);
            if crc32c(&z).to_le_bytes() != l4[8..12] {
                return Err("bad SCTP CRC32c".into());
            }
        }
        _ => {}
    }
    Ok(())
}

/// Asserts [`check_checksums`].
pub fn assert_checksums(pkt: &[u8]) {
    if let Err(e) = check_checksums(pkt) {
        panic!("{e}");
    }
}

const IPPROTO_SCTP: u8 = 132;

/// CRC32c (Castagnoli), as SCTP uses it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP INIT (common header plus a minimal INIT chunk) with a valid CRC32c.
pub fn sctp_init(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    l4.extend_from_slice(&0u32.to_be_bytes()); // verification tag 0 on INIT
    l4.extend_from_slice(&[0; 4]); // checksum
    // INIT chunk: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
    l4.extend_from_slice(&[1, 0, 0, 20]);
    l4.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    l4.extend_from_slice(&65535u32.to_be_bytes());
    l4.extend_from_slice(&[0, 1, 0, 1]);
    l4.extend_from_slice(&1u32.to_be_bytes());
    let c = crc32c(&l4);
    l4[8..12].copy_from_slice(&c.to_le_bytes());
    raw_ipv4(src.0, dst.0, IPPROTO_SCTP, &l4)
}

/// The Internet checksum (RFC 1071) of `data`, as ICMP carries it.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + a 20-byte IPv4 header (valid checksum) + `l4` as given.
pub fn raw_ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, &[], l4, None)
}

/// Ethernet + an IPv4 header with `options` (a multiple of 4 bytes, at most 40) and, with
/// `frag = Some((more_fragments, offset_in_8_byte_units, id))`, fragment fields; then `l4`.
pub fn ipv4_with(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: &[u8], l4: &[u8], frag: Option<(bool, u16, u16)>) -> Vec<u8> {
    let mut h = etherparse::Ipv4Header::new(l4.len() as u16, 64, etherparse::IpNumber(proto), src.octets(), dst.octets()).unwrap();
    h.options = options.try_into().expect("options: a multiple of 4 bytes, at most 40");
    h.set_payload_len(l4.len()).unwrap();
    if let Some((more, offset, id)) = frag {
        h.more_fragments = more;
        h.fragment_offset = etherparse::IpFragOffset::try_new(offset).unwrap();
        h.identification = id;
        h.dont_fragment = false;
    }
    h.header_checksum = h.calc_header_checksum();
    let mut v = Vec::new();
    v.extend_from_slice(&MAC_POD);
    v.extend_from_slice(&MAC_HOST);
    v.extend_from_slice(&[0x08, 0x00]);
    h.write(&mut v).unwrap();
    v.extend_from_slice(l4);
    v
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// What a refusal looks like: a TCP RST, or an ICMP destination-unreachable quoting the packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    TcpRst { to: Ipv4Addr, from: Ipv4Addr, dport: u16, sport: u16 },
    IcmpUnreachable { to: Ipv4Addr, from: Ipv4Addr, code: u8, quoted: Tuple },
}

pub fn refusal(pkt: &[u8]) -> Option<Refusal> {
    let s = SlicedPacket::from_ethernet(pkt).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &s.net else { return None };
    let h = ip.header();
    match s.transport {
        Some(TransportSlice::Tcp(t)) if t.rst() => {
            Some(Refusal::TcpRst { to: h.destination_addr(), from: h.source_addr(), dport: t.destination_port(), sport: t.source_port() })
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let p = i.payload();
            if i.type_u8() != 3 || p.len() < 28 {
                return None;
            }
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if p.len() < ihl + 4 {
                return None;
            }
            let q = p;
            let quoted = Tuple {
                src: Ipv4Addr::new(q[12], q[13], q[14], q[15]),
                dst: Ipv4Addr::new(q[16], q[17], q[18], q[19]),
                sport: u16::from_be_bytes([q[ihl], q[ihl + 1]]),
                dport: u16::from_be_bytes([q[ihl + 2], q[ihl + 3]]),
                proto: q[9],
            };
            Some(Refusal::IcmpUnreachable { to: h.destination_addr(), from: h.source_addr(), code: i.code_u8(), quoted })
        }
        _ => None,
    }
}
