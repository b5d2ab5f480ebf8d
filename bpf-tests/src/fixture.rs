//! A private copy of the datapath (nothing pinned), provisioned through the agent's own
//! translation and reconcile code, with helpers to push packets through `BPF_PROG_TEST_RUN`.
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use dataplane_agent::{attach, bpf::BpfMaps, loader, model, reconcile::{Cidr4, Reconciler}, sources::{manifests, Objects}};
use std::collections::BTreeSet;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: BpfMaps,
    pub rec: Reconciler,
    pub cidrs: BTreeSet<Cidr4>,
}

/// Result of one run: the program's return value and the packet it left behind.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub data: Vec<u8>,
}

impl Datapath {
    pub fn new() -> Self {
        let mut ebpf = loader::load(None).expect("load eBPF object (run `cargo xtask build-ebpf`)");
        attach::load_programs(&mut ebpf).expect("verifier accepts every program");
        let maps = BpfMaps::from_ebpf(&mut ebpf).unwrap();
        Datapath { ebpf, maps, rec: Reconciler::new(), cidrs: BTreeSet::new() }
    }

    /// Provisions the maps from Kubernetes YAML through the agent's translation and reconciler.
    pub fn apply_yaml(&mut self, yaml: &str) {
        let mut objs = Objects::default();
        let mut errors = Vec::new();
        manifests::parse_str(yaml, "test", &mut objs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let (desired, errors) = model::translate(&objs.services, &objs.endpoint_slices);
        assert!(errors.is_empty(), "{errors:?}");
        let (_, errors) = self.rec.sync(&desired, &self.cidrs, &mut self.maps);
        assert!(errors.is_empty(), "{errors:?}");
    }

    pub fn run(&self, prog: &str, pkt: &[u8]) -> Run {
        run_prog(&self.ebpf, prog, pkt)
    }

    pub fn from_pod(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::FROM_POD, pkt)
    }

    pub fn to_pod(&self, pkt: &[u8]) -> Run {
        self.run(dataplane_common::progs::TO_POD, pkt)
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
    let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let mut opts = TestRunOptions::default();
    opts.data_in = Some(pkt);
    opts.data_out = Some(&mut out);
    let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    Run { action: r.return_value, data: out }
}
