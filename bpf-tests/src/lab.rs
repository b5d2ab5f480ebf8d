//! A small cluster made of network namespaces, for the lab and the end-to-end tests.
//!
//! Each node is a namespace; each pod is a namespace joined to its node by a veth (pod side
//! `eth0`, node side `veth…`, which Ferry's default interface pattern matches); the nodes are
//! joined by one veth with static routes to each other's pod CIDR standing in for the CNI. One
//! agent per node runs inside the node's namespace with its own pin directory and its own cgroup
//! for the socket hooks. Nothing is added to the root namespace (links are created directly in
//! their namespaces), every name carries a per-run id, and every piece is removed by a `Drop`
//! guard: on success, on failure, on panic, and (in the lab binary) on Ctrl-C.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The pods' range (the agents' `--cluster-cidr`, as the DaemonSet's ConfigMap sets it): the
/// local traffic detector's.
pub const CLUSTER_CIDR: &str = "10.201.0.0/16";
pub const TCP_VIP: &str = "10.96.0.10:80";
pub const UDP_VIP: &str = "10.96.0.20:53";
pub const ECHO_TCP_PORT: u16 = 8080;
/// The lab's client outside the cluster, routed to the nodes through node1's `ext0`.
pub const OUTSIDE_CLIENT: &str = "172.20.0.2";
/// NodePort on node1 (externalTrafficPolicy Cluster) whose only endpoint is on node2.
pub const NODEPORT_CLUSTER: &str = "192.168.77.1:30080";
/// NodePort on node1 (externalTrafficPolicy Local) whose endpoint is on node1.
pub const NODEPORT_LOCAL: &str = "192.168.77.1:30081";
pub const ECHO_UDP_PORT: u16 = 5353;
/// Ports of the soak workload's server (`ferry-load serve`) in every pod and, as a hostNetwork
/// endpoint, in each node's own namespace, when [`LabOptions::load_servers`] is set.
pub const LOAD_TCP_PORT: u16 = 9000;
pub const LOAD_UDP_PORT: u16 = 9001;
/// SCTP over raw IP sockets (the pods' responder; no SCTP on the nodes).
pub const LOAD_SCTP_PORT: u16 = 9002;
/// A port nothing listens on, TCP or UDP, in any pod or node.
pub const CLOSED_PORT: u16 = 9009;
/// LoadBalancer ingress IPs and external IPs live here: the client outside routes them to node1.
pub const LB_PREFIX: &str = "172.20.1.0/24";
pub const EXTERNAL_IP_PREFIX: &str = "172.20.2.0/24";

/// Where [`use_bin_dir`] points the lab's binaries, when it was called.
static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes the lab start its agents, echo and load tools from `dir` instead of `target/debug`: the
/// bench runs them from its own (release) build directory, so every binary it times is of one
/// profile. Call it before the first lab; the first call wins.
pub fn use_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

fn target_dir() -> PathBuf {
    BIN_DIR.get().cloned().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

pub fn agent_bin() -> PathBuf {
    target_dir().join("dataplane-agent")
}

pub fn echo_bin() -> PathBuf {
    target_dir().join("ferry-echo")
}

pub fn load_bin() -> PathBuf {
    target_dir().join("ferry-load")
}

/// An XDP program that passes every frame (`ferry_bench_empty_xdp`), attached in the driver to
/// `dev` in `ns`; detached when the returned object is dropped.
pub fn xdp_pass_on(ns: &Netns, dev: &str) -> aya::Ebpf {
    use aya::programs::{xdp::XdpMode, Xdp};
    let name = dataplane_common::progs::BENCH_EMPTY_XDP;
    let mut ebpf = dataplane_agent::loader::load_with(None, &dataplane_agent::loader::PRIVATE_CAPACITIES).expect("the eBPF object (cargo xtask build-ebpf)");
    let p: &mut Xdp = ebpf.program_mut(name).unwrap_or_else(|| panic!("{name} missing")).try_into().unwrap();
    p.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let _in = ns.enter();
    p.attach(dev, XdpMode::Driver).unwrap_or_else(|e| panic!("attaching {name} to {dev} in {}: {e}", ns.name));
    ebpf
}

/// Starts `args` in `ns` with its output discarded (a server).
fn quiet(ns: &Netns, args: &[&str], what: String) -> Proc {
    let child = ns.cmd(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("start {what}: {e}"));
    Proc { child, what }
}

/// The sum of a veth's per-queue XDP counter `what` (`ethtool -S`), e.g. `xdp_tx_errors`.
pub fn xdp_counter(ns: &Netns, dev: &str, what: &str) -> u64 {
    let out = ns.cmd(&["ethtool", "-S", dev]).output().unwrap_or_else(|e| panic!("ethtool -S {dev} in {}: {e}", ns.name));
    let text = String::from_utf8_lossy(&out.stdout);
    let suffix = format!("_{what}:");
    let found: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().split_once(' ').filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with(&suffix)).map(|(_, v)| v.trim().parse().unwrap()))
        .collect();
    assert!(!found.is_empty(), "no rx_queue_*_{what} in `ethtool -S {dev}` in {}:\n{text}", ns.name);
    found.iter().sum()
}

