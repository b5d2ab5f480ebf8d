//! The daemon: adopt the pinned maps and links and swap in this version's programs (the datapath
//! serves from its first instant, before any source is read), read the sources, then keep the
//! datapath equal to them until told to stop. Stopping (SIGTERM, SIGINT) and dying (SIGKILL, a
//! panic, an OOM kill) alike leave the programs attached and the maps pinned: traffic keeps
//! flowing while the agent is down, and the next start adopts both without a gap; established
//! connections keep their backends and nothing is flushed. Only `run --cleanup` removes Ferry.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use dataplane_common::NodeConfig;
use k8s_openapi::api::core::v1::Node;
use tracing::{error, info, warn};

use crate::{
    attach::{self, Attachments, IfacePatterns, LinkEvents},
    bpf::BpfMaps,
    error::ObjectError,
    loader, model,
    observe::Observed,
    reconcile::{Cidr4, Reconciler},
    sources::{kube::KubeSource, manifests, Changed, Objects},
    translator::Translator,
};

/// Where Services, EndpointSlices and Nodes come from.
pub enum SourceConfig {
    /// A file or directory of manifests, checked for changes every `poll`.
    Manifests { path: PathBuf, poll: Duration },
    /// The API server (kube-proxy's `--kubeconfig` and `--master`; neither: in-cluster).
    Kube { kubeconfig: Option<PathBuf>, master: Option<String> },
}

/// kube-proxy's `--detect-local-mode`: what is local traffic. ClusterIP traffic that is not is
/// masqueraded; local traffic to an external address of a Service with externalTrafficPolicy
/// Local is short-circuited to all its endpoints.
#[derive(Clone, PartialEq, Eq)]
pub enum LocalMode {
    /// Sources in `--cluster-cidr` (none set: no local detector).
    ClusterCidr,
    /// Sources in this node's podCIDR, from its Node object.
    NodeCidr,
    /// Packets that come in from the pods' bridge (`--pod-bridge-interface`): the pods'
    /// interfaces, where Ferry's pod hooks see them before the bridge.
    BridgeInterface(String),
    /// Packets that come in from interfaces named `--pod-interface-name-prefix`*: Ferry's pod
    /// interfaces, which then are exactly those.
    InterfaceNamePrefix(String),
}

impl std::fmt::Debug for LocalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalMode::ClusterCidr => f.write_str("ClusterCIDR"),
            LocalMode::NodeCidr => f.write_str("NodeCIDR"),
            LocalMode::BridgeInterface(b) => write!(f, "BridgeInterface {b}"),
            LocalMode::InterfaceNamePrefix(p) => write!(f, "InterfaceNamePrefix {p}"),
        }
    }
}

pub struct RunConfig {
    pub source: SourceConfig,
    /// The node's name (`--hostname-override`), addresses (`--node-ip`; empty: the InternalIP
    /// and ExternalIP addresses of its Node object) and `--nodeport-addresses`.
    pub node: model::NodeContext,
    pub pin_dir: PathBuf,
    pub pod_interfaces: IfacePatterns,
    /// Interfaces towards the outside (NodePort, LoadBalancer, external IPs); `None`: the
    /// interfaces holding the node's addresses.
    pub external_interfaces: Option<IfacePatterns>,
    /// Source ports for NodePort traffic sent to other nodes (inclusive).
    pub snat_ports: (u16, u16),
    /// Entries of the assured conntrack map; the LRU one gets half (`--conntrack-capacity`).
    pub conntrack_capacity: u32,
    /// Entries of the flat consistent-hashing table array (`--lb-table-entries`).
    pub lb_table_entries: u32,
    /// Conntrack timeouts in seconds by `dataplane_common::ct_timeout` index (0: the default).
    pub ct_timeouts: [u32; dataplane_common::ct_timeout::COUNT],
    /// The agent's own network namespace (the node's), whose sockets the socket hooks translate;
    /// read at start (0: every socket in the cgroup).
    pub host_netns_cookie: u64,
    /// How new connections pick a backend.
    pub algorithm: crate::reconcile::Algorithm,
    /// `--nodeport-acceleration=xdp`: NodePort handling in XDP on the external interfaces.
    pub xdp: bool,
    /// `--pod-source-check strict`: a pod may send only with its own address.
    pub source_check: bool,
    /// `--external-source-check strict`: remote pod sources by strict reverse path.
    pub external_strict: bool,
    /// `--refusals-per-second`, `--refusal-burst`.
    pub refusals: (u32, u32),
    /// `--conntrack-max-per-source` (0: no limit).
    pub ct_per_source_max: u32,
    /// cgroup (v2) for the socket hooks; `None` leaves host processes alone.
    pub cgroup: Option<PathBuf>,
    pub service_cidrs: BTreeSet<Cidr4>,
    pub cluster_cidr: Option<Cidr4>,
    pub local_mode: LocalMode,
    pub healthz_bind: Option<SocketAddr>,
    pub metrics_bind: Option<SocketAddr>,
    /// A change not applied within this makes /healthz fail.
    pub health_timeout: Duration,
    /// Watch events within this window are applied together.
    pub min_sync_period: Duration,
    /// `--enable-network-policy`: false leaves NetworkPolicy to the CNI (no Pod, Namespace or
    /// NetworkPolicy is read; no pod is isolated or tracked for policy).
    pub network_policy: bool,
    /// `--cleanup-kube-proxy`: remove kube-proxy's rules once the datapath is attached and the
    /// first sync succeeded (the take-over; kube-proxy must be stopped first).
    pub cleanup_kube_proxy: bool,
}

enum Source {
    /// `last`: fingerprint of the manifests the maps match; `reading`: of the ones last read;
    /// `cache`: the files as last parsed.
    /// `watch`: wakes the loop when a file changes (inotify), ahead of the poll.
    /// `unreadable`: the path could not be read at the last poll (said once, not every poll).
    /// `held`: the objects the last successful read held (kept across a failed read, which
    /// empties `cache`: a directory removed, then made again empty, is still an emptied one).
    /// `emptied`: since when the manifests, which held objects, read as empty (held for
    /// [`manifests::EMPTIED_GRACE`] before that is applied).
    Manifests { path: PathBuf, last: Option<u64>, reading: Option<u64>, cache: manifests::Cache, watch: Option<manifests::Watcher>, unreadable: std::cell::Cell<bool>, held: usize, emptied: Option<std::time::Instant> },
    Kube(KubeSource),
}

