//! `dataplane-agent trace`: "what does this node's dataplane do with this packet?"
//!
//! Scenario mode loads a private copy of the programs and maps (never the live pinned ones),
//! feeds the scenario's Kubernetes objects through the agent's own translation and reconciler,
//! and pushes every flow through the real programs: `BPF_PROG_TEST_RUN` for packets from pods,
//! real sockets in a throwaway network namespace and cgroup for the node's own processes (the
//! socket hooks cannot be test-run). The format is specified in `../shared/scenario-format.md`
//! and documented in the README; it is a public interface.
pub mod live;
mod net;
pub mod probe;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use dataplane_common::progs;
use serde::Deserialize;

use crate::{
    attach,
    bpf::BpfMaps,
    error::ObjectError,
    loader,
    model::{self, Proto},
    packet::{self, Refusal},
    reconcile::{Cidr4, Reconciler},
    sources::{manifests, Objects},
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// One `BPF_PROG_TEST_RUN` of a tc or XDP program: its return value and the packet it left behind.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub data: Vec<u8>,
}

/// The `__sk_buff` fields a `BPF_PROG_TEST_RUN` may set (the kernel refuses the others).
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbIn {
    pub mark: u32,
    /// The device the packet came in on (0: sent by the local stack).
    pub ingress_ifindex: u32,
    /// The device the packet is on (0: loopback of the caller's network namespace).
    pub ifindex: u32,
    /// A GSO super-packet: its segment count and size (0: an ordinary packet).
    pub gso_segs: u32,
    pub gso_size: u32,
}

impl SkbIn {
    /// As the UAPI `struct __sk_buff` (192 bytes) lays these fields out.
    fn bytes(&self) -> [u8; 192] {
        let mut b = [0u8; 192];
        for (off, v) in [(8, self.mark), (36, self.ingress_ifindex), (40, self.ifindex), (164, self.gso_segs), (176, self.gso_size)] {
            b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// One test run of a tc program with `__sk_buff` fields set; also returns the mark it left.
pub fn test_run_skb(ebpf: &Ebpf, prog: &str, pkt: &[u8], skb: &SkbIn) -> Result<(Run, u32), String> {
    let p = ebpf.program(prog).ok_or(format!("program {prog} missing"))?;
    let p: &SchedClassifier = p.try_into().map_err(|e| format!("{e}"))?;
    let mut ctx_out = [0u8; 192];
    let run = run_with(p, prog, pkt, Some((&skb.bytes(), &mut ctx_out)))?;
    Ok((run, u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]])))
}

pub fn test_run(ebpf: &Ebpf, prog: &str, pkt: &[u8]) -> Result<Run, String> {
    let p = ebpf.program(prog).ok_or(format!("program {prog} missing"))?;
    if let Ok(x) = <&aya::programs::Xdp>::try_from(p) {
        return run_with(x, prog, pkt, None);
    }
    let p: &SchedClassifier = p.try_into().map_err(|e| format!("{e}"))?;
    run_with(p, prog, pkt, None)
}

/// One BPF_PROG_TEST_RUN of a tc or XDP program, with a context in and out (tc's `__sk_buff`).
fn run_with<P: TestRun<Result = aya::programs::TestRunResult> + for<'a> TestRun<Opts<'a> = TestRunOptions<'a>>>(
    p: &P,
    prog: &str,
    pkt: &[u8],
    ctx: Option<(&[u8], &mut [u8])>,
) -> Result<Run, String> {
    // Room for a packet that grows (an ICMP error quoting a short packet).
    let mut out = vec![0u8; pkt.len() + 256];
    let mut opts = TestRunOptions::default();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    if let Some((ctx_in, ctx_out)) = ctx {
        opts.ctx_in = Some(ctx_in);
        opts.ctx_out = Some(ctx_out);
    }
    let r = p.test_run(opts).map_err(|e| {
        use std::error::Error as _;
        let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
        format!("BPF_PROG_TEST_RUN {prog} ({} bytes): {e}{cause}", pkt.len())
    })?;
    out.truncate(r.data_size_out as usize);
    Ok(Run { action: r.return_value, data: out })
}

#[derive(Debug, Deserialize)]
pub struct Scenario {
    pub node: NodeSpec,
    #[serde(default)]
    pub config: ScenarioConfig,
    #[serde(default)]
    pub nodes: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub namespaces: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub pods: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub services: Vec<serde_yaml::Value>,
    #[serde(default, rename = "endpointSlices")]
    pub endpoint_slices: Vec<serde_yaml::Value>,
    #[serde(default, rename = "networkPolicies")]
    pub network_policies: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub flows: Vec<Flow>,
    /// Object errors the file means to show: each entry is a piece of an error's text (`Service
    /// shop/old: spec.clusterIP`). An invalid object is named and left out, the rest is run, as
    /// in the agent; each error is a failed line unless an entry here expects it, and each entry
    /// no error matches is one too.
    #[serde(default, rename = "expectErrors")]
    pub expect_errors: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    /// One podCIDR per family (the IPv6 one is left aside by the IPv4 datapath).
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// The MTU of the node's path to other nodes and the outside (default 1500): what a
    /// redirected packet is checked against.
    #[serde(default)]
    pub mtu: Option<u16>,
}