/// Runs a command to completion; panics with its output if it fails (setup steps must work).
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A unique short id for this run: names stay under the 15-character interface limit.
pub fn run_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_micros();
    format!("{:x}", (std::process::id() ^ t ^ (n << 20)) & 0xfffff)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside this namespace. It enters with setns(2) only: `ip netns exec`
    /// would also give it a fresh /sys, hiding the bpf filesystem the agent pins its maps on.
    pub fn cmd(&self, args: &[&str]) -> Command {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap_or_else(|e| panic!("netns {}: {e}", self.name));
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        unsafe {
            c.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    pub fn exec_ok(&self, args: &[&str]) {
        let out = self.cmd(args).output().unwrap_or_else(|e| panic!("{args:?} in {}: {e}", self.name));
        assert!(out.status.success(), "{args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Sets a `net.*` sysctl of this namespace (written through /proc/sys from inside it, so no
    /// sysctl binary is needed).
    pub fn sysctl(&self, kv: &str) {
        let (k, v) = kv.split_once('=').expect("key=value");
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        self.exec_ok(&["sh", "-c", &format!("echo {v} > {path}")]);
    }
}

/// The calling thread inside a network namespace, back in its own when dropped.
pub struct Entered {
    orig: std::fs::File,
}

impl Netns {
    /// Moves the calling thread (only it) into this namespace until the guard drops: test runs
    /// and FIB lookups then see this namespace's devices and routes.
    pub fn enter(&self) -> Entered {
        enter_named(&self.name)
    }
}

/// [`Netns::enter`] by the namespace's name, for a thread that does not hold its `Netns`.
pub fn enter_named(name: &str) -> Entered {
    use std::os::fd::AsRawFd;
    let orig = std::fs::File::open("/proc/thread-self/ns/net").expect("own network namespace");
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap_or_else(|e| panic!("netns {name}: {e}"));
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {name}: {}", std::io::Error::last_os_error());
    Entered { orig }
}

impl Drop for Entered {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child process, killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A cgroup v2 directory (and its children), removed on drop after its processes are gone.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cgroup {}: {e}", path.display()));
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.path) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A bpffs pin directory, removed (with the maps pinned in it) on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(id: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ferry-{id}"));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    /// The node's end of the pod's veth.
    pub host_if: String,
}

/// Field order is drop order: the agent stops before its pin directory goes (a running agent
/// would otherwise see its interfaces vanish and pin links again into a directory being
/// removed), then the namespace.
pub struct Node {
    pub agent: Option<Proc>,
    pub name: String,
    pub ip: Ipv4Addr,
    pub pin: PinDir,
    pub ns: Netns,
    pub cgroup: PathBuf,
}

/// What a lab is built with beyond the default topology. `Default` is the lab every existing
/// test uses.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// MTU of the node-to-node link (both ends), e.g. 1400 for an overlay's smaller MTU; pods and
    /// the client outside keep 1500, so translated traffic crosses a smaller MTU.
    pub node_link_mtu: Option<u32>,
    /// Extra flags for every agent, e.g. `--conntrack-capacity 4096`, `--lb-algorithm random`.
    pub agent_args: Vec<String>,
    /// Starts `ferry-load serve` in every pod (TCP, UDP and SCTP) and in each node's own namespace
    /// and cgroup (TCP and UDP: a hostNetwork endpoint at the node's address).
    pub load_servers: bool,
    /// Checks that TSO and GSO are on for every veth (as on real nodes, and as veths start) and
    /// turns GRO on for the node-side ends, so super-packets arrive on ingress too. Needs ethtool.
    pub offloads: bool,
    /// With XDP acceleration, leaves the veths that feed the agents' XDP programs as they start
    /// (no XDP program on ext0's peer, checksum offload on): what [`Cluster::prepare_xdp_peers`]
    /// otherwise fixes, for the test that shows XDP_TX failing without it.
    pub bare_xdp_peers: bool,
}

impl LabOptions {
    /// The soak suite's lab: real offloads and the load servers.
    pub fn soak() -> Self {
        LabOptions { load_servers: true, offloads: true, ..Default::default() }
    }
}

/// The whole lab. Field order is drop order: processes first, then pods, nodes, cgroups, files.
pub struct Cluster {
    pub id: String,
    /// XDP programs the lab attached to veth peers ([`Cluster::prepare_xdp_peers`]), detached
    /// when dropped.
    pub peer_xdp: Vec<aya::Ebpf>,
    pub echo: Vec<Proc>,
    /// hostNetwork `ferry-load` servers (one per node), stopped before the namespaces go.
    pub host_servers: Vec<Proc>,
    pub pods: Vec<Pod>,
    /// Hosts behind the client's namespace ([`Cluster::add_outside_host`]).
    pub outside_hosts: Vec<Netns>,
    /// A client outside the cluster, attached to node1 (`ext0`) and routed to both nodes.
    pub outside: Netns,
    pub nodes: Vec<Node>,
    pub cgroup: Cgroup,
    pub manifests: PathBuf,
    /// Agents read the API server with this kubeconfig instead of `manifests` (the lab through
    /// a real control plane, `apilab`).
    pub kubeconfig: Option<PathBuf>,
    pub logs: TempDir,
    /// Start agents with `--nodeport-acceleration xdp`.
    pub xdp: bool,
    pub opts: LabOptions,
}

impl Drop for Cluster {
    /// The agents stop first, before the pods' interfaces and the pin directories go.
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.agent.take();
        }
    }
}

/// How a pod added with [`Cluster::add_pod_linked`] is joined to its node.
#[derive(Clone, Debug)]
pub enum PodLink {
    /// A veth whose node side is `veth…`, which the lab's agents attach to (`--pod-interfaces veth*`).
    Veth,
    /// A veth whose node side has this name: one no pattern of the agents matches (another CNI's
    /// naming), so no Ferry program sits on it.
    Named(String),
    /// A veth whose node side `port` is a port of the L2 bridge `bridge` (created with the pods'
    /// gateway address on first use), the pod routed over the bridge: no Ferry program on either.
    Bridge { bridge: String, port: String },
}

