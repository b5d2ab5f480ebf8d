//! The API-server source: reflectors (kube-runtime watchers feeding local stores) for Services,
//! EndpointSlices, this node's Node object, ServiceCIDRs, and for NetworkPolicy Pods, Namespaces
//! and NetworkPolicies. Every watch event wakes the agent, which then
//! translates the stores' contents and lets the reconciler write only what differs from the maps.
//! A relist (a watch that expired with 410 Gone, or a reconnect) replaces a store's contents
//! atomically at its end, so it too becomes a diff, never a flush.
//!
//! As kube-proxy does, Services labelled `service.kubernetes.io/service-proxy-name` (another
//! proxy's) and headless ones are excluded by the watches' label selectors; ExternalName and
//! headless Services are skipped again by the translation, whatever the source.
use std::{
    collections::BTreeSet,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::{NetworkPolicy, ServiceCIDR},
};
use super::{
    kept::{self, Watched},
    service::Service,
    slice::EndpointSlice,
};
use kube::{
    api::{Api, ListParams},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Client, Resource,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{pod::Pod, Changed, Objects};
use crate::{
    model::{self, Key},
    translator::Changes,
};

/// kube-proxy's selector for Services and EndpointSlices (pkg/proxy: `noProxyName` and
/// `noHeadlessEndpoints`).
pub const PROXYABLE: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The annotation `kubectl apply` keeps a copy of the object in: dropped from every object kept.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Objects per LIST page (client-go's pager default, which kube-proxy's reflectors use).
pub const PAGE_SIZE: u32 = 500;

/// How every reflector lists and watches. Initial lists and relists are paginated (`limit=500`
/// and `continue` tokens) consistent reads (no `resourceVersion`); watches resume from the last
/// resource version seen and ask for bookmarks (`allowWatchBookmarks=true`), which keep that
/// version fresh so that a reconnect rarely needs a relist.
///
/// Since Kubernetes 1.31 (ConsistentListFromCache) the API server serves such a consistent list
/// from its watch cache, and since 1.34 (ListFromCacheSnapshot) its further pages too: etcd is
/// asked only for its current revision. `resourceVersion=0` (kube-runtime's `any_semantic()`,
/// client-go's first list) would be served from the cache on older servers as well, but the
/// cache ignores `limit` for it (one unpaginated answer), kube-core drops `resourceVersion=0`
/// whenever a page size is set anyway, and a relist at 0 after a 410 may go back in time;
/// client-go too relists with a consistent read after a 410. Streaming lists (watch with
/// `sendInitialEvents`, kube-proxy 1.37's default) are not used: kube-runtime does not fall
/// back to a LIST where the WatchList feature is off (it is in 1.33, and before 1.27).
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().page_size(PAGE_SIZE)
}

/// Counters of the watches, for metrics.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Watch events applied (adds, updates, deletes, relist ends).
    pub events: AtomicU64,
    /// Watch errors (410 Gone, a dropped connection, an API error); each is followed by a
    /// re-watch or relist with backoff.
    pub errors: AtomicU64,
    /// Relists completed (including the initial list of each resource).
    pub relists: AtomicU64,
    /// Notified at each completed list: the ServiceCIDR probe asks again (the API server is
    /// back, or was replaced by another version).
    pub relisted: Arc<Notify>,
    /// Service events (adds, updates, deletes, each object of a list), as kube-proxy counts
    /// them (kubeproxy_sync_proxy_rules_service_changes_total).
    pub service_changes: AtomicU64,
    /// EndpointSlice events, likewise (kubeproxy_sync_proxy_rules_endpoint_changes_total).
    pub endpoint_changes: AtomicU64,
    /// The Services (namespace/name) with Service events, and those with EndpointSlice events,
    /// that no snapshot has read yet: kube-proxy's pending changes.
    pending: std::sync::Mutex<(BTreeSet<String>, BTreeSet<String>)>,
    /// The kinds whose first list is in their store and marked read-whole: the first read waits
    /// for the marks too (a store is ready just before its reflector's mark), else a mark landing
    /// after it would make the next read a second full one.
    listed: tokio::sync::watch::Sender<BTreeSet<String>>,
}

