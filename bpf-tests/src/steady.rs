//! Production's steady load for restart and upgrade tests: a long-lived TCP connection
//! exchanging a message every 50 ms, a new TCP connection every 100 ms, a UDP query every
//! 100 ms, and recent connections (one more every 50 ms, the newest 40 kept and asked again
//! every 100 ms, so some are always a moment old) (`ferry-load steady`), from a pod to a
//! ClusterIP and from outside to a source-translated NodePort, through node1.
use std::time::Instant;

use crate::lab::{self, services_yaml, At, Cluster, LabOptions, LoadProc, Svc, SvcPort, TempDir, LOAD_TCP_PORT, LOAD_UDP_PORT};

/// The two-node lab with real offloads and the load servers, serving [`steady_services`], agents
/// started.
pub fn lab() -> (Cluster, TempDir) {
    let dir = TempDir::new(&format!("steady-{}", lab::run_id()));
    std::fs::write(dir.path.join("steady.yaml"), services_yaml(&steady_services())).unwrap();
    let mut c = Cluster::with_options(&dir.path, LabOptions { load_servers: true, offloads: true, ..Default::default() });
    c.start_agents();
    (c, dir)
}

/// Pod -> ClusterIP (backends on both nodes) and outside -> NodePort (eTP=Cluster, its backend on
/// node2: node1 translates the source).
pub fn steady_services() -> Vec<Svc> {
    vec![
        Svc::new("steady", "ClusterIP", "10.96.3.10")
            .port(SvcPort::new("TCP", 80, LOAD_TCP_PORT))
            .port(SvcPort::new("UDP", 53, LOAD_UDP_PORT))
            .pods(&["n1-pod2", "n2-pod1", "n2-pod2"]),
        Svc::new("steady-np", "NodePort", "10.96.3.11")
            .port(SvcPort::new("TCP", 80, LOAD_TCP_PORT).node_port(30300))
            .port(SvcPort::new("UDP", 53, LOAD_UDP_PORT).node_port(30301))
            .pods(&["n2-pod1"]),
    ]
}

/// The two steady loads, running.
pub struct Load(Vec<(&'static str, LoadProc)>, Instant);

pub fn start_load(c: &Cluster) -> Load {
    let mut procs = Vec::new();
    for (what, at, tcp, udp) in
        [("pod -> ClusterIP", At::Pod("n1-pod1"), "10.96.3.10:80", "10.96.3.10:53"), ("outside -> NodePort (SNAT)", At::Outside, "192.168.77.1:30300", "192.168.77.1:30301")]
    {
        let mut p = c.load_spawn(at, &["steady", tcp, udp, "--max-s", "300"]);
        let first = p.line();
        assert_eq!(first, "ready", "{what}: {first} {:?}", p.finish());
        procs.push((what, p));
    }
    Load(procs, Instant::now())
}

impl Load {
    /// Stops the loads and asserts 0 failures, 0 broken or moved connections, and that each
    /// loop really ran for the whole time.
    pub fn finish(self, during: &str) {
        let secs = self.1.elapsed().as_secs_f64();
        let mut report = Vec::new();
        let mut bad = false;
        for (what, p) in self.0 {
            let lines = p.finish();
            let last = lines.last().cloned().unwrap_or_default();
            let field = |prefix: &str, key: &str| -> u64 {
                lines.iter().find(|l| l.starts_with(prefix)).and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")))).and_then(|v| v.parse().ok()).unwrap_or(0)
            };
            // At least half the requests the period allows (the loops wait for each answer).
            let (long, conn, udp, recent) = (field("long", "ok"), field("conn", "ok"), field("udp", "ok"), field("recent", "opened"));
            let enough = long as f64 >= secs * 20.0 * 0.5 && conn as f64 >= secs * 10.0 * 0.5 && udp as f64 >= secs * 10.0 * 0.5 && recent as f64 >= secs * 20.0 * 0.5;
            if !last.ends_with(" 0 failed") || field("long", "broken") != 0 || field("long", "moved") != 0 || field("recent", "moved") != 0 || !enough {
                bad = true;
            }
            report.push(format!("{what} ({secs:.1} s):\n  {}", lines.join("\n  ")));
        }
        assert!(!bad, "failures through {during}:\n{}", report.join("\n"));
        eprintln!("{during}: {}", report.join("\n"));
    }
}

