//! The translation kept between syncs, so that a change costs what it touches: each Service's
//! part of [`Desired`] is kept with the objects it was made from, and a change retranslates only
//! the Services whose object or EndpointSlices changed (a new node context retranslates all).
//! The merged [`Desired`] is kept up to date, and [`Delta`] says which of its entries may differ
//! from the last sync's, for `Reconciler::sync_changed` to write those alone.
//!
//! The result is [`model::translate`]'s over the same objects: a frontend or health check port
//! that two Services claim goes to the later one, in the order of the last full read (a Service
//! added since counts as the last).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use crate::{
    error::ObjectError,
    model::{self, Desired, DesiredFrontend, Frontend, HealthCheck, Key, NodeContext, ServiceDesired},
    sources::{service::Service, slice::EndpointSlice},
};

/// Objects changed since the last sync, by key: the object as it is now, `None` when deleted.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub services: BTreeMap<Key, Option<Arc<Service>>>,
    pub slices: BTreeMap<Key, Option<Arc<EndpointSlice>>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }
}

/// What may differ in [`Desired`] from the previous sync's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub frontends: BTreeSet<Frontend>,
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    pub local_endpoints: BTreeSet<Ipv4Addr>,
}

/// How many Services a sync translated, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    pub translated: usize,
    /// Everything was translated anew (the first sync, a new node context, a full read).
    pub full: bool,
}

/// An object the translator keeps: the same allocation when it is shared already (the API
/// server's stores hand out `Arc`s), a copy otherwise.
pub trait Shared<T>: std::borrow::Borrow<T> {
    fn shared(&self) -> Arc<T>;
}

impl<T: Clone> Shared<T> for T {
    fn shared(&self) -> Arc<T> {
        Arc::new(self.clone())
    }
}

impl<T> Shared<T> for Arc<T> {
    fn shared(&self) -> Arc<T> {
        self.clone()
    }
}

#[derive(Default)]
pub struct Translator {
    /// The merged translation of every Service.
    pub desired: Desired,
    node: Option<NodeContext>,
    /// Service key -> the Service, its slices and its part: one table, where three (and a
    /// fourth by slice) held the key and a table's slack each (17 MB at 100,000 Services).
    services: HashMap<Key, Entry>,
    /// Of `services`, the entries with a Service.
    service_count: usize,
    /// Slice -> the object as last seen, whose label names the Service it is filed under.
    slices: HashMap<Key, Arc<EndpointSlice>>,
    /// Slices without a Service label, with their error.
    orphans: BTreeMap<Key, ObjectError>,
    /// Frontend -> the Services claiming it, by order (the last wins), for the frontends two or
    /// more Services claim. A frontend one Service claims is not here: its claimant is the
    /// Service `desired` names for it (a table of every frontend was 8 MB at 100,000 Services).
    contested: HashMap<Frontend, Claims>,
    hc_owners: HashMap<u16, Claims>,
    cluster_ip_refs: HashMap<Ipv4Addr, usize>,
    local_refs: HashMap<Ipv4Addr, usize>,
    /// Services whose part has errors.
    with_errors: BTreeSet<Key>,
    next_order: u64,
    /// Set when the last full read held two objects of one key (manifests can): then only a
    /// full translation is exact, and [`Translator::is_built`] says no.
    duplicates: bool,
    /// Services translated since this translator was made.
    pub translated: usize,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Has a full translation been made (that changes can be applied to)?
    pub fn is_built(&self) -> bool {
        self.node.is_some() && !self.duplicates
    }

