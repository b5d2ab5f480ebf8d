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
//! Throughput: real kernel TCP through the namespace lab (`lab::Cluster`, one real agent per
//! node, the binaries of this build's profile): bulk transfers through a source-translated
//! NodePort and a ClusterIP, and short connections through the NodePort, each beside the same
//! traffic sent to the pod's own address (nothing translated) in the same lab, alternating, and
//! beside the lab before its agents start (no Ferry at all). Gbit/s, and the whole machine's CPU
//! time (/proc/stat) per GB or per connection.
//! Network programming against a real API server (`bpf_tests::netprog`): Ferry, kube-proxy
//! nftables and kube-proxy iptables side by side at 1 000 and 10 000 Services, from an object
//! written to traffic reaching the new endpoint, beside the API server's own watch latency;
//! included when the kube-proxy binary is built (`--kube-proxy PATH`, which xtask passes).
//! Arguments: `[RUNS] [--no-throughput | --throughput-only | --control-plane-only | --sync-only |
//! --packet-only | --scale-only] [--services 1000,10000] [--kube-proxy PATH] [--verbose]`
//! (verbose: every throughput run's figures on stderr). `FERRY_BENCH_LOG=PREFIX` keeps each
//! proxy's log of the network-programming section as `PREFIX.<proxy>` (where its start went).
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

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
use bpf_tests::lab::{At, Cluster};
use dataplane_agent::sources::{
    Meta,
    service::{Service, ServicePort, ServiceSpec},
    slice::{Endpoint, EndpointSlice},
};
use dataplane_common::{progs, Lb4SlotKey};
use dataplane_agent::sources::slice::EndpointPort;

const BACKENDS_PER_SERVICE: u32 = 3;

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
        d.frontends.insert(Frontend::internal(fe), DesiredFrontend::new(ServicePortName { namespace: "bench".into(), name: format!("s{i}").into(), port: "".into() }, backends));
        d.cluster_ips.insert(vip);
    }
    d
}

/// The Services and EndpointSlices that `desired(services, generation)` translates from: as the
/// agent holds them, for the one-endpoint change through its incremental path.
fn objects(services: u32, generation: u32) -> (Vec<Service>, Vec<EndpointSlice>) {
    let d = desired(services, generation);
    let mut svcs = Vec::with_capacity(services as usize);
    let mut slices = Vec::with_capacity(services as usize);
    for (fe, want) in &d.frontends {
        svcs.push(service_object(&want.service.name, fe.addr.addr));
        slices.push(slice_object(&want.service.name, &want.backends));
    }
    (svcs, slices)
}

fn service_object(name: &str, vip: Ipv4Addr) -> Service {
    Service {
        metadata: Meta { name: Some(name.into()), namespace: Some("bench".into()), ..Default::default() },
        spec: Some(ServiceSpec { cluster_ip: Some(vip.to_string().into()), ports: Some([ServicePort { port: 80, ..Default::default() }].into()), ..Default::default() }),
        ..Default::default()
    }
}

