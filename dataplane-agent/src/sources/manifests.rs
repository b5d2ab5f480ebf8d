//! The standalone source: a file or a directory of YAML/JSON manifests (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, and `List`s of them), re-read when anything in it changes.
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
            Err(e) => errors.push(ObjectError::new("document", where_, "(yaml)".into(), e.to_string())),
        }
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
    match kind.as_str() {
        "Service" => match serde_yaml::from_value(v.clone()) {
            Ok(s) => objs.services.push(s),
            Err(e) => errors.push(ObjectError::new("Service", name(), field_of(&e), e.to_string())),
        },
        "EndpointSlice" => match serde_yaml::from_value(v.clone()) {
            Ok(s) => objs.endpoint_slices.push(s),
            Err(e) => errors.push(ObjectError::new("EndpointSlice", name(), field_of(&e), e.to_string())),
        },
        "List" | "ServiceList" | "EndpointSliceList" => {
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

/// serde_yaml reports the path to the offending field at the start of its message.
fn field_of(e: &serde_yaml::Error) -> String {
    let s = e.to_string();
    match s.split_once(": ") {
        Some((path, _)) if !path.contains(' ') => path.to_string(),
        _ => "(object)".into(),
    }
}
