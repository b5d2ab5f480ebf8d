//! Attaching the programs: tc on every pod-facing interface whose name matches the configured
//! patterns (and on new ones as netlink reports them), XDP on external ones when asked, the
//! socket hooks on a cgroup. Every attachment is a pinned bpf link ([`Attachments`]): it stays
//! when the agent stops or dies, and the next agent swaps its programs in place.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    programs::{CgroupAttachMode, CgroupSockAddr, TcAttachType},
    Ebpf,
};
use dataplane_common::progs;
use log::{error, info, warn};

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

    /// Exact names (no `*` or `?`) that no present interface has: most likely a typo or a
    /// vanished device, worth a warning (patterns may legitimately match nothing yet).
    pub fn missing_names(&self) -> Vec<String> {
        let present: Vec<String> = interfaces().into_iter().map(|(n, _)| n).collect();
        self.0.iter().filter(|p| !p.contains(['*', '?']) && !present.contains(p)).cloned().collect()
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

/// Loads (the kernel verifies) every program, on two threads: verification is most of the
/// agent's start (0.4 s here, the pod programs the longest), and each program's is its own. The
/// two halves take about as long.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    load_needed(ebpf, true, true)
}

/// [`load_programs`] for an agent: the XDP program only with `xdp` (`--nodeport-acceleration
/// xdp`; 39k of the 500k instructions the verifier walks) and the socket hooks only with
/// `sockets` (a cgroup to hook). The halves stay even either way (processed instructions: the
/// pod ingress program 166k, pod egress 122k, external ingress 97k, external egress 80k, XDP
/// 39k, the socket hooks a few thousand).
pub fn load_needed(ebpf: &mut Ebpf, xdp: bool, sockets: bool) -> Result<(), LoadError> {
    const HALVES: [&[&str]; 2] = [
        &[progs::FROM_POD, progs::TO_WORLD, progs::SOCK_CONNECT4, progs::SOCK_SENDMSG4, progs::SOCK_RECVMSG4, progs::SOCK_GETPEERNAME4],
        &[progs::TO_POD, progs::FROM_WORLD, progs::XDP_NODEPORT],
    ];
    let needed = |name: &str| (xdp || name != progs::XDP_NODEPORT) && (sockets || !CGROUP_HOOKS.iter().any(|(_, p)| *p == name));
    let mut halves: [Vec<(&'static str, &mut aya::programs::Program)>; 2] = Default::default();
    for (name, p) in ebpf.programs_mut() {
        if let Some((half, name)) = HALVES.iter().enumerate().find_map(|(i, h)| h.iter().find(|n| **n == name).map(|n| (i, *n))) {
            if needed(name) {
                halves[half].push((name, p));
            }
        }
    }
    let found: Vec<&str> = halves.iter().flatten().map(|(n, _)| *n).collect();
    if let Some(name) = HALVES.iter().copied().flatten().find(|n| needed(n) && !found.contains(n)) {
        return Err(LoadError::Program { name, source: aya::programs::ProgramError::NotLoaded });
    }
    let [first, second] = halves;
    std::thread::scope(|s| {
        let other = s.spawn(|| load_each(first));
        let here = load_each(second);
        other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)).and(here)
    })
}

fn load_each(programs: Vec<(&'static str, &mut aya::programs::Program)>) -> Result<(), LoadError> {
    use aya::programs::Program;
    for (name, p) in programs {
        let loaded = match p {
            Program::SchedClassifier(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            Program::Xdp(p) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        loaded.map_err(|source| LoadError::Program { name, source })?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::programs::Program, LoadError> {
    ebpf.program_mut(name).ok_or(LoadError::Program { name, source: aya::programs::ProgramError::NotLoaded })
}

/// Which programs an interface gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's veth (host side): from-pod on ingress, to-pod on egress.
    Pod,
    /// An interface towards the outside: from-world on ingress, to-world on egress (replies of
    /// the node's own hostNetwork endpoints).
    External,
}

impl Role {
    fn programs(self) -> &'static [(&'static str, TcAttachType)] {
        match self {
            Role::Pod => &[(progs::FROM_POD, TcAttachType::Ingress), (progs::TO_POD, TcAttachType::Egress)],
            Role::External => &[(progs::FROM_WORLD, TcAttachType::Ingress), (progs::TO_WORLD, TcAttachType::Egress)],
        }
    }
}

/// The interfaces holding any of `ips` in the current network namespace.
pub fn interfaces_with(ips: &[std::net::Ipv4Addr]) -> Vec<String> {
    let mut out: Vec<String> = local_addresses().into_iter().filter(|(_, ip)| ips.contains(ip)).map(|(name, _)| name).collect();
    out.sort();
    out.dedup();
    out
}

/// Every IPv4 address of this network namespace, with its interface.
pub fn local_addresses() -> Vec<(String, std::net::Ipv4Addr)> {
    let mut out = Vec::new();
    unsafe {
        let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifa) != 0 {
            return out;
        }
        let mut p = ifa;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                out.push((std::ffi::CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned(), ip));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifa);
    }
    out
}

