//! Desired state versus applied state, turned into ordered map operations.
//!
//! Following Cilium's control plane: writes are ordered so the datapath never sees a dangling
//! reference (backends, then the slots that point at them, the service entry last; deletes in the
//! reverse order), the in-memory view records each write as it succeeds, so after a failure it
//! still says exactly what the maps hold and the next sync carries on from there, and unchanged
//! entries are never rewritten. A new frontend that cannot be completed is taken out again
//! (nothing of it stays in the maps, its id is not used up). Removing one endpoint touches its
//! own slot, the slot the last backend moves into, and the service's count: nothing else. Map
//! I/O sits behind [`MapOps`] so this logic is tested without root; bpf-tests run it against the
//! real maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{
    Lb4Backend, Lb4Key, Lb4Service, Lb4SlotKey, BE_F_HOST, BE_F_LOCAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY, SVC_F_EXTERNAL_IP, SVC_F_RANDOM,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    error::MapOpError,
    model::{Desired, DesiredFrontend, Frontend, L4Addr, Proto, Scope},
};

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr4 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: prefix must be 0-32"))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Cidr4 { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }
}

impl std::fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr4 {
    /// Address and netmask in network byte order, as the datapath compares them.
    pub fn addr_mask_be(&self) -> (u32, u32) {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        ((u32::from(self.addr) & mask).to_be(), mask.to_be())
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Cidr4 {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        Cidr4 { addr: Ipv4Addr::from(u32::from(self.addr) & mask), prefix: self.prefix }
    }

    /// Is every address of `other` inside this prefix?
    pub fn covers(&self, other: &Cidr4) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// The map operations the reconciler needs. Implemented by `bpf::BpfMaps` on real maps.
pub trait MapOps {
    fn put_backend(&mut self, id: u32, be: Lb4Backend) -> Result<(), MapOpError>;
    fn del_backend(&mut self, id: u32) -> Result<(), MapOpError>;
    fn put_slot(&mut self, key: Lb4SlotKey, backend_id: u32) -> Result<(), MapOpError>;
    fn del_slot(&mut self, key: Lb4SlotKey) -> Result<(), MapOpError>;
    fn put_service(&mut self, key: Lb4Key, svc: Lb4Service) -> Result<(), MapOpError>;
    fn del_service(&mut self, key: Lb4Key) -> Result<(), MapOpError>;
    fn put_service_cidr(&mut self, cidr: Cidr4) -> Result<(), MapOpError>;
    fn del_service_cidr(&mut self, cidr: Cidr4) -> Result<(), MapOpError>;
    /// Makes `table` (backend ids) frontend `svc_id`'s consistent-hashing table. On error nothing
    /// of it was written: the previous table, if any, is unchanged. Returns how many entries
    /// differ from the table the maps held for it (all of them when the size changed; none when
    /// it is the same table, and then nothing is written).
    fn put_table(&mut self, svc_id: u32, table: &[u32]) -> Result<usize, MapOpError>;
    fn del_table(&mut self, svc_id: u32) -> Result<(), MapOpError>;
    /// Allows `cidr` as a source of frontend `svc_id` (loadBalancerSourceRanges).
    fn put_source_range(&mut self, svc_id: u32, cidr: Cidr4) -> Result<(), MapOpError>;
    fn del_source_range(&mut self, svc_id: u32, cidr: Cidr4) -> Result<(), MapOpError>;
    /// Names frontend `svc_id` (`namespace/name:port`, for inspection and metrics; the datapath
    /// makes its counters at its first packet while it has a name).
    fn put_frontend_name(&mut self, svc_id: u32, name: &str) -> Result<(), MapOpError>;
    /// Removes frontend `svc_id`'s name and counters.
    fn del_frontend_meta(&mut self, svc_id: u32) -> Result<(), MapOpError>;
    /// Marks backend `backend_id` as taken out of frontend `svc_id` (`lb4_gone_v1`; every
    /// protocol): the datapath moves UDP and SCTP connections tracked to the pair at their next
    /// packet, and sessionAffinity clients stuck to it choose again, as kube-proxy's conntrack
    /// flush does, with no walk over conntrack or affinity. TCP connections keep their backend
    /// until they end (graceful termination).
    fn mark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError>;
    /// Takes the mark away: the backend joins the frontend again.
    fn unmark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError>;
}

/// What is in the maps now, as the datapath sees it (restored from the maps at start-up).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Backend address -> (id, flags).
    pub backends: BTreeMap<L4Addr, (u32, u8)>,
    pub frontends: BTreeMap<Frontend, AppliedFrontend>,
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub service_cidrs: BTreeSet<Cidr4>,
    /// (frontend, backend) pairs marked as taken out (`lb4_gone_v1`) of frontends that still
    /// exist: unmarked when the backend comes back. (Pairs of removed frontends are marked but
    /// not kept here: their ids are not handed out again while the agent runs, and a restart
    /// reads every mark back.)
    pub gone: BTreeSet<(u32, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedFrontend {
    pub svc_id: u32,
    /// The name written: `None` for a frontend restored from the maps whose Service has not been
    /// seen yet, or whose name was removed.
    pub service: Option<crate::model::ServicePortName>,
    /// Slot `i` holds `slots[i]`: every slot of the frontend in the slot map, dense from 0. The
    /// datapath uses the first `entry.count`; there are more when an update stopped (an error, a
    /// crash) between adding slots and raising the count.
    pub slots: Vec<L4Addr>,
    /// The service entry as written; `None` while a new frontend has none yet.
    pub entry: Option<Lb4Service>,
    pub source_ranges: BTreeSet<Cidr4>,
    /// What the consistent-hashing table as written refers to; empty when there is none.
    pub table: Table,
    /// `table` was built from the backends in the first this many `slots`: the same backends
    /// again need no new table. `None` when unknown: restored from the maps, or a slot among them
    /// rewritten since (a write that stopped before the table's). (A count, not a copy of the
    /// backends: 56 bytes less a frontend.)
    pub table_slots: Option<u16>,
}

/// A consistent-hashing table as the reconciler remembers it: its size and the distinct backend
/// ids it names (what reference counting needs), not its entries. The maps hold those, and a
/// new table is compared with them (`MapOps::put_table`) where they are mapped: 10,000 frontends'
/// default tables would take 5 MB here, twice what the maps hold for the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Sorted, each once.
    ids: Box<[u32]>,
    len: u32,
}

impl Table {
    pub fn new(entries: &[u32]) -> Table {
        let mut ids = entries.to_vec();
        ids.sort_unstable();
        ids.dedup();
        Table { ids: ids.into_boxed_slice(), len: entries.len() as u32 }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        *self = Table::default();
    }

    /// The backend ids it names, each once, in order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

impl AppliedFrontend {
    /// A frontend with nothing written yet.
    fn new(svc_id: u32) -> Self {
        AppliedFrontend { svc_id, service: None, slots: Vec::new(), entry: None, source_ranges: BTreeSet::new(), table: Table::default(), table_slots: None }
    }

    /// The backends its table was built from, sorted (what `select::build_table` takes); `None`
    /// when unknown.
    pub fn table_backends(&self) -> Option<Vec<L4Addr>> {
        self.table_slots.map(|n| crate::select::sorted_backends(&self.slots[..(n as usize).min(self.slots.len())]))
    }

    /// The backends the datapath picks from: the first `count` slots.
    pub fn serving(&self) -> &[L4Addr] {
        let count = self.entry.map_or(0, |e| e.count as usize);
        &self.slots[..count.min(self.slots.len())]
    }
}

/// How new connections pick a backend (see `select` for the tables and their measured spread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Consistent hashing by each frontend's Maglev-permutation table, filled in lockstep: the
    /// same flow picks the same backend on every node and after a restart; every backend gets
    /// within 10% of the mean share; removing a backend moves its own flows and at most about 4%
    /// of the others.
    #[default]
    Maglev,
    /// Consistent hashing by rendezvous tables: removing a backend moves exactly its own flows,
    /// but the spread is binomial (the busiest at about 2x the mean from 100 backends on).
    Rendezvous,
    /// Uniformly at random, as kube-proxy does.
    Random,
}

/// The service-entry flags a desired frontend needs.
pub fn frontend_flags(want: &DesiredFrontend, algorithm: Algorithm) -> u16 {
    let mut f = 0;
    if algorithm == Algorithm::Random {
        f |= SVC_F_RANDOM;
    }
    if want.drop_empty {
        f |= SVC_F_DROP_EMPTY;
    }
    if want.external_ip {
        f |= SVC_F_EXTERNAL_IP;
    }
    if want.masquerade {
        f |= dataplane_common::SVC_F_MASQ;
    }
    if !want.source_ranges.is_empty() {
        f |= SVC_F_SOURCE_RANGES;
    }
    f
}

/// Counts of one sync, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Map entries written: updates, and hashing table entries (written as memory, no syscall).
    pub writes: usize,
    /// Of `writes`, the hashing table entries.
    pub table_entries: usize,
    pub deletes: usize,
    /// (frontend, backend) pairs marked as taken out of a UDP or SCTP frontend, or one with
    /// session affinity: their connections move at their next packet.
    pub backends_left: usize,
    /// Host UDP sockets destroyed because their backend left (see `sockets`).
    pub sockets_destroyed: usize,
}

/// Map keys and values from domain types: the one place where byte order is converted.
pub fn lb4_key(fe: &Frontend) -> Lb4Key {
    Lb4Key { addr_be: u32::from_ne_bytes(fe.addr.addr.octets()), port_be: fe.addr.port.to_be(), proto: fe.addr.proto.number(), scope: fe.scope.number() }
}

pub fn lb4_addr_key(addr: Ipv4Addr) -> Lb4Key {
    Lb4Key { addr_be: u32::from_ne_bytes(addr.octets()), port_be: 0, proto: 0, scope: 0 }
}

pub fn lb4_backend(be: &L4Addr, flags: u8) -> Lb4Backend {
    Lb4Backend { addr_be: u32::from_ne_bytes(be.addr.octets()), port_be: be.port.to_be(), proto: be.proto.number(), flags }
}

pub fn l4addr_from_backend(be: &Lb4Backend) -> Option<L4Addr> {
    Some(L4Addr { addr: Ipv4Addr::from(be.addr_be.to_ne_bytes()), port: u16::from_be(be.port_be), proto: Proto::from_number(be.proto)? })
}

pub fn frontend_from_key(k: &Lb4Key) -> Option<Frontend> {
    Some(Frontend {
        addr: L4Addr { addr: Ipv4Addr::from(k.addr_be.to_ne_bytes()), port: u16::from_be(k.port_be), proto: Proto::from_number(k.proto)? },
        scope: Scope::from_number(k.scope)?,
    })
}

/// Owns the applied view and the id allocation.
#[derive(Debug, Default)]
pub struct Reconciler {
    pub applied: Applied,
    next_svc_id: u32,
    next_backend_id: u32,
    pub algorithm: Algorithm,
    /// This node's own addresses: a local endpoint on one of them is a hostNetwork endpoint
    /// (`BE_F_HOST`).
    pub host_addrs: BTreeSet<Ipv4Addr>,
    /// Backend id -> references to it from applied frontends (slots, table backends): counted by
    /// every full sync, kept up to date by [`Reconciler::sync_changed`], which needs it to know
    /// whether a backend a changed frontend let go of is still used elsewhere. `None` until the
    /// first full sync.
    /// (Counts as `u32`s: each frontend refers to a backend at most twice, by a slot and by its
    /// table, and frontend ids are `u32`s themselves.)
    users: Option<std::collections::HashMap<u32, u32>>,
    /// Backends given an id in the current sync.
    allocated: Vec<(L4Addr, u32)>,
    /// (frontend, backend) pairs taken out by a write that failed part way: marked once a later
    /// write of the frontend (or its removal) completes, unless the backend is back by then.
    pending_gone: BTreeSet<(u32, u32)>,
}

impl Reconciler {
    /// Starts from what the maps already hold, re-adopting service and backend ids so that a
    /// restart rewrites nothing that did not change and conntrack entries stay meaningful.
    pub fn restore(applied: Applied) -> Self {
        // Past every marked frontend too: a removed frontend's id handed out again would let the
        // new one's backends unmark the old one's connections.
        let next_svc_id = applied.frontends.values().map(|f| f.svc_id).chain(applied.gone.iter().map(|(s, _)| *s)).max().unwrap_or(0) + 1;
        let next_backend_id = applied.backends.values().map(|(id, _)| *id).max().unwrap_or(0) + 1;
        Reconciler {
            applied,
            next_svc_id,
            next_backend_id,
            algorithm: Algorithm::default(),
            host_addrs: BTreeSet::new(),
            users: None,
            allocated: Vec::new(),
            pending_gone: BTreeSet::new(),
        }
    }

