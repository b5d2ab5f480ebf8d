//! The one translation from Kubernetes objects to what the datapath must hold. Every source
//! (manifest files, the scenario runner, the API server) feeds this module; nothing else decides
//! what a Service means. Pure: no maps, no I/O, testable without root.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use crate::{
    addr::{self, Family},
    error::ObjectError,
    reconcile::Cidr4,
    sources::{service::Service, slice::EndpointSlice},
};

/// L4 protocols a Service port can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => dataplane_common::IPPROTO_TCP,
            Proto::Udp => dataplane_common::IPPROTO_UDP,
            Proto::Sctp => dataplane_common::IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            dataplane_common::IPPROTO_TCP => Some(Proto::Tcp),
            dataplane_common::IPPROTO_UDP => Some(Proto::Udp),
            dataplane_common::IPPROTO_SCTP => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// Parses a Kubernetes `protocol` field; absent means TCP, as the API defaults it.
    pub fn from_k8s(s: Option<&str>) -> Result<Proto, String> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            "SCTP" => Ok(Proto::Sctp),
            other => Err(format!("unsupported protocol {other:?} (TCP, UDP or SCTP)")),
        }
    }

    pub fn parse_lower(s: &str) -> Option<Proto> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "sctp" => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        })
    }
}

/// `address:port/proto`, used for both frontends and backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Which Service port a frontend belongs to, for logs and inspection. Shared strings: every
/// frontend of a Service, and each copy of one (the translator's part, the merged translation,
/// the reconciler's record), holds the same three. The namespace and name are the Service's
/// [`Key`] (the translator finds a frontend's Service by them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: Arc<str>,
}

impl ServicePortName {
    /// The Service's key.
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Parses what `Display` prints (`namespace/name` or `namespace/name:port`): names read back
/// from the maps.
impl std::str::FromStr for ServicePortName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, rest) = s.split_once('/').ok_or_else(|| format!("{s:?} is not namespace/name[:port]"))?;
        let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
        if namespace.is_empty() || name.is_empty() {
            return Err(format!("{s:?} is not namespace/name[:port]"));
        }
        Ok(ServicePortName { namespace: namespace.into(), name: name.into(), port: ServicePortName::port_name(port) })
    }
}

impl ServicePortName {
    /// A port's name as held: the empty name (a Service of one port) is one shared string, not
    /// an allocation a frontend.
    pub fn port_name(name: &str) -> Arc<str> {
        static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        if name.is_empty() {
            EMPTY.get_or_init(|| "".into()).clone()
        } else {
            name.into()
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// Where traffic to a frontend comes from: traffic policies make the answer differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// From pods of this node and from the node itself.
    Internal,
    /// Arriving from outside the node (NodePort, LoadBalancer and external IPs only).
    External,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Scope::Internal => dataplane_common::SCOPE_INTERNAL,
            Scope::External => dataplane_common::SCOPE_EXTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Option<Scope> {
        match n {
            dataplane_common::SCOPE_INTERNAL => Some(Scope::Internal),
            dataplane_common::SCOPE_EXTERNAL => Some(Scope::External),
            _ => None,
        }
    }
}

/// A Service address as seen from one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: L4Addr,
    pub scope: Scope,
}

impl Frontend {
    pub fn internal(addr: L4Addr) -> Self {
        Frontend { addr, scope: Scope::Internal }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::Internal => write!(f, "{}", self.addr),
            Scope::External => write!(f, "{} (external)", self.addr),
        }
    }
}

/// A frontend and the backends it must spread over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ServicePortName,
    pub backends: Backends,
    /// With no backend, drop rather than refuse: a traffic policy Local, and the Service has
    /// usable endpoints, only none on this node. (With none anywhere, kube-proxy refuses.)
    pub drop_empty: bool,
    /// New connections get this node's address as their source (kube-proxy's masquerade mark):
    /// external addresses of a Service with externalTrafficPolicy Cluster, and ClusterIPs with
    /// `--masquerade-all`.
    pub masquerade: bool,
    /// A NodePort, LoadBalancer or external IP frontend.
    pub external_ip: bool,
    /// sessionAffinity ClientIP timeout; 0 for none.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (LoadBalancer ingress IPs only); empty: everyone.
    pub source_ranges: BTreeSet<Cidr4>,
}

impl DesiredFrontend {
    pub fn new(service: ServicePortName, backends: Backends) -> Self {
        DesiredFrontend { service, backends, drop_empty: false, masquerade: false, external_ip: false, affinity_timeout_s: 0, source_ranges: BTreeSet::new() }
    }
}

/// A frontend's backends: sorted, each once. A boxed slice, as a set's first node would take 112
/// bytes for the usual three (8 MB at 100,000 Services); a frontend's backends are built once
/// and only read after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends(Box<[L4Addr]>);

impl Backends {
    pub fn iter(&self) -> std::slice::Iter<'_, L4Addr> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, b: &L4Addr) -> bool {
        self.0.binary_search(b).is_ok()
    }

    /// Adds `b`; false when it was there.
    pub fn insert(&mut self, b: L4Addr) -> bool {
        let Err(at) = self.0.binary_search(&b) else { return false };
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.insert(at, b);
        self.0 = v.into_boxed_slice();
        true
    }

    /// Removes `b`; false when it was not there.
    pub fn remove(&mut self, b: &L4Addr) -> bool {
        let Ok(at) = self.0.binary_search(b) else { return false };
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.remove(at);
        self.0 = v.into_boxed_slice();
        true
    }

    pub fn pop_first(&mut self) -> Option<L4Addr> {
        let first = *self.0.first()?;
        self.remove(&first);
        Some(first)
    }
}

