//! What leaves the node through a redirect, on the real programs (BPF_PROG_TEST_RUN, run inside a
//! test namespace whose routes the FIB lookups see): GSO super-packets judged by their segments,
//! ICMP fragmentation needed for what truly exceeds the path MTU (robust to checksum offload),
//! ICMP errors from NodePort backends, replies of hostNetwork endpoints, and Ferry's own answers
//! getting past the client's ingress policy.
use std::net::Ipv4Addr;

use bpf_tests::{fixture::*, lab, packet::*};
use dataplane_agent::{agent::PolicyState, trace::SkbIn};
use dataplane_common::{progs, stat, DropReason, MARK_FERRY_REPLY};

const NODE: &str = "192.168.0.2";
const CLIENT: (&str, u16) = ("203.0.113.9", 40000);
/// The inter-node path MTU of the test namespace (an overlay's, say).
const PATH_MTU: u16 = 1400;

/// A namespace where node1's routes lead over a 1400-byte link: `10.180.0.0/16` (other nodes'
/// pods) and everything else via 192.168.0.1. The calling thread is inside it while the guard lives.
struct Routes {
    _entered: lab::Entered,
    _ns: lab::Netns,
}

fn routes() -> Routes {
    let ns = lab::Netns::new(format!("ferry-rt-{}", lab::run_id()));
    ns.sysctl("net.ipv4.ip_forward=1");
    for cmd in [
        // A veth pair inside the namespace (this kernel has no dummy devices).
        vec!["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        vec!["ip", "link", "set", "d1", "up"],
        vec!["ip", "link", "set", "d0", "mtu", "1400", "up"],
        vec!["ip", "addr", "add", "192.168.0.2/24", "dev", "d0"],
        vec!["ip", "route", "add", "10.180.0.0/16", "via", "192.168.0.1", "dev", "d0"],
        vec!["ip", "route", "add", "default", "via", "192.168.0.1", "dev", "d0"],
    ] {
        ns.exec_ok(&cmd);
    }
    let entered = ns.enter();
    Routes { _entered: entered, _ns: ns }
}

fn client() -> (Ipv4Addr, u16) {
    (ip(CLIENT.0), CLIENT.1)
}

/// A NodePort Service (TCP 30080, UDP 30053) whose one endpoint is `backend` on `node`.
fn nodeport(backend: &str, node: &str, local: bool) -> String {
    format!(
        "kind: Service\nmetadata: {{name: np, namespace: t}}\nspec: {{type: NodePort, clusterIP: 172.30.0.20, externalTrafficPolicy: {}, ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30080}}, {{name: udp, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: np-1, namespace: t, labels: {{kubernetes.io/service-name: np}}}}\naddressType: IPv4\n\
         ports: [{{name: tcp, port: 8080}}, {{name: udp, port: 5353, protocol: UDP}}]\nendpoints: [{{addresses: [{backend}], nodeName: {node}}}]\n",
        if local { "Local" } else { "Cluster" }
    )
}

/// A TCP segment of `len` IP bytes (payload filled), DF set as Linux sets it.
fn segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), len: usize) -> Vec<u8> {
    tcp_flags(src, dst, "PA", &vec![0x5a; len - 40])
}

fn with_df(mut pkt: Vec<u8>, df: bool) -> Vec<u8> {
    pkt[20] = if df { 0x40 } else { 0 };
    pkt[24] = 0;
    pkt[25] = 0;
    let c = ip_checksum(&pkt[14..34]);
    pkt[24..26].copy_from_slice(&c.to_be_bytes());
    pkt
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// One's-complement sum of `b` as 16-bit words (not complemented).
fn ones_sum(b: &[u8]) -> u16 {
    let mut s: u32 = b.chunks(2).map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A GSO super-packet of `segs` segments of `seg` payload bytes.
fn gso(seg: u32, segs: u32) -> SkbIn {
    SkbIn { gso_size: seg, gso_segs: segs, ..Default::default() }
}

/// Checks an ICMP fragmentation-needed answer to `orig` (as its sender sent it), sent back from
/// `from`: headers, MTU, the quote, checksums, and that a CHECKSUM_PARTIAL completion of the
/// original L4 checksum would leave every byte as it is.
fn assert_frag_needed(out: &[u8], orig: &[u8], from: Ipv4Addr, mtu: u16) {
    let t = tuple(out);
    let o = tuple(orig);
    assert_eq!((t.proto, t.src, t.dst), (1, from, o.src), "{out:02x?}");
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "type/code");
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu);
    assert_eq!(ones_sum(icmp), 0xffff, "ICMP checksum");
    assert_eq!(ip_checksum(&out[14..34]), 0, "IP checksum");
    // The quote: the sender's IP header and the start of its L4 header, untranslated.
    let quote = &icmp[8..];
    assert_eq!(&quote[..20][12..20], &orig[14 + 12..14 + 20], "quoted addresses");
    assert_eq!(&quote[20..24], &orig[34..38], "quoted ports");
    let l4 = &quote[20..];
    let (ck, n) = if o.proto == 6 { (16, 20) } else { (6, 8) };
    assert_eq!(l4.len(), n);
    let v = u16::from_be_bytes([l4[ck], l4[ck + 1]]);
    assert_eq!(!ones_sum(l4), v, "a checksum offload completing at the quoted L4 checksum would change it");
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + n);
}

