//! The standalone source: a file or a directory of YAML/JSON manifests (v1 Service,
//! discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 Pod, v1 Namespace, networking.k8s.io/v1
//! NetworkPolicy, and `List`s of them), re-read
//! when anything in it changes.
use std::{
    collections::{hash_map::DefaultHasher, BTreeMap, BTreeSet, HashMap},
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node},
    networking::v1::{NetworkPolicy, ServiceCIDR},
};
use super::{service::Service, slice::EndpointSlice};
use serde::Deserialize;

use super::{Changed, Objects};
use crate::{
    error::ObjectError,
    model::{self, Key},
};

/// Files a manifest path stands for, sorted: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files (not recursive; links followed).
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
            // Files (a ConfigMap volume's links to them too), not a directory named `x.yaml`,
            // which no read could take and which would fail every read of the directory.
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// A file's metadata as far as it tells a change: size, modification time, inode (a file
/// replaced by rename, as editors and ConfigMap volumes do, gets a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: (u64, u64),
}

/// A file modified this recently may be modified again within the file system's timestamp
/// granularity (a jiffy on some) without its time changing: its bytes are read too.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

impl Stamp {
    fn of(f: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(f)?;
        Ok(Stamp { len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()), ino: (m.dev(), m.ino()) })
    }

    /// Modified at least [`SETTLE`] before now.
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let newest = self.mtime.max(self.ctime);
        let changed = std::time::Duration::new(newest.0.max(0) as u64, newest.1.clamp(0, 999_999_999) as u32);
        now.saturating_sub(changed) >= SETTLE
    }
}

/// How long manifests that held objects may read as empty (no manifest file, or none with an
/// object in it) before that is applied. A directory being refilled (`rm *` then `cp`) or a file
/// truncated before it is written again (`cat new > f`) reads so for a moment: applied at
/// once, that moment would remove every Service, endpoint and NetworkPolicy the files held
/// (an outage, and isolated pods opened) and move every connection off its removed backend.
pub const EMPTIED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A fingerprint of the path's files (names and metadata; the bytes only of files modified in
/// the last [`SETTLE`]), to notice changes cheaply: a poll reads no settled file.
pub fn fingerprint(path: &Path) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for f in files(path)? {
        f.hash(&mut h);
        let st = Stamp::of(&f)?;
        st.hash(&mut h);
        if !st.settled() {
            std::fs::read(&f)?.hash(&mut h);
        }
    }
    Ok(h.finish())
}

/// Wakes the agent when a manifest file is written, renamed, removed or touched: inotify on the
/// directory (for a single file, on the directory holding it, as editors and ConfigMap volumes
/// replace files by rename). Written files are seen when closed, not while being written.
pub struct Watcher {
    pub changed: std::sync::Arc<tokio::sync::Notify>,
}

impl Watcher {
    pub fn new(path: &Path) -> std::io::Result<Watcher> {
        use std::os::unix::ffi::OsStrExt;
        let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf() };
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: plain syscalls; the descriptor is owned by the thread below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let watch = move || unsafe { libc::inotify_add_watch(fd, c.as_ptr(), WATCH_MASK) };
        let shown = dir.display().to_string();
        if watch() < 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(std::io::Error::new(e.kind(), format!("inotify on {}: {e}", dir.display())));
        }
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        std::thread::Builder::new().name("manifests-watch".into()).spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if n <= 0 {
                    break;
                }
                // One wake-up for any number of events: the agent compares fingerprints.
                notify.notify_one();
                let (ended, moved) = watch_events(&buf[..n as usize]);
                for wd in moved {
                    // A directory moved away keeps its watch: dropped, it is not the path's.
                    unsafe { libc::inotify_rm_watch(fd, wd) };
                }
                if ended {
                    // The directory was removed or moved away (replaced by a new one, say):
                    // watch the path again once it exists, so that changes keep waking the
                    // agent at once instead of at the next poll.
                    loop {
                        if watch() >= 0 {
                            notify.notify_one();
                            break;
                        }
                        let e = std::io::Error::last_os_error();
                        if !matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) {
                            tracing::warn!(path = %shown, error = %e, "manifests: the inotify watch could not be made again; changes are seen at the next poll (--min-sync-period-ms)");
                            break;
                        }
                        std::thread::sleep(REWATCH_EVERY);
                    }
                }
            }
            unsafe { libc::close(fd) };
        })?;
        Ok(Watcher { changed })
    }
}

