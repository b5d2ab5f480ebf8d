//! `dataplane-agent inspect services|backends|conntrack`: tables read from a node's pinned maps,
//! with the Service names the agent stored beside them. Read-only, and needs no running agent.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use dataplane_common::{
    Lb4SlotKey, BE_F_LOCAL, CT_F_CLASH, CT_F_EXTERNAL, CT_F_HAIRPIN, CT_F_SNAT, SCOPE_EXTERNAL, SVC_F_ADDR_ONLY, SVC_F_DROP_EMPTY,
    SVC_F_RANDOM, SVC_F_SOURCE_RANGES,
};

use crate::{
    bpf::{
        conntrack::{monotonic_ns, state_name},
        BpfMaps,
    },
    error::LoadError,
    observe::proto_name,
};

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn addr(be: u32, port_be: u16) -> String {
    format!("{}:{}", ip(be), u16::from_be(port_be))
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{:<w$}  ", c, w = width[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in rows {
        line(&mut out, r.iter().map(|s| s.as_str()).collect());
    }
    out
}

fn name_of(maps: &BpfMaps, svc_id: u32) -> String {
    maps.service_name(svc_id).unwrap_or_else(|| format!("<frontend {svc_id}>"))
}

/// Frontends by svc_id: (name, "ip:port/proto", scope).
fn frontends(maps: &BpfMaps) -> BTreeMap<u32, (String, String, &'static str)> {
    let mut m = BTreeMap::new();
    for (k, s) in maps.services.iter().flatten() {
        if s.flags & SVC_F_ADDR_ONLY == 0 {
            let fe = format!("{}/{}", addr(k.addr_be, k.port_be), proto_name(k.proto));
            m.insert(s.svc_id, (name_of(maps, s.svc_id), fe, if k.scope == SCOPE_EXTERNAL { "external" } else { "internal" }));
        }
    }
    m
}

pub fn services(pin_dir: &Path) -> Result<String, LoadError> {
    let maps = BpfMaps::from_pins(pin_dir)?;
    let mut rows = Vec::new();
    for (k, s) in maps.services.iter().flatten() {
        if s.flags & SVC_F_ADDR_ONLY != 0 {
            continue;
        }
        let mut flags = Vec::new();
        for (bit, what) in [(SVC_F_DROP_EMPTY, "drop-if-empty"), (SVC_F_SOURCE_RANGES, "source-ranges"), (SVC_F_RANDOM, "random"), (dataplane_common::SVC_F_MASQ, "masquerade")] {
            if s.flags & bit != 0 {
                flags.push(what.to_string());
            }
        }
        if s.affinity_timeout_s != 0 {
            flags.push(format!("affinity={}s", s.affinity_timeout_s));
        }
        let c = maps.service_counters(s.svc_id);
        rows.push(vec![
            name_of(&maps, s.svc_id),
            format!("{}/{}", addr(k.addr_be, k.port_be), proto_name(k.proto)),
            if k.scope == SCOPE_EXTERNAL { "external" } else { "internal" }.to_string(),
            s.count.to_string(),
            if flags.is_empty() { "-".into() } else { flags.join(",") },
            c.packets.to_string(),
            c.bytes.to_string(),
        ]);
    }
    rows.sort();
    Ok(table(&["SERVICE", "FRONTEND", "SCOPE", "BACKENDS", "FLAGS", "PACKETS", "BYTES"], &rows))
}

pub fn backends(pin_dir: &Path) -> Result<String, LoadError> {
    let maps = BpfMaps::from_pins(pin_dir)?;
    // Connections per (frontend, backend), from the forward conntrack entries.
    let mut conns: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let now = monotonic_ns();
    for r in maps.ct.rows() {
        if !r.is_reply() && r.entry.expires_ns > now {
            *conns.entry((r.entry.svc_id, r.entry.backend_id)).or_default() += 1;
        }
    }
    let slots: BTreeMap<Lb4SlotKey, u32> = maps.slots.iter().flatten().collect();
    let fes = frontends(&maps);
    let mut rows = Vec::new();
    for (key, id) in &slots {
        let Some((name, fe, scope)) = fes.get(&key.svc_id) else { continue };
        let (be, local) = match maps.backends.get(id, 0) {
            Ok(b) => (addr(b.addr_be, b.port_be), if b.flags & BE_F_LOCAL != 0 { "yes" } else { "no" }),
            Err(_) => (format!("<missing backend {id}>"), "?"),
        };
        rows.push(vec![name.clone(), fe.clone(), scope.to_string(), key.slot.to_string(), be, local.to_string(), conns.get(&(key.svc_id, *id)).copied().unwrap_or(0).to_string()]);
    }
    rows.sort();
    Ok(table(&["SERVICE", "FRONTEND", "SCOPE", "SLOT", "BACKEND", "LOCAL", "CONNECTIONS"], &rows))
}


fn secs(ns: u64) -> String {
    format!("{}s", ns / 1_000_000_000)
}

