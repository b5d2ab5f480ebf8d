//! A private copy of the datapath (nothing pinned), provisioned through the agent's own
//! translation and reconcile code, with helpers to push packets through `BPF_PROG_TEST_RUN`.
use aya::Ebpf;
use dataplane_agent::{attach, bpf::BpfMaps, loader, model, reconcile::{Cidr4, Reconciler}, sources::{manifests, Objects}};
use std::collections::BTreeSet;

pub use dataplane_agent::trace::{Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pub rec: Reconciler,
    pub cidrs: BTreeSet<Cidr4>,
    /// The node the datapath belongs to (default: node1 at 192.168.0.2).
    pub node: model::NodeContext,
}

impl Datapath {
    pub fn new() -> Self {
        Self::with_capacities(&[])
    }

    /// A datapath whose named maps hold at most the given number of entries.
    pub fn with_capacities(caps: &[(&'static str, u32)]) -> Self {
        let mut all = loader::PRIVATE_CAPACITIES.to_vec();
        all.extend_from_slice(caps);
        let mut ebpf = loader::load_with(None, &all).expect("load eBPF object (run `cargo xtask build-ebpf`)");
        attach::load_programs(&mut ebpf).expect("verifier accepts every program");
        let maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        let node = model::NodeContext { name: "node1".into(), ips: vec!["192.168.0.2".parse().unwrap()], nodeport_addresses: vec![], nodeport_primary: false, zone: None, masquerade_all: false };
        let mut maps = maps;
        maps.set_config(dataplane_common::NodeConfig { snat_addr_be: u32::from_ne_bytes([192, 168, 0, 2]), snat_port_min: 61000, snat_port_max: 65535, refusals_per_s: dataplane_common::REFUSALS_UNLIMITED, ..Default::default() }).unwrap();
        Datapath { ebpf, maps, rec: Reconciler::new(), cidrs: BTreeSet::new(), node }
    }

    /// Provisions the maps from Kubernetes YAML through the agent's translation and reconciler.
    pub fn apply_yaml(&mut self, yaml: &str) {
        let errors = self.try_apply_yaml(yaml);
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Like `apply_yaml`, returning the map errors instead of panicking on them.
    pub fn try_apply_yaml(&mut self, yaml: &str) -> Vec<String> {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "test", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let (desired, errors) = model::translate(&objs.services, &objs.endpoint_slices, &self.node);
        assert!(errors.is_empty(), "{errors:?}");
        self.rec.host_addrs = self.node.ips.iter().copied().collect();
        let (_, errors) = self.rec.sync(&desired, &self.cidrs, &mut self.maps);
        errors
    }

    /// Compiles the Pods, Namespaces and NetworkPolicies of `yaml` into the policy maps (through
    /// the agent's own translation and diff); returns (writes, deletes).
    pub fn apply_policy_yaml(&mut self, yaml: &str, pol: &mut dataplane_agent::agent::PolicyState) -> (usize, usize) {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "test", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let (w, d, errors, map_errors) = pol.sync(&mut self.maps, &objs, &self.node);
        assert!(errors.is_empty() && map_errors.is_empty(), "{errors:?} {map_errors:?}");
        (w, d)
    }

    pub fn run(&self, prog: &str, pkt: &[u8]) -> Run {
        run_prog(&self.ebpf, prog, pkt)
    }

    /// Runs a packet the kernel itself may refuse to test-run (it rejects an IPv4 frame too short
    /// to hold an IPv4 header with EINVAL before the program sees it): `None` then.
    pub fn try_run(&self, prog: &str, pkt: &[u8]) -> Option<Run> {
        match dataplane_agent::trace::test_run(&self.ebpf, prog, pkt) {
            Ok(r) => Some(r),
            Err(e) if e.contains("os error 22") && pkt.len() < 14 + 20 && pkt.get(12..14) == Some(&[8, 0]) => None,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn from_pod(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::FROM_POD, pkt)
    }

    pub fn to_pod(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::TO_POD, pkt)
    }

    /// The XDP NodePort program (`--nodeport-acceleration=xdp`).
    pub fn xdp(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::XDP_NODEPORT, pkt)
    }

    pub fn from_world(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::FROM_WORLD, pkt)
    }

    /// The to-world program as the node's own stack meets it (no input interface).
    pub fn to_world(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::TO_WORLD, pkt)
    }

    /// A test run with `__sk_buff` fields set (mark, device, GSO); returns the run and the mark
    /// the program left.
    pub fn run_skb(&self, prog: &str, pkt: &[u8], skb: &dataplane_agent::trace::SkbIn) -> (Run, u32) {
        dataplane_agent::trace::test_run_skb(&self.ebpf, prog, pkt, skb).unwrap()
    }

    pub fn stat(&self, index: u32) -> u64 {
        self.maps.stat_totals()[index as usize]
    }
}

impl Default for Datapath {
    fn default() -> Self {
        Self::new()
    }
}

pub fn run_prog(ebpf: &Ebpf, prog: &str, pkt: &[u8]) -> Run {
    dataplane_agent::trace::test_run(ebpf, prog, pkt).unwrap()
}
