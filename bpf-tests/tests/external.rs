//! Traffic from outside the node through `ferry_from_world` (BPF_PROG_TEST_RUN): source
//! translation for remote backends with its own port range, replies, and tuples that would
//! collide after translation.
use std::collections::BTreeSet;

use bpf_tests::{fixture::*, packet::*};
use dataplane_common::{stat, CT_F_REDIRECT, CT_F_SNAT};

const NODE: &str = "192.168.0.2";

/// A NodePort Service and its slice, as YAML (apply several together: each apply is the whole state).
fn nodeport_yaml(name: &str, vip: &str, node_port: u16, endpoints: &[(&str, &str)]) -> String {
    let eps: String = endpoints.iter().map(|(a, n)| format!("- {{addresses: [{a}], nodeName: {n}}}\n")).collect();
    format!(
        r#"kind: Service
metadata: {{name: {name}, namespace: t}}
spec:
  type: NodePort
  clusterIP: {vip}
  ports: [{{port: 80, targetPort: 8080, nodePort: {node_port}}}]
---
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
{eps}"#
    )
}

fn nodeport(dp: &mut Datapath, name: &str, vip: &str, node_port: u16, endpoints: &[(&str, &str)]) {
    dp.apply_yaml(&nodeport_yaml(name, vip, node_port, endpoints));
}

/// A packet's translation succeeded if it was passed on or redirected through the FIB.
fn forwarded(r: &Run) -> bool {
    r.action == TC_ACT_OK || r.action == TC_ACT_REDIRECT
}

#[test]
fn remote_backend_gets_the_node_address_and_a_port_from_the_range() {
    let mut dp = Datapath::new();
    nodeport(&mut dp, "web", "172.30.0.10", 30080, &[("10.180.0.1", "node2")]);
    let r = dp.from_world(&tcp((ip("203.0.113.9"), 40000), (ip(NODE), 30080), true, b""));
    assert!(forwarded(&r), "{r:?}");
    let t = tuple(&r.data);
    assert_eq!((t.src, t.dst, t.dport), (ip(NODE), ip("10.180.0.1"), 8080));
    assert!((61000..=65535).contains(&t.sport), "source port {} outside the SNAT range", t.sport);
    assert_checksums(&r.data);
    // The reply comes back to the node and leaves as the NodePort, to the client.
    let reply = dp.from_world(&tcp((ip("10.180.0.1"), 8080), (ip(NODE), t.sport), false, b"ok"));
    assert!(forwarded(&reply));
    assert_eq!(reply.data[14..], tcp((ip(NODE), 30080), (ip("203.0.113.9"), 40000), false, b"ok")[14..], "IP and TCP bytes");
    let flags: Vec<u32> = dp.maps.ct.rows().iter().map(|r| r.entry.flags).collect();
    assert!(flags.iter().all(|f| f & CT_F_SNAT != 0) && flags.iter().all(|f| f & CT_F_REDIRECT != 0), "{flags:x?}");
    assert_eq!(dp.stat(stat::EXTERNAL_NEW), 1);
}

#[test]
fn local_backend_of_a_local_policy_keeps_the_client_address_and_replies_leave_as_the_nodeport() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&nodeport_yaml("web", "172.30.0.10", 30080, &[("10.0.0.7", "node1")]).replace("type: NodePort", "type: NodePort\n  externalTrafficPolicy: Local"));
    let r = dp.from_world(&tcp((ip("203.0.113.9"), 40000), (ip(NODE), 30080), true, b""));
    assert_eq!(r.action, TC_ACT_OK, "DNAT only: the stack routes it to the pod");
    assert_eq!(r.data, tcp((ip("203.0.113.9"), 40000), (ip("10.0.0.7"), 8080), true, b""));
    // The pod answers; on its veth the reply becomes the NodePort's and must be sent out via the
    // FIB (its source is now a node address, which the input path would drop as martian).
    let reply = dp.from_pod(&tcp((ip("10.0.0.7"), 8080), (ip("203.0.113.9"), 40000), false, b"ok"));
    assert!(forwarded(&reply));
    assert_eq!(reply.data[14..], tcp((ip(NODE), 30080), (ip("203.0.113.9"), 40000), false, b"ok")[14..]);
}

#[test]
fn a_cluster_policy_nodeport_masquerades_to_a_local_backend_too() {
    // kube-proxy masquerades every connection to an external address of an
    // externalTrafficPolicy Cluster Service, whichever backend it gets.
    let mut dp = Datapath::new();
    nodeport(&mut dp, "web", "172.30.0.10", 30080, &[("10.0.0.7", "node1")]);
    let r = dp.from_world(&tcp((ip("203.0.113.9"), 40000), (ip(NODE), 30080), true, b""));
    assert!(forwarded(&r), "{r:?}");
    let t = tuple(&r.data);
    assert_eq!((t.src, t.dst, t.dport), (ip(NODE), ip("10.0.0.7"), 8080));
    assert!((61000..=65535).contains(&t.sport), "source port {}", t.sport);
    assert_checksums(&r.data);
    // The pod answers the node; on its veth the reply becomes the NodePort's, to the client.
    let reply = dp.from_pod(&tcp((ip("10.0.0.7"), 8080), (ip(NODE), t.sport), false, b"ok"));
    assert!(forwarded(&reply));
    assert_eq!(reply.data[14..], tcp((ip(NODE), 30080), (ip("203.0.113.9"), 40000), false, b"ok")[14..]);
}

