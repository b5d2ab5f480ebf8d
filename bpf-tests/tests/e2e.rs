//! End-to-end: real TCP and UDP between pods of a two-node cluster made of network namespaces,
//! with one real agent per node (`bpf_tests::lab`). Each test builds and removes its own cluster.
use std::{net::Ipv4Addr, time::Instant};

use bpf_tests::lab::{self, echo_yaml, tally, Cluster, TempDir};

/// A cluster whose manifests live in a private directory the test may rewrite.
fn cluster(tcp: &[&str], udp: &[&str]) -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("e2e-{}", lab::run_id()));
    let ip = |n: &str| Ipv4Addr::from(lab::PODS.iter().find(|p| p.1 == n).unwrap().2);
    let tcp: Vec<Ipv4Addr> = tcp.iter().map(|n| ip(n)).collect();
    let udp: Vec<Ipv4Addr> = udp.iter().map(|n| ip(n)).collect();
    std::fs::write(dir.path.join("echo.yaml"), echo_yaml(&tcp, &udp)).unwrap();
    let mut c = Cluster::new(&dir.path);
    c.start_agents();
    (c, dir)
}

fn set_endpoints(c: &mut Cluster, tcp: &[&str], udp: &[&str]) {
    let tcp: Vec<Ipv4Addr> = tcp.iter().map(|n| c.pod_ip(n)).collect();
    let udp: Vec<Ipv4Addr> = udp.iter().map(|n| c.pod_ip(n)).collect();
    c.write_manifest("echo.yaml", &echo_yaml(&tcp, &udp));
}

const ALL: [&str; 3] = ["n1-pod2", "n2-pod1", "n2-pod2"];

#[test]
fn requests_spread_over_all_endpoints_and_keep_the_client_address() {
    let (c, _d) = cluster(&ALL, &ALL);
    for (proto, vip) in [("tcp", lab::TCP_VIP), ("udp", lab::UDP_VIP)] {
        let lines = c.client_in_pod("n1-pod1", &[proto, vip, "60"]);
        let t = tally(&lines);
        assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ALL.to_vec(), "{proto}: {t:?}");
        // Inside the cluster the backend sees the client pod itself (no masquerade).
        assert!(lines.iter().all(|l| l.split_whitespace().nth(1).unwrap().starts_with("10.201.1.11:")), "{lines:?}");
    }
}

#[test]
fn node_host_processes_reach_clusterips() {
    let (c, _d) = cluster(&ALL, &ALL);
    for (proto, vip) in [("tcp", lab::TCP_VIP), ("udp", lab::UDP_VIP)] {
        let t = tally(&c.client_on_node(0, &[proto, vip, "60"]));
        assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ALL.to_vec(), "{proto} from node1: {t:?}");
    }
}

#[test]
fn long_tcp_connection_keeps_its_backend_while_endpoints_change() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let mine = s.backend();
    let others: Vec<&str> = ALL.iter().copied().filter(|b| *b != mine).collect();
    // Remove another endpoint, then add a new one: the connection stays where it is.
    set_endpoints(&mut c, &[mine.as_str(), others[0]], &ALL);
    assert_eq!(s.backend(), mine);
    set_endpoints(&mut c, &[mine.as_str(), others[0], "n1-pod1"], &ALL);
    for _ in 0..5 {
        assert_eq!(s.backend(), mine);
    }
}

#[test]
fn removed_endpoint_gets_no_new_connections() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    set_endpoints(&mut c, &["n1-pod2", "n2-pod1"], &["n1-pod2", "n2-pod1"]);
    for (proto, vip) in [("tcp", lab::TCP_VIP), ("udp", lab::UDP_VIP)] {
        let t = tally(&c.client_in_pod("n1-pod1", &[proto, vip, "60"]));
        assert_eq!(t.keys().cloned().collect::<Vec<_>>(), vec!["n1-pod2", "n2-pod1"], "{proto}: {t:?}");
    }
}

#[test]
fn no_endpoints_is_refused_at_once() {
    let (c, _d) = cluster(&[], &[]);
    for (proto, vip, who) in [("tcp", lab::TCP_VIP, "pod"), ("udp-connected", lab::UDP_VIP, "pod"), ("tcp", lab::TCP_VIP, "node")] {
        let started = Instant::now();
        let lines = if who == "pod" { c.client_in_pod("n1-pod1", &[proto, vip, "10"]) } else { c.client_on_node(0, &[proto, vip, "10"]) };
        assert!(lines.iter().all(|l| l == "ERR ConnectionRefused"), "{proto} from {who}: {lines:?}");
        // Ten refusals, each well inside the client's 2 s timeout: refused, not timed out.
        assert!(started.elapsed().as_secs_f64() < 2.0, "{proto} from {who} took {:?}", started.elapsed());
    }
}

#[test]
fn udp_client_moves_off_a_removed_endpoint_at_once() {
    // kube-proxy's stale-UDP-conntrack problem: a DNS client keeps its source port, and its
    // conntrack entry would keep sending it to an endpoint that no longer exists.
    let (mut c, _d) = cluster(&ALL, &ALL);
    let mut s = c.session("n1-pod1", "udp-session", lab::UDP_VIP);
    let first = s.backend();
    assert_eq!(s.backend(), first, "same socket, same backend");
    let rest: Vec<&str> = ALL.iter().copied().filter(|b| *b != first).collect();
    set_endpoints(&mut c, &ALL, &rest);
    let started = Instant::now();
    let next = s.backend();
    assert_ne!(next, first);
    assert!(rest.contains(&next.as_str()));
    assert!(started.elapsed().as_secs_f64() < 1.0, "answered after {:?}: a timeout, not an immediate move", started.elapsed());
    let log = c.agent_log(0);
    assert!(log.lines().any(|l| l.contains("synced") && !l.contains("backends_left=0") && l.contains("backends_left=")), "{log}");
}

