//! Consistent hashing on the real programs: the same flow picks the same backend on every node
//! and after an agent restart; removing a backend moves only its own flows (rendezvous, the
//! default) or its own and a few others (Maglev).
use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_tests::{fixture::*, lab::{run_id, PinDir}, packet::*};
use dataplane_agent::{
    attach,
    bpf::BpfMaps,
    loader, model,
    reconcile::{Algorithm, Reconciler},
    sources::{manifests, Objects},
};
use dataplane_common::progs;

fn web(endpoints: &[u8]) -> String {
    let eps: String = endpoints.iter().map(|e| format!("- addresses: [10.0.1.{e}]\n")).collect();
    format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec: {{clusterIP: 172.30.0.10, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
    )
}

/// Another Service, applied first on one node only, so its backend ids differ from the other's.
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
    let mut b = Datapath::new();
    b.apply_yaml(&format!("{}{}", other(), web(&[5, 4, 3, 2, 1])));
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
fn removing_a_backend_moves_only_its_flows() {
    assert_eq!(others_moved(Algorithm::Rendezvous).0, 0);
}

#[test]
fn with_maglev_removing_a_backend_moves_its_flows_and_few_others() {
    let (others, on_gone) = others_moved(Algorithm::Maglev);
    assert!(others * 100 < (1000 - on_gone) * 5, "{others} of {} other flows moved", 1000 - on_gone);
}