#[test]
fn a_pod_reaching_a_cluster_policy_nodeport_is_masqueraded_and_answered_through_the_node() {
    let mut dp = Datapath::new();
    nodeport(&mut dp, "web", "172.30.0.10", 30080, &[("10.180.0.1", "node2")]);
    let r = dp.from_pod(&tcp((ip("10.0.0.2"), 40000), (ip(NODE), 30080), true, b""));
    assert!(forwarded(&r), "{r:?}");
    let t = tuple(&r.data);
    assert_eq!((t.src, t.dst, t.dport), (ip(NODE), ip("10.180.0.1"), 8080), "masqueraded to the node");
    assert!((61000..=65535).contains(&t.sport), "source port {}", t.sport);
    assert_checksums(&r.data);
    // The backend answers the node: the reply comes in from outside and is turned back towards
    // the pod there, as coming from the NodePort.
    let reply = dp.from_world(&tcp((ip("10.180.0.1"), 8080), (ip(NODE), t.sport), false, b"ok"));
    assert!(forwarded(&reply), "{reply:?}");
    assert_eq!(reply.data[14..], tcp((ip(NODE), 30080), (ip("10.0.0.2"), 40000), false, b"ok")[14..]);
    // A packet from outside that claims the pod's tuple is not the pod's connection.
    let forged = dp.from_world(&tcp((ip("10.0.0.2"), 40000), (ip(NODE), 30080), false, b"x"));
    assert!(tuple(&forged.data).dst != ip("10.180.0.1") || forged.action == TC_ACT_SHOT, "{forged:?}");
}

#[test]
fn the_same_client_port_through_two_services_to_one_backend_does_not_collide() {
    // Client 10.0.0.2:5000 opens a connection to each of two Services that share backend
    // 10.0.1.1:8080. Translated, both would be 10.0.0.2:5000 -> 10.0.1.1:8080.
    let mut dp = Datapath::new();
    dp.apply_yaml(&format!(
        "{}---\n{}",
        nodeport_yaml("a", "172.30.0.10", 30080, &[("10.0.1.1", "node2")]),
        nodeport_yaml("b", "172.30.0.11", 30081, &[("10.0.1.1", "node2")])
    ));
    let r1 = dp.from_pod(&tcp((ip("10.0.0.2"), 5000), (ip("172.30.0.10"), 80), true, b""));
    let r2 = dp.from_pod(&tcp((ip("10.0.0.2"), 5000), (ip("172.30.0.11"), 80), true, b""));
    let (t1, t2) = (tuple(&r1.data), tuple(&r2.data));
    assert_eq!((t1.src, t1.sport, t1.dst), (ip("10.0.0.2"), 5000, ip("10.0.1.1")));
    assert_eq!((t2.src, t2.dst), (ip("10.0.0.2"), ip("10.0.1.1")));
    assert_ne!(t2.sport, 5000, "the second connection gets another source port");
    assert_eq!(dp.stat(stat::PORT_REMAP), 1);
    assert_checksums(&r2.data);
    // Both connections' replies find their own way back.
    let back1 = dp.to_pod(&tcp((ip("10.0.1.1"), 8080), (ip("10.0.0.2"), 5000), false, b"1"));
    let back2 = dp.to_pod(&tcp((ip("10.0.1.1"), 8080), (ip("10.0.0.2"), t2.sport), false, b"2"));
    assert_eq!(back1.data, tcp((ip("172.30.0.10"), 80), (ip("10.0.0.2"), 5000), false, b"1"));
    assert_eq!(back2.data, tcp((ip("172.30.0.11"), 80), (ip("10.0.0.2"), 5000), false, b"2"));
    // And both keep going the same way.
    let again = dp.from_pod(&tcp((ip("10.0.0.2"), 5000), (ip("172.30.0.11"), 80), false, b"x"));
    assert_eq!(tuple(&again.data).sport, t2.sport);
}

#[test]
fn two_outside_clients_never_share_a_translated_tuple() {
    let mut dp = Datapath::new();
    nodeport(&mut dp, "web", "172.30.0.10", 30080, &[("10.180.0.1", "node2")]);
    let mut seen = BTreeSet::new();
    for i in 0..500u16 {
        let client = format!("203.0.113.{}", 1 + i % 200);
        let r = dp.from_world(&tcp((ip(&client), 1024 + i), (ip(NODE), 30080), true, b""));
        let t = tuple(&r.data);
        assert!(seen.insert(t.sport), "source port {} used twice towards the same backend", t.sport);
    }
}