    /// Translates every object anew, as [`model::translate`] does (same result, same errors in
    /// the same order).
    pub fn rebuild(&mut self, services: &[impl Shared<Service>], slices: &[impl Shared<EndpointSlice>], node: &NodeContext) -> Vec<ObjectError> {
        let translated = self.translated;
        *self = Translator { node: Some(node.clone()), translated, ..Default::default() };
        let mut errors = Vec::new();
        // The Services first, so that their slices name them by the same key.
        let mut keys = Vec::with_capacity(services.len());
        for svc in services {
            let key = model::service_key(svc.borrow());
            let order = self.next_order;
            self.next_order += 1;
            if self.services.entry(key.clone()).or_default().service.replace((order, svc.shared())).is_some() {
                self.duplicates = true;
            } else {
                self.service_count += 1;
            }
            keys.push(key);
        }
        for s in slices {
            let key = model::slice_key(s.borrow());
            if self.slices.insert(key.clone(), s.shared()).is_some() {
                self.duplicates = true;
            }
            match model::slice_owner(s.borrow()) {
                Ok(owner) => insert_sorted(&mut self.services.entry(owner).or_default().slices, key),
                Err(e) => {
                    errors.push(e.clone());
                    self.orphans.insert(key, e);
                }
            }
        }
        if self.duplicates {
            // Exactly as translate does, object by object; no part is kept.
            let (d, e) = model::translate(services, slices, node);
            self.desired = d;
            return e;
        }
        let mut delta = Delta::default();
        for key in keys {
            let part = self.translate_one(&key);
            errors.extend(part.errors.iter().cloned());
            self.add_part(key, part, &mut delta);
        }
        model::compact(&mut self.desired.frontends);
        model::dedup_errors(errors)
    }

    /// Applies `changes` and retranslates the Services they touch; with another node context,
    /// every Service (then `Work::full`, and the whole of `desired` may have changed).
    /// Only on a translation that [`Translator::is_built`] (else `desired` does not say which
    /// Service claims a frontend): the agent reads everything again first.
    pub fn apply(&mut self, changes: Changes, node: &NodeContext) -> (Delta, Work) {
        debug_assert!(self.is_built(), "changes applied to a translation not built");
        let mut delta = Delta::default();
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        for (key, slice) in changes.slices {
            // The same object again (a relist, a manifest file whose other objects changed):
            // kept as given, so the store's copy is the only one, and nothing is translated.
            if let Some(s) = &slice {
                if let Some(held) = self.slices.get_mut(&key).filter(|held| ***held == **s) {
                    *held = s.clone();
                    continue;
                }
            }
            // Filed under the Service its label named when last seen.
            if let Some(Ok(owner)) = self.slices.get(&key).map(|held| model::slice_owner(held)) {
                if let Some(e) = self.services.get_mut(&owner) {
                    e.slices.retain(|k| *k != key);
                }
                affected.insert(owner);
            }
            self.orphans.remove(&key);
            match slice {
                Some(s) => {
                    match model::slice_owner(&s) {
                        Ok(owner) => {
                            insert_sorted(&mut self.services.entry(owner.clone()).or_default().slices, key.clone());
                            affected.insert(owner);
                        }
                        Err(e) => {
                            self.orphans.insert(key.clone(), e);
                        }
                    }
                    self.slices.insert(key, s);
                }
                None => {
                    self.slices.remove(&key);
                }
            }
        }
        for (key, svc) in changes.services {
            match svc {
                Some(s) => {
                    let e = self.services.entry(key.clone()).or_default();
                    match &mut e.service {
                        Some((_, held)) if **held == *s => {
                            *held = s;
                            continue;
                        }
                        Some((_, held)) => *held = s,
                        None => {
                            e.service = Some((self.next_order, s));
                            self.next_order += 1;
                            self.service_count += 1;
                        }
                    }
                }
                None => {
                    if self.services.get_mut(&key).and_then(|e| e.service.take()).is_some() {
                        self.service_count -= 1;
                    }
                }
            }
            affected.insert(key);
        }
        if self.node.as_ref() != Some(node) {
            self.node = Some(node.clone());
            affected = self.services.keys().cloned().collect();
            let before = self.translated;
            for key in affected {
                self.retranslate(&key, &mut delta);
            }
            return (delta, Work { translated: self.translated - before, full: true });
        }
        let before = self.translated;
        for key in affected {
            self.retranslate(&key, &mut delta);
        }
        (delta, Work { translated: self.translated - before, full: false })
    }

