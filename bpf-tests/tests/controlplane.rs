//! End to end against a real control plane: the namespace lab with its objects from etcd,
//! kube-apiserver and kube-controller-manager (`bpf_tests::apilab`, as `cargo xtask lab
//! --api-server` runs it), the agents as the DaemonSet's ServiceAccount with deploy/'s RBAC, the
//! EndpointSlices the real controller's, and real traffic through the lab after every change.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bpf_tests::{
    apilab::{LabApi, NS},
    cluster::backends,
    lab::{self, Cluster},
};
use serde_json::json;

/// The lab of the examples through the API server, its agents started.
fn lab() -> LabApi {
    let mut l = LabApi::new(&lab::examples_dir());
    l.c.start_agents();
    l
}

/// `n` TCP requests from `from` (a pod's name, or `outside`) to `addr`, counted by who answered.
fn traffic(c: &Cluster, from: &str, addr: &str, n: usize) -> BTreeMap<String, usize> {
    let args = ["tcp", addr, &n.to_string()];
    lab::tally(&if from == "outside" { c.client_outside(&args) } else { c.client_in_pod(from, &args) })
}

/// Waits (at most 30 s) until `n` requests from `from` to `addr` are answered by exactly `who`,
/// every one of them (`who` empty: none answered), then asserts it on `n` more: a state that
/// holds, not a moment of a change.
fn expect(c: &Cluster, from: &str, addr: &str, who: &[&str], n: usize) {
    let want: BTreeSet<String> = who.iter().map(|s| s.to_string()).collect();
    let ok = |t: &BTreeMap<String, usize>| {
        let answered: BTreeSet<String> = t.keys().filter(|k| !k.starts_with("ERR")).cloned().collect();
        answered == want && (want.is_empty() || answered.len() == t.len()) && t.values().sum::<usize>() == n
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = traffic(c, from, addr, n);
        if ok(&t) {
            break;
        }
        assert!(Instant::now() < deadline, "{from} -> {addr}: want {who:?} within 30 s, got {t:?}\nnode1 agent:\n{}", c.agent_log(0));
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = traffic(c, from, addr, n);
    assert!(ok(&t), "{from} -> {addr}: want {who:?}, then got {t:?}");
}

/// Waits (at most 30 s) until every node's maps hold `count` backends for `addr:port` (`None`:
/// no frontend).
fn expect_backends(c: &Cluster, addr: &str, port: u16, count: Option<u16>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &c.nodes {
        while backends(&n.pin.path, addr, port) != count {
            assert!(Instant::now() < deadline, "{}: {addr}:{port} has {:?} backends, want {count:?}", n.name, backends(&n.pin.path, addr, port));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

const SVC: &str = "/api/v1/namespaces/lab/services";
const ALL: [&str; 3] = ["n1-pod2", "n2-pod1", "n2-pod2"];

#[test]
fn services_are_created_updated_retyped_handed_to_another_proxy_and_deleted() {
    let l = lab();
    let (c, api) = (&l.c, &l.api);
    // The examples' Services, their slices the controller's.
    expect(c, "n1-pod1", lab::TCP_VIP, &ALL, 30);
    expect(c, "outside", lab::NODEPORT_CLUSTER, &["n2-pod1"], 10);

    let web = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS}, "spec": {"clusterIP": "10.96.1.10", "selector": {"app": "echo"}, "ports": [{"name": "echo", "port": 80, "targetPort": "echo"}]}});
    api.call("POST", SVC, Some(&web), &[201]);
    expect(c, "n1-pod1", "10.96.1.10:80", &ALL, 30);

    // Port change: the old port goes, the new one serves.
    api.call("PATCH", &format!("{SVC}/web"), Some(&json!({"spec": {"ports": [{"name": "echo", "port": 81, "targetPort": "echo", "protocol": "TCP"}]}})), &[200]);
    expect(c, "n1-pod1", "10.96.1.10:81", &ALL, 30);
    expect(c, "n1-pod1", "10.96.1.10:80", &[], 3);
    expect_backends(c, "10.96.1.10", 80, None);

    // Selector change: the controller rewrites the slice to the one pod selected.
    api.call("PATCH", &format!("{SVC}/web"), Some(&json!({"spec": {"selector": {"app": null, "lab-nodeport": "cluster"}}})), &[200]);
    expect(c, "n1-pod1", "10.96.1.10:81", &["n2-pod1"], 20);
    expect_backends(c, "10.96.1.10", 81, Some(1));

    // ClusterIP -> NodePort: reachable from outside on node1's address.
    let np = json!({"spec": {"type": "NodePort", "ports": [{"name": "echo", "port": 81, "targetPort": "echo", "protocol": "TCP", "nodePort": 30090}]}});
    api.call("PATCH", &format!("{SVC}/web"), Some(&np), &[200]);
    expect(c, "outside", "192.168.77.1:30090", &["n2-pod1"], 20);
    expect(c, "n1-pod1", "10.96.1.10:81", &["n2-pod1"], 10);

    // -> LoadBalancer, its ingress IP patched into the status as a cloud controller would.
    api.call("PATCH", &format!("{SVC}/web"), Some(&json!({"spec": {"type": "LoadBalancer"}})), &[200]);
    expect(c, "outside", "172.20.1.10:81", &[], 3);
    api.call("PATCH", &format!("{SVC}/web/status"), Some(&json!({"status": {"loadBalancer": {"ingress": [{"ip": "172.20.1.10"}]}}})), &[200]);
    expect(c, "outside", "172.20.1.10:81", &["n2-pod1"], 20);
    expect(c, "outside", "192.168.77.1:30090", &["n2-pod1"], 10);

    // Back to ClusterIP: the node port and the ingress IP stop answering. The API server clears
    // the status; an ingress written to it again (a late cloud controller) must not count.
    let back = json!({"spec": {"type": "ClusterIP", "externalTrafficPolicy": null, "allocateLoadBalancerNodePorts": null, "ports": [{"name": "echo", "port": 81, "targetPort": "echo", "protocol": "TCP"}]}});
    let v = api.call("PATCH", &format!("{SVC}/web"), Some(&back), &[200]);
    assert_eq!(v["status"]["loadBalancer"], json!({}), "{v}");
    api.call("PATCH", &format!("{SVC}/web/status"), Some(&json!({"status": {"loadBalancer": {"ingress": [{"ip": "172.20.1.10"}]}}})), &[200, 422]);
    expect(c, "outside", "172.20.1.10:81", &[], 3);
    expect(c, "outside", "192.168.77.1:30090", &[], 3);
    expect(c, "n1-pod1", "10.96.1.10:81", &["n2-pod1"], 10);

    // Labelled for another proxy: the watch's selector drops it (a DELETED event), the label
    // removed brings it back.
    api.label(&format!("{SVC}/web"), "service.kubernetes.io/service-proxy-name", Some("other"));
    expect_backends(c, "10.96.1.10", 81, None);
    expect(c, "n1-pod1", "10.96.1.10:81", &[], 3);
    api.label(&format!("{SVC}/web"), "service.kubernetes.io/service-proxy-name", None);
    expect(c, "n1-pod1", "10.96.1.10:81", &["n2-pod1"], 20);

    // Deleted.
    api.call("DELETE", &format!("{SVC}/web"), None, &[200]);
    expect_backends(c, "10.96.1.10", 81, None);
    expect(c, "n1-pod1", "10.96.1.10:81", &[], 3);
    // The others untouched throughout.
    expect(c, "n1-pod1", lab::TCP_VIP, &ALL, 30);
}

#[test]
fn slices_follow_readiness_and_scaling_past_one_slice() {
    let l = lab();
    let (c, api) = (&l.c, &l.api);
    // A readiness flip: the controller marks the endpoint not ready, traffic stops going there.
    api.set_ready(NS, "n2-pod1", false);
    assert_eq!(api.wait_endpoints(NS, "echo-tcp", 2), 1);
    expect(c, "n1-pod1", lab::TCP_VIP, &["n1-pod2", "n2-pod2"], 30);
    expect_backends(c, "10.96.0.10", 80, Some(2));
    api.set_ready(NS, "n2-pod1", true);
    api.wait_endpoints(NS, "echo-tcp", 3);
    expect(c, "n1-pod1", lab::TCP_VIP, &ALL, 30);

    // Scaling past the controller's 100 endpoints per slice: two real pods and 120 Pod objects
    // whose addresses (10.201.2.128/25) node2 translates to n2-pod2 (a DNAT rule in node2's
    // namespace: Ferry lets no pod answer for addresses not its own), so every endpoint answers
    // and the real ones are told apart by name.
    let n2pod2 = c.pod("n2-pod2");
    c.nodes[1].ns.exec_ok(&["nft", "add", "table", "ip", "fakepods"]);
    c.nodes[1].ns.exec_ok(&["nft", "add", "chain", "ip", "fakepods", "pre", "{ type nat hook prerouting priority dstnat; }"]);
    c.nodes[1].ns.exec_ok(&["nft", "add", "rule", "ip", "fakepods", "pre", "ip", "daddr", "10.201.2.128/25", "dnat", "to", &n2pod2.ip.to_string()]);
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "many", "namespace": NS}, "spec": {"clusterIP": "10.96.2.10", "selector": {"many": "yes"}, "ports": [{"name": "echo", "port": 80, "targetPort": "echo"}]}});
    api.call("POST", SVC, Some(&svc), &[201]);
    for p in ["n1-pod2", "n2-pod1"] {
        api.label(&format!("/api/v1/namespaces/{NS}/pods/{p}"), "many", Some("yes"));
    }
    let labels = BTreeMap::from([("many".to_string(), "yes".to_string())]);
    let t0 = Instant::now();
    for i in 0..120u8 {
        api.pod(NS, &format!("many-{i:03}"), "node2", Ipv4Addr::new(10, 201, 2, 128 + i), &labels, true);
    }
    eprintln!("120 Pod objects registered in {:?}", t0.elapsed());
    let slices = api.wait_endpoints(NS, "many", 122);
    assert!(slices >= 2, "122 endpoints in {slices} slice(s)");
    expect_backends(c, "10.96.2.10", 80, Some(122));
    // The Pod objects' addresses answer (as n2-pod2), directly and through the ClusterIP.
    expect(c, "n1-pod1", &format!("10.201.2.130:{}", lab::ECHO_TCP_PORT), &["n2-pod2"], 5);
    let t = traffic(c, "n1-pod1", "10.96.2.10:80", 20);
    assert!(t.keys().all(|k| !k.starts_with("ERR")), "{t:?}");
    // Every endpoint answers; the real pods among them too (1000 requests over 122 endpoints:
    // each real one misses all with a chance of 0.03 %).
    let t = traffic(c, "n1-pod1", "10.96.2.10:80", 1000);
    assert_eq!(t.values().sum::<usize>(), 1000, "{t:?}");
    assert!(t.keys().all(|k| ["n1-pod2", "n2-pod1", "n2-pod2"].contains(&k.as_str())), "{t:?}");
    assert!(t.get("n1-pod2").is_some_and(|n| *n >= 1) && t.get("n2-pod1").is_some_and(|n| *n >= 1), "{t:?}");

    // Scaled down to the two real pods and two others; then readiness flips among many.
    for i in 2..120u8 {
        api.delete_pod(NS, &format!("many-{i:03}"));
    }
    api.wait_endpoints(NS, "many", 4);
    expect_backends(c, "10.96.2.10", 80, Some(4));
    for i in 0..2u8 {
        api.set_ready(NS, &format!("many-{i:03}"), false);
    }
    api.wait_endpoints(NS, "many", 2);
    expect(c, "n1-pod1", "10.96.2.10:80", &["n1-pod2", "n2-pod1"], 30);
    expect_backends(c, "10.96.2.10", 80, Some(2));
}