#[derive(Debug, Deserialize)]
pub struct ScenarioConfig {
    /// kube-proxy's `--cluster-cidr`; absent (with detectLocalMode ClusterCIDR): no local
    /// traffic detector.
    #[serde(default, rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    /// One cluster CIDR per family (dual-stack `--cluster-cidr`).
    #[serde(default, rename = "clusterCIDRs")]
    pub cluster_cidrs: Vec<String>,
    /// kube-proxy's `--detect-local-mode`: ClusterCIDR (default), NodeCIDR (node.podCIDR),
    /// BridgeInterface or InterfaceNamePrefix (packets from this node's pod interfaces).
    #[serde(default, rename = "detectLocalMode")]
    pub detect_local_mode: Option<String>,
    #[serde(default, rename = "podBridgeInterface")]
    pub pod_bridge_interface: Option<String>,
    #[serde(default, rename = "podInterfaceNamePrefix")]
    pub pod_interface_name_prefix: Option<String>,
    #[serde(default, rename = "serviceCIDRs")]
    pub service_cidrs: Vec<String>,
    #[serde(default, rename = "masqueradeAll")]
    pub masquerade_all: bool,
    #[serde(default, rename = "nodePortAddresses")]
    pub node_port_addresses: Vec<String>,
    /// The agent's `--enable-network-policy` (default true): false leaves NetworkPolicy to the
    /// CNI, so the file's policies isolate nothing.
    #[serde(default = "yes", rename = "enableNetworkPolicy")]
    pub enable_network_policy: bool,
}

fn yes() -> bool {
    true
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            cluster_cidr: None,
            cluster_cidrs: Vec::new(),
            detect_local_mode: None,
            pod_bridge_interface: None,
            pod_interface_name_prefix: None,
            service_cidrs: Vec::new(),
            masquerade_all: false,
            node_port_addresses: Vec::new(),
            enable_network_policy: true,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Flow {
    pub name: String,
    pub proto: String,
    pub source: String,
    pub destination: String,
    pub expect: serde_yaml::Value,
    #[serde(default)]
    pub masquerade: Option<bool>,
    /// The packet's IP length in bytes; above the node's MTU it is sent as a GSO super-packet of
    /// MTU-sized segments, as a TCP stack with TSO sends it.
    #[serde(default)]
    pub size: Option<u16>,
    /// With `size` above node.mtu: `false` sends one oversized TCP segment instead of a GSO
    /// super-packet (UDP above the MTU is always one datagram).
    #[serde(default)]
    pub gso: Option<bool>,
    /// Where the packet is sent from when that is not where its source address belongs:
    /// `outside` (in on the node's external interface), or a local pod's address (out of that
    /// pod's interface). Spoofed packets, as an attacker sends them.
    #[serde(default)]
    pub via: Option<String>,
    /// For `cargo xtask conformance`: this flow's outcome deliberately differs from the real
    /// kube-proxy's, for the reason given (which names the README section that says so).
    #[serde(default, rename = "kubeProxyDiffers")]
    pub kube_proxy_differs: Option<String>,
}

/// A flow's expected outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Backends(BTreeSet<SocketAddrV4>),
    Pass,
    Local,
    /// Dropped; with a reason (`{DROP: no_local_endpoint}`), for that reason only.
    Drop(Option<String>),
    Reject,
    /// Answered with ICMP fragmentation needed: too big for the node's path.
    FragNeeded,
}

impl Expect {
    pub fn parse(v: &serde_yaml::Value) -> Result<Expect, String> {
        match v {
            serde_yaml::Value::String(s) => match s.as_str() {
                "PASS" => Ok(Expect::Pass),
                "LOCAL" => Ok(Expect::Local),
                "DROP" => Ok(Expect::Drop(None)),
                "REJECT" => Ok(Expect::Reject),
                "FRAG_NEEDED" => Ok(Expect::FragNeeded),
                other => Err(format!("expect: {other:?} is not PASS, LOCAL, DROP, REJECT or a list of ip:port")),
            },
            serde_yaml::Value::Sequence(items) => {
                let mut set = BTreeSet::new();
                for i in items {
                    let s = i.as_str().ok_or("expect: list items must be \"ip:port\" strings")?;
                    set.insert(s.parse::<SocketAddrV4>().map_err(|_| format!("expect: {s:?} is not ip:port"))?);
                }
                if set.is_empty() {
                    return Err("expect: an empty list (use DROP or REJECT)".into());
                }
                Ok(Expect::Backends(set))
            }
            serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                let (k, v) = m.iter().next().unwrap();
                let reason = v.as_str().ok_or("expect: {DROP: <reason>} takes a reason name")?;
                if k.as_str() != Some("DROP") {
                    return Err("expect: only DROP takes a reason ({DROP: <reason>})".into());
                }
                if !dataplane_common::DropReason::ALL.iter().any(|r| r.name() == reason) {
                    let names: Vec<&str> = dataplane_common::DropReason::ALL.iter().map(|r| r.name()).collect();
                    return Err(format!("expect: {reason:?} is not a drop reason ({})", names.join(", ")));
                }
                Ok(Expect::Drop(Some(reason.to_string())))
            }
            _ => Err("expect: must be PASS, LOCAL, DROP, {DROP: <reason>}, REJECT or a list of ip:port".into()),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Backends(s) => write!(f, "[{}]", s.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")),
            Expect::Pass => f.write_str("PASS"),
            Expect::Local => f.write_str("LOCAL"),
            Expect::Drop(None) => f.write_str("DROP"),
            Expect::Drop(Some(r)) => write!(f, "DROP ({r})"),
            Expect::Reject => f.write_str("REJECT"),
            Expect::FragNeeded => f.write_str("FRAG_NEEDED"),
        }
    }
}

