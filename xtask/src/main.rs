//! Orchestration: `cargo xtask setup | build-ebpf | test | lab | bench | cluster | conformance`.
//!
//! The eBPF crate is built with a different compiler than the rest (see ../shared/toolchain.md):
//! Debian's rustc with its prebuilt `core` for bpfel-unknown-none, or, where that is missing,
//! rustup nightly with rust-src and `-Z build-std=core`.
mod cluster;
mod k8s;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    // Only a *recommended* package of rustc-web, and the one that provides /usr/bin/cargo: with
    // --no-install-recommends it must be named, or build-ebpf finds no compiler on a fresh machine.
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "bpftool",
    "iproute2",
    // The test control plane's certificates and readiness checks (cargo xtask cluster).
    "openssl",
    "curl",
    // Unpacks the Go toolchain module on a machine without Go (xtask/src/k8s.rs).
    "unzip",
    "iptables",
    "nftables",
    "iputils-ping",
    // The soak suite's lab checks TSO/GSO and turns GRO on for its veths (bpf-tests/src/lab.rs).
    "ethtool",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build-ebpf") => build_ebpf(),
        Some("test") => test(&args[1..]),
        Some("lab") => lab(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("conformance") => conformance(&args[1..]),
        Some("cluster") => match args.get(1).map(String::as_str) {
            Some("up") => k8s::bin_dir(&root()).and_then(|bins| cluster::up(&root(), &bins)),
            Some("down") => cluster::down(&root()),
            _ => Err(anyhow::anyhow!("usage: cargo xtask cluster up|down")),
        },
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n  setup       install the toolchain (root; idempotent) and mount bpffs\n  build-ebpf  build the kernel programs (release, BTF)\n  test        set up, build, and run every test: unit, bpf-tests, end-to-end, scenario files\n  lab         build a two-node cluster in network namespaces and show Ferry balancing it\n              (--api-server: its objects from a real control plane, as cluster up starts it)\n  cluster     up|down: a real control plane (etcd, kube-apiserver, kube-controller-manager) in its own network namespace
  conformance [--scenarios DIR|FILE]... [--verbose]: every flow of the scenario files sent for real through the real kube-proxy
              (nftables mode) and through Ferry, fed by a real API server; one line per flow that differs, `N agree, M differ` last
  bench       ns per packet, sync times, network programming against a real API server (Ferry, kube-proxy nftables and iptables),\n              and throughput through the namespace lab, each beside a baseline measured in the same run\n              (--no-throughput: without the lab; --throughput-only: the lab alone; --control-plane-only [--services 1000,10000]:\n              network programming alone; --sync-only: per-packet and sync times alone;\n              --scale-only [--services 10000,100000]: the agent itself at 10,000 and 100,000 Services from --manifests, started and restarted)"
            );
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")))
}

/// Installs everything in ../shared/toolchain.md that is missing, and nothing that is there.
fn setup() -> Result<()> {
    if !is_root() {
        bail!("setup installs packages and mounts bpffs: run it as root (sudo -E cargo xtask setup)");
    }
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
    } else if Path::new("/usr/bin/apt-get").exists() {
        println!("setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update")).context("apt-get update")?;
        run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
            .with_context(|| format!("apt-get install {}: these packages are needed (see ../shared/toolchain.md)", missing.join(" ")))?;
    } else {
        println!("setup: no apt-get here: the Debian route is unavailable; build-ebpf will look for rustup nightly with rust-src");
    }
    if bpf_linker_ok() {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("cargo install bpf-linker (needs llvm-22-dev and libpolly-22-dev)")?;
    }
    if bpffs_mounted() {
        println!("setup: /sys/fs/bpf mounted");
    } else {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).context("mounting bpffs on /sys/fs/bpf")?;
        println!("setup: mounted bpffs on /sys/fs/bpf");
    }
    k8s::build(&root())?;
    Ok(())
}

