//! The ABI between Ferry's kernel programs and its agent: map names, capacities, `#[repr(C)]`
//! keys and values, drop reasons and stat indices. Nothing else lives here.
//!
//! Rules (from Cilium's and Katran's habits): only integers and explicit `pad` fields in map
//! types, so any bit pattern the kernel hands back is a valid value; field names carry their byte
//! order (`_be` = network order, as on the wire); a map whose layout changes gets a new versioned
//! name instead of being changed in place, so an old pinned map is never misread.
#![no_std]

#[cfg(feature = "user")]
pub mod layout;

/// Pinned map names. The `_v1` suffix is the layout version (see the crate docs).
pub mod names {
    pub const SERVICES: &str = "lb4_svc_v3";
    pub const SLOTS: &str = "lb4_slot_v1";
    pub const BACKENDS: &str = "lb4_be_v1";
    /// Connection tracking, LRU: new, unreplied and closing connections (evicted first under
    /// pressure, netfilter's early drop).
    pub const CONNTRACK: &str = "ct4_v2";
    /// Connection tracking of assured (established) connections: a plain hash map that only
    /// timeouts and closes empty, so churn can never evict a live connection.
    pub const CONNTRACK_ASSURED: &str = "ct4_assured_v2";
    pub const FRAGMENTS: &str = "frag4_v1";
    pub const SERVICE_CIDRS: &str = "svc_cidr4_v1";
    pub const STATS: &str = "stats_v1";
    pub const AFFINITY: &str = "lb4_aff_v1";
    pub const SOURCE_RANGES: &str = "lb4_src_v1";
    pub const CONFIG: &str = "cfg4_v4";
    /// Every frontend's consistent-hashing table, each in a region of one flat mmapable array
    /// (`Lb4Service::table_off`, `table_len`). Replaced `lb4_chash_v2`, a hash of one inner array
    /// per frontend, whose every new table cost an RCU grace period to link in.
    pub const CHASH: &str = "lb4_chash_flat_v1";
    pub const SVC_STATS: &str = "lb4_svc_stat_v1";
    pub const SVC_NAMES: &str = "lb4_svc_name_v1";
    pub const POL_IPCACHE: &str = "pol_ipcache4_v1";
    pub const POL_ENDPOINTS: &str = "pol_ep4_v1";
    pub const POL_RULES: &str = "pol_rule4_v1";
    /// Policy conntrack: new, unreplied and closing connections (LRU).
    pub const POL_CONNTRACK: &str = "pol_ct4_v2";
    /// Policy conntrack: established connections (nothing evicts them).
    pub const POL_CONNTRACK_ASSURED: &str = "pol_ct4_assured_v2";
    /// The verdict of each fragmented datagram's first fragment, for its later fragments.
    pub const POL_FRAGMENTS: &str = "pol_frag4_v1";
    /// When a deny event was last sent per (pod, peer, port): events are rate-limited.
    pub const POL_EVENT_LIMIT: &str = "pol_evlimit4_v1";
    pub const POL_DROPS: &str = "pol_drop_v1";
    pub const POL_EVENTS: &str = "pol_events_v2";
    pub const POL_NAMES: &str = "pol_name_v1";
    pub const POD_NAMES: &str = "pol_podname4_v1";
    pub const IDENTITY_NAMES: &str = "pol_idname_v1";
    /// The Service address each host socket was translated from (recvmsg/getpeername): pinned so
    /// that sockets opened before an agent restart still report it.
    pub const SOCK_REV: &str = "sock_rev4_v1";
    /// This node's own addresses and its pods', by address: what source addresses are checked
    /// against (anti-spoofing).
    pub const LOCAL_ADDRS: &str = "local4_v1";
    /// This node's pod interfaces, by ifindex: the pod's address behind each.
    pub const POD_IFACES: &str = "pod_if4_v1";
    /// Policy conntrack tuples a policy change cut, per pod interface, with when they were last
    /// seen: a packet of one opens no new connection unless a rule allows its direction.
    pub const POL_REVOKED: &str = "pol_revoked4_v1";
    /// Assured connections per source address, [Service conntrack, policy conntrack]: what
    /// `--conntrack-max-per-source` is checked against (recounted by the garbage collector).
    pub const CT_SOURCES: &str = "ct_src4_v1";
    /// (frontend, backend) pairs the agent took out of a frontend, with when (`Lb4PairKey` ->
    /// monotonic ns): a UDP or SCTP connection tracked to such a pair moves to another backend
    /// at its next packet, and a sessionAffinity client stuck to one chooses again (TCP
    /// connections keep their backend: graceful termination). What
    /// kube-proxy does by deleting conntrack entries, without a walk over conntrack. LRU: the
    /// oldest go first; the agent removes a pair's when the backend joins the frontend again.
    pub const GONE: &str = "lb4_gone_v1";
    /// Every map the agent pins, in the order it creates and checks them.
    pub const ALL: [&str; 32] = [
        SERVICES, SLOTS, BACKENDS, CONNTRACK, CONNTRACK_ASSURED, FRAGMENTS, SERVICE_CIDRS, STATS, AFFINITY, SOURCE_RANGES, CONFIG, CHASH, SVC_STATS, SVC_NAMES,
        POL_IPCACHE, POL_ENDPOINTS, POL_RULES, POL_CONNTRACK, POL_CONNTRACK_ASSURED, POL_FRAGMENTS, POL_EVENT_LIMIT, POL_DROPS, POL_EVENTS, POL_NAMES,
        POD_NAMES, IDENTITY_NAMES, SOCK_REV, LOCAL_ADDRS, POD_IFACES, CT_SOURCES, POL_REVOKED, GONE,
    ];
}

