//! Where Kubernetes objects come from. Each source produces the same [`Objects`], which
//! `model::translate` turns into the desired datapath state.
pub mod kube;
pub mod manifests;
pub mod pod;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

/// The objects the translation needs.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Node objects: this node's own gives its zone (EndpointSlice zone hints).
    pub nodes: Vec<Node>,
    /// For NetworkPolicy: every pod (addresses and labels, only what the compiler reads: see
    /// [`pod::Pod`]), namespaces (labels), the policies.
    pub pods: Vec<pod::Pod>,
    pub namespaces: Vec<Namespace>,
    pub network_policies: Vec<NetworkPolicy>,
}

impl Objects {
    /// The `topology.kubernetes.io/zone` label of the Node named `name`, if it is among them.
    pub fn zone_of(&self, name: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(crate::model::LABEL_ZONE).cloned())
    }
}
