//! `cargo xtask bench`'s control-plane section: network programming, end to end, against a real
//! API server, for Ferry and for the real kube-proxy in nftables and iptables modes.
//!
//! N Services (ClusterIP, one TCP port, no selector, so the EndpointSlice controller leaves them)
//! with one EndpointSlice of 3 endpoints each are written to a real API server (`cargo xtask
//! cluster`). For each proxy in turn, a node of its own is built from network namespaces as the
//! conformance run builds one (pods behind veths, servers answering with the address they were
//! reached on), the proxy is started against the API server, and three things are timed:
//! - full sync: proxy start → its first sync done (the sync's end by its own
//!   `kubeproxy_sync_proxy_rules_last_timestamp_seconds`), and → a connection from a pod to the
//!   last Service's ClusterIP reaches one of its endpoints;
//! - one change: the last Service's EndpointSlice rewritten to one new endpoint (a pod with a
//!   server) → a connection through the ClusterIP reaches it (a new connection every 2 ms);
//! - a Service created (its slice written just before) → its ClusterIP answers.
//!
//! Beside each: the proxy's own figures from its /metrics (the sync duration; for changes also
//! the network programming duration, from the slice's `last-change-trigger-time`, set here to
//! the write's start), and the floor of the same run, what the API server itself costs: a full
//! list of the objects (beside the full sync), and the time from the write's start to the
//! object's event on a watch opened before it (beside the changes). Every wait is bounded; a
//! bound passed is printed as `> bound`.
use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use dataplane_agent::{observe::rfc3339, trace::Scenario};
use serde_json::json;

use crate::{
    cluster::{root, ControlPlane},
    conformance::{self, interrupted, metric, KpMode, Plan, Proxy, Side},
    lab,
};

const NS: &str = "bench";
const NODE: &str = "bench-node";
const NODE_IP: &str = "192.168.50.2";
/// The last Service's endpoints (pods with servers), the two endpoints a change moves it to in
/// turn, and the client pod every connection starts from.
const BACKENDS: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12), Ipv4Addr::new(10, 244, 0, 13)];
const NEW: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 0, 14), Ipv4Addr::new(10, 244, 0, 15)];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const PORT: u16 = 8080;
const MANAGED_BY: &str = "ferry-bench";
const FULL_SYNC_BOUND: Duration = Duration::from_secs(240);
const CHANGE_BOUND: Duration = Duration::from_secs(30);
const CHANGE_RUNS: usize = 5;
const CREATE_RUNS: usize = 3;
/// At most this many Services: the first FIRST_RANGE get cluster IPs from 10.96.4.0 up to the
/// created ones', the others from SECOND_RANGE (a ServiceCIDR object the bench adds).
const MAX_SERVICES: usize = 100_000;
const FIRST_RANGE: usize = 49_152;
const SECOND_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 97, 0, 0), 16);
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices";
const SERVICES: &str = "/api/v1/namespaces/bench/services";

fn svc_ip(i: usize) -> Ipv4Addr {
    match i.checked_sub(FIRST_RANGE) {
        None => Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 4, 0)) + i as u32),
        // From .1: the API server never hands out a range's network address.
        Some(j) => Ipv4Addr::from(u32::from(SECOND_RANGE.0) + 1 + j as u32),
    }
}