/// What happened to one packet (or one connection attempt).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    To(SocketAddrV4),
    Pass,
    Local,
    /// Dropped, with the reason the datapath counted (when it counted one).
    Drop(Option<&'static str>),
    Reject,
    /// Answered with ICMP fragmentation needed, with this MTU.
    FragNeeded(u16),
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::To(a) => write!(f, "{a}"),
            Outcome::Pass => f.write_str("PASS"),
            Outcome::Local => f.write_str("LOCAL"),
            Outcome::Drop(None) => f.write_str("DROP"),
            Outcome::Drop(Some(r)) => write!(f, "DROP ({r})"),
            Outcome::Reject => f.write_str("REJECT"),
            Outcome::FragNeeded(mtu) => write!(f, "FRAG_NEEDED (mtu {mtu})"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Where a flow's packets start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Pod,
    Node,
    External,
}

/// The result of one flow, as printed.
pub struct FlowResult {
    pub name: String,
    pub ok: bool,
    pub line: String,
}

/// A loaded scenario, ready to run flows.
pub struct Runner {
    ebpf: Ebpf,
    maps: BpfMaps,
    /// Run traffic from outside through the XDP NodePort program first (`--nodeport-acceleration xdp`).
    pub xdp: bool,
    node_ips: BTreeSet<Ipv4Addr>,
    pod_cidr: Option<Cidr4>,
    pod_ips: BTreeSet<Ipv4Addr>,
    /// NetworkPolicy verdict events of the private copy, drained after every packet.
    events: std::cell::RefCell<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
    /// Policy verdicts seen during the current flow: "ingress allowed by ns/name" and the like.
    verdicts: std::cell::RefCell<BTreeSet<String>>,
    cgroup: Option<probe::TraceCgroup>,
    /// The node's path MTU (`node.mtu`).
    mtu: u16,
    /// The namespace this thread runs the programs in (see net.rs); dropped last.
    net: net::TraceNet,
    /// Invalid objects (or fields), named: left out, as the agent leaves them out.
    pub object_errors: Vec<String>,
}

fn parse_objects(sc: &Scenario, source: &str) -> (Objects, Vec<ObjectError>) {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    for (kind, list) in [
        ("Service", &sc.services),
        ("EndpointSlice", &sc.endpoint_slices),
        ("Node", &sc.nodes),
        ("Pod", &sc.pods),
        ("Namespace", &sc.namespaces),
        ("NetworkPolicy", &sc.network_policies),
    ] {
        for (i, v) in list.iter().enumerate() {
            let mut v = v.clone();
            if let serde_yaml::Value::Mapping(m) = &mut v {
                m.entry("kind".into()).or_insert_with(|| kind.into());
            }
            manifests::add_value(v, &format!("{source} {kind} #{}", i + 1), &mut objs, &mut errors);
        }
    }
    (objs, errors)
}

/// Parses every CIDR of a config list; each bad one is reported with the list's name. IPv6
/// entries are left aside, as the agent leaves them (one note per list).
fn parse_list(list: &[String], field: &str, errors: &mut Vec<String>) -> Vec<Cidr4> {
    let mut v6 = 0;
    let out = list
        .iter()
        .filter_map(|c| match crate::addr::parse_cidr(c.trim()) {
            Ok(crate::addr::Family::V4(c)) => Some(c),
            Ok(crate::addr::Family::V6) => {
                v6 += 1;
                None
            }
            Err(e) => {
                errors.push(format!("{field}: {e}"));
                None
            }
        })
        .collect();
    if v6 > 0 {
        eprintln!("note: {field}: {v6} IPv6 entries left aside (the IPv4 datapath ignores them)");
    }
    out
}

impl Runner {
    /// Loads the private datapath and provisions it from the scenario. Invalid objects fail the
    /// whole scenario (it must not guess), each named with its field.
    pub fn load(sc: &Scenario, source: &str) -> Result<Runner, Vec<String>> {
        let mut errors: Vec<String> = Vec::new();
        let node_ips: BTreeSet<Ipv4Addr> = sc
            .node
            .ips
            .iter()
            .filter_map(|s| match crate::addr::parse_ip(s) {
                Ok(crate::addr::Family::V4(a)) => Some(a),
                Ok(crate::addr::Family::V6) => None,
                Err(e) => {
                    errors.push(format!("node.ips: {e}"));
                    None
                }
            })
            .collect();
        let pod_cidr = parse_list(&sc.node.pod_cidr.iter().chain(&sc.node.pod_cidrs).cloned().collect::<Vec<_>>(), "node.podCIDR(s)", &mut errors).into_iter().next();
        let cidrs: BTreeSet<Cidr4> = parse_list(&sc.config.service_cidrs, "config.serviceCIDRs", &mut errors).into_iter().collect();
        let cluster_cidr = parse_list(&sc.config.cluster_cidr.iter().chain(&sc.config.cluster_cidrs).cloned().collect::<Vec<_>>(), "config.clusterCIDR(s)", &mut errors).into_iter().next();
        // kube-proxy's local traffic detector: a CIDR (or none), or the pods' interfaces.
        let (local_cidr, local_iface) = match sc.config.detect_local_mode.as_deref().unwrap_or("ClusterCIDR") {
            "ClusterCIDR" => (cluster_cidr, false),
            "NodeCIDR" => (pod_cidr, false),
            "BridgeInterface" if sc.config.pod_bridge_interface.is_some() => (None, true),
            "InterfaceNamePrefix" if sc.config.pod_interface_name_prefix.is_some() => (None, true),
            "BridgeInterface" => {
                errors.push("config.detectLocalMode: BridgeInterface needs config.podBridgeInterface".into());
                (None, false)
            }
            "InterfaceNamePrefix" => {
                errors.push("config.detectLocalMode: InterfaceNamePrefix needs config.podInterfaceNamePrefix".into());
                (None, false)
            }
            other => {
                errors.push(format!("config.detectLocalMode: {other:?} is not ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"));
                (None, false)
            }
        };
        let mut pod_ips = BTreeSet::new();
        for (i, p) in sc.pods.iter().enumerate() {
            let node = p.get("spec").and_then(|s| s.get("nodeName")).and_then(|n| n.as_str());
            let ip = p.get("status").and_then(|s| s.get("podIP")).and_then(|n| n.as_str());
            if let (Some(n), Some(ip)) = (node, ip) {
                match ip.parse::<Ipv4Addr>() {
                    Ok(a) if n == sc.node.name => {
                        pod_ips.insert(a);
                    }
                    Ok(_) => {}
                    Err(_) => errors.push(format!("pods[{i}].status.podIP: {ip:?} is not an IPv4 address")),
                }
            }
        }
        let (mut objs, oerr) = parse_objects(sc, source);
        if !sc.config.enable_network_policy {
            // As the agent with --enable-network-policy=false: no policy isolates anything.
            objs.network_policies.clear();
        }
        let mut object_errors: Vec<String> = oerr.iter().map(|e| e.to_string()).collect();
        // Absent: every address in node.ips (as the format always said); `primary`, `all` and
        // CIDRs as the agent's flag.
        let (nodeport_addresses, nodeport_primary) = crate::cli::parse_nodeport_addresses("config.nodePortAddresses", &sc.config.node_port_addresses, false).unwrap_or_else(|e| {
            errors.push(e.to_string());
            (Vec::new(), false)
        });
        // In the file's order: the first is the node's primary address (`primary`, and the
        // masquerade source).
        let mut ips_in_order: Vec<Ipv4Addr> = Vec::new();
        for ip in sc.node.ips.iter().filter_map(|s| match crate::addr::parse_ip(s) {
            Ok(crate::addr::Family::V4(a)) => Some(a),
            _ => None,
        }) {
            if !ips_in_order.contains(&ip) {
                ips_in_order.push(ip);
            }
        }
        let node = model::NodeContext {
            name: sc.node.name.clone(),
            ips: ips_in_order,
            nodeport_addresses,
            nodeport_primary,
            zone: objs.zone_of(&sc.node.name),
            masquerade_all: sc.config.masquerade_all,
        };
        let (desired, terr) = model::translate(&objs.services, &objs.endpoint_slices, &node);
        object_errors.extend(terr.iter().map(|e| e.to_string()));
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut ebpf = loader::load_with(None, &loader::PRIVATE_CAPACITIES).map_err(|e| vec![e.to_string()])?;
        attach::load_programs(&mut ebpf).map_err(|e| vec![e.to_string()])?;
        let mut maps = BpfMaps::from_ebpf(&mut ebpf).map_err(|e| vec![e.to_string()])?;
        let mut rec = Reconciler::new();
        rec.host_addrs = node_ips.clone();
        let (_, map_errors) = rec.sync(&desired, &cidrs, &mut maps);
        if !map_errors.is_empty() {
            return Err(map_errors);
        }
        let snat_addr_be = node.ips.first().map(|ip| u32::from_ne_bytes(ip.octets())).unwrap_or(0);
        let (cluster_cidr_be, cluster_mask_be) = local_cidr.map(|c| c.addr_mask_be()).unwrap_or((0, 0));
        // As the agent configures a node: anti-spoofing on (`--pod-source-check strict`).
        let flags = dataplane_common::CFG_F_SOURCE_CHECK | if local_iface { dataplane_common::CFG_F_LOCAL_IFACE } else { 0 };
        maps.set_config(dataplane_common::NodeConfig { snat_addr_be, snat_port_min: 61000, snat_port_max: 65535, cluster_cidr_be, cluster_mask_be, flags, refusals_per_s: dataplane_common::REFUSALS_UNLIMITED, ..Default::default() })
            .map_err(|e| vec![e.to_string()])?;
        let mtu = sc.node.mtu.unwrap_or(1500);
        if mtu < 576 {
            return Err(vec![format!("node.mtu: {mtu} is below IPv4's minimum of 576")]);
        }
        // The node's namespace first: the policy sync finds each pod's interface by its route.
        let net = net::TraceNet::enter(&node.ips, mtu).map_err(|e| vec![e])?;
        for ip in &pod_ips {
            net.pod_iface(*ip).map_err(|e| vec![e])?;
        }
        let mut pol = crate::agent::PolicyState::default();
        let (_, _, perr, pmap) = pol.sync(&mut maps, &objs, &node);
        // IPv6 parts of valid policies are left out, as the agent leaves them out; anything
        // else untranslatable is an invalid object, named (and fails closed, as in the agent).
        object_errors.extend(perr.into_iter().filter(|e| !e.ipv6_only).map(|e| e.to_string()));
        if !pmap.is_empty() {
            return Err(pmap);
        }
        let events = ebpf.take_map(dataplane_common::names::POL_EVENTS).and_then(|m| aya::maps::RingBuf::try_from(m).ok());
        Ok(Runner { ebpf, maps, xdp: false, node_ips, pod_cidr, pod_ips, events: events.into(), verdicts: Default::default(), cgroup: None, mtu, net, object_errors })
    }

    fn origin(&self, src: Ipv4Addr) -> Origin {
        if self.node_ips.contains(&src) || src.is_loopback() {
            Origin::Node
        } else if self.is_local_pod(src) {
            Origin::Pod
        } else {
            Origin::External
        }
    }

    fn is_local_pod(&self, a: Ipv4Addr) -> bool {
        self.pod_ips.contains(&a) || self.pod_cidr.is_some_and(|c| c.contains(a))
    }

    pub fn run_flow(&mut self, flow: &Flow) -> FlowResult {
        let fail = |why: String| FlowResult { name: flow.name.clone(), ok: false, line: format!("FAIL {}: {why}", flow.name) };
        let expect = match Expect::parse(&flow.expect) {
            Ok(e) => e,
            Err(e) => return fail(e),
        };
        if let Some(number) = other_protocol(&flow.proto) {
            return self.other_protocol_flow(flow, number, &expect);
        }
        let Some(proto) = Proto::parse_lower(&flow.proto) else {
            return fail(format!("proto: {:?} is not tcp, udp, sctp, icmp or an IP protocol number", flow.proto));
        };
        let Ok(src) = flow.source.parse::<Ipv4Addr>() else {
            return fail(format!("source: {:?} is not an IPv4 address", flow.source));
        };
        let Ok(dst) = flow.destination.parse::<SocketAddrV4>() else {
            return fail(format!("destination: {:?} is not ip:port", flow.destination));
        };
        let attempts = match &expect {
            Expect::Backends(s) => (s.len() * 16).max(16),
            _ => 8,
        };
        let (origin, via_if) = match flow.via.as_deref() {
            None => (self.origin(src), None),
            Some("outside") => (Origin::External, None),
            Some(v) => match v.parse::<Ipv4Addr>() {
                Ok(a) if self.is_local_pod(a) => match self.net.pod_iface(a) {
                    Ok(i) => (Origin::Pod, Some(i)),
                    Err(e) => return fail(e),
                },
                _ => return fail(format!("via: {v:?} is not `outside` or the address of a pod of this node")),
            },
        };
        let outcomes: Result<Vec<Outcome>, String> = match origin {
            Origin::Pod | Origin::External => {
                (0..attempts).map(|i| self.packet(origin, proto, src, 20000 + i as u16, dst, flow.masquerade, (flow.size, flow.gso, via_if))).collect()
            }
            Origin::Node => self.node_connections(proto, dst, &expect, attempts),
        };
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let mut r = judge(&flow.name, &expect, &outcomes, origin, self.sticky(proto, dst));
        let verdicts = std::mem::take(&mut *self.verdicts.borrow_mut());
        if !verdicts.is_empty() {
            r.line.push_str(&format!(" [policy: {}]", verdicts.into_iter().collect::<Vec<_>>().join("; ")));
        }
        r
    }

    /// A flow of a protocol Services do not carry: `icmp` (an echo request) or an IP protocol
    /// number (8 bytes of zeros after the header), to an address (`destination` without a port,
    /// or with port 0). From a pod or from outside only.
    fn other_protocol_flow(&mut self, flow: &Flow, number: u8, expect: &Expect) -> FlowResult {
        let fail = |why: String| FlowResult { name: flow.name.clone(), ok: false, line: format!("FAIL {}: {why}", flow.name) };
        let Ok(src) = flow.source.parse::<Ipv4Addr>() else {
            return fail(format!("source: {:?} is not an IPv4 address", flow.source));
        };
        let dst = flow.destination.strip_suffix(":0").unwrap_or(&flow.destination);
        let Ok(dst) = dst.parse::<Ipv4Addr>() else {
            return fail(format!("destination: {:?} is not an address (protocol {} has no ports)", flow.destination, flow.proto));
        };
        let origin = if flow.via.as_deref() == Some("outside") { Origin::External } else { self.origin(src) };
        if origin == Origin::Node {
            return fail("the node's own ICMP and raw IP are not probed by trace (no socket hook sees them); use a pod or outside source".into());
        }
        let l4 = if number == dataplane_common::IPPROTO_ICMP {
            let mut m = vec![8u8, 0, 0, 0, 0x46, 0x52, 0, 1];
            m.extend_from_slice(b"ferry-trace");
            let c = packet::inet_checksum(&m);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            m
        } else {
            vec![0u8; 8]
        };
        let pkt = packet::raw_ipv4(src, dst, number, &l4);
        let mut outcomes = Vec::new();
        for _ in 0..8 {
            let before = self.maps.stat_totals();
            let r = if origin == Origin::External { self.world(&pkt, &SkbIn::default()) } else { self.run_skb(progs::FROM_POD, &pkt, &SkbIn::default()) };
            let (r, _) = match r {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            outcomes.push(match r.action {
                TC_ACT_SHOT => Outcome::Drop(self.drop_reason(&before)),
                TC_ACT_REDIRECT => match packet::refusal(&r.data) {
                    Some(Refusal::IcmpUnreachable { to, code: 3, .. }) if to == src => Outcome::Reject,
                    _ => Outcome::Error("redirected, and not as a refusal".into()),
                },
                TC_ACT_OK if r.data == pkt => if self.node_ips.contains(&dst) { Outcome::Local } else { Outcome::Pass },
                TC_ACT_OK => Outcome::Error("passed, rewritten".into()),
                other => Outcome::Error(format!("unexpected tc action {other}")),
            });
        }
        judge(&flow.name, expect, &outcomes, origin, false)
    }

    /// Runs a program and collects the policy verdicts it reported.
    fn run(&self, prog: &str, pkt: &[u8]) -> Result<Run, String> {
        if prog == progs::FROM_POD || prog == progs::TO_POD {
            return self.run_skb(prog, pkt, &SkbIn::default()).map(|(r, _)| r);
        }
        let r = test_run(&self.ebpf, prog, pkt)?;
        self.drain_events();
        Ok(r)
    }

    /// Runs a tc program with `__sk_buff` fields; returns the run and the mark it left. A packet
    /// from a pod comes in on the interface of the pod its source address belongs to, one to a
    /// pod leaves on its destination's, unless `skb` names one.
    fn run_skb(&self, prog: &str, pkt: &[u8], skb: &SkbIn) -> Result<(Run, u32), String> {
        let mut skb = *skb;
        // From outside: in on the node's uplink, where the route back to a remote pod leaves.
        if prog == progs::FROM_WORLD && skb.ifindex == 0 {
            skb.ifindex = self.net.uplink;
        }
        let addr_at = if prog == progs::FROM_POD { 26..30 } else { 30..34 };
        if (prog == progs::FROM_POD || prog == progs::TO_POD) && skb.ifindex == 0 {
            if let Some(a) = pkt.get(addr_at) {
                let a = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                if prog == progs::FROM_POD || self.is_local_pod(a) {
                    skb.ifindex = self.net.pod_iface(a)?;
                }
            }
        }
        let r = test_run_skb(&self.ebpf, prog, pkt, &skb)?;
        self.drain_events();
        Ok(r)
    }

    /// The drop reason whose counter went up since `before` (the stats map's totals).
    fn drop_reason(&self, before: &[u64]) -> Option<&'static str> {
        let now = self.maps.stat_totals();
        dataplane_common::DropReason::ALL.iter().find(|r| now.get(r.stat() as usize) > before.get(r.stat() as usize)).map(|r| r.name())
    }

    fn drain_events(&self) {
        let mut ring = self.events.borrow_mut();
        let Some(ring) = ring.as_mut() else { return };
        while let Some(item) = ring.next() {
            if let Some(ev) = crate::monitor::parse_event(&item) {
                let policy = |id| self.maps.pol_names.get(&id, 0).ok().map(|n| n.as_str().to_string());
                self.verdicts.borrow_mut().insert(crate::monitor::describe_verdict(&ev, policy));
            }
        }
    }

    /// Does the destination have ClientIP session affinity? Then one client's connections all
    /// go to one backend, and a list expectation means "one of these, always the same".
    fn sticky(&self, proto: Proto, dst: SocketAddrV4) -> bool {
        let fe = crate::model::Frontend::internal(crate::model::L4Addr { addr: *dst.ip(), port: dst.port(), proto });
        self.maps.services.get(&crate::reconcile::lb4_key(&fe), 0).is_ok_and(|s| s.affinity_timeout_s > 0)
    }

    /// A packet arriving on an external interface: through XDP first when accelerated (a drop is
    /// final; XDP_TX is a finished translation; a pass goes on to tc), then tc's from-world.
    ///
    /// A GSO super-packet skips XDP: the driver sees its segments one by one, and tc meets it
    /// once GRO merged them.
    fn world(&self, pkt: &[u8], skb: &SkbIn) -> Result<(Run, u32), String> {
        const XDP_DROP: u32 = 1;
        const XDP_PASS: u32 = 2;
        const XDP_TX: u32 = 3;
        if !self.xdp || skb.gso_size != 0 {
            return self.run_skb(progs::FROM_WORLD, pkt, skb);
        }
        let x = self.run(progs::XDP_NODEPORT, pkt)?;
        match x.action {
            XDP_DROP => Ok((Run { action: TC_ACT_SHOT, data: x.data }, 0)),
            XDP_TX => Ok((Run { action: TC_ACT_REDIRECT, data: x.data }, 0)),
            XDP_PASS => self.run_skb(progs::FROM_WORLD, &x.data, skb),
            other => Err(format!("unexpected XDP action {other}")),
        }
    }

    /// The packet of a flow: `size` IP bytes (default: the smallest), and, above the node's
    /// MTU, the GSO super-packet of MTU-sized segments a TCP stack with TSO sends (unless `gso`
    /// is false: one oversized segment).
    fn build(&self, proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), size: Option<u16>, gso: Option<bool>) -> Result<(Vec<u8>, SkbIn), String> {
        let Some(size) = size else { return Ok((build(proto, src, dst), SkbIn::default())) };
        // BPF_PROG_TEST_RUN takes a packet of at most a page.
        const MAX: u16 = 3500;
        let hdr = match proto {
            Proto::Tcp => 40,
            Proto::Udp => 28,
            Proto::Sctp => return Err("size: SCTP packets are sent at their natural size (an INIT chunk)".into()),
        };
        if !(hdr..=MAX).contains(&size) {
            return Err(format!("size: {size} is outside {hdr}..={MAX} bytes (IP headers included; a test run takes at most a page)"));
        }
        let payload = vec![0x5a; (size - hdr) as usize];
        let pkt = match proto {
            Proto::Tcp => packet::tcp_flags(src, dst, "PA", &payload),
            _ => packet::udp(src, dst, &payload),
        };
        if size <= self.mtu || proto != Proto::Tcp || gso == Some(false) {
            return Ok((pkt, SkbIn::default()));
        }
        let seg = (self.mtu - hdr) as u32;
        Ok((pkt, SkbIn { gso_size: seg, gso_segs: (size - hdr) as u32 / seg + 1, ..Default::default() }))
    }

    /// One packet from a pod (through the from-pod program) or from outside the node (through
    /// the from-world program), and, if translated, its reply back along the path it would take.
    #[allow(clippy::too_many_arguments)]
    fn packet(
        &self,
        origin: Origin,
        proto: Proto,
        src: Ipv4Addr,
        sport: u16,
        dst: SocketAddrV4,
        masq: Option<bool>,
        (size, gso, via_if): (Option<u16>, Option<bool>, Option<u32>),
    ) -> Result<Outcome, String> {
        let (pkt, mut skb) = self.build(proto, (src, sport), (*dst.ip(), dst.port()), size, gso)?;
        if let Some(i) = via_if {
            skb.ifindex = i;
        }
        let before = self.maps.stat_totals();
        let (r, mark) = if origin == Origin::External { self.world(&pkt, &skb)? } else { self.run_skb(progs::FROM_POD, &pkt, &skb)? };
        match r.action {
            TC_ACT_SHOT => return Ok(Outcome::Drop(self.drop_reason(&before))),
            TC_ACT_REDIRECT => {
                // Either Ferry's own answer sent back to the source, or a translated packet sent
                // out through a FIB lookup (its source became a node address).
                match packet::refusal(&r.data) {
                    Some(Refusal::TcpRst { to, .. } | Refusal::IcmpUnreachable { to, code: 3, .. }) if to == src => {
                        packet::check_checksums(&r.data).map_err(|e| format!("refusal has a {e}"))?;
                        // The answer leaves the way the packet came: into a client pod through its
                        // veth's to-pod program, where the pod's ingress policy applies.
                        if origin == Origin::Pod {
                            let before = self.maps.stat_totals();
                            let (into, _) = self.run_skb(progs::TO_POD, &r.data, &SkbIn { mark, ..Default::default() })?;
                            if into.action == TC_ACT_SHOT {
                                return Ok(Outcome::Drop(self.drop_reason(&before)));
                            }
                        }
                        return Ok(Outcome::Reject);
                    }
                    Some(Refusal::IcmpUnreachable { to, code: 4, .. }) if to == src => {
                        packet::check_checksums(&r.data).map_err(|e| format!("fragmentation needed has a {e}"))?;
                        return Ok(Outcome::FragNeeded(u16::from_be_bytes([r.data[40], r.data[41]])));
                    }
                    _ => {}
                }
            }
            TC_ACT_OK => {}
            other => return Err(format!("unexpected tc action {other}")),
        }
        let t = packet::try_tuple(&r.data).ok_or("output is not an IPv4 packet")?;
        packet::check_checksums(&r.data)?;
        // Into a pod of this node: through its veth's egress, where ingress policy applies.
        if self.is_local_pod(t.dst) && t.dst != src {
            let before = self.maps.stat_totals();
            let into = self.run(progs::TO_POD, &r.data)?;
            if into.action == TC_ACT_SHOT {
                return Ok(Outcome::Drop(self.drop_reason(&before)));
            }
        }
        if t.dst == *dst.ip() && t.dport == dst.port() {
            // Passed on (or delivered locally) with its destination as it was: its source must be
            // as it was too, unless the flow says it is masqueraded.
            if (t.src, t.sport) != (src, sport) && masq != Some(true) {
                return Err(format!("passed with its source rewritten to {}:{}", t.src, t.sport));
            }
            return Ok(if self.node_ips.contains(dst.ip()) { Outcome::Local } else { Outcome::Pass });
        }
        let masqueraded = t.src != src;
        let hairpin = t.dst == src;
        if !hairpin {
            if let Some(want) = masq {
                if want != masqueraded {
                    return Err(format!("masquerade: expected {want}, source was {} after translation", t.src));
                }
            }
        }
        // The reply from the backend must come back as the Service, to the client: through the
        // backend's own veth if it is a pod of this node; from the node's own stack if the
        // backend is the node (a hostNetwork endpoint): into a client pod through its veth, or
        // out of the external interface; else, when the source was translated to this node, in
        // on the external interface; else on the way into the client pod.
        let (reply, reply_skb) = self.build(proto, (t.dst, t.dport), (t.src, t.sport), size, gso)?;
        let hook = if self.is_local_pod(t.dst) {
            progs::FROM_POD
        } else if self.node_ips.contains(&t.dst) {
            if origin == Origin::Pod { progs::TO_POD } else { progs::TO_WORLD }
        } else if self.node_ips.contains(&t.src) {
            progs::FROM_WORLD
        } else {
            progs::TO_POD
        };
        let (rr, _) = if hook == progs::FROM_WORLD { self.world(&reply, &reply_skb)? } else { self.run_skb(hook, &reply, &reply_skb)? };
        if let Some(Refusal::IcmpUnreachable { code: 4, .. }) = packet::refusal(&rr.data) {
            return Ok(Outcome::Error(format!("the reply from backend {}:{} was answered with ICMP fragmentation needed", t.dst, t.dport)));
        }
        if rr.action != TC_ACT_OK && rr.action != TC_ACT_REDIRECT {
            return Err(format!("reply from {}:{} got tc action {}", t.dst, t.dport, rr.action));
        }
        // A reply translated back on the backend's veth then enters the client pod of this node:
        // through the client's veth, where ingress policy applies (and no second translation).
        let rr = if hook == progs::FROM_POD && origin == Origin::Pod && !hairpin {
            let into = self.run(progs::TO_POD, &rr.data)?;
            if into.action == TC_ACT_SHOT {
                return Err(format!("the reply from backend {}:{} was dropped entering the client", t.dst, t.dport));
            }
            into
        } else {
            rr
        };
        let rt = packet::try_tuple(&rr.data).ok_or("reply output is not IPv4")?;
        packet::check_checksums(&rr.data).map_err(|e| format!("reply: {e}"))?;
        if (rt.src, rt.sport, rt.dst, rt.dport) != (*dst.ip(), dst.port(), src, sport) {
            return Err(format!(
                "reply from backend {}:{} reached the client as {}:{} -> {}:{} instead of from {dst}",
                t.dst, t.dport, rt.src, rt.sport, rt.dst, rt.dport
            ));
        }
        Ok(Outcome::To(SocketAddrV4::new(t.dst, t.dport)))
    }

    fn node_connections(&mut self, proto: Proto, dst: SocketAddrV4, expect: &Expect, attempts: usize) -> Result<Vec<Outcome>, String> {
        if proto == Proto::Sctp {
            return Err("SCTP from the node's own processes is not probed by trace: that needs SCTP sockets, which kernels without the sctp module (like this project's CI machines) do not offer; the socket hooks treat SCTP like TCP. Use a pod source".into());
        }
        if self.cgroup.is_none() {
            self.cgroup = Some(probe::TraceCgroup::create(&mut self.ebpf)?);
        }
        let cg = self.cgroup.as_ref().unwrap();
        let mut listen: BTreeSet<SocketAddrV4> = BTreeSet::from([dst]);
        if let Expect::Backends(b) = expect {
            listen.extend(b.iter().copied());
        }
        let outcomes = probe::run_probe(cg, proto, dst, &listen, attempts)?;
        Ok(outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::To(a) if a == dst => {
                    if self.node_ips.contains(dst.ip()) || dst.ip().is_loopback() {
                        Outcome::Local
                    } else {
                        Outcome::Pass
                    }
                }
                o => o,
            })
            .collect())
    }
}