/// Which hook a pinned link sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Tc(TcAttachType),
    Xdp,
    Cgroup(&'static str),
}

/// A link Ferry wants: its pin name, program and hook, and what it is attached to.
#[derive(Clone, Debug)]
struct Want {
    pin: String,
    prog: &'static str,
    hook: Hook,
    /// The interface (name, ifindex) or the cgroup (path, id).
    target: (String, u64),
}

impl Want {
    fn what(&self) -> String {
        match self.hook {
            Hook::Tc(d) => format!("{} ({})", self.prog, if d == TcAttachType::Ingress { "ingress" } else { "egress" }),
            Hook::Xdp => format!("{} (XDP)", self.prog),
            Hook::Cgroup(_) => self.prog.to_string(),
        }
    }

    /// Whether the pinned link `li` is this one's hook on this one's target (and still live).
    fn matches(&self, li: &crate::links::LinkInfo) -> bool {
        use crate::links::*;
        match self.hook {
            Hook::Tc(d) => li.kind == LINK_TYPE_TCX && li.ifindex as u64 == self.target.1 && li.attach_type == if d == TcAttachType::Ingress { TCX_INGRESS } else { TCX_EGRESS },
            Hook::Xdp => li.kind == LINK_TYPE_XDP && li.ifindex as u64 == self.target.1,
            Hook::Cgroup(_) => li.kind == LINK_TYPE_CGROUP && li.cgroup_id == self.target.1,
        }
    }
}

/// The socket hooks: (pin name suffix, program).
const CGROUP_HOOKS: [(&str, &str); 4] =
    [("connect4", progs::SOCK_CONNECT4), ("sendmsg4", progs::SOCK_SENDMSG4), ("recvmsg4", progs::SOCK_RECVMSG4), ("getpeername4", progs::SOCK_GETPEERNAME4)];

/// Every attachment of the agent, each a bpf link pinned under `<pin-dir>/links/` (see
/// [`crate::links`]): `<ifindex>-<pod|external>-<ingress|egress|xdp>` on interfaces and
/// `cgroup-<hook>` for the socket hooks. The pins outlive the process: nothing here detaches on
/// drop. A starting agent adopts the pins it finds and gives each its own program in place;
/// [`remove_all`] (`run --cleanup`) is what takes Ferry off a node.
pub struct Attachments {
    dir: PathBuf,
    /// `--nodeport-acceleration=xdp`: the XDP NodePort program on external interfaces too.
    pub xdp: bool,
    /// Links that carry this process's programs, by pin name.
    held: BTreeMap<String, OwnedFd>,
    /// Pins wanted but not attached at the last try (retried on link events and every 10 s).
    failed: std::collections::BTreeSet<String>,
    /// The pin directory was removed under the running agent (`run --cleanup`): nothing is
    /// pinned again.
    gone: bool,
    /// Attached interfaces: name -> (ifindex, role).
    ifaces: BTreeMap<String, (u32, Role)>,
}

