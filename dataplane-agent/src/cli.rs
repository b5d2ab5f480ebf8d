//! The command line. Every `run` setting is a flag, an environment variable (`FERRY_*`) and so a
//! ConfigMap key (the DaemonSet loads `deploy/configmap.yaml` with `envFrom`); flags whose
//! meaning is kube-proxy's carry kube-proxy's name. A flag beats the environment, which beats the
//! default.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::{
    agent::{self, LocalMode, SourceConfig},
    attach::IfacePatterns,
    loader,
    reconcile::{Algorithm, Cidr4},
};

#[derive(Parser)]
#[command(name = "dataplane-agent", version, about = "Ferry: an eBPF dataplane that replaces kube-proxy")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the node agent: keep the datapath in sync with the Services and EndpointSlices.
    Run(Box<RunArgs>),
    /// Ask what the dataplane does with a flow: scenario files (private copy of the programs),
    /// or one flow against a running node's pinned maps (read-only).
    Trace {
        /// Scenario files (see README, "Scenario files"). Prints one line per flow and
        /// `N passed, M failed`; exits non-zero when anything failed.
        #[arg(long, num_args = 1.., conflicts_with_all = ["from", "to"])]
        scenario: Vec<PathBuf>,
        /// Live mode: the flow's source address.
        #[arg(long, requires = "to")]
        from: Option<Ipv4Addr>,
        /// Live mode: destination as IP:PORT/PROTO (proto defaults to tcp).
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Live mode: the node's pin directory.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Scenario mode: run traffic from outside the node through the XDP NodePort program
        /// first (`xdp`), as `run --nodeport-acceleration xdp` does, or through tc only (`none`).
        #[arg(long, default_value = "none", value_parser = ["none", "xdp"])]
        nodeport_acceleration: String,
    },
    /// Print what a node's pinned maps hold, with Service names and counters. Read-only; works
    /// while the agent is down.
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
        /// The node's pin directory.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR, global = true)]
        pin_dir: PathBuf,
    },
    /// Stream NetworkPolicy verdicts from the node's datapath as they happen (one line per new
    /// connection into or out of a pod some policy selects): verdict, direction, protocol,
    /// source and destination pods, the peer's identity and the deciding policy.
    Monitor {
        /// The node's pin directory.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Only drops.
        #[arg(long)]
        denied: bool,
    },
    /// Remove what kube-proxy left in this network namespace: its iptables chains (KUBE-SERVICES,
    /// KUBE-SVC-*, KUBE-SEP-*, KUBE-NODEPORTS, KUBE-MARK-MASQ, ...) and the jumps to them, in
    /// iptables-legacy and iptables-nft, IPv4 and IPv6, and its nftables tables (`ip kube-proxy`,
    /// `ip6 kube-proxy`). Every other rule stays; kubelet's own chains (KUBE-FIREWALL,
    /// KUBE-KUBELET-CANARY) too.
    CleanupKubeProxy {
        /// Print what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Internal: the socket probe `trace` runs in a throwaway namespace for node flows.
    #[command(name = "__sock-probe", hide = true)]
    SockProbe { args: Vec<String> },
}

#[derive(Subcommand)]
pub enum InspectWhat {
    /// Frontends: Service port, address, scope, backend count, flags, packets and bytes.
    Services,
    /// Backend slots of every frontend, whether each backend is on this node, and its tracked
    /// connections.
    Backends,
    /// Tracked connections: client, frontend, translation, Service, age and idle time.
    Conntrack,
    /// NetworkPolicy: identities (label sets and ipBlock prefixes), isolated pods and their
    /// rules, and drops per policy.
    Policies,
    /// Connections NetworkPolicy allowed and tracks: pod, direction, peer, state, the deciding
    /// policy, whether decided under the current policies, age and expiry.
    PolicyConntrack,
    /// The datapath's attachments: every bpf link pinned under <pin-dir>/links, the interface
    /// or cgroup it is attached to, the program it runs, and whether it is still attached.
    Links,
}

