//! The node's IPv4 unicast routes of the main table (one netlink dump), and the interface each
//! address is routed through: how the agent finds the interface of each pod of the node (a
//! routed CNI gives every pod a route over its own interface) for anti-spoofing.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
/// Bounds of one dump: receive calls, and messages in all.
const MAX_RECVS: usize = 100_000;
const MAX_MESSAGES: usize = 10_000_000;

/// A route: destination network (host order), prefix length, output interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: u32,
    pub prefix: u8,
    pub oif: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Routes(pub Vec<Route>);

impl Routes {
    /// Dumps the main table's unicast IPv4 routes of the current network namespace.
    pub fn read() -> io::Result<Routes> {
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // nlmsghdr (16) + rtmsg (12).
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&28u32.to_ne_bytes());
        req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        req[16] = libc::AF_INET as u8;
        if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr() as *const _, req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut messages = 0;
        for _ in 0..MAX_RECVS {
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut msgs = &buf[..n as usize];
            while msgs.len() >= 16 {
                messages += 1;
                if messages > MAX_MESSAGES {
                    return Err(io::Error::other("route dump: too many messages"));
                }
                let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
                if len < 16 || len > msgs.len() {
                    return Err(io::Error::other("route dump: truncated message"));
                }
                match kind {
                    NLMSG_DONE => return Ok(Routes(out)),
                    NLMSG_ERROR => {
                        let errno = msgs.get(16..20).map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default())).unwrap_or(0);
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    RTM_NEWROUTE => {
                        if let Some(r) = parse_route(&msgs[16..len]) {
                            out.push(r);
                        }
                    }
                    _ => {}
                }
                msgs = &msgs[((len + 3) & !3).min(msgs.len())..];
            }
        }
        Err(io::Error::other("route dump: no end"))
    }

    /// The interface the most specific route to `ip` leaves by.
    pub fn oif(&self, ip: Ipv4Addr) -> Option<u32> {
        let a = u32::from(ip);
        self.0
            .iter()
            .filter(|r| {
                let mask = if r.prefix == 0 { 0 } else { u32::MAX << (32 - r.prefix as u32) };
                a & mask == r.dst & mask
            })
            .max_by_key(|r| r.prefix)
            .map(|r| r.oif)
    }
}

/// One RTM_NEWROUTE body (rtmsg and attributes): a main-table unicast route with an output
/// interface, or None.
fn parse_route(body: &[u8]) -> Option<Route> {
    if body.len() < 12 || body[0] != libc::AF_INET as u8 || body[7] != RTN_UNICAST {
        return None;
    }
    let prefix = body[1];
    let mut table = body[4] as u32;
    let (mut dst, mut oif) = (0u32, None);
    let mut attrs = &body[12..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let v = &attrs[4..len];
        match (kind, v.len()) {
            (RTA_DST, 4) => dst = u32::from_be_bytes(v.try_into().ok()?),
            (RTA_OIF, 4) => oif = Some(u32::from_ne_bytes(v.try_into().ok()?)),
            (RTA_TABLE, 4) => table = u32::from_ne_bytes(v.try_into().ok()?),
            _ => {}
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    if table != RT_TABLE_MAIN || prefix > 32 {
        return None;
    }
    Some(Route { dst, prefix, oif: oif? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_route_wins() {
        let r = Routes(vec![
            Route { dst: 0, prefix: 0, oif: 2 },
            Route { dst: u32::from(Ipv4Addr::new(10, 201, 1, 0)), prefix: 24, oif: 3 },
            Route { dst: u32::from(Ipv4Addr::new(10, 201, 1, 11)), prefix: 32, oif: 7 },
        ]);
        assert_eq!(r.oif(Ipv4Addr::new(10, 201, 1, 11)), Some(7));
        assert_eq!(r.oif(Ipv4Addr::new(10, 201, 1, 12)), Some(3));
        assert_eq!(r.oif(Ipv4Addr::new(8, 8, 8, 8)), Some(2));
        assert_eq!(Routes::default().oif(Ipv4Addr::new(8, 8, 8, 8)), None);
    }

    #[test]
    fn this_namespace_has_a_readable_table() {
        // Whatever the machine's routes, the dump must parse and end.
        Routes::read().expect("route dump");
    }
}