/// For more than FIRST_RANGE Services (any size asked for) the cluster's 10.96.0.0/16 is not
/// enough: a second ServiceCIDR object
/// (networking.k8s.io/v1) adds SECOND_RANGE, as an operator grows a cluster's service range;
/// the proxies read the ServiceCIDR objects. Waits until the controller has made it ready.
fn second_range(cp: &ControlPlane) -> Result<(), String> {
    let cidr = format!("{}/{}", SECOND_RANGE.0, SECOND_RANGE.1);
    let body = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "ferry-bench-2"}, "spec": {"cidrs": [cidr]}});
    let (code, body) = cp.api("POST", "/apis/networking.k8s.io/v1/servicecidrs", Some(&body.to_string()));
    if code != 201 && code != 409 {
        return Err(format!("ServiceCIDR ferry-bench-2: {code} {body}"));
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let (code, body) = cp.api("GET", "/apis/networking.k8s.io/v1/servicecidrs/ferry-bench-2", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let ready = v["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        if code == 200 && ready {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("ServiceCIDR ferry-bench-2 ({cidr}) not ready within 60 s"))
}

/// The cluster IP of the k-th Service created by the `create` runs (unique in the whole run: a
/// released address is not reused at once).
fn created_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 200, 0)) + k as u32)
}

/// Service i of n: the last one's endpoints are pods that answer; the others' are addresses
/// nothing answers on (never connected to).
fn endpoints_of(i: usize, n: usize) -> Vec<Ipv4Addr> {
    if i == n - 1 {
        BACKENDS.to_vec()
    } else {
        (0..3).map(|k| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + 3 * i as u32 + k)).collect()
    }
}

fn service_json(name: &str, ip: Ipv4Addr) -> String {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS}, "spec": {"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}]}})
        .to_string()
}

fn endpoints_json(e: &[Ipv4Addr]) -> serde_json::Value {
    e.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect()
}

fn slice_json(service: &str, endpoints: &[Ipv4Addr]) -> String {
    let labels = json!({"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": MANAGED_BY});
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": format!("{service}-1"), "namespace": NS, "labels": labels}, "addressType": "IPv4", "endpoints": endpoints_json(endpoints), "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}]})
        .to_string()
}

/// The node the conformance run would build for this: its address, the pods (all the bench's
/// pods are listed in one slice so that each gets a namespace and a server on PORT).
fn scenario() -> Scenario {
    let pods: Vec<String> = BACKENDS.iter().chain(&NEW).chain([&CLIENT]).map(|a| format!("{{addresses: [\"{a}\"]}}")).collect();
    let yaml = format!(
        "node: {{name: {NODE}, ips: [\"{NODE_IP}\"], podCIDR: 10.244.0.0/24}}\nconfig: {{clusterCIDR: 10.244.0.0/16}}\nendpointSlices:\n- metadata: {{name: pods, namespace: {NS}}}\n  addressType: IPv4\n  endpoints: [{}]\n  ports: [{{port: {PORT}, protocol: TCP}}]\n",
        pods.join(", ")
    );
    serde_yaml::from_str(&yaml).expect("the bench's scenario")
}

/// Writes Services `from..n` and their slices, four request streams at once.
fn load(cp: &ControlPlane, from: usize, n: usize) -> Result<(), String> {
    let services: Vec<String> = (from..n).map(|i| service_json(&format!("s{i}"), svc_ip(i))).collect();
    let slices: Vec<String> = (from..n).map(|i| slice_json(&format!("s{i}"), &endpoints_of(i, n))).collect();
    let r = std::thread::scope(|s| {
        let streams: Vec<_> = [(SERVICES, &services), (SLICES, &slices)]
            .into_iter()
            .flat_map(|(path, bodies)| bodies.chunks(bodies.len().div_ceil(2).max(1)).map(move |chunk| (path, chunk)))
            .map(|(path, chunk)| s.spawn(move || cp.try_create_many(path, chunk)))
            .collect();
        streams.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a writer panicked".into()))).collect::<Result<(), String>>()
    });
    // A Ctrl-C reaches the curls too: their failure is the interruption, not an error.
    if interrupted() {
        return Err("interrupted while writing the objects: everything taken down".into());
    }
    // Service n-1 of the previous size had the answering endpoints: it keeps them, harmless.
    r
}

