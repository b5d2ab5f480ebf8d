//! `cargo xtask conformance`: Ferry checked flow by flow against the real kube-proxy.
//!
//! For each scenario file, its Services, EndpointSlices and Nodes are written to a real API
//! server (`cargo xtask cluster`). Two copies of the scenario's node are built from network
//! namespaces, the same on both sides: the real kube-proxy (nftables mode) runs on one, Ferry on
//! the other, each with the file's configuration (a KubeProxyConfiguration for kube-proxy, the
//! same settings as flags for Ferry) and each reading the API server. Then every flow is sent for
//! real (kernel TCP and UDP sockets) from where its source lives, on both nodes at once, as many
//! connections as it takes to see every backend. Servers on every backend, pod and outside
//! address answer with the address they were reached on and the source they saw, so each
//! connection says where it went and whether it was masqueraded; a refusal and a drop are told
//! apart by the client's error (connection refused, or nothing).
//!
//! The topology of one node (`N`): `eth0` holds the node's addresses and leads to `W` (the
//! world: clients outside, other nodes' pods, other nodes' hostNetwork endpoints, each an
//! address on W's loopback); each of this node's pods is a namespace of its own behind a veth,
//! routed as a routed CNI does (a /32 route per pod, proxy ARP for its gateway); `cp0` reaches
//! the API server's namespace. Nothing is added to the root namespace.
//!
//! NetworkPolicy is not kube-proxy's job: policies are left out and Ferry runs with
//! `--enable-network-policy=false`, so policy files are compared on their Service paths only.
//! ICMP and other IP protocols are sent from raw sockets: an echo reply or a protocol
//! unreachable from the destination means delivered, a port unreachable means refused. SCTP is
//! a HEARTBEAT over raw sockets (no SCTP module in this kernel), answered by the servers. Spoofed
//! flows (`via`) and files that need a pod bridge are named as not compared, never skipped
//! silently.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_agent::trace::{Expect, Flow, Scenario};
use serde_yaml::Value;

use crate::{
    cluster::ControlPlane,
    lab::{self, Cgroup, Netns, PinDir, Proc, TempDir},
};

/// The API server's own service range (`cargo xtask cluster`): its default ServiceCIDR.
const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// The gateway address pods and the node use (proxy-ARPed on the node, on `w0` in the world).
const GATEWAY: &str = "169.254.1.1";
/// Managed-by label of the EndpointSlices written here: not the EndpointSlice controller's.
const MANAGED_BY: &str = "ferry-conformance";
/// How long a connection attempt waits before it counts as dropped.
const PROBE_TIMEOUT_MS: u64 = 400;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    KubeProxy(KpMode),
    Ferry,
}

/// kube-proxy's `mode`: the conformance run uses nftables; the bench both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KpMode {
    Nftables,
    Iptables,
}

impl Proxy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Proxy::KubeProxy(_) => "kube-proxy",
            Proxy::Ferry => "ferry",
        }
    }
}

/// Where an address lives in a node's topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Node,
    Pod(usize),
    /// A host outside the node: a namespace of its own behind the world's router.
    World(usize),
}

/// Totals over all files.
#[derive(Default)]
pub struct Totals {
    pub agree: usize,
    pub differ: usize,
    pub deliberate: usize,
    /// NetworkPolicy verdicts Ferry gave as the file says (kube-proxy enforces none).
    pub policy: usize,
    pub not_compared: usize,
    pub file_errors: usize,
}

/// What the files need of the addresses: where each lives, the ports servers answer on.
pub(crate) struct Plan {
    node_name: String,
    node_ips: Vec<Ipv4Addr>,
    pod_cidrs: Vec<Cidr>,
    places: BTreeMap<Ipv4Addr, Place>,
    /// This node's pods, by address (index = `Place::Pod`).
    pods: Vec<Ipv4Addr>,
    /// Hosts outside the node, by address (index = `Place::World`).
    remote: Vec<Ipv4Addr>,
    tcp_ports: BTreeSet<u16>,
    udp_ports: BTreeSet<u16>,
    sctp_ports: BTreeSet<u16>,
    /// The prefix of the node's pod interfaces (InterfaceNamePrefix mode names them after it).
    veth_prefix: String,
}

use dataplane_agent::reconcile::Cidr4 as Cidr;

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_sequence).map(|s| s.iter().collect()).unwrap_or_default()
}

/// Every IPv4 address a Service answers on besides node addresses: cluster IPs, external IPs,
/// load-balancer ingress IPs.
fn service_addresses<'a>(services: impl IntoIterator<Item = &'a Value>) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    for s in services {
        let mut add = |v: Option<&str>| {
            // Read as the proxies read them (leading zeros allowed, as in legacy objects).
            if let Some(dataplane_agent::addr::Family::V4(a)) = v.and_then(|a| dataplane_agent::addr::parse_ip(a).ok()) {
                out.insert(a);
            }
        };
        add(str_at(s, &["spec", "clusterIP"]));
        seq_at(s, &["spec", "clusterIPs"]).into_iter().for_each(|v| add(v.as_str()));
        seq_at(s, &["spec", "externalIPs"]).into_iter().for_each(|v| add(v.as_str()));
        seq_at(s, &["status", "loadBalancer", "ingress"]).into_iter().for_each(|v| add(str_at(v, &["ip"])));
    }
    out
}

/// Why a flow cannot be sent for real here, if it cannot.
fn not_comparable(flow: &Flow) -> Option<String> {
    match flow.proto.as_str() {
        "tcp" | "udp" | "icmp" | "sctp" => {}
        p if p.parse::<u8>().is_ok_and(|n| ![6, 17, 132].contains(&n)) => {}
        p => return Some(format!("proto {p}: not a protocol this run sends")),
    }
    if flow.via.is_some() {
        return Some("a spoofed packet (via): no socket sends one; the packet tests cover it".into());
    }
    if flow.destination.starts_with('[') || flow.source.contains(':') {
        return Some("IPv6: not run yet".into());
    }
    if matches!(Expect::parse(&flow.expect), Ok(Expect::FragNeeded)) {
        return Some("FRAG_NEEDED: needs a packet above the node's path MTU; the packet tests cover it".into());
    }
    None
}

/// How one flow came out.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Both proxies did the same, and it is what the file says.
    Agree,
    /// A NetworkPolicy verdict Ferry gave as the file says (kube-proxy enforces none).
    Policy,
    /// Marked `kubeProxyDiffers`; Ferry did what the file says, kube-proxy something else.
    Deliberate(String),
    /// Anything else, with what each did and what the file says.
    Differ(String),
}

/// Judges one flow: what kube-proxy (`kp`) and Ferry (`fy`) did, each a set of outcomes over
/// the flow's connections, against each other and against the file.
fn judge(f: &Flow, expect: &Option<Expect>, policy_file: bool, sticky: bool, src_place: Place, kp: &BTreeSet<String>, fy: &BTreeSet<String>) -> Verdict {
    let show = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
    let (kp_file, fy_file) = (against_file(f, expect, src_place, sticky, kp), against_file(f, expect, src_place, sticky, fy));
    // Ferry, which enforces the file's policies, is held to the file alone on a policy verdict.
    if policy_file && matches!(expect, Some(Expect::Drop(Some(r))) if r.starts_with("policy_")) {
        return match fy_file {
            None => Verdict::Policy,
            Some(expected) => Verdict::Differ(format!("Ferry did {{{}}}, the file expects {expected} (a NetworkPolicy verdict; kube-proxy enforces none)", show(fy))),
        };
    }
    let agree = if sticky && kp.len() == 1 && fy.len() == 1 {
        // One backend each (which one is each proxy's choice; the file holds both to its list).
        kp.iter().next().map(|o| o.contains("masq")) == fy.iter().next().map(|o| o.contains("masq"))
    } else {
        kp == fy
    };
    match (agree, &f.kube_proxy_differs, fy_file) {
        (true, None, None) if kp_file.is_none() => Verdict::Agree,
        // Alike, and not what the file says: a wrong expectation, or a flow this topology cannot
        // deliver. Either way it must be looked at.
        (true, None, fy_file) => Verdict::Differ(format!("both did {{{}}}, the file expects {}", show(kp), fy_file.or(kp_file).unwrap_or_default())),
        (false, Some(why), None) => Verdict::Deliberate(why.clone()),
        (false, Some(_), Some(expected)) => Verdict::Differ(format!("marked kubeProxyDiffers, but Ferry did {{{}}} where the file expects {expected}", show(fy))),
        (true, Some(_), _) => Verdict::Differ(format!("marked kubeProxyDiffers, but both did {{{}}}", show(kp))),
        (false, None, _) => {
            let expected = expect.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "?".into());
            Verdict::Differ(format!("kube-proxy {{{}}}, Ferry {{{}}} (the file expects {expected})", show(kp), show(fy)))
        }
    }
}

/// Does what one proxy did match the file's expectation? `None` if it does, else what the file
/// expected. Each proxy is held to the file, not only to the other: two proxies that fail alike
/// (a harness that cannot deliver a flow, say) must not pass as agreeing.
fn against_file(flow: &Flow, expect: &Option<Expect>, src_place: Place, sticky: bool, seen: &BTreeSet<String>) -> Option<String> {
    let Some(expect) = expect else { return Some(format!("an expectation this run does not understand: {:?}", flow.expect)) };
    // Masquerade is visible only for sources off the node (the node's own source is a node
    // address either way).
    let masq_ok = |o: &str| match flow.masquerade {
        Some(m) if src_place != Place::Node => o.ends_with(" masqueraded") == m,
        _ => true,
    };
    let bare = |o: &str| o.trim_end_matches(" masqueraded").to_string();
    let ok = match expect {
        Expect::Backends(b) => {
            let want: BTreeSet<String> = b.iter().map(|a| a.to_string()).collect();
            let got: BTreeSet<String> = seen.iter().map(|o| bare(o)).collect();
            // With ClientIP affinity one client sees one backend; otherwise, over about 12
            // connections per backend, every backend and no other.
            let set_ok = if sticky { got.len() == 1 && got.is_subset(&want) } else { got == want };
            set_ok && seen.iter().all(|o| masq_ok(o))
        }
        Expect::Pass | Expect::Local => {
            let want = if *expect == Expect::Pass { "PASS" } else { "LOCAL" };
            seen.iter().all(|o| bare(o) == want && masq_ok(o))
        }
        Expect::Drop(_) => seen.len() == 1 && seen.contains("DROP"),
        Expect::Reject => seen.len() == 1 && seen.contains("REJECT"),
        Expect::FragNeeded => true,
    };
    let masq = match flow.masquerade {
        Some(true) if src_place != Place::Node => ", masqueraded",
        Some(false) if src_place != Place::Node => ", not masqueraded",
        _ => "",
    };
    (!ok).then(|| format!("{expect}{masq}"))
}

