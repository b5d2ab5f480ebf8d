//! `dataplane-agent monitor`: NetworkPolicy verdicts as they happen, from the datapath's ring
//! buffer (one event per new connection into or out of a pod some policy selects), with pod,
//! identity and policy names read from the pinned maps.
use std::{net::Ipv4Addr, os::fd::AsRawFd, path::Path, time::Duration};

use aya::maps::{Map, MapData, RingBuf};
use dataplane_common::{names, PolicyEvent, DIR_INGRESS, EV_FROM_NODE, EV_NOT_ISOLATED, VERDICT_ALLOW};

use crate::{bpf::BpfMaps, error::LoadError, observe::proto_name};

/// An event from the ring's bytes.
pub fn parse_event(bytes: &[u8]) -> Option<PolicyEvent> {
    (bytes.len() >= std::mem::size_of::<PolicyEvent>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const PolicyEvent) })
}

fn dir_name(d: u8) -> &'static str {
    if d == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

/// The verdict in words: `ingress allowed by shop/allow-web`, `egress denied (isolated by
/// shop/deny-all, no rule allows)`, `ingress allowed: from its node`.
pub fn describe_verdict(ev: &PolicyEvent, policy: impl Fn(u32) -> Option<String>) -> String {
    let name = |id| policy(id).unwrap_or_else(|| format!("policy #{id}"));
    let dir = dir_name(ev.dir);
    match (ev.verdict == VERDICT_ALLOW, ev.reason) {
        (true, EV_FROM_NODE) => format!("{dir} allowed: from its node"),
        (true, EV_NOT_ISOLATED) => format!("{dir} allowed: not isolated for {dir}"),
        (true, _) => format!("{dir} allowed by {}", name(ev.policy_id)),
        (false, _) => format!("{dir} denied (isolated by {}, no rule allows)", name(ev.policy_id)),
    }
}

/// The wall-clock time of an event stamped `ts_ns` (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`), given
/// both clocks now: a monitor started late prints when the packet passed, not when it read it.
pub fn event_time(ts_ns: u64, mono_now_ns: u64, wall_now: std::time::SystemTime) -> std::time::SystemTime {
    wall_now.checked_sub(Duration::from_nanos(mono_now_ns.saturating_sub(ts_ns))).unwrap_or(wall_now)
}

/// One monitor line: when, verdict, direction, protocol, source and destination (pod names where
/// known), the deciding policy.
pub fn format_event(ev: &PolicyEvent, maps: &BpfMaps) -> String {
    let who = |ip_be: u32, port_be: u16| {
        let ip = Ipv4Addr::from(ip_be.to_ne_bytes());
        let port = u16::from_be(port_be);
        match maps.pod_names.get(&ip_be, 0) {
            Ok(n) => format!("{} ({ip}:{port})", n.as_str()),
            Err(_) => format!("{ip}:{port}"),
        }
    };
    let peer = maps.id_names.get(&ev.identity, 0).map(|n| n.as_str().to_string()).unwrap_or_else(|_| format!("identity {}", ev.identity));
    format!(
        "{} {:<5} {:<7} {:<4} {} -> {}  peer {peer}: {}",
        crate::observe::rfc3339(event_time(ev.ts_ns, crate::bpf::conntrack::monotonic_ns(), std::time::SystemTime::now())),
        if ev.verdict == VERDICT_ALLOW { "ALLOW" } else { "DENY" },
        dir_name(ev.dir),
        proto_name(ev.proto),
        who(ev.saddr_be, ev.sport_be),
        who(ev.daddr_be, ev.dport_be),
        describe_verdict(ev, |id| maps.pol_names.get(&id, 0).ok().map(|n| n.as_str().to_string())),
    )
}

/// Streams events from the node's pinned ring buffer to `out` until `count` events (None:
/// forever) or the output closes. `denied_only` keeps only drops.
pub fn run(pin_dir: &Path, count: Option<usize>, denied_only: bool, out: &mut dyn std::io::Write) -> Result<(), LoadError> {
    let maps = BpfMaps::from_pins(pin_dir)?;
    let data = MapData::from_pin(pin_dir.join(names::POL_EVENTS)).map_err(|source| LoadError::Map { name: names::POL_EVENTS, source })?;
    let mut ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|source| LoadError::Map { name: names::POL_EVENTS, source })?;
    let fd = ring.as_raw_fd();
    let mut seen = 0;
    loop {
        while let Some(item) = ring.next() {
            let Some(ev) = parse_event(&item) else { continue };
            if denied_only && ev.verdict == VERDICT_ALLOW {
                continue;
            }
            if writeln!(out, "{}", format_event(&ev, &maps)).and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut pfd, 1, Duration::from_millis(200).as_millis() as i32) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_dated_when_it_happened_not_when_it_is_read() {
        let wall = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // Stamped 90 s before the monitor read it.
        assert_eq!(event_time(10_000_000_000, 100_000_000_000, wall), wall - Duration::from_secs(90));
        // A stamp "after" now (clock read races) is now.
        assert_eq!(event_time(200, 100, wall), wall);
    }
}