impl WatchStats {
    /// (Services with pending Service changes, Services with pending endpoint changes).
    pub fn pending(&self) -> (usize, usize) {
        let p = self.pending.lock().unwrap();
        (p.0.len(), p.1.len())
    }

    /// Counts an event of a Service or an EndpointSlice (`kind`) as kube-proxy's trackers do;
    /// `service`: the Service a slice belongs to (its label).
    fn change(&self, kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, service: Option<&str>) {
        let ns = meta.namespace.as_deref().unwrap_or("");
        let mut p = self.pending.lock().unwrap();
        match kind {
            "Service" => {
                self.service_changes.fetch_add(1, Ordering::Relaxed);
                p.0.insert(format!("{ns}/{}", meta.name.as_deref().unwrap_or("")));
            }
            "EndpointSlice" => {
                self.endpoint_changes.fetch_add(1, Ordering::Relaxed);
                // Pending by the Service the slice belongs to, as kube-proxy's tracker keys them.
                p.1.insert(format!("{ns}/{}", service.unwrap_or("")));
            }
            _ => {}
        }
    }
}

/// The three stores and the signal that one of them changed.
pub struct KubeSource {
    /// Services and EndpointSlices: in the agent's own store, see [`kept`].
    services: kept::Store<Service>,
    slices: kept::Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Pods, Namespaces and NetworkPolicies: `None` with `--enable-network-policy=false`
    /// (nothing of them is listed or watched).
    policy: Option<(Store<Pod>, Store<Namespace>, Store<NetworkPolicy>)>,
    /// ServiceCIDR objects: empty while the API server serves none (before 1.33, or the
    /// feature off) or they cannot be listed yet (see [`spawn_service_cidrs`]).
    service_cidrs: Store<ServiceCIDR>,
    /// What the ServiceCIDR probe last found.
    cidr_state: tokio::sync::watch::Receiver<CidrState>,
    /// When the other stores first held their lists: the first sync waits for the ServiceCIDR
    /// decision at most [`CIDR_GRACE`] from then (kept here, as `wait_ready` is polled anew).
    base_ready_at: std::sync::Mutex<Option<Instant>>,
    pub changed: Arc<Notify>,
    pub stats: Arc<WatchStats>,
    /// Services and EndpointSlices changed since the last read.
    dirty: Arc<Mutex<Dirty>>,
}

/// What the watches changed since the last read: these keys, or everything (the first list and
/// every relist).
#[derive(Debug)]
struct Dirty {
    all: bool,
    services: BTreeSet<Key>,
    slices: BTreeSet<Key>,
    /// A Pod, Namespace or NetworkPolicy changed (or was relisted).
    policy: bool,
}

/// What the agent knows of the API server's ServiceCIDR objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrState {
    /// Not yet known: the probe's LIST failed for a reason that may pass (the API server
    /// restarting or unreachable, a 5xx, a timeout); retried with backoff.
    Unknown,
    /// Listed and watched.
    Served,
    /// 404: this API server serves no ServiceCIDR objects (before 1.33, or the feature off);
    /// checked again every [`CIDR_RECHECK`] and whenever another resource relists (an
    /// upgraded or reconfigured API server).
    NotServed,
    /// 401/403: the agent may not list them (a ClusterRole from before they existed); retried
    /// with backoff, as RBAC can be fixed without restarting the agent.
    Forbidden,
}

/// The probe's backoff after a failure other than 404: from the first to the last, doubling.
const CIDR_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(60));
/// How often a "not served" answer is checked again.
pub const CIDR_RECHECK: Duration = Duration::from_secs(300);
/// How long the first sync waits for the ServiceCIDR objects once the other lists are in: it
/// goes ahead with --service-cidr's ranges after that, the objects follow when they can be read.
const CIDR_GRACE: Duration = Duration::from_secs(10);

/// A client from `--kubeconfig` and `--master` (kube-proxy's flags), else the in-cluster
/// service account (KUBERNETES_SERVICE_HOST/PORT, which the DaemonSet points at the API server
/// itself: the `kubernetes` Service needs a proxy to be reached) or the default kubeconfig.
pub async fn client(kubeconfig: Option<&Path>, master: Option<&str>) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?
        }
        None if master.is_some() => kube::Config::new("http://localhost".parse().expect("static URL")),
        None => kube::Config::infer().await.map_err(|e| anyhow::anyhow!("no API server configuration (in-cluster or kubeconfig): {e}"))?,
    };
    if let Some(m) = master {
        config.cluster_url = m.parse().map_err(|e| anyhow::anyhow!("--master {m:?}: {e}"))?;
    }
    // Requests are relative to the cluster URL where this layer sees them: the host is its.
    let host = config.cluster_url.authority().map(|a| a.to_string()).unwrap_or_default();
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&CountRequests { host }).build())
}