#[derive(Args)]
pub struct RunArgs {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1, YAML or JSON), as
    /// kube-proxy's --config: its fields replace the flags they stand for (clusterCIDR,
    /// hostnameOverride, bindAddress, healthzBindAddress, metricsBindAddress,
    /// nodePortAddresses, detectLocalMode, detectLocal.*, clientConnection.kubeconfig,
    /// iptables/nftables masqueradeAll and minSyncPeriod, conntrack timeouts, logging.format),
    /// and those flags, given too, are ignored with a warning, as kube-proxy ignores them; only
    /// --hostname-override and --logging-format beat the file. Ferry's own flags apply beside
    /// it. Fields Ferry does not use are named in one warning, unknown fields (typos, a newer
    /// kube-proxy's) in another and left out, as kube-proxy's lenient decoding does; a wrong type
    /// or value is an error naming the field.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name, as in its Node object and in EndpointSlice `nodeName` (kube-proxy's
    /// flag). Default: the host name.
    #[arg(long, env = "FERRY_HOSTNAME_OVERRIDE", alias = "node")]
    pub hostname_override: Option<String>,
    /// Read Services, EndpointSlices and Nodes from a file or directory of manifests (followed
    /// for changes) instead of the API server.
    #[arg(long, env = "FERRY_MANIFESTS", conflicts_with_all = ["kubeconfig", "master"])]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for the API server (kube-proxy's flag). Neither this nor --master: the
    /// in-cluster service account, at KUBERNETES_SERVICE_HOST/PORT (point those at the API
    /// server itself: the `kubernetes` Service needs a working proxy).
    #[arg(long, env = "FERRY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, overriding the kubeconfig's (kube-proxy's flag).
    #[arg(long, env = "FERRY_MASTER")]
    pub master: Option<String>,
    /// Where the maps are pinned (on a bpf filesystem). Kept across restarts.
    #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Pod-facing interfaces to attach to: comma-separated name patterns with `*` and `?`.
    #[arg(long, env = "FERRY_POD_INTERFACES", default_value = "veth*,lxc*,cali*")]
    pub pod_interfaces: String,
    /// Interfaces towards the outside, where NodePort, LoadBalancer and external IP traffic
    /// arrives (and replies from other nodes return): comma-separated name patterns.
    /// Default: the interfaces holding the node's addresses.
    #[arg(long, env = "FERRY_EXTERNAL_INTERFACES")]
    pub external_interfaces: Option<String>,
    /// Source ports the datapath uses when it translates NodePort/LoadBalancer traffic to this
    /// node's address for a backend on another node, as MIN-MAX. Keep it outside
    /// net.ipv4.ip_local_port_range so it never meets the node's own connections.
    #[arg(long, env = "FERRY_SNAT_PORTS", default_value = "61000-65535")]
    pub snat_ports: String,
    /// Connections the datapath tracks (each direction of a connection is one entry). A new
    /// value takes effect at the next start: the tracked connections are copied into maps of
    /// the new size while the old ones keep serving.
    #[arg(long, env = "FERRY_CONNTRACK_CAPACITY", default_value_t = dataplane_common::capacity::CONNTRACK)]
    pub conntrack_capacity: u32,
    /// Entries of all consistent-hashing tables together (4 bytes each, allocated when the map
    /// is created): a table takes 251 entries up to 25 endpoints, 1021 up to 102,
    /// then 4093, 16381, 65521. A frontend whose table does not fit is reported by name and left
    /// as it was. A new value takes effect at the next start (the tables are copied over).
    #[arg(long, env = "FERRY_LB_TABLE_ENTRIES", default_value_t = dataplane_common::capacity::CHASH_ENTRIES)]
    pub lb_table_entries: u32,
    /// Idle timeout of an established TCP connection in conntrack (kube-proxy's flag; Go
    /// duration such as `24h0m0s`). For each of these timeouts, 0 keeps the default (kube-proxy
    /// leaves the kernel's value).
    #[arg(long, env = "FERRY_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "24h0m0s")]
    pub conntrack_tcp_timeout_established: String,
    /// Idle timeout of a TCP connection one side has closed (kube-proxy's flag).
    #[arg(long, env = "FERRY_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT", default_value = "1h0m0s")]
    pub conntrack_tcp_timeout_close_wait: String,
    /// Idle timeout of a UDP (and SCTP) flow that has had no reply, or is not yet a stream
    /// (kube-proxy's flag; netfilter's default).
    #[arg(long, env = "FERRY_CONNTRACK_UDP_TIMEOUT", default_value = "30s")]
    pub conntrack_udp_timeout: String,
    /// Idle timeout of a UDP (and SCTP) stream: replies, and still active two seconds after it
    /// began (kube-proxy's flag; netfilter's default).
    #[arg(long, env = "FERRY_CONNTRACK_UDP_TIMEOUT_STREAM", default_value = "2m0s")]
    pub conntrack_udp_timeout_stream: String,
    /// cgroup v2 directory whose processes reach Services through the socket hooks (the node's
    /// host-network processes). Default: the cgroup v2 root. `none` disables.
    #[arg(long, env = "FERRY_CGROUP")]
    pub cgroup: Option<String>,
    /// Service CIDRs (kube-apiserver's --service-cluster-ip-range): an address in them that no
    /// Service holds is dropped. Comma-separated. With the API server, the ranges of the
    /// ServiceCIDR objects (networking.k8s.io/v1) are added to them.
    #[arg(long = "service-cidr", env = "FERRY_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Vec<String>,
    /// The pods' CIDR range in the cluster (kube-proxy's flag; one per family, comma-separated,
    /// the IPv6 one ignored by the IPv4 datapath). With --detect-local-mode ClusterCIDR it tells
    /// local traffic: a ClusterIP reached by a source outside it is masqueraded to the node's
    /// address, and a pod inside it reaching an externalTrafficPolicy Local address of a
    /// Service gets every endpoint. Unset: no local detector (as kube-proxy without one).
    #[arg(long, env = "FERRY_CLUSTER_CIDR")]
    pub cluster_cidr: Option<String>,
    /// What is local traffic (kube-proxy's flag): `ClusterCIDR` (sources in --cluster-cidr),
    /// `NodeCIDR` (sources in this node's podCIDR, from its Node object), `BridgeInterface`
    /// (packets from the pods' bridge, --pod-bridge-interface) or `InterfaceNamePrefix`
    /// (packets from interfaces named --pod-interface-name-prefix*).
    #[arg(long, env = "FERRY_DETECT_LOCAL_MODE", default_value = "ClusterCIDR", value_parser = ["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"])]
    pub detect_local_mode: String,
    /// The bridge the pods hang off (kube-proxy's flag), for --detect-local-mode BridgeInterface:
    /// traffic entering through the pods' interfaces (--pod-interfaces) is local.
    #[arg(long, env = "FERRY_POD_BRIDGE_INTERFACE")]
    pub pod_bridge_interface: Option<String>,
    /// Pod interfaces' name prefix (kube-proxy's flag), for --detect-local-mode
    /// InterfaceNamePrefix: Ferry's pod interfaces become `<prefix>*`, and traffic entering
    /// through them is local.
    #[arg(long, env = "FERRY_POD_INTERFACE_NAME_PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// Masquerade every connection to a ClusterIP to the node's address (kube-proxy's flag).
    #[arg(long, env = "FERRY_MASQUERADE_ALL", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: bool,
    /// This node's addresses, on which NodePorts answer. Comma-separated; IPv6 ones are left to
    /// the IPv6 datapath (not in this version). Default: the InternalIP and ExternalIP addresses
    /// of its Node object.
    #[arg(long = "node-ip", env = "FERRY_NODE_IPS", value_delimiter = ',')]
    pub node_ips: Vec<String>,
    /// Where NodePorts answer (kube-proxy's flag): node addresses inside these CIDRs, and the
    /// keywords `primary` (the node's primary address: the first --node-ip, else its Node
    /// object's first InternalIP) and `all` (every node address). Comma-separated. Default:
    /// `primary`, as kube-proxy's nftables mode.
    #[arg(long = "nodeport-addresses", env = "FERRY_NODEPORT_ADDRESSES", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// How new connections pick a backend: `maglev` (consistent hashing: the same flow picks the
    /// same backend on every node and after a restart; every backend gets within 10% of its
    /// share up to 1000 endpoints; removing one moves its flows and at most about 4% of the
    /// others), `rendezvous` (consistent hashing where removing a backend moves only its flows,
    /// but shares are uneven: the busiest backend gets about twice its share from 100
    /// endpoints on) or `random` (kube-proxy's way).
    #[arg(long, env = "FERRY_LB_ALGORITHM", default_value = "maglev", value_parser = ["maglev", "rendezvous", "random"])]
    pub lb_algorithm: String,
    /// Where NodePort, LoadBalancer and external IP traffic from outside is handled: `none` (tc
    /// on the external interfaces) or `xdp` (an XDP program at the driver level in front of it;
    /// what XDP cannot finish goes on to tc).
    #[arg(long, env = "FERRY_NODEPORT_ACCELERATION", default_value = "none", value_parser = ["none", "xdp"])]
    pub nodeport_acceleration: String,
    /// Anti-spoofing on pod interfaces: `strict` drops a pod's packet (and ARP) whose source is
    /// not the pod's own address (the address its interface is routed to: a routed CNI such as
    /// Calico's or Cilium's); `off` for a bridge CNI, where no route leads to a pod's own
    /// interface (pods may then send with any source address).
    #[arg(long, env = "FERRY_POD_SOURCE_CHECK", default_value = "strict", value_parser = ["strict", "off"])]
    pub pod_source_check: String,
    /// Most established connections one source address may hold in each conntrack (Service,
    /// policy) beyond the reach of eviction; more stay evictable (LRU), so one pod or client
    /// flooding connections cannot crowd out everyone else's. 0: no limit. Default: an eighth
    /// of --conntrack-capacity.
    #[arg(long, env = "FERRY_CONNTRACK_MAX_PER_SOURCE")]
    pub conntrack_max_per_source: Option<u32>,
    /// Refusals (TCP RST, ICMP port unreachable, ICMP fragmentation needed) the node sends per
    /// second, as the kernel's net.ipv4.icmp_msgs_per_sec; more are dropped and counted
    /// (refusal_limited), so the node cannot be used to reflect a flood.
    #[arg(long, env = "FERRY_REFUSALS_PER_SECOND", default_value_t = dataplane_common::REFUSALS_PER_S_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub refusals_per_second: u32,
    /// Refusals sent at once before --refusals-per-second applies (net.ipv4.icmp_msgs_burst).
    #[arg(long, env = "FERRY_REFUSAL_BURST", default_value_t = dataplane_common::REFUSAL_BURST_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub refusal_burst: u32,
    /// Packets from outside the node that claim the address of a pod of another node: `loose`
    /// accepts them from any interface (Calico's default), `strict` only from the interface the
    /// route back to that pod leaves by (a host elsewhere cannot claim it; nodes with several
    /// equal-cost routes to each other need `loose`: the check follows one next hop).
    #[arg(long, env = "FERRY_EXTERNAL_SOURCE_CHECK", default_value = "loose", value_parser = ["loose", "strict"])]
    pub external_source_check: String,
    /// IP:PORT for /healthz, /livez and /readyz (kube-proxy's flag and port); empty disables.
    #[arg(long, env = "FERRY_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// IP:PORT for Prometheus /metrics (kube-proxy's flag and port); empty disables.
    #[arg(long, env = "FERRY_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// /healthz fails when a change has waited longer than this to be applied (a full map, a
    /// stuck sync), in seconds.
    #[arg(long, env = "FERRY_HEALTHZ_TIMEOUT_SECONDS", default_value_t = 60)]
    pub healthz_timeout_seconds: u64,
    /// At most one sync per this many milliseconds (kube-proxy's --iptables-min-sync-period, in
    /// milliseconds): a change after a quiet spell is synced at once, the changes of a burst
    /// together this long after the last sync. Manifests are also polled this often (besides
    /// their inotify watch).
    #[arg(long, env = "FERRY_MIN_SYNC_PERIOD_MS", default_value_t = 100, alias = "poll-ms")]
    pub min_sync_period_ms: u64,
    /// Log format (kube-proxy's flag): `text` (key=value fields) or `json` (one object per line).
    #[arg(long, env = "FERRY_LOGGING_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub logging_format: String,
    /// Check every setting (flags, environment, ConfigMap), print the resolved configuration and
    /// exit without touching the node.
    #[arg(long)]
    pub print_config: bool,
    /// NetworkPolicy enforcement (`--enable-network-policy=false` for a cluster whose CNI
    /// already enforces it: no Pod, Namespace or NetworkPolicy is read, no pod isolated).
    #[arg(long, env = "FERRY_ENABLE_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub enable_network_policy: bool,
    /// The take-over from kube-proxy: once Ferry's datapath is attached and its first sync
    /// succeeded, remove kube-proxy's iptables chains and nftables tables (as
    /// `dataplane-agent cleanup-kube-proxy` does). Stop kube-proxy first: it would put them back.
    #[arg(long, env = "FERRY_CLEANUP_KUBE_PROXY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub cleanup_kube_proxy: bool,
    /// Remove Ferry from this node and exit (kube-proxy's flag name): detach every program
    /// (the links pinned under <pin-dir>/links) and remove every pinned map. The only thing that
    /// takes Ferry's datapath away; stopping or killing the agent never does. Connections
    /// translated by Ferry break: run it after kube-proxy is back (see deploy/README.md).
    #[arg(long)]
    pub cleanup: bool,
}