impl FromIterator<L4Addr> for Backends {
    fn from_iter<I: IntoIterator<Item = L4Addr>>(it: I) -> Self {
        let mut v: Vec<L4Addr> = it.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Backends(v.into_boxed_slice())
    }
}

impl From<&BTreeSet<L4Addr>> for Backends {
    fn from(s: &BTreeSet<L4Addr>) -> Self {
        Backends(s.iter().copied().collect())
    }
}

impl From<BTreeSet<L4Addr>> for Backends {
    fn from(s: BTreeSet<L4Addr>) -> Self {
        Backends::from(&s)
    }
}

impl<const N: usize> From<[L4Addr; N]> for Backends {
    fn from(a: [L4Addr; N]) -> Self {
        a.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a L4Addr;
    type IntoIter = std::slice::Iter<'a, L4Addr>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Everything the datapath must hold for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, DesiredFrontend>,
    /// Addresses that are ClusterIPs: a port they do not expose is refused.
    pub cluster_ips: BTreeSet<Ipv4Addr>,
    /// Endpoint addresses on this node (backends flagged local).
    pub local_endpoints: BTreeSet<Ipv4Addr>,
    /// healthCheckNodePort -> what it reports (LoadBalancer Services with traffic policy Local).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// IPv6 addresses, CIDRs and EndpointSlices left aside by the IPv4 datapath (dual-stack
    /// objects are normal, not errors): counted for `/metrics`.
    pub ipv6_skipped: usize,
    /// Service ports whose traffic policy Local finds no endpoint on this node while the
    /// Service has usable ones elsewhere (their traffic is dropped here), as kube-proxy counts
    /// them for kubeproxy_sync_proxy_rules_no_local_endpoints_total: (internal, external).
    pub no_local_endpoints: (usize, usize),
}

/// What a Service's healthCheckNodePort answers on this node (kube-proxy's service health
/// server): 200 while the node has a ready local endpoint, 503 otherwise (also when only
/// terminating ones remain), so load balancers send traffic only to nodes that can serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// What the translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name (EndpointSlice `nodeName` of its endpoints).
    pub name: String,
    /// The node's addresses, on which NodePorts answer.
    pub ips: Vec<Ipv4Addr>,
    /// kube-proxy's `--nodeport-addresses`: NodePorts answer only on node addresses inside these
    /// (all node addresses when empty and `nodeport_primary` is false).
    pub nodeport_addresses: Vec<Cidr4>,
    /// kube-proxy's `primary` keyword (nftables mode's default): NodePorts answer on the node's
    /// primary address (the first of `ips`) too.
    pub nodeport_primary: bool,
    /// The node's `topology.kubernetes.io/zone` label, for EndpointSlice zone hints.
    pub zone: Option<String>,
    /// kube-proxy's `--masquerade-all`: every ClusterIP connection gets the node's address as
    /// its source.
    pub masquerade_all: bool,
}

/// The label kube-proxy reads its zone from.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

impl NodeContext {
    /// The addresses NodePorts answer on.
    pub fn nodeport_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let all = self.nodeport_addresses.is_empty() && !self.nodeport_primary;
        self.ips.iter().enumerate().filter(move |(i, ip)| all || (self.nodeport_primary && *i == 0) || self.nodeport_addresses.iter().any(|c| c.contains(**ip))).map(|(_, ip)| *ip)
    }
}

/// kube-proxy's default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Label that names the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy; kube-proxy ignores them and so do we.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

fn obj_name(ns: &Option<Arc<str>>, name: &Option<Arc<str>>) -> String {
    format!("{}/{}", ns.as_deref().unwrap_or("default"), name.as_deref().unwrap_or("<unnamed>"))
}

/// Translates Services and EndpointSlices into the desired datapath state of `node`. Objects
/// that cannot be understood are reported (with the object and the field) and skipped; the rest
/// still counts.
pub fn translate<S: std::borrow::Borrow<Service>, E: std::borrow::Borrow<EndpointSlice>>(services: &[S], slices: &[E], node: &NodeContext) -> (Desired, Vec<ObjectError>) {
    let (by_service, mut errors) = slices_by_service(slices);
    let mut desired = Desired::default();
    for svc in services.iter().map(std::borrow::Borrow::borrow) {
        let part = translate_service(svc, by_service.get(&service_key(svc)).map(Vec::as_slice).unwrap_or(&[]), node);
        errors.extend(part.errors.iter().cloned());
        part.desired.merge_into(&mut desired);
    }
    (desired, dedup_errors(errors))
}

/// A Service's key: (namespace, name), as EndpointSlices name it. Shared strings: the
/// translator keeps a key in several indexes (the Service, its part, its slices' owner, each
/// frontend's claims), and a clone costs a count, not two allocations.
pub type Key = (Arc<str>, Arc<str>);

pub fn service_key(svc: &Service) -> Key {
    svc.metadata.key()
}