/// `icmp` or an IP protocol number other than TCP's, UDP's and SCTP's.
fn other_protocol(p: &str) -> Option<u8> {
    match p.to_ascii_lowercase().as_str() {
        "icmp" => Some(dataplane_common::IPPROTO_ICMP),
        n => n.parse::<u8>().ok().filter(|n| !matches!(*n, dataplane_common::IPPROTO_TCP | dataplane_common::IPPROTO_UDP | dataplane_common::IPPROTO_SCTP)),
    }
}

fn build(proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    match proto {
        Proto::Tcp => packet::tcp(src, dst, true, b""),
        Proto::Udp => packet::udp(src, dst, b"ferry-trace"),
        Proto::Sctp => packet::sctp_init(src, dst),
    }
}

/// Compares the outcomes of all attempts with the expectation.
fn judge(name: &str, expect: &Expect, outcomes: &[Outcome], origin: Origin, sticky: bool) -> FlowResult {
    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    for o in outcomes {
        *counts.entry(o.clone()).or_default() += 1;
    }
    let got: Vec<String> = counts.iter().map(|(o, n)| format!("{o} x{n}")).collect();
    let via = match origin {
        Origin::Pod => "tc test-run",
        Origin::Node => "node sockets",
        Origin::External => "test-run from outside",
    };
    let ok = match expect {
        Expect::Backends(want) => {
            let chosen: BTreeSet<SocketAddrV4> = counts.keys().filter_map(|o| if let Outcome::To(a) = o { Some(*a) } else { None }).collect();
            let all_translated = counts.keys().all(|o| matches!(o, Outcome::To(_)));
            if sticky {
                all_translated && chosen.len() == 1 && chosen.is_subset(want)
            } else {
                all_translated && chosen == *want
            }
        }
        Expect::Pass => counts.keys().all(|o| *o == Outcome::Pass),
        Expect::Local => counts.keys().all(|o| *o == Outcome::Local),
        Expect::Drop(None) => counts.keys().all(|o| matches!(o, Outcome::Drop(_))),
        Expect::Drop(Some(want)) => counts.keys().all(|o| matches!(o, Outcome::Drop(Some(r)) if r == want)),
        Expect::Reject => counts.keys().all(|o| *o == Outcome::Reject),
        Expect::FragNeeded => counts.keys().all(|o| matches!(o, Outcome::FragNeeded(_))),
    };
    let sticky = if sticky && matches!(expect, Expect::Backends(_)) { ", sticky: one backend per client" } else { "" };
    let line = format!("{} {name}: expected {expect}, got {} ({via}{sticky})", if ok { "ok  " } else { "FAIL" }, got.join(", "));
    FlowResult { name: name.to_string(), ok, line }
}

