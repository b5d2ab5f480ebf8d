//! Attaching the programs: tc on every pod-facing interface whose name matches the configured
//! patterns (and on new ones as netlink reports them), the socket hooks on a cgroup. Everything
//! attached here is detached when the [`Attachments`] are dropped (shutdown); the maps stay
//! pinned for the next start.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    programs::{
        tc::{self, SchedClassifierLinkId},
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf,
};
use dataplane_common::progs;
use log::{info, warn};

use crate::error::LoadError;

/// A list of shell-style name patterns (`*` and `?`), such as `veth*,lxc*`.
#[derive(Clone, Debug)]
pub struct IfacePatterns(Vec<String>);

impl IfacePatterns {
    pub fn parse(s: &str) -> Self {
        IfacePatterns(s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect())
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Interfaces of the current network namespace: (name, ifindex).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push((name, (*p).if_index));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in [progs::FROM_POD, progs::TO_POD] {
        let p: &mut SchedClassifier = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
        p.load().map_err(|source| LoadError::Program { name, source })?;
    }
    for name in [progs::SOCK_CONNECT4, progs::SOCK_SENDMSG4, progs::SOCK_RECVMSG4, progs::SOCK_GETPEERNAME4] {
        let p: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
        p.load().map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::programs::Program, LoadError> {
    ebpf.program_mut(name).ok_or(LoadError::Program { name, source: aya::programs::ProgramError::NotLoaded })
}

/// tc attachments by interface, kept so they can be dropped when an interface vanishes.
#[derive(Default)]
pub struct Attachments {
    tc: BTreeMap<String, (u32, SchedClassifierLinkId, SchedClassifierLinkId)>,
}

impl Attachments {
    /// Attaches to every matching interface not yet attached; forgets vanished ones (their links
    /// went with the device). Errors on one interface are logged and do not stop the others.
    pub fn sync_interfaces(&mut self, ebpf: &mut Ebpf, patterns: &IfacePatterns) {
        let present: BTreeMap<String, u32> = interfaces().into_iter().filter(|(n, _)| patterns.matches(n)).collect();
        self.tc.retain(|name, (idx, _, _)| {
            let keep = present.get(name) == Some(idx);
            if !keep {
                info!("interface {name} gone: its attachments went with it");
            }
            keep
        });
        for (name, idx) in present {
            if self.tc.contains_key(&name) {
                continue;
            }
            match attach_tc(ebpf, &name) {
                Ok((i, e)) => {
                    info!("interface {name} (ifindex {idx}): attached {} (ingress) and {} (egress)", progs::FROM_POD, progs::TO_POD);
                    self.tc.insert(name, (idx, i, e));
                }
                Err(e) => warn!("interface {name}: cannot attach: {e} (will retry on the next link event)"),
            }
        }
    }

    pub fn attached(&self) -> Vec<String> {
        self.tc.keys().cloned().collect()
    }

    /// Detaches everything explicitly (also done implicitly when the object is dropped).
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) {
        for (name, (_, i, e)) in std::mem::take(&mut self.tc) {
            for (prog, id) in [(progs::FROM_POD, i), (progs::TO_POD, e)] {
                if let Some(p) = ebpf.program_mut(prog).and_then(|p| <&mut SchedClassifier>::try_from(p).ok()) {
                    if let Err(err) = p.detach(id) {
                        // The interface may be gone already, which detached it.
                        log::debug!("detaching {prog} from {name}: {err}");
                    }
                }
            }
            info!("interface {name}: detached");
        }
    }
}

fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), String> {
    // TCX (kernel 6.6+) needs no qdisc; the netlink fallback needs clsact.
    if KernelVersion::current().map(|v| v < KernelVersion::new(6, 6, 0)).unwrap_or(true) {
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            if !matches!(&e, tc::TcError::IoError(io) if io.kind() == std::io::ErrorKind::AlreadyExists) {
                return Err(format!("adding clsact qdisc: {e}"));
            }
        }
    }
    let mut ids = Vec::new();
    for (prog, dir) in [(progs::FROM_POD, TcAttachType::Ingress), (progs::TO_POD, TcAttachType::Egress)] {
        let p: &mut SchedClassifier = ebpf.program_mut(prog).ok_or("program missing")?.try_into().map_err(|e| format!("{e}"))?;
        match p.attach(iface, dir) {
            Ok(id) => ids.push(id),
            Err(e) => {
                // Undo a half attachment so the retry starts clean.
                if let (Some(first), Some(p0)) = (ids.pop(), ebpf.program_mut(progs::FROM_POD)) {
                    if let Ok(p0) = <&mut SchedClassifier>::try_from(p0) {
                        let _ = p0.detach(first);
                    }
                }
                return Err(format!("{prog}: {e}"));
            }
        }
    }
    let e = ids.pop().unwrap();
    let i = ids.pop().unwrap();
    Ok((i, e))
}

/// Attaches the socket hooks to a cgroup (v2). Processes in that cgroup and below (the host
/// network's processes, when it is the root cgroup) reach Services through them.
pub fn attach_cgroup(ebpf: &mut Ebpf, cgroup: &Path) -> Result<(), LoadError> {
    let f = File::open(cgroup).map_err(|e| std::io::Error::new(e.kind(), format!("cgroup {}: {e}", cgroup.display())))?;
    for name in [progs::SOCK_CONNECT4, progs::SOCK_SENDMSG4, progs::SOCK_RECVMSG4, progs::SOCK_GETPEERNAME4] {
        let p: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
        // bpf_link attachments to a cgroup always coexist with others; BPF_LINK_CREATE rejects the
        // ALLOW_MULTI flag that AllowMultiple would pass, so the default mode is the right one.
        p.attach(&f, CgroupAttachMode::default()).map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(())
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones).
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| std::path::PathBuf::from(f[1]))
    })
}

/// A netlink socket subscribed to link events (RTMGRP_LINK) of the current network namespace.
pub struct LinkEvents(OwnedFd);

impl LinkEvents {
    pub fn open() -> std::io::Result<Self> {
        const RTMGRP_LINK: u32 = 1;
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            sa.nl_groups = RTMGRP_LINK;
            if libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(LinkEvents(fd))
        }
    }

    /// Blocks until at least one link event arrives (the content does not matter: we rescan).
    pub fn wait(&self) -> std::io::Result<()> {
        let mut buf = [0u8; 16384];
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // ENOBUFS: events were lost; a rescan covers them.
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = IfacePatterns::parse("veth*, lxc?x ,eth0");
        assert!(p.matches("veth1234"));
        assert!(p.matches("veth"));
        assert!(p.matches("lxcax"));
        assert!(!p.matches("lxcabx"));
        assert!(p.matches("eth0"));
        assert!(!p.matches("eth1"));
        assert!(!IfacePatterns::parse("").matches("veth0"));
    }
}