/// An EndpointSlice's own key: (namespace, name).
pub fn slice_key(slice: &EndpointSlice) -> Key {
    slice.metadata.key()
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label), or the
/// error a slice without one is.
pub fn slice_owner(slice: &EndpointSlice) -> Result<Key, ObjectError> {
    match &slice.service_name {
        Some(svc) => Ok((slice.metadata.key().0, (**svc).into())),
        None => Err(ObjectError::new("EndpointSlice", obj_name(&slice.metadata.namespace, &slice.metadata.name),
            format!("metadata.labels[{LABEL_SERVICE_NAME}]"), "missing: the slice belongs to no Service")),
    }
}

/// Endpoints indexed by (namespace, service name) once: O(slices), not O(services*slices); and
/// the slices that belong to no Service.
fn slices_by_service<E: std::borrow::Borrow<EndpointSlice>>(slices: &[E]) -> (BTreeMap<Key, Vec<&EndpointSlice>>, Vec<ObjectError>) {
    let mut errors = Vec::new();
    let mut by_service: BTreeMap<Key, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.iter().map(std::borrow::Borrow::borrow) {
        match slice_owner(slice) {
            Ok(k) => by_service.entry(k).or_default().push(slice),
            Err(e) => errors.push(e),
        }
    }
    (by_service, errors)
}

/// What one Service asks of the datapath (its part of [`Desired`]), and its errors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDesired {
    pub desired: Desired,
    pub errors: Vec<ObjectError>,
}

impl Desired {
    /// Adds one Service's part: what it shares with earlier ones (a frontend, a health check
    /// port) is its own from now on, as in [`translate`], where later Services win.
    pub fn merge_into(&self, into: &mut Desired) {
        into.frontends.extend(self.frontends.iter().map(|(k, v)| (*k, v.clone())));
        into.cluster_ips.extend(self.cluster_ips.iter().copied());
        into.local_endpoints.extend(self.local_endpoints.iter().copied());
        into.health_checks.extend(self.health_checks.iter().map(|(k, v)| (*k, v.clone())));
        into.ipv6_skipped += self.ipv6_skipped;
        into.no_local_endpoints.0 += self.no_local_endpoints.0;
        into.no_local_endpoints.1 += self.no_local_endpoints.1;
    }
}

/// Translates one Service with its EndpointSlices (those labelled with its name).
pub fn translate_service(svc: &Service, slices: &[&EndpointSlice], node: &NodeContext) -> ServiceDesired {
    let mut part = ServiceDesired::default();
    translate_service_into(svc, slices, node, &mut part.desired, &mut part.errors);
    part.errors = dedup_errors(std::mem::take(&mut part.errors));
    part
}

