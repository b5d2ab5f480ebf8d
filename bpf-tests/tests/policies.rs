//! Service options on the packet path (BPF_PROG_TEST_RUN): session affinity with its timeout,
//! loadBalancerSourceRanges, traffic policies and what an empty frontend does.
use std::{collections::BTreeSet, time::Duration};

use bpf_tests::{fixture::*, packet::*};
use dataplane_common::DropReason;

fn lb(spec_extra: &str, endpoints: &[(&str, &str)]) -> Datapath {
    let eps: String = endpoints.iter().map(|(a, n)| format!("- {{addresses: [{a}], nodeName: {n}}}\n")).collect();
    let mut dp = Datapath::new();
    dp.apply_yaml(&format!(
        r#"kind: Service
metadata: {{name: s, namespace: t}}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.10
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
{spec_extra}
status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.1}}]}}}}
---
kind: EndpointSlice
metadata: {{name: s-1, namespace: t, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
{eps}"#
    ));
    dp
}

fn backend(dp: &Datapath, client: &str, sport: u16, dst: &str, port: u16) -> u32 {
    let r = dp.from_pod(&tcp((ip(client), sport), (ip(dst), port), true, b""));
    assert_eq!(r.action, TC_ACT_OK, "{r:?}");
    u32::from(tuple(&r.data).dst)
}

#[test]
fn client_ip_affinity_sticks_until_its_timeout() {
    let dp = lb("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}", &[("10.0.1.1", "n2"), ("10.0.1.2", "n2"), ("10.0.1.3", "n2")]);
    let first = backend(&dp, "10.0.0.2", 1000, "172.30.0.10", 80);
    for sport in 1001..1100 {
        assert_eq!(backend(&dp, "10.0.0.2", sport, "172.30.0.10", 80), first);
    }
    // Another client is balanced on its own.
    let others: BTreeSet<u32> = (0..60).map(|i| backend(&dp, &format!("10.0.0.{}", 10 + i), 2000, "172.30.0.10", 80)).collect();
    assert!(others.len() > 1);
    // After the timeout the client is balanced again (and sticks to the new choice): waiting a
    // timeout before each try, it lands elsewhere within a few tries (each try stays with
    // `first` with probability 1/3).
    let mut moved = false;
    for sport in 3000..3012 {
        std::thread::sleep(Duration::from_millis(1050));
        if backend(&dp, "10.0.0.2", sport, "172.30.0.10", 80) != first {
            moved = true;
            break;
        }
    }
    assert!(moved, "affinity never expired");
}

#[test]
fn source_ranges_guard_the_loadbalancer_ip_only() {
    let dp = lb("  loadBalancerSourceRanges: [10.0.0.0/28, 192.0.2.7/32]", &[("10.0.1.1", "n2")]);
    assert_eq!(backend(&dp, "10.0.0.2", 1000, "198.51.100.1", 80), u32::from(ip("10.0.1.1")));
    let r = dp.from_pod(&tcp((ip("10.0.0.100"), 1000), (ip("198.51.100.1"), 80), true, b""));
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(dp.stat(DropReason::SourceRange.stat()), 1);
    // NodePort and ClusterIP of the same Service are not restricted.
    assert_eq!(backend(&dp, "10.0.0.100", 1001, "192.168.0.2", 30080), u32::from(ip("10.0.1.1")));
    assert_eq!(backend(&dp, "10.0.0.100", 1002, "172.30.0.10", 80), u32::from(ip("10.0.1.1")));
}

#[test]
fn internal_traffic_policy_local_drops_without_a_local_endpoint() {
    let dp = lb("  internalTrafficPolicy: Local", &[("10.0.1.1", "node2")]);
    let r = dp.from_pod(&tcp((ip("10.0.0.2"), 1000), (ip("172.30.0.10"), 80), true, b""));
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(dp.stat(DropReason::NoLocalEndpoint.stat()), 1);
    let dp = lb("  internalTrafficPolicy: Local", &[("10.0.1.1", "node2"), ("10.0.0.9", "node1")]);
    for sport in 0..30 {
        assert_eq!(backend(&dp, "10.0.0.2", 1000 + sport, "172.30.0.10", 80), u32::from(ip("10.0.0.9")));
    }
}