/// Program names as they appear in the object file.
pub mod progs {
    /// tc ingress on the host side of a pod's veth: packets leaving the pod.
    pub const FROM_POD: &str = "ferry_from_pod";
    /// tc egress on the host side of a pod's veth: packets about to enter the pod.
    pub const TO_POD: &str = "ferry_to_pod";
    /// tc ingress on the node's external interfaces: NodePort, LoadBalancer and external IP
    /// traffic from outside the node, and replies to connections it source-translated.
    pub const FROM_WORLD: &str = "ferry_from_world";
    /// tc egress on the node's external interfaces: replies of the node's own processes
    /// (hostNetwork endpoints) to connections translated to them.
    pub const TO_WORLD: &str = "ferry_to_world";
    /// cgroup connect4: host-network processes connecting to a Service.
    pub const SOCK_CONNECT4: &str = "ferry_connect4";
    /// cgroup sendmsg4: unconnected UDP from host-network processes.
    pub const SOCK_SENDMSG4: &str = "ferry_sendmsg4";
    /// cgroup recvmsg4: replies to unconnected UDP, source back to the Service address.
    pub const SOCK_RECVMSG4: &str = "ferry_recvmsg4";
    /// cgroup getpeername4: a connected socket reports the Service address as its peer.
    pub const SOCK_GETPEERNAME4: &str = "ferry_getpeer4";
    /// XDP on the external interfaces: NodePort acceleration.
    pub const XDP_NODEPORT: &str = "ferry_xdp_nodeport";
    /// An empty classifier: the baseline of `cargo xtask bench`. Never attached.
    pub const BENCH_EMPTY: &str = "ferry_bench_empty";
    /// An empty XDP program (XDP_PASS): the XDP baseline of `cargo xtask bench`; the lab attaches
    /// it to veth peers that must drain XDP_TX frames.
    pub const BENCH_EMPTY_XDP: &str = "ferry_bench_empty_xdp";
}

/// Map capacities. The agent may override the large ones at load time.
pub mod capacity {
    pub const SERVICES: u32 = 262_144;
    /// Entries (backend ids) of all consistent-hashing tables together, in `lb4_chash_flat_v1`
    /// (`--lb-table-entries`; the map holds half as many elements, two entries each). 64 MiB:
    /// 66 000 Services of up to 25 endpoints (251 entries each), or 16 000 of up to 102 (1021).
    pub const CHASH_ENTRIES: u32 = 16_777_216;
    pub const SLOTS: u32 = 1_048_576;
    pub const BACKENDS: u32 = 262_144;
    /// Assured (established) connections, two entries each; `--conntrack-capacity`.
    pub const CONNTRACK: u32 = 524_288;
    /// New and closing connections (LRU); half of `--conntrack-capacity`.
    pub const CONNTRACK_NEW: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
    pub const SERVICE_CIDRS: u32 = 64;
    pub const STATS: u32 = 64;
    pub const SOCK_REVNAT: u32 = 65_536;
    pub const AFFINITY: u32 = 262_144;
    /// Backends taken out of frontends and not back (`lb4_gone_v1`).
    pub const GONE: u32 = 65_536;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Addresses and CIDRs with an identity (every pod of the cluster, every ipBlock prefix).
    pub const POL_IPCACHE: u32 = 262_144;
    /// Pods of this node under some NetworkPolicy.
    pub const POL_ENDPOINTS: u32 = 16_384;
    pub const POL_RULES: u32 = 1_048_576;
    /// Policy conntrack, new and closing connections (LRU).
    pub const POL_CONNTRACK: u32 = 262_144;
    /// Policy conntrack, established connections.
    pub const POL_CONNTRACK_ASSURED: u32 = 524_288;
    pub const POL_FRAGMENTS: u32 = 8_192;
    pub const POL_EVENT_LIMIT: u32 = 16_384;
    /// NetworkPolicies (ids `1..POLICIES`); the drop counters hold two slots per id.
    pub const POLICIES: u32 = 32_768;
    pub const POL_EVENTS_BYTES: u32 = 1 << 20;
    pub const POD_NAMES: u32 = 262_144;
    pub const IDENTITIES: u32 = 65_536;
    /// This node's addresses and its pods' addresses.
    pub const LOCAL_ADDRS: u32 = 16_384;
    /// This node's pod interfaces.
    pub const POD_IFACES: u32 = 16_384;
    /// Source addresses with assured connections (LRU: a source pushed out restarts from 0
    /// until the next recount).
    pub const CT_SOURCES: u32 = 65_536;
    pub const POL_REVOKED: u32 = 65_536;
}

/// `ct_src4_v1` value slots.
pub const CT_SOURCE_SERVICE: usize = 0;
pub const CT_SOURCE_POLICY: usize = 1;

/// `BPF_F_MMAPABLE`: the agent writes consistent-hashing tables through `mmap` instead of one
/// syscall per entry (kernel 5.5).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of the flat table array (`lb4_chash_flat_v1`).
pub const CHASH_FLAT_FLAGS: u32 = BPF_F_MMAPABLE;
/// Table entries (backend ids) per element of `lb4_chash_flat_v1`: the kernel stores array
/// values 8-byte aligned, so a `u32` value would waste half of every element; a `[u32; 2]` packs
/// two entries and entry `i` of the array is the `u32` at byte `4 i` of the mapping.
pub const CHASH_PER_ELEMENT: u32 = 2;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// Key of the service map: a frontend `address:port/proto` as seen from `scope`. An entry with
/// `port_be == 0` and `proto == 0` marks the address itself as a ClusterIP, so a port the Service
/// does not expose is refused (kube-proxy nftables mode) with a single extra lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4Key {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `SCOPE_INTERNAL` (from pods and the node itself) or `SCOPE_EXTERNAL` (arriving from outside
    /// the node). Traffic policies make the two differ (Cilium's two-scope frontends).
    pub scope: u8,
}

pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// `Lb4Service.flags`: the entry only marks a ClusterIP address (port 0, proto 0).
pub const SVC_F_ADDR_ONLY: u16 = 1 << 0;
/// `Lb4Service.flags`: with no backend, drop instead of refusing (kube-proxy drops traffic for a
/// traffic policy `Local` with no local endpoint).
pub const SVC_F_DROP_EMPTY: u16 = 1 << 1;
/// `Lb4Service.flags`: sources are checked against the Service's loadBalancerSourceRanges.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 2;
/// `Lb4Service.flags`: a NodePort, LoadBalancer or external IP frontend (not a ClusterIP).
/// Informational: the datapath does not read it; it tells these frontends apart from ClusterIPs
/// in `bpftool map dump` and inspection.
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 3;
/// `Lb4Service.flags`: pick backends at random (kube-proxy's way) instead of by the frontend's
/// consistent-hashing table (Maglev, the default, or rendezvous).
pub const SVC_F_RANDOM: u16 = 1 << 4;
/// `Lb4Service.flags`: every new connection to this frontend gets this node's address as its
/// source (kube-proxy's masquerade mark): NodePort, LoadBalancer and external IP frontends of
/// Services with externalTrafficPolicy Cluster, from outside and from pods alike, and every
/// ClusterIP with `--masquerade-all`.
pub const SVC_F_MASQ: u16 = 1 << 5;

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Service {
    /// Stable id of this frontend; keys the slot map and the per-Service counters.
    pub svc_id: u32,
    /// Number of backend slots `0..count` in the slot map. 0: no endpoint, refuse (or drop).
    pub count: u16,
    pub flags: u16,
    /// sessionAffinity ClientIP timeout in seconds; 0 for no affinity.
    pub affinity_timeout_s: u32,
    /// This frontend's consistent-hashing table: entries `table_off .. table_off + table_len`
    /// of `lb4_chash_flat_v1` (the datapath picks entry `table_off + hash % table_len`). Both 0:
    /// no table, pick at random (also what an entry migrated from `lb4_svc_v2` says until the
    /// first sync writes its table). The region is the agent's (`bpf::TableArena`): a table of
    /// another size is written to a new region before this entry is switched to it, and the old
    /// region is reused only after an RCU grace period.
    pub table_off: u32,
    pub table_len: u32,
}

