//! `cargo xtask bench`: what Ferry costs, beside a floor measured in the same run.
//!
//! Datapath: ns per packet of the real from-pod program, as the kernel measures it in
//! BPF_PROG_TEST_RUN, for a conntrack hit (an established connection) and a new connection, at
//! 10, 1 000 and 100 000 Services; the floor is an empty classifier of the same object run the
//! same way. Each figure is the median of many single runs (a repeated run would keep
//! rewriting the same packet, so every packet is fresh).
//! Control plane: time to sync N Services through the real reconciler into the real maps, a
//! resync with nothing changed, and one endpoint changing, beside the floor of writing the same
//! number of entries with bare map updates.
use std::{net::Ipv4Addr, time::Instant};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use dataplane_agent::{
    attach,
    bpf::BpfMaps,
    loader,
    model::{Desired, DesiredFrontend, Frontend, L4Addr, Proto, ServicePortName},
    packet::{ip, tcp},
    reconcile::{Algorithm, Reconciler},
};
use dataplane_common::{progs, Lb4SlotKey};

const BACKENDS_PER_SERVICE: u32 = 2;

fn desired(services: u32, generation: u32) -> Desired {
    let mut d = Desired::default();
    for i in 0..services {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + i);
        let fe = L4Addr { addr: vip, port: 80, proto: Proto::Tcp };
        let backends = (0..BACKENDS_PER_SERVICE)
            .map(|b| {
                // `generation` moves the first backend of service 0: one endpoint changes.
                let shift = if i == 0 && b == 0 { generation } else { 0 };
                L4Addr { addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i * BACKENDS_PER_SERVICE + b + shift * 7_000_000), port: 8080, proto: Proto::Tcp }
            })
            .collect();
        d.frontends.insert(Frontend::internal(fe), DesiredFrontend::new(ServicePortName { namespace: "bench".into(), name: format!("s{i}"), port: String::new() }, backends));
        d.cluster_ips.insert(vip);
    }
    d
}

fn run_ns(ebpf: &Ebpf, prog: &str, pkt: &[u8]) -> u64 {
    let mut out = vec![0u8; pkt.len() + 64];
    let mut opts = TestRunOptions::default();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let p = ebpf.program(prog).unwrap();
    let r = match <&Xdp>::try_from(p) {
        Ok(x) => x.test_run(opts),
        Err(_) => <&SchedClassifier>::try_from(p).unwrap().test_run(opts),
    };
    r.unwrap().duration.as_nanos() as u64
}

/// NodePort from outside to a backend on this node, in tc (`ferry_from_world`) and in XDP
/// (`ferry_xdp_nodeport`), each beside an empty program of its kind.
fn nodeport_bench(runs: usize) {
    use dataplane_agent::model::Scope;
    let mut ebpf = loader::load(None).unwrap();
    attach::load_programs(&mut ebpf).unwrap();
    for name in [progs::BENCH_EMPTY, progs::BENCH_EMPTY_XDP] {
        match <&mut Xdp>::try_from(ebpf.program_mut(name).unwrap()) {
            Ok(x) => x.load().unwrap(),
            Err(_) => <&mut SchedClassifier>::try_from(ebpf.program_mut(name).unwrap()).unwrap().load().unwrap(),
        }
    }
    let mut maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
    let node = ip("192.168.0.2");
    let backend = L4Addr { addr: ip("10.0.0.7"), port: 8080, proto: Proto::Tcp };
    let mut d = Desired::default();
    d.frontends.insert(
        Frontend { addr: L4Addr { addr: node, port: 30080, proto: Proto::Tcp }, scope: Scope::External },
        DesiredFrontend::new(ServicePortName { namespace: "bench".into(), name: "np".into(), port: String::new() }, [backend].into()),
    );
    d.local_endpoints.insert(backend.addr);
    Reconciler::new().sync(&d, &Default::default(), &mut maps);
    let pkt = |sport: u16, syn: bool| tcp((ip("203.0.113.9"), sport), (node, 30080), syn, b"");
    println!("\nNodePort from outside to a backend on this node (ns per packet, median of {runs}):");
    println!("{:>6} | {:>12} | {:>10} | {:>14}", "path", "empty prog", "ct hit", "new conn");
    println!("{}", "-".repeat(52));
    for (path, prog, empty, base) in [("tc", progs::FROM_WORLD, progs::BENCH_EMPTY, 1024u16), ("xdp", progs::XDP_NODEPORT, progs::BENCH_EMPTY_XDP, 30000u16)] {
        run_ns(&ebpf, prog, &pkt(base, true));
        let established = pkt(base, false);
        let e = median((0..runs).map(|_| run_ns(&ebpf, empty, &established)).collect());
        let hit = median((0..runs).map(|_| run_ns(&ebpf, prog, &established)).collect());
        let new = median((0..runs).map(|i| run_ns(&ebpf, prog, &tcp((Ipv4Addr::from(u32::from(ip("198.18.0.0")) + i as u32), base, ), (node, 30080), true, b""))).collect());
        println!("{path:>6} | {e:>9} ns | {hit:>7} ns | {new:>11} ns");
    }
}

