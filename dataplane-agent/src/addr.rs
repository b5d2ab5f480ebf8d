//! Addresses as kube-proxy reads them: `ParseIPSloppy` and `ParseCIDRSloppy` (IPv4 octets with
//! leading zeros, as legacy objects the API server accepted before 1.33 hold them, read as
//! decimal), and each address sorted into its family, so that the IPv4 datapath can leave IPv6
//! ones aside instead of calling them errors.
use std::net::{IpAddr, Ipv4Addr};

use crate::reconcile::Cidr4;

/// An address or CIDR of one family. The datapath is IPv4; an IPv6 entry is skipped (and
/// counted), never an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family<T> {
    V4(T),
    V6,
}

/// An IP address as Go's `netutils.ParseIPSloppy` reads it: the usual forms, plus IPv4 octets
/// with leading zeros (`010.001.002.003` is 10.1.2.3, decimal, never octal). An IPv4-mapped
/// IPv6 address (`::ffff:10.1.2.3`) is IPv4, as Go's `To4` says.
pub fn parse_ip(s: &str) -> Result<Family<Ipv4Addr>, String> {
    let bad = || format!("{s:?} is not an IP address");
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(Family::V4(a)),
        Ok(IpAddr::V6(a)) => Ok(a.to_ipv4_mapped().map(Family::V4).unwrap_or(Family::V6)),
        Err(_) => sloppy_v4(s).map(Family::V4).ok_or_else(bad),
    }
}

/// Dotted-quad IPv4 with leading zeros allowed, any number of them (each octet decimal, at most
/// 255), as Go's pre-1.17 parser read it.
fn sloppy_v4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let p = parts.next()?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = p.trim_start_matches('0').parse::<u16>().or_else(|e| if p.bytes().all(|b| b == b'0') { Ok(0) } else { Err(e) }).ok().filter(|v| *v <= 255)? as u8;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// A CIDR as Go's `netutils.ParseCIDRSloppy` reads it (see [`parse_ip`]); host bits cleared.
pub fn parse_cidr(s: &str) -> Result<Family<Cidr4>, String> {
    let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
    match parse_ip(a).map_err(|_| format!("{s:?}: {a:?} is not an IP address"))? {
        Family::V6 => {
            p.parse::<u8>().ok().filter(|p| *p <= 128).ok_or_else(|| format!("{s:?}: prefix must be 0-128"))?;
            Ok(Family::V6)
        }
        Family::V4(addr) => {
            // An IPv4-mapped IPv6 CIDR counts its prefix over 128 bits.
            let prefix: u8 = p.parse().ok().filter(|p| *p <= 128).ok_or_else(|| format!("{s:?}: prefix must be 0-32"))?;
            let prefix = if a.contains(':') { prefix.checked_sub(96).ok_or_else(|| format!("{s:?}: prefix must be 96-128"))? } else { prefix };
            if prefix > 32 {
                return Err(format!("{s:?}: prefix must be 0-32"));
            }
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            Ok(Family::V4(Cidr4 { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_addresses_read_as_kube_proxy_reads_them() {
        let v4 = |s: &str| match parse_ip(s) {
            Ok(Family::V4(a)) => a.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(v4("10.1.2.3"), "10.1.2.3");
        assert_eq!(v4("010.001.002.003"), "10.1.2.3", "leading zeros are decimal, not octal");
        assert_eq!(v4("172.030.000.041"), "172.30.0.41");
        assert_eq!(v4("0010.00000.0.0001"), "10.0.0.1", "any number of leading zeros");
        assert_eq!(v4("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(parse_ip("fd00::1"), Ok(Family::V6));
        for bad in ["256.1.1.1", "1.2.3", "1.2.3.4.5", "0x0a.1.1.1", "1.2.3.0400", "", "a.b.c.d", "1..2.3"] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cidr("010.000.000.000/8"), Ok(Family::V4("10.0.0.0/8".parse().unwrap())));
        assert_eq!(parse_cidr("10.1.2.3/16"), Ok(Family::V4("10.1.0.0/16".parse().unwrap())));
        assert_eq!(parse_cidr("fd00:10::/64"), Ok(Family::V6));
        assert_eq!(parse_cidr("::ffff:10.0.0.0/104"), Ok(Family::V4("10.0.0.0/8".parse().unwrap())));
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "x/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
