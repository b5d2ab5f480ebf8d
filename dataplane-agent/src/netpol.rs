//! NetworkPolicy (networking.k8s.io/v1) compiled into what the datapath looks up:
//!
//! - identities: one per label set (a pod's namespace and labels), one per ipBlock prefix, and
//!   the reserved HOST and WORLD;
//! - the ipcache: every pod address (/32), this node's addresses, every ipBlock and except prefix
//!   -> identity. The datapath takes the longest prefix, so an address in a CIDR but inside one
//!   of its excepts resolves to the except's identity, which the CIDR's rule does not select;
//! - per isolated pod of this node: which directions are isolated, and one rule entry per (peer
//!   identity, direction, protocol, port block) that some policy allows.
//!
//! ipBlock selects addresses, pods' included, as Calico does and as the upstream e2e tests expect
//! ("should enforce except clause while egress access to server in CIDR block"): a pod whose
//! address lies in some ipBlock or except prefix gets an identity of its own label set *and* the
//! set of those prefixes holding its address. Pods alike in both share it; a label peer selects
//! it as it selects its label set, an ipBlock peer when the address is in the block and in none
//! of its excepts. A pod matched by labels and by a block thus gets the union of the rules, and
//! the packet path still makes one ipcache lookup and one rule lookup. A `/32` block on one
//! replica's address selects that replica only, not every pod with its labels.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{identity, LocalAddr, PodIface, LOCAL_HOST, LOCAL_POD, PolEndpoint, PolRuleKey, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS, EP_F_INGRESS, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, RULE_PREFIX_ALL_PORTS, RULE_PREFIX_FULL, RULE_PREFIX_PROTO};
use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{
    error::ObjectError,
    reconcile::Cidr4,
    sources::{pod::Pod, Objects},
};

/// A rule entry: LPM prefix length and key.
pub type RuleEntry = (u32, PolRuleKey);

/// The compiled policy state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredPolicy {
    pub ipcache: BTreeMap<Cidr4, u32>,
    pub endpoints: BTreeMap<Ipv4Addr, PolEndpoint>,
    /// Rule -> the allowing policy's id (the lowest, when several allow the same).
    pub rules: BTreeMap<RuleEntry, u32>,
    /// Identity -> its label set, as shown by inspection and the monitor.
    pub identities: BTreeMap<u32, String>,
    /// Policy id -> `namespace/name`.
    pub policies: BTreeMap<u32, String>,
    /// Pod address -> `namespace/name`.
    pub pod_names: BTreeMap<Ipv4Addr, String>,
    /// Anti-spoofing: this node's addresses (`LOCAL_HOST`) and its pods' (`LOCAL_POD`, with the
    /// interface the pod is routed through), and the pod behind each pod interface. Filled by
    /// [`DesiredPolicy::resolve_local`] from `local_pod_ips` and the node's routes.
    pub local: BTreeMap<Ipv4Addr, LocalAddr>,
    pub pod_ifaces: BTreeMap<u32, PodIface>,
    /// Addresses of this node's pods (not hostNetwork), from the Pods.
    pub local_pod_ips: BTreeSet<Ipv4Addr>,
}

impl DesiredPolicy {
    /// Fills `local` and `pod_ifaces` for the pods of this node: each is found behind the
    /// interface its address is routed through (`oif`: a routed CNI gives every pod a route over
    /// its own interface). An interface that more than one pod is routed through (a bridge) is no
    /// pod's own: those pods are known as this node's (nothing from outside may claim them) but
    /// without an interface.
    pub fn resolve_local(&mut self, oif: impl Fn(Ipv4Addr) -> Option<u32>) {
        let mut by_if: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
        for ip in &self.local_pod_ips {
            match oif(*ip) {
                Some(i) if i != 0 => by_if.entry(i).or_default().push(*ip),
                _ => {
                    self.local.insert(*ip, LocalAddr { ifindex: 0, kind: LOCAL_POD });
                }
            }
        }
        for (ifindex, ips) in by_if {
            let own = ips.len() == 1;
            for ip in ips {
                if own {
                    self.local.insert(ip, LocalAddr { ifindex, kind: LOCAL_POD });
                    self.pod_ifaces.insert(ifindex, PodIface { addr_be: u32::from_ne_bytes(ip.octets()), pad: 0 });
                } else {
                    self.local.insert(ip, LocalAddr { ifindex: 0, kind: LOCAL_POD });
                }
            }
        }
    }
}