/// One row per connection (its forward entry; the reply entry is implied): its state, the map
/// holding it (`assured` or `new`, the LRU one), age, idle time and time left.
pub fn conntrack(pin_dir: &Path) -> Result<String, LoadError> {
    let maps = BpfMaps::from_pins(pin_dir)?;
    let now = monotonic_ns();
    let entries = maps.ct.rows();
    let mut rows = Vec::new();
    let mut expired = 0;
    for r in &entries {
        let (k, e) = (&r.key, &r.entry);
        if e.expires_ns <= now {
            expired += 1;
            continue;
        }
        if r.is_reply() {
            continue;
        }
        let mut flags = Vec::new();
        for (bit, what) in [(CT_F_EXTERNAL, "external"), (CT_F_SNAT, "snat"), (CT_F_HAIRPIN, "hairpin"), (CT_F_CLASH, "port-clash")] {
            if e.flags & bit != 0 {
                flags.push(what);
            }
        }
        rows.push(vec![
            proto_name(k.proto).to_string(),
            addr(k.saddr_be, k.sport_be),
            addr(k.daddr_be, k.dport_be),
            format!("{} -> {}", addr(e.nat_saddr_be, e.nat_sport_be), addr(e.nat_daddr_be, e.nat_dport_be)),
            name_of(&maps, e.svc_id),
            state_name(e, k.proto).to_string(),
            if r.assured { "assured" } else { "new" }.to_string(),
            if flags.is_empty() { "-".into() } else { flags.join(",") },
            secs(now.saturating_sub(e.created_ns)),
            secs(now.saturating_sub(e.last_seen_ns)),
            secs(e.expires_ns.saturating_sub(now)),
        ]);
    }
    rows.sort();
    let mut out = table(&["PROTO", "CLIENT", "FRONTEND", "TRANSLATED", "SERVICE", "STATE", "MAP", "FLAGS", "AGE", "IDLE", "EXPIRES IN"], &rows);
    let _ = writeln!(out, "{} connections ({} entries, both directions; {expired} expired, awaiting garbage collection)", rows.len(), entries.len());
    Ok(out)
}

/// One row per connection the policy conntrack tracks (its forward entry): the pod and direction
/// it was decided for, the peer, the Service address it went through, state, map, the deciding
/// policy, whether it was decided under the current policies (`stale`: decided again at its next
/// packet), age, idle time and time left.
pub fn policy_conntrack(pin_dir: &Path) -> Result<String, LoadError> {
    use dataplane_common::{DIR_INGRESS, PCT_F_REPLY, PCT_F_TRANSLATED};
    let maps = BpfMaps::from_pins(pin_dir)?;
    let (d, _) = maps.dump_policy();
    let now = monotonic_ns();
    let generation = maps.config.get(&0, 0).map(|c| c.pol_generation).unwrap_or(0);
    let entries = crate::bpf::conntrack::PolicyConntrack::from_pins(pin_dir)?.rows();
    let mut rows = Vec::new();
    let mut expired = 0;
    for (k, e, assured) in &entries {
        if e.expires_ns <= now {
            expired += 1;
            continue;
        }
        if e.flags & PCT_F_REPLY != 0 {
            continue;
        }
        let t = &k.tuple;
        let pod = d.pod_names.get(&ip(e.ep_addr_be)).cloned().unwrap_or_else(|| ip(e.ep_addr_be).to_string());
        let policy = match e.policy_id {
            0 => "-".to_string(),
            id => d.policies.get(&id).cloned().unwrap_or_else(|| format!("#{id}")),
        };
        rows.push(vec![
            pod,
            if e.dir == DIR_INGRESS { "ingress" } else { "egress" }.to_string(),
            proto_name(t.proto).to_string(),
            addr(t.saddr_be, t.sport_be),
            addr(t.daddr_be, t.dport_be),
            if e.flags & PCT_F_TRANSLATED != 0 { addr(e.peer_addr_be, e.peer_port_be) } else { "-".into() },
            state_name(&dataplane_common::Ct4Entry { state: e.state, ..Default::default() }, t.proto).to_string(),
            if *assured { "assured" } else { "new" }.to_string(),
            policy,
            if e.generation == generation { "current" } else { "stale" }.to_string(),
            k.ifindex.to_string(),
            secs(now.saturating_sub(e.created_ns)),
            secs(now.saturating_sub(e.last_seen_ns)),
            secs(e.expires_ns.saturating_sub(now)),
        ]);
    }
    rows.sort();
    let mut out = table(
        &["POD", "DIRECTION", "PROTO", "SOURCE", "DESTINATION", "VIA SERVICE", "STATE", "MAP", "ALLOWED BY", "DECIDED", "IFINDEX", "AGE", "IDLE", "EXPIRES IN"],
        &rows,
    );
    let _ = writeln!(out, "{} connections ({} entries; {expired} expired, awaiting garbage collection; policy generation {generation})", rows.len(), entries.len());
    Ok(out)
}