fn translate_service_into(svc: &Service, slices: &[&EndpointSlice], node: &NodeContext, desired: &mut Desired, errors: &mut Vec<ObjectError>) {
    let name = obj_name(&svc.metadata.namespace, &svc.metadata.name);
    let err = |field: &str, msg: String| ObjectError::new("Service", name.clone(), field.to_string(), msg);
    if svc.other_proxy {
        return;
    }
    let Some(spec) = &svc.spec else {
        errors.push(err("spec", "missing".into()));
        return;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(|ip| &**ip).collect(),
        (_, Some(ip)) => vec![&**ip],
        _ => {
            errors.push(err("spec.clusterIP", "missing".into()));
            return;
        }
    };
    if ips.iter().any(|ip| *ip == "None") {
        return; // headless: DNS only, nothing for a proxy to do
    }
    let v6 = &mut desired.ipv6_skipped;
    let addrs = parse_ipv4s(&ips, "spec.clusterIPs", &err, errors, v6);
    if addrs.is_empty() {
        return; // IPv6 only (or nothing readable, reported): nothing for this datapath
    }
    let external_ips = parse_ipv4s(spec.external_ips.as_deref().unwrap_or(&[]), "spec.externalIPs", &err, errors, v6);
    // kube-proxy programs VIP-mode load balancer addresses only: with `ipMode: Proxy` the
    // load balancer delivers to the node itself, and the address must stay unclaimed here.
    let lb_ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().map(|i| if i.ip_mode.as_deref() == Some("Proxy") { String::new() } else { i.ip.clone().unwrap_or_default() }).collect())
        .unwrap_or_default();
    let lb_ips = parse_ipv4s(&lb_ingress, "status.loadBalancer.ingress[].ip", &err, errors, v6);
    let mut source_ranges = BTreeSet::new();
    let mut allow_all = false;
    for (i, r) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        match addr::parse_cidr(r.trim()) {
            // 0.0.0.0/0 allows everyone, as no range does (kube-proxy's IsZeroCIDR).
            Ok(Family::V4(c)) if c.prefix == 0 => allow_all = true,
            Ok(Family::V4(c)) => {
                source_ranges.insert(c);
            }
            Ok(Family::V6) => *v6 += 1,
            Err(e) => errors.push(err(&format!("spec.loadBalancerSourceRanges[{i}]"), e)),
        }
    }
    if allow_all {
        source_ranges.clear();
    }
    // A load balancer whose VIP is also a local address of the nodes (routed to them)
    // makes a node's request to it arrive from the VIP itself: kube-proxy lets those in
    // when a range admits the node (its primary address).
    if node.ips.first().is_some_and(|ip| source_ranges.iter().any(|c| c.contains(*ip))) {
        source_ranges.extend(lb_ips.iter().map(|ip| Cidr4 { addr: *ip, prefix: 32 }));
    }
    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    } else {
        0
    };
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));

    let (ns, svc_name) = svc.metadata.key();
    let mut any_port = false;
    let mut local_ready: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for (pi, port) in spec.ports.iter().flatten().enumerate() {
        let proto = match Proto::from_k8s(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                errors.push(err(&format!("spec.ports[{pi}].protocol"), e));
                continue;
            }
        };
        let Some(number) = port_number(port.port) else {
            errors.push(err(&format!("spec.ports[{pi}].port"), format!("{} is not a port number (1-65535)", port.port)));
            continue;
        };
        any_port = true;
        let port_name = port.name.clone().unwrap_or_default();
        let service = ServicePortName { namespace: ns.clone(), name: svc_name.clone(), port: ServicePortName::port_name(&port_name) };
        let eps = endpoints_for_port(slices, &port_name, proto, &node.name, errors, &mut desired.ipv6_skipped);
        // Topology (hints written by the EndpointSlice controller for trafficDistribution
        // and topology-aware routing) narrows the cluster-wide endpoints only.
        let mode = topology_mode(&eps, &node.name, node.zone.as_deref());
        let cluster = usable(eps.iter().filter(|e| mode.allows(e, &node.name, node.zone.as_deref())));
        let local = usable(eps.iter().filter(|e| e.local));
        // Usable endpoints anywhere: with none, a traffic policy Local refuses as Cluster
        // does; with some, but none here, it drops (kube-proxy's hasEndpoints).
        let any_usable = eps.iter().any(|e| e.ready || (e.serving && e.terminating));
        local_ready.extend(eps.iter().filter(|e| e.local && e.ready).map(|e| e.addr.addr));
        desired.local_endpoints.extend(eps.iter().filter(|e| e.local).map(|e| e.addr.addr));
        let fe = |backends: &BTreeSet<L4Addr>, policy_local: bool, external_ip: bool, ranges: &BTreeSet<Cidr4>| DesiredFrontend {
            service: service.clone(),
            backends: backends.into(),
            drop_empty: policy_local && any_usable,
            masquerade: if external_ip { !etp_local } else { node.masquerade_all },
            external_ip,
            affinity_timeout_s,
            source_ranges: ranges.clone(),
        };
        let none = BTreeSet::new();
        // ClusterIP: internal traffic only; internalTrafficPolicy Local keeps it on the node
        // and drops it when the node has no endpoint.
        let internal = if itp_local { &local } else { &cluster };
        for addr in &addrs {
            desired.frontends.insert(Frontend::internal(L4Addr { addr: *addr, port: number, proto }), fe(internal, itp_local, false, &none));
        }
        // NodePort, LoadBalancer and external IPs: to local traffic (pods, as the local
        // detector tells them, and the node itself) every endpoint serves (kube-proxy's
        // short-circuit for externalTrafficPolicy Local); to the rest, externalTrafficPolicy
        // Local means this node's endpoints only, or a drop. With Cluster, every connection
        // is masqueraded, whichever backend it gets.
        let external = if etp_local { &local } else { &cluster };
        // kube-proxy's counts: a policy Local with usable endpoints, none of them here
        // (externalTrafficPolicy only where the Service is reachable from outside).
        if any_usable && local.is_empty() {
            desired.no_local_endpoints.0 += itp_local as usize;
            desired.no_local_endpoints.1 += (etp_local && (node_port_type || !external_ips.is_empty())) as usize;
        }
        let mut ext_addrs: Vec<(L4Addr, bool)> = Vec::new();
        if node_port_type {
            match port.node_port.map(port_number) {
                Some(Some(np)) => ext_addrs.extend(node.nodeport_ips().map(|ip| (L4Addr { addr: ip, port: np, proto }, false))),
                Some(None) => errors.push(err(&format!("spec.ports[{pi}].nodePort"), format!("{:?} is not a port number (1-65535)", port.node_port))),
                // LoadBalancer with allocateLoadBalancerNodePorts false has none; NodePort
                // without one has not been allocated yet.
                None => {}
            }
        }
        ext_addrs.extend(external_ips.iter().map(|ip| (L4Addr { addr: *ip, port: number, proto }, false)));
        if spec.type_.as_deref() == Some("LoadBalancer") {
            ext_addrs.extend(lb_ips.iter().map(|ip| (L4Addr { addr: *ip, port: number, proto }, true)));
        }
        for (a, is_lb) in ext_addrs {
            let ranges = if is_lb { &source_ranges } else { &none };
            desired.frontends.insert(Frontend { addr: a, scope: Scope::Internal }, fe(&cluster, false, true, ranges));
            desired.frontends.insert(Frontend { addr: a, scope: Scope::External }, fe(external, etp_local, true, ranges));
        }
    }
    if any_port {
        desired.cluster_ips.extend(addrs);
    }
    if etp_local && spec.type_.as_deref() == Some("LoadBalancer") {
        match spec.health_check_node_port.map(port_number) {
            Some(Some(hc)) => {
                desired.health_checks.insert(hc, HealthCheck { namespace: ns.to_string(), name: svc_name.to_string(), local_endpoints: local_ready.len() });
            }
            Some(None) => errors.push(err("spec.healthCheckNodePort", format!("{:?} is not a port number (1-65535)", spec.health_check_node_port))),
            None => {}
        }
    }
}