/// `--nodeport-addresses` (and `config.nodePortAddresses` in scenarios): its IPv4 CIDRs and
/// whether `primary` is among them. Unset (`default_primary`): `primary`, as kube-proxy's
/// nftables mode. `all`: every node address. `localhost`: not served (Ferry, like nftables mode
/// without the alpha localhost proxy, answers NodePorts on node addresses only), said once.
pub fn parse_nodeport_addresses(flag: &str, v: &[String], default_primary: bool) -> anyhow::Result<(Vec<Cidr4>, bool)> {
    let words: Vec<&str> = v.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()).collect();
    if words.is_empty() {
        return Ok((Vec::new(), default_primary));
    }
    let primary = words.contains(&"primary");
    if words.contains(&"localhost") {
        tracing::info!("{flag}: localhost: NodePorts are not served on loopback (as kube-proxy's nftables mode without its alpha localhost proxy)");
    }
    let cidrs: Vec<String> = words.iter().filter(|w| !matches!(**w, "primary" | "all" | "localhost")).map(|w| w.to_string()).collect();
    if words.contains(&"all") && (primary || !cidrs.is_empty()) {
        anyhow::bail!("{flag}: `all` takes no other entries (every node address answers)");
    }
    Ok((parse_cidrs(flag, &cidrs)?, primary))
}

