//! `dataplane-agent cleanup-kube-proxy` against rules laid out as kube-proxy lays them out
//! (iptables mode: base-chain jumps, KUBE-SERVICES/-SVC/-SEP/-EXT/-NODEPORTS/-MARK-MASQ/...;
//! nftables mode: the `kube-proxy` tables), beside rules of kubelet, a CNI and the site, all in
//! a network namespace of the test's own. Afterwards the namespace must hold exactly what it
//! holds when only the other rules were ever loaded. Needs root.
use std::process::Stdio;

use bpf_tests::lab::{agent_bin, run_id, Netns};

/// Everything that is not kube-proxy's: the site's own chain and rules, kubelet's chains, a CNI
/// masquerade rule.
const OTHERS: &str = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:SITE-INPUT - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j SITE-INPUT
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A SITE-INPUT -s 10.0.0.0/8 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A POSTROUTING -s 10.244.0.0/16 ! -o cni0 -j MASQUERADE
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
";

/// kube-proxy's iptables mode (v1.28+ layout) for a NodePort Service with two endpoints and one
/// Service without endpoints, merged into OTHERS by `iptables-restore --noflush`.
const KUBE_PROXY: &str = "\
*filter
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-I INPUT 2 -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-I INPUT 3 -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-I OUTPUT 2 -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"lab/nothing:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:KUBE-EXT-TCOU7JCQXEZGVUNU - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-I POSTROUTING 1 -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-EXT-TCOU7JCQXEZGVUNU -m comment --comment \"masquerade traffic for default/web:http external destinations\" -j KUBE-MARK-MASQ
-A KUBE-EXT-TCOU7JCQXEZGVUNU -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 30080 -j KUBE-EXT-TCOU7JCQXEZGVUNU
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -s 10.244.1.5/32 -m comment --comment \"default/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.2.5/32 -m comment --comment \"default/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 10.244.2.5:8080
-A KUBE-SERVICES -d 10.96.1.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-TCOU7JCQXEZGVUNU
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-TCOU7JCQXEZGVUNU ! -s 10.244.0.0/16 -d 10.96.1.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment \"default/web:http -> 10.244.1.5:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-6E7XQMQ4RAYOWTTM
-A KUBE-SVC-TCOU7JCQXEZGVUNU -m comment --comment \"default/web:http -> 10.244.2.5:8080\" -j KUBE-SEP-IT2ZTR26TO4XFPTO
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
";

/// kube-proxy's IPv6 side (dual stack): its chains only.
const KUBE_PROXY6: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
";

/// kube-proxy's nftables mode keeps to its own tables.
const NFT_KUBE_PROXY: &str = "\
table ip kube-proxy {
  comment \"rules for kube-proxy\"
  set cluster-ips {
    type ipv4_addr
    comment \"Active ClusterIPs\"
    elements = { 10.96.1.10 }
  }
  chain mark-for-masquerade {
    mark set mark or 0x4000
  }
  chain endpoint-2ZTRABCD-default/web/tcp/http__10.244.1.5/8080 {
    ip saddr 10.244.1.5 jump mark-for-masquerade
    meta l4proto tcp dnat to 10.244.1.5:8080
  }
  chain service-ULMVA6XW-default/web/tcp/http {
    numgen random mod 1 vmap { 0 : goto endpoint-2ZTRABCD-default/web/tcp/http__10.244.1.5/8080 }
  }
  map service-ips {
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = { 10.96.1.10 . tcp . 80 : goto service-ULMVA6XW-default/web/tcp/http }
  }
  chain services {
    ip daddr . meta l4proto . th dport vmap @service-ips
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }
  chain nat-output {
    type nat hook output priority -100; policy accept;
    jump services
  }
}
table ip6 kube-proxy {
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
  }
}
";

const NFT_OTHERS: &str = "table inet site {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 22 accept\n  }\n}\n";

fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn pipe(ns: &Netns, args: &[&str], input: &str) {
    use std::io::Write;
    let mut c = ns.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?} in {}: {}\ninput:\n{input}", ns.name, String::from_utf8_lossy(&out.stderr));
}

