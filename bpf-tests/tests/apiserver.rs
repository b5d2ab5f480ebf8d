//! Ferry against a real control plane: etcd, kube-apiserver (TLS, RBAC, a service-account
//! issuer) and kube-controller-manager from `cargo xtask setup`'s pinned upstream builds, started
//! by `cargo xtask cluster up` in a network namespace of this test's own.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use bpf_tests::cluster::{root, Agent, ControlPlane};

#[test]
fn the_agent_follows_services_and_slices_of_a_real_api_server() {
    let cp = ControlPlane::up();
    // RBAC is on: an anonymous client gets nothing.
    let anon = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cp.ns))
        .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(cp.dir.path.join("pki/ca.crt"))
        .arg("https://127.0.0.1:6443/api/v1/services")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anon.stdout), "403");
    // The agent authenticates as the DaemonSet's ServiceAccount, bound to deploy/'s ClusterRole:
    // RBAC decides what it may read, for real.
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    // A slice changed ten minutes before the agent starts: a change it did not see happen, which
    // kube-proxy leaves out of its network programming latency (else every restart would add
    // each slice's age).
    let before = dataplane_agent::observe::rfc3339(std::time::SystemTime::now() - std::time::Duration::from_secs(600));
    let old = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"old-1","namespace":"default","annotations":{"endpoints.kubernetes.io/last-change-trigger-time":"TRIGGER"},"labels":{"kubernetes.io/service-name":"old","endpointslice.kubernetes.io/managed-by":"ferry-test"}},"addressType":"IPv4","ports":[{"port":80,"protocol":"TCP"}],"endpoints":[{"addresses":["10.201.1.12"],"conditions":{"ready":true}}]}"#.replace("TRIGGER", &before);
    assert_eq!(cp.api("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", Some(&old)).0, 201);
    let agent = Agent::start(&cp, &cp.service_account_kubeconfig());
    // The `kubernetes` Service and the slice kube-controller-manager wrote for it, and the old one.
    agent.wait_synced("services=1 slices=2");
    assert!(agent.has_frontend("10.96.0.1", 443), "{}", agent.log());
    let m0 = agent.metrics();
    assert!(m0.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 0\n"), "{m0}");
    // The initial lists count as changes, as kube-proxy's informers deliver each object.
    assert!(value(&m0, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0 && value(&m0, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1.0, "{m0}");

    // A Service as kubectl would send it: the API server fills in its defaults.
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default"},"spec":{"clusterIP":"10.96.5.10","ports":[{"name":"http","port":80,"targetPort":8080}]}}"#;
    let (code, body) = cp.api("POST", "/api/v1/namespaces/default/services", Some(svc));
    assert_eq!(code, 201, "{body}");
    assert!(body.contains("\"ipFamilies\"") && body.contains("\"internalTrafficPolicy\": \"Cluster\""), "server-side defaults: {body}");
    // With the change-trigger time the EndpointSlice controller writes: kube-proxy's network
    // programming latency is measured from it.
    let trigger = dataplane_agent::observe::rfc3339(std::time::SystemTime::now());
    let slice = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"web-1","namespace":"default","annotations":{"endpoints.kubernetes.io/last-change-trigger-time":"TRIGGER"},"labels":{"kubernetes.io/service-name":"web","endpointslice.kubernetes.io/managed-by":"ferry-test"}},"addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],"endpoints":[{"addresses":["10.201.1.11"],"conditions":{"ready":true}}]}"#.replace("TRIGGER", &trigger);
    let (code, body) = cp.api("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", Some(&slice));
    assert_eq!(code, 201, "{body}");
    agent.wait_synced("services=2 slices=3");
    assert!(agent.has_frontend("10.96.5.10", 80), "{}", agent.log());
    // kube-proxy's metric names, for its dashboards.
    let m = agent.metrics();
    // The changes moved kube-proxy's counters (a Service and a slice, each at least one event),
    // and the sync read them all: nothing pending.
    for (name, before) in [("kubeproxy_sync_proxy_rules_service_changes_total", &m0), ("kubeproxy_sync_proxy_rules_endpoint_changes_total", &m0)] {
        assert!(value(&m, name) >= value(before, name) + 1.0, "{name}: {} then {}", value(before, name), value(&m, name));
    }
    let pending = |m: &str| value(m, "kubeproxy_sync_proxy_rules_service_changes_pending") + value(m, "kubeproxy_sync_proxy_rules_endpoint_changes_pending");
    wait_until(10, || pending(&agent.metrics()) == 0.0, || format!("changes stay pending:\n{}", agent.metrics()));
    let queued = value(&m, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    // (A sync queued by a later event may still be under way: no order with the last sync.)
    assert!(queued > now - 120.0 && queued <= now, "{m}");
    assert!(value(&m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}") >= 2.0, "{m}");
    assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"16.384\"} "), "kube-proxy's buckets: {m}");
    // The agent's own process (client_golang's process collector's names).
    assert!(value(&m, "process_resident_memory_bytes") > 1e6 && value(&m, "process_open_fds") >= 3.0 && value(&m, "process_max_fds") >= value(&m, "process_open_fds"), "{m}");
    assert!((now - 600.0..=now).contains(&value(&m, "process_start_time_seconds")) && value(&m, "process_cpu_seconds_total") > 0.0, "{m}");
    assert_eq!(value(&m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}"), 0.0, "{m}");
    // client-go's request counter: the lists and the watches (at least one of each of the four
    // resources besides NetworkPolicy's three), all answered 200.
    assert!(value(&m, "rest_client_requests_total{code=\"200\",host=\"127.0.0.1:6443\",method=\"GET\"}") >= 8.0, "{m}");
    // With kube-proxy's label (v1.37.2's pkg/proxy/metrics: ip_family on each).
    assert!(m.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1\n"), "{m}");
    assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} "), "{m}");
    let last: f64 = m.lines().find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} ")).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    assert!(last > 1.0e9, "{m}");

    // internalTrafficPolicy Local with its only endpoint on another node: counted, as
    // kube-proxy counts it.
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"local","namespace":"default"},"spec":{"clusterIP":"10.96.5.11","internalTrafficPolicy":"Local","ports":[{"port":80}]}}"#;
    assert_eq!(cp.api("POST", "/api/v1/namespaces/default/services", Some(svc)).0, 201);
    let slice = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"local-1","namespace":"default","labels":{"kubernetes.io/service-name":"local","endpointslice.kubernetes.io/managed-by":"ferry-test"}},"addressType":"IPv4","ports":[{"port":80,"protocol":"TCP"}],"endpoints":[{"addresses":["10.201.2.11"],"nodeName":"elsewhere","conditions":{"ready":true}}]}"#;
    assert_eq!(cp.api("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", Some(slice)).0, 201);
    agent.wait_synced("services=3 slices=4");
    let m = agent.metrics();
    assert_eq!(value(&m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}"), 1.0, "{m}");
    assert_eq!(value(&m, "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}"), 0.0, "{m}");
    assert_eq!(cp.api("DELETE", "/api/v1/namespaces/default/services/local", None).0, 200);

    // Deleted: the frontend goes.
    let (code, body) = cp.api("DELETE", "/api/v1/namespaces/default/services/web", None);
    assert_eq!(code, 200, "{body}");
    agent.wait_synced("services=1");
    assert!(!agent.has_frontend("10.96.5.10", 80), "{}", agent.log());
    assert!(agent.has_frontend("10.96.0.1", 443));
}

