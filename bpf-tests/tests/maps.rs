//! The map layer on real maps: pinning and re-adoption across restarts, the pinned-layout check,
//! a full map, BTF so bpftool prints named fields, and `trace` failing when it should.
use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use bpf_tests::{fixture::*, lab::{run_id, PinDir}, packet::*};
use dataplane_agent::{attach, bpf::BpfMaps, error::LoadError, loader, model, reconcile::Reconciler, sources::{manifests, Objects}};
use dataplane_common::{names, Lb4SlotKey};

const SVC: &str = r#"
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 172.30.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.1]}, {addresses: [10.0.1.2]}, {addresses: [10.0.1.3]}]
"#;

fn pin_dir() -> PinDir {
    PinDir { path: format!("/sys/fs/bpf/ferry-test-{}", run_id()).into() }
}

fn desired(yaml: &str) -> model::Desired {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    manifests::parse_str(yaml, "test", &mut objs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    model::translate(&objs.services, &objs.endpoint_slices, &model::NodeContext::default()).0
}

fn load_pinned(dir: &std::path::Path) -> (aya::Ebpf, BpfMaps) {
    let mut ebpf = loader::load_with(Some(dir), &loader::PRIVATE_CAPACITIES).unwrap();
    attach::load_programs(&mut ebpf).unwrap();
    let maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
    (ebpf, maps)
}

#[test]
fn pinned_maps_are_readopted_and_keep_conntrack() {
    let pin = pin_dir();
    let (ebpf, mut maps) = load_pinned(&pin.path);
    let mut rec = Reconciler::new();
    let (st, errs) = rec.sync(&desired(SVC), &Default::default(), &mut maps);
    assert!(errs.is_empty() && st.writes > 0);
    let before = run_prog(&ebpf, dataplane_common::progs::FROM_POD, &tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.10"), 80), true, b""));
    let backend = tuple(&before.data).dst;
    let applied = rec.applied.clone();
    drop((ebpf, maps, rec));

    // A restart: same pins, a fresh object. Everything is found again, nothing is rewritten.
    let (ebpf, mut maps) = load_pinned(&pin.path);
    let restored = maps.dump_applied();
    assert_eq!(restored.backends, applied.backends);
    assert_eq!(restored.frontends.keys().collect::<Vec<_>>(), applied.frontends.keys().collect::<Vec<_>>());
    for (fe, f) in &restored.frontends {
        assert_eq!((f.svc_id, &f.slots), (applied.frontends[fe].svc_id, &applied.frontends[fe].slots));
    }
    let mut rec = Reconciler::restore(restored);
    let (st, errs) = rec.sync(&desired(SVC), &Default::default(), &mut maps);
    assert!(errs.is_empty());
    assert_eq!((st.writes, st.deletes), (0, 0));
    // The connection tracked before the restart keeps its backend.
    let after = run_prog(&ebpf, dataplane_common::progs::FROM_POD, &tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.10"), 80), false, b"x"));
    assert_eq!(tuple(&after.data).dst, backend);
}

#[test]
fn a_pinned_map_with_another_layout_is_refused_by_name() {
    let pin = pin_dir();
    std::fs::create_dir_all(&pin.path).unwrap();
    let path = pin.path.join(names::SERVICES);
    let st = Command::new("bpftool")
        .args(["map", "create", path.to_str().unwrap(), "type", "hash", "key", "8", "value", "12", "entries", "16", "name", names::SERVICES, "flags", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    match loader::load(Some(&pin.path)) {
        Err(e @ LoadError::PinnedMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(path.to_str().unwrap()) && msg.contains("value size is 12, this build expects 20"), "{msg}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded over an incompatible pinned map"),
    }
}

#[test]
fn a_full_map_names_the_service_and_the_map_and_spares_the_rest() {
    let mut dp = Datapath::with_capacities(&[(names::BACKENDS, 2)]);
    let small = SVC.replace("endpoints: [{addresses: [10.0.1.1]}, {addresses: [10.0.1.2]}, {addresses: [10.0.1.3]}]", "endpoints: [{addresses: [10.0.1.1]}]");
    let big = SVC.replace("name: web,", "name: big,").replace("172.30.0.10", "172.30.0.20").replace("service-name: web", "service-name: big").replace("name: web-1", "name: big-1").replace("10.0.1.", "10.0.2.");
    let errors = dp.try_apply_yaml(&format!("{small}---\n{big}"));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("shop/big") && errors[0].contains("map lb4_be_v1 is full (2 entries)"), "{}", errors[0]);
    // The Service that fit is served.
    let r = dp.from_pod(&tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.10"), 80), true, b""));
    assert_eq!(tuple(&r.data).dst, ip("10.0.1.1"));
}

#[test]
fn bpftool_prints_named_fields() {
    let pin = pin_dir();
    let (_ebpf, mut maps) = load_pinned(&pin.path);
    Reconciler::new().sync(&desired(SVC), &Default::default(), &mut maps);
    let out = Command::new("bpftool").args(["map", "dump", "pinned"]).arg(pin.path.join(names::SERVICES)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for field in ["\"addr_be\"", "\"port_be\"", "\"proto\"", "\"scope\"", "\"svc_id\"", "\"count\"", "\"affinity_timeout_s\""] {
        assert!(text.contains(field), "{field} missing from:\n{text}");
    }
}

#[test]
fn trace_fails_a_wrong_expectation_and_a_bad_object() {
    let dir = std::env::temp_dir().join(format!("ferry-trace-{}", run_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrong = r#"
node: {name: n1, ips: [192.168.0.2], podCIDR: 10.0.0.0/24}
services:
- metadata: {name: web, namespace: default}
  spec: {clusterIP: 172.30.0.10, ports: [{port: 80, targetPort: 8080}]}
endpointSlices:
- metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{port: 8080}]
  endpoints: [{addresses: [10.0.1.1]}, {addresses: [10.0.1.2]}]
flows:
- {name: one backend missing from expect, proto: tcp, source: 10.0.0.2, destination: "172.30.0.10:80", expect: ["10.0.1.1:8080"]}
- {name: right, proto: tcp, source: 10.0.0.2, destination: "172.30.0.10:80", expect: ["10.0.1.1:8080", "10.0.1.2:8080"]}
- {name: not a drop, proto: tcp, source: 10.0.0.2, destination: "172.30.0.10:80", expect: DROP}
- {name: from outside, proto: tcp, source: 8.8.8.8, destination: "172.30.0.10:80", expect: ["10.0.1.1:8080", "10.0.1.2:8080"]}
"#;
    let bad = "node: {name: n1, ips: [192.168.0.2]}\nservices:\n- metadata: {name: broken, namespace: x}\n  spec: {clusterIP: 172.30.0.999, ports: [{port: 80}]}\nflows:\n- {name: f, proto: tcp, source: 10.0.0.2, destination: \"172.30.0.1:80\", expect: PASS}\n";
    std::fs::write(dir.join("wrong.yaml"), wrong).unwrap();
    std::fs::write(dir.join("bad.yaml"), bad).unwrap();
    let out = Command::new(bpf_tests::lab::agent_bin()).arg("trace").arg("--scenario").arg(dir.join("wrong.yaml")).arg(dir.join("bad.yaml")).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    // The invalid object is a failed line of its own; the file's flow still runs without it.
    assert_eq!(*lines.last().unwrap(), "3 passed, 3 failed", "{text}");
    assert!(text.contains("FAIL invalid object left out: Service x/broken"), "{text}");
    assert!(text.contains("ok   f:"), "{text}");
    assert!(text.contains("FAIL one backend missing from expect"), "{text}");
    assert!(text.contains("ok   right"), "{text}");
    assert!(text.contains("FAIL not a drop"), "{text}");
    // A ClusterIP reached from outside the node is translated, as kube-proxy does (no
    // clusterCIDR here, so nothing is masqueraded).
    assert!(text.contains("ok   from outside"), "{text}");
    assert!(text.contains("Service x/broken") && text.contains("spec.clusterIPs[0]"), "{text}");
}

/// `SVC` with the endpoints 10.0.1.`e`.
fn svc_with(endpoints: &[u8]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{{addresses: [10.0.1.{e}]}}")).collect();
    SVC.replace("endpoints: [{addresses: [10.0.1.1]}, {addresses: [10.0.1.2]}, {addresses: [10.0.1.3]}]", &format!("endpoints: [{}]", eps.join(", ")))
}

/// Entries in every map a frontend writes besides the service map: slots, backends, names,
/// counters (made by the datapath, none here), hashing tables, source ranges.
fn other_maps(maps: &BpfMaps) -> [(&'static str, usize); 6] {
    [
        (names::SLOTS, maps.slots.keys().count()),
        (names::BACKENDS, maps.backends.keys().count()),
        (names::SVC_NAMES, maps.svc_names.keys().count()),
        (names::SVC_STATS, maps.svc_stats.keys().count()),
        // Table entries handed out (a region no entry points at would stay counted).
        (names::CHASH, maps.table_usage().0 as usize),
        (names::SOURCE_RANGES, maps.source_ranges.keys().count()),
    ]
}

#[test]
fn a_full_service_map_leaks_nothing_into_the_other_maps_however_often_the_sync_is_retried() {
    // Room for one Service port and its ClusterIP marker. The second Service's frontend writes
    // its name, backends, slots and table, then finds the service map full: all of
    // that is taken out again, every time.
    let mut dp = Datapath::with_capacities(&[(names::SERVICES, 2)]);
    dp.apply_yaml(SVC);
    let before = other_maps(&dp.maps);
    let big = SVC.replace("name: web,", "name: big,").replace("172.30.0.10", "172.30.0.20").replace("service-name: web", "service-name: big").replace("name: web-1", "name: big-1").replace("10.0.1.", "10.0.2.");
    let both = format!("{SVC}---\n{big}");
    for retry in 0..30 {
        let errors = dp.try_apply_yaml(&both);
        let frontend_error = errors.iter().find(|e| e.contains("frontend")).unwrap_or_else(|| panic!("{errors:?}"));
        assert!(frontend_error.contains("Service shop/big:http") && frontend_error.contains("map lb4_svc_v3 is full (2 entries)"), "{frontend_error}");
        assert_eq!(other_maps(&dp.maps), before, "retry {retry}");
    }
    // The first Service is still served.
    let r = dp.from_pod(&tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.10"), 80), true, b""));
    assert!(tuple(&r.data).dst.octets()[..3] == [10, 0, 1], "{:?}", tuple(&r.data));
    // Once the first Service goes, the second one fits: with the next frontend id, as if its
    // 31 failed attempts had never been.
    dp.try_apply_yaml(&big);
    dp.apply_yaml(&big);
    let ids: Vec<u32> = dp.rec.applied.frontends.values().map(|f| f.svc_id).collect();
    assert_eq!(ids, vec![2]);
    let r = dp.from_pod(&tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.20"), 80), true, b""));
    assert!(tuple(&r.data).dst.octets()[..3] == [10, 0, 2], "{:?}", tuple(&r.data));
}

#[test]
fn a_backend_left_in_two_slots_by_a_crash_is_served_once_after_a_restart() {
    // Random picks, so slots carry the weight (with a table they are the fallback).
    let mut dp = Datapath::new();
    dp.rec.algorithm = dataplane_agent::reconcile::Algorithm::Random;
    dp.apply_yaml(&svc_with(&[1, 2, 3, 4]));
    let ids: Vec<u32> = (1..=4).map(|i| dp.rec.applied.backends.iter().find(|(b, _)| b.addr == ip(&format!("10.0.1.{i}"))).unwrap().1 .0).collect();
    let (id1, id2, id3, id4) = (ids[0], ids[1], ids[2], ids[3]);
    let svc_id = dp.rec.applied.frontends.values().next().unwrap().svc_id;
    // Removing backend 2 writes slot 1 := backend 4, then the count 3: a crash in between.
    dp.maps.slots.insert(Lb4SlotKey { svc_id, slot: 1 }, id4, 0).unwrap();
    // 3000 new connections (source port `port`, a new one each time: not tracked yet).
    let spread = |dp: &Datapath, port: u16| {
        let mut n: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for i in 0..3000u32 {
            let client = Ipv4Addr::from(0x0a64_0000 + i);
            *n.entry(tuple(&dp.from_pod(&tcp((client, port), (ip("172.30.0.10"), 80), true, b"")).data).dst).or_default() += 1;
        }
        n
    };
    // Torn: backend 4 in two of four slots gets half the new connections.
    let torn = spread(&dp, 4000);
    assert!(torn[&ip("10.0.1.4")] > 1300, "{torn:?}");

    // Restart: restore from the maps as they are, then sync to the Service without backend 2.
    let applied = dp.maps.dump_applied();
    let f = applied.frontends.values().next().unwrap();
    assert_eq!(f.slots.iter().map(|b| b.addr.octets()[3]).collect::<Vec<_>>(), vec![1, 4, 3, 4]);
    dp.rec = Reconciler::restore(applied);
    dp.rec.algorithm = dataplane_agent::reconcile::Algorithm::Random;
    dp.apply_yaml(&svc_with(&[1, 3, 4]));

    let entry = dp.maps.services.get(&dataplane_agent::reconcile::lb4_key(dp.rec.applied.frontends.keys().next().unwrap()), 0).unwrap();
    assert_eq!(entry.count, 3);
    let slots: Vec<u32> = (0..4).filter_map(|slot| dp.maps.slots.get(&Lb4SlotKey { svc_id, slot }, 0).ok()).collect();
    assert_eq!(slots, vec![id1, id4, id3], "each backend once, slot 3 gone");
    assert!(dp.maps.backends.get(&id2, 0).is_err(), "backend 2 is removed");
    let n = spread(&dp, 4001);
    assert_eq!(n.len(), 3, "{n:?}");
    assert!(n.values().all(|c| (800..1200).contains(c)), "{n:?}");
}

#[test]
fn pinned_maps_of_an_older_layout_are_named_as_unused() {
    let dir = pin_dir();
    let (_ebpf, _maps) = load_pinned(&dir.path);
    assert!(loader::unused_pins(&dir.path).is_empty(), "{:?}", loader::unused_pins(&dir.path));
    // What an agent of the previous layout left: its conntrack map under its old name.
    let old = dir.path.join("ct4_v1");
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old)
        .args(["type", "lru_hash", "key", "16", "value", "40", "entries", "16", "name", "ct4_v1"])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(loader::unused_pins(&dir.path), vec!["ct4_v1".to_string()]);
}

#[test]
fn a_new_conntrack_capacity_keeps_the_tracked_connections() {
    let pin = pin_dir();
    let (ebpf, mut maps) = load_pinned(&pin.path);
    let mut rec = Reconciler::new();
    rec.sync(&desired(SVC), &Default::default(), &mut maps);
    run_prog(&ebpf, dataplane_common::progs::FROM_POD, &tcp((ip("10.0.0.2"), 4000), (ip("172.30.0.10"), 80), true, b""));
    drop((ebpf, maps, rec));
    let listed = |dir: &std::path::Path| dataplane_agent::inspect::conntrack(dir).unwrap();
    assert!(listed(&pin.path).contains("10.0.0.2:4000"), "{}", listed(&pin.path));

    // A restart with twice the capacity (`--conntrack-capacity`): a bigger map, the same entries.
    let caps: Vec<(&'static str, u32)> = loader::PRIVATE_CAPACITIES.iter().map(|&(n, c)| (n, if n == names::CONNTRACK { c * 2 } else { c })).collect();
    let ebpf = loader::load_with(Some(&pin.path), &caps).unwrap();
    let fd = dataplane_agent::links::obj_get(&pin.path.join(names::CONNTRACK)).unwrap();
    let info = dataplane_agent::migrate::map_info(std::os::fd::AsFd::as_fd(&fd)).unwrap();
    assert_eq!(info.max_entries, caps.iter().find(|(n, _)| *n == names::CONNTRACK).unwrap().1);
    assert!(listed(&pin.path).contains("10.0.0.2:4000"), "{}", listed(&pin.path));
    drop(ebpf);
}

#[test]
fn a_map_of_another_recorded_layout_under_the_same_name_is_converted_field_by_field() {
    let pin = pin_dir();
    std::fs::create_dir_all(&pin.path).unwrap();
    // A backend map as a newer Ferry could have it: a `weight` field appended (12 bytes).
    let path = pin.path.join(names::BACKENDS);
    let st = Command::new("bpftool")
        .args(["map", "create", path.to_str().unwrap(), "type", "hash", "key", "4", "value", "12", "entries", "64", "name", names::BACKENDS, "flags", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    // Backend 7: 10.0.1.9:8080/TCP, flags 1, weight 5.
    let st = Command::new("bpftool")
        .args(["map", "update", "pinned", path.to_str().unwrap(), "key", "7", "0", "0", "0", "value", "10", "0", "1", "9", "0x1f", "0x90", "6", "1", "5", "0", "0", "0"])
        .status()
        .unwrap();
    assert!(st.success());
    dataplane_agent::migrate::record_one(&pin.path, names::BACKENDS, "key=4:value@0+4;value=12:addr_be@0+4,port_be@4+2,proto@6+1,flags@7+1,weight@8+4").unwrap();
    let ebpf = loader::load_with(Some(&pin.path), &loader::PRIVATE_CAPACITIES).unwrap();
    let fd = dataplane_agent::links::obj_get(&path).unwrap();
    let info = dataplane_agent::migrate::map_info(std::os::fd::AsFd::as_fd(&fd)).unwrap();
    assert_eq!((info.key_size, info.value_size), (4, 8));
    let mut maps = BpfMaps::from_pins(&pin.path).unwrap();
    let be = maps.dump_applied().backends;
    assert_eq!(be.len(), 1, "{be:?}");
    let (b, id) = be.iter().next().unwrap();
    assert_eq!((*id, b.addr, b.port), ((7, 1), ip("10.0.1.9"), 8080), "{be:?}");
    // Recorded now as this build's layout: the next start uses the pin as it is.
    assert!(dataplane_agent::migrate::recorded(&pin.path)[names::BACKENDS].starts_with("key=4:value@0+4;value=8:"));
    drop(ebpf);
}

#[test]
fn a_copy_an_interrupted_start_had_already_swapped_in_is_put_in_place() {
    use dataplane_agent::{attach::Attachments, links::obj_get, migrate::map_info};
    let pin = pin_dir();
    let cg = bpf_tests::lab::Cgroup::new(attach::cgroup2_root().expect("cgroup v2").join(format!("ferry-test-{}", run_id())));
    let id_of = |name: &str| obj_get(&pin.path.join(name)).ok().and_then(|fd| map_info(std::os::fd::AsFd::as_fd(&fd)).ok()).map(|i| (i.id, i.max_entries));
    let caps = |n: u32| -> Vec<(&'static str, u32)> { loader::PRIVATE_CAPACITIES.iter().copied().chain([(names::SERVICES, n)]).collect() };
    drop(loader::load_with(Some(&pin.path), &caps(1024)).unwrap());
    let (old_id, _) = id_of(names::SERVICES).unwrap();
    // A start with another capacity copies the Service map into a staged new map, swaps its
    // programs in (here the socket hooks, which read that map), and is killed before it puts the
    // new map in place.
    let (mut ebpf, migration) = loader::load_pinned(&pin.path, &caps(2048)).unwrap();
    attach::load_programs(&mut ebpf).unwrap();
    let mut att = Attachments::new(&pin.path);
    att.sync_cgroup(&mut ebpf, Some(&cg.path)).unwrap();
    let (staged_id, staged_cap) = id_of("new__lb4_svc_v3").expect("staged copy");
    assert_eq!(staged_cap, 2048);
    drop((migration, att, ebpf));
    // The next start: the staged copy is what the attached programs use, so it goes into place.
    let (ebpf, migration) = loader::load_pinned(&pin.path, &caps(2048)).unwrap();
    migration.finish().unwrap();
    assert_eq!(id_of(names::SERVICES), Some((staged_id, 2048)));
    assert!(id_of("new__lb4_svc_v3").is_none() && staged_id != old_id);
    drop(ebpf);
    // Links first, then the cgroup they hold.
    drop(pin);
}

#[test]
fn a_key_that_cannot_be_carried_field_for_field_is_refused_by_name() {
    let pin = pin_dir();
    drop(loader::load_with(Some(&pin.path), &loader::PRIVATE_CAPACITIES).unwrap());
    // As a newer Ferry could record it: the backend map's key field renamed. Entries cannot be
    // rebuilt key for key, so nothing is converted and the start is refused before any change.
    dataplane_agent::migrate::record_one(&pin.path, names::BACKENDS, "key=4:backend_id@0+4;value=8:addr_be@0+4,port_be@4+2,proto@6+1,flags@7+1").unwrap();
    match loader::load_with(Some(&pin.path), &loader::PRIVATE_CAPACITIES) {
        Err(e @ LoadError::KeyChanged { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(pin.path.join(names::BACKENDS).to_str().unwrap()) && msg.contains("dropped: backend_id") && msg.contains("the running datapath is untouched"), "{msg}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("converted a key it cannot rebuild"),
    }
    assert!(!pin.path.join("new__lb4_be_v1").exists());
}
