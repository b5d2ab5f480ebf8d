//! A Service as translation reads it, and nothing more (as `slice.rs` for EndpointSlices): every
//! Service of the cluster is kept between syncs, and k8s-openapi's type holds a slot for every
//! field (its selector, IP families, annotations, each port's target) that translation never
//! reads. Fields absent here are skipped while the API server's JSON (or a manifest's YAML) is
//! read, never stored. The field names are k8s-openapi's: translation reads them the same way.
use k8s_openapi::api::core::v1::{ServiceStatus, SessionAffinityConfig};
use serde::{Deserialize, Deserializer};

use crate::model::LABEL_SERVICE_PROXY_NAME;

/// A Service (v1): name, namespace and version, the one label translation reads, the spec's
/// fields that decide its frontends, and its status (load balancer ingress).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    /// Name, namespace and resourceVersion.
    pub metadata: super::Meta,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy serves it.
    pub other_proxy: bool,
    pub spec: Option<ServiceSpec>,
    /// Its load balancer ingress: `None` when it has none (nearly every Service: boxed), and its
    /// conditions are not kept.
    pub status: Option<Box<ServiceStatus>>,
}

impl<'de> Deserialize<'de> for Service {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default, deserialize_with = "super::WireMeta::read")]
            metadata: super::WireMeta,
            spec: Option<ServiceSpec>,
            status: Option<ServiceStatus>,
        }
        let w = Wire::deserialize(d)?;
        let (metadata, labels, _) = w.metadata.split();
        let status = w.status.filter(|s| s.load_balancer.as_ref().is_some_and(|lb| lb.ingress.is_some())).map(|s| Box::new(ServiceStatus { conditions: None, ..s }));
        Ok(Service { metadata, other_proxy: labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)), spec: w.spec, status })
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<super::Word>,
    // (Boxed strings and slices, not `String`s and `Vec`s: a `Vec` read from JSON grows by
    // doubling, and its spare room would be kept with the Service.)
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<Box<str>>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Box<[Box<str>]>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Box<[Box<str>]>>,
    pub load_balancer_source_ranges: Option<Box<[Box<str>]>>,
    pub session_affinity: Option<super::Word>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub external_traffic_policy: Option<super::Word>,
    pub internal_traffic_policy: Option<super::Word>,
    pub ports: Option<Box<[ServicePort]>>,
    pub health_check_node_port: Option<i32>,
}

/// A Service port: its name, protocol, port and node port (not its target: the EndpointSlices
/// give the endpoints' ports).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<Box<str>>,
    pub protocol: Option<super::Word>,
    /// Absent or `null`: 0, as k8s-openapi reads it (translation then names the field).
    #[serde(default, deserialize_with = "super::null_default")]
    pub port: i32,
    pub node_port: Option<i32>,
}

namespaced_resource!(Service, api_version: "v1", group: "", version: "v1", kind: "Service", plural: "services");

