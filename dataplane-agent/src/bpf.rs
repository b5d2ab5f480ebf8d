//! The only code that touches BPF maps: typed wrappers over aya, the [`MapOps`] implementation
//! the reconciler drives, and the dump that restores the applied view at start-up.
pub mod conntrack;
pub mod tables;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    sys::SyscallError,
    Ebpf,
};
use dataplane_common::{
    capacity, names, AffinityKey, AffinityValue, Lb4PairKey, Lb4Backend, SockRevKey, SockRevValue, Lb4Key, Lb4Service, Lb4SlotKey, NodeConfig, SrcRangeData,
    SvcCounters, SvcName, LocalAddr, PodIface, PolCtEntry, PolCtKey, PolEndpoint, PolRuleKey, SVC_F_ADDR_ONLY,
};

use self::tables::{Region, TableArena};
use crate::{
    error::{LoadError, MapOpError},
    reconcile::{frontend_from_key, l4addr_from_backend, Applied, AppliedFrontend, Cidr4, MapOps},
};

/// Handles on every map the agent reads or writes.
pub struct BpfMaps {
    pub services: HashMap<MapData, Lb4Key, Lb4Service>,
    pub slots: HashMap<MapData, Lb4SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Lb4Backend>,
    /// Both conntrack maps (LRU and assured).
    pub ct: conntrack::Conntrack,
    pub service_cidrs: LpmTrie<MapData, u32, u32>,
    pub stats: PerCpuArray<MapData, u64>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// (frontend, backend) pairs taken out (`lb4_gone_v1`).
    pub gone: HashMap<MapData, Lb4PairKey, u64>,
    pub source_ranges: LpmTrie<MapData, SrcRangeData, u32>,
    pub config: Array<MapData, NodeConfig>,
    /// Every frontend's consistent-hashing table, each in its region (see [`Tables`]).
    pub chash: Array<MapData, [u32; 2]>,
    /// Where each frontend's table is in `chash`, and the array mapped into this process.
    pub tables: Tables,
    pub svc_stats: PerCpuHashMap<MapData, u32, SvcCounters>,
    pub svc_names: HashMap<MapData, u32, SvcName>,
    pub pol_ipcache: LpmTrie<MapData, u32, u32>,
    pub pol_endpoints: HashMap<MapData, u32, PolEndpoint>,
    pub pol_rules: LpmTrie<MapData, PolRuleKey, u32>,
    /// Policy conntrack: new and closing connections (LRU), established ones.
    pub pol_ct: HashMap<MapData, PolCtKey, PolCtEntry>,
    pub pol_ct_assured: HashMap<MapData, PolCtKey, PolCtEntry>,
    pub pol_drops: PerCpuArray<MapData, u64>,
    pub pol_names: HashMap<MapData, u32, SvcName>,
    pub pod_names: HashMap<MapData, u32, SvcName>,
    pub id_names: HashMap<MapData, u32, SvcName>,
    /// Host sockets translated by the socket hooks: `(cookie, backend) -> Service address`.
    pub sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// Assured connections per source: [Service, policy] (`--conntrack-max-per-source`).
    pub ct_sources: HashMap<MapData, u32, [u32; 2]>,
    /// This node's and its pods' addresses (anti-spoofing), and its pod interfaces.
    pub local_addrs: HashMap<MapData, u32, LocalAddr>,
    pub pod_ifaces: HashMap<MapData, u32, PodIface>,
    /// Real capacities (the loader may override the compiled ones), for "map full" errors.
    caps: Caps,
}

#[derive(Clone, Copy, Debug)]
struct Caps {
    services: u32,
    slots: u32,
    backends: u32,
    chash: u32,
}

fn capacity_of(m: &Map, compiled: u32) -> u32 {
    match m {
        Map::HashMap(d) | Map::LruHashMap(d) => d.info().map(|i| i.max_entries()).unwrap_or(compiled),
        // The table array's capacity counts entries, two an element.
        Map::Array(d) => d.info().map(|i| i.max_entries().saturating_mul(dataplane_common::CHASH_PER_ELEMENT)).unwrap_or(compiled),
        _ => compiled,
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::MissingMap { name })
}

fn conv<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, LoadError> {
    r.map_err(|source| LoadError::Map { name, source })
}