#[test]
fn established_connection_survives_an_agent_restart() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let mine = s.backend();
    c.stop_agent(0);
    assert!(c.agent_log(0).contains("stopping: the programs stay attached"), "{}", c.agent_log(0));
    // Still attached with the agent gone: the node's interfaces carry Ferry's programs through
    // the pinned links, and the connection keeps working.
    let links = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "inspect", "links", "--pin-dir", c.nodes[0].pin.path.to_str().unwrap()]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).to_string();
    for (hook, prog, n) in [("ingress", "ferry_from_pod", 2), ("egress", "ferry_to_pod", 2), ("ingress", "ferry_from_world", 2), ("connect4", "ferry_connect4", 1)] {
        assert_eq!(links.lines().filter(|l| l.contains(&format!(" {hook} ")) && l.contains(prog) && l.ends_with("attached")).count(), n, "{prog}:\n{links}");
    }
    assert!(!links.contains("defunct"), "{links}");
    assert_eq!(s.backend(), mine);
    let t = tally(&c.client_in_pod("n1-pod2", &["tcp", lab::TCP_VIP, "6"]));
    assert_eq!(t.values().sum::<usize>(), 6, "new connections while the agent is down: {t:?}");
    let links_before = link_ids(&c, 0);
    c.start_agent(0);
    // The pinned maps were re-adopted: nothing rewritten, the connection keeps its backend.
    let log = c.agent_log(0);
    // Two frontends; six backends (three pods, each as a TCP and a UDP backend).
    assert!(log.lines().any(|l| l.contains("maps restored") && l.contains("frontends=2 backends=6")), "{log}");
    assert!(log.lines().filter(|l| l.contains("synced")).last().unwrap().contains("writes=0 deletes=0"), "{log}");
    // The same links, given the new agent's programs in place (no new link, no gap).
    assert!(log.matches("adopted: program replaced in place").count() >= links_before.len(), "{log}");
    assert_eq!(link_ids(&c, 0).into_iter().map(|(id, _)| id).collect::<Vec<_>>(), links_before.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    assert!(link_ids(&c, 0).iter().zip(&links_before).all(|(a, b)| a.1 != b.1), "every link carries a new program: {links_before:?}");
    for _ in 0..3 {
        assert_eq!(s.backend(), mine);
    }
}

/// (link id, program id) of every link pinned for node `i`, by pin name.
fn link_ids(c: &Cluster, i: usize) -> Vec<(u32, u32)> {
    let dir = c.nodes[i].pin.path.join("links");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    names
        .iter()
        .map(|p| {
            let fd = dataplane_agent::links::obj_get(p).unwrap();
            let li = dataplane_agent::links::link_info(std::os::fd::AsFd::as_fd(&fd)).unwrap();
            (li.id, li.prog_id)
        })
        .collect()
}

/// Links in the kernel that run a Ferry program.
fn ferry_links() -> usize {
    let names = dataplane_agent::links::program_names();
    let out = std::process::Command::new("bpftool").args(["link", "show", "--json"]).output().unwrap();
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    links.iter().filter(|l| l["prog_id"].as_u64().and_then(|id| names.get(&(id as u32))).is_some_and(|n| n.starts_with("ferry_"))).count()
}

#[test]
fn run_cleanup_removes_ferry_from_the_node() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let pin = c.nodes[0].pin.path.clone();
    // Not while an agent runs on the directory: it would attach again at once.
    let out = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--cleanup", "--pin-dir", pin.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && text.contains("an agent is running on") && text.contains(pin.to_str().unwrap()), "{out:?}");
    assert!(pin.join("links").exists());
    c.stop_agent(0);
    let before = ferry_links();
    let out = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--cleanup", "--pin-dir", pin.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // Every map of names::ALL and the `layouts` record.
    let maps = dataplane_common::names::ALL.len() + 1;
    assert!(text.contains("detached 12 links") && text.contains(&format!("removed {maps} pinned maps")), "{text}");
    assert!(!pin.exists(), "{text}");
    // The node's twelve links are gone from the kernel (bpftool 7.1 lists no TCX links under
    // `net show`: the kernel's link list is what counts; node2's agent keeps its own).
    assert_eq!(before - ferry_links(), 12);
    let cg = std::process::Command::new("bpftool").args(["cgroup", "show", c.nodes[0].cgroup.to_str().unwrap()]).output().unwrap();
    assert!(!String::from_utf8_lossy(&cg.stdout).contains("ferry_"), "{}", String::from_utf8_lossy(&cg.stdout));
    // Again: nothing left, nothing to do, no error.
    let out = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--cleanup", "--pin-dir", pin.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("detached 0 links"), "{out:?}");
}

#[test]
fn agent_attaches_to_pod_interfaces_that_appear_later() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    c.add_pod(0, "n1-pod3", Ipv4Addr::new(10, 201, 1, 13));
    c.wait_log(0, |l| l.matches("attached ferry_from_pod").count() >= 3);
    let t = tally(&c.client_in_pod("n1-pod3", &["tcp", lab::TCP_VIP, "30"]));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ALL.to_vec(), "{t:?}");
}