fn port_number(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The IPv4 addresses of an address list; IPv6 ones (dual-stack objects) are counted in `v6`
/// and left aside, empty entries skipped, anything unreadable reported with its index.
fn parse_ipv4s(ips: &[impl AsRef<str>], field: &str, err: &dyn Fn(&str, String) -> ObjectError, errors: &mut Vec<ObjectError>, v6: &mut usize) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (i, ip) in ips.iter().map(AsRef::as_ref).enumerate() {
        if ip.is_empty() {
            continue;
        }
        let f = if field.ends_with("[].ip") { field.replace("[]", &format!("[{i}]")) } else { format!("{field}[{i}]") };
        match addr::parse_ip(ip) {
            Ok(Family::V4(a)) => out.push(a),
            Ok(Family::V6) => *v6 += 1,
            Err(e) => errors.push(err(&f, e)),
        }
    }
    out
}

/// One endpoint address for one Service port, with what selection needs to know.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: L4Addr,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// kube-proxy's topology mode for a Service port (pkg/proxy/topology.go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint.
    None,
    /// Endpoints hinted for this node (PreferSameNode).
    NodeHints,
    /// Endpoints hinted for this node's zone (PreferClose, PreferSameZone, topology-aware hints).
    ZoneHints,
}

impl Topology {
    fn allows(self, e: &Endpoint, node: &str, zone: Option<&str>) -> bool {
        match self {
            Topology::None => true,
            Topology::NodeHints => e.node_hints.iter().any(|n| n == node),
            Topology::ZoneHints => zone.is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
        }
    }
}

/// As kube-proxy's `topologyModeFromHints`: hints are used only when every ready endpoint has
/// them and at least one is for this node (node hints) or its zone (zone hints); otherwise all
/// endpoints serve, so a missing or partial hint never black-holes a Service.
fn topology_mode(eps: &[Endpoint], node: &str, zone: Option<&str>) -> Topology {
    let ready: Vec<&Endpoint> = eps.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.iter().any(|n| n == node)) {
        return Topology::NodeHints;
    }
    if let Some(z) = zone {
        if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.iter().any(|h| h == z)) {
            return Topology::ZoneHints;
        }
    }
    Topology::None
}

/// The endpoints traffic may go to, as kube-proxy picks them (KEP-1669): the ready ones; when
/// there is none, the ones still serving while terminating (so connections drain instead of
/// failing during a rollout).
fn usable<'a>(eps: impl Iterator<Item = &'a Endpoint> + Clone) -> BTreeSet<L4Addr> {
    let ready: BTreeSet<L4Addr> = eps.clone().filter(|e| e.ready).map(|e| e.addr).collect();
    if !ready.is_empty() {
        return ready;
    }
    eps.filter(|e| e.serving && e.terminating).map(|e| e.addr).collect()
}

/// Endpoints of the slices for the Service port named `port_name`. kube-proxy matches
/// EndpointSlice ports to Service ports by name (the controller already resolved named
/// targetPorts into numbers). Absent conditions: ready and serving are "unknown", which consumers
/// treat as true; terminating absent is false.
fn endpoints_for_port(slices: &[&EndpointSlice], port_name: &str, proto: Proto, node: &str, errors: &mut Vec<ObjectError>, v6: &mut usize) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
        let name = obj_name(&slice.metadata.namespace, &slice.metadata.name);
        if &*slice.address_type == "IPv6" {
            // The other family's slice of a dual-stack Service (counted once per port).
            *v6 += 1;
            continue;
        }
        if &*slice.address_type != "IPv4" {
            errors.push(ObjectError::new("EndpointSlice", name.clone(), "addressType".into(),
                format!("{:?} is not supported (IPv4 and IPv6 only; FQDN slices are not for proxies)", slice.address_type)));
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name && Proto::from_k8s(p.protocol.as_deref()).ok() == Some(proto)
        }) else {
            continue;
        };
        let Some(number) = port.port.and_then(port_number) else {
            errors.push(ObjectError::new("EndpointSlice", name.clone(), format!("ports[name={port_name:?}].port"),
                format!("{:?} is not a port number (1-65535)", port.port)));
            continue;
        };
        for (ei, ep) in slice.endpoints.iter().flatten().enumerate() {
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let local = !node.is_empty() && ep.node_name.as_deref() == Some(node);
            let hints = ep.hints.as_ref();
            let zone_hints: Vec<String> = hints.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| z.name.clone()).collect()).unwrap_or_default();
            let node_hints: Vec<String> = hints.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| n.name.clone()).collect()).unwrap_or_default();
            // The first address is the endpoint's (the others are fungible, and kube-proxy
            // reads only the first): the only one kept.
            for (ai, a) in ep.address.iter().enumerate() {
                match a.family() {
                    Ok(Family::V4(addr)) => out.push(Endpoint {
                        addr: L4Addr { addr, port: number, proto },
                        local,
                        ready,
                        serving,
                        terminating,
                        zone_hints: zone_hints.clone(),
                        node_hints: node_hints.clone(),
                    }),
                    Ok(Family::V6) => errors.push(ObjectError::new("EndpointSlice", name.clone(),
                        format!("endpoints[{ei}].addresses[{ai}]"), format!("{:?} is IPv6 in an IPv4 slice", a.to_string()))),
                    Err(e) => errors.push(ObjectError::new("EndpointSlice", name.clone(), format!("endpoints[{ei}].addresses[{ai}]"), e)),
                }
            }
        }
    }
    out
}