#[test]
fn network_policy_follows_pod_and_namespace_labels() {
    let t0 = Instant::now();
    let mut l = lab();
    // A pod of another namespace, on node1.
    l.api.namespace("guest", &BTreeMap::new());
    l.c.add_pod(0, "g-pod", Ipv4Addr::new(10, 201, 1, 20));
    l.api.pod("guest", "g-pod", "node1", Ipv4Addr::new(10, 201, 1, 20), &BTreeMap::new(), true);
    let (c, api) = (&l.c, &l.api);
    let db = format!("{}:{}", lab::pod_ip_of("n2-pod2"), lab::ECHO_TCP_PORT);
    api.label(&format!("/api/v1/namespaces/{NS}/pods/n2-pod2"), "db", Some("yes"));
    expect(c, "n1-pod1", &db, &["n2-pod2"], 5);
    expect(c, "g-pod", &db, &["n2-pod2"], 5);

    // n2-pod2 admits pods of its namespace labelled access=yes, and any pod of a namespace
    // labelled team=blue.
    let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "db", "namespace": NS}, "spec": {
        "podSelector": {"matchLabels": {"db": "yes"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"access": "yes"}}}, {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]
    }});
    api.call("POST", "/apis/networking.k8s.io/v1/namespaces/lab/networkpolicies", Some(&policy), &[201]);
    expect(c, "n1-pod1", &db, &[], 2);
    expect(c, "g-pod", &db, &[], 2);
    // Others stay reachable: the policy selects n2-pod2 only.
    expect(c, "n1-pod1", &format!("{}:{}", lab::pod_ip_of("n2-pod1"), lab::ECHO_TCP_PORT), &["n2-pod1"], 5);

    // A pod label admits n1-pod1; removed, it is denied again.
    let n1pod1 = format!("/api/v1/namespaces/{NS}/pods/n1-pod1");
    api.label(&n1pod1, "access", Some("yes"));
    expect(c, "n1-pod1", &db, &["n2-pod2"], 5);
    expect(c, "g-pod", &db, &[], 2);
    api.label(&n1pod1, "access", None);
    expect(c, "n1-pod1", &db, &[], 2);

    // A namespace label admits every pod of guest; the label on a pod of guest does not.
    api.label("/api/v1/namespaces/guest/pods/g-pod", "access", Some("yes"));
    expect(c, "g-pod", &db, &[], 2);
    api.label("/api/v1/namespaces/guest", "team", Some("blue"));
    expect(c, "g-pod", &db, &["n2-pod2"], 5);
    expect(c, "n1-pod1", &db, &[], 2);
    api.label("/api/v1/namespaces/guest", "team", None);
    expect(c, "g-pod", &db, &[], 2);

    // The policy deleted: everyone again.
    api.call("DELETE", "/apis/networking.k8s.io/v1/namespaces/lab/networkpolicies/db", None, &[200]);
    expect(c, "n1-pod1", &db, &["n2-pod2"], 5);
    expect(c, "g-pod", &db, &["n2-pod2"], 5);
    // Past the node lifecycle controller's 50 s grace period, the Leases the harness renews keep
    // the nodes Ready (else the controller marks their pods not ready, and slices empty).
    assert!(t0.elapsed() > Duration::from_secs(50), "{:?}", t0.elapsed());
    for n in ["node1", "node2"] {
        let node = api.call("GET", &format!("/api/v1/nodes/{n}"), None, &[200]);
        let ready = node["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").cloned().unwrap_or_default();
        assert_eq!(ready["status"], "True", "{n}: {ready}");
    }
}