#[test]
fn gso_super_packets_are_judged_by_their_segments_and_too_big_ones_answered() {
    let _rt = routes();
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.180.0.1", "node2", false));
    let np = (ip(NODE), 30080);
    // The connection: source-translated to the node, sent out by a FIB redirect.
    let syn = dp.from_world(&tcp_flags(client(), np, "S", b""));
    assert_eq!(syn.action, TC_ACT_REDIRECT, "{syn:?}");
    let sport = tuple(&syn.data).sport;
    dp.from_world(&tcp_flags((ip("10.180.0.1"), 8080), (ip(NODE), sport), "SA", b""));

    // A super-packet whose segments fit the 1400-byte path (20 + 20 + 1348): redirected and
    // translated, although it is 3000 bytes long.
    let big = segment(client(), np, 3000);
    let (r, _) = dp.run_skb(progs::FROM_WORLD, &big, &gso(1348, 3));
    assert_eq!(r.action, TC_ACT_REDIRECT, "a super-packet of fitting segments was not redirected");
    let t = tuple(&r.data);
    assert_eq!((t.src, t.sport, t.dst, t.dport), (ip(NODE), sport, ip("10.180.0.1"), 8080));

    // Segments of 1448 bytes exceed it: fragmentation needed, with the path's MTU, back to the
    // sender, quoting the packet as it was sent.
    let (r, mark) = dp.run_skb(progs::FROM_WORLD, &big, &gso(1448, 3));
    assert_eq!(r.action, TC_ACT_REDIRECT, "{r:?}");
    assert_eq!(mark, MARK_FERRY_REPLY);
    assert_frag_needed(&r.data, &big, ip(NODE), PATH_MTU);
    // An ordinary 1500-byte segment with DF: the same.
    let full = with_df(segment(client(), np, 1500), true);
    let r = dp.from_world(&full);
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_frag_needed(&r.data, &full, ip(NODE), PATH_MTU);
    assert_eq!(dp.stat(stat::ICMP_FRAG_NEEDED), 2);
    // Without DF it is answered too (Ferry cannot fragment after translation as the kernel
    // would; Linux lowers its path MTU on the answer whatever DF said), quoting the packet.
    let no_df = with_df(segment(client(), np, 1500), false);
    let r = dp.from_world(&no_df);
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_frag_needed(&r.data, &no_df, ip(NODE), PATH_MTU);
    // A UDP datagram's later fragment cannot be answered (nothing to quote): dropped, counted.
    let up = (ip(NODE), 30053);
    let first = ipv4_with(client().0, up.0, 17, &[], &udp_header(client().1, up.1, 2000, &[0u8; 1472]), Some((true, 0, 7)));
    let r = dp.from_world(&first);
    assert_eq!(r.action, TC_ACT_REDIRECT, "a first fragment too big for the path is answered");
    let later = ipv4_with(client().0, up.0, 17, &[], &[0u8; 1480], Some((false, 185, 7)));
    assert_eq!(dp.from_world(&later).action, TC_ACT_SHOT);
    assert_eq!(dp.stat(DropReason::FragNeeded.stat()), 1);
}

