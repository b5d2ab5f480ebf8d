//! Consistent hashing on the real programs: the same flow picks the same backend on every node
//! and after an agent restart; every backend of a large Service gets its share of new
//! connections; removing a backend moves its own flows and a few others (Maglev, the default)
//! or exactly its own (rendezvous).
use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_tests::{fixture::*, lab::{run_id, PinDir}, packet::*};
use dataplane_agent::{
    attach,
    bpf::BpfMaps,
    loader, model,
    reconcile::{Algorithm, Reconciler},
    sources::{manifests, Objects},
};
use dataplane_common::{progs, Lb4Service};

fn web(endpoints: &[u8]) -> String {
    let eps: String = endpoints.iter().map(|e| format!("- addresses: [10.0.1.{e}]\n")).collect();
    format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec: {{clusterIP: 172.30.0.10, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
    )
}

/// A node that synced another Service before `yaml`'s: its backends got the first ids, so
/// `yaml`'s backends have other ids than on a node that synced `yaml` alone.
fn node_with_other_ids(yaml: &str) -> Datapath {
    let mut dp = Datapath::new();
    dp.apply_yaml(&other());
    dp.apply_yaml(&format!("{}{yaml}", other()));
    dp
}

/// Another Service, synced first on one node only (see `node_with_other_ids`).
fn other() -> String {
    "kind: Service\nmetadata: {name: other, namespace: t}\nspec: {clusterIP: 172.30.0.99, ports: [{port: 80}]}\n---\n\
     kind: EndpointSlice\nmetadata: {name: other-1, namespace: t, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{port: 80}]\n\
     endpoints: [{addresses: [10.9.0.1]}, {addresses: [10.9.0.2]}, {addresses: [10.9.0.3]}]\n---\n"
        .to_string()
}

/// The backend each of `n` distinct flows (client ports) picks, as a fresh connection.
fn picks(ebpf: &aya::Ebpf, n: u16) -> Vec<Ipv4Addr> {
    (0..n).map(|i| tuple(&run_prog(ebpf, progs::FROM_POD, &tcp((ip("10.0.0.2"), 10000 + i), (ip("172.30.0.10"), 80), true, b"")).data).dst).collect()
}

fn clear_conntrack(maps: &mut BpfMaps) {
    for r in maps.ct.rows() {
        maps.ct.remove(&r).unwrap();
    }
}

#[test]
fn the_same_flow_picks_the_same_backend_on_two_nodes() {
    let mut a = Datapath::new();
    a.apply_yaml(&web(&[1, 2, 3, 4, 5]));
    let b = node_with_other_ids(&web(&[5, 4, 3, 2, 1]));
    assert_ne!(a.rec.applied.backends[&l4("10.0.1.1:8080")].0, b.rec.applied.backends[&l4("10.0.1.1:8080")].0);
    let (pa, pb) = (picks(&a.ebpf, 600), picks(&b.ebpf, 600));
    assert_eq!(pa, pb);
    let mut spread: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for p in &pa {
        *spread.entry(*p).or_default() += 1;
    }
    assert_eq!(spread.len(), 5, "{spread:?}");
    assert!(spread.values().all(|n| *n > 60), "uneven: {spread:?}");
}

#[test]
fn the_same_flow_picks_the_same_backend_after_a_restart() {
    let pin = PinDir { path: format!("/sys/fs/bpf/ferry-test-{}", run_id()).into() };
    let desired = |yaml: &str| {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "t", &mut objs, &mut errors);
        model::translate(&objs.services, &objs.endpoint_slices, &model::NodeContext::default()).0
    };
    let load = || {
        let mut ebpf = loader::load_with(Some(&pin.path), &loader::PRIVATE_CAPACITIES).unwrap();
        attach::load_programs(&mut ebpf).unwrap();
        let maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        (ebpf, maps)
    };
    let (ebpf, mut maps) = load();
    Reconciler::new().sync(&desired(&web(&[1, 2, 3, 4])), &Default::default(), &mut maps);
    let before = picks(&ebpf, 400);
    drop((ebpf, maps));
    let (ebpf, mut maps) = load();
    let mut rec = Reconciler::restore(maps.dump_applied());
    let (st, _) = rec.sync(&desired(&web(&[1, 2, 3, 4])), &Default::default(), &mut maps);
    assert_eq!(st.writes, 0, "the restored tables are not rewritten");
    // Forget the connections: every flow chooses again, from the restored table.
    clear_conntrack(&mut maps);
    assert_eq!(picks(&ebpf, 400), before);
    // The restart adopted web's region from its service entry: a Service added now gets
    // another one, and web keeps picking as before.
    let both = format!("{}---\n{}", web(&[1, 2, 3, 4]), other());
    let (_, errs) = rec.sync(&desired(&both), &Default::default(), &mut maps);
    assert!(errs.is_empty(), "{errs:?}");
    let regions: Vec<(u32, u32)> = maps.services.iter().flatten().map(|(_, s)| s).filter(|s| s.table_len > 0).map(|s| (s.table_off, s.table_off + s.table_len)).collect();
    assert_eq!(regions.len(), 2, "{regions:?}");
    assert!(regions[0].1 <= regions[1].0 || regions[1].1 <= regions[0].0, "regions overlap: {regions:?}");
    clear_conntrack(&mut maps);
    assert_eq!(picks(&ebpf, 400), before);
}