fn slice_object(service: &str, backends: &dataplane_agent::model::Backends) -> EndpointSlice {
    EndpointSlice {
        metadata: Meta { name: Some(format!("{service}-x").into()), namespace: Some("bench".into()), ..Default::default() },
        service_name: Some(service.into()),
        address_type: "IPv4".into(),
        ports: Some([EndpointPort { port: Some(8080), ..Default::default() }].into()),
        endpoints: Some(backends.iter().map(|b| Endpoint { address: Some(dataplane_agent::sources::slice::Address::V4(b.addr)), ..Default::default() }).collect()),
        ..Default::default()
    }
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

/// Opens a TCP connection from `client` to `front` the way a real one opens, so that the packets
/// timed after it are those of an established connection (its entries in the assured map): the
/// SYN through `fwd`, the chosen backend's SYN-ACK through `rev` (where its replies are
/// translated), the client's ACK through `fwd`. Panics unless the connection ended up assured.
fn establish(ebpf: &Ebpf, maps: &BpfMaps, fwd: &str, rev: &str, client: (Ipv4Addr, u16), front: (Ipv4Addr, u16)) {
    use dataplane_agent::packet::{tcp_flags, try_tuple};
    let syn = run_out(ebpf, fwd, &tcp_flags(client, front, "S", b""));
    let t = try_tuple(&syn).expect("the SYN translated");
    run_out(ebpf, rev, &tcp_flags((t.dst, t.dport), (t.src, t.sport), "SA", b""));
    run_out(ebpf, fwd, &tcp((client.0, client.1), front, false, b""));
    let assured = maps.ct.assured.iter().flatten().filter(|(k, _)| u32::from_ne_bytes(k.saddr_be.to_ne_bytes()) == u32::from_ne_bytes(client.0.octets()) && k.sport_be == client.1.to_be()).count();
    assert!(assured > 0, "the bench connection from {client:?} to {front:?} was not established (no assured entry)");
}

fn run_out(ebpf: &Ebpf, prog: &str, pkt: &[u8]) -> Vec<u8> {
    dataplane_agent::trace::test_run(ebpf, prog, pkt).unwrap().data
}

/// NodePort from outside to a backend on this node, in tc (`ferry_from_world`) and in XDP
/// (`ferry_xdp_nodeport`), each beside an empty program of its kind: a frontend that keeps the
/// client's address (externalTrafficPolicy Local, or a node with no masquerade address), which
/// XDP translates itself. Each row first checks what the program did with an established
/// packet (translated to the backend and passed to the stack), so a figure never times a path
/// other than the one it names.
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
    let mut local = DesiredFrontend::new(ServicePortName { namespace: "bench".into(), name: "np".into(), port: "".into() }, [backend].into());
    local.external_ip = true;
    local.drop_empty = true;
    d.frontends.insert(Frontend { addr: L4Addr { addr: node, port: 30080, proto: Proto::Tcp }, scope: Scope::External }, local);
    d.local_endpoints.insert(backend.addr);
    Reconciler::new().sync(&d, &Default::default(), &mut maps);
    println!("\nNodePort from outside to a backend on this node (ns per packet, median of {runs}):");
    println!("{:>6} | {:>12} | {:>10} | {:>14}", "path", "empty prog", "ct hit", "new conn");
    println!("{}", "-".repeat(52));
    let client = ip("203.0.113.9");
    let rows = [("tc", progs::FROM_WORLD, progs::BENCH_EMPTY, 30080u16, 1024u16), ("xdp", progs::XDP_NODEPORT, progs::BENCH_EMPTY_XDP, 30080, 30000)];
    for (path, prog, empty, nodeport, base) in rows {
        // The backend's replies leave its veth (from-pod), where they are translated back.
        establish(&ebpf, &maps, prog, progs::FROM_POD, (client, base), (node, nodeport));
        let established = tcp((client, base), (node, nodeport), false, b"");
        let out = dataplane_agent::trace::test_run(&ebpf, prog, &established).unwrap();
        let to = dataplane_agent::packet::try_tuple(&out.data).map(|t| t.dst);
        // TC_ACT_OK, XDP_PASS.
        let pass = if prog == progs::XDP_NODEPORT { 2 } else { 0 };
        assert!(out.action == pass && to == Some(backend.addr), "{path}: an established packet came out as action {} to {to:?}, not translated to {} and passed", out.action, backend.addr);
        let e = median((0..runs).map(|_| run_ns(&ebpf, empty, &established)).collect());
        let hit = median((0..runs).map(|_| run_ns(&ebpf, prog, &established)).collect());
        let new = median((0..runs).map(|i| run_ns(&ebpf, prog, &tcp((Ipv4Addr::from(u32::from(ip("198.18.0.0")) + i as u32), base), (node, nodeport), true, b""))).collect());
        println!("{path:>6} | {e:>9} ns | {hit:>7} ns | {new:>11} ns   (ct hit {:.1}x the empty program)", hit as f64 / e as f64);
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
        let node = NodeContext { name: "n1".into(), ips: vec![ip("192.168.0.2")], nodeport_addresses: vec![], nodeport_primary: false, zone: None, masquerade_all: false };
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

/// The control-plane section's arguments: `--kube-proxy PATH` (None, said, when it is not
/// built) and `--services N,N`.
struct CpArgs {
    kube_proxy: Option<std::path::PathBuf>,
    services: Vec<usize>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, addrs, tcp, udp, sctp] = args.as_slice() {
        if cmd == "serve" {
            // The control-plane section's servers in its pods (as the conformance binary's).
            bpf_tests::conformance::serve_main(addrs, tcp, udp, sctp);
        }
    }
    let mut runs = 20_000;
    let mut cp = CpArgs { kube_proxy: None, services: vec![1_000, 10_000] };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kube-proxy" => cp.kube_proxy = it.next().map(Into::into),
            "--services" => cp.services = it.next().map(|s| s.split(',').filter_map(|n| n.trim().replace('_', "").parse().ok()).collect()).unwrap_or_default(),
            a => runs = a.parse().unwrap_or(runs),
        }
    }
    if let Some(p) = cp.kube_proxy.take() {
        if p.exists() {
            cp.kube_proxy = Some(p);
        } else {
            println!("kube-proxy not built ({} missing; `cargo xtask setup` builds it)", p.display());
        }
    }
    VERBOSE.store(args.iter().any(|a| a == "--verbose"), std::sync::atomic::Ordering::Relaxed);
    // `--throughput-only` skips the per-packet and sync sections; `--no-throughput` the lab;
    // `--control-plane-only` runs only the section against a real API server; `--sync-only` only
    // the first table (per packet and sync times); `--packet-only` the per-packet figures.
    if args.iter().any(|a| a == "--throughput-only") {
        throughput_bench();
        return;
    }
    if args.iter().any(|a| a == "--control-plane-only") {
        control_plane_bench(&cp, true);
        return;
    }
    if args.iter().any(|a| a == "--scale-only") {
        // `--services N,N` chooses its sizes too.
        let sizes: Vec<u32> = if args.iter().any(|a| a == "--services") { cp.services.iter().map(|&n| n as u32).collect() } else { SCALE_SIZES.to_vec() };
        scale_bench(&sizes);
        return;
    }
    println!("Ferry bench: median of {runs} single BPF_PROG_TEST_RUN runs per figure (kernel-measured ns)\n");
    println!(
        "{:>9} {:>7} | {:>12} | {:>10} | {:>14} | {:>14} | {:>14} | {:>11} | {:>17} | {:>15} | {:>14}",
        "services", "select", "empty prog", "ct hit", "new conn", "full sync", "restart", "resync same", "one endpoint", "(translate all)", "bare writes"
    );
    println!("{}", "-".repeat(163));
    // `--packet-only`: the per-packet figures alone (10 Services, then the NodePort table), for a
    // quick look at a datapath change.
    let packet_only = args.iter().any(|a| a == "--packet-only");
    let sizes: &[u32] = if packet_only { &[10] } else { &[10, 1_000, 10_000, 100_000] };
    for &services in sizes {
        // Room for every table (251 entries each for these few backends), backend and slot.
        let table = dataplane_agent::select::table_size(BACKENDS_PER_SERVICE as usize) as u32;
        let caps = [
            (dataplane_common::names::CHASH, (services * table).div_ceil(dataplane_common::CHASH_PER_ELEMENT).max(1024)),
            (dataplane_common::names::BACKENDS, (services * BACKENDS_PER_SERVICE + 16).max(dataplane_common::capacity::BACKENDS)),
            // The Services' slots and, beside them, the bare writes' (as many as the sync's).
            (dataplane_common::names::SLOTS, (services * 16).max(dataplane_common::capacity::SLOTS)),
        ];
        let mut ebpf = loader::load_with(None, &caps).expect("eBPF object (cargo xtask build-ebpf)");
        attach::load_programs(&mut ebpf).unwrap();
        let empty_prog: &mut SchedClassifier = ebpf.program_mut(progs::BENCH_EMPTY).unwrap().try_into().unwrap();
        empty_prog.load().unwrap();
        let mut maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        // Consistent hashing (the default): a table per frontend, written as memory into the
        // flat table array.
        let algorithm = Algorithm::default();
        let mut rec = Reconciler::new();
        rec.algorithm = algorithm;

        let d = desired(services, 0);
        // The agent's translation of the same objects (made outside the timings).
        let node = dataplane_agent::model::NodeContext::default();
        let mut tr = dataplane_agent::translator::Translator::new();
        {
            let (svcs, slices) = objects(services, 0);
            tr.rebuild(&svcs, &slices, &node);
        }
        assert!(tr.desired == d, "the objects translate to the bench's desired state");
        let t = Instant::now();
        let (st, errs) = rec.sync(&d, &Default::default(), &mut maps);
        let full = t.elapsed();
        assert!(errs.is_empty(), "{errs:?}");
        let t = Instant::now();
        let (same, _) = rec.sync(&d, &Default::default(), &mut maps);
        let resync = t.elapsed();
        assert_eq!(same.writes + same.deletes, 0);
        // A restart over the same maps: the applied view and the table regions read back (one
        // mapping of the table array, no syscall per table entry), then the first sync, which
        // finds nothing to write. The object load and the link swap are not included.
        let t = Instant::now();
        let mut restarted = Reconciler::restore(maps.dump_applied());
        restarted.algorithm = algorithm;
        let (again, errs) = restarted.sync(&d, &Default::default(), &mut maps);
        let restart = t.elapsed();
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(again.writes + again.deletes, 0, "a restart rewrote entries");
        rec = restarted;
        // One endpoint of Service 0 replaced, as the agent takes it from a watch event: that
        // EndpointSlice retranslated, its frontend's entries written.
        let d1 = desired(services, 1);
        let first = d1.frontends.values().next().unwrap();
        let mut changes = dataplane_agent::translator::Changes::default();
        let changed = slice_object(&first.service.name, &first.backends);
        changes.slices.insert(dataplane_agent::model::slice_key(&changed), Some(std::sync::Arc::new(changed)));
        let t = Instant::now();
        let (delta, work) = tr.apply(changes, &node);
        let (one, errs) = rec.sync_changed(&tr.desired, &delta, &Default::default(), &mut maps);
        let one_change = t.elapsed();
        assert!(errs.is_empty() && work.translated == 1, "{errs:?} {work:?}");
        assert!(tr.desired == d1);
        // The same change back the way every change went before the translation was kept:
        // every Service translated, every frontend compared.
        let back = {
            let (svcs, slices) = objects(services, 0);
            let t = Instant::now();
            let (d0, _) = dataplane_agent::model::translate(&svcs, &slices, &node);
            let (back, errs) = rec.sync(&d0, &Default::default(), &mut maps);
            let took = t.elapsed();
            assert!(errs.is_empty() && back.writes > 0, "{errs:?}");
            took
        };
        // The floor: as many bare map updates as the full sync made syscalls (its table entries
        // are memory writes), into the roomiest map, under a service id no frontend uses;
        // removed after.
        let updates = (st.writes - st.table_entries) as u32;
        let t = Instant::now();
        for slot in 0..updates {
            maps.slots.insert(Lb4SlotKey { svc_id: u32::MAX, slot }, 0, 0).unwrap();
        }
        let bare = t.elapsed();
        for slot in 0..updates {
            maps.slots.remove(&Lb4SlotKey { svc_id: u32::MAX, slot }).unwrap();
        }

        // The last Service: its lookup is as deep in the maps as any.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + services - 1);
        let established = tcp((ip("10.1.0.2"), 1000), (vip, 80), false, b"");
        // The replies come back into the client pod (to-pod), where they are translated.
        establish(&ebpf, &maps, progs::FROM_POD, progs::TO_POD, (ip("10.1.0.2"), 1000), (vip, 80));
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
            "{services:>9} {:>7} | {empty:>9} ns | {hit:>7} ns | {new:>11} ns | {:>11.1?} | {:>11.1?} | {:>11.1?} | {:>8.1?} ({} ops) | {:>15.1?} | {:>11.1?}",
            if algorithm == Algorithm::Random { "random" } else { "chash" },
            full,
            restart,
            resync,
            one_change,
            one.writes + one.deletes,
            back,
            bare
        );
    }
    println!("\nct hit: a packet of an established connection (its SYN, the backend's SYN-ACK and the ACK through the programs first: the entry is in the assured map), its conntrack lookup and the rewrite; new conn: service lookup, hashing table (or random slot), backend lookup, two conntrack inserts.");
    println!(
        "full sync writes {} entries per Service (service, name, {} slots, {} backends; the datapath makes a frontend's counters at its first packet) plus the address entry, and with chash (maglev) a {}-entry table through mmap; bare writes: as many map updates as the full sync made syscalls.",
        2 + 2 * BACKENDS_PER_SERVICE,
        BACKENDS_PER_SERVICE,
        BACKENDS_PER_SERVICE,
        dataplane_agent::select::table_size(BACKENDS_PER_SERVICE as usize)
    );
    println!("restart: the maps read back into the reconciler (tables through one mapping) and the first sync, which writes nothing.");
    println!("resync same: the diff of every frontend, zero map writes. one endpoint: the agent's path for one EndpointSlice changed (its Service translated again, its frontend's entries written), and the writes it makes; (translate all): the same change back as every change went before, every Service translated and every frontend compared.");
    if args.iter().any(|a| a == "--sync-only") {
        return;
    }
    nodeport_bench(runs);
    if packet_only {
        return;
    }
    policy_bench(runs);
    scale_bench(&SCALE_SIZES);
    control_plane_bench(&cp, false);
    if !args.iter().any(|a| a == "--no-throughput") {
        throughput_bench();
    }
}

