//! ClusterIP translation through BPF_PROG_TEST_RUN on the real programs: exact output bytes,
//! conntrack contents, counters. Maps are provisioned through the agent's own translation and
//! reconciler (`Datapath::apply_yaml`).
use std::net::Ipv4Addr;

use bpf_tests::{fixture::*, packet::*};
use dataplane_common::{stat, Ct4Entry, Ct4Key, DropReason, CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REPLY};
use etherparse::PacketBuilder;

/// One Service at `vip:port/proto` -> `endpoints` on `target`.
fn svc(vip: &str, port: u16, proto: &str, target: u16, endpoints: &[&str]) -> String {
    let eps: String = endpoints.iter().map(|e| format!("- addresses: [{e}]\n")).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: s-{port}-{proto}, namespace: t}}
spec:
  clusterIP: {vip}
  ports: [{{name: p, port: {port}, protocol: {proto}, targetPort: {target}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-{port}-{proto}-1, namespace: t, labels: {{kubernetes.io/service-name: s-{port}-{proto}}}}}
addressType: IPv4
ports: [{{name: p, port: {target}, protocol: {proto}}}]
endpoints:{}"#,
        if eps.is_empty() { " []\n".to_string() } else { format!("\n{eps}") }
    )
}

const CLIENT: &str = "10.0.0.2";
const VIP: &str = "172.30.0.10";

fn web(endpoints: &[&str]) -> Datapath {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 80, "TCP", 8080, endpoints));
    dp
}

fn conntrack(dp: &Datapath) -> Vec<(Ct4Key, Ct4Entry)> {
    dp.maps.ct.rows().into_iter().map(|r| (r.key, r.entry)).collect()
}

#[test]
fn syn_to_clusterip_is_translated_to_exact_bytes() {
    let dp = web(&["10.0.1.5"]);
    let r = dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b""));
    assert_eq!(r.action, TC_ACT_OK);
    // Everything but destination address, port and the checksums is as it was.
    assert_eq!(r.data, tcp((ip(CLIENT), 40000), (ip("10.0.1.5"), 8080), true, b""));
    assert_eq!(dp.stat(stat::CT_NEW), 1);
}

#[test]
fn data_packets_and_replies_are_translated_both_ways() {
    let dp = web(&["10.0.1.5"]);
    dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b""));
    let r = dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), false, b"GET / HTTP/1.1\r\n\r\n"));
    assert_eq!(r.data, tcp((ip(CLIENT), 40000), (ip("10.0.1.5"), 8080), false, b"GET / HTTP/1.1\r\n\r\n"));
    // The reply arrives at the client's veth (backend on another node): source back to the VIP.
    let r = dp.to_pod(&tcp((ip("10.0.1.5"), 8080), (ip(CLIENT), 40000), false, b"HTTP/1.1 200 OK\r\n\r\n"));
    assert_eq!(r.action, TC_ACT_OK);
    assert_eq!(r.data, tcp((ip(VIP), 80), (ip(CLIENT), 40000), false, b"HTTP/1.1 200 OK\r\n\r\n"));
    assert_eq!(dp.stat(stat::CT_FORWARD), 1);
    assert_eq!(dp.stat(stat::CT_REPLY), 1);
}

