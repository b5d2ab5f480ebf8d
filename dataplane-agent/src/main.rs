//! `dataplane-agent`: wiring only. See lib.rs for the logic.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use dataplane_agent::{
    agent,
    attach::IfacePatterns,
    loader,
    reconcile::{Algorithm, Cidr4},
    trace,
};

#[derive(Parser)]
#[command(name = "dataplane-agent", version, about = "Ferry: an eBPF dataplane that replaces kube-proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: keep the datapath in sync with the Services and EndpointSlices.
    Run {
        /// This node's name (as in its Node object).
        #[arg(long, env = "FERRY_NODE", alias = "hostname-override")]
        node: String,
        /// A file or directory of Service, EndpointSlice and Node manifests (this node's Node gives
        /// its zone), followed for changes.
        #[arg(long, env = "FERRY_MANIFESTS")]
        manifests: PathBuf,
        /// Where the maps are pinned (on a bpf filesystem). Kept across restarts.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pod-facing interfaces to attach to: comma-separated name patterns with `*` and `?`.
        #[arg(long, env = "FERRY_POD_INTERFACES", default_value = "veth*,lxc*,cali*")]
        pod_interfaces: String,
        /// Interfaces towards the outside, where NodePort, LoadBalancer and external IP traffic
        /// arrives (and replies from other nodes return): comma-separated name patterns.
        /// Default: the interfaces holding the --node-ip addresses.
        #[arg(long, env = "FERRY_EXTERNAL_INTERFACES")]
        external_interfaces: Option<String>,
        /// Source ports the datapath uses when it translates NodePort/LoadBalancer traffic to
        /// this node's address for a backend on another node, as MIN-MAX. Keep it outside
        /// net.ipv4.ip_local_port_range so it never meets the node's own connections.
        #[arg(long, env = "FERRY_SNAT_PORTS", default_value = "61000-65535")]
        snat_ports: String,
        /// cgroup v2 directory whose processes reach Services through the socket hooks (the
        /// node's host-network processes). Default: the cgroup v2 root. `none` disables.
        #[arg(long, env = "FERRY_CGROUP")]
        cgroup: Option<String>,
        /// Service CIDRs (kube-apiserver's --service-cluster-ip-range): an address in them that
        /// no Service holds is dropped. Comma-separated.
        #[arg(long = "service-cidr", env = "FERRY_SERVICE_CIDRS", value_delimiter = ',')]
        service_cidrs: Vec<String>,
        /// This node's IPv4 addresses: NodePorts answer on them. Comma-separated.
        #[arg(long = "node-ip", env = "FERRY_NODE_IPS", value_delimiter = ',')]
        node_ips: Vec<std::net::Ipv4Addr>,
        /// As kube-proxy's flag: NodePorts answer only on node addresses inside these CIDRs (all
        /// of --node-ip when empty). Comma-separated.
        #[arg(long = "nodeport-addresses", env = "FERRY_NODEPORT_ADDRESSES", value_delimiter = ',')]
        nodeport_addresses: Vec<String>,
        /// How new connections pick a backend: `rendezvous` (consistent hashing: the same flow
        /// picks the same backend on every node and after a restart, and removing a backend moves
        /// only its flows), `maglev` (consistent hashing with a tighter spread, but a removal
        /// also moves a few percent of other flows) or `random` (kube-proxy's way).
        #[arg(long, env = "FERRY_LB_ALGORITHM", default_value = "rendezvous", value_parser = ["rendezvous", "maglev", "random"])]
        lb_algorithm: String,
        /// Where NodePort, LoadBalancer and external IP traffic from outside is handled: `none`
        /// (tc on the external interfaces) or `xdp` (an XDP program at the driver level in front
        /// of it; what XDP cannot finish goes on to tc).
        #[arg(long, env = "FERRY_NODEPORT_ACCELERATION", default_value = "none", value_parser = ["none", "xdp"])]
        nodeport_acceleration: String,
        /// How often the manifests are checked for changes, in milliseconds.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
    },
    /// Ask what the dataplane does with a flow: scenario files (private copy of the programs),
    /// or one flow against a running node's pinned maps (read-only).
    Trace {
        /// Scenario files (see README, "Scenario files"). Prints one line per flow and
        /// `N passed, M failed`; exits non-zero when anything failed.
        #[arg(long, num_args = 1.., conflicts_with_all = ["from", "to"])]
        scenario: Vec<PathBuf>,
        /// Live mode: the flow's source address.
        #[arg(long, requires = "to")]
        from: Option<std::net::Ipv4Addr>,
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
    /// Internal: the socket probe `trace` runs in a throwaway namespace for node flows.
    #[command(name = "__sock-probe", hide = true)]
    SockProbe {
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // trace prints its report on stdout; keep its logs to warnings.
    let default_level = if matches!(cli.cmd, Cmd::Run { .. }) { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).format_timestamp_millis().init();
    match cli.cmd {
        Cmd::Run { node, manifests, pin_dir, pod_interfaces, external_interfaces, snat_ports, cgroup, service_cidrs, node_ips, nodeport_addresses, lb_algorithm, nodeport_acceleration, poll_ms } => {
            let snat_ports = snat_ports
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
                .filter(|(a, b)| *a > 0 && a <= b)
                .ok_or_else(|| anyhow::anyhow!("--snat-ports: {snat_ports:?} is not MIN-MAX with 1 <= MIN <= MAX <= 65535"))?;
            let cgroup = match cgroup.as_deref() {
                Some("none") => None,
                Some(p) => Some(PathBuf::from(p)),
                None => Some(dataplane_agent::attach::cgroup2_root().context("no cgroup v2 mount found: pass --cgroup none to run without socket hooks")?),
            };
            let service_cidrs = service_cidrs
                .iter()
                .map(|s| s.parse::<Cidr4>().map_err(|e| anyhow::anyhow!("--service-cidr: {e}")))
                .collect::<anyhow::Result<BTreeSet<_>>>()?;
            let nodeport_addresses = nodeport_addresses
                .iter()
                .map(|s| s.parse::<Cidr4>().map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let cfg = agent::RunConfig {
                // The zone comes from this node's Node object, at every sync.
                node: dataplane_agent::model::NodeContext { name: node, ips: node_ips, nodeport_addresses, zone: None },
                manifests,
                pin_dir,
                pod_interfaces: IfacePatterns::parse(&pod_interfaces),
                external_interfaces: external_interfaces.as_deref().map(IfacePatterns::parse),
                snat_ports,
                algorithm: match lb_algorithm.as_str() {
                    "random" => Algorithm::Random,
                    "maglev" => Algorithm::Maglev,
                    _ => Algorithm::Rendezvous,
                },
                xdp: nodeport_acceleration == "xdp",
                cgroup,
                service_cidrs,
                poll: Duration::from_millis(poll_ms),
            };
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(cfg))
        }
        Cmd::Trace { scenario, from, to, pin_dir, nodeport_acceleration } => {
            if let (Some(from), Some(to)) = (from, to) {
                let (to, proto) = trace::live::parse_to(&to).map_err(anyhow::Error::msg)?;
                print!("{}", trace::live::explain(&pin_dir, from, to, proto).map_err(anyhow::Error::msg)?);
                return Ok(());
            }
            if scenario.is_empty() {
                anyhow::bail!("give --scenario FILE... or --from IP --to IP:PORT/PROTO");
            }
            if !trace::run_files(&scenario, nodeport_acceleration == "xdp") {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::SockProbe { args } => Ok(trace::probe::probe_main(&args)?),
    }
}