    pub fn new() -> Self {
        Self::restore(Applied::default())
    }

    /// Brings the maps to `desired`. Errors (a full map, a failed write) are returned per
    /// frontend; the frontends that could be written are, and the rest keep their old state.
    pub fn sync(&mut self, desired: &Desired, service_cidrs: &BTreeSet<Cidr4>, ops: &mut dyn MapOps) -> (SyncStats, Vec<String>) {
        let mut st = SyncStats::default();
        let mut errors = Vec::new();
        let mut gone_pairs = BTreeSet::new();
        let mut removed_pairs = BTreeSet::new();
        let first_new_backend = self.next_backend_id;
        self.allocated.clear();

        // Backends whose locality changed are rewritten in place (same id) before any slot or
        // service entry is touched.
        let moved: Vec<(L4Addr, u32, u8)> = self
            .applied
            .backends
            .iter()
            .filter_map(|(b, (id, flags))| {
                let want = backend_flags(b.addr, &desired.local_endpoints, &self.host_addrs);
                (want != *flags).then_some((*b, *id, want))
            })
            .collect();
        self.rewrite_flags(moved, ops, &mut st, &mut errors);

        for (fe, want) in &desired.frontends {
            if let Err(e) = self.sync_frontend(fe, want, &desired.local_endpoints, ops, &mut st, &mut gone_pairs) {
                errors.push(format!("Service {} frontend {fe}: {e}", want.service));
            }
        }

        let stale: Vec<Frontend> = self.applied.frontends.keys().filter(|fe| !desired.frontends.contains_key(fe)).copied().collect();
        self.remove_stale(&stale, ops, &mut st, &mut errors, &mut removed_pairs);

        let add: Vec<Ipv4Addr> = desired.cluster_ips.difference(&self.applied.cluster_ips).copied().collect();
        let del: Vec<Ipv4Addr> = self.applied.cluster_ips.difference(&desired.cluster_ips).copied().collect();
        self.write_cluster_ips(&add, &del, ops, &mut st, &mut errors);

        self.sync_service_cidrs(service_cidrs, ops, &mut st, &mut errors);

        // Backends nothing points at any more go last, after every slot and table that referenced
        // them (a table that could not be replaced still names the old backends). A table names
        // the backends it was built from; only one restored from the maps has to be read.
        let mut used = std::collections::HashMap::new();
        for f in self.applied.frontends.values() {
            for id in self.refs_of(f) {
                *used.entry(id).or_insert(0u32) += 1;
            }
        }
        let unused: Vec<(L4Addr, u32)> = self.applied.backends.iter().filter(|(_, (id, _))| !used.contains_key(id)).map(|(b, (id, _))| (*b, *id)).collect();
        self.users = Some(used);
        self.delete_backends(&unused, ops, &mut st, &mut errors);
        // Ids handed out in this sync to backends already gone again (those of a new frontend
        // that failed) were never in a slot the datapath used: a retry gets them again rather
        // than new ones each time.
        let highest = self.applied.backends.values().map(|(id, _)| *id).max().unwrap_or(0);
        self.next_backend_id = first_new_backend.max(highest.saturating_add(1));

        self.mark_gone(&gone_pairs, &removed_pairs, ops, &mut st, &mut errors);
        crate::model::compact(&mut self.applied.frontends);
        crate::model::compact(&mut self.applied.backends);
        (st, errors)
    }

    /// Rewrites backends in place (same id) with new flags.
    fn rewrite_flags(&mut self, moved: Vec<(L4Addr, u32, u8)>, ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>) {
        for (b, id, flags) in moved {
            match ops.put_backend(id, lb4_backend(&b, flags)) {
                Ok(()) => {
                    st.writes += 1;
                    self.applied.backends.insert(b, (id, flags));
                }
                Err(e) => errors.push(format!("backend {b}: {e}")),
            }
        }
    }

    /// Removes frontends no longer wanted.
    fn remove_stale(&mut self, stale: &[Frontend], ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>, removed_pairs: &mut BTreeSet<(u32, u32)>) {
        for fe in stale {
            let Some(mut af) = self.applied.frontends.remove(fe) else { continue };
            let pairs: Vec<(u32, u32)> = af.serving().iter().filter_map(|b| self.applied.backends.get(b)).map(|(id, _)| (af.svc_id, *id)).collect();
            match remove_frontend(fe, &mut af, ops, st) {
                Ok(()) => {
                    removed_pairs.extend(pairs);
                    removed_pairs.extend(take_range(&mut self.pending_gone, af.svc_id));
                    take_range(&mut self.applied.gone, af.svc_id);
                }
                Err(e) => {
                    // Marked when the removal completes (the service entry may be gone already,
                    // and with it what the frontend served).
                    self.pending_gone.extend(pairs);
                    errors.push(format!("removing frontend {fe}: {e}"));
                    // What is left of it, for the next sync to remove.
                    self.applied.frontends.insert(*fe, af);
                }
            }
        }
    }

    /// Adds and removes ClusterIP address entries.
    fn write_cluster_ips(&mut self, add: &[Ipv4Addr], del: &[Ipv4Addr], ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>) {
        for ip in add {
            match ops.put_service(lb4_addr_key(*ip), Lb4Service { svc_id: 0, count: 0, flags: SVC_F_ADDR_ONLY, ..Default::default() }) {
                Ok(()) => {
                    st.writes += 1;
                    self.applied.cluster_ips.insert(*ip);
                }
                Err(e) => errors.push(format!("ClusterIP {ip}: {e}")),
            }
        }
        for ip in del {
            match ops.del_service(lb4_addr_key(*ip)) {
                Ok(()) => {
                    st.deletes += 1;
                    self.applied.cluster_ips.remove(ip);
                }
                Err(e) => errors.push(format!("removing ClusterIP {ip}: {e}")),
            }
        }
    }

    fn delete_backends(&mut self, unused: &[(L4Addr, u32)], ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>) {
        let mut deleted = BTreeSet::new();
        for (be, id) in unused {
            match ops.del_backend(*id) {
                Ok(()) => {
                    st.deletes += 1;
                    self.applied.backends.remove(be);
                    deleted.insert(*id);
                }
                Err(e) => errors.push(format!("removing backend {be}: {e}")),
            }
        }
        if !self.applied.gone.is_empty() && !deleted.is_empty() {
            // Their marks stay in the map (restarts read them back) but need no unmarking from
            // this agent: a deleted backend's id is not handed out again while it runs.
            self.applied.gone.retain(|(_, b)| !deleted.contains(b));
        }
    }

    fn sync_service_cidrs(&mut self, service_cidrs: &BTreeSet<Cidr4>, ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>) {
        for c in service_cidrs.difference(&self.applied.service_cidrs.clone()) {
            match ops.put_service_cidr(*c) {
                Ok(()) => {
                    st.writes += 1;
                    self.applied.service_cidrs.insert(*c);
                }
                Err(e) => errors.push(format!("service CIDR {c}: {e}")),
            }
        }
        for c in self.applied.service_cidrs.clone().difference(service_cidrs) {
            match ops.del_service_cidr(*c) {
                Ok(()) => {
                    st.deletes += 1;
                    self.applied.service_cidrs.remove(c);
                }
                Err(e) => errors.push(format!("removing service CIDR {c}: {e}")),
            }
        }
    }