impl Plan {
    pub(crate) fn new(sc: &Scenario) -> Plan {
        let node_ips: Vec<Ipv4Addr> = sc.node.ips.iter().filter_map(|a| a.parse().ok()).collect();
        let pod_cidrs: Vec<Cidr> = sc.node.pod_cidr.iter().chain(&sc.node.pod_cidrs).filter_map(|c| c.trim().parse::<Cidr>().ok()).collect();
        // Pods the file places on this node by name.
        let listed_local: BTreeSet<Ipv4Addr> = sc
            .pods
            .iter()
            .filter(|p| str_at(p, &["spec", "nodeName"]) == Some(sc.node.name.as_str()))
            .flat_map(|p| str_at(p, &["status", "podIP"]).into_iter().chain(seq_at(p, &["status", "podIPs"]).into_iter().filter_map(|v| str_at(v, &["ip"]))))
            .filter_map(|a| a.parse().ok())
            .collect();
        let vips = service_addresses(&sc.services);
        let veth_prefix = match sc.config.detect_local_mode.as_deref() {
            Some("InterfaceNamePrefix") => sc.config.pod_interface_name_prefix.clone().unwrap_or_else(|| "veth".into()),
            _ => "veth".into(),
        };
        let mut plan = Plan {
            node_name: sc.node.name.clone(),
            node_ips,
            pod_cidrs,
            places: BTreeMap::new(),
            pods: Vec::new(),
            remote: Vec::new(),
            tcp_ports: BTreeSet::new(),
            udp_ports: BTreeSet::new(),
            sctp_ports: BTreeSet::new(),
            veth_prefix,
        };
        let host = |plan: &mut Plan, a: Ipv4Addr| {
            if a.is_loopback() || a.is_unspecified() || vips.contains(&a) || plan.places.contains_key(&a) {
                return;
            }
            let place = if plan.node_ips.contains(&a) {
                Place::Node
            } else if listed_local.contains(&a) || plan.pod_cidrs.iter().any(|c| c.contains(a)) {
                plan.pods.push(a);
                Place::Pod(plan.pods.len() - 1)
            } else {
                plan.remote.push(a);
                Place::World(plan.remote.len() - 1)
            };
            plan.places.insert(a, place);
        };
        for a in plan.node_ips.clone() {
            host(&mut plan, a);
        }
        for slice in &sc.endpoint_slices {
            if str_at(slice, &["addressType"]).is_some_and(|t| t != "IPv4") {
                continue;
            }
            for e in seq_at(slice, &["endpoints"]) {
                for a in seq_at(e, &["addresses"]).into_iter().filter_map(|v| v.as_str()?.parse().ok()) {
                    host(&mut plan, a);
                }
            }
            for p in seq_at(slice, &["ports"]) {
                let Some(port) = p.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()) else { continue };
                match str_at(p, &["protocol"]).unwrap_or("TCP") {
                    "UDP" => plan.udp_ports.insert(port),
                    "SCTP" => plan.sctp_ports.insert(port),
                    _ => plan.tcp_ports.insert(port),
                };
            }
        }
        for f in sc.flows.iter().filter(|f| not_comparable(f).is_none()) {
            if let Ok(src) = f.source.parse::<Ipv4Addr>() {
                host(&mut plan, src);
            }
            let Some(dst) = destination(&f.destination) else { continue };
            let mut ports = vec![dst.port()];
            match Expect::parse(&f.expect) {
                Ok(Expect::Pass) => host(&mut plan, *dst.ip()),
                Ok(Expect::Backends(b)) => {
                    for a in b {
                        host(&mut plan, *a.ip());
                        ports.push(a.port());
                    }
                }
                _ => {}
            }
            match f.proto.as_str() {
                "udp" => plan.udp_ports.extend(ports),
                "tcp" => plan.tcp_ports.extend(ports),
                "sctp" => plan.sctp_ports.extend(ports),
                // ICMP and other protocols are answered by the hosts' kernels.
                _ => {}
            }
        }
        plan
    }

    /// The index of the pod namespace holding `a` (`Side::pods`), if a pod of this node does.
    pub(crate) fn pod(&self, a: Ipv4Addr) -> Option<usize> {
        match self.place(a) {
            Place::Pod(i) => Some(i),
            _ => None,
        }
    }

    fn place(&self, a: Ipv4Addr) -> Place {
        if a.is_loopback() {
            return Place::Node;
        }
        // Unknown addresses are sent from the world's router itself.
        self.places.get(&a).copied().unwrap_or(Place::World(usize::MAX))
    }
}

/// One copy of the scenario's node, with its proxy; everything removed on drop (the proxy and
/// servers first, then the namespaces, whose removal takes their links along).
pub(crate) struct Side {
    proxy: Proxy,
    procs: Vec<Proc>,
    pin: Option<PinDir>,
    cgroup: Option<Cgroup>,
    pub(crate) node: Netns,
    pub(crate) world: Netns,
    pub(crate) pods: Vec<Netns>,
    remote: Vec<Netns>,
    dir: TempDir,
}

impl Drop for Side {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        // What the proxy left running in the node: an iptables-restore of a large rule set
        // outlives a kube-proxy stopped in the middle of its sync.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.node.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(pin) = &self.pin {
            let _ = self.node.cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--cleanup", "--cgroup", "none", "--pin-dir", pin.path.to_str().unwrap()]).output();
        }
    }
}