impl super::kept::Kept for Service {
    fn meta(&self) -> &super::Meta {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LoadBalancer Service as kube-apiserver v1.37.2 serves it: defaults filled in, a
    /// selector, managedFields, kubectl's annotation, a target port, a load balancer status.
    const SERVED: &str = r#"{
        "kind": "Service", "apiVersion": "v1",
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "0c1e7b52-9a57-4a36-b1f4-5b6b1a7f0d10", "resourceVersion": "812",
            "creationTimestamp": "2026-12-03T10:00:00Z", "labels": {"app": "web"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "ferry.test/note": "unread"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "type": "LoadBalancer", "selector": {"app": "web"},
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "externalIPs": ["192.0.2.7"], "loadBalancerSourceRanges": ["198.51.100.0/24"],
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster", "healthCheckNodePort": 32001,
            "allocateLoadBalancerNodePorts": true,
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web-http", "nodePort": 30080}]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9", "ipMode": "VIP"}]}}
    }"#;

    #[test]
    fn a_served_service_keeps_only_what_translation_reads() {
        let s: Service = serde_json::from_str(SERVED).unwrap();
        let full: k8s_openapi::api::core::v1::Service = serde_json::from_str(SERVED).unwrap();
        let (spec, f) = (s.spec.as_ref().unwrap(), full.spec.as_ref().unwrap());
        // (Boxed here, `String`s and `Vec`s there: compared as text.)
        let list = |l: &Option<Box<[Box<str>]>>| l.as_ref().map(|l| l.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!((spec.type_.as_deref(), spec.cluster_ip.as_deref(), list(&spec.cluster_ips), list(&spec.external_ips)), (f.type_.as_deref(), f.cluster_ip.as_deref(), f.cluster_ips.clone(), f.external_ips.clone()));
        assert_eq!((list(&spec.load_balancer_source_ranges), spec.session_affinity.as_deref(), &spec.session_affinity_config), (f.load_balancer_source_ranges.clone(), f.session_affinity.as_deref(), &f.session_affinity_config));
        assert_eq!((spec.external_traffic_policy.as_deref(), spec.internal_traffic_policy.as_deref(), spec.health_check_node_port), (f.external_traffic_policy.as_deref(), f.internal_traffic_policy.as_deref(), f.health_check_node_port));
        let (p, fp) = (&spec.ports.as_ref().unwrap()[0], &f.ports.as_ref().unwrap()[0]);
        assert_eq!((p.name.as_deref(), p.protocol.as_deref(), p.port, p.node_port), (fp.name.as_deref(), fp.protocol.as_deref(), fp.port, fp.node_port));
        // The API's words are the agent's own copies; another value is kept as it is.
        assert!(matches!((&spec.type_, &p.protocol), (Some(super::super::Word::Known("LoadBalancer")), Some(super::super::Word::Known("TCP")))));
        let odd: Service = serde_json::from_str(&SERVED.replace(r#""protocol": "TCP""#, r#""protocol": "tcp""#)).unwrap();
        assert!(matches!(&odd.spec.unwrap().ports.unwrap()[0].protocol, Some(super::super::Word::Other(w)) if &**w == "tcp"));
        assert_eq!(s.status.as_deref(), full.status.as_ref());
        // A status without ingress (every ClusterIP Service's `loadBalancer: {}`) is none.
        let plain: Service = serde_json::from_str(&SERVED.replace(r#"{"ingress": [{"ip": "203.0.113.9", "ipMode": "VIP"}]}"#, "{}")).unwrap();
        assert_eq!(plain.status, None);
        assert_eq!(
            s.metadata,
            super::super::Meta { name: Some("web".into()), namespace: Some("shop".into()), resource_version: Some("812".into()) }
        );
        let debug = format!("{s:?}");
        for gone in ["FieldsV1", "ferry.test/note", "last-applied", "selector", "web-http", "SingleStack", "allocate", "app"] {
            assert!(!debug.contains(gone), "{gone} kept: {debug}");
        }
        // The one label read: a Service another proxy serves is left to it.
        let other: Service = serde_json::from_str(&SERVED.replace(r#""labels": {"app": "web"}"#, r#""labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "other"}"#)).unwrap();
        assert!(other.other_proxy && !s.other_proxy);
    }

    #[test]
    fn null_reads_as_k8s_openapi_reads_it() {
        // A port without its number is 0 (translation names it), the others still read; null
        // metadata is empty.
        let s: Service = serde_json::from_str(&SERVED.replace(r#""port": 80"#, r#""port": null"#)).unwrap();
        assert_eq!(s.spec.unwrap().ports.unwrap()[0].port, 0);
        let s: Service = serde_json::from_str(r#"{"metadata": null, "spec": {"ports": [{"port": 80}, {"name": "b"}]}}"#).unwrap();
        assert_eq!((s.metadata, s.spec.unwrap().ports.unwrap().iter().map(|p| p.port).collect::<Vec<_>>()), (super::super::Meta::default(), vec![80, 0]));
    }

    #[test]
    fn a_mistyped_read_field_is_named() {
        let e = serde_path_to_error::deserialize::<_, Service>(&mut serde_json::Deserializer::from_str(&SERVED.replace(r#""port": 80"#, r#""port": "eighty""#))).unwrap_err();
        assert_eq!(e.path().to_string(), "spec.ports[0].port");
    }
}