/// NetworkPolicy: ns per packet entering a pod (`ferry_to_pod`) that N policies select, beside
/// the empty program and a pod no policy selects, at 10 and 10 000 policies; and the time to
/// compile and write them. Policy i allows client pod `c{i % 100}` on TCP port 1000 + i.
fn policy_bench(runs: usize) {
    use dataplane_agent::{agent::PolicyState, model::NodeContext, sources::Objects};
    println!("\nNetworkPolicy: a packet into a pod that N policies select (ns per packet, median of {runs}), and the sync:");
    println!(
        "{:>9} | {:>10} | {:>10} | {:>12} | {:>11} | {:>10} | {:>11} | {:>11} | {:>9}",
        "policies", "empty prog", "unselected", "established", "allowed new", "denied", "rule entries", "full sync", "resync"
    );
    println!("{}", "-".repeat(120));
    for n in [10usize, 10_000] {
        let mut ebpf = loader::load_with(None, &loader::PRIVATE_CAPACITIES).unwrap();
        attach::load_programs(&mut ebpf).unwrap();
        let empty_prog: &mut SchedClassifier = ebpf.program_mut(progs::BENCH_EMPTY).unwrap().try_into().unwrap();
        empty_prog.load().unwrap();
        let mut maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        let mut yaml = String::from("kind: Pod\nmetadata: {name: target, namespace: b, labels: {app: target}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.10}\n---\nkind: Pod\nmetadata: {name: open, namespace: b, labels: {app: open}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.11}\n");
        for c in 0..100 {
            yaml += &format!("---\nkind: Pod\nmetadata: {{name: c{c}, namespace: b, labels: {{client: c{c}}}}}\nspec: {{nodeName: n2, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n", c / 250, c % 250 + 1);
        }
        for i in 0..n {
            yaml += &format!(
                "---\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: b}}\nspec:\n  podSelector: {{matchLabels: {{app: target}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{client: c{}}}}}}}], ports: [{{port: {}}}]}}]\n",
                i % 100,
                1000 + i
            );
        }
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        dataplane_agent::sources::manifests::parse_str(&yaml, "bench", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let node = NodeContext { name: "n1".into(), ips: vec![ip("192.168.0.2")], nodeport_addresses: vec![], zone: None };
        let mut pol = PolicyState::default();
        let t = Instant::now();
        let (w, _, e, me) = pol.sync(&mut maps, &objs, &node);
        let full = t.elapsed();
        assert!(e.is_empty() && me.is_empty(), "{e:?} {me:?}");
        let t = Instant::now();
        let (w2, d2, _, _) = pol.sync(&mut maps, &objs, &node);
        let resync = t.elapsed();
        assert_eq!(w2 + d2, 0);
        let _ = w;
        // Client c{(n-1) % 100} to the last policy's port: the deepest rule there is.
        let last = n - 1;
        let client = Ipv4Addr::new(10, 1, ((last % 100) / 250) as u8, ((last % 100) % 250 + 1) as u8);
        let port = 1000 + last as u16;
        let est = tcp((client, 999), (ip("10.0.0.10"), port), true, b"");
        run_ns(&ebpf, progs::TO_POD, &est);
        let est = tcp((client, 999), (ip("10.0.0.10"), port), false, b"");
        let empty = median((0..runs).map(|_| run_ns(&ebpf, progs::BENCH_EMPTY, &est)).collect());
        let hit = median((0..runs).map(|_| run_ns(&ebpf, progs::TO_POD, &est)).collect());
        let unselected = median((0..runs).map(|_| run_ns(&ebpf, progs::TO_POD, &tcp((client, 999), (ip("10.0.0.11"), port), false, b""))).collect());
        // New connections: every run a fresh source port (the policy conntrack is LRU).
        let new = median((0..runs).map(|i| run_ns(&ebpf, progs::TO_POD, &tcp((client, 1024 + (i % 60_000) as u16), (ip("10.0.0.10"), port), true, b""))).collect());
        let denied = median((0..runs).map(|i| run_ns(&ebpf, progs::TO_POD, &tcp((client, 1024 + (i % 60_000) as u16), (ip("10.0.0.10"), 9), true, b""))).collect());
        println!(
            "{n:>9} | {empty:>7} ns | {unselected:>7} ns | {hit:>9} ns | {new:>8} ns | {denied:>7} ns | {:>12} | {:>11.1?} | {:>9.1?}",
            pol.applied.rules.len(),
            full,
            resync
        );
    }
    println!("established: the policy conntrack answers; allowed new / denied: ipcache LPM and two rule LPM lookups, then a conntrack insert or a drop; unselected: one endpoint lookup. The ring buffer event is included.");
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    println!("Ferry bench: median of {runs} single BPF_PROG_TEST_RUN runs per figure (kernel-measured ns)\n");
    println!("{:>9} {:>7} | {:>12} | {:>10} | {:>14} | {:>14} | {:>11} | {:>15} | {:>14}", "services", "select", "empty prog", "ct hit", "new conn", "full sync", "resync same", "one endpoint", "bare writes");
    println!("{}", "-".repeat(126));
    for services in [10u32, 1_000, 100_000] {
        let mut ebpf = loader::load(None).expect("eBPF object (cargo xtask build-ebpf)");
        attach::load_programs(&mut ebpf).unwrap();
        let empty_prog: &mut SchedClassifier = ebpf.program_mut(progs::BENCH_EMPTY).unwrap().try_into().unwrap();
        empty_prog.load().unwrap();
        let mut maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        // Consistent hashing (the default) writes a table per frontend (1021 entries for these
        // Services' few backends): measured up to 1 000 Services; 100 000 tables would take the
        // bench minutes, so that row picks at random.
        let algorithm = if services > 1_000 { Algorithm::Random } else { Algorithm::default() };
        let mut rec = Reconciler::new();
        rec.algorithm = algorithm;

        let d = desired(services, 0);
        let t = Instant::now();
        let (st, errs) = rec.sync(&d, &Default::default(), &mut maps);
        let full = t.elapsed();
        assert!(errs.is_empty(), "{errs:?}");
        let t = Instant::now();
        let (same, _) = rec.sync(&d, &Default::default(), &mut maps);
        let resync = t.elapsed();
        assert_eq!(same.writes + same.deletes, 0);
        let d1 = desired(services, 1);
        let t = Instant::now();
        let (one, _) = rec.sync(&d1, &Default::default(), &mut maps);
        let one_change = t.elapsed();
        // The floor: as many bare map updates as the full sync made (into the roomiest map, under
        // a service id no frontend uses; removed after).
        let t = Instant::now();
        for slot in 0..st.writes as u32 {
            maps.slots.insert(Lb4SlotKey { svc_id: u32::MAX, slot }, 0, 0).unwrap();
        }
        let bare = t.elapsed();
        for slot in 0..st.writes as u32 {
            maps.slots.remove(&Lb4SlotKey { svc_id: u32::MAX, slot }).unwrap();
        }

        // The last Service: its lookup is as deep in the maps as any.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + services - 1);
        let established = tcp((ip("10.1.0.2"), 1000), (vip, 80), false, b"");
        run_ns(&ebpf, progs::FROM_POD, &tcp((ip("10.1.0.2"), 1000), (vip, 80), true, b""));
        let empty = median((0..runs).map(|_| run_ns(&ebpf, progs::BENCH_EMPTY, &established)).collect());
        let hit = median((0..runs).map(|_| run_ns(&ebpf, progs::FROM_POD, &established)).collect());
        let new = median(
            (0..runs)
                .map(|i| {
                    let src = Ipv4Addr::from(u32::from(ip("10.2.0.0")) + (i / 60_000) as u32);
                    run_ns(&ebpf, progs::FROM_POD, &tcp((src, 1024 + (i % 60_000) as u16), (vip, 80), true, b""))
                })
                .collect(),
        );
        println!(
            "{services:>9} {:>7} | {empty:>9} ns | {hit:>7} ns | {new:>11} ns | {:>11.1?} | {:>11.1?} | {:>6.1?} ({} ops) | {:>11.1?}",
            if algorithm == Algorithm::Random { "random" } else { "chash" },
            full,
            resync,
            one_change,
            one.writes + one.deletes,
            bare
        );
    }
    println!("\nct hit: one conntrack lookup and the rewrite; new conn: service lookup, hashing table (or random slot), backend lookup, two conntrack inserts.");
    println!("full sync writes {} entries per Service (service, {} slots, {} backends) plus the address entry, and with chash (maglev) a 1021-entry table.", 1 + 2 * BACKENDS_PER_SERVICE, BACKENDS_PER_SERVICE, BACKENDS_PER_SERVICE);
    println!("resync same: translation and diff only, zero map writes. one endpoint: the writes that change touches.");
    nodeport_bench(runs);
    policy_bench(runs);
}
