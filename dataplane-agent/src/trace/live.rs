//! `trace --from IP --to IP:PORT/PROTO`: the same question asked of a running node, answered
//! from its pinned maps with lookups only (nothing is written, no program runs, so no
//! conntrack entry is created). Works while the agent is down.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::maps::lpm_trie::Key as LpmKey;
use dataplane_common::{Lb4SlotKey, SVC_F_ADDR_ONLY};

use crate::{
    bpf::BpfMaps,
    model::{Frontend, L4Addr, Proto},
    reconcile::{l4addr_from_backend, lb4_addr_key, lb4_key},
};

/// Parses `IP:PORT/PROTO` (proto defaults to tcp).
pub fn parse_to(s: &str) -> Result<(SocketAddrV4, Proto), String> {
    let (addr, proto) = match s.split_once('/') {
        Some((a, p)) => (a, Proto::parse_lower(p).ok_or_else(|| format!("--to: {p:?} is not tcp, udp or sctp"))?),
        None => (s, Proto::Tcp),
    };
    Ok((addr.parse().map_err(|_| format!("--to: {addr:?} is not ip:port"))?, proto))
}

/// Answers the question and returns the report to print.
pub fn explain(pin_dir: &Path, from: Ipv4Addr, to: SocketAddrV4, proto: Proto) -> Result<String, String> {
    let maps = BpfMaps::from_pins(pin_dir).map_err(|e| format!("{e} (is the agent's --pin-dir {} right?)", pin_dir.display()))?;
    let fe = L4Addr { addr: *to.ip(), port: to.port(), proto };
    let mut out = String::new();
    match maps.services.get(&lb4_key(&Frontend::internal(fe)), 0) {
        Ok(svc) if svc.flags & SVC_F_ADDR_ONLY == 0 => {
            let mut backends = Vec::new();
            for slot in 0..svc.count as u32 {
                let b = maps
                    .slots
                    .get(&Lb4SlotKey { svc_id: svc.svc_id, slot }, 0)
                    .ok()
                    .and_then(|id| maps.backends.get(&id, 0).ok())
                    .and_then(|b| l4addr_from_backend(&b));
                backends.push(b.map(|b| format!("{}:{}", b.addr, b.port)).unwrap_or_else(|| format!("<slot {slot} missing>")));
            }
            if backends.is_empty() {
                writeln!(out, "{from} -> {fe}: REJECT (service {} has no ready endpoint)", svc.svc_id).unwrap();
            } else {
                writeln!(out, "{from} -> {fe}: translated to one of [{}] (service id {})", backends.join(", "), svc.svc_id).unwrap();
            }
            let now = crate::bpf::conntrack::monotonic_ns();
            let existing: Vec<String> = maps
                .ct
                .rows()
                .into_iter()
                .filter(|r| r.entry.expires_ns > now)
                .map(|r| (r.key, r.entry))
                .filter(|(k, _)| k.saddr_be == u32::from_ne_bytes(from.octets()) && k.daddr_be == u32::from_ne_bytes(to.ip().octets()) && u16::from_be(k.dport_be) == to.port() && k.proto == proto.number())
                .map(|(k, e)| {
                    format!(
                        "  existing connection from port {} -> {}:{} ({})",
                        u16::from_be(k.sport_be),
                        Ipv4Addr::from(e.nat_daddr_be.to_ne_bytes()),
                        u16::from_be(e.nat_dport_be),
                        crate::bpf::conntrack::state_name(&e, k.proto)
                    )
                })
                .collect();
            for l in existing {
                writeln!(out, "{l}").unwrap();
            }
            for b in (0..svc.count as u32).filter_map(|slot| {
                let id = maps.slots.get(&Lb4SlotKey { svc_id: svc.svc_id, slot }, 0).ok()?;
                l4addr_from_backend(&maps.backends.get(&id, 0).ok()?)
            }) {
                policy_lines(&maps, from, SocketAddrV4::new(b.addr, b.port), proto, &mut out);
            }
        }
        _ => {
            let addr_only = maps.services.get(&lb4_addr_key(*to.ip()), 0).is_ok();
            let in_cidr = maps.service_cidrs.get(&LpmKey::new(32, u32::from_ne_bytes(to.ip().octets())), 0).is_ok();
            let verdict = if addr_only {
                "REJECT (a ClusterIP, but its Service does not expose this port/protocol)"
            } else if in_cidr {
                "DROP (inside the service CIDRs, but no Service holds this address)"
            } else {
                "PASS (not a Service address: routed untranslated)"
            };
            writeln!(out, "{from} -> {fe}: {verdict}").unwrap();
            if !addr_only && !in_cidr {
                policy_lines(&maps, from, to, proto, &mut out);
            }
        }
    }
    Ok(out)
}

/// The NetworkPolicy verdicts for `from` reaching `to` (after translation), looked up as the
/// datapath looks them up: egress of `from` and ingress of `to`, where they are pods of this
/// node some policy selects.
fn policy_lines(maps: &BpfMaps, from: Ipv4Addr, to: SocketAddrV4, proto: Proto, out: &mut String) {
    use dataplane_common::{identity, PolRuleKey, DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS, EP_F_INGRESS, RULE_PREFIX_FULL};
    let be = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let name = |ip: Ipv4Addr| maps.pod_names.get(&be(ip), 0).map(|n| format!("{} ({ip})", n.as_str())).unwrap_or_else(|_| ip.to_string());
    let policy = |id: u32| maps.pol_names.get(&id, 0).map(|n| n.as_str().to_string()).unwrap_or_else(|_| format!("policy #{id}"));
    for (dir, ep_ip, peer) in [(DIR_EGRESS, from, *to.ip()), (DIR_INGRESS, *to.ip(), from)] {
        let Ok(ep) = maps.pol_endpoints.get(&be(ep_ip), 0) else { continue };
        let (what, flag, isolating) = if dir == DIR_INGRESS { ("ingress", EP_F_INGRESS, ep.ingress_policy) } else { ("egress", EP_F_EGRESS, ep.egress_policy) };
        let ident = maps.pol_ipcache.get(&LpmKey::new(32, be(peer)), 0).unwrap_or(identity::WORLD);
        let verdict = if ep.flags & flag == 0 {
            format!("allowed: not isolated for {what}")
        } else if dir == DIR_INGRESS && ident == identity::HOST {
            "allowed: from its node".to_string()
        } else {
            let rule = |id: u32| {
                let k = PolRuleKey { ep_id_be: ep.ep_id.to_be(), identity_be: id.to_be(), dir, proto: proto.number(), port_be: to.port().to_be() };
                maps.pol_rules.get(&LpmKey::new(RULE_PREFIX_FULL, k), 0).ok()
            };
            match rule(ident).or_else(|| rule(identity::ANY)) {
                Some(id) => format!("allowed by {}", policy(id)),
                None => format!("DROP (isolated by {}, no rule allows)", policy(isolating)),
            }
        };
        let peer_id = maps.id_names.get(&ident, 0).map(|n| n.as_str().to_string()).unwrap_or_else(|_| format!("identity {ident}"));
        let flow = if dir == DIR_INGRESS { format!("ingress of {} from {from}", name(ep_ip)) } else { format!("egress of {} to {to}", name(ep_ip)) };
        writeln!(out, "  policy: {flow} (peer {peer_id}): {verdict}").unwrap();
    }
}
