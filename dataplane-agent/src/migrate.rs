//! Upgrades and rollbacks across a map layout change, without breaking a connection.
//!
//! Every agent records the layout of each map it pins (its key and value fields by name, offset
//! and size, from `dataplane_common::layout`) in the pinned map `<pin-dir>/layouts_v1`, keyed by
//! the map's kernel id, so a record always describes the map object it was written for. A starting
//! agent compares what is pinned with what it needs:
//! - same layout: the pin is used as it is (the common case: a restart, an upgrade that changed
//!   no map);
//! - another layout (a newer or an older Ferry changed the key or value, whether or not it
//!   renamed the map, which the crate's rule asks for: `ct4_v2` -> `ct4_v3`), or another capacity
//!   (`--conntrack-capacity`): a new map is created beside the old one and every entry is copied
//!   over, field by field: a field moves by name and size, a field the other side lacks is zero.
//!
//! The copy runs while the old programs keep serving from the old maps; the new maps wait pinned
//! as `new__<name>` (removed by the next start if this one is interrupted). Then the agent swaps
//! the programs (link update, see `attach.rs`), copies again what the old programs added
//! meanwhile (without overwriting what the new ones wrote), renames the new maps into place (a
//! rename replaces a pin of the same name atomically) and removes the old pins. A rollback is the same thing in the other direction: the older agent
//! reads the newer one's layouts from the `layouts_v1` map, so it needs no knowledge of the future.
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use dataplane_common::{
    layout::{Described, Field},
    names, AffinityKey, AffinityValue, Lb4PairKey, Ct4Entry, Ct4Key, Frag4Key, Frag4Ports, Lb4Backend, Lb4Key, Lb4Service, Lb4SlotKey, LocalAddr, NodeConfig, PodIface,
    PolCtEntry, PolCtKey, PolEndpoint, PolEvKey, PolFragKey, PolRevoked, SockRevKey, SockRevValue, SvcCounters, SvcName,
};
use log::{info, warn};

use crate::links::{obj_get, obj_pin, sys_bpf, Attr};

/// The pinned map of layouts: kernel map id -> layout text.
pub const LAYOUTS: &str = "layouts_v1";
const TEXT_LEN: usize = 2048;

/// A map's key and value, field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub key: Vec<Field>,
    pub value: Vec<Field>,
}

fn layout<K: Described, V: Described>(name: &'static str) -> MapLayout {
    MapLayout { name, key_size: std::mem::size_of::<K>() as u32, value_size: std::mem::size_of::<V>() as u32, key: K::fields(), value: V::fields() }
}

/// The layout of every map this build pins (the ring buffer of policy events has none: it is
/// never copied, only recreated).
pub fn layouts() -> Vec<MapLayout> {
    vec![
        layout::<Lb4Key, Lb4Service>(names::SERVICES),
        layout::<Lb4SlotKey, u32>(names::SLOTS),
        layout::<u32, Lb4Backend>(names::BACKENDS),
        layout::<Ct4Key, Ct4Entry>(names::CONNTRACK),
        layout::<Ct4Key, Ct4Entry>(names::CONNTRACK_ASSURED),
        layout::<Frag4Key, Frag4Ports>(names::FRAGMENTS),
        layout::<[u8; 8], u32>(names::SERVICE_CIDRS),
        layout::<u32, u64>(names::STATS),
        layout::<AffinityKey, AffinityValue>(names::AFFINITY),
        layout::<Lb4PairKey, u64>(names::GONE),
        layout::<[u8; 12], u32>(names::SOURCE_RANGES),
        layout::<u32, NodeConfig>(names::CONFIG),
        layout::<u32, [u32; 2]>(names::CHASH),
        layout::<u32, SvcCounters>(names::SVC_STATS),
        layout::<u32, SvcName>(names::SVC_NAMES),
        layout::<[u8; 8], u32>(names::POL_IPCACHE),
        layout::<u32, PolEndpoint>(names::POL_ENDPOINTS),
        layout::<[u8; 16], u32>(names::POL_RULES),
        layout::<PolCtKey, PolCtEntry>(names::POL_CONNTRACK),
        layout::<PolCtKey, PolCtEntry>(names::POL_CONNTRACK_ASSURED),
        layout::<PolFragKey, u32>(names::POL_FRAGMENTS),
        layout::<PolEvKey, u64>(names::POL_EVENT_LIMIT),
        layout::<u32, [u32; 2]>(names::CT_SOURCES),
        layout::<PolCtKey, PolRevoked>(names::POL_REVOKED),
        layout::<u32, u64>(names::POL_DROPS),
        layout::<u32, SvcName>(names::POL_NAMES),
        layout::<u32, SvcName>(names::POD_NAMES),
        layout::<u32, SvcName>(names::IDENTITY_NAMES),
        layout::<SockRevKey, SockRevValue>(names::SOCK_REV),
        layout::<u32, LocalAddr>(names::LOCAL_ADDRS),
        layout::<u32, PodIface>(names::POD_IFACES),
    ]
}

fn fields_text(fields: &[Field]) -> String {
    fields.iter().map(|f| format!("{}@{}+{}", f.name, f.offset, f.size)).collect::<Vec<_>>().join(",")
}