fn build_ebpf() -> Result<()> {
    let root = root();
    let mut cmd;
    if Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_CARGO).exists() && Path::new(DEBIAN_BPF_CORE).exists() {
        // Debian route: prebuilt core for the BPF target replaces build-std.
        cmd = Command::new(DEBIAN_CARGO);
        cmd.args(["build", "--release", "--ignore-rust-version", "--target", "bpfel-unknown-none", "-p", "dataplane-ebpf"])
            .env("RUSTC", DEBIAN_RUSTC)
            // aya-ebpf uses unstable features on the BPF target.
            .env("RUSTC_BOOTSTRAP", "1");
    } else if ok(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        && Command::new("rustup")
            .args(["component", "list", "--toolchain", "nightly", "--installed"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
    {
        cmd = Command::new("cargo");
        cmd.args(["+nightly", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core", "-p", "dataplane-ebpf"]);
    } else {
        bail!(
            "no compiler for the BPF target: need either Debian's rustc-web and libstd-rust-web-dev-bpf ({DEBIAN_RUSTC}, {DEBIAN_BPF_CORE}: `cargo xtask setup` installs them), or rustup nightly with rust-src (`rustup toolchain install nightly --component rust-src`)"
        );
    }
    if !bpf_linker_ok() {
        bail!("bpf-linker {BPF_LINKER_VERSION} not found on PATH: run `cargo xtask setup`");
    }
    // BTF (debuginfo + --btf) so that bpftool prints named fields of every map.
    cmd.current_dir(&root).env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf").env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(&mut cmd).context("building dataplane-ebpf")?;
    println!("build-ebpf: {}", root.join("target/bpfel-unknown-none/release/dataplane-ebpf").display());
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build_all() -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--workspace", "--exclude", "dataplane-ebpf", "--bins"]))
}

/// One suite's result for the summary.
struct Suite {
    name: &'static str,
    ok: bool,
    passed: usize,
    failed: usize,
}

/// Runs a test step, echoing its output, and counts what its runners report: cargo's
/// `test result: ok. N passed; M failed` and trace's `N passed, M failed`.
fn run_counted(cmd: &mut Command) -> (bool, usize, usize) {
    use std::io::{BufRead, BufReader};
    let mut child = match cmd.stdout(std::process::Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("starting {cmd:?}: {e}");
            return (false, 0, 1);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok) {
        println!("{line}");
        let l = line.trim_start_matches("test result: ok. ").trim_start_matches("test result: FAILED. ");
        let mut words = l.split(|c: char| c == ' ' || c == ';' || c == ',').filter(|w| !w.is_empty());
        // `N passed, M failed`, and the conformance run's `N agree, M differ`.
        if let (Some(p), Some("passed" | "agree"), Some(f), Some("failed" | "differ")) = (words.next(), words.next(), words.next(), words.next()) {
            if let (Ok(p), Ok(f)) = (p.parse::<usize>(), f.parse::<usize>()) {
                passed += p;
                failed += f;
            }
        }
    }
    let ok = child.wait().is_ok_and(|s| s.success());
    (ok, passed, failed)
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    build_all()?;
    let mut suites = Vec::new();
    let mut step = |name: &'static str, cmd: &mut Command| {
        println!("\n=== {name}");
        let (ok, passed, failed) = run_counted(cmd);
        suites.push(Suite { name, ok, passed, failed });
    };
    step("unit tests (no root needed)", cargo().args(["test", "-p", "dataplane-common", "-p", "dataplane-agent", "-p", "xtask"]).args(args));
    // Packet tests and end-to-end tests load the real programs; the e2e ones build namespaces,
    // one test at a time so their traffic and timing do not compete on a small machine. Every test
    // file runs even after one fails (--no-fail-fast), so the summary counts them all.
    step("bpf-tests: BPF_PROG_TEST_RUN and namespace end-to-end", cargo().args(["test", "--no-fail-fast", "-p", "bpf-tests"]).args(args).args(["--", "--test-threads=1"]));
    // Every scenario file, the ported upstream ones in kube-proxy/ and netpol/ included.
    let scenarios = scenario_files(&root().join("bpf-tests/scenarios"))?;
    step("scenario files (dataplane-agent trace)", Command::new(root().join("target/debug/dataplane-agent")).arg("trace").arg("--scenario").args(&scenarios));
    // The same files with NodePort handling in XDP: both modes must agree on every flow.
    step(
        "scenario files, --nodeport-acceleration xdp",
        Command::new(root().join("target/debug/dataplane-agent")).args(["trace", "--nodeport-acceleration", "xdp", "--scenario"]).args(&scenarios),
    );
    // Every flow again, for real, through the real kube-proxy and through Ferry.
    step("conformance: Ferry against the real kube-proxy (nftables), flow by flow", &mut conformance_cmd(&[])?);
    println!();
    let failed: Vec<&str> = suites.iter().filter(|s| !s.ok).map(|s| s.name).collect();
    for s in &suites {
        println!("{} {}: {} passed, {} failed", if s.ok { "ok  " } else { "FAIL" }, s.name, s.passed, s.failed);
    }
    // A suite that failed without reporting a failed test (it did not build, it crashed) counts
    // as one failure, so the total can never read clean when something went wrong.
    let passed: usize = suites.iter().map(|s| s.passed).sum();
    let failed_tests: usize = suites.iter().map(|s| if !s.ok && s.failed == 0 { 1 } else { s.failed }).sum();
    println!("total: {passed} passed, {failed_tests} failed");
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `target/debug/conformance` with the pinned kube-proxy, on `--scenarios` (default: every
/// scenario file of the repository). Arguments are checked before anything is built.
fn conformance_cmd(args: &[String]) -> Result<Command> {
    let mut paths = Vec::new();
    let mut verbose = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scenarios" => {
                let p = it.next().filter(|p| !p.starts_with('-')).context("--scenarios takes a directory or a scenario file")?;
                if !Path::new(p).exists() {
                    bail!("--scenarios {p}: no such file or directory");
                }
                paths.push(p.clone());
            }
            "--verbose" => verbose = true,
            other => bail!("conformance: unexpected argument {other:?} (usage: cargo xtask conformance [--scenarios DIR_OR_FILE]... [--verbose])"),
        }
    }
    let kube_proxy = k8s::bin_dir(&root())?.join("kube-proxy");
    let mut cmd = Command::new(root().join("target/debug/conformance"));
    cmd.arg("--kube-proxy").arg(kube_proxy);
    if verbose {
        cmd.arg("--verbose");
    }
    if paths.is_empty() {
        cmd.arg(root().join("bpf-tests/scenarios"));
    }
    cmd.args(paths);
    Ok(cmd)
}

fn conformance(args: &[String]) -> Result<()> {
    // Arguments first: a typo costs no build.
    conformance_cmd(args)?;
    setup()?;
    build_all()?;
    run(&mut conformance_cmd(args)?)
}

fn lab(args: &[String]) -> Result<()> {
    setup()?;
    build_all()?;
    run(Command::new(root().join("target/debug/lab")).args(args))
}

fn bench(args: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    // The bench and everything its throughput part runs in the lab (agents, ferry-load,
    // ferry-echo) in release: the lab takes them from the bench's own directory.
    run(cargo().args(["build", "--release", "-p", "bpf-tests", "-p", "dataplane-agent", "--bins"]))?;
    let mut cmd = Command::new(root().join("target/release/bench"));
    cmd.args(args);
    // The control-plane section's kube-proxy rows: the pinned build (the bench says when it is
    // missing).
    if !args.iter().any(|a| a == "--kube-proxy") {
        match k8s::bin_dir(&root()) {
            Ok(dir) => {
                cmd.arg("--kube-proxy").arg(dir.join("kube-proxy"));
            }
            Err(e) => println!("bench: no kube-proxy build ({e:#})"),
        }
    }
    run(&mut cmd)
}

/// The `.yaml` files under `dir`, its subdirectories included, sorted.
fn scenario_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}
