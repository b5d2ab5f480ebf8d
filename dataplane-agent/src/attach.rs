//! Attaching the programs: tc on every pod-facing interface whose name matches the configured
//! patterns (and on new ones as netlink reports them), the socket hooks on a cgroup. Everything
//! attached here is detached when the [`Attachments`] are dropped (shutdown); the maps stay
//! pinned for the next start.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use aya::{
    programs::{
        tc::{self, SchedClassifierLinkId},
        xdp::{XdpLinkId, XdpMode},
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
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

pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for name in [progs::FROM_POD, progs::TO_POD, progs::FROM_WORLD, progs::TO_WORLD] {
        let p: &mut SchedClassifier = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
        p.load().map_err(|source| LoadError::Program { name, source })?;
    }
    for name in [progs::SOCK_CONNECT4, progs::SOCK_SENDMSG4, progs::SOCK_RECVMSG4, progs::SOCK_GETPEERNAME4] {
        let p: &mut CgroupSockAddr = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
        p.load().map_err(|source| LoadError::Program { name, source })?;
    }
    let name = progs::XDP_NODEPORT;
    let p: &mut Xdp = program(ebpf, name)?.try_into().map_err(|source| LoadError::Program { name, source })?;
    p.load().map_err(|source| LoadError::Program { name, source })?;
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

/// tc (and XDP) attachments by interface, kept so they can be dropped when an interface vanishes.
#[derive(Default)]
pub struct Attachments {
    tc: BTreeMap<String, (u32, Role, Vec<(&'static str, SchedClassifierLinkId)>)>,
    /// `--nodeport-acceleration=xdp`: the XDP NodePort program on external interfaces too.
    pub xdp: bool,
    xdp_links: BTreeMap<String, XdpLinkId>,
}

impl Attachments {
    /// Attaches to every matching interface not yet attached (pod patterns first); forgets
    /// vanished ones (their links went with the device). Errors on one interface are logged and
    /// do not stop the others.
    pub fn sync_interfaces(&mut self, ebpf: &mut Ebpf, pods: &IfacePatterns, external: &IfacePatterns) {
        let present: BTreeMap<String, (u32, Role)> = interfaces()
            .into_iter()
            .filter_map(|(n, i)| {
                let role = if pods.matches(&n) {
                    Role::Pod
                } else if external.matches(&n) {
                    Role::External
                } else {
                    return None;
                };
                Some((n, (i, role)))
            })
            .collect();
        self.tc.retain(|name, (idx, role, _)| {
            let keep = present.get(name) == Some(&(*idx, *role));
            if !keep {
                info!("interface {name} gone or changed: its attachments went with it");
            }
            keep
        });
        self.xdp_links.retain(|name, _| self.tc.contains_key(name));
        for (name, (idx, role)) in present {
            if self.tc.contains_key(&name) {
                continue;
            }
            match attach_tc(ebpf, &name, role) {
                Ok(links) => {
                    let what: Vec<String> = role.programs().iter().map(|(p, d)| format!("{p} ({})", if *d == TcAttachType::Ingress { "ingress" } else { "egress" })).collect();
                    info!("interface {name} (ifindex {idx}): attached {}", what.join(" and "));
                    if role == Role::External && self.xdp {
                        match attach_xdp(ebpf, &name) {
                            Ok(id) => {
                                info!("interface {name}: attached {} (XDP; tc stays as the fallback)", progs::XDP_NODEPORT);
                                self.xdp_links.insert(name.clone(), id);
                            }
                            Err(e) => warn!("interface {name}: cannot attach XDP, NodePorts use the tc path only: {e}"),
                        }
                    }
                    self.tc.insert(name, (idx, role, links));
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
        for (name, id) in std::mem::take(&mut self.xdp_links) {
            if let Some(p) = ebpf.program_mut(progs::XDP_NODEPORT).and_then(|p| <&mut Xdp>::try_from(p).ok()) {
                if let Err(err) = p.detach(id) {
                    log::debug!("detaching XDP from {name}: {err}");
                }
            }
        }
        for (name, (_, _, links)) in std::mem::take(&mut self.tc) {
            for (prog, id) in links {
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

fn attach_tc(ebpf: &mut Ebpf, iface: &str, role: Role) -> Result<Vec<(&'static str, SchedClassifierLinkId)>, String> {
    // TCX (kernel 6.6+) needs no qdisc; the netlink fallback needs clsact.
    if KernelVersion::current().map(|v| v < KernelVersion::new(6, 6, 0)).unwrap_or(true) {
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            if !matches!(&e, tc::TcError::IoError(io) if io.kind() == std::io::ErrorKind::AlreadyExists) {
                return Err(format!("adding clsact qdisc: {e}"));
            }
        }
    }
    let mut links = Vec::new();
    for (prog, dir) in role.programs() {
        let res = ebpf
            .program_mut(prog)
            .ok_or_else(|| format!("program {prog} missing"))
            .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(|e| e.to_string()))
            .and_then(|p| p.attach(iface, *dir).map_err(|e| format!("{prog}: {e}")));
        match res {
            Ok(id) => links.push((*prog, id)),
            Err(e) => {
                // Undo a half attachment so the retry starts clean.
                for (p, id) in links {
                    if let Some(p) = ebpf.program_mut(p).and_then(|p| <&mut SchedClassifier>::try_from(p).ok()) {
                        let _ = p.detach(id);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(links)
}

/// Attaches the XDP NodePort program: in the driver when it supports XDP, else generic.
fn attach_xdp(ebpf: &mut Ebpf, iface: &str) -> Result<XdpLinkId, String> {
    let p: &mut Xdp = ebpf.program_mut(progs::XDP_NODEPORT).ok_or("program missing")?.try_into().map_err(|e| format!("{e}"))?;
    p.attach(iface, XdpMode::Driver).or_else(|_| p.attach(iface, XdpMode::Skb)).map_err(|e| e.to_string())
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