fn nodeport_addresses(flag: &str, v: &[String]) -> anyhow::Result<(Vec<Cidr4>, bool)> {
    parse_nodeport_addresses(flag, v, true)
}

/// The IPv4 CIDRs of a flag's list. IPv6 entries (a dual-stack configuration) are left aside,
/// with one note naming the flag, never a reason to refuse it.
pub(crate) fn parse_cidrs(flag: &str, v: &[String]) -> anyhow::Result<Vec<Cidr4>> {
    let mut out = Vec::new();
    let mut v6 = Vec::new();
    for s in v.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        match crate::addr::parse_cidr(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))? {
            crate::addr::Family::V4(c) => out.push(c),
            crate::addr::Family::V6 => v6.push(s),
        }
    }
    if !v6.is_empty() {
        tracing::info!("{}", format!("{flag}: IPv6 entries {} apply to the IPv6 datapath, which this version does not have; the IPv4 datapath ignores them", v6.join(",")));
    }
    Ok(out)
}

pub(crate) fn parse_bind(flag: &str, v: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim().parse().map(Some).map_err(|e| anyhow::anyhow!("{flag}: {v:?} is not IP:PORT: {e}"))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&c| c == 0).unwrap_or(0);
    if ok { String::from_utf8_lossy(&buf[..end]).to_lowercase() } else { String::new() }
}