/// A UDP header claiming `len` bytes, then `payload`: the start of a datagram to be fragmented.
fn udp_header(sport: u16, dport: u16, len: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

#[test]
fn a_local_backends_super_packets_to_an_outside_client_leave_by_segments() {
    // The 1 MB download from a NodePort with a local backend: every reply is a super-packet
    // from the pod's own TCP stack, leaving through a redirect with the NodePort as its source.
    let _rt = routes();
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.0.0.5", "node1", true));
    let np = (ip(NODE), 30080);
    let be = (ip("10.0.0.5"), 8080);
    let syn = dp.from_world(&tcp_flags(client(), np, "S", b""));
    assert_eq!(syn.action, TC_ACT_OK, "to a local pod: handed to the stack");
    let reply = segment(be, client(), 3000);
    let (r, _) = dp.run_skb(progs::FROM_POD, &reply, &gso(1348, 3));
    assert_eq!(r.action, TC_ACT_REDIRECT, "{r:?}");
    let t = tuple(&r.data);
    assert_eq!((t.src, t.sport, t.dst, t.dport), (ip(NODE), 30080, client().0, client().1));
    // Too big for the way out: the pod is told, as the client it talks to.
    let (r, _) = dp.run_skb(progs::FROM_POD, &reply, &gso(1448, 3));
    assert_frag_needed(&r.data, &reply, client().0, PATH_MTU);
}

#[test]
fn a_pods_unmasqueraded_nodeport_connection_to_a_local_backend_is_redirected_both_ways() {
    // A pod reaching a NodePort on this node's address without masquerade (externalTrafficPolicy
    // Local: a pod's traffic is not masqueraded, kube-proxy's short-circuit) whose backend is a
    // pod of this node: the replies leave the backend with the node's address as their source,
    // which the stack would drop as martian on the backend's veth. The connection carries
    // CT_F_REDIRECT (lb4_new_connection: the frontend is a LOCAL_HOST address of local4_v1) and
    // both directions go to their next hop through the FIB.
    let _rt = routes();
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.0.0.5", "node1", true));
    // The node's addresses in local4_v1 (LOCAL_HOST), as the agent's policy sync writes them.
    dp.apply_policy_yaml("", &mut PolicyState::default());
    let pod = (ip("10.0.0.2"), 40000);
    let np = (ip(NODE), 30080);
    let be = (ip("10.0.0.5"), 8080);
    let syn = dp.from_pod(&tcp_flags(pod, np, "S", b""));
    let t = tuple(&syn.data);
    assert_eq!((t.src, t.sport, t.dst, t.dport), (pod.0, pod.1, be.0, be.1), "not masqueraded, to the backend");
    let rows = dp.maps.ct.rows();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for r in &rows {
        assert!(r.entry.flags & dataplane_common::CT_F_REDIRECT != 0, "CT_F_REDIRECT on {r:#?}");
        assert_eq!(r.entry.flags & (dataplane_common::CT_F_SNAT | dataplane_common::CT_F_EXTERNAL), 0, "{r:#?}");
    }
    assert_eq!(syn.action, TC_ACT_REDIRECT, "the request: {syn:?}");
    let reply = dp.from_pod(&tcp_flags(be, pod, "SA", b""));
    assert_eq!(reply.action, TC_ACT_REDIRECT, "the reply: {reply:?}");
    let t = tuple(&reply.data);
    assert_eq!((t.src, t.sport, t.dst, t.dport), (np.0, np.1, pod.0, pod.1), "the reply as the NodePort");
    assert_checksums(&reply.data);

    // Its counterpart through the ClusterIP: no node address involved, nothing redirected.
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.0.0.5", "node1", true));
    let syn = dp.from_pod(&tcp_flags(pod, (ip("172.30.0.20"), 80), "S", b""));
    assert_eq!((syn.action, tuple(&syn.data).dst), (TC_ACT_OK, be.0));
    assert!(dp.maps.ct.rows().iter().all(|r| r.entry.flags & dataplane_common::CT_F_REDIRECT == 0), "{:#?}", dp.maps.ct.rows());
    let reply = dp.from_pod(&tcp_flags(be, pod, "SA", b""));
    assert_eq!((reply.action, tuple(&reply.data).src), (TC_ACT_OK, ip("172.30.0.20")));
}

#[test]
fn icmp_errors_from_nodeport_backends_reach_the_outside_client() {
    let _rt = routes();
    let up = (ip(NODE), 30053);
    // A backend on another node: its error comes back to the node's translated source.
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.180.0.1", "node2", false));
    let q = dp.from_world(&udp(client(), up, b"query"));
    let sent = tuple(&q.data);
    assert_eq!((sent.src, sent.dst), (ip(NODE), ip("10.180.0.1")));
    let err = icmp_unreachable_about(&q.data[14..], ip("10.180.0.1"), ip(NODE));
    let r = dp.from_world(&err);
    assert_eq!(r.action, TC_ACT_REDIRECT, "the error from the backend was handed to the stack, which drops it: {r:?}");
    assert_error_to_client(&r.data, up);
    // A backend pod on this node (traffic policy Local): its error leaves its veth.
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport("10.0.0.5", "node1", true));
    let q = dp.from_world(&udp(client(), up, b"query"));
    let err = icmp_unreachable_about(&q.data[14..], ip("10.0.0.5"), client().0);
    let r = dp.from_pod(&err);
    assert_eq!(r.action, TC_ACT_REDIRECT, "{r:?}");
    assert_error_to_client(&r.data, up);
}