#[test]
fn live_trace_reads_the_running_nodes_maps() {
    let (c, _d) = cluster(&["n1-pod2", "n2-pod1"], &[]);
    // One established connection, so conntrack has something to show.
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let backend = c.pod_ip(&s.backend());
    let trace = |to: &str| {
        let out = std::process::Command::new(lab::agent_bin())
            .args(["trace", "--from", "10.201.1.11", "--to", to, "--pin-dir"])
            .arg(&c.nodes[0].pin.path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = trace("10.96.0.10:80/tcp");
    assert!(t.contains("translated to one of [10.201.1.12:8080, 10.201.2.11:8080]"), "{t}");
    assert!(t.contains(&format!("existing connection from port")) && t.contains(&format!("-> {backend}:8080")), "{t}");
    assert!(trace("10.96.0.20:53/udp").contains("REJECT (service"), "UDP Service without endpoints");
    assert!(trace("10.96.0.10:81/tcp").contains("REJECT (a ClusterIP"), "unexposed port");
    assert!(trace("10.96.7.7:80/tcp").contains("DROP"), "unallocated service address");
    assert!(trace("10.201.2.11:8080/tcp").contains("PASS"), "pod address");
    // Read-only: asking created no conntrack entry (still the one connection, both directions,
    // established, so in the assured map).
    let entries = |map: &str| {
        let ct = std::process::Command::new("bpftool").args(["map", "dump", "pinned"]).arg(c.nodes[0].pin.path.join(map)).output().unwrap();
        String::from_utf8_lossy(&ct.stdout).matches("\"key\"").count()
    };
    assert_eq!((entries("ct4_assured_v2"), entries("ct4_v2")), (2, 0));
}

#[test]
fn inspection_and_metrics_show_live_traffic_by_service_name() {
    let (c, _d) = cluster(&["n1-pod2", "n2-pod1"], &["n2-pod2"]);
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let backend = c.pod_ip(&s.backend());
    for _ in 0..4 {
        s.backend();
    }
    let udp = c.client_in_pod("n1-pod1", &["udp", lab::UDP_VIP, "5"]);
    assert_eq!(udp.len(), 5, "{udp:?}");
    let inspect = |what: &str| {
        let out = std::process::Command::new(lab::agent_bin()).args(["inspect", what, "--pin-dir"]).arg(&c.nodes[0].pin.path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // services: the TCP frontend by name, two backends, and the packets it carried (5 requests
    // and answers, plus the handshake).
    let services = inspect("services");
    let row = services.lines().find(|l| l.starts_with("lab/echo-tcp:echo ")).unwrap_or_else(|| panic!("{services}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..4], ["10.96.0.10:80/TCP", "internal", "2"], "{services}");
    assert!(cols[5].parse::<u64>().unwrap() >= 12, "{services}");
    // backends: the established connection is counted at its backend.
    let backends = inspect("backends");
    let row = backends.lines().find(|l| l.starts_with("lab/echo-tcp:echo ") && l.contains(&format!("{backend}:8080"))).unwrap_or_else(|| panic!("{backends}"));
    assert!(row.split_whitespace().last().unwrap().parse::<u64>().unwrap() >= 1, "{backends}");
    // conntrack: the TCP connection, from the client pod, translated to its backend.
    let ct = inspect("conntrack");
    assert!(ct.lines().any(|l| l.starts_with("TCP") && l.contains("10.201.1.11:") && l.contains(&format!("{backend}:8080")) && l.contains("lab/echo-tcp:echo")), "{ct}");
    // metrics, from inside the node, on the agent's default metrics address.
    let (code, page) = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10249", "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    let packets = page
        .lines()
        .find(|l| l.starts_with("ferry_service_packets_total{service=\"lab/echo-udp:echo-udp\",frontend=\"10.96.0.20:53/UDP\""))
        .unwrap_or_else(|| panic!("{page}"));
    assert_eq!(packets.rsplit(' ').next().unwrap(), "10", "5 datagrams and 5 answers: {packets}");
    // Conntrack figures come from the garbage collector's runs (a scrape never walks conntrack):
    // wait for one that saw the connection.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    let page = loop {
        let (_, page) = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10249", "/metrics").expect("metrics answer");
        if page.contains("ferry_conntrack_connections{proto=\"TCP\",state=\"established\"} 1") {
            break page;
        }
        assert!(Instant::now() < deadline, "no garbage collection run saw the connection: {page}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    // The TCP connection is established (two entries in the assured map); the five UDP
    // exchanges were answered but are no streams, so they stay in the LRU map.
    assert!(page.contains("ferry_conntrack_connections{proto=\"UDP\",state=\"replied\"} 5"), "{page}");
    assert!(page.contains("ferry_map_entries{map=\"ct4_assured_v2\"} 2"), "{page}");
    assert!(page.contains("ferry_map_entries{map=\"ct4_v2\"} 10"), "{page}");
    assert!(page.lines().any(|l| l.starts_with("ferry_conntrack_gc_runs_total ") && !l.ends_with(" 0")), "{page}");
    assert!(page.contains("ferry_conntrack_evictions_total{map=\"ct4_v2\"} 0"), "{page}");
    assert!(page.lines().any(|l| l.starts_with("ferry_map_entries{map=\"lb4_svc_v3\"} ")), "{page}");
    // The hashing tables: 251 entries for each frontend with endpoints (the lab's have a few), of
    // the table array's default capacity.
    let tables: u64 = page.lines().find_map(|l| l.strip_prefix("ferry_map_entries{map=\"lb4_chash_flat_v1\"} ")).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{page}"));
    assert!(tables > 0 && tables % 251 == 0, "{tables} table entries: {page}");
    assert!(page.contains(&format!("ferry_map_capacity{{map=\"lb4_chash_flat_v1\"}} {}", dataplane_common::capacity::CHASH_ENTRIES)), "{page}");
    assert!(page.contains("ferry_drops_total{reason=\"no_service\"} 0"), "{page}");
    let (code, health) = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10256", "/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
}

#[test]
fn a_malformed_manifest_is_named_and_everything_else_still_syncs() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    c.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: lab}\nspec: {clusterIP: 10.96.0.30, ports: [{port: http}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: fine, namespace: lab}\nspec: {clusterIP: 10.96.0.31, ports: [{port: 80}]}\n",
    );
    let log = c.agent_log(0);
    assert!(log.lines().any(|l| l.contains("skipped an invalid object") && l.contains("kind=Service object=lab/broken") && l.contains("field=spec.ports[0].port")), "{log}");
    assert!(log.lines().filter(|l| l.contains("synced")).last().unwrap().contains("services=3"), "{log}");
    // The existing Services are untouched and the new valid one is in place (refused: no endpoints).
    let t = tally(&c.client_in_pod("n1-pod1", &["tcp", lab::TCP_VIP, "30"]));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ALL.to_vec(), "{t:?}");
    assert_eq!(c.client_in_pod("n1-pod1", &["tcp", "10.96.0.31:80", "1"]), vec!["ERR ConnectionRefused"]);
}

#[test]
fn manifests_empty_for_a_moment_remove_nothing_and_empty_for_good_remove_everything() {
    // `cat new > echo.yaml` truncates the file before writing it; a directory removed and made
    // again is empty before it is filled. Applied, that moment would remove both Services and
    // move every connection off its backend; the agent holds it for a grace (5 s) instead.
    let (mut c, d) = cluster(&ALL, &ALL);
    let file = d.path.join("echo.yaml");
    let yaml = std::fs::read_to_string(&file).unwrap();
    let mut s = c.session("n1-pod1", "tcp-session", lab::TCP_VIP);
    let mine = s.backend();
    let synced_lines = |c: &Cluster, from: usize| -> Vec<String> { c.agent_log(0).lines().filter(|l| l.contains("synced")).skip(from).map(String::from).collect() };
    let before = synced_lines(&c, 0).len();
    for (round, how) in ["truncated", "directory removed and made again"].into_iter().enumerate() {
        let emptied = Instant::now();
        if round == 0 {
            std::fs::write(&file, "").unwrap();
        } else {
            std::fs::remove_dir_all(&d.path).unwrap();
            c.wait_log(0, |l| l.contains("manifests unreadable: the maps keep what they hold"));
            std::fs::create_dir(&d.path).unwrap();
        }
        c.wait_log(0, |l| l.lines().filter(|l| l.contains("manifests read as empty") && l.contains("objects=4")).count() > round);
        assert_eq!(s.backend(), mine, "{how}: the connection keeps its backend while the manifests are empty");
        let t = tally(&c.client_in_pod("n1-pod2", &["tcp", lab::TCP_VIP, "3"]));
        assert_eq!(t.values().sum::<usize>(), 3, "{how}: new connections are served while the manifests are empty: {t:?}");
        std::fs::write(&file, &yaml).unwrap();
        c.wait_log(0, |l| l.matches("manifests hold objects again within the grace").count() > round);
        assert!(emptied.elapsed().as_secs_f64() < 5.0, "{how}: empty longer than the grace ({:?}): the test says nothing", emptied.elapsed());
        assert_eq!(s.backend(), mine, "{how}");
    }
    let log = c.agent_log(0);
    assert!(!log.contains("manifests still empty after the grace: removing"), "{log}");
    assert!(synced_lines(&c, before).iter().all(|l| l.contains("services=2") && l.contains("deletes=0")), "no sync removed anything:\n{log}");
    // Removed for good: applied once the grace is over, and only then.
    let removed = Instant::now();
    std::fs::remove_file(&file).unwrap();
    c.wait_log(0, |l| l.contains("manifests still empty after the grace: removing every object they held"));
    let count = synced_lines(&c, 0).len();
    c.wait_log(0, |l| l.lines().filter(|l| l.contains("synced")).skip(count.saturating_sub(1)).any(|l| l.contains("services=0")));
    assert!(removed.elapsed().as_secs_f64() >= 5.0, "removed after {:?}, before the grace was over", removed.elapsed());
    let lines = c.client_in_pod("n1-pod2", &["tcp", lab::TCP_VIP, "2"]);
    assert!(lines.iter().all(|l| l.starts_with("ERR")), "the Service is gone: {lines:?}");
}

#[test]
fn a_pod_reaches_itself_through_its_own_service() {
    // n1-pod2 is the only endpoint: every request is hairpinned back to the client itself.
    let (c, _d) = cluster(&["n1-pod2"], &["n1-pod2"]);
    for (proto, vip) in [("tcp", lab::TCP_VIP), ("udp", lab::UDP_VIP)] {
        let lines = c.client_in_pod("n1-pod2", &[proto, vip, "10"]);
        assert_eq!(tally(&lines).into_iter().collect::<Vec<_>>(), vec![("n1-pod2".to_string(), 10)], "{proto}: {lines:?}");
        // The pod saw the connection come from the Service address, not from itself.
        assert!(lines.iter().all(|l| l.split_whitespace().nth(1).unwrap().starts_with("10.96.0.")), "{lines:?}");
    }
}

/// The lab plus the NodePort Services of `deploy/examples/nodeport.yaml`, with these endpoints;
/// agents with `--nodeport-acceleration xdp` when `xdp`.
fn cluster_with_nodeports(cluster_eps: &[&str], local_eps: &[&str], xdp: bool) -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("e2e-{}", lab::run_id()));
    let ip = |n: &str| Ipv4Addr::from(lab::PODS.iter().find(|p| p.1 == n).unwrap().2);
    let node_of = |n: &str| if n.starts_with("n1") { "node1" } else { "node2" };
    let a: Vec<(Ipv4Addr, &str)> = cluster_eps.iter().map(|n| (ip(n), node_of(n))).collect();
    let b: Vec<(Ipv4Addr, &str)> = local_eps.iter().map(|n| (ip(n), node_of(n))).collect();
    let all: Vec<Ipv4Addr> = ALL.iter().map(|n| ip(n)).collect();
    std::fs::write(dir.path.join("echo.yaml"), echo_yaml(&all, &all)).unwrap();
    std::fs::write(dir.path.join("nodeport.yaml"), lab::nodeport_yaml(&a, &b)).unwrap();
    let mut c = Cluster::new(&dir.path);
    c.xdp = xdp;
    c.start_agents();
    (c, dir)
}

/// Both NodePort modes: tc only, and XDP in front of it.
const MODES: [bool; 2] = [false, true];

/// (answering pod, source address it saw) of each reply.
fn who_and_source(lines: &[String]) -> std::collections::BTreeSet<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap_or("").to_string(), w.next().and_then(|s| s.split(':').next()).unwrap_or("").to_string())
        })
        .collect()
}