    fn backend_id(&mut self, be: &L4Addr, local: &BTreeSet<Ipv4Addr>, ops: &mut dyn MapOps, st: &mut SyncStats) -> Result<u32, MapOpError> {
        if let Some((id, _)) = self.applied.backends.get(be) {
            return Ok(*id);
        }
        let id = self.next_backend_id;
        if id == u32::MAX {
            return Err(MapOpError::OutOfIds { map: dataplane_common::names::BACKENDS });
        }
        let flags = backend_flags(be.addr, local, &self.host_addrs);
        ops.put_backend(id, lb4_backend(be, flags))?;
        st.writes += 1;
        self.next_backend_id += 1;
        self.applied.backends.insert(*be, (id, flags));
        self.allocated.push((*be, id));
        Ok(id)
    }

    /// The backend ids frontend `af` refers to: one reference per slot, and one per backend its
    /// table names (however many entries name it).
    fn refs_of(&self, af: &AppliedFrontend) -> Vec<u32> {
        let mut ids: Vec<u32> = af.slots.iter().filter_map(|b| self.applied.backends.get(b)).map(|(id, _)| *id).collect();
        ids.extend(af.table.ids());
        ids
    }

    /// Brings the maps to `desired` where `delta` says it may have changed: those frontends,
    /// ClusterIPs and local endpoints alone (and the service CIDRs), in the order [`Reconciler::sync`]
    /// writes them, which it equals for that change. Needs a full sync first (it falls back to
    /// one until then). Work proportional to the change: no walk over every frontend or backend.
    pub fn sync_changed(&mut self, desired: &Desired, delta: &crate::translator::Delta, service_cidrs: &BTreeSet<Cidr4>, ops: &mut dyn MapOps) -> (SyncStats, Vec<String>) {
        let Some(mut users) = self.users.take() else { return self.sync(desired, service_cidrs, ops) };
        let mut st = SyncStats::default();
        let mut errors = Vec::new();
        let mut gone_pairs = BTreeSet::new();
        let mut removed_pairs = BTreeSet::new();
        let first_new_backend = self.next_backend_id;
        self.allocated.clear();

        let mut moved: Vec<(L4Addr, u32, u8)> = Vec::new();
        for ip in &delta.local_endpoints {
            let lo = L4Addr { addr: *ip, port: 0, proto: Proto::Tcp };
            let hi = L4Addr { addr: *ip, port: u16::MAX, proto: Proto::Sctp };
            for (b, (id, flags)) in self.applied.backends.range(lo..=hi) {
                let want = backend_flags(b.addr, &desired.local_endpoints, &self.host_addrs);
                if want != *flags {
                    moved.push((*b, *id, want));
                }
            }
        }
        self.rewrite_flags(moved, ops, &mut st, &mut errors);

        // Backends a changed frontend referred to: deleted at the end if nothing else does.
        let mut candidates: BTreeSet<L4Addr> = BTreeSet::new();
        let mut walk_all = false;
        let mut count = |rec: &Self, fe: &Frontend, users: &mut std::collections::HashMap<u32, u32>, add: bool, candidates: &mut BTreeSet<L4Addr>| {
            let Some(af) = rec.applied.frontends.get(fe) else { return };
            for id in rec.refs_of(af) {
                let n = users.entry(id).or_insert(0);
                if add {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                }
            }
            if !add {
                // A table built from known slots names those slots' backends.
                candidates.extend(af.slots.iter().copied());
                if af.table_slots.is_none() && !af.table.is_empty() {
                    // A table restored from the maps (or from slots rewritten since) names ids
                    // only.
                    walk_all = true;
                }
            }
        };
        for (fe, want) in delta.frontends.iter().filter_map(|fe| desired.frontends.get(fe).map(|w| (fe, w))) {
            count(self, fe, &mut users, false, &mut candidates);
            if let Err(e) = self.sync_frontend(fe, want, &desired.local_endpoints, ops, &mut st, &mut gone_pairs) {
                errors.push(format!("Service {} frontend {fe}: {e}", want.service));
            }
            count(self, fe, &mut users, true, &mut candidates);
        }
        let stale: Vec<Frontend> = delta.frontends.iter().filter(|fe| !desired.frontends.contains_key(fe) && self.applied.frontends.contains_key(fe)).copied().collect();
        for fe in &stale {
            count(self, fe, &mut users, false, &mut candidates);
        }
        self.remove_stale(&stale, ops, &mut st, &mut errors, &mut removed_pairs);
        for fe in &stale {
            count(self, fe, &mut users, true, &mut candidates);
        }

        let add: Vec<Ipv4Addr> = delta.cluster_ips.iter().filter(|ip| desired.cluster_ips.contains(ip) && !self.applied.cluster_ips.contains(ip)).copied().collect();
        let del: Vec<Ipv4Addr> = delta.cluster_ips.iter().filter(|ip| !desired.cluster_ips.contains(ip) && self.applied.cluster_ips.contains(ip)).copied().collect();
        self.write_cluster_ips(&add, &del, ops, &mut st, &mut errors);
        self.sync_service_cidrs(service_cidrs, ops, &mut st, &mut errors);

        if walk_all {
            // Rare (a table read back from the maps, not yet rewritten): counted anew.
            users.clear();
            for f in self.applied.frontends.values() {
                for id in self.refs_of(f) {
                    *users.entry(id).or_insert(0) += 1;
                }
            }
            candidates.extend(self.applied.backends.keys().copied());
        }
        candidates.extend(self.allocated.iter().map(|(b, _)| *b));
        let unused: Vec<(L4Addr, u32)> = candidates
            .iter()
            .filter_map(|b| self.applied.backends.get(b).map(|(id, _)| (*b, *id)))
            .filter(|(_, id)| users.get(id).copied().unwrap_or(0) == 0)
            .collect();
        self.delete_backends(&unused, ops, &mut st, &mut errors);
        for (_, id) in &unused {
            users.remove(id);
        }
        // As in `sync`: ids given in this sync to backends gone again are given again next time.
        // Older backends all have lower ids, so the highest left is among the new ones.
        let highest_new = self.allocated.iter().filter(|(b, id)| self.applied.backends.get(b).map(|(i, _)| i) == Some(id)).map(|(_, id)| *id).max();
        self.next_backend_id = highest_new.map_or(first_new_backend, |h| first_new_backend.max(h.saturating_add(1)));
        self.users = Some(users);

        self.mark_gone(&gone_pairs, &removed_pairs, ops, &mut st, &mut errors);
        (st, errors)
    }

    /// Brings frontend `fe` to `desired`. A frontend already applied records every write as it
    /// succeeds, so a failure leaves its applied view saying what the maps hold. A new one that
    /// fails is taken out again and its id is not used up; only if that also fails does what is
    /// left of it stay in the view, for the next sync to complete or remove.
    fn sync_frontend(
        &mut self,
        fe: &Frontend,
        desired: &DesiredFrontend,
        local: &BTreeSet<Ipv4Addr>,
        ops: &mut dyn MapOps,
        st: &mut SyncStats,
        gone_pairs: &mut BTreeSet<(u32, u32)>,
    ) -> Result<(), MapOpError> {
        if let Some(mut af) = self.applied.frontends.remove(fe) {
            let lost: Vec<(u32, u32)> =
                af.serving().iter().filter(|b| !desired.backends.contains(b)).filter_map(|b| self.applied.backends.get(b)).map(|(id, _)| (af.svc_id, *id)).collect();
            let res = self.write_frontend(fe, desired, &mut af, local, ops, st);
            if res.is_ok() {
                gone_pairs.extend(lost);
                // Pairs an earlier failed write took out: marked now, unless the backend is back.
                if !self.pending_gone.is_empty() {
                    let serving: BTreeSet<u32> = af.serving().iter().filter_map(|b| self.applied.backends.get(b)).map(|(id, _)| *id).collect();
                    gone_pairs.extend(take_range(&mut self.pending_gone, af.svc_id).into_iter().filter(|(_, b)| !serving.contains(b)));
                }
            } else {
                self.pending_gone.extend(lost);
            }
            self.applied.frontends.insert(*fe, af);
            return res;
        }
        let id = self.next_svc_id;
        if id == u32::MAX {
            return Err(MapOpError::OutOfIds { map: dataplane_common::names::SERVICES });
        }
        let mut af = AppliedFrontend::new(id);
        let res = self.write_frontend(fe, desired, &mut af, local, ops, st);
        // Kept when written, or when taking it out failed too (the next sync completes or removes
        // what is left); otherwise nothing of it is left and its id is free again.
        if res.is_ok() || remove_frontend(fe, &mut af, ops, st).is_err() {
            self.next_svc_id += 1;
            self.applied.frontends.insert(*fe, af);
        }
        res
    }