impl MapLayout {
    /// The recorded form: `key=SIZE:name@off+size,...;value=SIZE:...`.
    pub fn text(&self) -> String {
        format!("key={}:{};value={}:{}", self.key_size, fields_text(&self.key), self.value_size, fields_text(&self.value))
    }
}

/// A layout as recorded by some version: sizes and (name, offset, size) of each field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub key_size: u32,
    pub value_size: u32,
    pub key: Vec<(String, usize, usize)>,
    pub value: Vec<(String, usize, usize)>,
}

impl Recorded {
    pub fn parse(text: &str) -> Option<Recorded> {
        let part = |p: &str, tag: &str| -> Option<(u32, Vec<(String, usize, usize)>)> {
            let (size, fields) = p.strip_prefix(tag)?.split_once(':')?;
            let fields = fields
                .split(',')
                .filter(|f| !f.is_empty())
                .map(|f| {
                    let (name, rest) = f.split_once('@')?;
                    let (off, size) = rest.split_once('+')?;
                    Some((name.to_string(), off.parse().ok()?, size.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()?;
            Some((size.parse().ok()?, fields))
        };
        let (k, v) = text.split_once(';')?;
        let (key_size, key) = part(k, "key=")?;
        let (value_size, value) = part(v, "value=")?;
        Some(Recorded { key_size, value_size, key, value })
    }

    fn of(l: &MapLayout) -> Recorded {
        Recorded::parse(&l.text()).expect("own layout parses")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw map access (any key and value size, per-CPU values, maps of maps)

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

const MAP_HASH: u32 = 1;
const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_HASH: u32 = 5;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LRU_PERCPU_HASH: u32 = 10;
const MAP_HASH_OF_MAPS: u32 = 13;
const MAP_RINGBUF: u32 = 27;

/// What the kernel says of a map.
#[derive(Clone, Copy, Debug)]
pub struct MapInfo {
    pub kind: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 88];
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, Attr::new().u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64))?;
    let at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    Ok(MapInfo { kind: at(0), id: at(4), key_size: at(8), value_size: at(12), max_entries: at(16) })
}

/// The ids of the maps the programs on the links pinned under `dir` use: the running
/// datapath's state, whichever version pinned it.
pub fn live_map_ids(dir: &Path) -> Vec<u32> {
    const BPF_PROG_GET_FD_BY_ID: u32 = 13;
    let mut progs: Vec<u32> = std::fs::read_dir(dir.join(crate::links::DIR))
        .map(|rd| rd.flatten().filter_map(|e| obj_get(&e.path()).ok().and_then(|fd| crate::links::link_info(fd.as_fd()).ok())).map(|li| li.prog_id).collect())
        .unwrap_or_default();
    progs.sort();
    progs.dedup();
    let mut maps = Vec::new();
    for id in progs {
        let Ok(fd) = sys_bpf(BPF_PROG_GET_FD_BY_ID, Attr::new().u32(0, id)) else { continue };
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_prog_info: nr_map_ids at 52, map_ids (a pointer) at 56.
        let mut ids = [0u32; 256];
        let mut info = [0u8; 256];
        info[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        if sys_bpf(BPF_OBJ_GET_INFO_BY_FD, Attr::new().u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64)).is_ok() {
            let n = u32::from_ne_bytes(info[52..56].try_into().unwrap()) as usize;
            maps.extend_from_slice(&ids[..n.min(ids.len())]);
        }
    }
    maps.sort();
    maps.dedup();
    maps
}

fn percpu(kind: u32) -> bool {
    matches!(kind, MAP_PERCPU_HASH | MAP_PERCPU_ARRAY | MAP_LRU_PERCPU_HASH)
}

fn is_array(kind: u32) -> bool {
    matches!(kind, MAP_ARRAY | MAP_PERCPU_ARRAY)
}

fn possible_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

/// The bytes a lookup of a value of `info` fills.
fn value_buf_len(info: &MapInfo) -> usize {
    if percpu(info.kind) { (info.value_size as usize).div_ceil(8) * 8 * possible_cpus() } else { info.value_size as usize }
}

fn next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let a = Attr::new().u32(0, fd.as_raw_fd() as u32).u64(8, key.map_or(0, |k| k.as_ptr() as u64)).u64(16, next.as_mut_ptr() as u64);
    match sys_bpf(BPF_MAP_GET_NEXT_KEY, a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn lookup(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let a = Attr::new().u32(0, fd.as_raw_fd() as u32).u64(8, key.as_ptr() as u64).u64(16, value.as_mut_ptr() as u64);
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn update(fd: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    sys_bpf(BPF_MAP_UPDATE_ELEM, Attr::new().u32(0, fd.as_raw_fd() as u32).u64(8, key.as_ptr() as u64).u64(16, value.as_ptr() as u64).u64(24, flags)).map(drop)
}

fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let fd = sys_bpf(BPF_MAP_GET_FD_BY_ID, Attr::new().u32(0, id))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates the `layouts` map (a plain hash, made by the agent, not the object): map id -> layout.
fn create_layouts_map() -> io::Result<OwnedFd> {
    let name = b"ferry_layouts\0";
    let mut a = Attr::new().u32(0, MAP_HASH).u32(4, 4).u32(8, TEXT_LEN as u32).u32(12, 1024);
    a.0[28..28 + name.len()].copy_from_slice(name);
    let fd = sys_bpf(BPF_MAP_CREATE, a)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_DELETE_ELEM: u32 = 3;

/// The kernel id of the map pinned at `path`.
fn pinned_id(path: &Path) -> Option<u32> {
    obj_get(path).and_then(|fd| map_info(fd.as_fd())).ok().map(|i| i.id)
}

/// The maps pinned directly under `dir` (not the links, not the record itself): name -> id.
fn pinned_maps(dir: &Path) -> BTreeMap<String, u32> {
    let Ok(rd) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LAYOUTS)
        .filter_map(|n| Some((n.clone(), pinned_id(&dir.join(&n))?)))
        .collect()
}

/// Every record: map id -> layout text.
fn records(fd: BorrowedFd<'_>) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let (mut key, mut next, mut text) = ([0u8; 4], [0u8; 4], vec![0u8; TEXT_LEN]);
    let mut first = true;
    for _ in 0..4096 {
        match next_key(fd, (!first).then_some(&key[..]), &mut next) {
            Ok(true) => {}
            _ => break,
        }
        first = false;
        key = next;
        if lookup(fd, &key, &mut text).unwrap_or(false) {
            out.insert(u32::from_ne_bytes(key), String::from_utf8_lossy(&text[..text.iter().position(|&c| c == 0).unwrap_or(TEXT_LEN)]).into_owned());
        }
    }
    out
}

/// The recorded layout of every map pinned under `dir`: pin name -> layout text. A record
/// belongs to a map object (by its kernel id), not to a name: a map pinned anew under an old name
/// is never read with the old map's layout, whatever moment a start was interrupted at.
pub fn recorded(dir: &Path) -> BTreeMap<String, String> {
    let Ok(fd) = obj_get(&dir.join(LAYOUTS)) else { return BTreeMap::new() };
    let rec = records(fd.as_fd());
    pinned_maps(dir).into_iter().filter_map(|(name, id)| Some((name, rec.get(&id)?.clone()))).collect()
}

/// The pinned `layouts` map, created and pinned when missing.
fn layouts_map(dir: &Path) -> io::Result<OwnedFd> {
    let path = dir.join(LAYOUTS);
    match obj_get(&path) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            let fd = create_layouts_map()?;
            obj_pin(fd.as_fd(), &path)?;
            Ok(fd)
        }
    }
}

fn write_layout(fd: BorrowedFd<'_>, id: u32, text: &str) -> io::Result<()> {
    let mut t = [0u8; TEXT_LEN];
    t[..text.len().min(TEXT_LEN)].copy_from_slice(&text.as_bytes()[..text.len().min(TEXT_LEN)]);
    update(fd, &id.to_ne_bytes(), &t, BPF_ANY)
}

/// Records this build's layout of every map it pins, and forgets the records of maps no longer
/// pinned.
fn record(dir: &Path) -> io::Result<()> {
    let fd = layouts_map(dir)?;
    let pinned = pinned_maps(dir);
    for l in layouts() {
        if let Some(id) = pinned.get(l.name) {
            write_layout(fd.as_fd(), *id, &l.text())?;
        }
    }
    let live: Vec<u32> = pinned.values().copied().collect();
    for id in records(fd.as_fd()).keys().filter(|id| !live.contains(id)) {
        let _ = sys_bpf(BPF_MAP_DELETE_ELEM, Attr::new().u32(0, fd.as_raw_fd() as u32).u64(8, id.to_ne_bytes().as_ptr() as u64));
    }
    Ok(())
}

fn pin_id(dir: &Path, name: &str) -> io::Result<u32> {
    pinned_id(&dir.join(name)).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no pinned map", dir.join(name).display())))
}

/// Forgets the recorded layout of the map pinned as `name` (as if no agent had recorded it; for
/// tests).
pub fn forget_one(dir: &Path, name: &str) -> io::Result<()> {
    let id = pin_id(dir, name)?;
    sys_bpf(BPF_MAP_DELETE_ELEM, Attr::new().u32(0, layouts_map(dir)?.as_raw_fd() as u32).u64(8, id.to_ne_bytes().as_ptr() as u64)).map(drop)
}

/// Records `text` as the layout of the map pinned as `name` under `dir` (what an agent of that
/// layout would have recorded; for tests and repairs).
pub fn record_one(dir: &Path, name: &str, text: &str) -> io::Result<()> {
    write_layout(layouts_map(dir)?.as_fd(), pin_id(dir, name)?, text)
}

// ---------------------------------------------------------------------------------------------
// The plan and the copy

/// A map to be created anew and filled from an old pin.
#[derive(Debug)]
pub struct Move {
    pub name: &'static str,
    /// The old pin (the same name, or an older/newer name of the same map).
    pub from: String,
    pub old: Recorded,
    /// Why: "layout" or "capacity".
    pub why: &'static str,
}

/// The name without its `_vN` layout version: the same map across versions.
pub fn base_name(name: &str) -> &str {
    match name.rfind("_v") {
        Some(i) if i + 2 < name.len() && name[i + 2..].bytes().all(|b| b.is_ascii_digit()) => &name[..i],
        _ => name,
    }
}

/// The temporary pin of a new map until it replaces an old one of the same name (bpffs allows
/// no dot in a name).
fn staging(name: &str) -> String {
    format!("{STAGING}{name}")
}

const STAGING: &str = "new__";

/// Decides, before the object is loaded, which pinned maps are used as they are and which are
/// replaced by new maps filled from them. `capacities`: the max_entries this start asks for.
/// A pin of another layout that no version recorded (an agent from before layouts were
/// recorded) cannot be read field by field: refused by name, the running datapath untouched.
pub fn plan(dir: &Path, capacities: &[(&'static str, u32)]) -> Result<Vec<Move>, crate::error::LoadError> {
    let staged: Vec<String> = std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|p| p.starts_with(STAGING)).collect()).unwrap_or_default();
    let mut live: Option<Vec<u32>> = None;
    for p in staged {
        // What an interrupted start left: a copy the attached programs already use (it was
        // killed after the swap) is the live state and goes into place; any other was never
        // served and goes away.
        let live = live.get_or_insert_with(|| live_map_ids(dir));
        let id = pinned_id(&dir.join(&p)).unwrap_or(0);
        if id != 0 && live.contains(&id) {
            std::fs::rename(dir.join(&p), dir.join(&p[STAGING.len()..]))?;
            info!("map {}: the copy an interrupted start had already swapped in is put in place", &p[STAGING.len()..]);
        } else {
            let _ = std::fs::remove_file(dir.join(&p));
        }
    }
    let rec = recorded(dir);
    let pinned = pinned_maps(dir);
    let live = live.unwrap_or_else(|| live_map_ids(dir));
    let mut moves = Vec::new();
    for l in layouts() {
        let mine = Recorded::of(&l);
        // The same map under any version's name (`ct4_v2`, `ct4_v3`, ...), this build's own too.
        let same: Vec<(&String, u32)> = pinned.iter().filter(|(p, _)| base_name(p) == base_name(l.name)).map(|(p, id)| (p, *id)).collect();
        // Where the running datapath keeps this state: the one the attached programs use. After
        // an upgrade killed past its swap, a rollback finds its own name pinned but stale, and
        // the newer one live: the source is the live one, whatever the names say.
        let source = match same.iter().find(|(_, id)| live.contains(id)) {
            Some((p, _)) => Some((*p).clone()),
            None if pinned.contains_key(l.name) => Some(l.name.to_string()),
            // Nothing attached uses it: the newest recorded version (by number, not by text).
            None => same.iter().filter(|(p, _)| rec.contains_key(*p)).max_by_key(|(p, _)| version(p)).map(|(p, _)| (*p).clone()),
        };
        let Some(from) = source else {
            continue;
        };
        let path = dir.join(&from);
        let info = obj_get(&path).and_then(|fd| map_info(fd.as_fd())).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let cap = capacities.iter().find(|(n, _)| *n == l.name).map(|(_, c)| *c);
        let old = match rec.get(&from).and_then(|t| Recorded::parse(t)) {
            Some(old) => old,
            // Pinned by an agent that recorded no layouts under this build's own name, with this
            // build's sizes: the same map (the naming rule).
            None if from == l.name && info.key_size == l.key_size && info.value_size == l.value_size => mine.clone(),
            None if from == l.name => {
                let (what, found, expected) = if info.key_size != l.key_size { ("key size", info.key_size, l.key_size) } else { ("value size", info.value_size, l.value_size) };
                return Err(crate::error::LoadError::PinnedMismatch { path: path.display().to_string(), what, found, expected });
            }
            // Another name, no record: it cannot be read field by field. A leftover nothing uses
            // is only named in the log; one the attached programs use holds the live state, and
            // starting without it would drop that: refused, by name.
            None if live.contains(&info.id) => return Err(crate::error::LoadError::Unmigratable { path: path.display().to_string(), name: l.name }),
            None => continue,
        };
        if old != mine {
            // A key this build cannot rebuild field for field (a key field missing, renamed or
            // resized on either side) would merge or scatter entries: refused, by name.
            let names = |f: &[(String, usize, usize)]| f.iter().map(|(n, _, s)| (n.clone(), *s)).collect::<std::collections::BTreeSet<_>>();
            if names(&old.key) != names(&mine.key) {
                return Err(crate::error::LoadError::KeyChanged { path: path.display().to_string(), name: l.name, detail: describe_change(&old, &l) });
            }
            moves.push(Move { name: l.name, from, old, why: "layout" });
        } else if from != l.name {
            moves.push(Move { name: l.name, from, old, why: "layout" });
        } else if cap.is_some_and(|c| c != info.max_entries) {
            moves.push(Move { name: l.name, from, old, why: "capacity" });
        }
    }
    Ok(moves)
}

/// The `N` of a `_vN` name (0 without one).
fn version(name: &str) -> u32 {
    name.rfind("_v").and_then(|i| name[i + 2..].parse().ok()).unwrap_or(0)
}

/// Converts one key or value from the old layout to the new one: fields by name and size; the
/// rest zero. The same layout copies as is.
fn convert(old: &[u8], old_fields: &[(String, usize, usize)], new_fields: &[Field], new_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; new_size];
    for f in new_fields {
        if let Some((_, off, size)) = old_fields.iter().find(|(n, _, s)| n == f.name && *s == f.size) {
            if off + size <= old.len() && f.offset + f.size <= new_size {
                out[f.offset..f.offset + f.size].copy_from_slice(&old[*off..off + size]);
            }
        }
    }
    out
}

/// What one copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub copied: u64,
    pub failed: u64,
}

/// How a pass writes into the new map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    /// Before the swap: nobody else writes the new map; every entry is written.
    Fill,
    /// After the swap: entries the old programs made before the swap are added; where the new
    /// programs already hold an entry, the one created first wins (by `created_ns` when both
    /// layouts have it): a connection's own entry, not one a mid-stream packet made up.
    Settle,
    /// Last: what the old programs removed since it was copied (closed, or moved from the LRU map
    /// to the assured one) is removed from the new map, unless the new programs wrote it since.
    /// Only once every map has its additions: a connection moving between maps is never in
    /// neither.
    Prune,
}