/// What [`Attachments::adopt_or_attach`] did: a link held now (and how), or a TCX link's program
/// for [`NewLinks::create`].
enum Attached {
    Now(OwnedFd, &'static str),
    Later(OwnedFd),
}

/// Links to create on interfaces (TCX, XDP), each with its program (`Send`: made on a thread
/// while the agent syncs).
pub struct NewLinks {
    dir: PathBuf,
    links: Vec<(Want, OwnedFd)>,
    /// [`Attachments::start_interfaces`]'s wants and interfaces, for [`Attachments::finish`].
    ifaces: Option<(Vec<Want>, BTreeMap<String, (u32, Role)>)>,
}

/// [`NewLinks::create`]'s result, for [`Attachments::finish`].
pub struct Created {
    links: Vec<(Want, Result<OwnedFd, String>)>,
    ifaces: Option<(Vec<Want>, BTreeMap<String, (u32, Role)>)>,
}

impl NewLinks {
    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Creates each link (`BPF_LINK_CREATE`: TCX after the hook's other programs, as aya's
    /// default order; XDP in driver mode, else generic) and pins it. One at a time: they
    /// serialize on the RTNL in the kernel anyway. Every egress program first, then every
    /// ingress one, then XDP: the maps are being written meanwhile, and an interface that
    /// translates what enters must already translate the replies that leave (a pod's connection
    /// to a Service answered from the backend's own address would wait for a SYN retry), and XDP
    /// hands what it does not translate itself to the external ingress program. A link whose pin
    /// fails goes with its fd (it is not left attached unpinned).
    pub fn create(mut self) -> Created {
        let dir = self.dir;
        self.links.sort_by_key(|(w, _)| match w.hook {
            Hook::Tc(TcAttachType::Ingress) => 1,
            Hook::Tc(_) => 0,
            Hook::Xdp | Hook::Cgroup(_) => 2,
        });
        let links = self
            .links
            .into_iter()
            .map(|(w, prog)| {
                let r = (|| {
                    let fd = match w.hook {
                        Hook::Tc(d) => {
                            let at = if d == TcAttachType::Ingress { crate::links::TCX_INGRESS } else { crate::links::TCX_EGRESS };
                            crate::links::tcx_create(prog.as_fd(), w.target.1 as u32, at).map_err(|e| format!("BPF_LINK_CREATE (TCX, kernel 6.6+): {e}"))?
                        }
                        Hook::Xdp => crate::links::xdp_create(prog.as_fd(), w.target.1 as u32).map_err(|e| format!("BPF_LINK_CREATE (XDP, kernel 5.9+): {e}"))?,
                        Hook::Cgroup(_) => return Err(format!("{}: a socket hook is attached in place", w.pin)),
                    };
                    let path = dir.join(&w.pin);
                    let _ = std::fs::remove_file(&path);
                    crate::links::obj_pin(fd.as_fd(), &path).map_err(|e| format!("pinning {}: {e}", path.display()))?;
                    Ok(fd)
                })();
                (w, r)
            })
            .collect();
        Created { links, ifaces: self.ifaces }
    }
}

impl Attachments {
    pub fn new(pin_dir: &Path) -> Self {
        Attachments { dir: pin_dir.join(crate::links::DIR), xdp: false, held: BTreeMap::new(), failed: Default::default(), ifaces: BTreeMap::new(), gone: false }
    }

    /// The pin names under the links directory.
    fn pins(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }

    /// Interfaces with an external link pinned by an earlier agent: external until this agent
    /// knows its node's addresses (before the first API list, or with the API server away).
    fn pinned_external(&self) -> Vec<u32> {
        self.pins().iter().filter_map(|p| p.strip_suffix("-external-ingress").and_then(|i| i.parse().ok())).collect()
    }

    /// Makes every matching interface carry its programs, each through a pinned link: a link
    /// already pinned (by an earlier agent) gets this agent's program in place; a missing one is
    /// attached and pinned; pins nobody wants any more (interfaces gone, patterns changed, XDP
    /// turned off) are detached and removed. `external: None`: the external interfaces are not
    /// known yet; those an earlier agent attached stay external. Errors on one interface are
    /// logged and do not stop the others.
    pub fn sync_interfaces(&mut self, ebpf: &mut Ebpf, pods: &IfacePatterns, external: Option<&IfacePatterns>) {
        let new = self.start_interfaces(ebpf, pods, external);
        self.finish(new.create());
    }