#[test]
fn narrowed_rbac_is_named_by_verb_and_resource() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    // The ClusterRole without EndpointSlices.
    let role = std::fs::read_to_string(root().join("deploy/clusterrole.yaml")).unwrap();
    let narrowed = role.split("\n---").find(|d| d.contains("kind: ClusterRole\n")).unwrap().replace("- apiGroups: [discovery.k8s.io]\n  resources: [endpointslices]\n  verbs: [list, watch]\n", "");
    assert!(!narrowed.contains("endpointslices"), "{narrowed}");
    let (code, body) = cp.api_as("PUT", "/apis/rbac.authorization.k8s.io/v1/clusterroles/ferry", Some(&narrowed), "application/yaml");
    assert_eq!(code, 200, "{body}");
    let agent = Agent::start(&cp, &cp.service_account_kubeconfig());
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = r#"cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\""#;
    while !agent.log().contains(want) && !agent.log().contains(&want.replace('\\', "")) {
        assert!(Instant::now() < deadline, "no error naming the verb and the resource within 30 s:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // It never claims a sync it could not make.
    assert!(!agent.log().contains("synced"), "{}", agent.log());
}

/// The value of the sample `series` (a name, with its labels if it has any) in `text`; fails if
/// there is none.
fn value(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Waits (at most `secs`) until `done`; else fails with `why()`.
fn wait_until(secs: u64, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "within {secs} s: {}", why());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates a ClusterIP Service `name` at `ip`, port 80.
fn create_service(cp: &ControlPlane, name: &str, ip: &str) {
    let svc = format!(r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"default"}},"spec":{{"clusterIP":"{ip}","ports":[{{"port":80}}]}}}}"#);
    let (code, body) = cp.api("POST", "/api/v1/namespaces/default/services", Some(&svc));
    assert_eq!(code, 201, "Service {name} at {ip}: {body}");
}