/// An ICMP port unreachable from `from` to `to` quoting `ip_packet` (an IPv4 packet).
fn icmp_unreachable_about(ip_packet: &[u8], from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
    let ihl = ((ip_packet[0] & 0x0f) * 4) as usize;
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&ip_packet[..ihl + 8]);
    let c = !ones_sum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    raw_ipv4(from, to, 1, &icmp)
}

/// The error reaches the client from the frontend `fe`, quoting its own datagram to `fe`.
fn assert_error_to_client(out: &[u8], fe: (Ipv4Addr, u16)) {
    let t = tuple(out);
    assert_eq!((t.src, t.dst), (fe.0, client().0), "outer header");
    let quote = &out[34 + 8..];
    // Read by hand: a quote is truncated, which packet parsers refuse.
    let a = |o: usize| Ipv4Addr::new(quote[o], quote[o + 1], quote[o + 2], quote[o + 3]);
    let port = |o: usize| u16::from_be_bytes([quote[o], quote[o + 1]]);
    assert_eq!((a(12), port(20), a(16), port(22)), (client().0, client().1, fe.0, fe.1), "quoted header");
    assert_eq!(ones_sum(&out[34..]), 0xffff, "ICMP checksum");
    assert_eq!(ip_checksum(&out[14..34]), 0);
}

#[test]
fn a_hostnetwork_endpoints_reply_is_translated_on_its_way_out() {
    let mut dp = Datapath::new();
    // The endpoint is node1 itself (a hostNetwork pod).
    dp.apply_yaml(&nodeport(NODE, "node1", false));
    let np = (ip(NODE), 30080);
    let syn = dp.from_world(&tcp_flags(client(), np, "S", b""));
    assert_eq!(syn.action, TC_ACT_OK);
    let t = tuple(&syn.data);
    // To the node's own stack: the client's address stays (no masquerade to itself).
    assert_eq!((t.src, t.sport, t.dst, t.dport), (client().0, client().1, ip(NODE), 8080));
    // The host's answer leaves through the external interface's egress, as the NodePort.
    let answer = tcp_flags((ip(NODE), 8080), client(), "SA", b"");
    let r = dp.to_world(&answer);
    assert_eq!(r.action, TC_ACT_OK);
    assert_eq!(r.data[14..], tcp_flags(np, client(), "SA", b"")[14..], "IP and TCP bytes");
    assert_eq!(dp.stat(stat::HOST_REPLY), 1);
    // The host's own traffic (no Service connection) leaves untouched.
    let own = tcp_flags((ip(NODE), 22), client(), "PA", b"ssh");
    assert_eq!(dp.to_world(&own).data, own);
}

#[test]
fn ferrys_own_refusal_reaches_a_client_isolated_for_ingress() {
    let mut dp = Datapath::new();
    // A Service without endpoints; the client pod is isolated for ingress by a default deny.
    dp.apply_yaml(
        "kind: Service\nmetadata: {name: empty, namespace: t}\nspec: {clusterIP: 172.30.0.30, ports: [{port: 80}]}\n---\n\
         kind: EndpointSlice\nmetadata: {name: empty-1, namespace: t, labels: {kubernetes.io/service-name: empty}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: []\n",
    );
    let mut pol = PolicyState::default();
    dp.apply_policy_yaml(
        "kind: Pod\nmetadata: {name: a, namespace: t, labels: {app: a}}\nspec: {nodeName: node1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.10}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: deny-in, namespace: t}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
        &mut pol,
    );
    let a = (ip("10.0.0.10"), 41000);
    let (r, mark) = dp.run_skb(progs::FROM_POD, &tcp_flags(a, (ip("172.30.0.30"), 80), "S", b""), &SkbIn::default());
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_eq!(mark, MARK_FERRY_REPLY);
    assert!(matches!(refusal(&r.data), Some(Refusal::TcpRst { .. })), "{:?}", r.data);
    // Back out of the client's veth, through the to-pod program: the mark lets it in, and is
    // cleared on the way.
    let (into, mark) = dp.run_skb(progs::TO_POD, &r.data, &SkbIn { mark: MARK_FERRY_REPLY, ..Default::default() });
    assert_eq!(into.action, TC_ACT_OK, "the refusal was dropped by the client's ingress policy");
    assert_eq!(mark, 0);
    // The same RST without the mark (forged, or from elsewhere) meets the policy.
    let (into, _) = dp.run_skb(progs::TO_POD, &r.data, &SkbIn::default());
    assert_eq!(into.action, TC_ACT_SHOT);
}