/// Key of `lb4_gone_v1`: a backend of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4PairKey {
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Key of the session affinity map: a client of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_be: u32,
}

/// Value of the session affinity map: the backend the client sticks to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    pub last_used_ns: u64,
}

/// Data of the source-range LPM trie key: a frontend and a source. The key's prefix length counts
/// all 32 bits of `svc_id` plus the CIDR's bits, so one trie holds every Service's ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrcRangeData {
    pub svc_id: u32,
    pub addr_be: u32,
}

/// Key of the slot map: slot `slot` of frontend `svc_id`. Slots are dense `0..count`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

/// `Lb4Backend.flags`: the backend runs on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;
/// `Lb4Backend.flags`: the backend is this node itself (a hostNetwork endpoint on one of the
/// node's addresses): its replies come from the node's own stack, and its source is never
/// translated to the node (a packet from the node to itself arriving from outside is a martian).
pub const BE_F_HOST: u8 = 1 << 1;

/// Value of the backend map, keyed by a `u32` backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Conntrack key: the packet's own 5-tuple as seen where the lookup happens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `Ct4Entry.flags`: the entry translates the original direction (client to Service).
pub const CT_F_FORWARD: u32 = 1 << 0;
/// `Ct4Entry.flags`: the entry translates replies (backend to client).
pub const CT_F_REPLY: u32 = 1 << 1;
/// `Ct4Entry.flags`: the client is its own backend; its source is rewritten to the Service
/// address so the pod does not see a packet from itself to itself.
pub const CT_F_HAIRPIN: u32 = 1 << 2;

/// `Ct4Entry.flags`: after translation the packet's source is an address of this node, which
/// the stack would drop as martian on input: send it out through a FIB lookup instead.
pub const CT_F_REDIRECT: u32 = 1 << 3;
/// `Ct4Entry.flags`: the source was translated to this node's address (NodePort to a remote
/// backend, externalTrafficPolicy Cluster). Informational, for `bpftool map dump` and inspection:
/// the translated tuple itself is in the entry.
pub const CT_F_SNAT: u32 = 1 << 4;
/// `Ct4Entry.flags`: the connection came from outside the node (created by the from-world hook).
/// The from-world hook translates only these: replies of connections that pods opened are
/// translated on their way into the pod, after routing.
pub const CT_F_EXTERNAL: u32 = 1 << 5;
/// `Ct4Entry.flags`: not a Service connection but a pod's direct flow whose tuple clashed with a
/// live Service connection's translated tuple; only its source port is translated (netfilter's
/// implicit source-port remap on a clash).
pub const CT_F_CLASH: u32 = 1 << 6;

/// `Ct4Entry.flags`: the backend is a pod of this node (its endpoint's nodeName). Says nothing
/// about where its replies are translated: a pod behind a link the agent does not attach to (a
/// CNI naming its links otherwise, a bridge, a tunnel, a route through another interface) sends
/// them past every from-pod hook (see `CT_F_REPLY_AT_SOURCE`).
pub const CT_F_LOCAL_BACKEND: u32 = 1 << 7;
/// `Ct4Entry.flags`, on a reply entry: the from-pod hook translated a reply of this connection
/// where it left the backend's veth, so the backend is behind one of Ferry's pod links and its
/// replies are never translated again on their way into the client (there the translated tuple
/// may be another flow's: a clashing direct flow's reply, remapped back). Set by the datapath on
/// the first such reply; without it the to-pod hook translates the reply, wherever it entered
/// the node (as netfilter's conntrack does on any interface).
pub const CT_F_REPLY_AT_SOURCE: u32 = 1 << 8;

/// `Ct4Entry.state`: lifecycle bits, the same in both entries of a connection.
/// The reply direction has sent a packet.
pub const CT_S_SEEN_REPLY: u32 = 1 << 0;
/// TCP: the original direction (the client) sent a FIN.
pub const CT_S_FIN_ORIG: u32 = 1 << 1;
/// TCP: the reply direction (the backend) sent a FIN.
pub const CT_S_FIN_REPLY: u32 = 1 << 2;
/// TCP: a RST was seen: the connection is over.
pub const CT_S_RST: u32 = 1 << 3;
/// The connection is assured and its entries live in the assured map (`ct4_assured_v2`).
pub const CT_S_ASSURED: u32 = 1 << 4;
/// Established: TCP once the client acknowledged the backend's reply (the handshake is done),
/// other protocols once a reply came. Such a connection belongs in the assured map.
pub const CT_S_ESTABLISHED: u32 = 1 << 5;
/// TCP: an ACK came after both FINs (the last ACK): netfilter's TIME_WAIT proper. Its source port
/// may go to a new connection at once.
pub const CT_S_TIME_WAIT: u32 = 1 << 6;
/// TCP: the backend sent the first FIN, so it holds TIME_WAIT on the translated tuple for a
/// minute: its source port is the last one to hand to a new connection.
pub const CT_S_BACKEND_CLOSED_FIRST: u32 = 1 << 7;
/// TCP: the forward entry's `tcp_next` is known (the client has sent).
pub const CT_S_SEQ_ORIG: u32 = 1 << 8;
/// TCP: the reply entry's `tcp_next` is known (the backend has sent).
pub const CT_S_SEQ_REPLY: u32 = 1 << 9;