const MAP_LRU_HASH: u32 = 9;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;
const BPF_EXIST: u64 = 2;

/// Every (key, value) of a map: in batches of 4096 where the kernel can (plain and LRU hashes,
/// arrays: two orders of magnitude fewer syscalls, so a pass over half a million connections
/// takes a fraction of a second), else key by key.
fn entries(fd: BorrowedFd<'_>, info: &MapInfo) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (ks, vs) = (info.key_size as usize, value_buf_len(info));
    let mut out = Vec::new();
    if matches!(info.kind, MAP_HASH | MAP_LRU_HASH | MAP_ARRAY) {
        const CHUNK: usize = 4096;
        let (mut keys, mut vals) = (vec![0u8; ks * CHUNK], vec![0u8; vs * CHUNK]);
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        let mut batched = true;
        // Bounded: at most every entry, a chunk at a time, twice over.
        for _ in 0..(info.max_entries as usize / CHUNK + 2) * 2 {
            let mut a = Attr::new()
                .u64(0, if first { 0 } else { &mut token_in as *mut u64 as u64 })
                .u64(8, &mut token_out as *mut u64 as u64)
                .u64(16, keys.as_mut_ptr() as u64)
                .u64(24, vals.as_mut_ptr() as u64)
                .u32(32, CHUNK as u32)
                .u32(36, fd.as_raw_fd() as u32);
            let r = crate::links::sys_bpf_mut(BPF_MAP_LOOKUP_BATCH, &mut a);
            let n = u32::from_ne_bytes(a.0[32..36].try_into().unwrap()) as usize;
            let done = match r {
                Ok(_) => false,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(_) if first => {
                    batched = false;
                    break;
                }
                Err(e) => return Err(e),
            };
            for i in 0..n.min(CHUNK) {
                out.push((keys[i * ks..(i + 1) * ks].to_vec(), vals[i * vs..(i + 1) * vs].to_vec()));
            }
            if done {
                break;
            }
            token_in = token_out;
            first = false;
        }
        if batched {
            return Ok(out);
        }
        out.clear();
    }
    let (mut key, mut next, mut val) = (vec![0u8; ks], vec![0u8; ks], vec![0u8; vs]);
    let mut first = true;
    // Bounded: a map changing under the walk can send it back to its start.
    for _ in 0..(info.max_entries as u64 * 2 + 16) {
        if !next_key(fd, (!first).then_some(&key[..]), &mut next)? {
            break;
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        if lookup(fd, &key, &mut val)? {
            out.push((key.clone(), val.clone()));
        }
    }
    Ok(out)
}

/// The `created_ns` of a value, when its layout has one.
fn created(v: &[u8], fields: &[(String, usize, usize)]) -> Option<u64> {
    let (_, off, size) = fields.iter().find(|(n, _, s)| n == "created_ns" && *s == 8)?;
    Some(u64::from_ne_bytes(v.get(*off..off + size)?.try_into().ok()?))
}

/// What the old map held when it was last copied (its own key and value bytes): the next pass
/// writes only what changed since, and takes out of the new map what the old programs removed
/// (a connection closed, or moved from the LRU map to the assured one).
pub type Snapshot = std::collections::HashMap<Vec<u8>, Vec<u8>>;

/// Copies `from` (old layout) into `to` (this build's `l`), as `pass` says. With `snap` (maps of
/// plain values), only the differences from the last copy are written, and the snapshot is
/// brought up to date: every pass after the first is as quick as reading the old map.
fn copy(from: BorrowedFd<'_>, old: &Recorded, to: BorrowedFd<'_>, l: &MapLayout, pass: Pass, snap: &mut Snapshot) -> io::Result<Copied> {
    let oi = map_info(from)?;
    let ni = map_info(to)?;
    let mut c = Copied::default();
    if oi.kind == MAP_RINGBUF || ni.kind == MAP_RINGBUF || (pass != Pass::Fill && is_array(ni.kind)) {
        return Ok(c);
    }
    let cpus = if percpu(oi.kind) { possible_cpus() } else { 1 };
    // Per-CPU values and maps of maps are small (counters, hash tables): copied whole each time.
    let diff = cpus == 1 && oi.kind != MAP_HASH_OF_MAPS;
    let (ostride, nstride) = ((oi.value_size as usize).div_ceil(8) * 8, (ni.value_size as usize).div_ceil(8) * 8);
    let new_fields: Vec<(String, usize, usize)> = l.value.iter().map(|f| (f.name.to_string(), f.offset, f.size)).collect();
    let conv = |v: &[u8]| convert(&v[..oi.value_size as usize], &old.value, &l.value, ni.value_size as usize);
    let mut current = vec![0u8; value_buf_len(&ni)];
    let now = entries(from, &oi)?;
    if diff && pass == Pass::Prune {
        // Gone from the old map since the last copy: out of the new one too, unless the new
        // programs have written it since (then it is theirs).
        let present: std::collections::HashSet<&[u8]> = now.iter().map(|(k, _)| k.as_slice()).collect();
        let gone: Vec<Vec<u8>> = snap.keys().filter(|k| !present.contains(k.as_slice())).cloned().collect();
        for k in gone {
            let was = snap.remove(&k).unwrap_or_default();
            let nk = convert(&k, &old.key, &l.key, ni.key_size as usize);
            if lookup(to, &nk, &mut current)? && current[..ni.value_size as usize] == conv(&was)[..] {
                let _ = sys_bpf(BPF_MAP_DELETE_ELEM, Attr::new().u32(0, to.as_raw_fd() as u32).u64(8, nk.as_ptr() as u64));
                c.copied += 1;
            }
        }
    }
    if pass == Pass::Prune {
        return Ok(c);
    }
    for (key, val) in now {
        let before = if diff { snap.get(&key).cloned() } else { None };
        if before.as_deref() == Some(&val[..]) {
            continue;
        }
        let nk = convert(&key, &old.key, &l.key, ni.key_size as usize);
        let nv = if oi.kind == MAP_HASH_OF_MAPS {
            // The value is the inner map: its id read back, its fd written.
            let id = u32::from_ne_bytes(val[..4].try_into().unwrap());
            let inner = map_fd_by_id(id)?;
            let flags = if pass == Pass::Settle { BPF_NOEXIST } else { BPF_ANY };
            tally(&mut c, update(to, &nk, &(inner.as_raw_fd() as u32).to_ne_bytes(), flags))?;
            continue;
        } else if cpus > 1 {
            let mut v = vec![0u8; nstride * cpus];
            for cpu in 0..cpus {
                let conv = convert(&val[cpu * ostride..cpu * ostride + oi.value_size as usize], &old.value, &l.value, ni.value_size as usize);
                v[cpu * nstride..cpu * nstride + conv.len()].copy_from_slice(&conv);
            }
            v
        } else {
            conv(&val)
        };
        let flags = match pass {
            Pass::Fill | Pass::Prune => BPF_ANY,
            Pass::Settle => {
                if cpus > 1 || !lookup(to, &nk, &mut current)? {
                    // Absent from the new map: new since the last copy (added), or copied and then
                    // removed by the new programs (a connection that closed: left out).
                    if before.is_some() {
                        snap.insert(key, val);
                        continue;
                    }
                    BPF_NOEXIST
                } else if before.as_ref().is_some_and(|b| current[..ni.value_size as usize] == conv(b)[..]) {
                    // Untouched by the new programs since the last copy: the old map's news win.
                    BPF_EXIST
                } else {
                    // Both wrote it: the entry created first is the connection's own, not one a
                    // mid-stream packet made up.
                    match (created(&val, &old.value), created(&current, &new_fields)) {
                        (Some(o), Some(n)) if o < n => BPF_EXIST,
                        _ => {
                            snap.insert(key, val);
                            continue;
                        }
                    }
                }
            }
        };
        tally(&mut c, update(to, &nk, &nv, flags))?;
        if diff {
            snap.insert(key, val);
        }
    }
    Ok(c)
}

fn tally(c: &mut Copied, r: io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) => c.copied += 1,
        // Already written by the new programs (second pass), or the new map is full.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        // Settle's overwrite (BPF_EXIST) of an entry the new programs removed after the lookup
        // found it: the connection closed or moved to the assured map meanwhile. Left out, as if
        // the lookup had missed it; an error here would stop the agent mid-upgrade.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)) => c.failed += 1,
        Err(e) => return Err(e),
    }
    Ok(())
}

