//! `cargo xtask bench`'s agent-at-scale rows: the real agent (the bench's own build) reading N
//! Services and their EndpointSlices from `--manifests`, where no API server's list and watch
//! cost comes on top, at sizes the API-server section cannot write in a bench's time (100,000
//! Services is 200,000 objects: about half an hour of POSTs here).
//!
//! Each Service is a ClusterIP with one TCP port and one EndpointSlice of 3 endpoints, drawn
//! from a pool of pod addresses (Kubernetes' own limit is 150,000 pods per cluster, so 100,000
//! Services share their pods as real ones do). The agent runs in a network namespace of its own
//! (a link holds the node's address; no pod interfaces, no cgroup hooks) with a pin
//! directory of its own, and is timed from its start to the end of its first sync (its own
//! `last_timestamp` metric), then stopped and started again over its pinned maps, and timed
//! again: what a DaemonSet rolling the agent costs. Resident memory is read from its metrics
//! after each first sync. Everything it made is removed on the way out, on failure too.
use std::{
    io::Write,
    path::Path,
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    conformance::{interrupted, metric},
    lab::{self, Netns, PinDir, Proc, TempDir},
};

const NODE: &str = "scale-node";
const NODE_IP: &str = "192.168.60.2";
const SERVICE_CIDR: &str = "10.96.0.0/12";
const POD_CIDR: &str = "10.128.0.0/16";
/// The pod addresses the Services' endpoints are drawn from.
const POOL: u32 = 60_000;
const ENDPOINTS: u32 = 3;
/// How long a first sync may take before the run gives up on it.
const SYNC_BOUND: Duration = Duration::from_secs(300);
const SYNC_HIST: &str = "kubeproxy_sync_proxy_rules_duration_seconds";

fn svc_ip(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 1)) + i)
}

fn pod_ip(i: u32, k: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + (i * ENDPOINTS + k) % POOL)
}