/// Pod layout: (node index, pod name, pod ip).
pub const PODS: [(usize, &str, [u8; 4]); 4] = [
    (0, "n1-pod1", [10, 201, 1, 11]),
    (0, "n1-pod2", [10, 201, 1, 12]),
    (1, "n2-pod1", [10, 201, 2, 11]),
    (1, "n2-pod2", [10, 201, 2, 12]),
];

impl Cluster {
    /// Builds two nodes with two pods each and starts an echo server in every pod. Agents are
    /// started separately (`start_agents`) so tests can prepare the manifests first.
    pub fn new(manifests: &Path) -> Cluster {
        Cluster::with_options(manifests, LabOptions::default())
    }

    /// [`Cluster::new`] with the given options.
    pub fn with_options(manifests: &Path, opts: LabOptions) -> Cluster {
        assert!(unsafe { libc::geteuid() } == 0, "the lab needs root (network namespaces, BPF)");
        let id = run_id();
        let cg_root = dataplane_agent::attach::cgroup2_root().expect("cgroup v2 mount");
        let cgroup = Cgroup::new(cg_root.join(format!("ferry-lab-{id}")));
        let logs = TempDir::new(&format!("lab-{id}"));
        let mut nodes = Vec::new();
        for i in 0..2u8 {
            let name = format!("node{}", i + 1);
            let ns = Netns::new(format!("ferry-{id}-{name}"));
            ns.sysctl("net.ipv4.ip_forward=1");
            // Translated packets re-enter routing with a source the reverse path may not know
            // (hairpin); production nodes run with loose or no rp_filter for the same reason.
            ns.sysctl("net.ipv4.conf.all.rp_filter=0");
            ns.sysctl("net.ipv4.conf.default.rp_filter=0");
            let pin = PinDir { path: PathBuf::from(format!("/sys/fs/bpf/ferry-lab-{id}-{name}")) };
            let node_cg = cgroup.path.join(&name);
            std::fs::create_dir_all(&node_cg).unwrap();
            nodes.push(Node { agent: None, name, ip: Ipv4Addr::new(192, 168, 77, i + 1), pin, ns, cgroup: node_cg });
        }
        // The node-to-node link, created directly in the two namespaces.
        sh(&["ip", "-n", &nodes[0].ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &nodes[1].ns.name]);
        for (i, n) in nodes.iter().enumerate() {
            n.ns.exec_ok(&["ip", "addr", "add", &format!("{}/24", n.ip), "dev", "eth0"]);
            if let Some(mtu) = opts.node_link_mtu {
                n.ns.exec_ok(&["ip", "link", "set", "eth0", "mtu", &mtu.to_string()]);
            }
            n.ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
            let other = &nodes[1 - i];
            n.ns.exec_ok(&["ip", "route", "add", &format!("10.201.{}.0/24", 2 - i), "via", &other.ip.to_string()]);
        }
        // The client outside the cluster: its own namespace, linked to node1's ext0; node2 routes
        // back to it through node1.
        let outside = Netns::new(format!("ferry-{id}-outside"));
        sh(&["ip", "-n", &outside.name, "link", "add", "eth0", "type", "veth", "peer", "name", "ext0", "netns", &nodes[0].ns.name]);
        outside.exec_ok(&["ip", "addr", "add", &format!("{OUTSIDE_CLIENT}/24"), "dev", "eth0"]);
        outside.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        outside.exec_ok(&["ip", "route", "add", "default", "via", "172.20.0.1"]);
        nodes[0].ns.exec_ok(&["ip", "addr", "add", "172.20.0.1/24", "dev", "ext0"]);
        nodes[0].ns.exec_ok(&["ip", "link", "set", "ext0", "up"]);
        nodes[1].ns.exec_ok(&["ip", "route", "add", "172.20.0.0/24", "via", &nodes[0].ip.to_string()]);
        // LoadBalancer and external IPs are announced by node1 (as a cloud LB or a router would
        // send them to a node); node1 translates them on ext0 before routing.
        for prefix in [LB_PREFIX, EXTERNAL_IP_PREFIX] {
            outside.exec_ok(&["ip", "route", "add", prefix, "via", "172.20.0.1"]);
        }
        if opts.offloads {
            for n in &nodes {
                offloads(&n.ns, "eth0", true);
            }
            offloads(&nodes[0].ns, "ext0", true);
            offloads(&outside, "eth0", false);
        }
        let mut c = Cluster {
            id,
            peer_xdp: Vec::new(),
            echo: Vec::new(),
            host_servers: Vec::new(),
            pods: Vec::new(),
            outside_hosts: Vec::new(),
            outside,
            nodes,
            cgroup,
            manifests: manifests.to_path_buf(),
            kubeconfig: None,
            logs,
            xdp: false,
            opts,
        };
        for (ni, name, ip) in PODS {
            c.add_pod(ni, name, Ipv4Addr::from(ip));
        }
        if c.opts.load_servers {
            for i in 0..c.nodes.len() {
                c.start_host_server(i);
            }
        }
        c
    }

    /// A `ferry-load` server in node `i`'s own namespace and cgroup: a hostNetwork endpoint at
    /// the node's address, named like the node.
    fn start_host_server(&mut self, i: usize) {
        let n = &self.nodes[i];
        let procs = n.cgroup.join("cgroup.procs");
        // UDP bound to the node's address: it answers from the address the (translated) request
        // was sent to, as a UDP server on a multi-homed host must.
        let addr = n.ip.to_string();
        let mut cmd = n.ns.cmd(&[load_bin().to_str().unwrap(), "serve", "--name", &n.name, "--tcp", &LOAD_TCP_PORT.to_string(), "--udp", &LOAD_UDP_PORT.to_string(), "--udp-addr", &addr]);
        use std::os::unix::process::CommandExt;
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start ferry-load on a node");
        self.host_servers.push(Proc { child, what: format!("ferry-load on {}", n.name) });
        wait_listening(&self.nodes[i].ns, LOAD_TCP_PORT, &self.nodes[i].name);
    }