/// Builds `map` again with its nodes full. A B-tree filled one insert at a time leaves its
/// nodes 6 of 11 full when the keys come in order (a full sync writes frontends in order) and
/// about 7 in random order. `append` builds a tree in bulk from both maps' sorted entries,
/// every node full but those on its right edge, and frees the old nodes as it goes: no copy of
/// the entries is made, nor a sort (as `collect` does: a second copy of every entry at the
/// sync's peak). O(n), as the full translation or sync that filled the map.
pub fn compact<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    let Some(first) = map.pop_first() else { return };
    let mut packed = BTreeMap::from([first]);
    packed.append(map);
    *map = packed;
}

/// Dedupes errors that the per-port loop reports once per port.
pub fn dedup_errors(mut errors: Vec<ObjectError>) -> Vec<ObjectError> {
    let mut seen = BTreeSet::new();
    errors.retain(|e| seen.insert(e.to_string()));
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_map_holds_the_same_entries() {
        for n in [0u32, 1, 2, 11, 12, 1_000] {
            let mut m: BTreeMap<u32, String> = (0..n).map(|i| (i * 7, i.to_string())).collect();
            // Some taken out, some put in again: nodes part full, as a sync leaves them.
            for i in (0..n).step_by(3) {
                m.remove(&(i * 7));
            }
            m.extend((0..n).step_by(6).map(|i| (i * 7, format!("again {i}"))));
            let before = m.clone();
            compact(&mut m);
            assert_eq!(m, before, "{n} entries");
            assert!(m.iter().zip(m.iter().skip(1)).all(|(a, b)| a.0 < b.0));
        }
    }
    use crate::sources::{manifests, Objects};

    #[test]
    fn backends_stay_sorted_and_each_once_as_a_set_would() {
        let b = |i: u8| be(&format!("10.0.0.{i}"), 80, Proto::Tcp);
        let mut set = BTreeSet::new();
        let mut ours: Backends = [b(3), b(1), b(3), b(2)].into();
        set.extend([b(3), b(1), b(2)]);
        // A fixed walk of inserts and removes, present and absent, each answered as a set does.
        for step in 0u32..200 {
            let x = b((step * 7 % 11) as u8);
            if step % 3 == 0 {
                assert_eq!(ours.remove(&x), set.remove(&x), "step {step}");
            } else if step % 17 == 0 {
                assert_eq!(ours.pop_first(), set.pop_first(), "step {step}");
            } else {
                assert_eq!(ours.insert(x), set.insert(x), "step {step}");
            }
            assert_eq!(ours.iter().copied().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>(), "step {step}");
            assert_eq!((ours.len(), ours.is_empty(), ours.contains(&x)), (set.len(), set.is_empty(), set.contains(&x)));
        }
        assert_eq!(Backends::from(&set), set.iter().copied().collect());
    }

    fn translate_yaml(yaml: &str) -> (Desired, Vec<String>) {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "t", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node = NodeContext { name: "node1".into(), ips: vec!["192.168.0.2".parse().unwrap()], nodeport_addresses: vec![], nodeport_primary: false, zone: Some("zone-a".into()), masquerade_all: false };
        let (d, e) = translate(&objs.services, &objs.endpoint_slices, &node);
        (d, e.iter().map(|e| e.to_string()).collect())
    }

    fn svc(name: &str, spec: &str) -> String {
        format!("kind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}\n---\n")
    }

    fn slice(svc: &str, body: &str) -> String {
        format!("kind: EndpointSlice\nmetadata: {{name: {svc}-x, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\n{body}\n---\n")
    }

    fn be(ip: &str, port: u16, proto: Proto) -> L4Addr {
        L4Addr { addr: ip.parse().unwrap(), port, proto }
    }

    fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend::internal(be(ip, port, proto))
    }

    fn ext(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend { addr: be(ip, port, proto), scope: Scope::External }
    }

    #[test]
    fn services_kube_proxy_leaves_alone_are_left_alone() {
        let (d, e) = translate_yaml(&[
            svc("headless", "{clusterIP: None, ports: [{port: 80}]}"),
            svc("external", "{type: ExternalName, externalName: example.com}"),
            "kind: Service\nmetadata: {name: other-proxy, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: foo}}\nspec: {clusterIP: 172.30.0.9, ports: [{port: 80}]}\n---\n".to_string(),
        ]
        .concat());
        assert!(d.frontends.is_empty() && d.cluster_ips.is_empty(), "{d:?}");
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn endpoints_match_service_ports_by_name_and_protocol_and_readiness() {
        let yaml = [
            svc("web", "{clusterIP: 172.30.0.1, ports: [{name: http, port: 80, targetPort: web}, {name: dns, port: 53, protocol: UDP}]}"),
            slice("web", "addressType: IPv4\nports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: other, port: 1}]\nendpoints:\n- {addresses: [10.0.0.1]}\n- {addresses: [10.0.0.2], conditions: {ready: false}}\n- {addresses: [10.0.0.3], conditions: {ready: true}}"),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml);
        assert!(e.is_empty(), "{e:?}");
        let http = &d.frontends[&fe("172.30.0.1", 80, Proto::Tcp)];
        assert_eq!(http.backends, [be("10.0.0.1", 8080, Proto::Tcp), be("10.0.0.3", 8080, Proto::Tcp)].into());
        assert_eq!(http.service.to_string(), "ns/web:http");
        let dns = &d.frontends[&fe("172.30.0.1", 53, Proto::Udp)];
        assert_eq!(dns.backends, [be("10.0.0.1", 5353, Proto::Udp), be("10.0.0.3", 5353, Proto::Udp)].into());
        assert_eq!(d.cluster_ips, ["172.30.0.1".parse().unwrap()].into());
    }

    #[test]
    fn health_check_counts_ready_local_endpoints_only() {
        let yaml = [
            svc("lb", "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 172.30.0.5, ports: [{port: 80, nodePort: 30080}]}"),
            slice("lb", "addressType: IPv4\nports: [{port: 80}]\nendpoints:\n- {addresses: [10.0.0.1], nodeName: node1}\n- {addresses: [10.0.0.2], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: [10.9.0.1], nodeName: node2}"),
            svc("drain", "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32001, clusterIP: 172.30.0.6, ports: [{port: 80, nodePort: 30081}]}"),
            slice("drain", "addressType: IPv4\nports: [{port: 80}]\nendpoints:\n- {addresses: [10.0.0.3], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}"),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(d.health_checks[&32000], HealthCheck { namespace: "ns".into(), name: "lb".into(), local_endpoints: 1 });
        // Only terminating endpoints left: the node reports 0 (503), though they still serve.
        assert_eq!(d.health_checks[&32001].local_endpoints, 0);
        assert_eq!(d.frontends[&ext("192.168.0.2", 30081, Proto::Tcp)].backends, [be("10.0.0.3", 80, Proto::Tcp)].into());
    }

    #[test]
    fn topology_hints_as_kube_proxy_reads_them() {
        let ep = |ip: &str, zone: &str, node: &str| format!("- {{addresses: [{ip}], hints: {{forZones: [{{name: {zone}}}], forNodes: [{{name: {node}}}]}}}}\n");
        let yaml = [
            svc("zonal", "{clusterIP: 172.30.0.1, ports: [{port: 80}]}"),
            slice("zonal", &format!("addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{}{}{}", ep("10.0.0.1", "zone-a", "node9"), ep("10.0.0.2", "zone-b", "node8"), ep("10.0.0.3", "zone-a", "node7"))),
            svc("samenode", "{clusterIP: 172.30.0.2, ports: [{port: 80}]}"),
            slice("samenode", &format!("addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{}{}", ep("10.0.1.1", "zone-a", "node1"), ep("10.0.1.2", "zone-a", "node2"))),
            svc("otherzone", "{clusterIP: 172.30.0.3, ports: [{port: 80}]}"),
            slice("otherzone", &format!("addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{}{}", ep("10.0.2.1", "zone-b", "node8"), ep("10.0.2.2", "zone-c", "node7"))),
            svc("partial", "{clusterIP: 172.30.0.4, ports: [{port: 80}]}"),
            slice("partial", &format!("addressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{}- {{addresses: [10.0.3.2]}}\n", ep("10.0.3.1", "zone-a", "node9"))),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml);
        assert!(e.is_empty(), "{e:?}");
        let b = |ip: &str| d.frontends[&fe(ip, 80, Proto::Tcp)].backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
        assert_eq!(b("172.30.0.1"), ["10.0.0.1", "10.0.0.3"], "zone hints for this node's zone");
        assert_eq!(b("172.30.0.2"), ["10.0.1.1"], "node hints win (PreferSameNode)");
        assert_eq!(b("172.30.0.3"), ["10.0.2.1", "10.0.2.2"], "no endpoint hinted for this zone: all");
        assert_eq!(b("172.30.0.4"), ["10.0.3.1", "10.0.3.2"], "not every endpoint hinted: all");
    }

    #[test]
    fn bad_fields_are_named_and_the_rest_is_kept() {
        let yaml = [
            svc("v6", "{clusterIPs: [172.30.0.2, 'fd00::2'], ports: [{port: 80}]}"),
            svc("v6only", "{clusterIPs: ['fd00::3'], ports: [{port: 80}]}"),
            svc("badip", "{clusterIP: 172.30.0.300, ports: [{port: 80}]}"),
            svc("badport", "{clusterIP: 172.30.0.3, ports: [{port: 0}, {port: 81, protocol: ICMP}, {port: 82}]}"),
            slice("badport", "addressType: IPv4\nports: [{port: 82}]\nendpoints: [{addresses: [10.0.0.1, not-read]}, {addresses: [not-an-ip]}]"),
            slice("v6", "addressType: IPv6\nports: [{port: 80}]\nendpoints: [{addresses: ['fd00::5']}]"),
            "kind: EndpointSlice\nmetadata: {name: v6-fqdn, namespace: ns, labels: {kubernetes.io/service-name: v6}}\naddressType: FQDN\nports: [{port: 80}]\nendpoints: [{addresses: [example.com]}]\n---\n".to_string(),
            "kind: EndpointSlice\nmetadata: {name: orphan, namespace: ns}\naddressType: IPv4\n---\n".to_string(),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml);
        let has = |s: &str| assert!(e.iter().any(|x| x.contains(s)), "no error containing {s:?} in {e:#?}");
        has("Service ns/badip: spec.clusterIPs[0]: \"172.30.0.300\" is not an IP address");
        has("Service ns/badport: spec.ports[0].port: 0 is not a port number");
        has("Service ns/badport: spec.ports[1].protocol: unsupported protocol \"ICMP\"");
        has("EndpointSlice ns/badport-x: endpoints[1].addresses[0]: \"not-an-ip\" is not an IP address");
        has("EndpointSlice ns/orphan: metadata.labels[kubernetes.io/service-name]: missing");
        // Dual-stack objects are normal: their IPv6 half is left aside and counted, not an
        // error; an IPv6-only Service is not this datapath's. FQDN slices are named.
        assert!(!e.iter().any(|x| x.contains("v6") && !x.contains("FQDN")), "{e:#?}");
        has("EndpointSlice ns/v6-fqdn: addressType: \"FQDN\" is not supported");
        assert_eq!(d.ipv6_skipped, 3, "fd00::2, fd00::3, the IPv6 slice");
        // Only an endpoint's first address is its address (kube-proxy's reading).
        assert!(!e.iter().any(|x| x.contains("not-read")), "{e:#?}");
        // What was valid is still served.
        assert_eq!(d.frontends[&fe("172.30.0.3", 82, Proto::Tcp)].backends, [be("10.0.0.1", 82, Proto::Tcp)].into());
        assert!(d.frontends.contains_key(&fe("172.30.0.2", 80, Proto::Tcp)));
        assert_eq!(d.frontends.len(), 2, "{:?}", d.frontends.keys());
    }

    #[test]
    fn legacy_leading_zero_addresses_read_as_kube_proxy_reads_them() {
        let yaml = [
            svc("old", "{type: LoadBalancer, clusterIP: 172.030.000.010, externalIPs: [192.168.099.011], ports: [{port: 80, nodePort: 30080}], loadBalancerSourceRanges: [' 010.000.000.000/8']}"),
            "status: {loadBalancer: {ingress: [{ip: 001.002.003.004}, {ip: 5.6.7.8, ipMode: Proxy}]}}\n---\n".to_string(),
            slice("old", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [010.180.000.001]}]"),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml.replacen("---\nstatus", "status", 1));
        assert!(e.is_empty(), "{e:#?}");
        let want = [be("10.180.0.1", 8080, Proto::Tcp)].into();
        assert_eq!(d.frontends[&fe("172.30.0.10", 80, Proto::Tcp)].backends, want);
        assert_eq!(d.frontends[&ext("192.168.99.11", 80, Proto::Tcp)].backends, want);
        let lb = &d.frontends[&ext("1.2.3.4", 80, Proto::Tcp)];
        assert_eq!(lb.source_ranges, ["10.0.0.0/8".parse().unwrap()].into());
        // ipMode Proxy: the load balancer proxies to the nodes; the address is not claimed.
        assert!(!d.frontends.keys().any(|f| f.addr.addr == Ipv4Addr::new(5, 6, 7, 8)), "{:?}", d.frontends.keys());
    }

    #[test]
    fn reject_without_any_endpoint_drop_without_a_local_one_masquerade_external_cluster() {
        let yaml = [
            svc("none", "{type: NodePort, externalTrafficPolicy: Local, internalTrafficPolicy: Local, clusterIP: 172.30.0.1, ports: [{port: 80, nodePort: 30001}]}"),
            slice("none", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.1], nodeName: node2, conditions: {ready: false, serving: false}}]"),
            svc("remote", "{type: NodePort, externalTrafficPolicy: Local, internalTrafficPolicy: Local, clusterIP: 172.30.0.2, ports: [{port: 80, nodePort: 30002}]}"),
            slice("remote", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.2], nodeName: node2}]"),
            svc("cluster", "{type: NodePort, clusterIP: 172.30.0.3, ports: [{port: 80, nodePort: 30003}]}"),
            slice("cluster", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.3], nodeName: node1}]"),
        ]
        .concat();
        let (d, e) = translate_yaml(&yaml);
        assert!(e.is_empty(), "{e:#?}");
        let f = |fe: Frontend| (d.frontends[&fe].backends.len(), d.frontends[&fe].drop_empty, d.frontends[&fe].masquerade);
        // No usable endpoint anywhere: refused (not dropped), whatever the policies say.
        assert_eq!(f(fe("172.30.0.1", 80, Proto::Tcp)), (0, false, false));
        assert_eq!(f(ext("192.168.0.2", 30001, Proto::Tcp)), (0, false, false));
        // Endpoints elsewhere, none here: dropped.
        assert_eq!(f(fe("172.30.0.2", 80, Proto::Tcp)), (0, true, false));
        assert_eq!(f(ext("192.168.0.2", 30002, Proto::Tcp)), (0, true, false));
        // externalTrafficPolicy Cluster: every connection to an external address is masqueraded,
        // the internal-scope entry (pods) too; the ClusterIP is not.
        assert_eq!(f(ext("192.168.0.2", 30003, Proto::Tcp)), (1, false, true));
        assert_eq!(f(Frontend::internal(be("192.168.0.2", 30003, Proto::Tcp))), (1, false, true));
        assert_eq!(f(fe("172.30.0.3", 80, Proto::Tcp)), (1, false, false));
        // kube-proxy's no_local_endpoints counts: only "remote" (usable endpoints, none here),
        // once per policy; "none" is refused, not counted.
        assert_eq!(d.no_local_endpoints, (1, 1));
        // externalTrafficPolicy Local on a Service not reachable from outside counts for nothing.
        let (d, _) = translate_yaml(&[svc("inner", "{externalTrafficPolicy: Local, clusterIP: 172.30.0.4, ports: [{port: 80}]}"), slice("inner", "addressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.4], nodeName: node2}]")].concat());
        assert_eq!(d.no_local_endpoints, (0, 0));
    }
}