/// The manifests of Services `0..n` and their slices, into `w`.
fn write_objects(w: &mut impl Write, n: u32) -> std::io::Result<()> {
    for i in 0..n {
        let eps: Vec<String> = (0..ENDPOINTS).map(|k| format!("{{addresses: [\"{}\"], conditions: {{ready: true}}}}", pod_ip(i, k))).collect();
        write!(
            w,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\nspec: {{type: ClusterIP, clusterIP: {ip}, clusterIPs: [{ip}], ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: scale, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            eps.join(", "),
            ip = svc_ip(i)
        )?;
    }
    Ok(())
}

/// One start of the agent: start → first sync done, its own sync time and map writes, and its
/// resident memory then (checked: every Service read, none refused, a frontend for each).
#[derive(Debug)]
struct Start {
    synced: Duration,
    own: f64,
    writes: f64,
    rss: f64,
}

struct Node {
    // Field order is drop order: the agent stops before its namespace and pins go.
    agent: Option<Proc>,
    ns: Netns,
    pin: PinDir,
    dir: TempDir,
}

impl Node {
    fn new() -> Node {
        let id = lab::run_id();
        let ns = Netns::new(format!("ferry-scale-{id}"));
        // (A veth pair with both ends inside: this kernel has no dummy links.)
        ns.exec_ok(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        let pin = PinDir { path: format!("/sys/fs/bpf/ferry-scale-{id}").into() };
        std::fs::create_dir_all(&pin.path).unwrap_or_else(|e| panic!("{}: {e}", pin.path.display()));
        let dir = TempDir::new(&format!("scale-{id}"));
        std::fs::create_dir_all(dir.path.join("manifests")).unwrap();
        Node { agent: None, ns, pin, dir }
    }

    fn metrics(&self) -> String {
        let out = self.ns.cmd(&["curl", "-s", "--max-time", "5", "http://127.0.0.1:10249/metrics"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Starts the agent and waits for its first sync.
    fn start(&mut self, n: u32) -> Result<Start, String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path.join("agent.log")).map_err(|e| e.to_string())?;
        // Room for every table (251 entries for 3 endpoints).
        let tables = (n as u64 * 256).max(dataplane_common::capacity::CHASH_ENTRIES as u64).to_string();
        let manifests = self.dir.path.join("manifests");
        let wall = SystemTime::now();
        let started = Instant::now();
        let child = self
            .ns
            .cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--node", NODE])
            .args(["--manifests", manifests.to_str().unwrap(), "--pin-dir", self.pin.path.to_str().unwrap(), "--cgroup", "none"])
            .args(["--pod-interfaces", "veth*", "--service-cidr", SERVICE_CIDR, "--cluster-cidr", POD_CIDR, "--node-ip", NODE_IP])
            .args(["--lb-table-entries", &tables, "--min-sync-period-ms", "100"])
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("start agent: {e}"))?;
        self.agent = Some(Proc { child, what: "agent".into() });
        loop {
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(|a| a.child.try_wait()) {
                return Err(format!("the agent exited ({st}): {}", self.log_tail()));
            }
            if interrupted() {
                return Err("interrupted".into());
            }
            if started.elapsed() > SYNC_BOUND {
                return Err(format!("no first sync within {} s", SYNC_BOUND.as_secs()));
            }
            let m = self.metrics();
            let last = metric(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
            if last > 0.0 {
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(last);
                let synced = at.duration_since(wall).unwrap_or_default();
                let own = metric(&m, &format!("{SYNC_HIST}_sum"));
                let services = metric(&m, "ferry_objects{kind=\"Service\"}");
                let errors = metric(&m, "ferry_object_errors");
                let writes = metric(&m, "ferry_map_writes_total");
                // The memory once the first read's garbage is given back (the agent trims it
                // right after a full read).
                std::thread::sleep(Duration::from_secs(2));
                let rss = metric(&self.metrics(), "process_resident_memory_bytes");
                // The first sync's own line: every Service's frontend is in the maps.
                let log = std::fs::read_to_string(self.dir.path.join("agent.log")).unwrap_or_default();
                let frontends = log.lines().rev().find(|l| l.contains(" synced ")).and_then(|l| l.split(" frontends=").nth(1)?.split(' ').next()?.parse().ok()).unwrap_or(0);
                if services != n as f64 || errors != 0.0 || frontends != n as usize {
                    return Err(format!("after the first sync: {services} Services, {errors} object errors, {frontends} frontends, not {n}, 0, {n}: {}", self.log_tail()));
                }
                return Ok(Start { synced, own, writes, rss });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
    }
}

fn measure(n: u32) -> Result<(Start, Start, Duration), String> {
    let mut node = Node::new();
    let t = Instant::now();
    let path = node.dir.path.join("manifests/objects.yaml");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| e.to_string())?);
    write_objects(&mut f, n).and_then(|_| f.flush()).map_err(|e| format!("{}: {e}", path.display()))?;
    drop(f);
    let written = t.elapsed();
    let first = node.start(n)?;
    node.stop();
    let restart = node.start(n)?;
    node.stop();
    Ok((first, restart, written))
}

fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / (1024.0 * 1024.0))
}

/// The rows for each size in `sizes`.
pub fn run(sizes: &[u32]) -> Result<(), String> {
    crate::conformance::catch_signals();
    if !Path::new(&lab::agent_bin()).exists() {
        return Err(format!("{} missing", lab::agent_bin().display()));
    }
    println!("\nThe agent at scale, from --manifests (no API server: its list and watch come on top, see the next section), 3 endpoints per Service:");
    println!("{:>9} | {:>22} | {:>22} | {:>10} | {:>22} | {:>10} | {:>9}", "services", "start → first sync", "own sync (map writes)", "RSS", "restart → first sync", "RSS", "manifest");
    println!("{}", "-".repeat(124));
    for &n in sizes {
        match measure(n) {
            Ok((first, again, written)) => println!(
                "{n:>9} | {:>22} | {:>22} | {:>10} | {:>22} | {:>10} | {:>8.0}s",
                format!("{:.2} s", first.synced.as_secs_f64()),
                format!("{:.2} s ({:.0})", first.own, first.writes),
                mib(first.rss),
                format!("{:.2} s (own {:.2} s)", again.synced.as_secs_f64(), again.own),
                mib(again.rss),
                written.as_secs_f64()
            ),
            Err(e) => {
                println!("{n:>9} | {e}");
                if e.starts_with("interrupted") {
                    return Err(e);
                }
            }
        }
    }
    println!("start → first sync: from the agent's start to the end of its first sync (its own last_timestamp metric), the manifests' read and parse included;");
    println!("own sync: its sync_proxy_rules_duration; map writes: ferry_map_writes_total (table entries included, written as memory). restart: the agent");
    println!("stopped and started again over its pinned maps (it reads them back, and its first sync writes only what differs). RSS: process_resident_memory_bytes");
    println!("2 s after the first sync. manifest: the time to write the manifest file (not part of any figure).");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_are_what_the_agent_reads() {
        let mut out = Vec::new();
        write_objects(&mut out, 2).unwrap();
        let text = String::from_utf8(out).unwrap();
        let docs: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
        assert_eq!(docs.len(), 4);
        let docs: Vec<serde_yaml::Value> = docs.iter().map(|d| serde_yaml::from_str(d).unwrap()).collect();
        assert_eq!(docs[2]["spec"]["clusterIP"].as_str(), Some("10.96.0.2"));
        assert_eq!(docs[3]["endpoints"][2]["addresses"][0].as_str(), Some("10.128.0.6"));
        assert_eq!(pod_ip(99_999, 2), std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + (299_999 % POOL)));
        assert!(u32::from(svc_ip(99_999)) < u32::from(std::net::Ipv4Addr::new(10, 112, 0, 0)));
    }
}
