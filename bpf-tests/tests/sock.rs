//! The socket hooks (sock.rs) on the real programs: a private datapath's socket programs on a
//! cgroup of the test's own, and real sockets from a process in that cgroup and in a network
//! namespace of the test's own. (BPF_PROG_TEST_RUN cannot drive cgroup sock_addr programs: the
//! kernel has no test run for them; `trace` probes node flows the same way.) Needs root.
use std::collections::BTreeMap;

use bpf_tests::{
    fixture::Datapath,
    lab::{self, load_bin, Cgroup, Netns, Proc},
};
use dataplane_common::{stat, DropReason};

/// The node's primary address: the datapath's configured source for a socket bound to none.
const PRIMARY: &str = "192.168.0.2";
/// Another address of the node, inside the first Service's ranges.
const INSIDE: &str = "192.168.0.3";
/// Another address of the node, inside no range.
const OUTSIDE: &str = "192.168.0.4";
const BACKEND: &str = "10.0.0.5";

/// Two LoadBalancer Services with loadBalancerSourceRanges, each over the one backend: `lb-inside`
/// allows only INSIDE, `lb-primary` only the primary address; `open` has no ranges.
fn services() -> String {
    let svc = |name: &str, vip: &str, ranges: &str| {
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{type: LoadBalancer, clusterIP: {vip}, {ranges}ports: [{{port: 80, targetPort: 8080, nodePort: 300{}}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 198.51.100.{}}}]}}}}\n---\n\
             kind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
             ports: [{{port: 8080}}]\nendpoints: [{{addresses: [{BACKEND}], nodeName: node1}}]\n---\n",
            &vip[vip.rfind('.').unwrap() + 1..],
            &vip[vip.rfind('.').unwrap() + 1..]
        )
    };
    let mut y = svc("lb-inside", "172.30.0.21", &format!("loadBalancerSourceRanges: [{INSIDE}/32], "));
    y += &svc("lb-primary", "172.30.0.22", &format!("loadBalancerSourceRanges: [{PRIMARY}/32], "));
    y += &svc("open", "172.30.0.23", "");
    y
}

/// A namespace holding the node's three addresses and the backend (all on lo) with a
/// `ferry-load` server at the backend's port, and a cgroup carrying the datapath's socket hooks.
struct Node {
    dp: Datapath,
    _server: Proc,
    cg: Cgroup,
    ns: Netns,
}

fn node() -> Node {
    let id = lab::run_id();
    let ns = Netns::new(format!("ferry-sock-{id}"));
    for a in [PRIMARY, INSIDE, OUTSIDE, BACKEND] {
        ns.exec_ok(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    let server = ns
        .cmd(&[load_bin().to_str().unwrap(), "serve", "--name", "backend", "--tcp", "8080"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start ferry-load serve");
    let server = Proc { child: server, what: "ferry-load serve in the socket test".into() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ns.cmd(&["ss", "-Hltn", "sport = :8080"]).output().is_ok_and(|o| !o.stdout.is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the backend server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut dp = Datapath::new();
    dp.apply_yaml(&services());
    let cg = Cgroup::new(dataplane_agent::attach::cgroup2_root().expect("cgroup v2 mount").join(format!("ferry-sock-{id}")));
    dataplane_agent::attach::attach_cgroup(&mut dp.ebpf, &cg.path).expect("attach the socket hooks");
    Node { dp, _server: server, cg, ns }
}

impl Node {
    /// `count` connections to `dst` from a process of the node's cgroup, bound to `from` (none:
    /// unbound); (answers by backend name, failures by kind), each asserted to add up to `count`.
    fn connect(&self, dst: &str, from: Option<&str>, count: usize) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
        let n = count.to_string();
        let mut args = vec![load_bin().to_str().unwrap().to_string(), "churn".into(), dst.into(), "--count".into(), n, "--concurrency".into(), "4".into()];
        args.extend(["--timeout-ms".into(), "2000".into(), "--deadline-s".into(), "20".into()]);
        if let Some(f) = from {
            args.extend(["--from".into(), f.into()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = self.ns.cmd(&refs);
        let procs = self.cg.path.join("cgroup.procs");
        use std::os::unix::process::CommandExt;
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        let out = cmd.output().expect("run ferry-load churn");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (mut ok, mut failed) = (BTreeMap::new(), BTreeMap::new());
        for l in text.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["backend", name, c] => {
                    ok.insert(name.to_string(), c.parse().unwrap());
                }
                ["failure", kind, c] => {
                    failed.insert(kind.to_string(), c.parse().unwrap());
                }
                _ => {}
            }
        }
        let total: usize = ok.values().chain(failed.values()).sum();
        assert_eq!(total, count, "{dst} from {from:?}: every connection answered or failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        (ok, failed)
    }
}

fn all_answered(n: usize) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    ([("backend".to_string(), n)].into(), BTreeMap::new())
}

fn all_refused(n: usize) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    (BTreeMap::new(), [("connect-PermissionDenied".to_string(), n)].into())
}

#[test]
fn node_connections_meet_source_ranges_by_their_bound_source_else_the_primary_address() {
    let n = node();
    let refused = || n.dp.stat(DropReason::SourceRange.stat());
    // Bound inside the ranges: translated to the backend and answered.
    assert_eq!(n.connect("198.51.100.21:80", Some(INSIDE), 20), all_answered(20), "bound inside the ranges");
    assert_eq!(refused(), 0);
    // Bound outside them: refused at connect(), nothing leaves.
    assert_eq!(n.connect("198.51.100.21:80", Some(OUTSIDE), 20), all_refused(20), "bound outside the ranges");
    assert_eq!(refused(), 20);
    // Unbound: judged as the node's primary address (the configured source), outside these
    // ranges and inside the other Service's.
    assert_eq!(n.connect("198.51.100.21:80", None, 20), all_refused(20), "unbound, the primary address outside the ranges");
    assert_eq!(refused(), 40);
    assert_eq!(n.connect("198.51.100.22:80", None, 20), all_answered(20), "unbound, the primary address inside the ranges");
    // The bound address wins over the primary one.
    assert_eq!(n.connect("198.51.100.22:80", Some(INSIDE), 20), all_refused(20), "bound outside, though the primary address is inside");
    assert_eq!(refused(), 60);
    // A frontend without ranges never asks where the connection comes from.
    for from in [None, Some(INSIDE), Some(OUTSIDE)] {
        assert_eq!(n.connect("198.51.100.23:80", from, 10), all_answered(10), "no ranges, from {from:?}");
    }
    assert_eq!(refused(), 60);
    assert_eq!(n.dp.stat(stat::SOCK_XLATE), 20 + 20 + 30);
}