    /// Every error of the objects as they are now: slices without a Service, then the Services'
    /// (by key).
    pub fn errors(&self) -> Vec<ObjectError> {
        let mut out: Vec<ObjectError> = self.orphans.values().cloned().collect();
        for k in &self.with_errors {
            out.extend(self.services.get(k).and_then(|e| e.part.as_ref()).into_iter().flat_map(|p| p.errors().iter().cloned()));
        }
        model::dedup_errors(out)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.service_count, self.slices.len())
    }

    fn translate_one(&mut self, key: &Key) -> ServiceDesired {
        let Some((e, (_, svc))) = self.services.get(key).and_then(|e| Some((e, e.service.as_ref()?))) else { return ServiceDesired::default() };
        let slices: Vec<&EndpointSlice> = e.slices.iter().filter_map(|k| self.slices.get(k)).map(|s| &**s).collect();
        self.translated += 1;
        model::translate_service(svc, &slices, self.node.as_ref().expect("a node context"))
    }

    fn retranslate(&mut self, key: &Key, delta: &mut Delta) {
        self.remove_part(key, delta);
        match self.services.get(key) {
            Some(e) if e.service.is_some() => {
                let part = self.translate_one(key);
                self.add_part(key.clone(), part, delta);
            }
            // Neither a Service nor a slice of one any more.
            Some(e) if e.slices.is_empty() => {
                self.services.remove(key);
            }
            _ => {}
        }
    }

    fn add_part(&mut self, key: Key, part: ServiceDesired, delta: &mut Delta) {
        let order = self.services.get(&key).and_then(|e| e.service.as_ref()).map(|(o, _)| *o).unwrap_or(u64::MAX);
        let (mut part, wants) = Part::new(part);
        for (fe, want) in wants {
            let owners = match self.contested.entry(fe) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => match self.desired.frontends.get(&fe) {
                    // Its only claimant so far.
                    None => {
                        self.desired.frontends.insert(fe, want);
                        delta.frontends.insert(fe);
                        continue;
                    }
                    // Claimed by one Service until now: by two from here on.
                    Some(held) => {
                        let other = held.service.key();
                        debug_assert!(self.services.get(&other).is_some_and(|e| e.part.as_ref().is_some_and(|p| p.frontends.contains(&fe))), "{fe} claimed by {other:?}");
                        let other_order = self.services.get(&other).and_then(|e| e.service.as_ref()).map_or(u64::MAX, |(o, _)| *o);
                        v.insert(Claims(smallvec::smallvec![(other_order, other)]))
                    }
                },
            };
            let before = owners.0.last().map(|(_, k)| k.clone()).filter(|k| *k != key);
            if owners.claim(order, &key) {
                // The value moves into `desired`; the claimant it wins over gets its own back,
                // to win with again when this one lets go.
                let old = self.desired.frontends.insert(fe, want);
                if let (Some(before), Some(old)) = (before, old) {
                    if let Some(p) = self.services.get_mut(&before).and_then(|e| e.part.as_mut()) {
                        p.keep_lost(fe, old);
                    }
                }
            } else {
                part.keep_lost(fe, want);
            }
            delta.frontends.insert(fe);
        }
        for (port, hc) in part.health_checks().iter() {
            if self.hc_owners.entry(*port).or_default().claim(order, &key) {
                self.desired.health_checks.insert(*port, hc.clone());
            }
        }
        for ip in part.cluster_ips.iter() {
            *self.cluster_ip_refs.entry(*ip).or_default() += 1;
            self.desired.cluster_ips.insert(*ip);
            delta.cluster_ips.insert(*ip);
        }
        for ip in part.local_endpoints().iter() {
            *self.local_refs.entry(*ip).or_default() += 1;
            self.desired.local_endpoints.insert(*ip);
            delta.local_endpoints.insert(*ip);
        }
        self.desired.ipv6_skipped += part.ipv6_skipped();
        self.desired.no_local_endpoints.0 += part.no_local_endpoints().0;
        self.desired.no_local_endpoints.1 += part.no_local_endpoints().1;
        if !part.errors().is_empty() {
            self.with_errors.insert(key.clone());
        }
        self.services.entry(key).or_default().part = Some(part);
    }

    fn remove_part(&mut self, key: &Key, delta: &mut Delta) {
        let Some(part) = self.services.get_mut(key).and_then(|e| e.part.take()) else { return };
        self.with_errors.remove(key);
        for fe in part.frontends.iter() {
            delta.frontends.insert(*fe);
            let Some(o) = self.contested.get_mut(fe) else {
                // Its only claimant.
                self.desired.frontends.remove(fe);
                continue;
            };
            let won = o.0.last().is_some_and(|(_, k)| k == key);
            o.0.retain(|(_, claimant)| claimant != key);
            let winner = o.0.last().map(|(_, k)| k.clone());
            if o.0.len() < 2 {
                // One claimant left (or none: not possible, kept as it was): `desired` names it.
                self.contested.remove(fe);
            }
            match winner {
                None => {
                    self.desired.frontends.remove(fe);
                }
                // The latest other claimant's value (kept in its part while it lost) moves in.
                Some(winner) if won => {
                    if let Some(w) = self.services.get_mut(&winner).and_then(|e| e.part.as_mut()).and_then(|p| p.take_lost(fe)) {
                        self.desired.frontends.insert(*fe, w);
                    }
                }
                Some(_) => {}
            }
        }
        for (port, _) in part.health_checks().iter() {
            disown(&mut self.hc_owners, &mut self.desired.health_checks, &self.services, key, port, |p| p.health_checks());
        }
        release(&part.cluster_ips, &mut self.cluster_ip_refs, &mut self.desired.cluster_ips, &mut delta.cluster_ips);
        release(part.local_endpoints(), &mut self.local_refs, &mut self.desired.local_endpoints, &mut delta.local_endpoints);
        self.desired.ipv6_skipped -= part.ipv6_skipped();
        self.desired.no_local_endpoints.0 -= part.no_local_endpoints().0;
        self.desired.no_local_endpoints.1 -= part.no_local_endpoints().1;
    }
}

