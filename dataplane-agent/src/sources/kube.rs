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
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::{NetworkPolicy, ServiceCIDR},
};
use kube::{
    api::{Api, ListParams},
    runtime::{
        reflector::{self, ObjectRef, Store},
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
}

/// The three stores and the signal that one of them changed.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Pods, Namespaces and NetworkPolicies: `None` with `--enable-network-policy=false`
    /// (nothing of them is listed or watched).
    policy: Option<(Store<Pod>, Store<Namespace>, Store<NetworkPolicy>)>,
    /// ServiceCIDR objects: `None` where the API server has none (before 1.33, or the feature
    /// off) or the agent may not list them (a ClusterRole from before): --service-cidr alone.
    service_cidrs: Option<Store<ServiceCIDR>>,
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
}

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
    Ok(Client::try_from(config)?)
}

impl KubeSource {
    /// Starts the watches. `node` is this node's name: only its Node object is watched.
    /// `policy`: also Pods, Namespaces and NetworkPolicies.
    pub async fn start(client: Client, node: &str, policy: bool) -> KubeSource {
        let changed = Arc::new(Notify::new());
        let stats = Arc::new(WatchStats::default());
        let selector = watch_config().labels(PROXYABLE);
        let dirty = Arc::new(Mutex::new(Dirty { all: true, services: BTreeSet::new(), slices: BTreeSet::new() }));
        let services = spawn_reflector_marking(Api::<Service>::all(client.clone()), selector.clone(), &changed, &stats, marker(&dirty, |d| &mut d.services, model::service_key));
        let slices = spawn_reflector_marking(Api::<EndpointSlice>::all(client.clone()), selector, &changed, &stats, marker(&dirty, |d| &mut d.slices, model::slice_key));
        let nodes = spawn_reflector(Api::<Node>::all(client.clone()), watch_config().fields(&format!("metadata.name={node}")), &changed, &stats);
        // ServiceCIDRs only where they can be read: an older API server or ClusterRole must not
        // hold the first sync back forever.
        let cidrs = Api::<ServiceCIDR>::all(client.clone());
        let service_cidrs = match cidrs.list(&ListParams::default().limit(1)).await {
            Ok(_) => Some(spawn_reflector(cidrs, watch_config(), &changed, &stats)),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                info!("the API server serves no ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33 and later): the service CIDRs are --service-cidr's alone");
                None
            }
            Err(e) => {
                warn!(error = %e, "ServiceCIDR objects (networking.k8s.io/v1 servicecidrs) cannot be listed (the ClusterRole needs list and watch on them): the service CIDRs are --service-cidr's alone");
                None
            }
        };
        // NetworkPolicy: every pod's address and labels (peers may be anywhere), namespaces'
        // labels, the policies.
        let policy = policy.then(|| {
            (
                spawn_reflector(Api::<Pod>::all(client.clone()), watch_config(), &changed, &stats),
                spawn_reflector(Api::<Namespace>::all(client.clone()), watch_config(), &changed, &stats),
                spawn_reflector(Api::<NetworkPolicy>::all(client), watch_config(), &changed, &stats),
            )
        });
        KubeSource { services, slices, nodes, policy, service_cidrs, changed, stats, dirty }
    }

    /// Waits until every store holds its initial list.
    pub async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
        if let Some(cidrs) = &self.service_cidrs {
            let _ = cidrs.wait_until_ready().await;
        }
        if let Some((pods, namespaces, policies)) = &self.policy {
            let _ = pods.wait_until_ready().await;
            let _ = namespaces.wait_until_ready().await;
            let _ = policies.wait_until_ready().await;
        }
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
        let dirty = {
            let mut d = self.dirty.lock().unwrap();
            Dirty { all: std::mem::replace(&mut d.all, false), services: std::mem::take(&mut d.services), slices: std::mem::take(&mut d.slices) }
        };
        let mut objs = Objects {
            nodes: own(self.nodes.state()),
            pods: self.policy.as_ref().map(|p| own(p.0.state())).unwrap_or_default(),
            namespaces: self.policy.as_ref().map(|p| own(p.1.state())).unwrap_or_default(),
            network_policies: self.policy.as_ref().map(|p| own(p.2.state())).unwrap_or_default(),
            service_cidrs: self.service_cidrs.as_ref().map(|s| own(s.state())).unwrap_or_default(),
            ..Default::default()
        };
        if dirty.all {
            objs.services = own(self.services.state());
            objs.endpoint_slices = own(self.slices.state());
        } else {
            fn get<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, (ns, name): &Key) -> Option<K> {
                store.get(&ObjectRef::new(name).within(ns)).map(|o| (*o).clone())
            }
            objs.changed = Changed::Only(Changes {
                services: dirty.services.iter().map(|k| (k.clone(), get(&self.services, k))).collect(),
                slices: dirty.slices.iter().map(|k| (k.clone(), get(&self.slices, k))).collect(),
            });
        }
        objs
    }
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
    let kind = K::kind(&Default::default()).to_string();
    let (changed, stats) = (changed.clone(), stats.clone());
    tokio::spawn(async move {
        // managedFields are never read (kube-proxy's informers trim them too); Pods are read
        // into a type of their own that keeps only what the policy compiler reads.
        let stripped = watcher(api, cfg).map_ok(|ev| ev.modify(|o| o.meta_mut().managed_fields = None));
        let mut stream = reflector::reflector(writer, stripped).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    // The store now holds the new list: it is read whole.
                    mark(None);
                    stats.relists.fetch_add(1, Ordering::Relaxed);
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    info!(kind = %kind, "list complete");
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
    });
    reader
}