    /// Writes what `af` lacks of `desired`, in the datapath-safe order, recording each write in
    /// `af` once it succeeded.
    fn write_frontend(
        &mut self,
        fe: &Frontend,
        desired: &DesiredFrontend,
        af: &mut AppliedFrontend,
        local: &BTreeSet<Ipv4Addr>,
        ops: &mut dyn MapOps,
        st: &mut SyncStats,
    ) -> Result<(), MapOpError> {
        let svc_id = af.svc_id;
        // The name first: the datapath makes a frontend's counters at its first packet only while
        // the frontend has a name.
        if af.service.as_ref() != Some(&desired.service) {
            ops.put_frontend_name(svc_id, &desired.service.to_string())?;
            st.writes += 1;
            af.service = Some(desired.service.clone());
        }
        let new = next_slots(&af.slots, &desired.backends);
        if new.len() > u16::MAX as usize {
            return Err(MapOpError::Full { map: dataplane_common::names::SLOTS, capacity: u16::MAX as u32, what: format!("{} backends", new.len()) });
        }
        // Marks of this frontend's backends (one back, or read back by a restart) go before its
        // slots name them: a marked backend's connections would move at every packet.
        let marked = self.applied.gone.range((svc_id, 0)..=(svc_id, u32::MAX)).next().is_some();
        for (i, be) in new.iter().enumerate() {
            let same = af.slots.get(i) == Some(be);
            if same && !marked {
                continue;
            }
            let id = match (same, self.applied.backends.get(be)) {
                (true, Some((id, _))) => *id,
                (true, None) => continue,
                (false, _) => self.backend_id(be, local, ops, st)?,
            };
            if marked && self.applied.gone.contains(&(svc_id, id)) {
                ops.unmark_gone(svc_id, id)?;
                self.applied.gone.remove(&(svc_id, id));
                st.deletes += 1;
            }
            if same {
                continue;
            }
            if af.table_slots.is_some_and(|n| i < n as usize) {
                // The table no longer says what these slots hold (until it is built again).
                af.table_slots = None;
            }
            ops.put_slot(Lb4SlotKey { svc_id, slot: i as u32 }, id)?;
            st.writes += 1;
            // `new` is dense and written in order: slot i exists already or is the next one.
            match af.slots.get_mut(i) {
                Some(slot) => *slot = *be,
                None => af.slots.push(*be),
            }
        }
        // The hashing table after the backends it names, before the count that makes them used.
        if self.algorithm == Algorithm::Random || new.is_empty() {
            if !af.table.is_empty() {
                ops.del_table(svc_id)?;
                st.deletes += 1;
                af.table.clear();
                af.table_slots = None;
            }
        } else if af.table_slots != Some(new.len() as u16) || af.table.is_empty() {
            // Each backend's id looked up once, not once per entry (251 lookups in a map of every
            // backend for a table of 3: 14% of a full sync's time).
            let order = crate::select::sorted_backends(&new);
            let ids: Vec<u32> = order.iter().map(|b| self.applied.backends.get(b).map(|(id, _)| *id).unwrap_or(0)).collect();
            let table: Vec<u32> = crate::select::build_table(self.algorithm, &order).into_iter().map(|i| ids[i]).collect();
            // The same table (the same backends' after a restart) writes nothing.
            let n = ops.put_table(svc_id, &table)?;
            st.writes += n;
            st.table_entries += n;
            af.table = Table::new(&table);
            af.table_slots = Some(new.len() as u16);
        }
        // Source ranges before the service entry that turns their check on.
        for c in desired.source_ranges.difference(&af.source_ranges.clone()) {
            ops.put_source_range(svc_id, *c)?;
            st.writes += 1;
            af.source_ranges.insert(*c);
        }
        let flags = frontend_flags(desired, self.algorithm);
        let entry = Lb4Service { svc_id, count: new.len() as u16, flags, affinity_timeout_s: desired.affinity_timeout_s, table_off: 0, table_len: af.table.len() as u32 };
        if af.entry != Some(entry) {
            ops.put_service(lb4_key(fe), entry)?;
            st.writes += 1;
            af.entry = Some(entry);
        }
        for c in af.source_ranges.difference(&desired.source_ranges.clone()).copied().collect::<Vec<_>>() {
            ops.del_source_range(svc_id, c)?;
            st.deletes += 1;
            af.source_ranges.remove(&c);
        }
        // Slots past the count, from the last, so the slots stay dense.
        while af.slots.len() > new.len() {
            ops.del_slot(Lb4SlotKey { svc_id, slot: af.slots.len() as u32 - 1 })?;
            st.deletes += 1;
            af.slots.pop();
        }
        Ok(())
    }
}

/// Takes the pairs of frontend `svc_id` out of `set`.
fn take_range(set: &mut BTreeSet<(u32, u32)>, svc_id: u32) -> Vec<(u32, u32)> {
    let keys: Vec<(u32, u32)> = set.range((svc_id, 0)..=(svc_id, u32::MAX)).copied().collect();
    for k in &keys {
        set.remove(k);
    }
    keys
}

impl Reconciler {
    /// Marks the pairs of this sync as taken out: `gone` of frontends that stay (kept, to be
    /// unmarked if the backend comes back), `removed` of frontends that went.
    fn mark_gone(&mut self, gone: &BTreeSet<(u32, u32)>, removed: &BTreeSet<(u32, u32)>, ops: &mut dyn MapOps, st: &mut SyncStats, errors: &mut Vec<String>) {
        for &(svc_id, backend_id) in gone.iter().chain(removed) {
            // A pair of a frontend that stays and got its backend back in the same sync is not
            // gone (a backend moved between slots is not in `gone`).
            match ops.mark_gone(svc_id, backend_id) {
                Ok(()) => {
                    st.writes += 1;
                    st.backends_left += 1;
                    // Kept only while the backend is (a deleted one's id is not handed out again).
                    let used = self.users.as_ref().is_none_or(|u| u.get(&backend_id).is_some_and(|n| *n > 0));
                    if gone.contains(&(svc_id, backend_id)) && used {
                        self.applied.gone.insert((svc_id, backend_id));
                    }
                }
                Err(e) => errors.push(format!("marking backend {backend_id} as gone from frontend {svc_id}: {e}")),
            }
        }
    }
}

/// A backend's flags: on this node (`BE_F_LOCAL`), and this node itself (`BE_F_HOST`).
pub fn backend_flags(addr: Ipv4Addr, local: &BTreeSet<Ipv4Addr>, host: &BTreeSet<Ipv4Addr>) -> u8 {
    let mut f = 0;
    if local.contains(&addr) {
        f |= BE_F_LOCAL;
        if host.contains(&addr) {
            f |= BE_F_HOST;
        }
    }
    f
}

/// Removes everything of frontend `fe` from the maps, the service entry first so the datapath
/// stops using it before its slots go. Each removal is recorded in `af` as it succeeds, so on
/// error `af` says what is left.
fn remove_frontend(fe: &Frontend, af: &mut AppliedFrontend, ops: &mut dyn MapOps, st: &mut SyncStats) -> Result<(), MapOpError> {
    if af.entry.is_some() {
        ops.del_service(lb4_key(fe))?;
        st.deletes += 1;
        af.entry = None;
    }
    if !af.slots.is_empty() {
        // The table outlives the slots it was built from (it goes below): from here on only its
        // ids say what it names.
        af.table_slots = None;
    }
    while let Some(slot) = af.slots.len().checked_sub(1) {
        ops.del_slot(Lb4SlotKey { svc_id: af.svc_id, slot: slot as u32 })?;
        st.deletes += 1;
        af.slots.pop();
    }
    for c in af.source_ranges.clone() {
        ops.del_source_range(af.svc_id, c)?;
        st.deletes += 1;
        af.source_ranges.remove(&c);
    }
    if !af.table.is_empty() {
        ops.del_table(af.svc_id)?;
        st.deletes += 1;
        af.table.clear();
        af.table_slots = None;
    }
    if af.service.is_some() {
        ops.del_frontend_meta(af.svc_id)?;
        st.deletes += 1;
        af.service = None;
    }
    Ok(())
}

/// The new slot order: backends keep their slots; a removed backend's slot is taken by the last
/// one (swap-remove), new backends are appended. Minimises rewritten slots. A backend in two slots
/// keeps only the first: a crash between moving the last backend into a removed one's slot and
/// lowering the count leaves it twice (`[1, 4, 3, 4]`), and it would pick up double weight.
pub fn next_slots(old: &[L4Addr], want: &crate::model::Backends) -> Vec<L4Addr> {
    let mut slots = old.to_vec();
    let mut kept = BTreeSet::new();
    let mut i = 0;
    while i < slots.len() {
        if want.contains(&slots[i]) && kept.insert(slots[i]) {
            i += 1;
        } else {
            slots.swap_remove(i);
        }
    }
    slots.extend(want.iter().filter(|b| !kept.contains(b)).copied());
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePortName;
    use dataplane_common::names;

    /// The maps' contents in the recorder.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Maps {
        backends: BTreeMap<u32, Lb4Backend>,
        slots: BTreeMap<Lb4SlotKey, u32>,
        services: BTreeMap<Lb4Key, Lb4Service>,
        names: BTreeMap<u32, String>,
        tables: BTreeMap<u32, Vec<u32>>,
        ranges: BTreeSet<(u32, Cidr4)>,
        cidrs: BTreeSet<Cidr4>,
    }

    /// Records every operation; an in-memory stand-in for the maps, for the pure diff logic only
    /// (bpf-tests run the same reconciler against the real maps).
    #[derive(Default)]
    struct Recorder {
        ops: Vec<String>,
        maps: Maps,
        fail_service_puts: bool,
        /// Puts that still succeed; after them every put fails as into a full map.
        puts_left: Option<usize>,
        /// Every delete fails.
        fail_deletes: bool,
    }

    impl Recorder {
        fn del(&self, map: &'static str) -> Result<(), MapOpError> {
            if self.fail_deletes {
                return Err(MapOpError::Other { map, what: "test".into(), message: "delete refused".into() });
            }
            Ok(())
        }