#[test]
fn per_service_counters_count_packets_and_ip_bytes_both_ways() {
    let mut dp = Datapath::new();
    let both = format!("{}\n---\n{}", svc(VIP, 80, "TCP", 8080, &["10.0.1.5"]), svc("172.30.0.11", 53, "UDP", 5353, &["10.0.1.6"]));
    dp.apply_yaml(&both);
    let frontend = |dp: &Datapath, vip: &str| {
        let (_, s) = dp.maps.services.iter().flatten().find(|(k, _)| k.addr_be == u32::from_ne_bytes(ip(vip).octets()) && k.port_be != 0).unwrap();
        s.svc_id
    };
    let (web_id, dns_id) = (frontend(&dp, VIP), frontend(&dp, "172.30.0.11"));
    assert_eq!(dp.maps.service_name(web_id).as_deref(), Some("t/s-80-TCP:p"));
    let syn = tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b"");
    let data = tcp((ip(CLIENT), 40000), (ip(VIP), 80), false, b"GET / HTTP/1.1\r\n\r\n");
    let reply = tcp((ip("10.0.1.5"), 8080), (ip(CLIENT), 40000), false, b"HTTP/1.1 200 OK\r\n\r\n");
    // The sync writes no counters: a frontend's first packet makes them.
    assert_eq!(dp.maps.svc_stats.keys().count(), 0);
    dp.from_pod(&syn);
    dp.from_pod(&data);
    dp.to_pod(&reply);
    let ip_len = |frame: &[u8]| (frame.len() - 14) as u64;
    let c = dp.maps.service_counters(web_id);
    assert_eq!((c.packets, c.bytes), (3, ip_len(&syn) + ip_len(&data) + ip_len(&reply)));
    // Another Service's counters are its own; traffic no Service owns counts nowhere.
    assert_eq!(dp.maps.service_counters(dns_id).packets, 0);
    dp.from_pod(&udp((ip(CLIENT), 5000), (ip("172.30.0.11"), 53), b"q"));
    dp.from_pod(&tcp((ip(CLIENT), 40001), (ip("10.0.9.9"), 80), true, b""));
    assert_eq!(dp.maps.service_counters(dns_id).packets, 1);
    assert_eq!(dp.maps.service_counters(web_id).packets, 3);
    // The start's sweep keeps the counters of the frontends it is given and drops the others';
    // the first packet after it makes them again (dns still has its name).
    assert_eq!(dp.maps.sweep_counters(|id| id == web_id), 1);
    assert!(dp.maps.svc_stats.get(&dns_id, 0).is_err());
    assert_eq!(dp.maps.service_counters(web_id).packets, 3);
    dp.from_pod(&udp((ip(CLIENT), 5000), (ip("172.30.0.11"), 53), b"q"));
    assert_eq!(dp.maps.service_counters(dns_id).packets, 1);
    // A removed Service takes its counters and name with it; the other keeps counting.
    dp.apply_yaml(&svc(VIP, 80, "TCP", 8080, &["10.0.1.5"]));
    assert_eq!(dp.maps.service_name(dns_id), None);
    assert!(dp.maps.svc_stats.get(&dns_id, 0).is_err());
    assert_eq!(dp.maps.service_counters(web_id).packets, 3);
    // A frontend without a name (the agent removes it first) gets no counters from its
    // connections' packets: web's taken out by hand, then a packet of its connection.
    dp.maps.svc_names.remove(&web_id).unwrap();
    dp.maps.svc_stats.remove(&web_id).unwrap();
    dp.from_pod(&data);
    assert!(dp.maps.svc_stats.get(&web_id, 0).is_err());
    assert_eq!(dp.maps.svc_stats.keys().count(), 0);
}

#[test]
fn conntrack_holds_both_directions_and_pins_the_backend() {
    let dp = web(&["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]);
    let first = tuple(&dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b"")).data);
    for _ in 0..30 {
        let t = tuple(&dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), false, b"x")).data);
        assert_eq!(t.dst, first.dst);
    }
    let ct = conntrack(&dp);
    assert_eq!(ct.len(), 2);
    let be = u32::from_ne_bytes(first.dst.octets());
    let fwd = ct.iter().find(|(_, e)| e.flags & CT_F_FORWARD != 0).unwrap();
    let rev = ct.iter().find(|(_, e)| e.flags & CT_F_REPLY != 0).unwrap();
    assert_eq!((fwd.0.daddr_be, fwd.1.nat_daddr_be, u16::from_be(fwd.1.nat_dport_be)), (u32::from_ne_bytes(ip(VIP).octets()), be, 8080));
    assert_eq!((rev.0.saddr_be, u16::from_be(rev.0.sport_be), rev.1.nat_saddr_be, u16::from_be(rev.1.nat_sport_be)), (be, 8080, u32::from_ne_bytes(ip(VIP).octets()), 80));
    assert_eq!(fwd.1.backend_id, rev.1.backend_id);
}

#[test]
fn connections_spread_over_every_endpoint() {
    let dp = web(&["10.0.1.1", "10.0.1.2", "10.0.1.3"]);
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..200u16 {
        seen.insert(tuple(&dp.from_pod(&tcp((ip(CLIENT), 30000 + port), (ip(VIP), 80), true, b"")).data).dst);
    }
    assert_eq!(seen, [ip("10.0.1.1"), ip("10.0.1.2"), ip("10.0.1.3")].into());
}