    /// [`Self::sync_interfaces`] up to the links that must be created: links pinned by an
    /// earlier agent already carry this agent's programs when it returns (no earlier program
    /// serves after it), and unwanted pins are gone. Creating a TCX link waits for an RCU grace
    /// period under the RTNL (8 to 16 ms each here: about 200 ms for the 14 links of a fresh
    /// node with six pods and one external interface), idle time a starting agent spends on its
    /// first sync instead: [`NewLinks::create`] runs on a thread, and [`Self::finish`] takes its
    /// result.
    pub fn start_interfaces(&mut self, ebpf: &mut Ebpf, pods: &IfacePatterns, external: Option<&IfacePatterns>) -> NewLinks {
        let keep_external = self.pinned_external();
        let mut wants = Vec::new();
        let mut ifaces = BTreeMap::new();
        for (name, idx) in interfaces() {
            let role = if pods.matches(&name) {
                Role::Pod
            } else if external.map_or(keep_external.contains(&idx), |e| e.matches(&name)) {
                Role::External
            } else {
                continue;
            };
            let r = if role == Role::Pod { "pod" } else { "external" };
            for (prog, dir) in role.programs() {
                let d = if *dir == TcAttachType::Ingress { "ingress" } else { "egress" };
                wants.push(Want { pin: format!("{idx}-{r}-{d}"), prog, hook: Hook::Tc(*dir), target: (name.clone(), idx as u64) });
            }
            if role == Role::External && self.xdp {
                wants.push(Want { pin: format!("{idx}-external-xdp"), prog: progs::XDP_NODEPORT, hook: Hook::Xdp, target: (name.clone(), idx as u64) });
            }
            ifaces.insert(name, (idx, role));
        }
        for (name, (idx, role)) in &self.ifaces {
            if ifaces.get(name) != Some(&(*idx, *role)) {
                info!("interface {name} (ifindex {idx}) gone or changed: its links are removed");
            }
        }
        let (_, mut new) = self.apply_inline(ebpf, &wants, |p| !p.starts_with("cgroup-"));
        new.ifaces = Some((wants, ifaces));
        new
    }

    /// A link carrying this agent's program: logged (an XDP link on a veth with what it needs)
    /// and held.
    fn hold(&mut self, w: &Want, fd: OwnedFd, how: &str) {
        info!("{} {}: attached {} ({how})", if matches!(w.hook, Hook::Cgroup(_)) { "cgroup" } else { "interface" }, describe(w), w.what());
        if matches!(w.hook, Hook::Xdp) && driver(&w.target.0).as_deref() == Some("veth") {
            warn!(
                "interface {}: a veth: its XDP_TX frames (the one-armed NodePort, a remote backend behind the interface the client came in by) go to \
                 the peer's XDP ring, which only an XDP program on the peer drains (GRO on the peer is not enough: the frames stay queued); \
                 without one they are dropped and `ethtool -S {}` counts rx_queue_*_xdp_tx_errors. The peer must also send complete \
                 checksums (`ethtool -K <peer> tx off`), as a wire does: a frame sent back by XDP_TX loses the partial-checksum mark. \
                 Without both, use --nodeport-acceleration none on this node (README, XDP acceleration)",
                describe(w),
                w.target.0
            );
        }
        self.held.insert(w.pin.clone(), fd);
    }

    /// Takes the links [`NewLinks::create`] made: held from now on, logged, and those that
    /// failed retried on the next link event.
    pub fn finish(&mut self, created: Created) {
        for (w, r) in created.links {
            match r {
                Ok(fd) => self.hold(&w, fd, "new link, pinned"),
                Err(e) => {
                    warn!("interface {}: cannot attach {}: {e} (will retry on the next link event)", describe(&w), w.what());
                    self.failed.insert(w.pin);
                }
            }
        }
        if let Some((wants, ifaces)) = created.ifaces {
            self.ifaces = ifaces.into_iter().filter(|(_, (idx, _))| wants.iter().any(|w| w.target.1 == *idx as u64 && self.held.contains_key(&w.pin))).collect();
        }
    }

    /// The socket hooks on `cgroup` (or none), the same way: adopted in place, attached and
    /// pinned when missing, removed when the cgroup changed or the hooks were turned off.
    pub fn sync_cgroup(&mut self, ebpf: &mut Ebpf, cgroup: Option<&Path>) -> Result<(), LoadError> {
        let mut wants = Vec::new();
        if let Some(cg) = cgroup {
            let id = crate::links::cgroup_id(cg).map_err(|e| std::io::Error::new(e.kind(), format!("cgroup {}: {e}", cg.display())))?;
            for (hook, prog) in CGROUP_HOOKS {
                wants.push(Want { pin: format!("cgroup-{hook}"), prog, hook: Hook::Cgroup(hook), target: (cg.display().to_string(), id) });
            }
        }
        let (failed, new) = self.apply_inline(ebpf, &wants, |p| p.starts_with("cgroup-"));
        debug_assert!(new.links.is_empty(), "socket hooks are attached in place");
        drop(new);
        match failed.into_iter().next() {
            Some((name, e)) => Err(LoadError::Attach { what: name, error: e }),
            None => Ok(()),
        }
    }

