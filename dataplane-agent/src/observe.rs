//! What an operator watches: `/healthz` and `/livez` (kube-proxy's JSON), `/readyz`, and
//! Prometheus `/metrics`. Sync figures come from the agent loop; map figures are read from the
//! pinned maps at scrape time, so they are what the datapath really holds.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, SystemTime},
};

use dataplane_common::{stat, DropReason, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SVC_F_ADDR_ONLY};
use tokio::net::TcpListener;

use crate::{bpf::BpfMaps, reconcile::SyncStats, sources::{kube::WatchStats, slice::EndpointSlice}};

/// Upper bounds of the sync duration histogram, in seconds: kube-proxy's (pkg/proxy/metrics,
/// `ExponentialBuckets(0.001, 2, 15)`), so that its dashboards' quantiles read the same.
const BUCKETS: [f64; 15] = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384];
/// Upper bounds of the network programming latency histogram (object changed -> maps), seconds:
/// kube-proxy's (`MergeBuckets`, which starts with a 0 bucket, of 0.25 s and 0.5 s, every second
/// to 59 s, every 5 s to 115 s, every 30 s to 300 s).
const NP_BUCKETS: [f64; 81] = {
    let mut b = [0.0; 81];
    b[1] = 0.25;
    b[2] = 0.5;
    let mut i = 0;
    while i < 59 {
        b[3 + i] = (i + 1) as f64;
        i += 1;
    }
    i = 0;
    while i < 12 {
        b[62 + i] = 60.0 + 5.0 * i as f64;
        i += 1;
    }
    i = 0;
    while i < 7 {
        b[74 + i] = 120.0 + 30.0 * i as f64;
        i += 1;
    }
    b
};
/// The EndpointSlice controller's annotation: when the change that produced the slice happened.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Default)]
struct State {
    /// The first full sync is done.
    ready: bool,
    /// When the datapath last matched the sources (kube-proxy's lastUpdated).
    last_updated: Option<SystemTime>,
    /// Since when a change has waited to be applied (None: nothing waits).
    pending_since: Option<SystemTime>,
    /// When a change last asked for a sync (kube-proxy's last queued timestamp).
    last_queued: Option<SystemTime>,
    /// Service ports with a traffic policy Local and no endpoint here: (internal, external).
    no_local_endpoints: (usize, usize),
    /// Observed cumulative counts per bucket, sum and count of sync durations.
    hist: [u64; BUCKETS.len()],
    hist_sum: f64,
    hist_count: u64,
    syncs_failed: u64,
    objects: BTreeMap<&'static str, usize>,
    object_errors: usize,
    /// IPv6 halves of dual-stack objects the IPv4 datapath left aside at the last sync.
    ipv6_skipped: usize,
    ipv6_noted: bool,
    /// (endpoint, interface) pairs already warned about: local endpoints routed over a link no
    /// `--pod-interfaces` pattern matches.
    unhooked_noted: std::collections::BTreeSet<(std::net::Ipv4Addr, String)>,
    /// The local endpoints whose route was looked at (those of the last sync).
    endpoints_checked: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// Network programming latency (kube-proxy's): per bucket, sum, count.
    np_hist: Vec<u64>,
    np_sum: f64,
    np_count: u64,
    /// The trigger time of each EndpointSlice already counted (the slice's own strings).
    np_seen: BTreeMap<crate::model::Key, std::sync::Arc<str>>,
    /// Trigger times before this are changes made before the agent started: not measured, as
    /// kube-proxy's endpoints change tracker skips them (its trackerStartTime).
    np_since: Option<SystemTime>,
    /// (policy, field) of every NetworkPolicy part left untranslated at the last sync.
    untranslated: Vec<(String, String)>,
    writes: u64,
    deletes: u64,
    backends_left: u64,
    /// False while this node is being removed (kube-proxy's nodeEligible).
    node_eligible: bool,
    /// Every link the agent wants is attached (and still on its interface or cgroup).
    attached: bool,
    /// Links carrying the agent's programs.
    links: usize,
}

impl State {
    /// One EndpointSlice change programmed: its trigger time `t` (RFC 3339) to `now`.
    fn np_observe(&mut self, now: SystemTime, t: &str) {
        if let Some(at) = parse_rfc3339(t).filter(|at| self.np_since.is_none_or(|since| *at >= since)) {
            let secs = now.duration_since(at).unwrap_or_default().as_secs_f64();
            for (i, b) in NP_BUCKETS.iter().enumerate() {
                if secs <= *b {
                    self.np_hist[i] += 1;
                }
            }
            self.np_sum += secs;
            self.np_count += 1;
        }
    }
}