/// The sum of a metric's samples whose labels hold every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// The agent's requests of one verb, as (resource, requestURI), from the API server's audit log.
fn requests(cp: &ControlPlane, verb: &str, stage: &str) -> Vec<(String, String)> {
    cp.audit()
        .iter()
        .filter(|e| e["verb"] == verb && e["stage"] == stage)
        .map(|e| (e["objectRef"]["resource"].as_str().unwrap_or("").to_string(), e["requestURI"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn initial_lists_come_from_the_watch_cache_in_pages_and_a_410_relists() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    // More EndpointSlices than a page holds (500).
    let slices: Vec<String> = (0..520)
        .map(|i| format!(r#"{{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{{"name":"bulk-{i}","namespace":"default","labels":{{"kubernetes.io/service-name":"bulk","endpointslice.kubernetes.io/managed-by":"ferry-test"}}}},"addressType":"IPv4","ports":[{{"port":80,"protocol":"TCP"}}],"endpoints":[{{"addresses":["10.201.3.{}"]}}]}}"#, i % 250 + 1))
        .collect();
    cp.create_many("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", &slices);
    let before = cp.api("GET", "/metrics", None).1;
    let agent = Agent::start(&cp, &cp.service_account_kubeconfig());
    agent.wait_synced("services=1 slices=521");
    let after = cp.api("GET", "/metrics", None).1;
    // The initial lists make one full translation: a list marked complete after its store was
    // ready (and read by the first sync) must not make the next sync a second one.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = agent.log();
    let translating: Vec<&str> = log.lines().filter(|l| l.contains(" synced ") && !l.contains(" translated=0 ")).collect();
    assert_eq!(translating.len(), 1, "{translating:#?}");

    // Every LIST is paginated and a consistent read (no resourceVersion: served at etcd's
    // current revision); EndpointSlices took two pages, the second by a continue token.
    let mut lists = requests(&cp, "list", "ResponseComplete");
    // Besides the one-object LIST that asks whether ServiceCIDRs can be read.
    let probe = "/apis/networking.k8s.io/v1/servicecidrs?&limit=1";
    assert_eq!(lists.iter().filter(|(_, uri)| uri == probe).count(), 1, "{lists:?}");
    lists.retain(|(_, uri)| uri != probe);
    for r in ["services", "endpointslices", "nodes", "pods", "namespaces", "networkpolicies", "servicecidrs"] {
        assert!(lists.iter().any(|(res, _)| res == r), "no LIST of {r}: {lists:?}");
    }
    for (r, uri) in &lists {
        assert!(uri.contains("limit=500") && !uri.contains("resourceVersion="), "{r}: {uri}");
    }
    let slice_lists: Vec<&String> = lists.iter().filter(|(r, _)| r == "endpointslices").map(|(_, u)| u).collect();
    assert_eq!(slice_lists.len(), 2, "{slice_lists:?}");
    assert!(!slice_lists[0].contains("continue=") && slice_lists[1].contains("continue="), "{slice_lists:?}");
    // Both pages came from the watch cache, none from etcd.
    let from = |m: &str, storage: &str| metric_sum(m, "apiserver_storage_list_total", &["resource=\"endpointslices\"", &format!("storage=\"{storage}\"")]);
    assert!(from(&after, "watchcache") - from(&before, "watchcache") >= 2.0, "watch cache lists: {} then {}", from(&before, "watchcache"), from(&after, "watchcache"));
    assert_eq!(from(&after, "etcd"), from(&before, "etcd"), "an EndpointSlice LIST went to etcd");
    // Every watch asks for bookmarks and resumes from the list's resource version.
    let watches = requests(&cp, "watch", "ResponseStarted");
    assert!(watches.len() >= 7, "{watches:?}");
    for (r, uri) in &watches {
        assert!(uri.contains("allowWatchBookmarks=true") && uri.contains("resourceVersion=") && !uri.contains("resourceVersion=0&"), "{r}: {uri}");
    }

    // A restarted API server's watch cache starts at etcd's current revision: a watch resumed
    // from an older one (a write the agent does not watch moves etcd's revision on) is answered
    // 410 Gone, and the agent relists.
    let relists = |m: &str| m.lines().find_map(|l| l.strip_prefix("ferry_watch_relists_total ")).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let relists_before = relists(&agent.metrics());
    let (code, body) = cp.api("POST", "/api/v1/namespaces/default/configmaps", Some(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"bump"}}"#));
    assert_eq!(code, 201, "{body}");
    let lists_before = requests(&cp, "list", "ResponseComplete").len();
    cp.restart_apiserver();
    wait_until(60, || agent.log().contains("too old resource version"), || format!("no 410:\n{}", agent.log()));
    create_service(&cp, "after", "10.96.7.7");
    agent.wait_synced("services=2 slices=521");
    assert!(agent.has_frontend("10.96.7.7", 80), "{}", agent.log());
    assert!(relists(&agent.metrics()) > relists_before, "{}", agent.metrics());
    // The relist is again a paginated consistent read.
    let relisted: Vec<(String, String)> = requests(&cp, "list", "ResponseComplete").split_off(lists_before);
    assert!(!relisted.is_empty(), "no LIST after the restart");
    for (r, uri) in &relisted {
        assert!(uri.contains("limit=500") && !uri.contains("resourceVersion="), "{r}: {uri}");
    }
}

#[test]
fn policies_compile_from_pods_of_the_real_api_server() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    let ns = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop","labels":{"team":"shop"}}}"#;
    assert_eq!(cp.api("POST", "/api/v1/namespaces", Some(ns)).0, 201);
    // Pods as a kubelet would leave them: the spec from the user, the status (phase,
    // addresses) written to the status subresource.
    let pod = |name: &str, app: &str, node: &str, ip: &str| {
        let spec = format!(r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"shop","labels":{{"app":"{app}"}}}},"spec":{{"nodeName":"{node}","containers":[{{"name":"c","image":"nginx","ports":[{{"name":"http","containerPort":8080}}]}}]}}}}"#);
        // The namespace's default ServiceAccount (admission needs it) comes from the controller manager.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = cp.api("POST", "/api/v1/namespaces/shop/pods", Some(&spec));
            if code == 201 {
                break;
            }
            assert!(Instant::now() < deadline && body.contains("serviceaccount"), "{name}: {code} {body}");
            std::thread::sleep(Duration::from_millis(300));
        }
        let status = format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
        let (code, body) = cp.api_as("PATCH", &format!("/api/v1/namespaces/shop/pods/{name}/status"), Some(&status), "application/merge-patch+json");
        assert_eq!(code, 200, "{body}");
    };
    pod("server", "server", "cp1", "10.201.0.10");
    pod("client", "client", "other", "10.201.1.10");
    let np = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"server-in","namespace":"shop"},"spec":{"podSelector":{"matchLabels":{"app":"server"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],"ports":[{"port":"http"}]}]}}"#;
    let (code, body) = cp.api("POST", "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies", Some(np));
    assert_eq!(code, 201, "{body}");

    let agent = Agent::start(&cp, &cp.service_account_kubeconfig());
    agent.wait_synced("policies=1");
    let identity = |ip: &str| {
        let maps = dataplane_agent::bpf::BpfMaps::from_pins(&agent.pin).expect("pinned maps");
        maps.pol_ipcache.get(&aya::maps::lpm_trie::Key::new(32, u32::from_ne_bytes(ip.parse::<std::net::Ipv4Addr>().unwrap().octets())), 0).ok()
    };
    // Each pod has an identity of its own (namespace and labels) in the ipcache.
    wait_until(30, || identity("10.201.0.10").is_some() && identity("10.201.1.10").is_some(), || format!("the pods' addresses are not in the ipcache:\n{}", agent.log()));
    let (server, client) = (identity("10.201.0.10").unwrap(), identity("10.201.1.10").unwrap());
    assert!(server >= dataplane_common::identity::FIRST && client >= dataplane_common::identity::FIRST && server != client, "{server} {client}");
    assert!(!agent.log().contains("untranslated"), "the named port resolved from the pod's container ports:\n{}", agent.log());
    // A deleted pod leaves the ipcache.
    let (code, body) = cp.api("DELETE", "/api/v1/namespaces/shop/pods/client?gracePeriodSeconds=0", None);
    assert_eq!(code, 200, "{body}");
    wait_until(30, || identity("10.201.1.10").is_none(), || format!("the deleted pod stays in the ipcache:\n{}", agent.log()));
    assert_eq!(identity("10.201.0.10"), Some(server));
}

