//! Anti-spoofing and frames that are not IPv4, on the real programs (BPF_PROG_TEST_RUN, run inside
//! a test namespace with two pod interfaces routed like a routed CNI's): a pod sends only with its
//! own address (IPv4 and ARP), nothing from outside claims this node's or its pods' addresses, no
//! VLAN tag leaves a pod, and only IPv4 and ARP reach or leave an isolated pod.
use std::net::Ipv4Addr;

use bpf_tests::{fixture::*, packet::*};
use dataplane_agent::{agent::PolicyState, trace::SkbIn};
use dataplane_common::{progs, DropReason, NodeConfig, CFG_F_SOURCE_CHECK};

const NODE: &str = "192.168.0.2";
/// A pod the agent knows, isolated by nothing.
const OPEN: &str = "10.0.0.11";
/// A pod the agent knows, isolated both ways.
const LOCKED: &str = "10.0.0.12";
/// A pod whose interface and route exist but which the agent has not seen yet (just started).
const NEW: &str = "10.0.0.13";

/// The test namespace with OPEN's, LOCKED's and NEW's interfaces (`ifs`, in that order).
fn node() -> bpf_tests::podnet::PodNet {
    bpf_tests::podnet::PodNet::new("gd", NODE, &[OPEN, LOCKED, NEW])
}

const PODS: &str = "\
kind: Pod\nmetadata: {name: open, namespace: t, labels: {app: open}}\nspec: {nodeName: node1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.11}\n---\n\
kind: Pod\nmetadata: {name: locked, namespace: t, labels: {app: locked}}\nspec: {nodeName: node1, containers: [{name: c}]}\nstatus: {podIP: 10.0.0.12}\n---\n\
kind: NetworkPolicy\nmetadata: {name: lock, namespace: t}\nspec: {podSelector: {matchLabels: {app: locked}}, policyTypes: [Ingress, Egress]}\n";

/// The datapath of node1 in the test namespace, anti-spoofing on or off, pods and policy applied
/// through the agent's own code (which finds each pod's interface by its route).
fn datapath(check: bool) -> Datapath {
    let mut dp = Datapath::new();
    let mut pol = PolicyState::default();
    dp.apply_policy_yaml(PODS, &mut pol);
    let flags = if check { CFG_F_SOURCE_CHECK } else { 0 };
    dp.maps.set_config(NodeConfig { snat_addr_be: u32::from_ne_bytes(ip(NODE).octets()), snat_port_min: 61000, snat_port_max: 65535, flags, ..Default::default() }).unwrap();
    dp
}

fn on(ifindex: u32) -> SkbIn {
    SkbIn { ifindex, ..Default::default() }
}

/// Runs `prog` with the packet arriving on `ifindex`: the action and the drop counted, if any.
fn verdict(dp: &Datapath, prog: &str, pkt: &[u8], ifindex: u32) -> (u32, Option<&'static str>) {
    let before = dp.maps.stat_totals();
    let r = if prog == progs::XDP_NODEPORT { dp.run(prog, pkt) } else { dp.run_skb(prog, pkt, &on(ifindex)).0 };
    let after = dp.maps.stat_totals();
    let reason = DropReason::ALL.iter().find(|d| after[d.stat() as usize] > before[d.stat() as usize]).map(|d| d.name());
    (r.action, reason)
}

fn udp_from(src: &str, dst: &str) -> Vec<u8> {
    udp((ip(src), 40000), (ip(dst), 53), b"q")
}

/// An Ethernet/IPv4 ARP packet: `op` 1 request, 2 reply.
fn arp(op: u16, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x11]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x11]);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A minimal IPv6 UDP frame (the datapath decides IPv4 only; it must never pass unpoliced).
fn ipv6() -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x22, 0x02, 0, 0, 0, 0, 0x11, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 9, 17, 64]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 9, 0, 0, b'q']);
    f
}

/// `pkt` (an Ethernet frame) with an 802.1Q tag of VLAN `vid` after the MAC addresses.
fn tagged(pkt: &[u8], vid: u16) -> Vec<u8> {
    let mut f = pkt[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&pkt[12..]);
    f
}