/// The sizes of the agent-at-scale rows.
const SCALE_SIZES: [u32; 2] = [10_000, 100_000];

/// The agent itself at each of `sizes` Services (10,000 and 100,000), from `--manifests`.
fn scale_bench(sizes: &[u32]) {
    // The agent of this bench's own build (release under `cargo xtask bench`).
    bpf_tests::lab::use_bin_dir(std::env::current_exe().unwrap().parent().unwrap().to_path_buf());
    if let Err(e) = bpf_tests::scale::run(sizes) {
        println!("agent at scale: {e}");
        if e.starts_with("interrupted") {
            std::process::exit(130);
        }
    }
}

/// Network programming against a real API server (`bpf_tests::netprog`): run when asked for
/// (`--control-plane-only`, Ferry alone if kube-proxy is not built), else when kube-proxy is
/// built; skipped with a line saying why otherwise.
fn control_plane_bench(cp: &CpArgs, asked: bool) {
    if cp.kube_proxy.is_none() && !asked {
        println!("\nNetwork programming against a real API server: skipped (needs the kube-proxy binary: `cargo xtask setup` builds it; `--control-plane-only` runs Ferry's rows alone)");
        return;
    }
    if cp.services.is_empty() {
        println!("\nNetwork programming against a real API server: skipped (--services names no count)");
        return;
    }
    // The agent of this bench's own build (release under `cargo xtask bench`).
    bpf_tests::lab::use_bin_dir(std::env::current_exe().unwrap().parent().unwrap().to_path_buf());
    if let Err(e) = bpf_tests::netprog::run(cp.kube_proxy.as_deref(), &cp.services) {
        println!("network programming section: {e}");
        if e.starts_with("interrupted") {
            std::process::exit(130);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Throughput: real kernel TCP through the namespace lab (issue 9)

/// Bytes each way per bulk connection (upload, then download): about 2 s a run here.
const BULK_BYTES: u64 = 2 << 30;
/// Runs per figure, bulk and churn: each round runs the translated path and its baseline back to
/// back, in alternating order (ABBA), so drift and neighbours' load fall on both; a figure is the
/// median. Churn through the default SNAT range takes about 5 s a run, hence fewer.
const BULK_ROUNDS: usize = 5;
const CHURN_ROUNDS: usize = 3;
/// Short connections per churn run, 8 at a time; a run also stops at its deadline. More than the
/// default SNAT range's 4 536 ports, so the NodePort row shows the sustained rate, not a burst.
/// Every destination gets at most 3 runs: each connection leaves a TIME_WAIT socket in the
/// client's namespace for 60 s, and past about 30 000 to one destination the client's connect()
/// slows down by itself (its search for a free port), which would be measured instead.
const CHURN_COUNT: usize = 8_000;
const CHURN_CONCURRENCY: &str = "8";
const CHURN_DEADLINE_S: &str = "15";
/// The wider SNAT range of the second NodePort churn row (outside node1's ip_local_port_range,
/// as the README advises).
const WIDE_SNAT_PORTS: &str = "1024-32767";
/// Two more server ports in the backend pod: the destinations of the wide-range churn rows and
/// of the churn without Ferry (see CHURN_COUNT).
const WIDE_PORT: u16 = 9100;
const BARE_PORT: u16 = 9101;

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `--verbose`: every run's figures as it ends (to see the spread behind a median).
static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Between runs: a Ctrl-C unwinds, so the lab's guards remove every namespace, pin and process.
fn checkpoint() {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        panic!("interrupted: tearing the lab down");
    }
}

/// The whole machine's CPU time so far, from the `cpu` line of /proc/stat, in seconds: `busy` is
/// user + nice + system + irq + softirq (guest time is inside user), `softirq` that column alone.
/// Every core and every process counts, not only the bench's. With tick accounting (this kernel
/// has no IRQ_TIME_ACCOUNTING) a tick that lands in softirq counts as softirq whether it ran in
/// a process's context, in ksoftirqd or on an idle core: the column holds all of it.
#[derive(Clone, Copy, Default)]
struct CpuTimes {
    busy: f64,
    softirq: f64,
}

impl CpuTimes {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let v: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // user nice system idle iowait irq softirq steal ...
        CpuTimes { busy: (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, softirq: v[6] / hz }
    }

    fn since(self, before: CpuTimes) -> CpuTimes {
        CpuTimes { busy: self.busy - before.busy, softirq: self.softirq - before.softirq }
    }

    /// How busy the machine is with the bench idle, in percent of all its cores, over one
    /// second: what other work adds to the CPU figures.
    fn background_percent() -> f64 {
        let before = CpuTimes::now();
        std::thread::sleep(Duration::from_secs(1));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuTimes::now().since(before).busy * 100.0 / cores as f64
    }
}

/// One measured path: where the client runs, where it connects.
#[derive(Clone, Copy)]
struct TPath<'a> {
    at: At<'static>,
    addr: &'a str,
}

/// One bulk run: Gbit/s each way, machine CPU over it, bytes moved.
#[derive(Clone, Copy)]
struct BulkSample {
    up_gbps: f64,
    down_gbps: f64,
    cpu: CpuTimes,
    bytes: u64,
}

/// A `key=value` field of a ferry-load bulk line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

fn bulk_once(c: &Cluster, p: TPath, bytes: u64) -> BulkSample {
    checkpoint();
    let n = bytes.to_string();
    let before = CpuTimes::now();
    let lines = c.load(p.at, &["bulk", p.addr, "--up", &n, "--down", &n, "--unverified", "--stall-s", "5", "--deadline-s", "30"]);
    let cpu = CpuTimes::now().since(before);
    let line = lines.iter().find(|l| l.starts_with("bulk ")).cloned().unwrap_or_default();
    assert_eq!(field(&line, "result"), "ok", "bulk from {:?} to {} failed: {lines:?}", p.at, p.addr);
    let num = |k: &str| field(&line, k).parse::<f64>().unwrap_or(0.0);
    if verbose() {
        eprintln!("bulk {:?} -> {}: {line} machine_cpu_s={:.2} softirq_s={:.2}", p.at, p.addr, cpu.busy, cpu.softirq);
    }
    BulkSample { up_gbps: num("up_gbps"), down_gbps: num("down_gbps"), cpu, bytes: 2 * bytes }
}

/// One churn run: completed connections per second, machine CPU over it, the tally and the
/// client's `failure KIND COUNT` lines.
struct ChurnSample {
    rate: f64,
    cpu: CpuTimes,
    ok: usize,
    failed: usize,
    failures: Vec<String>,
}

fn churn_once(c: &Cluster, p: TPath) -> ChurnSample {
    checkpoint();
    let count = CHURN_COUNT.to_string();
    let args = ["churn", p.addr, "--count", &count, "--concurrency", CHURN_CONCURRENCY, "--timeout-ms", "2000", "--deadline-s", CHURN_DEADLINE_S, "--max-failures", "100"];
    let before = CpuTimes::now();
    let lines = c.load(p.at, &args);
    let cpu = CpuTimes::now().since(before);
    let elapsed: f64 = lines.iter().find_map(|l| l.strip_prefix("elapsed_s ")).and_then(|r| r.split_whitespace().next()).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let last: Vec<&str> = lines.last().map(String::as_str).unwrap_or("").split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let (ok, failed) = match last.as_slice() {
        [ok, "ok", failed, "failed"] => (ok.parse().unwrap_or(0), failed.parse().unwrap_or(usize::MAX)),
        _ => panic!("churn from {:?} to {}: no tally: {lines:?}", p.at, p.addr),
    };
    assert!(ok > 0 && elapsed > 0.0, "churn from {:?} to {} made no connection: {lines:?}", p.at, p.addr);
    if verbose() {
        eprintln!("churn {:?} -> {}: {} machine_cpu_s={:.2} softirq_s={:.2}", p.at, p.addr, lines.join(" | "), cpu.busy, cpu.softirq);
    }
    let failures = lines.iter().filter(|l| l.starts_with("failure ") || l.starts_with("not-attempted ")).cloned().collect();
    ChurnSample { rate: ok as f64 / elapsed, cpu, ok, failed, failures }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` on `ferry` and on `base`, `rounds` times each, alternating which goes first.
fn paired<T>(rounds: usize, ferry: TPath, base: TPath, mut f: impl FnMut(TPath) -> T) -> (Vec<T>, Vec<T>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            a.push(f(ferry));
            b.push(f(base));
        } else {
            b.push(f(base));
            a.push(f(ferry));
        }
    }
    (a, b)
}

/// Against the baseline run of the same round: the median over rounds of `f(run) / f(base) - 1`,
/// as a percentage (a slow minute of the machine falls on both runs of a round, so this is
/// steadier than comparing the medians); empty for a row without paired baseline runs.
fn vs_base<T>(v: &[T], base: Option<&[T]>, f: impl Fn(&T) -> f64) -> String {
    match base {
        Some(b) => {
            let pct = 100.0 * median_f(v.iter().zip(b).map(|(r, b)| f(r) / f(b) - 1.0).collect());
            // No "-0%": under half a percent is no difference at this precision.
            if pct.abs() < 0.5 {
                "0%".into()
            } else {
                format!("{pct:+.0}%")
            }
        }
        None => String::new(),
    }
}

fn bulk_row(what: &str, v: &[BulkSample], base: Option<&[BulkSample]>) {
    let m = |f: &dyn Fn(&BulkSample) -> f64| median_f(v.iter().map(f).collect());
    let cpu_per_gb = |s: &BulkSample| s.cpu.busy / (s.bytes as f64 / 1e9);
    let (up, down) = (m(&|s| s.up_gbps), m(&|s| s.down_gbps));
    let (cpu, si) = (m(&cpu_per_gb), m(&|s| s.cpu.softirq / (s.bytes as f64 / 1e9)));
    let d_gbps = vs_base(v, base, |s| s.up_gbps + s.down_gbps);
    let d_cpu = vs_base(v, base, cpu_per_gb);
    let line = format!("{what:<58} | {up:>9.2} | {down:>11.2} | {cpu:>8.3} | {si:>12.3} | {d_gbps:>8} | {d_cpu:>8}");
    println!("{}", line.trim_end_matches([' ', '|']));
}

fn churn_row(what: &str, v: &[ChurnSample], base: Option<&[ChurnSample]>) {
    let cpu_per_conn = |s: &ChurnSample| s.cpu.busy * 1e6 / s.ok as f64;
    let rate = median_f(v.iter().map(|s| s.rate).collect());
    let us = median_f(v.iter().map(cpu_per_conn).collect());
    let failed: usize = v.iter().map(|s| s.failed).sum();
    let (d_rate, d_cpu) = (vs_base(v, base, |s| s.rate), vs_base(v, base, cpu_per_conn));
    let line = format!("{what:<58} | {rate:>8.0} | {us:>11.0} | {failed:>6} | {d_rate:>8} | {d_cpu:>8}");
    println!("{}", line.trim_end_matches([' ', '|']));
    for f in v.iter().flat_map(|s| &s.failures) {
        println!("{:<58} |   {f}", "");
    }
}

/// Bulk TCP and short connections through the namespace lab (`lab::Cluster` with the soak
/// suite's options: offloads on, `ferry-load` servers in every pod), each Ferry path beside the
/// same traffic that Ferry does not translate, in the same lab, alternating.
fn throughput_bench() {
    use bpf_tests::lab::{self, LabOptions, Svc, SvcPort, TempDir, LOAD_TCP_PORT};
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    // The agents and tools of this bench's own build (release under `cargo xtask bench`).
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    for b in ["dataplane-agent", "ferry-load", "ferry-echo"] {
        assert!(bin_dir.join(b).exists(), "{} missing: `cargo xtask bench` builds it", bin_dir.join(b).display());
    }
    lab::use_bin_dir(bin_dir.clone());
    let dir = TempDir::new(&format!("bench-{}", lab::run_id()));
    let backend = "n2-pod1";
    let svcs = [
        Svc::new("bench-nodeport", "NodePort", "10.96.1.11").port(SvcPort::new("TCP", 80, LOAD_TCP_PORT).node_port(30100)).pods(&[backend]),
        Svc::new("bench-clusterip", "ClusterIP", "10.96.1.10").port(SvcPort::new("TCP", 80, LOAD_TCP_PORT)).pods(&[backend]),
        // The same NodePort again, to another server port, for the churn rows with node1's wider
        // SNAT range.
        Svc::new("bench-nodeport-2", "NodePort", "10.96.1.12").port(SvcPort::new("TCP", 80, WIDE_PORT).node_port(30101)).pods(&[backend]),
    ];
    std::fs::write(dir.path.join("bench.yaml"), lab::services_yaml(&svcs)).unwrap();
    let mut c = Cluster::with_options(&dir.path, LabOptions::soak());
    c.add_load_server(backend, &[WIDE_PORT, BARE_PORT]);
    // The client's ephemeral ports (every connection ends in TIME_WAIT there, 60 s) must not be
    // the limit (see CHURN_COUNT).
    c.outside.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let direct = format!("{}:{LOAD_TCP_PORT}", lab::pod_ip_of(backend));
    let np = TPath { at: At::Outside, addr: "192.168.77.1:30100" };
    let np_base = TPath { at: At::Outside, addr: &direct };
    let cip = TPath { at: At::Pod("n1-pod1"), addr: "10.96.1.10:80" };
    let cip_base = TPath { at: At::Pod("n1-pod1"), addr: &direct };
    let np_wide = TPath { at: At::Outside, addr: "192.168.77.1:30101" };
    let wide_direct = format!("{}:{WIDE_PORT}", lab::pod_ip_of(backend));
    let np_wide_base = TPath { at: At::Outside, addr: &wide_direct };
    let bare_direct = format!("{}:{BARE_PORT}", lab::pod_ip_of(backend));
    let bare_base = TPath { at: At::Outside, addr: &bare_direct };

    let idle_before = CpuTimes::background_percent();
    // Without Ferry: the same lab before its agents start (no program attached anywhere).
    bulk_once(&c, np_base, 16 << 20);
    bulk_once(&c, cip_base, 16 << 20);
    let bare_np: Vec<_> = (0..BULK_ROUNDS).map(|_| bulk_once(&c, np_base, BULK_BYTES)).collect();
    let bare_cip: Vec<_> = (0..BULK_ROUNDS).map(|_| bulk_once(&c, cip_base, BULK_BYTES)).collect();
    let bare_churn: Vec<_> = (0..CHURN_ROUNDS).map(|_| churn_once(&c, bare_base)).collect();

    c.start_agents();
    // Every path once, small: it works, and ARP and caches are warm before timing.
    for p in [np, np_base, cip, cip_base] {
        bulk_once(&c, p, 16 << 20);
    }
    let (np_bulk, np_base_bulk) = paired(BULK_ROUNDS, np, np_base, |p| bulk_once(&c, p, BULK_BYTES));
    let (cip_bulk, cip_base_bulk) = paired(BULK_ROUNDS, cip, cip_base, |p| bulk_once(&c, p, BULK_BYTES));
    let (np_churn, np_base_churn) = paired(CHURN_ROUNDS, np, np_base, |p| churn_once(&c, p));
    // node1 again with a wider SNAT range (its maps and conntrack are re-adopted from the pins).
    c.opts.agent_args = vec!["--snat-ports".into(), WIDE_SNAT_PORTS.into()];
    c.stop_agent(0);
    c.start_agent(0);
    bulk_once(&c, np_wide, 16 << 20);
    bulk_once(&c, np_wide_base, 16 << 20);
    let (wide_churn, wide_base_churn) = paired(CHURN_ROUNDS, np_wide, np_wide_base, |p| churn_once(&c, p));
    let idle_after = CpuTimes::background_percent();
    let took = started.elapsed();
    drop(c);

    let mib = BULK_BYTES >> 20;
    println!("\nBulk TCP through the namespace lab: {mib} MiB up, then {mib} MiB down, one connection (median of {BULK_ROUNDS}; each Ferry row alternates with its baseline):");
    println!(
        "{:<58} | {:>9} | {:>11} | {:>8} | {:>12} | {:>8} | {:>8}",
        "path (server: pod on node2)", "up Gbit/s", "down Gbit/s", "CPU s/GB", "softirq s/GB", "Δ Gbit/s", "Δ CPU/GB"
    );
    println!("{}", "-".repeat(134));
    bulk_row("NodePort eTP=Cluster, outside -> node1:30100 (DNAT+SNAT)", &np_bulk, Some(&np_base_bulk));
    bulk_row("  baseline: outside -> pod IP, routed, not translated", &np_base_bulk, None);
    bulk_row("  no Ferry: the same, before the agents start", &bare_np, None);
    bulk_row("ClusterIP, pod on node1 -> 10.96.1.10:80 (DNAT)", &cip_bulk, Some(&cip_base_bulk));
    bulk_row("  baseline: pod on node1 -> pod IP, not translated", &cip_base_bulk, None);
    bulk_row("  no Ferry: the same, before the agents start", &bare_cip, None);
    println!("Gbit/s: payload over the client's time for each direction (up ends when the server has read it all; RAW: counted, not checked).");
    println!("CPU s/GB: the whole machine's user+nice+system+irq+softirq seconds from /proc/stat (both cores, every process: client, server,");
    println!("both nodes' softirq, the agents, and anything else running) over the run, per 10^9 payload bytes (up + down); softirq: that column.");
    println!("Baselines cross the same namespaces and veths with Ferry's programs attached (they look, match no Service, translate nothing).");
    println!("Δ: against the baseline run of the same round (median over rounds of Ferry/baseline - 1; Gbit/s: up + down).");
    println!("No Ferry: measured first, in the same lab before the agents start, so not alternated with the others: noisier.");

    println!("\nShort connections from outside: connect, one ECHO, close (client first), {CHURN_COUNT} a run, 8 at a time (median of {CHURN_ROUNDS}):");
    println!(
        "{:<58} | {:>8} | {:>11} | {:>6} | {:>8} | {:>8}",
        "path (server: pod on node2)", "conn/s", "CPU µs/conn", "failed", "Δ conn/s", "Δ CPU"
    );
    println!("{}", "-".repeat(116));
    churn_row("NodePort eTP=Cluster (DNAT+SNAT), SNAT ports 61000-65535", &np_churn, Some(&np_base_churn));
    churn_row("  baseline: outside -> pod IP, routed, not translated", &np_base_churn, None);
    churn_row("  no Ferry: the same, before the agents start", &bare_churn, None);
    churn_row(&format!("NodePort :30101 as above, node1 --snat-ports {WIDE_SNAT_PORTS}"), &wide_churn, Some(&wide_base_churn));
    churn_row("  baseline: outside -> pod IP, routed, not translated", &wide_base_churn, None);
    println!("conn/s: connections completed over the run's time; CPU µs/conn: machine CPU as above per completed connection; failed: all runs;");
    println!("Δ: against the baseline run of the same round, as above.");
    println!("A closed connection's SNAT port goes to a new one at once after its last ACK or a RST (else 2 s after its close): the default");
    println!("range's 4 536 ports hold only the connections in flight. The wider range (node1's agent restarted with it) shows the same path");
    println!("with many more ports: the difference between the two rows is what the default range costs, if anything.");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "Binaries: {} (agents, ferry-load); {took:.0?} in all. With the bench idle the machine was {idle_before:.0}% busy (of {cores} cores) before the runs, {idle_after:.0}% after.",
        bin_dir.display(),
    );
}