#[test]
fn udp_with_and_without_checksum() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 53, "UDP", 5353, &["10.0.1.5"]));
    let r = dp.from_pod(&udp((ip(CLIENT), 40000), (ip(VIP), 53), b"query"));
    assert_eq!(r.data, udp((ip(CLIENT), 40000), (ip("10.0.1.5"), 5353), b"query"));
    // A zero UDP checksum means "none" and must stay zero.
    let mut pkt = udp((ip(CLIENT), 40001), (ip(VIP), 53), b"query");
    pkt[40..42].copy_from_slice(&[0, 0]);
    let r = dp.from_pod(&pkt);
    assert_eq!(&r.data[40..42], &[0, 0]);
    assert_eq!(tuple(&r.data).dst, ip("10.0.1.5"));
    assert_checksums(&r.data);
}

#[test]
fn hairpin_reaches_itself_through_its_service() {
    let dp = web(&[CLIENT]);
    let r = dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b""));
    // Source becomes the Service address so the pod never sees a packet from itself.
    assert_eq!(r.data, tcp((ip(VIP), 40000), (ip(CLIENT), 8080), true, b""));
    // The pod answers the VIP; that comes back through its own veth and is translated back.
    let r = dp.from_pod(&tcp((ip(CLIENT), 8080), (ip(VIP), 40000), false, b"hi"));
    assert_eq!(r.data, tcp((ip(VIP), 80), (ip(CLIENT), 40000), false, b"hi"));
    assert!(conntrack(&dp).iter().all(|(_, e)| e.flags & CT_F_HAIRPIN != 0));
}

#[test]
fn no_endpoint_tcp_gets_an_exact_rst() {
    let dp = web(&[]);
    let r = dp.from_pod(&tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b""));
    assert_eq!(r.action, TC_ACT_REDIRECT);
    // RST|ACK acknowledging the SYN (seq 1000 + 1), from the Service, MACs swapped.
    let mut want = Vec::new();
    let mut ip_hdr = etherparse::Ipv4Header::new(20, 64, etherparse::IpNumber::TCP, ip(VIP).octets(), ip(CLIENT).octets()).unwrap();
    ip_hdr.dont_fragment = true;
    let mut tcp_hdr = etherparse::TcpHeader::new(80, 40000, 0, 0);
    tcp_hdr.rst = true;
    tcp_hdr.ack = true;
    tcp_hdr.acknowledgment_number = 1001;
    tcp_hdr.checksum = tcp_hdr.calc_checksum_ipv4(&ip_hdr, &[]).unwrap();
    ip_hdr.header_checksum = ip_hdr.calc_header_checksum();
    want.extend_from_slice(&MAC_POD);
    want.extend_from_slice(&MAC_HOST);
    want.extend_from_slice(&[8, 0]);
    ip_hdr.write(&mut want).unwrap();
    tcp_hdr.write(&mut want).unwrap();
    assert_eq!(r.data, want);
    // A non-SYN segment is answered with RST carrying its acknowledgment number as sequence.
    let r = dp.from_pod(&tcp((ip(CLIENT), 40001), (ip(VIP), 80), false, b"data"));
    match refusal(&r.data) {
        Some(Refusal::TcpRst { to, from, .. }) => assert_eq!((to, from), (ip(CLIENT), ip(VIP))),
        other => panic!("{other:?}"),
    }
    let t = etherparse::TcpHeaderSlice::from_slice(&r.data[34..]).unwrap();
    assert!(t.rst() && !t.ack());
    assert_eq!(t.sequence_number(), 5000);
    assert_checksums(&r.data);
    assert_eq!(dp.stat(stat::REJECT), 2);
}