#[test]
fn outside_client_reaches_a_nodeport_whose_backend_is_on_another_node() {
    for xdp in MODES {
        let (c, _d) = cluster_with_nodeports(&["n2-pod1"], &["n1-pod2"], xdp);
        let lines = c.client_outside(&["tcp", lab::NODEPORT_CLUSTER, "40"]);
        // externalTrafficPolicy Cluster: node1 translated the source to itself so the reply returns.
        assert_eq!(who_and_source(&lines), [("n2-pod1".to_string(), "192.168.77.1".to_string())].into(), "xdp={xdp}: {lines:?}");
    }
}

#[test]
fn cluster_policy_nodeport_backends_see_the_node_whichever_is_picked_and_whoever_asks() {
    // kube-proxy masquerades every connection to an external address of an
    // externalTrafficPolicy Cluster Service: the backend on node1 and the one on node2 both see
    // node1's address, from outside and from a pod of node1, whichever backend was picked.
    for xdp in MODES {
        let (c, _d) = cluster_with_nodeports(&["n1-pod2", "n2-pod1"], &["n1-pod2"], xdp);
        let node1 = "192.168.77.1".to_string();
        let want: std::collections::BTreeSet<(String, String)> = [("n1-pod2".to_string(), node1.clone()), ("n2-pod1".to_string(), node1.clone())].into();
        let outside = c.client_outside(&["tcp", lab::NODEPORT_CLUSTER, "40"]);
        assert_eq!(who_and_source(&outside), want, "xdp={xdp}, from outside: {outside:?}");
        let pod = c.client_in_pod("n1-pod1", &["tcp", lab::NODEPORT_CLUSTER, "40"]);
        assert_eq!(who_and_source(&pod), want, "xdp={xdp}, from n1-pod1: {pod:?}");
        // The ClusterIP is not masqueraded: the backends see the pod.
        let vip = c.client_in_pod("n1-pod1", &["tcp", lab::TCP_VIP, "20"]);
        assert!(who_and_source(&vip).iter().all(|(_, s)| s == "10.201.1.11"), "xdp={xdp}: {vip:?}");
    }
}

