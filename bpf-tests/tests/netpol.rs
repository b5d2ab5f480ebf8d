//! NetworkPolicy through BPF_PROG_TEST_RUN on the real programs: replies of allowed connections
//! in both directions, changes applying to new connections only, drop counters and verdict
//! events. The policy maps are written by the agent's own translation and diff.
use bpf_tests::{fixture::*, packet::*};
use dataplane_agent::{agent::PolicyState, trace::SkbIn};
use dataplane_common::{stat, PolicyEvent, DIR_EGRESS, DIR_INGRESS, VERDICT_ALLOW, VERDICT_DENY};

const A: &str = "10.0.0.10";
const B: &str = "10.0.0.11";
const C: &str = "10.0.0.12";

fn pods(a_label: &str) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: a, namespace: t, labels: {{app: {a_label}}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {A}}}\n---\n\
         kind: Pod\nmetadata: {{name: b, namespace: t, labels: {{app: b}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {B}}}\n---\n\
         kind: Pod\nmetadata: {{name: c, namespace: t, labels: {{app: c}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {C}}}\n---\n\
         kind: Pod\nmetadata: {{name: x, namespace: u, labels: {{app: x}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {X}}}\n"
    )
}

/// Everything in `t` is default-denied both ways; `a` may reach `b`:8080, `c` may reach `b` on
/// any port.
const POLICIES: &str = "\
kind: NetworkPolicy
metadata: {name: deny-all, namespace: t}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
kind: NetworkPolicy
metadata: {name: a-to-b, namespace: t}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 8080}]}]
---
kind: NetworkPolicy
metadata: {name: b-accepts, namespace: t}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}, {podSelector: {matchLabels: {app: c}}}]}]
---
kind: NetworkPolicy
metadata: {name: c-to-b, namespace: t}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: b}}}]}]
";

/// Node1 in a test namespace, each pod on its own interface (as the programs see them: the
/// policy conntrack is per pod interface), and its datapath.
struct Node {
    net: bpf_tests::podnet::PodNet,
    dp: Datapath,
    pol: PolicyState,
}

impl Node {
    /// The interface of the pod at `addr` (a, b, c, then the extra pods given to `setup_with`).
    fn if_of(&self, addr: std::net::Ipv4Addr) -> u32 {
        let i = [A, B, C, X].iter().position(|p| ip(p) == addr).unwrap_or_else(|| panic!("no pod at {addr}"));
        self.net.ifs[i]
    }

    /// Runs the pod-egress program on the interface of the pod the packet claims to come from
    /// (`via`: another pod's, for spoofing).
    fn out_of(&self, pkt: &[u8], via: Option<&str>) -> Run {
        let ifindex = self.if_of(via.map(ip).unwrap_or_else(|| tuple(pkt).src));
        self.dp.run_skb(dataplane_common::progs::FROM_POD, pkt, &SkbIn { ifindex, ..Default::default() }).0
    }

    /// Runs the pod-ingress program on the interface of the packet's destination pod.
    fn into_pod(&self, pkt: &[u8]) -> Run {
        let ifindex = self.if_of(tuple(pkt).dst);
        self.dp.run_skb(dataplane_common::progs::TO_POD, pkt, &SkbIn { ifindex, ..Default::default() }).0
    }

    /// A packet out of its source pod and, if that lets it through, into its destination pod.
    fn pass(&self, pkt: &[u8]) -> (u32, u32) {
        let out = self.out_of(pkt, None);
        if out.action == TC_ACT_SHOT {
            return (out.action, TC_ACT_SHOT);
        }
        (out.action, self.into_pod(&out.data).action)
    }

    fn apply(&mut self, yaml: &str) -> (usize, usize) {
        self.dp.apply_policy_yaml(yaml, &mut self.pol)
    }
}

/// A pod isolated by nothing (the attacker in the attack tests).
const X: &str = "10.0.0.13";

fn setup(a_label: &str) -> Node {
    let net = bpf_tests::podnet::PodNet::new("np", "192.168.0.2", &[A, B, C, X]);
    let mut n = Node { net, dp: Datapath::new(), pol: PolicyState::default() };
    n.apply(&format!("{}---\n{POLICIES}", pods(a_label)));
    n
}

