//! bpf links by hand: the few `bpf(2)` commands aya does not expose on a link it did not create
//! (a link pinned by an earlier agent): open a pin, read what a link is attached to, give it a new
//! program atomically, detach it.
//!
//! Every Ferry attachment is a bpf link pinned under `<pin-dir>/links/` (TCX on pod and external
//! interfaces, kernel 6.6+; XDP links, 5.9+; cgroup links for the socket hooks, 5.7+). A link
//! lives as long as its pin, not as long as the agent's process: SIGTERM, SIGKILL, a panic or an
//! OOM kill leave every program attached and every map pinned, and the datapath keeps serving
//! from them. The next agent opens the pins and swaps in its own programs with
//! `BPF_LINK_UPDATE`, which replaces the program of a live link in one step: no packet ever
//! meets an interface without a program.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_DETACH: u32 = 34;

pub const LINK_TYPE_CGROUP: u32 = 3;
pub const LINK_TYPE_XDP: u32 = 6;
pub const LINK_TYPE_TCX: u32 = 11;

/// `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS`.
pub const TCX_INGRESS: u32 = 46;
pub const TCX_EGRESS: u32 = 47;
/// `BPF_F_AFTER`: with no relative program, last on the hook.
const BPF_F_AFTER: u32 = 1 << 4;

/// The subdirectory of the pin directory that holds the links.
pub const DIR: &str = "links";

/// What the kernel says of a link (`struct bpf_link_info`, the fields Ferry uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub kind: u32,
    pub id: u32,
    pub prog_id: u32,
    /// TCX and XDP: the interface, 0 once it is gone (the link is then defunct).
    pub ifindex: u32,
    /// TCX and cgroup: `BPF_TCX_INGRESS`, `BPF_CGROUP_INET4_CONNECT`, ...
    pub attach_type: u32,
    /// cgroup: the cgroup's id (its inode number in cgroup v2).
    pub cgroup_id: u64,
}

/// `union bpf_attr`, zeroed, as bytes.
pub(crate) struct Attr(pub(crate) [u8; 128]);

impl Attr {
    pub(crate) fn new() -> Self {
        Attr([0; 128])
    }
    pub(crate) fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub(crate) fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

/// `bpf(2)` on an attr the caller reads back (batch operations write their count into it).
pub(crate) fn sys_bpf_mut(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

pub(crate) fn sys_bpf(cmd: u32, mut attr: Attr) -> io::Result<i64> {
    sys_bpf_mut(cmd, &mut attr)
}

pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: NUL in path", path.display())))
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let fd = sys_bpf(BPF_OBJ_GET, Attr::new().u64(0, p.as_ptr() as u64))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins an object (`BPF_OBJ_PIN`); the parent directory must be on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    sys_bpf(BPF_OBJ_PIN, Attr::new().u64(0, p.as_ptr() as u64).u32(8, fd.as_raw_fd() as u32)).map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union at 16.
    let mut info = [0u8; 64];
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, Attr::new().u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64))?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    let kind = u32_at(0);
    let mut li = LinkInfo { kind, id: u32_at(4), prog_id: u32_at(8), ..Default::default() };
    match kind {
        LINK_TYPE_TCX => {
            li.ifindex = u32_at(16);
            li.attach_type = u32_at(20);
        }
        LINK_TYPE_XDP => li.ifindex = u32_at(16),
        LINK_TYPE_CGROUP => {
            li.cgroup_id = u64::from_ne_bytes(info[16..24].try_into().unwrap());
            li.attach_type = u32_at(24);
        }
        _ => {}
    }
    Ok(li)
}

/// A new TCX link of `prog` on interface `ifindex` (`attach_type`: [`TCX_INGRESS`] or
/// [`TCX_EGRESS`]), after the hook's other programs (`BPF_LINK_CREATE`).
pub fn tcx_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let fd = sys_bpf(BPF_LINK_CREATE, Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, ifindex).u32(8, attach_type).u32(12, BPF_F_AFTER))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_XDP`, and the modes: driver (native), generic (skb).
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// A new XDP link of `prog` on interface `ifindex`: in driver mode, or in generic mode where the
/// driver has none (`BPF_LINK_CREATE`), as aya's `Xdp::attach` with `Driver` then `Skb`.
pub fn xdp_create(prog: BorrowedFd<'_>, ifindex: u32) -> io::Result<OwnedFd> {
    let create = |mode| sys_bpf(BPF_LINK_CREATE, Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, ifindex).u32(8, BPF_XDP).u32(12, mode));
    let fd = create(XDP_FLAGS_DRV_MODE).or_else(|drv| create(XDP_FLAGS_SKB_MODE).map_err(|skb| io::Error::new(skb.kind(), format!("driver mode: {drv}; generic mode: {skb}"))))?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Gives a live link another program, atomically (`BPF_LINK_UPDATE`): packets see the old
/// program or the new one, never none.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    sys_bpf(BPF_LINK_UPDATE, Attr::new().u32(0, link.as_raw_fd() as u32).u32(4, prog.as_raw_fd() as u32)).map(drop)
}

/// Detaches a link now (`BPF_LINK_DETACH`), even while other handles or pins keep it open.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    sys_bpf(BPF_LINK_DETACH, Attr::new().u32(0, link.as_raw_fd() as u32)).map(drop)
}

/// The cgroup v2 id of a cgroup directory: its inode number.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// The names of the loaded programs by id (for reports; Ferry's all start with `ferry_`).
pub fn program_names() -> std::collections::BTreeMap<u32, String> {
    use dataplane_common::progs::*;
    const OURS: [&str; 9] = [FROM_POD, TO_POD, FROM_WORLD, TO_WORLD, SOCK_CONNECT4, SOCK_SENDMSG4, SOCK_RECVMSG4, SOCK_GETPEERNAME4, XDP_NODEPORT];
    aya::programs::loaded_programs()
        .flatten()
        .map(|p| {
            // The kernel keeps 15 characters of a name: Ferry's own are given in full.
            let short = p.name_as_str().unwrap_or("?");
            (p.id(), OURS.iter().find(|n| n.starts_with(short) && short.len() >= 15.min(n.len())).map_or(short, |n| *n).to_string())
        })
        .collect()
}

/// One pinned link as the kernel reports it.
#[derive(Clone, Debug)]
pub struct Pinned {
    /// Its pin name (`<ifindex>-<role>-<hook>`, `cgroup-<hook>`).
    pub pin: String,
    pub info: LinkInfo,
    /// The program it runs.
    pub program: String,
}

impl Pinned {
    /// Still attached to an interface or a cgroup (a TCX or XDP link whose device went away is
    /// defunct: it attaches nothing).
    pub fn live(&self) -> bool {
        self.info.kind == LINK_TYPE_CGROUP || self.info.ifindex != 0
    }
}

/// Every link pinned under `<pin_dir>/links`, by pin name.
pub fn pinned(pin_dir: &Path) -> io::Result<Vec<Pinned>> {
    let names = program_names();
    let mut out = Vec::new();
    for e in std::fs::read_dir(pin_dir.join(DIR))?.flatten() {
        let fd = obj_get(&e.path())?;
        let info = link_info(std::os::fd::AsFd::as_fd(&fd))?;
        out.push(Pinned { pin: e.file_name().to_string_lossy().into_owned(), program: names.get(&info.prog_id).cloned().unwrap_or_else(|| "?".into()), info });
    }
    out.sort_by(|a, b| a.pin.cmp(&b.pin));
    Ok(out)
}