fn icmp_checksum_ok(icmp: &[u8]) -> bool {
    let mut sum = 0u32;
    for c in icmp.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn no_endpoint_udp_gets_icmp_port_unreachable_quoting_the_packet() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 53, "UDP", 53, &[]));
    let pkt = udp((ip(CLIENT), 40000), (ip(VIP), 53), b"a dns query that is long enough");
    let r = dp.from_pod(&pkt);
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_eq!(r.data.len(), 14 + 20 + 8 + 28);
    assert_eq!(&r.data[34..36], &[3, 3], "destination unreachable, port unreachable");
    assert_eq!(&r.data[42..], &pkt[14..42], "quotes the IP header and 8 bytes of UDP");
    assert!(icmp_checksum_ok(&r.data[34..]));
    assert_checksums(&r.data);
    match refusal(&r.data) {
        Some(Refusal::IcmpUnreachable { to, from, code: 3, quoted }) => {
            assert_eq!((to, from, quoted.dst, quoted.dport), (ip(CLIENT), ip(VIP), ip(VIP), 53))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unexposed_port_is_refused_and_unallocated_address_dropped() {
    let mut dp = Datapath::new();
    dp.cidrs.insert("172.30.0.0/16".parse().unwrap());
    dp.apply_yaml(&svc(VIP, 80, "TCP", 8080, &["10.0.1.5"]));
    assert_eq!(dp.from_pod(&tcp((ip(CLIENT), 1), (ip(VIP), 81), true, b"")).action, TC_ACT_REDIRECT);
    assert_eq!(dp.from_pod(&udp((ip(CLIENT), 1), (ip(VIP), 80), b"x")).action, TC_ACT_REDIRECT);
    let pkt = tcp((ip(CLIENT), 1), (ip("172.30.9.9"), 80), true, b"");
    assert_eq!(dp.from_pod(&pkt).action, TC_ACT_SHOT);
    assert_eq!(dp.stat(DropReason::NoService.stat()), 1);
    // Outside the service CIDR: not ours, untouched.
    let pkt = tcp((ip(CLIENT), 1), (ip("172.31.9.9"), 80), true, b"");
    let r = dp.from_pod(&pkt);
    assert_eq!((r.action, &r.data), (TC_ACT_OK, &pkt));
}

#[test]
fn icmp_error_from_the_backend_is_translated_back() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 53, "UDP", 5353, &["10.0.1.5"]));
    let out = dp.from_pod(&udp((ip(CLIENT), 40000), (ip(VIP), 53), b"query")).data;
    // The backend's host says "port unreachable" about the translated datagram.
    let quoted = &out[14..14 + 28];
    let b = PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv4(ip("10.0.1.5").octets(), ip(CLIENT).octets(), 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
    );
    let mut icmp = Vec::new();
    b.write(&mut icmp, quoted).unwrap();
    let r = dp.to_pod(&icmp);
    assert_eq!(r.action, TC_ACT_OK);
    let outer = tuple(&r.data);
    assert_eq!((outer.src, outer.dst), (ip(VIP), ip(CLIENT)), "outer header from the Service");
    match refusal(&r.data) {
        Some(Refusal::IcmpUnreachable { quoted, .. }) => {
            assert_eq!((quoted.src, quoted.sport, quoted.dst, quoted.dport), (ip(CLIENT), 40000, ip(VIP), 53))
        }
        other => panic!("{other:?}"),
    }
    assert!(icmp_checksum_ok(&r.data[34..]), "ICMP checksum");
    assert_checksums(&r.data);
    let inner = etherparse::Ipv4HeaderSlice::from_slice(&r.data[42..]).unwrap();
    assert_eq!(inner.header_checksum(), inner.to_header().calc_header_checksum(), "quoted IP checksum");
    assert_eq!(dp.stat(stat::ICMP_RELATED), 1);
}

fn with_options(src: Ipv4Addr, dst: Ipv4Addr, proto: etherparse::IpNumber, options: &[u8], l4: &[u8], frag: Option<(bool, u16, u16)>) -> Vec<u8> {
    ipv4_with(src, dst, proto.0, options, l4, frag)
}

fn udp_l4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let full = udp(src, dst, payload);
    full[34..].to_vec()
}