#[test]
fn local_nodeport_backend_sees_the_outside_client() {
    for xdp in MODES {
        let (c, _d) = cluster_with_nodeports(&["n2-pod1"], &["n1-pod2"], xdp);
        let lines = c.client_outside(&["tcp", lab::NODEPORT_LOCAL, "40"]);
        assert_eq!(who_and_source(&lines), [("n1-pod2".to_string(), lab::OUTSIDE_CLIENT.to_string())].into(), "xdp={xdp}: {lines:?}");
    }
}

#[test]
fn local_nodeport_without_a_local_endpoint_drops_but_pods_still_reach_it() {
    for xdp in MODES {
        local_nodeport_without_a_local_endpoint(xdp);
    }
}

fn local_nodeport_without_a_local_endpoint(xdp: bool) {
    let (c, _d) = cluster_with_nodeports(&["n2-pod1"], &["n2-pod2"], xdp);
    // From outside: dropped (no answer, not refused) on node1, which has no local endpoint.
    let lines = c.client_outside(&["tcp", lab::NODEPORT_LOCAL, "2"]);
    assert!(lines.iter().all(|l| l == "ERR TimedOut"), "{lines:?}");
    // From a pod of node1 the same NodePort uses every endpoint (kube-proxy's short-circuit).
    let t = tally(&c.client_in_pod("n1-pod1", &["tcp", lab::NODEPORT_LOCAL, "10"]));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), vec!["n2-pod2"], "{t:?}");
}

#[test]
fn health_check_node_port_answers_like_kube_proxy() {
    let (c, _d) = cluster_with_nodeports(&["n2-pod1"], &["n1-pod2"], false);
    // node1 holds the Service's endpoint, node2 does not.
    let n1 = c.client_outside(&["http-get", "192.168.77.1:32081"]);
    let n2 = c.client_outside(&["http-get", "192.168.77.2:32081"]);
    let body = r#"{"service":{"namespace":"lab","name":"echo-local"},"localEndpoints":LOCAL,"serviceProxyHealthy":true}"#;
    assert_eq!(n1, vec![format!("200 {}", body.replace("LOCAL", "1"))]);
    assert_eq!(n2, vec![format!("503 {}", body.replace("LOCAL", "0"))]);
}

#[test]
fn xdp_acceleration_translates_in_xdp() {
    let (c, _d) = cluster_with_nodeports(&["n2-pod1"], &["n1-pod2"], true);
    assert!(c.agent_log(0).contains("attached ferry_xdp_nodeport (XDP"), "{}", c.agent_log(0));
    let cluster = c.client_outside(&["tcp", lab::NODEPORT_CLUSTER, "20"]);
    assert_eq!(who_and_source(&cluster), [("n2-pod1".to_string(), "192.168.77.1".to_string())].into(), "{cluster:?}");
    let local = c.client_outside(&["tcp", lab::NODEPORT_LOCAL, "20"]);
    assert_eq!(who_and_source(&local), [("n1-pod2".to_string(), lab::OUTSIDE_CLIENT.to_string())].into(), "{local:?}");
    // The Local NodePort's packets were translated in XDP, not by the tc fallback.
    let maps = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[0].pin.path).unwrap();
    let xdp_forwarded = maps.stat_totals()[dataplane_common::stat::XDP_FORWARD as usize];
    assert!(xdp_forwarded >= 20, "XDP translated {xdp_forwarded} packets");
}

/// NodePort (externalTrafficPolicy Cluster) on node1 whose only endpoint is the host beside the
/// client outside ([`one_armed`]).
const NODEPORT_ONE_ARMED: &str = "192.168.77.1:30090";
const BESIDE_CLIENT: &str = "172.20.0.5";

/// The lab with XDP acceleration and a backend outside the cluster on the client's side of node1
/// (reached, like the client, by ext0): a NodePort connection from the client to it is the
/// one-armed load balancer, both directions translated in XDP and sent back out ext0 with
/// XDP_TX. With `bare`, the veth that XDP_TX sends to is left as created.
fn one_armed(bare: bool) -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("e2e-{}", lab::run_id()));
    std::fs::write(
        dir.path.join("one-armed.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: beside, namespace: lab}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.40\n  \
             ports: [{{name: load, port: 80, protocol: TCP, targetPort: {port}, nodePort: 30090}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: beside-1, namespace: lab, labels: {{kubernetes.io/service-name: beside}}}}\n\
             addressType: IPv4\nports: [{{name: load, port: {port}, protocol: TCP}}]\nendpoints:\n- addresses: [{BESIDE_CLIENT}]\n  conditions: {{ready: true}}\n",
            port = lab::LOAD_TCP_PORT
        ),
    )
    .unwrap();
    let mut c = Cluster::with_options(&dir.path, lab::LabOptions { bare_xdp_peers: bare, ..Default::default() });
    c.add_outside_host("beside", BESIDE_CLIENT.parse().unwrap());
    c.xdp = true;
    c.start_agents();
    (c, dir)
}

/// `N ok, M failed`, the last line of a `ferry-load churn`: (N, M).
fn churn_result(lines: &[String]) -> (usize, usize) {
    let last = lines.last().map(String::as_str).unwrap_or("");
    let n: Vec<usize> = last.split(|ch: char| !ch.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert!(last.ends_with(" failed") && n.len() == 2, "not a churn result: {lines:?}");
    (n[0], n[1])
}

#[test]
fn one_armed_nodeport_in_xdp_loses_nothing_on_veths_set_up_for_xdp_tx() {
    let (c, _d) = one_armed(false);
    let node1 = &c.nodes[0].ns;
    // The agent says what a veth needs for XDP_TX.
    let log = c.agent_log(0);
    assert!(log.contains("attached ferry_xdp_nodeport (XDP") && log.lines().any(|l| l.contains("interface ext0 (ifindex") && l.contains("a veth: its XDP_TX frames")), "{log}");
    let (errors, sent) = (lab::xdp_counter(node1, "ext0", "xdp_tx_errors"), lab::xdp_counter(node1, "ext0", "xdp_tx"));
    let churn = c.load(lab::At::Outside, &["churn", NODEPORT_ONE_ARMED, "--count", "400", "--concurrency", "8", "--timeout-ms", "3000", "--deadline-s", "120"]);
    assert_eq!(churn_result(&churn), (400, 0), "{churn:?}");
    assert!(churn.iter().any(|l| l == "backend beside 400"), "{churn:?}");
    let mb = (4 << 20).to_string();
    let bulk = c.load(lab::At::Outside, &["bulk", NODEPORT_ONE_ARMED, "--up", &mb, "--down", &mb, "--deadline-s", "60"]);
    assert!(bulk.len() == 1 && bulk[0].ends_with(" result=ok") && bulk[0].contains(&format!(" up={mb}/{mb} ")) && bulk[0].contains(&format!(" down={mb}/{mb} ")), "{bulk:?}");
    // It was XDP that carried them, both ways: every connection's packets (at least 3 each way
    // for 400 connections, and the 8 MiB in segments of at most 1500 bytes), none lost to XDP_TX.
    let tx = lab::xdp_counter(node1, "ext0", "xdp_tx") - sent;
    assert!(tx >= 400 * 6 + (8 << 20) / 1500, "{tx} frames sent by XDP_TX");
    assert_eq!(lab::xdp_counter(node1, "ext0", "xdp_tx_errors"), errors, "XDP_TX errors on node1's ext0");
    let maps = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[0].pin.path).unwrap();
    let xdp_tx = maps.stat_totals()[dataplane_common::stat::XDP_TX as usize];
    assert!(xdp_tx >= tx, "the XDP program counted {xdp_tx} XDP_TX, the veth {tx}");
}