/// A TCP packet from `src` to `dst` through both pods' programs: (from_pod action, to_pod action).
fn send(n: &Node, src: (&str, u16), dst: (&str, u16), syn: bool) -> (u32, u32) {
    n.pass(&tcp((ip(src.0), src.1), (ip(dst.0), dst.1), syn, b"x"))
}

fn events(dp: &mut Datapath) -> Vec<PolicyEvent> {
    let map = dp.ebpf.map_mut(dataplane_common::names::POL_EVENTS).expect("ring");
    let mut ring = aya::maps::RingBuf::try_from(map).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(dataplane_agent::monitor::parse_event(&item).unwrap());
    }
    out
}

#[test]
fn replies_of_an_allowed_connection_pass_both_ways_and_nothing_else_does() {
    let mut n = setup("a");
    assert_eq!(send(&n, (A, 40000), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    // The reply leaves b (egress-isolated) and enters a (ingress-isolated): allowed as a reply.
    assert_eq!(send(&n, (B, 8080), (A, 40000), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&n, (A, 40000), (B, 8080), false), (TC_ACT_OK, TC_ACT_OK));
    // b opening its own connection to a is not a reply: b's egress is denied.
    assert_eq!(send(&n, (B, 8080), (A, 40001), true).0, TC_ACT_SHOT);
    // a to b on another port: a's egress rule does not allow it.
    assert_eq!(send(&n, (A, 40002), (B, 9090), true).0, TC_ACT_SHOT);
    // c to b on any port: c's egress allows it, b's ingress allows c.
    assert_eq!(send(&n, (C, 40003), (B, 9090), true), (TC_ACT_OK, TC_ACT_OK));
    let ev = events(&mut n.dp);
    let dp = &n.dp;
    let name = |id| dp.maps.pol_names.get(&id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
    let first = ev.iter().find(|e| e.dir == DIR_EGRESS && e.sport_be == 40000u16.to_be()).unwrap();
    assert_eq!((first.verdict, name(first.policy_id).as_str()), (VERDICT_ALLOW, "t/a-to-b"));
    let into_b = ev.iter().find(|e| e.dir == DIR_INGRESS && e.sport_be == 40000u16.to_be()).unwrap();
    assert_eq!((into_b.verdict, name(into_b.policy_id).as_str()), (VERDICT_ALLOW, "t/b-accepts"));
    let denied = ev.iter().find(|e| e.verdict == VERDICT_DENY && e.dport_be == 9090u16.to_be()).unwrap();
    // The deny is counted against a policy isolating a for egress.
    assert!(["t/deny-all", "t/a-to-b"].contains(&name(denied.policy_id).as_str()));
    assert_eq!(dp.maps.policy_drops(denied.policy_id, DIR_EGRESS), 2, "b->a and a->b:9090 denied at egress");
    // Replies are not events (only decisions are): one allow each way for 40000, nothing for its reply.
    assert_eq!(ev.iter().filter(|e| e.sport_be == 8080u16.to_be() && e.verdict == VERDICT_ALLOW).count(), 0);
    // Every event carries the kernel's time (CLOCK_MONOTONIC), in the order they happened.
    let now = dataplane_agent::bpf::conntrack::monotonic_ns();
    assert!(ev.iter().all(|e| e.ts_ns > 0 && e.ts_ns <= now), "timestamps");
    assert!(ev.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
}

#[test]
fn a_policy_change_reaches_established_connections_at_their_next_packet() {
    let mut n = setup("a");
    assert_eq!(send(&n, (A, 41000), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&n, (B, 8080), (A, 41000), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&n, (C, 41001), (B, 7000), true), (TC_ACT_OK, TC_ACT_OK));
    let udp_c = udp((ip(C), 41005), (ip(B), 53), b"q");
    assert_eq!(n.pass(&udp_c), (TC_ACT_OK, TC_ACT_OK));
    let c_rules_before: Vec<_> = n.dp.maps.pol_rules.iter().flatten().filter(|(k, _)| u32::from_be(k.data().ep_id_be) == u32::from(ip(C))).collect();
    let (revoked, rechecked) = (n.dp.stat(stat::POL_REVOKED), n.dp.stat(stat::POL_RECHECKED));
    // a is relabelled: no policy lets it out any more (deny-all still isolates it).
    let (w, d) = n.apply(&format!("{}---\n{POLICIES}", pods("a2")));
    assert!(w + d > 0);
    // Its established connection is decided again at its next packet, and cut, both ways; a new
    // one is dropped too.
    assert_eq!(send(&n, (A, 41000), (B, 8080), false).0, TC_ACT_SHOT);
    assert_eq!(send(&n, (B, 8080), (A, 41000), false).0, TC_ACT_SHOT, "b's replies are cut too");
    assert_eq!(send(&n, (A, 41002), (B, 8080), true).0, TC_ACT_SHOT);
    // Cut once on each pod's interface: a's egress entry, b's ingress entry.
    assert_eq!(n.dp.stat(stat::POL_REVOKED), revoked + 2);
    // c is untouched: its rules are the same entries, its connections (decided again, still
    // allowed) and new ones pass.
    let c_rules_after: Vec<_> = n.dp.maps.pol_rules.iter().flatten().filter(|(k, _)| u32::from_be(k.data().ep_id_be) == u32::from(ip(C))).collect();
    assert_eq!(c_rules_before.len(), c_rules_after.len());
    assert_eq!(send(&n, (C, 41001), (B, 7000), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(n.pass(&udp_c), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&n, (C, 41003), (B, 7001), true), (TC_ACT_OK, TC_ACT_OK));
    assert!(n.dp.stat(stat::POL_RECHECKED) > rechecked);
    // Tightening b's ingress (c no longer allowed) cuts c's UDP flow at its next datagram.
    let tighter = POLICIES.replace(", {podSelector: {matchLabels: {app: c}}}", "");
    n.apply(&format!("{}---\n{tighter}", pods("a2")));
    assert_eq!(n.pass(&udp_c).1, TC_ACT_SHOT, "c's UDP flow into b after b stopped accepting c");
    // Back to the old policies and label: a may open connections again.
    n.apply(&format!("{}---\n{POLICIES}", pods("a")));
    assert_eq!(send(&n, (A, 41004), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    // An unchanged resync writes nothing, and leaves the generation alone.
    let generation = n.dp.maps.config.get(&0, 0).unwrap().pol_generation;
    assert_eq!(n.apply(&format!("{}---\n{POLICIES}", pods("a"))), (0, 0));
    assert_eq!(n.dp.maps.config.get(&0, 0).unwrap().pol_generation, generation);
}

#[test]
fn policy_state_survives_a_restart_without_rewrites() {
    let mut n = setup("a");
    let mut restored = PolicyState::restore(&n.dp.maps);
    assert_eq!(n.dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods("a")), &mut restored), (0, 0));
}

#[test]
fn through_a_service_between_isolated_pods_of_one_node_the_reply_gets_back() {
    let mut n = setup("a");
    n.dp.apply_yaml("kind: Service\nmetadata: {name: b, namespace: t}\nspec: {clusterIP: 172.30.7.11, ports: [{port: 80, targetPort: 8080}]}\n---\nkind: EndpointSlice\nmetadata: {name: b-1, namespace: t, labels: {kubernetes.io/service-name: b}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.11], nodeName: node1}]\n");
    // First the backend directly, then the same client port through the Service: the second
    // connection has the same tuple after translation as the first one had.
    for dst in [(B, 8080), ("172.30.7.11", 80)] {
        let (out, into_b) = send(&n, (A, 42000), dst, true);
        assert_eq!((out, into_b), (TC_ACT_OK, TC_ACT_OK), "{dst:?}");
        // b's reply leaves b (translated back to the Service on b's veth when it was one) and
        // enters a, which is isolated for ingress.
        let reply = n.out_of(&tcp((ip(B), 8080), (ip(A), 42000), false, b"ok"), None);
        assert_eq!(reply.action, TC_ACT_OK);
        assert_eq!(n.into_pod(&reply.data).action, TC_ACT_OK, "reply of {dst:?}");
    }
    // Only replies: b reaching a's port 42000 on its own is still denied.
    assert_eq!(send(&n, (B, 8081), (A, 42000), true).0, TC_ACT_SHOT);
}

/// An ICMP port unreachable from `from` to `to`, quoting the first 28 bytes of `about`'s IP packet.
fn unreachable(from: &str, to: &str, about: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(MAC_POD, MAC_HOST)
        .ipv4(ip(from).octets(), ip(to).octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port));
    let mut out = Vec::new();
    b.write(&mut out, &about[14..14 + 28]).unwrap();
    out
}

/// An ICMP echo request (`reply`: echo reply) with identifier `id`.
fn echo(from: &str, to: &str, id: u16, reply: bool) -> Vec<u8> {
    let t = if reply { etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id, seq: 1 }) } else { etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id, seq: 1 }) };
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_POD, MAC_HOST).ipv4(ip(from).octets(), ip(to).octets(), 64).icmpv4(t).write(&mut out, b"ping").unwrap();
    out
}

