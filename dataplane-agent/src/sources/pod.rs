//! A Pod as the NetworkPolicy compiler reads it, and nothing more: every pod of the cluster is
//! watched, so each one kept whole (managedFields, container images, env, volumes, conditions)
//! would cost the agent memory for fields it never reads. Fields absent here are skipped while
//! the API server's JSON (or a manifest's YAML) is read, never stored.

use k8s_openapi::{
    api::core::v1::{ContainerPort, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer};

/// A Pod: name, namespace, labels (peers and endpoints are selected by them), node, host
/// network, named container ports (`ports: [{port: http}]` in policies), phase and addresses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Pod {
    #[serde(default, deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Container {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

/// The metadata a store and the compiler need: what identifies the object and its version,
/// and the labels.
fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let w = super::WireMeta::<serde::de::IgnoredAny>::read(d)?;
    Ok(ObjectMeta { name: w.name, namespace: w.namespace, resource_version: w.resource_version, labels: w.labels, ..Default::default() })
}

namespaced_resource!(Pod, api_version: "v1", group: "", version: "v1", kind: "Pod", plural: "pods");

/// Pods are kept in kube's store, which asks for an `ObjectMeta`.
impl k8s_openapi::Metadata for Pod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod as kube-apiserver v1.37.2 served it (a GET after its status was written): defaults,
    /// the service-account volume, managedFields.
    const SERVED: &str = include_str!("testdata/pod-served.json");

    #[test]
    fn a_served_pod_keeps_only_what_policies_read() {
        let p: Pod = serde_json::from_str(SERVED).unwrap();
        let want = Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                resource_version: Some("273".into()),
                labels: Some([("app".to_string(), "web".to_string()), ("tier".to_string(), "front".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                host_network: None,
                containers: vec![
                    Container { ports: Some(vec![ContainerPort { name: Some("http".into()), container_port: 8080, protocol: Some("TCP".into()), ..Default::default() }]) },
                    Container { ports: None },
                ],
            }),
            status: Some(PodStatus { phase: Some("Running".into()), pod_ip: Some("10.244.1.17".into()), pod_ips: Some(vec![PodIP { ip: "10.244.1.17".into() }, PodIP { ip: "fd00:10:244:1::11".into() }]) }),
        };
        assert_eq!(p, want);
        // What it no longer holds: managedFields, annotations, images, env, volumes, conditions.
        let debug = format!("{p:?}");
        for gone in ["FieldsV1", "curl", "ferry.test/note", "nginx", "kube-api-access", "Ready", "10.0.0.11", "default-scheduler"] {
            assert!(!debug.contains(gone), "{gone} kept: {debug}");
        }
        assert!(SERVED.contains("managedFields") && SERVED.contains("nginx"), "the fixture is a full Pod");
    }

    #[test]
    fn a_wrong_type_in_a_read_field_is_named() {
        let bad = SERVED.replace(r#""containerPort": 8080"#, r#""containerPort": "eighty""#);
        let e = serde_path_to_error::deserialize::<_, Pod>(&mut serde_json::Deserializer::from_str(&bad)).unwrap_err();
        assert_eq!(e.path().to_string(), "spec.containers[0].ports[0].containerPort");
    }
}