impl Source {
    /// The objects, or `Ok(None)` while manifests that held objects read as empty for less than
    /// [`manifests::EMPTIED_GRACE`] (the maps keep what they hold; the poll reads again).
    fn read(&mut self) -> Result<Option<(Objects, Vec<ObjectError>)>, String> {
        match self {
            Source::Manifests { path, reading, cache, held, emptied, .. } => {
                // Fingerprint first: a change made while reading is seen at the next tick.
                *reading = manifests::fingerprint(path).ok();
                // (A failed read ends a grace begun: the next empty read begins a new one.)
                let read = manifests::read_changed(path, cache).inspect_err(|_| *emptied = None).map_err(|e| format!("manifests {}: {e}", path.display()))?;
                // Empty as read (no manifest file, only empty ones, only comments), not as
                // stat'ed: nothing written between a look and the read is missed.
                if *held > 0 && cache.objects() == 0 {
                    let since = *emptied.get_or_insert_with(|| {
                        warn!(path = %path.display(), objects = *held, grace_s = manifests::EMPTIED_GRACE.as_secs(), "manifests read as empty (no object in them): the maps keep what they hold meanwhile, in case the files are being rewritten; every object they held is removed if they stay empty that long");
                        std::time::Instant::now()
                    });
                    if since.elapsed() < manifests::EMPTIED_GRACE {
                        // The cache holds the empty read: the next read is whole, so the files
                        // coming back (or the grace's end) is translated against the maps anew.
                        cache.read_all_next();
                        return Ok(None);
                    }
                    warn!(path = %path.display(), objects = *held, "manifests still empty after the grace: removing every object they held");
                } else if emptied.take().is_some() {
                    info!(path = %path.display(), "manifests hold objects again within the grace: nothing was removed meanwhile");
                }
                *emptied = None;
                *held = cache.objects();
                Ok(Some(read))
            }
            Source::Kube(k) => Ok(Some((k.snapshot(), Vec::new()))),
        }
    }

    /// Makes the next read hold every object (`Changed::All`).
    fn read_all_next(&mut self) {
        match self {
            Source::Manifests { cache, .. } => cache.read_all_next(),
            Source::Kube(k) => k.read_all_next(),
        }
    }
}

/// This node's Node object, if the source holds it.
fn own_node<'a>(objs: &'a Objects, name: &str) -> Option<&'a Node> {
    objs.nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name))
}

/// The node as the translation sees it: addresses from the flags, else from its Node object.
pub fn node_context(cfg: &RunConfig, objs: &Objects) -> model::NodeContext {
    let mut node = cfg.node.clone();
    node.zone = objs.zone_of(&node.name);
    if node.ips.is_empty() {
        node.ips = own_node(objs, &node.name).map(node_ips).unwrap_or_default();
    }
    node
}

