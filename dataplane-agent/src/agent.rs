//! The daemon: restore the maps, attach, then keep the datapath equal to the manifests until
//! told to stop. Detaches on SIGINT/SIGTERM; the pinned maps (services, conntrack) stay, so the
//! next start re-adopts them and established connections keep their backends.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use dataplane_common::NodeConfig;
use log::{error, info, warn};

use crate::{
    attach::{self, Attachments, IfacePatterns, LinkEvents},
    bpf::BpfMaps,
    loader,
    model,
    reconcile::{Cidr4, Reconciler},
    sources::manifests,
};

pub struct RunConfig {
    /// The node's name, addresses and NodePort addresses.
    pub node: model::NodeContext,
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub pod_interfaces: IfacePatterns,
    /// Interfaces towards the outside (NodePort, LoadBalancer, external IPs); `None`: the
    /// interfaces holding the node's addresses.
    pub external_interfaces: Option<IfacePatterns>,
    /// Source ports for NodePort traffic sent to other nodes (inclusive).
    pub snat_ports: (u16, u16),
    /// How new connections pick a backend.
    pub algorithm: crate::reconcile::Algorithm,
    /// `--nodeport-acceleration=xdp`: NodePort handling in XDP on the external interfaces.
    pub xdp: bool,
    /// cgroup (v2) for the socket hooks; `None` leaves host processes alone.
    pub cgroup: Option<PathBuf>,
    pub service_cidrs: BTreeSet<Cidr4>,
    pub poll: Duration,
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let mut ebpf = loader::load(Some(&cfg.pin_dir)).context("loading the datapath")?;
    attach::load_programs(&mut ebpf).context("loading programs")?;
    let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
    let applied = maps.dump_applied();
    info!(
        "node {}: maps under {} ({} frontends, {} backends restored from a previous run)",
        cfg.node.name,
        cfg.pin_dir.display(),
        applied.frontends.len(),
        applied.backends.len()
    );
    let mut rec = Reconciler::restore(applied);
    rec.algorithm = cfg.algorithm;
    let snat_addr = cfg.node.ips.first().map(|ip| u32::from_ne_bytes(ip.octets())).unwrap_or(0);
    if snat_addr == 0 {
        warn!("no --node-ip: NodePort traffic from outside to a backend on another node will be dropped (no_node_address)");
    }
    maps.set_config(NodeConfig { snat_addr_be: snat_addr, snat_port_min: cfg.snat_ports.0, snat_port_max: cfg.snat_ports.1 })?;
    let external = match &cfg.external_interfaces {
        Some(p) => p.clone(),
        None => {
            let names = attach::interfaces_with(&cfg.node.ips);
            info!("external interfaces (holding the node's addresses): {}", if names.is_empty() { "none".to_string() } else { names.join(", ") });
            IfacePatterns::parse(&names.join(","))
        }
    };

    if let Some(cg) = &cfg.cgroup {
        attach::attach_cgroup(&mut ebpf, cg).with_context(|| format!("attaching socket hooks to cgroup {}", cg.display()))?;
        info!("socket hooks attached to cgroup {}", cg.display());
    }
    for (flag, patterns) in [("--pod-interfaces", &cfg.pod_interfaces), ("--external-interfaces", &external)] {
        for name in patterns.missing_names() {
            warn!("{flag}: no interface named {name:?} in this network namespace; attaching when it appears");
        }
    }
    let mut att = Attachments::default();
    att.xdp = cfg.xdp;
    att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, &external);

    // Link events come from a blocking netlink socket on its own thread.
    let (link_tx, mut link_rx) = tokio::sync::mpsc::channel::<()>(1);
    let events = LinkEvents::open().context("subscribing to netlink link events")?;
    std::thread::Builder::new().name("link-events".into()).spawn(move || loop {
        if let Err(e) = events.wait() {
            error!("netlink link events: {e}");
            return;
        }
        if link_tx.blocking_send(()).is_err() {
            return;
        }
    })?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(cfg.poll);
    let mut health = crate::health::HealthServers::default();
    let mut last_seen: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            Some(()) = link_rx.recv() => att.sync_interfaces(&mut ebpf, &cfg.pod_interfaces, &external),
            _ = tick.tick() => {
                match manifests::fingerprint(&cfg.manifests) {
                    Ok(fp) if Some(fp) == last_seen => {}
                    Ok(fp) => {
                        // A sync whose map writes failed (a full map) is retried on the next
                        // tick; one that only skipped invalid objects is not (they stay invalid
                        // until the manifests change).
                        let (ok, checks) = sync_once(&cfg, &mut rec, &mut maps);
                        if let Some(checks) = checks {
                            health.update(&checks).await;
                        }
                        last_seen = ok.then_some(fp);
                    }
                    Err(e) => warn!("manifests {}: {e}", cfg.manifests.display()),
                }
            }
        }
    }
    info!("stopping: detaching from {} interfaces; maps stay pinned under {}", att.attached().len(), cfg.pin_dir.display());
    att.detach_all(&mut ebpf);
    drop(ebpf); // closes the cgroup links
    Ok(())
}

/// Reads the manifests, translates and reconciles once. Object errors are logged and skipped.
/// Returns false when map writes failed and the sync should be retried, and the
/// healthCheckNodePorts to serve (None when the manifests could not be read).
pub fn sync_once(cfg: &RunConfig, rec: &mut Reconciler, maps: &mut BpfMaps) -> (bool, Option<std::collections::BTreeMap<u16, model::HealthCheck>>) {
    let started = std::time::Instant::now();
    let (objs, mut errors) = match manifests::read(&cfg.manifests) {
        Ok(r) => r,
        Err(e) => {
            warn!("manifests {}: {e}", cfg.manifests.display());
            return (false, None);
        }
    };
    let mut node = cfg.node.clone();
    node.zone = objs.zone_of(&node.name);
    let (desired, terr) = model::translate(&objs.services, &objs.endpoint_slices, &node);
    errors.extend(terr);
    for e in &errors {
        warn!("skipped: {e}");
    }
    let (st, map_errors) = rec.sync(&desired, &cfg.service_cidrs, maps);
    for e in &map_errors {
        error!("sync: {e}");
    }
    info!(
        "synced {} services, {} slices -> {} frontends in {:?}: {} writes, {} deletes, {} UDP/SCTP conntrack entries of removed endpoints flushed",
        objs.services.len(),
        objs.endpoint_slices.len(),
        desired.frontends.len(),
        started.elapsed(),
        st.writes,
        st.deletes,
        st.conntrack_flushed
    );
    (map_errors.is_empty(), Some(desired.health_checks))
}
