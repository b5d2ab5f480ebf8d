//! The node's IPv4 unicast routes of the main table (one netlink dump), and the interface each
//! address is routed through: how the agent finds the interface of each pod of the node (a
//! routed CNI gives every pod a route over its own interface) for anti-spoofing.
use std::{io, net::Ipv4Addr};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;

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
        use crate::netlink::{self, NLM_F_DUMP, NLM_F_REQUEST};
        let fd = netlink::open(libc::NETLINK_ROUTE, 0, Some(std::time::Duration::from_secs(2)))?;
        // rtmsg: the family, the rest zero.
        let mut rtmsg = [0u8; 12];
        rtmsg[0] = libc::AF_INET as u8;
        netlink::send(&fd, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, &rtmsg)?;
        let mut out = Vec::new();
        let err = netlink::recv_all(&fd, |kind, body| {
            if kind == RTM_NEWROUTE {
                out.extend(parse_route(body));
            }
        })?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(-err));
        }
        Ok(Routes(out))
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