/// Flows of backends other than the removed one that moved, out of 1000 flows.
fn others_moved(algorithm: Algorithm) -> (usize, usize) {
    let mut dp = Datapath::new();
    dp.rec.algorithm = algorithm;
    dp.apply_yaml(&web(&[1, 2, 3, 4, 5]));
    let before = picks(&dp.ebpf, 1000);
    dp.apply_yaml(&web(&[1, 2, 4, 5]));
    clear_conntrack(&mut dp.maps);
    let after = picks(&dp.ebpf, 1000);
    let gone = ip("10.0.1.3");
    let mut others_moved = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, gone);
        if *b != gone && b != a {
            others_moved += 1;
        }
    }
    let on_gone = before.iter().filter(|b| **b == gone).count();
    assert!(on_gone > 100, "{on_gone}");
    (others_moved, on_gone)
}

#[test]
fn with_rendezvous_removing_a_backend_moves_only_its_flows() {
    assert_eq!(others_moved(Algorithm::Rendezvous).0, 0);
}

#[test]
fn removing_a_backend_moves_its_flows_and_few_others() {
    let (others, on_gone) = others_moved(Algorithm::default());
    assert!(others * 100 < (1000 - on_gone) * 5, "{others} of {} other flows moved", 1000 - on_gone);
}

/// A Service with `n` endpoints (10.0.1.1, 10.0.1.2, ... counting on past .255 into 10.0.2.x).
fn web_n(n: u32) -> String {
    let eps: String = (0..n).map(|i| format!("- addresses: [{}]\n", Ipv4Addr::from(0x0a00_0101 + i))).collect();
    format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec: {{clusterIP: 172.30.0.10, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
    )
}

/// The backend each of `n` new connections picks: clients all over 10.100.0.0/16, source
/// ports spread pseudo-randomly over 1024..61024, as many pods' ephemeral ports would be.
/// (Not consecutive ports from a few clients: the datapath's flow hash XORs the address and the
/// ports before mixing, so such a pattern gives many flows the same hash.)
fn many_picks(ebpf: &aya::Ebpf, n: u32) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| {
            let client = Ipv4Addr::from(0x0a64_0000 + i % 65_536);
            let port = 1024 + (splitmix(i as u64) % 60_000) as u16;
            tuple(&run_prog(ebpf, progs::FROM_POD, &tcp((client, port), (ip("172.30.0.10"), 80), true, b"")).data).dst
        })
        .collect()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[test]
