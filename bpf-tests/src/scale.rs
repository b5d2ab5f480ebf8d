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

/// Services per manifest file.
const PER_FILE: u32 = 1_000;
/// The endpoint the one change moves the last Service to.
const MOVED_TO: &str = "10.129.0.1";

/// The manifests of Services `from..to` and their slices, into `w`; `moved`: the last Service
/// of the range has one endpoint, `MOVED_TO`.
fn write_objects(w: &mut impl Write, from: u32, to: u32, moved: bool) -> std::io::Result<()> {
    for i in from..to {
        let mut eps: Vec<String> = (0..ENDPOINTS).map(|k| pod_ip(i, k).to_string()).collect();
        if moved && i + 1 == to {
            eps = vec![MOVED_TO.into()];
        }
        let eps: Vec<String> = eps.iter().map(|a| format!("{{addresses: [\"{a}\"], conditions: {{ready: true}}}}")).collect();
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
/// The figures come from the agent's /metrics and its log.
#[derive(Debug)]
struct Start {
    synced: Duration,
    own: f64,
    writes: f64,
    rss: f64,
    /// Of `rss`, the anonymous pages (the heap, stacks): the rest is the binary's own pages.
    /// `None` where /proc did not say.
    anon: Option<f64>,
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

    fn log_len(&self) -> usize {
        std::fs::metadata(self.dir.path.join("agent.log")).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// The last sync's log line written after byte `since` of the log (every start appends).
    fn last_synced(&self, since: usize) -> String {
        let log = std::fs::read(self.dir.path.join("agent.log")).unwrap_or_default();
        let log = String::from_utf8_lossy(&log[since.min(log.len())..]).into_owned();
        log.lines().rev().find(|l| l.contains(" synced ")).unwrap_or_default().to_string()
    }

    /// Rewrites the file of the last Service with that Service moved to one new endpoint, and
    /// waits for the sync that applies it (read from the agent's log, not its /metrics, whose
    /// scrape walks maps): file renamed into place → that sync's end (its log line's time), and
    /// the sync's own `took`. Checked: that sync translated one Service and wrote one frontend.
    fn one_change(&mut self, n: u32) -> Result<(Duration, Duration), String> {
        let log_path = self.dir.path.join("agent.log");
        let since = self.log_len();
        let from = (n - 1) / PER_FILE * PER_FILE;
        let path = self.dir.path.join(format!("manifests/objects-{:04}.yaml", from / PER_FILE));
        let mut text = Vec::new();
        write_objects(&mut text, from, n, true).map_err(|e| e.to_string())?;
        // Written beside the directory, then renamed into it, as a ConfigMap volume or an
        // editor's save replaces a file.
        let tmp = self.dir.path.join("next.yaml");
        std::fs::write(&tmp, &text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let wall = SystemTime::now();
        let started = Instant::now();
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        while started.elapsed() < Duration::from_secs(30) {
            if interrupted() {
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_millis(20));
            let log = std::fs::read(&log_path).unwrap_or_default();
            let new = String::from_utf8_lossy(&log[since.min(log.len())..]).into_owned();
            // The first sync with work to do (one that found nothing is a wake-up before the
            // file was whole).
            let Some(line) = new.lines().find(|l| l.contains(" synced ") && !(l.contains(" translated=0 ") && l.contains(" changed_frontends=0 ") && l.contains(" writes=0 "))) else { continue };
            if !line.contains(" translated=1 ") || !line.contains(" changed_frontends=1 ") {
                return Err(format!("the change's sync did not translate one Service and write one frontend: {line}"));
            }
            let at = line.split_whitespace().next().and_then(parse_utc).ok_or_else(|| format!("no time in {line}"))?;
            let took = line.split(" took=").nth(1).and_then(|r| parse_duration(r.split(' ').next()?)).ok_or_else(|| format!("no took= in {line}"))?;
            return Ok((at.duration_since(wall).unwrap_or_default(), took));
        }
        Err(format!("no sync within 30 s of the change: {}", self.log_tail()))
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
        let since = self.log_len();
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
            // (Before the exit check: a Ctrl-C reaches the agent too.)
            if interrupted() {
                return Err("interrupted".into());
            }
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(|a| a.child.try_wait()) {
                return Err(format!("the agent exited ({st}): {}", self.log_tail()));
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
                // (The heap read first: a scrape renders every Service's series, and its garbage
                // would count.)
                let anon = self.agent.as_ref().and_then(|a| anonymous_bytes(a.child.id()));
                let rss = metric(&self.metrics(), "process_resident_memory_bytes");
                // The first sync's own line: every Service's frontend is in the maps.
                let line = self.last_synced(since);
                let frontends = line.split(" frontends=").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
                if services != n as f64 || errors != 0.0 || frontends != n as usize {
                    return Err(format!("after the first sync: {services} Services, {errors} object errors, {frontends} frontends, not {n}, 0, {n}: {}", self.log_tail()));
                }
                return Ok(Start { synced, own, writes, rss, anon });
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

struct Figures {
    first: Start,
    change: (Duration, Duration),
    restart: Start,
}

fn measure(n: u32) -> Result<Figures, String> {
    let mut node = Node::new();
    for from in (0..n).step_by(PER_FILE as usize) {
        let path = node.dir.path.join(format!("manifests/objects-{:04}.yaml", from / PER_FILE));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| e.to_string())?);
        write_objects(&mut f, from, (from + PER_FILE).min(n), false).and_then(|_| f.flush()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let first = node.start(n)?;
    // The first read's trim and the agent's quiet spell are over before the change.
    std::thread::sleep(Duration::from_secs(1));
    let change = node.one_change(n)?;
    node.stop();
    let restart = node.start(n)?;
    node.stop();
    Ok(Figures { first, change, restart })
}

/// A log line's time, `2026-12-04T10:58:27.970833Z` (UTC, as the agent writes it).
fn parse_utc(t: &str) -> Option<SystemTime> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<u64> = hms.split(':').map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let (&[y, m, day], &[hh, mm, ss]) = (d.as_slice(), h.as_slice()) else { return None };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(days as u64 * 86_400 + hh * 3600 + mm * 60 + ss, nanos as u32))
}

/// A `Debug`-printed duration: `2.245052ms`, `14.071µs`, `4.411560078s`.
fn parse_duration(s: &str) -> Option<Duration> {
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (v, unit) = s.split_at(at);
    let v: f64 = v.parse().ok()?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(v * scale))
}

/// The anonymous resident bytes of process `pid` (`Anonymous:` of its smaps_rollup).
fn anonymous_bytes(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: f64 = rollup.lines().find_map(|l| l.strip_prefix("Anonymous:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024.0)
}

fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / (1024.0 * 1024.0))
}

/// RSS, and its anonymous part in brackets (`?` where unknown).
fn rss_anon(rss: f64, anon: Option<f64>) -> String {
    format!("{} ({})", mib(rss), anon.map_or("?".into(), mib))
}

/// The rows for each size in `sizes`.
pub fn run(sizes: &[u32]) -> Result<(), String> {
    crate::conformance::catch_signals();
    if !Path::new(&lab::agent_bin()).exists() {
        return Err(format!("{} missing", lab::agent_bin().display()));
    }
    println!("\nThe agent at scale, from --manifests (no API server: its list and watch come on top, see the next section), 3 endpoints per Service:");
    println!("{:>9} | {:>18} | {:>22} | {:>17} | {:>24} | {:>20} | {:>17}", "services", "start → first sync", "own sync (map writes)", "RSS (anonymous)", "one change → synced (own)", "restart → first sync", "RSS (anonymous)");
    println!("{}", "-".repeat(146));
    for &n in sizes {
        match measure(n) {
            Ok(f) => println!(
                "{n:>9} | {:>18} | {:>22} | {:>17} | {:>25} | {:>20} | {:>17}",
                format!("{:.2} s", f.first.synced.as_secs_f64()),
                format!("{:.2} s ({:.0})", f.first.own, f.first.writes),
                rss_anon(f.first.rss, f.first.anon),
                format!("{:.1} ms ({:.2} ms)", f.change.0.as_secs_f64() * 1e3, f.change.1.as_secs_f64() * 1e3),
                format!("{:.2} s (own {:.2} s)", f.restart.synced.as_secs_f64(), f.restart.own),
                rss_anon(f.restart.rss, f.restart.anon)
            ),
            Err(e) => {
                println!("{n:>9} | {e}");
                if e.starts_with("interrupted") || interrupted() {
                    return Err("interrupted".into());
                }
            }
        }
    }
    println!("start → first sync: from the agent's start to the end of its first sync (its own last_timestamp metric), the manifests' read and parse included;");
    println!("own sync: its sync_proxy_rules_duration; map writes: ferry_map_writes_total (table entries included, written as memory). restart: the agent");
    println!("stopped and started again over its pinned maps (it reads them back, and its first sync writes only what differs). RSS: process_resident_memory_bytes");
    println!("2 s after the first sync, and of it the anonymous pages (heap, stacks; the rest is the binary's own pages, mapped from its file). one change:");
    println!("the last Service's manifest file ({PER_FILE} Services a file) replaced with that Service moved to one new endpoint, from the rename to the end of the");
    println!("sync that applied it (its log line's time), and that sync's own time; checked: it translated one Service, wrote one frontend.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_are_what_the_agent_reads() {
        let mut out = Vec::new();
        write_objects(&mut out, 0, 2, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let docs: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
        assert_eq!(docs.len(), 4);
        let docs: Vec<serde_yaml::Value> = docs.iter().map(|d| serde_yaml::from_str(d).unwrap()).collect();
        assert_eq!(docs[2]["spec"]["clusterIP"].as_str(), Some("10.96.0.2"));
        assert_eq!(docs[3]["endpoints"][2]["addresses"][0].as_str(), Some("10.128.0.6"));
        assert_eq!(pod_ip(99_999, 2), std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + (299_999 % POOL)));
        assert!(u32::from(svc_ip(99_999)) < u32::from(std::net::Ipv4Addr::new(10, 112, 0, 0)));
        let mut out = Vec::new();
        write_objects(&mut out, 5, 7, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(parse_utc("2026-12-04T10:58:27.970833Z"), Some(SystemTime::UNIX_EPOCH + Duration::new(1_796_381_907, 970_833_000)));
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(parse_duration("2.245052ms"), Some(Duration::from_nanos(2_245_052)));
        assert_eq!(parse_duration("14.071µs"), Some(Duration::from_nanos(14_071)));
        assert_eq!(parse_duration("4.5s"), Some(Duration::from_millis(4_500)));
        assert!(text.contains("name: s6-1,") && text.contains(&format!("endpoints: [{{addresses: [\"{MOVED_TO}\"]")) && text.matches("addresses").count() == 4);
    }
}