#[test]
fn one_armed_nodeport_in_xdp_fails_on_a_bare_veth() {
    // The control: the same traffic over a veth whose peer has no XDP program. The XDP program
    // answers XDP_TX as above; the veth drops every such frame (no ring to put it on).
    let (c, _d) = one_armed(true);
    let node1 = &c.nodes[0].ns;
    let errors = lab::xdp_counter(node1, "ext0", "xdp_tx_errors");
    let churn = c.load(lab::At::Outside, &["churn", NODEPORT_ONE_ARMED, "--count", "20", "--concurrency", "4", "--timeout-ms", "500", "--deadline-s", "30"]);
    let (ok, failed) = churn_result(&churn);
    assert!(ok == 0 && failed == 20, "{churn:?}");
    assert!(lab::xdp_counter(node1, "ext0", "xdp_tx_errors") >= errors + 20, "XDP_TX errors on node1's ext0 did not rise");
}

/// Pod objects for the lab's pods, labelled `role: <role>` by `role(name)`.
fn pods_yaml(c: &Cluster, role: impl Fn(&str) -> &'static str) -> String {
    c.pods_yaml(role)
}

#[test]
fn network_policy_allows_and_refuses_real_connections_and_monitor_names_them() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let role = |n: &str| match n {
        "n1-pod1" => "client",
        "n2-pod2" => "intruder",
        _ => "server",
    };
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: servers-from-clients, namespace: lab}\nspec:\n  podSelector: {matchLabels: {role: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    ports: [{port: echo}]\n";
    let yaml = format!("{}{policy}", pods_yaml(&c, role));
    c.write_manifest("policy.yaml", &yaml);
    for i in 0..2 {
        c.wait_log(i, |l| l.lines().any(|l| l.contains("synced") && l.contains("policies=1")));
    }
    // The client reaches servers on both nodes, directly and through the Service.
    for server in ["n1-pod2", "n2-pod1"] {
        let addr = format!("{}:8080", c.pod_ip(server));
        assert_eq!(tally(&c.client_in_pod("n1-pod1", &["tcp", &addr, "3"])).get(server), Some(&3), "client -> {server}");
    }
    let t = tally(&c.client_in_pod("n1-pod1", &["tcp", lab::TCP_VIP, "30"]));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ALL.to_vec(), "{t:?}");
    // Watch node1's verdicts while the intruder tries.
    let monitor = std::process::Command::new(lab::agent_bin())
        .args(["monitor", "--denied", "--count", "1", "--pin-dir"])
        .arg(&c.nodes[0].pin.path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The intruder is refused by servers on both nodes (enforced where each server lives).
    for server in ["n1-pod2", "n2-pod1"] {
        let addr = format!("{}:8080", c.pod_ip(server));
        let out = c.client_in_pod("n2-pod2", &["tcp", &addr, "1"]);
        assert!(out.iter().all(|l| l.starts_with("ERR")), "intruder -> {server}: {out:?}");
    }
    // The client on a port the policy does not name: UDP 5353.
    let out = c.client_in_pod("n1-pod1", &["udp", &format!("{}:5353", c.pod_ip("n1-pod2")), "1"]);
    assert!(out.iter().all(|l| l.starts_with("ERR")), "{out:?}");
    // The node itself always reaches its pods (kubelet probes), whatever the policies.
    let out = c.client_on_node(0, &["tcp", &format!("{}:8080", c.pod_ip("n1-pod2")), "1"]);
    assert_eq!(tally(&out).get("n1-pod2"), Some(&1), "{out:?}");
    // An unselected pod stays open to everyone.
    let out = c.client_in_pod("n2-pod2", &["tcp", &format!("{}:8080", c.pod_ip("n1-pod1")), "1"]);
    assert_eq!(tally(&out).get("n1-pod1"), Some(&1), "{out:?}");
    let out = monitor.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    eprintln!("monitor: {line}");
    for want in ["DENY", "ingress", "TCP", "lab/n2-pod2 (10.201.2.12:", "-> lab/n1-pod2 (10.201.1.12:8080)", "lab/servers-from-clients"] {
        assert!(line.contains(want), "{want:?} missing from monitor output: {line}");
    }
    // Counted against the policy, in node1's metrics.
    let (_, page) = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10249", "/metrics").unwrap();
    assert!(page.lines().any(|l| l.starts_with("ferry_policy_drops_total{policy=\"lab/servers-from-clients\",direction=\"ingress\"}") && !l.ends_with(" 0")), "{page}");
    // Live trace against node1's maps gives the verdict and the deciding policy.
    let trace = |from: &str| {
        let out = std::process::Command::new(lab::agent_bin())
            .args(["trace", "--from", &c.pod_ip(from).to_string(), "--to", &format!("{}:8080/tcp", c.pod_ip("n1-pod2")), "--pin-dir"])
            .arg(&c.nodes[0].pin.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let t = trace("n2-pod2");
    assert!(t.contains("policy: ingress of lab/n1-pod2 (10.201.1.12) from 10.201.2.12 (peer lab:role=intruder): DROP (isolated by lab/servers-from-clients"), "{t}");
    let t = trace("n1-pod1");
    assert!(t.contains("(peer lab:role=client): allowed by lab/servers-from-clients"), "{t}");
    // inspect policies shows the isolated pod and its rule.
    let out = std::process::Command::new(lab::agent_bin()).args(["inspect", "policies", "--pin-dir"]).arg(&c.nodes[0].pin.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("inspect policies:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("lab/n1-pod2") && l.contains("ingress") && l.contains("lab:role=client") && l.contains("TCP/8080") && l.contains("lab/servers-from-clients")), "{text}");
    // inspect policy-conntrack shows the client's connections into the server, decided under the
    // current policies.
    let out = std::process::Command::new(lab::agent_bin()).args(["inspect", "policy-conntrack", "--pin-dir"]).arg(&c.nodes[0].pin.path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("inspect policy-conntrack:\n{text}");
    let client = c.pod_ip("n1-pod1").to_string();
    assert!(
        text.lines().any(|l| l.starts_with("lab/n1-pod2") && l.contains("ingress") && l.contains(&format!("{client}:")) && l.contains("lab/servers-from-clients") && l.contains("current")),
        "{text}"
    );
}

#[test]
fn pods_under_the_hooked_cgroup_keep_the_tc_path() {
    // In a cluster the socket hooks sit on the cgroup root, and pods live under it: their
    // sockets must not be translated at connect() (the tc path gives them conntrack, policy and
    // the immediate move off a removed UDP endpoint), while the node's own processes are.
    let (c, _d) = cluster(&ALL, &ALL);
    let events = |name: &str| -> u64 {
        let (_, page) = bpf_tests::fakeapi::http_get_in(&c.nodes[0].ns.name, "127.0.0.1:10249", "/metrics").expect("metrics");
        let line = format!("ferry_datapath_events_total{{event=\"{name}\"}} ");
        page.lines().find_map(|l| l.strip_prefix(&line)).unwrap_or_else(|| panic!("{name} in {page}")).parse().unwrap()
    };
    let (sock0, new0) = (events("sock_xlate"), events("ct_new"));
    // A pod's process moved into node1's cgroup, where its agent attached the socket hooks.
    let pod = c.pod("n1-pod1");
    let procs = c.nodes[0].cgroup.join("cgroup.procs");
    let mut cmd = pod.ns.cmd(&[lab::echo_bin().to_str().unwrap(), "udp-connected", lab::UDP_VIP, "5"]);
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let out = cmd.output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(tally(&lines).values().sum::<usize>(), 5, "{lines:?}");
    assert!(lines.iter().all(|l| !l.starts_with("ERR")), "{lines:?}");
    assert_eq!(events("sock_xlate"), sock0, "a pod's socket was translated by the socket hooks");
    assert_eq!(events("ct_new"), new0 + 5, "the pod's flows did not take the tc path");
    // The node's own process, in the same cgroup, is translated at connect().
    let lines = c.client_on_node(0, &["udp-connected", lab::UDP_VIP, "3"]);
    assert!(lines.iter().all(|l| !l.starts_with("ERR")), "{lines:?}");
    assert_eq!(events("sock_xlate"), sock0 + 3);
}

#[test]
fn the_host_identity_follows_the_nodes_addresses_and_leaves_out_service_addresses() {
    let (c, _d) = cluster(&ALL, &ALL);
    let ns = &c.nodes[0].ns;
    let host_of = |ip: &str| -> bool {
        let maps = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[0].pin.path).unwrap();
        let key = aya::maps::lpm_trie::Key::new(32, u32::from_ne_bytes(ip.parse::<Ipv4Addr>().unwrap().octets()));
        maps.pol_ipcache.get(&key, 0).ok() == Some(dataplane_common::identity::HOST)
    };
    let wait_for = |what: &str, want: bool, ip: &str| {
        let start = Instant::now();
        while host_of(ip) != want {
            assert!(start.elapsed() < std::time::Duration::from_secs(15), "{what}: {ip} host={} after 15 s", !want);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    assert!(host_of(&c.nodes[0].ip.to_string()), "the node's address is the host");
    // An address added to the running node becomes the host, without any object changing.
    // (veths: the test machine has no dummy module)
    ns.exec_ok(&["ip", "link", "add", "extra0", "type", "veth", "peer", "name", "extra1"]);
    ns.exec_ok(&["ip", "addr", "add", "192.0.2.77/32", "dev", "extra0"]);
    wait_for("added", true, "192.0.2.77");
    // Service addresses on kube-ipvs0 (kube-proxy's IPVS leftovers) never are.
    ns.exec_ok(&["ip", "link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kipvs1"]);
    ns.exec_ok(&["ip", "addr", "add", "10.96.0.1/32", "dev", "kube-ipvs0"]);
    // Removing the address takes the identity away again.
    ns.exec_ok(&["ip", "addr", "del", "192.0.2.77/32", "dev", "extra0"]);
    wait_for("removed", false, "192.0.2.77");
    assert!(!host_of("10.96.0.1"), "a kube-ipvs0 address became the host");
    assert!(!host_of("127.0.0.1"), "loopback is not the host");
}

#[test]
fn a_policy_change_cuts_established_flows_it_no_longer_allows_within_a_second() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let role = |n: &str| match n {
        "n1-pod1" => "client",
        "n2-pod2" => "other",
        _ => "server",
    };
    // Servers accept the client; then a rewrite that allows only `other`; meanwhile an unrelated
    // change (a new policy on another pod) must cut nothing.
    let allow = |who: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: servers, namespace: lab}}\nspec:\n  podSelector: {{matchLabels: {{role: server}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: {who}}}}}}}]}}]\n"
        )
    };
    let unrelated = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: other-in, namespace: lab}\nspec:\n  podSelector: {matchLabels: {role: other}}\n  ingress: [{}]\n";
    c.write_manifest("policy.yaml", &format!("{}{}", pods_yaml(&c, role), allow("client")));
    let server = format!("{}:{}", c.pod_ip("n1-pod2"), lab::ECHO_TCP_PORT);
    let server_udp = format!("{}:{}", c.pod_ip("n2-pod1"), lab::ECHO_UDP_PORT);
    let mut tcp = c.session("n1-pod1", "tcp-session", &server);
    let mut udp = c.session("n1-pod1", "udp-session", &server_udp);
    assert_eq!(tcp.backend(), "n1-pod2");
    assert_eq!(udp.backend(), "n2-pod1");
    // An unrelated change: both flows go on (decided again, still allowed).
    c.write_manifest("policy.yaml", &format!("{}{}{unrelated}", pods_yaml(&c, role), allow("client")));
    for _ in 0..3 {
        assert_eq!(tcp.backend(), "n1-pod2", "after an unrelated policy change");
        assert_eq!(udp.backend(), "n2-pod1", "after an unrelated policy change");
    }
    // A change of endpoints alone leaves the policy compiler idle, and the policies in force.
    let since = c.agent_log(0).len();
    set_endpoints(&mut c, &ALL[..2], &ALL[..2]);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.lines().any(|l| l.contains("synced") && l.contains("policies=2") && l.contains("policies_compiled=false")), "{log}");
    assert_eq!(tcp.backend(), "n1-pod2", "after an endpoint change");
    assert_eq!(udp.backend(), "n2-pod1", "after an endpoint change");
    // The client is no longer allowed: once the agents synced (within a second of the write),
    // the next request of each established flow is cut.
    let t = Instant::now();
    c.write_manifest("policy.yaml", &format!("{}{}{unrelated}", pods_yaml(&c, role), allow("other")));
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "the agents took {:?} to sync the change", t.elapsed());
    let (a, b) = (tcp.ask(), udp.ask());
    assert!(a.starts_with("ERR"), "the TCP connection still works after its policy went: {a}");
    assert!(b.starts_with("ERR"), "the UDP flow still works after its policy went: {b}");
    // Counted where each server lives.
    for i in 0..2 {
        let maps = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[i].pin.path).unwrap();
        assert!(maps.stat_totals()[dataplane_common::stat::POL_REVOKED as usize] >= 1, "node{} revoked nothing", i + 1);
    }
}