/// The floor beside a full sync: one list of every Service and one of every EndpointSlice, as
/// a proxy starting up asks for them.
fn list_time(cp: &ControlPlane) -> Result<Duration, String> {
    let t = Instant::now();
    for path in ["/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices"] {
        let out = cp.curl().args(["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "120"]).arg(format!("https://127.0.0.1:6443{path}")).output().map_err(|e| e.to_string())?;
        if out.stdout != b"200" {
            return Err(format!("GET {path}: {}", String::from_utf8_lossy(&out.stdout)));
        }
    }
    Ok(t.elapsed())
}

/// A watch on the API server, opened before a write: when its events arrive.
struct Watch {
    child: Child,
    rx: mpsc::Receiver<(Instant, String)>,
}

impl Watch {
    /// Watches `path` (a collection, with a field selector); returns once the API server has sent
    /// its answer's headers, that is once the watch is in place (at most 10 s).
    fn open(cp: &ControlPlane, path: &str) -> Result<Watch, String> {
        let mut child = cp
            .curl()
            .args(["-N", "-D", "-", "--max-time", "120"])
            .arg(format!("https://127.0.0.1:6443{path}&watch=1"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("watch {path}: {e}"))?;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let w = Watch { child, rx };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = String::new();
        loop {
            match w.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((_, l)) if l.trim().is_empty() && status.contains(" 200") => return Ok(w),
                Ok((_, l)) if l.trim().is_empty() => return Err(format!("watch {path}: {status}")),
                Ok((_, l)) if status.is_empty() => status = l,
                Ok(_) => {}
                Err(_) => return Err(format!("watch {path}: no answer within 10 s ({status})")),
            }
        }
    }

    /// When the first event of type `kind` arrived (at most `bound` from now).
    fn event(&self, kind: &str, bound: Duration) -> Option<Instant> {
        let deadline = Instant::now() + bound;
        let want = format!("\"type\":\"{kind}\"");
        while let Ok((t, l)) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if l.contains(&want) {
                return Some(t);
            }
        }
        None
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// New connections from the client pod (namespace `client`) to `dst`, a new one every `every`
/// whether the ones before have ended or not (a proxy that drops packets to an unassigned
/// cluster IP makes a connection wait out its timeout), until one reaches an address of `want`:
/// when that connection started (None past `bound`, once `stop` is set, or on Ctrl-C).
fn reached(client: &str, dst: SocketAddrV4, want: &[Ipv4Addr], every: Duration, bound: Duration, stop: &AtomicBool) -> Option<Instant> {
    let deadline = Instant::now() + bound;
    let (tx, rx) = mpsc::channel();
    while Instant::now() < deadline && !interrupted() && !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let (tx, client) = (tx.clone(), client.to_string());
        std::thread::spawn(move || {
            let _in = lab::enter_named(&client);
            let _ = tx.send((t, conformance::attempt(CLIENT, SocketAddr::V4(dst), false, Duration::from_millis(100))));
        });
        let mut hit: Option<Instant> = None;
        while let Ok((started, r)) = rx.recv_timeout(every.saturating_sub(t.elapsed())) {
            // `TO LOCAL PEER`: LOCAL is the address and port the server was reached on.
            let local = r.strip_prefix("TO ").and_then(|r| r.split_whitespace().next()).and_then(|a| a.parse::<SocketAddrV4>().ok());
            if local.is_some_and(|a| want.contains(a.ip())) {
                hit = Some(hit.map_or(started, |h| h.min(started)));
            }
        }
        if hit.is_some() {
            return hit;
        }
    }
    None
}

/// The proxy's own histogram so far: (sum of seconds, count).
fn histogram(m: &str, name: &str) -> (f64, f64) {
    (metric(m, &format!("{name}_sum")), metric(m, &format!("{name}_count")))
}

const SYNC_HIST: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
const NP_HIST: &str = "kubeproxy_network_programming_duration_seconds";

/// One timed write: from its start to the write's answer, to its event on the watch, to the
/// proxy's datapath answering (None: past the bound).
#[derive(Clone, Copy)]
struct Timed {
    wrote: Duration,
    event: Option<Duration>,
    seen: Option<Duration>,
}

/// One proxy's figures at one N.
#[derive(Default)]
struct Figures {
    /// Start → the first sync's end (None: not within the bound), the proxy's own sync time so far,
    /// and how many syncs the proxy counted by the time it was read (more than 1: the timestamp is
    /// the latest one's, the time their sum).
    synced: Option<(Duration, f64, f64)>,
    answered: Option<Duration>,
    change: Vec<Timed>,
    /// Mean own sync duration and network programming duration over the change runs (and their
    /// counts).
    change_own: Option<((f64, f64), (f64, f64))>,
    create: Vec<Timed>,
    create_own: Option<(f64, f64)>,
    /// The proxy's resident memory after the runs (`process_resident_memory_bytes`), bytes.
    rss: Option<f64>,
    error: Option<String>,
}

/// Times one write to `path` (method, the body `body` makes at the write's start) against a watch
/// on `watch` and connections to `dst` that wait for `want`.
#[allow(clippy::too_many_arguments)]
fn timed_write(cp: &ControlPlane, client: &str, method: &str, path: &str, body: &dyn Fn() -> String, content_type: &str, watch: (&str, &str), dst: SocketAddrV4, want: Ipv4Addr) -> Result<Timed, String> {
    let w = Watch::open(cp, watch.0)?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let poll = s.spawn(|| reached(client, dst, &[want], Duration::from_millis(5), CHANGE_BOUND, &stop));
        // The connections under way before the write.
        std::thread::sleep(Duration::from_millis(50));
        let body = body();
        let t0 = Instant::now();
        let (code, answer) = cp.api_as(method, path, Some(&body), content_type);
        let wrote = t0.elapsed();
        stop.store(!(200..300).contains(&code), Ordering::Relaxed);
        let event = w.event(watch.1, Duration::from_secs(10)).map(|t| t.saturating_duration_since(t0));
        let seen = poll.join().unwrap().map(|t| t.saturating_duration_since(t0));
        if !(200..300).contains(&code) {
            return Err(format!("{method} {path}: {code} {answer}"));
        }
        Ok(Timed { wrote, event, seen })
    })
}