    /// Brings the pins selected by `mine` to exactly `wants`, but for the links to be created
    /// on interfaces, which it returns; returns the failures.
    fn apply_inline(&mut self, ebpf: &mut Ebpf, wants: &[Want], mine: impl Fn(&str) -> bool) -> (Vec<(String, String)>, NewLinks) {
        let mut failed = Vec::new();
        let mut new = NewLinks { dir: self.dir.clone(), links: Vec::new(), ifaces: None };
        // Once this agent has pinned, its pin directory disappears only when someone removes
        // Ferry (`run --cleanup`, rm -r): nothing is pinned again into a directory being removed.
        // The links left go with this process; /livez turns 503.
        if self.gone || (!self.held.is_empty() && !self.dir.exists()) {
            if !self.gone {
                error!("{}: the pin directory was removed under the running agent (run --cleanup?): nothing is attached or pinned any more", self.dir.display());
                self.gone = true;
            }
            return (failed, new);
        }
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            warn!("{}: {e}", self.dir.display());
        }
        for w in wants {
            if let Some(fd) = self.held.get(&w.pin) {
                // Still on its interface? (A link outlives the device it was attached to.)
                if crate::links::link_info(fd.as_fd()).is_ok_and(|li| w.matches(&li)) {
                    // Its pin removed by hand: pinned again, or the link would go with this process.
                    let path = self.dir.join(&w.pin);
                    if !path.exists() {
                        match crate::links::obj_pin(fd.as_fd(), &path) {
                            Ok(()) => warn!("link {}: its pin had been removed; pinned again", w.pin),
                            Err(e) => warn!("link {}: its pin had been removed and cannot be restored: {e}", w.pin),
                        }
                    }
                    continue;
                }
                self.held.remove(&w.pin);
            }
            match self.adopt_or_attach(ebpf, w) {
                Ok(Attached::Later(prog)) => new.links.push((w.clone(), prog)),
                Ok(Attached::Now(fd, how)) => self.hold(w, fd, how),
                Err(e) => {
                    warn!("{} {}: cannot attach {}: {e} (will retry on the next link event)", if matches!(w.hook, Hook::Cgroup(_)) { "cgroup" } else { "interface" }, describe(w), w.what());
                    failed.push((w.pin.clone(), e));
                }
            }
        }
        self.failed.retain(|p| !mine(p));
        self.failed.extend(failed.iter().map(|(p, _)| p.clone()));
        for pin in self.pins() {
            if mine(&pin) && !wants.iter().any(|w| w.pin == pin) {
                let fd = self.held.remove(&pin);
                let path = self.dir.join(&pin);
                remove_link(&path, fd);
                info!("link {pin}: detached and unpinned (no longer wanted)");
            }
        }
        (failed, new)
    }

