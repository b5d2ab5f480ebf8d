//! Loading the datapath: the object built into this binary, maps pinned by name under the pin
//! directory (re-used across restarts so conntrack and service state survive), programs loaded
//! and handed to the attachers.
use std::path::Path;

use aya::{Ebpf, EbpfLoader};
use dataplane_common::names;

use crate::error::LoadError;

/// The eBPF object, embedded at build time by build.rs (empty when it was not built).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dataplane-ebpf.o"));

pub fn object() -> Result<&'static [u8], LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    Ok(OBJECT)
}

/// Capacities for a private copy (trace, tests): a handful of flows need no half-gigabyte
/// conntrack table, and several copies may be loaded at once.
pub const PRIVATE_CAPACITIES: [(&str, u32); 10] = [
    // 1 048 576 table entries (4 MiB).
    (names::CHASH, 1_048_576 / dataplane_common::CHASH_PER_ELEMENT),
    (names::CONNTRACK, 8_192),
    (names::CONNTRACK_ASSURED, 8_192),
    (names::FRAGMENTS, 1_024),
    (names::SOCK_REV, 1_024),
    (names::AFFINITY, 4_096),
    (names::GONE, 1_024),
    (names::POL_CONNTRACK, 4_096),
    (names::POL_CONNTRACK_ASSURED, 4_096),
    (names::POL_REVOKED, 1_024),
];

/// The conntrack capacities for `--conntrack-capacity N`: N entries for assured connections, half
/// as many (at least 1024) for new and closing ones.
pub fn conntrack_capacities(n: u32) -> [(&'static str, u32); 4] {
    [
        (names::CONNTRACK_ASSURED, n.max(1024)),
        (names::CONNTRACK, (n / 2).max(1024)),
        // The policy conntrack tracks every pod's connections too: the same sizes.
        (names::POL_CONNTRACK_ASSURED, n.max(1024)),
        (names::POL_CONNTRACK, (n / 2).max(1024)),
    ]
}

/// The capacities a start asks for: conntrack (`--conntrack-capacity`) and the table array
/// (`--lb-table-entries`, in entries; the map holds two an element).
pub fn capacities(conntrack: u32, table_entries: u32) -> Vec<(&'static str, u32)> {
    let mut v = conntrack_capacities(conntrack).to_vec();
    v.push((names::CHASH, table_entries.div_ceil(dataplane_common::CHASH_PER_ELEMENT)));
    v
}

/// Where a node's maps live.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ferry";

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Pins under `dir` that this build does not use: maps of an older layout (renamed when their
/// layout changed, such as `ct4_v1` after `ct4_v2` replaced it). They hold memory until removed.
pub fn unused_pins(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !names::ALL.contains(&n.as_str()) && n != crate::links::DIR && n != crate::migrate::LAYOUTS && !n.starts_with("new__")).collect();
    out.sort();
    out
}

/// Loads the object. With `pin_dir`, every map is pinned there by name and an existing pin is
/// re-used (after a layout check); without, all maps are private to this process (trace, tests).
pub fn load(pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    load_with(pin_dir, &[])
}

/// As [`load`], with some maps' capacities overridden (`(name, max_entries)`). A pinned map of
/// another layout or capacity is migrated at once (see [`load_pinned`]).
pub fn load_with(pin_dir: Option<&Path>, max_entries: &[(&'static str, u32)]) -> Result<Ebpf, LoadError> {
    match pin_dir {
        Some(dir) => {
            let (ebpf, migration) = load_pinned(dir, max_entries)?;
            migration.finish()?;
            Ok(ebpf)
        }
        None => {
            let mut loader = EbpfLoader::new();
            for (name, n) in max_entries {
                loader.map_max_entries(name, *n);
            }
            Ok(loader.load(object()?)?)
        }
    }
}

/// Loads the object over the maps pinned in `dir` (created and pinned when missing). A pinned
/// map whose layout or capacity differs from this build's (an upgrade, a rollback, a new
/// `--conntrack-capacity`) is not touched: a new map is created beside it and filled from it
/// while the programs attached to the old one keep serving. The caller swaps the programs, then
/// calls [`crate::migrate::Migration::finish`], which puts the new maps in place.
pub fn load_pinned(dir: &Path, max_entries: &[(&'static str, u32)]) -> Result<(Ebpf, crate::migrate::Migration), LoadError> {
    let obj = object()?;
    let mut loader = EbpfLoader::new();
    for (name, n) in max_entries {
        loader.map_max_entries(name, *n);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(dir) {
        return Err(LoadError::NoBpffs { path: parent.display().to_string() });
    }
    std::fs::create_dir_all(dir)?;
    let moves = crate::migrate::plan(dir, max_entries)?;
    for n in names::ALL {
        if !moves.iter().any(|m| m.name == n) {
            loader.map_pin_path(n, dir.join(n));
        }
    }
    let ebpf = loader.load(obj)?;
    let mut migration = crate::migrate::Migration::new(dir, moves);
    migration.first_pass(&ebpf)?;
    Ok((ebpf, migration))
}

/// The agent's hold on a pin directory (`flock` on the directory): one agent per node at a time,
/// and `run --cleanup` refuses while an agent holds it. Released when the process ends, however
/// it ends.
pub struct PinLock(#[allow(dead_code)] std::fs::File);

impl PinLock {
    fn open(dir: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)
    }

    /// Takes the lock if nobody holds it; `Ok(None)` when another process does (or the
    /// directory was removed and made again while it was being locked: try again).
    pub fn try_acquire(dir: &Path) -> std::io::Result<Option<PinLock>> {
        use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
        let f = Self::open(dir)?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        // Locked what is still at the path (not a directory `run --cleanup` removed meanwhile).
        match std::fs::metadata(dir) {
            Ok(m) if m.ino() == f.metadata()?.ino() => Ok(Some(PinLock(f))),
            _ => Ok(None),
        }
    }

    /// The same lock, held until both this and the share are dropped (a duplicate descriptor of
    /// the same open directory: `flock` belongs to the open file, not to one descriptor).
    pub fn share(&self) -> std::io::Result<PinLock> {
        Ok(PinLock(self.0.try_clone()?))
    }
}
