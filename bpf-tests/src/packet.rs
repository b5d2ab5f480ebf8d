//! Packet builders and checkers (etherparse): what goes in, and assertions on what comes out.
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
    let s = SlicedPacket::from_ethernet(pkt).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = s.net else { panic!("not IPv4") };
    let h = ip.header();
    let (sport, dport) = match s.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => (0, 0),
    };
    Tuple { src: h.source_addr(), sport, dst: h.destination_addr(), dport, proto: h.protocol().0 }
}

/// Asserts that the IPv4 header checksum and the TCP/UDP checksum of `pkt` are valid.
pub fn assert_checksums(pkt: &[u8]) {
    let ip = Ipv4HeaderSlice::from_slice(&pkt[14..]).expect("ipv4 header");
    let h = ip.to_header();
    assert_eq!(ip.header_checksum(), h.calc_header_checksum(), "IPv4 header checksum");
    let s = SlicedPacket::from_ethernet(pkt).unwrap();
    match s.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
        }
        _ => {}
    }
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