/// A Node object's IPv4 addresses, InternalIPs first: the first is the node's primary address
/// (kube-proxy's node IP, where `--nodeport-addresses primary` answers).
pub fn node_ips(n: &Node) -> Vec<Ipv4Addr> {
    let mut ips = Vec::new();
    let addrs = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    for kind in ["InternalIP", "ExternalIP"] {
        for a in addrs.into_iter().flatten().filter(|a| a.type_ == kind) {
            if let Ok(crate::addr::Family::V4(ip)) = crate::addr::parse_ip(&a.address) {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    ips
}

/// The datapath's node settings for this node.
pub fn node_config(cfg: &RunConfig, node: &model::NodeContext, objs: &Objects) -> NodeConfig {
    let local = match cfg.local_mode {
        LocalMode::ClusterCidr => cfg.cluster_cidr,
        LocalMode::NodeCidr => own_node(objs, &node.name)
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.pod_cidrs.clone().or_else(|| s.pod_cidr.clone().map(|c| vec![c])))
            .and_then(|cidrs| cidrs.iter().find_map(|c| c.parse::<Cidr4>().ok())),
        LocalMode::BridgeInterface(_) | LocalMode::InterfaceNamePrefix(_) => None,
    };
    let by_iface = matches!(cfg.local_mode, LocalMode::BridgeInterface(_) | LocalMode::InterfaceNamePrefix(_));
    let (cluster_cidr_be, cluster_mask_be) = local.map(|c| c.addr_mask_be()).unwrap_or((0, 0));
    NodeConfig {
        snat_addr_be: node.ips.first().map(|ip| u32::from_ne_bytes(ip.octets())).unwrap_or(0),
        snat_port_min: cfg.snat_ports.0,
        snat_port_max: cfg.snat_ports.1,
        cluster_cidr_be,
        cluster_mask_be,
        ct_timeout_s: cfg.ct_timeouts,
        host_netns_cookie: cfg.host_netns_cookie,
        flags: if cfg.source_check { dataplane_common::CFG_F_SOURCE_CHECK } else { 0 }
            | if cfg.external_strict { dataplane_common::CFG_F_EXTERNAL_STRICT } else { 0 }
            | if by_iface { dataplane_common::CFG_F_LOCAL_IFACE } else { 0 },
        refusals_per_s: cfg.refusals.0,
        refusal_burst: cfg.refusals.1,
        ct_per_source_max: cfg.ct_per_source_max,
        ..Default::default()
    }
}

/// kube-proxy's nodeEligible: false while the node is being deleted or drained away by the
/// cluster autoscaler.
fn node_eligible(objs: &Objects, name: &str) -> bool {
    let Some(n) = own_node(objs, name) else { return true };
    let tainted = n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"));
    n.metadata.deletion_timestamp.is_none() && !tainted
}

pub async fn run(mut cfg: RunConfig) -> anyhow::Result<()> {
    // First of all: a SIGTERM or SIGINT from here on is handled at a safe point (never in the
    // middle of a migration or an attach), not by dying where the process stands.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    allocator_settings();
    info!(version = env!("CARGO_PKG_VERSION"), node = %cfg.node.name, pin_dir = %cfg.pin_dir.display(), "starting");
    // One agent per pin directory: a second one (a rolling update with surge) waits here, and
    // still stops when told to.
    let lock = {
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            std::fs::create_dir_all(&cfg.pin_dir).with_context(|| format!("creating the pin directory {}", cfg.pin_dir.display()))?;
            if let Some(l) = loader::PinLock::try_acquire(&cfg.pin_dir).with_context(|| format!("locking the pin directory {}", cfg.pin_dir.display()))? {
                break l;
            }
            if said.elapsed() >= Duration::from_secs(10) {
                warn!(pin_dir = %cfg.pin_dir.display(), waited_s = started.elapsed().as_secs(), "another agent holds this pin directory; waiting for it to stop");
                said = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
    };
    if cfg.cgroup.is_some() {
        // The socket hooks serve the node's own processes; pods (in the same cgroup tree) keep
        // the tc path.
        cfg.host_netns_cookie = crate::sockets::own_netns_cookie().context("reading the node's network namespace cookie (SO_NETNS_COOKIE, kernel 5.14+)")?;
    }
    // The API server's lists start now: they come in while the datapath loads (the programs'
    // verification takes about half a second), and the first sync needs both.
    let mut kube_source = match &cfg.source {
        SourceConfig::Kube { kubeconfig, master } => {
            let client = crate::sources::kube::client(kubeconfig.as_deref(), master.as_deref()).await?;
            Some(KubeSource::start(client, &cfg.node.name, cfg.network_policy).await)
        }
        SourceConfig::Manifests { .. } => None,
    };
    // Maps of another layout or capacity (an upgrade, a rollback) are copied into new ones here
    // while the programs an earlier agent attached keep serving from the old ones. (On a thread
    // of its own, so that the lists go on meanwhile.)
    let (pin_dir, caps) = (cfg.pin_dir.clone(), loader::capacities(cfg.conntrack_capacity, cfg.lb_table_entries));
    let (xdp, sockets) = (cfg.xdp, cfg.cgroup.is_some());
    let (mut ebpf, mut migration) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let started = Instant::now();
        let (mut ebpf, migration) = loader::load_pinned(&pin_dir, &caps).context("loading the datapath")?;
        info!(took_ms = started.elapsed().as_millis() as u64, "maps loaded");
        let started = Instant::now();
        // Only the programs this node's settings attach: XDP and the socket hooks are start
        // flags, and a program not loaded is never wanted by an attachment.
        attach::load_needed(&mut ebpf, xdp, sockets).context("loading programs")?;
        info!(took_ms = started.elapsed().as_millis() as u64, "programs loaded (verified)");
        Ok((ebpf, migration))
    })
    .await
    .context("loading the datapath")??;
    let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
    let applied = maps.dump_applied();
    if applied.frontends.is_empty() && applied.backends.is_empty() {
        info!(node = %cfg.node.name, pin_dir = %cfg.pin_dir.display(), "maps created (nothing pinned from a previous run)");
    } else {
        info!(
            node = %cfg.node.name,
            pin_dir = %cfg.pin_dir.display(),
            frontends = applied.frontends.len(),
            backends = applied.backends.len(),
            "maps restored from a previous run (nothing is flushed; the first sync writes only differences)"
        );
    }
    let live: std::collections::HashSet<u32> = applied.frontends.values().map(|f| f.svc_id).collect();
    let mut rec = Reconciler::restore(applied);
    rec.algorithm = cfg.algorithm;
    let mut pol = PolicyState::restore(&maps);

    // The datapath first: the links an earlier agent pinned get this version's programs in place
    // (no moment without a program), missing ones are attached, and from here on the node
    // serves from the pinned maps, whether or not the sources can be read.
    // (Without --external-interfaces: the names found, to find them again at each sync.)
    let mut external_names = ExternalNames::default();
    let mut external = match &cfg.external_interfaces {
        Some(p) => Some(p.clone()),
        None if !cfg.node.ips.is_empty() => external_of(&cfg.node.ips, &mut external_names),
        // From the Node object: usually listed by now (one object, while the programs were
        // verified), so the external links are created with the others, meanwhile.
        None => match kube_source.as_ref().and_then(|k| k.own_node(&cfg.node.name)).map(|n| node_ips(&n)).filter(|ips| !ips.is_empty()) {
            Some(ips) => external_of(&ips, &mut external_names),
            // Known once the Node object is read; until then the interfaces an earlier agent
            // attached as external stay so.
            None => None,
        },
    };
    // The last copy before the swap: only what the old programs wrote in the last moments is
    // left for after it.
    migration.catch_up().context("copying the pinned maps once more before the swap")?;
    let mut att = Attachments::new(&cfg.pin_dir);
    att.xdp = cfg.xdp;
    att.sync_cgroup(&mut ebpf, cfg.cgroup.as_deref()).with_context(|| format!("socket hooks on cgroup {}", cfg.cgroup.as_deref().unwrap_or(std::path::Path::new("-")).display()))?;
    for (flag, patterns) in [("--pod-interfaces", Some(&cfg.pod_interfaces)), ("--external-interfaces", external.as_ref())] {
        for name in patterns.map(IfacePatterns::missing_names).unwrap_or_default() {
            warn!(flag, interface = %name, "no such interface in this network namespace; attaching when it appears");
        }
    }
    let new_links = att.start_interfaces(&mut ebpf, &cfg.pod_interfaces, external.as_ref());
    if !migration.is_empty() {
        info!("programs swapped: the old maps are copied once more and replaced");
    }
    migration.finish().context("finishing the migration of the pinned maps")?;
    // (After the migration's last copy, which copies the old maps whole.)
    let gone = maps.sweep_counters(|id| live.contains(&id));
    drop(live);
    if gone > 0 {
        info!(count = gone, "counters of removed frontends dropped");
    }
    let unused = loader::unused_pins(&cfg.pin_dir);
    if !unused.is_empty() {
        warn!(
            pin_dir = %cfg.pin_dir.display(),
            maps = %unused.join(","),
            "pinned maps no version of Ferry recorded (from before layouts were recorded); they hold memory until removed (rm them once no older agent runs)"
        );
    }
    // Every link an earlier agent pinned carries this agent's programs now. The links to create
    // wait on the kernel (an RCU grace period each under the RTNL), not on this process: they are
    // made on a thread while the lists are awaited and the first sync writes, and taken (`settle`)
    // before anything else touches the attachments, at the latest right after that sync (before
    // kube-proxy's rules go or readiness is reported).
    let creating = new_links.len();
    let mut attaching = if new_links.is_empty() {
        att.finish(new_links.create());
        None
    } else {
        // The pin directory stays locked while the thread pins links, even if this function
        // returns on an error meanwhile (the runtime waits for the thread only after that).
        let lock = lock.share().context("sharing the pin directory's lock with the thread creating links")?;
        Some(tokio::task::spawn_blocking(move || {
            let _lock = lock;
            let started = Instant::now();
            let created = new_links.create();
            info!(links = creating, took_ms = started.elapsed().as_millis() as u64, "new links created");
            created
        }))
    };
    info!(
        links = att.links(),
        creating,
        pin_dir = %cfg.pin_dir.display(),
        "datapath attached: serving from the pinned maps (the sources are read next; new links are created meanwhile)"
    );

    // Link, address and route events come from a blocking netlink socket on its own thread.
    let (link_tx, mut link_rx) = tokio::sync::mpsc::channel::<u8>(16);
    let events = LinkEvents::open().context("subscribing to netlink link, address and route events")?;
    // Cleared if the thread ends: route changes are then no longer announced, and every sync
    // compiles the policies again (they place this node's pods by route).
    let events_alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let alive = events_alive.clone();
    std::thread::Builder::new().name("link-events".into()).spawn(move || loop {
        match events.wait() {
            Err(e) => {
                error!(error = %e, "netlink link events: link, address and route changes are now seen only by the 10 s recheck and at each sync");
                alive.store(false, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Ok(0) => {}
            Ok(kinds) => {
                if link_tx.blocking_send(kinds).is_err() {
                    return;
                }
            }
        }
    })?;

    let source = match &cfg.source {
        SourceConfig::Manifests { path, .. } => {
            let watch = match manifests::Watcher::new(path) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "manifests: no inotify watch; changes are seen at the next poll (--min-sync-period-ms)");
                    None
                }
            };
            Source::Manifests { path: path.clone(), last: None, reading: None, cache: Default::default(), watch, unreadable: Default::default(), held: 0, emptied: None }
        }
        SourceConfig::Kube { .. } => Source::Kube(kube_source.take().expect("started before the datapath loaded")),
    };
    let watch = match &source {
        Source::Kube(k) => Some(k.stats.clone()),
        _ => None,
    };
    let observed = Arc::new(Observed::new(cfg.pin_dir.clone(), cfg.health_timeout, watch));
    observed.datapath(att.live(), att.links());
    match (cfg.healthz_bind, cfg.metrics_bind) {
        (Some(h), Some(m)) if h == m => serve(h, &observed, true, true).await?,
        (h, m) => {
            if let Some(h) = h {
                serve(h, &observed, true, false).await?;
            }
            if let Some(m) = m {
                serve(m, &observed, false, true).await?;
            }
        }
    }

    spawn_conntrack_gc(cfg.pin_dir.clone(), observed.clone())?;
    let stopping = |att: &Attachments| {
        info!(
            links = att.links(),
            pin_dir = %cfg.pin_dir.display(),
            "stopping: the programs stay attached and the maps pinned, the datapath serves on without the agent (`dataplane-agent run --cleanup` removes Ferry from the node)"
        );
    };
    if let Source::Kube(k) = &source {
        info!("waiting for the initial lists of Services, EndpointSlices and this node's Node (the datapath serves meanwhile)");
        let mut every = tokio::time::interval(Duration::from_secs(30));
        every.tick().await;
        let mut recheck = tokio::time::interval(Duration::from_secs(10));
        recheck.tick().await;
        loop {
            tokio::select! {
                _ = k.wait_ready() => break,
                _ = int.recv() => {
                    settle(&mut att, &mut attaching, &observed).await;
                    return Ok(stopping(&att));
                }
                _ = term.recv() => {
                    settle(&mut att, &mut attaching, &observed).await;
                    return Ok(stopping(&att));
                }
                _ = every.tick() => warn!("still waiting for the API server's initial lists; the datapath keeps serving from the pinned maps"),
                made = links_made(&mut attaching) => {
                    attaching = None;
                    took_links(&mut att, made, &observed);
                }
                _ = recheck.tick() => {
                    settle(&mut att, &mut attaching, &observed).await;
                    recheck_links(&mut att, &mut ebpf, &cfg, external.as_ref(), &observed);
                }
                Some(kinds) = link_rx.recv() => {
                    if kinds & attach::EV_LINK != 0 {
                        settle(&mut att, &mut attaching, &observed).await;
                        att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, external.as_ref());
                        observed.datapath(att.live(), att.links());
                    }
                }
            }
        }
    }
    let mut source = source;
    // (Never held: the grace is for manifests that held objects at an earlier read.)
    let first = source.read().map_err(anyhow::Error::msg)?.expect("a first read is not held");
    let node = node_context(&cfg, &first.0);
    if node.ips.is_empty() {
        warn!("no node address (--node-ip, or InternalIP/ExternalIP of the Node object): NodePorts answer nowhere and NodePort traffic from outside to a backend on another node is dropped (no_node_address)");
    }
    let mut node_cfg = node_config(&cfg, &node, &first.0);
    maps.set_config(node_cfg)?;
    observed.datapath(att.live(), att.links());

    let mut health = crate::health::HealthServers::new(observed.clone());
    let mut retry = Backoff::default();
    let mut pending = Some(first);
    let mut took_over = TakeOver { done: !cfg.cleanup_kube_proxy, waiting: false };
    // The last sync wrote everything (kube-proxy's rules may go once the links are attached).
    let mut in_sync = false;
    let mut tick = tokio::time::interval(match &cfg.source {
        SourceConfig::Manifests { poll, .. } => *poll,
        SourceConfig::Kube { .. } => Duration::from_secs(3600),
    });
    let mut recheck = tokio::time::interval(Duration::from_secs(10));
    let mut service_ranges = BTreeSet::new();
    // The translation between syncs; the next sync writes everything that differs (not only
    // what changed) after a sync whose writes failed, and when the node's addresses change.
    let mut tr = Translator::new();
    let mut full_next = true;
    let mut host_addrs = BTreeSet::new();
    // When the last sync started: the next waits until --min-sync-period after it (kube-proxy's
    // BoundedFrequencyRunner), so a change after a quiet spell is synced at once and a burst of
    // changes is batched.
    let mut last_sync: Option<tokio::time::Instant> = None;
    // The Pods, Namespaces and NetworkPolicies as last read (moved, not copied, between the
    // reads and the syncs), and whether the policies must be compiled again although none of
    // them changed: the node's addresses, its routes or a failed write.
    let mut policy_objs = Objects::default();
    let mut policy_dirty = true;
    let mut last_node: Option<model::NodeContext> = None;
    let mut last_trim: Option<std::time::Instant> = None;
    // A full read's trim that had to wait (one came less than TRIM_EVERY before it).
    let mut trim_due: Option<tokio::time::Instant> = None;
    let hold_off = |last: Option<tokio::time::Instant>| last.map_or_else(tokio::time::Instant::now, |l| l + cfg.min_sync_period);
    loop {
        if let Some((mut objs, errors)) = pending.take() {
            last_sync = Some(tokio::time::Instant::now());
            if matches!(objs.changed, Changed::Only(_)) && !tr.is_built() {
                // Changes need a translation to change (there is none after a read that held an
                // object twice): everything is read again.
                source.read_all_next();
                pending = read_logged(&mut source);
                continue;
            }
            if !cfg.network_policy {
                objs.network_policies.clear();
                objs.pods.clear();
                objs.namespaces.clear();
                // Nothing to compile after the first sync (which empties the policy maps) and
                // after a change of the node's addresses.
                objs.policy_unchanged = true;
            }
            if objs.policy_unchanged {
                objs.pods = std::mem::take(&mut policy_objs.pods);
                objs.namespaces = std::mem::take(&mut policy_objs.namespaces);
                objs.network_policies = std::mem::take(&mut policy_objs.network_policies);
            }
            let node = node_context(&cfg, &objs);
            // The interfaces holding the node's addresses, when not found at the start (the
            // first read brings the Node object), or on other interfaces since (an address that
            // came up later, moved to a bond, a Node object's addresses changed): those carry
            // the external programs from now on. (No address known, as while a Node object is
            // away: the interfaces stay as they are, an earlier agent's too.)
            if cfg.external_interfaces.is_none() && !node.ips.is_empty() {
                if let Some(moved) = external_of(&node.ips, &mut external_names) {
                    external = Some(moved);
                    settle(&mut att, &mut attaching, &observed).await;
                    att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, external.as_ref());
                    observed.datapath(att.live(), att.links());
                }
            }
            if last_node.as_ref() != Some(&node) {
                last_node = Some(node.clone());
                policy_dirty = true;
            }
            let want = node_config(&cfg, &node, &objs);
            rec.host_addrs = node.ips.iter().copied().chain(attach::local_addresses().into_iter().map(|(_, ip)| ip)).collect();
            if rec.host_addrs != host_addrs {
                host_addrs = rec.host_addrs.clone();
                full_next = true;
                policy_dirty = true;
            }
            if want != node_cfg {
                match maps.set_config(want) {
                    Ok(()) => node_cfg = want,
                    Err(e) => error!(error = %e, "node settings"),
                }
            }
            // Host traffic into pods leaves from any of the node's addresses (a bridge gateway
            // as often as the node IP): all of them are the node for NetworkPolicy; re-read at
            // every sync, and a change of addresses or routes triggers one.
            let (ranges, _) = objs.service_ranges(&cfg.service_cidrs);
            if ranges != service_ranges {
                let objects: Vec<String> = objs.service_cidrs.iter().map(|sc| format!("{} {}", sc.metadata.name.as_deref().unwrap_or(""), sc.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default().join(","))).collect();
                info!(service_cidrs = %ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","), flag = %cfg.service_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","), objects = %objects.join("; "), "service CIDRs (--service-cidr and the ServiceCIDR objects)");
                service_ranges = ranges;
            }
            let host_ips = attach::host_addresses(&attach::local_addresses(), &service_ranges);
            if host_ips != pol.host_ips {
                pol.host_ips = host_ips;
                policy_dirty = true;
            }
            objs.policy_unchanged &= !policy_dirty && events_alive.load(std::sync::atomic::Ordering::Relaxed);
            let out = sync_objects(&cfg, &node, &mut rec, &mut tr, full_next, &mut pol, &mut maps, &objs, errors, &observed);
            // A starting agent's links first: the sync is said to be done (kube-proxy's metric,
            // ready, the log) once every interface carries its programs.
            settle(&mut att, &mut attaching, &observed).await;
            out.report(&tr, &objs, &observed);
            full_next = !out.ok;
            policy_dirty = !out.ok;
            policy_objs.pods = std::mem::take(&mut objs.pods);
            policy_objs.namespaces = std::mem::take(&mut objs.namespaces);
            policy_objs.network_policies = std::mem::take(&mut objs.network_policies);
            if matches!(objs.changed, Changed::All) {
                // What a full read left behind (the reflectors' list buffers, a full
                // translation's temporaries, a manifests read's parse) is freed now: hand its
                // pages back rather than keep the peak resident. At most every TRIM_EVERY (a
                // manifests directory with a duplicate key makes every read a full one): a full
                // read sooner than that is trimmed when it is up.
                drop(objs);
                match last_trim.map(|t| t + TRIM_EVERY).filter(|due| *due > std::time::Instant::now()) {
                    Some(due) => trim_due = Some(tokio::time::Instant::from_std(due)),
                    None => {
                        release_freed_memory();
                        last_trim = Some(std::time::Instant::now());
                        trim_due = None;
                    }
                }
            }
            health.update(&out.health_checks).await;
            if out.ok {
                retry = Backoff::default();
                if let Source::Manifests { last, reading, .. } = &mut source {
                    *last = *reading;
                }
                take_over(&mut took_over, &att);
            } else {
                retry.fail();
            }
            in_sync = out.ok;
        }
        // (Taken after the first sync; here too for a first pass that read nothing.)
        settle(&mut att, &mut attaching, &observed).await;
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = recheck.tick() => {
                recheck_links(&mut att, &mut ebpf, &cfg, external.as_ref(), &observed);
                if in_sync {
                    take_over(&mut took_over, &att);
                }
            }
            Some(kinds) = link_rx.recv() => {
                if kinds & attach::EV_LINK != 0 {
                    att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, external.as_ref());
                    observed.datapath(att.live(), att.links());
                }
                if kinds & attach::EV_ADDR_ROUTE != 0 {
                    // Routes place this node's pods for the policy maps.
                    policy_dirty = true;
                }
                if kinds & attach::EV_ADDR_ROUTE != 0 && !retry.waiting() {
                    // The node's addresses or its routes to pods changed: sync again (writing
                    // only what differs), no sooner than --min-sync-period after the last sync.
                    tokio::time::sleep_until(hold_off(last_sync)).await;
                    let mut more = 0;
                    while let Ok(k) = link_rx.try_recv() {
                        more |= k;
                    }
                    if more & attach::EV_LINK != 0 {
                        att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, external.as_ref());
                        observed.datapath(att.live(), att.links());
                    }
                    pending = read_logged(&mut source);
                }
            }
            _ = retry.wait() => {
                pending = read_logged(&mut source);
                if pending.is_none() {
                    // Nothing read (the source unreadable, or manifests held empty): the retry
                    // comes again after the same delay, not at once and forever.
                    retry.again();
                }
            }
            _ = tokio::time::sleep_until(trim_due.unwrap_or_else(tokio::time::Instant::now)), if trim_due.is_some() => {
                trim_due = None;
                release_freed_memory();
                last_trim = Some(std::time::Instant::now());
            }
            _ = changed(&source) => {
                if matches!(source, Source::Kube(_)) || manifests_changed(&source, &retry) {
                    observed.change_pending();
                    tokio::time::sleep_until(hold_off(last_sync)).await;
                    pending = read_logged(&mut source);
                }
            }
            _ = tick.tick() => {
                if manifests_changed(&source, &retry) {
                    observed.change_pending();
                    tokio::time::sleep_until(hold_off(last_sync)).await;
                    pending = read_logged(&mut source);
                }
            }
        }
    }
    stopping(&att);
    Ok(())
}

