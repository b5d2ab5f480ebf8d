//! Where Kubernetes objects come from. Each source produces the same [`Objects`], which
//! `model::translate` turns into the desired datapath state.
/// Implements `k8s_openapi::Resource` for a type of the agent's own that reads a namespaced API
/// kind in part (`pod::Pod`, `service::Service`, `slice::EndpointSlice`). A Pod (kept in kube's
/// store) implements `k8s_openapi::Metadata` too; Services and slices are watched as
/// [`kept::Watched`] objects and kept in the agent's own store.
macro_rules! namespaced_resource {
    ($ty:ty, api_version: $api_version:literal, group: $group:literal, version: $version:literal, kind: $kind:literal, plural: $plural:literal) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }
    };
}

/// What identifies a kept Service or EndpointSlice and its version: all of its metadata that is
/// kept (48 bytes, where an `ObjectMeta` takes 360 with its empty slots). The name and namespace
/// are shared strings: every index that keys the object by them (the store, the translator's
/// tables, each frontend's Service name) holds a count on these, not a copy of its own (at
/// 100,000 Services, ten copies a Service were 32 MB).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub name: Option<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    pub resource_version: Option<Box<str>>,
}

impl Meta {
    /// (namespace, name): the key translation and the stores use, sharing these strings. An
    /// absent namespace is `default`, an absent name empty (as translation names them).
    pub fn key(&self) -> crate::model::Key {
        (self.namespace.clone().unwrap_or_else(|| shared_name("default")), self.name.clone().unwrap_or_else(|| shared_name("")))
    }
}

/// The metadata the agent's own types (`pod`, `service`, `slice`) read: what identifies an
/// object and its version (what a store and a watch need: not its uid, which nothing reads and
/// the store would copy again), and its labels, of which each type keeps what it reads; the
/// annotations as `A` (skipped unread by default). managedFields and owner references are
/// skipped. `null` or absent: empty, as k8s-openapi reads it.
#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta<A = serde::de::IgnoredAny> {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    labels: Option<Labels>,
    annotations: Option<A>,
}

type Labels = std::collections::BTreeMap<String, String>;

impl<A: serde::de::DeserializeOwned + Default> WireMeta<A> {
    /// Reads it (`null`: empty).
    fn read<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        null_default(d)
    }

    /// The identity and version, and the labels and annotations.
    fn split(self) -> (Meta, Option<Labels>, Option<A>) {
        (Meta { name: self.name.map(Arc::from), namespace: self.namespace.as_deref().map(shared_name), resource_version: self.resource_version.map(Into::into) }, self.labels, self.annotations)
    }
}

/// The names held ([`shared_name`]), and how many were held after the last look.
static NAMES: std::sync::Mutex<(BTreeSet<Arc<str>>, usize)> = std::sync::Mutex::new((BTreeSet::new(), 0));

/// A name many objects hold, as one string for all of them: a namespace's (a cluster has few
/// namespaces and many objects in each) and a node's (every endpoint names its node). Names no
/// object holds any more are let go once the set has doubled since the last look, so
/// namespaces and nodes come and go without the set growing.
fn shared_name(name: &str) -> Arc<str> {
    let mut guard = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let (names, kept) = &mut *guard;
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    if names.len() >= 2 * (*kept).max(64) {
        names.retain(|n| Arc::strong_count(n) > 1);
        *kept = names.len();
    }
    let n: Arc<str> = name.into();
    names.insert(n.clone());
    n
}

/// Reads an optional name as a [`shared_name`] (`null` or absent: none).
fn shared_name_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    Ok(<Option<std::borrow::Cow<'de, str>> as serde::Deserialize>::deserialize(d)?.as_deref().map(shared_name))
}

/// A field k8s-openapi reads as its default when absent or `null` (a required one, such as a
/// port's number or a slice's address type, that translation then names): with
/// `#[serde(default, deserialize_with = "null_default")]`.
fn null_default<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(<Option<T> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

/// A string field whose value is nearly always one of a few words the API defines (a Service's
/// type and traffic policies, a protocol, an address type): such a word is kept as a pointer to
/// the agent's own copy, any other value in a box of its own. Every Service and EndpointSlice of
/// the cluster is kept, and a `String` of "TCP" costs an allocation each. Equality, order and
/// hash are the string's, whichever way it is kept.
#[derive(Clone)]
pub enum Word {
    Known(&'static str),
    Other(Box<str>),
}

/// The values of the fields read as [`Word`]s.
const WORDS: &[&str] = &["", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "None", "ClientIP", "Cluster", "Local", "TCP", "UDP", "SCTP", "IPv4", "IPv6", "FQDN"];

impl Default for Word {
    fn default() -> Self {
        Word::Known("")
    }
}

impl std::ops::Deref for Word {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Word::Known(w) => w,
            Word::Other(s) => s,
        }
    }
}

impl From<&str> for Word {
    fn from(s: &str) -> Word {
        match WORDS.iter().find(|w| **w == s) {
            Some(w) => Word::Known(w),
            None => Word::Other(s.into()),
        }
    }
}

impl PartialEq for Word {
    fn eq(&self, other: &Word) -> bool {
        **self == **other
    }
}

impl Eq for Word {}

impl PartialOrd for Word {
    fn partial_cmp(&self, other: &Word) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Word {
    fn cmp(&self, other: &Word) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::hash::Hash for Word {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

impl std::fmt::Debug for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Word;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Word, E> {
                Ok(Word::from(s))
            }
        }
        d.deserialize_str(V)
    }
}