    /// Sets up the veths that feed the agents' XDP programs as XDP_TX on a veth needs them (once;
    /// not with [`LabOptions::bare_xdp_peers`]). XDP_TX on a veth puts the frame on the peer's
    /// XDP ring, which only an XDP program on the peer drains (the kernel's veth_xdp_flush kicks
    /// the peer only when it has one; GRO on the peer gives it the ring but leaves the frames
    /// there), else the frame is dropped as an xdp_tx_error. And a veth's sender leaves TCP and
    /// UDP checksums partial for the receiver to trust, a mark XDP_TX drops with the skb: the
    /// frame then arrives with a checksum that fails. A NIC has neither problem (the wire
    /// carries complete checksums, the NIC transmits XDP_TX frames itself), so the lab makes its
    /// links behave as one: checksums completed by every sender into an XDP interface
    /// (`tx off`, the client's eth0 and both ends of the node link), and an XDP_PASS program on
    /// ext0's peer, the client's eth0 (the node link's ends carry the agents' own).
    pub fn prepare_xdp_peers(&mut self) {
        if !self.peer_xdp.is_empty() || self.opts.bare_xdp_peers {
            return;
        }
        self.outside.exec_ok(&["ethtool", "-K", "eth0", "tx", "off"]);
        for n in &self.nodes {
            n.ns.exec_ok(&["ethtool", "-K", "eth0", "tx", "off"]);
        }
        self.peer_xdp.push(xdp_pass_on(&self.outside, "eth0"));
    }