impl BpfMaps {
    /// Takes the maps out of a loaded object (the agent keeps the programs attached meanwhile).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Self::from_maps(|name| take(ebpf, name))
    }

    fn from_maps(mut get: impl FnMut(&'static str) -> Result<Map, LoadError>) -> Result<Self, LoadError> {
        let (svc, slots, be, chash) = (get(names::SERVICES)?, get(names::SLOTS)?, get(names::BACKENDS)?, get(names::CHASH)?);
        let caps = Caps {
            services: capacity_of(&svc, capacity::SERVICES),
            slots: capacity_of(&slots, capacity::SLOTS),
            backends: capacity_of(&be, capacity::BACKENDS),
            chash: capacity_of(&chash, capacity::CHASH_ENTRIES),
        };
        Ok(BpfMaps {
            services: conv(names::SERVICES, HashMap::try_from(svc))?,
            slots: conv(names::SLOTS, HashMap::try_from(slots))?,
            backends: conv(names::BACKENDS, HashMap::try_from(be))?,
            ct: conntrack::Conntrack::from_maps(get(names::CONNTRACK)?, get(names::CONNTRACK_ASSURED)?)?,
            service_cidrs: conv(names::SERVICE_CIDRS, LpmTrie::try_from(get(names::SERVICE_CIDRS)?))?,
            stats: conv(names::STATS, PerCpuArray::try_from(get(names::STATS)?))?,
            affinity: conv(names::AFFINITY, HashMap::try_from(get(names::AFFINITY)?))?,
            gone: conv(names::GONE, HashMap::try_from(get(names::GONE)?))?,
            source_ranges: conv(names::SOURCE_RANGES, LpmTrie::try_from(get(names::SOURCE_RANGES)?))?,
            config: conv(names::CONFIG, Array::try_from(get(names::CONFIG)?))?,
            chash: conv(names::CHASH, Array::try_from(chash))?,
            tables: Tables::default(),
            svc_stats: conv(names::SVC_STATS, PerCpuHashMap::try_from(get(names::SVC_STATS)?))?,
            svc_names: conv(names::SVC_NAMES, HashMap::try_from(get(names::SVC_NAMES)?))?,
            pol_ipcache: conv(names::POL_IPCACHE, LpmTrie::try_from(get(names::POL_IPCACHE)?))?,
            pol_endpoints: conv(names::POL_ENDPOINTS, HashMap::try_from(get(names::POL_ENDPOINTS)?))?,
            pol_rules: conv(names::POL_RULES, LpmTrie::try_from(get(names::POL_RULES)?))?,
            pol_ct: conv(names::POL_CONNTRACK, HashMap::try_from(get(names::POL_CONNTRACK)?))?,
            pol_ct_assured: conv(names::POL_CONNTRACK_ASSURED, HashMap::try_from(get(names::POL_CONNTRACK_ASSURED)?))?,
            pol_drops: conv(names::POL_DROPS, PerCpuArray::try_from(get(names::POL_DROPS)?))?,
            pol_names: conv(names::POL_NAMES, HashMap::try_from(get(names::POL_NAMES)?))?,
            pod_names: conv(names::POD_NAMES, HashMap::try_from(get(names::POD_NAMES)?))?,
            id_names: conv(names::IDENTITY_NAMES, HashMap::try_from(get(names::IDENTITY_NAMES)?))?,
            sock_rev: conv(names::SOCK_REV, HashMap::try_from(get(names::SOCK_REV)?))?,
            ct_sources: conv(names::CT_SOURCES, HashMap::try_from(get(names::CT_SOURCES)?))?,
            local_addrs: conv(names::LOCAL_ADDRS, HashMap::try_from(get(names::LOCAL_ADDRS)?))?,
            pod_ifaces: conv(names::POD_IFACES, HashMap::try_from(get(names::POD_IFACES)?))?,
            caps,
        })
    }

    /// Opens the pinned maps of a node (inspection and live trace; works while the agent is down).
    pub fn from_pins(dir: &Path) -> Result<Self, LoadError> {
        let open = |name: &'static str| -> Result<Map, LoadError> {
            let data = conv(name, MapData::from_pin(dir.join(name)))?;
            Ok(match name {
                names::SERVICE_CIDRS | names::SOURCE_RANGES | names::POL_IPCACHE | names::POL_RULES => Map::LpmTrie(data),
                names::STATS | names::POL_DROPS => Map::PerCpuArray(data),
                names::POL_EVENTS => Map::RingBuf(data),
                names::CONFIG | names::CHASH => Map::Array(data),
                names::SVC_STATS => Map::PerCpuHashMap(data),
                names::CONNTRACK | names::FRAGMENTS | names::AFFINITY | names::GONE | names::POL_CONNTRACK | names::POL_FRAGMENTS | names::POL_EVENT_LIMIT | names::SOCK_REV | names::CT_SOURCES | names::POL_REVOKED => {
                    Map::LruHashMap(data)
                }
                _ => Map::HashMap(data),
            })
        };
        Self::from_maps(open)
    }

    /// Reads the maps back into the reconciler's view (restore, then reconcile).
    pub fn dump_applied(&mut self) -> Applied {
        let mut applied = Applied::default();
        let mut by_id = BTreeMap::new();
        for (id, be) in self.backends.iter().flatten() {
            if let Some(b) = l4addr_from_backend(&be) {
                applied.backends.insert(b, (id, be.flags));
                by_id.insert(id, b);
            }
        }
        let mut ranges: BTreeMap<u32, BTreeSet<Cidr4>> = BTreeMap::new();
        for (key, _) in self.source_ranges.iter().flatten() {
            let d = key.data();
            let prefix = key.prefix_len().saturating_sub(32) as u8;
            ranges.entry(d.svc_id).or_default().insert(Cidr4 { addr: Ipv4Addr::from(d.addr_be.to_ne_bytes()), prefix });
        }
        let slots: BTreeMap<Lb4SlotKey, u32> = self.slots.iter().flatten().collect();
        let services: Vec<(Lb4Key, Lb4Service)> = self.services.iter().flatten().collect();
        // The table regions the service entries point at: the allocator's state, and the tables
        // read back through one mapping of the array (no syscall per entry or per table).
        let regions = services.iter().filter(|(_, s)| s.flags & SVC_F_ADDR_ONLY == 0 && s.table_len > 0).map(|(_, s)| (s.svc_id, Region { off: s.table_off, len: s.table_len }));
        // One window over all of them, mapped once (read in the map's order, they would grow it
        // from anywhere); a region past the array's end is refused by `chash_table` below.
        let cap = self.caps.chash as u64;
        let (lo, hi) = regions.clone().filter(|(_, r)| r.end() <= cap).fold((u64::MAX, 0), |(lo, hi), (_, r)| (lo.min(r.off as u64), hi.max(r.end())));
        if lo < hi {
            let _ = self.tables.mapped(&self.chash, lo, hi);
        }
        self.tables.adopt(self.caps.chash, regions);
        for (key, svc) in services {
            if svc.flags & SVC_F_ADDR_ONLY != 0 {
                applied.cluster_ips.insert(Ipv4Addr::from(key.addr_be.to_ne_bytes()));
                continue;
            }
            let Some(fe) = frontend_from_key(&key) else { continue };
            let service = self.svc_names.get(&svc.svc_id, 0).ok().and_then(|n| n.as_str().parse().ok());
            let table = self.chash_table(svc.svc_id).unwrap_or_default();
            // Every slot, also past the count (an update that stopped before raising it), and as
            // they are: a backend in two slots (a crash between a slot move and the count) is
            // dropped from the second by the next sync.
            let mut list = Vec::new();
            for slot in 0..=u16::MAX as u32 {
                match slots.get(&Lb4SlotKey { svc_id: svc.svc_id, slot }).and_then(|id| by_id.get(id)) {
                    Some(b) => list.push(*b),
                    None => break, // a torn write from a crash: the next sync rewrites the rest
                }
            }
            applied.frontends.insert(
                fe,
                AppliedFrontend {
                    svc_id: svc.svc_id,
                    service,
                    slots: list,
                    // The offset is the map layer's (`put_service` fills it in): the reconciler
                    // compares entries without it. A refused region reads as no table, so the
                    // first sync writes one and switches the entry to it.
                    entry: Some(Lb4Service { table_off: 0, table_len: if table.is_empty() { 0 } else { svc.table_len }, ..svc }),
                    source_ranges: ranges.remove(&svc.svc_id).unwrap_or_default(),
                    table: crate::reconcile::Table::new(&table),
                    // Unknown: the first sync builds each table once and writes it only if it differs.
                    table_slots: None,
                },
            );
        }
        for (key, _) in self.service_cidrs.iter().flatten() {
            applied.service_cidrs.insert(Cidr4 { addr: Ipv4Addr::from(key.data().to_ne_bytes()), prefix: key.prefix_len() as u8 });
        }
        applied.gone = self.gone.keys().flatten().map(|k| (k.svc_id, k.backend_id)).collect();
        applied
    }

    /// Reads frontend `svc_id`'s consistent-hashing table back, if its service entry points at
    /// one (through the mapping of the array: no syscall per entry).
    pub fn chash_table(&mut self, svc_id: u32) -> Option<Vec<u32>> {
        let r = match self.tables.live.get(&svc_id) {
            Some(r) => *r,
            // Adopted (`dump_applied`): the frontend has no table.
            None if self.tables.arena.is_some() => return None,
            // Not adopted (a one-off look at the pins): found in the service map.
            None => self.services.iter().flatten().find(|(_, s)| s.svc_id == svc_id && s.flags & SVC_F_ADDR_ONLY == 0 && s.table_len > 0).map(|(_, s)| Region { off: s.table_off, len: s.table_len })?,
        };
        // A region past the array's end (a corrupted or foreign pin) is refused before it is
        // mapped: mapping up to it would map the whole array.
        if r.end() > self.caps.chash as u64 {
            return None;
        }
        let m = self.tables.mapped(&self.chash, r.off as u64, r.end()).ok()?;
        if !m.covers(r.off as usize, r.end() as usize) {
            return None;
        }
        Some((r.off..r.off + r.len).map(|i| m.get(i as usize)).collect())
    }

    /// Bytes of the table array mapped into this process now (a window over the tables a sync
    /// reached, see `MappedTables`).
    pub fn tables_mapped_bytes(&self) -> usize {
        self.tables.mapped.as_ref().map_or(0, |m| m.len)
    }

    /// Unmaps the table array's window: the agent calls it after each sync, so that its resident
    /// memory does not count the tables' pages (the map's own memory) between syncs. The next
    /// table written or read maps the window it needs again.
    pub fn unmap_tables(&mut self) {
        if let Some(m) = self.tables.mapped.as_mut() {
            m.unmap();
        }
    }

    /// Entries of the table array in use (quarantine included) and its capacity, as this agent
    /// allocates them.
    pub fn table_usage(&self) -> (u64, u32) {
        (self.tables.arena.as_ref().map_or(0, |a| a.used()), self.caps.chash)
    }

    /// Frees the table regions retired at least `age` ago (and every other one retired before
    /// now) once a synchronize point has passed: one RCU grace period for all of them. The agent
    /// calls it after each sync, so a busy node waits at most one grace period a second for it;
    /// an allocation that finds no room also synchronizes at once. Returns the entries freed.
    pub fn reclaim_tables(&mut self, age: std::time::Duration) -> Result<u64, MapOpError> {
        match self.tables.arena.as_ref().and_then(|a| a.oldest_retired()) {
            Some(t) if t.elapsed() >= age => self.tables.synchronize(),
            _ => Ok(0),
        }
    }

    /// The Service address a host socket (`cookie`) connected to backend `be` was translated
    /// from, as the socket hooks recorded it.
    pub fn translated_from(&self, cookie: u64, be: (Ipv4Addr, u16)) -> Option<(Ipv4Addr, u16)> {
        let key = SockRevKey { cookie, addr_be: u32::from_ne_bytes(be.0.octets()), port_be: be.1.to_be(), pad: 0 };
        self.sock_rev.get(&key, 0).ok().map(|v| (Ipv4Addr::from(v.addr_be.to_ne_bytes()), u16::from_be(v.port_be)))
    }

    /// Writes this node's datapath settings. The policy generation is the datapath's own
    /// (`bump_policy_generation`): kept as the map holds it.
    pub fn set_config(&mut self, mut cfg: NodeConfig) -> Result<(), MapOpError> {
        cfg.pol_generation = self.config.get(&0, 0).map(|c| c.pol_generation).unwrap_or(0);
        self.config.set(0, cfg, 0).map_err(|source| MapOpError::Syscall { map: names::CONFIG, op: "update", what: format!("{cfg:?}"), source })
    }

    /// Tells the datapath that what policies allow has changed: every tracked connection is
    /// decided again, against the current rules, at its next packet (and cut if they no longer
    /// allow it). Returns the new generation.
    pub fn bump_policy_generation(&mut self) -> Result<u32, MapOpError> {
        let mut cfg = self.config.get(&0, 0).unwrap_or_default();
        cfg.pol_generation = cfg.pol_generation.wrapping_add(1);
        self.config.set(0, cfg, 0).map_err(|source| MapOpError::Syscall { map: names::CONFIG, op: "update", what: "policy generation".into(), source })?;
        Ok(cfg.pol_generation)
    }

    /// Removes the counters of frontends `live` says are gone (the datapath may make a removed
    /// frontend's between the agent's removal of its name and of its counters): at start, over
    /// the frontends read back. Returns how many went.
    pub fn sweep_counters(&mut self, live: impl Fn(u32) -> bool) -> usize {
        let dead: Vec<u32> = self.svc_stats.keys().flatten().filter(|id| !live(*id)).collect();
        dead.iter().filter(|id| self.svc_stats.remove(id).is_ok()).count()
    }

    /// A frontend's packets and bytes, summed over CPUs (none yet: zero).
    pub fn service_counters(&self, svc_id: u32) -> SvcCounters {
        self.svc_stats
            .get(&svc_id, 0)
            .map(|v| v.iter().fold(SvcCounters::default(), |a, c| SvcCounters { packets: a.packets + c.packets, bytes: a.bytes + c.bytes }))
            .unwrap_or_default()
    }

    /// The name the agent gave frontend `svc_id` (`namespace/name:port`).
    pub fn service_name(&self, svc_id: u32) -> Option<String> {
        self.svc_names.get(&svc_id, 0).ok().map(|n| n.as_str().to_string())
    }

    /// The policy state the maps hold (restore, then diff), and the ids it uses.
    pub fn dump_policy(&self) -> (crate::netpol::DesiredPolicy, crate::netpol::Ids) {
        let mut d = crate::netpol::DesiredPolicy::default();
        let mut ids = crate::netpol::Ids::default();
        for (k, id) in self.pol_ipcache.iter().flatten() {
            d.ipcache.insert(Cidr4 { addr: Ipv4Addr::from(k.data().to_ne_bytes()), prefix: k.prefix_len() as u8 }, id);
        }
        for (ip, ep) in self.pol_endpoints.iter().flatten() {
            d.endpoints.insert(Ipv4Addr::from(ip.to_ne_bytes()), ep);
        }
        for (k, v) in self.pol_rules.iter().flatten() {
            d.rules.insert((k.prefix_len(), k.data()), v);
        }
        for (id, n) in self.id_names.iter().flatten() {
            d.identities.insert(id, n.as_str().to_string());
            if id >= dataplane_common::identity::FIRST {
                ids.identities.insert(n.as_str().to_string(), id);
            }
        }
        for (id, n) in self.pol_names.iter().flatten() {
            d.policies.insert(id, n.as_str().to_string());
            ids.policies.insert(n.as_str().to_string(), id);
        }
        for (ip, n) in self.pod_names.iter().flatten() {
            d.pod_names.insert(Ipv4Addr::from(ip.to_ne_bytes()), n.as_str().to_string());
        }
        for (ip, l) in self.local_addrs.iter().flatten() {
            d.local.insert(Ipv4Addr::from(ip.to_ne_bytes()), l);
        }
        for (ifindex, p) in self.pod_ifaces.iter().flatten() {
            d.pod_ifaces.insert(ifindex, p);
        }
        (d, ids)
    }

    /// Makes the policy maps hold `want`, writing only differences, in an order that never
    /// opens what should be closed: lookups (ipcache, rules, names) before the endpoints that
    /// use them, and removals in the reverse order. Returns (writes, deletes) and the errors.
    pub fn sync_policy(&mut self, applied: &mut crate::netpol::DesiredPolicy, want: &crate::netpol::DesiredPolicy) -> (usize, usize, Vec<String>) {
        fn diff<K: Ord + Clone, V: PartialEq + Clone>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> (Vec<(K, V)>, Vec<K>) {
            let put = want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
            let del = have.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
            (put, del)
        }
        let (mut writes, mut deletes, mut errors) = (0, 0, Vec::new());
        let mut note = |r: Result<(), MapError>, what: String, n: &mut usize| match r {
            Ok(()) => *n += 1,
            Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(SyscallError { ref io_error, .. })) if io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => errors.push(format!("{what}: {e}")),
        };
        let ip_key = |c: &Cidr4| LpmKey::new(c.prefix as u32, u32::from_ne_bytes(c.addr.octets()));
        let ip_be = |ip: &Ipv4Addr| u32::from_ne_bytes(ip.octets());
        let (ipc_put, ipc_del) = diff(&applied.ipcache, &want.ipcache);
        let (rule_put, rule_del) = diff(&applied.rules, &want.rules);
        let (ep_put, ep_del) = diff(&applied.endpoints, &want.endpoints);
        let (id_put, id_del) = diff(&applied.identities, &want.identities);
        let (pol_put, pol_del) = diff(&applied.policies, &want.policies);
        let (pod_put, pod_del) = diff(&applied.pod_names, &want.pod_names);
        let (local_put, local_del) = diff(&applied.local, &want.local);
        let (if_put, if_del) = diff(&applied.pod_ifaces, &want.pod_ifaces);
        // Anti-spoofing first: a pod's new address is known before anything refers to it.
        for (ip, l) in &local_put {
            note(self.local_addrs.insert(ip_be(ip), *l, 0), format!("{} {ip}", names::LOCAL_ADDRS), &mut writes);
        }
        for (ifindex, p) in &if_put {
            note(self.pod_ifaces.insert(ifindex, *p, 0), format!("{} {ifindex}", names::POD_IFACES), &mut writes);
        }
        // Rules before the ipcache entries that point at their identities: an address that moves
        // to another identity (a pod relabelled, an ipBlock added that holds it) finds that
        // identity's rules in place; the old identity's go only after the ipcache moved away.
        for ((prefix, k), id) in &rule_put {
            note(self.pol_rules.insert(&LpmKey::new(*prefix, *k), *id, 0), format!("{} {k:?}/{prefix}", names::POL_RULES), &mut writes);
        }
        for (c, id) in &ipc_put {
            note(self.pol_ipcache.insert(&ip_key(c), *id, 0), format!("{} {c}", names::POL_IPCACHE), &mut writes);
        }
        for (id, n) in &id_put {
            note(self.id_names.insert(id, SvcName::new(n), 0), format!("{} {id}", names::IDENTITY_NAMES), &mut writes);
        }
        for (id, n) in &pol_put {
            note(self.pol_names.insert(id, SvcName::new(n), 0), format!("{} {id}", names::POL_NAMES), &mut writes);
        }
        for (ip, n) in &pod_put {
            note(self.pod_names.insert(ip_be(ip), SvcName::new(n), 0), format!("{} {ip}", names::POD_NAMES), &mut writes);
        }
        for (ip, ep) in &ep_put {
            note(self.pol_endpoints.insert(ip_be(ip), *ep, 0), format!("{} {ip}", names::POL_ENDPOINTS), &mut writes);
        }
        for ip in &ep_del {
            note(self.pol_endpoints.remove(&ip_be(ip)), format!("{} {ip}", names::POL_ENDPOINTS), &mut deletes);
        }
        for (prefix, k) in &rule_del {
            note(self.pol_rules.remove(&LpmKey::new(*prefix, *k)), format!("{} {k:?}/{prefix}", names::POL_RULES), &mut deletes);
        }
        for c in &ipc_del {
            note(self.pol_ipcache.remove(&ip_key(c)), format!("{} {c}", names::POL_IPCACHE), &mut deletes);
        }
        for id in &id_del {
            note(self.id_names.remove(id), format!("{} {id}", names::IDENTITY_NAMES), &mut deletes);
        }
        for id in &pol_del {
            note(self.pol_names.remove(id), format!("{} {id}", names::POL_NAMES), &mut deletes);
        }
        for ip in &pod_del {
            note(self.pod_names.remove(&ip_be(ip)), format!("{} {ip}", names::POD_NAMES), &mut deletes);
        }
        for ifindex in &if_del {
            note(self.pod_ifaces.remove(ifindex), format!("{} {ifindex}", names::POD_IFACES), &mut deletes);
        }
        for ip in &local_del {
            note(self.local_addrs.remove(&ip_be(ip)), format!("{} {ip}", names::LOCAL_ADDRS), &mut deletes);
        }
        // What decides a connection changed: tracked connections are decided again.
        let decisive = [ipc_put.len(), ipc_del.len(), rule_put.len(), rule_del.len(), ep_put.len(), ep_del.len()].iter().sum::<usize>();
        if decisive > 0 {
            if let Err(e) = self.bump_policy_generation() {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            *applied = want.clone();
        } else {
            // Read back what really is there, so the next sync retries exactly the rest.
            *applied = self.dump_policy().0;
        }
        (writes, deletes, errors)
    }

    /// Drops counted against policy `id` in direction `dir`, summed over CPUs.
    pub fn policy_drops(&self, id: u32, dir: u8) -> u64 {
        self.pol_drops.get(&(id * 2 + dir as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// The datapath's counts of assured connections of source `src`: [Service, policy].
    pub fn ct_sources(&self, src: Ipv4Addr) -> [u32; 2] {
        self.ct_sources.get(&u32::from_ne_bytes(src.octets()), 0).unwrap_or([0, 0])
    }

    /// Sum over CPUs of each counter.
    pub fn stat_totals(&self) -> Vec<u64> {
        (0..capacity::STATS).map(|i| self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)).collect()
    }
}

/// Entries and capacity of one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// Entries versus capacity of every pinned map under `dir` (absent maps and the event ring are
/// left out). Hash and LPM maps are counted by walking their keys (BPF_MAP_GET_NEXT_KEY); an
/// array holds every slot.
pub fn map_usage(dir: &Path) -> Vec<MapUsage> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut out = Vec::new();
    for name in names::ALL {
        // Conntrack is counted by its garbage collector's walk, not at every scrape.
        if matches!(name, names::CONNTRACK | names::CONNTRACK_ASSURED | names::POL_CONNTRACK | names::POL_CONNTRACK_ASSURED) {
            continue;
        }
        let Ok(data) = MapData::from_pin(dir.join(name)) else { continue };
        let Ok(info) = data.info() else { continue };
        if name == names::CHASH {
            // Table entries the service entries point at, of all the array's entries.
            let used = MapData::from_pin(dir.join(names::SERVICES))
                .ok()
                .and_then(|d| HashMap::<MapData, Lb4Key, Lb4Service>::try_from(Map::HashMap(d)).ok())
                .map_or(0, |m| m.iter().flatten().filter(|(_, s)| s.flags & SVC_F_ADDR_ONLY == 0).map(|(_, s)| s.table_len as u64).sum());
            out.push(MapUsage { name, entries: used, capacity: info.max_entries().saturating_mul(dataplane_common::CHASH_PER_ELEMENT) });
            continue;
        }
        match info.map_type() {
            // Every slot of an array exists: nothing to walk.
            Ok(aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray) => {
                out.push(MapUsage { name, entries: info.max_entries() as u64, capacity: info.max_entries() });
                continue;
            }
            // A ring buffer has bytes, not keys.
            Ok(aya::maps::MapType::RingBuf) => continue,
            _ => {}
        }
        let fd = data.fd().as_fd().as_raw_fd();
        let mut key = vec![0u8; info.key_size() as usize];
        let mut next = vec![0u8; info.key_size() as usize];
        let mut entries = 0u64;
        let mut first = true;
        loop {
            // union bpf_attr for BPF_MAP_GET_NEXT_KEY: map_fd, pad, key, next_key.
            let mut attr = [0u64; 3];
            attr[0] = fd as u32 as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
            let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, attr.as_mut_ptr(), std::mem::size_of_val(&attr) as u32) };
            if r != 0 || entries > u32::MAX as u64 {
                break;
            }
            entries += 1;
            first = false;
            std::mem::swap(&mut key, &mut next);
        }
        out.push(MapUsage { name, entries, capacity: info.max_entries() });
    }
    out
}