/// Conntrack timeouts, indices into `NodeConfig::ct_timeout_s` (seconds; 0 = the default in
/// `CT_TIMEOUT_DEFAULT_S`).
pub mod ct_timeout {
    /// TCP, before the handshake completes (netfilter's SYN_SENT).
    pub const TCP_SYN: usize = 0;
    /// TCP, established (kube-proxy's `--conntrack-tcp-timeout-established`).
    pub const TCP_ESTABLISHED: usize = 1;
    /// TCP, one side has sent a FIN (kube-proxy's `--conntrack-tcp-timeout-close-wait`).
    pub const TCP_CLOSE_WAIT: usize = 2;
    /// TCP, both sides have sent a FIN (netfilter's TIME_WAIT).
    pub const TCP_TIME_WAIT: usize = 3;
    /// TCP, after a RST (netfilter's CLOSE).
    pub const TCP_CLOSE: usize = 4;
    /// UDP, SCTP and others, no reply yet (kube-proxy's `--conntrack-udp-timeout`).
    pub const UDP: usize = 5;
    /// UDP, SCTP and others, after a reply (kube-proxy's `--conntrack-udp-timeout-stream`).
    pub const UDP_STREAM: usize = 6;
    pub const COUNT: usize = 8;
}

/// Default conntrack timeouts in seconds, by `ct_timeout` index: kube-proxy's for TCP
/// established (24 h) and close-wait (1 h), netfilter's defaults for the rest.
pub const CT_TIMEOUT_DEFAULT_S: [u32; ct_timeout::COUNT] = [120, 86_400, 3_600, 120, 10, 30, 120, 0];

/// `skb->mark` of a reply Ferry built itself (a refusal, ICMP fragmentation needed) and sent back
/// out of the interface the packet came in on: the to-pod hook lets it into the client without a
/// policy check (it answers the client's own packet). Marks do not survive the move between
/// network namespaces, so a pod cannot forge it.
pub const MARK_FERRY_REPLY: u32 = 0x4652_0000;

/// This node's datapath settings, written by the agent at start (one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address for NodePort/LoadBalancer traffic sent to a backend on another node.
    pub snat_addr_be: u32,
    /// Source ports the datapath allocates for that traffic, and for the rare connection whose
    /// translated tuple would collide with another's (host byte order, inclusive).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The in-cluster source range (`--cluster-cidr`, or the node's podCIDR with
    /// `--detect-local-mode NodeCIDR`): address and netmask, network order; mask 0 when not set.
    /// As with kube-proxy, a ClusterIP reached from outside the node is served, and a source
    /// outside this range is translated to the node's address (masquerade).
    pub cluster_cidr_be: u32,
    pub cluster_mask_be: u32,
    /// Conntrack timeouts in seconds by `ct_timeout` index; 0 takes `CT_TIMEOUT_DEFAULT_S`.
    pub ct_timeout_s: [u32; ct_timeout::COUNT],
    /// The node's own network namespace (its cookie): the socket hooks translate only sockets of
    /// it, so pods' traffic always takes the tc path. 0: every socket in the cgroup.
    pub host_netns_cookie: u64,
    /// `CFG_F_*`.
    pub flags: u32,
    /// NetworkPolicy generation: the agent bumps it whenever what policies allow may have
    /// changed; a policy conntrack entry of an older generation is checked again.
    pub pol_generation: u32,
    /// Refusals (TCP RST, ICMP unreachable) this node sends: a token bucket of this many a second
    /// and this burst; 0 takes `REFUSALS_PER_S_DEFAULT` and `REFUSAL_BURST_DEFAULT`.
    pub refusals_per_s: u32,
    pub refusal_burst: u32,
    /// Most assured (established, never evicted) connections one source address may hold in
    /// each conntrack (Service, policy); more stay in the LRU map, where pressure evicts them
    /// first. 0: no limit.
    pub ct_per_source_max: u32,
    pub pad: u32,
}

/// `NodeConfig.flags`: a pod may send only with its own address (anti-spoofing, guard.rs).
pub const CFG_F_SOURCE_CHECK: u32 = 1 << 0;
/// `NodeConfig.flags`: a packet from outside claiming a pod of another node must arrive where
/// the route back to it leaves (strict reverse path; off: loose, any route will do).
pub const CFG_F_EXTERNAL_STRICT: u32 = 1 << 1;
/// `NodeConfig.flags`: local traffic is what enters through a pod interface (kube-proxy's
/// `--detect-local-mode` BridgeInterface and InterfaceNamePrefix); without it, a source inside
/// `cluster_cidr_be/cluster_mask_be` (ClusterCIDR, NodeCIDR), and with neither no source is
/// local (no local detector: kube-proxy without a cluster CIDR).
pub const CFG_F_LOCAL_IFACE: u32 = 1 << 2;
/// The kernel's default `icmp_ratelimit`/`icmp_msgs_per_sec` class: 1 000 a second.
pub const REFUSALS_PER_S_DEFAULT: u32 = 1000;
/// The kernel's `icmp_msgs_burst` default.
pub const REFUSAL_BURST_DEFAULT: u32 = 50;
/// `NodeConfig::refusals_per_s`: no limit (trace and packet tests, which check answers, not
/// rates).
pub const REFUSALS_UNLIMITED: u32 = u32::MAX;

/// Per-CPU counters of one frontend (`svc_id`): packets and bytes (IP total length) the
/// datapath translated for it, both directions. The agent creates the entry with the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Room for `namespace/name:port` (63 + 1 + 63 + 1 + 15 bytes by Kubernetes' limits).
pub const SVC_NAME_LEN: usize = 152;

/// The Service port a frontend belongs to, as `namespace/name:port` padded with NULs. Written
/// by the agent for inspection, metrics and `bpftool`; never read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcName {
    pub name: [u8; SVC_NAME_LEN],
}

impl Default for SvcName {
    fn default() -> Self {
        SvcName { name: [0; SVC_NAME_LEN] }
    }
}

impl SvcName {
    /// `s` truncated to the room there is (Kubernetes' limits make that never happen).
    pub fn new(s: &str) -> Self {
        let mut n = SvcName::default();
        let b = s.as_bytes();
        let len = if b.len() < SVC_NAME_LEN { b.len() } else { SVC_NAME_LEN };
        n.name[..len].copy_from_slice(&b[..len]);
        n
    }

