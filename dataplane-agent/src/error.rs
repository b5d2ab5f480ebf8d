//! Typed errors of the agent library. `anyhow` is used only at the binary's edge.
use std::fmt;

/// A Kubernetes object (or one field of it) that cannot be served. Logged with the object's kind,
/// namespace/name and the field, then skipped; everything else still syncs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub message: String,
    /// Not an error in the object: an IPv6 part, valid, that the IPv4 datapath leaves out (a
    /// `trace` run does not fail on it; the agent says it once).
    pub ipv6_only: bool,
}

impl ObjectError {
    pub fn new(kind: &'static str, name: String, field: String, message: impl Into<String>) -> Self {
        ObjectError { kind, name, field, message: message.into(), ipv6_only: false }
    }

    /// A valid IPv6 part of an object, left out by the IPv4 datapath.
    pub fn ipv6(kind: &'static str, name: String, field: String, message: impl Into<String>) -> Self {
        ObjectError { ipv6_only: true, ..Self::new(kind, name, field, message) }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}: {}", self.kind, self.name, self.field, self.message)
    }
}

impl std::error::Error for ObjectError {}

/// Failures of a map operation, naming the map and what was being written.
#[derive(Debug, thiserror::Error)]
pub enum MapOpError {
    #[error("map {map}: {op} {what}: {source}")]
    Syscall { map: &'static str, op: &'static str, what: String, source: aya::maps::MapError },
    #[error("map {map} is full ({capacity} entries): cannot add {what}")]
    Full { map: &'static str, capacity: u32, what: String },
    #[error("map {map}: {what}: {message}")]
    Other { map: &'static str, what: String, message: String },
    #[error("map {map}: out of ids")]
    OutOfIds { map: &'static str },
}

/// Errors loading, pinning and attaching the datapath.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the eBPF object was not built into this binary: run `cargo xtask build-ebpf`, then rebuild the agent")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("pinned map {path}: {what} is {found}, this build expects {expected}; the map layout changed without a new name: remove {path} (connections tracked in it are lost)")]
    PinnedMismatch { path: String, what: &'static str, found: u32, expected: u32 },
    #[error("{path} is not a bpf filesystem: mount it with `mount -t bpf bpf /sys/fs/bpf` (cargo xtask setup does)")]
    NoBpffs { path: String },
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name} missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("pinned map {path} holds the running datapath's state in a layout no Ferry recorded, so this version cannot carry it into {name}: not starting, the running datapath is untouched (run the version that pinned it, or `dataplane-agent run --cleanup` to start afresh, losing what it tracks)")]
    Unmigratable { path: String, name: &'static str },
    #[error("pinned map {path}: its key changed in a way this version cannot carry over field by field ({detail}), so its entries cannot move into {name}: not starting, the running datapath is untouched")]
    KeyChanged { path: String, name: &'static str, detail: String },
    #[error("link {what}: {error}")]
    Attach { what: String, error: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