    /// The pinned link of `w`, given this process's program in place; or a new one, pinned (on
    /// an interface: its program, to be attached by [`NewLinks::create`]).
    fn adopt_or_attach(&mut self, ebpf: &mut Ebpf, w: &Want) -> Result<Attached, String> {
        let path = self.dir.join(&w.pin);
        let prog = ebpf.program(w.prog).ok_or_else(|| format!("program {} missing", w.prog))?;
        let prog_fd = prog.fd().map_err(|e| e.to_string())?.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        // A pin of the same hook under another role (an interface whose role changed) is
        // renamed rather than detached: its program is swapped in place too.
        let other = match w.hook {
            Hook::Tc(_) | Hook::Xdp => {
                let suffix = w.pin.rsplit('-').next().unwrap_or("");
                let idx = w.pin.split('-').next().unwrap_or("");
                self.pins().into_iter().find(|p| *p != w.pin && p.split('-').next() == Some(idx) && p.ends_with(&format!("-{suffix}")))
            }
            Hook::Cgroup(_) => None,
        };
        for candidate in [Some(w.pin.clone()), other].into_iter().flatten() {
            let cpath = self.dir.join(&candidate);
            let Ok(fd) = crate::links::obj_get(&cpath) else { continue };
            match crate::links::link_info(fd.as_fd()) {
                Ok(li) if w.matches(&li) => {
                    crate::links::link_update(fd.as_fd(), prog_fd.as_fd()).map_err(|e| format!("BPF_LINK_UPDATE of the pinned link {}: {e}", cpath.display()))?;
                    if candidate != w.pin {
                        crate::links::obj_pin(fd.as_fd(), &path).map_err(|e| format!("pinning {}: {e}", path.display()))?;
                        let _ = std::fs::remove_file(&cpath);
                    }
                    return Ok(Attached::Now(fd, "adopted: program replaced in place"));
                }
                // Defunct (its interface went away) or something else: not reusable.
                _ if candidate == w.pin => remove_link(&cpath, Some(fd)),
                _ => {}
            }
        }
        let fd_link: aya::programs::links::FdLink = match w.hook {
            Hook::Tc(_) | Hook::Xdp => return Ok(Attached::Later(prog_fd)),
            Hook::Cgroup(_) => {
                let f = File::open(&w.target.0).map_err(|e| e.to_string())?;
                let p: &mut CgroupSockAddr = ebpf.program_mut(w.prog).ok_or("program missing")?.try_into().map_err(|e: aya::programs::ProgramError| e.to_string())?;
                // bpf_link attachments to a cgroup always coexist with others; BPF_LINK_CREATE
                // rejects the ALLOW_MULTI flag AllowMultiple would pass: the default mode is right.
                let id = p.attach(&f, CgroupAttachMode::default()).map_err(|e| e.to_string())?;
                let link = p.take_link(id).map_err(|e| e.to_string())?;
                link.try_into().map_err(|e: aya::programs::links::LinkError| format!("not a cgroup link: {e}"))?
            }
        };
        let _ = std::fs::remove_file(&path);
        fd_link.pin(&path).map_err(|e| format!("pinning {}: {e}", path.display()))?;
        let fd = crate::links::obj_get(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Attached::Now(fd, "new link, pinned"))
    }

    /// The interfaces attached.
    pub fn attached(&self) -> Vec<String> {
        self.ifaces.keys().cloned().collect()
    }

    /// Links carrying this process's programs.
    pub fn links(&self) -> usize {
        self.held.len()
    }

    /// Whether every held link is still attached to what it was attached to, and pinned, so it
    /// outlives this process (for /livez).
    pub fn live(&self) -> bool {
        self.failed.is_empty() && self.serving()
    }

