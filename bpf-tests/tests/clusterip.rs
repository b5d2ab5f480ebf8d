//! ClusterIP translation through BPF_PROG_TEST_RUN on the real programs.
use bpf_tests::{fixture::*, packet::*};

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 172.30.0.10
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.1.5]
"#;

#[test]
fn tcp_syn_to_clusterip_is_translated() {
    let mut dp = Datapath::new();
    dp.apply_yaml(SVC);
    let pkt = tcp((ip("10.0.0.2"), 40000), (ip("172.30.0.10"), 80), true, b"");
    let r = dp.from_pod(&pkt);
    assert_eq!(r.action, TC_ACT_OK);
    let t = tuple(&r.data);
    assert_eq!((t.src, t.sport, t.dst, t.dport), (ip("10.0.0.2"), 40000, ip("10.0.1.5"), 8080));
    assert_checksums(&r.data);
}