/// What the conntrack garbage collector last found (see `bpf::conntrack`): the only source of
/// conntrack figures, so a scrape never walks the maps.
#[derive(Default)]
struct CtFigures {
    runs: u64,
    deleted_lru: u64,
    deleted_assured: u64,
    live_lru: u64,
    live_assured: u64,
    caps: (u32, u32),
    evictions: u64,
    took: Duration,
    interval: Duration,
    connections: BTreeMap<(u8, &'static str), u64>,
    /// The policy conntrack maps: live and collected entries per map (LRU, assured), evictions.
    pol_live: (u64, u64),
    pol_caps: (u32, u32),
    pol_deleted: (u64, u64),
    pol_evictions: u64,
    /// The most assured connections any one source holds: (Service, policy).
    source_max: (u32, u32),
}

/// The agent's observable state, shared by the loop and the HTTP server.
pub struct Observed {
    state: Mutex<State>,
    ct: Mutex<CtFigures>,
    /// Where the maps are pinned (read at scrape time).
    pub pin_dir: PathBuf,
    /// A change that waits longer than this makes /healthz fail (kube-proxy: healthz timeout).
    pub health_timeout: Duration,
    pub watch: Option<Arc<WatchStats>>,
}

impl Observed {
    pub fn new(pin_dir: PathBuf, health_timeout: Duration, watch: Option<Arc<WatchStats>>) -> Self {
        // The first sync is a change like any other: /healthz fails if it waits too long.
        let now = SystemTime::now();
        let state = State { node_eligible: true, pending_since: Some(now), np_since: Some(now), np_hist: vec![0; NP_BUCKETS.len()], ..Default::default() };
        Observed { state: Mutex::new(state), ct: Mutex::default(), pin_dir, health_timeout, watch }
    }

    /// A garbage collector run ended; `evicted`: the LRU map's evictions so far (estimated from
    /// the datapath's and the agent's counts), `next`: the interval until the next run.
    pub fn gc_done(&self, run: &crate::bpf::conntrack::GcRun, caps: (u32, u32), evicted: u64, next: Duration) {
        let mut c = self.ct.lock().unwrap();
        c.runs += 1;
        c.deleted_lru += run.deleted_lru;
        c.deleted_assured += run.deleted_assured;
        c.live_lru = run.live_lru;
        c.live_assured = run.live_assured;
        c.caps = caps;
        // Monotonic, like the counter it is reported as.
        c.evictions = c.evictions.max(evicted);
        c.took = run.took;
        c.interval = next;
        c.connections = run.connections.clone();
    }

    /// The per-source counts were recounted: the highest (Service, policy).
    pub fn sources_counted(&self, max: (u32, u32)) {
        self.ct.lock().unwrap().source_max = max;
    }

    /// The policy conntrack collector finished a run; `evicted`: the LRU map's evictions so far.
    pub fn policy_gc_done(&self, run: &crate::bpf::conntrack::GcRun, caps: (u32, u32), evicted: u64) {
        let mut c = self.ct.lock().unwrap();
        c.pol_caps = caps;
        c.pol_live = (run.live_lru, run.live_assured);
        c.pol_deleted.0 += run.deleted_lru;
        c.pol_deleted.1 += run.deleted_assured;
        c.pol_evictions = c.pol_evictions.max(evicted);
    }

    /// The NetworkPolicy parts the last sync could not translate (each policy still isolates
    /// the pods it selects).
    pub fn policy_untranslated(&self, errors: &[crate::error::ObjectError]) {
        self.state.lock().unwrap().untranslated = errors.iter().map(|e| (e.name.clone(), e.field.clone())).collect();
    }

    /// A change arrived from a source and is about to be applied.
    pub fn change_pending(&self) {
        let mut s = self.state.lock().unwrap();
        let now = SystemTime::now();
        s.pending_since.get_or_insert(now);
        s.last_queued = Some(now);
    }

    /// The last translation's Service ports with a traffic policy Local and no endpoint on this
    /// node: (internalTrafficPolicy, externalTrafficPolicy).
    pub fn no_local_endpoints(&self, counts: (usize, usize)) {
        self.state.lock().unwrap().no_local_endpoints = counts;
    }

    /// The IPv6 addresses and slices the last translation left aside; true the first time any
    /// are (the agent says so once in its log).
    pub fn ipv6_skipped(&self, n: usize) -> bool {
        let mut s = self.state.lock().unwrap();
        let first = n > 0 && !s.ipv6_noted;
        s.ipv6_noted |= n > 0;
        s.ipv6_skipped = n;
        first
    }

    /// The local endpoints new since the last sync (the only ones whose route is read), and
    /// `local` remembered as the checked ones: a sync without new endpoints reads no routes.
    pub fn endpoints_to_check(&self, local: &std::collections::BTreeSet<std::net::Ipv4Addr>) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
        let mut s = self.state.lock().unwrap();
        let fresh = local.difference(&s.endpoints_checked).copied().collect();
        s.endpoints_checked.clone_from(local);
        fresh
    }

    /// Whether the local endpoint `ip`, routed over `iface` (which no pod interface pattern
    /// matches), is new: warned about once per pair.
    pub fn unhooked_endpoint(&self, ip: std::net::Ipv4Addr, iface: &str) -> bool {
        self.state.lock().unwrap().unhooked_noted.insert((ip, iface.to_string()))
    }

