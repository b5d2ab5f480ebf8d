//! Soak: real kernel TCP, UDP and (raw-socket) SCTP through Ferry in the namespace cluster, with
//! TSO/GSO on every veth and GRO on the node-side ends, as on real nodes (issue 9). Bulk data is
//! verified byte by byte, every connection counted, and every count asserted: 0 failures. Every
//! client has its own timeouts and deadlines (see ferry-load.rs), so a stalled path fails in
//! bounded time, and each failure message says what was expected and what happened.
//!
//! One test at a time (`--test-threads=1`): each builds and removes its own cluster.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bpf_tests::lab::{self, services_yaml, At, Cluster, LabOptions, Svc, SvcPort, TempDir, CLOSED_PORT, LOAD_SCTP_PORT, LOAD_TCP_PORT, LOAD_UDP_PORT};

const MIB16: u64 = 16 << 20;
const NODE1: &str = "192.168.77.1";

/// A soak cluster serving `svcs` (plus any extra manifests), agents started.
fn soak(opts: LabOptions, svcs: &[Svc], extra: &str) -> (Cluster, TempDir) {
    soak_with(opts, svcs, extra, false)
}

/// `soak`, with `--nodeport-acceleration xdp` when `xdp`.
fn soak_with(opts: LabOptions, svcs: &[Svc], extra: &str, xdp: bool) -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("soak-{}", lab::run_id()));
    std::fs::write(dir.path.join("soak.yaml"), format!("{}{extra}", services_yaml(svcs))).unwrap();
    let mut c = Cluster::with_options(&dir.path, opts);
    c.xdp = xdp;
    c.start_agents();
    (c, dir)
}

/// The non-zero drop counters of node `i` (from its metrics), for failure messages.
fn drops(c: &Cluster, i: usize) -> String {
    match bpf_tests::fakeapi::http_get_in(&c.nodes[i].ns.name, "127.0.0.1:10249", "/metrics") {
        Some((_, page)) => {
            let v: Vec<&str> = page.lines().filter(|l| l.starts_with("ferry_drops_total{") && !l.ends_with(" 0")).collect();
            format!("node{} drops: [{}]", i + 1, v.join(", "))
        }
        None => format!("node{}: no metrics", i + 1),
    }
}

fn all_drops(c: &Cluster) -> String {
    format!("{}; {}", drops(c, 0), drops(c, 1))
}

/// `OK ok, FAILED failed`, the last line of churn and idle.
fn ok_failed(lines: &[String]) -> (usize, usize) {
    let last = lines.last().map(String::as_str).unwrap_or("");
    let w: Vec<&str> = last.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    match w.as_slice() {
        [ok, "ok", failed, "failed"] => (ok.parse().unwrap_or(0), failed.parse().unwrap_or(usize::MAX)),
        _ => (0, usize::MAX),
    }
}

/// A `key=value` field of a bulk line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

/// A UDP client's `ERR ConnectionRefused after N ms` with N below `ms`: refused by an ICMP
/// error, well before the client's timeout.
fn refused_within(line: &str, ms: u64) -> bool {
    line.strip_prefix("ERR ConnectionRefused after ").and_then(|r| r.strip_suffix(" ms")).and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n < ms)
}

/// The answering backend's name of a `NAME PEER` line (the whole line when it is an error).
fn who(line: &str) -> &str {
    if line.starts_with("ERR") {
        line
    } else {
        line.split_whitespace().next().unwrap_or("")
    }
}

fn tcp(port: u16, target: u16) -> SvcPort {
    SvcPort::new("TCP", port, target)
}

fn udp(port: u16, target: u16) -> SvcPort {
    SvcPort::new("UDP", port, target)
}

// -------------------------------------------------------------------------------------------
// Bulk transfers (issue 9, items 2 and 3)

/// One Service of each kind the issue lists, each with one backend: ClusterIP to a remote pod,
/// NodePort (externalTrafficPolicy Cluster) to a remote pod (source-translated by node1),
/// NodePort Local to a pod of node1, a LoadBalancer IP to a remote pod (source-translated), an
/// external IP to a pod of node1.
fn bulk_services() -> Vec<Svc> {
    vec![
        Svc::new("bulk-clusterip", "ClusterIP", "10.96.1.10").port(tcp(80, LOAD_TCP_PORT)).pods(&["n2-pod1"]),
        Svc::new("bulk-nodeport", "NodePort", "10.96.1.11").port(tcp(80, LOAD_TCP_PORT).node_port(30100)).pods(&["n2-pod1"]),
        Svc::new("bulk-local", "NodePort", "10.96.1.12").local().port(tcp(80, LOAD_TCP_PORT).node_port(30101)).pods(&["n1-pod2"]),
        Svc::new("bulk-lb", "LoadBalancer", "10.96.1.13").lb_ip("172.20.1.10").port(tcp(80, LOAD_TCP_PORT).node_port(30102)).pods(&["n2-pod2"]),
        Svc::new("bulk-extip", "ClusterIP", "10.96.1.14").external_ip("172.20.2.10").port(tcp(80, LOAD_TCP_PORT)).pods(&["n1-pod2"]),
        Svc::new("bulk-nodeport-here", "NodePort", "10.96.1.15").port(tcp(80, LOAD_TCP_PORT).node_port(30103)).pods(&["n1-pod2"]),
    ]
}