/// A migration in progress: the new maps are loaded (pinned aside), filled once from the old
/// ones, and wait for the programs to be swapped before [`Migration::finish`].
pub struct Migration {
    dir: PathBuf,
    moves: Vec<Move>,
    /// Per move: the old map as last copied.
    snaps: Vec<Snapshot>,
}

impl Migration {
    pub fn new(dir: &Path, moves: Vec<Move>) -> Self {
        let snaps = moves.iter().map(|_| Snapshot::new()).collect();
        Migration { dir: dir.to_path_buf(), moves, snaps }
    }

    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Where the new map of a move is pinned until it takes the old one's place.
    fn new_pin(&self, m: &Move) -> PathBuf {
        self.dir.join(staging(m.name))
    }

    /// Pins the new maps aside and fills them from the old pins (the old programs serve on).
    pub fn first_pass(&mut self, ebpf: &aya::Ebpf) -> Result<(), crate::error::LoadError> {
        let layouts = layouts();
        let dir = self.dir.clone();
        for (m, snap) in self.moves.iter().zip(self.snaps.iter_mut()) {
            let l = layouts.iter().find(|l| l.name == m.name).expect("a move is of a known map");
            let new_pin = dir.join(staging(m.name));
            let map = ebpf.map(m.name).ok_or(crate::error::LoadError::MissingMap { name: m.name })?;
            let _ = std::fs::remove_file(&new_pin);
            map.pin(&new_pin).map_err(|e| io::Error::other(format!("pinning {}: {e:?}", new_pin.display())))?;
            let (from, to) = (obj_get(&dir.join(&m.from))?, obj_get(&new_pin)?);
            // Recorded at once, under the new map's own id: wherever a start is interrupted
            // from here on, every pinned map has its true layout (or none, while it is staged).
            write_layout(layouts_map(&dir)?.as_fd(), map_info(to.as_fd())?.id, &l.text())?;
            let c = copy(from.as_fd(), &m.old, to.as_fd(), l, Pass::Fill, snap).map_err(|e| io::Error::new(e.kind(), format!("copying {} into {}: {e}", m.from, m.name)))?;
            info!(
                "map {}: {} changed ({}), {} entries copied from {} while the old programs serve{}",
                m.name,
                m.why,
                describe_change(&m.old, l),
                c.copied,
                m.from,
                if c.failed > 0 { format!("; {} did not fit", c.failed) } else { String::new() }
            );
        }
        Ok(())
    }