    /// [`Self::live`] but for XDP links that failed: the external interfaces' tc programs serve
    /// what XDP would have accelerated (another XDP program on the device is a reason of its
    /// own, warned about), so the take-over from kube-proxy does not wait for them.
    pub fn serving(&self) -> bool {
        !self.gone && self.failed.iter().all(|p| p.ends_with("-xdp")) && self.held.iter().all(|(pin, fd)| {
            self.dir.join(pin).exists() && crate::links::link_info(fd.as_fd()).is_ok_and(|li| li.ifindex != 0 || li.kind == crate::links::LINK_TYPE_CGROUP)
        })
    }
}

/// The driver of interface `name` in this network namespace (`ethtool -i`), e.g. `veth`; None when
/// the interface is gone or has no ethtool driver information.
pub fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`: cmd, then driver[32], version, fw_version, bus_info,
    /// erom_version (32 each), reserved2[12] and five u32 counts.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 32 * 4 + 12 + 4 * 5] };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = &mut info as *mut DrvInfo as *mut libc::c_char;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut ifr) } < 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

fn describe(w: &Want) -> String {
    match w.hook {
        Hook::Cgroup(_) => w.target.0.clone(),
        _ => format!("{} (ifindex {})", w.target.0, w.target.1),
    }
}

/// Detaches a pinned link (`BPF_LINK_DETACH`, so no other holder keeps it attached) and removes
/// its pin.
fn remove_link(path: &Path, fd: Option<OwnedFd>) {
    if let Some(fd) = fd.or_else(|| crate::links::obj_get(path).ok()) {
        if let Err(e) = crate::links::link_detach(fd.as_fd()) {
            log::debug!("detaching {}: {e}", path.display());
        }
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("removing {}: {e}", path.display());
        }
    }
}

/// `run --cleanup`: detaches every link pinned under `pin_dir` and removes the pins, links and
/// maps both (the maps are freed once no program uses them). Returns what was removed.
pub fn remove_all(pin_dir: &Path) -> std::io::Result<(Vec<String>, Vec<String>)> {
    let links_dir = pin_dir.join(crate::links::DIR);
    let mut links = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&links_dir) {
        for e in rd.flatten() {
            remove_link(&e.path(), None);
            links.push(e.file_name().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(&links_dir)?;
    }
    let mut maps = Vec::new();
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path())?;
            maps.push(e.file_name().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(pin_dir)?;
    }
    links.sort();
    maps.sort();
    Ok((links, maps))
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

/// What a netlink event was about (a bit set).
pub const EV_LINK: u8 = 1;
/// An IPv4 address or route came or went: the node's own addresses (NetworkPolicy's "host") and
/// the routes to its pods (anti-spoofing) are read again.
pub const EV_ADDR_ROUTE: u8 = 2;

/// A netlink socket subscribed to link, IPv4 address and IPv4 route events (RTMGRP_LINK,
/// RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE) of the current network namespace.
pub struct LinkEvents(OwnedFd);

impl LinkEvents {
    pub fn open() -> std::io::Result<Self> {
        const RTMGRP_LINK: u32 = 1;
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV4_ROUTE: u32 = 0x40;
        crate::netlink::open(libc::NETLINK_ROUTE, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE, None).map(LinkEvents)
    }

    /// Blocks until at least one event arrives; returns what the events were about (`EV_*`; the
    /// content does not matter beyond that: the caller rescans). Lost events (ENOBUFS) count as
    /// every kind.
    pub fn wait(&self) -> std::io::Result<u8> {
        let mut buf = [0u8; 16384];
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(EV_LINK | EV_ADDR_ROUTE);
            }
            return Err(e);
        }
        Ok(event_kinds(&buf[..n as usize]))
    }
}

/// The `EV_*` kinds of the netlink messages in `buf`.
pub fn event_kinds(buf: &[u8]) -> u8 {
    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    crate::netlink::messages(buf)
        .map_while(Result::ok)
        .map(|(ty, _)| match ty {
            RTM_NEWLINK | RTM_DELLINK => EV_LINK,
            RTM_NEWADDR | RTM_DELADDR | RTM_NEWROUTE | RTM_DELROUTE => EV_ADDR_ROUTE,
            _ => 0,
        })
        .fold(0, |k, e| k | e)
}

/// The node's own addresses for NetworkPolicy (its "host" identity): every IPv4 address of its
/// interfaces except loopback, the Service addresses kube-proxy's IPVS mode leaves on
/// `kube-ipvs0`, and anything inside the Service CIDRs (a ClusterIP is never the node).
pub fn host_addresses(addrs: &[(String, std::net::Ipv4Addr)], service_cidrs: &std::collections::BTreeSet<crate::reconcile::Cidr4>) -> Vec<std::net::Ipv4Addr> {
    let mut out: Vec<std::net::Ipv4Addr> = addrs
        .iter()
        .filter(|(dev, ip)| !ip.is_loopback() && dev != "kube-ipvs0" && !service_cidrs.iter().any(|c| c.contains(*ip)))
        .map(|(_, ip)| *ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_nodes_own_addresses_only() {
        let addrs: Vec<(String, std::net::Ipv4Addr)> =
            [("lo", "127.0.0.1"), ("eth0", "192.168.0.2"), ("cni0", "10.244.1.1"), ("kube-ipvs0", "10.96.0.1"), ("kube-ipvs0", "10.96.0.10"), ("dummy0", "10.96.5.5"), ("eth0", "192.168.0.2")]
                .iter()
                .map(|(d, a)| (d.to_string(), a.parse().unwrap()))
                .collect();
        let cidrs = ["10.96.0.0/12".parse().unwrap()].into();
        assert_eq!(host_addresses(&addrs, &cidrs), vec!["10.244.1.1".parse::<std::net::Ipv4Addr>().unwrap(), "192.168.0.2".parse().unwrap()]);
    }

    #[test]
    fn netlink_events_are_told_apart() {
        let msg = |ty: u16| {
            let mut m = vec![0u8; 16];
            m[..4].copy_from_slice(&16u32.to_ne_bytes());
            m[4..6].copy_from_slice(&ty.to_ne_bytes());
            m
        };
        assert_eq!(event_kinds(&msg(16)), EV_LINK);
        assert_eq!(event_kinds(&msg(20)), EV_ADDR_ROUTE);
        assert_eq!(event_kinds(&[msg(21), msg(17)].concat()), EV_LINK | EV_ADDR_ROUTE);
        assert_eq!(event_kinds(&msg(3)), 0);
        assert_eq!(event_kinds(&[1, 2, 3]), 0);
    }

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