#[test]
fn a_pod_sends_only_with_its_own_address() {
    let n = node();
    let dp = datapath(true);
    let [open_if, locked_if, new_if] = n.ifs[..] else { unreachable!() };
    let cases: [(&str, Vec<u8>, u32, Option<&str>); 8] = [
        ("its own address", udp_from(OPEN, "10.0.5.5"), open_if, None),
        ("another local pod's address", udp_from(LOCKED, "10.0.5.5"), open_if, Some("spoofed_source")),
        ("the node's address", udp_from(NODE, "10.0.0.12"), open_if, Some("spoofed_source")),
        ("a remote pod's address", udp_from("10.0.1.40", "10.0.0.12"), open_if, Some("spoofed_source")),
        ("0.0.0.0", udp_from("0.0.0.0", "10.0.5.5"), open_if, Some("spoofed_source")),
        ("its own, from another pod's interface", udp_from(OPEN, "10.0.5.5"), locked_if, Some("spoofed_source")),
        ("a pod the agent has not seen yet, its own (routed) address", udp_from(NEW, "10.0.5.5"), new_if, None),
        ("that new pod claiming another address", udp_from("10.0.0.99", "10.0.5.5"), new_if, Some("spoofed_source")),
    ];
    let mut bad = Vec::new();
    for (what, pkt, ifindex, want) in cases {
        let (action, reason) = verdict(&dp, progs::FROM_POD, &pkt, ifindex);
        let ok = match want {
            None => action != TC_ACT_SHOT,
            Some(r) => action == TC_ACT_SHOT && reason == Some(r),
        };
        if !ok {
            bad.push(format!("{what}: want {want:?}, got action {action} reason {reason:?}"));
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn arp_from_a_pod_claims_only_its_own_address() {
    let n = node();
    let dp = datapath(true);
    let open_if = n.ifs[0];
    for (what, pkt, want) in [
        ("a request from its own address", arp(1, ip(OPEN), ip("10.0.0.1")), None),
        ("an address probe (sender 0.0.0.0)", arp(1, Ipv4Addr::UNSPECIFIED, ip(OPEN)), None),
        ("a reply claiming another pod's address", arp(2, ip(LOCKED), ip("10.0.0.1")), Some("spoofed_arp")),
        ("a gratuitous announcement of the node's address", arp(1, ip(NODE), ip(NODE)), Some("spoofed_arp")),
    ] {
        let (action, reason) = verdict(&dp, progs::FROM_POD, &pkt, open_if);
        match want {
            None => assert_ne!(action, TC_ACT_SHOT, "{what}: dropped ({reason:?})"),
            Some(r) => assert_eq!((action, reason), (TC_ACT_SHOT, Some(r)), "{what}"),
        }
    }
}

#[test]
fn nothing_from_outside_claims_this_node_or_its_pods() {
    let _n = node();
    let dp = datapath(true);
    for src in [OPEN, LOCKED, NODE] {
        let pkt = udp_from(src, LOCKED);
        for prog in [progs::FROM_WORLD, progs::XDP_NODEPORT] {
            let (action, reason) = verdict(&dp, prog, &pkt, 0);
            let dropped = if prog == progs::XDP_NODEPORT { action == 1 } else { action == TC_ACT_SHOT };
            assert!(dropped && reason == Some("spoofed_source"), "{prog} from outside claiming {src}: action {action} reason {reason:?}");
        }
    }
    // Someone else's address comes in as before.
    let (action, reason) = verdict(&dp, progs::FROM_WORLD, &udp_from("10.0.1.40", OPEN), 0);
    assert_ne!(action, TC_ACT_SHOT, "{reason:?}");
}

#[test]
fn no_vlan_tag_leaves_a_pod() {
    let n = node();
    let dp = datapath(true);
    for vid in [0u16, 7] {
        let (action, reason) = verdict(&dp, progs::FROM_POD, &tagged(&udp_from(OPEN, "10.0.5.5"), vid), n.ifs[0]);
        assert_eq!((action, reason), (TC_ACT_SHOT, Some("vlan_from_pod")), "VLAN {vid}");
        // Two tags, the outer one VLAN 0: the kernel strips it and looks inside.
        let (action, reason) = verdict(&dp, progs::FROM_POD, &tagged(&tagged(&udp_from(LOCKED, "10.0.5.5"), 0), vid), n.ifs[1]);
        assert_eq!((action, reason), (TC_ACT_SHOT, Some("vlan_from_pod")), "double tag, inner VLAN {vid}");
    }
}

#[test]
fn only_ipv4_and_arp_reach_or_leave_an_isolated_pod() {
    let n = node();
    let dp = datapath(true);
    let [open_if, locked_if, _] = n.ifs[..] else { unreachable!() };
    // Into and out of the isolated pod: IPv6 dropped, ARP passes.
    for prog in [progs::TO_POD, progs::FROM_POD] {
        assert_eq!(verdict(&dp, prog, &ipv6(), locked_if), (TC_ACT_SHOT, Some("not_ipv4_isolated")), "{prog}: IPv6, isolated pod");
        assert_ne!(verdict(&dp, prog, &ipv6(), open_if).0, TC_ACT_SHOT, "{prog}: IPv6, pod isolated by nothing");
    }
    assert_ne!(verdict(&dp, progs::TO_POD, &arp(1, ip("10.0.0.1"), ip(LOCKED)), locked_if).0, TC_ACT_SHOT, "ARP into the isolated pod");
    assert_ne!(verdict(&dp, progs::FROM_POD, &arp(2, ip(LOCKED), ip("10.0.0.1")), locked_if).0, TC_ACT_SHOT, "ARP from the isolated pod");
}

#[test]
fn with_the_check_off_a_pod_may_use_any_source_but_outside_still_may_not() {
    let n = node();
    let dp = datapath(false);
    assert_ne!(verdict(&dp, progs::FROM_POD, &udp_from("10.0.1.40", "10.0.5.5"), n.ifs[0]).0, TC_ACT_SHOT, "--pod-source-check off");
    assert_eq!(verdict(&dp, progs::FROM_WORLD, &udp_from(OPEN, LOCKED), 0), (TC_ACT_SHOT, Some("spoofed_source")));
}
