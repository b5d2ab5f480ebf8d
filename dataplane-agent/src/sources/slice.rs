//! An EndpointSlice as translation reads it, and nothing more: every slice of the cluster is
//! kept between syncs, so each one kept whole (labels, annotations, each endpoint's zone,
//! hostname, Pod reference and deprecated topology, read into k8s-openapi's types that hold a
//! slot for every field) would cost the agent memory for fields it never reads. Fields absent
//! here are skipped while the API server's JSON (or a manifest's YAML) is read, never stored.
//!
//! The two pieces of metadata translation and the metrics read are taken out of their maps as
//! the object is read: the `kubernetes.io/service-name` label (the Service it belongs to) and the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation (network programming latency).

use std::collections::BTreeMap;

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints};
use serde::{Deserialize, Deserializer};

use crate::{model::LABEL_SERVICE_NAME, observe::TRIGGER_TIME};

/// An EndpointSlice (discovery.k8s.io/v1): name, namespace and version; the Service it belongs
/// to; the address type, ports and endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointSlice {
    /// Name, namespace and resourceVersion only (what a store and a watch need).
    pub metadata: super::Meta,
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<String>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<String>,
    pub address_type: super::Word,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
}

/// A port of the slice: its name, number and protocol (not its appProtocol).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<super::Word>,
}

/// One endpoint: its addresses, conditions, node and topology hints.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "super::null_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<String>,
    pub hints: Option<EndpointHints>,
}

impl<'de> Deserialize<'de> for EndpointSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default, deserialize_with = "super::WireMeta::read")]
            metadata: super::WireMeta<BTreeMap<String, String>>,
            // Absent or `null`: empty, as k8s-openapi reads it (translation then names it).
            #[serde(default, deserialize_with = "super::null_default")]
            address_type: super::Word,
            endpoints: Option<Vec<Endpoint>>,
            ports: Option<Vec<EndpointPort>>,
        }
        let w = Wire::deserialize(d)?;
        let (metadata, labels, annotations) = w.metadata.split();
        Ok(EndpointSlice {
            metadata,
            service_name: labels.and_then(|mut l| l.remove(LABEL_SERVICE_NAME)),
            trigger_time: annotations.and_then(|mut a| a.remove(TRIGGER_TIME)),
            address_type: w.address_type,
            endpoints: w.endpoints,
            ports: w.ports,
        })
    }
}

namespaced_resource!(EndpointSlice, api_version: "discovery.k8s.io/v1", group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices");

impl super::kept::Kept for EndpointSlice {
    fn meta(&self) -> &super::Meta {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EndpointSlice as kube-apiserver v1.37.2's EndpointSlice controller writes it, with
    /// managedFields, owner references, a Pod reference, zone, hostname and hints.
    const SERVED: &str = r#"{
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "web-8xk2p", "generateName": "web-", "namespace": "shop",
            "uid": "5d0f0a4e-3c43-4b7e-9d68-0c2f6f0e9a11", "resourceVersion": "4121", "generation": 3,
            "creationTimestamp": "2026-12-03T10:00:00Z",
            "labels": {"app": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io", "kubernetes.io/service-name": "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-03T10:00:01Z", "ferry.test/note": "unread"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:addressType": {}}}]
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": ["10.244.1.17"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "hostname": "web-1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "u2"},
            "nodeName": "node-1", "zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]},
            "deprecatedTopology": {"kubernetes.io/hostname": "node-1"}
        }],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    }"#;

    #[test]
    fn a_served_slice_keeps_only_what_translation_reads() {
        let s: EndpointSlice = serde_json::from_str(SERVED).unwrap();
        let full: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_str(SERVED).unwrap();
        let (e, f) = (&s.endpoints.as_ref().unwrap()[0], &full.endpoints.as_ref().unwrap()[0]);
        assert_eq!((&e.addresses, &e.conditions, &e.node_name, &e.hints), (&f.addresses, &f.conditions, &f.node_name, &f.hints));
        assert_eq!(&*s.address_type, full.address_type);
        let (p, fp) = (&s.ports.as_ref().unwrap()[0], &full.ports.as_ref().unwrap()[0]);
        assert_eq!((&p.name, p.port, p.protocol.as_deref()), (&fp.name, fp.port, fp.protocol.as_deref()));
        assert!(matches!((&s.address_type, &p.protocol), (super::super::Word::Known("IPv4"), Some(super::super::Word::Known("TCP")))));
        assert_eq!((s.service_name.as_deref(), s.trigger_time.as_deref()), (Some("web"), Some("2026-12-03T10:00:01Z")));
        assert_eq!(
            s.metadata,
            super::super::Meta { name: Some("web-8xk2p".into()), namespace: Some("shop".into()), resource_version: Some("4121".into()) }
        );
        let debug = format!("{s:?}");
        for gone in ["FieldsV1", "ferry.test/note", "managed-by", "web-1", "zone: Some", "u2", "generateName", "hostname"] {
            assert!(!debug.contains(gone), "{gone} kept: {debug}");
        }
    }

    #[test]
    fn a_mistyped_read_field_is_named_and_a_missing_one_is_empty() {
        let e = serde_path_to_error::deserialize::<_, EndpointSlice>(&mut serde_json::Deserializer::from_str(&SERVED.replace(r#""port": 8080"#, r#""port": "http""#))).unwrap_err();
        assert_eq!(e.path().to_string(), "ports[0].port");
        // Missing ones read as k8s-openapi reads them: empty (translation names them then).
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addressType": "IPv4","#, "").replace(r#""addresses": ["10.244.1.17"], "#, "")).unwrap();
        assert_eq!((&*s.address_type, s.endpoints.unwrap()[0].addresses.len()), ("", 0));
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addressType": "IPv4""#, r#""addressType": null"#).replace(r#""addresses": ["10.244.1.17"]"#, r#""addresses": null"#)).unwrap();
        assert_eq!((&*s.address_type, s.endpoints.unwrap()[0].addresses.len()), ("", 0));
    }
}