#[test]
fn service_cidr_objects_are_service_ranges() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    // No --service-cidr: the API server's own ServiceCIDR (`kubernetes`, from its
    // --service-cluster-ip-range) gives the range.
    let kubeconfig = cp.service_account_kubeconfig().display().to_string();
    let agent = Agent::start_args(&cp, &["--cluster-cidr".into(), "10.201.0.0/16".into(), "--kubeconfig".into(), kubeconfig]);
    agent.wait_synced("services=1");
    assert_eq!(agent.service_cidrs(), ["10.96.0.0/16"], "{}", agent.log());

    // A range added: a Service can take an address in it, and both are in the datapath.
    let sc = r#"{"apiVersion":"networking.k8s.io/v1","kind":"ServiceCIDR","metadata":{"name":"extra"},"spec":{"cidrs":["10.97.0.0/24"]}}"#;
    let (code, body) = cp.api("POST", "/apis/networking.k8s.io/v1/servicecidrs", Some(sc));
    assert_eq!(code, 201, "{body}");
    // kube-controller-manager's service-cidr-controller puts its finalizer on it (the API
    // server allocates from a range without one already, and would let it be deleted at once).
    wait_until(60, || cp.api("GET", "/apis/networking.k8s.io/v1/servicecidrs/extra", None).1.contains("networking.k8s.io/service-cidr-finalizer"), || "no finalizer on the ServiceCIDR".into());
    create_service(&cp, "extra", "10.97.0.10");
    agent.wait_synced("services=2");
    assert!(agent.has_frontend("10.97.0.10", 80), "{}", agent.log());
    assert_eq!(agent.service_cidrs(), ["10.96.0.0/16", "10.97.0.0/24"], "{}", agent.log());
    assert!(agent.log().contains("extra 10.97.0.0/24"), "the change is logged:\n{}", agent.log());

    // Deleted: its finalizer holds it while the Service has its address; then it goes.
    assert_eq!(cp.api("DELETE", "/apis/networking.k8s.io/v1/servicecidrs/extra", None).0, 200);
    std::thread::sleep(Duration::from_secs(1));
    let (code, body) = cp.api("GET", "/apis/networking.k8s.io/v1/servicecidrs/extra", None);
    assert!(code == 200 && body.contains("deletionTimestamp"), "held by its finalizer: {code} {body}");
    assert_eq!(agent.service_cidrs(), ["10.96.0.0/16", "10.97.0.0/24"], "{}", agent.log());
    assert_eq!(cp.api("DELETE", "/api/v1/namespaces/default/services/extra", None).0, 200);
    wait_until(60, || agent.service_cidrs() == ["10.96.0.0/16"], || format!("the deleted ServiceCIDR stays in the map: {:?}\n{}", agent.service_cidrs(), agent.log()));
}