/// `key` lets go of `k` (a frontend, a health check port): the latest other claimant's value
/// takes its place, or with none left it leaves `merged`.
fn disown<K: Copy + Eq + std::hash::Hash + Ord, V: Clone>(owners: &mut HashMap<K, Claims>, merged: &mut BTreeMap<K, V>, entries: &HashMap<Key, Entry>, key: &Key, k: &K, of: impl Fn(&Part) -> &[(K, V)]) {
    let Some(o) = owners.get_mut(k) else { return };
    o.0.retain(|(_, claimant)| claimant != key);
    match o.0.last() {
        None => {
            owners.remove(k);
            merged.remove(k);
        }
        Some((_, winner)) => {
            if let Some((_, w)) = entries.get(winner).and_then(|e| e.part.as_ref()).and_then(|p| of(p).iter().find(|(pk, _)| pk == k)) {
                merged.insert(*k, w.clone());
            }
        }
    }
}

/// What the translator keeps under a Service's key.
#[derive(Debug, Default)]
struct Entry {
    /// The Service and its order; `None` while only slices name it.
    service: Option<(u64, Arc<Service>)>,
    /// The slices labelled with its name, sorted (nearly always one: held inline, not a set).
    slices: OneOrMore<Key>,
    /// Its part of `desired`, while it has a Service.
    part: Option<Part>,
}

/// One Service's part as kept between syncs: [`ServiceDesired`] in boxed slices, its frontends'
/// values aside (see `frontends`). A part holds
/// one or a few entries of each kind, for which a `BTreeMap` is costly: it allocates a node of
/// eleven entries for the first (1.5 KiB for one frontend, 15 MiB at 10,000 Services).
#[derive(Debug, Default)]
struct Part {
    /// Its frontends, as the map gave them (sorted, unique); so the others. A frontend's value is
    /// held once: in `desired` while this Service wins the frontend, in `Rare::lost` while
    /// another one does (rare: a frontend two Services claim).
    frontends: Box<[Frontend]>,
    /// Nearly always one: held inline.
    cluster_ips: OneOrMore<Ipv4Addr>,
    /// What most Services have none of, boxed on its own (`None`: none of it): 48 bytes less a
    /// Service in the table of parts.
    rare: Option<Box<Rare>>,
}

/// The parts of a [`Part`] that most Services leave empty: health check ports (LoadBalancer
/// Services with externalTrafficPolicy Local), endpoints on this node, IPv6 entries, Service
/// ports without a local endpoint, errors.
#[derive(Debug, Default)]
struct Rare {
    /// The values of the frontends another Service wins, by frontend.
    lost: Vec<(Frontend, DesiredFrontend)>,
    health_checks: Box<[(u16, HealthCheck)]>,
    local_endpoints: Box<[Ipv4Addr]>,
    ipv6_skipped: usize,
    no_local_endpoints: (usize, usize),
    errors: Box<[ObjectError]>,
}