    /// After a sync that put the maps in line: every EndpointSlice whose change-trigger time is new
    /// adds (now - that time) to the network programming latency, as kube-proxy measures it; a
    /// trigger time from before the agent started is a change this agent did not see happen (every
    /// restart would otherwise add each slice's age) and is left out, as kube-proxy leaves it.
    pub fn programmed<'a>(&self, slices: impl Iterator<Item = &'a EndpointSlice>) {
        let now = SystemTime::now();
        let mut s = self.state.lock().unwrap();
        let mut seen = BTreeMap::new();
        for sl in slices {
            let key = sl.metadata.key();
            let Some(t) = &sl.trigger_time else { continue };
            if s.np_seen.get(&key) != Some(t) {
                s.np_observe(now, t);
            }
            seen.insert(key, t.clone());
        }
        s.np_seen = seen;
    }

    /// As [`Observed::programmed`] for the slices of one change alone (`None`: deleted); the
    /// others are as they were.
    pub fn programmed_changed<'a>(&self, slices: impl Iterator<Item = (&'a crate::model::Key, Option<&'a EndpointSlice>)>) {
        let now = SystemTime::now();
        let mut s = self.state.lock().unwrap();
        for (key, sl) in slices {
            let key = key.clone();
            let Some(t) = sl.and_then(|sl| sl.trigger_time.as_ref()) else {
                s.np_seen.remove(&key);
                continue;
            };
            if s.np_seen.get(&key) != Some(t) {
                s.np_observe(now, t);
            }
            s.np_seen.insert(key, t.clone());
        }
    }

    /// A sync ended. `ok`: the maps now match the sources (map errors leave the change pending).
    pub fn synced(&self, took: Duration, ok: bool, st: &SyncStats, objects: [(&'static str, usize); 6], object_errors: usize, node_eligible: bool) {
        let mut s = self.state.lock().unwrap();
        let secs = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.hist[i] += 1;
            }
        }
        s.hist_sum += secs;
        s.hist_count += 1;
        s.writes += st.writes as u64;
        s.deletes += st.deletes as u64;
        s.backends_left += st.backends_left as u64;
        s.objects = objects.into_iter().collect();
        s.object_errors = object_errors;
        s.node_eligible = node_eligible;
        if ok {
            s.ready = true;
            s.last_updated = Some(SystemTime::now());
            s.pending_since = None;
        } else {
            s.syncs_failed += 1;
            s.pending_since.get_or_insert_with(SystemTime::now);
        }
    }

    /// What the datapath's links are: all attached (`live`), and how many.
    pub fn datapath(&self, live: bool, links: usize) {
        let mut s = self.state.lock().unwrap();
        s.attached = live;
        s.links = links;
    }

    /// kube-proxy's rule: unhealthy when a change has waited longer than the timeout.
    pub fn healthy(&self) -> bool {
        let s = self.state.lock().unwrap();
        match s.pending_since {
            Some(t) => t.elapsed().unwrap_or_default() <= self.health_timeout,
            None => true,
        }
    }

    /// The first full sync is done (a starting agent reports it once the links it creates
    /// meanwhile have been tried: `SyncOutcome::report`).
    pub fn ready(&self) -> bool {
        self.state.lock().unwrap().ready
    }

    /// `/healthz` as kube-proxy answers it (KEP-3836): 200 when the agent serves and is in sync
    /// (no change has waited longer than the timeout, the first sync included) and the node is
    /// eligible; 503 while it is being deleted or carries the ToBeDeletedByClusterAutoscaler
    /// taint, so load balancers drain it. The body has lastUpdated, currentTime and
    /// nodeEligible.
    pub fn healthz(&self) -> (u16, String) {
        let healthy = self.healthy();
        let s = self.state.lock().unwrap();
        let last = s.last_updated.map(rfc3339).unwrap_or_else(|| rfc3339(SystemTime::UNIX_EPOCH));
        let body = format!(r#"{{"lastUpdated": "{last}","currentTime": "{}", "nodeEligible": {}}}"#, rfc3339(SystemTime::now()), s.node_eligible);
        (if healthy && s.node_eligible && s.attached { 200 } else { 503 }, body)
    }

    /// `/livez`: whether the process is alive and its datapath attached; nothing else. A stuck
    /// sync, an unreachable API server or a node being deleted leave it at 200, so the kubelet
    /// never restarts the agent in a loop over them (a restart would fix none of them).
    pub fn livez(&self) -> (u16, String) {
        let s = self.state.lock().unwrap();
        let last = s.last_updated.map(rfc3339).unwrap_or_else(|| rfc3339(SystemTime::UNIX_EPOCH));
        let body = format!(r#"{{"lastUpdated": "{last}","currentTime": "{}", "datapathAttached": {}, "links": {}}}"#, rfc3339(SystemTime::now()), s.attached, s.links);
        (if s.attached { 200 } else { 503 }, body)
    }

    /// The Prometheus text exposition of everything.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        {
            let s = self.state.lock().unwrap();
            let sync = Histogram { buckets: &BUCKETS, counts: &s.hist, sum: s.hist_sum, count: s.hist_count };
            sync.write(&mut out, "ferry_sync_duration_seconds", "", "Time from reading the sources to the maps matching them.");
            // kube-proxy's names and labels (the datapath's family), so that its dashboards keep
            // working.
            // kube-proxy's names, help texts, labels and buckets (pkg/proxy/metrics, v1.37), so
            // that its dashboards and alerts work unchanged. Every Ferry sync computes the whole
            // desired state from every object (and writes only what differs): a full sync in
            // kube-proxy's terms; there are no partial ones, so no partial histogram.
            sync.write(&mut out, "kubeproxy_sync_proxy_rules_duration_seconds", KP_FAMILY, "SyncProxyRules latency in seconds");
            sync.write(&mut out, "kubeproxy_sync_full_proxy_rules_duration_seconds", KP_FAMILY, "SyncProxyRules latency in seconds for full resyncs");
            let unix = |t: Option<SystemTime>| t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0);
            help(&mut out, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge", "The last time proxy rules were successfully synced");
            let _ = writeln!(out, "kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family=\"IPv4\"}} {}", unix(s.last_updated));
            help(&mut out, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "gauge", "The last time a sync of proxy rules was queued");
            let _ = writeln!(out, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{{ip_family=\"IPv4\"}} {}", unix(s.last_queued));
            help(&mut out, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", "gauge", "Number of services with a Local traffic policy and no endpoints");
            for (policy, n) in [("internal", s.no_local_endpoints.0), ("external", s.no_local_endpoints.1)] {
                let _ = writeln!(out, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"IPv4\",traffic_policy=\"{policy}\"}} {n}");
            }
            Histogram { buckets: &NP_BUCKETS, counts: &s.np_hist, sum: s.np_sum, count: s.np_count }.write(&mut out, "kubeproxy_network_programming_duration_seconds", KP_FAMILY, "In Cluster Network Programming Latency in seconds");
            help(&mut out, "ferry_datapath_attached", "gauge", "1 when every link the agent wants carries its program (what /livez reports).");
            let _ = writeln!(out, "ferry_datapath_attached {}", s.attached as u8);
            help(&mut out, "ferry_datapath_links", "gauge", "bpf links carrying the agent's programs (pinned under <pin-dir>/links).");
            let _ = writeln!(out, "ferry_datapath_links {}", s.links);
            help(&mut out, "ferry_sync_failures_total", "counter", "Syncs whose map writes failed (retried).");
            let _ = writeln!(out, "ferry_sync_failures_total {}", s.syncs_failed);
            help(&mut out, "ferry_objects", "gauge", "Objects seen at the last sync, by kind.");
            for (k, n) in &s.objects {
                let _ = writeln!(out, "ferry_objects{{kind=\"{k}\"}} {n}");
            }
            help(&mut out, "ferry_object_errors", "gauge", "Objects (or fields) skipped as invalid at the last sync; the log names each.");
            let _ = writeln!(out, "ferry_object_errors {}", s.object_errors);
            help(&mut out, "ferry_ipv6_objects_skipped", "gauge", "IPv6 addresses, CIDRs and EndpointSlices of dual-stack objects left aside by the IPv4 datapath at the last sync (normal in a dual-stack cluster; not errors).");
            let _ = writeln!(out, "ferry_ipv6_objects_skipped {}", s.ipv6_skipped);
            help(&mut out, "ferry_policy_untranslated", "gauge", "NetworkPolicy parts Ferry could not translate, by policy and field (1 each); the policy still isolates the pods it selects, the part allows nothing. The log says why.");
            for (policy, field) in &s.untranslated {
                let _ = writeln!(out, "ferry_policy_untranslated{{policy=\"{}\",field=\"{}\"}} 1", esc(policy), esc(field));
            }
            help(&mut out, "ferry_map_writes_total", "counter", "Map entries written by syncs.");
            let _ = writeln!(out, "ferry_map_writes_total {}", s.writes);
            help(&mut out, "ferry_map_deletes_total", "counter", "Map entries deleted by syncs.");
            let _ = writeln!(out, "ferry_map_deletes_total {}", s.deletes);
            help(&mut out, "ferry_backends_left_total", "counter", "Endpoints taken out of a Service port (lb4_gone_v1): its UDP/SCTP connections and affinity clients move to another endpoint at their next packet.");
            let _ = writeln!(out, "ferry_backends_left_total {}", s.backends_left);
            help(&mut out, "ferry_ready", "gauge", "1 after the first full sync (reported once the links the agent creates at its start are in place).");
            let _ = writeln!(out, "ferry_ready {}", s.ready as u8);
        }
        // kube-proxy's change counters: every Service and EndpointSlice event (the initial
        // lists' too, as kube-proxy's informers deliver each object), and the Services with
        // changes the next sync has not read yet. Without an API-server source, zeros.
        let (svc_total, ep_total, (svc_pending, ep_pending)) = match &self.watch {
            Some(w) => (w.service_changes.load(Ordering::Relaxed), w.endpoint_changes.load(Ordering::Relaxed), w.pending()),
            None => (0, 0, (0, 0)),
        };
        for (name, kind, help_text, v) in [
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "gauge", "Pending proxy rules Endpoint changes", ep_pending as u64),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "counter", "Cumulative proxy rules Endpoint changes", ep_total),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", "gauge", "Pending proxy rules Service changes", svc_pending as u64),
            ("kubeproxy_sync_proxy_rules_service_changes_total", "counter", "Cumulative proxy rules Service changes", svc_total),
        ] {
            help(&mut out, name, kind, help_text);
            let _ = writeln!(out, "{name} {v}");
        }
        process_metrics(&mut out);
        let requests = crate::sources::kube::rest_requests();
        if !requests.is_empty() {
            help(&mut out, "rest_client_requests_total", "counter", "Number of HTTP requests, partitioned by status code, method, and host.");
            for ((code, host, method), n) in requests {
                let _ = writeln!(out, "rest_client_requests_total{{code=\"{}\",host=\"{}\",method=\"{}\"}} {n}", esc(&code), esc(&host), esc(&method));
            }
        }
        if let Some(w) = &self.watch {
            for (name, what, v) in [
                ("ferry_watch_events_total", "API watch events applied.", &w.events),
                ("ferry_watch_errors_total", "API watch failures (410 Gone, dropped connections); each re-watches or relists.", &w.errors),
                ("ferry_watch_relists_total", "Complete lists of a resource (the initial ones and every relist).", &w.relists),
            ] {
                help(&mut out, name, "counter", what);
                let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
            }
        }
        match BpfMaps::from_pins(&self.pin_dir) {
            Ok(maps) => map_metrics(&mut out, &maps, &self.pin_dir, &self.ct.lock().unwrap()),
            Err(e) => {
                let _ = writeln!(out, "# maps under {} unreadable: {e}", self.pin_dir.display());
            }
        }
        out
    }
}