/// A Go duration as kube-proxy's flags take it (`24h0m0s`, `90s`, `1h30m`, `500ms`, `0`), in
/// whole seconds (rounded up). 0 keeps the default: kube-proxy leaves the kernel's value then,
/// and Ferry's defaults are those values.
pub fn parse_duration_s(flag: &str, v: &str) -> anyhow::Result<u32> {
    let ms = parse_duration_ms(flag, v)?;
    u32::try_from(ms.div_ceil(1000)).map_err(|_| anyhow::anyhow!("{flag}: {v:?} is too long"))
}

/// A Go duration in milliseconds.
pub fn parse_duration_ms(flag: &str, v: &str) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("{flag}: {v:?} is not a duration such as 24h0m0s, 30s or 1h30m");
    let (mut total_ms, mut num, mut rest) = (0u64, String::new(), v.trim());
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(0);
    }
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() {
            num.push(c);
            rest = &rest[1..];
            continue;
        }
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else {
            match c {
                'h' => (3_600_000, 1),
                'm' => (60_000, 1),
                's' => (1_000, 1),
                _ => return Err(bad()),
            }
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total_ms = total_ms.checked_add(n.checked_mul(unit_ms).ok_or_else(bad)?).ok_or_else(bad)?;
        num.clear();
        rest = &rest[len..];
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(total_ms)
}

impl RunArgs {
    /// Every flag at its default (the environment left out).
    pub fn defaults() -> RunArgs {
        let cmd = <RunArgs as Args>::augment_args(clap::Command::new("run")).mut_args(|a| a.env(None));
        <RunArgs as clap::FromArgMatches>::from_arg_matches(&cmd.get_matches_from(["run"])).expect("the defaults parse")
    }

    /// Applies `--config`'s file, if any (see [`crate::kpconfig`]); returns its notes for the
    /// warnings, to be logged once logging is set up (the file may set its format).
    pub fn read_config_file(&mut self) -> anyhow::Result<Option<(String, crate::kpconfig::Notes)>> {
        let Some(path) = self.config.clone() else { return Ok(None) };
        Ok(Some((path.display().to_string(), crate::kpconfig::apply(&path, self)?)))
    }