/// client-go's rest_client_requests_total: (code, host, method) -> requests. The code is the
/// HTTP status, or `<error>` when no response came (as client-go writes it); a watch counts
/// when its response starts.
static REST_REQUESTS: std::sync::Mutex<std::collections::BTreeMap<(String, String, String), u64>> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The API requests made so far, by (code, host, method).
pub fn rest_requests() -> Vec<((String, String, String), u64)> {
    REST_REQUESTS.lock().unwrap().iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// A tower layer on kube's client stack that counts each request's outcome in [`REST_REQUESTS`].
struct CountRequests {
    host: String,
}

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, host: self.host.clone() }
    }
}

struct Counted<S> {
    inner: S,
    host: String,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let key = (self.host.clone(), req.method().to_string());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let out = answer.await;
            let code = match &out {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            *REST_REQUESTS.lock().unwrap().entry((code, key.0, key.1)).or_default() += 1;
            out
        })
    }
}

impl KubeSource {
    /// Starts the watches. `node` is this node's name: only its Node object is watched.
    /// `policy`: also Pods, Namespaces and NetworkPolicies.
    pub async fn start(client: Client, node: &str, policy: bool) -> KubeSource {
        let changed = Arc::new(Notify::new());
        let stats = Arc::new(WatchStats::default());
        let selector = watch_config().labels(PROXYABLE);
        let dirty = Arc::new(Mutex::new(Dirty { all: true, services: BTreeSet::new(), slices: BTreeSet::new(), policy: true }));
        let services = spawn_kept(Api::all(client.clone()), selector.clone(), &changed, &stats, model::service_key, marker(&dirty, |d| &mut d.services, |w: &Watched<Service>| model::service_key(&w.object)));
        let slices = spawn_kept(Api::all(client.clone()), selector, &changed, &stats, model::slice_key, marker(&dirty, |d| &mut d.slices, |w: &Watched<EndpointSlice>| model::slice_key(&w.object)));
        let nodes = spawn_reflector(Api::<Node>::all(client.clone()), watch_config().fields(&format!("metadata.name={node}")), &changed, &stats);
        let (service_cidrs, cidr_state) = spawn_service_cidrs(Api::<ServiceCIDR>::all(client.clone()), &changed, &stats);
        // NetworkPolicy: every pod's address and labels (peers may be anywhere), namespaces'
        // labels, the policies.
        let policy = policy.then(|| {
            (
                spawn_reflector_marking(Api::<Pod>::all(client.clone()), watch_config(), &changed, &stats, policy_marker(&dirty)),
                spawn_reflector_marking(Api::<Namespace>::all(client.clone()), watch_config(), &changed, &stats, policy_marker(&dirty)),
                spawn_reflector_marking(Api::<NetworkPolicy>::all(client), watch_config(), &changed, &stats, policy_marker(&dirty)),
            )
        });
        KubeSource { services, slices, nodes, policy, service_cidrs, cidr_state, base_ready_at: Default::default(), changed, stats, dirty }
    }