        fn put(&mut self, map: &'static str) -> Result<(), MapOpError> {
            match &mut self.puts_left {
                Some(0) => Err(MapOpError::Full { map, capacity: 1, what: "test".into() }),
                Some(n) => {
                    *n -= 1;
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }

    impl MapOps for Recorder {
        fn put_backend(&mut self, id: u32, be: Lb4Backend) -> Result<(), MapOpError> {
            self.put(names::BACKENDS)?;
            self.ops.push(format!("put_backend {id}"));
            self.maps.backends.insert(id, be);
            Ok(())
        }
        fn del_backend(&mut self, id: u32) -> Result<(), MapOpError> {
            self.del(names::BACKENDS)?;
            self.ops.push(format!("del_backend {id}"));
            self.maps.backends.remove(&id);
            Ok(())
        }
        fn put_slot(&mut self, key: Lb4SlotKey, backend_id: u32) -> Result<(), MapOpError> {
            self.put(names::SLOTS)?;
            self.ops.push(format!("put_slot {}/{} -> {backend_id}", key.svc_id, key.slot));
            self.maps.slots.insert(key, backend_id);
            Ok(())
        }
        fn del_slot(&mut self, key: Lb4SlotKey) -> Result<(), MapOpError> {
            self.del(names::SLOTS)?;
            self.ops.push(format!("del_slot {}/{}", key.svc_id, key.slot));
            self.maps.slots.remove(&key);
            Ok(())
        }
        fn put_service(&mut self, key: Lb4Key, svc: Lb4Service) -> Result<(), MapOpError> {
            if self.fail_service_puts && svc.flags & SVC_F_ADDR_ONLY == 0 {
                return Err(MapOpError::Full { map: names::SERVICES, capacity: 1, what: "test".into() });
            }
            self.put(names::SERVICES)?;
            self.ops.push(format!("put_service {} count={}", svc.svc_id, svc.count));
            self.maps.services.insert(key, svc);
            Ok(())
        }
        fn del_service(&mut self, key: Lb4Key) -> Result<(), MapOpError> {
            self.del(names::SERVICES)?;
            self.ops.push("del_service".into());
            self.maps.services.remove(&key);
            Ok(())
        }
        fn put_service_cidr(&mut self, c: Cidr4) -> Result<(), MapOpError> {
            self.put(names::SERVICE_CIDRS)?;
            self.ops.push(format!("put_cidr {c}"));
            self.maps.cidrs.insert(c);
            Ok(())
        }
        fn del_service_cidr(&mut self, c: Cidr4) -> Result<(), MapOpError> {
            self.del(names::SERVICE_CIDRS)?;
            self.ops.push(format!("del_cidr {c}"));
            self.maps.cidrs.remove(&c);
            Ok(())
        }
        fn put_frontend_name(&mut self, id: u32, name: &str) -> Result<(), MapOpError> {
            self.put(names::SVC_NAMES)?;
            self.ops.push(format!("put_name {id} {name}"));
            self.maps.names.insert(id, name.to_string());
            Ok(())
        }
        fn del_frontend_meta(&mut self, id: u32) -> Result<(), MapOpError> {
            self.del(names::SVC_NAMES)?;
            self.ops.push(format!("del_meta {id}"));
            self.maps.names.remove(&id);
            Ok(())
        }
        fn put_table(&mut self, id: u32, table: &[u32]) -> Result<usize, MapOpError> {
            self.put(names::CHASH)?;
            let old = self.maps.tables.get(&id).map(Vec::as_slice).unwrap_or_default();
            let n = if old.len() != table.len() { table.len() } else { table.iter().zip(old).filter(|(a, b)| a != b).count() };
            self.ops.push(format!("put_table {id} ({n} entries)"));
            self.maps.tables.insert(id, table.to_vec());
            Ok(n)
        }
        fn del_table(&mut self, id: u32) -> Result<(), MapOpError> {
            self.del(names::CHASH)?;
            self.ops.push(format!("del_table {id}"));
            self.maps.tables.remove(&id);
            Ok(())
        }
        fn put_source_range(&mut self, id: u32, c: Cidr4) -> Result<(), MapOpError> {
            self.put(names::SOURCE_RANGES)?;
            self.ops.push(format!("put_range {id} {c}"));
            self.maps.ranges.insert((id, c));
            Ok(())
        }
        fn del_source_range(&mut self, id: u32, c: Cidr4) -> Result<(), MapOpError> {
            self.del(names::SOURCE_RANGES)?;
            self.ops.push(format!("del_range {id} {c}"));
            self.maps.ranges.remove(&(id, c));
            Ok(())
        }
        fn mark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError> {
            self.put(names::GONE)?;
            self.ops.push(format!("gone {svc_id}/{backend_id}"));
            Ok(())
        }
        fn unmark_gone(&mut self, svc_id: u32, backend_id: u32) -> Result<(), MapOpError> {
            self.del(names::GONE)?;
            self.ops.push(format!("back {svc_id}/{backend_id}"));
            Ok(())
        }
    }

    fn be(last: u8) -> L4Addr {
        L4Addr { addr: Ipv4Addr::new(10, 0, 0, last), port: 8080, proto: Proto::Tcp }
    }

    /// The exact-operation tests pick backends at random (no tables); `hashing_tables_*` covers
    /// the tables.
    fn rec() -> Reconciler {
        Reconciler { algorithm: Algorithm::Random, ..Reconciler::new() }
    }

    fn desired(backends: &[u8]) -> Desired {
        let fe = L4Addr { addr: Ipv4Addr::new(172, 30, 0, 1), port: 80, proto: Proto::Tcp };
        let mut d = Desired::default();
        d.frontends.insert(
            Frontend::internal(fe),
            DesiredFrontend::new(
                ServicePortName { namespace: "default".into(), name: "web".into(), port: "".into() },
                backends.iter().map(|b| be(*b)).collect::<crate::model::Backends>(),
            ),
        );
        d.cluster_ips.insert(fe.addr);
        d
    }

    /// The backends the datapath picks from for the first frontend (slots `0..count`), asserting
    /// that each is in one slot only (two would double its weight).
    fn datapath_view(r: &Recorder) -> BTreeSet<L4Addr> {
        let svc = r.maps.services.values().find(|s| s.flags & SVC_F_ADDR_ONLY == 0).unwrap();
        let slots: Vec<L4Addr> = (0..svc.count as u32)
            .map(|s| l4addr_from_backend(&r.maps.backends[&r.maps.slots[&Lb4SlotKey { svc_id: svc.svc_id, slot: s }]]).unwrap())
            .collect();
        let set: BTreeSet<L4Addr> = slots.iter().copied().collect();
        assert_eq!(set.len(), slots.len(), "a backend in two slots: {slots:?}");
        set
    }

    /// Everything the maps hold of each frontend id: (slots' backend ids, service entry, table,
    /// source ranges, name). Asserts the slots are dense.
    type PerFrontend = BTreeMap<u32, (Vec<u32>, Option<Lb4Service>, Table, BTreeSet<Cidr4>, Option<String>)>;

    fn in_maps(m: &Maps) -> PerFrontend {
        let mut out = PerFrontend::new();
        for svc in m.services.values().filter(|s| s.flags & SVC_F_ADDR_ONLY == 0) {
            out.entry(svc.svc_id).or_default().1 = Some(*svc);
        }
        for (k, id) in &m.slots {
            let f = out.entry(k.svc_id).or_default();
            assert_eq!(f.0.len(), k.slot as usize, "slots of frontend {} are not dense", k.svc_id);
            f.0.push(*id);
        }
        for (id, t) in &m.tables {
            out.entry(*id).or_default().2 = Table::new(t);
        }
        for (id, c) in &m.ranges {
            out.entry(*id).or_default().3.insert(*c);
        }
        for (id, n) in &m.names {
            out.entry(*id).or_default().4 = Some(n.clone());
        }
        out
    }

    /// The same, as the reconciler believes it; and its backends as the maps hold them.
    fn in_view(rec: &Reconciler) -> (PerFrontend, BTreeMap<u32, Lb4Backend>) {
        let fronts = rec.applied.frontends.values().map(|f| {
            let slots = f.slots.iter().map(|b| rec.applied.backends[b].0).collect();
            (f.svc_id, (slots, f.entry, f.table.clone(), f.source_ranges.clone(), f.service.as_ref().map(|s| s.to_string())))
        });
        let backends = rec.applied.backends.iter().map(|(b, (id, flags))| (*id, lb4_backend(b, *flags)));
        (fronts.collect(), backends.collect())
    }

    /// Asserts the reconciler's view is exactly what the maps hold, and that the datapath finds
    /// every backend a used slot or a table names.
    fn assert_true_view(r: &Recorder, rec: &Reconciler, what: &str) {
        assert_eq!((in_maps(&r.maps), r.maps.backends.clone()), in_view(rec), "{what}");
        for svc in r.maps.services.values().filter(|s| s.flags & SVC_F_ADDR_ONLY == 0) {
            for slot in 0..svc.count as u32 {
                let id = r.maps.slots.get(&Lb4SlotKey { svc_id: svc.svc_id, slot }).unwrap_or_else(|| panic!("{what}: slot {slot} missing"));
                assert!(r.maps.backends.contains_key(id), "{what}: slot {slot} names backend {id}, which is gone");
            }
            let table = r.maps.tables.get(&svc.svc_id).map(Vec::as_slice).unwrap_or_default();
            assert_eq!(svc.table_len as usize, table.len(), "{what}: table size in the entry");
            assert!(table.iter().all(|id| r.maps.backends.contains_key(id)), "{what}: the table names a backend that is gone");
        }
        // The tables' entries are the maps' alone: each is the one its backends build.
        for (af, of) in rec.applied.frontends.values().filter_map(|af| Some((af, af.table_backends()?))) {
            let want: Vec<u32> = crate::select::build_table(rec.algorithm, &of).into_iter().map(|i| rec.applied.backends[&of[i]].0).collect();
            assert_eq!(r.maps.tables.get(&af.svc_id), Some(&want), "{what}: frontend {}'s table", af.svc_id);
        }
    }

    /// `desired(first)` plus a second frontend of the Service, port 443, with a source range.
    fn desired_with_https(first: &[u8], https: &[u8]) -> Desired {
        let mut d = desired(first);
        let fe = L4Addr { addr: Ipv4Addr::new(172, 30, 0, 1), port: 443, proto: Proto::Tcp };
        let mut f = DesiredFrontend::new(
            ServicePortName { namespace: "default".into(), name: "web".into(), port: "https".into() },
            https.iter().map(|b| be(*b)).collect::<crate::model::Backends>(),
        );
        f.source_ranges.insert("192.0.2.0/24".parse().unwrap());
        d.frontends.insert(Frontend::internal(fe), f);
        d
    }

    #[test]
    fn a_remembered_table_is_its_size_and_its_ids() {
        // The largest table, every entry a different id; one naming few ids many times; none.
        let widest: Vec<u32> = (0..65_521u32).rev().map(|i| i * 7 + 1).collect();
        let some: Vec<u32> = (0..251u32).map(|i| [9, 4, 9, 1_000_000][i as usize % 4]).collect();
        let mut sorted = widest.clone();
        sorted.sort();
        for (entries, ids) in [(widest, sorted), (some, vec![4, 9, 1_000_000]), (Vec::new(), Vec::new())] {
            let t = Table::new(&entries);
            assert_eq!((t.ids(), t.len(), t.is_empty()), (&ids[..], entries.len(), entries.is_empty()));
        }
    }

    #[test]
    fn a_table_whose_write_failed_after_its_slots_changed_is_built_again() {
        // Backend 3 replaced by 4: the new backend and its slot are written, the table's write
        // fails. The same backends again must build the table anew (its slots changed under it),
        // not take the old one for theirs.
        let mut r = Recorder::default();
        let mut rec = Reconciler { algorithm: Algorithm::Maglev, ..Reconciler::new() };
        let (_, errs) = rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty(), "{errs:?}");
        r.ops.clear();
        r.puts_left = Some(2);
        let (_, errs) = rec.sync(&desired(&[1, 2, 4]), &BTreeSet::new(), &mut r);
        assert!(!errs.is_empty() && r.ops.len() == 2 && r.ops[1].starts_with("put_slot"), "{errs:?} {:?}", r.ops);
        r.puts_left = None;
        r.ops.clear();
        let (_, errs) = rec.sync(&desired(&[1, 2, 4]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(r.ops.iter().any(|o| o.starts_with("put_table")), "{:?}", r.ops);
        assert_true_view(&r, &rec, "the table after a failed write");
    }

    #[test]
    fn an_unchanged_table_writes_no_entry() {
        // The same backends in another order, and the Service again after the reconciler forgot
        // what it wrote (a restart): the table is compared with the maps' and nothing is written.
        let mut r = Recorder::default();
        let mut rec = Reconciler { algorithm: Algorithm::Maglev, ..Reconciler::new() };
        rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        let before = r.maps.tables.clone();
        assert_eq!(before.values().map(Vec::len).collect::<Vec<_>>(), [crate::select::table_size(3)]);
        for af in rec.applied.frontends.values_mut() {
            af.table_slots = None;
        }
        let (st, errs) = rec.sync(&desired(&[3, 1, 2]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!((st.table_entries, &r.maps.tables), (0, &before));
        assert_true_view(&r, &rec, "the same table again");
        // One backend more: every entry that names another backend now is counted, no more.
        let (st, _) = rec.sync(&desired(&[1, 2, 3, 4]), &BTreeSet::new(), &mut r);
        let (old, new) = (&before.values().next().unwrap(), r.maps.tables.values().next().unwrap());
        assert_eq!(st.table_entries, old.iter().zip(new).filter(|(a, b)| a != b).count());
        assert!(st.table_entries > 0 && st.table_entries < new.len(), "{}", st.table_entries);
        assert_true_view(&r, &rec, "a backend added");
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_service() {
        let mut r = Recorder::default();
        let mut rec = rec();
        let (st, errs) = rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty());
        assert_eq!(r.ops, vec![
            "put_name 1 default/web",
            "put_backend 1",
            "put_slot 1/0 -> 1",
            "put_backend 2",
            "put_slot 1/1 -> 2",
            "put_service 1 count=2",
            "put_service 0 count=0",
        ]);
        assert_eq!(st.writes, 7);
        assert_eq!(datapath_view(&r), [be(1), be(2)].into());
    }

    #[test]
    fn unchanged_sync_writes_nothing() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        r.ops.clear();
        let (st, errs) = rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty());
        assert_eq!(r.ops, Vec::<String>::new());
        assert_eq!(st, SyncStats::default());
    }

    #[test]
    fn removing_one_endpoint_touches_only_its_entries() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1, 2, 3, 4]), &BTreeSet::new(), &mut r);
        r.ops.clear();
        rec.sync(&desired(&[1, 3, 4]), &BTreeSet::new(), &mut r);
        // Slot 1 (backend 2) takes the last backend (4); the count shrinks; slot 3 goes; backend 2
        // goes after nothing points at it; its UDP conntrack is flushed.
        assert_eq!(r.ops, vec!["put_slot 1/1 -> 4", "put_service 1 count=3", "del_slot 1/3", "del_backend 2", "gone 1/2"]);
        assert_eq!(datapath_view(&r), [be(1), be(3), be(4)].into());
    }

