//! `dataplane-agent`: wiring only. See lib.rs for the logic.
use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use dataplane_agent::{agent, attach::IfacePatterns, loader, reconcile::Cidr4};

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
        /// A file or directory of Service and EndpointSlice manifests, followed for changes.
        #[arg(long, env = "FERRY_MANIFESTS")]
        manifests: PathBuf,
        /// Where the maps are pinned (on a bpf filesystem). Kept across restarts.
        #[arg(long, env = "FERRY_PIN_DIR", default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pod-facing interfaces to attach to: comma-separated name patterns with `*` and `?`.
        #[arg(long, env = "FERRY_POD_INTERFACES", default_value = "veth*,lxc*,cali*")]
        pod_interfaces: String,
        /// cgroup v2 directory whose processes reach Services through the socket hooks (the
        /// node's host-network processes). Default: the cgroup v2 root. `none` disables.
        #[arg(long, env = "FERRY_CGROUP")]
        cgroup: Option<String>,
        /// Service CIDRs (kube-apiserver's --service-cluster-ip-range): an address in them that
        /// no Service holds is dropped. Comma-separated.
        #[arg(long = "service-cidr", env = "FERRY_SERVICE_CIDRS", value_delimiter = ',')]
        service_cidrs: Vec<String>,
        /// How often the manifests are checked for changes, in milliseconds.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp_millis().init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { node, manifests, pin_dir, pod_interfaces, cgroup, service_cidrs, poll_ms } => {
            let cgroup = match cgroup.as_deref() {
                Some("none") => None,
                Some(p) => Some(PathBuf::from(p)),
                None => Some(dataplane_agent::attach::cgroup2_root().context("no cgroup v2 mount found: pass --cgroup none to run without socket hooks")?),
            };
            let service_cidrs = service_cidrs
                .iter()
                .map(|s| s.parse::<Cidr4>().map_err(|e| anyhow::anyhow!("--service-cidr: {e}")))
                .collect::<anyhow::Result<BTreeSet<_>>>()?;
            let cfg = agent::RunConfig {
                node,
                manifests,
                pin_dir,
                pod_interfaces: IfacePatterns::parse(&pod_interfaces),
                cgroup,
                service_cidrs,
                poll: Duration::from_millis(poll_ms),
            };
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(cfg))
        }
    }
}
