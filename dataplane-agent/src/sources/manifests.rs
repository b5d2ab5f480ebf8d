//! The standalone source: a file or a directory of YAML/JSON manifests (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 Pod, v1 Namespace, networking.k8s.io/v1
//! NetworkPolicy, and `List`s of them), re-read
//! when anything in it changes.
use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::Objects;
use crate::error::ObjectError;

/// Files a manifest path stands for, sorted: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files (not recursive).
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// A fingerprint of the path's contents (names and bytes), to notice changes cheaply.
pub fn fingerprint(path: &Path) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for f in files(path)? {
        f.hash(&mut h);
        std::fs::read(&f)?.hash(&mut h);
    }
    Ok(h.finish())
}

/// Reads every object under `path`. Documents that cannot be parsed are reported with the file,
/// the document's position and (when it has one) the object's name; the others are kept.
pub fn read(path: &Path) -> std::io::Result<(Objects, Vec<ObjectError>)> {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    for f in files(path)? {
        let text = std::fs::read_to_string(&f)?;
        parse_str(&text, &f.display().to_string(), &mut objs, &mut errors);
    }
    Ok((objs, errors))
}

/// Parses a multi-document YAML text (`source` names it in errors) into `objs`.
pub fn parse_str(text: &str, source: &str, objs: &mut Objects, errors: &mut Vec<ObjectError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{source} document {}", i + 1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => add_value(v, &where_, objs, errors),
            Err(e) => {
                // A syntax error ends the stream: serde_yaml's document iterator would yield the
                // same error forever. The documents before it are kept.
                errors.push(ObjectError::new("document", where_, "(yaml)".into(), e.to_string()));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn syntax_error_is_reported_once_and_earlier_documents_kept() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        parse_str(&format!("{GOOD}---\nkind: Service\nmetadata: [unclosed\n---\n{GOOD}"), "f.yaml", &mut objs, &mut errors);
        assert_eq!(objs.services.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().starts_with("document f.yaml document 2: (yaml):"), "{}", errors[0]);
    }

    #[test]
    fn malformed_object_names_itself_and_its_field() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let bad = "kind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: [{port: eighty}]}\n";
        parse_str(&format!("{bad}---\n{GOOD}"), "f.yaml", &mut objs, &mut errors);
        assert_eq!(objs.services.len(), 1, "the good Service still counts");
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(e.contains("Service shop/bad") && e.contains("spec.ports[0].port"), "{e}");
    }

    #[test]
    fn lists_and_unknown_kinds() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let list = format!("kind: List\nitems:\n- {}\n", GOOD.trim_end().replace('\n', "\n  "));
        parse_str(&format!("{list}---\nkind: Deployment\nmetadata: {{name: d}}\n"), "f.yaml", &mut objs, &mut errors);
        assert_eq!((objs.services.len(), errors.len()), (1, 0), "{errors:?}");
    }
}

/// Adds one parsed YAML value (an object or a `List`) to `objs`.
pub fn add_value(v: serde_yaml::Value, where_: &str, objs: &mut Objects, errors: &mut Vec<ObjectError>) {
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    let name = || {
        let md = v.get("metadata");
        let ns = md.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
        let n = md.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
        format!("{ns}/{n} ({where_})")
    };
    fn push<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value, kind: &'static str, name: String, list: &mut Vec<T>, errors: &mut Vec<ObjectError>) {
        match typed(v) {
            Ok(o) => list.push(o),
            Err((field, msg)) => errors.push(ObjectError::new(kind, name, field, msg)),
        }
    }
    match kind.as_str() {
        "Service" => push(&v, "Service", name(), &mut objs.services, errors),
        "EndpointSlice" => push(&v, "EndpointSlice", name(), &mut objs.endpoint_slices, errors),
        "Node" => push(&v, "Node", name(), &mut objs.nodes, errors),
        "Pod" => push(&v, "Pod", name(), &mut objs.pods, errors),
        "Namespace" => push(&v, "Namespace", name(), &mut objs.namespaces, errors),
        "NetworkPolicy" => push(&v, "NetworkPolicy", name(), &mut objs.network_policies, errors),
        "ServiceCIDR" => push(&v, "ServiceCIDR", name(), &mut objs.service_cidrs, errors),
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" | "PodList" | "NamespaceList" | "NetworkPolicyList" | "ServiceCIDRList" => {
            if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                for (j, item) in items.iter().enumerate() {
                    add_value(item.clone(), &format!("{where_} item {}", j + 1), objs, errors);
                }
            }
        }
        // Other kinds (Deployments, Pods before the policy issue...) are not ours: ignored.
        _ => log::debug!("{where_}: ignoring kind {kind:?}"),
    }
}

/// Deserializes a Kubernetes object, reporting the path of the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        (if path == "." { "(object)".into() } else { path }, e.into_inner().to_string())
    })
}
