//! The lab through a real control plane (`cargo xtask lab --api-server`, tests/controlplane.rs):
//! `cargo xtask cluster up`'s etcd, kube-apiserver and kube-controller-manager in a namespace of
//! their own, linked to node1 by a veth (node2 reaches them through node1). The lab's nodes are
//! registered as Node objects (addresses, podCIDR, the Ready condition, and a Lease renewed as a
//! kubelet does, so the node lifecycle controller never marks their pods not ready); its pods as
//! Pod objects whose status (podIP, phase, the Ready condition) the harness sets, so the
//! EndpointSlices are the real controller's. The agents authenticate as the DaemonSet's
//! ServiceAccount bound to `deploy/`'s ClusterRole. Everything goes on drop: the heartbeats, then
//! the control plane with its namespace (and so the link).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};

use crate::{
    cluster::ControlPlane,
    lab::{sh, Cluster},
};

/// The API server's address on the control plane's side of the link.
pub const CP_ADDR: &str = "10.250.0.1";
/// The lab's namespace (the example manifests').
pub const NS: &str = "lab";

/// A thread renewing the nodes' Leases (every 10 s; the node lifecycle controller's grace period
/// is 50 s), stopped and joined on drop.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Field order is drop order: the heartbeats stop before the control plane goes.
pub struct ApiLab {
    heartbeat: Option<Heartbeat>,
    pub cp: Arc<ControlPlane>,
    /// The agents' kubeconfig: the ServiceAccount's token, the server at [`CP_ADDR`].
    pub kubeconfig: PathBuf,
}

/// metav1.Time and MicroTime (six fractional digits), UTC.
pub fn micro_time(t: SystemTime) -> String {
    let micros = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_micros();
    let secs = dataplane_agent::observe::rfc3339(t);
    format!("{}.{micros:06}Z", secs.split(['.', 'Z']).next().unwrap())
}

