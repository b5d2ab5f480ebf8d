//! A stand-in for kube-apiserver, which cannot run on this machine: it serves the
//! resources the agent reads with the API's own semantics, over real HTTP inside a test's
//! network namespace, to the agent's real kube client.
//!
//! - list: `{Kind}List` with `metadata.resourceVersion`, honouring label selectors (`key`,
//!   `!key`, `key=value`) and `metadata.name=` field selectors;
//! - watch: a chunked stream of `ADDED`/`MODIFIED`/`DELETED` events after the requested
//!   resourceVersion, `BOOKMARK`s while idle (with allowWatchBookmarks), and an `ERROR` event
//!   with a 410 `Expired` Status when the version is older than the compaction point, as etcd
//!   compaction makes the real server answer;
//! - every request is recorded, so tests can check what the client asked for.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// The resources the agent reads: URL path, kind, apiVersion. ServiceCIDRs are answered 404
/// (an API server before 1.33) until [`FakeApi::serve_service_cidrs`].
const RESOURCES: [(&str, &str, &str); 7] = [
    ("/apis/networking.k8s.io/v1/servicecidrs", "ServiceCIDR", "networking.k8s.io/v1"),
    ("/api/v1/services", "Service", "v1"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
    ("/api/v1/nodes", "Node", "v1"),
    ("/api/v1/pods", "Pod", "v1"),
    ("/api/v1/namespaces", "Namespace", "v1"),
    ("/apis/networking.k8s.io/v1/networkpolicies", "NetworkPolicy", "networking.k8s.io/v1"),
];

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: &'static str,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace, name) -> object, with metadata.resourceVersion set.
    objects: BTreeMap<(String, String, String), Value>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch (a dropped connection).
    generation: u64,
    requests: Vec<String>,
    /// ServiceCIDRs are served (else 404, as before Kubernetes 1.33).
    service_cidrs: bool,
}

pub struct FakeApi {
    shared: Arc<(Mutex<State>, Condvar)>,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn key_of(o: &Value) -> (String, String, String) {
    let m = &o["metadata"];
    (
        o["kind"].as_str().unwrap_or_default().to_string(),
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn kind_static(kind: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.1 == kind).map(|r| r.1).unwrap_or_else(|| panic!("fake API serves no {kind}"))
}

/// Does `o` match a label selector like `!a,b=c,d`?
fn labels_match(o: &Value, selector: &str) -> bool {
    let labels = &o["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k).and_then(|x| x.as_str()) == Some(v)
        } else {
            labels.get(term).is_some()
        }
    })
}