#[test]
fn service_cidr_objects_are_followed_when_the_api_server_is_down_at_the_agents_start() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    let kubeconfig = cp.service_account_kubeconfig().display().to_string();
    let sc = r#"{"apiVersion":"networking.k8s.io/v1","kind":"ServiceCIDR","metadata":{"name":"extra"},"spec":{"cidrs":["10.97.0.0/24"]}}"#;
    let (code, body) = cp.api("POST", "/apis/networking.k8s.io/v1/servicecidrs", Some(sc));
    assert_eq!(code, 201, "{body}");
    // The agent starts while the API server is down (a control plane restarting with the
    // node): its first look at the ServiceCIDR objects fails; it must not give up on them.
    let args = cp.stop_apiserver();
    let agent = Agent::start_args(&cp, &["--cluster-cidr".into(), "10.201.0.0/16".into(), "--kubeconfig".into(), kubeconfig]);
    wait_until(30, || agent.log().matches("ServiceCIDR objects cannot be listed yet").count() >= 2, || format!("no retry of the ServiceCIDR list, said in the log:
{}", agent.log()));
    assert!(agent.log().contains("retry_in"), "the delay is said:
{}", agent.log());
    cp.start_apiserver(&args);
    // No --service-cidr: both ranges come from the objects, from the first sync on.
    agent.wait_synced("services=1");
    assert_eq!(agent.service_cidrs(), ["10.96.0.0/16", "10.97.0.0/24"], "{}", agent.log());
    let log = agent.log();
    let first = log.lines().find(|l| l.contains("synced")).unwrap_or("");
    let ranges = log.lines().position(|l| l.contains("10.96.0.0/16,10.97.0.0/24")).unwrap_or(usize::MAX);
    assert!(ranges < log.lines().position(|l| l.contains("synced")).unwrap_or(0), "the first sync ({first}) has the objects' ranges:
{log}");
    assert!(log.contains("ServiceCIDR objects (networking.k8s.io/v1) are served"), "{log}");
    // And they are watched: one added later is honoured.
    let sc = r#"{"apiVersion":"networking.k8s.io/v1","kind":"ServiceCIDR","metadata":{"name":"more"},"spec":{"cidrs":["10.98.0.0/24"]}}"#;
    assert_eq!(cp.api("POST", "/apis/networking.k8s.io/v1/servicecidrs", Some(sc)).0, 201);
    wait_until(30, || agent.service_cidrs() == ["10.96.0.0/16", "10.97.0.0/24", "10.98.0.0/24"], || format!("the new ServiceCIDR is not in the map: {:?}\n{}", agent.service_cidrs(), agent.log()));

    // A restart under a running agent: the objects stay followed (the reflector re-watches).
    cp.restart_apiserver();
    assert_eq!(cp.api("DELETE", "/apis/networking.k8s.io/v1/servicecidrs/more", None).0, 200);
    wait_until(60, || agent.service_cidrs() == ["10.96.0.0/16", "10.97.0.0/24"], || format!("the deleted ServiceCIDR stays in the map: {:?}\n{}", agent.service_cidrs(), agent.log()));
}

#[test]
fn a_kube_proxy_configuration_file_runs_the_agent() {
    let cp = ControlPlane::up();
    cp.apply_deploy("serviceaccount.yaml");
    cp.apply_deploy("clusterrole.yaml");
    // kube-proxy's file: the API server through clientConnection.kubeconfig, fields Ferry does
    // not use (named in one warning), a proxy mode (Ferry is the proxy), two typos (named in
    // another warning, left out).
    let file = cp.dir.path.join("kube-proxy.yaml");
    let text = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclientConnection:\n  kubeconfig: {}\n  qps: 50\nclusterCIDR: 10.201.0.0/16\nbindAddress: 10.250.0.1\nhealthzBindAddress: \"\"\nmetricsBindAddress: 127.0.0.1:10249\nmode: ipvs\nipvs: {{scheduler: rr}}\nconfigSyncPeriod: 15m0s\nnftables: {{minSyncPeriod: 0s, masqueradeAl: true}}\nclusterCidr: 10.9.0.0/16\n",
        cp.service_account_kubeconfig().display()
    );
    std::fs::write(&file, text).unwrap();
    let agent = Agent::start_args(&cp, &["--config".into(), file.display().to_string()]);
    agent.wait_synced("services=1 slices=1");
    assert!(agent.has_frontend("10.96.0.1", 443), "{}", agent.log());
    assert!(agent.metrics().contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), "metricsBindAddress serves");
    let log = agent.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("fields Ferry does not use")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("clientConnection.qps, ipvs.scheduler, configSyncPeriod") && !warnings[0].contains("minSyncPeriod"), "{}", warnings[0]);
    // The test's own --node-ip and --healthz-bind-address are ignored, as kube-proxy ignores
    // flags the file carries; --node (--hostname-override) beats the file.
    assert!(log.lines().any(|l| l.contains("which are ignored") && l.contains("--node-ip, --healthz-bind-address")), "{log}");
    assert!(log.contains("mode \\\"ipvs\\\" is ignored: Ferry is the proxy") || log.contains("mode \"ipvs\" is ignored: Ferry is the proxy"), "{log}");

    // Unknown fields (typos) are named in one warning and left out; the file is used.
    let unknown: Vec<&str> = log.lines().filter(|l| l.contains("unknown fields, ignored")).collect();
    assert_eq!(unknown.len(), 1, "{log}");
    assert!(unknown[0].contains("nftables.masqueradeAl, clusterCidr"), "in the file's order: {}", unknown[0]);

    // A known field of the wrong type is refused, naming the file and the field (before
    // anything is attached: the agent is not in the test's namespace here).
    std::fs::write(&file, "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: [10.201.0.0/16]\n").unwrap();
    let out = Command::new(bpf_tests::lab::agent_bin()).args(["run", "--cgroup", "none", "--config"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("--config {}: clusterCIDR: invalid type", file.display())), "{err}");
}