/// How often at most `release_freed_memory` runs after full reads.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Returns the allocator's free pages to the kernel (glibc keeps a heap's high-water mark
/// resident otherwise: a full read's temporaries would stay in the agent's RSS for good).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no arguments beyond the pad to keep; thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's settings, before any other thread starts; each one set in the environment
/// (its variable, or its tunable in `GLIBC_TUNABLES`) wins.
///
/// - Allocations of 128 KiB and more (a store's or a translation's tables, a full read's
///   vectors) are mapped on their own and unmapped when freed. glibc's default raises that
///   threshold to the largest block freed so far (up to 32 MiB), after which such tables come
///   from the heap and leave holes there when they grow or go: 66 → 60 MiB RSS at 10,000
///   Services, 522 → 464 MiB at 100,000 (`cargo xtask bench --scale-only`).
/// - At most two heaps (arenas) instead of glibc's eight a core: the agent allocates mostly on
///   one thread (the sync), and each further heap a watch or loader thread takes keeps free
///   space of its own: 336 → 328 MiB at 100,000 Services from `--manifests` after the start,
///   346 → 338 MiB after a restart.
fn allocator_settings() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let settings = [
            ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", libc::M_MMAP_THRESHOLD, 128 * 1024, "a 128 KiB mmap threshold: large freed tables may stay resident"),
            ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max", libc::M_ARENA_MAX, 2, "at most two arenas"),
        ];
        for (var, tunable, param, value, what) in settings {
            if std::env::var_os(var).is_some() || tunables.contains(tunable) {
                info!(setting = var, "the allocator's setting is the environment's");
            // SAFETY: sets one allocator parameter; called before the agent's other threads start.
            } else if unsafe { libc::mallopt(param, value) } == 0 {
                warn!("the allocator refused {what}");
            }
        }
    }
}