fn fields_match(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
        Some(("metadata.name", v)) => o["metadata"]["name"].as_str() == Some(v),
        Some(("metadata.namespace", v)) => o["metadata"]["namespace"].as_str() == Some(v),
        _ => false,
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 inside network namespace `netns` (a /run/netns name).
    pub fn start(netns: &str) -> FakeApi {
        let shared: Arc<(Mutex<State>, Condvar)> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{netns}");
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // This thread (and the ones it starts) live in the test's namespace.
            let f = std::fs::File::open(&ns_path).expect("netns");
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (sh, st) = (sh.clone(), st.clone());
                        std::thread::spawn(move || serve(s, sh, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(5)).expect("fake API listening");
        FakeApi { shared, addr, stop, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn record(&self, type_: &'static str, mut object: Value) {
        let (m, cv) = &*self.shared;
        let mut s = m.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        let kind = kind_static(&key.0);
        if type_ == "DELETED" {
            s.objects.remove(&key);
        } else {
            s.objects.insert(key, object.clone());
        }
        s.events.push(Event { rv, kind, type_, object });
        cv.notify_all();
    }

    /// Creates or replaces an object (YAML or JSON with kind, metadata.name).
    pub fn apply(&self, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            let v: Value = serde_yaml::from_str(doc).expect("object YAML");
            let exists = self.shared.0.lock().unwrap().objects.contains_key(&key_of(&v));
            self.record(if exists { "MODIFIED" } else { "ADDED" }, v);
        }
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let obj = self.shared.0.lock().unwrap().objects.get(&(kind.to_string(), namespace.to_string(), name.to_string())).cloned();
        self.record("DELETED", obj.unwrap_or_else(|| panic!("no {kind} {namespace}/{name}")));
    }

    /// etcd compaction: watches from any version seen so far get 410 Gone, and every open
    /// watch is cut, so clients must relist.
    pub fn compact_and_drop_watches(&self) {
        let (m, cv) = &*self.shared;
        let mut s = m.lock().unwrap();
        s.compacted = s.rv + 1;
        s.generation += 1;
        cv.notify_all();
    }

    /// From now on ServiceCIDR objects are served (the API server upgraded to 1.33 or later).
    pub fn serve_service_cidrs(&self) {
        self.shared.0.lock().unwrap().service_cidrs = true;
    }

    /// Ends every open watch (a dropped connection); clients re-watch from their version.
    pub fn drop_watches(&self) {
        let (m, cv) = &*self.shared;
        let mut s = m.lock().unwrap();
        s.generation += 1;
        cv.notify_all();
    }

    /// The request lines (method, path and query) received so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().requests.clone()
    }

    /// Waits until some request line satisfies `f`.
    pub fn wait_request(&self, what: &str, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.requests().iter().any(|r| f(r)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no request {what}; got:\n{}", self.requests().join("\n"));
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_watches();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_json(s: &mut TcpStream, code: u16, v: &Value) {
    let body = v.to_string();
    let reason = if code == 200 { "OK" } else { "Error" };
    let _ = write!(s, "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

fn chunk(s: &mut TcpStream, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(s, "{:x}\r\n{line}\r\n", line.len())?;
    s.flush()
}

fn serve(mut s: TcpStream, shared: Arc<(Mutex<State>, Condvar)>, stop: Arc<AtomicBool>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let target = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    shared.0.lock().unwrap().requests.push(first.trim().to_string());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let q: BTreeMap<String, String> = query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), decode(v))).collect();
    let served = |r: &&(&str, &str, &str)| r.1 != "ServiceCIDR" || shared.0.lock().unwrap().service_cidrs;
    let Some(&(_, kind, api_version)) = RESOURCES.iter().filter(served).find(|r| r.0 == path) else {
        write_json(&mut s, 404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}));
        return;
    };
    let labels = q.get("labelSelector").cloned().unwrap_or_default();
    let fields = q.get("fieldSelector").cloned().unwrap_or_default();
    let matches = |o: &Value| labels_match(o, &labels) && fields_match(o, &fields);
    if !matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let st = shared.0.lock().unwrap();
        let items: Vec<Value> = st.objects.values().filter(|o| o["kind"] == kind && matches(o)).cloned().collect();
        let list = json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
        drop(st);
        write_json(&mut s, 200, &list);
        return;
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300u64);
    if write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").is_err() {
        return;
    }
    let (m, cv) = &*shared;
    let mut st = m.lock().unwrap();
    if from < st.compacted {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.compacted), "reason": "Expired", "code": 410});
        drop(st);
        let _ = chunk(&mut s, &json!({"type": "ERROR", "object": status}));
        let _ = write!(s, "0\r\n\r\n");
        return;
    }
    let generation = st.generation;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut sent = from;
    loop {
        let pending: Vec<Event> = st.events.iter().filter(|e| e.rv > sent && e.kind == kind).cloned().collect();
        let now_rv = st.rv;
        drop(st);
        for e in pending {
            sent = e.rv;
            if matches(&e.object) && chunk(&mut s, &json!({"type": e.type_, "object": e.object})).is_err() {
                return;
            }
        }
        sent = sent.max(now_rv);
        st = m.lock().unwrap();
        if stop.load(Ordering::Relaxed) || st.generation != generation || Instant::now() > deadline {
            break;
        }
        let (g, timed_out) = cv.wait_timeout(st, Duration::from_millis(500)).unwrap();
        st = g;
        if timed_out.timed_out() && bookmarks && st.events.iter().all(|e| e.rv <= sent || e.kind != kind) {
            let rv = st.rv.to_string();
            drop(st);
            if chunk(&mut s, &json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}}})).is_err() {
                return;
            }
            st = m.lock().unwrap();
        }
    }
    drop(st);
    let _ = write!(s, "0\r\n\r\n");
}

/// GET `http://{addr}{path}` from inside network namespace `netns`: (status, body), or None when
/// nothing answers.
pub fn http_get_in(netns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let (netns, addr, path) = (netns.to_string(), addr.to_string(), path.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{netns}")).ok()?;
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let mut s = TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut s, &mut buf).ok()?;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    })
    .join()
    .ok()
    .flatten()
}

/// The value of an unlabelled metric (`name value`) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