/// The table array (created `BPF_F_MMAPABLE`), a window of it mapped into this process, so its
/// entries are read and written as memory. Entry `i` is the `u32` at byte `4 i` of the array
/// (two entries an 8-byte element).
///
/// Only a window is mapped, and only while a sync writes or reads tables: the kernel maps every
/// page of an array mapping at `mmap` time (`remap_vmalloc_range`), so a mapping counts all of
/// its pages in this process's resident memory, though they are the map's (kernel memory, the
/// same whether mapped or not). The window starts at the page of the first entry needed (the
/// mapping's offset) and grows (unmap, map again, larger) as entries further out are reached;
/// the agent unmaps it after each sync ([`BpfMaps::unmap_tables`]), so one change maps the pages
/// of the tables it touches, not the array's front up to them.
struct MappedTables {
    ptr: *mut libc::c_void,
    /// The first entry mapped (at a page boundary).
    lo: usize,
    /// Bytes mapped (0: nothing yet).
    len: usize,
    /// Entries of the whole array.
    entries: usize,
    page: usize,
}

/// A growing window's end grows in steps of this many bytes (256 Ki entries).
const TABLE_WINDOW_STEP: usize = 1 << 20;

impl MappedTables {
    fn new(map: &MapData) -> std::io::Result<Self> {
        let elements = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        let entries = elements * dataplane_common::CHASH_PER_ELEMENT as usize;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        Ok(MappedTables { ptr: std::ptr::null_mut(), lo: 0, len: 0, entries, page })
    }