/// Builds a node for `proxy`, starts it and times the three things; `created` collects the
/// names of the Services written (removed by the caller), `k` numbers them.
fn measure(cp: &ControlPlane, proxy: Proxy, kube_proxy: &Path, n: usize, link: usize, created: &mut Vec<String>, k: &mut usize) -> Figures {
    let mut f = Figures::default();
    if let Err(e) = measure_into(cp, proxy, kube_proxy, n, link, created, k, &mut f) {
        f.error = Some(e);
    }
    f
}

#[allow(clippy::too_many_arguments)]
fn measure_into(cp: &ControlPlane, proxy: Proxy, kube_proxy: &Path, n: usize, link: usize, created: &mut Vec<String>, k: &mut usize, f: &mut Figures) -> Result<(), String> {
    let sc = scenario();
    let plan = Plan::new(&sc);
    let mut side = Side::build(proxy, &lab::run_id(), cp, link, &plan)?;
    // Outside the node the service range is unreachable: a connection the proxy does not
    // translate yet fails at once instead of looping between the node and the world.
    side.world.exec_ok(&["ip", "route", "add", "unreachable", "10.96.0.0/16"]);
    side.world.exec_ok(&["ip", "route", "add", "unreachable", &format!("{}/{}", SECOND_RANGE.0, SECOND_RANGE.1)]);
    let client = side.pods[plan.pod(CLIENT).ok_or("no client pod")?].name.clone();
    let last = SocketAddrV4::new(svc_ip(n - 1), 80);

    // Full sync.
    let wall = SystemTime::now();
    let started = Instant::now();
    side.start_proxy(&sc, &plan, cp, kube_proxy)?;
    let stop = AtomicBool::new(false);
    let synced = std::thread::scope(|s| {
        let poll = s.spawn(|| reached(&client, last, &BACKENDS, Duration::from_millis(20), FULL_SYNC_BOUND, &stop));
        let synced = first_sync(&mut side, wall, started);
        stop.store(!matches!(synced, Ok(Some(_))), Ordering::Relaxed);
        f.answered = poll.join().unwrap().map(|t| t.saturating_duration_since(started));
        synced
    })?;
    f.synced = synced;
    // `FERRY_BENCH_LOG=PREFIX`: the proxy's log of its start kept (lists, load, attach, sync).
    if let Ok(to) = std::env::var("FERRY_BENCH_LOG") {
        let _ = std::fs::copy(side.log(), format!("{to}.{}", proxy_label(proxy).replace(" ", "-")));
    }
    if synced.is_none() {
        return Err(format!("no first sync within {} s", FULL_SYNC_BOUND.as_secs()));
    }
    std::thread::sleep(Duration::from_secs(1));

    // One endpoint change, CHANGE_RUNS times: to NEW[0], NEW[1], NEW[0], ...
    let name = format!("s{}-1", n - 1);
    let m0 = side.metrics()?;
    for r in 0..CHANGE_RUNS {
        let target = NEW[r % 2];
        // The trigger time kube-proxy's network programming metric starts from: the write's start.
        let patch = || json!({"metadata": {"annotations": {dataplane_agent::observe::TRIGGER_TIME: rfc3339(SystemTime::now())}}, "endpoints": endpoints_json(&[target])}).to_string();
        let watch = format!("{SLICES}?fieldSelector=metadata.name%3D{name}");
        f.change.push(timed_write(cp, &client, "PATCH", &format!("{SLICES}/{name}"), &patch, "application/merge-patch+json", (&watch, "MODIFIED"), last, target)?);
        side.check_running()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        // The proxy's syncs after the change are over before the next one.
        std::thread::sleep(Duration::from_millis(500));
    }
    let m1 = side.metrics()?;
    let delta = |m0: &str, m1: &str, h: &str| {
        let ((s0, c0), (s1, c1)) = (histogram(m0, h), histogram(m1, h));
        ((s1 - s0) / (c1 - c0).max(1.0), c1 - c0)
    };
    f.change_own = Some((delta(&m0, &m1, SYNC_HIST), delta(&m0, &m1, NP_HIST)));

    // A Service created, CREATE_RUNS times (its slice first, one endpoint: BACKENDS[0]).
    for _ in 0..CREATE_RUNS {
        let svc = format!("new{k}");
        let ip = created_ip(*k);
        *k += 1;
        let (code, body) = cp.api("POST", SLICES, Some(&slice_json(&svc, &BACKENDS[..1])));
        if code != 201 {
            return Err(format!("slice {svc}: {code} {body}"));
        }
        created.push(svc.clone());
        // The sync the slice causes is over (and minSyncPeriod with it) before the Service is
        // written.
        std::thread::sleep(Duration::from_secs(1));
        let watch = format!("{SERVICES}?fieldSelector=metadata.name%3D{svc}");
        f.create.push(timed_write(cp, &client, "POST", SERVICES, &|| service_json(&svc, ip), "application/json", (&watch, "ADDED"), SocketAddrV4::new(ip, 80), BACKENDS[0])?);
        side.check_running()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let m2 = side.metrics()?;
    f.create_own = Some(delta(&m1, &m2, SYNC_HIST));
    f.rss = Some(metric(&m2, "process_resident_memory_bytes")).filter(|b| *b > 0.0);
    Ok(())
}

/// Polls the proxy's /metrics every 500 ms (a scrape costs Ferry a walk of its hash maps; the
/// figure is the proxy's own timestamp, whenever it is read) until its first sync is done (at
/// most FULL_SYNC_BOUND from `started`): the time from `wall` (the start) to that sync's end,
/// the proxy's own sync time so far (the histogram's sum), and the sync count.
fn first_sync(side: &mut Side, wall: SystemTime, started: Instant) -> Result<Option<(Duration, f64, f64)>, String> {
    loop {
        let m = side.metrics()?;
        let last = metric(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        if last > 0.0 {
            let (sum, count) = histogram(&m, SYNC_HIST);
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(last);
            return Ok(Some((at.duration_since(wall).unwrap_or_default(), sum, count)));
        }
        side.check_running()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        if started.elapsed() > FULL_SYNC_BOUND {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Removes the Services the create runs wrote and puts the last Service's endpoints back.
fn restore(cp: &ControlPlane, n: usize, created: &mut Vec<String>) -> Result<(), String> {
    for svc in created.drain(..) {
        cp.api("DELETE", &format!("{SERVICES}/{svc}"), None);
        cp.api("DELETE", &format!("{SLICES}/{svc}-1"), None);
    }
    let patch = json!({"endpoints": endpoints_json(&BACKENDS)});
    let (code, body) = cp.api_as("PATCH", &format!("{SLICES}/s{}-1", n - 1), Some(&patch.to_string()), "application/merge-patch+json");
    if code != 200 {
        return Err(format!("restoring s{}-1: {code} {body}", n - 1));
    }
    Ok(())
}

fn proxy_label(p: Proxy) -> &'static str {
    match p {
        Proxy::Ferry => "Ferry",
        Proxy::KubeProxy(KpMode::Nftables) => "kube-proxy nftables",
        Proxy::KubeProxy(KpMode::Iptables) => "kube-proxy iptables",
    }
}

fn fmt_d(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1e3)
    }
}

fn fmt_s(secs: f64) -> String {
    fmt_d(Duration::from_secs_f64(secs.max(0.0)))
}

/// The median of figures that may have passed their bound (counted as longer than any).
fn median_of(v: impl Iterator<Item = Option<Duration>>, bound: Duration) -> String {
    let mut v: Vec<Option<Duration>> = v.collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by_key(|d| d.unwrap_or(Duration::MAX));
    let show = |d: Option<Duration>| d.map(fmt_d).unwrap_or_else(|| format!("> {}", fmt_d(bound)));
    format!("{} ({}–{})", show(v[v.len() / 2]), show(v[0]), show(v[v.len() - 1]))
}

fn print_table(n: usize, rows: &[(Proxy, Figures)], list: Duration) {
    let bound = |d: Option<Duration>, b: Duration| d.map(fmt_d).unwrap_or_else(|| format!("> {}", fmt_d(b)));
    let mut table: Vec<Vec<String>> = vec![vec![format!("{n} Services × 3 endpoints")]];
    table[0].extend(rows.iter().map(|(p, _)| proxy_label(*p).to_string()));
    table[0].push("API server (floor)".into());
    let all = |f: &dyn Fn(&Figures) -> Vec<Timed>| rows.iter().flat_map(|(_, r)| f(r)).collect::<Vec<Timed>>();
    let floor = |v: Vec<Timed>| {
        let event = median_of(v.iter().map(|t| t.event), Duration::from_secs(10));
        let wrote = median_of(v.iter().map(|t| Some(t.wrote)), Duration::ZERO);
        format!("watch event {event}; write answered {wrote}")
    };
    let mut row = |what: &str, cell: &dyn Fn(&Figures) -> String, base: String| {
        let mut r = vec![what.to_string()];
        r.extend(rows.iter().map(|(_, f)| if f.synced.is_some() || what.starts_with("full sync") { cell(f) } else { "-".into() }));
        r.push(base);
        table.push(r);
    };
    row(
        "full sync: start → first sync done (own: its syncs)",
        &|f| match f.synced {
            Some((d, own, count)) => format!("{} (own {}{})", fmt_d(d), fmt_s(own), if count > 1.0 { format!(" in {count} syncs") } else { String::new() }),
            None => format!("> {}", fmt_d(FULL_SYNC_BOUND)),
        },
        format!("list all: {}", fmt_d(list)),
    );
    row("full sync: start → last Service answers", &|f| bound(f.answered, FULL_SYNC_BOUND), String::new());
    row(&format!("endpoint change → new endpoint answers (median of {CHANGE_RUNS}, min–max)"), &|f| median_of(f.change.iter().map(|t| t.seen), CHANGE_BOUND), floor(all(&|f| f.change.clone())));
    row(
        "  own: sync; network programming (means)",
        &|f| f.change_own.map(|((s, sc), (np, npc))| format!("{} ({sc} syncs); {} ({npc})", fmt_s(s), fmt_s(np))).unwrap_or_else(|| "-".into()),
        String::new(),
    );
    row(&format!("Service created → ClusterIP answers (median of {CREATE_RUNS}, min–max)"), &|f| median_of(f.create.iter().map(|t| t.seen), CHANGE_BOUND), floor(all(&|f| f.create.clone())));
    row("  own: sync (mean)", &|f| f.create_own.map(|(s, c)| format!("{} ({c} syncs)", fmt_s(s))).unwrap_or_else(|| "-".into()), String::new());
    row("resident memory after the runs", &|f| f.rss.map(|b| format!("{:.0} MiB", b / (1024.0 * 1024.0))).unwrap_or_else(|| "-".into()), String::new());
    let widths: Vec<usize> = (0..table[0].len()).map(|c| table.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    println!();
    for (i, r) in table.iter().enumerate() {
        let cells: Vec<String> = r.iter().zip(&widths).enumerate().map(|(c, (s, w))| if c == 0 { format!("{s:<w$}") } else { format!("{s:>w$}") }).collect();
        println!("{}", cells.join(" | ").trim_end());
        if i == 0 {
            println!("{}", "-".repeat(widths.iter().sum::<usize>() + 3 * (widths.len() - 1)));
        }
    }
    for (p, f) in rows {
        if let Some(e) = &f.error {
            println!("{}: {e}", proxy_label(*p));
        }
    }
}

/// The section. `kube_proxy`: the pinned kube-proxy binary, or None (its rows are skipped, and
/// said so). `sizes`: the Service counts, in increasing order (objects are added, never removed).
pub fn run(kube_proxy: Option<&Path>, sizes: &[usize]) -> Result<(), String> {
    conformance::catch_signals();
    let t_all = Instant::now();
    let mut sizes: Vec<usize> = sizes.to_vec();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.iter().any(|n| *n == 0 || *n > MAX_SERVICES) {
        return Err(format!("--services: each count between 1 and {MAX_SERVICES}"));
    }
    println!("\nNetwork programming, end to end, against a real API server (etcd, kube-apiserver, kube-controller-manager v1.37.2, cargo xtask cluster):");
    let mut proxies = vec![Proxy::Ferry];
    match kube_proxy {
        Some(p) => {
            proxies.extend([Proxy::KubeProxy(KpMode::Nftables), Proxy::KubeProxy(KpMode::Iptables)]);
            let v = Command::new("iptables").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_else(|e| format!("no iptables: {e}"));
            println!("kube-proxy: {}; its iptables mode runs the `iptables` on PATH: {v}", p.display());
        }
        None => println!("kube-proxy rows skipped: the kube-proxy binary is not built (`cargo xtask setup` builds it); Ferry's rows only"),
    }
    let xtask = root().join("target/debug/xtask");
    if !xtask.exists() {
        return Err(format!("{} missing: the control plane is started with it (`cargo xtask` builds it)", xtask.display()));
    }
    let cp = ControlPlane::up();
    let (code, body) = cp.api("POST", "/api/v1/namespaces", Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}).to_string()));
    if code != 201 {
        return Err(format!("namespace {NS}: {code} {body}"));
    }
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {"podCIDR": "10.244.0.0/24"}});
    let (code, body) = cp.api("POST", "/api/v1/nodes", Some(&node.to_string()));
    if code != 201 {
        return Err(format!("node: {code} {body}"));
    }
    // The node's address, as the kubelet reports it (kube-proxy waits for it).
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}});
    let (code, body) = cp.api_as("PATCH", &format!("/api/v1/nodes/{NODE}/status"), Some(&status.to_string()), "application/merge-patch+json");
    if code != 200 {
        return Err(format!("node status: {code} {body}"));
    }
    if sizes.iter().any(|n| *n > FIRST_RANGE) {
        second_range(&cp)?;
    }
    let (mut loaded, mut link, mut k) = (0, 0, 0);
    let kp = kube_proxy.unwrap_or(Path::new(""));
    for n in sizes {
        let t = Instant::now();
        load(&cp, loaded, n)?;
        loaded = n;
        let list = list_time(&cp)?;
        println!("{n} Services: objects written in {:.1} s; timing each proxy (full sync bound {} s)", t.elapsed().as_secs_f64(), FULL_SYNC_BOUND.as_secs());
        let mut rows = Vec::new();
        for &proxy in &proxies {
            link += 1;
            let mut created = Vec::new();
            let t = Instant::now();
            let f = measure(&cp, proxy, kp, n, link, &mut created, &mut k);
            restore(&cp, n, &mut created)?;
            println!("  {}: {:.0} s{}", proxy_label(proxy), t.elapsed().as_secs_f64(), f.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default());
            rows.push((proxy, f));
            if interrupted() {
                return Err("interrupted: everything taken down".into());
            }
        }
        print_table(n, &rows, list);
    }
    println!("\nfull sync: from the proxy's start to the end of its first sync (its own last_timestamp metric; own: its sync_proxy_rules_duration so far), and");
    println!("to the first connection from a pod to the last Service's ClusterIP that reaches an endpoint (a new connection every 20 ms). list all: GET of every");
    println!("Service and every EndpointSlice (what a starting proxy lists). Changes: from the start of the write (a curl to the API server) to the start of");
    println!("the first connection through the ClusterIP that reaches the new endpoint (a new connection every 5 ms, each waiting at most 100 ms); the floor: the same write's event");
    println!("on a watch opened before it, and the write's own answer. own: the proxy's sync_proxy_rules_duration and network_programming_duration");
    println!("(from the slice's last-change-trigger-time, set to the write's start) over the runs. Both proxies sync at most every 100 ms (minSyncPeriod).");
    println!("Control-plane section: {:.0} s in all.", t_all.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_has_a_pod_with_a_server_for_every_address_the_bench_connects_from_or_to() {
        let plan = Plan::new(&scenario());
        let pods: Vec<usize> = BACKENDS.iter().chain(&NEW).chain([&CLIENT]).map(|a| plan.pod(*a).unwrap()).collect();
        assert_eq!(pods, (0..6).collect::<Vec<_>>());
        assert_eq!(endpoints_of(9, 10), BACKENDS);
        assert_eq!(endpoints_of(1, 10)[2], Ipv4Addr::new(10, 128, 0, 5));
        assert_eq!(svc_ip(9_999), Ipv4Addr::new(10, 96, 43, 15));
        assert!(u32::from(svc_ip(FIRST_RANGE - 1)) < u32::from(created_ip(0)));
        assert_eq!(svc_ip(FIRST_RANGE), Ipv4Addr::new(10, 97, 0, 1));
        let last = u32::from(svc_ip(MAX_SERVICES - 1));
        assert!(last >> (32 - SECOND_RANGE.1) == u32::from(SECOND_RANGE.0) >> (32 - SECOND_RANGE.1), "{}", Ipv4Addr::from(last));
    }
}