    /// Right before the swap: copies again everything the old programs wrote since the first
    /// pass (loading and verifying the programs takes a while), so that the new programs start
    /// with all but the last moments' connections; those follow in [`Migration::finish`].
    pub fn catch_up(&mut self) -> io::Result<()> {
        let layouts = layouts();
        let dir = self.dir.clone();
        // Twice: the second round only has what changed during the first. It takes the slow
        // (big) maps first and the quick ones last, so the maps where new connections appear
        // (the small LRU ones) are current to within milliseconds when the programs are swapped.
        let mut order: Vec<usize> = (0..self.moves.len()).collect();
        let mut took = vec![std::time::Duration::ZERO; self.moves.len()];
        for round in 1..=2 {
            for &i in &order {
                let (m, snap) = (&self.moves[i], &mut self.snaps[i]);
                let l = layouts.iter().find(|l| l.name == m.name).expect("known map");
                let (from, to) = (obj_get(&dir.join(&m.from))?, obj_get(&dir.join(staging(m.name)))?);
                let started = std::time::Instant::now();
                let c = copy(from.as_fd(), &m.old, to.as_fd(), l, Pass::Fill, snap)?;
                took[i] = started.elapsed();
                log::debug!("map {}: {} changed entries copied again from {} before the swap (round {round}) in {:?}", m.name, c.copied, m.from, took[i]);
            }
            // Slowest first next time.
            order.sort_by(|a, b| took[*b].cmp(&took[*a]));
        }
        Ok(())
    }

