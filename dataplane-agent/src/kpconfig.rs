//! `run --config FILE`: a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1, YAML or
//! JSON), read as kube-proxy reads it. kube-proxy's rule (cmd/kube-proxy/app/options.go,
//! `Complete`): with `--config`, the file replaces the settings its fields carry, and the same
//! settings given as flags are ignored; only `--hostname-override` (and the logging flags) beat
//! the file. Ferry applies that rule to the flags the file has fields for (their environment
//! variables too), naming any it ignores; its own flags (`--pin-dir`, `--pod-interfaces`, ...)
//! and `--master` keep working beside the file. Fields Ferry has no use for are named in one
//! warning. An unknown field (a typo, or one of a newer kube-proxy) is named in a warning and
//! left out, the rest of the file used, as kube-proxy's lenient fallback does; a value of the
//! wrong type on a known field is an error naming the file and the field.
use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::cli::RunArgs;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

// Every field of kube-proxy's types, those Ferry does not use too: they are read for their
// names (an unknown one is named in a warning, see `decode`) and types (a wrong one is an
// error), not their values.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct File {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<BTreeMap<String, bool>>,
    client_connection: Option<ClientConnection>,
    logging: Option<Logging>,
    hostname_override: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    enable_profiling: Option<bool>,
    show_hidden_metrics_for_version: Option<String>,
    mode: Option<String>,
    iptables: Option<IpTables>,
    ipvs: Option<Ipvs>,
    nftables: Option<NfTables>,
    winkernel: Option<Winkernel>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i32>,
    conntrack: Option<Conntrack>,
    config_sync_period: Option<String>,
    port_range: Option<String>,
    windows_run_as_service: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct ClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f32>,
    burst: Option<i32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Logging {
    format: Option<String>,
    flush_frequency: Option<serde_yaml::Value>,
    verbosity: Option<u32>,
    vmodule: Option<serde_yaml::Value>,
    options: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct IpTables {
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct NfTables {
    masquerade_bit: Option<i32>,
    masquerade_all: Option<bool>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Ipvs {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    strict_arp: Option<bool>,
    tcp_timeout: Option<String>,
    tcp_fin_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Winkernel {
    network_name: Option<String>,
    source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    enable_dsr: Option<bool>,
    root_hns_endpoint_name: Option<String>,
    forward_health_check_vip: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct DetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Conntrack {
    max_per_core: Option<i32>,
    min: Option<i32>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

/// The fields Ferry reads, by the flag they stand for.
pub const SUPPORTED: &[(&str, &str)] = &[
    ("hostnameOverride", "--hostname-override"),
    ("clientConnection.kubeconfig", "--kubeconfig"),
    ("bindAddress", "--node-ip (an address other than 0.0.0.0 or ::, as kube-proxy takes it for the node IP)"),
    ("healthzBindAddress", "--healthz-bind-address"),
    ("metricsBindAddress", "--metrics-bind-address"),
    ("nodePortAddresses", "--nodeport-addresses"),
    ("clusterCIDR", "--cluster-cidr"),
    ("detectLocalMode", "--detect-local-mode"),
    ("detectLocal.bridgeInterface", "--pod-bridge-interface"),
    ("detectLocal.interfaceNamePrefix", "--pod-interface-name-prefix"),
    ("iptables.masqueradeAll, nftables.masqueradeAll", "--masquerade-all (the section of `mode`: nftables.* in nftables mode, else iptables.*)"),
    ("nftables.minSyncPeriod, else iptables.minSyncPeriod", "--min-sync-period-ms"),
    ("conntrack.tcpEstablishedTimeout", "--conntrack-tcp-timeout-established"),
    ("conntrack.tcpCloseWaitTimeout", "--conntrack-tcp-timeout-close-wait"),
    ("conntrack.udpTimeout", "--conntrack-udp-timeout"),
    ("conntrack.udpStreamTimeout", "--conntrack-udp-timeout-stream"),
    ("logging.format", "--logging-format"),
    ("mode", "(must be empty: Ferry is the proxy)"),
];

/// Fields kube-proxy has and Ferry does not use: named when the file gives them a value (null,
/// "", 0, `0s`, false and empty lists or maps are kube-proxy's "unset" and go unnamed).
const UNSUPPORTED: &[&str] = &[
    "featureGates",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "logging.flushFrequency",
    "logging.verbosity",
    "logging.vmodule",
    "logging.options",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "iptables.masqueradeBit",
    "iptables.localhostNodePorts",
    "iptables.syncPeriod",
    "nftables.masqueradeBit",
    "nftables.syncPeriod",
    "ipvs.syncPeriod",
    "ipvs.minSyncPeriod",
    "ipvs.scheduler",
    "ipvs.excludeCIDRs",
    "ipvs.strictARP",
    "ipvs.tcpTimeout",
    "ipvs.tcpFinTimeout",
    "ipvs.udpTimeout",
    "winkernel.networkName",
    "winkernel.sourceVip",
    "winkernel.enableDSR",
    "winkernel.rootHnsEndpointName",
    "winkernel.forwardHealthCheckVip",
    "oomScoreAdj",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpBeLiberal",
    "configSyncPeriod",
    "portRange",
    "windowsRunAsService",
];

/// What reading the file found besides the settings: the unsupported fields it sets and the
/// command-line (or environment) settings it replaced, for the warnings.
#[derive(Debug, Default, PartialEq)]
pub struct Notes {
    pub unsupported: Vec<String>,
    /// Fields kube-proxy's types do not have (typos, or fields of a newer version), by dotted
    /// path: left out, as kube-proxy's lenient decoding leaves them.
    pub unknown: Vec<String>,
    pub ignored_flags: Vec<&'static str>,
    pub mode: Option<String>,
}

/// kube-proxy's decoding (cmd/kube-proxy/app/options.go, `loadConfig`): strict first; on a
/// strict error (an unknown field) it logs the error and decodes leniently, so the file is used
/// without the fields it does not know. Here each unknown field is taken out of `value` and the
/// strict decoding tried again, so that every unknown field is named (by its dotted path), not
/// only the first, and an error of any other kind (a known field of the wrong type) still
/// fails, naming that field. Returns the file's fields and the unknown ones, in file order.
fn decode(mut value: serde_yaml::Value) -> Result<(File, Vec<String>), String> {
    use serde_path_to_error::Segment;
    let mut unknown = Vec::new();
    // Each round takes one key out of the file: bounded by the keys it has.
    for _ in 0..=keys(&value) {
        let e = match serde_path_to_error::deserialize::<_, File>(value.clone()) {
            Ok(f) => return Ok((f, unknown)),
            Err(e) => e,
        };
        let at = e.path().to_string();
        let segments: Vec<Segment> = e.path().iter().cloned().collect();
        let message = e.into_inner().to_string();
        // serde's wording for a key no field of the type is named.
        let removed = match segments.split_last() {
            Some((Segment::Map { key }, parents)) if message.starts_with("unknown field `") => {
                let parent = parents.iter().try_fold(&mut value, |v, s| match s {
                    Segment::Map { key } => v.get_mut(key.as_str()),
                    Segment::Seq { index } => v.get_mut(*index),
                    _ => None,
                });
                parent.and_then(|p| p.as_mapping_mut()).and_then(|m| m.remove(key.as_str())).is_some()
            }
            _ => false,
        };
        if !removed {
            return Err(format!("{}{message}", if at == "." { String::new() } else { format!("{at}: ") }));
        }
        unknown.push(at);
    }
    Err("unknown fields without end".into())
}

/// The keys of a YAML value's mappings, at every depth.
fn keys(v: &serde_yaml::Value) -> usize {
    match v {
        serde_yaml::Value::Mapping(m) => m.len() + m.values().map(keys).sum::<usize>(),
        serde_yaml::Value::Sequence(s) => s.iter().map(keys).sum(),
        serde_yaml::Value::Tagged(t) => keys(&t.value),
        _ => 0,
    }
}

fn set(v: &serde_yaml::Value) -> bool {
    match v {
        serde_yaml::Value::Null => false,
        serde_yaml::Value::Bool(b) => *b,
        serde_yaml::Value::Number(n) => n.as_f64() != Some(0.0),
        serde_yaml::Value::String(s) => !s.is_empty() && crate::cli::parse_duration_ms("", s).ok() != Some(0),
        serde_yaml::Value::Sequence(s) => !s.is_empty(),
        serde_yaml::Value::Mapping(m) => !m.is_empty(),
        serde_yaml::Value::Tagged(_) => true,
    }
}

fn lookup<'a>(v: &'a serde_yaml::Value, dotted: &str) -> Option<&'a serde_yaml::Value> {
    dotted.split('.').try_fold(v, |v, k| v.get(k))
}

/// Reads `path` and applies it to `args` by kube-proxy's rule (see the module's text). Errors
/// name the file and the field.
pub fn apply(path: &Path, args: &mut RunArgs) -> anyhow::Result<Notes> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
    apply_str(&text, &path.display().to_string(), args)
}

pub fn apply_str(text: &str, name: &str, args: &mut RunArgs) -> anyhow::Result<Notes> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("--config {name}: not YAML or JSON: {e}"))?;
    let (f, unknown) = decode(value.clone()).map_err(|e| anyhow::anyhow!("--config {name}: {e}"))?;
    if f.api_version.as_deref() != Some(API_VERSION) {
        anyhow::bail!("--config {name}: apiVersion: {:?} is not {API_VERSION:?}", f.api_version.unwrap_or_default());
    }
    if f.kind.as_deref() != Some("KubeProxyConfiguration") {
        anyhow::bail!("--config {name}: kind: {:?} is not \"KubeProxyConfiguration\"", f.kind.unwrap_or_default());
    }
    let mut notes = Notes { unsupported: UNSUPPORTED.iter().filter(|p| lookup(&value, p).is_some_and(set)).map(|p| p.to_string()).collect(), unknown, ..Default::default() };
    notes.mode = f.mode.filter(|m| !m.is_empty());

    // The settings the file carries: what the command line gave for them is replaced (the
    // defaults are kube-proxy's, as Ferry's flags' are).
    let defaults = RunArgs::defaults();
    let mut take = |flag: &'static str, given: bool| {
        if given {
            notes.ignored_flags.push(flag);
        }
    };
    take("--kubeconfig", args.kubeconfig.is_some());
    take("--node-ip", !args.node_ips.is_empty());
    take("--healthz-bind-address", args.healthz_bind_address != defaults.healthz_bind_address);
    take("--metrics-bind-address", args.metrics_bind_address != defaults.metrics_bind_address);
    take("--nodeport-addresses", !args.nodeport_addresses.is_empty());
    take("--cluster-cidr", args.cluster_cidr.is_some());
    take("--detect-local-mode", args.detect_local_mode != defaults.detect_local_mode);
    take("--pod-bridge-interface", args.pod_bridge_interface.is_some());
    take("--pod-interface-name-prefix", args.pod_interface_name_prefix.is_some());
    take("--masquerade-all", args.masquerade_all != defaults.masquerade_all);
    take("--min-sync-period-ms", args.min_sync_period_ms != defaults.min_sync_period_ms);
    take("--conntrack-tcp-timeout-established", args.conntrack_tcp_timeout_established != defaults.conntrack_tcp_timeout_established);
    take("--conntrack-tcp-timeout-close-wait", args.conntrack_tcp_timeout_close_wait != defaults.conntrack_tcp_timeout_close_wait);
    take("--conntrack-udp-timeout", args.conntrack_udp_timeout != defaults.conntrack_udp_timeout);
    take("--conntrack-udp-timeout-stream", args.conntrack_udp_timeout_stream != defaults.conntrack_udp_timeout_stream);

    let cc = f.client_connection.unwrap_or_default();
    args.kubeconfig = cc.kubeconfig.filter(|k| !k.is_empty()).map(Into::into);
    args.node_ips = f.bind_address.filter(|a| !matches!(a.as_str(), "" | "0.0.0.0" | "::")).into_iter().collect();
    // kube-proxy's defaulting (v1alpha1 defaults.go): empty means the default address (kubeadm
    // writes ""), an address without a port gets the default port.
    args.healthz_bind_address = with_port(f.healthz_bind_address, &defaults.healthz_bind_address, 10256);
    args.metrics_bind_address = with_port(f.metrics_bind_address, &defaults.metrics_bind_address, 10249);
    args.nodeport_addresses = f.node_port_addresses.unwrap_or_default();
    args.cluster_cidr = f.cluster_cidr.filter(|c| !c.is_empty());
    args.detect_local_mode = f.detect_local_mode.filter(|m| !m.is_empty()).unwrap_or(defaults.detect_local_mode);
    if !["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"].contains(&args.detect_local_mode.as_str()) {
        anyhow::bail!("--config {name}: detectLocalMode: {:?} is not ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix", args.detect_local_mode);
    }
    let dl = f.detect_local.unwrap_or_default();
    args.pod_bridge_interface = dl.bridge_interface.filter(|b| !b.is_empty());
    args.pod_interface_name_prefix = dl.interface_name_prefix.filter(|p| !p.is_empty());
    let (ipt, nft) = (f.iptables.unwrap_or_default(), f.nftables.unwrap_or_default());
    // The mode's own section, as kube-proxy reads it (iptables' for "", iptables and ipvs).
    let nft_mode = value.get("mode").and_then(|m| m.as_str()) == Some("nftables");
    args.masquerade_all = if nft_mode { nft.masquerade_all } else { ipt.masquerade_all }.unwrap_or(false);
    // The other mode's section, set: named, or an operator who set nftables.masqueradeAll with
    // mode "" (iptables) would not learn that it has no effect.
    let other = if nft_mode { ("iptables.masqueradeAll", ipt.masquerade_all) } else { ("nftables.masqueradeAll", nft.masquerade_all) };
    if other.1 == Some(true) {
        let mode = value.get("mode").and_then(|m| m.as_str()).unwrap_or("");
        notes.unsupported.push(format!("{} (mode {mode:?} reads {}.masqueradeAll)", other.0, if nft_mode { "nftables" } else { "iptables" }));
    }
    args.min_sync_period_ms = match nft.min_sync_period.or(ipt.min_sync_period).filter(|p| !p.is_empty()) {
        Some(p) => {
            let field = if value.get("nftables").and_then(|n| n.get("minSyncPeriod")).is_some() { "nftables.minSyncPeriod" } else { "iptables.minSyncPeriod" };
            crate::cli::parse_duration_ms(&format!("--config {name}: {field}"), &p)?
        }
        None => defaults.min_sync_period_ms,
    };
    let ct = f.conntrack.unwrap_or_default();
    let dur = |v: Option<String>, field: &str, default: String| -> anyhow::Result<String> {
        match v.filter(|s| !s.is_empty()) {
            Some(s) => crate::cli::parse_duration_s(&format!("--config {name}: {field}"), &s).map(|_| s),
            None => Ok(default),
        }
    };
    args.conntrack_tcp_timeout_established = dur(ct.tcp_established_timeout, "conntrack.tcpEstablishedTimeout", defaults.conntrack_tcp_timeout_established)?;
    args.conntrack_tcp_timeout_close_wait = dur(ct.tcp_close_wait_timeout, "conntrack.tcpCloseWaitTimeout", defaults.conntrack_tcp_timeout_close_wait)?;
    args.conntrack_udp_timeout = dur(ct.udp_timeout, "conntrack.udpTimeout", defaults.conntrack_udp_timeout)?;
    args.conntrack_udp_timeout_stream = dur(ct.udp_stream_timeout, "conntrack.udpStreamTimeout", defaults.conntrack_udp_timeout_stream)?;
    // The command line beats the file for the node's name and the log format, as in kube-proxy.
    if args.hostname_override.is_none() {
        args.hostname_override = f.hostname_override.filter(|h| !h.trim().is_empty());
    }
    if args.logging_format == defaults.logging_format {
        match f.logging.and_then(|l| l.format).filter(|l| !l.is_empty()) {
            Some(fmt) if fmt == "text" || fmt == "json" => args.logging_format = fmt,
            Some(fmt) => anyhow::bail!("--config {name}: logging.format: {fmt:?} is not text or json"),
            None => {}
        }
    }
    // Values the flags' parsers check later, checked here too so that an error names the
    // file's field, not the flag it stands for.
    if let Some(c) = &args.cluster_cidr {
        crate::cli::parse_cidrs(&format!("--config {name}: clusterCIDR"), std::slice::from_ref(c))?;
    }
    crate::cli::parse_nodeport_addresses(&format!("--config {name}: nodePortAddresses"), &args.nodeport_addresses, true)?;
    crate::cli::parse_bind(&format!("--config {name}: healthzBindAddress"), &args.healthz_bind_address)?;
    crate::cli::parse_bind(&format!("--config {name}: metricsBindAddress"), &args.metrics_bind_address)?;
    Ok(notes)
}