    /// The entries mapped now: `lo..hi`.
    fn window(&self) -> std::ops::Range<usize> {
        self.lo..(self.lo + self.len / 4).min(self.entries)
    }

    /// Are entries `start..end` mapped?
    fn covers(&self, start: usize, end: usize) -> bool {
        let w = self.window();
        start >= w.start && end <= w.end
    }

    /// Maps at least entries `start..end` (`end` at most the array's size) of `map`, the array
    /// this mapping was made for (its fd is not kept: the map's handle is the one owner), with
    /// what was mapped already.
    fn cover(&mut self, map: &MapData, start: usize, end: usize) -> std::io::Result<()> {
        use std::os::fd::{AsFd, AsRawFd};
        if start >= end || self.covers(start, end) {
            return Ok(());
        }
        // Grown over what is mapped when the new range is next to it (a sync writing tables one
        // after another); a range far from it gets a window of its own instead (one change
        // touching two tables far apart maps two small windows in turn, not all between them).
        let w = self.window();
        let gap = if end <= w.start { w.start - end } else { start.saturating_sub(w.end) };
        if self.len > 0 && gap * 4 > TABLE_WINDOW_STEP {
            self.unmap();
        }
        let (start, end) = if self.len > 0 { (start.min(self.lo), end.max(self.window().end)) } else { (start, end) };
        let whole = (self.entries * 4).div_ceil(self.page) * self.page;
        let from = (start * 4) / self.page * self.page;
        // A first window covers the pages asked for (a change patches a table or two); one that
        // grows (a sync writing many) grows by steps.
        let mut to = if self.len == 0 { (end * 4).div_ceil(self.page) * self.page } else { (end * 4).div_ceil(TABLE_WINDOW_STEP).saturating_mul(TABLE_WINDOW_STEP) }.min(whole);
        if self.len > 0 {
            // At least twice what it was: a sync writing tables one after another maps each
            // page a bounded number of times, not once per step.
            to = to.max(from.saturating_add(2 * self.len)).min(whole);
        }
        // SAFETY: a fresh shared mapping of the map's fd at a page-aligned offset, ending inside
        // the array (the kernel checks offset and length, and refuses maps without
        // BPF_F_MMAPABLE).
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), to - from, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), from as libc::off_t) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.unmap();
        self.ptr = ptr;
        self.lo = from / 4;
        self.len = to - from;
        Ok(())
    }

    fn unmap(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made by `cover`, unmapped once.
            unsafe { libc::munmap(self.ptr, self.len) };
            self.len = 0;
            self.lo = 0;
        }
    }

    fn slot(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(self.covers(i, i + 1), "entry {i} outside the entries {:?} mapped of the table array", self.window());
        // SAFETY: inside the mapping (checked above), 4-byte aligned (the mapping is page
        // aligned); atomic because the datapath reads live tables at the same time.
        unsafe { &*(self.ptr.cast::<u8>().add((i - self.lo) * 4) as *const std::sync::atomic::AtomicU32) }
    }

    fn get(&self, i: usize) -> u32 {
        self.slot(i).load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, i: usize, id: u32) {
        self.slot(i).store(id, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for MappedTables {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// A synchronize point for userspace: an update of a map of maps returns only after an RCU
/// grace period (`maybe_wait_bpf_programs` in the kernel's syscall.c: every non-sleepable program
/// running when it began has ended). A one-slot array of maps made for this alone, never pinned.
struct RcuBarrier {
    outer: std::os::fd::OwnedFd,
    inner: std::os::fd::OwnedFd,
}

impl RcuBarrier {
    fn new() -> std::io::Result<Self> {
        use crate::links::{sys_bpf, Attr};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const BPF_MAP_CREATE: u32 = 0;
        const MAP_ARRAY: u32 = 2;
        const MAP_ARRAY_OF_MAPS: u32 = 12;
        let inner = sys_bpf(BPF_MAP_CREATE, Attr::new().u32(0, MAP_ARRAY).u32(4, 4).u32(8, 4).u32(12, 1))?;
        let inner = unsafe { OwnedFd::from_raw_fd(inner as i32) };
        let outer = sys_bpf(BPF_MAP_CREATE, Attr::new().u32(0, MAP_ARRAY_OF_MAPS).u32(4, 4).u32(8, 4).u32(12, 1).u32(20, inner.as_raw_fd() as u32))?;
        Ok(RcuBarrier { outer: unsafe { OwnedFd::from_raw_fd(outer as i32) }, inner })
    }

    /// Returns once every BPF program that was running when it was called has ended.
    fn wait(&self) -> std::io::Result<()> {
        use crate::links::{sys_bpf, Attr};
        use std::os::fd::AsRawFd;
        const BPF_MAP_UPDATE_ELEM: u32 = 2;
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        sys_bpf(BPF_MAP_UPDATE_ELEM, Attr::new().u32(0, self.outer.as_raw_fd() as u32).u64(8, &key as *const u32 as u64).u64(16, &value as *const u32 as u64)).map(drop)
    }
}

/// Where each frontend's table is in the flat table array, and the array as memory. A full sync
/// is memory writes plus one service entry update per frontend: no syscall per entry, no map of
/// maps (whose every update waits an RCU grace period).
///
/// - A new table, or one of another size, goes to a new region ([`TableArena`], best fit),
///   written before `put_service` switches the frontend's entry to it (`pending` until then).
/// - A table of the same size is patched in place: the datapath may meet a mix of old and new
///   entries for a moment, every one of them a live backend.
/// - The region an entry stopped pointing at is retired: reused only after a synchronize point
///   ([`RcuBarrier`]) that began after the switch (see `tables.rs`).
/// - A restart adopts the regions the service entries point at ([`BpfMaps::dump_applied`]);
///   the rest of the array is free after one synchronize (an earlier agent may have retired a
///   region just before it stopped).
#[derive(Default)]
pub struct Tables {
    mapped: Option<MappedTables>,
    arena: Option<TableArena>,
    /// Frontend id -> the region its service entry points at.
    live: std::collections::HashMap<u32, Region>,
    /// Frontend id -> a region written whose service entry does not point at it yet.
    pending: std::collections::HashMap<u32, Region>,
    barrier: Option<RcuBarrier>,
    /// Adopted free space must pass a synchronize before it is handed out.
    adopted: bool,
}

impl Tables {
    /// The array mapped at least over entries `start..end` (past the array's end: up to it).
    fn mapped(&mut self, map: &Array<MapData, [u32; 2]>, start: u64, end: u64) -> std::io::Result<&MappedTables> {
        if self.mapped.is_none() {
            self.mapped = Some(MappedTables::new(map.map())?);
        }
        let m = self.mapped.as_mut().expect("made above");
        let end = end.min(m.entries as u64) as usize;
        m.cover(map.map(), (start as usize).min(end), end)?;
        Ok(m)
    }

    /// Takes over the regions the service entries point at (`(frontend id, region)`): a region
    /// past the array's end or overlapping another is not adopted (that frontend gets a new table
    /// at the next sync).
    fn adopt(&mut self, capacity: u32, regions: impl Iterator<Item = (u32, Region)>) {
        let regions: Vec<(u32, Region)> = regions.collect();
        let (arena, refused) = TableArena::rebuild(capacity, regions.iter().map(|(_, r)| *r));
        for r in &refused {
            log::warn!("table array {}: a service entry points at entries {}..{} (past the end or shared): not adopted, the next sync writes a new table", names::CHASH, r.off, r.off as u64 + r.len as u64);
        }
        self.live = regions.into_iter().filter(|(_, r)| !refused.contains(r)).collect();
        self.pending.clear();
        self.arena = Some(arena);
        self.adopted = true;
    }

    fn arena(&mut self, capacity: u32) -> &mut TableArena {
        self.arena.get_or_insert_with(|| TableArena::new(capacity))
    }

    /// Waits for a synchronize point, then frees every region retired before it. Returns the
    /// entries freed.
    fn synchronize(&mut self) -> Result<u64, MapOpError> {
        let other = |message: String| MapOpError::Other { map: names::CHASH, what: "retired table regions".into(), message };
        if self.barrier.is_none() {
            self.barrier = Some(RcuBarrier::new().map_err(|e| other(format!("creating the synchronize map: {e}")))?);
        }
        let Some(arena) = self.arena.as_mut() else { return Ok(0) };
        let epoch = arena.begin_synchronize();
        self.barrier.as_ref().expect("created above").wait().map_err(|e| other(format!("synchronize: {e}")))?;
        self.adopted = false;
        Ok(self.arena.as_mut().map_or(0, |a| a.synchronized(epoch)))
    }

    /// Frontend `svc_id`'s service entry now points at `region` (or at no table).
    fn switched(&mut self, svc_id: u32, region: Option<Region>) {
        if region.is_some() && self.pending.get(&svc_id).copied() == region {
            self.pending.remove(&svc_id);
        }
        let old = match region {
            Some(r) => self.live.insert(svc_id, r),
            None => self.live.remove(&svc_id),
        };
        if let (Some(old), Some(arena)) = (old.filter(|o| Some(*o) != region), self.arena.as_mut()) {
            arena.retire(old, std::time::Instant::now());
        }
    }
}

impl BpfMaps {
    fn table_full(&self, what: String) -> MapOpError {
        let (used, largest) = self.tables.arena.as_ref().map_or((0, 0), |a| (a.used(), a.largest_free()));
        MapOpError::Full {
            map: names::CHASH,
            capacity: self.caps.chash,
            what: format!("{what} ({used} entries in use, the largest free region has {largest}; raise --lb-table-entries)"),
        }
    }
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(SyscallError { io_error, .. }) if io_error.raw_os_error() == Some(libc::E2BIG))
}

fn put<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    cap: u32,
    k: K,
    v: V,
    what: impl FnOnce() -> String,
) -> Result<(), MapOpError> {
    map.insert(k, v, 0).map_err(|source| {
        if is_full(&source) {
            MapOpError::Full { map: name, capacity: cap, what: what() }
        } else {
            MapOpError::Syscall { map: name, op: "insert", what: what(), source }
        }
    })
}

fn del<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, name: &'static str, k: &K, what: impl FnOnce() -> String) -> Result<(), MapOpError> {
    match map.remove(k) {
        Ok(()) => Ok(()),
        // Already gone is what we wanted.
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(SyscallError { ref io_error, .. })) if io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(MapOpError::Syscall { map: name, op: "delete", what: what(), source }),
    }
}

