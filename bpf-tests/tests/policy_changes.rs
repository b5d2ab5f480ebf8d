//! NetworkPolicy changes against live connections, in the two-node lab with real TCP and UDP:
//! a change reaches established connections it no longer allows, even while the isolated pod
//! itself keeps sending, and leaves alone the ones it still allows, including connections that
//! were open before any policy selected the pod. (Found by an independent review with these
//! very streams.)
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bpf_tests::lab::{self, echo_yaml, Cluster, TempDir};

fn role(name: &str) -> &'static str {
    match name {
        "n1-pod1" => "client",
        "n1-pod2" | "n2-pod1" => "server",
        _ => "other",
    }
}

fn policy(name: &str, selects: &str, types: &str, rules: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: lab}}\nspec:\n  podSelector: {{matchLabels: {{role: {selects}}}}}\n  policyTypes: [{types}]\n{rules}")
}

/// Servers accept clients (ingress only).
fn servers_allow() -> String {
    policy("servers", "server", "Ingress", "  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]\n")
}

/// Servers accept no one.
fn servers_deny() -> String {
    policy("servers", "server", "Ingress", "")
}

fn pods_yaml(c: &Cluster) -> String {
    c.pods_yaml(role)
}

fn lab_with(pols: &[String]) -> (Cluster, TempDir) {
    lab_args(pols, &[])
}

/// A UDP Service (10.96.0.71:53) in front of port 7071 of n1-pod2.
const BIG_VIP: &str = "10.96.0.71:53";
const BIG_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: lab}\nspec:\n  clusterIP: 10.96.0.71\n  ports: [{name: u, port: 53, protocol: UDP, targetPort: 7071}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: big-1, namespace: lab, labels: {kubernetes.io/service-name: big}}\naddressType: IPv4\n\
ports: [{name: u, port: 7071, protocol: UDP}]\nendpoints:\n- addresses: [10.201.1.12]\n  conditions: {ready: true}\n";

fn lab_args(pols: &[String], args: &[&str]) -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("polchg-{}", lab::run_id()));
    let servers = [Ipv4Addr::new(10, 201, 1, 12), Ipv4Addr::new(10, 201, 2, 11)];
    std::fs::write(dir.path.join("echo.yaml"), format!("{}---\n{BIG_SVC}", echo_yaml(&servers, &servers))).unwrap();
    let mut opts = lab::LabOptions::default();
    opts.agent_args = args.iter().map(|s| s.to_string()).collect();
    let mut c = Cluster::with_options(&dir.path, opts);
    std::fs::write(dir.path.join("policy.yaml"), format!("{}{}", pods_yaml(&c), pols.join("---\n"))).unwrap();
    c.start_agents();
    (c, dir)
}

/// Rewrites the policies (without waiting: the change is part of what is measured).
fn set_policies(c: &Cluster, pols: &[String]) {
    let tmp = c.logs.path.join(".policy.new");
    std::fs::write(&tmp, format!("{}{}", pods_yaml(c), pols.join("---\n"))).unwrap();
    std::fs::rename(&tmp, c.manifests.join("policy.yaml")).unwrap();
}

