//! Where Kubernetes objects come from. Each source produces the same [`Objects`], which
//! `model::translate` turns into the desired datapath state.
pub mod manifests;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The objects the translation needs.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}
