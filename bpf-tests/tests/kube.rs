//! The API-server source end to end: the real agent binary, with its real kube client, against
//! `fakeapi` (list and watch with resourceVersions, bookmarks, 410 Gone, deletes, dropped
//! connections) inside a network namespace of the test's own; the results are read from the
//! pinned maps. Needs root.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use bpf_tests::{
    fakeapi::{http_get_in, metric, FakeApi},
    lab::{agent_bin, run_id, Netns, PinDir, Proc},
};
use dataplane_agent::bpf::BpfMaps;
use dataplane_common::{SCOPE_EXTERNAL, SVC_F_ADDR_ONLY};

const NODE: &str = "node-k";
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

const OBJECTS: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-k, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.50.2}, {type: Hostname, address: node-k}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-other}
status: {addresses: [{type: InternalIP, address: 192.168.50.3}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {type: NodePort, clusterIP: 10.96.1.10, ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: node-k}
- {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: node-other}
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: default}
spec: {clusterIP: 10.96.1.12, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web2-x, namespace: default, labels: {kubernetes.io/service-name: web2}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.9], conditions: {ready: true}, nodeName: node-k}]
ports: [{port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default, labels: {service.kubernetes.io/service-proxy-name: another-proxy}}
spec: {clusterIP: 10.96.1.11, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: default, labels: {kubernetes.io/service-name: other, service.kubernetes.io/service-proxy-name: another-proxy}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.7], conditions: {ready: true}}]
ports: [{port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: default}
spec: {clusterIP: None, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hl-1, namespace: default, labels: {kubernetes.io/service-name: hl, service.kubernetes.io/headless: ''}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.8], conditions: {ready: true}}]
ports: [{port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: db.example.com}";

fn slice_web(ips: &[(&str, &str)]) -> String {
    let eps: Vec<String> = ips.iter().map(|(ip, node)| format!("- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node}}}")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-abc, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints:\n{}\nports: [{{name: http, port: 8080, protocol: TCP}}]",
        eps.join("\n")
    )
}

struct Node {
    ns: Netns,
    pin: PinDir,
    api: FakeApi,
    agent: Option<Proc>,
    log: std::path::PathBuf,
}

impl Node {
    fn new() -> Node {
        let id = run_id();
        let ns = Netns::new(format!("ferry-kube-{id}"));
        // The interface holding the Node object's address: external, as the DaemonSet finds it
        // (no --node-ip, no --external-interfaces).
        ns.exec_ok(&["ip", "link", "add", "ext0", "type", "veth", "peer", "name", "ext0p"]);
        ns.exec_ok(&["ip", "addr", "add", "192.168.50.2/24", "dev", "ext0"]);
        ns.exec_ok(&["ip", "link", "set", "ext0", "up"]);
        ns.exec_ok(&["ip", "link", "set", "ext0p", "up"]);
        let pin = PinDir { path: format!("/sys/fs/bpf/ferry-kube-{id}").into() };
        let api = FakeApi::start(&ns.name);
        let log = std::env::temp_dir().join(format!("ferry-kube-{id}.log"));
        Node { ns, pin, api, agent: None, log }
    }

    fn start(&mut self) {
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let url = self.api.url();
        let child = self
            .ns
            .cmd(&[
                agent_bin().to_str().unwrap(),
                "run",
                "--hostname-override",
                NODE,
                "--master",
                &url,
                "--pin-dir",
                self.pin.path.to_str().unwrap(),
                "--cgroup",
                "none",
                "--pod-interfaces",
                "veth*",
                "--healthz-bind-address",
                HEALTHZ,
                "--metrics-bind-address",
                METRICS,
                "--min-sync-period-ms",
                "20",
            ])
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start agent");
        self.agent = Some(Proc { child, what: "agent".into() });
        self.wait("/readyz to answer 200", || self.get(HEALTHZ, "/readyz").is_some_and(|(c, _)| c == 200));
    }

    fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
    }

    fn get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.ns.name, addr, path)
    }

    fn metrics(&self) -> String {
        self.get(METRICS, "/metrics").expect("metrics answer").1
    }

    fn m(&self, name: &str) -> f64 {
        let page = self.metrics();
        metric(&page, name).unwrap_or_else(|| panic!("no {name} in\n{page}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(a) = &self.agent {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", a.child.id())).unwrap_or_default();
                assert!(!stat.contains(") Z "), "agent exited:\n{}", self.log());
            }
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}; agent log:\n{}", self.log());
    }

    /// Frontends in the pinned maps: "ip:port scope" -> (Service name, backend count).
    fn frontends(&self) -> BTreeMap<String, (String, u16)> {
        let maps = BpfMaps::from_pins(&self.pin.path).expect("pinned maps");
        maps.services
            .iter()
            .flatten()
            .filter(|(_, s)| s.flags & SVC_F_ADDR_ONLY == 0)
            .map(|(k, s)| {
                let fe = format!(
                    "{}:{} {}",
                    Ipv4Addr::from(k.addr_be.to_ne_bytes()),
                    u16::from_be(k.port_be),
                    if k.scope == SCOPE_EXTERNAL { "external" } else { "internal" }
                );
                (fe, (maps.service_name(s.svc_id).unwrap_or_default(), s.count))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn web_backends(n: &Node) -> Option<u16> {
    n.frontends().get("10.96.1.10:80 internal").map(|(_, c)| *c)
}

#[test]
fn api_server_source_lists_watches_relists_and_survives_restarts() {
    let mut n = Node::new();
    n.api.apply(OBJECTS);
    n.start();

    // What the client asked for: kube-proxy's selectors, only this node, bookmarks on.
    let reqs = n.api.requests();
    let has = |f: &dyn Fn(&str) -> bool| reqs.iter().any(|r| f(r));
    assert!(has(&|r| r.starts_with("GET /api/v1/services?") && r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless")), "{reqs:#?}");
    assert!(has(&|r| r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?") && r.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name")), "{reqs:#?}");
    assert!(has(&|r| r.starts_with("GET /api/v1/nodes?") && r.contains("fieldSelector=metadata.name%3Dnode-k")), "{reqs:#?}");
    n.api.wait_request("watching with bookmarks", |r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"));

    // The maps after the first sync. NodePort on the address of the Node object (no --node-ip);
    // nothing for another proxy's Service, the headless one or the ExternalName one.
    let fes = n.frontends();
    let want: BTreeMap<String, (String, u16)> = [
        ("10.96.1.10:80 internal", ("default/web:http", 2)),
        ("192.168.50.2:30080 external", ("default/web:http", 2)),
        ("192.168.50.2:30080 internal", ("default/web:http", 2)),
        ("10.96.1.12:80 internal", ("default/web2", 1)),
    ]
    .into_iter()
    .map(|(k, (s, c))| (k.to_string(), (s.to_string(), c)))
    .collect();
    assert_eq!(fes, want);
    assert_eq!(n.m("ferry_ready"), 1.0);
    // The external interface, found from the Node object's address: its links are among those
    // the start creates while the first sync writes (the Node is listed long before the programs
    // are verified), not created after the first read, before the sync.
    let log = n.log();
    let attached = log.lines().find(|l| l.contains("datapath attached")).unwrap_or_default();
    assert!(attached.contains("creating=2"), "the external links not created with the start's: {attached}\n{log}");
    for prog in ["ferry_from_world (ingress)", "ferry_to_world (egress)"] {
        assert!(log.lines().any(|l| l.contains("interface ext0") && l.contains(prog) && l.contains("new link, pinned")), "{prog} on ext0:\n{log}");
    }
    let (code, body) = n.get(HEALTHZ, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(h["lastUpdated"].as_str().unwrap().starts_with("20") && h["currentTime"].as_str().unwrap().ends_with('Z'), "{body}");
    assert_eq!(h["nodeEligible"], true);
    let page = n.metrics();
    // Services web, web2, hl and ext (another proxy's is not even listed); the slices of web and
    // web2 (the headless one's carries the headless label).
    for line in ["ferry_objects{kind=\"Service\"} 4", "ferry_objects{kind=\"EndpointSlice\"} 2", "ferry_objects{kind=\"Node\"} 1", "ferry_map_capacity{map=\"lb4_svc_v3\"} 262144"] {
        assert!(page.contains(line), "{line} missing from\n{page}");
    }
    assert!(page.contains("ferry_service_packets_total{service=\"default/web:http\",frontend=\"10.96.1.10:80/TCP\",scope=\"internal\"} 0"), "{page}");

    // Watch events: a new endpoint, a deleted Service.
    n.api.apply(&slice_web(&[("10.244.1.5", NODE), ("10.244.2.5", "node-other"), ("10.244.2.6", "node-other")]));
    n.wait("the third endpoint", || web_backends(&n) == Some(3));
    n.api.delete("Service", "default", "web2");
    n.wait("web2 to go", || !n.frontends().contains_key("10.96.1.12:80 internal"));

    // Idle: bookmarks only, nothing written.
    let writes = n.m("ferry_map_writes_total");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(n.m("ferry_map_writes_total"), writes);

    // 410 Gone with nothing changed: every watch (six resources) relists, and the relist writes
    // nothing.
    let (relists, errors) = (n.m("ferry_watch_relists_total"), n.m("ferry_watch_errors_total"));
    n.api.compact_and_drop_watches();
    n.wait("six relists", || n.m("ferry_watch_relists_total") >= relists + 6.0);
    assert!(n.m("ferry_watch_errors_total") >= errors + 6.0);
    assert!(n.log().contains("410"), "{}", n.log());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(n.m("ferry_map_writes_total"), writes, "a relist of unchanged objects rewrote entries");

    // 410 Gone with a change made meanwhile: only the relist can show it, and it does.
    n.api.compact_and_drop_watches();
    n.api.apply(&slice_web(&[("10.244.1.5", NODE), ("10.244.2.5", "node-other")]));
    n.wait("the relist to drop the third endpoint", || web_backends(&n) == Some(2));

    // A dropped connection: the watch resumes from its version; later changes still arrive.
    let watches = n.api.requests().iter().filter(|r| r.contains("watch=true")).count();
    let writes = n.m("ferry_map_writes_total");
    n.api.drop_watches();
    n.wait("re-watches", || n.api.requests().iter().filter(|r| r.contains("watch=true")).count() >= watches + 6);
    assert_eq!(n.m("ferry_map_writes_total"), writes);
    n.api.apply(&slice_web(&[("10.244.1.5", NODE)]));
    n.wait("one endpoint left", || web_backends(&n) == Some(1));

    // NetworkPolicy objects from the API server: a pod of this node, its namespace, a policy.
    n.api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {team: a}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web}}\nspec: {nodeName: node-k, containers: [{name: c}]}\nstatus: {podIP: 10.244.1.5}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: far-0, namespace: default, labels: {app: far}}\nspec: {nodeName: node-other, containers: [{name: c}]}\nstatus: {podIP: 10.244.2.5}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-in, namespace: default}\nspec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: far}}}]}]}",
    );
    let isolated = || BpfMaps::from_pins(&n.pin.path).unwrap().pol_endpoints.get(&u32::from_ne_bytes([10, 244, 1, 5]), 0).ok();
    // The objects arrive as separate watch events, so a sync may see the policy before the peer
    // pod it selects: wait for the state they add up to.
    n.wait("the policy to isolate web-0 and allow far-0", || {
        isolated().is_some_and(|e| e.flags == dataplane_common::EP_F_INGRESS) && BpfMaps::from_pins(&n.pin.path).unwrap().dump_policy().0.rules.len() == 1
    });
    let (d, _) = BpfMaps::from_pins(&n.pin.path).unwrap().dump_policy();
    assert_eq!(d.policies.values().cloned().collect::<Vec<_>>(), vec!["default/web-in".to_string()]);
    let far = d.ipcache[&"10.244.2.5/32".parse().unwrap()];
    assert!(d.rules.keys().all(|(_, k)| u32::from_be(k.identity_be) == far), "{:?}", d.rules);
    n.api.delete("NetworkPolicy", "default", "web-in");
    n.wait("the policy to go", || isolated().is_none());

    // Agent down: the maps stay (traffic keeps flowing) and inspection still reads them.
    n.stop();
    assert_eq!(web_backends(&n), Some(1));
    let out = n.ns.cmd(&[agent_bin().to_str().unwrap(), "inspect", "services", "--pin-dir", n.pin.path.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().any(|l| l.starts_with("default/web:http") && l.contains("10.96.1.10:80/TCP")), "{text}");
    // Restart: nothing flushed, nothing rewritten.
    n.start();
    assert_eq!(n.m("ferry_map_writes_total"), 0.0);
    assert_eq!(n.m("ferry_map_deletes_total"), 0.0);
    assert_eq!(web_backends(&n), Some(1));
}