/// A cumulative histogram as the exposition format writes it.
struct Histogram<'a> {
    buckets: &'a [f64],
    counts: &'a [u64],
    sum: f64,
    count: u64,
}

impl Histogram<'_> {
    /// `labels`: `""`, or label pairs each followed by a comma (`ip_family="IPv4",`).
    fn write(&self, out: &mut String, name: &str, labels: &str, text: &str) {
        help(out, name, "histogram", text);
        for (b, n) in self.buckets.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", self.count);
        let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.trim_end_matches(',')) };
        let _ = writeln!(out, "{name}_sum{labels} {}", self.sum);
        let _ = writeln!(out, "{name}_count{labels} {}", self.count);
    }
}

/// The standard process metrics (client_golang's process collector, which kube-proxy serves):
/// names and help texts as it writes them, read from /proc/self. A figure that cannot be read is
/// left out.
fn process_metrics(out: &mut String) {
    // sysconf(_SC_CLK_TCK) and the page size: the units of /proc/self/stat.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command (which may hold spaces), from field 3 (state) on.
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let mut write = |name: &str, kind: &str, text: &str, v: Option<f64>| {
        if let Some(v) = v {
            help(out, name, kind, text);
            let _ = if v.is_infinite() { writeln!(out, "{name} +Inf") } else { writeln!(out, "{name} {v}") };
        }
    };
    write("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", field(14).zip(field(15)).map(|(u, s)| (u + s) / tick));
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let limit = |what: &str| -> Option<f64> {
        let l = limits.lines().find(|l| l.starts_with(what))?;
        match l[what.len()..].split_whitespace().next()? {
            "unlimited" => Some(f64::INFINITY),
            v => v.parse().ok(),
        }
    };
    write("process_max_fds", "gauge", "Maximum number of open file descriptors.", limit("Max open files"));
    write("process_open_fds", "gauge", "Number of open file descriptors.", std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64));
    write("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", field(24).map(|p| p * page));
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()));
    write("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", field(22).zip(btime).map(|(t, b)| b + t / tick));
    write("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", field(23));
    write("process_virtual_memory_max_bytes", "gauge", "Maximum amount of virtual memory available in bytes.", limit("Max address space"));
}