/// The links a starting agent creates on a thread (see `Attachments::start_interfaces`).
type Attaching = Option<tokio::task::JoinHandle<attach::Created>>;

/// Takes the links created on a thread at the start, if that has not been done yet.
async fn settle(att: &mut Attachments, attaching: &mut Attaching, observed: &Observed) {
    if let Some(h) = attaching.take() {
        took_links(att, h.await, observed);
    }
}

/// The thread's links once it is done (pending for ever when there is none): a branch of the
/// wait for the API server's lists, so they are taken as soon as they are made.
async fn links_made(attaching: &mut Attaching) -> Result<attach::Created, tokio::task::JoinError> {
    match attaching {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

fn took_links(att: &mut Attachments, made: Result<attach::Created, tokio::task::JoinError>, observed: &Observed) {
    match made {
        Ok(created) => att.finish(created),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // (Only when the runtime shuts down, that is when the agent stops.)
        Err(e) => error!(error = %e, "creating the new links: the thread did not finish; they are attached again on the next link event or recheck"),
    }
    // Links that failed are retried as always and show in /livez. (Ready comes with the first
    // sync's report, which waits for this.)
    observed.datapath(att.live(), att.links());
}

/// The take-over from kube-proxy: done (or not asked for), and whether it was said to wait.
#[derive(Default)]
struct TakeOver {
    done: bool,
    waiting: bool,
}

/// The take-over: kube-proxy's rules go once, only when Ferry's datapath holds every Service
/// (after a sync that wrote everything) and every tc and socket link it wants is attached (not
/// on a kernel without TCX, or while an interface cannot be attached: retried at every sync and
/// every 10 s recheck, and said once).
fn take_over(t: &mut TakeOver, att: &Attachments) {
    if t.done {
        return;
    }
    if !att.serving() {
        if !t.waiting {
            warn!("kube-proxy's rules stay until every link is attached (see the \"cannot attach\" warnings; retried at every sync and every 10 s)");
            t.waiting = true;
        }
        return;
    }
    t.done = true;
    match crate::cleanup::cleanup_kube_proxy(false) {
        Ok(report) => info!(report = %report.trim_end().replace('\n', "; "), "took over from kube-proxy: its rules are removed"),
        Err(e) => error!(error = %e, "removing kube-proxy's rules (Ferry serves; kube-proxy's rules still match first)"),
    }
}

/// Links are checked again now and then, not only on link events: a pin removed by hand is
/// pinned again, a hook that failed to attach is retried, and /livez says what is attached.
fn recheck_links(att: &mut Attachments, ebpf: &mut aya::Ebpf, cfg: &RunConfig, external: Option<&IfacePatterns>, observed: &Observed) {
    att.sync_interfaces(ebpf, &cfg.pod_interfaces, external);
    if let Err(e) = att.sync_cgroup(ebpf, cfg.cgroup.as_deref()) {
        warn!(error = %e, "socket hooks");
    }
    observed.datapath(att.live(), att.links());
}

/// The external interfaces found last ([`external_of`]).
#[derive(Default)]
struct ExternalNames {
    names: Option<Vec<String>>,
    /// No interface held the node's addresses at the last look (said once).
    vacant: bool,
}

/// The external interfaces when none are given: those holding the node's addresses; `None`
/// when they are the ones found the last time. Once some were found, none holding them (an
/// address flushed and added again by a network manager's reapply or a DHCP client, or the
/// addresses unreadable) keeps them: their links, and the connections through them, stay until
/// the addresses are on another interface.
fn external_of(ips: &[Ipv4Addr], had: &mut ExternalNames) -> Option<IfacePatterns> {
    let names = attach::interfaces_with(ips);
    if had.names.as_ref() == Some(&names) {
        had.vacant = false;
        return None;
    }
    if names.is_empty() && had.names.as_ref().is_some_and(|n| !n.is_empty()) {
        if !std::mem::replace(&mut had.vacant, true) {
            warn!(interfaces = %had.names.as_deref().unwrap_or_default().join(","), "no interface holds the node's addresses now: the external interfaces stay as they were");
        }
        return None;
    }
    info!(interfaces = %if names.is_empty() { "none".to_string() } else { names.join(",") }, "external interfaces (holding the node's addresses)");
    let patterns = IfacePatterns::parse(&names.join(","));
    *had = ExternalNames { names: Some(names), vacant: false };
    Some(patterns)
}

/// The conntrack garbage collector, on its own thread with its own handles on the pinned maps:
/// runs at its adaptive interval for as long as the process lives.
fn spawn_conntrack_gc(pin_dir: PathBuf, observed: Arc<Observed>) -> anyhow::Result<()> {
    use crate::bpf::conntrack::{collect, count_agent_deletes, monotonic_ns, Conntrack, Interval, PolicyConntrack};
    use dataplane_common::{names, stat};
    let mut ct = Conntrack::from_pins(&pin_dir)?;
    let mut pol_ct = PolicyConntrack::from_pins(&pin_dir)?;
    let mut sources = crate::bpf::conntrack::SourceCounts::from_pins(&pin_dir)?;
    let stats_pin = pin_dir.join(names::STATS);
    let mut stats = aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(aya::maps::MapData::from_pin(&stats_pin)?))?;
    std::thread::Builder::new().name("conntrack-gc".into()).spawn(move || {
        let mut interval = Interval::default();
        let total = |stats: &aya::maps::PerCpuArray<aya::maps::MapData, u64>, i: u32| -> u64 { stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        loop {
            std::thread::sleep(interval.now);
            let run = collect(&mut ct, monotonic_ns());
            count_agent_deletes(&mut stats, stat::CT_AGENT_DELETED, run.deleted_lru);
            let pol_run = pol_ct.collect(monotonic_ns());
            count_agent_deletes(&mut stats, stat::POL_CT_AGENT_DELETED, pol_run.deleted_lru);
            let pol_evicted = total(&stats, stat::POL_CT_CREATED)
                .saturating_sub(total(&stats, stat::POL_CT_DELETED))
                .saturating_sub(total(&stats, stat::POL_CT_AGENT_DELETED))
                .saturating_sub(pol_run.live_lru);
            observed.policy_gc_done(&pol_run, pol_ct.caps, pol_evicted);
            observed.sources_counted(sources.recount(&run.sources, &pol_run.sources));
            // What the LRU map lost without anyone deleting it: evictions.
            let evicted = total(&stats, stat::CT_CREATED)
                .saturating_sub(total(&stats, stat::CT_DELETED))
                .saturating_sub(total(&stats, stat::CT_AGENT_DELETED))
                .saturating_sub(run.live_lru);
            let caps = ct.capacities();
            let next = interval.after(&run, caps);
            if run.deleted_lru + run.deleted_assured > 0 {
                tracing::debug!(
                    deleted_new = run.deleted_lru,
                    deleted_assured = run.deleted_assured,
                    live_new = run.live_lru,
                    live_assured = run.live_assured,
                    took = ?run.took,
                    next = ?next,
                    "conntrack garbage collection"
                );
            }
            observed.gc_done(&run, caps, evicted, next);
        }
    })?;
    Ok(())
}

async fn serve(addr: SocketAddr, observed: &Arc<Observed>, health: bool, metrics: bool) -> anyhow::Result<()> {
    crate::observe::spawn_server(addr, observed.clone(), health, metrics)
        .await
        .with_context(|| format!("listening on {addr} (--healthz-bind-address / --metrics-bind-address)"))?;
    info!(%addr, health, metrics, "serving /healthz /livez /readyz /metrics");
    Ok(())
}

fn read_logged(source: &mut Source) -> Option<(Objects, Vec<ObjectError>)> {
    match source.read() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "source unreadable; keeping the datapath as it is");
            None
        }
    }
}