impl Notes {
    /// The warnings, one line each.
    pub fn log(&self, name: &str) {
        if !self.unknown.is_empty() {
            tracing::warn!(
                "--config {name}: unknown fields, ignored (kube-proxy too decodes the file leniently when strict decoding fails; check them for typos): {}",
                self.unknown.join(", ")
            );
        }
        if !self.unsupported.is_empty() {
            tracing::warn!("--config {name}: fields Ferry does not use, ignored: {}", self.unsupported.join(", "));
        }
        if !self.ignored_flags.is_empty() {
            tracing::warn!("--config {name}: the file replaces these settings given as flags or environment variables, which are ignored (kube-proxy's rule; only --hostname-override and --logging-format beat the file): {}", self.ignored_flags.join(", "));
        }
        if let Some(m) = &self.mode {
            tracing::warn!("--config {name}: mode {m:?} is ignored: Ferry is the proxy");
        }
    }
}

/// A bind address from the file as kube-proxy defaults it: empty (or absent) gives `default`, an
/// IP without a port gets `port`.
fn with_port(v: Option<String>, default: &str, port: u16) -> String {
    match v.filter(|a| !a.is_empty()) {
        None => default.to_string(),
        Some(a) => match a.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
            Err(_) => a,
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn args(flags: &[&str]) -> RunArgs {
        let mut a = vec!["dataplane-agent", "run", "--cgroup", "none"];
        a.extend_from_slice(flags);
        let Cmd::Run(args) = Cli::try_parse_from(a).unwrap().cmd else { panic!("not run") };
        *args
    }

    /// As `kubeadm` writes it (kube-proxy's ConfigMap `config.conf`), with a few values set.
    const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 12h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: node-from-file
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: "rr"
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: ""
nftables:
  masqueradeAll: true
  masqueradeBit: 14
  minSyncPeriod: 2s
  syncPeriod: 30s
nodePortAddresses: [primary, 192.168.0.0/24]
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadms_file_maps_onto_the_flags() {
        let mut a = args(&[]);
        let notes = apply_str(KUBEADM, "kp.yaml", &mut a).unwrap();
        // Unset ("", 0, false, null) is kube-proxy's default: only what the file sets is named.
        assert_eq!(notes.unsupported, ["logging.options", "nftables.masqueradeBit", "nftables.syncPeriod", "ipvs.scheduler", "nftables.masqueradeAll (mode \"\" reads iptables.masqueradeAll)"]);
        assert!(notes.ignored_flags.is_empty() && notes.mode.is_none(), "{notes:?}");
        let cfg = a.config().unwrap();
        assert_eq!(cfg.node.name, "node-from-file");
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert!(matches!(&cfg.source, crate::agent::SourceConfig::Kube { kubeconfig: Some(k), .. } if k.to_str() == Some("/var/lib/kube-proxy/kubeconfig.conf")));
        assert_eq!(cfg.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()), "an empty healthzBindAddress is kube-proxy's default, as kubeadm means it");
        assert_eq!(cfg.metrics_bind, Some("0.0.0.0:10249".parse().unwrap()));
        // mode "" is kube-proxy's iptables mode on Linux: iptables.masqueradeAll (false) applies,
        // not nftables.masqueradeAll (true).
        assert!(!cfg.node.masquerade_all, "iptables.masqueradeAll");
        assert_eq!(cfg.min_sync_period, std::time::Duration::from_secs(2), "nftables.minSyncPeriod");
        assert_eq!(cfg.ct_timeouts[dataplane_common::ct_timeout::TCP_ESTABLISHED], 12 * 3600);
        assert_eq!((cfg.node.nodeport_addresses.len(), cfg.node.nodeport_primary), (1, true));
        assert_eq!(cfg.local_mode, crate::agent::LocalMode::ClusterCidr);
    }

    #[test]
    fn flags_the_file_carries_are_ignored_but_hostname_override() {
        let mut a = args(&["--cluster-cidr", "10.9.0.0/16", "--masquerade-all", "--hostname-override", "from-flag", "--pin-dir", "/sys/fs/bpf/x", "--node-ip", "10.0.0.1"]);
        let file = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: 10.244.0.0/16\nhostnameOverride: from-file\nbindAddress: 192.168.0.5\nmode: ipvs\ndetectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}\n";
        let notes = apply_str(file, "kp.yaml", &mut a).unwrap();
        assert_eq!(notes.ignored_flags, ["--node-ip", "--cluster-cidr", "--masquerade-all"]);
        assert_eq!(notes.mode.as_deref(), Some("ipvs"));
        let cfg = a.config().unwrap();
        assert_eq!(cfg.node.name, "from-flag");
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert!(!cfg.node.masquerade_all);
        assert_eq!(cfg.node.ips, vec!["192.168.0.5".parse::<std::net::Ipv4Addr>().unwrap()], "bindAddress is the node IP");
        assert_eq!(cfg.pin_dir.to_str(), Some("/sys/fs/bpf/x"), "Ferry's own flags apply beside the file");
        assert_eq!(cfg.local_mode, crate::agent::LocalMode::InterfaceNamePrefix("cali".into()));
        // JSON is YAML too.
        let mut a = args(&[]);
        apply_str(r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration","clusterCIDR":"10.1.0.0/16"}"#, "kp.json", &mut a).unwrap();
        assert_eq!(a.cluster_cidr.as_deref(), Some("10.1.0.0/16"));
    }

    #[test]
    fn unknown_fields_are_named_and_left_out_as_kube_proxys_lenient_decoding_does() {
        // Typos at the top and in sections, and a field of some newer version: all named (in
        // file order, by dotted path), none applied, the rest of the file used.
        let file = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCidr: 10.0.0.0/8\nclusterCIDR: 10.244.0.0/16\n\
iptables: {masqueradeAl: true, masqueradeAll: true}\nconntrack: {udpTimeout: 45s, futureKnob: {deep: 1}}\nhostnameOverride: node-a\n";
        let mut a = args(&[]);
        let notes = apply_str(file, "/etc/kp.yaml", &mut a).unwrap();
        assert_eq!(notes.unknown, ["clusterCidr", "iptables.masqueradeAl", "conntrack.futureKnob"]);
        assert!(notes.unsupported.is_empty() && notes.ignored_flags.is_empty(), "{notes:?}");
        let cfg = a.config().unwrap();
        assert_eq!(cfg.cluster_cidr, Some("10.244.0.0/16".parse().unwrap()));
        assert!(cfg.node.masquerade_all, "iptables.masqueradeAll, beside its typo");
        assert_eq!(cfg.ct_timeouts[dataplane_common::ct_timeout::UDP], 45);
        assert_eq!(cfg.node.name, "node-a");
        // A file without unknown fields has none to name.
        assert!(apply_str(KUBEADM, "kp.yaml", &mut args(&[])).unwrap().unknown.is_empty());
        // An unknown field does not hide a wrong type elsewhere, before or after it.
        for body in ["clusterCidr: x\nnftables: {masqueradeAll: yes-please}\n", "nftables: {masqueradeAll: yes-please}\nclusterCidr: x\n"] {
            let e = apply_str(&format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"), "/etc/kp.yaml", &mut args(&[])).unwrap_err().to_string();
            assert!(e.starts_with("--config /etc/kp.yaml: nftables.masqueradeAll: "), "{e}");
        }
    }

    #[test]
    fn wrong_types_name_the_file_and_the_field() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let err = |body: &str| apply_str(&format!("{head}{body}"), "/etc/kp.yaml", &mut args(&[])).unwrap_err().to_string();
        let e = err("clusterCIDR: [10.0.0.0/8]\n");
        assert!(e.starts_with("--config /etc/kp.yaml: clusterCIDR: invalid type"), "{e}");
        let e = err("iptables: {masqueradeAll: 3}\n");
        assert!(e.contains("/etc/kp.yaml: iptables.masqueradeAll: invalid type"), "{e}");
        let e = err("nftables: {masqueradeAll: yes-please}\n");
        assert!(e.contains("/etc/kp.yaml: nftables.masqueradeAll: "), "{e}");
        let e = err("conntrack: {tcpEstablishedTimeout: 1d}\n");
        assert!(e.contains("/etc/kp.yaml: conntrack.tcpEstablishedTimeout: "), "{e}");
        let e = err("nodePortAddresses: 10.0.0.0/8\n");
        assert!(e.contains("nodePortAddresses: "), "{e}");
        // Values, not only types, are named by the file's field.
        let e = err("clusterCIDR: notacidr\n");
        assert!(e.starts_with("--config /etc/kp.yaml: clusterCIDR: \"notacidr\" is not a CIDR"), "{e}");
        let e = err("metricsBindAddress: 10.0.0.1:http\n");
        assert!(e.starts_with("--config /etc/kp.yaml: metricsBindAddress: "), "{e}");
        let e = err("detectLocalMode: LocalCIDR\n");
        assert!(e.contains("detectLocalMode: \"LocalCIDR\""), "{e}");
        let e = apply_str("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n", "kp.yaml", &mut args(&[])).unwrap_err().to_string();
        assert!(e.contains("kp.yaml: apiVersion: \"kubeproxy.config.k8s.io/v1beta1\""), "{e}");
        let e = apply_str("kind: KubeletConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n", "kp.yaml", &mut args(&[])).unwrap_err().to_string();
        assert!(e.contains("kind: \"KubeletConfiguration\""), "{e}");
    }

    #[test]
    fn bind_addresses_are_defaulted_as_kube_proxy_does() {
        assert_eq!(with_port(None, "0.0.0.0:10256", 10256), "0.0.0.0:10256");
        assert_eq!(with_port(Some(String::new()), "127.0.0.1:10249", 10249), "127.0.0.1:10249");
        assert_eq!(with_port(Some("0.0.0.0".into()), "127.0.0.1:10249", 10249), "0.0.0.0:10249");
        assert_eq!(with_port(Some("::".into()), "127.0.0.1:10249", 10249), "[::]:10249");
        assert_eq!(with_port(Some("10.0.0.1:9999".into()), "127.0.0.1:10249", 10249), "10.0.0.1:9999");
    }
}