pub mod kept;
pub mod kube;
pub mod manifests;
pub mod pod;
pub mod service;
pub mod slice;

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::{NetworkPolicy, ServiceCIDR},
};
use service::Service;
use slice::EndpointSlice;

use crate::{error::ObjectError, reconcile::Cidr4};

/// The objects the translation needs.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Shared with the API-server source's stores and the translator: one copy of each object
    /// in the agent, however many hold it.
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Node objects: this node's own gives its zone (EndpointSlice zone hints).
    pub nodes: Vec<Node>,
    /// For NetworkPolicy: every pod (addresses and labels, only what the compiler reads: see
    /// [`pod::Pod`]), namespaces (labels), the policies.
    pub pods: Vec<Arc<pod::Pod>>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
    /// ServiceCIDR objects (networking.k8s.io/v1): the Service address ranges, the API server's
    /// own (`kubernetes`, from its --service-cluster-ip-range) and any added.
    pub service_cidrs: Vec<ServiceCIDR>,
    /// What this read says of Services and EndpointSlices.
    pub changed: Changed,
    /// Pods, Namespaces and NetworkPolicies are as at the last read (and left empty here): the
    /// policy compiler need not run for them. False (the default) when unknown.
    pub policy_unchanged: bool,
}

/// What a read holds of Services and EndpointSlices.
#[derive(Clone, Debug, Default)]
pub enum Changed {
    /// `services` and `endpoint_slices` hold them all, and all are translated anew.
    #[default]
    All,
    /// `services` and `endpoint_slices` are empty: these are the objects changed since the last
    /// read (the API server's watch events, the manifest files whose bytes changed).
    Only(crate::translator::Changes),
}

impl Objects {
    /// The IPv4 Service ranges: `flag`'s (--service-cidr) and every ServiceCIDR object's, one
    /// being deleted too (its finalizer keeps it while Services hold addresses in it). A CIDR
    /// that does not parse is an error naming the object and the field; IPv6 ones are the IPv6
    /// datapath's.
    pub fn service_ranges(&self, flag: &BTreeSet<Cidr4>) -> (BTreeSet<Cidr4>, Vec<ObjectError>) {
        let mut out = flag.clone();
        let mut errors = Vec::new();
        for sc in &self.service_cidrs {
            for (i, c) in sc.spec.iter().flat_map(|s| s.cidrs.iter().flatten()).enumerate() {
                match c.parse::<Cidr4>() {
                    Ok(c) => {
                        out.insert(c.network());
                    }
                    Err(_) if c.contains(':') => {}
                    Err(e) => errors.push(ObjectError::new("ServiceCIDR", sc.metadata.name.clone().unwrap_or_default(), format!("spec.cidrs[{i}]"), format!("{c:?}: {e}"))),
                }
            }
        }
        (out, errors)
    }

    /// The `topology.kubernetes.io/zone` label of the Node named `name`, if it is among them.
    pub fn zone_of(&self, name: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(crate::model::LABEL_ZONE).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ranges_are_the_flags_and_the_objects() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let yaml = "kind: ServiceCIDR\napiVersion: networking.k8s.io/v1\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16, \"fd00:96::/112\"]}\n---\n\
kind: ServiceCIDR\napiVersion: networking.k8s.io/v1\nmetadata: {name: extra}\nspec: {cidrs: [10.97.0.1/24]}\n---\n\
kind: ServiceCIDR\napiVersion: networking.k8s.io/v1\nmetadata: {name: typo}\nspec: {cidrs: [10.98.0.0/33]}\n";
        manifests::parse_str(yaml, "f.yaml", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let flag: BTreeSet<Cidr4> = ["10.96.0.0/16".parse().unwrap(), "10.200.0.0/24".parse().unwrap()].into();
        let (ranges, errors) = objs.service_ranges(&flag);
        let got: Vec<String> = ranges.iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["10.96.0.0/16", "10.97.0.0/24", "10.200.0.0/24"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = errors[0].to_string();
        assert!(e.contains("ServiceCIDR") && e.contains("typo") && e.contains("spec.cidrs[0]") && e.contains("10.98.0.0/33"), "{e}");
    }

    #[test]
    fn objects_of_a_namespace_share_its_name_and_gone_names_are_let_go() {
        let read = |ns: &str, name: &str| {
            serde_json::from_str::<service::Service>(&format!(r#"{{"metadata": {{"name": "{name}", "namespace": "{ns}"}}}}"#)).unwrap().metadata
        };
        let (a, b) = (read("shared-ns", "a"), read("shared-ns", "b"));
        assert!(Arc::ptr_eq(a.namespace.as_ref().unwrap(), b.namespace.as_ref().unwrap()));
        assert!(!Arc::ptr_eq(a.name.as_ref().unwrap(), b.name.as_ref().unwrap()));
        assert_eq!(a.key(), ("shared-ns".into(), "a".into()));
        // Many namespaces that no object holds any more: the set stays small.
        for i in 0..10_000 {
            drop(read(&format!("gone-{i}"), "x"));
        }
        let names = shared_name("counted");
        assert_eq!(&*names, "counted");
        // (Other tests read objects meanwhile: a bound, not an exact count.)
        {
            let (held, _) = &*super::NAMES.lock().unwrap();
            assert!(held.len() < 1_000, "{} names held", held.len());
            assert!(held.contains("shared-ns"), "a name still held is kept");
        }
        // An absent namespace is `default`, an absent name empty.
        assert_eq!(Meta::default().key(), ("default".into(), "".into()));
    }
}