fn with_300_backends_every_backend_gets_new_connections_and_none_more_than_1_2x_the_mean() {
    // 300 000 flows: 1 000 per backend on average, so one backend's count has a standard
    // deviation of about 3% of the mean; 1.2x leaves the table's own unevenness (at most 1.1x)
    // plus more than five standard deviations.
    const BACKENDS: u32 = 300;
    const FLOWS: u32 = 300_000;
    let mut dp = Datapath::new();
    dp.apply_yaml(&web_n(BACKENDS));
    let got = many_picks(&dp.ebpf, FLOWS);
    let mut spread: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for p in &got {
        *spread.entry(*p).or_default() += 1;
    }
    let mean = FLOWS as f64 / BACKENDS as f64;
    let (min, max) = (spread.values().min().copied().unwrap_or(0), spread.values().max().copied().unwrap_or(0));
    assert_eq!(spread.len(), BACKENDS as usize, "{} backends got no new connection (busiest {max}, mean {mean:.0})", BACKENDS as usize - spread.len());
    assert!(max as f64 <= 1.2 * mean, "busiest backend got {max} new connections, {:.2}x the mean {mean:.0} (least {min})", max as f64 / mean);
}

#[test]
fn a_few_clients_consecutive_ports_spread_as_evenly_as_random_flows() {
    // Real traffic: a handful of clients, each walking its ephemeral ports. A flow hash that
    // mixes the fields only after combining them gives such flows far fewer distinct values (8
    // clients x 40 000 ports: 44 880), and some backends far more than their share.
    const BACKENDS: u32 = 300;
    let mut dp = Datapath::new();
    dp.apply_yaml(&web_n(BACKENDS));
    let mut spread: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    let flows = 8 * 30_000u32;
    for i in 0..flows {
        let client = Ipv4Addr::new(10, 100, 0, 1 + (i % 8) as u8);
        let port = 20_000 + (i / 8) as u16;
        let r = run_prog(&dp.ebpf, progs::FROM_POD, &tcp((client, port), (ip("172.30.0.10"), 80), true, b""));
        *spread.entry(tuple(&r.data).dst).or_default() += 1;
    }
    let mean = flows as f64 / BACKENDS as f64;
    let max = spread.values().max().copied().unwrap_or(0);
    assert_eq!(spread.len(), BACKENDS as usize);
    assert!(max as f64 <= 1.2 * mean, "busiest backend got {:.2}x the mean", max as f64 / mean);
}

#[test]
fn with_300_backends_two_nodes_with_different_backend_ids_pick_the_same_backends() {
    let mut a = Datapath::new();
    a.apply_yaml(&web_n(300));
    let b = node_with_other_ids(&web_n(300));
    let first = l4("10.0.1.1:8080");
    assert_ne!(a.rec.applied.backends[&first].0, b.rec.applied.backends[&first].0, "the nodes should number backends differently");
    let (pa, pb) = (many_picks(&a.ebpf, 30_000), many_picks(&b.ebpf, 30_000));
    let differ = pa.iter().zip(&pb).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} of 30000 flows picked different backends on the two nodes");
    assert_eq!(pa.iter().collect::<std::collections::BTreeSet<_>>().len(), 300);
}

#[test]
fn a_service_entry_without_a_table_picks_live_backends_at_random() {
    // What an entry migrated from `lb4_svc_v2` says until the first sync writes its table (the
    // old `table_size` field is gone: `table_off` and `table_len` start at 0).
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[1, 2, 3, 4, 5]));
    let key = dataplane_agent::reconcile::lb4_key(dp.rec.applied.frontends.keys().next().unwrap());
    let entry = dp.maps.services.get(&key, 0).unwrap();
    assert_eq!(entry.table_len, 251);
    dp.maps.services.insert(key, Lb4Service { table_off: 0, table_len: 0, ..entry }, 0).unwrap();
    clear_conntrack(&mut dp.maps);
    let got: std::collections::BTreeSet<Ipv4Addr> = picks(&dp.ebpf, 600).into_iter().collect();
    let want: std::collections::BTreeSet<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
    assert_eq!(got, want);
}

fn l4(s: &str) -> dataplane_agent::model::L4Addr {
    let (addr, port) = s.split_once(':').unwrap();
    dataplane_agent::model::L4Addr { addr: addr.parse().unwrap(), port: port.parse().unwrap(), proto: dataplane_agent::model::Proto::Tcp }
}