    /// After the programs were swapped: copies what the old programs added since the first
    /// pass, puts the new maps in place of the old pins, and records this build's layouts. Maps
    /// another version recorded and this one does not use are removed (their state lives on in
    /// the maps they were copied into).
    pub fn finish(mut self) -> io::Result<()> {
        let layouts = layouts();
        let mut snaps = std::mem::take(&mut self.snaps);
        // The quick (small, hot) maps first: their news matter within milliseconds.
        let mut order: Vec<usize> = (0..self.moves.len()).collect();
        order.sort_by_key(|i| snaps[*i].len());
        for pass in [Pass::Settle, Pass::Prune] {
            for &i in &order {
                let m = &self.moves[i];
                let l = layouts.iter().find(|l| l.name == m.name).expect("known map");
                if let (Ok(from), Ok(to)) = (obj_get(&self.dir.join(&m.from)), obj_get(&self.new_pin(m))) {
                    let c = copy(from.as_fd(), &m.old, to.as_fd(), l, pass, &mut snaps[i])?;
                    if c.copied > 0 && pass == Pass::Settle {
                        info!("map {}: {} more entries copied from {} (made by the old programs before the swap)", m.name, c.copied, m.from);
                    }
                }
            }
        }
        for m in &self.moves {
            let new_pin = self.new_pin(m);
            let old_pin = self.dir.join(&m.from);
            // A rename replaces a pin of the same name in one step: the name always holds a whole
            // map, the old or the new.
            std::fs::rename(&new_pin, self.dir.join(m.name))?;
            if m.from == m.name {
                info!("map {}: the new map is pinned in place of the old one", m.name);
            } else {
                std::fs::remove_file(&old_pin)?;
                info!("map {}: pinned in place of {}, which is removed", m.name, m.from);
            }
        }
        let ours: Vec<&str> = layouts.iter().map(|l| l.name).collect();
        for name in recorded(&self.dir).into_keys().filter(|n| !ours.contains(&n.as_str())) {
            match std::fs::remove_file(self.dir.join(&name)) {
                Ok(()) => info!("map {name}: pinned by another version of Ferry, not used by this one: removed"),
                Err(e) => warn!("map {name}: {e}"),
            }
        }
        record(&self.dir)
    }
}