/// Identities, isolated pods and their rules, drops per policy.
pub fn policies(pin_dir: &Path) -> Result<String, LoadError> {
    use dataplane_common::{identity, DIR_INGRESS, EP_F_EGRESS, EP_F_INGRESS, RULE_PREFIX_ALL_PORTS, RULE_PREFIX_PROTO};
    let maps = BpfMaps::from_pins(pin_dir)?;
    let (d, _) = maps.dump_policy();
    let ident = |id: u32| if id == identity::ANY { "any".to_string() } else { d.identities.get(&id).cloned().unwrap_or_else(|| format!("#{id}")) };
    let pol = |id: u32| d.policies.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
    let mut out = String::new();
    let mut addrs: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (c, id) in &d.ipcache {
        addrs.entry(*id).or_default().push(if c.prefix == 32 { c.addr.to_string() } else { c.to_string() });
    }
    let rows: Vec<Vec<String>> = d
        .identities
        .iter()
        .map(|(id, labels)| vec![id.to_string(), labels.clone(), addrs.get(id).map(|a| a.join(",")).unwrap_or_else(|| "-".into())])
        .collect();
    out += &table(&["IDENTITY", "LABELS", "ADDRESSES"], &rows);
    out.push('\n');
    let mut rows = Vec::new();
    for (ip, ep) in &d.endpoints {
        let mut iso = Vec::new();
        if ep.flags & EP_F_INGRESS != 0 {
            iso.push(format!("ingress ({})", pol(ep.ingress_policy)));
        }
        if ep.flags & EP_F_EGRESS != 0 {
            iso.push(format!("egress ({})", pol(ep.egress_policy)));
        }
        rows.push(vec![d.pod_names.get(ip).cloned().unwrap_or_else(|| "?".into()), ip.to_string(), iso.join(", ")]);
    }
    out += &table(&["POD", "ADDRESS", "ISOLATED"], &rows);
    out.push('\n');
    let mut rows = Vec::new();
    for ((prefix, k), id) in &d.rules {
        let ep = Ipv4Addr::from(u32::from_be(k.ep_id_be));
        let ports = match *prefix {
            p if p <= RULE_PREFIX_ALL_PORTS => "all".to_string(),
            p if p <= RULE_PREFIX_PROTO => format!("{}/all", proto_name(k.proto)),
            p => {
                let lo = u16::from_be(k.port_be) as u32;
                let hi = lo + (1u32 << (96 - p)) - 1;
                if lo == hi { format!("{}/{lo}", proto_name(k.proto)) } else { format!("{}/{lo}-{hi}", proto_name(k.proto)) }
            }
        };
        rows.push(vec![
            d.pod_names.get(&ep).cloned().unwrap_or_else(|| ep.to_string()),
            if k.dir == DIR_INGRESS { "ingress" } else { "egress" }.to_string(),
            ident(u32::from_be(k.identity_be)),
            ports,
            pol(*id),
        ]);
    }
    rows.sort();
    out += &table(&["POD", "DIRECTION", "PEER", "PORTS", "ALLOWED BY"], &rows);
    out.push('\n');
    let rows: Vec<Vec<String>> = d
        .policies
        .iter()
        .map(|(id, name)| vec![name.clone(), maps.policy_drops(*id, DIR_INGRESS).to_string(), maps.policy_drops(*id, dataplane_common::DIR_EGRESS).to_string()])
        .collect();
    out += &table(&["POLICY", "INGRESS DROPS", "EGRESS DROPS"], &rows);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }
}

/// `inspect links`: every pinned link, what it is attached to and the program it runs. The
/// datapath as the kernel has it, with or without a running agent.
pub fn links(pin_dir: &Path) -> Result<String, LoadError> {
    let links = crate::links::pinned(pin_dir)?;
    let ifnames: BTreeMap<u32, String> = crate::attach::interfaces().into_iter().map(|(n, i)| (i, n)).collect();
    let rows: Vec<Vec<String>> = links
        .iter()
        .map(|l| {
            let hook = l.pin.rsplit('-').next().unwrap_or("?").to_string();
            let target = match l.info.kind {
                crate::links::LINK_TYPE_CGROUP => format!("cgroup id {}", l.info.cgroup_id),
                _ if l.info.ifindex == 0 => "(interface gone)".into(),
                _ => format!("{} (ifindex {})", ifnames.get(&l.info.ifindex).map(String::as_str).unwrap_or("?"), l.info.ifindex),
            };
            vec![l.pin.clone(), hook, target, format!("{} (id {})", l.program, l.info.prog_id), l.info.id.to_string(), if l.live() { "attached" } else { "defunct" }.into()]
        })
        .collect();
    Ok(table(&["PIN", "HOOK", "ATTACHED TO", "PROGRAM", "LINK ID", "STATE"], &rows))
}