    pub fn as_str(&self) -> &str {
        let end = self.name.iter().position(|&c| c == 0).unwrap_or(SVC_NAME_LEN);
        core::str::from_utf8(&self.name[..end]).unwrap_or("<not utf-8>")
    }
}

/// Conntrack value: the complete tuple a matching packet is rewritten to. Both directions of a
/// connection have an entry, so one lookup answers "forward, reply, or new"; each entry's peer is
/// keyed by its own translated tuple reversed. Times are `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Entry {
    pub nat_saddr_be: u32,
    pub nat_daddr_be: u32,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    pub svc_id: u32,
    pub backend_id: u32,
    /// `CT_F_*`, fixed when the connection is created.
    pub flags: u32,
    /// `CT_S_*` lifecycle bits, kept equal in both entries.
    pub state: u32,
    /// TCP: the sequence number that follows the last byte this entry's direction sent (host
    /// order; valid once `CT_S_SEQ_ORIG`/`CT_S_SEQ_REPLY` says so). A RST counts only near it.
    pub tcp_next: u32,
    pub created_ns: u64,
    /// Refreshed at most once a second (and on every state change), in both entries together.
    pub last_seen_ns: u64,
    /// Past this the entry counts as absent on the packet path, and garbage collection deletes it.
    pub expires_ns: u64,
}

/// Fragment tracking key: a datagram of which the first fragment was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub pad: u8,
}

/// The L4 ports of a fragmented datagram, recorded from its first fragment so that later
/// fragments (which carry no L4 header) get the same translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag4Ports {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Key of the socket-level reverse translation map (unconnected UDP from host processes):
/// socket cookie plus the backend the datagram went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub pad: u16,
}

/// Value of the socket-level reverse map: the Service address the process asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub pad: u16,
}

/// Stable drop reasons, shared with metrics. A retired code stays reserved; never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// IPv4 header or L4 header shorter than it claims, or an impossible header length.
    Malformed = 1,
    /// Destination inside the service CIDRs but held by no Service.
    NoService = 2,
    /// SCTP whose ports must change but whose CRC32c cannot be patched: a first fragment (the
    /// datagram's length is unknown) or a packet over 4095 bytes.
    SctpPortNat = 3,
    /// Conntrack map full or update failed: the connection could not be tracked.
    CtInsert = 4,
    /// A later IP fragment whose first fragment was never seen.
    FragUnknown = 5,
    /// A helper that rewrites the packet failed.
    Rewrite = 6,
    /// The service map points at a slot or backend that does not exist (agent mid-update).
    NoBackend = 7,
    /// To be refused, but itself a TCP reset: a reset is never answered.
    RefusedReset = 8,
    /// Traffic policy Local and no local endpoint (kube-proxy drops these).
    NoLocalEndpoint = 9,
    /// Source outside the Service's loadBalancerSourceRanges.
    SourceRange = 10,
    /// No free source port for a translated connection (all tries collided).
    NatPorts = 11,
    /// A backend on another node, but the agent configured no node address to translate to.
    NoNodeAddress = 12,
    /// Into a pod that NetworkPolicy isolates for ingress, allowed by none of its rules.
    PolicyIngress = 13,
    /// Out of a pod that NetworkPolicy isolates for egress, allowed by none of its rules.
    PolicyEgress = 14,
    /// A later IP fragment larger than the path MTU after translation: Ferry sends no fragments,
    /// and a later fragment cannot be answered (its first fragment was, with ICMP fragmentation
    /// needed, like every other packet too large: `icmp_frag_needed`).
    FragNeeded = 15,
    /// From a pod, with a source address that is not the pod's own (a pod's interface carries
    /// only its pod's address); or from outside the node, with the address of one of this node's
    /// pods or of the node itself.
    SpoofedSource = 16,
    /// An ARP packet from a pod whose sender address is not the pod's own.
    SpoofedArp = 17,
    /// A frame that is not IPv4 (IPv6, another ethertype) into a pod isolated for ingress or out
    /// of one isolated for egress: Ferry decides IPv4 only, so the rest cannot pass unpoliced.
    NotIpv4Isolated = 18,
    /// A VLAN-tagged frame from a pod: a pod's interface carries untagged frames only, and a tag
    /// (even VLAN 0) would carry a packet past the checks that parse untagged ones.
    VlanFromPod = 19,
    /// A refusal (TCP RST, ICMP unreachable or fragmentation needed) over the node's refusal rate
    /// (`--refusals-per-second`, as the kernel's icmp_ratelimit): the packet is dropped instead
    /// of answered, so the node cannot be used to reflect a flood.
    RefusalLimited = 20,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Malformed,
        DropReason::NoService,
        DropReason::SctpPortNat,
        DropReason::CtInsert,
        DropReason::FragUnknown,
        DropReason::Rewrite,
        DropReason::NoBackend,
        DropReason::RefusedReset,
        DropReason::NoLocalEndpoint,
        DropReason::SourceRange,
        DropReason::NatPorts,
        DropReason::NoNodeAddress,
        DropReason::PolicyIngress,
        DropReason::PolicyEgress,
        DropReason::FragNeeded,
        DropReason::SpoofedSource,
        DropReason::SpoofedArp,
        DropReason::NotIpv4Isolated,
        DropReason::VlanFromPod,
        DropReason::RefusalLimited,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoService => "no_service",
            DropReason::SctpPortNat => "sctp_port_nat",
            DropReason::CtInsert => "ct_insert",
            DropReason::FragUnknown => "frag_unknown",
            DropReason::Rewrite => "rewrite",
            DropReason::NoBackend => "no_backend",
            DropReason::RefusedReset => "refused_reset",
            DropReason::NoLocalEndpoint => "no_local_endpoint",
            DropReason::SourceRange => "source_range",
            DropReason::NatPorts => "nat_ports",
            DropReason::NoNodeAddress => "no_node_address",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::FragNeeded => "frag_needed",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::NotIpv4Isolated => "not_ipv4_isolated",
            DropReason::VlanFromPod => "vlan_from_pod",
            DropReason::RefusalLimited => "refusal_limited",
        }
    }

    /// The reason with this code; unknown codes read as `Malformed`.
    pub const fn from_code(code: u32) -> DropReason {
        match code {
            2 => DropReason::NoService,
            3 => DropReason::SctpPortNat,
            4 => DropReason::CtInsert,
            5 => DropReason::FragUnknown,
            6 => DropReason::Rewrite,
            7 => DropReason::NoBackend,
            8 => DropReason::RefusedReset,
            9 => DropReason::NoLocalEndpoint,
            10 => DropReason::SourceRange,
            11 => DropReason::NatPorts,
            12 => DropReason::NoNodeAddress,
            13 => DropReason::PolicyIngress,
            14 => DropReason::PolicyEgress,
            15 => DropReason::FragNeeded,
            16 => DropReason::SpoofedSource,
            17 => DropReason::SpoofedArp,
            18 => DropReason::NotIpv4Isolated,
            19 => DropReason::VlanFromPod,
            20 => DropReason::RefusalLimited,
            _ => DropReason::Malformed,
        }
    }

    /// Index of this reason's counter in the stats map.
    pub const fn stat(self) -> u32 {
        stat::DROP_BASE + self as u32
    }
}