#[test]
fn ip_options_are_kept_and_the_packet_translated() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 53, "UDP", 5353, &["10.0.1.5"]));
    for opts in [&[1u8, 1, 1, 1][..], &[1u8; 40][..], &[0x94, 4, 0, 0][..]] {
        let l4 = udp_l4((ip(CLIENT), 40000), (ip(VIP), 53), b"opt");
        let pkt = with_options(ip(CLIENT), ip(VIP), etherparse::IpNumber::UDP, opts, &l4, None);
        let r = dp.from_pod(&pkt);
        assert_eq!(r.action, TC_ACT_OK);
        let t = tuple(&r.data);
        assert_eq!((t.dst, t.dport), (ip("10.0.1.5"), 5353), "options {opts:?}");
        assert_eq!(&r.data[34..34 + opts.len()], opts, "options untouched");
        assert_checksums(&r.data);
    }
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut dp = Datapath::new();
    dp.cidrs.insert("172.30.0.0/16".parse().unwrap());
    dp.apply_yaml(&svc(VIP, 53, "UDP", 5353, &["10.0.1.5"]));
    // A 2000-byte datagram in two fragments; the UDP checksum covers both.
    let payload = vec![7u8; 2000];
    let l4 = udp_l4((ip(CLIENT), 40000), (ip(VIP), 53), &payload);
    let (first, rest) = l4.split_at(1480);
    let f1 = with_options(ip(CLIENT), ip(VIP), etherparse::IpNumber::UDP, &[], first, Some((true, 0, 77)));
    let f2 = with_options(ip(CLIENT), ip(VIP), etherparse::IpNumber::UDP, &[], rest, Some((false, 185, 77)));
    let r1 = dp.from_pod(&f1);
    let r2 = dp.from_pod(&f2);
    assert_eq!((r1.action, r2.action), (TC_ACT_OK, TC_ACT_OK));
    let h2 = etherparse::Ipv4HeaderSlice::from_slice(&r2.data[14..]).unwrap();
    assert_eq!(h2.destination_addr(), ip("10.0.1.5"));
    assert_eq!(h2.header_checksum(), h2.to_header().calc_header_checksum());
    assert_eq!(&r2.data[34..], rest, "a later fragment's payload is not touched");
    // Reassembled, the datagram is a valid UDP datagram to the backend.
    let mut whole = r1.data[34..].to_vec();
    whole.extend_from_slice(&r2.data[34..]);
    let re = udp((ip(CLIENT), 40000), (ip("10.0.1.5"), 5353), &payload);
    assert_eq!(whole, re[34..].to_vec());
    assert_eq!(dp.stat(stat::FRAGMENT), 1);
    // A later fragment whose first fragment was never seen cannot be translated: dropped when
    // it is for a Service, passed when it is not.
    let orphan = with_options(ip(CLIENT), ip(VIP), etherparse::IpNumber::UDP, &[], rest, Some((false, 185, 78)));
    assert_eq!(dp.from_pod(&orphan).action, TC_ACT_SHOT);
    assert_eq!(dp.stat(DropReason::FragUnknown.stat()), 1);
    let other = with_options(ip(CLIENT), ip("10.0.9.9"), etherparse::IpNumber::UDP, &[], rest, Some((false, 185, 79)));
    let r = dp.from_pod(&other);
    assert_eq!((r.action, &r.data), (TC_ACT_OK, &other));
}

#[test]
fn truncated_packets_never_crash_or_get_translated() {
    let dp = web(&["10.0.1.5"]);
    let full = tcp((ip(CLIENT), 40000), (ip(VIP), 80), true, b"payload");
    for len in 14..full.len() {
        let mut pkt = full[..len].to_vec();
        // Keep the IP total length claiming the full packet: the classic truncation.
        let Some(r) = dp.try_run(dataplane_common::progs::FROM_POD, &pkt) else { continue };
        assert_eq!(r.action, TC_ACT_SHOT, "prefix of {len} bytes");
        // And with a total length that matches the truncated packet.
        if len >= 34 {
            let tot = (len - 14) as u16;
            pkt[16..18].copy_from_slice(&tot.to_be_bytes());
            let r = dp.from_pod(&pkt);
            assert_ne!(r.action, TC_ACT_REDIRECT);
            if len < 54 {
                // Less than a whole TCP header: never half-translated.
                assert!(r.action == TC_ACT_SHOT || r.data == pkt, "{len} bytes: {r:?}");
            } else {
                // A whole header and a consistent length is just a shorter valid segment.
                let short = tcp((ip(CLIENT), 40000 + len as u16), (ip(VIP), 80), true, &b"payload"[..len - 54]);
                let r = dp.from_pod(&short);
                assert_eq!((r.action, tuple(&r.data).dst), (TC_ACT_OK, ip("10.0.1.5")), "{len} bytes");
                assert_checksums(&r.data);
            }
        }
    }
    assert!(dp.stat(DropReason::Malformed.stat()) > 0);
}

#[test]
fn garbage_never_crashes_and_non_ipv4_passes_untouched() {
    let dp = web(&["10.0.1.5"]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..3000 {
        let len = 15 + (next() % 120) as usize;
        let mut pkt: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 2 == 0 {
            pkt[12..14].copy_from_slice(&[8, 0]);
            pkt[14] = 0x40 | (pkt[14] & 0x0f);
        }
        let Some(r) = dp.try_run(dataplane_common::progs::FROM_POD, &pkt) else { continue };
        assert!(r.action == TC_ACT_OK || r.action == TC_ACT_SHOT || r.action == TC_ACT_REDIRECT, "{}", r.action);
        let r = dp.to_pod(&pkt);
        assert!(r.action == TC_ACT_OK || r.action == TC_ACT_SHOT, "{}", r.action);
    }
    // IPv6 and ARP frames are not ours: untouched.
    let v6 = {
        let b = PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv6([1; 16], [2; 16], 64).udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, b"x").unwrap();
        v
    };
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&MAC_POD);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    for pkt in [v6, arp] {
        let r = dp.from_pod(&pkt);
        assert_eq!((r.action, &r.data), (TC_ACT_OK, &pkt));
    }
}