    /// Checks every value and builds the agent's configuration; errors name the flag.
    pub fn config(self) -> anyhow::Result<agent::RunConfig> {
        let snat_ports = self
            .snat_ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a > 0 && a <= b)
            .ok_or_else(|| anyhow::anyhow!("--snat-ports: {:?} is not MIN-MAX with 1 <= MIN <= MAX <= 65535", self.snat_ports))?;
        let cgroup = match self.cgroup.as_deref() {
            Some("none") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(crate::attach::cgroup2_root().context("no cgroup v2 mount found: pass --cgroup none to run without socket hooks")?),
        };
        let service_cidrs: BTreeSet<Cidr4> = parse_cidrs("--service-cidr", &self.service_cidrs)?.into_iter().collect();
        let (nodeport_addresses, nodeport_primary) = nodeport_addresses("--nodeport-addresses", &self.nodeport_addresses)?;
        let cluster_cidrs = parse_cidrs("--cluster-cidr", self.cluster_cidr.as_slice())?;
        if cluster_cidrs.len() > 1 {
            anyhow::bail!("--cluster-cidr: {:?} holds more than one IPv4 CIDR (one per family)", self.cluster_cidr.unwrap_or_default());
        }
        let cluster_cidr = cluster_cidrs.into_iter().next();
        let mut node_ips = Vec::new();
        for s in self.node_ips.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            match crate::addr::parse_ip(s).map_err(|e| anyhow::anyhow!("--node-ip: {e}"))? {
                crate::addr::Family::V4(a) => node_ips.push(a),
                crate::addr::Family::V6 => tracing::info!("{}", format!("--node-ip: {s} is IPv6: the IPv4 datapath ignores it")),
            }
        }
        let local_mode = match self.detect_local_mode.as_str() {
            "NodeCIDR" => LocalMode::NodeCidr,
            "BridgeInterface" => LocalMode::BridgeInterface(
                self.pod_bridge_interface.clone().filter(|b| !b.trim().is_empty()).context("--detect-local-mode BridgeInterface needs --pod-bridge-interface")?,
            ),
            "InterfaceNamePrefix" => LocalMode::InterfaceNamePrefix(
                self.pod_interface_name_prefix.clone().filter(|b| !b.trim().is_empty()).context("--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix")?,
            ),
            _ => LocalMode::ClusterCidr,
        };
        if local_mode == LocalMode::ClusterCidr && cluster_cidr.is_none() {
            tracing::warn!("no --cluster-cidr: no local traffic detector (ClusterIP traffic from outside the cluster is not masqueraded; pods reaching an externalTrafficPolicy Local address get this node's endpoints only), as kube-proxy without one");
        }
        let pod_interfaces = match &local_mode {
            LocalMode::InterfaceNamePrefix(p) => format!("{p}*"),
            _ => self.pod_interfaces.clone(),
        };
        let name = self.hostname_override.filter(|s| !s.trim().is_empty()).unwrap_or_else(hostname);
        if name.is_empty() {
            anyhow::bail!("--hostname-override: empty, and the host name could not be read");
        }
        let period = Duration::from_millis(self.min_sync_period_ms.max(1));
        let source = match self.manifests {
            Some(path) => SourceConfig::Manifests { path, poll: period },
            None => SourceConfig::Kube { kubeconfig: self.kubeconfig, master: self.master },
        };
        Ok(agent::RunConfig {
            source,
            node: crate::model::NodeContext { name, ips: node_ips, nodeport_addresses, nodeport_primary, zone: None, masquerade_all: self.masquerade_all },
            pin_dir: self.pin_dir,
            pod_interfaces: IfacePatterns::parse(&pod_interfaces),
            external_interfaces: self.external_interfaces.as_deref().map(IfacePatterns::parse),
            snat_ports,
            conntrack_capacity: self.conntrack_capacity.max(1024),
            lb_table_entries: self.lb_table_entries.max(65_536),
            host_netns_cookie: 0,
            ct_timeouts: {
                use dataplane_common::ct_timeout as t;
                let mut v = [0u32; t::COUNT];
                v[t::TCP_ESTABLISHED] = parse_duration_s("--conntrack-tcp-timeout-established", &self.conntrack_tcp_timeout_established)?;
                v[t::TCP_CLOSE_WAIT] = parse_duration_s("--conntrack-tcp-timeout-close-wait", &self.conntrack_tcp_timeout_close_wait)?;
                v[t::UDP] = parse_duration_s("--conntrack-udp-timeout", &self.conntrack_udp_timeout)?;
                v[t::UDP_STREAM] = parse_duration_s("--conntrack-udp-timeout-stream", &self.conntrack_udp_timeout_stream)?;
                v
            },
            algorithm: match self.lb_algorithm.as_str() {
                "random" => Algorithm::Random,
                "rendezvous" => Algorithm::Rendezvous,
                _ => Algorithm::Maglev,
            },
            xdp: self.nodeport_acceleration == "xdp",
            source_check: self.pod_source_check == "strict",
            external_strict: self.external_source_check == "strict",
            refusals: (self.refusals_per_second, self.refusal_burst),
            ct_per_source_max: self.conntrack_max_per_source.unwrap_or(self.conntrack_capacity.max(1024) / 8),
            cgroup,
            service_cidrs,
            cluster_cidr,
            local_mode,
            healthz_bind: parse_bind("--healthz-bind-address", &self.healthz_bind_address)?,
            metrics_bind: parse_bind("--metrics-bind-address", &self.metrics_bind_address)?,
            health_timeout: Duration::from_secs(self.healthz_timeout_seconds.max(1)),
            min_sync_period: period,
            network_policy: self.enable_network_policy,
            cleanup_kube_proxy: self.cleanup_kube_proxy,
        })
    }
}