/// A TCP stream: `srv` accepts on `port` and writes a line every 50 ms; `cli` connects and, when
/// `cli_sends`, writes a line every 50 ms too. Half a second in, `change` runs. Returns the
/// lines (client read before, client read later than 1.5 s after; server read later than 1.5 s
/// after the change).
fn stream(c: &Cluster, srv: &str, cli: &str, port: u16, cli_sends: bool, change: impl FnOnce()) -> (usize, usize, usize) {
    let server = c.pod(srv).ip;
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Instant)>();
    let changed = std::thread::scope(|s| {
        let (srv_ns, cli_ns, stop) = (&c.pod(srv).ns, &c.pod(cli).ns, &stop);
        let srv_tx = tx.clone();
        s.spawn(move || {
            let _in = srv_ns.enter();
            let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
            let (conn, _) = l.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut w = conn.try_clone().unwrap();
            w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            std::thread::scope(|s2| {
                s2.spawn(move || {
                    for i in 0..200 {
                        if stop.load(Ordering::Relaxed) || w.write_all(format!("tick {i}\n").as_bytes()).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
                for l in BufReader::new(conn).lines() {
                    if l.is_err() || srv_tx.send((true, Instant::now())).is_err() {
                        break;
                    }
                }
            });
        });
        std::thread::sleep(Duration::from_millis(200));
        s.spawn(move || {
            let _in = cli_ns.enter();
            let st = TcpStream::connect_timeout(&SocketAddrV4::new(server, port).into(), Duration::from_secs(2)).expect("connect");
            st.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut w = st.try_clone().unwrap();
            w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            std::thread::scope(|s2| {
                if cli_sends {
                    s2.spawn(move || {
                        for i in 0..200 {
                            if stop.load(Ordering::Relaxed) || w.write_all(format!("c {i}\n").as_bytes()).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    });
                }
                for l in BufReader::new(st).lines() {
                    if l.is_err() || tx.send((false, Instant::now())).is_err() {
                        break;
                    }
                }
            });
        });
        std::thread::sleep(Duration::from_millis(500));
        let changed = Instant::now();
        change();
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        changed
    });
    let got: Vec<(bool, Instant)> = rx.try_iter().collect();
    let late = changed + Duration::from_millis(1500);
    (
        got.iter().filter(|(at_srv, t)| !at_srv && *t < changed).count(),
        got.iter().filter(|(at_srv, t)| !at_srv && *t > late).count(),
        got.iter().filter(|(at_srv, t)| *at_srv && *t > late).count(),
    )
}

#[test]
fn connections_a_new_policy_still_allows_keep_flowing() {
    let (c, _d) = lab_with(&[servers_allow()]);
    // The client streams from a pod on node2, then becomes isolated for ingress: the stream is
    // the reply of its own connection, which Kubernetes keeps allowed.
    let deny_in = policy("client-in", "client", "Ingress", "");
    let (before, after, _) = stream(&c, "n2-pod2", "n1-pod1", 7001, false, || set_policies(&c, &[servers_allow(), deny_in.clone()]));
    assert!(before >= 5 && after >= 20, "the client's outgoing connection after it became ingress-isolated: {before} lines before, {after} after");
    // A connection into the client, which pushes data out, then the client becomes isolated for
    // egress: its pushes are replies of an allowed incoming connection.
    set_policies(&c, &[servers_allow()]);
    std::thread::sleep(Duration::from_millis(500));
    let deny_out = policy("client-out", "client", "Egress", "");
    let (before, after, _) = stream(&c, "n1-pod1", "n2-pod2", 7002, false, || set_policies(&c, &[servers_allow(), deny_out.clone()]));
    assert!(before >= 5 && after >= 20, "pushes of a connection into the client after it became egress-isolated: {before} before, {after} after");
    // An unrelated change leaves a server's stream to the client alone.
    set_policies(&c, &[servers_allow()]);
    std::thread::sleep(Duration::from_millis(500));
    let unrelated = policy("other-in", "other", "Ingress", "  ingress: [{ports: [{port: 1234}]}]\n");
    let (before, after, _) = stream(&c, "n1-pod2", "n1-pod1", 7003, true, || set_policies(&c, &[servers_allow(), unrelated.clone()]));
    assert!(before >= 5 && after >= 20, "a server's stream across an unrelated change: {before} before, {after} after");
}

#[test]
fn connections_a_policy_no_longer_allows_stop_even_while_the_pod_sends() {
    let (c, _d) = lab_with(&[servers_allow()]);
    // A server pushes to the client, the client writes too; the server stops accepting clients.
    // The server's own next segments must not reopen the connection for the client.
    for (server, port) in [("n1-pod2", 7011u16), ("n2-pod1", 7012)] {
        set_policies(&c, &[servers_allow()]);
        std::thread::sleep(Duration::from_millis(500));
        let (before, client_after, server_after) = stream(&c, server, "n1-pod1", port, true, || set_policies(&c, &[servers_deny()]));
        assert!(before >= 5, "{server}: the stream never started ({before} lines)");
        assert_eq!((client_after, server_after), (0, 0), "{server}: lines still exchanged more than 1.5 s after the policy stopped allowing the client (client read, server read)");
    }
}

#[test]
fn large_udp_replies_of_an_egress_isolated_server_arrive_whole() {
    let locked = policy("servers", "server", "Ingress, Egress", "  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]\n");
    let (c, _d) = lab_with(&[locked]);
    let server = c.pod("n1-pod2").ip;
    let got = std::thread::scope(|s| {
        let srv_ns = &c.pod("n1-pod2").ns;
        s.spawn(move || {
            let _in = srv_ns.enter();
            let u = UdpSocket::bind("0.0.0.0:7071").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 100];
            for _ in 0..3 {
                if let Ok((_, from)) = u.recv_from(&mut buf) {
                    // Larger than the MTU: sent as fragments, replies of the client's query.
                    let _ = u.send_to(&[0x42u8; 4000], from);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let cli_ns = &c.pod("n1-pod1").ns;
        s.spawn(move || {
            let _in = cli_ns.enter();
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Directly, twice, then through the Service (its reply translated back on the way).
            let to = [SocketAddrV4::new(server, 7071), SocketAddrV4::new(server, 7071), BIG_VIP.parse().unwrap()];
            to.iter()
                .map(|to| {
                    u.send_to(b"query", to).unwrap();
                    let mut buf = [0u8; 8000];
                    u.recv_from(&mut buf).map(|(n, _)| n).unwrap_or(0)
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    });
    assert_eq!(got, vec![4000; 3], "4000-byte replies of a server isolated both ways (direct, direct, through its ClusterIP)");
}

#[test]
fn connections_whose_entries_expired_keep_flowing_into_and_out_of_isolated_pods() {
    // Entries of established connections expire after 3 s idle; the connections go on, as with
    // the kernel's conntrack (a segment in mid-connection is picked up again).
    let client_in = policy("client-in", "client", "Ingress", "");
    let servers = policy("servers", "server", "Ingress, Egress", "  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]\n");
    let (c, _d) = lab_args(&[client_in, servers], &["--conntrack-tcp-timeout-established", "3s"]);
    // The client (isolated for ingress) to an unselected pod; to a server (isolated both ways).
    let mut to_other = c.session("n1-pod1", "tcp-session", &format!("{}:{}", c.pod("n2-pod2").ip, lab::ECHO_TCP_PORT));
    let mut to_server = c.session("n1-pod1", "tcp-session", &format!("{}:{}", c.pod("n1-pod2").ip, lab::ECHO_TCP_PORT));
    assert_eq!(to_other.backend(), "n2-pod2");
    assert_eq!(to_server.backend(), "n1-pod2");
    std::thread::sleep(Duration::from_secs(6));
    for _ in 0..3 {
        assert_eq!(to_other.backend(), "n2-pod2", "after the entries expired");
        assert_eq!(to_server.backend(), "n1-pod2", "after the entries expired");
    }
}

#[test]
fn replies_of_an_egress_isolated_backend_reach_a_masqueraded_client_outside() {
    // Servers accept anyone and send nothing of their own; a client outside the cluster reaches
    // them through the ClusterIPs (masqueraded: the lab's --cluster-cidr): their replies are replies.
    let servers = policy("servers", "server", "Ingress, Egress", "  ingress: [{}]\n");
    let (c, _d) = lab_args(&[servers], &[]);
    let tcp = c.client_outside(&["tcp", lab::TCP_VIP, "6"]);
    assert!(tcp.iter().all(|l| !l.starts_with("ERR")), "{tcp:?}");
    let udp = c.client_outside(&["udp", lab::UDP_VIP, "6"]);
    assert!(udp.iter().all(|l| !l.starts_with("ERR")), "{udp:?}");
}

#[test]
fn a_cut_connection_resumes_once_the_policies_allow_it_again() {
    // The server is isolated both ways (clients in; nothing out). A policy change cuts the
    // client's TCP connection and UDP flow; a later change allows them again, by the rule or by
    // lifting ingress isolation (egress still denied: the flows' packets are replies).
    let both = |rules: &str| policy("servers", "server", "Ingress, Egress", rules);
    let allow = both("  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]\n");
    let (mut c, _d) = lab_with(&[allow.clone()]);
    let server = c.pod("n1-pod2").ip;
    let mut tcp = c.session("n1-pod1", "tcp-session", &format!("{server}:{}", lab::ECHO_TCP_PORT));
    let mut udp = c.session("n1-pod1", "udp-session", &format!("{server}:{}", lab::ECHO_UDP_PORT));
    let ok = |s: &mut lab::Session| !s.ask().starts_with("ERR");
    assert!(ok(&mut tcp) && ok(&mut udp), "before");
    for (how, again) in [("the ingress rule back", allow.clone()), ("ingress isolation lifted", policy("servers", "server", "Egress", ""))] {
        c.write_manifest("policy.yaml", &format!("{}{}", pods_yaml(&c), both("")));
        // (An answer that came late, after its ask timed out, is read by the next ask: the
        // second one counts.)
        let cut = |s: &mut lab::Session| {
            let _ = s.ask();
            !ok(s)
        };
        assert!(cut(&mut tcp) && cut(&mut udp), "cut ({how})");
        c.write_manifest("policy.yaml", &format!("{}{again}", pods_yaml(&c)));
        // The TCP connection may first wait out a retransmission backoff; a few tries.
        let resumed = |s: &mut lab::Session| (0..5).any(|_| ok(s));
        assert!(resumed(&mut tcp), "the TCP connection after {how}");
        assert!(resumed(&mut udp), "the UDP flow after {how}");
        // (Unchanged after the first round: written without waiting for a sync.)
        set_policies(&c, &[allow.clone()]);
        std::thread::sleep(Duration::from_millis(500));
        assert!(resumed(&mut tcp) && resumed(&mut udp), "with the rule back after {how}");
    }
}
