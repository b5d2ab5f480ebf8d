//! Every map of the datapath, in one place. Declared with `#[btf_map]` so that
//! `bpftool map dump pinned /sys/fs/bpf/ferry/<name>` prints named fields. The agent pins them by
//! name (see `dataplane_common::names`); the symbol names here must match those names.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
/// Maps written only by the agent need no preallocation (Cilium's LB maps do the same): memory
/// follows the number of Services and endpoints instead of the capacity.
const NO_PREALLOC: usize = 1;

use dataplane_common::{
    capacity, AffinityKey, Lb4PairKey, LocalAddr, PodIface, AffinityValue, Ct4Entry, Ct4Key, Frag4Key, Frag4Ports, Lb4Backend, Lb4Key, Lb4Service,
    Lb4SlotKey, NodeConfig, PolCtEntry, PolCtKey, PolEndpoint, PolEvKey, PolFragKey, PolRuleKey, PolicyEvent, SockRevKey, SockRevValue, SrcRangeData, SvcCounters, SvcName,
};

/// Service frontends: `addr:port/proto` per scope (and `addr:0/0` for "this is a ClusterIP").
#[btf_map]
pub static lb4_svc_v3: HashMap<Lb4Key, Lb4Service, { capacity::SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

/// Backend slots of each frontend, dense `0..count`: `(svc_id, slot) -> backend id`.
#[btf_map]
pub static lb4_slot_v1: HashMap<Lb4SlotKey, u32, { capacity::SLOTS as usize }, NO_PREALLOC> = HashMap::new();

/// Backends by id.
#[btf_map]
pub static lb4_be_v1: HashMap<u32, Lb4Backend, { capacity::BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

/// Connection tracking (see conntrack.rs), both directions of every translated connection, in
/// one of two maps. New, unreplied and closing connections: LRU, so under pressure the least
/// recently used of these go first (netfilter's early drop) instead of new connections failing.
#[btf_map]
pub static ct4_v2: LruHashMap<Ct4Key, Ct4Entry, { capacity::CONNTRACK_NEW as usize }> = LruHashMap::new();

/// Established connections: a plain (preallocated) hash map that nothing evicts; entries leave
/// when their connection closes or times out.
#[btf_map]
pub static ct4_assured_v2: HashMap<Ct4Key, Ct4Entry, { capacity::CONNTRACK as usize }> = HashMap::new();

/// Ports of fragmented datagrams, recorded from their first fragment.
#[btf_map]
pub static frag4_v1: LruHashMap<Frag4Key, Frag4Ports, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// The service CIDRs (`--service-cidr`): an address in here that no Service holds is dropped.
#[btf_map]
pub static svc_cidr4_v1: LpmTrie<u32, u32, { capacity::SERVICE_CIDRS as usize }> = LpmTrie::new();

/// Per-CPU packet counters, indexed by `dataplane_common::stat`.
#[btf_map]
pub static stats_v1: PerCpuArray<u64, { capacity::STATS as usize }> = PerCpuArray::new();

/// Socket-level reverse translation for host processes: `(cookie, backend) -> Service address`.
/// Pinned, so sockets opened before an agent restart keep reporting the Service address.
#[btf_map]
pub static sock_rev4_v1: LruHashMap<SockRevKey, SockRevValue, { capacity::SOCK_REVNAT as usize }> =
    LruHashMap::new();

/// Backends the agent took out of frontends: `(frontend, backend) -> when` (see
/// `dataplane_common::names::GONE`). Read only for UDP and SCTP connections and affinity hits.
#[btf_map]
pub static lb4_gone_v1: LruHashMap<Lb4PairKey, u64, { capacity::GONE as usize }> = LruHashMap::new();

/// sessionAffinity ClientIP: `(frontend, client) -> backend, last used`. LRU: idle clients go
/// first; the timeout is checked on use.
#[btf_map]
pub static lb4_aff_v1: LruHashMap<AffinityKey, AffinityValue, { capacity::AFFINITY as usize }> = LruHashMap::new();

/// loadBalancerSourceRanges of every frontend in one trie: `(svc_id, source CIDR)`.
#[btf_map]
pub static lb4_src_v1: LpmTrie<SrcRangeData, u32, { capacity::SOURCE_RANGES as usize }> = LpmTrie::new();

/// Policy conntrack tuples a policy change cut (per pod interface) → when last seen.
#[btf_map]
pub static pol_revoked4_v1: LruHashMap<PolCtKey, dataplane_common::PolRevoked, { capacity::POL_REVOKED as usize }> = LruHashMap::new();

/// Assured connections per source address: [Service conntrack, policy conntrack].
#[btf_map]
pub static ct_src4_v1: LruHashMap<u32, [u32; 2], { capacity::CT_SOURCES as usize }> = LruHashMap::new();

/// Per-CPU scratch of `conntrack::source_admit`: the source's key and new counts, kept off the
/// stack (the deepest call chain, ICMP errors through conntrack moves, has no room left).
#[btf_map]
pub static src_scratch: PerCpuArray<crate::conntrack::SrcScratch, 1> = PerCpuArray::new();

/// The node's refusal token bucket (`reject::refusal_allowed`): [tokens in thousandths, last
/// refill in ns]. One for the node, as the kernel's icmp_global; not pinned (a new program
/// starts with a full bucket).
#[btf_map]
pub static refusal_bucket: Array<[u64; 2], 1> = Array::new();

/// This node's settings (one entry), written by the agent.
#[btf_map]
pub static cfg4_v4: Array<NodeConfig, 1> = Array::new();

/// Every frontend's consistent-hashing table (Maglev or rendezvous, built by the agent), each in
/// its own region `table_off .. table_off + table_len` (`Lb4Service`), two entries per element.
/// One flat array instead of an inner array per frontend: the agent writes tables through mmap
/// (`BPF_F_MMAPABLE`) and switches a frontend to a new region with one update of its service
/// entry; linking an inner array into a map of maps made the kernel wait an RCU grace period per
/// frontend. A plain array lookup is also inlined by the verifier (no helper call). The agent
/// sets the capacity at load time (`--lb-table-entries`).
#[btf_map]
pub static lb4_chash_flat_v1: Array<
    [u32; dataplane_common::CHASH_PER_ELEMENT as usize],
    { (capacity::CHASH_ENTRIES / dataplane_common::CHASH_PER_ELEMENT) as usize },
    { dataplane_common::CHASH_FLAT_FLAGS as usize },
> = Array::new();

/// Per-CPU packet and byte counters of each frontend: `svc_id -> counters`. The datapath makes
/// the entry at the frontend's first packet (while the frontend is named) and increments it; the
/// agent removes it with the frontend.
#[btf_map]
pub static lb4_svc_stat_v1: PerCpuHashMap<u32, SvcCounters, { capacity::SERVICES as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();

/// The Service port of each frontend, `svc_id -> "namespace/name:port"`, for inspection and
/// `bpftool map dump`. The datapath reads only whether a frontend has one, at its first packet
/// (`stats::count_service`).
#[btf_map]
pub static lb4_svc_name_v1: HashMap<u32, SvcName, { capacity::SERVICES as usize }, NO_PREALLOC> = HashMap::new();

// NetworkPolicy. Written by the agent, except the policy conntrack, the drop counters and the
// event ring, which the datapath writes.

/// Address or CIDR -> identity: every pod of the cluster (/32), this node's addresses (HOST) and
/// every ipBlock prefix of every policy. Longest prefix wins.
#[btf_map]
pub static pol_ipcache4_v1: LpmTrie<u32, u32, { capacity::POL_IPCACHE as usize }> = LpmTrie::new();

/// This node's pods that some policy selects, by address: which directions are isolated.
#[btf_map]
pub static pol_ep4_v1: HashMap<u32, PolEndpoint, { capacity::POL_ENDPOINTS as usize }, NO_PREALLOC> = HashMap::new();

/// What each isolated pod allows: `(endpoint, peer identity, direction, proto, port prefix) ->
/// the allowing policy's id`. See `PolRuleKey` for the prefix layout.
#[btf_map]
pub static pol_rule4_v1: LpmTrie<PolRuleKey, u32, { capacity::POL_RULES as usize }> = LpmTrie::new();

/// Connections a policy decision allowed, by tuple (after Service translation) and the pod
/// interface the decision was made for: later packets and replies skip the rule lookups. New,
/// unreplied and closing connections here (LRU: under pressure these go first)...
#[btf_map]
pub static pol_ct4_v2: LruHashMap<PolCtKey, PolCtEntry, { capacity::POL_CONNTRACK as usize }> = LruHashMap::new();

/// ... established ones here, where nothing evicts them (they leave when they close or expire).
#[btf_map]
pub static pol_ct4_assured_v2: HashMap<PolCtKey, PolCtEntry, { capacity::POL_CONNTRACK_ASSURED as usize }, NO_PREALLOC> = HashMap::new();

/// The first fragment's verdict for the later fragments of a datagram into or out of an isolated
/// pod (they carry no ports to decide by).
#[btf_map]
pub static pol_frag4_v1: LruHashMap<PolFragKey, u32, { capacity::POL_FRAGMENTS as usize }> = LruHashMap::new();

/// When the last deny event went out per (pod, peer, port, direction): at most one a second.
#[btf_map]
pub static pol_evlimit4_v1: LruHashMap<PolEvKey, u64, { capacity::POL_EVENT_LIMIT as usize }> = LruHashMap::new();

/// Drops per policy and direction (index `policy_id * 2 + dir`), per CPU.
#[btf_map]
pub static pol_drop_v1: PerCpuArray<u64, { (capacity::POLICIES * 2) as usize }> = PerCpuArray::new();

/// Verdict events for `dataplane-agent monitor` (new connections only).
#[btf_map]
pub static pol_events_v2: RingBuf<PolicyEvent, { capacity::POL_EVENTS_BYTES as usize }> = RingBuf::new();

/// Names for inspection and the monitor, written by the agent, never read on the packet path:
/// policy id -> `namespace/name`, pod address -> `namespace/name`, identity -> its labels.
#[btf_map]
pub static pol_name_v1: HashMap<u32, SvcName, { capacity::POLICIES as usize }, NO_PREALLOC> = HashMap::new();
#[btf_map]
pub static pol_podname4_v1: HashMap<u32, SvcName, { capacity::POD_NAMES as usize }, NO_PREALLOC> = HashMap::new();
#[btf_map]
pub static pol_idname_v1: HashMap<u32, SvcName, { capacity::IDENTITIES as usize }, NO_PREALLOC> = HashMap::new();

/// This node's addresses and its pods' (address -> kind, and the pod's interface): a pod may
/// send only with its own address, and nothing from outside may claim any of these. Written by
/// the agent.
#[btf_map]
pub static local4_v1: HashMap<u32, LocalAddr, { capacity::LOCAL_ADDRS as usize }, NO_PREALLOC> = HashMap::new();

/// This node's pod interfaces (ifindex -> the pod's address), for frames that carry no IPv4
/// address to find the pod by. Written by the agent.
#[btf_map]
pub static pod_if4_v1: HashMap<u32, PodIface, { capacity::POD_IFACES as usize }, NO_PREALLOC> = HashMap::new();

/// Per-CPU scratch of the policy check: the tuple of the packet being handled before Service
/// translation (written by `egress_pre`, read by `check` on the same packet).
#[btf_map]
pub static pol_scratch: PerCpuArray<Ct4Key, 1> = PerCpuArray::new();

/// Per-CPU scratch of the policy check: the entry of a new connection as it is built (kept off
/// the 512-byte stack the Service path already needs).
#[btf_map]
pub static pol_entry_scratch: PerCpuArray<dataplane_common::PolCtEntry, 1> = PerCpuArray::new();

/// Per-CPU scratch of a FIB redirect: the next hop found before the packet was translated
/// (`nat::fib_prepare`), used once it is (`nat::fib_redirect`), on the same packet.
#[btf_map]
pub static fib_scratch: PerCpuArray<crate::nat::FibNext, 1> = PerCpuArray::new();

/// Per-CPU scratch of connection tracking: entries being built or moved between the maps, kept
/// off the 512-byte stack (see conntrack.rs). Used within one packet's processing only.
#[btf_map]
pub static ct_scratch: PerCpuArray<crate::conntrack::CtScratch, 1> = PerCpuArray::new();

/// Per-CPU scratch of the Service path: the connection entry and frontend its steps hand each
/// other (see lb::service_path), off the stack.
#[btf_map]
pub static path_scratch: PerCpuArray<crate::lb::PathScratch, 1> = PerCpuArray::new();