#[test]
fn network_policy_off_leaves_policy_to_the_cni_and_clears_what_was_enforced() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let role = |n: &str| if n == "n1-pod2" { "server" } else { "other" };
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: lab}\nspec:\n  podSelector: {matchLabels: {role: server}}\n  policyTypes: [Ingress]\n";
    let yaml = format!("{}{policy}", pods_yaml(&c, role));
    c.write_manifest("policy.yaml", &yaml);
    c.wait_log(0, |l| l.lines().any(|l| l.contains("synced") && l.contains("isolated_pods=1")));
    let addr = format!("{}:8080", c.pod_ip("n1-pod2"));
    let out = c.client_in_pod("n2-pod1", &["tcp", &addr, "1"]);
    assert!(out.iter().all(|l| l.starts_with("ERR")), "enforced: {out:?}");
    // The same node and manifests with --enable-network-policy=false: nothing is isolated, the
    // policy state left by the previous agent is removed.
    c.stop_agent(0);
    let since = c.spawn_agent(0, &lab::agent_bin(), true, &["--enable-network-policy=false"]);
    c.wait_log(0, |l| l[since..].contains("synced "));
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.lines().any(|l| l.contains("synced") && l.contains("policies=0 isolated_pods=0")), "{log}");
    let t = tally(&c.client_in_pod("n2-pod1", &["tcp", &addr, "3"]));
    assert_eq!(t.get("n1-pod2"), Some(&3), "not enforced: {t:?}\n{log}");
    let policies = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "inspect", "policies", "--pin-dir", c.nodes[0].pin.path.to_str().unwrap()]).output().unwrap();
    assert!(!String::from_utf8_lossy(&policies.stdout).contains("deny-all"), "{}", String::from_utf8_lossy(&policies.stdout));
    // The first sync emptied the policy maps; a change of the policy objects afterwards compiles
    // nothing (they are not enforced) and isolates nothing.
    assert!(log.lines().any(|l| l.contains("synced") && l.contains("policies_compiled=true")), "{log}");
    let since = c.agent_log(0).len();
    c.write_manifest("policy.yaml", &format!("{yaml}---
{}", policy.replace("deny-all", "deny-all-2")));
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.lines().any(|l| l.contains("synced") && l.contains("policies=0 isolated_pods=0 policies_compiled=false")), "{log}");
    let t = tally(&c.client_in_pod("n2-pod1", &["tcp", &addr, "3"]));
    assert_eq!(t.get("n1-pod2"), Some(&3), "not enforced after the change: {t:?}\n{log}");
}