fn ip(ns: &Netns, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    let out = ns.cmd(&full).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {} in {}: {}", args.join(" "), ns.name, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn host_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A host behind `router`: a namespace of its own holding `addr` on its `eth0`, the router's
/// side `ifname` with a /32 route to it and proxy ARP for the host's gateway.
fn leaf(router: &Netns, name: &str, ifname: &str, addr: Ipv4Addr) -> Result<Netns, String> {
    let host = Netns::new(name.to_string());
    host_ip(&["link", "add", ifname, "netns", &router.name, "type", "veth", "peer", "name", "eth0", "netns", &host.name])?;
    ip(&host, &["link", "set", "eth0", "up"])?;
    ip(&host, &["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
    ip(&host, &["route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink"])?;
    ip(router, &["link", "set", ifname, "up"])?;
    ip(router, &["route", "add", &format!("{addr}/32"), "dev", ifname])?;
    router.sysctl(&format!("net.ipv4.conf.{ifname}.proxy_arp=1"));
    // Answered at once: the default delays proxy ARP answers by up to 0.8 s, longer than a probe
    // waits.
    router.sysctl(&format!("net.ipv4.neigh.{ifname}.proxy_delay=0"));
    Ok(host)
}

/// Starts `conformance serve` in `ns` for `addrs` and the plan's ports; waits for its "ready".
fn serve(ns: &Netns, addrs: &[Ipv4Addr], plan: &Plan, what: String) -> Result<Proc, String> {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let tcp: Vec<String> = plan.tcp_ports.iter().map(|p| p.to_string()).collect();
    let udp: Vec<String> = plan.udp_ports.iter().map(|p| p.to_string()).collect();
    let sctp: Vec<String> = plan.sctp_ports.iter().map(|p| p.to_string()).collect();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = ns
        .cmd(&[exe.to_str().unwrap(), "serve", &addrs.join(","), &tcp.join(","), &udp.join(","), &sctp.join(",")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).map_err(|e| format!("{what}: {e}"))?;
    let proc = Proc { child, what: what.clone() };
    if line.trim() != "ready" {
        return Err(format!("{what}: did not start ({line:?})"));
    }
    Ok(proc)
}

impl Side {
    /// Builds the node, its pods and the world, joined to the control plane; starts servers.
    pub(crate) fn build(proxy: Proxy, id: &str, cp: &ControlPlane, link: usize, plan: &Plan) -> Result<Side, String> {
        let tag = match proxy {
            Proxy::KubeProxy(KpMode::Nftables) => "k",
            Proxy::KubeProxy(KpMode::Iptables) => "i",
            Proxy::Ferry => "f",
        };
        let dir = TempDir::new(&format!("conf-{id}-{tag}"));
        let node = Netns::new(format!("fc-{id}-{tag}n"));
        let world = Netns::new(format!("fc-{id}-{tag}w"));
        let mut side = Side { proxy, procs: Vec::new(), pin: None, cgroup: None, node, world, pods: Vec::new(), remote: Vec::new(), dir };
        let (n, w) = (side.node.name.clone(), side.world.name.clone());
        for ns in [&side.node, &side.world] {
            // No ICMP rate limit: refusals to one client in quick succession are all answered
            // (kube-proxy's come from the kernel, which limits them per destination).
            for kv in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0", "net.ipv4.icmp_ratelimit=0", "net.ipv4.icmp_msgs_per_sec=100000", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"] {
                ns.sysctl(kv);
            }
        }
        // The control plane's link: cp0 in the node, `fcl<link>` in the control plane's namespace.
        let cp_if = format!("fcl{id}{tag}");
        let cp_addr = format!("10.250.{}.{}", 1 + link / 200, 2 + link % 200);
        host_ip(&["link", "add", &cp_if, "netns", &cp.ns, "type", "veth", "peer", "name", "cp0", "netns", &n])?;
        host_ip(&["-n", &cp.ns, "link", "set", &cp_if, "up"])?;
        host_ip(&["-n", &cp.ns, "route", "add", &format!("{cp_addr}/32"), "dev", &cp_if])?;
        ip(&side.node, &["link", "set", "cp0", "up"])?;
        ip(&side.node, &["addr", "add", &format!("{cp_addr}/32"), "dev", "cp0"])?;
        ip(&side.node, &["route", "add", "10.250.0.1/32", "dev", "cp0"])?;
        // eth0 to the world.
        host_ip(&["link", "add", "eth0", "netns", &n, "type", "veth", "peer", "name", "w0", "netns", &w])?;
        ip(&side.node, &["link", "set", "eth0", "up"])?;
        ip(&side.world, &["link", "set", "w0", "up"])?;
        ip(&side.world, &["addr", "add", &format!("{GATEWAY}/32"), "dev", "w0"])?;
        for a in &plan.node_ips {
            ip(&side.node, &["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
            ip(&side.world, &["route", "add", &format!("{a}/32"), "dev", "w0"])?;
        }
        ip(&side.node, &["route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink"])?;
        if let Some(first) = plan.node_ips.first() {
            ip(&side.world, &["route", "add", "default", "via", &first.to_string(), "dev", "w0", "onlink"])?;
        }
        // Pods: a namespace each, routed as a routed CNI does. Hosts outside: the same, behind
        // the world's router (so that a client and a backend outside are two hosts, and a reply
        // between them passes the node as it would).
        for (i, a) in plan.pods.iter().enumerate() {
            let veth = format!("{}p{i}", plan.veth_prefix);
            side.pods.push(leaf(&side.node, &format!("fc-{id}-{tag}p{i}"), &veth, *a)?);
        }
        for (i, a) in plan.remote.iter().enumerate() {
            side.remote.push(leaf(&side.world, &format!("fc-{id}-{tag}x{i}"), &format!("x{i}"), *a)?);
            // What one host outside sends to another passes the node (as pods of other nodes
            // reach each other through their nodes): the reply of a backend outside to a client
            // outside whose packet the node translated comes back to be translated again.
            if let Some(first) = plan.node_ips.first() {
                ip(&side.world, &["rule", "add", "iif", &format!("x{i}"), "lookup", "100", "pref", "100"])?;
                if i == 0 {
                    ip(&side.world, &["route", "add", "default", "via", &first.to_string(), "dev", "w0", "onlink", "table", "100"])?;
                }
            }
        }
        // Servers: the node (its addresses and loopback), each pod, the world.
        let mut node_addrs = plan.node_ips.clone();
        node_addrs.push(Ipv4Addr::LOCALHOST);
        side.procs.push(serve(&side.node, &node_addrs, plan, format!("server on {n}"))?);
        for (i, a) in plan.pods.iter().enumerate() {
            let p = serve(&side.pods[i], &[*a], plan, format!("server in pod {a}"))?;
            side.procs.push(p);
        }
        for (i, a) in plan.remote.iter().enumerate() {
            let p = serve(&side.remote[i], &[*a], plan, format!("server on {a} outside"))?;
            side.procs.push(p);
        }
        Ok(side)
    }

    pub(crate) fn log(&self) -> PathBuf {
        self.dir.path.join(format!("{}.log", self.proxy.name()))
    }

    /// Starts the proxy with the file's configuration.
    pub(crate) fn start_proxy(&mut self, sc: &Scenario, plan: &Plan, cp: &ControlPlane, kube_proxy: &Path) -> Result<(), String> {
        let kubeconfig = self.dir.path.join("kubeconfig");
        let admin = std::fs::read_to_string(cp.dir.path.join("admin.kubeconfig")).map_err(|e| e.to_string())?;
        std::fs::write(&kubeconfig, admin.replace("https://127.0.0.1:6443", "https://10.250.0.1:6443")).map_err(|e| e.to_string())?;
        let cfg = &sc.config;
        let node_port_addresses: Vec<String> = if cfg.node_port_addresses.is_empty() {
            // The scenario's default (every address of node.ips), said the same way to both.
            plan.node_ips.iter().map(|a| format!("{a}/32")).collect()
        } else {
            cfg.node_port_addresses.iter().filter(|a| !a.contains(':')).cloned().collect()
        };
        let cluster_cidr = cfg.cluster_cidr.clone().or_else(|| cfg.cluster_cidrs.iter().find(|c| !c.contains(':')).cloned());
        let mode = cfg.detect_local_mode.clone().unwrap_or_else(|| "ClusterCIDR".into());
        let log = std::fs::File::create(self.log()).map_err(|e| e.to_string())?;
        let child = match self.proxy {
            Proxy::KubeProxy(kp_mode) => {
                let mode_name = match kp_mode {
                    KpMode::Nftables => "nftables",
                    KpMode::Iptables => "iptables",
                };
                let mut c = serde_json::json!({
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": mode_name,
                    "clientConnection": {"kubeconfig": kubeconfig},
                    "hostnameOverride": plan.node_name,
                    "metricsBindAddress": "127.0.0.1:10249",
                    "healthzBindAddress": "127.0.0.1:10256",
                    "nodePortAddresses": node_port_addresses,
                    "detectLocalMode": mode,
                    "detectLocal": {"bridgeInterface": cfg.pod_bridge_interface.clone().unwrap_or_default(), "interfaceNamePrefix": cfg.pod_interface_name_prefix.clone().unwrap_or_default()},
                    "conntrack": {"maxPerCore": 0, "min": 0},
                });
                // The mode's own block (the other mode's stays at its defaults).
                c[mode_name] = serde_json::json!({"masqueradeAll": cfg.masquerade_all, "minSyncPeriod": "100ms"});
                if let Some(cc) = &cluster_cidr {
                    c["clusterCIDR"] = cc.clone().into();
                }
                let path = self.dir.path.join("kube-proxy.yaml");
                std::fs::write(&path, c.to_string()).map_err(|e| e.to_string())?;
                let mut args = vec![kube_proxy.to_str().unwrap(), "--config", path.to_str().unwrap(), "-v=2"];
                if has_zone(sc) {
                    // What `topology_synced` reads: the proxier's V(4) lines as well.
                    args.push("--vmodule=proxier=4");
                }
                self.node.cmd(&args).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn()
            }
            Proxy::Ferry => {
                let pin = PinDir { path: PathBuf::from(format!("/sys/fs/bpf/{}", self.node.name)) };
                let root = dataplane_agent::attach::cgroup2_root().ok_or("no cgroup v2 mount")?;
                let cgroup = Cgroup::new(root.join(&self.node.name));
                let mut args: Vec<String> = ["run", "--node", &plan.node_name, "--kubeconfig", kubeconfig.to_str().unwrap(), "--pin-dir", pin.path.to_str().unwrap()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                args.extend(["--cgroup".into(), cgroup.path.display().to_string(), "--pod-interfaces".into(), format!("{}p*", plan.veth_prefix)]);
                args.extend(["--external-interfaces".into(), "eth0".into(), format!("--enable-network-policy={}", cfg.enable_network_policy), "--min-sync-period-ms".into(), "100".into()]);
                // No limit on refusals, as the kernel's ICMP rate limit is lifted for kube-proxy.
                args.extend(["--refusals-per-second".into(), "1000000".into(), "--refusal-burst".into(), "1000000".into()]);
                args.extend(["--metrics-bind-address".into(), "127.0.0.1:10249".into(), "--healthz-bind-address".into(), "127.0.0.1:10256".into()]);
                // No --service-cidr: the ranges come from the ServiceCIDR objects, as kube-proxy's do.
                args.extend(["--detect-local-mode".into(), mode]);
                args.extend(["--nodeport-addresses".into(), node_port_addresses.join(",")]);
                if let Some(cc) = &cluster_cidr {
                    args.extend(["--cluster-cidr".into(), cc.clone()]);
                }
                if let Some(b) = &cfg.pod_bridge_interface {
                    args.extend(["--pod-bridge-interface".into(), b.clone()]);
                }
                if let Some(p) = &cfg.pod_interface_name_prefix {
                    args.extend(["--pod-interface-name-prefix".into(), p.clone()]);
                }
                if cfg.masquerade_all {
                    args.push("--masquerade-all".into());
                }
                let bin = lab::agent_bin();
                let mut full = vec![bin.to_str().unwrap()];
                full.extend(args.iter().map(String::as_str));
                let c = self.node.cmd(&full).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn();
                self.pin = Some(pin);
                self.cgroup = Some(cgroup);
                c
            }
        }
        .map_err(|e| format!("starting {}: {e}", self.proxy.name()))?;
        self.procs.push(Proc { child, what: self.proxy.name().into() });
        Ok(())
    }

    /// Waits (at most 60 s) until the proxy says it programmed its first full sync; with `zone`
    /// (this node's Node has a zone label), kube-proxy's first sync with it (see
    /// [`topology_synced`]).
    fn wait_synced(&mut self, zone: bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let kp_topology = match self.proxy {
                Proxy::KubeProxy(_) if zone => topology_synced(&std::fs::read_to_string(self.log()).unwrap_or_default()),
                _ => true,
            };
            if kp_topology && metric(&self.metrics()?, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0.0 {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline || interrupted() {
                return Err(format!("{} made no sync within 60 s: {}", self.proxy.name(), tail(&self.log())));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The proxy's /metrics, from inside the node.
    pub(crate) fn metrics(&self) -> Result<String, String> {
        let out = self.node.cmd(&["curl", "-s", "--max-time", "2", "http://127.0.0.1:10249/metrics"]).output().map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An error (with the log's last lines) once the proxy has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), String> {
        if let Some(p) = self.procs.last_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                return Err(format!("{} exited ({st}): {}", self.proxy.name(), tail(&self.log())));
            }
        }
        Ok(())
    }

    fn netns_of(&self, place: Place) -> &Netns {
        match place {
            Place::Node => &self.node,
            Place::World(i) => self.remote.get(i).unwrap_or(&self.world),
            Place::Pod(i) => &self.pods[i],
        }
    }

    /// Starts `count` connections of the flow from where its source lives.
    fn probe(&self, plan: &Plan, src: Ipv4Addr, dst: SocketAddrV4, proto: &str, count: usize) -> Result<std::process::Child, String> {
        let place = plan.place(src);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let cgroup = match (&self.cgroup, place) {
            (Some(cg), Place::Node) => cg.path.display().to_string(),
            _ => "-".into(),
        };
        self.netns_of(place)
            .cmd(&[exe.to_str().unwrap(), "probe", &src.to_string(), &dst.to_string(), proto, &count.to_string(), &PROBE_TIMEOUT_MS.to_string(), &cgroup])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("probe: {e}"))
    }
}

/// Does the file give this node's Node a zone label?
fn has_zone(sc: &Scenario) -> bool {
    sc.nodes.iter().any(|n| str_at(n, &["metadata", "name"]) == Some(sc.node.name.as_str()) && str_at(n, &["metadata", "labels", "topology.kubernetes.io/zone"]).is_some())
}

/// Has kube-proxy (its log at `-v=2 --vmodule=proxier=4`) completed a sync that began after it
/// took this node's topology labels? Its first sync waits for Services and EndpointSlices only:
/// the Node's labels come through a handler of their own, which may run after that sync (the
/// sync then ignores zone hints, "node is missing label") and asks for another one. A
/// comparison must wait for that one.
fn topology_synced(log: &str) -> bool {
    // Its IPv4 proxier's lines (a dual-stack kube-proxy logs the same for IPv6).
    let log: String = log.lines().filter(|l| l.contains("ipFamily=\"IPv4\"")).flat_map(|l| [l, "\n"]).collect();
    let Some(at) = log.find("\"Updated proxier node topology labels\"") else { return false };
    let after = &log[at..];
    after.find("\"Syncing nftables rules\"").or_else(|| after.find("\"Syncing iptables rules\"")).is_some_and(|s| after[s..].contains("\"SyncProxyRules complete\""))
}

/// A metric's value in a /metrics text: its IPv4 (or unlabelled) sample (kube-proxy labels its
/// sync metrics with the IP family; the value is the line's last field); 0 when absent.
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with([' ', '{'])) && !l.contains("IPv6"))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("{} (log {}):\n{}", "last lines", path.display(), lines[lines.len().saturating_sub(15)..].join("\n"))
}

/// The API objects of a file, written to the API server after everything of the previous file
/// is gone. Returns the objects the API server refused.
fn load(cp: &ControlPlane, sc: &Scenario) -> Result<Vec<String>, String> {
    let mut refused = Vec::new();
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    for o in sc.services.iter().chain(&sc.endpoint_slices).chain(&sc.pods).chain(&sc.network_policies) {
        namespaces.insert(str_at(o, &["metadata", "namespace"]).unwrap_or("default").to_string());
    }
    namespaces.extend(sc.namespaces.iter().filter_map(|n| str_at(n, &["metadata", "name"]).map(str::to_string)));
    for ns in &namespaces {
        // Namespaces stay from file to file (one takes long to go); their labels are the file's
        // (which policies select), or none but the name.
        let labels = sc.namespaces.iter().find(|n| str_at(n, &["metadata", "name"]) == Some(ns.as_str())).and_then(|n| n["metadata"].get("labels").cloned());
        let mut labels: serde_json::Map<String, serde_json::Value> = labels.and_then(|l| serde_json::to_value(l).ok()).and_then(|v| v.as_object().cloned()).unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.clone().into());
        let path = format!("/api/v1/namespaces/{ns}");
        let (code, body) = cp.api("GET", &path, None);
        let (code, body) = match code {
            404 => cp.api("POST", "/api/v1/namespaces", Some(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}).to_string())),
            200 => {
                let mut v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("namespace {ns}: {e}"))?;
                v["metadata"]["labels"] = serde_json::Value::Object(labels);
                cp.api("PUT", &path, Some(&v.to_string()))
            }
            _ => (code, body),
        };
        if ![200, 201].contains(&code) {
            return Err(format!("namespace {ns}: {code} {body}"));
        }
    }
    // ServiceCIDRs: the file's, and where it names none, one per /16 of its cluster IPs outside
    // the API server's own range (the API server allocates cluster IPs from ServiceCIDRs only).
    let mut cidrs: Vec<String> = sc.config.service_cidrs.iter().filter(|c| !c.contains(':')).cloned().collect();
    let covered = |cidrs: &[String], a: Ipv4Addr| cidrs.iter().chain(std::iter::once(&DEFAULT_SERVICE_CIDR.to_string())).filter_map(|c| c.trim().parse::<Cidr>().ok()).any(|c| c.contains(a));
    for s in &sc.services {
        for a in str_at(s, &["spec", "clusterIP"]).into_iter().chain(seq_at(s, &["spec", "clusterIPs"]).into_iter().filter_map(|v| v.as_str())) {
            if let Ok(a) = a.parse::<Ipv4Addr>() {
                if !covered(&cidrs, a) {
                    let o = a.octets();
                    cidrs.push(format!("{}.{}.0.0/16", o[0], o[1]));
                }
            }
        }
    }
    // Named after their CIDR: one the previous file had too is kept (a ServiceCIDR takes about
    // 10 s to go).
    let names: Vec<String> = cidrs.iter().map(|c| format!("conformance-{}", c.replace(['.', '/'], "-"))).collect();
    reset(cp, &names)?;
    for (name, c) in names.iter().zip(&cidrs) {
        let obj = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": name}, "spec": {"cidrs": [c]}});
        let (code, body) = cp.api("POST", "/apis/networking.k8s.io/v1/servicecidrs", Some(&obj.to_string()));
        if code != 201 && code != 409 {
            refused.push(format!("ServiceCIDR {c}: {}", api_message(&body)));
        }
    }
    // This node, and the file's other nodes.
    // This node: the file's object for it (labels, zone) if it has one, with `node`'s addresses
    // and podCIDR where that object has none (kube-proxy waits for its node's addresses).
    let mut nodes: Vec<Value> = sc.nodes.iter().filter(|n| str_at(n, &["metadata", "name"]) != Some(sc.node.name.as_str())).cloned().collect();
    let mut n: Value = sc
        .nodes
        .iter()
        .find(|n| str_at(n, &["metadata", "name"]) == Some(sc.node.name.as_str()))
        .cloned()
        .unwrap_or_else(|| serde_yaml::from_str(&format!("{{metadata: {{name: \"{}\"}}}}", sc.node.name)).unwrap());
    for key in ["spec", "status"] {
        if n.get(key).is_none() {
            n[key] = Value::Mapping(Default::default());
        }
    }
    if seq_at(&n, &["status", "addresses"]).is_empty() {
        let addresses: Vec<Value> = sc.node.ips.iter().map(|a| serde_yaml::from_str(&format!("{{type: InternalIP, address: \"{a}\"}}")).unwrap()).collect();
        n["status"]["addresses"] = Value::Sequence(addresses);
    }
    if let (None, Some(pc)) = (str_at(&n, &["spec", "podCIDR"]), &sc.node.pod_cidr) {
        n["spec"]["podCIDR"] = pc.clone().into();
    }
    nodes.push(n);
    for n in &nodes {
        let name = str_at(n, &["metadata", "name"]).unwrap_or("?").to_string();
        create(cp, "/api/v1/nodes", "v1", "Node", n, &format!("Node {name}"), &mut refused, |_| {});
    }
    // Services without selectors: their endpoints are the file's slices, not the controller's.
    for s in &sc.services {
        let ns = str_at(s, &["metadata", "namespace"]).unwrap_or("default");
        let name = format!("Service {ns}/{}", str_at(s, &["metadata", "name"]).unwrap_or("?"));
        // A cluster IP just put in a new ServiceCIDR is refused until that CIDR is ready.
        let again = |e: &str| e.contains("does not match the current range");
        create_retrying(Duration::from_secs(10), &again, &mut refused, |r| {
            create(cp, &format!("/api/v1/namespaces/{ns}/services"), "v1", "Service", s, &name, r, |o| {
                let lb_local = str_at(o, &["spec", "type"]) == Some("LoadBalancer") && str_at(o, &["spec", "externalTrafficPolicy"]) == Some("Local");
                if let Some(spec) = o.get_mut("spec").and_then(Value::as_mapping_mut) {
                    spec.remove("selector");
                    // kube-proxy's unit tests set it where the API server allows it only on
                    // LoadBalancers with externalTrafficPolicy Local; it changes no packet.
                    if !lb_local {
                        spec.remove("healthCheckNodePort");
                    }
                }
            })
        });
    }
    for e in &sc.endpoint_slices {
        let ns = str_at(e, &["metadata", "namespace"]).unwrap_or("default");
        let name = format!("EndpointSlice {ns}/{}", str_at(e, &["metadata", "name"]).unwrap_or("?"));
        create(cp, &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"), "discovery.k8s.io/v1", "EndpointSlice", e, &name, &mut refused, |o| {
            o["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = MANAGED_BY.into();
        });
    }
    // Pods (for the policies that select them): bound to their node, with the file's status, as
    // a kubelet would report it; nothing runs them.
    for p in &sc.pods {
        let ns = str_at(p, &["metadata", "namespace"]).unwrap_or("default");
        let name = format!("Pod {ns}/{}", str_at(p, &["metadata", "name"]).unwrap_or("?"));
        let mut pod = p.clone();
        if let Some(ip) = str_at(p, &["status", "podIP"]).map(str::to_string) {
            if seq_at(p, &["status", "podIPs"]).is_empty() {
                pod["status"]["podIPs"] = serde_yaml::from_str(&format!("[{{ip: \"{ip}\"}}]")).unwrap();
            }
        }
        // The namespace's default ServiceAccount, which admission wants, comes a moment after
        // the namespace.
        let again = |e: &str| e.contains("serviceaccount") && e.contains("not found");
        create_retrying(Duration::from_secs(20), &again, &mut refused, |r| {
            create(cp, &format!("/api/v1/namespaces/{ns}/pods"), "v1", "Pod", &pod, &name, r, |o| {
                for c in o["spec"].get_mut("containers").and_then(Value::as_sequence_mut).into_iter().flatten() {
                    if c.get("image").is_none() {
                        c["image"] = "registry.k8s.io/pause:3.10".into();
                    }
                }
            })
        });
    }
    for np in &sc.network_policies {
        let ns = str_at(np, &["metadata", "namespace"]).unwrap_or("default");
        let name = format!("NetworkPolicy {ns}/{}", str_at(np, &["metadata", "name"]).unwrap_or("?"));
        create(cp, &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"), "networking.k8s.io/v1", "NetworkPolicy", np, &name, &mut refused, |_| {});
    }
    Ok(refused)
}

/// Runs `attempt` (which adds what the API server refused to its list) again while a refusal
/// is one that passes (`again`), for at most `within`; then keeps its refusals.
fn create_retrying(within: Duration, again: &dyn Fn(&str) -> bool, refused: &mut Vec<String>, mut attempt: impl FnMut(&mut Vec<String>)) {
    let deadline = Instant::now() + within;
    loop {
        let mut r = Vec::new();
        attempt(&mut r);
        if r.iter().any(|e| again(e)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        refused.extend(r);
        return;
    }
}

fn api_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["message"].as_str().map(str::to_string)).unwrap_or_else(|| body.chars().take(300).collect())
}

/// Creates one object (its status written through /status afterwards, as controllers do).
fn create(cp: &ControlPlane, path: &str, api_version: &str, kind: &str, obj: &Value, name: &str, refused: &mut Vec<String>, edit: impl Fn(&mut Value)) {
    let mut o = obj.clone();
    o["apiVersion"] = api_version.into();
    o["kind"] = kind.into();
    let status = o.as_mapping_mut().and_then(|m| m.remove("status"));
    edit(&mut o);
    let json = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    let (code, body) = cp.api("POST", path, Some(&json(&o)));
    if code != 201 {
        refused.push(format!("{name}: {}", api_message(&body)));
        return;
    }
    if let Some(status) = status.filter(|s| s.as_mapping().is_some_and(|m| !m.is_empty())) {
        let obj_name = str_at(&o, &["metadata", "name"]).unwrap_or("?");
        let patch = serde_json::json!({ "status": serde_json::to_value(&status).unwrap_or_default() });
        let (code, body) = cp.api_as("PATCH", &format!("{path}/{obj_name}/status"), Some(&patch.to_string()), "application/merge-patch+json");
        if code != 200 {
            refused.push(format!("{name} status: {}", api_message(&body)));
        }
    }
}

/// Deletes what a previous file wrote: Services (but the API server's own), the slices written
/// here, Nodes, ServiceCIDRs (but the default one and those named in `keep`), waiting until they
/// are gone.
fn reset(cp: &ControlPlane, keep: &[String]) -> Result<(), String> {
    let list = |path: &str| -> Result<Vec<(String, String)>, String> {
        let (code, body) = cp.api("GET", path, None);
        if code != 200 {
            return Err(format!("GET {path}: {code} {body}"));
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))?;
        Ok(v["items"].as_array().into_iter().flatten().map(|i| (i["metadata"]["namespace"].as_str().unwrap_or("").to_string(), i["metadata"]["name"].as_str().unwrap_or("").to_string())).collect())
    };
    for (ns, name) in list("/api/v1/services")? {
        if !(ns == "default" && name == "kubernetes") {
            cp.api("DELETE", &format!("/api/v1/namespaces/{ns}/services/{name}"), None);
        }
    }
    for (ns, name) in list(&format!("/apis/discovery.k8s.io/v1/endpointslices?labelSelector=endpointslice.kubernetes.io/managed-by%3D{MANAGED_BY}"))? {
        cp.api("DELETE", &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}"), None);
    }
    for (_, name) in list("/api/v1/nodes")? {
        cp.api("DELETE", &format!("/api/v1/nodes/{name}"), None);
    }
    // No kubelet confirms a Pod's end here: they go at once.
    for (ns, name) in list("/api/v1/pods")? {
        cp.api("DELETE", &format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0"), None);
    }
    for (ns, name) in list("/apis/networking.k8s.io/v1/networkpolicies")? {
        cp.api("DELETE", &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}"), None);
    }
    let stale = |list: Vec<(String, String)>| list.into_iter().filter(|(_, n)| n != "kubernetes" && !keep.contains(n)).count();
    for (_, name) in list("/apis/networking.k8s.io/v1/servicecidrs")? {
        if name != "kubernetes" && !keep.contains(&name) {
            cp.api("DELETE", &format!("/apis/networking.k8s.io/v1/servicecidrs/{name}"), None);
        }
    }
    // ServiceCIDRs go once their addresses are released (a finalizer); Services at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stale(list("/apis/networking.k8s.io/v1/servicecidrs")?) > 0 || list("/api/v1/services")?.len() > 1 || !list("/api/v1/pods")?.is_empty() {
        if Instant::now() > deadline {
            return Err("objects of the previous file still there after 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A flow's destination: `ip:port`, or an address alone (ICMP, other protocols) as port 0.
fn destination(s: &str) -> Option<SocketAddrV4> {
    s.parse::<SocketAddrV4>().ok().or_else(|| s.parse::<Ipv4Addr>().ok().map(|a| SocketAddrV4::new(a, 0)))
}

/// What one connection attempt saw, as the probe prints it.
fn outcome(line: &str, src: Ipv4Addr, dst: SocketAddrV4, plan: &Plan) -> String {
    let mut it = line.split_whitespace();
    let delivered = |from: &str| match from.parse::<Ipv4Addr>() {
        Ok(a) if a == *dst.ip() => (if plan.place(a) == Place::Node { "LOCAL" } else { "PASS" }).to_string(),
        _ => format!("answered by {from}"),
    };
    match it.next() {
        // ICMP and other protocols: the echo reply, or the ICMP error, that came back.
        Some("ECHO") => delivered(it.next().unwrap_or("?")),
        Some("UNREACH") => match (it.next(), it.next()) {
            // Port unreachable: a refusal (kube-proxy's `reject`, Ferry's answer).
            (Some("3"), _) => "REJECT".into(),
            // Protocol unreachable: the packet reached a host that does not speak it.
            (Some("2"), Some(from)) => delivered(from),
            (code, from) => format!("unreachable code {} from {}", code.unwrap_or("?"), from.unwrap_or("?")),
        },
        Some("TIMEX") => "time exceeded (looped: nobody has the address)".into(),
        Some("TO") => {
            let local: Option<SocketAddrV4> = it.next().and_then(|s| s.parse().ok());
            let peer: Option<SocketAddrV4> = it.next().and_then(|s| s.parse().ok());
            let (Some(local), Some(peer)) = (local, peer) else { return format!("bad answer {line:?}") };
            // From the node itself the source is a node address either way.
            let masq = if plan.place(src) != Place::Node && *peer.ip() != src { " masqueraded" } else { "" };
            if local == dst {
                let what = if plan.place(*dst.ip()) == Place::Node { "LOCAL" } else { "PASS" };
                format!("{what}{masq}")
            } else {
                format!("{local}{masq}")
            }
        }
        Some("REFUSED") => "REJECT".into(),
        Some("DROP") => "DROP".into(),
        _ => format!("error {line}"),
    }
}

/// Is this flow's destination a Service with ClientIP session affinity? (Each proxy then keeps a
/// client on one backend, which one is its own choice.)
fn sticky(sc: &Scenario, plan: &Plan, dst: SocketAddrV4) -> bool {
    services_at(sc, plan, dst).any(|s| str_at(s, &["spec", "sessionAffinity"]) == Some("ClientIP"))
}

/// The Services a flow's destination reaches: by one of their addresses and a port, or by a node
/// address and a node port.
fn services_at<'a>(sc: &'a Scenario, plan: &'a Plan, dst: SocketAddrV4) -> impl Iterator<Item = &'a Value> + 'a {
    sc.services.iter().filter(move |s| {
        let port_is = |key: &str| seq_at(s, &["spec", "ports"]).iter().any(|p| p.get(key).and_then(Value::as_u64) == Some(dst.port() as u64));
        (service_addresses([*s]).contains(dst.ip()) && port_is("port")) || (plan.node_ips.contains(dst.ip()) && port_is("nodePort"))
    })
}

/// The refused object (as `load` names it) a Service depends on: the Service itself or one of
/// its slices.
fn refused_for<'a>(sc: &Scenario, refused: &'a [String], svc: &Value) -> Option<&'a str> {
    let ns = str_at(svc, &["metadata", "namespace"]).unwrap_or("default");
    let name = str_at(svc, &["metadata", "name"]).unwrap_or("?");
    let slices: Vec<String> = sc
        .endpoint_slices
        .iter()
        .filter(|e| str_at(e, &["metadata", "labels", "kubernetes.io/service-name"]) == Some(name) && str_at(e, &["metadata", "namespace"]).unwrap_or("default") == ns)
        .map(|e| format!("EndpointSlice {ns}/{}:", str_at(e, &["metadata", "name"]).unwrap_or("?")))
        .collect();
    let svc_key = format!("Service {ns}/{name}:");
    refused.iter().find(|r| r.starts_with(&svc_key) || slices.iter().any(|k| r.starts_with(k))).map(|r| r.split(':').next().unwrap_or(r))
}

/// Runs one file on both sides and prints its lines; adds to `totals`.
fn run_file(path: &Path, cp: &ControlPlane, kube_proxy: &Path, link: &mut usize, verbose: bool, totals: &mut Totals) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let sc: Scenario = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("?").to_string();
    let mut compared: Vec<&Flow> = Vec::new();
    for f in &sc.flows {
        match not_comparable(f) {
            Some(why) => {
                println!("not compared  {file}: {}: {why}", f.name);
                totals.not_compared += 1;
            }
            None => compared.push(f),
        }
    }
    if sc.config.detect_local_mode.as_deref() == Some("BridgeInterface") {
        for f in compared.drain(..) {
            println!("not compared  {file}: {}: detectLocalMode BridgeInterface needs a pod bridge this topology does not build", f.name);
            totals.not_compared += 1;
        }
    }
    if compared.is_empty() {
        return Ok(());
    }
    let plan = Plan::new(&sc);
    let t0 = Instant::now();
    let refused = load(cp, &sc)?;
    let t_load = t0.elapsed();
    for r in &refused {
        println!("note  {file}: the API server refused {r} (both proxies run without it)");
    }
    let id = lab::run_id();
    let mut sides = Vec::new();
    for proxy in [Proxy::KubeProxy(KpMode::Nftables), Proxy::Ferry] {
        *link += 1;
        let mut side = Side::build(proxy, &id, cp, *link, &plan).map_err(|e| format!("{file}: building the {} node: {e}", proxy.name()))?;
        side.start_proxy(&sc, &plan, cp, kube_proxy).map_err(|e| format!("{file}: {e}"))?;
        sides.push(side);
    }
    let t_build = t0.elapsed();
    let zone = has_zone(&sc);
    for side in &mut sides {
        side.wait_synced(zone).map_err(|e| format!("{file}: {e}"))?;
    }
    let t_sync = t0.elapsed();
    let (differ_before, agree_before) = (totals.differ, totals.agree);
    for f in compared {
        if interrupted() {
            break;
        }
        let (Ok(src), Some(dst)) = (f.source.parse::<Ipv4Addr>(), destination(&f.destination)) else {
            println!("not compared  {file}: {}: source or destination is not an IPv4 address (and port)", f.name);
            totals.not_compared += 1;
            continue;
        };
        if service_addresses(&sc.services).contains(&src) {
            println!("not compared  {file}: {}: the source is a Service address (the node's connection put on it by something outside the proxy); no host here has it, the packet tests cover it", f.name);
            totals.not_compared += 1;
            continue;
        }
        if let Some(r) = services_at(&sc, &plan, dst).find_map(|s| refused_for(&sc, &refused, s)) {
            println!("not compared  {file}: {}: the API server refuses {r}, so neither proxy sees it; the packet tests cover how Ferry reads it from a file", f.name);
            totals.not_compared += 1;
            continue;
        }
        let expect = Expect::parse(&f.expect).ok();
        // Enough connections to see every backend of either proxy: about 12 per backend.
        let count = match &expect {
            Some(Expect::Backends(b)) => (12 * b.len() + 4).min(64),
            _ => 3,
        };
        let children: Vec<Result<std::process::Child, String>> = sides.iter().map(|s| s.probe(&plan, src, dst, &f.proto, count)).collect();
        let mut seen: Vec<BTreeSet<String>> = Vec::new();
        for c in children {
            let out = c?.wait_with_output().map_err(|e| e.to_string())?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut set: BTreeSet<String> = stdout.lines().map(|l| outcome(l, src, dst, &plan)).collect();
            if !out.status.success() || set.is_empty() {
                set.insert(format!("probe failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            seen.push(set);
        }
        let (kp, fy) = (&seen[0], &seen[1]);
        // A NetworkPolicy verdict is the CNI's job, not kube-proxy's.
        let policy_file = sc.config.enable_network_policy && !sc.network_policies.is_empty();
        let show = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        match judge(f, &expect, policy_file, sticky(&sc, &plan, dst), plan.place(src), kp, fy) {
            Verdict::Agree => {
                totals.agree += 1;
                if verbose {
                    println!("agree  {file}: {}: {}", f.name, show(kp));
                }
            }
            Verdict::Policy => {
                totals.policy += 1;
                if verbose {
                    println!("policy  {file}: {}: Ferry {{{}}} as the file says (kube-proxy, which enforces no NetworkPolicy: {{{}}})", f.name, show(fy), show(kp));
                }
            }
            Verdict::Deliberate(why) => {
                totals.deliberate += 1;
                println!("deliberate  {file}: {}: kube-proxy {{{}}}, Ferry {{{}}} ({why})", f.name, show(kp), show(fy));
            }
            Verdict::Differ(why) => {
                totals.differ += 1;
                println!("differ  {file}: {}: {why}", f.name);
            }
        }
    }
    // One line per file, so a long run shows where it is.
    println!("file  {file}: {} agree, {} differ", totals.agree - agree_before, totals.differ - differ_before);
    if verbose {
        println!("time  {file}: objects {:.1} s, namespaces {:.1} s, first syncs {:.1} s, flows {:.1} s", t_load.as_secs_f64(), (t_build - t_load).as_secs_f64(), (t_sync - t_build).as_secs_f64(), (t0.elapsed() - t_sync).as_secs_f64());
    }
    if totals.differ > differ_before {
        // The proxies' logs, for whoever looks into the difference.
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
        let _ = std::fs::create_dir_all(&keep);
        for side in &sides {
            let to = keep.join(format!("{}.{}.log", file.trim_end_matches(".yaml"), side.proxy.name()));
            if std::fs::copy(side.log(), &to).is_ok() {
                println!("log  {}", to.display());
            }
        }
    }
    if let Some(secs) = std::env::var("FERRY_CONFORMANCE_PAUSE").ok().and_then(|s| s.parse::<u64>().ok()) {
        // Debugging: the namespaces stay up this long before they are taken down.
        println!("pause  {file}: namespaces {} and {} stay up for {secs} s", sides[0].node.name, sides[1].node.name);
        let until = Instant::now() + Duration::from_secs(secs.min(3600));
        while Instant::now() < until && !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Ctrl-C (or SIGTERM) sets the flag [`interrupted`] reads: the runs stop at their next check and
/// everything is taken down by the guards' drops.
pub(crate) fn catch_signals() {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// `conformance [--verbose] --kube-proxy PATH FILE|DIR...`: returns whether nothing differed.
/// Ctrl-C (or SIGTERM) stops after the current flow and takes everything down.
pub fn main_run(args: &[String]) -> Result<bool, String> {
    catch_signals();
    let mut kube_proxy = None;
    let mut verbose = false;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kube-proxy" => kube_proxy = it.next().map(PathBuf::from),
            "--verbose" => verbose = true,
            o if o.starts_with('-') => return Err(format!("{o}: not an option (conformance --kube-proxy PATH [--verbose] FILE_OR_DIR...)")),
            p => paths.push(PathBuf::from(p)),
        }
    }
    let kube_proxy = kube_proxy.ok_or("--kube-proxy PATH is required (cargo xtask conformance passes the pinned build)")?;
    let kube_proxy = kube_proxy.canonicalize().map_err(|e| format!("--kube-proxy {}: {e} (cargo xtask setup builds it)", kube_proxy.display()))?;
    let mut files = Vec::new();
    for p in &paths {
        collect(p, &mut files)?;
    }
    if files.is_empty() {
        return Err("no scenario files given".into());
    }
    // Every file read before anything starts: a file this run cannot understand is named with
    // its flow and field at once, not after minutes of traffic.
    let unreadable: Vec<String> = files.iter().filter_map(|f| check_file(f).err()).collect();
    if !unreadable.is_empty() {
        return Err(format!("{} scenario file(s) cannot be read:\n  {}", unreadable.len(), unreadable.join("\n  ")));
    }
    // kube-proxy's own test cases use NodePorts below the default range.
    std::env::set_var("FERRY_NODE_PORT_RANGE", "1000-32767");
    let cp = ControlPlane::up();
    let mut totals = Totals::default();
    let mut link = 0;
    for f in &files {
        if interrupted() {
            println!("interrupted: taking everything down");
            return Ok(false);
        }
        if let Err(e) = run_file(f, &cp, &kube_proxy, &mut link, verbose, &mut totals) {
            println!("error  {e}");
            totals.file_errors += 1;
        }
    }
    println!(
        "{} flows not compared (named above), {} deliberate differences (kubeProxyDiffers), {} NetworkPolicy verdicts held to the file (Ferry only), {} files that could not run",
        totals.not_compared, totals.deliberate, totals.policy, totals.file_errors
    );
    println!("{} agree, {} differ", totals.agree, totals.differ + totals.file_errors);
    Ok(totals.differ == 0 && totals.file_errors == 0)
}

/// A scenario file parses, and so does every flow's expectation (as `trace` reads them).
fn check_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let sc: Scenario = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for f in &sc.flows {
        Expect::parse(&f.expect).map_err(|e| format!("{}: flow {:?}: {e}", path.display(), f.name))?;
    }
    Ok(())
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "yaml") {
                collect(&e, out)?;
            }
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// `conformance serve ADDRS TCP_PORTS UDP_PORTS SCTP_PORTS`: answers every connection and
/// datagram on each address and port with `LOCAL PEER`, and every SCTP HEARTBEAT to an SCTP port
/// with a HEARTBEAT ACK carrying `NONCE LOCAL PEER`; prints `ready` once everything is bound (an
/// address and port that cannot be bound, for instance one the proxy itself uses, is left out).
pub fn serve_main(addrs: &str, tcp: &str, udp: &str, sctp: &str) -> ! {
    let list = |s: &str| s.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>();
    for a in list(addrs) {
        for p in list(tcp) {
            if let Ok(l) = std::net::TcpListener::bind(format!("{a}:{p}")) {
                std::thread::spawn(move || {
                    for mut c in l.incoming().flatten() {
                        let line = format!("{} {}\n", c.local_addr().map(|a| a.to_string()).unwrap_or_default(), c.peer_addr().map(|a| a.to_string()).unwrap_or_default());
                        let _ = c.write_all(line.as_bytes());
                    }
                });
            }
        }
        for p in list(udp) {
            if let Ok(u) = std::net::UdpSocket::bind(format!("{a}:{p}")) {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    let local = u.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    while let Ok((_, peer)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(format!("{local} {peer}\n").as_bytes(), peer);
                    }
                });
            }
        }
    }
    let sctp_ports: Vec<u16> = list(sctp).iter().filter_map(|p| p.parse().ok()).collect();
    if !sctp_ports.is_empty() {
        if let Ok(raw) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(IPPROTO_SCTP))) {
            std::thread::spawn(move || sctp_server(raw, sctp_ports));
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `conformance probe SRC DST PROTO COUNT TIMEOUT_MS CGROUP|-`: COUNT connections (one, then the rest at once) from
/// SRC (a new source port each), one line each: `TO LOCAL PEER` (the server's answer),
/// `REFUSED`, `DROP` (no answer within the timeout), or `ERR <error>`.
pub fn probe_main(src: &str, dst: &str, proto: &str, count: usize, timeout_ms: u64, cgroup: &str) -> Result<(), String> {
    if cgroup != "-" {
        // The node's own processes run in the cgroup Ferry's socket hooks are attached to.
        std::fs::write(Path::new(cgroup).join("cgroup.procs"), "0").map_err(|e| format!("joining {cgroup}: {e}"))?;
    }
    let src: Ipv4Addr = src.parse().map_err(|_| format!("bad source {src}"))?;
    let dst: SocketAddr = dst.parse().map_err(|_| format!("bad destination {dst}"))?;
    let timeout = Duration::from_millis(timeout_ms);
    if proto == "sctp" {
        let SocketAddr::V4(dst) = dst else { return Err("IPv4 only".into()) };
        println!("{}", sctp_attempt(src, dst, timeout));
        let handles: Vec<_> = (1..count.min(64)).map(|_| std::thread::spawn(move || sctp_attempt(src, dst, timeout))).collect();
        for h in handles {
            println!("{}", h.join().unwrap_or_else(|_| "ERR panic".into()));
        }
        return Ok(());
    }
    if proto != "tcp" && proto != "udp" {
        let number: u8 = if proto == "icmp" { 1 } else { proto.parse().map_err(|_| format!("bad protocol {proto}"))? };
        let SocketAddr::V4(dst) = dst else { return Err("IPv4 only".into()) };
        for seq in 0..count.min(8) {
            println!("{}", raw_attempt(src, *dst.ip(), number, seq as u16, timeout));
        }
        return Ok(());
    }
    let udp = proto == "udp";
    // The first alone, then the rest at once: session affinity is recorded by a first
    // connection, which the others then follow (concurrent first packets would each pick).
    println!("{}", attempt(src, dst, udp, timeout));
    let handles: Vec<_> = (1..count.min(64)).map(|_| std::thread::spawn(move || attempt(src, dst, udp, timeout))).collect();
    for h in handles {
        println!("{}", h.join().unwrap_or_else(|_| "ERR panic".into()));
    }
    Ok(())
}

pub(crate) fn attempt(src: Ipv4Addr, dst: SocketAddr, udp: bool, timeout: Duration) -> String {
    use socket2::{Domain, Socket, Type};
    let sock = match Socket::new(Domain::IPV4, if udp { Type::DGRAM } else { Type::STREAM }, None) {
        Ok(s) => s,
        Err(e) => return format!("ERR socket: {e}"),
    };
    if let Err(e) = sock.bind(&SocketAddr::from((src, 0)).into()) {
        return format!("ERR bind {src}: {e}");
    }
    let classify = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "REFUSED".to_string(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "DROP".to_string(),
        // Denied on the node itself before anything was sent (a socket hook, or netfilter's
        // output path for a datagram): not delivered and not refused, as `trace` counts it.
        std::io::ErrorKind::PermissionDenied => "DROP".to_string(),
        _ => format!("ERR {e}"),
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 256];
    let got = if udp {
        if let Err(e) = sock.connect(&dst.into()) {
            return classify(e);
        }
        let u: std::net::UdpSocket = sock.into();
        if let Err(e) = u.send(b"?\n") {
            return classify(e);
        }
        u.recv(&mut buf)
    } else {
        if let Err(e) = sock.connect_timeout(&dst.into(), timeout) {
            return classify(e);
        }
        let mut t: std::net::TcpStream = sock.into();
        let mut n = 0;
        loop {
            match t.read(&mut buf[n..]) {
                Ok(0) => break Ok(n),
                Ok(k) => {
                    n += k;
                    if buf[..n].contains(&b'\n') || n == buf.len() {
                        break Ok(n);
                    }
                }
                Err(e) => break Err(e),
            }
        }
    };
    match got {
        Ok(n) => format!("TO {}", String::from_utf8_lossy(&buf[..n]).trim()),
        Err(e) => classify(e),
    }
}

/// One packet of IP protocol `number` (an ICMP echo request for 1; eight zero bytes for any
/// other) from `src` to `dst`, and what came back within `timeout`: `ECHO <from>`,
/// `UNREACH <code> <from>` (an ICMP destination unreachable quoting this packet),
/// `TIMEX <from>`, or `DROP`.
fn raw_attempt(src: Ipv4Addr, dst: Ipv4Addr, number: u8, seq: u16, timeout: Duration) -> String {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |p: i32| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(p)))?;
        s.bind(&SocketAddr::from((src, 0)).into())?;
        Ok(s)
    };
    // ICMP answers arrive on a raw ICMP socket whatever protocol was sent.
    let (icmp, out) = match (open(1), if number == 1 { None } else { Some(open(number as i32)) }) {
        (Ok(i), None) => (i, None),
        (Ok(i), Some(Ok(o))) => (i, Some(o)),
        (Err(e), _) | (_, Some(Err(e))) => return format!("ERR raw socket: {e}"),
    };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let mut pkt = [0u8; 8];
    if number == 1 {
        pkt[0] = 8;
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum = !pkt.chunks(2).fold(0u32, |a, c| {
            let a = a + u16::from_be_bytes([c[0], c[1]]) as u32;
            (a & 0xffff) + (a >> 16)
        }) as u16;
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let to: socket2::SockAddr = SocketAddr::from((dst, 0)).into();
    if let Err(e) = out.as_ref().unwrap_or(&icmp).send_to(&pkt, &to) {
        return match e.kind() {
            std::io::ErrorKind::PermissionDenied => "DROP".into(),
            _ => format!("ERR send: {e}"),
        };
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        let _ = icmp.set_read_timeout(Some(left));
        let Some(b) = raw_recv(&icmp, &mut buf) else { break };
        let ihl = ((b.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
        if b.len() < ihl + 8 {
            continue;
        }
        let from = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
        let (kind, code) = (b[ihl], b[ihl + 1]);
        match kind {
            0 if number == 1 && b[ihl + 4..ihl + 6] == id.to_be_bytes() && b[ihl + 6..ihl + 8] == seq.to_be_bytes() => return format!("ECHO {from}"),
            3 | 11 => {
                // The quoted packet must be this one: its protocol and destination.
                let q = ihl + 8;
                if b.len() >= q + 20 && b[q + 9] == number && b[q + 16..q + 20] == dst.octets() {
                    return if kind == 3 { format!("UNREACH {code} {from}") } else { format!("TIMEX {from}") };
                }
            }
            _ => {}
        }
    }
    "DROP".into()
}

// SCTP over raw IP sockets (this kernel has no SCTP module): one HEARTBEAT chunk out, one
// HEARTBEAT ACK back, as `ferry-load` does in the lab. kube-proxy's conntrack takes a HEARTBEAT
// as the start of a new association (multihoming), so both proxies translate it.
const IPPROTO_SCTP: i32 = 132;
const CHUNK_HEARTBEAT: u8 = 4;
const CHUNK_HEARTBEAT_ACK: u8 = 5;
const SCTP_VTAG: u32 = 0x4665_7272;

/// An SCTP packet: common header and one chunk of `chunk_type` with a Heartbeat Info parameter
/// holding `info`, CRC32c (little-endian on the wire) over it all.
fn sctp_packet(sport: u16, dport: u16, chunk_type: u8, info: &[u8]) -> Vec<u8> {
    let param_len = 4 + info.len();
    let mut p = Vec::with_capacity(24 + info.len());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&SCTP_VTAG.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[chunk_type, 0]);
    p.extend_from_slice(&((4 + param_len) as u16).to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&(param_len as u16).to_be_bytes());
    p.extend_from_slice(info);
    p.resize(p.len().div_ceil(4) * 4, 0);
    let c = dataplane_agent::packet::crc32c(&p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// An SCTP packet from an IPv4 datagram as a raw socket returns it: (source, destination,
/// sport, dport, chunk type, Heartbeat Info).
fn parse_sctp(d: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8, Vec<u8>)> {
    let ihl = (*d.first()? & 0x0f) as usize * 4;
    if d.len() < ihl + 20 || d[9] != IPPROTO_SCTP as u8 {
        return None;
    }
    let s = &d[ihl..];
    let port = |i: usize| u16::from_be_bytes([s[i], s[i + 1]]);
    let param_len = (port(18) as usize).clamp(4, s.len() - 16);
    let src = SocketAddrV4::new(Ipv4Addr::new(d[12], d[13], d[14], d[15]), port(0));
    let dst = SocketAddrV4::new(Ipv4Addr::new(d[16], d[17], d[18], d[19]), port(2));
    Some((src, dst, s[12], s[20..16 + param_len].to_vec()))
}

fn raw_recv(sock: &socket2::Socket, buf: &mut [std::mem::MaybeUninit<u8>]) -> Option<Vec<u8>> {
    let (n, _) = sock.recv_from(buf).ok()?;
    // SAFETY: recv_from initialized the first n bytes.
    Some(buf[..n].iter().map(|x| unsafe { x.assume_init() }).collect())
}

fn sctp_server(raw: socket2::Socket, ports: Vec<u16>) {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let Some(d) = raw_recv(&raw, &mut buf) else { continue };
        let Some((src, dst, chunk, info)) = parse_sctp(&d) else { continue };
        if chunk != CHUNK_HEARTBEAT || !ports.contains(&dst.port()) {
            continue;
        }
        let nonce = String::from_utf8_lossy(&info).split_whitespace().next().unwrap_or("").to_string();
        let answer = sctp_packet(dst.port(), src.port(), CHUNK_HEARTBEAT_ACK, format!("{nonce} {dst} {src}").as_bytes());
        // From the address it was reached at (the kernel fills in the header's source only from
        // a bound socket's address or the route: set it through a socket bound to it).
        if let Ok(reply) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::from(IPPROTO_SCTP))) {
            if reply.bind(&SocketAddr::from((*dst.ip(), 0)).into()).is_ok() {
                let _ = reply.send_to(&answer, &SocketAddr::from((*src.ip(), 0)).into());
            }
        }
    }
}