/// The table frontend `af`'s backends build (backend ids), which the maps must hold for it: the
/// reconciler keeps only its size and ids.
fn built_table(dp: &Datapath, af: &dataplane_agent::reconcile::AppliedFrontend) -> Vec<u32> {
    let of = af.table_backends().unwrap_or_else(|| panic!("frontend {}: its backends are known", af.svc_id));
    dataplane_agent::select::build_table(dp.rec.algorithm, &of).into_iter().map(|i| dp.rec.applied.backends[&of[i]].0).collect()
}

/// Frontend `svc_id`'s table as the kernel's own lookups of the flat array see it, at the region
/// its service entry points at.
fn kernel_table(dp: &Datapath, svc_id: u32) -> (Lb4Service, Vec<u32>) {
    let entry = dp.maps.services.iter().flatten().map(|(_, s)| s).find(|s| s.svc_id == svc_id).expect("a service entry");
    let table = (entry.table_off..entry.table_off + entry.table_len).map(|i| dp.maps.chash.get(&(i / 2), 0).unwrap()[(i % 2) as usize]).collect();
    (entry, table)
}

#[test]
fn tables_written_through_mmap_read_back_entry_by_entry() {
    // The agent fills tables as memory (4 bytes an entry, two an array element): a new table
    // (5), one patched in place (6, the same size and region), one in a new region (150). The
    // kernel's own per-entry lookups must see the same ids.
    let mut dp = Datapath::new();
    let mut regions = Vec::new();
    for (n, size) in [(5, 251), (6, 251), (150, 4093)] {
        dp.apply_yaml(&web_n(n));
        let af = dp.rec.applied.frontends.values().next().unwrap().clone();
        assert_eq!(af.table.len(), size);
        let (entry, kernel) = kernel_table(&dp, af.svc_id);
        assert_eq!(kernel, built_table(&dp, &af), "n={n}");
        assert_eq!(dp.maps.chash_table(af.svc_id).unwrap(), kernel);
        let ids: std::collections::BTreeSet<u32> = kernel.iter().copied().collect();
        assert_eq!((ids.len(), af.table.ids().len()), (n as usize, n as usize));
        regions.push((entry.table_off, entry.table_len));
    }
    assert_eq!(regions[0], regions[1], "a table of the same size is patched in place");
    assert!(regions[2].0 >= regions[1].0 + regions[1].1, "the larger table overlaps the region it replaced: {regions:?}");
}