impl MapOps for BpfMaps {
    fn put_backend(&mut self, id: u32, be: Lb4Backend) -> Result<(), MapOpError> {
        put(&mut self.backends, names::BACKENDS, self.caps.backends, id, be, || format!("backend {id}"))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        del(&mut self.backends, names::BACKENDS, &id, || format!("backend {id}"))
    }
    fn put_slot(&mut self, key: Lb4SlotKey, backend_id: u32) -> Result<(), MapOpError> {
        put(&mut self.slots, names::SLOTS, self.caps.slots, key, backend_id, || format!("slot {}/{}", key.svc_id, key.slot))
    }
    fn del_slot(&mut self, key: Lb4SlotKey) -> Result<(), MapOpError> {
        del(&mut self.slots, names::SLOTS, &key, || format!("slot {}/{}", key.svc_id, key.slot))
    }
    fn put_service(&mut self, key: Lb4Key, mut svc: Lb4Service) -> Result<(), MapOpError> {
        // The table's offset is this layer's: the region `put_table` wrote last for the frontend.
        let frontend = svc.flags & SVC_F_ADDR_ONLY == 0;
        let region = if frontend && svc.table_len > 0 {
            let r = self.tables.pending.get(&svc.svc_id).or(self.tables.live.get(&svc.svc_id)).copied().filter(|r| r.len == svc.table_len);
            let r = r.ok_or_else(|| MapOpError::Other {
                map: names::SERVICES,
                what: format!("{key:?}"),
                message: format!("no table of {} entries written for frontend {}", svc.table_len, svc.svc_id),
            })?;
            svc.table_off = r.off;
            Some(r)
        } else {
            svc.table_off = 0;
            svc.table_len = 0;
            None
        };
        put(&mut self.services, names::SERVICES, self.caps.services, key, svc, || format!("{key:?}"))?;
        if frontend {
            self.tables.switched(svc.svc_id, region);
        }
        Ok(())
    }
    fn del_service(&mut self, key: Lb4Key) -> Result<(), MapOpError> {
        let was = self.services.get(&key, 0).ok();
        del(&mut self.services, names::SERVICES, &key, || format!("{key:?}"))?;
        if let Some(was) = was.filter(|s| s.flags & SVC_F_ADDR_ONLY == 0) {
            self.tables.switched(was.svc_id, None);
        }
        Ok(())
    }

