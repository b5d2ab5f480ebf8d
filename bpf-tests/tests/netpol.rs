//! NetworkPolicy through BPF_PROG_TEST_RUN on the real programs: replies of allowed connections
//! in both directions, changes applying to new connections only, drop counters and verdict
//! events. The policy maps are written by the agent's own translation and diff.
use bpf_tests::{fixture::*, packet::*};
use dataplane_agent::agent::PolicyState;
use dataplane_common::{PolicyEvent, DIR_EGRESS, DIR_INGRESS, VERDICT_ALLOW, VERDICT_DENY};

const A: &str = "10.0.0.10";
const B: &str = "10.0.0.11";
const C: &str = "10.0.0.12";

fn pods(a_label: &str) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: a, namespace: t, labels: {{app: {a_label}}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {A}}}\n---\n\
         kind: Pod\nmetadata: {{name: b, namespace: t, labels: {{app: b}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {B}}}\n---\n\
         kind: Pod\nmetadata: {{name: c, namespace: t, labels: {{app: c}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {C}}}\n"
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

fn setup(a_label: &str) -> (Datapath, PolicyState) {
    let mut dp = Datapath::new();
    let mut pol = PolicyState::default();
    dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods(a_label)), &mut pol);
    (dp, pol)
}

/// A packet leaving `src`'s pod and entering `dst`'s: (from_pod action, to_pod action).
fn send(dp: &Datapath, src: (&str, u16), dst: (&str, u16), syn: bool) -> (u32, u32) {
    let pkt = tcp((ip(src.0), src.1), (ip(dst.0), dst.1), syn, b"x");
    let out = dp.from_pod(&pkt);
    if out.action == TC_ACT_SHOT {
        return (out.action, TC_ACT_SHOT);
    }
    (out.action, dp.to_pod(&out.data).action)
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
    let (mut dp, _pol) = setup("a");
    assert_eq!(send(&dp, (A, 40000), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    // The reply leaves b (egress-isolated) and enters a (ingress-isolated): allowed as a reply.
    assert_eq!(send(&dp, (B, 8080), (A, 40000), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&dp, (A, 40000), (B, 8080), false), (TC_ACT_OK, TC_ACT_OK));
    // b opening its own connection to a is not a reply: b's egress is denied.
    assert_eq!(send(&dp, (B, 8080), (A, 40001), true).0, TC_ACT_SHOT);
    // a to b on another port: a's egress rule does not allow it.
    assert_eq!(send(&dp, (A, 40002), (B, 9090), true).0, TC_ACT_SHOT);
    // c to b on any port: c's egress allows it, b's ingress allows c.
    assert_eq!(send(&dp, (C, 40003), (B, 9090), true), (TC_ACT_OK, TC_ACT_OK));
    let ev = events(&mut dp);
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
}

#[test]
fn a_label_change_applies_to_new_connections_and_leaves_others_alone() {
    let (dp, mut pol) = setup("a");
    let mut dp = dp;
    assert_eq!(send(&dp, (A, 41000), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&dp, (C, 41001), (B, 7000), true), (TC_ACT_OK, TC_ACT_OK));
    let c_rules_before: Vec<_> = dp.maps.pol_rules.iter().flatten().filter(|(k, _)| u32::from_be(k.data().ep_id_be) == u32::from(ip(C))).collect();
    // a is relabelled: no policy lets it out any more (deny-all still isolates it).
    let (w, d) = dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods("a2")), &mut pol);
    assert!(w + d > 0);
    // Its established connection keeps flowing; a new one is dropped.
    assert_eq!(send(&dp, (A, 41000), (B, 8080), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&dp, (A, 41002), (B, 8080), true).0, TC_ACT_SHOT);
    // c is untouched: its rules are the same entries, its connections and new ones pass.
    let c_rules_after: Vec<_> = dp.maps.pol_rules.iter().flatten().filter(|(k, _)| u32::from_be(k.data().ep_id_be) == u32::from(ip(C))).collect();
    assert_eq!(c_rules_before.len(), c_rules_after.len());
    assert_eq!(send(&dp, (C, 41001), (B, 7000), false), (TC_ACT_OK, TC_ACT_OK));
    assert_eq!(send(&dp, (C, 41003), (B, 7001), true), (TC_ACT_OK, TC_ACT_OK));
    // Back to the old label: the same state as before, and a may open connections again.
    dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods("a")), &mut pol);
    assert_eq!(send(&dp, (A, 41004), (B, 8080), true), (TC_ACT_OK, TC_ACT_OK));
    // An unchanged resync writes nothing.
    assert_eq!(dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods("a")), &mut pol), (0, 0));
}

#[test]
fn policy_state_survives_a_restart_without_rewrites() {
    let (mut dp, _pol) = setup("a");
    let mut restored = PolicyState::restore(&dp.maps);
    assert_eq!(dp.apply_policy_yaml(&format!("{}---\n{POLICIES}", pods("a")), &mut restored), (0, 0));
}


#[test]
fn through_a_service_between_isolated_pods_of_one_node_the_reply_gets_back() {
    let (dp, _pol) = setup("a");
    let mut dp = dp;
    dp.apply_yaml("kind: Service\nmetadata: {name: b, namespace: t}\nspec: {clusterIP: 172.30.7.11, ports: [{port: 80, targetPort: 8080}]}\n---\nkind: EndpointSlice\nmetadata: {name: b-1, namespace: t, labels: {kubernetes.io/service-name: b}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.11], nodeName: node1}]\n");
    // First the backend directly, then the same client port through the Service: the second
    // connection has the same tuple after translation as the first one had.
    for dst in [(B, 8080), ("172.30.7.11", 80)] {
        let (out, into_b) = send(&dp, (A, 42000), dst, true);
        assert_eq!((out, into_b), (TC_ACT_OK, TC_ACT_OK), "{dst:?}");
        // b's reply leaves b (translated back to the Service on b's veth when it was one) and
        // enters a, which is isolated for ingress.
        let reply = dp.from_pod(&tcp((ip(B), 8080), (ip(A), 42000), false, b"ok"));
        assert_eq!(reply.action, TC_ACT_OK);
        assert_eq!(dp.to_pod(&reply.data).action, TC_ACT_OK, "reply of {dst:?}");
    }
    // Only replies: b reaching a's port 42000 on its own is still denied.
    assert_eq!(send(&dp, (B, 8081), (A, 42000), true).0, TC_ACT_SHOT);
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

#[test]
fn icmp_errors_about_an_allowed_connection_pass_others_do_not() {
    let (dp, _pol) = setup("a");
    // c -> b over UDP is allowed (c's egress, b's ingress from c).
    let dgram = udp((ip(C), 5000), (ip(B), 53), b"q");
    assert_eq!(dp.to_pod(&dp.from_pod(&dgram).data).action, TC_ACT_OK);
    // b answers "port unreachable" about it: out of b (egress-isolated), into c (ingress-isolated).
    let err = unreachable(B, C, &dgram);
    assert_eq!(dp.from_pod(&err).action, TC_ACT_OK, "related error leaving b");
    assert_eq!(dp.to_pod(&err).action, TC_ACT_OK, "related error entering c");
    // The same error about a datagram c never sent is not related: dropped.
    let other = unreachable(B, C, &udp((ip(C), 5001), (ip(B), 53), b"q"));
    assert_eq!(dp.from_pod(&other).action, TC_ACT_SHOT);
    // Pings are not errors: into an isolated pod with port rules only... c allows nothing in.
    let ping = raw_ipv4(ip(B), ip(C), 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    assert_eq!(dp.to_pod(&ping).action, TC_ACT_SHOT);
}