/// Indices into the per-CPU stats array. Reserved slots, never renumbered.
pub mod stat {
    /// Every packet the tc programs saw.
    pub const PACKETS: u32 = 0;
    /// Forwarded untouched (not a Service, not a tracked reply).
    pub const PASS: u32 = 1;
    /// New connection to a Service: backend chosen, conntrack created.
    pub const CT_NEW: u32 = 2;
    /// Forward-direction packet of a tracked connection, translated.
    pub const CT_FORWARD: u32 = 3;
    /// Reply of a tracked connection, reverse-translated.
    pub const CT_REPLY: u32 = 4;
    /// ICMP error about a tracked connection, translated.
    pub const ICMP_RELATED: u32 = 5;
    /// Refused with a TCP RST or ICMP port unreachable.
    pub const REJECT: u32 = 6;
    /// Later IP fragment translated through the fragment map.
    pub const FRAGMENT: u32 = 7;
    /// Host process connected or sent to a Service (socket hooks).
    pub const SOCK_XLATE: u32 = 8;
    /// Host process refused at connect/sendmsg (no endpoint, or unexposed port).
    pub const SOCK_REJECT: u32 = 9;
    /// Sent out through a FIB lookup after translation (its source is a node address).
    pub const FIB_REDIRECT: u32 = 10;
    /// New connection from outside the node (NodePort, LoadBalancer, external IP).
    pub const EXTERNAL_NEW: u32 = 11;
    /// A translated tuple collided with another connection's: another source port was chosen.
    pub const PORT_REMAP: u32 = 12;
    /// Translated in XDP and handed to the stack (a backend on this node).
    pub const XDP_FORWARD: u32 = 13;
    /// Translated in XDP and sent back out the interface it came in on.
    pub const XDP_TX: u32 = 14;
    /// Dropped: see `DROP_BASE + reason`.
    pub const DROP: u32 = 15;
    pub const DROP_BASE: u32 = 16;
    // 16..40: DROP_BASE + drop reason.
    /// A packet found its connection's entry expired: it counted as absent.
    pub const CT_EXPIRED: u32 = 40;
    /// A new TCP connection (a SYN) on the tuple of a closed one: tracked anew.
    pub const CT_REOPEN: u32 = 41;
    /// A connection became assured and moved to the assured map.
    pub const CT_ASSURED: u32 = 42;
    /// A connection could not move to the assured map (full): it stays in the LRU map.
    pub const CT_ASSURED_FULL: u32 = 43;
    /// Entries the datapath created in the LRU map (with GC's deletions and the entries present,
    /// the agent derives how many LRU evicted).
    pub const CT_CREATED: u32 = 44;
    /// Entries the datapath deleted from the LRU map (moved, expired, stale).
    pub const CT_DELETED: u32 = 45;
    /// A closing connection moved back from the assured map to the LRU map.
    pub const CT_CLOSING: u32 = 46;
    /// A source port held by a closed connection was given to a new one.
    pub const PORT_REUSE: u32 = 47;
    /// ICMP fragmentation needed sent back for a packet larger than the path MTU.
    pub const ICMP_FRAG_NEEDED: u32 = 48;
    /// A stale reply entry (its connection closed or expired) was removed because an unrelated
    /// connection used its tuple.
    pub const CT_STALE: u32 = 49;
    /// A pod's direct flow clashed with a live Service connection's tuple: source port remapped.
    pub const CT_CLASH: u32 = 50;
    /// A reply of the node's own stack (hostNetwork endpoint) translated on its way out.
    pub const HOST_REPLY: u32 = 51;
    /// A TCP RST far from its sender's sequence (blind, or stale): passed on, but the connection
    /// is not closed by it (netfilter would call it INVALID).
    pub const CT_RST_IGNORED: u32 = 53;
    /// LRU conntrack entries the agent deleted (garbage collection, endpoint flushes). Written
    /// by the agent only, never by a program.
    pub const CT_AGENT_DELETED: u32 = 52;
    /// A policy event the ring buffer had no room for (the monitor reads too slowly): lost.
    pub const POL_EVENTS_LOST: u32 = 54;
    /// A deny event not sent: one for the same pod, peer and port went out less than a second ago.
    pub const POL_EVENTS_SUPPRESSED: u32 = 55;
    /// A policy conntrack entry older than the policies was decided again, and still allowed.
    pub const POL_RECHECKED: u32 = 56;
    /// ... and no longer allowed: its connection was cut (`policy_ingress`/`policy_egress`).
    pub const POL_REVOKED: u32 = 57;
    /// A connection stayed in an LRU conntrack map (Service or policy; evictable) because its
    /// source already holds `--conntrack-max-per-source` assured connections there.
    pub const CT_SOURCE_LIMIT: u32 = 59;
    /// A policy connection could not move to the full assured policy map: it stays in the LRU one.
    pub const POL_CT_ASSURED_FULL: u32 = 60;
    /// Entries written into the LRU policy conntrack map (`pol_ct4_v2`) ...
    pub const POL_CT_CREATED: u32 = 61;
    /// ... deleted from it by the datapath ...
    pub const POL_CT_DELETED: u32 = 62;
    /// ... and by the agent's garbage collector: what is neither there nor deleted was evicted.
    pub const POL_CT_AGENT_DELETED: u32 = 63;
    pub const NAMES: [(u32, &str); 39] = [
        (PACKETS, "packets"),
        (PASS, "pass"),
        (CT_NEW, "ct_new"),
        (CT_FORWARD, "ct_forward"),
        (CT_REPLY, "ct_reply"),
        (ICMP_RELATED, "icmp_related"),
        (REJECT, "reject"),
        (FRAGMENT, "fragment"),
        (SOCK_XLATE, "sock_xlate"),
        (SOCK_REJECT, "sock_reject"),
        (FIB_REDIRECT, "fib_redirect"),
        (EXTERNAL_NEW, "external_new"),
        (PORT_REMAP, "port_remap"),
        (XDP_FORWARD, "xdp_forward"),
        (XDP_TX, "xdp_tx"),
        (DROP, "drop"),
        (CT_EXPIRED, "ct_expired"),
        (CT_REOPEN, "ct_reopen"),
        (CT_ASSURED, "ct_assured"),
        (CT_ASSURED_FULL, "ct_assured_full"),
        (CT_CREATED, "ct_created"),
        (CT_DELETED, "ct_deleted"),
        (CT_CLOSING, "ct_closing"),
        (PORT_REUSE, "port_reuse"),
        (ICMP_FRAG_NEEDED, "icmp_frag_needed"),
        (CT_STALE, "ct_stale"),
        (CT_CLASH, "ct_clash"),
        (HOST_REPLY, "host_reply"),
        (CT_AGENT_DELETED, "ct_agent_deleted"),
        (CT_RST_IGNORED, "ct_rst_ignored"),
        (POL_EVENTS_LOST, "pol_events_lost"),
        (POL_EVENTS_SUPPRESSED, "pol_events_suppressed"),
        (POL_RECHECKED, "pol_rechecked"),
        (POL_REVOKED, "pol_revoked"),
        (CT_SOURCE_LIMIT, "ct_source_limit"),
        (POL_CT_ASSURED_FULL, "pol_ct_assured_full"),
        (POL_CT_CREATED, "pol_ct_created"),
        (POL_CT_DELETED, "pol_ct_deleted"),
        (POL_CT_AGENT_DELETED, "pol_ct_agent_deleted"),
    ];
}