#[test]
fn a_pin_removed_by_hand_is_pinned_again_and_livez_follows_the_datapath() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let pin = c.nodes[0].pin.path.join("links/cgroup-connect4");
    let ns = c.nodes[0].ns.name.clone();
    let livez = || bpf_tests::fakeapi::http_get_in(&ns, "127.0.0.1:10256", "/livez").map(|r| r.0);
    assert_eq!(livez(), Some(200));
    std::fs::remove_file(&pin).unwrap();
    // Without a pin the link would go with the agent's process: the next check (every 10 s)
    // pins it again.
    let deadline = Instant::now() + std::time::Duration::from_secs(25);
    while !pin.exists() {
        assert!(Instant::now() < deadline, "not pinned again:\n{}", c.agent_log(0));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    c.wait_log(0, |l| l.contains("link cgroup-connect4: its pin had been removed; pinned again"));
    assert_eq!(livez(), Some(200));
    // Host processes still reach the ClusterIP through it after a restart.
    c.stop_agent(0);
    c.start_agent(0);
    let t = tally(&c.client_on_node(0, &["tcp", lab::TCP_VIP, "3"]));
    assert_eq!(t.values().sum::<usize>(), 3, "{t:?}");
}

#[test]
fn healthz_fails_while_the_node_is_drained_by_the_autoscaler_and_livez_does_not() {
    let (mut c, _d) = cluster(&ALL, &ALL);
    let ns = c.nodes[0].ns.name.clone();
    let get = |path: &str| bpf_tests::fakeapi::http_get_in(&ns, "127.0.0.1:10256", path).unwrap();
    assert_eq!((get("/healthz").0, get("/livez").0), (200, 200));
    let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.1}]}\n";
    c.write_manifest("node1.yaml", node);
    let (code, body) = get("/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    assert_eq!(get("/livez").0, 200);
    // Traffic is served all the same (the taint drains load balancers, not the node).
    let t = tally(&c.client_in_pod("n1-pod1", &["tcp", lab::TCP_VIP, "3"]));
    assert_eq!(t.values().sum::<usize>(), 3, "{t:?}");
    c.write_manifest("node1.yaml", &node.replace("spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]}", "spec: {}"));
    assert_eq!(get("/healthz").0, 200);
}