#[test]
fn unreachable_api_server_keeps_the_pinned_datapath_and_is_not_ready() {
    let mut n = Node::new();
    n.api.apply(OBJECTS);
    n.start();
    assert_eq!(web_backends(&n), Some(2));
    n.stop();
    // The API server goes away; the agent starts, waits for its lists, and says so.
    let url = n.api.url();
    let other = FakeApi::start(&n.ns.name);
    drop(std::mem::replace(&mut n.api, other));
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).unwrap();
    let child = n
        .ns
        .cmd(&[agent_bin().to_str().unwrap(), "run", "--hostname-override", NODE, "--master", &url, "--pin-dir", n.pin.path.to_str().unwrap(), "--cgroup", "none", "--healthz-bind-address", HEALTHZ, "--metrics-bind-address", METRICS])
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    n.agent = Some(Proc { child, what: "agent".into() });
    n.wait("/readyz to answer 503", || n.get(HEALTHZ, "/readyz").is_some_and(|(c, _)| c == 503));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(n.get(HEALTHZ, "/readyz").unwrap().0, 503);
    assert_eq!(web_backends(&n), Some(2), "the maps from before stay in place");
    assert!(n.log().contains("waiting for the initial lists"), "{}", n.log());
}

#[test]
fn service_cidrs_are_asked_for_again_after_a_404_when_another_resource_relists() {
    let mut n = Node::new();
    n.start();
    // An API server without ServiceCIDR objects: 404, noted once, the first sync not held back
    // (readyz answered 200 in start).
    n.wait("the 404 to be noted", || n.log().contains("serves no ServiceCIDR objects"));
    let cidrs = |n: &Node| -> Vec<String> {
        let maps = BpfMaps::from_pins(&n.pin.path).expect("pinned maps");
        maps.service_cidrs.iter().flatten().map(|(k, _)| format!("{}/{}", Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len())).collect()
    };
    assert!(cidrs(&n).is_empty(), "{:?}", cidrs(&n));
    // The API server is upgraded: it serves them now, and the agent's watches expire (410), so
    // the agent relists; the relist makes it ask for ServiceCIDRs again.
    n.api.apply("apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: extra}\nspec: {cidrs: [10.97.0.0/24]}");
    n.api.serve_service_cidrs();
    n.api.compact_and_drop_watches();
    n.wait("the ServiceCIDR's range in the map", || cidrs(&n) == ["10.97.0.0/24"]);
    assert!(n.log().contains("ServiceCIDR objects (networking.k8s.io/v1) are served"), "{}", n.log());
    assert_eq!(n.log().matches("serves no ServiceCIDR objects").count(), 1, "the 404 is said once:\n{}", n.log());
}

