//! Every manifest in deploy/ deserialized into the Kubernetes API types, and the fields that
//! decide whether Ferry can replace kube-proxy checked: image, probes, capabilities, mounts,
//! tolerations, RBAC verbs, and a ConfigMap whose every key the agent reads.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a file.
fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml::Deserializer::from_str(&text).map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}"))).collect()
}

/// The one document of `kind` in `file`, as its API type.
fn one<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let docs: Vec<_> = documents(file).into_iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(docs.len(), 1, "{file}: expected one {kind}");
    serde_yaml::from_value(docs[0].clone()).unwrap_or_else(|e| panic!("{file}: {kind}: {e}"))
}

fn kustomization() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap()).unwrap()
}

#[test]
fn kustomization_lists_every_manifest_and_pins_the_image() {
    let k = kustomization();
    let resources: BTreeSet<String> = k["resources"].as_sequence().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let files: BTreeSet<String> = std::fs::read_dir(deploy())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(resources, files);
    assert_eq!(k["namespace"], "kube-system");
    let image = &k["images"][0];
    assert_eq!(image["name"], "ghcr.io/ferry-dataplane/dataplane-agent");
    assert!(image["newTag"].as_str().is_some_and(|t| t != "latest"));
}

#[test]
fn daemonset_replaces_kube_proxy_without_privileged() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let sa: ServiceAccount = one("serviceaccount.yaml", "ServiceAccount");
    let cm: ConfigMap = one("configmap.yaml", "ConfigMap");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name, sa.metadata.name);
    // Tolerates every taint: one toleration with operator Exists, no key and no effect.
    assert!(pod.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    let k = kustomization();
    let image = format!("{}:{}", k["images"][0]["name"].as_str().unwrap(), k["images"][0]["newTag"].as_str().unwrap());
    let agent = pod.containers.iter().find(|c| c.name == "ferry").expect("ferry container");
    assert_eq!(agent.image.as_deref(), Some(image.as_str()));
    assert_eq!(agent.command.as_deref(), Some(&["dataplane-agent".to_string(), "run".to_string()][..]));
    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    for need in ["BPF", "PERFMON", "NET_ADMIN"] {
        assert!(added.contains(need), "{need} missing from {added:?}");
    }
    assert!(!added.contains("SYS_ADMIN"), "SYS_ADMIN is most of what privileged gives; the agent does not need it");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));

    // /sys/fs/bpf from the host, where the maps stay across restarts; the host's cgroup root.
    let vols: BTreeMap<&str, &str> = pod.volumes.iter().flatten().filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str()))).collect();
    let mounts: BTreeMap<&str, &str> = agent.volume_mounts.iter().flatten().map(|m| (m.mount_path.as_str(), m.name.as_str())).collect();
    assert_eq!(vols.get(mounts["/sys/fs/bpf"]), Some(&"/sys/fs/bpf"));
    let data = cm.data.as_ref().unwrap();
    assert_eq!(vols.get(mounts[data["FERRY_CGROUP"].as_str()]), Some(&"/sys/fs/cgroup"));
    assert!(data["FERRY_PIN_DIR"].starts_with("/sys/fs/bpf/"));

    // Probes on the healthz port the ConfigMap binds.
    let healthz_port: i32 = data["FERRY_HEALTHZ_BIND_ADDRESS"].rsplit_once(':').unwrap().1.parse().unwrap();
    for (probe, path) in [(&agent.liveness_probe, "/livez"), (&agent.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(healthz_port));
    }
    // Settings from the ConfigMap; the node name from the downward API.
    assert!(agent.env_from.iter().flatten().any(|e| e.config_map_ref.as_ref().map(|r| r.name.as_str()) == cm.metadata.name.as_deref()));
    let node = agent.env.iter().flatten().find(|e| e.name == "FERRY_HOSTNAME_OVERRIDE").expect("node name");
    assert_eq!(node.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()), Some("spec.nodeName"));

    // The take-over happens in the agent, after its first sync: no init container removes
    // kube-proxy's rules before Ferry can serve.
    assert!(pod.init_containers.iter().flatten().next().is_none(), "no init container");
    assert_eq!(data["FERRY_CLEANUP_KUBE_PROXY"], "true");
    assert_eq!(data["FERRY_ENABLE_NETWORK_POLICY"], "true");
    // bpffs writes under AppArmor and SELinux: unconfined and spc_t, as Cilium's agent.
    assert_eq!(sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()), Some("Unconfined"));
    assert_eq!(sc.se_linux_options.as_ref().and_then(|o| o.type_.as_deref()), Some("spc_t"));
    let annotations = ds.spec.template.metadata.as_ref().and_then(|m| m.annotations.as_ref()).unwrap();
    assert_eq!(annotations["container.apparmor.security.beta.kubernetes.io/ferry"], "unconfined");
    // One agent per node at a time.
    let ru = ds.spec.update_strategy.as_ref().and_then(|u| u.rolling_update.as_ref()).unwrap();
    assert_eq!(ru.max_surge, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)));
}