    /// Waits until every store holds its initial list, and the ServiceCIDR objects' too, or
    /// their absence is known (404), or [`CIDR_GRACE`] has passed since the rest were in: a
    /// ClusterRole that does not grant them must not hold the first sync back for longer. (A
    /// 403 is not taken as final: a restarting API server answers it until its RBAC caches are
    /// filled, and the other lists completing makes the probe ask again at once.) Cancel-safe
    /// (the caller polls it anew).
    pub async fn wait_ready(&self) {
        self.services.wait_until_ready().await;
        self.slices.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
        if let Some((pods, namespaces, policies)) = &self.policy {
            let _ = pods.wait_until_ready().await;
            let _ = namespaces.wait_until_ready().await;
            let _ = policies.wait_until_ready().await;
        }
        let marked: &[&str] = if self.policy.is_some() { &["Service", "EndpointSlice", "Pod", "Namespace", "NetworkPolicy"] } else { &["Service", "EndpointSlice"] };
        let _ = self.stats.listed.subscribe().wait_for(|l| marked.iter().all(|k| l.contains(*k))).await;
        let since = *self.base_ready_at.lock().unwrap().get_or_insert_with(Instant::now);
        let mut state = self.cidr_state.clone();
        let decided = async {
            let Ok(s) = state.wait_for(|s| matches!(s, CidrState::Served | CidrState::NotServed)).await.map(|s| *s) else { return };
            if s == CidrState::Served {
                let _ = self.service_cidrs.wait_until_ready().await;
            }
        };
        if tokio::time::timeout((since + CIDR_GRACE).saturating_duration_since(Instant::now()), decided).await.is_err() {
            warn!(
                waited = ?CIDR_GRACE,
                "the ServiceCIDR objects are not listed yet: the first sync goes ahead with --service-cidr's ranges; the objects' are added as soon as they can be read"
            );
        }
    }

    /// This node's Node object, if its list is in (without waiting).
    pub fn own_node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.state().into_iter().find(|n| n.metadata.name.as_deref() == Some(name))
    }

    /// What the agent knows of the ServiceCIDR objects now.
    pub fn service_cidr_state(&self) -> CidrState {
        *self.cidr_state.borrow()
    }

    /// Makes the next snapshot hold every object.
    pub fn read_all_next(&self) {
        self.dirty.lock().unwrap().all = true;
    }

    /// A consistent copy of what the stores hold now: after a list or relist of Services or
    /// EndpointSlices all of them; otherwise only those changed since the last read (their keys
    /// are taken before the stores are read, so a change that lands meanwhile is read again next
    /// time rather than missed).
    pub fn snapshot(&self) -> Objects {
        fn own<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
            v.into_iter().map(|o| (*o).clone()).collect()
        }
        // Read now: no longer pending (an event after this wakes the loop again). Taken before
        // the stores are read, so an event between the two is counted pending, never lost.
        *self.stats.pending.lock().unwrap() = Default::default();
        let dirty = {
            let mut d = self.dirty.lock().unwrap();
            Dirty {
                all: std::mem::replace(&mut d.all, false),
                services: std::mem::take(&mut d.services),
                slices: std::mem::take(&mut d.slices),
                policy: std::mem::replace(&mut d.policy, false),
            }
        };
        let mut objs = Objects { nodes: own(self.nodes.state()), service_cidrs: own(self.service_cidrs.state()), ..Default::default() };
        // The policy stores are copied only when one of them changed: a Service or endpoint
        // change leaves the compiler idle and copies no Pod.
        match &self.policy {
            Some(p) if dirty.policy || dirty.all => {
                // Shared with the store, not copied.
                objs.pods = p.0.state();
                objs.namespaces = own(p.1.state());
                objs.network_policies = own(p.2.state());
            }
            Some(_) => objs.policy_unchanged = true,
            None => {}
        }
        if dirty.all {
            // Shared with the stores, not copied.
            objs.services = self.services.state();
            objs.endpoint_slices = self.slices.state();
        } else {
            objs.changed = Changed::Only(Changes {
                services: dirty.services.iter().map(|k| (k.clone(), self.services.get(k))).collect(),
                slices: dirty.slices.iter().map(|k| (k.clone(), self.slices.get(k))).collect(),
            });
        }
        objs
    }
}

/// Marks the policy objects changed.
fn policy_marker<K: 'static>(dirty: &Arc<Mutex<Dirty>>) -> impl Fn(Option<&K>) + Send + 'static {
    let dirty = dirty.clone();
    move |_| dirty.lock().unwrap().policy = true
}

/// Marks an object's key (from `key`) in the set `of` picks, or everything on `None`.
fn marker<K: 'static>(dirty: &Arc<Mutex<Dirty>>, of: fn(&mut Dirty) -> &mut BTreeSet<Key>, key: fn(&K) -> Key) -> impl Fn(Option<&K>) + Send + 'static {
    let dirty = dirty.clone();
    move |obj| {
        let mut d = dirty.lock().unwrap();
        match obj {
            Some(o) => {
                of(&mut d).insert(key(o));
            }
            None => d.all = true,
        }
    }
}