#[test]
fn removed_udp_backend_is_left_at_once_tcp_stays() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&format!("{}---\n{}", svc(VIP, 53, "UDP", 53, &["10.0.1.1"]), svc(VIP, 80, "TCP", 80, &["10.0.1.1"])));
    dp.from_pod(&udp((ip(CLIENT), 5000), (ip(VIP), 53), b"q"));
    dp.from_pod(&tcp((ip(CLIENT), 5000), (ip(VIP), 80), true, b""));
    assert_eq!(conntrack(&dp).len(), 4);
    dp.apply_yaml(&format!("{}---\n{}", svc(VIP, 53, "UDP", 53, &["10.0.1.2"]), svc(VIP, 80, "TCP", 80, &["10.0.1.2"])));
    // The sync walks no conntrack: every entry is still there. The UDP flow moves at its next
    // packet (its pair replaced by a new one); the TCP connection keeps its (terminating) one.
    assert_eq!(conntrack(&dp).len(), 4);
    assert_eq!(tuple(&dp.from_pod(&udp((ip(CLIENT), 5000), (ip(VIP), 53), b"q")).data).dst, ip("10.0.1.2"));
    assert_eq!(conntrack(&dp).len(), 4, "the UDP flow's old pair replaced, not kept beside the new one");
    assert_eq!(tuple(&dp.from_pod(&tcp((ip(CLIENT), 5000), (ip(VIP), 80), false, b"x")).data).dst, ip("10.0.1.1"));
    // ...until that tuple opens a new connection: a fresh SYN goes to a live backend.
    assert_eq!(tuple(&dp.from_pod(&tcp((ip(CLIENT), 5000), (ip(VIP), 80), true, b"")).data).dst, ip("10.0.1.2"));
}

#[test]
fn sctp_without_port_translation_keeps_its_crc() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 3868, "SCTP", 3868, &["10.0.1.5"]));
    let r = dp.from_pod(&sctp_init((ip(CLIENT), 5000), (ip(VIP), 3868)));
    assert_eq!(r.action, TC_ACT_OK);
    assert_eq!(r.data, sctp_init((ip(CLIENT), 5000), (ip("10.0.1.5"), 3868)));
    assert_checksums(&r.data);
}

#[test]
fn sctp_port_translation_patches_the_crc32c_both_ways() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&svc(VIP, 3868, "SCTP", 13868, &["10.0.1.5"]));
    let r = dp.from_pod(&sctp_init((ip(CLIENT), 5000), (ip(VIP), 3868)));
    assert_eq!(r.action, TC_ACT_OK);
    // Exactly the packet an SCTP stack would have built for the backend, CRC32c included.
    assert_eq!(r.data, sctp_init((ip(CLIENT), 5000), (ip("10.0.1.5"), 13868)));
    let back = dp.to_pod(&sctp_init((ip("10.0.1.5"), 13868), (ip(CLIENT), 5000)));
    assert_eq!(back.data, sctp_init((ip(VIP), 3868), (ip(CLIENT), 5000)));
    // Every length: the patch shifts the port delta over the rest of the packet.
    for extra in [0usize, 1, 3, 4, 63, 64, 65, 700, 1400] {
        let mut l4 = sctp_init((ip(CLIENT), 6000 + extra as u16), (ip(VIP), 3868))[34..].to_vec();
        l4.extend(std::iter::repeat(0xa5).take(extra));
        l4[8..12].copy_from_slice(&[0; 4]);
        let c = crc32c(&l4);
        l4[8..12].copy_from_slice(&c.to_le_bytes());
        let r = dp.from_pod(&raw_ipv4(ip(CLIENT), ip(VIP), 132, &l4));
        assert_eq!((r.action, tuple(&r.data).dport), (TC_ACT_OK, 13868), "{extra}");
        assert_checksums(&r.data);
    }
}