/// The agent's pinned external links ("{ifindex}-external-{direction}"), sorted.
fn external_pins(n: &Node) -> Vec<String> {
    let dir = n.pin.path.join(dataplane_agent::links::DIR);
    let mut v: Vec<String> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|f| f.contains("-external-")).collect();
    v.sort();
    v
}

fn ifindex(n: &Node, name: &str) -> u32 {
    // ("7: ext0@ext0p: <...>": sysfs shows the root namespace's links, `ip` this one's.)
    let out = n.ns.cmd(&["ip", "-o", "link", "show", "dev", name]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(':').next().and_then(|i| i.trim().parse().ok()).unwrap_or_else(|| panic!("ifindex of {name}: {text:?}"))
}

#[test]
fn the_external_programs_follow_the_node_address_between_interfaces() {
    let mut n = Node::new();
    // The Node object's address is on no interface yet (a NIC whose address comes up after the
    // agent, as with DHCP): the start finds no external interface.
    n.ns.exec_ok(&["ip", "addr", "del", "192.168.50.2/24", "dev", "ext0"]);
    n.api.apply(OBJECTS);
    n.start();
    assert_eq!(external_pins(&n), Vec::<String>::new());
    assert!(n.log().lines().any(|l| l.contains("interfaces=none") && l.contains("external interfaces (holding the node's addresses)")), "{}", n.log());
    // The address comes up: ext0 gets the external programs, with no restart.
    n.ns.exec_ok(&["ip", "addr", "add", "192.168.50.2/24", "dev", "ext0"]);
    let ext0 = ifindex(&n, "ext0");
    n.wait("ext0's external links", || external_pins(&n) == [format!("{ext0}-external-egress"), format!("{ext0}-external-ingress")]);
    assert!(n.log().lines().any(|l| l.contains("interfaces=ext0") && l.contains("external interfaces")), "{}", n.log());
    // The address moves to another interface (a bond, a renamed NIC): the programs follow it, and
    // ext0, no longer the node's, loses them.
    n.ns.exec_ok(&["ip", "link", "add", "ext1", "type", "veth", "peer", "name", "ext1p"]);
    n.ns.exec_ok(&["ip", "link", "set", "ext1", "up"]);
    n.ns.exec_ok(&["ip", "link", "set", "ext1p", "up"]);
    // On its way the address is on no interface for a moment (as when a network manager flushes
    // it and adds it again): ext0 keeps its links meanwhile, and the agent says so once.
    n.ns.exec_ok(&["ip", "addr", "del", "192.168.50.2/24", "dev", "ext0"]);
    n.wait("the agent to see the address gone", || n.log().contains("no interface holds the node's addresses now"));
    assert_eq!(external_pins(&n), [format!("{ext0}-external-egress"), format!("{ext0}-external-ingress")]);
    n.ns.exec_ok(&["ip", "addr", "add", "192.168.50.2/24", "dev", "ext1"]);
    let ext1 = ifindex(&n, "ext1");
    n.wait("ext1's external links, none on ext0", || external_pins(&n) == [format!("{ext1}-external-egress"), format!("{ext1}-external-ingress")]);
    assert_eq!(n.log().matches("no interface holds the node's addresses now").count(), 1, "{}", n.log());
    // NodePort is still served on the address, and the agent is still ready.
    assert!(n.frontends().contains_key("192.168.50.2:30080 external"), "{:?}", n.frontends());
    assert_eq!(n.get(HEALTHZ, "/readyz").unwrap().0, 200);
}
