//! Raw sockets for attack tests: packets with any source address (IPv4 with `IP_HDRINCL`),
//! whole Ethernet frames (`AF_PACKET`: IPv6, VLAN tags), a TCP connect from a chosen port, and
//! the kernel's own counters of what a namespace received (`/proc/thread-self/net/snmp`). Every
//! call works in the network namespace of the calling thread: run them through [`in_ns`].
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use crate::lab::Netns;

/// Runs `f` on a thread of its own inside `ns` and returns its result.
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _in = ns.enter();
            f()
        })
        .join()
        .expect("thread in a test namespace")
    })
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

/// Sends IPv4 packets exactly as given (Ethernet frames from `packet`'s builders: the first 14
/// bytes are skipped), source address included, routed by their destination.
pub fn send_ip(frames: &[Vec<u8>]) {
    let fd = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW), "raw socket")) };
    let on: libc::c_int = 1;
    unsafe { libc::setsockopt(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_HDRINCL, &on as *const _ as *const libc::c_void, 4) };
    for f in frames {
        let ip = &f[14..];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        let sa = libc::sockaddr_in { sin_family: libc::AF_INET as u16, sin_port: 0, sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst) }, sin_zero: [0; 8] };
        let n = unsafe { libc::sendto(fd.as_raw_fd(), ip.as_ptr() as *const libc::c_void, ip.len(), 0, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_in>() as u32) };
        assert_eq!(n, ip.len() as isize, "sendto {:?}: {}", Ipv4Addr::from(dst), std::io::Error::last_os_error());
    }
}

/// Sends whole Ethernet frames out of interface `ifname` (AF_PACKET).
pub fn send_frames(ifname: &str, frames: &[Vec<u8>]) {
    send_frames_with(ifname, frames, false)
}

/// As [`send_frames`], with only the Ethernet header in the skb's linear part and the IPv4 and L4
/// headers in a page fragment, as some drivers deliver frames: a `PACKET_VNET_HDR` socket, each
/// frame after a virtio-net header with `hdr_len` 14 (the kernel makes the linear part that
/// long). Only for frames of a page or more (smaller ones are made linear whole): the interface
/// and its peer need an MTU above 4 096.
pub fn send_frames_paged(ifname: &str, frames: &[Vec<u8>]) {
    assert!(frames.iter().all(|f| f.len() >= 4096), "frames under a page are sent linear");
    send_frames_with(ifname, frames, true)
}

/// linux/if_packet.h
const PACKET_VNET_HDR: libc::c_int = 15;

fn send_frames_with(ifname: &str, frames: &[Vec<u8>], paged: bool) {
    let fd = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0), "packet socket")) };
    if paged {
        let on: libc::c_int = 1;
        check(unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, &on as *const _ as *const libc::c_void, 4) }, "PACKET_VNET_HDR");
    }
    let name = std::ffi::CString::new(ifname).unwrap();
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0, "no interface {ifname}");
    for f in frames {
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&f[..6]);
        // virtio_net_hdr: flags 0, no GSO, hdr_len 14 (little endian), no checksum offload.
        let mut buf = if paged { vec![0, 0, 14, 0, 0, 0, 0, 0, 0, 0] } else { Vec::new() };
        buf.extend_from_slice(f);
        let n = unsafe { libc::sendto(fd.as_raw_fd(), buf.as_ptr() as *const libc::c_void, buf.len(), 0, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        assert_eq!(n, buf.len() as isize, "send on {ifname}: {}", std::io::Error::last_os_error());
    }
}

/// A TCP connection from `src` (address and port, bound first) to `dst`: whether it was
/// established within `timeout`.
pub fn connect_from(src: SocketAddrV4, dst: SocketAddrV4, timeout: Duration) -> bool {
    let fd = unsafe { OwnedFd::from_raw_fd(check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0), "tcp socket")) };
    let on: libc::c_int = 1;
    unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, &on as *const _ as *const libc::c_void, 4) };
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    let s = sa(src);
    check(unsafe { libc::bind(fd.as_raw_fd(), &s as *const _ as *const libc::sockaddr, len) }, "bind");
    let d = sa(dst);
    unsafe { libc::connect(fd.as_raw_fd(), &d as *const _ as *const libc::sockaddr, len) };
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    if unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) } <= 0 {
        return false;
    }
    let mut err: libc::c_int = 0;
    let mut l = 4u32;
    unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut l) };
    err == 0
}

/// A counter of the calling thread's network namespace, by its `/proc/net/snmp` name
/// (`Ip:InReceives`, `Udp:InDatagrams`, `Icmp:InDestUnreachs`) or `/proc/net/snmp6` name
/// (`Udp6InDatagrams`).
pub fn snmp(name: &str) -> u64 {
    if let Some((group, field)) = name.split_once(':') {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
        let (head, vals) = (lines.next().expect("snmp header"), lines.next().expect("snmp values"));
        let i = head.split_whitespace().position(|h| h == field).unwrap_or_else(|| panic!("no {name} in snmp"));
        vals.split_whitespace().nth(i).unwrap().parse().unwrap()
    } else {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp6").expect("snmp6");
        text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse().unwrap())).unwrap_or_else(|| panic!("no {name} in snmp6"))
    }
}

/// A MAC address as `ip link` prints it.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|b| u8::from_str_radix(b, 16).expect("mac")).collect();
    v.try_into().expect("6 bytes")
}

/// The MAC address of interface `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let out = ns.cmd(&["ip", "-br", "link", "show", "dev", dev]).output().expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_mac(text.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC for {dev} in {}: {text}", ns.name)))
}