/// Runs scenario files; prints one line per flow and the `N passed, M failed` total. Returns
/// whether everything passed. `xdp`: traffic from outside goes through the XDP program first.
pub fn run_files(files: &[PathBuf], xdp: bool) -> bool {
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in files {
        println!("# {}", f.display());
        match run_file(f, xdp) {
            Ok(results) => {
                for r in results {
                    println!("{}", r.line);
                    if r.ok {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
            Err(errors) => {
                for e in errors {
                    println!("FAIL {}: {e}", f.display());
                }
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    failed == 0
}

pub fn run_file(path: &Path, xdp: bool) -> Result<Vec<FlowResult>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let sc: Scenario = serde_yaml::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    if sc.flows.is_empty() {
        return Err(vec!["flows: a scenario needs at least one flow".into()]);
    }
    let mut runner = Runner::load(&sc, &path.display().to_string())?;
    runner.xdp = xdp;
    let mut results = object_error_results(&runner.object_errors, &sc.expect_errors);
    results.extend(sc.flows.iter().map(|f| runner.run_flow(f)));
    Ok(results)
}

/// One line per invalid object (ok when `expectErrors` expects it) and per expectation no
/// error matched.
fn object_error_results(errors: &[String], expected: &[String]) -> Vec<FlowResult> {
    let mut out: Vec<FlowResult> = errors
        .iter()
        .map(|e| {
            let ok = expected.iter().any(|x| e.contains(x.as_str()));
            let line = if ok { format!("ok   invalid object left out, as expected: {e}") } else { format!("FAIL invalid object left out: {e}") };
            FlowResult { name: e.clone(), ok, line }
        })
        .collect();
    for x in expected.iter().filter(|x| !errors.iter().any(|e| e.contains(x.as_str()))) {
        out.push(FlowResult { name: x.clone(), ok: false, line: format!("FAIL expectErrors: no object error contains {x:?}") });
    }
    out
}