/// kube-proxy labels its sync and programming metrics with the IP family they are about.
const KP_FAMILY: &str = "ip_family=\"IPv4\",";

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// Label value escaping of the exposition format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        _ => "other",
    }
}

fn map_metrics(out: &mut String, maps: &BpfMaps, dir: &std::path::Path, ct: &CtFigures) {
    use dataplane_common::names;
    help(out, "ferry_map_entries", "gauge", "Entries in each pinned map (arrays count every slot, but the hashing table array counts the table entries service entries point at; conntrack as of the last garbage collection).");
    let mut usage = crate::bpf::map_usage(dir);
    if ct.runs > 0 {
        usage.push(crate::bpf::MapUsage { name: names::CONNTRACK, entries: ct.live_lru, capacity: ct.caps.0 });
        usage.push(crate::bpf::MapUsage { name: names::CONNTRACK_ASSURED, entries: ct.live_assured, capacity: ct.caps.1 });
        usage.push(crate::bpf::MapUsage { name: names::POL_CONNTRACK, entries: ct.pol_live.0, capacity: ct.pol_caps.0 });
        usage.push(crate::bpf::MapUsage { name: names::POL_CONNTRACK_ASSURED, entries: ct.pol_live.1, capacity: ct.pol_caps.1 });
    }
    for u in &usage {
        let _ = writeln!(out, "ferry_map_entries{{map=\"{}\"}} {}", u.name, u.entries);
    }
    help(out, "ferry_map_capacity", "gauge", "Capacity (max_entries) of each pinned map; of the hashing table array, in table entries.");
    for u in &usage {
        let _ = writeln!(out, "ferry_map_capacity{{map=\"{}\"}} {}", u.name, u.capacity);
    }
    help(out, "ferry_conntrack_connections", "gauge", "Live tracked connections by protocol and state, as of the last garbage collection.");
    for ((p, st), n) in &ct.connections {
        let _ = writeln!(out, "ferry_conntrack_connections{{proto=\"{}\",state=\"{st}\"}} {n}", proto_name(*p));
    }
    help(out, "ferry_conntrack_gc_runs_total", "counter", "Conntrack garbage collection runs.");
    let _ = writeln!(out, "ferry_conntrack_gc_runs_total {}", ct.runs);
    help(out, "ferry_conntrack_gc_deleted_total", "counter", "Expired conntrack entries the garbage collector deleted, by map.");
    let _ = writeln!(out, "ferry_conntrack_gc_deleted_total{{map=\"{}\"}} {}", names::CONNTRACK, ct.deleted_lru);
    let _ = writeln!(out, "ferry_conntrack_gc_deleted_total{{map=\"{}\"}} {}", names::CONNTRACK_ASSURED, ct.deleted_assured);
    let _ = writeln!(out, "ferry_conntrack_gc_deleted_total{{map=\"{}\"}} {}", names::POL_CONNTRACK, ct.pol_deleted.0);
    let _ = writeln!(out, "ferry_conntrack_gc_deleted_total{{map=\"{}\"}} {}", names::POL_CONNTRACK_ASSURED, ct.pol_deleted.1);
    help(out, "ferry_conntrack_gc_duration_seconds", "gauge", "How long the last garbage collection run took.");
    let _ = writeln!(out, "ferry_conntrack_gc_duration_seconds {}", ct.took.as_secs_f64());
    help(out, "ferry_conntrack_gc_interval_seconds", "gauge", "The garbage collector's current (adaptive) interval.");
    let _ = writeln!(out, "ferry_conntrack_gc_interval_seconds {}", ct.interval.as_secs_f64());
    help(
        out,
        "ferry_conntrack_evictions_total",
        "counter",
        "Entries the LRU conntrack map evicted under pressure (new, unreplied and closing connections only; established ones live in the assured map, which never evicts): entries created minus deleted minus present, at the last garbage collection.",
    );
    let _ = writeln!(out, "ferry_conntrack_evictions_total{{map=\"{}\"}} {}", names::CONNTRACK, ct.evictions);
    let _ = writeln!(out, "ferry_conntrack_evictions_total{{map=\"{}\"}} {}", names::POL_CONNTRACK, ct.pol_evictions);
    help(out, "ferry_conntrack_source_max_assured", "gauge", "The most assured (never evicted) connections any one source address holds, by conntrack map, at the last garbage collection: compare with --conntrack-max-per-source (ferry_datapath_events_total{event=\"ct_source_limit\"} counts connections kept out).");
    let _ = writeln!(out, "ferry_conntrack_source_max_assured{{map=\"{}\"}} {}", names::CONNTRACK_ASSURED, ct.source_max.0);
    let _ = writeln!(out, "ferry_conntrack_source_max_assured{{map=\"{}\"}} {}", names::POL_CONNTRACK_ASSURED, ct.source_max.1);
    let totals = maps.stat_totals();
    help(out, "ferry_datapath_events_total", "counter", "Datapath events by kind, summed over CPUs.");
    for (i, name) in stat::NAMES {
        if i != stat::DROP {
            let _ = writeln!(out, "ferry_datapath_events_total{{event=\"{name}\"}} {}", totals.get(i as usize).copied().unwrap_or(0));
        }
    }
    help(out, "ferry_drops_total", "counter", "Packets dropped by the datapath, by reason.");
    for r in DropReason::ALL {
        let _ = writeln!(out, "ferry_drops_total{{reason=\"{}\"}} {}", r.name(), totals.get(r.stat() as usize).copied().unwrap_or(0));
    }
    help(out, "ferry_policy_drops_total", "counter", "Packets NetworkPolicy dropped, by the policy isolating the pod and direction.");
    let mut pols: Vec<(u32, String)> = maps.pol_names.iter().flatten().map(|(id, n)| (id, n.as_str().to_string())).collect();
    pols.sort_by(|a, b| a.1.cmp(&b.1));
    for (id, name) in &pols {
        for (dir, d) in [(dataplane_common::DIR_INGRESS, "ingress"), (dataplane_common::DIR_EGRESS, "egress")] {
            let _ = writeln!(out, "ferry_policy_drops_total{{policy=\"{}\",direction=\"{d}\"}} {}", esc(name), maps.policy_drops(*id, dir));
        }
    }
    help(out, "ferry_service_packets_total", "counter", "Packets translated for a Service frontend (both directions), from per-CPU counters.");
    let mut rows = Vec::new();
    for (key, svc) in maps.services.iter().flatten() {
        if svc.flags & SVC_F_ADDR_ONLY != 0 {
            continue;
        }
        let c = maps.service_counters(svc.svc_id);
        let name = maps.service_name(svc.svc_id).unwrap_or_else(|| format!("<frontend {}>", svc.svc_id));
        let fe = format!("{}:{}/{}", std::net::Ipv4Addr::from(key.addr_be.to_ne_bytes()), u16::from_be(key.port_be), proto_name(key.proto));
        let scope = if key.scope == SCOPE_EXTERNAL { "external" } else { "internal" };
        rows.push((esc(&name), fe, scope, c));
    }
    rows.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    for (name, fe, scope, c) in &rows {
        let _ = writeln!(out, "ferry_service_packets_total{{service=\"{name}\",frontend=\"{fe}\",scope=\"{scope}\"}} {}", c.packets);
    }
    help(out, "ferry_service_bytes_total", "counter", "IP bytes translated for a Service frontend (both directions).");
    for (name, fe, scope, c) in &rows {
        let _ = writeln!(out, "ferry_service_bytes_total{{service=\"{name}\",frontend=\"{fe}\",scope=\"{scope}\"}} {}", c.bytes);
    }
}