    /// A host on the client's side of node1: a namespace behind the client's, which routes for
    /// it (proxy ARP on its eth0). node1 reaches it by ext0, the interface the client comes in
    /// by, so a masqueraded NodePort connection from the client to it is the one-armed case
    /// XDP sends back out with XDP_TX. Starts `ferry-load serve` there (TCP on
    /// [`LOAD_TCP_PORT`]) and returns once it listens.
    pub fn add_outside_host(&mut self, name: &str, ip: Ipv4Addr) {
        let ns = Netns::new(format!("ferry-{}-{name}", self.id));
        let ifname = format!("h{}", self.outside_hosts.len());
        let out = &self.outside;
        sh(&["ip", "-n", &ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", &ifname, "netns", &out.name]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        ns.exec_ok(&["ip", "route", "add", "default", "via", OUTSIDE_CLIENT, "dev", "eth0", "onlink"]);
        out.exec_ok(&["ip", "link", "set", &ifname, "up"]);
        out.exec_ok(&["ip", "route", "add", &format!("{ip}/32"), "dev", &ifname]);
        out.sysctl("net.ipv4.ip_forward=1");
        for kv in ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.eth0.proxy_arp=1", "net.ipv4.neigh.eth0.proxy_delay=0"] {
            out.sysctl(kv);
        }
        out.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter=0"));
        self.echo.push(quiet(&ns, &[load_bin().to_str().unwrap(), "serve", "--name", name, "--tcp", &LOAD_TCP_PORT.to_string()], format!("ferry-load on {name}")));
        wait_listening(&ns, LOAD_TCP_PORT, name);
        self.outside_hosts.push(ns);
    }

    /// Adds a pod to node `ni` (namespace, veth to the node, routes) and starts its echo server.
    /// Works while the agents run: they attach to the new veth on the netlink link event.
    pub fn add_pod(&mut self, ni: usize, name: &str, ip: Ipv4Addr) {
        self.add_pod_linked(ni, name, ip, PodLink::Veth);
    }

    /// [`Cluster::add_pod`] with the pod joined to its node by `link`.
    pub fn add_pod_linked(&mut self, ni: usize, name: &str, ip: Ipv4Addr, link: PodLink) {
        let node = &self.nodes[ni];
        let gw = format!("10.201.{}.1", ni + 1);
        let ns = Netns::new(format!("ferry-{}-{name}", self.id));
        let host_if = match &link {
            PodLink::Veth => format!("veth{}{}", self.id, self.pods.len()),
            PodLink::Named(n) => n.clone(),
            PodLink::Bridge { port, .. } => port.clone(),
        };
        sh(&["ip", "-n", &ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", &host_if, "netns", &node.ns.name]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        ns.exec_ok(&["ip", "route", "add", &gw, "dev", "eth0", "scope", "link"]);
        ns.exec_ok(&["ip", "route", "add", "default", "via", &gw, "dev", "eth0"]);
        // The interface the node routes the pod over: the veth itself, or the bridge it hangs off.
        let routed = match &link {
            PodLink::Bridge { bridge, .. } => {
                let exists = node.ns.cmd(&["ip", "link", "show", bridge]).output().is_ok_and(|o| o.status.success());
                if !exists {
                    node.ns.exec_ok(&["ip", "link", "add", bridge, "type", "bridge"]);
                    node.ns.exec_ok(&["ip", "addr", "add", &format!("{gw}/32"), "dev", bridge]);
                    node.ns.exec_ok(&["ip", "link", "set", bridge, "up"]);
                    node.ns.sysctl(&format!("net.ipv4.conf.{bridge}.rp_filter=0"));
                }
                node.ns.exec_ok(&["ip", "link", "set", &host_if, "master", bridge]);
                bridge.clone()
            }
            _ => {
                node.ns.exec_ok(&["ip", "addr", "add", &format!("{gw}/32"), "dev", &host_if]);
                host_if.clone()
            }
        };
        node.ns.exec_ok(&["ip", "link", "set", &host_if, "up"]);
        node.ns.exec_ok(&["ip", "route", "add", &format!("{ip}/32"), "dev", &routed]);
        node.ns.sysctl(&format!("net.ipv4.conf.{host_if}.rp_filter=0"));
        if self.opts.offloads {
            offloads(&ns, "eth0", false);
            offloads(&node.ns, &host_if, true);
        }
        let child = ns
            .cmd(&[echo_bin().to_str().unwrap(), "serve", name, &ECHO_TCP_PORT.to_string(), &ECHO_UDP_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferry-echo");
        self.echo.push(Proc { child, what: format!("echo in {name}") });
        if self.opts.load_servers {
            let (bin, tcp, udp, sctp) = (load_bin(), LOAD_TCP_PORT.to_string(), LOAD_UDP_PORT.to_string(), LOAD_SCTP_PORT.to_string());
            let args = [bin.to_str().unwrap(), "serve", "--name", name, "--tcp", &tcp, "--udp", &udp, "--sctp", &sctp];
            self.echo.push(quiet(&ns, &args, format!("ferry-load in {name}")));
            wait_listening(&ns, LOAD_TCP_PORT, name);
        }
        self.pods.push(Pod { name: name.to_string(), ip, ns, host_if });
        // The server must be listening before anyone connects.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pod(name).ns.cmd(&["ss", "-Hltn", &format!("sport = :{ECHO_TCP_PORT}")]).output().is_ok_and(|o| !o.stdout.is_empty()) {
            assert!(Instant::now() < deadline, "echo server in {name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Another `ferry-load serve` in pod `pod`, named like the pod, on the given TCP ports (a
    /// destination of its own, e.g. for a bench's connections); stopped with the pods' servers.
    /// Returns once every port listens.
    pub fn add_load_server(&mut self, pod: &str, tcp_ports: &[u16]) {
        let mut args = vec![load_bin().to_str().unwrap().to_string(), "serve".into(), "--name".into(), pod.into()];
        for p in tcp_ports {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self.pod(pod).ns.cmd(&refs).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start ferry-load");
        self.echo.push(Proc { child, what: format!("ferry-load {tcp_ports:?} in {pod}") });
        for p in tcp_ports {
            wait_listening(&self.pod(pod).ns, *p, pod);
        }
    }

    pub fn pod_ip(&self, name: &str) -> Ipv4Addr {
        self.pod(name).ip
    }

    /// An interactive client in a pod (`tcp-session` or `udp-session`): one connection or one
    /// socket, a request per call to [`Session::ask`].
    pub fn session(&self, pod: &str, mode: &str, addr: &str) -> Session {
        let child = self
            .pod(pod)
            .ns
            .cmd(&[echo_bin().to_str().unwrap(), mode, addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start session");
        Session::new(Proc { child, what: format!("{mode} from {pod}") })
    }

    /// Pod objects for every pod of the lab, labelled `role: <role(name)>`, in namespace `lab`.
    pub fn pods_yaml(&self, role: impl Fn(&str) -> &'static str) -> String {
        self.pods
            .iter()
            .map(|p| {
                let node = self.node_of_pod(&p.name);
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: lab, labels: {{role: {}}}}}\nspec: {{nodeName: {node}, containers: [{{name: echo, ports: [{{name: echo, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {}}}\n---\n",
                    p.name,
                    role(&p.name),
                    p.ip
                )
            })
            .collect()
    }

    /// The node pod `name` runs on (pod addresses are 10.201.<node number>.x).
    pub fn node_of_pod(&self, name: &str) -> &str {
        &self.nodes[(self.pod(name).ip.octets()[2] as usize).saturating_sub(1).min(self.nodes.len() - 1)].name
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts (or restarts) the agent of node `i` and waits until it has attached to every pod
    /// interface of its node and synced the manifests.
    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_bin(i, &agent_bin());
    }

    /// [`Cluster::start_agent`] with another build of the agent (an upgrade, a rollback).
    pub fn start_agent_bin(&mut self, i: usize, bin: &Path) {
        let since = self.spawn_agent(i, bin, true, &[]);
        let pods_here = PODS.iter().filter(|(ni, _, _)| *ni == i).count();
        self.wait_log(i, |l| {
            let l = &l[since.min(l.len())..];
            l.matches("attached ferry_from_pod").count() >= pods_here && l.contains("synced ")
        });
    }

    /// Starts the agent `bin` on node `i` with the lab's flags, reading the lab's manifests (or
    /// its API server, with `kubeconfig`) when `manifests` (else `extra` must name a source), plus `extra` (whose `--cgroup` replaces the
    /// lab's); returns where its output starts in the node's log. Does not wait.
    pub fn spawn_agent(&mut self, i: usize, bin: &Path, manifests: bool, extra: &[&str]) -> usize {
        let log = self.logs.path.join(format!("{}.log", self.nodes[i].name));
        // Only what this agent writes counts (a restart appends to the same log).
        let since = self.agent_log(i).len();
        // The link to the other node (replies of source-translated connections come back on it)
        // and, on node1, the link to the client outside.
        let external = if i == 0 { "eth0,ext0" } else { "eth0" };
        let acceleration = if self.xdp { "xdp" } else { "none" };
        if self.xdp {
            self.prepare_xdp_peers();
        }
        let n = &mut self.nodes[i];
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let source: Vec<&str> = match (manifests, &self.kubeconfig) {
            (true, Some(k)) => vec!["--kubeconfig", k.to_str().unwrap()],
            (true, None) => vec!["--manifests", self.manifests.to_str().unwrap()],
            (false, _) => vec![],
        };
        // The node's cgroup for the socket hooks, unless `extra` names another.
        let cgroup: Vec<&str> = if extra.contains(&"--cgroup") { vec![] } else { vec!["--cgroup", n.cgroup.to_str().unwrap()] };
        let child = n
            .ns
            .cmd(&[bin.to_str().unwrap(), "run", "--node", &n.name])
            .args(&source)
            .args(&cgroup)
            .args([
                "--pin-dir",
                n.pin.path.to_str().unwrap(),
                "--pod-interfaces",
                "veth*",
                "--service-cidr",
                SERVICE_CIDR,
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--node-ip",
                &n.ip.to_string(),
                "--external-interfaces",
                external,
                "--nodeport-acceleration",
                acceleration,
                "--min-sync-period-ms",
                "100",
            ])
            .args(&self.opts.agent_args)
            .args(extra)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start agent");
        n.agent = Some(Proc { child, what: format!("agent on {}", n.name) });
        since
    }

    /// Kills the agent of node `i` with SIGKILL (as the OOM killer or a node's hard stop does)
    /// and reaps it.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
    }

    pub fn start_agents(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_agent(i);
        }
    }

    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.stop();
        }
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.logs.path.join(format!("{}.log", self.nodes[i].name))).unwrap_or_default()
    }

    /// Waits (up to 15 s) until the agent log of node `i` satisfies `f`; panics with the log.
    pub fn wait_log(&mut self, i: usize, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.agent_log(i);
            if f(&log) {
                return;
            }
            if let Some(a) = &mut self.nodes[i].agent {
                if let Ok(Some(st)) = a.child.try_wait() {
                    panic!("agent on {} exited ({st}):\n{log}", self.nodes[i].name);
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for the agent on {}:\n{log}", self.nodes[i].name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of completed syncs in node `i`'s log.
    pub fn syncs(&self, i: usize) -> usize {
        self.agent_log(i).matches("synced ").count()
    }

    /// Rewrites one manifest file and waits until every agent has synced it.
    pub fn write_manifest(&mut self, file: &str, yaml: &str) {
        let before: Vec<usize> = (0..self.nodes.len()).map(|i| self.syncs(i)).collect();
        // Written beside, then renamed into place: the agent watches the directory and would
        // otherwise read the file half-written (a partial read is a sync that removes the
        // Services not yet written, and `synced` would count it; an empty one is held 5 s).
        let tmp = self.logs.path.join(format!(".{file}.new"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests.join(file)).unwrap();
        for (i, b) in before.iter().enumerate() {
            if self.nodes[i].agent.is_some() {
                self.wait_log(i, |l| l.matches("synced ").count() > *b);
            }
        }
    }

    /// Runs the echo client in a pod; returns one line per request (`NAME SEEN_SOURCE`, or
    /// `ERR kind`).
    pub fn client_in_pod(&self, pod: &str, args: &[&str]) -> Vec<String> {
        let p = self.pod(pod);
        let mut full = vec![echo_bin().to_str().unwrap().to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        output_lines(p.ns.cmd(&refs))
    }

    /// Runs the echo client in the namespace outside the cluster.
    pub fn client_outside(&self, args: &[&str]) -> Vec<String> {
        let mut full = vec![echo_bin().to_str().unwrap().to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        output_lines(self.outside.cmd(&refs))
    }

    /// Runs the echo client as a process of node `i` itself (host network, in the node's
    /// cgroup, where the socket hooks are attached).
    pub fn client_on_node(&self, i: usize, args: &[&str]) -> Vec<String> {
        let n = &self.nodes[i];
        let procs = n.cgroup.join("cgroup.procs");
        let mut c = n.ns.cmd(&[echo_bin().to_str().unwrap()]);
        c.args(args);
        use std::os::unix::process::CommandExt;
        unsafe {
            // Into the node's cgroup, where its agent attached the socket hooks.
            c.pre_exec(move || std::fs::write(&procs, "0"));
        }
        output_lines(c)
    }
}

fn output_lines(mut c: Command) -> Vec<String> {
    let out = c.output().expect("run ferry-echo client");
    // Ctrl-C in a terminal reaches the client too: no answers, and the caller's own check of
    // the interruption tears down (instead of a panic about the client).
    use std::os::unix::process::ExitStatusExt;
    if out.status.signal() == Some(libc::SIGINT) {
        return Vec::new();
    }
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// An interactive echo client: write a line, read the answer.
pub struct Session {
    proc_: Proc,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    fn new(mut proc_: Proc) -> Self {
        let out = std::io::BufReader::new(proc_.child.stdout.take().unwrap());
        Session { proc_, out }
    }

    /// Sends one request; returns `NAME SEEN_SOURCE` or `ERR …`.
    pub fn ask(&mut self) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.proc_.child.stdin.as_mut().unwrap();
        stdin.write_all(b"ask\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// The answering pod of one request (panics on an error answer).
    pub fn backend(&mut self) -> String {
        let a = self.ask();
        assert!(!a.starts_with("ERR") && !a.is_empty(), "request failed: {a:?}");
        a.split_whitespace().next().unwrap().to_string()
    }
}

/// The echo Services of `deploy/examples/` with the given endpoints (pod IPs) for each.
pub fn echo_yaml(tcp: &[Ipv4Addr], udp: &[Ipv4Addr]) -> String {
    let eps = |ips: &[Ipv4Addr]| -> String {
        if ips.is_empty() {
            return "endpoints: []\n".into();
        }
        let mut s = String::from("endpoints:\n");
        for ip in ips {
            s += &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n");
        }
        s
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo-tcp, namespace: lab}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: echo, port: 80, protocol: TCP, targetPort: echo}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-udp, namespace: lab}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: echo-udp, port: 53, protocol: UDP, targetPort: 5353}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-tcp-1, namespace: lab, labels: {{kubernetes.io/service-name: echo-tcp}}}}
addressType: IPv4
ports: [{{name: echo, port: 8080, protocol: TCP}}]
{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-udp-1, namespace: lab, labels: {{kubernetes.io/service-name: echo-udp}}}}
addressType: IPv4
ports: [{{name: echo-udp, port: 5353, protocol: UDP}}]
{}"#,
        eps(tcp),
        eps(udp)
    )
}

/// NodePort Services for the client outside: `echo-nodeport` (externalTrafficPolicy Cluster,
/// node port 30080) over `cluster` endpoints and `echo-local` (a LoadBalancer with traffic
/// policy Local, node port 30081, healthCheckNodePort 32081) over `local` ones, each endpoint
/// given as (pod IP, node name).
pub fn nodeport_yaml(cluster: &[(Ipv4Addr, &str)], local: &[(Ipv4Addr, &str)]) -> String {
    let eps = |list: &[(Ipv4Addr, &str)]| -> String {
        if list.is_empty() {
            return "endpoints: []\n".into();
        }
        let mut s = String::from("endpoints:\n");
        for (ip, node) in list {
            s += &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n");
        }
        s
    };
    let mut out = String::new();
    for (name, kind, policy, node_port, list) in [
        ("echo-nodeport", "NodePort", "Cluster", 30080, cluster),
        ("echo-local", "LoadBalancer", "Local\n  healthCheckNodePort: 32081", 30081, local),
    ] {
        out += &format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  type: {kind}
  clusterIP: 10.96.0.{}
  externalTrafficPolicy: {policy}
  ports: [{{name: echo, port: 80, protocol: TCP, targetPort: echo, nodePort: {node_port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: echo, port: 8080, protocol: TCP}}]
{}"#,
            30 + node_port - 30080,
            eps(list)
        );
    }
    out
}

/// Counts replies by the answering pod's name (`ERR …` lines are counted under their text).
pub fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines {
        let key = if l.starts_with("ERR") { l.clone() } else { l.split_whitespace().next().unwrap_or("").to_string() };
        *m.entry(key).or_default() += 1;
    }
    m
}

/// The example manifests of `deploy/examples/`, which describe exactly this topology.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Waits (up to 5 s) until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Netns, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.cmd(&["ss", "-Hltn", &format!("sport = :{port}")]).output().is_ok_and(|o| !o.stdout.is_empty()) {
        assert!(Instant::now() < deadline, "no server on port {port} in {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that TSO and GSO are on for `dev` in `ns` (veths start that way; real NICs too) and,
/// on node-side ends (`gro`), turns GRO on: then packets a peer sends unsegmented arrive
/// aggregated, so Ferry's ingress programs see super-packets as on a real node.
pub fn offloads(ns: &Netns, dev: &str, gro: bool) {
    if gro {
        ns.exec_ok(&["ethtool", "-K", dev, "gro", "on"]);
    }
    let out = ns.cmd(&["ethtool", "-k", dev]).output().unwrap_or_else(|e| panic!("ethtool (cargo xtask setup installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut want = vec!["tcp-segmentation-offload: on", "generic-segmentation-offload: on"];
    if gro {
        want.push("generic-receive-offload: on");
    }
    for w in want {
        assert!(text.lines().any(|l| l.trim() == w), "{dev} in {}: want {w:?}:\n{text}", ns.name);
    }
}

/// Where a `ferry-load` client runs.
#[derive(Clone, Copy, Debug)]
pub enum At<'a> {
    Pod(&'a str),
    /// The client outside the cluster (behind node1's ext0).
    Outside,
    /// A process of node `i` itself: host network, in the node's cgroup (the socket hooks).
    Node(usize),
}

/// A running `ferry-load` client with its stdin and stdout piped (sessions, idle connections).
pub struct LoadProc {
    proc_: Proc,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl LoadProc {
    /// Writes one line to its stdin.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.proc_.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Reads one line of its output ("" at its end). Bounded by the client's own timeouts.
    pub fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        let _ = self.out.read_line(&mut l);
        l.trim().to_string()
    }

    /// One request of a `session`: its answer line (`NAME PEER` or `ERR ...`).
    pub fn ask(&mut self) -> String {
        self.send("ask");
        self.line()
    }

    /// Closes its stdin and returns the rest of its output, line by line.
    pub fn finish(mut self) -> Vec<String> {
        drop(self.proc_.child.stdin.take());
        let mut rest = Vec::new();
        // Bounded: the client exits when its stdin closes or its own deadlines pass.
        for _ in 0..100_000 {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            rest.push(l);
        }
        let _ = self.proc_.child.wait();
        rest
    }
}

impl Cluster {
    /// A `ferry-load` command at `at`.
    pub fn load_cmd(&self, at: At, args: &[&str]) -> Command {
        let bin = load_bin();
        let mut full = vec![bin.to_str().unwrap()];
        full.extend_from_slice(args);
        match at {
            At::Pod(p) => self.pod(p).ns.cmd(&full),
            At::Outside => self.outside.cmd(&full),
            At::Node(i) => {
                let n = &self.nodes[i];
                let procs = n.cgroup.join("cgroup.procs");
                let mut c = n.ns.cmd(&full);
                use std::os::unix::process::CommandExt;
                unsafe {
                    // Into the node's cgroup, where its agent attached the socket hooks.
                    c.pre_exec(move || std::fs::write(&procs, "0"));
                }
                c
            }
        }
    }

    /// Runs a `ferry-load` client to its end and returns its output lines. Its exit status is
    /// not checked: clients exit non-zero when they count failures, and the test asserts on the
    /// lines, which say what failed.
    pub fn load(&self, at: At, args: &[&str]) -> Vec<String> {
        let out = self.load_cmd(at, args).output().unwrap_or_else(|e| panic!("ferry-load {args:?} at {at:?}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some_and(|c| c <= 1), "ferry-load {args:?} at {at:?} died ({}): {stderr}", out.status);
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
    }

    /// Starts a `ferry-load` client at `at` with piped stdin and stdout.
    pub fn load_spawn(&self, at: At, args: &[&str]) -> LoadProc {
        let mut child = self
            .load_cmd(at, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ferry-load {args:?} at {at:?}: {e}"));
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        LoadProc { proc_: Proc { child, what: format!("ferry-load {args:?} at {at:?}") }, out }
    }
}

/// The IP of a pod of the default layout ([`PODS`]).
pub fn pod_ip_of(name: &str) -> Ipv4Addr {
    Ipv4Addr::from(PODS.iter().find(|p| p.1 == name).unwrap_or_else(|| panic!("no pod {name}")).2)
}

/// The node a pod of the default layout runs on.
pub fn node_of(pod: &str) -> &'static str {
    ["node1", "node2"][PODS.iter().find(|p| p.1 == pod).unwrap_or_else(|| panic!("no pod {pod}")).0]
}

/// A node's address (`node1` is 192.168.77.1).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, i as u8 + 1)
}

/// One port of a [`Svc`].
#[derive(Clone, Debug)]
pub struct SvcPort {
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub proto: &'static str,
    pub port: u16,
    pub target: u16,
    pub node_port: Option<u16>,
}

impl SvcPort {
    pub fn new(proto: &'static str, port: u16, target: u16) -> Self {
        SvcPort { name: format!("{}-{port}", proto.to_lowercase()), proto, port, target, node_port: None }
    }

    pub fn node_port(mut self, p: u16) -> Self {
        self.node_port = Some(p);
        self
    }
}

/// A Service of any kind with its EndpointSlice, as manifests for the agents: ClusterIP,
/// NodePort, LoadBalancer (ingress IPs in `status.loadBalancer.ingress`), external IPs, either
/// traffic policy; endpoints are pods or nodes (hostNetwork: the node's address).
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    pub kind: &'static str,
    pub cluster_ip: String,
    /// externalTrafficPolicy Local.
    pub local: bool,
    pub external_ips: Vec<String>,
    pub lb_ips: Vec<String>,
    pub ports: Vec<SvcPort>,
    /// (address, node name).
    pub endpoints: Vec<(Ipv4Addr, String)>,
}

impl Svc {
    pub fn new(name: &str, kind: &'static str, cluster_ip: &str) -> Self {
        Svc { name: name.into(), kind, cluster_ip: cluster_ip.into(), local: false, external_ips: vec![], lb_ips: vec![], ports: vec![], endpoints: vec![] }
    }

    pub fn port(mut self, p: SvcPort) -> Self {
        self.ports.push(p);
        self
    }

    pub fn local(mut self) -> Self {
        self.local = true;
        self
    }

    pub fn external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.into());
        self
    }

    pub fn lb_ip(mut self, ip: &str) -> Self {
        self.lb_ips.push(ip.into());
        self
    }

    /// Pods of the default layout, by name, as endpoints on their nodes.
    pub fn pods(mut self, pods: &[&str]) -> Self {
        self.endpoints.extend(pods.iter().map(|p| (pod_ip_of(p), node_of(p).to_string())));
        self
    }

    /// Node `i` itself as an endpoint (a hostNetwork pod): its address, its name.
    pub fn host_endpoint(mut self, i: usize) -> Self {
        self.endpoints.push((node_ip(i), format!("node{}", i + 1)));
        self
    }

    pub fn yaml(&self) -> String {
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|p| {
                let np = p.node_port.map(|n| format!(", nodePort: {n}")).unwrap_or_default();
                format!("{{name: {}, port: {}, protocol: {}, targetPort: {}{np}}}", p.name, p.port, p.proto, p.target)
            })
            .collect();
        let mut spec = format!("  type: {}\n  clusterIP: {}\n  ports: [{}]\n", self.kind, self.cluster_ip, ports.join(", "));
        if self.kind != "ClusterIP" {
            spec += &format!("  externalTrafficPolicy: {}\n", if self.local { "Local" } else { "Cluster" });
        }
        if !self.external_ips.is_empty() {
            spec += &format!("  externalIPs: [{}]\n", self.external_ips.join(", "));
        }
        let status = if self.lb_ips.is_empty() {
            String::new()
        } else {
            let ingress: Vec<String> = self.lb_ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
            format!("status:\n  loadBalancer:\n    ingress: [{}]\n", ingress.join(", "))
        };
        let slice_ports: Vec<String> = self.ports.iter().map(|p| format!("{{name: {}, port: {}, protocol: {}}}", p.name, p.target, p.proto)).collect();
        let endpoints = if self.endpoints.is_empty() {
            "endpoints: []\n".to_string()
        } else {
            let mut e = String::from("endpoints:\n");
            for (ip, node) in &self.endpoints {
                e += &format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n");
            }
            e
        };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: soak}}\nspec:\n{spec}{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: soak, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{}]\n{endpoints}",
            slice_ports.join(", "),
            name = self.name
        )
    }
}

/// The manifests of several Services, for one file.
pub fn services_yaml(svcs: &[Svc]) -> String {
    svcs.iter().map(Svc::yaml).collect()
}