    fn put_service_cidr(&mut self, c: Cidr4) -> Result<(), MapOpError> {
        let key = LpmKey::new(c.prefix as u32, u32::from_ne_bytes(c.addr.octets()));
        self.service_cidrs
            .insert(&key, 1, 0)
            .map_err(|source| MapOpError::Syscall { map: names::SERVICE_CIDRS, op: "insert", what: c.to_string(), source })
    }
    fn del_service_cidr(&mut self, c: Cidr4) -> Result<(), MapOpError> {
        let key = LpmKey::new(c.prefix as u32, u32::from_ne_bytes(c.addr.octets()));
        match self.service_cidrs.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapOpError::Syscall { map: names::SERVICE_CIDRS, op: "delete", what: c.to_string(), source }),
        }
    }
    fn put_table(&mut self, svc_id: u32, table: &[u32]) -> Result<usize, MapOpError> {
        let n = table.len() as u32;
        let what = || format!("a table of {} entries for frontend {svc_id}", table.len());
        let mmap_err = |e: std::io::Error| MapOpError::Other { map: names::CHASH, what: what(), message: format!("mmap: {e}") };
        let cap = self.caps.chash;
        // The region written last (one not switched to yet, else the live one): the same size is
        // patched in place, where it differs (the reconciler keeps no copy: the mapping is it).
        let current = self.tables.pending.get(&svc_id).or(self.tables.live.get(&svc_id)).copied().filter(|r| r.len == n);
        if let Some(r) = current {
            let m = self.tables.mapped(&self.chash, r.off as u64, r.end()).map_err(mmap_err)?;
            let mut changed = 0;
            for (i, new) in table.iter().enumerate() {
                let at = r.off as usize + i;
                if m.get(at) != *new {
                    m.set(at, *new);
                    changed += 1;
                }
            }
            return Ok(changed);
        }
        // A new region, written before the service entry is switched to it: the datapath never
        // sees it half filled. Every call that can fail comes before the first write (a failed
        // mapping gives the region back).
        if self.tables.adopted {
            self.tables.synchronize()?;
        }
        let region = match self.tables.arena(cap).alloc(n) {
            Some(r) => r,
            None if self.tables.arena(cap).quarantined() > 0 => {
                self.tables.synchronize()?;
                match self.tables.arena(cap).alloc(n) {
                    Some(r) => r,
                    None => return Err(self.table_full(what())),
                }
            }
            None => return Err(self.table_full(what())),
        };
        let m = match self.tables.mapped(&self.chash, region.off as u64, region.end()) {
            Ok(m) => m,
            Err(e) => {
                self.tables.arena(cap).free(region);
                return Err(mmap_err(e));
            }
        };
        for (i, id) in table.iter().enumerate() {
            m.set(region.off as usize + i, *id);
        }
        if let Some(unused) = self.tables.pending.insert(svc_id, region) {
            // Written for an entry update that never happened: nothing can be reading it.
            self.tables.arena(cap).free(unused);
        }
        Ok(table.len())
    }
    fn del_table(&mut self, svc_id: u32) -> Result<(), MapOpError> {
        // A region the entry never pointed at goes at once; the live one when the entry stops
        // pointing at it (`put_service`, `del_service`).
        if let Some(r) = self.tables.pending.remove(&svc_id) {
            self.tables.arena(self.caps.chash).free(r);
        }
        Ok(())
    }
    fn put_source_range(&mut self, svc_id: u32, c: Cidr4) -> Result<(), MapOpError> {
        let key = LpmKey::new(32 + c.prefix as u32, SrcRangeData { svc_id, addr_be: u32::from_ne_bytes(c.addr.octets()) });
        self.source_ranges
            .insert(&key, 1, 0)
            .map_err(|source| MapOpError::Syscall { map: names::SOURCE_RANGES, op: "insert", what: format!("{svc_id} {c}"), source })
    }
    fn del_source_range(&mut self, svc_id: u32, c: Cidr4) -> Result<(), MapOpError> {
        let key = LpmKey::new(32 + c.prefix as u32, SrcRangeData { svc_id, addr_be: u32::from_ne_bytes(c.addr.octets()) });
        match self.source_ranges.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapOpError::Syscall { map: names::SOURCE_RANGES, op: "delete", what: format!("{svc_id} {c}"), source }),
        }
    }
    fn put_frontend_name(&mut self, svc_id: u32, name: &str) -> Result<(), MapOpError> {
        // The counters are the datapath's to make, at the frontend's first packet (a per-CPU
        // insert here cost 20 µs a frontend); a renamed or restored frontend's keep counting.
        put(&mut self.svc_names, names::SVC_NAMES, self.caps.services, svc_id, SvcName::new(name), || format!("name of frontend {svc_id} ({name})"))
    }
    fn del_frontend_meta(&mut self, svc_id: u32) -> Result<(), MapOpError> {
        del(&mut self.svc_names, names::SVC_NAMES, &svc_id, || format!("name of frontend {svc_id}"))?;
        match self.svc_stats.remove(&svc_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(SyscallError { ref io_error, .. })) if io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(MapOpError::Syscall { map: names::SVC_STATS, op: "delete", what: format!("counters of frontend {svc_id}"), source }),
        }
    }
    fn mark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError> {
        let k = Lb4PairKey { svc_id, backend_id };
        // An LRU map: never full, the oldest pair makes room.
        self.gone.insert(k, conntrack::monotonic_ns(), 0).map_err(|source| MapOpError::Syscall { map: names::GONE, op: "insert", what: format!("{k:?}"), source })
    }
    fn unmark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError> {
        let k = Lb4PairKey { svc_id, backend_id };
        del(&mut self.gone, names::GONE, &k, || format!("{k:?}"))
    }
}