/// (what, where the client runs, address). Every external address of an externalTrafficPolicy
/// Cluster Service is masqueraded, from outside and from pods, whichever backend it gets
/// (kube-proxy's rule): to a pod of node1 the packets are redirected into its veth, and its
/// replies back out.
fn bulk_paths() -> [(&'static str, At<'static>, &'static str); 9] {
    [
        ("ClusterIP, pod on node1 -> pod on node2", At::Pod("n1-pod1"), "10.96.1.10:80"),
        ("NodePort eTP=Cluster, outside -> pod on node2 (SNAT)", At::Outside, "192.168.77.1:30100"),
        ("NodePort eTP=Local, outside -> pod on node1", At::Outside, "192.168.77.1:30101"),
        ("LoadBalancer IP, outside -> pod on node2 (SNAT)", At::Outside, "172.20.1.10:80"),
        ("externalIP, outside -> pod on node1", At::Outside, "172.20.2.10:80"),
        ("NodePort eTP=Cluster, outside -> pod on node1 (SNAT)", At::Outside, "192.168.77.1:30103"),
        ("NodePort eTP=Cluster, pod on node1 -> pod on node1 (SNAT)", At::Pod("n1-pod1"), "192.168.77.1:30103"),
        ("NodePort eTP=Cluster, pod on node1 -> pod on node2 (SNAT)", At::Pod("n1-pod1"), "192.168.77.1:30100"),
        ("LoadBalancer IP, pod on node1 -> pod on node2 (SNAT)", At::Pod("n1-pod1"), "172.20.1.10:80"),
    ]
}

/// 16 MiB up and 16 MiB down on every path at once (each its own connection, verified byte by
/// byte); a path that stalls 10 s or is not done in 30 s fails (a working one takes about 1 s).
fn bulk_everywhere(mtu: Option<u32>) {
    let opts = LabOptions { node_link_mtu: mtu, ..LabOptions::soak() };
    let (c, _d) = soak(opts, &bulk_services(), "");
    let size = MIB16.to_string();
    let running: Vec<_> = bulk_paths()
        .into_iter()
        .map(|(what, at, addr)| {
            let child = c
                .load_cmd(at, &["bulk", addr, "--up", &size, "--down", &size, "--stall-s", "10", "--deadline-s", "30"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (what, child)
        })
        .collect();
    let mut report = Vec::new();
    let mut bad = 0;
    for (what, child) in running {
        let out = child.wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ok = field(&line, "result") == "ok" && field(&line, "up") == format!("{MIB16}/{MIB16}") && field(&line, "down") == format!("{MIB16}/{MIB16}");
        bad += usize::from(!ok);
        report.push(format!("{} {what}: {line}{}", if ok { "ok  " } else { "FAIL" }, String::from_utf8_lossy(&out.stderr).trim()));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(bad, 0, "mtu {mtu:?}: expected 16 MiB each way, verified, on every path; {bad} failed:\n{}\n{}", report.join("\n"), all_drops(&c));
}

#[test]
fn bulk_16mib_each_way_through_every_service_kind() {
    bulk_everywhere(None);
}

#[test]
fn bulk_16mib_each_way_over_a_1400_byte_inter_node_mtu() {
    // An overlay's smaller MTU between the nodes: the source-translated paths must make the
    // client learn it (ICMP fragmentation needed), or uploads black-hole.
    bulk_everywhere(Some(1400));
}

// -------------------------------------------------------------------------------------------
// Pods of a node behind links Ferry has no program on

#[test]
fn pods_behind_links_without_ferrys_programs_answer_through_services() {
    // Two pods of node1 that no agent pattern (`veth*`) reaches: one behind a veth named as
    // another CNI names it, one behind an L2 bridge (the pods routed over the bridge). Their
    // replies enter the node where no from-pod hook translates them: the to-pod hook of the
    // client's veth must (kube-proxy's conntrack does, whatever the link). A pod of node2 and
    // node1's own processes reach them too (translated on node2, and at connect()).
    let pods = [("n1-cni", Ipv4Addr::new(10, 201, 1, 21), lab::PodLink::Named("cnipod0".into())), ("n1-bridged", Ipv4Addr::new(10, 201, 1, 22), lab::PodLink::Bridge { bridge: "cbr0".into(), port: "brport0".into() })];
    let mut svcs = vec![
        Svc::new("odd-cni", "ClusterIP", "10.96.1.30").port(tcp(80, LOAD_TCP_PORT)),
        Svc::new("odd-bridged", "ClusterIP", "10.96.1.31").port(tcp(80, LOAD_TCP_PORT)),
        // A NodePort on node1's address (externalTrafficPolicy Local: not masqueraded for pods),
        // whose replies are redirected.
        Svc::new("odd-nodeport", "NodePort", "10.96.1.32").local().port(tcp(80, LOAD_TCP_PORT).node_port(30130)),
    ];
    svcs[0].endpoints.push((pods[0].1, "node1".into()));
    svcs[1].endpoints.push((pods[1].1, "node1".into()));
    svcs[2].endpoints.push((pods[0].1, "node1".into()));
    let dir = TempDir::new(&format!("soak-{}", lab::run_id()));
    std::fs::write(dir.path.join("soak.yaml"), services_yaml(&svcs)).unwrap();
    let mut c = Cluster::with_options(&dir.path, LabOptions::soak());
    for (name, ip, link) in &pods {
        c.add_pod_linked(0, name, *ip, link.clone());
    }
    c.start_agents();
    let paths: [(&str, At, &str, &str); 7] = [
        ("ClusterIP, pod on node1 -> pod behind another CNI's link", At::Pod("n1-pod1"), "10.96.1.30:80", "n1-cni"),
        ("ClusterIP, pod on node1 -> pod behind a bridge", At::Pod("n1-pod1"), "10.96.1.31:80", "n1-bridged"),
        ("NodePort eTP=Local, pod on node1 -> pod behind another CNI's link", At::Pod("n1-pod1"), "192.168.77.1:30130", "n1-cni"),
        ("ClusterIP, pod on node2 -> pod behind another CNI's link", At::Pod("n2-pod1"), "10.96.1.30:80", "n1-cni"),
        ("ClusterIP, pod on node2 -> pod behind a bridge", At::Pod("n2-pod1"), "10.96.1.31:80", "n1-bridged"),
        ("ClusterIP, node1 itself -> pod behind another CNI's link", At::Node(0), "10.96.1.30:80", "n1-cni"),
        ("ClusterIP, node1 itself -> pod behind a bridge", At::Node(0), "10.96.1.31:80", "n1-bridged"),
    ];
    let mib4 = (4u64 << 20).to_string();
    let mut report = Vec::new();
    let mut bad = 0;
    for (what, at, addr, who) in paths {
        // A few MB each way, verified byte by byte, then 300 short connections, 8 at a time.
        let bulk = c.load(at, &["bulk", addr, "--up", &mib4, "--down", &mib4, "--stall-s", "10", "--deadline-s", "30"]);
        let line = bulk.join(" ");
        let bulk_ok = field(&line, "result") == "ok" && field(&line, "up") == format!("{mib4}/{mib4}") && field(&line, "down") == format!("{mib4}/{mib4}");
        let churn = c.load(at, &["churn", addr, "--count", "300", "--concurrency", "8", "--timeout-ms", "3000", "--deadline-s", "60", "--max-failures", "20"]);
        let churn_ok = ok_failed(&churn) == (300, 0) && churn.contains(&format!("backend {who} 300"));
        bad += usize::from(!bulk_ok) + usize::from(!churn_ok);
        report.push(format!("{} {what}: {line}; churn: {}", if bulk_ok && churn_ok { "ok  " } else { "FAIL" }, churn.join(" | ")));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(bad, 0, "expected every bulk transfer verified and 300 of 300 connections answered on every path; {bad} failed:\n{}\n{}", report.join("\n"), all_drops(&c));
    // Connections from outside the node to them are not served (README): node1's agent names
    // each such endpoint with its interface, once; node2's has no endpoint of its own there.
    let log = c.agent_log(0);
    for (ip, iface) in [("10.201.1.21", "cnipod0"), ("10.201.1.22", "cbr0")] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("--pod-interfaces does not match") && l.contains(ip) && l.contains(iface)).collect();
        assert_eq!(lines.len(), 1, "node1 warns once about {ip} over {iface}:\n{log}");
    }
    assert_eq!(log.lines().filter(|l| l.contains("--pod-interfaces does not match")).count(), 2, "{log}");
    assert!(!c.agent_log(1).contains("--pod-interfaces does not match"), "{}", c.agent_log(1));
}

// -------------------------------------------------------------------------------------------
// Connection churn (items 4 and 6)

#[test]
fn twenty_thousand_connections_through_a_source_translated_nodeport() {
    // The default SNAT range, 61000-65535, has 4 536 ports: 20 000 connections need every port
    // several times over, so ports of finished connections must be released.
    let svcs = [Svc::new("churn", "NodePort", "10.96.1.20").port(tcp(80, LOAD_TCP_PORT).node_port(30110)).pods(&["n2-pod1"])];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    // The client's own ephemeral ports (20 000 in TIME_WAIT at the end) must not be the limit.
    c.outside.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    // 1 000 connections a second (20 s): a port must be free again about 4.5 s after its
    // connection closed. A connect that times out (2 s) is a failure; the client stops after 50.
    let started = Instant::now();
    let out = c.load(
        At::Outside,
        &["churn", "192.168.77.1:30110", "--count", "20000", "--concurrency", "16", "--rate", "1000", "--timeout-ms", "2000", "--deadline-s", "90", "--max-failures", "50"],
    );
    let (ok, failed) = ok_failed(&out);
    assert_eq!(
        (ok, failed),
        (20000, 0),
        "expected 20000 ok, 0 failed in {:.0?} (at 1000/s; stops after 50 failures):\n{}\n{}",
        started.elapsed(),
        out.join("\n"),
        drops(&c, 0)
    );
    assert!(out.contains(&"backend n2-pod1 20000".to_string()), "{out:?}");
}

#[test]
fn idle_connections_survive_a_churn_that_fills_conntrack() {
    // A small conntrack map and random backend choice: an idle connection that loses its entry
    // goes to a random backend on its next packet (visible as a reset or another backend's
    // name), and a server that speaks first is answered untranslated.
    let opts = LabOptions {
        agent_args: ["--conntrack-capacity", "4096", "--lb-algorithm", "random"].map(String::from).to_vec(),
        ..LabOptions::soak()
    };
    let vip = "10.96.1.30:80";
    let svcs = [Svc::new("idle", "ClusterIP", "10.96.1.30").port(tcp(80, LOAD_TCP_PORT)).pods(&["n1-pod2", "n2-pod1", "n2-pod2"])];
    let (c, _d) = soak(opts, &svcs, "");
    // 40 connections: 20 client-first, 20 whose server speaks first 12 s after setup (the churn
    // takes about 1 s here).
    let wait_ms = 12_000u64;
    let mut idle = c.load_spawn(At::Pod("n1-pod1"), &["idle", vip, "--count", "40", "--wait-ms", &wait_ms.to_string(), "--max-wait-s", "60"]);
    let set_up = Instant::now();
    let ready = idle.line();
    assert_eq!(ready, "ready 40", "idle connections not established");
    // 8 000 short connections: 16 000 conntrack entries through a map of 4 096.
    let churn = c.load(
        At::Pod("n1-pod1"),
        &["churn", vip, "--count", "8000", "--concurrency", "8", "--timeout-ms", "3000", "--deadline-s", "8", "--max-failures", "200"],
    );
    let churn_took = set_up.elapsed();
    // The churn must be over before the servers speak, or the test would not test eviction.
    assert!(churn_took < Duration::from_millis(wait_ms - 3000), "test setup: the churn took {churn_took:?}, past the servers' {wait_ms} ms wait");
    let entries = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[0].pin.path).map(|m| m.ct.rows().len()).unwrap_or(0);
    idle.send("go");
    let lines = idle.finish();
    let (ok, failed) = ok_failed(&lines);
    let broken: Vec<&str> = lines.iter().filter(|l| l.starts_with("conn ") && field(l, "before") != field(l, "after")).map(String::as_str).collect();
    assert_eq!(
        (ok, failed),
        (40, 0),
        "every idle connection must still reach its backend after the churn (conntrack entries on node1 after it: {entries}); broken:\n{}\nchurn: {}",
        broken.join("\n"),
        churn.join("; ")
    );
    assert_eq!(ok_failed(&churn), (8000, 0), "the churn itself: {}\n{}", churn.join("\n"), drops(&c, 0));
    // The pressure shows in /metrics: the LRU map evicted (closed connections of the churn), the
    // assured map did not need to (it never evicts), as of a garbage collection after the churn.
    let deadline = Instant::now() + Duration::from_secs(15);
    let metric = |page: &str, name: &str| -> u64 { page.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0) };
    loop {
        let page = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10249", "/metrics").map(|(_, p)| p).unwrap_or_default();
        let evicted = metric(&page, "ferry_conntrack_evictions_total{map=\"ct4_v2\"}");
        if evicted > 1000 && metric(&page, "ferry_conntrack_gc_runs_total") > 0 {
            assert!(metric(&page, "ferry_map_capacity{map=\"ct4_v2\"}") == 2048, "{page}");
            break;
        }
        assert!(Instant::now() < deadline, "no evictions reported after a churn of 16 000 entries through a 2 048-entry LRU map:\n{page}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

// -------------------------------------------------------------------------------------------
// Port reuse between Service and direct connections (item 5)

#[test]
fn a_source_port_used_through_a_service_is_reusable_for_a_direct_connection_and_back() {
    let svcs = [
        Svc::new("reuse-remote", "ClusterIP", "10.96.1.40").port(tcp(80, LOAD_TCP_PORT)).port(udp(53, LOAD_UDP_PORT)).pods(&["n2-pod1"]),
        Svc::new("reuse-local", "ClusterIP", "10.96.1.41").port(tcp(80, LOAD_TCP_PORT)).port(udp(53, LOAD_UDP_PORT)).pods(&["n1-pod2"]),
    ];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    let mut results = Vec::new();
    let mut port = 41000u16;
    for (vip, backend) in [("10.96.1.40", "n2-pod1"), ("10.96.1.41", "n1-pod2")] {
        let direct = c.pod_ip(backend);
        for service_first in [true, false] {
            port += 1;
            let p = port.to_string();
            let tcp_to = |addr: String| c.load(At::Pod("n1-pod1"), &["tcp", &addr, "--bind", &p, "--timeout-ms", "3000"]).join(" ");
            let udp_to = |addr: String| {
                let mut s = c.load_spawn(At::Pod("n1-pod1"), &["session", "udp", &addr, "--sport", &p, "--timeout-ms", "1500"]);
                let a = s.ask();
                s.finish();
                a
            };
            let svc_tcp = format!("{vip}:80");
            let pod_tcp = format!("{direct}:{LOAD_TCP_PORT}");
            let svc_udp = format!("{vip}:53");
            let pod_udp = format!("{direct}:{LOAD_UDP_PORT}");
            let order = if service_first { [("service", svc_tcp, svc_udp), ("direct", pod_tcp, pod_udp)] } else { [("direct", pod_tcp, pod_udp), ("service", svc_tcp, svc_udp)] };
            for (step, (how, t, u)) in order.into_iter().enumerate() {
                results.push((format!("{backend} TCP from :{p}, step {} {how}", step + 1), backend, tcp_to(t)));
                results.push((format!("{backend} UDP from :{p}, step {} {how}", step + 1), backend, udp_to(u)));
            }
        }
    }
    let bad: Vec<String> = results.iter().filter(|(_, want, got)| who(got) != *want).map(|(what, want, got)| format!("{what}: want {want}, got {got:?}")).collect();
    assert!(bad.is_empty(), "{} of {} connections failed:\n{}\n{}", bad.len(), results.len(), bad.join("\n"), all_drops(&c));
}

// -------------------------------------------------------------------------------------------
// Flows across endpoint removal (item 10 and the pods' side of it)

const FLOW_PODS: [&str; 3] = ["n1-pod2", "n2-pod1", "n2-pod2"];

fn flow_services(udp_eps: &[&str], sctp_eps: &[&str]) -> Vec<Svc> {
    vec![
        Svc::new("flow-udp", "ClusterIP", "10.96.1.50").port(udp(53, LOAD_UDP_PORT)).pods(udp_eps),
        Svc::new("flow-sctp", "ClusterIP", "10.96.1.51").port(SvcPort::new("SCTP", 9, LOAD_SCTP_PORT)).pods(sctp_eps),
    ]
}

#[test]
fn pod_udp_and_sctp_flows_move_off_a_removed_endpoint_at_once() {
    let (mut c, _d) = soak(LabOptions::soak(), &flow_services(&FLOW_PODS, &FLOW_PODS), "");
    let mut udp_eps: Vec<&str> = FLOW_PODS.to_vec();
    let mut sctp_eps: Vec<&str> = FLOW_PODS.to_vec();
    for (proto, addr, sport) in [("udp", "10.96.1.50:53", "45000"), ("sctp", "10.96.1.51:9", "45001")] {
        // A fixed source port: the same flow (conntrack entry) before and after the removal.
        let mut s = c.load_spawn(At::Pod("n1-pod1"), &["session", proto, addr, "--sport", sport, "--timeout-ms", "500"]);
        let first = s.ask();
        assert!(FLOW_PODS.contains(&who(&first)), "{proto}: first request: {first:?}");
        let again = s.ask();
        assert_eq!(who(&again), who(&first), "{proto}: one flow, one backend");
        let gone = who(&first).to_string();
        // The removed pod keeps running: an answer from it means a stale translation.
        let eps = if proto == "udp" { &mut udp_eps } else { &mut sctp_eps };
        eps.retain(|p| *p != gone);
        let yaml = services_yaml(&flow_services(&udp_eps, &sctp_eps));
        c.write_manifest("soak.yaml", &yaml);
        let synced = Instant::now();
        let answers: Vec<String> = (0..5).map(|_| s.ask()).collect();
        let took = synced.elapsed();
        s.finish();
        let from_gone = answers.iter().filter(|a| who(a) == gone).count();
        let errors = answers.iter().filter(|a| a.starts_with("ERR")).count();
        assert_eq!((from_gone, errors), (0, 0), "{proto} from a pod: after removing {gone}, every answer must come from another backend at once: {answers:?}");
        assert!(answers.iter().all(|a| who(a) == who(&answers[0])), "{proto}: the flow must stay on its new backend: {answers:?}");
        assert!(took < Duration::from_secs(1), "{proto}: five answers took {took:?}");
    }
}

#[test]
fn sctp_from_outside_through_nodeports_arrives_with_valid_crc32c() {
    // SCTP's CRC32c covers the ports: a source-translated NodePort rewrites both ports on the way
    // in and on the way back, and the checksum must be patched each time. The responder drops a
    // request with a bad CRC (the client times out); the client reports an answer with a bad one.
    let svcs = [
        Svc::new("sctp-remote", "NodePort", "10.96.1.55").port(SvcPort::new("SCTP", 9, LOAD_SCTP_PORT).node_port(30150)).pods(&["n2-pod1"]),
        Svc::new("sctp-local", "NodePort", "10.96.1.56").local().port(SvcPort::new("SCTP", 9, LOAD_SCTP_PORT).node_port(30151)).pods(&["n1-pod2"]),
    ];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    let mut bad = Vec::new();
    for (addr, backend, seen) in [("192.168.77.1:30150", "n2-pod1", NODE1), ("192.168.77.1:30151", "n1-pod2", lab::OUTSIDE_CLIENT)] {
        let out = c.load(At::Outside, &["sctp", addr, "--count", "20", "--timeout-ms", "1000"]);
        // `NAME PEER`: the backend, and the source it saw (node1 when translated).
        let good = out.iter().filter(|l| who(l) == backend && l.split_whitespace().nth(1).is_some_and(|p| p.starts_with(&format!("{seen}:")))).count();
        if good != 20 {
            bad.push(format!("{addr}: want 20 answers from {backend} seeing {seen}, got {good}: {out:?}"));
        }
    }
    assert!(bad.is_empty(), "{}\n{}", bad.join("\n"), all_drops(&c));
}

#[test]
fn host_udp_socket_moves_off_a_removed_endpoint_within_a_second() {
    // A process of node1 with a connected UDP socket: the socket hooks translated its
    // destination once, at connect(). When that endpoint is removed the application may see one
    // error (its socket destroyed) and reconnect, as with Cilium; it must never again be answered
    // by the removed endpoint, whose pod keeps running. (SCTP is not tested from the host: this
    // kernel has no SCTP sockets, and raw sockets bypass the socket hooks.)
    let (mut c, _d) = soak(LabOptions::soak(), &flow_services(&FLOW_PODS, &FLOW_PODS), "");
    let mut s = c.load_spawn(At::Node(0), &["session", "udp", "10.96.1.50:53", "--reconnect", "--timeout-ms", "300"]);
    let first = s.ask();
    assert!(FLOW_PODS.contains(&who(&first)), "first request from node1: {first:?}");
    assert_eq!(who(&s.ask()), who(&first), "a connected socket keeps its backend");
    let gone = who(&first).to_string();
    let rest: Vec<&str> = FLOW_PODS.iter().copied().filter(|p| *p != gone).collect();
    c.write_manifest("soak.yaml", &services_yaml(&flow_services(&rest, &FLOW_PODS)));
    let synced = Instant::now();
    // Ask until another backend answers: at most 20 requests, at most 1.5 s.
    let mut answers = Vec::new();
    let mut moved_after = None;
    while answers.len() < 20 && synced.elapsed() < Duration::from_millis(1500) {
        let a = s.ask();
        let done = rest.contains(&who(&a));
        answers.push(a);
        if done {
            moved_after = Some(synced.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    s.finish();
    let from_gone = answers.iter().filter(|a| who(a) == gone).count();
    let errors = answers.iter().filter(|a| a.starts_with("ERR")).count();
    assert!(
        from_gone == 0 && errors <= 1 && moved_after.is_some_and(|t| t < Duration::from_secs(1)),
        "after removing {gone}: want no answer from it, at most one error, another backend within 1 s; got {from_gone} answers from it, {errors} errors, moved after {moved_after:?}: {answers:?}"
    );
}

// -------------------------------------------------------------------------------------------
// ICMP errors from backends to clients outside (item 7)

#[test]
fn outside_udp_to_a_backend_port_without_listener_is_refused_promptly() {
    let svcs = [
        // Remote backend: node1 source-translates; the backend's port unreachable comes back to it.
        Svc::new("icmp-remote", "NodePort", "10.96.1.70")
            .port(SvcPort::new("UDP", 53, CLOSED_PORT).node_port(30170))
            .port(SvcPort { name: "open".into(), ..udp(54, LOAD_UDP_PORT).node_port(30172) })
            .pods(&["n2-pod1"]),
        // Local backend behind a LoadBalancer IP and its NodePort.
        Svc::new("icmp-local", "LoadBalancer", "10.96.1.71")
            .local()
            .lb_ip("172.20.1.11")
            .port(SvcPort::new("UDP", 53, CLOSED_PORT).node_port(30171))
            .port(SvcPort { name: "open".into(), ..udp(54, LOAD_UDP_PORT).node_port(30173) })
            .pods(&["n1-pod2"]),
    ];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    // Controls: the same Services answer on the port that has a listener, so a failure below is
    // about the ICMP error, not the path.
    for (addr, backend) in [("192.168.77.1:30172", "n2-pod1"), ("192.168.77.1:30173", "n1-pod2"), ("172.20.1.11:54", "n1-pod2")] {
        let out = c.load(At::Outside, &["udp", addr, "--count", "2", "--connected", "--timeout-ms", "2000"]);
        assert!(out.len() == 2 && out.iter().all(|l| who(l) == backend), "control {addr}: want {backend} twice, got {out:?}");
    }
    let mut bad = Vec::new();
    for (what, addr) in [("NodePort, remote backend", "192.168.77.1:30170"), ("NodePort, local backend", "192.168.77.1:30171"), ("LoadBalancer IP, local backend", "172.20.1.11:53")] {
        let out = c.load(At::Outside, &["udp", addr, "--count", "3", "--connected", "--timeout-ms", "1000"]);
        if out.len() != 3 || !out.iter().all(|l| refused_within(l, 500)) {
            bad.push(format!("{what} ({addr}): {out:?}"));
        }
    }
    assert!(bad.is_empty(), "want ECONNREFUSED within 500 ms for each of 3 datagrams:\n{}\n{}", bad.join("\n"), all_drops(&c));
}

// -------------------------------------------------------------------------------------------
// Ferry's own refusals into an ingress-isolated pod (item 8)

/// Pod objects for the lab's pods in namespace `soak`, labelled `role: client` (n1-pod1) or
/// `role: server`.
fn pods_yaml() -> String {
    lab::PODS
        .iter()
        .map(|(_, name, ip)| {
            let role = if *name == "n1-pod1" { "client" } else { "server" };
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: soak, labels: {{role: {role}}}}}\nspec: {{nodeName: {}, containers: [{{name: c}}]}}\nstatus: {{podIP: {}}}\n",
                lab::node_of(name),
                Ipv4Addr::from(*ip)
            )
        })
        .collect()
}

#[test]
fn an_ingress_isolated_client_is_refused_at_once_by_a_service_without_endpoints() {
    let policy = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-isolated, namespace: soak}\nspec:\n  podSelector: {matchLabels: {role: client}}\n  policyTypes: [Ingress]\n";
    let svcs = [Svc::new("empty", "ClusterIP", "10.96.1.80").port(tcp(80, LOAD_TCP_PORT)).port(udp(53, LOAD_UDP_PORT))];
    let (mut c, _d) = soak(LabOptions::soak(), &svcs, &format!("{}{policy}", pods_yaml()));
    for i in 0..2 {
        c.wait_log(i, |l| l.lines().any(|l| l.contains("synced") && l.contains("policies=1")));
    }
    // The policy is in force: nothing may open a connection into the client.
    let into_client = c.load(At::Pod("n1-pod2"), &["tcp", &format!("{}:{LOAD_TCP_PORT}", c.pod_ip("n1-pod1")), "--timeout-ms", "1000"]);
    assert_eq!(into_client, vec!["ERR connect-TimedOut"], "the client must be isolated for ingress");
    let mut bad = Vec::new();
    for client in ["n1-pod2", "n1-pod1"] {
        for (what, args) in [
            ("TCP, no endpoints", vec!["tcp", "10.96.1.80:80", "--count", "3", "--timeout-ms", "1000"]),
            ("TCP, unexposed port", vec!["tcp", "10.96.1.80:81", "--count", "3", "--timeout-ms", "1000"]),
            ("UDP, no endpoints", vec!["udp", "10.96.1.80:53", "--count", "3", "--connected", "--timeout-ms", "1000"]),
        ] {
            let started = Instant::now();
            let out = c.load(At::Pod(client), &args);
            let took = started.elapsed();
            let refused = out.len() == 3 && out.iter().all(|l| l == "ERR connect-ConnectionRefused" || refused_within(l, 500));
            // Three refusals well inside one client timeout: refused, not timed out.
            if !refused || took > Duration::from_millis(1500) {
                bad.push(format!("{client} ({}), {what}: {out:?} in {took:?}", if client == "n1-pod1" { "isolated" } else { "not isolated" }));
            }
        }
    }
    assert!(bad.is_empty(), "want ECONNREFUSED at once:\n{}\n{}", bad.join("\n"), drops(&c, 0));
}

// -------------------------------------------------------------------------------------------
// NodePort and LoadBalancer to a hostNetwork endpoint on the same node (item 9)

#[test]
fn nodeport_and_loadbalancer_reach_a_host_network_endpoint_on_the_same_node() {
    let svcs = [Svc::new("hostnet", "LoadBalancer", "10.96.1.90")
        .lb_ip("172.20.1.12")
        .port(tcp(80, LOAD_TCP_PORT).node_port(30190))
        .port(udp(53, LOAD_UDP_PORT).node_port(30191))
        .host_endpoint(0)];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    let mut bad = Vec::new();
    let runs: [(&str, At, Vec<&str>); 5] = [
        ("pod -> ClusterIP (control)", At::Pod("n1-pod1"), vec!["tcp", "10.96.1.90:80", "--count", "3"]),
        ("outside -> NodePort TCP", At::Outside, vec!["tcp", "192.168.77.1:30190", "--count", "3", "--timeout-ms", "1000"]),
        ("outside -> LoadBalancer IP TCP", At::Outside, vec!["tcp", "172.20.1.12:80", "--count", "3", "--timeout-ms", "1000"]),
        ("outside -> NodePort UDP", At::Outside, vec!["udp", "192.168.77.1:30191", "--count", "3", "--connected", "--timeout-ms", "1000"]),
        ("outside -> LoadBalancer IP UDP", At::Outside, vec!["udp", "172.20.1.12:53", "--count", "3", "--connected", "--timeout-ms", "1000"]),
    ];
    for (what, at, args) in runs {
        let out = c.load(at, &args);
        if out.len() != 3 || !out.iter().all(|l| who(l) == "node1") {
            bad.push(format!("{what}: want node1 x3, got {out:?}"));
        }
    }
    assert!(bad.is_empty(), "hostNetwork endpoint {NODE1}:{LOAD_TCP_PORT} (node1):\n{}\n{}", bad.join("\n"), drops(&c, 0));
}

// -------------------------------------------------------------------------------------------
// Attacks and awkward peers on translated connections (item 4: conntrack states)

/// A counter of node `i`'s /metrics (0 when absent).
fn metric(c: &Cluster, i: usize, name: &str) -> u64 {
    let page = bpf_tests::fakeapi::http_get_in(&c.nodes[i].ns.name, "127.0.0.1:10249", "/metrics").map(|(_, p)| p).unwrap_or_default();
    page.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Local ports of the established TCP connections in `ns` to `dst`.
fn established_ports(ns: &lab::Netns, dst: &str) -> Vec<u16> {
    let out = ns.cmd(&["ss", "-Htn", "state", "established", "dst", dst]).output().expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse().ok()))
        .collect()
}

/// An attacker who knows an idle connection's addresses and ports but not its sequence numbers
/// sends a RST. The endpoints ignore it (out of window); so must Ferry: were the entry freed, the
/// connection's next packet would open a new one, with another source port, and the backend
/// would reset it.
fn blind_rst(xdp: bool) {
    let svcs = [Svc::new("blind", "NodePort", "10.96.1.100").port(tcp(80, LOAD_TCP_PORT).node_port(30200)).pods(&["n2-pod1"])];
    let (c, _d) = soak_with(LabOptions::soak(), &svcs, "", xdp);
    let np = "192.168.77.1:30200";
    let mut idle = c.load_spawn(At::Outside, &["idle", np, "--count", "4", "--wait-ms", "3000", "--max-wait-s", "60"]);
    assert_eq!(idle.line(), "ready 4", "idle connections not established");
    let ports = established_ports(&c.outside, np);
    assert_eq!(ports.len(), 4, "established connections to {np}: {ports:?}");
    let ignored_before = metric(&c, 0, "ferry_datapath_events_total{event=\"ct_rst_ignored\"}");
    for p in &ports {
        // Sequence 12345: 2^32 possible, the window a few hundred KiB somewhere else.
        let sent = c.load(At::Outside, &["forge-tcp", &format!("{}:{p}", lab::OUTSIDE_CLIENT), np, "R", "12345", "0", "--count", "3"]);
        assert_eq!(sent, ["sent 3"], "forge-tcp");
    }
    let ignored = metric(&c, 0, "ferry_datapath_events_total{event=\"ct_rst_ignored\"}") - ignored_before;
    idle.send("go");
    let lines = idle.finish();
    assert_eq!(ok_failed(&lines), (4, 0), "connections hit by out-of-window RSTs must carry on:\n{}\n{}", lines.join("\n"), drops(&c, 0));
    assert_eq!(ignored, 12, "every forged RST counted as ignored (ct_rst_ignored)");
}

#[test]
fn a_blind_rst_does_not_end_a_translated_connection() {
    blind_rst(false);
}

#[test]
fn a_blind_rst_does_not_end_a_translated_connection_with_xdp() {
    blind_rst(true);
}

/// HTTP/1.0-style servers close first, so the backend keeps TIME_WAIT for each translated tuple
/// (node address and SNAT port). A new connection given that tuple again would meet the TIME_WAIT
/// socket, which may answer its SYN with an ACK instead of a SYN-ACK (its timestamps and
/// sequence numbers come from another client) and cost the client a retransmission. Ferry gives
/// such ports out last; with two client addresses (two timestamp clocks) a reuse would show.
#[test]
fn a_server_that_closes_first_costs_no_connection_a_retransmission() {
    let svcs = [Svc::new("closer", "NodePort", "10.96.1.101").port(tcp(80, LOAD_TCP_PORT).node_port(30201)).pods(&["n2-pod1"])];
    let (c, _d) = soak(LabOptions::soak(), &svcs, "");
    c.outside.exec_ok(&["ip", "addr", "add", "172.20.0.3/24", "dev", "eth0"]);
    let out = c.load(
        At::Outside,
        &["churn", "192.168.77.1:30201", "--count", "1500", "--concurrency", "4", "--rate", "150", "--server-closes", "--from", "172.20.0.2,172.20.0.3", "--slow-ms", "800", "--timeout-ms", "3000", "--deadline-s", "60"],
    );
    assert_eq!(ok_failed(&out), (1500, 0), "every connection answered and closed by the server, none slower than 0.8 s:\n{}\n{}", out.join("\n"), drops(&c, 0));
    let tw = c.pod("n2-pod1").ns.cmd(&["ss", "-Htn", "state", "time-wait"]).output().expect("ss");
    let tw = String::from_utf8_lossy(&tw.stdout).lines().count();
    assert!(tw >= 1000, "test setup: the backend should hold the TIME_WAIT sockets (it closed first), has {tw}");
}

// -------------------------------------------------------------------------------------------
// UDP datagrams larger than one packet: IP fragments (items 2 and 3)

/// Requests (and so answers: the server sends the whole request back) of 3 000 bytes, fragmented
/// by their senders, and of 1 450 bytes, sent whole with DF, through a ClusterIP to a remote pod,
/// a source-translated NodePort and an eTP=Local NodePort.
fn big_udp(mtu: Option<u32>) {
    let svcs = [
        Svc::new("big-clusterip", "ClusterIP", "10.96.1.110").port(udp(53, LOAD_UDP_PORT)).pods(&["n2-pod1"]),
        Svc::new("big-nodeport", "NodePort", "10.96.1.111").port(udp(53, LOAD_UDP_PORT).node_port(30210)).pods(&["n2-pod1"]),
        Svc::new("big-local", "NodePort", "10.96.1.112").local().port(udp(53, LOAD_UDP_PORT).node_port(30211)).pods(&["n1-pod2"]),
    ];
    let (c, _d) = soak(LabOptions { node_link_mtu: mtu, ..LabOptions::soak() }, &svcs, "");
    let paths: [(&str, At, &str, &str); 3] = [
        ("ClusterIP, pod on node1 -> pod on node2", At::Pod("n1-pod1"), "10.96.1.110:53", "n2-pod1"),
        ("NodePort eTP=Cluster, outside -> pod on node2 (SNAT)", At::Outside, "192.168.77.1:30210", "n2-pod1"),
        ("NodePort eTP=Local, outside -> pod on node1", At::Outside, "192.168.77.1:30211", "n1-pod2"),
    ];
    let mut bad = Vec::new();
    for (what, at, addr, backend) in paths {
        for size in ["3000", "1450"] {
            let out = c.load(at, &["udp", addr, "--count", "6", "--size", size, "--timeout-ms", "1500"]);
            // Over a smaller inter-node MTU the first datagram of a size may be lost while its
            // sender learns the path MTU from ICMP fragmentation needed: the kernel's for a DF
            // datagram it forwards (after which it is sent in fragments), Ferry's for the first
            // fragment of one it source-translates (a redirected packet cannot be fragmented
            // again; the later fragments are dropped). The rest must all arrive.
            let first_may_fail = mtu.is_some() && out.first().is_some_and(|l| l.starts_with("ERR TimedOut") || l.starts_with("ERR WouldBlock"));
            let must: &[String] = if first_may_fail { &out[1..] } else { &out[..] };
            if out.len() != 6 || !must.iter().all(|l| who(l) == backend) {
                bad.push(format!("{what}, {size}-byte datagrams: want {backend}, got {out:?}"));
            }
        }
    }
    assert!(bad.is_empty(), "inter-node MTU {mtu:?}:\n{}\n{}", bad.join("\n"), all_drops(&c));
}

#[test]
fn udp_datagrams_larger_than_a_packet_through_every_service_kind() {
    big_udp(None);
}

#[test]
fn udp_datagrams_larger_than_a_packet_over_a_1400_byte_inter_node_mtu() {
    big_udp(Some(1400));
}
