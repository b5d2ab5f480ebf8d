//! The agent's own store of Services and EndpointSlices, fed by kube's watcher as kube's
//! reflector store would be. Every Service and slice of the cluster is kept between syncs, and
//! kube's store keeps each under an `ObjectRef` (name, namespace and version copied again) and
//! asks of each a whole `ObjectMeta` (360 bytes inline, nearly all of it empty here). This store
//! keeps each object with only its [`Meta`](super::Meta), under the key translation uses (its
//! namespace and name as `Arc<str>`). With both, the agent's RSS at 10,000 Services × 3
//! endpoints from a real API server went from 66 to 59 MiB (`cargo xtask bench
//! --control-plane-only`); with the slim metadata alone, which the `--manifests` source has too,
//! from 60 to 55 MiB from `--manifests` (`--scale-only`).
//!
//! kube's watcher reads versions from an `ObjectMeta`: it watches [`Watched`] objects, which
//! carry one made from the object's own identity while the event passes, and the store keeps
//! the object alone.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;

use super::Meta;
use crate::model::Key;

/// A type kept in the agent's own store: it has a [`Meta`].
pub trait Kept {
    fn meta(&self) -> &Meta;
}

/// An object as kube's watcher reads it: the object, and its identity again as the
/// `ObjectMeta` the watcher reads versions from. The store keeps a copy of the object alone; this
/// one goes once the event has been handled.
#[derive(Clone, Debug)]
pub struct Watched<T> {
    meta: ObjectMeta,
    pub object: T,
}

impl<T: Kept> From<T> for Watched<T> {
    fn from(object: T) -> Watched<T> {
        let m = object.meta();
        let meta = ObjectMeta { name: m.name.as_deref().map(Into::into), namespace: m.namespace.as_deref().map(Into::into), resource_version: m.resource_version.as_deref().map(Into::into), ..Default::default() };
        Watched { meta, object }
    }
}

impl<'de, T: serde::Deserialize<'de> + Kept> serde::Deserialize<'de> for Watched<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Watched::from)
    }
}

impl<T: k8s_openapi::Resource> k8s_openapi::Resource for Watched<T> {
    const API_VERSION: &'static str = T::API_VERSION;
    const GROUP: &'static str = T::GROUP;
    const KIND: &'static str = T::KIND;
    const VERSION: &'static str = T::VERSION;
    const URL_PATH_SEGMENT: &'static str = T::URL_PATH_SEGMENT;
    type Scope = T::Scope;
}

impl<T: k8s_openapi::Resource> k8s_openapi::Metadata for Watched<T> {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.meta
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

type Objects<T> = HashMap<Key, Arc<T>>;

/// The reading side: what the snapshots read.
pub struct Store<T> {
    objects: Arc<RwLock<Objects<T>>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

/// The writing side: applies the watcher's events. A list being read is kept here, apart: a
/// relist replaces the objects at its end, as kube's store does, so a reader never sees half a
/// list.
pub struct Writer<T> {
    objects: Arc<RwLock<Objects<T>>>,
    listing: Option<Objects<T>>,
    ready: tokio::sync::watch::Sender<bool>,
    key: fn(&T) -> Key,
}

/// A store and its writer; `key` keys the objects (`model::service_key`, `model::slice_key`).
pub fn store<T>(key: fn(&T) -> Key) -> (Store<T>, Writer<T>) {
    let objects = Arc::new(RwLock::new(HashMap::new()));
    let (tx, rx) = tokio::sync::watch::channel(false);
    (Store { objects: objects.clone(), ready: rx }, Writer { objects, listing: None, ready: tx, key })
}

/// The lock's objects: a panic elsewhere while the lock was held leaves them as they were (every
/// write is one insert, remove or swap), so they are read on.
fn read<T>(objects: &RwLock<Objects<T>>) -> std::sync::RwLockReadGuard<'_, Objects<T>> {
    objects.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(objects: &RwLock<Objects<T>>) -> std::sync::RwLockWriteGuard<'_, Objects<T>> {
    objects.write().unwrap_or_else(|e| e.into_inner())
}

impl<T> Store<T> {
    /// Every object.
    pub fn state(&self) -> Vec<Arc<T>> {
        read(&self.objects).values().cloned().collect()
    }

    /// The object under `key`.
    pub fn get(&self, key: &Key) -> Option<Arc<T>> {
        read(&self.objects).get(key).cloned()
    }