const WATCH_MASK: u32 = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE | libc::IN_ATTRIB | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
/// How often a watch whose directory went away tries the path again.
const REWATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// What the inotify events in `buf` say of the watch itself: whether it ended (the directory
/// deleted or moved away; the kernel drops a deleted directory's watch, `IN_IGNORED`), and the
/// watches of directories moved away, which the kernel keeps.
fn watch_events(buf: &[u8]) -> (bool, Vec<i32>) {
    let mut at = 0;
    let head = std::mem::size_of::<libc::inotify_event>();
    let (mut ended, mut moved) = (false, Vec::new());
    while at + head <= buf.len() {
        // SAFETY: a whole event header inside the buffer, read unaligned.
        let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        ended |= ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0;
        if ev.mask & libc::IN_MOVE_SELF != 0 {
            moved.push(ev.wd);
        }
        at += head + ev.len as usize;
    }
    (ended, moved)
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

/// What the files under a manifest path held when last read, file by file, so that a read
/// parses only the files whose bytes changed and says which Services and EndpointSlices changed.
#[derive(Default)]
pub struct Cache {
    files: BTreeMap<PathBuf, FileRead>,
    /// Service and EndpointSlice keys -> the files holding them, sorted (nearly always one: held
    /// inline, a shared path, not a set of copies, which cost 350 bytes a key).
    services: HashMap<Key, Holders>,
    slices: HashMap<Key, Holders>,
    /// Keys of `services` and `slices` held by more than one file.
    shared: usize,
    /// The next read holds every object (`Changed::All`), as the first does.
    all_next: bool,
}

type Holders = smallvec::SmallVec<[Arc<Path>; 1]>;

/// `f` holds `k`; counts the keys held twice or more in `shared`.
fn hold(index: &mut HashMap<Key, Holders>, shared: &mut usize, k: Key, f: &Arc<Path>) {
    let v = index.entry(k).or_default();
    if let Err(i) = v.binary_search(f) {
        v.insert(i, f.clone());
        if v.len() == 2 {
            *shared += 1;
        }
    }
}

struct FileRead {
    hash: u64,
    /// The file's metadata when read, if it had settled then: the next read skips the file while
    /// its metadata stays the same.
    settled: Option<Stamp>,
    objs: Objects,
    errors: Vec<ObjectError>,
    /// The file holds a Service or EndpointSlice key twice.
    duplicates: bool,
}

/// Reads `path` as [`read`] does, parsing again only the files whose bytes changed since the
/// last read into `cache`: Services and EndpointSlices come as `Changed::Only` (those of the
/// changed files), everything else whole. The first read, and any read where an object's key
/// is held twice (only a full translation is exact then), hold everything (`Changed::All`).
pub fn read_changed(path: &Path, cache: &mut Cache) -> std::io::Result<(Objects, Vec<ObjectError>)> {
    // A read that fails part way (a file gone between the listing and its read) has already
    // changed the cache: the next read starts over and holds everything, so no change is lost.
    read_changed_in(path, cache).inspect_err(|_| *cache = Cache::default())
}

fn read_changed_in(path: &Path, cache: &mut Cache) -> std::io::Result<(Objects, Vec<ObjectError>)> {
    let files = files(path)?;
    let first = std::mem::take(&mut cache.all_next) | cache.files.is_empty();
    let mut touched: Vec<(Objects, Objects)> = Vec::new();
    let gone: Vec<PathBuf> = cache.files.keys().filter(|f| !files.contains(f)).cloned().collect();
    for f in gone {
        let old = cache.files.remove(&f).expect("listed");
        cache.forget(&f, &old.objs);
        touched.push((old.objs, Objects::default()));
    }
    for f in &files {
        let stamp = Stamp::of(f)?;
        if cache.files.get(f).is_some_and(|r| r.settled == Some(stamp)) {
            continue;
        }
        let settled = stamp.settled().then_some(stamp);
        let bytes = std::fs::read(f)?;
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let hash = h.finish();
        if let Some(r) = cache.files.get_mut(f).filter(|r| r.hash == hash) {
            r.settled = settled;
            continue;
        }
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        parse_str(&String::from_utf8_lossy(&bytes), &f.display().to_string(), &mut objs, &mut errors);
        drop(bytes);
        let shared: Arc<Path> = Arc::from(f.as_path());
        for k in objs.services.iter().map(|o| model::service_key(o)) {
            hold(&mut cache.services, &mut cache.shared, k, &shared);
        }
        for k in objs.endpoint_slices.iter().map(|o| model::slice_key(o)) {
            hold(&mut cache.slices, &mut cache.shared, k, &shared);
        }
        let duplicates = has_duplicates(&objs);
        let old = cache.files.insert(f.clone(), FileRead { hash, settled, objs: objs.clone(), errors, duplicates });
        if let Some(old) = old {
            cache.forget_keys(f, &old.objs, &objs);
            touched.push((old.objs, objs));
        } else {
            touched.push((Objects::default(), objs));
        }
    }
    let mut out = Objects::default();
    let mut errors = Vec::new();
    // Pods, Namespaces and NetworkPolicies only when a file that holds or held one changed.
    let policy_objects = |o: &Objects| !o.pods.is_empty() || !o.namespaces.is_empty() || !o.network_policies.is_empty();
    out.policy_unchanged = !first && !touched.iter().any(|(old, new)| policy_objects(old) || policy_objects(new));
    for r in cache.files.values() {
        let o = &r.objs;
        out.nodes.extend(o.nodes.iter().cloned());
        if !out.policy_unchanged {
            out.pods.extend(o.pods.iter().cloned());
            out.namespaces.extend(o.namespaces.iter().cloned());
            out.network_policies.extend(o.network_policies.iter().cloned());
        }
        out.service_cidrs.extend(o.service_cidrs.iter().cloned());
        errors.extend(r.errors.iter().cloned());
    }
    // (Kept as the files are read: a look at every object here would cost a change the cluster.)
    let duplicates = cache.shared > 0 || cache.files.values().any(|r| r.duplicates);
    if first || duplicates {
        for r in cache.files.values() {
            out.services.extend(r.objs.services.iter().cloned());
            out.endpoint_slices.extend(r.objs.endpoint_slices.iter().cloned());
        }
        return Ok((out, errors));
    }
    let mut ch = crate::translator::Changes::default();
    // Each holding file's objects by key, made once per file (a lookup per key through a whole
    // file would be quadratic in a file of 100,000 Services).
    let mut by_file = ByFile::new();
    for (old, new) in &touched {
        for k in old.services.iter().chain(&new.services).map(|o| model::service_key(o)) {
            let now = cache.services.get(&k).and_then(|fs| fs.first()).and_then(|f| file_index(&mut by_file, cache, f).0.get(&k).map(|o| Arc::clone(o)));
            ch.services.insert(k, now);
        }
        for k in old.endpoint_slices.iter().chain(&new.endpoint_slices).map(|o| model::slice_key(o)) {
            let now = cache.slices.get(&k).and_then(|fs| fs.first()).and_then(|f| file_index(&mut by_file, cache, f).1.get(&k).map(|o| Arc::clone(o)));
            ch.slices.insert(k, now);
        }
    }
    out.changed = Changed::Only(ch);
    Ok((out, errors))
}

/// Files' Services and EndpointSlices by key.
type ByFile<'c> = HashMap<Arc<Path>, (HashMap<Key, &'c Arc<Service>>, HashMap<Key, &'c Arc<EndpointSlice>>)>;

/// File `f`'s objects by key, indexed on first use.
fn file_index<'c, 'm>(by_file: &'m mut ByFile<'c>, cache: &'c Cache, f: &Arc<Path>) -> &'m (HashMap<Key, &'c Arc<Service>>, HashMap<Key, &'c Arc<EndpointSlice>>) {
    by_file.entry(f.clone()).or_insert_with(|| {
        let objs = &cache.files[&**f].objs;
        (objs.services.iter().map(|o| (model::service_key(o), o)).collect(), objs.endpoint_slices.iter().map(|o| (model::slice_key(o), o)).collect())
    })
}

impl Cache {
    /// Makes the next read hold every object (`Changed::All`): a full translation after a sync
    /// that failed, or after the agent held an empty read. The files' reads are kept.
    pub fn read_all_next(&mut self) {
        self.all_next = true;
    }

    /// Objects of every kind the last read held.
    pub fn objects(&self) -> usize {
        self.files.values().map(|r| &r.objs).map(|o| o.services.len() + o.endpoint_slices.len() + o.nodes.len() + o.pods.len() + o.namespaces.len() + o.network_policies.len() + o.service_cidrs.len()).sum()
    }

    /// File `f`, which held `objs`, is gone.
    fn forget(&mut self, f: &Path, objs: &Objects) {
        self.forget_keys(f, objs, &Objects::default());
    }

    /// File `f` held `old` and now holds `new`: the keys it no longer holds are no longer its.
    fn forget_keys(&mut self, f: &Path, old: &Objects, new: &Objects) {
        let still: BTreeSet<Key> = new.services.iter().map(|o| model::service_key(o)).collect();
        for k in old.services.iter().map(|o| model::service_key(o)).filter(|k| !still.contains(k)) {
            drop_file(&mut self.services, &mut self.shared, k, f);
        }
        let still: BTreeSet<Key> = new.endpoint_slices.iter().map(|o| model::slice_key(o)).collect();
        for k in old.endpoint_slices.iter().map(|o| model::slice_key(o)).filter(|k| !still.contains(k)) {
            drop_file(&mut self.slices, &mut self.shared, k, f);
        }
    }
}

fn drop_file(index: &mut HashMap<Key, Holders>, shared: &mut usize, k: Key, f: &Path) {
    if let Some(set) = index.get_mut(&k) {
        if let Ok(i) = set.binary_search_by(|p| (**p).cmp(f)) {
            set.remove(i);
            if set.len() == 1 {
                *shared -= 1;
            }
        }
        if set.is_empty() {
            index.remove(&k);
        }
    }
}

/// Does one file hold a Service or EndpointSlice key twice?
fn has_duplicates(objs: &Objects) -> bool {
    let mut seen = BTreeSet::new();
    !objs.services.iter().all(|o| seen.insert(model::service_key(o))) || {
        seen.clear();
        !objs.endpoint_slices.iter().all(|o| seen.insert(model::slice_key(o)))
    }
}

/// Parses a multi-document YAML text (`source` names it in errors) into `objs`.
pub fn parse_str(text: &str, source: &str, objs: &mut Objects, errors: &mut Vec<ObjectError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let where_ = format!("{source} document {}", i + 1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(v) => add_value(v, &where_, objs, errors),
            Err(e) => {
                // A syntax error ends the stream: serde_yaml's document iterator would yield the
                // same error forever. The documents before it are kept.
                errors.push(ObjectError::new("document", where_, "(yaml)".into(), e.to_string()));
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: x}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn syntax_error_is_reported_once_and_earlier_documents_kept() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        parse_str(&format!("{GOOD}---\nkind: Service\nmetadata: [unclosed\n---\n{GOOD}"), "f.yaml", &mut objs, &mut errors);
        assert_eq!(objs.services.len(), 1);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().starts_with("document f.yaml document 2: (yaml):"), "{}", errors[0]);
    }

    #[test]
    fn malformed_object_names_itself_and_its_field() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let bad = "kind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: [{port: eighty}]}\n";
        parse_str(&format!("{bad}---\n{GOOD}"), "f.yaml", &mut objs, &mut errors);
        assert_eq!(objs.services.len(), 1, "the good Service still counts");
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(e.contains("Service shop/bad") && e.contains("spec.ports[0].port"), "{e}");
    }

    #[test]
    fn a_kind_of_another_api_is_named_by_its_api_version_and_a_pod_annotation_is_not_read() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let knative = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: hello, namespace: shop}\nspec: {template: {}}\n";
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, annotations: {replicas: 3}}\nstatus: {podIP: 10.0.0.5}\n";
        parse_str(&format!("{knative}---\n{GOOD}---\n{pod}"), "f.yaml", &mut objs, &mut errors);
        assert_eq!((objs.services.len(), objs.pods.len()), (1, 1), "{errors:?}");
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(e.contains("Service shop/hello") && e.contains("apiVersion") && e.contains("serving.knative.dev/v1"), "{e}");
    }

    /// A directory of the test's, removed when the test ends (a failed one too).
    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_watch_follows_its_directory_removed_and_made_again() {
        use std::time::Duration;
        let dir = Gone(std::env::temp_dir().join(format!("ferry-rewatch-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let w = Watcher::new(&dir.0).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let woke = |within: Duration| rt.block_on(async { tokio::time::timeout(within, w.changed.notified()).await }).is_ok();
        std::fs::write(dir.0.join("a.yaml"), GOOD).unwrap();
        assert!(woke(Duration::from_secs(5)), "a write wakes the agent");
        // The directory goes (a volume remounted, a directory replaced) and comes back.
        std::fs::remove_dir_all(&dir.0).unwrap();
        assert!(woke(Duration::from_secs(5)), "the removal wakes the agent");
        std::thread::sleep(Duration::from_millis(300));
        std::fs::create_dir_all(&dir.0).unwrap();
        // Wake-ups of the removal and of the watch made again, drained (bounded).
        std::thread::sleep(REWATCH_EVERY * 3);
        for _ in 0..10 {
            if !woke(Duration::from_millis(100)) {
                break;
            }
        }
        std::fs::write(dir.0.join("b.yaml"), GOOD).unwrap();
        assert!(woke(Duration::from_secs(5)), "a write into the directory made again wakes the agent");
        // Replaced by rename: the old directory moved aside, a new one moved in.
        let aside = Gone(dir.0.with_extension("old"));
        let fresh = Gone(dir.0.with_extension("new"));
        std::fs::create_dir_all(&fresh.0).unwrap();
        std::fs::rename(&dir.0, &aside.0).unwrap();
        std::fs::rename(&fresh.0, &dir.0).unwrap();
        std::thread::sleep(REWATCH_EVERY * 3);
        for _ in 0..10 {
            if !woke(Duration::from_millis(100)) {
                break;
            }
        }
        std::fs::write(aside.0.join("c.yaml"), GOOD).unwrap();
        assert!(!woke(Duration::from_millis(500)), "a write into the directory moved aside is not the path's");
        std::fs::write(dir.0.join("c.yaml"), GOOD).unwrap();
        assert!(woke(Duration::from_secs(5)), "a write into the directory moved in wakes the agent");
    }

    #[test]
    fn a_read_parses_only_the_files_that_changed_and_names_their_objects() {
        use crate::translator::Changes;
        let dir = std::env::temp_dir().join(format!("ferry-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| format!("kind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n");
        std::fs::write(dir.join("a.yaml"), svc("a", "172.30.0.1") + &svc("b", "172.30.0.2")).unwrap();
        std::fs::write(dir.join("c.yaml"), svc("c", "172.30.0.3")).unwrap();
        // A directory named like a manifest is not one (a read of it would fail every read).
        std::fs::create_dir_all(dir.join("d.yaml.d.yaml")).unwrap();
        let mut cache = Cache::default();
        let changes = |cache: &mut Cache| -> Changes {
            let (objs, errors) = read_changed(&dir, cache).unwrap();
            assert!(errors.is_empty(), "{errors:?}");
            match objs.changed {
                Changed::Only(ch) => ch,
                Changed::All => panic!("a whole read"),
            }
        };
        let (objs, _) = read_changed(&dir, &mut cache).unwrap();
        assert!(matches!(objs.changed, Changed::All) && objs.services.len() == 3, "the first read is whole");
        assert!(changes(&mut cache).is_empty(), "nothing changed");
        // b changes: a.yaml is parsed again, and its Services are named (a as it is).
        std::fs::write(dir.join("a.yaml"), svc("a", "172.30.0.1") + &svc("b", "172.30.0.22")).unwrap();
        let ch = changes(&mut cache);
        assert_eq!(ch.services.keys().map(|k| &*k.1).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(ch.services[&("x".into(), "b".into())].as_ref().unwrap().spec.as_ref().unwrap().cluster_ip.as_deref(), Some("172.30.0.22"));
        // b moves to c.yaml: still there; a.yaml removed: a is gone.
        std::fs::write(dir.join("a.yaml"), svc("a", "172.30.0.1")).unwrap();
        std::fs::write(dir.join("c.yaml"), svc("c", "172.30.0.3") + &svc("b", "172.30.0.22")).unwrap();
        let ch = changes(&mut cache);
        assert!(ch.services[&("x".into(), "b".into())].is_some(), "{ch:?}");
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let ch = changes(&mut cache);
        assert_eq!(ch.services.len(), 1);
        assert!(ch.services[&("x".into(), "a".into())].is_none());
        // The same Service in two files: a whole read (only a full translation is exact).
        std::fs::write(dir.join("d.yaml"), svc("c", "172.30.0.4")).unwrap();
        let (objs, _) = read_changed(&dir, &mut cache).unwrap();
        assert!(matches!(objs.changed, Changed::All) && objs.services.len() == 3);
        assert_eq!(cache.services[&("x".into(), "c".into())].len(), 2, "held by both files, once each");
        assert_eq!(cache.shared, 1);
        // d.yaml gone: c is c.yaml's again, named as it is there.
        std::fs::remove_file(dir.join("d.yaml")).unwrap();
        let ch = changes(&mut cache);
        assert_eq!(ch.services.len(), 1);
        assert_eq!(ch.services[&("x".into(), "c".into())].as_ref().unwrap().spec.as_ref().unwrap().cluster_ip.as_deref(), Some("172.30.0.3"));
        assert_eq!(cache.services[&("x".into(), "c".into())].len(), 1);
        assert_eq!(cache.shared, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_whole_read_again_keeps_the_files_read_and_empty_files_hold_no_object() {
        let dir = Gone(std::env::temp_dir().join(format!("ferry-emptied-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join("a.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut cache = Cache::default();
        assert_eq!(cache.objects(), 0);
        let (objs, _) = read_changed(&dir.0, &mut cache).unwrap();
        assert!(matches!(objs.changed, Changed::All) && objs.services.len() == 1);
        assert_eq!(cache.objects(), 1);
        // After a failed sync: the next read is whole, without forgetting what the files held.
        cache.read_all_next();
        assert_eq!(cache.objects(), 1);
        let (objs, _) = read_changed(&dir.0, &mut cache).unwrap();
        assert!(matches!(objs.changed, Changed::All) && objs.services.len() == 1, "a whole read again");
        let (objs, _) = read_changed(&dir.0, &mut cache).unwrap();
        assert!(matches!(&objs.changed, Changed::Only(ch) if ch.is_empty()), "then changes only");
        // What the agent's emptied grace counts: a truncated file, one of comments only, none.
        for (what, text) in [("truncated", Some("")), ("comments only", Some("# rewritten next\n\n---\n")), ("gone", None)] {
            match text {
                Some(t) => std::fs::write(&file, t).unwrap(),
                None => std::fs::remove_file(&file).unwrap(),
            }
            let (objs, errors) = read_changed(&dir.0, &mut cache).unwrap();
            assert!(errors.is_empty(), "{what}: {errors:?}");
            assert_eq!(cache.objects(), 0, "{what}");
            assert!(objs.services.is_empty(), "{what}");
            std::fs::write(&file, GOOD).unwrap();
            read_changed(&dir.0, &mut cache).unwrap();
            assert_eq!(cache.objects(), 1, "{what}: back");
        }
    }

    #[test]
    fn lists_and_unknown_kinds() {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        let list = format!("kind: List\nitems:\n- {}\n", GOOD.trim_end().replace('\n', "\n  "));
        parse_str(&format!("{list}---\nkind: Deployment\nmetadata: {{name: d}}\n"), "f.yaml", &mut objs, &mut errors);
        assert_eq!((objs.services.len(), errors.len()), (1, 0), "{errors:?}");
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
    fn push<T: serde::de::DeserializeOwned + k8s_openapi::Resource, L: From<T>>(v: &serde_yaml::Value, kind: &'static str, name: String, list: &mut Vec<L>, errors: &mut Vec<ObjectError>) {
        // The same kind of another API group (Knative's `Service`) is not this one. (Absent: the
        // kind alone says it.)
        if let Some(api) = v.get("apiVersion").and_then(|a| a.as_str()).filter(|a| *a != T::API_VERSION) {
            errors.push(ObjectError::new(kind, name, "apiVersion".into(), format!("{api:?} is not {:?}: a {kind} of another API is not read", T::API_VERSION)));
            return;
        }
        match typed::<T>(v) {
            Ok(o) => list.push(o.into()),
            Err((field, msg)) => errors.push(ObjectError::new(kind, name, field, msg)),
        }
    }
    match kind.as_str() {
        "Service" => push::<Service, _>(&v, "Service", name(), &mut objs.services, errors),
        "EndpointSlice" => push::<EndpointSlice, _>(&v, "EndpointSlice", name(), &mut objs.endpoint_slices, errors),
        "Node" => push::<Node, _>(&v, "Node", name(), &mut objs.nodes, errors),
        "Pod" => push::<super::pod::Pod, _>(&v, "Pod", name(), &mut objs.pods, errors),
        "Namespace" => push::<Namespace, _>(&v, "Namespace", name(), &mut objs.namespaces, errors),
        "NetworkPolicy" => push::<NetworkPolicy, _>(&v, "NetworkPolicy", name(), &mut objs.network_policies, errors),
        "ServiceCIDR" => push::<ServiceCIDR, _>(&v, "ServiceCIDR", name(), &mut objs.service_cidrs, errors),
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" | "PodList" | "NamespaceList" | "NetworkPolicyList" | "ServiceCIDRList" => {
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

/// Deserializes a Kubernetes object, reporting the path of the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        (if path == "." { "(object)".into() } else { path }, e.into_inner().to_string())
    })
}
