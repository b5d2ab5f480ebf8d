//! Limits that keep one sender from hurting everyone else, on the real programs
//! (BPF_PROG_TEST_RUN): refusals rate-limited as the kernel's icmp_ratelimit is, and the
//! per-source cap on assured (never evicted) connections in both conntracks.
use std::net::Ipv4Addr;

use bpf_tests::{fixture::*, packet::*};
use dataplane_agent::agent::PolicyState;
use dataplane_common::{stat, DropReason, NodeConfig, CT_SOURCE_POLICY, CT_SOURCE_SERVICE};

const SVC: &str = "172.30.0.10";
const BACKEND: &str = "10.180.0.1";

fn web(endpoints: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec: {{clusterIP: {SVC}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080}}]\nendpoints: {endpoints}\n"
    )
}

fn set(dp: &mut Datapath, f: impl Fn(&mut NodeConfig)) {
    let mut c = dp.maps.config.get(&0, 0).unwrap_or_default();
    f(&mut c);
    dp.maps.set_config(c).unwrap();
}

#[test]
fn refusals_are_rate_limited_like_the_kernels_icmp() {
    let mut dp = Datapath::new();
    // No endpoints: every SYN is refused with a RST.
    dp.apply_yaml(&web("[]"));
    set(&mut dp, |c| {
        c.refusals_per_s = 20;
        c.refusal_burst = 5;
    });
    let limited = dp.stat(DropReason::RefusalLimited.stat());
    let refused = |dp: &Datapath, n: u16| (0..n).filter(|i| refusal(&dp.from_pod(&tcp((ip("10.0.0.2"), 30000 + i), (ip(SVC), 80), true, b"")).data).is_some()).count();
    // A burst of 200: the bucket's 5 (and at most one refilled while they run) are answered.
    let first = refused(&dp, 200);
    assert!((5..=6).contains(&first), "{first} refusals out of 200 sent at once");
    assert_eq!(dp.stat(DropReason::RefusalLimited.stat()), limited + 200 - first as u64, "every other packet dropped and counted");
    // Half a second later the bucket holds 5 again (20/s, capped at the burst).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let again = refused(&dp, 50);
    assert!((5..=6).contains(&again), "{again} refusals after 0.5 s");
    // The default (1000/s, burst 50) when the agent leaves it 0.
    set(&mut dp, |c| {
        c.refusals_per_s = 0;
        c.refusal_burst = 0;
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let default = refused(&dp, 500);
    assert!((50..=120).contains(&default), "{default} refusals with the kernel's defaults");
}

/// A client's TCP handshake through the ClusterIP: established (assured unless limited).
fn connect(dp: &Datapath, client: (Ipv4Addr, u16)) {
    let syn = dp.from_pod(&tcp_flags(client, (ip(SVC), 80), "S", b""));
    let t = tuple(&syn.data);
    dp.to_pod(&tcp_flags((t.dst, t.dport), client, "SA", b""));
    dp.from_pod(&tcp_flags(client, (ip(SVC), 80), "A", b""));
}

fn assured_of(dp: &Datapath, client: Ipv4Addr) -> usize {
    dp.maps.ct.rows().iter().filter(|r| r.assured && !r.is_reply() && r.key.saddr_be == u32::from_ne_bytes(client.octets())).count()
}

#[test]
fn one_source_holds_at_most_its_share_of_assured_service_connections() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&format!("[{{addresses: [{BACKEND}]}}]")));
    set(&mut dp, |c| c.ct_per_source_max = 3);
    let (greedy, other) = (ip("10.0.0.2"), ip("10.0.0.3"));
    let limited = dp.stat(stat::CT_SOURCE_LIMIT);
    for port in 0..6 {
        connect(&dp, (greedy, 40000 + port));
    }
    assert_eq!(assured_of(&dp, greedy), 3, "the greedy source's assured connections");
    assert!(dp.stat(stat::CT_SOURCE_LIMIT) >= limited + 3);
    // Its other connections still work (tracked in the LRU map, evictable first).
    let data = dp.from_pod(&tcp_flags((greedy, 40005), (ip(SVC), 80), "PA", b"still"));
    assert_eq!(tuple(&data.data).dst, ip(BACKEND));
    // Another source is not affected.
    connect(&dp, (other, 50000));
    assert_eq!(assured_of(&dp, other), 1);
    let counts = dp.maps.ct_sources(greedy);
    assert_eq!(counts[CT_SOURCE_SERVICE], 3, "the datapath's count of the greedy source");
    // Closing one (RST) frees a place for the next.
    dp.from_pod(&tcp_flags((greedy, 40000), (ip(SVC), 80), "R", b""));
    connect(&dp, (greedy, 40100));
    assert_eq!(assured_of(&dp, greedy), 3);
    assert!(dp.maps.ct.rows().iter().any(|r| r.assured && u16::from_be(r.key.sport_be) == 40100), "the new connection took the freed place");
}

#[test]
fn one_pod_holds_at_most_its_share_of_assured_policy_connections() {
    let net = bpf_tests::podnet::PodNet::new("lim", "192.168.0.2", &["10.0.0.10", "10.0.0.11"]);
    let mut dp = Datapath::new();
    let mut pol = PolicyState::default();
    dp.apply_policy_yaml(
        "kind: Pod\nmetadata: {name: a, namespace: t, labels: {app: a}}\nspec: {nodeName: node1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.10}\n---\n\
         kind: Pod\nmetadata: {name: b, namespace: t, labels: {app: b}}\nspec: {nodeName: node1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.11}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: b-in, namespace: t}\nspec: {podSelector: {matchLabels: {app: b}}, ingress: [{from: [{podSelector: {}}]}]}\n",
        &mut pol,
    );
    set(&mut dp, |c| c.ct_per_source_max = 2);
    let b_if = net.ifs[1];
    let run = |pkt: Vec<u8>| dp.run_skb(dataplane_common::progs::TO_POD, &pkt, &dataplane_agent::trace::SkbIn { ifindex: b_if, ..Default::default() }).0.action;
    let run_out = |pkt: Vec<u8>| dp.run_skb(dataplane_common::progs::FROM_POD, &pkt, &dataplane_agent::trace::SkbIn { ifindex: b_if, ..Default::default() }).0.action;
    let (a, b) = (ip("10.0.0.10"), ip("10.0.0.11"));
    for port in 0..5u16 {
        assert_eq!(run(tcp_flags((a, 41000 + port), (b, 80), "S", b"")), TC_ACT_OK);
        assert_eq!(run_out(tcp_flags((b, 80), (a, 41000 + port), "SA", b"")), TC_ACT_OK);
        assert_eq!(run(tcp_flags((a, 41000 + port), (b, 80), "A", b"")), TC_ACT_OK);
    }
    let assured = dp.maps.pol_ct_assured.keys().flatten().filter(|k| k.tuple.saddr_be == u32::from_ne_bytes(a.octets())).count();
    assert_eq!(assured, 2, "a's assured connections into b (forward entries)");
    assert_eq!(dp.maps.ct_sources(a)[CT_SOURCE_POLICY], 2);
    // The rest still pass, from the LRU map.
    assert_eq!(run(tcp_flags((a, 41004), (b, 80), "PA", b"x")), TC_ACT_OK);
}