/// Stable numbers for identities and policies: kept while their name lives, so a change
/// rewrites only what it touches. Restored from the name maps at start-up.
#[derive(Clone, Debug, Default)]
pub struct Ids {
    pub identities: BTreeMap<String, u32>,
    pub policies: BTreeMap<String, u32>,
}

/// The number of `name`, allocating the next one (after the highest in use; the lowest free
/// one once the range is exhausted) for a new name.
fn alloc(map: &mut BTreeMap<String, u32>, used: &mut BTreeSet<u32>, name: &str, first: u32, limit: u32) -> Option<u32> {
    if let Some(id) = map.get(name) {
        return Some(*id);
    }
    let next = used.last().map(|m| m + 1).unwrap_or(first).max(first);
    let id = if next < limit { next } else { (first..limit).find(|i| !used.contains(i))? };
    map.insert(name.to_string(), id);
    used.insert(id);
    Some(id)
}

impl Ids {
    /// Forgets names no longer in use, so their numbers can be reused.
    fn retain(&mut self, identities: &BTreeSet<String>, policies: &BTreeSet<String>) {
        self.identities.retain(|k, _| identities.contains(k));
        self.policies.retain(|k, _| policies.contains(k));
    }
}

/// Does `labels` satisfy `sel`? (`None` selector: nothing; empty selector: everything.)
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let values: BTreeSet<&String> = e.values.iter().flatten().collect();
        let has = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => has.is_some_and(|v| values.contains(v)),
            "NotIn" => !has.is_some_and(|v| values.contains(v)),
            "Exists" => has.is_some(),
            "DoesNotExist" => has.is_none(),
            other => return Err(format!("matchExpressions[{i}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist")),
        };
        if matches!(e.operator.as_str(), "In" | "NotIn") && values.is_empty() {
            return Err(format!("matchExpressions[{i}].values: {} needs at least one value", e.operator));
        }
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A pod as policies see it.
struct PodInfo<'a> {
    ns: String,
    ip: Ipv4Addr,
    labels: BTreeMap<String, String>,
    identity: u32,
    local: bool,
    pod: &'a Pod,
}

fn pod_ip(p: &Pod) -> Option<Ipv4Addr> {
    let st = p.status.as_ref()?;
    if matches!(st.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    st.pod_ips.iter().flatten().map(|i| i.ip.as_str()).chain(st.pod_ip.as_deref()).find_map(|s| s.parse().ok())
}

/// Every IPv4 ipBlock and except prefix the policies name (pod identities depend on them).
fn block_prefixes(objs: &Objects) -> BTreeSet<Cidr4> {
    let mut out = BTreeSet::new();
    for np in &objs.network_policies {
        let Some(spec) = &np.spec else { continue };
        let ingress = spec.ingress.iter().flatten().flat_map(|r| r.from.iter().flatten());
        let egress = spec.egress.iter().flatten().flat_map(|r| r.to.iter().flatten());
        for b in ingress.chain(egress).filter_map(|p| p.ip_block.as_ref()) {
            for c in std::iter::once(&b.cidr).chain(b.except.iter().flatten()) {
                if let Ok(c) = c.parse::<Cidr4>() {
                    out.insert(c.network());
                }
            }
        }
    }
    out
}

/// An IPv6 CIDR (`fd00::/8`): valid in a policy, never matching the IPv4 datapath's traffic.
fn is_ipv6_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(a, p)| a.parse::<std::net::Ipv6Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 128))
}

fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        "SCTP" => Some(IPPROTO_SCTP),
        _ => None,
    }
}

/// Splits `[lo, hi]` into aligned power-of-two blocks: (start, bits of the port that vary).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        let mut bits = 0;
        while bits < 16 && lo & ((1 << (bits + 1)) - 1) == 0 && lo + (1 << (bits + 1)) - 1 <= hi {
            bits += 1;
        }
        out.push((lo as u16, bits));
        lo += 1 << bits;
    }
    out
}