    /// Waits until the first list is in (returns at once if the writer is gone).
    pub async fn wait_until_ready(&self) {
        let _ = self.ready.clone().wait_for(|r| *r).await;
    }
}

impl<T: Clone> Writer<T> {
    /// Applies one event of kube's watcher, as kube's `reflector::store::Writer` does. (The
    /// watcher starts every list, a relist after an error too, with `Init`: an `InitDone` without
    /// one, which it never sends, keeps the objects.)
    pub fn apply(&mut self, ev: &watcher::Event<Watched<T>>) {
        match ev {
            watcher::Event::Apply(o) => {
                let old = write(&self.objects).insert((self.key)(&o.object), Arc::new(o.object.clone()));
                drop(old);
            }
            watcher::Event::Delete(o) => {
                let old = write(&self.objects).remove(&(self.key)(&o.object));
                drop(old);
            }
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                self.listing.get_or_insert_with(HashMap::new).insert((self.key)(&o.object), Arc::new(o.object.clone()));
            }
            watcher::Event::InitDone => {
                if let Some(mut listed) = self.listing.take() {
                    // The old objects go after the lock is let go of.
                    std::mem::swap(&mut *write(&self.objects), &mut listed);
                }
                self.ready.send_replace(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model, sources::service::Service};

    fn svc(name: &str, version: &str) -> Watched<Service> {
        serde_json::from_str(&format!(r#"{{"metadata": {{"name": "{name}", "namespace": "shop", "resourceVersion": "{version}", "uid": "u"}}, "spec": {{"clusterIP": "10.96.0.1"}}}}"#)).unwrap()
    }

    #[test]
    fn the_watcher_reads_the_objects_identity_and_the_store_keeps_the_object_alone() {
        use kube::Resource;
        let w = svc("web", "7");
        assert_eq!((w.meta().name.as_deref(), w.meta().namespace.as_deref(), w.meta().resource_version.as_deref(), w.meta().uid.as_deref()), (Some("web"), Some("shop"), Some("7"), None));
        assert_eq!((Watched::<Service>::kind(&()), Watched::<Service>::plural(&())), ("Service".into(), "services".into()));
        assert_eq!(w.object.metadata, Meta { name: Some("web".into()), namespace: Some("shop".into()), resource_version: Some("7".into()) });
    }

    #[test]
    fn a_relist_replaces_the_objects_at_its_end_and_events_apply_one_by_one() {
        let (store, mut writer) = store::<Service>(model::service_key);
        let key = |n: &str| -> Key { ("shop".into(), n.into()) };
        assert!(!*store.ready.borrow());
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(svc("a", "1")));
        writer.apply(&watcher::Event::InitApply(svc("b", "1")));
        assert!(store.state().is_empty(), "half a list is not read");
        writer.apply(&watcher::Event::InitDone);
        assert!(*store.ready.borrow());
        assert_eq!(store.state().len(), 2);
        writer.apply(&watcher::Event::Apply(svc("a", "2")));
        writer.apply(&watcher::Event::Apply(svc("c", "2")));
        writer.apply(&watcher::Event::Delete(svc("b", "2")));
        assert_eq!(store.get(&key("a")).unwrap().metadata.resource_version.as_deref(), Some("2"));
        assert!(store.get(&key("b")).is_none());
        // A relist that no longer holds `a`: it goes at the relist's end, not before.
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(svc("c", "3")));
        assert_eq!(store.state().len(), 2);
        writer.apply(&watcher::Event::InitDone);
        let names: Vec<_> = store.state().iter().map(|s| s.metadata.name.clone().unwrap().to_string()).collect();
        assert_eq!(names, ["c"]);
        assert_eq!(store.get(&key("c")).unwrap().metadata.resource_version.as_deref(), Some("3"));
        // A relist cut short (the watcher starts again with Init): what it read so far is
        // dropped, and the next one's end is what counts.
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(svc("d", "4")));
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(svc("e", "4")));
        writer.apply(&watcher::Event::InitDone);
        let names: Vec<_> = store.state().iter().map(|s| s.metadata.name.clone().unwrap().to_string()).collect();
        assert_eq!(names, ["e"]);
        // Deleting what it does not hold changes nothing.
        writer.apply(&watcher::Event::Delete(svc("zz", "5")));
        assert_eq!(store.state().len(), 1);
    }
}