/// Serves /healthz, /livez, /readyz and /metrics on `addr` (both on one address when
/// --metrics-bind-address equals --healthz-bind-address).
pub async fn spawn_server(addr: SocketAddr, observed: Arc<Observed>, with_health: bool, with_metrics: bool) -> std::io::Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(crate::http::serve(l, move |path: String| {
        let o = observed.clone();
        async move {
            match path.as_str() {
                "/healthz" if with_health => {
                    let (code, body) = o.healthz();
                    crate::http::response(code, "application/json", "", &body)
                }
                "/livez" if with_health => {
                    let (code, body) = o.livez();
                    crate::http::response(code, "application/json", "", &body)
                }
                "/readyz" if with_health => {
                    if o.ready() {
                        crate::http::response(200, "text/plain; charset=utf-8", "", "ok\n")
                    } else {
                        crate::http::response(503, "text/plain; charset=utf-8", "", "not ready: the first sync has not completed, or the starting agent's links are still being created\n")
                    }
                }
                "/metrics" if with_metrics => {
                    // Map reads are syscalls: off the async threads.
                    let body = tokio::task::spawn_blocking(move || o.metrics()).await.unwrap_or_default();
                    crate::http::response(200, "text/plain; version=0.0.4; charset=utf-8", "", &body)
                }
                _ => crate::http::response(404, "text/plain; charset=utf-8", "", "404 page not found\n"),
            }
        }
    }));
    Ok(())
}