/// Resolves when the API-server source reports a change, or inotify a change of a manifest
/// file (never without a watch: the manifests are polled then).
async fn changed(source: &Source) {
    match source {
        Source::Kube(k) => k.changed.notified().await,
        Source::Manifests { watch: Some(w), .. } => w.changed.notified().await,
        Source::Manifests { watch: None, .. } => std::future::pending().await,
    }
}

/// The manifests differ from those the maps match, or are held empty (see [`Source::read`]), and
/// no failed sync is waiting for its retry.
fn manifests_changed(source: &Source, retry: &Backoff) -> bool {
    let Source::Manifests { path, last, unreadable, emptied, .. } = source else { return false };
    match manifests::fingerprint(path) {
        Ok(fp) => {
            if unreadable.replace(false) {
                info!(path = %path.display(), "manifests readable again");
            }
            // (Held empty: read again until the files come back or the grace is over, even
            // if they come back exactly as the maps hold them.)
            (Some(fp) != *last || emptied.is_some()) && !retry.waiting()
        }
        Err(e) => {
            // Once, not at every poll: the maps keep what they hold meanwhile.
            if !unreadable.replace(true) {
                warn!(path = %path.display(), error = %e, "manifests unreadable: the maps keep what they hold until the path can be read again");
            }
            false
        }
    }
}

