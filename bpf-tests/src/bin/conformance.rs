//! `cargo xtask conformance`: Ferry against the real kube-proxy, flow by flow (see
//! `bpf_tests::conformance`). Also its own helpers, run inside the test's namespaces:
//! `conformance serve ...` and `conformance probe ...`.
use std::process::ExitCode;

use bpf_tests::conformance;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["serve", addrs, tcp, udp, sctp] => conformance::serve_main(addrs, tcp, udp, sctp),
        ["probe", src, dst, proto, count, timeout, cgroup] => {
            conformance::probe_main(src, dst, proto, count.parse().unwrap_or(1), timeout.parse().unwrap_or(400), cgroup).map(|_| true)
        }
        _ => conformance::main_run(&args),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("conformance: {e}");
            ExitCode::from(2)
        }
    }
}
