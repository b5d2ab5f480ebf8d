//! `dataplane-agent cleanup-kube-proxy`: removes what kube-proxy leaves behind when Ferry takes
//! its place, as kube-proxy's own `--cleanup` does, and nothing else.
//!
//! iptables (legacy and nft backends, IPv4 and IPv6): the jumps from other chains into
//! kube-proxy's chains are deleted rule by rule, then its chains are flushed and deleted, all in
//! one `iptables-restore --noflush` transaction per table. Chains are recognised by kube-proxy's
//! names only: kubelet's KUBE-FIREWALL, KUBE-KUBELET-CANARY and KUBE-MARK-DROP stay, as does every
//! chain and rule of anyone else. nftables: kube-proxy's nftables mode keeps everything in its
//! own tables, `ip kube-proxy` and `ip6 kube-proxy`, which are deleted whole.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

/// kube-proxy's fixed chain names (iptables and ipvs modes).
const CHAINS: [&str; 14] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-LOAD-BALANCER-LOCAL",
];

/// Prefixes of kube-proxy's per-Service and per-endpoint chains.
const PREFIXES: [&str; 6] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-XLB-"];

pub fn is_kube_proxy_chain(name: &str) -> bool {
    CHAINS.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What to do in one `iptables-save` dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The `iptables-restore --noflush` input; empty when there is nothing to remove.
    pub script: String,
    /// (table, chain) removed.
    pub chains: Vec<(String, String)>,
    /// (table, rule) deleted from chains that stay.
    pub jumps: Vec<(String, String)>,
}

/// The target of a rule (`-j X` or `-g X`), if any.
fn target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

/// Plans the removal from an `iptables-save` dump.
pub fn plan(save: &str) -> Plan {
    let mut plan = Plan::default();
    let mut table = String::new();
    let mut chains: Vec<String> = Vec::new();
    let mut deletes: Vec<String> = Vec::new();
    let flush = |table: &str, chains: &mut Vec<String>, deletes: &mut Vec<String>, plan: &mut Plan| {
        if chains.is_empty() && deletes.is_empty() {
            return;
        }
        let _ = writeln!(plan.script, "*{table}");
        // Jumps into kube-proxy's chains from chains that stay go first, then its chains are
        // flushed (a chain line flushes an existing chain under --noflush) and deleted.
        for d in deletes.iter() {
            let _ = writeln!(plan.script, "-D {d}");
            plan.jumps.push((table.to_string(), d.clone()));
        }
        for c in chains.iter() {
            let _ = writeln!(plan.script, ":{c} - [0:0]");
        }
        for c in chains.iter() {
            let _ = writeln!(plan.script, "-X {c}");
            plan.chains.push((table.to_string(), c.clone()));
        }
        let _ = writeln!(plan.script, "COMMIT");
        chains.clear();
        deletes.clear();
    };
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if line == "COMMIT" {
            flush(&table, &mut chains, &mut deletes, &mut plan);
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if is_kube_proxy_chain(name) {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if !is_kube_proxy_chain(chain) && target(rule).is_some_and(is_kube_proxy_chain) {
                deletes.push(rule.to_string());
            }
        }
    }
    plan
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// The iptables variants present: (label, save tool, restore tool).
fn variants() -> Vec<(&'static str, &'static str, &'static str)> {
    let all = [
        ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"),
        ("iptables-nft", "iptables-nft-save", "iptables-nft-restore"),
        ("ip6tables-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore"),
        ("ip6tables-nft", "ip6tables-nft-save", "ip6tables-nft-restore"),
    ];
    let split: Vec<_> = all.into_iter().filter(|(_, save, _)| have(save)).collect();
    if !split.is_empty() {
        return split;
    }
    // A system with one backend and plain names.
    [("iptables", "iptables-save", "iptables-restore"), ("ip6tables", "ip6tables-save", "ip6tables-restore")]
        .into_iter()
        .filter(|(_, save, _)| have(save))
        .collect()
}

/// Removes kube-proxy's leftovers from this network namespace; returns a report of what went
/// (or would go, with `dry_run`).
pub fn cleanup_kube_proxy(dry_run: bool) -> anyhow::Result<String> {
    let mut report = String::new();
    let vs = variants();
    if vs.is_empty() {
        let _ = writeln!(report, "iptables: no iptables-save found; nothing to do");
    }
    for (label, save, restore) in vs {
        let out = Command::new(save).output().map_err(|e| anyhow::anyhow!("{save}: {e}"))?;
        if !out.status.success() {
            let _ = writeln!(report, "{label}: {save} failed ({}); skipped", String::from_utf8_lossy(&out.stderr).trim());
            continue;
        }
        let p = plan(&String::from_utf8_lossy(&out.stdout));
        let tables: BTreeSet<&str> = p.chains.iter().chain(&p.jumps).map(|(t, _)| t.as_str()).collect();
        let _ = writeln!(
            report,
            "{label}: {} kube-proxy chains and {} jumps to them{}",
            p.chains.len(),
            p.jumps.len(),
            if tables.is_empty() { String::new() } else { format!(" (tables {})", tables.into_iter().collect::<Vec<_>>().join(", ")) }
        );
        if p.script.is_empty() {
            continue;
        }
        if dry_run {
            for line in p.script.lines() {
                let _ = writeln!(report, "  {line}");
            }
            continue;
        }
        let mut child = Command::new(restore).arg("--noflush").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| anyhow::anyhow!("{restore}: {e}"))?;
        child.stdin.take().expect("piped stdin").write_all(p.script.as_bytes())?;
        let done = child.wait_with_output()?;
        if !done.status.success() {
            anyhow::bail!("{restore} --noflush failed: {}\ninput was:\n{}", String::from_utf8_lossy(&done.stderr).trim(), p.script);
        }
    }
    if have("nft") {
        let out = Command::new("nft").args(["list", "tables"]).output().map_err(|e| anyhow::anyhow!("nft: {e}"))?;
        let listed = String::from_utf8_lossy(&out.stdout);
        let mut found = 0;
        for family in ["ip", "ip6", "inet"] {
            if !listed.lines().any(|l| l.trim() == format!("table {family} kube-proxy")) {
                continue;
            }
            found += 1;
            let _ = writeln!(report, "nftables: table {family} kube-proxy");
            if !dry_run {
                let st = Command::new("nft").args(["delete", "table", family, "kube-proxy"]).output()?;
                if !st.status.success() {
                    anyhow::bail!("nft delete table {family} kube-proxy: {}", String::from_utf8_lossy(&st.stderr).trim());
                }
            }
        }
        if found == 0 {
            let _ = writeln!(report, "nftables: no kube-proxy table");
        }
    } else {
        let _ = writeln!(report, "nftables: no nft found; nothing to do");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_only_kube_proxy_chains_and_jumps() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n:KUBE-MARK-DROP - [0:0]\n:MINE - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -j MINE\n-A KUBE-SERVICES -j KUBE-SVC-ABC\n-A MINE -j KUBE-MARK-DROP\nCOMMIT\n\
*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        let p = plan(save);
        assert_eq!(p.chains, vec![("nat".into(), "KUBE-SERVICES".into()), ("nat".into(), "KUBE-SVC-ABC".into())]);
        assert_eq!(p.jumps, vec![("nat".into(), "PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into())]);
        assert_eq!(
            p.script,
            "*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n-X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_to_do_is_an_empty_script() {
        assert_eq!(plan("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"), Plan::default());
    }
}