/// The node1 agent's `ferry_watch_<what>_total`.
fn watch_metric(c: &Cluster, what: &str) -> u64 {
    let out = c.nodes[0].ns.cmd(&["curl", "-s", "--max-time", "5", "http://127.0.0.1:10249/metrics"]).output().unwrap();
    let m = String::from_utf8_lossy(&out.stdout).into_owned();
    m.lines().find_map(|l| l.strip_prefix(&format!("ferry_watch_{what}_total "))).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no ferry_watch_{what}_total in:\n{m}"))
}

#[test]
fn an_api_server_restart_and_an_etcd_compaction_are_survived() {
    let l = lab();
    let (c, api) = (&l.c, &l.api);
    let svc = |name: &str, ip: &str| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": {"clusterIP": ip, "selector": {"app": "echo"}, "ports": [{"name": "echo", "port": 80, "targetPort": "echo"}]}});
    // An established connection through a ClusterIP.
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let first = s.backend();

    // kube-apiserver killed and started again: the connection lives on, the agents re-watch and
    // pick up what changes after.
    let t0 = Instant::now();
    api.cp.restart_apiserver();
    eprintln!("kube-apiserver restarted in {:?}", t0.elapsed());
    for _ in 0..5 {
        assert_eq!(s.backend(), first, "the connection moved");
    }
    api.call("POST", SVC, Some(&svc("after", "10.96.3.10")), &[201]);
    expect(c, "n1-pod1", "10.96.3.10:80", &ALL, 30);

    // etcd compacted while node1's agent is stopped (SIGSTOP) behind changes: the API server
    // restarted after the compaction has a watch cache newer than the agent's resourceVersions,
    // so its watches get 410 Gone and it must relist to see what changed.
    let relists = watch_metric(c, "relists");
    let since = c.agent_log(0).len();
    let pid = c.nodes[0].agent.as_ref().unwrap().child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    api.call("POST", SVC, Some(&svc("stalled", "10.96.3.20")), &[201]);
    api.call("DELETE", &format!("{SVC}/after"), None, &[200]);
    // Not the pod the connection went to (its fate is the connection test's, not this one's).
    let down = *ALL.iter().find(|p| **p != first).unwrap();
    let up: Vec<&str> = ALL.iter().copied().filter(|p| *p != down).collect();
    api.set_ready(NS, down, false);
    api.wait_endpoints(NS, "stalled", 2);
    let rev = api.cp.compact_etcd();
    api.cp.restart_apiserver();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = c.agent_log(0)[since..].to_string();
        // The agent says it is a 410 and that it relists, and the error is the API server's.
        let gone = |l: &&str| l.split_once("error=").is_some_and(|(_, e)| e.contains("too old resource version") || e.contains("Expired"));
        if let Some(l) = log.lines().filter(|l| l.contains("watch expired (410 Gone): relisting")).find(gone) {
            eprintln!("node1's agent: {l}");
            break;
        }
        assert!(Instant::now() < deadline, "no 410 Gone in node1's agent log within 60 s of compacting at revision {rev}:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while watch_metric(c, "relists") <= relists {
        assert!(Instant::now() < deadline, "no relist after the 410:\n{}", &c.agent_log(0)[since..]);
        std::thread::sleep(Duration::from_millis(200));
    }
    expect_backends(c, "10.96.3.20", 80, Some(2));
    expect_backends(c, "10.96.3.10", 80, None);
    expect(c, "n1-pod1", "10.96.3.20:80", &up, 30);
    expect(c, "n1-pod1", "10.96.3.10:80", &[], 3);
    // The connection from before both restarts still lives.
    assert_eq!(s.backend(), first, "the connection moved");
    assert!(!c.agent_log(0).contains("panicked"), "{}", c.agent_log(0));
}