/// The ServiceCIDR objects, as kube-proxy follows them (an informer that retries until the
/// API server answers), with one difference: an API server that answers 404 (none served) is
/// not retried in a loop but checked again every [`CIDR_RECHECK`] and at every relist of
/// another resource, the service ranges meanwhile --service-cidr's. A LIST of one object asks;
/// once it succeeds the reflector takes over (its own retries and relists as every other's).
/// A failure that may pass (the API server down or restarting, a 5xx, a timeout) and a 401/403
/// are retried with backoff, each said in the log with the delay; a relist of another resource
/// (the API server is back) retries at once.
fn spawn_service_cidrs(api: Api<ServiceCIDR>, changed: &Arc<Notify>, stats: &Arc<WatchStats>) -> (Store<ServiceCIDR>, tokio::sync::watch::Receiver<CidrState>) {
    let (reader, writer) = reflector::store::<ServiceCIDR>();
    let (tx, rx) = tokio::sync::watch::channel(CidrState::Unknown);
    let (changed, stats) = (changed.clone(), stats.clone());
    let relisted = stats.relisted.clone();
    tokio::spawn(async move {
        let mut delay = CIDR_BACKOFF.0;
        loop {
            let (state, wait) = match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => {
                    if tx.send_replace(CidrState::Served) != CidrState::Served {
                        info!("ServiceCIDR objects (networking.k8s.io/v1) are served: listing and watching them; the service CIDRs are --service-cidr's and theirs");
                    }
                    break;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    if *tx.borrow() != CidrState::NotServed {
                        info!(recheck = ?CIDR_RECHECK, "the API server serves no ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33 and later): the service CIDRs are --service-cidr's alone; checked again periodically and whenever another resource relists");
                    }
                    delay = CIDR_BACKOFF.0;
                    (CidrState::NotServed, CIDR_RECHECK)
                }
                Err(e) => {
                    let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 401 || s.code == 403);
                    if forbidden {
                        warn!(error = %e, retry_in = ?delay, "ServiceCIDR objects (networking.k8s.io/v1 servicecidrs) may not be listed (the ClusterRole needs list and watch on them): retrying with backoff; meanwhile the service CIDRs are --service-cidr's");
                    } else {
                        warn!(error = %e, retry_in = ?delay, "ServiceCIDR objects cannot be listed yet (the API server unreachable or failing): retrying with backoff; meanwhile the service CIDRs are --service-cidr's");
                    }
                    let wait = delay;
                    delay = (delay * 2).min(CIDR_BACKOFF.1);
                    (if forbidden { CidrState::Forbidden } else { *tx.borrow() }, wait)
                }
            };
            tx.send_replace(state);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = relisted.notified() => {}
            }
        }
        run_reflector(writer, api, watch_config(), changed, stats, |_: Option<&ServiceCIDR>| {}).await;
    });
    (reader, rx)
}

fn spawn_reflector<K>(api: Api<K>, cfg: watcher::Config, changed: &Arc<Notify>, stats: &Arc<WatchStats>) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    spawn_reflector_marking(api, cfg, changed, stats, |_: Option<&K>| {})
}

/// A reflector that also calls `mark` with each object added, changed or deleted, and with
/// `None` when a list or relist completes.
fn spawn_reflector_marking<K>(api: Api<K>, cfg: watcher::Config, changed: &Arc<Notify>, stats: &Arc<WatchStats>, mark: impl Fn(Option<&K>) + Send + 'static) -> Store<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store::<K>();
    tokio::spawn(run_reflector(writer, api, cfg, changed.clone(), stats.clone(), mark));
    reader
}

/// A reflector of Services or EndpointSlices into the agent's own store (keyed by `key`), as
/// [`spawn_reflector_marking`].
fn spawn_kept<T>(api: Api<Watched<T>>, cfg: watcher::Config, changed: &Arc<Notify>, stats: &Arc<WatchStats>, key: fn(&T) -> Key, mark: impl Fn(Option<&Watched<T>>) + Send + 'static) -> kept::Store<T>
where
    T: kept::Kept + k8s_openapi::Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = kept::store(key);
    tokio::spawn(run_reflector(writer, api, cfg, changed.clone(), stats.clone(), mark));
    reader
}