fn output(ns: &Netns, args: &[&str]) -> String {
    let out = ns.cmd(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A dump without comments and counters: what the rules are, not when they were saved.
fn normalized(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| if l.starts_with(':') { l.rsplit_once(' ').map(|(a, _)| a).unwrap_or(l) } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// (restore, save) of every iptables backend this machine has.
fn backends() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    [
        ("iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-restore", "ip6tables-nft-save"),
        ("iptables-legacy-restore", "iptables-legacy-save", "ip6tables-legacy-restore", "ip6tables-legacy-save"),
    ]
    .into_iter()
    .filter(|b| have(b.1) && have(b.3))
    .collect()
}

#[test]
fn cleanup_removes_exactly_kube_proxys_rules() {
    let backends = backends();
    assert!(!backends.is_empty(), "no iptables-save on this machine (cargo xtask setup installs iptables)");
    assert!(have("nft"), "no nft on this machine (cargo xtask setup installs nftables)");
    let id = run_id();
    let dirty = Netns::new(format!("ferry-kp-{id}"));
    let clean = Netns::new(format!("ferry-kpref-{id}"));
    for (restore, _, restore6, _) in &backends {
        for ns in [&dirty, &clean] {
            pipe(ns, &[restore], OTHERS);
        }
        pipe(&dirty, &[restore, "--noflush"], KUBE_PROXY);
        pipe(&dirty, &[restore6, "--noflush"], KUBE_PROXY6);
    }
    for ns in [&dirty, &clean] {
        pipe(ns, &["nft", "-f", "-"], NFT_OTHERS);
    }
    pipe(&dirty, &["nft", "-f", "-"], NFT_KUBE_PROXY);
    assert!(output(&dirty, &["nft", "list", "tables"]).contains("table ip kube-proxy"));

    // A dry run changes nothing and says what it would do.
    let before = output(&dirty, &[backends[0].1]);
    let dry = output(&dirty, &[agent_bin().to_str().unwrap(), "cleanup-kube-proxy", "--dry-run"]);
    assert!(dry.contains("-X KUBE-SVC-TCOU7JCQXEZGVUNU") && dry.contains("nftables: table ip kube-proxy"), "{dry}");
    assert_eq!(normalized(&output(&dirty, &[backends[0].1])), normalized(&before));

    let report = output(&dirty, &[agent_bin().to_str().unwrap(), "cleanup-kube-proxy"]);
    for (_, save, _, save6) in &backends {
        assert_eq!(normalized(&output(&dirty, &[save])), normalized(&output(&clean, &[save])), "{save} after cleanup (report:\n{report})");
        let v6 = output(&dirty, &[save6]);
        assert!(!v6.contains("KUBE-"), "{save6} after cleanup:\n{v6}");
    }
    let tables = output(&dirty, &["nft", "list", "tables"]);
    assert!(!tables.contains("kube-proxy") && tables.contains("table inet site"), "{tables}");
    assert_eq!(output(&dirty, &["nft", "list", "table", "inet", "site"]), output(&clean, &["nft", "list", "table", "inet", "site"]));
    // The nat table's report names what went: 9 chains and 3 jumps from base chains.
    assert!(report.contains("kube-proxy chains"), "{report}");

    // Idempotent: a second run finds nothing.
    let again = output(&dirty, &[agent_bin().to_str().unwrap(), "cleanup-kube-proxy"]);
    assert!(again.lines().filter(|l| l.starts_with("ip")).all(|l| l.contains(": 0 kube-proxy chains and 0 jumps")), "{again}");
    assert!(again.contains("nftables: no kube-proxy table"), "{again}");
}

/// The take-over (`run --cleanup-kube-proxy`): kube-proxy's rules go only once Ferry's datapath
/// is attached and its first sync succeeded. An agent that cannot sync (the API server
/// unreachable) leaves them alone, so a node is never without a working proxy.
#[test]
fn the_take_over_removes_kube_proxys_rules_only_after_the_first_sync() {
    use bpf_tests::lab::{Cluster, TempDir};
    assert!(have("nft"), "no nft on this machine (cargo xtask setup installs nftables)");
    let dir = TempDir::new(&format!("takeover-{}", run_id()));
    std::fs::write(dir.path.join("none.yaml"), "").unwrap();
    let mut c = Cluster::new(&dir.path);
    pipe(&c.nodes[0].ns, &["nft", "-f", "-"], NFT_KUBE_PROXY);
    let rules = |c: &Cluster| output(&c.nodes[0].ns, &["nft", "list", "tables"]).contains("table ip kube-proxy");
    // Cannot sync: attached, serving from whatever is pinned, kube-proxy's rules untouched.
    let since = c.spawn_agent(0, &agent_bin(), false, &["--master", "http://127.0.0.1:1", "--cleanup-kube-proxy"]);
    c.wait_log(0, |l| l[since..].contains("datapath attached"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(rules(&c), "kube-proxy's rules removed before any sync:\n{}", c.agent_log(0));
    c.stop_agent(0);
    // Syncs: the rules go, after the datapath is attached and the sync done.
    let since = c.spawn_agent(0, &agent_bin(), true, &["--cleanup-kube-proxy"]);
    c.wait_log(0, |l| l[since..].contains("took over from kube-proxy"));
    let log = c.agent_log(0)[since..].to_string();
    let at = |s: &str| log.find(s).unwrap_or_else(|| panic!("{s:?} not in:\n{log}"));
    assert!(at("datapath attached") < at("synced ") && at("synced ") < at("took over from kube-proxy"), "{log}");
    assert!(!rules(&c), "{log}");
}
