//! Host sockets that the socket hooks translated to a backend that has since gone.
//!
//! The hooks translate a host process's socket once, at `connect()`: a connected UDP socket would
//! keep talking to a removed endpoint for as long as it lives (a pod's flows move at once, on the
//! packet path). Like Cilium (which uses `bpf_sock_destroy`, kernel 6.5+, from an iterator), Ferry
//! destroys such sockets, here with `SOCK_DESTROY` over sock_diag netlink (the kernel's
//! `CONFIG_INET_DIAG_DESTROY`, which `ss -K` uses too): the application sees `ECONNABORTED` on its
//! next call and reconnects, reaching a live backend through the hooks again. Only UDP, and only
//! sockets whose cookie the hooks recorded for that backend of that Service: TCP connections keep
//! their backend until they end, as with kube-proxy, and nothing Ferry did not translate is touched.
use std::{
    collections::BTreeSet,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::netlink::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// A connected UDP socket's state in sock_diag (TCP_ESTABLISHED).
const UDP_CONNECTED: u8 = 1;

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Req {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`, the part read here.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

/// A connected UDP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSock {
    pub cookie: u64,
    pub local: (Ipv4Addr, u16),
    pub peer: (Ipv4Addr, u16),
    id: [u8; std::mem::size_of::<SockId>()],
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: plain #[repr(C)] integers.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn open() -> io::Result<OwnedFd> {
    // Never block forever on the kernel's answer.
    netlink::open(NETLINK_SOCK_DIAG, 0, Some(std::time::Duration::from_secs(2)))
}

fn send(fd: &OwnedFd, kind: u16, flags: u16, req: &Req) -> io::Result<()> {
    netlink::send(fd, kind, flags, as_bytes(req))
}

/// Every connected UDP socket of this network namespace.
pub fn connected_udp() -> io::Result<Vec<UdpSock>> {
    let fd = open()?;
    let req = Req { family: libc::AF_INET as u8, protocol: libc::IPPROTO_UDP as u8, states: 1 << UDP_CONNECTED, ..Default::default() };
    send(&fd, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    let mut out = Vec::new();
    let err = netlink::recv_all(&fd, |_, p| {
        if p.len() < std::mem::size_of::<Msg>() {
            return;
        }
        // SAFETY: length checked; read unaligned.
        let m: Msg = unsafe { std::ptr::read_unaligned(p.as_ptr() as *const Msg) };
        if m.state != UDP_CONNECTED {
            return;
        }
        let addr = |a: u32| Ipv4Addr::from(u32::from_be(a));
        let mut id = [0u8; std::mem::size_of::<SockId>()];
        id.copy_from_slice(as_bytes(&m.id));
        out.push(UdpSock {
            cookie: m.id.cookie[0] as u64 | (m.id.cookie[1] as u64) << 32,
            local: (addr(m.id.src[0]), u16::from_be(m.id.sport_be)),
            peer: (addr(m.id.dst[0]), u16::from_be(m.id.dport_be)),
            id,
        });
    })?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(-err));
    }
    Ok(out)
}

/// Destroys one socket (its application sees ECONNABORTED).
pub fn destroy(s: &UdpSock) -> io::Result<()> {
    let fd = open()?;
    // SAFETY: `id` holds a SockId's bytes.
    let id: SockId = unsafe { std::ptr::read_unaligned(s.id.as_ptr() as *const SockId) };
    let req = Req { family: libc::AF_INET as u8, protocol: libc::IPPROTO_UDP as u8, states: u32::MAX, id, ..Default::default() };
    send(&fd, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
    match netlink::recv_all(&fd, |_, _| {})? {
        0 => Ok(()),
        // Gone meanwhile.
        e if -e == libc::ENOENT => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// Destroys the connected UDP sockets the hooks translated from a Service to a backend that left
/// it: `gone` holds (Service address and port, backend address and port); `translated(cookie,
/// backend)` gives the Service address a socket was translated from, if the hooks recorded it.
/// Returns how many went, and the errors (each naming the socket).
pub fn destroy_translated(
    gone: &BTreeSet<((Ipv4Addr, u16), (Ipv4Addr, u16))>,
    translated: impl Fn(u64, (Ipv4Addr, u16)) -> Option<(Ipv4Addr, u16)>,
) -> (usize, Vec<String>) {
    if gone.is_empty() {
        return (0, Vec::new());
    }
    let socks = match connected_udp() {
        Ok(s) => s,
        Err(e) => return (0, vec![format!("listing UDP sockets (sock_diag): {e}")]),
    };
    let (mut n, mut errors) = (0, Vec::new());
    for s in socks {
        let Some(svc) = translated(s.cookie, s.peer) else { continue };
        if !gone.contains(&(svc, s.peer)) {
            continue;
        }
        match destroy(&s) {
            Ok(()) => n += 1,
            Err(e) => errors.push(format!(
                "destroying UDP socket {}:{} -> {}:{} (translated from {}:{}; needs CONFIG_INET_DIAG_DESTROY): {e}",
                s.local.0, s.local.1, s.peer.0, s.peer.1, svc.0, svc.1
            )),
        }
    }
    (n, errors)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, kernel 5.14+).
pub fn own_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: i32 = 71;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as u32;
    if unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie as *mut u64 as *mut libc::c_void, &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kernels() {
        assert_eq!(std::mem::size_of::<SockId>(), 48);
        assert_eq!(std::mem::size_of::<Req>(), 56);
    }
}