/// A request the test needs answered with one of `ok`; the answer's JSON.
pub fn call(cp: &ControlPlane, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> Value {
    let ctype = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
    let text = body.map(|b| b.to_string());
    let (code, answer) = cp.api_as(method, path, text.as_deref(), ctype);
    assert!(ok.contains(&code), "{method} {path}: {code} {answer}");
    serde_json::from_str(&answer).unwrap_or(Value::Null)
}

/// A pod's Ready and ContainersReady conditions, now.
fn conditions(ready: bool) -> Value {
    let (t, s) = (dataplane_agent::observe::rfc3339(SystemTime::now()), if ready { "True" } else { "False" });
    json!([{"type": "Ready", "status": s, "lastTransitionTime": t}, {"type": "ContainersReady", "status": s, "lastTransitionTime": t}])
}

impl ApiLab {
    /// Starts the control plane, creates the DaemonSet's ServiceAccount with its ClusterRole and
    /// the lab's namespace, and writes the agents' kubeconfig.
    pub fn up() -> ApiLab {
        let cp = ControlPlane::up();
        cp.apply_deploy("serviceaccount.yaml");
        cp.apply_deploy("clusterrole.yaml");
        let kubeconfig = cp.service_account_kubeconfig_at(&format!("https://{CP_ADDR}:6443"));
        let lab = ApiLab { heartbeat: None, cp: Arc::new(cp), kubeconfig };
        lab.namespace(NS, &BTreeMap::new());
        lab
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>, ok: &[u16]) -> Value {
        call(&self.cp, method, path, body, ok)
    }

    /// Creates namespace `name` with `labels` and waits (at most 30 s) for its `default`
    /// ServiceAccount, without which the API server admits no Pod there.
    pub fn namespace(&self, name: &str, labels: &BTreeMap<String, String>) {
        self.call("POST", "/api/v1/namespaces", Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})), &[201]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cp.api("GET", &format!("/api/v1/namespaces/{name}/serviceaccounts/default"), None).0 != 200 {
            assert!(Instant::now() < deadline, "no default ServiceAccount in namespace {name} within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Links the control plane to the lab's node1 (node2 routes through it), registers the
    /// lab's nodes, starts their heartbeats, and makes the lab start its agents with the
    /// ServiceAccount's kubeconfig instead of manifests.
    pub fn join(&mut self, c: &mut Cluster) {
        let node1 = &c.nodes[0];
        sh(&["ip", "-n", &self.cp.ns, "link", "add", "lab0", "type", "veth", "peer", "name", "cp0", "netns", &node1.ns.name]);
        sh(&["ip", "-n", &self.cp.ns, "addr", "add", "10.250.1.2/30", "dev", "lab0"]);
        sh(&["ip", "-n", &self.cp.ns, "link", "set", "lab0", "up"]);
        sh(&["ip", "-n", &self.cp.ns, "route", "add", "192.168.77.0/24", "via", "10.250.1.1"]);
        // And the pods (10.201.<node>.0/24): `default/kubernetes` from a pod is DNATed, not
        // masqueraded, so the API server answers the pod's own address.
        sh(&["ip", "-n", &self.cp.ns, "route", "add", "10.201.0.0/16", "via", "10.250.1.1"]);
        node1.ns.exec_ok(&["ip", "addr", "add", "10.250.1.1/30", "dev", "cp0"]);
        node1.ns.exec_ok(&["ip", "link", "set", "cp0", "up"]);
        node1.ns.exec_ok(&["ip", "route", "add", &format!("{CP_ADDR}/32"), "via", "10.250.1.2", "dev", "cp0"]);
        for n in &c.nodes[1..] {
            n.ns.exec_ok(&["ip", "route", "add", &format!("{CP_ADDR}/32"), "via", &node1.ip.to_string()]);
        }
        // Every node reaches the API server (anonymous /readyz is public).
        for n in &c.nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !n.ns.cmd(&["curl", "-sk", "--max-time", "2", &format!("https://{CP_ADDR}:6443/readyz")]).output().is_ok_and(|o| o.stdout == b"ok") {
                assert!(Instant::now() < deadline, "{} does not reach the API server at {CP_ADDR}:6443", n.name);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
        for (i, n) in c.nodes.iter().enumerate() {
            let cidr = format!("10.201.{}.0/24", i + 1);
            let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            self.call("POST", "/api/v1/nodes", Some(&node), &[201]);
            let now = micro_time(SystemTime::now());
            let status = json!({"status": {
                "addresses": [{"type": "InternalIP", "address": n.ip.to_string()}, {"type": "Hostname", "address": n.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the Ferry lab's node", "lastHeartbeatTime": dataplane_agent::observe::rfc3339(SystemTime::now()), "lastTransitionTime": dataplane_agent::observe::rfc3339(SystemTime::now())}]
            }});
            self.call("PATCH", &format!("/api/v1/nodes/{}/status", n.name), Some(&status), &[200]);
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": n.name, "namespace": "kube-node-lease"}, "spec": {"holderIdentity": n.name, "leaseDurationSeconds": 40, "renewTime": now}});
            self.call("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", Some(&lease), &[201]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (cp, stopped) = (self.cp.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() < Duration::from_secs(10) {
                    continue;
                }
                last = Instant::now();
                for n in &names {
                    let renew = json!({"spec": {"renewTime": micro_time(SystemTime::now())}}).to_string();
                    // Not asserted: the API server may be restarting (a test's restart); the
                    // next beat makes up for a missed one.
                    let _ = cp.api_as("PATCH", &format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{n}"), Some(&renew), "application/merge-patch+json");
                }
            }
        });
        self.heartbeat = Some(Heartbeat { stop, thread: Some(thread) });
        c.kubeconfig = Some(self.kubeconfig.clone());
    }

    /// Registers a Pod on `node` with `labels` (and the echo server's named container ports),
    /// then sets its status as a kubelet would: Running, `ip`, Ready `ready`.
    pub fn pod(&self, ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: &BTreeMap<String, String>, ready: bool) {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {
            "nodeName": node, "automountServiceAccountToken": false,
            "containers": [{"name": "echo", "image": "ferry-echo", "ports": [{"name": "echo", "containerPort": crate::lab::ECHO_TCP_PORT}, {"name": "echo-udp", "containerPort": crate::lab::ECHO_UDP_PORT, "protocol": "UDP"}]}]
        }});
        self.call("POST", &format!("/api/v1/namespaces/{ns}/pods"), Some(&pod), &[201]);
        let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "conditions": conditions(ready)}});
        self.call("PATCH", &format!("/api/v1/namespaces/{ns}/pods/{name}/status"), Some(&status), &[200]);
    }

    /// Sets pod `name`'s Ready condition (as its kubelet would on a readiness probe's result).
    pub fn set_ready(&self, ns: &str, name: &str, ready: bool) {
        self.call("PATCH", &format!("/api/v1/namespaces/{ns}/pods/{name}/status"), Some(&json!({"status": {"conditions": conditions(ready)}})), &[200]);
    }

    /// Deletes pod `name` at once (grace period 0: no kubelet confirms a graceful one here).
    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.call("DELETE", &format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0"), None, &[200]);
    }

    /// Sets (or, with `None`, removes) a label of an object at `path`.
    pub fn label(&self, path: &str, key: &str, value: Option<&str>) {
        self.call("PATCH", path, Some(&json!({"metadata": {"labels": {key: value}}})), &[200]);
    }

    /// Creates the Services of the manifests in `dir` (`*.yaml`) and registers the lab's pods,
    /// each labelled with the selectors of the Services whose hand-written EndpointSlices list
    /// it: the real controller then writes the same endpoints. Waits until it has.
    pub fn apply_manifests(&self, c: &Cluster, dir: &Path) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "yaml")).collect();
        files.sort();
        let (mut selectors, mut want, mut labels) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::<Ipv4Addr, BTreeMap<String, String>>::new());
        let docs: Vec<Value> = files.iter().flat_map(|f| std::fs::read_to_string(f).unwrap().split("\n---").map(String::from).collect::<Vec<_>>()).filter(|d| d.contains("kind:")).map(|d| serde_yaml::from_str(&d).unwrap()).collect();
        for d in docs.iter().filter(|d| d["kind"] == "Service") {
            let (ns, name) = (d["metadata"]["namespace"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap());
            self.call("POST", &format!("/api/v1/namespaces/{ns}/services"), Some(d), &[201]);
            selectors.insert(name.to_string(), d["spec"]["selector"].as_object().cloned().unwrap_or_else(|| panic!("Service {name}: the API lab needs a selector")));
        }
        for d in docs.iter().filter(|d| d["kind"] == "EndpointSlice") {
            let svc = d["metadata"]["labels"]["kubernetes.io/service-name"].as_str().unwrap();
            for ep in d["endpoints"].as_array().into_iter().flatten() {
                for ip in ep["addresses"].as_array().unwrap() {
                    let l = labels.entry(ip.as_str().unwrap().parse().unwrap()).or_default();
                    for (k, v) in &selectors[svc] {
                        let old = l.insert(k.clone(), v.as_str().unwrap().to_string());
                        assert!(old.is_none_or(|o| o == v.as_str().unwrap()), "pod {ip}: conflicting selectors on label {k}");
                    }
                    *want.entry(svc.to_string()).or_insert(0usize) += 1;
                }
            }
        }
        for p in &c.pods {
            self.pod(NS, &p.name, c.node_of_pod(&p.name), p.ip, &labels.get(&p.ip).cloned().unwrap_or_default(), true);
        }
        for (svc, n) in want {
            self.wait_endpoints(NS, &svc, n);
        }
    }

    /// The ready endpoints (addresses) of Service `svc`'s EndpointSlices, and how many slices.
    pub fn endpoints(&self, ns: &str, svc: &str) -> (Vec<String>, usize) {
        let v = self.call("GET", &format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io/service-name%3D{svc}"), None, &[200]);
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let mut ready: Vec<String> = items
            .iter()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] != false)
            .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
            .map(|a| a.as_str().unwrap_or("").to_string())
            .collect();
        ready.sort();
        (ready, items.len())
    }

    /// Waits (at most 30 s) until the EndpointSlice controller lists `n` ready endpoints for
    /// Service `svc`; returns how many slices hold them.
    pub fn wait_endpoints(&self, ns: &str, svc: &str, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ready, slices) = self.endpoints(ns, svc);
            if ready.len() == n {
                return slices;
            }
            assert!(Instant::now() < deadline, "{ns}/{svc}: {} ready endpoints, not {n}, after 30 s: {ready:?}", ready.len());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The lab of the examples through the API server: the control plane up and linked, the nodes,
/// pods and Services registered, the controller's slices written; the agents not started yet.
/// Field order is drop order: the lab (its agents first) goes before the control plane.
pub struct LabApi {
    pub c: Cluster,
    pub api: ApiLab,
}

impl LabApi {
    pub fn new(manifests: &Path) -> LabApi {
        let mut api = ApiLab::up();
        let mut c = Cluster::new(manifests);
        api.join(&mut c);
        api.apply_manifests(&c, manifests);
        LabApi { c, api }
    }
}
