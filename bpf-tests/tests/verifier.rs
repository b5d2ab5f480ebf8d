//! How much of the verifier's budget (one million processed instructions per program) each
//! packet program uses. Adding code to the packet path multiplies the verifier's work along every
//! path; this keeps the margin visible and fails before a change makes a program unloadable on
//! a kernel that prunes less than this one.
use bpf_tests::fixture::Datapath;
use dataplane_common::progs;

#[test]
fn packet_programs_keep_verifier_headroom() {
    let dp = Datapath::new();
    for name in [progs::FROM_POD, progs::TO_POD, progs::FROM_WORLD, progs::TO_WORLD, progs::XDP_NODEPORT] {
        let p = dp.ebpf.program(name).unwrap();
        let info = p.info().unwrap();
        let n = info.verified_instruction_count().expect("kernel reports verified instructions (5.16+)");
        println!("{name}: {n} instructions verified of 1000000");
        assert!(n < 600_000, "{name}: {n} verified instructions: too close to the verifier's limit");
    }
}
