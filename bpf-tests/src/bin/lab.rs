//! `cargo xtask lab`: Ferry's main job on an embedded default. Builds a two-node cluster from
//! network namespaces, starts one agent per node with `deploy/examples/`, sends 100 requests to
//! each ClusterIP from a pod (and 100 from node1's own host network), prints who answered, and
//! tears everything down, also on failure or Ctrl-C.
//!
//! `--api-server`: the same lab and checks, its objects from a real control plane instead
//! (`bpf_tests::apilab`): Services created through the API, nodes and pods registered, the
//! EndpointSlices the controller's, the agents authenticated as the DaemonSet's ServiceAccount.
use std::sync::atomic::{AtomicBool, Ordering};

use bpf_tests::{
    apilab::ApiLab,
    lab::{self, Cluster},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Returns early (running every Drop guard) when Ctrl-C was pressed.
macro_rules! checkpoint {
    () => {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: tearing the lab down");
            return std::process::ExitCode::from(130);
        }
    };
}

fn main() -> std::process::ExitCode {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let requests = args.iter().find_map(|n| n.parse().ok()).unwrap_or(100usize).to_string();
    // Declared before the lab: dropped after it (its agents stop first).
    let mut api = args.iter().any(|a| a == "--api-server").then(|| {
        println!("lab: starting a control plane (etcd, kube-apiserver, kube-controller-manager)");
        ApiLab::up()
    });
    checkpoint!();
    println!("lab: building node1, node2 (two pods each) in network namespaces");
    let mut c = Cluster::new(&lab::examples_dir());
    checkpoint!();
    if let Some(api) = &mut api {
        api.join(&mut c);
        api.apply_manifests(&c, &lab::examples_dir());
        println!("lab {}: nodes, pods and the Services of {} registered with the API server in {}; EndpointSlices written by kube-controller-manager", c.id, lab::examples_dir().display(), api.cp.ns);
        checkpoint!();
    }
    let source = match &c.kubeconfig {
        Some(k) => format!("the API server (ServiceAccount kube-system/ferry, {})", k.display()),
        None => lab::examples_dir().display().to_string(),
    };
    println!("lab {}: starting one agent per node with {source}", c.id);
    c.start_agents();
    checkpoint!();
    let runs = [
        ("n1-pod1 (pod on node1)", "tcp", lab::TCP_VIP, false),
        ("n1-pod1 (pod on node1)", "udp", lab::UDP_VIP, false),
        ("node1 (host network)", "tcp", lab::TCP_VIP, true),
    ];
    let mut table = Vec::new();
    for (from, proto, vip, host) in runs {
        checkpoint!();
        let lines = if host { c.client_on_node(0, &[proto, vip, &requests]) } else { c.client_in_pod("n1-pod1", &[proto, vip, &requests]) };
        checkpoint!();
        table.push((from, proto, vip, lab::tally(&lines)));
    }
    println!("\n{:<24} {:<5} {:<14} {:<10} {:>7}", "from", "proto", "ClusterIP", "answered", "count");
    let mut ok = true;
    for (from, proto, vip, t) in &table {
        for (who, n) in t {
            println!("{from:<24} {proto:<5} {vip:<14} {who:<10} {n:>7}");
            ok &= !who.starts_with("ERR");
        }
        // Every endpoint (one on node1, two on node2) must have answered.
        ok &= t.keys().filter(|k| !k.starts_with("ERR")).count() == 3;
    }

    // From outside the cluster: a NodePort on node1 whose backend is on node2 (Cluster: node1
    // translates the source to itself), and a Local one whose backend must see the client.
    checkpoint!();
    println!("\n{:<24} {:<20} {:<10} {:<18} {:>7}", "from", "NodePort", "answered", "backend saw", "count");
    for (policy, addr, want_who, want_src) in [
        ("Cluster", lab::NODEPORT_CLUSTER, "n2-pod1", "192.168.77.1"),
        ("Local", lab::NODEPORT_LOCAL, "n1-pod2", lab::OUTSIDE_CLIENT),
    ] {
        let lines = c.client_outside(&["tcp", addr, &requests]);
        checkpoint!();
        let mut seen = std::collections::BTreeMap::new();
        for l in &lines {
            let mut w = l.split_whitespace();
            let who = w.next().unwrap_or("").to_string();
            let src = w.next().and_then(|s| s.split(':').next()).unwrap_or("").to_string();
            *seen.entry((who, src)).or_insert(0usize) += 1;
        }
        for ((who, src), n) in &seen {
            println!("{:<24} {:<20} {who:<10} {src:<18} {n:>7}", format!("outside ({policy})"), addr);
            ok &= who == want_who && src == want_src;
        }
    }
    if api.is_some() {
        // The API server through `default/kubernetes` (10.96.0.1:443, its endpoint the control
        // plane's 10.250.0.1:6443), from a pod of each node: what in-cluster clients use.
        checkpoint!();
        println!("\n{:<24} {:<20} {:<10}", "from", "Service", "answered");
        for pod in ["n1-pod1", "n2-pod1"] {
            let out = c.pod(pod).ns.cmd(&["curl", "-sk", "--max-time", "3", "https://10.96.0.1:443/readyz"]).output();
            let answer = match out {
                Ok(o) if o.stdout == b"ok" => "ok".to_string(),
                Ok(o) => format!("ERR {}", String::from_utf8_lossy(&o.stdout).trim()),
                Err(e) => format!("ERR {e}"),
            };
            println!("{pod:<24} {:<20} {answer:<10}", "default/kubernetes");
            ok &= answer == "ok";
        }
    }
    println!();
    for (i, n) in c.nodes.iter().enumerate() {
        for l in c.agent_log(i).lines().filter(|l| l.contains("synced") || l.contains("maps ")).take(2) {
            println!("{} agent: {l}", n.name);
        }
    }
    // What an operator sees on node1: its pinned maps, with Service names and counters.
    println!("\n$ dataplane-agent inspect services   # on node1");
    let out = std::process::Command::new(lab::agent_bin()).args(["inspect", "services", "--pin-dir"]).arg(&c.nodes[0].pin.path).output();
    match out {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => {
            println!("inspect failed: {}", String::from_utf8_lossy(&o.stderr));
            ok = false;
        }
        Err(e) => {
            println!("inspect failed: {e}");
            ok = false;
        }
    }
    drop(c);
    drop(api);
    println!("lab: torn down");
    if ok {
        println!("lab: every endpoint answered, no errors");
        std::process::ExitCode::SUCCESS
    } else {
        println!("lab: FAILED: some requests failed or an endpoint never answered");
        std::process::ExitCode::FAILURE
    }
}