impl Part {
    fn health_checks(&self) -> &[(u16, HealthCheck)] {
        self.rare.as_ref().map_or(&[], |r| &r.health_checks)
    }

    fn local_endpoints(&self) -> &[Ipv4Addr] {
        self.rare.as_ref().map_or(&[], |r| &r.local_endpoints)
    }

    fn errors(&self) -> &[ObjectError] {
        self.rare.as_ref().map_or(&[], |r| &r.errors)
    }

    fn ipv6_skipped(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.ipv6_skipped)
    }

    fn no_local_endpoints(&self) -> (usize, usize) {
        self.rare.as_ref().map_or((0, 0), |r| r.no_local_endpoints)
    }

    /// Holds the value of `fe`, a frontend another Service wins.
    fn keep_lost(&mut self, fe: Frontend, want: DesiredFrontend) {
        let lost = &mut self.rare.get_or_insert_with(Default::default).lost;
        match lost.binary_search_by_key(&fe, |(f, _)| *f) {
            Ok(i) => lost[i].1 = want,
            Err(i) => lost.insert(i, (fe, want)),
        }
    }

    /// The value of `fe` held while another Service won it.
    fn take_lost(&mut self, fe: &Frontend) -> Option<DesiredFrontend> {
        let lost = &mut self.rare.as_mut()?.lost;
        let i = lost.binary_search_by_key(fe, |(f, _)| *f).ok()?;
        Some(lost.remove(i).1)
    }

    /// The part of `p`, and the values of its frontends (for the caller to place: in `desired`
    /// where this Service wins, [`Part::keep_lost`] where not).
    fn new(p: ServiceDesired) -> (Part, BTreeMap<Frontend, DesiredFrontend>) {
        let d = p.desired;
        let rare = Rare {
            lost: Vec::new(),
            health_checks: d.health_checks.into_iter().collect(),
            local_endpoints: d.local_endpoints.into_iter().collect(),
            ipv6_skipped: d.ipv6_skipped,
            no_local_endpoints: d.no_local_endpoints,
            errors: p.errors.into(),
        };
        let none = rare.health_checks.is_empty() && rare.local_endpoints.is_empty() && rare.ipv6_skipped == 0 && rare.no_local_endpoints == (0, 0) && rare.errors.is_empty();
        let part = Part { frontends: d.frontends.keys().copied().collect(), cluster_ips: d.cluster_ips.into_iter().collect(), rare: (!none).then(|| Box::new(rare)) };
        (part, d.frontends)
    }
}

/// The Services claiming one frontend (or health check port), by order, the last winning:
/// nearly always one, so a sorted `Vec` rather than a map.
#[derive(Debug, Default)]
struct Claims(OneOrMore<(u64, Key)>);

/// A sorted list that nearly always holds one item: that one is held inline.
type OneOrMore<T> = smallvec::SmallVec<[T; 1]>;

impl Claims {
    /// `key` (of `order`) claims it; true when it is now the winner.
    fn claim(&mut self, order: u64, key: &Key) -> bool {
        match self.0.binary_search_by_key(&order, |(o, _)| *o) {
            Ok(i) => self.0[i].1 = key.clone(),
            Err(i) => {
                // Room for this one alone (a Vec's growth doubles).
                self.0.reserve_exact(1);
                self.0.insert(i, (order, key.clone()));
            }
        }
        self.0.last().map(|(o, _)| *o) == Some(order)
    }
}

/// Inserts `key` into the sorted, unique `keys`.
fn insert_sorted(keys: &mut OneOrMore<Key>, key: Key) {
    if let Err(i) = keys.binary_search(&key) {
        keys.reserve_exact(1);
        keys.insert(i, key);
    }
}