/// "value 56 -> 64 bytes: + upgrade_mark; - gone" in words.
fn describe_change(old: &Recorded, l: &MapLayout) -> String {
    let mut parts = Vec::new();
    for (what, os, of, ns, nf) in [("key", old.key_size, &old.key, l.key_size, &l.key), ("value", old.value_size, &old.value, l.value_size, &l.value)] {
        let added: Vec<&str> = nf.iter().filter(|f| !of.iter().any(|(n, _, s)| n == f.name && *s == f.size)).map(|f| f.name).collect();
        let removed: Vec<&str> = of.iter().filter(|(n, _, s)| !nf.iter().any(|f| f.name == n && f.size == *s)).map(|(n, _, _)| n.as_str()).collect();
        if os != ns || !added.is_empty() || !removed.is_empty() {
            let mut p = format!("{what} {os} -> {ns} bytes");
            if !added.is_empty() {
                p += &format!(", new (zero): {}", added.join(" "));
            }
            if !removed.is_empty() {
                p += &format!(", dropped: {}", removed.join(" "));
            }
            parts.push(p);
        }
    }
    if parts.is_empty() { "same fields".into() } else { parts.join("; ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_and_cover_every_pinned_map() {
        for l in layouts() {
            let r = Recorded::parse(&l.text()).unwrap();
            assert_eq!((r.key_size, r.value_size), (l.key_size, l.value_size));
            assert!(l.text().len() < TEXT_LEN, "{}", l.name);
        }
        let named: Vec<&str> = layouts().iter().map(|l| l.name).collect();
        for n in names::ALL.iter().filter(|n| **n != names::POL_EVENTS) {
            assert!(named.contains(n), "{n} has no layout");
        }
    }

    #[test]
    fn an_overwrite_of_an_entry_removed_meanwhile_is_left_out_not_an_error() {
        // The kernel's own answer to BPF_EXIST on a key that is gone, from a real map.
        let mut a = Attr::new().u32(0, MAP_HASH).u32(4, 4).u32(8, 4).u32(12, 4);
        a.0[28..32].copy_from_slice(b"t\0\0\0");
        let fd = match sys_bpf(BPF_MAP_CREATE, a) {
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as i32) },
            // Unit tests run without root too (`cargo xtask test` runs them as root).
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return eprintln!("skipped: BPF_MAP_CREATE needs root"),
            Err(e) => panic!("BPF_MAP_CREATE: {e}"),
        };
        let gone = update(fd.as_fd(), &1u32.to_ne_bytes(), &2u32.to_ne_bytes(), BPF_EXIST);
        assert_eq!(gone.as_ref().map_err(|e| e.raw_os_error()), Err(Some(libc::ENOENT)));
        let mut c = Copied::default();
        tally(&mut c, gone).expect("ENOENT is tolerated");
        tally(&mut c, update(fd.as_fd(), &1u32.to_ne_bytes(), &2u32.to_ne_bytes(), BPF_NOEXIST)).unwrap();
        tally(&mut c, update(fd.as_fd(), &1u32.to_ne_bytes(), &3u32.to_ne_bytes(), BPF_NOEXIST)).unwrap();
        assert_eq!((c.copied, c.failed), (1, 0));
        // Anything else still stops the copy.
        assert!(tally(&mut c, Err(io::Error::from_raw_os_error(libc::EPERM))).is_err());
    }

    #[test]
    fn base_names_span_versions() {
        assert_eq!(base_name("ct4_v2"), "ct4");
        assert_eq!(base_name("ct4_assured_v13"), "ct4_assured");
        assert_eq!(base_name("pol_ct4_v2"), "pol_ct4");
        assert_eq!(base_name("layouts"), "layouts");
        assert_eq!(base_name("x_v"), "x_v");
    }

    #[test]
    fn fields_move_by_name_and_new_ones_are_zero() {
        // Old: a u32 at 0 and a u64 at 8. New: the u64 first, a new u32, the old u32 last.
        let old = Recorded::parse("key=4:value@0+4;value=16:a@0+4,b@8+8").unwrap();
        let new = [
            Field { name: "b", offset: 0, size: 8, align: 8 },
            Field { name: "c", offset: 8, size: 4, align: 4 },
            Field { name: "a", offset: 12, size: 4, align: 4 },
        ];
        let mut v = vec![0u8; 16];
        v[..4].copy_from_slice(&7u32.to_ne_bytes());
        v[8..].copy_from_slice(&9u64.to_ne_bytes());
        let n = convert(&v, &old.value, &new, 16);
        assert_eq!(u64::from_ne_bytes(n[..8].try_into().unwrap()), 9);
        assert_eq!(u32::from_ne_bytes(n[8..12].try_into().unwrap()), 0);
        assert_eq!(u32::from_ne_bytes(n[12..].try_into().unwrap()), 7);
        // A field whose size changed is not carried (its meaning may have too).
        let resized = [Field { name: "a", offset: 0, size: 8, align: 8 }];
        assert_eq!(convert(&v, &old.value, &resized, 8), vec![0u8; 8]);
    }
}
