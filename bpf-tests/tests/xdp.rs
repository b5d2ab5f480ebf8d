//! NodePort acceleration in XDP (BPF_PROG_TEST_RUN on the XDP program): what it finishes itself,
//! and what it leaves untouched for the tc path, which then translates it from the same
//! conntrack entry.
use bpf_tests::{fixture::*, packet::*};
use dataplane_common::stat;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const NODE: &str = "192.168.0.2";

fn nodeport(endpoints: &[(&str, &str)], extra: &str) -> Datapath {
    let eps: String = endpoints.iter().map(|(a, n)| format!("- {{addresses: [{a}], nodeName: {n}}}\n")).collect();
    let mut dp = Datapath::new();
    dp.apply_yaml(&format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec:\n  type: LoadBalancer\n  clusterIP: 172.30.0.10\n{extra}  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
    ));
    dp
}

/// externalTrafficPolicy Local: the client's address is kept, so XDP only rewrites the
/// destination. (With Cluster every connection is masqueraded and needs tc's redirect.)
const LOCAL: &str = "  externalTrafficPolicy: Local\n";

#[test]
fn local_backend_is_translated_in_xdp_exactly() {
    let dp = nodeport(&[("10.0.0.7", "node1")], LOCAL);
    for (first, payload) in [(true, &b""[..]), (false, &b"GET /"[..])] {
        let r = dp.xdp(&tcp((ip("203.0.113.9"), 40000), (ip(NODE), 30080), first, payload));
        assert_eq!(r.action, XDP_PASS, "handed to the stack, translated");
        assert_eq!(r.data, tcp((ip("203.0.113.9"), 40000), (ip("10.0.0.7"), 8080), first, payload));
    }
    // UDP too, checksum included (and a zero checksum stays zero).
    let mut dp = nodeport(&[("10.0.0.7", "node1")], LOCAL);
    dp.apply_yaml(
        "kind: Service\nmetadata: {name: dns, namespace: t}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 172.30.0.53\n  ports: [{port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}]\n---\n\
         kind: EndpointSlice\nmetadata: {name: dns-1, namespace: t, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{port: 5353, protocol: UDP}]\nendpoints: [{addresses: [10.0.0.53], nodeName: node1}]\n",
    );
    let r = dp.xdp(&udp((ip("203.0.113.9"), 40001), (ip(NODE), 30053), b"query"));
    assert_eq!(r.data, udp((ip("203.0.113.9"), 40001), (ip("10.0.0.53"), 5353), b"query"));
    let mut zero = udp((ip("203.0.113.9"), 40002), (ip(NODE), 30053), b"query");
    zero[40..42].copy_from_slice(&[0, 0]);
    let r = dp.xdp(&zero);
    assert_eq!((&r.data[40..42], tuple(&r.data).dst), (&[0u8, 0][..], ip("10.0.0.53")));
    assert_checksums(&r.data);
    assert!(dp.stat(stat::XDP_FORWARD) >= 2);
}

#[test]
fn what_xdp_cannot_finish_reaches_tc_untouched_and_tc_finishes_it() {
    // A backend on another node: source translation plus a redirect. In this test the FIB does
    // not send it back out the ingress interface, so XDP passes it on untouched...
    let dp = nodeport(&[("10.180.0.1", "node2")], "");
    let pkt = tcp((ip("203.0.113.9"), 40000), (ip(NODE), 30080), true, b"");
    let r = dp.xdp(&pkt);
    assert_eq!((r.action, &r.data), (XDP_PASS, &pkt));
    // ...and tc translates it from the conntrack entry XDP created, to the same backend.
    let t = dp.from_world(&pkt);
    let out = tuple(&t.data);
    assert_eq!((out.src, out.dst, out.dport), (ip(NODE), ip("10.180.0.1"), 8080));
    assert_eq!(dp.stat(stat::EXTERNAL_NEW), 1, "one new connection, created once (in XDP)");
    // externalTrafficPolicy Cluster to a backend on this node: masqueraded too (kube-proxy's
    // rule), so the packet needs the redirect into the pod's veth: tc finishes it.
    let dp = nodeport(&[("10.0.0.7", "node1")], "");
    let r = dp.xdp(&pkt);
    assert_eq!((r.action, &r.data), (XDP_PASS, &pkt));
    let out = tuple(&dp.from_world(&pkt).data);
    assert_eq!((out.src, out.dst, out.dport), (ip(NODE), ip("10.0.0.7"), 8080));
}

#[test]
fn xdp_leaves_everything_else_alone_and_drops_outside_source_ranges() {
    let dp = nodeport(&[("10.0.0.7", "node1")], "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [203.0.113.0/24]\n");
    for pkt in [
        tcp((ip("203.0.113.9"), 1), (ip(NODE), 22), true, b""),             // not a NodePort
        tcp((ip("203.0.113.9"), 1), (ip("172.30.0.10"), 80), true, b""),    // a ClusterIP
        sctp_init((ip("203.0.113.9"), 1), (ip(NODE), 30080)),                // not TCP/UDP: tc
        udp((ip("10.0.0.2"), 1), (ip("10.0.0.3"), 53), b"pod to pod"),
    ] {
        let r = dp.xdp(&pkt);
        assert_eq!((r.action, &r.data), (XDP_PASS, &pkt));
    }
    let r = dp.xdp(&tcp((ip("192.0.2.1"), 1), (ip("198.51.100.1"), 80), true, b""));
    assert_eq!(r.action, XDP_DROP, "outside loadBalancerSourceRanges");
    let r = dp.xdp(&tcp((ip("203.0.113.1"), 1), (ip("198.51.100.1"), 80), true, b""));
    assert_eq!(tuple(&r.data).dst, ip("10.0.0.7"));
}