/// Retries of a sync whose map writes failed: 1 s, doubling up to 30 s, so a full map neither
/// spins nor floods the log.
#[derive(Default)]
struct Backoff {
    at: Option<(tokio::time::Instant, Duration)>,
}

impl Backoff {
    fn fail(&mut self) {
        let next = self.at.map(|(_, d)| (d * 2).min(Duration::from_secs(30))).unwrap_or(Duration::from_secs(1));
        warn!(retry_in = ?next, "sync incomplete; retrying");
        self.at = Some((tokio::time::Instant::now() + next, next));
    }
    /// The retry that came found nothing to sync: the next one after the same delay.
    fn again(&mut self) {
        if let Some((_, d)) = self.at {
            self.at = Some((tokio::time::Instant::now() + d, d));
        }
    }
    fn waiting(&self) -> bool {
        self.at.is_some()
    }
    async fn wait(&self) {
        match self.at {
            Some((t, _)) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

/// NetworkPolicy state between syncs: what the maps hold and the ids in use.
#[derive(Default)]
pub struct PolicyState {
    pub applied: crate::netpol::DesiredPolicy,
    pub ids: crate::netpol::Ids,
    /// The node's addresses besides `NodeContext::ips` (its interfaces' own).
    pub host_ips: Vec<std::net::Ipv4Addr>,
    /// Untranslated policy parts already logged.
    pub reported: BTreeSet<String>,
}

impl PolicyState {
    /// Reads the policy maps back (a restart rewrites nothing that did not change).
    pub fn restore(maps: &BpfMaps) -> Self {
        let (applied, ids) = maps.dump_policy();
        PolicyState { applied, ids, host_ips: Vec::new(), reported: BTreeSet::new() }
    }

    /// Compiles the policies of `objs` and writes the differences.
    pub fn sync(&mut self, maps: &mut BpfMaps, objs: &Objects, node: &model::NodeContext) -> (usize, usize, Vec<ObjectError>, Vec<String>) {
        let mut host: Vec<std::net::Ipv4Addr> = node.ips.clone();
        host.extend(self.host_ips.iter().filter(|ip| !node.ips.contains(ip)));
        let (mut desired, errors) = crate::netpol::translate(objs, &node.name, &host, &mut self.ids);
        let routes = crate::routes::Routes::read().unwrap_or_else(|e| {
            warn!(error = %e, "reading the node's routes: this node's pods are checked by reverse path only");
            Default::default()
        });
        desired.resolve_local(|ip| routes.oif(ip));
        let (w, d, map_errors) = maps.sync_policy(&mut self.applied, &desired);
        (w, d, errors, map_errors)
    }
}

/// The endpoints of this node (not its own addresses: hostNetwork endpoints) whose route leaves
/// over an interface that is neither a pod interface nor an external one (`external`, or by
/// default those holding the node's addresses), with that interface's name: their replies enter
/// the node where no Ferry program sees them. Reads the routes only when there are endpoints to
/// check (the agent passes those new since the last sync).
fn unhooked_endpoints(local: &BTreeSet<Ipv4Addr>, node_ips: &[Ipv4Addr], pods: &IfacePatterns, external: Option<&IfacePatterns>) -> Vec<(Ipv4Addr, String)> {
    let candidates: Vec<Ipv4Addr> = local.iter().copied().filter(|ip| !node_ips.contains(ip)).collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let Ok(routes) = crate::routes::Routes::read() else { return Vec::new() };
    let names: BTreeMap<u32, String> = attach::interfaces().into_iter().map(|(n, i)| (i, n)).collect();
    let holding = if external.is_none() { attach::interfaces_with(node_ips) } else { Vec::new() };
    let hooked = |name: &str| pods.matches(name) || external.map_or(holding.iter().any(|h| h == name), |e| e.matches(name));
    candidates
        .into_iter()
        .filter_map(|ip| {
            let name = names.get(&routes.oif(ip)?)?;
            (!hooked(name)).then(|| (ip, name.clone()))
        })
        .collect()
}

/// (Service address and port, backend address and port) of every UDP ClusterIP frontend (of
/// `only`, when given), as applied: what the socket hooks translate host sockets with.
fn udp_backends(rec: &Reconciler, only: Option<&BTreeSet<model::Frontend>>) -> BTreeSet<((Ipv4Addr, u16), (Ipv4Addr, u16))> {
    let frontends: Box<dyn Iterator<Item = (&model::Frontend, &crate::reconcile::AppliedFrontend)>> = match only {
        Some(set) => Box::new(set.iter().filter_map(|fe| rec.applied.frontends.get_key_value(fe))),
        None => Box::new(rec.applied.frontends.iter()),
    };
    frontends
        .filter(|(fe, _)| fe.scope == model::Scope::Internal && fe.addr.proto == model::Proto::Udp)
        .flat_map(|(fe, af)| af.slots.iter().map(move |b| ((fe.addr.addr, fe.addr.port), (b.addr, b.port))))
        .collect()
}

/// The result of one sync.
pub struct SyncOutcome {
    /// The maps match the objects (no map write failed).
    pub ok: bool,
    pub health_checks: BTreeMap<u16, model::HealthCheck>,
    pub stats: crate::reconcile::SyncStats,
    /// What [`SyncOutcome::report`] says.
    report: SyncReport,
}

/// A sync's figures for its log line and metrics.
struct SyncReport {
    took: Duration,
    no_local_endpoints: (usize, usize),
    frontends: usize,
    translated: usize,
    changed_frontends: usize,
    policies: usize,
    isolated_pods: usize,
    compiled: bool,
    object_errors: usize,
    node_eligible: bool,
}

/// Translates and reconciles once: only the Services `objs` says changed, and only their
/// frontends are written, unless `full` (or everything changed): then every frontend is compared
/// with the maps. Object errors are logged and skipped; everything else syncs.
#[allow(clippy::too_many_arguments)]
pub fn sync_objects(
    cfg: &RunConfig,
    node: &model::NodeContext,
    rec: &mut Reconciler,
    tr: &mut Translator,
    full: bool,
    pol: &mut PolicyState,
    maps: &mut BpfMaps,
    objs: &Objects,
    mut errors: Vec<ObjectError>,
    observed: &Observed,
) -> SyncOutcome {
    let started = Instant::now();
    let changes = match &objs.changed {
        Changed::All => None,
        Changed::Only(ch) => Some(ch.clone()),
    };
    let (delta, terr, translated) = match changes {
        // (Changes alone cannot be translated anew: they are applied whatever the translation.)
        Some(ch) if tr.is_built() || matches!(objs.changed, Changed::Only(_)) => {
            let (delta, work) = tr.apply(ch, node);
            (Some(delta).filter(|_| !work.full && !full), tr.errors(), work.translated)
        }
        _ => {
            let before = tr.translated;
            let e = tr.rebuild(&objs.services, &objs.endpoint_slices, node);
            (None, e, tr.translated - before)
        }
    };
    let desired = &tr.desired;
    for (ip, iface) in unhooked_endpoints(&observed.endpoints_to_check(&desired.local_endpoints), &node.ips, &cfg.pod_interfaces, cfg.external_interfaces.as_ref()) {
        if observed.unhooked_endpoint(ip, &iface) {
            warn!(
                endpoint = %ip,
                interface = %iface,
                "an endpoint of this node is routed over an interface that --pod-interfaces does not match: pods and this node reach it through its Services, but connections from outside the node (NodePort, LoadBalancer, external IPs) get no answer, as no Ferry program sees its replies enter the node; add the interface to --pod-interfaces"
            );
        }
    }
    if observed.ipv6_skipped(desired.ipv6_skipped) {
        info!(count = desired.ipv6_skipped, "IPv6 addresses and EndpointSlices of dual-stack Services are left to the IPv6 datapath, which this version does not have (counted in ferry_ipv6_objects_skipped)");
    }
    errors.extend(terr);
    let only = delta.as_ref().map(|d| &d.frontends);
    let udp_before = if cfg.cgroup.is_some() { udp_backends(rec, only) } else { BTreeSet::new() };
    let (ranges, rerr) = objs.service_ranges(&cfg.service_cidrs);
    errors.extend(rerr);
    let (mut st, mut map_errors) = match &delta {
        Some(delta) => rec.sync_changed(desired, delta, &ranges, maps),
        None => rec.sync(desired, &ranges, maps),
    };
    if cfg.cgroup.is_some() {
        // Host processes' connected UDP sockets to a backend that left its Service move too.
        let after = udp_backends(rec, only);
        let gone: BTreeSet<_> = udp_before.into_iter().filter(|pair| !after.contains(pair)).collect();
        let (n, errs) = crate::sockets::destroy_translated(&gone, |cookie, be| maps.translated_from(cookie, be));
        st.sockets_destroyed = n;
        map_errors.extend(errs);
    }
    // Compiled only when a Pod, Namespace or NetworkPolicy changed, or the node did (its
    // addresses, its routes), or a write failed: a Service or endpoint change leaves it idle.
    let compile = !objs.policy_unchanged || full;
    if compile {
        let (pw, pd, perr, pmap) = pol.sync(maps, objs, node);
        st.writes += pw;
        st.deletes += pd;
        // Each untranslated part is said once (again only if it goes away and comes back).
        let parts: BTreeSet<String> = perr.iter().filter(|e| e.kind == "NetworkPolicy").map(|e| e.to_string()).collect();
        for e in perr.iter().filter(|e| e.kind == "NetworkPolicy" && !pol.reported.contains(&e.to_string())) {
            if e.ipv6_only {
                info!(object = %e.name, field = %e.field, detail = %e.message, "IPv6 part of a NetworkPolicy: the IPv4 datapath leaves it out (it allows nothing; the policy still isolates its pods)");
            } else {
                warn!(object = %e.name, field = %e.field, error = %e.message, "part of a NetworkPolicy left untranslated: it fails closed (allows nothing), the policy still isolates its pods");
            }
        }
        pol.reported = parts;
        observed.policy_untranslated(&perr.iter().filter(|e| e.kind == "NetworkPolicy").cloned().collect::<Vec<_>>());
        errors.extend(perr.into_iter().filter(|e| e.kind != "NetworkPolicy"));
        map_errors.extend(pmap);
    }
    for e in &errors {
        warn!(kind = %e.kind, object = %e.name, field = %e.field, error = %e.message, "skipped an invalid object; everything else syncs");
    }
    for e in &map_errors {
        error!(error = %e, "sync");
    }
    let took = started.elapsed();
    // Table regions retired a second ago or more are freed after one synchronize point (an RCU
    // grace period, about 10 ms here): at most once a second, after the maps are programmed.
    if let Err(e) = maps.reclaim_tables(Duration::from_secs(1)) {
        warn!(error = %e, "freeing retired hashing table regions (they stay reserved; retried after the next sync)");
    }
    // The tables' pages are the map's: mapped only while a sync writes them.
    maps.unmap_tables();
    SyncOutcome {
        ok: map_errors.is_empty(),
        health_checks: desired.health_checks.clone(),
        stats: st,
        report: SyncReport {
            took,
            no_local_endpoints: desired.no_local_endpoints,
            frontends: desired.frontends.len(),
            translated,
            changed_frontends: delta.as_ref().map_or(desired.frontends.len(), |d| d.frontends.len()),
            policies: pol.applied.policies.len(),
            isolated_pods: pol.applied.endpoints.len(),
            compiled: compile,
            object_errors: errors.len(),
            node_eligible: node_eligible(objs, &node.name),
        },
    }
}

impl SyncOutcome {
    /// Says the sync is done: the network programming latencies, the sync's metrics (its time,
    /// `last_timestamp`, ready) and the `synced` log line. Apart from the writes so that a
    /// starting agent says it only once the links it creates meanwhile are in place: a client
    /// that waits for the first sync (kube-proxy's metric) then finds every interface attached.
    pub fn report(&self, tr: &Translator, objs: &Objects, observed: &Observed) {
        let r = &self.report;
        observed.no_local_endpoints(r.no_local_endpoints);
        if self.ok {
            match &objs.changed {
                Changed::Only(ch) => observed.programmed_changed(ch.slices.iter().map(|(k, s)| (k, s.as_deref()))),
                _ => observed.programmed(objs.endpoint_slices.iter().map(|s| &**s)),
            }
        }
        let (services, slices) = tr.counts();
        observed.synced(
            r.took,
            self.ok,
            &self.stats,
            [
                ("Service", services),
                ("EndpointSlice", slices),
                ("Node", objs.nodes.len()),
                ("Pod", objs.pods.len()),
                ("Namespace", objs.namespaces.len()),
                ("NetworkPolicy", objs.network_policies.len()),
            ],
            r.object_errors,
            r.node_eligible,
        );
        info!(
            services,
            slices,
            frontends = r.frontends,
            translated = r.translated,
            changed_frontends = r.changed_frontends,
            policies = r.policies,
            isolated_pods = r.isolated_pods,
            policies_compiled = r.compiled,
            took = ?r.took,
            writes = self.stats.writes,
            deletes = self.stats.deletes,
            backends_left = self.stats.backends_left,
            sockets_destroyed = self.stats.sockets_destroyed,
            "synced"
        );
    }
}