#[test]
fn tables_past_the_first_mapped_window_read_back_and_only_a_window_over_them_is_mapped() {
    // The agent maps the array only as far as tables are written (a mapping of an array is
    // resident in full from mmap on): 300 tables of 1021 entries cross the first 1 MiB window
    // (262,144 entries), so the mapping grows while they are written, and every table, before
    // and after the growth, must read back as the kernel sees it.
    let mut dp = Datapath::new();
    dp.apply_yaml(&services(300, |_| 30));
    let (used, capacity) = dp.maps.table_usage();
    assert_eq!(used, 300 * 1021);
    for id in [1, 150, 256, 257, 300] {
        let (entry, kernel) = kernel_table(&dp, id);
        let fe = dp.rec.applied.frontends.values().find(|f| f.svc_id == id).unwrap();
        assert_eq!(kernel, built_table(&dp, fe), "frontend {id} at entries {}..", entry.table_off);
        assert_eq!(dp.maps.chash_table(id).unwrap(), kernel, "frontend {id}");
    }
    let mapped = dp.maps.tables_mapped_bytes();
    // The window at least doubles when it grows: at most twice what is in use, and a step.
    assert!(mapped >= used as usize * 4 && mapped <= 2 * used as usize * 4 + (1 << 20), "{mapped} bytes mapped for {used} entries in use");
    assert!(mapped < capacity as usize * 4, "{mapped} bytes mapped: the whole {capacity}-entry array");
    // A restart reads every table back through a fresh mapping, which grows the same way.
    let want = dp.rec.applied.frontends.clone();
    dp.maps.tables = Default::default();
    let back = dp.maps.dump_applied();
    assert_eq!(back.frontends.len(), 300);
    for (fe, a) in &want {
        assert_eq!(back.frontends[fe].table, a.table, "frontend {} read back after a restart", a.svc_id);
    }
    let restart = dp.maps.tables_mapped_bytes();
    assert!(restart >= used as usize * 4 && restart <= used as usize * 4 + (1 << 20), "{restart} bytes mapped to read {used} entries back (one window over them)");

    // The agent unmaps after each sync (the pages are the map's, not its own memory): one change
    // then maps a window at the table it patches, not the array's front up to it.
    dp.maps.unmap_tables();
    assert_eq!(dp.maps.tables_mapped_bytes(), 0);
    let addr = Ipv4Addr::from(0xac1e_0100 + 280);
    let id_of = |dp: &Datapath| dp.rec.applied.frontends.iter().find(|(fe, _)| fe.addr.addr == addr).map(|(_, a)| (a.svc_id, built_table(dp, a))).unwrap();
    let (id, before) = id_of(&dp);
    let off = kernel_table(&dp, id).0.table_off;
    dp.apply_yaml(&services(300, |i| if i == 280 { 31 } else { 30 }));
    let one = dp.maps.tables_mapped_bytes();
    assert!(one > 0 && one <= 2 * 4096, "{one} bytes mapped to patch one table at entry {off}: its pages");
    let (id2, after) = id_of(&dp);
    assert_eq!(id2, id);
    assert_ne!(after, before, "31 endpoints: another table");
    let (entry, kernel) = kernel_table(&dp, id);
    assert_eq!((entry.table_off, entry.table_len), (off, 1021), "patched in place");
    assert_eq!(kernel, after);
    // Two tables far apart in one change: each gets a window of its own, not all between them.
    dp.maps.unmap_tables();
    dp.apply_yaml(&services(300, |i| if i == 0 || i == 280 || i == 299 { 31 } else { 30 }));
    let two = dp.maps.tables_mapped_bytes();
    assert!(two > 0 && two <= 2 * 4096, "{two} bytes mapped after patching the first and the last table");
    for id in [1, 300] {
        let (entry, kernel) = kernel_table(&dp, id);
        assert_eq!(entry.table_len, 1021);
        let fe = dp.rec.applied.frontends.values().find(|f| f.svc_id == id).unwrap();
        assert_eq!(kernel, built_table(&dp, fe), "frontend {id}");
        // Read back through the window as the kernel has it, whichever side of it the table is.
        assert_eq!(dp.maps.chash_table(id).unwrap(), kernel, "frontend {id}");
    }
}

#[test]
fn every_backend_is_in_the_table_and_the_busiest_has_at_most_1_1x_the_mean() {
    // The balance target, read from the kernel's array: every size class and both sides
    // of its thresholds, up to 1 000 endpoints.
    let mut dp = Datapath::new();
    for n in [1u32, 2, 3, 25, 26, 102, 103, 300, 1000] {
        dp.apply_yaml(&web_n(n));
        let af = dp.rec.applied.frontends.values().next().unwrap().clone();
        let (entry, table) = kernel_table(&dp, af.svc_id);
        let mut per: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &table {
            *per.entry(*id).or_default() += 1;
        }
        let ids: std::collections::BTreeSet<u32> = af.slots.iter().map(|b| dp.rec.applied.backends[b].0).collect();
        assert_eq!(per.keys().copied().collect::<std::collections::BTreeSet<_>>(), ids, "n={n}: the table's backends are not the Service's");
        let mean = entry.table_len as f64 / n as f64;
        let max = *per.values().max().unwrap();
        assert!(max as f64 <= 1.1 * mean, "n={n}: busiest backend has {max} of {} entries, {:.3}x the mean", entry.table_len, max as f64 / mean);
        assert!(entry.table_len >= 10 * n, "n={n}: {} entries", entry.table_len);
    }
}