/// NetworkPolicy: reserved identities. Every other identity (256 and up) is a label set (a pod's
/// labels with its namespace's) or an ipBlock prefix.
pub mod identity {
    /// In a rule key: any peer.
    pub const ANY: u32 = 0;
    /// This node's own addresses: always allowed into its pods (Kubernetes' rule).
    pub const HOST: u32 = 1;
    /// An address no pod, node or ipBlock prefix holds.
    pub const WORLD: u32 = 2;
    /// The first identity the agent allocates.
    pub const FIRST: u32 = 256;
}

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// `LocalAddr.kind`: an address of the node itself.
pub const LOCAL_HOST: u32 = 1;
/// `LocalAddr.kind`: the address of a pod of this node, behind interface `ifindex`.
pub const LOCAL_POD: u32 = 2;

/// An address of this node or of one of its pods (key: the address, wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalAddr {
    /// The pod's interface (host side); 0 for the node's own addresses.
    pub ifindex: u32,
    pub kind: u32,
}

/// A pod interface of this node (key: its ifindex): the address of the pod behind it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIface {
    pub addr_be: u32,
    pub pad: u32,
}

/// `PolEndpoint.flags`: the pod is isolated for ingress (some policy selects it for ingress).
pub const EP_F_INGRESS: u32 = 1 << 0;
/// `PolEndpoint.flags`: the pod is isolated for egress.
pub const EP_F_EGRESS: u32 = 1 << 1;

/// A pod of this node that some NetworkPolicy selects, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolEndpoint {
    /// Keys this pod's rules.
    pub ep_id: u32,
    pub flags: u32,
    /// A policy isolating it for ingress / egress: the one a drop is counted against.
    pub ingress_policy: u32,
    pub egress_policy: u32,
}

/// Data of the rule LPM trie key, most significant first: the endpoint, the peer identity
/// (`identity::ANY` for every peer), the direction, then protocol and port, so that a prefix
/// ending after the direction means "every protocol and port", after the protocol "every port",
/// and in the port's bits a range (`endPort`) as aligned blocks. Multi-byte fields are big-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolRuleKey {
    pub ep_id_be: u32,
    pub identity_be: u32,
    pub dir: u8,
    pub proto: u8,
    pub port_be: u16,
}

/// Bits of a rule key before the protocol (endpoint, identity, direction).
pub const RULE_PREFIX_ALL_PORTS: u32 = 72;
/// Bits of a rule key before the port.
pub const RULE_PREFIX_PROTO: u32 = 80;
pub const RULE_PREFIX_FULL: u32 = 96;

/// `PolCtEntry.flags`: the reply direction of an allowed connection.
pub const PCT_F_REPLY: u32 = 1 << 2;
/// `PolCtEntry.flags`: the connection's untranslated tuple reversed (a Service connection's reply
/// as it arrives once translated back on this node); `peer_*` hold the backend.
pub const PCT_F_ORIG: u32 = 1 << 3;
/// `PolCtEntry.flags`: the connection was translated (a Service): `peer_*` hold the Service
/// address it was sent to.
pub const PCT_F_TRANSLATED: u32 = 1 << 4;

/// Policy conntrack key: a tuple as the policy check sees it (after Service translation; for
/// ICMP echo, the identifier as both ports) and the pod interface (host side) whose check made
/// the entry. An entry serves that pod only: a tuple forged elsewhere finds nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolCtKey {
    pub tuple: Ct4Key,
    pub ifindex: u32,
}

/// Policy conntrack entry: the decision a connection got, for which pod and direction, and its
/// lifecycle (the same `CT_S_*` states, timeouts and expiry as the Service conntrack). Each
/// connection has a forward entry, a reply entry and, for a Service connection whose reply is
/// translated back on this node, an entry for that reply too; all carry the same state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolCtEntry {
    /// `PCT_F_ORIG`: the backend; `PCT_F_TRANSLATED`: the Service address. Else 0.
    pub peer_addr_be: u32,
    pub peer_port_be: u16,
    /// The direction that was decided (`DIR_INGRESS` into the pod, `DIR_EGRESS` out of it).
    pub dir: u8,
    pub pad: u8,
    /// The allowing policy (0: the pod was not isolated that way, or the node reached it).
    pub policy_id: u32,
    /// `NodeConfig::pol_generation` when last decided: an older entry is decided again.
    pub generation: u32,
    /// `PCT_F_*`.
    pub flags: u32,
    /// `CT_S_*` lifecycle bits.
    pub state: u32,
    /// TCP: the sequence number after the last byte this entry's direction sent (see `Ct4Entry`).
    pub tcp_next: u32,
    /// The pod the decision is about (wire order).
    pub ep_addr_be: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub expires_ns: u64,
}