/// The (protocol, first port, last port) ranges a port entry stands for; named ports resolved
/// through `named` (name, protocol) -> numbers. None: every port of every protocol.
fn port_ranges(ports: &Option<Vec<NetworkPolicyPort>>, named: &dyn Fn(&str, u8) -> Vec<u16>, err: &mut dyn FnMut(String, String)) -> Option<Vec<(u8, u16, u16)>> {
    let ports = ports.as_ref().filter(|p| !p.is_empty())?;
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let Some(proto) = proto_number(p.protocol.as_deref()) else {
            err(format!("ports[{i}].protocol"), format!("{:?} is not TCP, UDP or SCTP", p.protocol.as_deref().unwrap_or("")));
            continue;
        };
        match &p.port {
            None => out.push((proto, 0, u16::MAX)),
            Some(IntOrString::Int(n)) => {
                if !(1..=65535).contains(n) {
                    err(format!("ports[{i}].port"), format!("{n} is not a port"));
                    continue;
                }
                let end = p.end_port.unwrap_or(*n);
                if end < *n || end > 65535 {
                    err(format!("ports[{i}].endPort"), format!("{end} is not a port at or above {n}"));
                    continue;
                }
                out.push((proto, *n as u16, end as u16));
            }
            Some(IntOrString::String(name)) => {
                if p.end_port.is_some() {
                    err(format!("ports[{i}].endPort"), "endPort needs a numeric port".into());
                    continue;
                }
                for n in named(name, proto) {
                    out.push((proto, n, n));
                }
            }
        }
    }
    Some(out)
}

/// A pod's named container ports: (name, protocol) -> port numbers.
fn named_ports(p: &Pod) -> BTreeMap<(String, u8), BTreeSet<u16>> {
    let mut m: BTreeMap<(String, u8), BTreeSet<u16>> = BTreeMap::new();
    for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
        for cp in c.ports.iter().flatten() {
            if let (Some(name), Some(proto)) = (&cp.name, proto_number(cp.protocol.as_deref())) {
                m.entry((name.clone(), proto)).or_default().insert(cp.container_port as u16);
            }
        }
    }
    m
}