/// `n` Services `s0..`, each with the endpoints `eps` gives it.
fn services(n: u32, eps: impl Fn(u32) -> u32) -> String {
    (0..n)
        .map(|i| {
            let e: String = (0..eps(i)).map(|j| format!("- addresses: [{}]\n", Ipv4Addr::from(0x0a01_0000 + i * 256 + j))).collect();
            format!(
                "kind: Service\nmetadata: {{name: s{i}, namespace: t}}\nspec: {{clusterIP: {}, ports: [{{port: 80}}]}}\n---\n\
                 kind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: t, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 80}}]\nendpoints:\n{e}---\n",
                Ipv4Addr::from(0xac1e_0100 + i)
            )
        })
        .collect()
}

#[test]
fn a_replaced_region_is_reused_only_after_a_synchronize_point() {
    // s0 grows from 3 to 30 endpoints: its table moves to a 1021-entry region, and its old
    // 251-entry region may still be read by a program that read the old entry. New Services
    // synced right after must not get it; once a synchronize point has passed, they may.
    let mut dp = Datapath::new();
    dp.apply_yaml(&services(2, |_| 3));
    let s0 = kernel_table(&dp, 1).0;
    assert_eq!((s0.table_off, s0.table_len), (0, 251));
    dp.apply_yaml(&services(2, |i| if i == 0 { 30 } else { 3 }));
    assert_eq!(kernel_table(&dp, 1).0.table_len, 1021);
    let (used, _) = dp.maps.table_usage();
    assert_eq!(used, 251 + 251 + 1021, "the retired region is still counted as used");
    dp.apply_yaml(&services(4, |i| if i == 0 { 30 } else { 3 }));
    for id in [3, 4] {
        let e = kernel_table(&dp, id).0;
        assert!(e.table_off >= 251, "frontend {id} got entries {}.. of the retired region", e.table_off);
    }
    // Reclaimed after a synchronize point: best fit puts the next 251-entry table there.
    assert_eq!(dp.maps.reclaim_tables(std::time::Duration::ZERO).unwrap(), 251);
    dp.apply_yaml(&services(5, |i| if i == 0 { 30 } else { 3 }));
    assert_eq!(kernel_table(&dp, 5).0.table_off, 0);
    // Every frontend still picks only its own backends.
    for id in 1..=5u32 {
        let (_, t) = kernel_table(&dp, id);
        let fe = dp.rec.applied.frontends.values().find(|f| f.svc_id == id).unwrap();
        let own: std::collections::BTreeSet<u32> = fe.slots.iter().map(|b| dp.rec.applied.backends[b].0).collect();
        assert!(t.iter().all(|b| own.contains(b)), "frontend {id}'s table names another Service's backend");
    }
}

#[test]
fn a_full_table_array_names_the_frontend_and_leaves_everything_else_as_it_was() {
    // 1024 entries: four 251-entry tables fit, a fifth does not.
    let mut dp = Datapath::with_capacities(&[(dataplane_common::names::CHASH, 512)]);
    dp.apply_yaml(&services(4, |_| 3));
    let before: Vec<(Lb4Service, Vec<u32>)> = (1..=4).map(|id| kernel_table(&dp, id)).collect();
    let errors = dp.try_apply_yaml(&services(5, |_| 3));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("t/s4") && errors[0].contains("lb4_chash_flat_v1") && errors[0].contains("--lb-table-entries"), "{}", errors[0]);
    let after: Vec<(Lb4Service, Vec<u32>)> = (1..=4).map(|id| kernel_table(&dp, id)).collect();
    assert_eq!(before, after);
    assert_eq!(dp.maps.table_usage(), (1004, 1024));
    // The other frontends keep serving; the one that failed left no service entry.
    assert!(dp.maps.services.iter().flatten().all(|(_, s)| s.svc_id <= 4), "a service entry of the frontend that did not fit");
    clear_conntrack(&mut dp.maps);
    let r = run_prog(&dp.ebpf, progs::FROM_POD, &tcp((ip("10.0.0.2"), 10000), (ip("172.30.1.3"), 80), true, b""));
    assert!([ip("10.1.3.0"), ip("10.1.3.1"), ip("10.1.3.2")].contains(&tuple(&r.data).dst), "{:?}", tuple(&r.data));
}