    #[test]
    fn adding_one_endpoint_appends_a_slot() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        r.ops.clear();
        rec.sync(&desired(&[1, 2, 5]), &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_backend 3", "put_slot 1/2 -> 3", "put_service 1 count=3"]);
    }

    #[test]
    fn removed_service_is_deleted_and_flushed() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1]), &BTreeSet::new(), &mut r);
        r.ops.clear();
        rec.sync(&Desired::default(), &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["del_service", "del_slot 1/0", "del_meta 1", "del_service", "del_backend 1", "gone 1/1"]);
        assert!(r.maps.services.is_empty() && r.maps.slots.is_empty() && r.maps.backends.is_empty());
    }

    #[test]
    fn failed_write_keeps_old_state_and_is_reported() {
        let mut r = Recorder { fail_service_puts: true, ..Default::default() };
        let mut rec = rec();
        let (_, errs) = rec.sync(&desired(&[1]), &BTreeSet::new(), &mut r);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("default/web"), "{errs:?}");
        assert!(rec.applied.frontends.is_empty());
        // The next sync retries (the frontend is still not applied).
        r.fail_service_puts = false;
        let (_, errs) = rec.sync(&desired(&[1]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty());
        assert_eq!(datapath_view(&r), [be(1)].into());
    }

    #[test]
    fn restore_readopts_ids() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        let restored = rec.applied.clone();
        let mut rec2 = Reconciler { algorithm: Algorithm::Random, ..Reconciler::restore(restored.clone()) };
        r.ops.clear();
        rec2.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, Vec::<String>::new());
        rec2.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_backend 3", "put_slot 1/2 -> 3", "put_service 1 count=3"]);
        // Maps pinned by a build that kept no names: only the names are written.
        let mut unnamed = restored;
        for f in unnamed.frontends.values_mut() {
            f.service = None;
        }
        let mut rec3 = Reconciler { algorithm: Algorithm::Random, ..Reconciler::restore(unnamed) };
        r.ops.clear();
        rec3.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_name 1 default/web"]);
    }

    #[test]
    fn policy_changes_rewrite_only_the_service_entry() {
        let mut r = Recorder::default();
        let mut rec = rec();
        let mut d = desired(&[1, 2]);
        rec.sync(&d, &BTreeSet::new(), &mut r);
        r.ops.clear();
        let f = d.frontends.values_mut().next().unwrap();
        f.affinity_timeout_s = 30;
        f.source_ranges.insert("192.0.2.0/24".parse().unwrap());
        rec.sync(&d, &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_range 1 192.0.2.0/24", "put_service 1 count=2"]);
        let svc = r.maps.services.values().find(|s| s.svc_id == 1).unwrap();
        assert_eq!((svc.affinity_timeout_s, svc.flags), (30, SVC_F_SOURCE_RANGES | SVC_F_RANDOM));
        r.ops.clear();
        d.frontends.values_mut().next().unwrap().source_ranges.clear();
        rec.sync(&d, &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_service 1 count=2", "del_range 1 192.0.2.0/24"]);
    }

    #[test]
    fn a_backend_moving_to_this_node_is_rewritten_in_place() {
        let mut r = Recorder::default();
        let mut rec = rec();
        let mut d = desired(&[1]);
        rec.sync(&d, &BTreeSet::new(), &mut r);
        r.ops.clear();
        d.local_endpoints.insert(Ipv4Addr::new(10, 0, 0, 1));
        rec.sync(&d, &BTreeSet::new(), &mut r);
        assert_eq!(r.ops, vec!["put_backend 1"]);
        assert_eq!(r.maps.backends[&1].flags, BE_F_LOCAL);
    }

    #[test]
    fn hashing_tables_are_written_with_the_slots_and_replaced_on_change() {
        use crate::select::table_size;
        let mut r = Recorder::default();
        let mut rec = Reconciler::new();
        rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        let m3 = table_size(3);
        assert!(r.ops.contains(&format!("put_table 1 ({m3} entries)")), "{:?}", r.ops);
        let svc = r.maps.services.values().find(|s| s.svc_id == 1).unwrap();
        assert_eq!((svc.flags & SVC_F_RANDOM, svc.table_len as usize), (0, m3));
        r.ops.clear();
        rec.sync(&desired(&[1, 2, 3]), &BTreeSet::new(), &mut r);
        assert!(r.ops.is_empty(), "{:?}", r.ops);
        // One backend leaves: its entries (about a third) and a few others change.
        rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
        let line = r.ops.iter().find(|o| o.starts_with("put_table")).unwrap();
        let n: usize = line.split(['(', ' ']).nth(3).unwrap().parse().unwrap();
        assert!(n > m3 / 4 && n < m3 / 2, "{line}");
        // 103 backends need a larger table, and the entry says so (written after the table, as
        // the datapath indexes the table by it).
        r.ops.clear();
        rec.sync(&desired(&(1..=103).collect::<Vec<u8>>()), &BTreeSet::new(), &mut r);
        let m103 = table_size(103);
        assert!(m103 > m3);
        let table_at = r.ops.iter().position(|o| *o == format!("put_table 1 ({m103} entries)")).unwrap_or_else(|| panic!("{:?}", r.ops));
        let entry_at = r.ops.iter().position(|o| o == "put_service 1 count=103").unwrap();
        assert!(table_at < entry_at);
        assert_eq!(r.maps.services.values().find(|s| s.svc_id == 1).unwrap().table_len as usize, m103);
        // No backend left: the table goes.
        r.ops.clear();
        rec.sync(&desired(&[]), &BTreeSet::new(), &mut r);
        assert!(r.ops.contains(&"del_table 1".to_string()), "{:?}", r.ops);
        assert_eq!(r.maps.services.values().find(|s| s.svc_id == 1).unwrap().table_len, 0);
    }

    #[test]
    fn next_slots_swap_removes() {
        let old = vec![be(1), be(2), be(3)];
        assert_eq!(next_slots(&old, &[be(1), be(3)].into()), vec![be(1), be(3)]);
        assert_eq!(next_slots(&old, &[be(2), be(3)].into()), vec![be(3), be(2)]);
        assert_eq!(next_slots(&old, &[].into()), vec![]);
        // A backend twice (a crash between a slot move and the count) keeps its first slot.
        let torn = vec![be(1), be(4), be(3), be(4)];
        assert_eq!(next_slots(&torn, &[be(1), be(3), be(4)].into()), vec![be(1), be(4), be(3)]);
        assert_eq!(next_slots(&torn, &[be(1), be(2), be(3), be(4)].into()), vec![be(1), be(4), be(3), be(2)]);
        assert_eq!(next_slots(&[be(4), be(4), be(4)], &[be(4)].into()), vec![be(4)]);
    }

    #[test]
    fn a_backend_left_in_two_slots_by_a_crash_is_kept_once_after_a_restart() {
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&desired(&[1, 2, 3, 4]), &BTreeSet::new(), &mut r);
        // Removing backend 2 moves backend 4 into its slot, then lowers the count: the agent
        // crashed in between. The maps hold slots [1, 4, 3, 4] with count 4, and that is what a
        // restart reads back (bpf-tests check `dump_applied` on real maps does).
        let id4 = rec.applied.backends[&be(4)].0;
        r.maps.slots.insert(Lb4SlotKey { svc_id: 1, slot: 1 }, id4);
        let mut torn = rec.applied.clone();
        torn.frontends.values_mut().next().unwrap().slots = vec![be(1), be(4), be(3), be(4)];
        let mut restarted = Reconciler { algorithm: Algorithm::Random, ..Reconciler::restore(torn) };
        r.ops.clear();
        let (_, errs) = restarted.sync(&desired(&[1, 3, 4]), &BTreeSet::new(), &mut r);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(r.ops, vec!["put_service 1 count=3", "del_slot 1/3", "del_backend 2"]);
        assert_eq!(datapath_view(&r), [be(1), be(3), be(4)].into());
        assert_true_view(&r, &restarted, "after the restart");
    }

    #[test]
    fn a_new_frontend_that_fails_at_any_write_leaves_nothing_behind_however_often_retried() {
        // The https frontend needs 9 writes (name, 2 new backends, 3 slots, table, source range,
        // service entry); the map behind the write numbered `budget` is full.
        let https = Frontend::internal(L4Addr { addr: Ipv4Addr::new(172, 30, 0, 1), port: 443, proto: Proto::Tcp });
        let mut failures = 0;
        for budget in 0..20 {
            let mut r = Recorder::default();
            let mut rec = Reconciler::new();
            rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
            let (maps, applied) = (r.maps.clone(), rec.applied.clone());
            let want = desired_with_https(&[1, 2], &[1, 3, 4]);
            r.puts_left = Some(budget);
            if rec.sync(&want, &BTreeSet::new(), &mut r).1.is_empty() {
                break;
            }
            failures += 1;
            for retry in 0..20 {
                r.puts_left = Some(budget);
                let (_, errs) = rec.sync(&want, &BTreeSet::new(), &mut r);
                assert_eq!(errs.len(), 1, "{errs:?}");
                assert!(errs[0].contains("Service default/web:https") && errs[0].contains("is full"), "{}", errs[0]);
                assert_eq!(r.maps, maps, "budget {budget}, retry {retry}: the maps changed");
                assert_eq!(rec.applied, applied, "budget {budget}, retry {retry}: the view changed");
            }
            // Room again: it goes in as if it had never failed, with the next ids.
            r.puts_left = None;
            let (_, errs) = rec.sync(&want, &BTreeSet::new(), &mut r);
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(rec.applied.frontends[&https].svc_id, 2);
            assert_eq!(r.maps.backends.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
            assert_true_view(&r, &rec, &format!("budget {budget}, then room"));
        }
        assert_eq!(failures, 9, "every write of the new frontend failed once");
    }

    #[test]
    fn a_new_frontend_that_cannot_be_taken_out_either_stays_in_the_view_for_the_next_sync() {
        let https = Frontend::internal(L4Addr { addr: Ipv4Addr::new(172, 30, 0, 1), port: 443, proto: Proto::Tcp });
        for still_wanted in [true, false] {
            let mut r = Recorder::default();
            let mut rec = Reconciler::new();
            rec.sync(&desired(&[1, 2]), &BTreeSet::new(), &mut r);
            let maps = r.maps.clone();
            // Everything but the service entry is written, and nothing can be deleted.
            r.fail_service_puts = true;
            r.fail_deletes = true;
            let (_, errs) = rec.sync(&desired_with_https(&[1, 2], &[1, 3]), &BTreeSet::new(), &mut r);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_ne!(r.maps, maps);
            assert_eq!(rec.applied.frontends[&https].entry, None);
            assert_true_view(&r, &rec, "after the failed undo");
            // The next sync carries on from what is left: completes it, or removes it.
            r.fail_service_puts = false;
            r.fail_deletes = false;
            let next = if still_wanted { desired_with_https(&[1, 2], &[1, 3]) } else { desired(&[1, 2]) };
            let (_, errs) = rec.sync(&next, &BTreeSet::new(), &mut r);
            assert!(errs.is_empty(), "{errs:?}");
            assert_true_view(&r, &rec, "the sync after");
            if still_wanted {
                assert_eq!(rec.applied.frontends[&https].svc_id, 2);
                assert_eq!(rec.applied.frontends[&https].entry.map(|e| e.count), Some(2));
            } else {
                assert_eq!(r.maps, maps);
            }
        }
    }

    #[test]
    fn an_existing_frontend_that_fails_at_any_write_keeps_a_true_view_and_no_dangling_slot() {
        // [1, 2, 3, 4] -> [1, 3, 4, 5] with a source range: a slot move, a new backend, a slot,
        // the table, the range, the entry, and the mark of the backend that left (lb4_gone_v1).
        // Whatever write fails, the view says what the maps
        // hold, the datapath never meets a missing backend, and the next sync converges, even
        // when the Service has gone back to what it was meanwhile.
        let before = desired(&[1, 2, 3, 4]);
        let mut after = desired(&[1, 3, 4, 5]);
        after.frontends.values_mut().next().unwrap().source_ranges.insert("192.0.2.0/24".parse().unwrap());
        let mut failures = 0;
        for budget in 0..20 {
            for target in [&before, &after] {
                let mut r = Recorder::default();
                let mut rec = Reconciler::new();
                rec.sync(&before, &BTreeSet::new(), &mut r);
                let by_address = |r: &Recorder| -> Vec<L4Addr> { r.maps.tables[&1].iter().map(|id| l4addr_from_backend(&r.maps.backends[id]).unwrap()).collect() };
                let table = by_address(&r);
                r.puts_left = Some(budget);
                let failed = !rec.sync(&after, &BTreeSet::new(), &mut r).1.is_empty();
                assert_true_view(&r, &rec, &format!("budget {budget}"));
                if !failed {
                    assert_eq!(datapath_view(&r), [be(1), be(3), be(4), be(5)].into());
                    break;
                }
                failures += 1;
                r.puts_left = None;
                let (_, errs) = rec.sync(target, &BTreeSet::new(), &mut r);
                assert!(errs.is_empty(), "{errs:?}");
                assert_true_view(&r, &rec, &format!("budget {budget}, then room"));
                let want = &target.frontends.values().next().unwrap().backends;
                assert_eq!(datapath_view(&r), want.iter().copied().collect::<BTreeSet<_>>());
                assert_eq!(r.maps.backends.len(), 4, "budget {budget}: backends left over");
                assert_eq!(r.maps.slots.len(), 4, "budget {budget}: slots left over");
                if std::ptr::eq(target, &before) {
                    // Backend 2 may be back under another id: compare addresses.
                    assert_eq!(by_address(&r), table);
                    assert!(r.maps.ranges.is_empty());
                }
            }
        }
        assert_eq!(failures, 2 * 7, "every write of the update failed once");
    }

    /// What differs between two desired states, as the translator's delta says it.
    fn delta_of(a: &Desired, b: &Desired) -> crate::translator::Delta {
        let mut d = crate::translator::Delta::default();
        d.frontends = a.frontends.keys().chain(b.frontends.keys()).filter(|fe| a.frontends.get(fe) != b.frontends.get(fe)).copied().collect();
        d.cluster_ips = a.cluster_ips.symmetric_difference(&b.cluster_ips).copied().collect();
        d.local_endpoints = a.local_endpoints.symmetric_difference(&b.local_endpoints).copied().collect();
        d
    }

    #[test]
    fn a_sync_of_the_changes_writes_what_a_full_sync_writes() {
        // Frontends over a few ClusterIPs, backends shared between them, endpoints moving to and
        // from this node, frontends coming and going, policies changing; with hashing tables and
        // without. Step by step, the full sync and the sync of the delta write the same
        // operations in the same order, and end with the same maps and view.
        for algorithm in [Algorithm::Maglev, Algorithm::Random] {
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut rnd = |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let (mut full, mut incr) = (Recorder::default(), Recorder::default());
            let mut a = Reconciler { algorithm, ..Reconciler::new() };
            let mut b = Reconciler { algorithm, ..Reconciler::new() };
            let mut d = Desired::default();
            let cidrs: BTreeSet<Cidr4> = ["172.30.0.0/16".parse().unwrap()].into();
            a.sync(&d, &cidrs, &mut full);
            b.sync(&d, &cidrs, &mut incr);
            for step in 0..300 {
                let prev = d.clone();
                for _ in 0..1 + rnd(3) {
                    let fe = Frontend::internal(L4Addr { addr: Ipv4Addr::new(172, 30, 0, 1 + rnd(4) as u8), port: 80 + rnd(3) as u16, proto: Proto::Tcp });
                    match rnd(6) {
                        0 => {
                            d.frontends.remove(&fe);
                        }
                        1 => {
                            let b = be(1 + rnd(12) as u8);
                            if !d.local_endpoints.remove(&b.addr) {
                                d.local_endpoints.insert(b.addr);
                            }
                        }
                        2 => {
                            let f = d.frontends.entry(fe).or_insert_with(|| DesiredFrontend::new(ServicePortName { namespace: "default".into(), name: format!("s{}", fe.addr.port).into(), port: "".into() }, crate::model::Backends::default()));
                            f.masquerade = !f.masquerade;
                            f.affinity_timeout_s = rnd(2) as u32 * 30;
                        }
                        _ => {
                            let f = d.frontends.entry(fe).or_insert_with(|| DesiredFrontend::new(ServicePortName { namespace: "default".into(), name: format!("s{}", fe.addr.port).into(), port: "".into() }, crate::model::Backends::default()));
                            let b = be(1 + rnd(12) as u8);
                            if !f.backends.remove(&b) {
                                f.backends.insert(b);
                            }
                        }
                    }
                }
                d.cluster_ips = d.frontends.keys().map(|f| f.addr.addr).collect();
                full.ops.clear();
                incr.ops.clear();
                let (sa, ea) = a.sync(&d, &cidrs, &mut full);
                let (sb, eb) = b.sync_changed(&d, &delta_of(&prev, &d), &cidrs, &mut incr);
                assert!(ea.is_empty() && eb.is_empty(), "{ea:?} {eb:?}");
                assert_eq!(incr.ops, full.ops, "{algorithm:?} step {step}");
                assert_eq!(sb, sa, "{algorithm:?} step {step}");
                assert_eq!(incr.maps, full.maps, "{algorithm:?} step {step}");
                assert_eq!(b.applied, a.applied, "{algorithm:?} step {step}");
                assert_eq!((b.next_svc_id, b.next_backend_id), (a.next_svc_id, a.next_backend_id), "{algorithm:?} step {step}");
            }
        }
    }

    #[test]
    fn one_service_among_many_changed_touches_that_service_alone() {
        // 5,000 Services through the translator: one EndpointSlice changes, one Service is
        // translated again, and the writes are that endpoint's.
        use crate::{sources::Objects, translator::Translator};
        let n = 5_000;
        let mut yaml = String::new();
        for i in 0..n {
            yaml += &format!("kind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec: {{clusterIP: 172.30.{}.{}, ports: [{{port: 80}}]}}\n---\n", i / 250, i % 250 + 1);
            yaml += &format!("kind: EndpointSlice\nmetadata: {{name: s{i}-x, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.1.{}.{}]}}, {{addresses: [10.2.{}.{}]}}]\n---\n", i / 250, i % 250 + 1, i / 250, i % 250 + 1);
        }
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        crate::sources::manifests::parse_str(&yaml, "t", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node = crate::model::NodeContext { name: "node1".into(), ..Default::default() };
        let mut t = Translator::new();
        t.rebuild(&objs.services, &objs.endpoint_slices, &node);
        let mut r = Recorder::default();
        let mut rec = rec();
        let (st, errs) = rec.sync(&t.desired, &BTreeSet::new(), &mut r);
        assert!(errs.is_empty());
        assert_eq!(st.writes, n * 7, "name, 2 backends, 2 slots, entry, the ClusterIP's entry");
        // s42's second endpoint is replaced.
        let mut slice = objs.endpoint_slices[42].as_ref().clone();
        slice.endpoints.as_mut().unwrap()[1].address = Some("10.3.0.1".into());
        let mut ch = crate::translator::Changes::default();
        ch.slices.insert(crate::model::slice_key(&slice), Some(std::sync::Arc::new(slice)));
        r.ops.clear();
        let (delta, work) = t.apply(ch, &node);
        assert_eq!(work.translated, 1);
        let (st, errs) = rec.sync_changed(&t.desired, &delta, &BTreeSet::new(), &mut r);
        assert!(errs.is_empty());
        let id = rec.applied.backends[&L4Addr { addr: Ipv4Addr::new(10, 3, 0, 1), port: 8080, proto: Proto::Tcp }].0;
        assert_eq!(id, 2 * n as u32 + 1);
        let svc = 43;
        assert_eq!(
            r.ops,
            vec![format!("put_backend {id}"), format!("put_slot {svc}/1 -> {id}"), format!("del_backend {}", 2 * 42 + 2), format!("gone {svc}/{}", 2 * 42 + 2)],
        );
        assert_eq!((st.writes, st.deletes), (3, 1));
        // And the full sync of the same state finds nothing left to do.
        r.ops.clear();
        rec.sync(&t.desired, &BTreeSet::new(), &mut r);
        assert!(r.ops.is_empty(), "{:?}", r.ops);
    }

    #[test]
    fn lost_backends_are_marked_and_unmarked_when_back() {
        for (proto, affinity) in [(Proto::Tcp, 0), (Proto::Tcp, 60), (Proto::Udp, 0), (Proto::Sctp, 0)] {
            let mut d = desired(&[1, 2]);
            let (fe, want) = d.frontends.pop_first().unwrap();
            let fe = Frontend::internal(L4Addr { proto, ..fe.addr });
            let backends: crate::model::Backends = want.backends.iter().map(|b| L4Addr { proto, ..*b }).collect();
            d.frontends.insert(fe, DesiredFrontend { backends: backends.clone(), affinity_timeout_s: affinity, ..want.clone() });
            // Another port of the Service with the same endpoints keeps them in the maps.
            let fe2 = Frontend::internal(L4Addr { port: 81, ..fe.addr });
            d.frontends.insert(fe2, DesiredFrontend { backends, ..want });
            let mut r = Recorder::default();
            let mut rec = rec();
            rec.sync(&d, &BTreeSet::new(), &mut r);
            let svc = rec.applied.frontends[&fe].svc_id;
            let ids: Vec<u32> = d.frontends[&fe].backends.iter().map(|b| rec.applied.backends[b].0).collect();
            let marks = |r: &Recorder| r.ops.iter().filter(|o| o.starts_with("gone ") || o.starts_with("back ")).cloned().collect::<Vec<_>>();
            // Every protocol: TCP connections never look (graceful termination), affinity does.
            let marked = true;
            // The first backend leaves the first port (it stays in the maps as the other's).
            let mut one = d.clone();
            one.frontends.get_mut(&fe).unwrap().backends.pop_first();
            r.ops.clear();
            let (st, errs) = rec.sync(&one, &BTreeSet::new(), &mut r);
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(marks(&r), if marked { vec![format!("gone {svc}/{}", ids[0])] } else { vec![] }, "{proto} affinity {affinity}");
            assert_eq!(st.backends_left, marked as usize);
            assert_eq!(rec.applied.gone.contains(&(svc, ids[0])), marked);
            // It comes back: unmarked before its slot is written.
            r.ops.clear();
            rec.sync(&d, &BTreeSet::new(), &mut r);
            if marked {
                let back = r.ops.iter().position(|o| *o == format!("back {svc}/{}", ids[0])).expect("unmarked");
                let slot = r.ops.iter().position(|o| o.starts_with(&format!("put_slot {svc}/"))).expect("slot written");
                assert!(back < slot, "{:?}", r.ops);
            } else {
                assert_eq!(marks(&r), Vec::<String>::new());
            }
            assert!(rec.applied.gone.is_empty());
            // The first port goes: both its backends marked, none kept (its id is not reused).
            let mut other = d.clone();
            other.frontends.remove(&fe);
            r.ops.clear();
            rec.sync(&other, &BTreeSet::new(), &mut r);
            assert_eq!(marks(&r), if marked { ids.iter().map(|id| format!("gone {svc}/{id}")).collect() } else { vec![] }, "{:?}", r.ops);
            assert!(rec.applied.gone.is_empty());
            // A backend that leaves the maps altogether takes its marks out of memory (its id is
            // not handed out again while the agent runs).
            let mut fewer = other.clone();
            fewer.frontends.get_mut(&fe2).unwrap().backends.pop_first();
            rec.sync(&fewer, &BTreeSet::new(), &mut r);
            assert!(rec.applied.gone.is_empty(), "{:?}", rec.applied.gone);
        }
    }

    #[test]
    fn a_failed_write_marks_its_lost_backends_when_a_later_write_completes() {
        let d = desired(&[1, 2, 3]);
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&d, &BTreeSet::new(), &mut r);
        let (fe, _) = d.frontends.first_key_value().unwrap();
        let svc = rec.applied.frontends[fe].svc_id;
        let id2 = rec.applied.backends[&be(2)].0;
        let mut less = d.clone();
        less.frontends.values_mut().next().unwrap().backends.remove(&be(2));
        // Every delete fails: the slot past the count stays, the write is incomplete.
        r.fail_deletes = true;
        let (_, errs) = rec.sync(&less, &BTreeSet::new(), &mut r);
        assert!(!errs.is_empty());
        r.fail_deletes = false;
        r.ops.clear();
        let (_, errs) = rec.sync(&less, &BTreeSet::new(), &mut r);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(r.ops.contains(&format!("gone {svc}/{id2}")), "{:?}", r.ops);
    }

    #[test]
    fn marks_read_back_for_backends_a_frontend_serves_are_removed_by_the_first_sync() {
        let d = desired(&[1, 2]);
        let mut r = Recorder::default();
        let mut rec = rec();
        rec.sync(&d, &BTreeSet::new(), &mut r);
        let (fe, _) = d.frontends.first_key_value().unwrap();
        let svc = rec.applied.frontends[fe].svc_id;
        let id1 = rec.applied.backends[&be(1)].0;
        // A restart reads back a mark for a backend the frontend serves (an older agent put it
        // back without unmarking), and one of a frontend gone (its id is not handed out again).
        let mut applied = rec.applied.clone();
        applied.gone.insert((svc, id1));
        applied.gone.insert((svc + 10, id1));
        let mut rec = Reconciler::restore(applied);
        r.ops.clear();
        rec.sync(&d, &BTreeSet::new(), &mut r);
        assert_eq!(r.ops.first(), Some(&format!("back {svc}/{id1}")), "{:?}", r.ops);
        assert!(!r.ops.iter().any(|o| o.starts_with("gone ")), "{:?}", r.ops);
        assert_eq!(rec.applied.gone, BTreeSet::from([(svc + 10, id1)]));
        assert!(rec.next_svc_id > svc + 10);
    }

    #[test]
    fn cidr_parse() {
        let c: Cidr4 = "172.30.5.7/16".parse().unwrap();
        assert_eq!(c.to_string(), "172.30.0.0/16");
        assert!(c.contains(Ipv4Addr::new(172, 30, 9, 9)));
        assert!("172.30.0.0/33".parse::<Cidr4>().is_err());
        assert!("nope".parse::<Cidr4>().is_err());
    }
}