/// Compiles the policies for `node` (its name and addresses). Invalid policies or fields are
/// reported and left out (a policy with an invalid selector is dropped whole: guessing could open
/// what it meant to close); everything else applies.
pub fn translate(objs: &Objects, node: &str, node_ips: &[Ipv4Addr], ids: &mut Ids) -> (DesiredPolicy, Vec<ObjectError>) {
    let mut errors = Vec::new();
    let mut d = DesiredPolicy::default();
    let mut used_ids: BTreeSet<u32> = ids.identities.values().copied().collect();
    let mut used_pols: BTreeSet<u32> = ids.policies.values().copied().collect();
    let ns_labels: BTreeMap<String, BTreeMap<String, String>> = objs
        .namespaces
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let mut l = n.metadata.labels.clone().unwrap_or_default();
            // The API server sets this label on every namespace.
            l.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| name.clone());
            Some((name, l))
        })
        .collect();
    let labels_of_ns = |ns: &str| -> BTreeMap<String, String> {
        ns_labels.get(ns).cloned().unwrap_or_else(|| [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into())
    };

    // Identities of pods: their label set, and the ipBlock prefixes holding their address. Only
    // prefixes that hold some pods and not others tell pods apart: one holding every pod (an
    // `0.0.0.0/0`, the cluster's range) would re-key every pod for nothing.
    let pod_addrs: Vec<Ipv4Addr> = objs.pods.iter().filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true)).filter_map(|p| pod_ip(p)).collect();
    let all_prefixes: BTreeSet<Cidr4> = block_prefixes(objs).into_iter().filter(|c| !pod_addrs.iter().all(|ip| c.contains(*ip))).collect();
    let mut live_identities = BTreeSet::new();
    let mut pods = Vec::new();
    for p in &objs.pods {
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue; // host-network pods are the node, not policy endpoints
        }
        let Some(ip) = pod_ip(p) else { continue };
        let ns = p.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let labels: BTreeMap<String, String> = p.metadata.labels.clone().unwrap_or_default();
        let mut set = format!("{ns}:{}", labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","));
        let holding: Vec<String> = all_prefixes.iter().filter(|c| c.contains(ip)).map(|c| c.to_string()).collect();
        if !holding.is_empty() {
            set = format!("{set}|in:{}", holding.join(","));
        }
        live_identities.insert(set.clone());
        let Some(id) = alloc(&mut ids.identities, &mut used_ids, &set, identity::FIRST, dataplane_common::capacity::IDENTITIES) else {
            errors.push(ObjectError::new("Pod", format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()), "metadata.labels".into(), "out of identities"));
            continue;
        };
        d.identities.insert(id, set);
        d.pod_names.insert(ip, format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()));
        d.ipcache.insert(Cidr4 { addr: ip, prefix: 32 }, id);
        let local = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if local {
            d.local_pod_ips.insert(ip);
        }
        pods.push(PodInfo { ns, ip, labels, identity: id, local, pod: p });
    }
    for ip in node_ips {
        d.ipcache.insert(Cidr4 { addr: *ip, prefix: 32 }, identity::HOST);
        d.local.insert(*ip, LocalAddr { ifindex: 0, kind: LOCAL_HOST });
    }
    d.identities.insert(identity::HOST, "reserved:host".into());
    d.identities.insert(identity::WORLD, "reserved:world".into());

    // Every policy, and every ipBlock prefix they name. A policy is never left out whole: what
    // cannot be translated is named (an error for the log and /metrics) and fails closed. A
    // selector that does not parse selects no peer (its rule allows nothing through it) and, as
    // the podSelector, every pod of the namespace (isolated, with no rule); an unknown policyType
    // isolates both ways; a block that is not an IPv4 CIDR allows nothing.
    struct Pol<'a> {
        id: u32,
        name: String,
        spec: std::borrow::Cow<'a, NetworkPolicySpec>,
        ns: String,
        ingress: bool,
        egress: bool,
        /// The podSelector did not parse: the policy selects every pod of its namespace.
        selects_all: bool,
    }
    let mut pols = Vec::new();
    let mut prefixes: BTreeSet<Cidr4> = BTreeSet::new();
    let mut live_policies = BTreeSet::new();
    for np in &objs.network_policies {
        let ns = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = format!("{ns}/{}", np.metadata.name.clone().unwrap_or_default());
        let mut v6_notes = Vec::new();
        let mut bad = |field: String, msg: String| errors.push(ObjectError::new("NetworkPolicy", name.clone(), field, format!("{msg} (left untranslated; the policy still isolates the pods it selects)")));
        // An object without a spec is the API's default one: every pod, Ingress, no rule.
        let spec = match &np.spec {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(Default::default()),
        };
        let mut selects_all = false;
        if let Err(e) = selects(&spec.pod_selector.clone().unwrap_or_default(), &BTreeMap::new()) {
            bad(format!("spec.podSelector.{}", e.split(':').next().unwrap_or("")), format!("{e}: selecting every pod of namespace {ns}"));
            selects_all = true;
        }
        let mut types: Vec<String> = spec.policy_types.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        });
        if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != "Ingress" && *t != "Egress") {
            bad(format!("spec.policyTypes[{i}]"), format!("{t:?} is not Ingress or Egress: isolating for both"));
            types = vec!["Ingress".into(), "Egress".into()];
        }
        // Peers: selectors must parse, CIDRs must be IPv4 CIDRs.
        let sections = [("ingress", spec.ingress.as_ref().map(|r| r.iter().map(|r| &r.from).collect::<Vec<_>>())), ("egress", spec.egress.as_ref().map(|r| r.iter().map(|r| &r.to).collect::<Vec<_>>()))];
        for (section, rules) in &sections {
            for (ri, peers) in rules.iter().flatten().enumerate() {
                let dir = if *section == "ingress" { "from" } else { "to" };
                for (pi, peer) in peers.iter().flatten().enumerate() {
                    let at = format!("spec.{section}[{ri}].{dir}[{pi}]");
                    for (what, sel) in [("podSelector", &peer.pod_selector), ("namespaceSelector", &peer.namespace_selector)] {
                        if let Some(sel) = sel {
                            if let Err(e) = selects(sel, &BTreeMap::new()) {
                                bad(format!("{at}.{what}"), format!("{e}: this peer selects nothing"));
                            }
                        }
                    }
                    if let Some(b) = &peer.ip_block {
                        match b.cidr.parse::<Cidr4>() {
                            Ok(c) => {
                                prefixes.insert(c.network());
                            }
                            Err(_) if is_ipv6_cidr(&b.cidr) => {
                                v6_notes.push(ObjectError::ipv6(
                                    "NetworkPolicy",
                                    name.clone(),
                                    format!("{at}.ipBlock.cidr"),
                                    format!("{} is IPv6, which the IPv4 datapath does not match: this peer allows nothing (IPv6 into or out of isolated pods is dropped)", b.cidr),
                                ));
                            }
                            Err(e) => bad(format!("{at}.ipBlock.cidr"), format!("{e}: this peer allows nothing")),
                        }
                        for (ei, e) in b.except.iter().flatten().enumerate() {
                            match e.parse::<Cidr4>() {
                                Ok(c) => {
                                    prefixes.insert(c.network());
                                }
                                // An IPv6 exception never applies to IPv4 traffic.
                                Err(_) if is_ipv6_cidr(e) => {}
                                Err(err) => bad(format!("{at}.ipBlock.except[{ei}]"), format!("{err}: this peer allows nothing")),
                            }
                        }
                    }
                }
            }
        }
        live_policies.insert(name.clone());
        let Some(id) = alloc(&mut ids.policies, &mut used_pols, &name, 1, dataplane_common::capacity::POLICIES) else {
            bad("metadata.name".into(), "out of policy ids".into());
            errors.append(&mut v6_notes);
            continue;
        };
        errors.append(&mut v6_notes);
        d.policies.insert(id, name.clone());
        let (ingress, egress) = (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"));
        pols.push(Pol { id, name, spec, ns, ingress, egress, selects_all });
    }
    // ipBlock prefixes get identities of their own; a pod address inside one stays the pod's.
    for c in &prefixes {
        let set = format!("cidr:{c}");
        live_identities.insert(set.clone());
        if let Some(id) = alloc(&mut ids.identities, &mut used_ids, &set, identity::FIRST, dataplane_common::capacity::IDENTITIES) {
            d.identities.insert(id, set);
            d.ipcache.entry(*c).or_insert(id);
        }
    }
    let cidr_ids: Vec<(Cidr4, u32)> = prefixes.iter().filter_map(|c| d.ipcache.get(c).map(|id| (*c, *id))).collect();
    ids.retain(&live_identities, &live_policies);

    // The identities a peer selects, seen from a policy in namespace `ns`.
    let peer_identities = |peer: &NetworkPolicyPeer, ns: &str| -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        if let Some(b) = &peer.ip_block {
            let Ok(cidr) = b.cidr.parse::<Cidr4>() else { return out };
            // An exception that does not parse excepts everything (fails closed); an IPv6 one
            // nothing.
            if b.except.iter().flatten().any(|e| e.parse::<Cidr4>().is_err() && !is_ipv6_cidr(e)) {
                return out;
            }
            let except: Vec<Cidr4> = b.except.iter().flatten().filter_map(|e| e.parse().ok()).collect();
            for (c, id) in &cidr_ids {
                if cidr.covers(c) && !except.iter().any(|e| e.covers(c)) {
                    out.insert(*id);
                }
            }
            // Pods whose address is in the block (their identity says which prefixes hold it, so
            // every pod of that identity is in it too).
            for p in &pods {
                if cidr.contains(p.ip) && !except.iter().any(|e| e.contains(p.ip)) {
                    out.insert(p.identity);
                }
            }
            // This node's addresses are HOST in the ipcache.
            if node_ips.iter().any(|ip| cidr.contains(*ip) && !except.iter().any(|e| e.contains(*ip))) {
                out.insert(identity::HOST);
            }
            // Addresses no prefix or pod holds resolve to WORLD: selected by 0.0.0.0/0.
            if cidr.prefix == 0 && except.is_empty() {
                out.insert(identity::WORLD);
            }
            return out;
        }
        for p in &pods {
            let ns_ok = match &peer.namespace_selector {
                Some(sel) => selects(sel, &labels_of_ns(&p.ns)).unwrap_or(false),
                None => p.ns == ns,
            };
            let pod_ok = match &peer.pod_selector {
                Some(sel) => selects(sel, &p.labels).unwrap_or(false),
                None => true,
            };
            if ns_ok && pod_ok {
                out.insert(p.identity);
            }
        }
        out
    };

    // Rules of this node's pods.
    for ep in pods.iter().filter(|p| p.local) {
        let ep_id = u32::from(ep.ip);
        let mut entry = PolEndpoint { ep_id, ..Default::default() };
        for pol in &pols {
            let (ns, spec) = (pol.ns.clone(), &*pol.spec);
            if ns != ep.ns || !(pol.selects_all || selects(&spec.pod_selector.clone().unwrap_or_default(), &ep.labels).unwrap_or(false)) {
                continue;
            }
            for (dir, on, flag) in [(DIR_INGRESS, pol.ingress, EP_F_INGRESS), (DIR_EGRESS, pol.egress, EP_F_EGRESS)] {
                if !on {
                    continue;
                }
                if entry.flags & flag == 0 {
                    entry.flags |= flag;
                    if dir == DIR_INGRESS {
                        entry.ingress_policy = pol.id;
                    } else {
                        entry.egress_policy = pol.id;
                    }
                }
                if pol.selects_all {
                    // Selected because its selector could not be read: isolated, nothing allowed.
                    continue;
                }
                let rules: Vec<(&Option<Vec<NetworkPolicyPeer>>, &Option<Vec<NetworkPolicyPort>>)> = if dir == DIR_INGRESS {
                    spec.ingress.iter().flatten().map(|r| (&r.from, &r.ports)).collect()
                } else {
                    spec.egress.iter().flatten().map(|r| (&r.to, &r.ports)).collect()
                };
                let section = if dir == DIR_INGRESS { "ingress" } else { "egress" };
                for (ri, (peers, ports)) in rules.into_iter().enumerate() {
                    let peer_ids: Vec<(u32, Vec<&PodInfo>)> = match peers.as_ref().filter(|p| !p.is_empty()) {
                        None => vec![(identity::ANY, pods.iter().collect())],
                        Some(list) => {
                            let ids: BTreeSet<u32> = list.iter().flat_map(|peer| peer_identities(peer, &ns)).collect();
                            ids.into_iter().map(|id| (id, pods.iter().filter(|p| p.identity == id).collect())).collect()
                        }
                    };
                    for (peer_id, peer_pods) in peer_ids {
                        // Named ports: the ingress pod's own; for egress, the peer pods'.
                        let named = |name: &str, proto: u8| -> Vec<u16> {
                            let sources: Vec<&Pod> = if dir == DIR_INGRESS { vec![ep.pod] } else { peer_pods.iter().map(|p| p.pod).collect() };
                            let mut out = BTreeSet::new();
                            for p in sources {
                                if let Some(n) = named_ports(p).get(&(name.to_string(), proto)) {
                                    out.extend(n.iter().copied());
                                }
                            }
                            out.into_iter().collect()
                        };
                        let mut port_err = |field: String, msg: String| {
                            let e = ObjectError::new("NetworkPolicy", pol.name.clone(), format!("spec.{section}[{ri}].{field}"), msg);
                            if !errors.contains(&e) {
                                errors.push(e);
                            }
                        };
                        let base = PolRuleKey { ep_id_be: ep_id.to_be(), identity_be: peer_id.to_be(), dir, proto: 0, port_be: 0 };
                        let mut put = |prefix: u32, key: PolRuleKey| {
                            let v = d.rules.entry((prefix, key)).or_insert(pol.id);
                            *v = (*v).min(pol.id);
                        };
                        match port_ranges(ports, &named, &mut port_err) {
                            None => put(RULE_PREFIX_ALL_PORTS, base),
                            Some(ranges) => {
                                for (proto, lo, hi) in ranges {
                                    if lo == 0 && hi == u16::MAX {
                                        put(RULE_PREFIX_PROTO, PolRuleKey { proto, ..base });
                                        continue;
                                    }
                                    for (start, bits) in port_blocks(lo, hi) {
                                        put(RULE_PREFIX_FULL - bits, PolRuleKey { proto, port_be: start.to_be(), ..base });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if entry.flags != 0 {
            d.endpoints.insert(ep.ip, entry);
        }
    }
    (d, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(yaml: &str) -> Objects {
        let mut o = Objects::default();
        let mut errors = Vec::new();
        crate::sources::manifests::parse_str(yaml, "t", &mut o, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        o
    }

    const BASE: &str = "kind: Namespace\nmetadata: {name: db, labels: {env: prod}}\n---\n\
kind: Pod\nmetadata: {name: pg, namespace: db, labels: {app: pg}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.5}\n---\n\
kind: Pod\nmetadata: {name: api, namespace: web, labels: {app: api}}\nspec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIP: 10.1.0.5}\n---\n\
kind: Namespace\nmetadata: {name: web, labels: {env: prod}}\n---\n\
kind: NetworkPolicy\nmetadata: {name: pg-in, namespace: db}\nspec: {podSelector: {matchLabels: {app: pg}}, ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}]}]}\n";

    #[test]
    fn ipblocks_split_pod_identities_only_where_they_split_pods() {
        let node = ["192.168.0.2".parse().unwrap()];
        let mut ids = Ids::default();
        let (d, _) = translate(&objs(BASE), "n1", &node, &mut ids);
        let id = |d: &DesiredPolicy, ip: &str| d.ipcache[&format!("{ip}/32").parse().unwrap()];
        // A block holding every pod (here in another namespace) tells no pod apart: no re-keying.
        let wide = "---\nkind: NetworkPolicy\nmetadata: {name: out, namespace: other}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0, except: [172.16.0.0/12]}}]}]}\n";
        let (d2, e) = translate(&objs(&format!("{BASE}{wide}")), "n1", &node, &mut ids);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!((id(&d2, "10.0.0.5"), id(&d2, "10.1.0.5")), (id(&d, "10.0.0.5"), id(&d, "10.1.0.5")));
        // One that holds pg only: pg gets an identity of its own, still selected by its labels.
        let narrow = "---\nkind: NetworkPolicy\nmetadata: {name: out, namespace: other}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}]}]}\n";
        let (d3, _) = translate(&objs(&format!("{BASE}{narrow}")), "n1", &node, &mut ids);
        assert_ne!(id(&d3, "10.0.0.5"), id(&d, "10.0.0.5"));
        assert_eq!(id(&d3, "10.1.0.5"), id(&d, "10.1.0.5"));
        assert!(d3.identities[&id(&d3, "10.0.0.5")].ends_with("|in:10.0.0.0/24"), "{:?}", d3.identities);
        let peers: BTreeSet<u32> = d3.rules.keys().filter(|(_, k)| k.dir == DIR_INGRESS).map(|(_, k)| u32::from_be(k.identity_be)).collect();
        assert!(peers.contains(&id(&d3, "10.0.0.5")) && peers.contains(&id(&d3, "10.1.0.5")), "{peers:?}");
    }

    #[test]
    fn namespace_labels_decide_and_a_change_touches_only_its_rules() {
        let mut ids = Ids::default();
        let (d, e) = translate(&objs(BASE), "n1", &["192.168.0.2".parse().unwrap()], &mut ids);
        assert!(e.is_empty(), "{e:?}");
        let api = d.ipcache[&"10.1.0.5/32".parse().unwrap()];
        let peers: BTreeSet<u32> = d.rules.keys().map(|(_, k)| u32::from_be(k.identity_be)).collect();
        // Every pod of an env=prod namespace: api (web) and pg itself (db).
        assert!(peers.contains(&api) && peers.len() == 2, "{peers:?}");
        // web stops being prod: api's rule goes, pg's identity and entry stay the same.
        let (d2, _) = translate(&objs(&BASE.replace("name: web, labels: {env: prod}", "name: web, labels: {env: dev}")), "n1", &["192.168.0.2".parse().unwrap()], &mut ids);
        let peers2: BTreeSet<u32> = d2.rules.keys().map(|(_, k)| u32::from_be(k.identity_be)).collect();
        assert!(!peers2.contains(&api) && peers2.len() == 1);
        assert_eq!(d2.ipcache, d.ipcache, "identities are stable");
        assert!(d.rules.keys().filter(|(_, k)| u32::from_be(k.identity_be) != api).all(|k| d2.rules.contains_key(k)));
    }

    #[test]
    fn what_cannot_be_translated_is_named_and_fails_closed() {
        let extra = "---\nkind: Pod\nmetadata: {name: v, namespace: v6, labels: {app: v}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.6}\n\
---\nkind: Pod\nmetadata: {name: w, namespace: sel, labels: {app: w}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.7}\n\
---\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: db}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}, {podSelector: {matchLabels: {app: pg}}}]}]}\n\
---\nkind: NetworkPolicy\nmetadata: {name: only-v6, namespace: v6}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress], ingress: [{from: [{ipBlock: {cidr: 'fd00::/8'}}]}], egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]}\n\
---\nkind: NetworkPolicy\nmetadata: {name: worse, namespace: sel}\nspec: {podSelector: {matchExpressions: [{key: a, operator: Near}]}, ingress: [{}]}\n";
        let (d, e) = translate(&objs(&format!("{BASE}{extra}")), "n1", &[], &mut Ids::default());
        let text: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        for want in [
            "NetworkPolicy db/bad: spec.ingress[0].from[0].ipBlock.cidr:",
            "NetworkPolicy v6/only-v6: spec.ingress[0].from[0].ipBlock.cidr: fd00::/8 is IPv6",
            "NetworkPolicy v6/only-v6: spec.egress[0].to[0].ipBlock.cidr: ::/0 is IPv6",
            "NetworkPolicy sel/worse: spec.podSelector.",
        ] {
            assert!(text.iter().any(|t| t.starts_with(want)), "{want} in {text:?}");
        }
        // No policy is left out.
        let names: BTreeSet<String> = d.policies.values().cloned().collect();
        assert_eq!(names, ["db/bad", "db/pg-in", "sel/worse", "v6/only-v6"].map(String::from).into());
        let ep = |ip: &str| d.endpoints.get(&ip.parse::<Ipv4Addr>().unwrap()).copied();
        let rules_of = |ip: &str| d.rules.keys().filter(|(_, k)| u32::from_be(k.ep_id_be) == u32::from(ip.parse::<Ipv4Addr>().unwrap())).count();
        // The IPv6-only policy still isolates its pod both ways, with nothing allowed.
        assert_eq!(ep("10.0.0.6").map(|e| e.flags), Some(EP_F_INGRESS | EP_F_EGRESS));
        assert_eq!(rules_of("10.0.0.6"), 0);
        // A podSelector that does not parse selects every pod of its namespace, allowing nothing
        // (its rule `ingress: [{}]` would allow everything).
        assert_eq!(ep("10.0.0.7").map(|e| e.flags), Some(EP_F_INGRESS));
        assert_eq!(rules_of("10.0.0.7"), 0);
        // The bad block allows nothing; the rule's other peer (pg itself) still does.
        let pg = d.ipcache[&"10.0.0.5/32".parse().unwrap()];
        assert!(d.rules.keys().any(|(_, k)| u32::from_be(k.ep_id_be) == u32::from(Ipv4Addr::new(10, 0, 0, 5)) && u32::from_be(k.identity_be) == pg));
        assert!(!d.rules.keys().any(|(_, k)| u32::from_be(k.identity_be) == identity::ANY), "nothing became an any-peer rule");
    }

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 0)]);
        assert_eq!(port_blocks(8000, 8003), vec![(8000, 2)]);
        assert_eq!(port_blocks(32000, 32768), vec![(32000, 8), (32256, 9), (32768, 0)]);
        // Every port covered exactly once.
        let blocks = port_blocks(1, 65535);
        let total: u32 = blocks.iter().map(|(_, b)| 1u32 << b).sum();
        assert_eq!(total, 65535);
        assert!(blocks.len() <= 32);
    }

    #[test]
    fn selectors_with_expressions() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "canary", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        let l = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert!(selects(&sel, &l(&[("app", "web"), ("tier", "a")])).unwrap());
        assert!(!selects(&sel, &l(&[("app", "web"), ("tier", "c")])).unwrap());
        assert!(!selects(&sel, &l(&[("app", "web"), ("tier", "a"), ("canary", "1")])).unwrap());
        assert!(selects(&LabelSelector::default(), &l(&[])).unwrap());
        let bad: LabelSelector = serde_json::from_value(serde_json::json!({"matchExpressions": [{"key": "k", "operator": "Near"}]})).unwrap();
        assert!(selects(&bad, &l(&[])).is_err());
    }
}