/// The resolved configuration, one setting per line (`run --print-config`).
pub fn describe(cfg: &agent::RunConfig) -> String {
    let list = |v: Vec<String>| if v.is_empty() { "-".to_string() } else { v.join(",") };
    let bind = |b: Option<SocketAddr>| b.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    let source = match &cfg.source {
        SourceConfig::Manifests { path, .. } => format!("manifests {}", path.display()),
        SourceConfig::Kube { kubeconfig: Some(k), .. } => format!("API server (kubeconfig {})", k.display()),
        SourceConfig::Kube { master: Some(m), .. } => format!("API server {m}"),
        SourceConfig::Kube { .. } => "API server (in-cluster)".into(),
    };
    format!(
        "node: {}\nsource: {source}\nnode IPs: {}\nNodePort addresses: {}\nservice CIDRs: {}\ncluster CIDR: {} ({:?})\npin dir: {}\ncgroup: {}\nalgorithm: {:?}\nNodePort acceleration: {}\nSNAT ports: {}-{}\nconntrack capacity: {}\nconntrack timeouts: {}\nhealthz: {}\nmetrics: {}\nNetworkPolicy: {}\nkube-proxy take-over: {}\n",
        cfg.node.name,
        list(cfg.node.ips.iter().map(|i| i.to_string()).collect()),
        {
            let mut v: Vec<String> = cfg.node.nodeport_addresses.iter().map(|c| c.to_string()).collect();
            if cfg.node.nodeport_primary {
                v.insert(0, "primary".into());
            }
            if v.is_empty() {
                v.push("all".into());
            }
            v.join(",")
        },
        list(cfg.service_cidrs.iter().map(|c| c.to_string()).collect()),
        cfg.cluster_cidr.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
        cfg.local_mode,
        cfg.pin_dir.display(),
        cfg.cgroup.as_ref().map(|c| c.display().to_string()).unwrap_or_else(|| "none".into()),
        cfg.algorithm,
        if cfg.xdp { "xdp" } else { "none" },
        cfg.snat_ports.0,
        cfg.snat_ports.1,
        cfg.conntrack_capacity,
        {
            use dataplane_common::ct_timeout as t;
            let eff = |i: usize| if cfg.ct_timeouts[i] != 0 { cfg.ct_timeouts[i] } else { dataplane_common::CT_TIMEOUT_DEFAULT_S[i] };
            format!(
                "tcp syn {}s, established {}s, close-wait {}s, time-wait {}s, close {}s; udp {}s, udp stream {}s",
                eff(t::TCP_SYN),
                eff(t::TCP_ESTABLISHED),
                eff(t::TCP_CLOSE_WAIT),
                eff(t::TCP_TIME_WAIT),
                eff(t::TCP_CLOSE),
                eff(t::UDP),
                eff(t::UDP_STREAM)
            )
        },
        bind(cfg.healthz_bind),
        bind(cfg.metrics_bind),
        if cfg.network_policy { "enforced" } else { "off (--enable-network-policy=false)" },
        if cfg.cleanup_kube_proxy { "remove kube-proxy's rules after the first sync" } else { "off" },
    )
}