/// One HEARTBEAT from `src` (a random port) to `dst`: `TO LOCAL PEER` from the answer,
/// `REFUSED` (ICMP port unreachable quoting it), `UNREACH <code> <from>`, or `DROP`.
fn sctp_attempt(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> String {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |p: i32| -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(p)))?;
        s.bind(&SocketAddr::from((src, 0)).into())?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let (sctp, icmp) = match (open(IPPROTO_SCTP), open(1)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return format!("ERR raw socket: {e}"),
    };
    // A source port of its own per attempt (the attempts of one probe run at once).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let seed = nanos ^ (std::process::id() << 8);
    let sport = 20000 + ((seed.wrapping_mul(2654435761) % 2000) * 20 + n % 20) as u16;
    let nonce = format!("{:08x}{:04x}", seed, sport);
    if let Err(e) = sctp.send_to(&sctp_packet(sport, dst.port(), CHUNK_HEARTBEAT, nonce.as_bytes()), &SocketAddr::from((*dst.ip(), 0)).into()) {
        return match e.kind() {
            std::io::ErrorKind::PermissionDenied => "DROP".into(),
            _ => format!("ERR send: {e}"),
        };
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while Instant::now() < deadline {
        while let Some(d) = raw_recv(&sctp, &mut buf) {
            if let Some((_, to, CHUNK_HEARTBEAT_ACK, info)) = parse_sctp(&d) {
                let text = String::from_utf8_lossy(&info).to_string();
                let mut w = text.split_whitespace();
                if to.port() == sport && w.next() == Some(nonce.as_str()) {
                    return format!("TO {} {}", w.next().unwrap_or("?"), w.next().unwrap_or("?"));
                }
            }
        }
        while let Some(b) = raw_recv(&icmp, &mut buf) {
            let ihl = ((b.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
            let q = ihl + 8;
            // A destination unreachable quoting this packet: protocol, destination, source port.
            if b.len() >= q + 24 && b[ihl] == 3 && b[q + 9] == IPPROTO_SCTP as u8 && b[q + 16..q + 20] == dst.ip().octets() {
                let qihl = ((b[q] & 0x0f) as usize) * 4;
                if b.len() >= q + qihl + 2 && u16::from_be_bytes([b[q + qihl], b[q + qihl + 1]]) == sport {
                    let from = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
                    return if b[ihl + 1] == 3 { "REFUSED".into() } else { format!("UNREACH {} {from}", b[ihl + 1]) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    "DROP".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(yaml: &str) -> (Flow, Option<Expect>) {
        let f: Flow = serde_yaml::from_str(yaml).unwrap();
        let e = Expect::parse(&f.expect).ok();
        (f, e)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    const TWO: &str = "{name: n, proto: tcp, source: 10.0.0.2, destination: 172.30.0.1:80, expect: [\"10.0.0.5:80\", \"10.180.0.5:80\"], masquerade: false}";
    const POD: Place = Place::Pod(0);

    #[test]
    fn two_proxies_failing_alike_do_not_agree() {
        let (f, e) = flow(TWO);
        let both = set(&["10.0.0.5:80", "DROP"]);
        let v = judge(&f, &e, false, false, POD, &both, &both);
        assert!(matches!(&v, Verdict::Differ(w) if w.contains("both did") && w.contains("the file expects [10.0.0.5:80, 10.180.0.5:80]")), "{v:?}");
        let right = set(&["10.0.0.5:80", "10.180.0.5:80"]);
        assert_eq!(judge(&f, &e, false, false, POD, &right, &right), Verdict::Agree);
        // Every backend must be seen, and no other.
        let one = set(&["10.0.0.5:80"]);
        assert!(matches!(judge(&f, &e, false, false, POD, &one, &one), Verdict::Differ(_)));
        let extra = set(&["10.0.0.5:80", "10.180.0.5:80", "10.180.0.6:80"]);
        assert!(matches!(judge(&f, &e, false, false, POD, &extra, &extra), Verdict::Differ(_)));
    }

    #[test]
    fn masquerade_is_held_to_the_file_for_sources_off_the_node() {
        let (f, e) = flow(TWO);
        let masq = set(&["10.0.0.5:80 masqueraded", "10.180.0.5:80 masqueraded"]);
        assert!(matches!(judge(&f, &e, false, false, POD, &masq, &masq), Verdict::Differ(_)));
        // From the node the source is a node address either way: not judged.
        assert_eq!(judge(&f, &e, false, false, Place::Node, &masq, &masq), Verdict::Agree);
    }

    #[test]
    fn different_outcomes_differ_and_a_marked_one_needs_ferry_right() {
        let (mut f, e) = flow(TWO);
        let right = set(&["10.0.0.5:80", "10.180.0.5:80"]);
        let reject = set(&["REJECT"]);
        assert!(matches!(judge(&f, &e, false, false, POD, &reject, &right), Verdict::Differ(w) if w.starts_with("kube-proxy {REJECT}")));
        f.kube_proxy_differs = Some("README: why".into());
        assert_eq!(judge(&f, &e, false, false, POD, &reject, &right), Verdict::Deliberate("README: why".into()));
        assert!(matches!(judge(&f, &e, false, false, POD, &right, &reject), Verdict::Differ(w) if w.contains("marked kubeProxyDiffers, but Ferry did {REJECT}")));
        assert!(matches!(judge(&f, &e, false, false, POD, &right, &right), Verdict::Differ(w) if w.contains("but both did")));
    }

    #[test]
    fn kube_proxy_counts_as_synced_with_its_zone_only_after_a_sync_begun_after_the_labels() {
        let labels = "I1203 16:55:15.950000 1 proxier.go:909] \"Updated proxier node topology labels\" ipFamily=\"IPv4\" labels={\"topology.kubernetes.io/zone\":\"a\"}\n";
        let sync = "I1203 16:55:15.960000 1 proxier.go:1206] \"Syncing nftables rules\" ipFamily=\"IPv4\" fullSync=true\n";
        let done = "I1203 16:55:15.990000 1 proxier.go:1200] \"SyncProxyRules complete\" ipFamily=\"IPv4\" elapsed=\"30ms\"\n";
        // The IPv6 proxier's sync does not count.
        let v6 = |l: &str| l.replace("IPv4", "IPv6");
        assert!(!topology_synced(&format!("{sync}{done}{labels}{}{}", v6(sync), v6(done))));
        // The first sync ran before the handler: not yet.
        assert!(!topology_synced(&format!("{sync}{done}{labels}")));
        assert!(!topology_synced(&format!("{sync}{done}{labels}{sync}")));
        assert!(topology_synced(&format!("{sync}{done}{labels}{sync}{done}")));
        // A sync in progress when the labels came: its end does not count.
        assert!(!topology_synced(&format!("{sync}{labels}{done}")));
        assert!(!topology_synced(""));
    }

    #[test]
    fn affinity_keeps_one_backend_each_from_the_list() {
        let (f, e) = flow(TWO);
        let (a, b) = (set(&["10.0.0.5:80"]), set(&["10.180.0.5:80"]));
        assert_eq!(judge(&f, &e, false, true, POD, &a, &b), Verdict::Agree);
        let other = set(&["10.180.0.9:80"]);
        assert!(matches!(judge(&f, &e, false, true, POD, &a, &other), Verdict::Differ(_)));
        let two = set(&["10.0.0.5:80", "10.180.0.5:80"]);
        assert!(matches!(judge(&f, &e, false, true, POD, &two, &two), Verdict::Differ(_)), "affinity broken on both sides");
    }

    #[test]
    fn a_policy_verdict_holds_ferry_alone_to_the_file() {
        let (f, e) = flow("{name: n, proto: tcp, source: 10.0.0.2, destination: 10.0.0.3:80, expect: {DROP: policy_ingress}}");
        let (pass, drop) = (set(&["PASS"]), set(&["DROP"]));
        assert_eq!(judge(&f, &e, true, false, POD, &pass, &drop), Verdict::Policy);
        assert!(matches!(judge(&f, &e, true, false, POD, &pass, &pass), Verdict::Differ(w) if w.contains("NetworkPolicy verdict")));
        // Without the file's policies enforced, it is an ordinary flow: both passing is wrong.
        assert!(matches!(judge(&f, &e, false, false, POD, &pass, &pass), Verdict::Differ(_)));
        // A plain DROP is compared as usual.
        let (f, e) = flow("{name: n, proto: tcp, source: 10.0.0.2, destination: 10.0.0.3:80, expect: DROP}");
        assert!(matches!(judge(&f, &e, true, false, POD, &pass, &drop), Verdict::Differ(_)));
        assert_eq!(judge(&f, &e, true, false, POD, &drop, &drop), Verdict::Agree);
    }
}