#[test]
fn icmp_errors_pass_only_to_the_pod_of_the_quoted_connection() {
    let n = setup("a");
    // c -> b over UDP is allowed (c's egress, b's ingress from c).
    let dgram = udp((ip(C), 5000), (ip(B), 53), b"q");
    assert_eq!(n.pass(&dgram), (TC_ACT_OK, TC_ACT_OK));
    // b answers "port unreachable" about it: out of b (egress-isolated), into c (ingress-isolated).
    let err = unreachable(B, C, &dgram);
    assert_eq!(n.pass(&err), (TC_ACT_OK, TC_ACT_OK), "related error, b to c");
    // The same error about a datagram c never sent is not related: dropped.
    let other = unreachable(B, C, &udp((ip(C), 5001), (ip(B), 53), b"q"));
    assert_eq!(n.out_of(&other, None).action, TC_ACT_SHOT);
    // An error quoting c's connection, sent to a (ingress-isolated, nothing allowed from b):
    // related to a connection of c, not of a, so it does not reach a.
    let to_a = unreachable(B, A, &dgram);
    assert_eq!(n.into_pod(&to_a).action, TC_ACT_SHOT, "an error quoting another pod's connection");
    // Pings are not errors: into an isolated pod with port rules only... c allows nothing in.
    let ping = raw_ipv4(ip(B), ip(C), 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    assert_eq!(n.into_pod(&ping).action, TC_ACT_SHOT);
}

#[test]
fn echo_is_tracked_by_its_identifier() {
    let n = setup("a");
    // c may reach b with any protocol; b answers c's ping 7.
    assert_eq!(n.pass(&echo(C, B, 7, false)), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(n.pass(&echo(B, C, 7, true)), (TC_ACT_OK, TC_ACT_OK), "the reply of ping 7");
    // Once c has pinged b, b still may not send c anything else: a reply with another id, a
    // request with the same id, UDP, other protocols (GRE).
    assert_eq!(n.out_of(&echo(B, C, 8, true), None).action, TC_ACT_SHOT, "echo reply, other id");
    assert_eq!(n.out_of(&echo(B, C, 7, false), None).action, TC_ACT_SHOT, "echo request, same id");
    assert_eq!(n.out_of(&udp((ip(B), 7), (ip(C), 7), b"q"), None).action, TC_ACT_SHOT);
    assert_eq!(n.out_of(&raw_ipv4(ip(B), ip(C), 47, &[0, 0, 0x08, 0]), None).action, TC_ACT_SHOT, "GRE");
}

#[test]
fn allowances_expire_with_their_protocol_timeouts() {
    let mut n = setup("a");
    let mut cfg = n.dp.maps.config.get(&0, 0).unwrap();
    cfg.ct_timeout_s[dataplane_common::ct_timeout::UDP] = 1;
    cfg.ct_timeout_s[dataplane_common::ct_timeout::TCP_SYN] = 1;
    n.dp.maps.set_config(cfg).unwrap();
    // c -> b UDP and a TCP SYN: their replies pass while fresh...
    assert_eq!(n.pass(&udp((ip(C), 6000), (ip(B), 53), b"q")), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(n.pass(&udp((ip(B), 53), (ip(C), 6000), b"a")), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&n, (C, 6001), (B, 80), true), (TC_ACT_OK, TC_ACT_OK));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // ... and not once the entries expired: b (egress-isolated) cannot use them to reach c.
    assert_eq!(n.out_of(&udp((ip(B), 53), (ip(C), 6000), b"late"), None).action, TC_ACT_SHOT, "UDP reply after its timeout");
    assert_eq!(n.out_of(&tcp((ip(B), 80), (ip(C), 6001), false, b"late"), None).action, TC_ACT_SHOT, "TCP reply after the SYN timeout");
}

#[test]
fn a_later_fragment_gets_its_first_fragments_verdict() {
    let n = setup("a");
    let frag = |src: &str, dst: &str, more: bool, off: u16, id: u16, l4: &[u8]| ipv4_with(ip(src), ip(dst), 17, &[], l4, Some((more, off, id)));
    // c -> b (allowed): the first fragment carries the ports; the later one gets its verdict.
    let first = frag(C, B, true, 0, 0x4242, &[0x1b, 0x58, 0, 53, 0, 40, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(n.pass(&first), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(n.pass(&frag(C, B, false, 2, 0x4242, &[9; 16])), (TC_ACT_OK, TC_ACT_OK));
    // a -> b:53 (a may reach b on 8080 only): the first fragment is denied at a's egress, and a
    // later fragment with no allowed first fragment is dropped both ways.
    assert_eq!(n.pass(&frag(A, B, true, 0, 0x5151, &[0x1b, 0x58, 0, 53, 0, 40, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])).0, TC_ACT_SHOT);
    let later = frag(A, B, false, 2, 0x5151, &[9; 16]);
    assert_eq!(n.out_of(&later, None).action, TC_ACT_SHOT, "later fragment out of an egress-isolated pod");
    assert_eq!(n.into_pod(&frag(X, B, false, 2, 0x6161, &[9; 16])).action, TC_ACT_SHOT, "later fragment into an ingress-isolated pod");
    // From a pod no policy isolates, later fragments leave freely.
    assert_eq!(n.out_of(&frag(X, "10.0.9.9", false, 2, 0x7171, &[9; 16]), None).action, TC_ACT_OK);
}

#[test]
fn a_spoofed_frame_opens_nothing_even_without_the_source_check() {
    // The attack of issue 10: pod x (isolated by nothing) sends one frame claiming to come from
    // b (ingress-isolated, nothing allowed from x) and addressed to x, then connects from that
    // port to b. With anti-spoofing off (--pod-source-check off), the policy conntrack alone
    // must hold: the forged entry belongs to x's interface, not b's.
    let n = setup("a");
    let forged = tcp((ip(B), 8080), (ip(X), 5555), false, b"");
    let _ = n.out_of(&forged, Some(X));
    assert_eq!(n.into_pod(&tcp((ip(X), 5555), (ip(B), 8080), true, b"")).action, TC_ACT_SHOT, "x's SYN into b after the forged frame");
    // Nor does a forged "reply" let a (egress-isolated to b:8080 only) out to x.
    let _ = n.out_of(&tcp((ip(X), 9999), (ip(A), 6666), false, b""), Some(A));
    assert_eq!(n.out_of(&tcp((ip(A), 6666), (ip(X), 9999), true, b""), None).action, TC_ACT_SHOT, "a to x after a forged frame");
}

#[test]
fn deny_events_are_rate_limited_per_pod_peer_and_port() {
    let mut n = setup("a");
    let _ = events(&mut n.dp);
    let suppressed = n.dp.stat(stat::POL_EVENTS_SUPPRESSED);
    // 50 denied SYNs from x to b:8080 (different source ports), and one to b:8081.
    for i in 0..50u16 {
        assert_eq!(n.into_pod(&tcp((ip(X), 20000 + i), (ip(B), 8080), true, b"")).action, TC_ACT_SHOT);
    }
    assert_eq!(n.into_pod(&tcp((ip(X), 30000), (ip(B), 8081), true, b"")).action, TC_ACT_SHOT);
    let ev = events(&mut n.dp);
    let denies = |port: u16| ev.iter().filter(|e| e.verdict == VERDICT_DENY && e.dport_be == port.to_be()).count();
    assert_eq!((denies(8080), denies(8081)), (1, 1), "one deny event per pod, peer and port a second");
    assert_eq!(n.dp.stat(stat::POL_EVENTS_SUPPRESSED), suppressed + 49);
    // Every drop is still counted against the policy.
    let total: u64 = n.dp.maps.pol_names.iter().flatten().map(|(id, _)| n.dp.maps.policy_drops(id, DIR_INGRESS)).sum();
    assert_eq!(total, 51);
}

#[test]
fn a_client_from_outside_is_judged_as_itself_not_as_the_node_that_masqueraded_it() {
    // b accepts pods of t and the block 203.0.113.0/24 only. A ClusterIP of b reached from
    // outside the cluster is masqueraded to the node's address (kube-proxy's clusterCIDR rule):
    // b's policy must judge the real client, as kube-proxy with Calico does, not "the node".
    let mut n = setup("a");
    let b_in = "kind: NetworkPolicy\nmetadata: {name: b-accepts, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 203.0.113.0/24}}]}]\n";
    let pols = POLICIES.replace(&POLICIES[POLICIES.find("kind: NetworkPolicy\nmetadata: {name: b-accepts").unwrap()..POLICIES.find("---\nkind: NetworkPolicy\nmetadata: {name: c-to-b").unwrap()], &format!("{b_in}"));
    n.apply(&format!("{}---\n{pols}", pods("a")));
    n.dp.apply_yaml("kind: Service\nmetadata: {name: b, namespace: t}\nspec: {clusterIP: 172.30.7.11, ports: [{port: 80, targetPort: 8080}]}\n---\nkind: EndpointSlice\nmetadata: {name: b-1, namespace: t, labels: {kubernetes.io/service-name: b}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.11], nodeName: node1}]\n");
    let mut cfg = n.dp.maps.config.get(&0, 0).unwrap();
    let (net, mask) = dataplane_agent::reconcile::Cidr4 { addr: ip("10.0.0.0"), prefix: 16 }.addr_mask_be();
    cfg.cluster_cidr_be = net;
    cfg.cluster_mask_be = mask;
    n.dp.maps.set_config(cfg).unwrap();
    let through = |n: &Node, client: &str, port: u16| -> (std::net::Ipv4Addr, u32) {
        let r = n.dp.from_world(&tcp((ip(client), port), (ip("172.30.7.11"), 80), true, b""));
        assert_ne!(r.action, TC_ACT_SHOT, "{client} at the node");
        let t = tuple(&r.data);
        assert_eq!(t.dst, ip(B));
        (t.src, n.into_pod(&r.data).action)
    };
    // Masqueraded either way; the stranger is dropped at b, the allowed block's client passes.
    let (src, verdict) = through(&n, "198.51.100.7", 43000);
    assert_eq!((src, verdict), (ip("192.168.0.2"), TC_ACT_SHOT), "a client outside every allowed block");
    let (src, verdict) = through(&n, "203.0.113.9", 43001);
    assert_eq!((src, verdict), (ip("192.168.0.2"), TC_ACT_OK), "a client of the allowed block");
    // The node's own traffic still is the node: always allowed in (kubelet probes).
    assert_eq!(n.into_pod(&tcp((ip("192.168.0.2"), 43002), (ip(B), 8080), true, b"")).action, TC_ACT_OK);
}

#[test]
fn a_cut_flow_reopens_only_once_the_policies_allow_it_again() {
    let mut n = setup("a");
    let q = udp((ip(C), 47000), (ip(B), 53), b"q");
    let a = udp((ip(B), 53), (ip(C), 47000), b"a");
    assert_eq!(n.pass(&q), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(n.pass(&a), (TC_ACT_OK, TC_ACT_OK));
    // b stops accepting c: c's next datagram is cut.
    let tighter = POLICIES.replace(", {podSelector: {matchLabels: {app: c}}}", "");
    n.apply(&format!("{}---\n{tighter}", pods("a")));
    assert_eq!(n.pass(&q).1, TC_ACT_SHOT, "cut");
    // An unrelated change: still cut, and b's own datagram (b is isolated for egress: it may not
    // start one) does not reopen it either.
    n.apply(&format!("{}---\n{tighter}", pods("a2")));
    assert_eq!(n.pass(&q).1, TC_ACT_SHOT, "still cut after an unrelated change");
    // b is no longer isolated for ingress (only for egress): c's flow is allowed again, and b's
    // answers pass as its replies.
    let egress_only = tighter.replace("spec: {podSelector: {}, policyTypes: [Ingress, Egress]}", "spec: {podSelector: {}, policyTypes: [Egress]}").replace(
        "kind: NetworkPolicy\nmetadata: {name: b-accepts, namespace: t}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]\n---\n",
        "",
    );
    assert_ne!(egress_only, tighter, "the edit applied");
    n.apply(&format!("{}---\n{egress_only}", pods("a")));
    assert_eq!(n.pass(&q), (TC_ACT_OK, TC_ACT_OK), "c's datagram once b accepts it again");
    assert_eq!(n.pass(&a), (TC_ACT_OK, TC_ACT_OK), "b's answer, a reply again");
}