#[test]
fn the_uninstall_daemonset_runs_cleanup_on_the_same_pin_dir() {
    let ds: DaemonSet = one("uninstall/cleanup.yaml", "DaemonSet");
    let cm: ConfigMap = one("configmap.yaml", "ConfigMap");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let cmd = c.command.as_ref().unwrap().join(" ");
    assert!(cmd.contains(&format!("dataplane-agent run --cleanup --pin-dir {} &&", cm.data.as_ref().unwrap()["FERRY_PIN_DIR"])), "{cmd}");
    let k = kustomization();
    assert_eq!(c.image.as_deref(), Some(format!("{}:{}", k["images"][0]["name"].as_str().unwrap(), k["images"][0]["newTag"].as_str().unwrap()).as_str()));
    assert!(pod.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
}

#[test]
fn rbac_grants_only_list_and_watch_on_what_the_agent_reads() {
    let role: ClusterRole = one("clusterrole.yaml", "ClusterRole");
    let binding: ClusterRoleBinding = one("clusterrole.yaml", "ClusterRoleBinding");
    let sa: ServiceAccount = one("serviceaccount.yaml", "ServiceAccount");
    let mut granted = BTreeSet::new();
    for r in role.rules.iter().flatten() {
        assert_eq!(r.verbs, vec!["list".to_string(), "watch".to_string()], "{r:?}");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                granted.insert(format!("{g}/{res}"));
            }
        }
    }
    let want: BTreeSet<String> =
        ["/services", "/nodes", "/pods", "/namespaces", "discovery.k8s.io/endpointslices", "networking.k8s.io/networkpolicies", "networking.k8s.io/servicecidrs"].iter().map(|s| s.to_string()).collect();
    assert_eq!(granted, want);
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!((subject.kind.as_str(), Some(subject.name.clone())), ("ServiceAccount", sa.metadata.name.clone()));
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn every_configmap_key_is_a_setting_of_the_agent() {
    let cm: ConfigMap = one("configmap.yaml", "ConfigMap");
    let env: BTreeSet<String> = dataplane_agent::cli::run_env_names().into_iter().collect();
    // The kube client's in-cluster settings (pointed at the API server itself).
    let client = ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"];
    let data = cm.data.as_ref().unwrap();
    for key in data.keys() {
        assert!(env.contains(key) || client.contains(&key.as_str()), "ConfigMap key {key} is read by nothing (flags read {env:?})");
    }
    // The kube-proxy-named settings are all there.
    for key in ["FERRY_CLUSTER_CIDR", "FERRY_NODEPORT_ADDRESSES", "FERRY_HEALTHZ_BIND_ADDRESS", "FERRY_METRICS_BIND_ADDRESS"] {
        assert!(data.contains_key(key), "{key}");
    }
    assert!(env.contains("FERRY_HOSTNAME_OVERRIDE"));
}

#[test]
fn configmap_values_are_accepted_by_the_agent() {
    // The ConfigMap's values, given as the environment, pass the agent's own checks.
    let cm: ConfigMap = one("configmap.yaml", "ConfigMap");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dataplane-agent"))
        .args(["run", "--help"])
        .envs(cm.data.clone().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--cluster-cidr", "--nodeport-addresses", "--hostname-override", "--healthz-bind-address", "--metrics-bind-address"] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dataplane-agent"))
        .args(["run", "--print-config"])
        .envs(cm.data.clone().unwrap())
        .env("FERRY_HOSTNAME_OVERRIDE", "node-a")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["node: node-a", "cluster CIDR: 10.244.0.0/16 (ClusterCIDR)", "metrics: 0.0.0.0:10249", "healthz: 0.0.0.0:10256", "service CIDRs: 10.96.0.0/12"] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
}

#[test]
fn containerfile_is_multi_stage_and_ships_the_built_agent() {
    let text = std::fs::read_to_string(deploy().join("Containerfile")).unwrap();
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build"));
    assert!(text.contains("cargo xtask build-ebpf") && text.contains("bpf-linker --version 0.13.0"));
    assert!(text.contains("COPY --from=build /src/target/release/dataplane-agent "));
    assert!(text.contains("iptables nftables"), "the runtime needs them for cleanup-kube-proxy");
}

#[test]
fn cluster_e2e_workload_is_valid_api_objects() {
    use k8s_openapi::api::{apps::v1::Deployment, core::v1::{Namespace, Pod, Service}};
    let mut kinds = BTreeMap::new();
    for d in documents("e2e/workload.yaml") {
        let kind = d["kind"].as_str().unwrap().to_string();
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        let ok = match kind.as_str() {
            "Namespace" => serde_yaml::from_value::<Namespace>(d).map(|_| ()),
            "Deployment" => serde_yaml::from_value::<Deployment>(d).map(|_| ()),
            "Service" => serde_yaml::from_value::<Service>(d).map(|_| ()),
            "Pod" => serde_yaml::from_value::<Pod>(d).map(|_| ()),
            other => panic!("unexpected {other}"),
        };
        ok.unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
        *kinds.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(kinds.get("Service"), Some(&5));
    let kind_cfg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(deploy().join("e2e/kind.yaml")).unwrap()).unwrap();
    assert_eq!(kind_cfg["networking"]["kubeProxyMode"], "none");
}