/// The environment variables `run` reads, from clap's own definition (for the ConfigMap test).
pub fn run_env_names() -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").expect("run subcommand");
    run.get_arguments().filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned())).collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn kube_proxy_flag_names_parse() {
        let cli = Cli::try_parse_from([
            "dataplane-agent",
            "run",
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--nodeport-addresses",
            "192.168.0.0/24",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--metrics-bind-address",
            "",
            "--cgroup",
            "none",
        ])
        .unwrap();
        let Cmd::Run(args) = cli.cmd else { panic!("not run") };
        let cfg = args.config().unwrap();
        assert_eq!(cfg.node.name, "node-a");
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(cfg.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(cfg.metrics_bind, None);
        assert!(matches!(cfg.source, SourceConfig::Kube { .. }));
    }

    #[test]
    fn go_durations_parse_as_kube_proxy_writes_them() {
        assert_eq!(parse_duration_s("f", "24h0m0s").unwrap(), 86_400);
        assert_eq!(parse_duration_s("f", "1h0m0s").unwrap(), 3_600);
        assert_eq!(parse_duration_s("f", "2m0s").unwrap(), 120);
        assert_eq!(parse_duration_s("f", "1h30m").unwrap(), 5_400);
        assert_eq!(parse_duration_s("f", "1500ms").unwrap(), 2);
        // kube-proxy's "leave it as it is": the default.
        assert_eq!(parse_duration_s("f", "0").unwrap(), 0);
        assert_eq!(parse_duration_s("f", "0s").unwrap(), 0);
        for bad in ["", "24", "1d", "h", "5 m"] {
            let e = parse_duration_s("--conntrack-udp-timeout", bad).unwrap_err().to_string();
            assert!(e.starts_with("--conntrack-udp-timeout:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn dual_stack_and_keywords_as_kube_proxy_takes_them() {
        let cfg = |extra: &[&str]| {
            let mut a = vec!["dataplane-agent", "run", "--node", "n", "--cgroup", "none"];
            a.extend_from_slice(extra);
            let Cmd::Run(args) = Cli::try_parse_from(a).unwrap().cmd else { panic!("not run") };
            args.config()
        };
        // IPv6 halves are left aside, never refused.
        let c = cfg(&["--cluster-cidr", "10.244.0.0/16,fd00:10::/56", "--service-cidr", "10.96.0.0/12,fd00:96::/112", "--node-ip", "192.168.0.2,2001:db8::2", "--nodeport-addresses", "192.168.0.0/24,2001:db8::/64"]).unwrap();
        assert_eq!(c.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.service_cidrs.len(), 1);
        assert_eq!(c.node.ips, vec!["192.168.0.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!((c.node.nodeport_addresses.len(), c.node.nodeport_primary), (1, false));
        // kube-proxy nftables mode's default is `primary`; `all` is every node address.
        assert!(cfg(&[]).unwrap().node.nodeport_primary);
        let all = cfg(&["--nodeport-addresses", "all"]).unwrap();
        assert!(!all.node.nodeport_primary && all.node.nodeport_addresses.is_empty());
        assert!(cfg(&["--nodeport-addresses", "all,10.0.0.0/8"]).err().unwrap().to_string().starts_with("--nodeport-addresses:"));
        assert!(cfg(&["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"]).err().unwrap().to_string().starts_with("--cluster-cidr:"));
        // The interface modes need their interface; InterfaceNamePrefix decides the pod interfaces.
        assert!(cfg(&["--detect-local-mode", "BridgeInterface"]).err().unwrap().to_string().contains("--pod-bridge-interface"));
        let p = cfg(&["--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "cali"]).unwrap();
        assert_eq!(p.local_mode, LocalMode::InterfaceNamePrefix("cali".into()));
        assert!(p.pod_interfaces.matches("cali1234") && !p.pod_interfaces.matches("veth1"));
        assert!(cfg(&["--masquerade-all"]).unwrap().node.masquerade_all);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cli = Cli::try_parse_from(["dataplane-agent", "run", "--node", "n", "--cluster-cidr", "10.0.0.0/33", "--cgroup", "none"]).unwrap();
        let Cmd::Run(args) = cli.cmd else { panic!("not run") };
        let e = args.config().err().unwrap().to_string();
        assert!(e.starts_with("--cluster-cidr:"), "{e}");
        let cli = Cli::try_parse_from(["dataplane-agent", "run", "--node", "n", "--healthz-bind-address", "10256", "--cgroup", "none"]).unwrap();
        let Cmd::Run(args) = cli.cmd else { panic!("not run") };
        let e = args.config().err().unwrap().to_string();
        assert!(e.starts_with("--healthz-bind-address:"), "{e}");
    }
}