/// Value of `pol_revoked4_v1`: a connection a policy change cut, as it was decided (its pod,
/// direction and forward tuple), the policy generation that cut it, and when it was last seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolRevoked {
    pub last_seen_ns: u64,
    pub fwd: Ct4Key,
    pub ep_addr_be: u32,
    pub generation: u32,
    pub dir: u8,
    pub pad: [u8; 7],
}

/// Key of the policy fragment map: a fragmented datagram as the check saw its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolFragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub ifindex: u32,
    pub id_be: u16,
    pub proto: u8,
    pub dir: u8,
}

/// Key of the deny-event rate limit: one event a second per pod, peer, port and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolEvKey {
    pub ep_be: u32,
    pub peer_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub dir: u8,
}

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// `PolicyEvent.reason` for an allow without a rule: the node itself reaching its pod.
pub const EV_FROM_NODE: u8 = 1;
/// `PolicyEvent.reason` for an allow: the pod is not isolated in this direction.
pub const EV_NOT_ISOLATED: u8 = 2;
/// `PolicyEvent.reason` for an allow by a rule, or a deny by isolation.
pub const EV_RULE: u8 = 3;

/// One verdict on a new connection, streamed through the ring buffer to `dataplane-agent monitor`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    /// When (`bpf_ktime_get_ns`: CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub verdict: u8,
    pub reason: u8,
    /// The deciding policy: the allowing rule's, or for a deny the one isolating the pod.
    pub policy_id: u32,
    /// The peer's identity.
    pub identity: u32,
}

// The layouts are part of the ABI: a change here must come with a new map name.
const _: () = {
    assert!(core::mem::size_of::<Lb4Key>() == 8);
    assert!(core::mem::size_of::<Lb4Service>() == 20);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<Lb4PairKey>() == 8);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SrcRangeData>() == 8);
    assert!(core::mem::size_of::<NodeConfig>() == 80);
    assert!(core::mem::size_of::<SvcCounters>() == 16);
    assert!(core::mem::size_of::<PolEndpoint>() == 16);
    assert!(core::mem::size_of::<PolRuleKey>() == 12);
    assert!(core::mem::size_of::<PolCtKey>() == 20);
    assert!(core::mem::size_of::<PolCtEntry>() == 56);
    assert!(core::mem::size_of::<PolFragKey>() == 16);
    assert!(core::mem::size_of::<PolEvKey>() == 12);
    assert!(core::mem::size_of::<PolicyEvent>() == 32);
    assert!(core::mem::size_of::<SvcName>() == SVC_NAME_LEN);
    assert!(core::mem::size_of::<Lb4SlotKey>() == 8);
    assert!(core::mem::size_of::<Lb4Backend>() == 8);
    assert!(core::mem::size_of::<Ct4Key>() == 16);
    assert!(core::mem::size_of::<Ct4Entry>() == 56);
    assert!(core::mem::size_of::<Frag4Key>() == 12);
    assert!(core::mem::size_of::<Frag4Ports>() == 4);
    assert!(core::mem::size_of::<SockRevKey>() == 16);
    assert!(core::mem::size_of::<SockRevValue>() == 8);
    assert!(core::mem::size_of::<LocalAddr>() == 8);
    assert!(core::mem::size_of::<PodIface>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] structs of integers with explicit padding.
    unsafe impl aya::Pod for Lb4Key {}
    unsafe impl aya::Pod for Lb4Service {}
    unsafe impl aya::Pod for Lb4SlotKey {}
    unsafe impl aya::Pod for Lb4Backend {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for Ct4Entry {}
    unsafe impl aya::Pod for Frag4Key {}
    unsafe impl aya::Pod for Frag4Ports {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for SvcCounters {}
    unsafe impl aya::Pod for SvcName {}
    unsafe impl aya::Pod for PolEndpoint {}
    unsafe impl aya::Pod for PolRuleKey {}
    unsafe impl aya::Pod for PolCtKey {}
    unsafe impl aya::Pod for PolCtEntry {}
    unsafe impl aya::Pod for PolFragKey {}
    unsafe impl aya::Pod for PolRevoked {}
    unsafe impl aya::Pod for PolEvKey {}
    unsafe impl aya::Pod for PolicyEvent {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Lb4PairKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRangeData {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for LocalAddr {}
    unsafe impl aya::Pod for PodIface {}
}

#[cfg(all(test, feature = "user"))]
mod layout_tests {
    use super::layout::{tiling_error, Described};
    use super::*;

    fn check<T: Described>() {
        let f = T::fields();
        assert_eq!(tiling_error(&f, core::mem::size_of::<T>(), core::mem::align_of::<T>()), None, "{}: a field is missing from its list in layout.rs", core::any::type_name::<T>());
    }

    #[test]
    fn every_described_type_lists_all_its_fields() {
        check::<Lb4Key>();
        check::<Lb4Service>();
        check::<AffinityKey>();
        check::<Lb4PairKey>();
        check::<AffinityValue>();
        check::<Lb4SlotKey>();
        check::<Lb4Backend>();
        check::<Ct4Key>();
        check::<Ct4Entry>();
        check::<NodeConfig>();
        check::<SvcCounters>();
        check::<SvcName>();
        check::<Frag4Key>();
        check::<Frag4Ports>();
        check::<SockRevKey>();
        check::<SockRevValue>();
        check::<LocalAddr>();
        check::<PodIface>();
        check::<PolEndpoint>();
        check::<PolRuleKey>();
        check::<PolCtKey>();
        check::<PolCtEntry>();
        check::<PolRevoked>();
        check::<PolFragKey>();
        check::<PolEvKey>();
        check::<SrcRangeData>();
    }

    #[test]
    fn a_field_left_out_is_seen() {
        let mut f = <Ct4Entry as Described>::fields();
        f.remove(4);
        assert_eq!(tiling_error(&f, core::mem::size_of::<Ct4Entry>(), 8), Some("backend_id"));
        let mut f = <Ct4Entry as Described>::fields();
        f.pop();
        assert_eq!(tiling_error(&f, core::mem::size_of::<Ct4Entry>(), 8), Some("(end of struct)"));
    }
}