/// RFC 3339 in UTC with nanoseconds, as Go's time.Time marshals to JSON.
/// Parses what the API server writes for a time (`2026-12-02T14:00:00Z`, optionally with a
/// fraction or an offset); None for anything else.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        let frac = &f[..digits];
        nanos = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()?;
        rest = &f[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let m = o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60;
            if o.starts_with('-') { -m } else { m }
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::new(u64::try_from(secs).ok()?, nanos))
}

pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_what_it_prints_and_what_the_api_server_writes() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_796_000_123, 456_000_000);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:10Z"), Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10)));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:10+01:00"), Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10)));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)));
        for bad in ["", "2026-12-02", "2026-12-02 14:00:00Z", "2026-12-02T14:00:00", "x026-12-02T14:00:00Z"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn network_programming_counts_each_slice_change_once() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_millis(50), None);
        o.state.lock().unwrap().np_since = Some(SystemTime::now() - std::time::Duration::from_secs(1));
        let slice = |name: &str, t: &str| {
            let mut s = EndpointSlice::default();
            s.metadata.name = Some(name.into());
            s.trigger_time = Some(t.into());
            s
        };
        let now = rfc3339(SystemTime::now() - std::time::Duration::from_millis(200));
        let a = [slice("a", &now), slice("b", "not a time")];
        o.programmed(a.iter());
        o.programmed(a.iter());
        let m = o.metrics();
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n"), "{m}");
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0\"} 0\n"), "{m}");
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.25\"} 1\n"), "{m}");
        assert!(m.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 0\n"), "{m}");
    }

    #[test]
    fn only_new_local_endpoints_have_their_route_read() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_millis(50), None);
        let set = |v: &[u8]| v.iter().map(|d| std::net::Ipv4Addr::new(10, 0, 0, *d)).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(o.endpoints_to_check(&set(&[1, 2])), set(&[1, 2]));
        assert_eq!(o.endpoints_to_check(&set(&[1, 2])), set(&[]), "an unchanged sync reads no routes");
        assert_eq!(o.endpoints_to_check(&set(&[2, 3])), set(&[3]));
        // An endpoint that left and came back is looked at again (its pod may be elsewhere now).
        assert_eq!(o.endpoints_to_check(&set(&[1, 2, 3])), set(&[1]));
    }

    #[test]
    fn network_programming_leaves_out_changes_made_before_the_agent_started() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_millis(50), None);
        let slice = |name: &str, t: SystemTime| {
            let mut s = EndpointSlice::default();
            s.metadata.name = Some(name.into());
            s.trigger_time = Some(rfc3339(t).into());
            s
        };
        // Slices written ten minutes and a second before the start: the first sync measures neither.
        let old = [slice("a", SystemTime::now() - std::time::Duration::from_secs(600)), slice("b", SystemTime::now() - std::time::Duration::from_secs(1))];
        o.programmed(old.iter());
        let m = o.metrics();
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 0\n"), "{m}");
        // A change after the start is measured.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let new = [old[0].clone(), slice("b", SystemTime::now())];
        o.programmed(new.iter());
        let m = o.metrics();
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n"), "{m}");
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.25\"} 1\n"), "{m}");
    }

    /// The bucket bounds of a histogram, as written.
    fn les(m: &str, name: &str) -> Vec<String> {
        m.lines().filter(|l| l.starts_with(&format!("{name}_bucket{{"))).filter_map(|l| Some(l.split_once("le=\"")?.1.split_once('"')?.0.to_string())).collect()
    }

    #[test]
    fn kube_proxys_metrics_have_its_names_labels_and_buckets() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_secs(1), Some(Arc::new(WatchStats::default())));
        o.change_pending();
        o.no_local_endpoints((2, 1));
        o.synced(Duration::from_millis(3), true, &SyncStats::default(), [("Service", 0), ("EndpointSlice", 0), ("Node", 1), ("Pod", 0), ("Namespace", 0), ("NetworkPolicy", 0)], 0, true);
        let m = o.metrics();
        // kube-proxy's ExponentialBuckets(0.001, 2, 15), for the sync histograms.
        let exp: Vec<String> = (0..15).map(|i| format!("{}", (0.001 * f64::from(1u32 << i) * 1000.0).round() / 1000.0)).chain(["+Inf".to_string()]).collect();
        assert_eq!(exp[14], "16.384");
        for name in ["kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_full_proxy_rules_duration_seconds"] {
            assert_eq!(les(&m, name), exp, "{name}");
            assert!(m.contains(&format!("{name}_bucket{{ip_family=\"IPv4\",le=\"0.004\"}} 1\n")) && m.contains(&format!("{name}_count{{ip_family=\"IPv4\"}} 1\n")), "{m}");
        }
        assert!(m.contains("# HELP kubeproxy_sync_full_proxy_rules_duration_seconds SyncProxyRules latency in seconds for full resyncs\n"), "{m}");
        // kube-proxy's MergeBuckets: 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30.
        let np = les(&m, "kubeproxy_network_programming_duration_seconds");
        let want: Vec<String> = ["0", "0.25", "0.5"].map(String::from).into_iter().chain((1..60).map(|i| i.to_string())).chain((60..120).step_by(5).map(|i| i.to_string())).chain((120..=300).step_by(30).map(|i| i.to_string())).chain(["+Inf".to_string()]).collect();
        assert_eq!(np, want);
        for (line, help) in [
            ("kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 2\n", "Number of services with a Local traffic policy and no endpoints"),
            ("kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 1\n", "Number of services with a Local traffic policy and no endpoints"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total 0\n", "Cumulative proxy rules Endpoint changes"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n", "Pending proxy rules Endpoint changes"),
            ("kubeproxy_sync_proxy_rules_service_changes_total 0\n", "Cumulative proxy rules Service changes"),
            ("kubeproxy_sync_proxy_rules_service_changes_pending 0\n", "Pending proxy rules Service changes"),
        ] {
            assert!(m.contains(line), "{line}: {m}");
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(m.contains(&format!("# HELP {name} {help}\n")), "{name}: {m}");
        }
        let value = |name: &str| m.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok()).unwrap_or_else(|| panic!("{name}: {m}"));
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        let queued = value("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}");
        assert!(queued > now - 60.0 && queued <= value("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}"), "{m}");
        // The process metrics of client_golang's collector, from /proc/self: this test process's.
        assert!(value("process_resident_memory_bytes") > 1e6 && value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"), "{m}");
        assert!(value("process_open_fds") >= 3.0 && value("process_max_fds") >= value("process_open_fds"), "{m}");
        let start = value("process_start_time_seconds");
        assert!(start > now - 3600.0 && start <= now + 1.0, "started {start}, now {now}");
        assert!(value("process_cpu_seconds_total") >= 0.0 && m.contains("# TYPE process_cpu_seconds_total counter\n"), "{m}");
        assert!(m.contains("# HELP process_resident_memory_bytes Resident memory size in bytes.\n"), "{m}");
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_427_446, 5);
        assert_eq!(rfc3339(t), "2026-11-23T09:50:46.000000005Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_825_600); // 2000-02-29 12:00
        assert_eq!(rfc3339(leap), "2000-02-29T12:00:00.000000000Z");
    }

    #[test]
    fn healthz_fails_when_a_change_waits_too_long() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_millis(50), None);
        o.datapath(true, 3);
        assert!(o.healthy() && !o.ready());
        // The first sync has not happened within the timeout.
        std::thread::sleep(Duration::from_millis(80));
        let (code, body) = o.healthz();
        assert_eq!(code, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["lastUpdated"], "1970-01-01T00:00:00.000000000Z");
        assert_eq!(v["nodeEligible"], true);
        o.synced(Duration::from_millis(3), true, &SyncStats::default(), [("Service", 2), ("EndpointSlice", 2), ("Node", 1), ("Pod", 0), ("Namespace", 0), ("NetworkPolicy", 0)], 0, true);
        assert!(o.ready());
        let (code, body) = o.healthz();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_ne!(v["lastUpdated"], "1970-01-01T00:00:00.000000000Z");
        let m = o.metrics();
        assert!(m.contains("ferry_sync_duration_seconds_bucket{le=\"0.004\"} 1\n"), "{m}");
        assert!(m.contains("ferry_sync_duration_seconds_bucket{le=\"0.002\"} 0\n"), "{m}");
        assert!(m.contains("ferry_objects{kind=\"Service\"} 2\n"), "{m}");
        assert!(m.contains("ferry_datapath_links 3\n"), "{m}");
    }

    #[test]
    fn livez_is_the_datapath_and_healthz_the_sync_and_the_node() {
        let o = Observed::new(PathBuf::from("/nonexistent"), Duration::from_millis(50), None);
        let sync = |o: &Observed, eligible: bool| {
            o.synced(Duration::from_millis(1), true, &SyncStats::default(), [("Service", 0), ("EndpointSlice", 0), ("Node", 1), ("Pod", 0), ("Namespace", 0), ("NetworkPolicy", 0)], 0, eligible)
        };
        // Nothing attached yet: neither.
        assert_eq!(o.livez().0, 503);
        o.datapath(true, 4);
        sync(&o, true);
        assert_eq!((o.livez().0, o.healthz().0), (200, 200));
        let v: serde_json::Value = serde_json::from_str(&o.livez().1).unwrap();
        assert_eq!((v["datapathAttached"].clone(), v["links"].clone()), (serde_json::json!(true), serde_json::json!(4)));
        // A node being deleted or drained by the autoscaler: /healthz 503, /livez still 200.
        sync(&o, false);
        let (code, body) = o.healthz();
        assert_eq!((code, o.livez().0), (503, 200));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["nodeEligible"], false);
        // A stuck sync: /healthz 503 after the timeout, /livez stays 200 (no restart loop).
        sync(&o, true);
        o.change_pending();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!((o.healthz().0, o.livez().0), (503, 200));
        // The datapath detached under the agent: /livez fails, a restart re-attaches.
        o.datapath(false, 3);
        assert_eq!(o.livez().0, 503);
    }
}