/// Where a reflector's events go: kube's store, or the agent's own ([`kept`]).
trait Apply<K> {
    fn apply(&mut self, ev: &watcher::Event<K>);
}

impl<K> Apply<K> for reflector::store::Writer<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn apply(&mut self, ev: &watcher::Event<K>) {
        self.apply_watcher_event(ev);
    }
}

impl<T: Clone> Apply<Watched<T>> for kept::Writer<T> {
    fn apply(&mut self, ev: &watcher::Event<Watched<T>>) {
        kept::Writer::apply(self, ev);
    }
}

/// What no reader of a kept object needs: its managedFields, kubectl's last-applied copy and its
/// owners. (Services, EndpointSlices and Pods are read into types of their own, which keep only
/// what is read.)
fn trim<K: Resource + 'static>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

async fn run_reflector<K>(mut writer: impl Apply<K> + Send + 'static, api: Api<K>, cfg: watcher::Config, changed: Arc<Notify>, stats: Arc<WatchStats>, mark: impl Fn(Option<&K>) + Send + 'static)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let kind = K::kind(&Default::default()).to_string();
    {
        // managedFields are never read (kube-proxy's informers trim them too), nor is kubectl's
        // copy of the last applied object (often larger than the object itself); Services,
        // EndpointSlices and Pods are read into types of their own that keep only what is read.
        // Each event goes to the store before anything else sees it (as kube's `reflector`).
        let stripped = watcher(api, cfg).map_ok(|ev| ev.modify(trim)).inspect_ok(move |ev| writer.apply(ev));
        let mut stream = stripped.default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o) | watcher::Event::Delete(o)) = &ev {
                let service = (o as &dyn std::any::Any).downcast_ref::<Watched<EndpointSlice>>().and_then(|s| s.object.service_name.as_deref());
                stats.change(&kind, o.meta(), service);
            }
            match ev {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    // The store now holds the new list: it is read whole.
                    mark(None);
                    stats.listed.send_if_modified(|l| l.insert(kind.clone()));
                    stats.relists.fetch_add(1, Ordering::Relaxed);
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    info!(kind = %kind, "list complete");
                    stats.relisted.notify_one();
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    // The store has it already: marked after, so a read between the two reads
                    // it and reads it again next time.
                    mark(Some(&o));
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    changed.notify_one();
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    // Said as what comes next: a 410 Gone means a relist, anything else a retry
                    // of the same list or watch, with backoff.
                    match &e {
                        watcher::Error::WatchError(s) if s.code == 410 => warn!(kind = %kind, error = %e, "watch expired (410 Gone): relisting"),
                        watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410 => warn!(kind = %kind, error = %e, "watch expired (410 Gone): relisting"),
                        watcher::Error::InitialListFailed(_) => warn!(kind = %kind, error = %e, "list failed; retrying with backoff"),
                        _ => warn!(kind = %kind, error = %e, "watch failed; re-watching with backoff from the last resource version"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_objects_lose_what_no_reader_needs_only() {
        // A kept API object (Services, EndpointSlices and Pods are read into types of their own).
        let mut ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "shop", "labels": {"team": "a"},
                "annotations": {LAST_APPLIED: "{\"kind\":\"Namespace\"}", "ferry.test/kept": "yes"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u1"}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            }
        }))
        .unwrap();
        trim(&mut ns);
        assert!(ns.metadata.managed_fields.is_none() && ns.metadata.owner_references.is_none());
        let a = ns.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), ["ferry.test/kept"]);
        assert_eq!(ns.metadata.labels, Some([("team".to_string(), "a".to_string())].into()));
    }

    #[test]
    fn pending_endpoint_changes_count_services_not_namespaces() {
        let stats = WatchStats::default();
        let meta = |name: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta { name: Some(name.into()), namespace: Some("shop".into()), ..Default::default() };
        stats.change("EndpointSlice", &meta("web-abc"), Some("web"));
        stats.change("EndpointSlice", &meta("web-def"), Some("web"));
        stats.change("EndpointSlice", &meta("db-abc"), Some("db"));
        stats.change("Service", &meta("web"), None);
        assert_eq!(stats.pending(), (1, 2));
    }
}