/// Drops one reference to each of `ips`; those left with none leave `set`.
fn release(ips: &[Ipv4Addr], refs: &mut HashMap<Ipv4Addr, usize>, set: &mut BTreeSet<Ipv4Addr>, changed: &mut BTreeSet<Ipv4Addr>) {
    for ip in ips {
        changed.insert(*ip);
        let n = refs.entry(*ip).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            refs.remove(ip);
            set.remove(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{manifests, Objects};

    fn node() -> NodeContext {
        NodeContext { name: "node1".into(), ips: vec!["192.168.0.2".parse().unwrap()], zone: Some("zone-a".into()), ..Default::default() }
    }

    fn objs(yaml: &str) -> Objects {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "t", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        objs
    }

    fn svc(name: &str, spec: &str) -> Service {
        Arc::unwrap_or_clone(objs(&format!("kind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}\n")).services.remove(0))
    }

    fn slice(name: &str, owner: Option<&str>, eps: &[&str]) -> EndpointSlice {
        let labels = owner.map(|o| format!(", labels: {{kubernetes.io/service-name: {o}}}")).unwrap_or_default();
        let eps: String = eps.iter().map(|e| format!("- {{addresses: [{e}], nodeName: {}}}\n", if e.ends_with(".1") { "node1" } else { "node2" })).collect();
        let eps = if eps.is_empty() { "endpoints: []\n".to_string() } else { format!("endpoints:\n{eps}") };
        objs(&format!("kind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns{labels}}}\naddressType: IPv4\nports: [{{port: 8080}}]\n{eps}")).endpoint_slices.remove(0).as_ref().clone()
    }

    fn key(name: &str) -> Key {
        ("ns".into(), name.into())
    }

    /// The objects as a full read would list them: services in order, slices by key.
    #[derive(Default)]
    struct World {
        services: Vec<Service>,
        slices: BTreeMap<Key, EndpointSlice>,
    }

    impl World {
        fn put_service(&mut self, s: Service, ch: &mut Changes) {
            let k = model::service_key(&s);
            match self.services.iter_mut().find(|o| model::service_key(o) == k) {
                Some(o) => *o = s.clone(),
                None => self.services.push(s.clone()),
            }
            ch.services.insert(k, Some(Arc::new(s)));
        }
        fn del_service(&mut self, name: &str, ch: &mut Changes) {
            self.services.retain(|o| model::service_key(o) != key(name));
            ch.services.insert(key(name), None);
        }
        fn put_slice(&mut self, s: EndpointSlice, ch: &mut Changes) {
            let k = model::slice_key(&s);
            self.slices.insert(k.clone(), s.clone());
            ch.slices.insert(k, Some(Arc::new(s)));
        }
        fn del_slice(&mut self, name: &str, ch: &mut Changes) {
            self.slices.remove(&key(name));
            ch.slices.insert(key(name), None);
        }
        fn slices(&self) -> Vec<EndpointSlice> {
            self.slices.values().cloned().collect()
        }
    }

    fn error_set(e: &[ObjectError]) -> BTreeSet<String> {
        e.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn every_change_gives_what_a_full_translation_gives() {
        let mut w = World::default();
        let mut ch = Changes::default();
        w.put_service(svc("a", "{clusterIP: 172.30.0.1, ports: [{port: 80}]}"), &mut ch);
        w.put_service(svc("b", "{clusterIP: 172.30.0.2, externalIPs: [192.0.2.9], ports: [{port: 80}]}"), &mut ch);
        w.put_service(svc("lb", "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 172.30.0.3, ports: [{port: 80, nodePort: 30080}]}"), &mut ch);
        w.put_slice(slice("a-1", Some("a"), &["10.0.0.1", "10.0.0.2"]), &mut ch);
        w.put_slice(slice("b-1", Some("b"), &["10.0.1.2"]), &mut ch);
        w.put_slice(slice("lb-1", Some("lb"), &["10.0.2.1"]), &mut ch);
        w.put_slice(slice("orphan", None, &["10.0.9.9"]), &mut ch);
        let mut t = Translator::new();
        let errors = t.rebuild(&w.services, &w.slices(), &node());
        let (want, want_errors) = model::translate(&w.services, &w.slices(), &node());
        assert_eq!(t.desired, want);
        assert_eq!(errors, want_errors);
        let steps: Vec<Box<dyn Fn(&mut World, &mut Changes)>> = vec![
            // An endpoint added, one removed.
            Box::new(|w, ch| w.put_slice(slice("a-1", Some("a"), &["10.0.0.1", "10.0.0.3"]), ch)),
            // A second slice, then its label moves to another Service.
            Box::new(|w, ch| w.put_slice(slice("a-2", Some("a"), &["10.0.0.4"]), ch)),
            Box::new(|w, ch| w.put_slice(slice("a-2", Some("b"), &["10.0.0.4"]), ch)),
            // A label lost, then found again.
            Box::new(|w, ch| w.put_slice(slice("a-2", None, &["10.0.0.4"]), ch)),
            Box::new(|w, ch| w.put_slice(slice("a-2", Some("a"), &["10.0.0.4"]), ch)),
            // A Service claiming b's external address: the later one wins, and b has it back once
            // the other goes.
            Box::new(|w, ch| w.put_service(svc("c", "{clusterIP: 172.30.0.4, externalIPs: [192.0.2.9], ports: [{port: 80}]}"), ch)),
            Box::new(|w, ch| w.put_slice(slice("c-1", Some("c"), &["10.0.3.1"]), ch)),
            Box::new(|w, ch| w.del_service("c", ch)),
            // Again, and the loser changes meanwhile: it wins with its new endpoints when c goes.
            Box::new(|w, ch| w.put_service(svc("c", "{clusterIP: 172.30.0.4, externalIPs: [192.0.2.9], ports: [{port: 80}]}"), ch)),
            Box::new(|w, ch| w.put_slice(slice("b-1", Some("b"), &["10.0.1.3"]), ch)),
            Box::new(|w, ch| w.del_service("c", ch)),
            // Three claimants: the middle one changes, the winner goes, then the middle one.
            Box::new(|w, ch| w.put_service(svc("c", "{clusterIP: 172.30.0.4, externalIPs: [192.0.2.9], ports: [{port: 80}]}"), ch)),
            Box::new(|w, ch| w.put_service(svc("e", "{clusterIP: 172.30.0.5, externalIPs: [192.0.2.9], ports: [{port: 80}]}"), ch)),
            Box::new(|w, ch| w.put_slice(slice("c-1", Some("c"), &["10.0.3.2"]), ch)),
            Box::new(|w, ch| w.del_service("e", ch)),
            Box::new(|w, ch| w.del_service("c", ch)),
            // The same ClusterIP twice, one goes: the address stays.
            Box::new(|w, ch| w.put_service(svc("d", "{clusterIP: 172.30.0.1, ports: [{port: 81}]}"), ch)),
            Box::new(|w, ch| w.del_service("d", ch)),
            // A local endpoint leaves, the health check says so; an invalid Service, fixed.
            Box::new(|w, ch| w.put_slice(slice("lb-1", Some("lb"), &["10.0.2.2"]), ch)),
            Box::new(|w, ch| w.put_service(svc("bad", "{clusterIP: 172.30.0.300, ports: [{port: 80}]}"), ch)),
            Box::new(|w, ch| w.put_service(svc("bad", "{clusterIP: 172.30.0.30, ports: [{port: 80}]}"), ch)),
            // Slices deleted, a Service deleted before its slice, nothing at all.
            Box::new(|w, ch| w.del_slice("a-1", ch)),
            Box::new(|w, ch| w.del_service("b", ch)),
            Box::new(|w, ch| w.del_slice("b-1", ch)),
            Box::new(|w, ch| w.del_slice("orphan", ch)),
            Box::new(|_, _| {}),
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut ch = Changes::default();
            step(&mut w, &mut ch);
            let before = t.desired.clone();
            let (delta, work) = t.apply(ch, &node());
            let (want, want_errors) = model::translate(&w.services, &w.slices(), &node());
            assert_eq!(t.desired, want, "step {i}");
            assert_eq!(error_set(&t.errors()), error_set(&want_errors), "step {i}");
            assert!(!work.full && work.translated <= 2, "step {i}: {work:?}");
            // Nothing is kept for a key that is neither a Service nor named by a slice, and each
            // slice is filed under the Service its label names.
            assert_eq!(t.counts(), (w.services.len(), w.slices.len()), "step {i}");
            assert!(t.services.values().all(|e| e.service.is_some() || !e.slices.is_empty()), "step {i}: an empty entry is kept");
            let filed: usize = t.services.values().map(|e| e.slices.len()).sum();
            assert_eq!(filed, w.slices.values().filter(|s| s.service_name.is_some()).count(), "step {i}");
            for (k, sl) in &t.slices {
                if let Ok(owner) = model::slice_owner(sl) {
                    assert!(t.services[&owner].slices.contains(k), "step {i}: {k:?} not filed under {owner:?}");
                }
            }
            // Whatever differs is in the delta.
            for fe in before.frontends.keys().chain(want.frontends.keys()) {
                if before.frontends.get(fe) != want.frontends.get(fe) {
                    assert!(delta.frontends.contains(fe), "step {i}: {fe} changed, not in the delta");
                }
            }
            for ip in before.cluster_ips.symmetric_difference(&want.cluster_ips) {
                assert!(delta.cluster_ips.contains(ip), "step {i}: {ip}");
            }
            for ip in before.local_endpoints.symmetric_difference(&want.local_endpoints) {
                assert!(delta.local_endpoints.contains(ip), "step {i}: {ip}");
            }
        }
        // Another node context: everything is translated again.
        let other = NodeContext { zone: None, ..node() };
        let (_, work) = t.apply(Changes::default(), &other);
        assert!(work.full && work.translated == w.services.len(), "{work:?}");
        assert_eq!(t.desired, model::translate(&w.services, &w.slices(), &other).0);
    }

    #[test]
    fn one_endpoint_among_many_services_retranslates_one_service() {
        let n = 2_000;
        let services: Vec<Service> = (0..n).map(|i| svc(&format!("s{i}"), &format!("{{clusterIP: 172.30.{}.{}, ports: [{{port: 80}}]}}", i / 250, i % 250 + 1))).collect();
        let slices: Vec<EndpointSlice> = (0..n).map(|i| slice(&format!("s{i}-x"), Some(&format!("s{i}")), &[&format!("10.1.{}.{}", i / 250, i % 250 + 2)])).collect();
        let mut t = Translator::new();
        t.rebuild(&services, &slices, &node());
        assert_eq!(t.translated, n);
        let mut ch = Changes::default();
        let changed = slice("s7-x", Some("s7"), &["10.1.0.9", "10.1.0.10"]);
        ch.slices.insert(model::slice_key(&changed), Some(Arc::new(changed.clone())));
        let (delta, work) = t.apply(ch, &node());
        assert_eq!(work, Work { translated: 1, full: false });
        assert_eq!(t.translated, n + 1);
        let fe = Frontend::internal(model::L4Addr { addr: "172.30.0.8".parse().unwrap(), port: 80, proto: model::Proto::Tcp });
        assert_eq!(delta.frontends, [fe].into());
        assert_eq!(delta.cluster_ips, ["172.30.0.8".parse().unwrap()].into());
        assert_eq!(t.desired.frontends[&fe].backends.len(), 2);
        // The same objects again (a relist, a manifest file of which one object changed): only
        // the changed one is translated, and the translator keeps the copies given.
        let mut ch = Changes::default();
        let again: Vec<Arc<Service>> = services[..10].iter().cloned().map(Arc::new).collect();
        for s in &again {
            ch.services.insert(model::service_key(s), Some(s.clone()));
        }
        for s in &slices[..10] {
            let s = if s.metadata.name.as_deref() == Some("s7-x") { changed.clone() } else { s.clone() };
            ch.slices.insert(model::slice_key(&s), Some(Arc::new(s)));
        }
        let moved = slice("s3-x", Some("s3"), &["10.1.0.99"]);
        ch.slices.insert(model::slice_key(&moved), Some(Arc::new(moved)));
        let (delta, work) = t.apply(ch, &node());
        assert_eq!(work, Work { translated: 1, full: false });
        let fe3 = Frontend::internal(model::L4Addr { addr: "172.30.0.4".parse().unwrap(), port: 80, proto: model::Proto::Tcp });
        assert_eq!(delta.frontends, [fe3].into());
        assert!(Arc::ptr_eq(&t.services[&model::service_key(&again[0])].service.as_ref().unwrap().1, &again[0]), "the copy given is kept");
        let (desired, _) = model::translate(&services, &[&slices[..3], &[slice("s3-x", Some("s3"), &["10.1.0.99"]), changed.clone()], &slices[4..7], &slices[8..]].concat(), &node());
        assert!(t.desired == desired, "the same as a full translation");
    }
}
