//! The upstream Kubernetes binaries the tests, the lab and the benchmarks run beside Ferry
//! (kube-apiserver, kube-controller-manager, kube-proxy, etcd), built from the pinned Go modules
//! under `xtask/k8s/` with the machine's Go (or, where it has none, the Go toolchain that the
//! module proxy serves as `golang.org/toolchain`, fetched once into `target/go`) and the module
//! proxy, and cached by a stamp of the pins: a second run costs a hash and a few `stat`s.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The Kubernetes release the `kubernetes` module pins, stamped into the binaries as upstream's
/// release builds stamp it (the API server's version, and the binary version its
/// compatibility checks compare with).
const KUBE_VERSION: (&str, &str, &str) = ("v1.37.2", "1", "37");

/// (module directory under xtask/k8s, Go packages, the binaries they produce).
const MODULES: [(&str, &[&str], &[&str]); 2] = [
    (
        "kubernetes",
        &["k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kube-controller-manager", "k8s.io/kubernetes/cmd/kube-proxy"],
        &["kube-apiserver", "kube-controller-manager", "kube-proxy"],
    ),
    ("etcd", &["go.etcd.io/etcd/server/v3"], &["etcd"]),
];

/// Where the binaries of the current pins are (built or not).
pub fn bin_dir(root: &Path) -> Result<PathBuf> {
    Ok(root.join("target/k8s").join(stamp(root)?))
}


/// A hash of every pin (go.mod, go.sum) and of the Go version.
fn stamp(root: &Path) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= *x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (dir, _, _) in MODULES {
        for f in ["go.mod", "go.sum"] {
            let p = root.join("xtask/k8s").join(dir).join(f);
            eat(&std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
    }
    eat(go_version(root)?.as_bytes());
    eat(KUBE_VERSION.0.as_bytes());
    Ok(format!("{h:016x}"))
}

/// The Go release fetched when the machine has none (the pins need 1.26).
const GO_FETCHED: &str = "1.26.8";

/// The `go` to build with: the machine's, else the one `fetch_go` put under `target/go`.
fn go(root: &Path) -> Result<PathBuf> {
    let machine = Command::new("go").arg("version").env("GOTOOLCHAIN", "local").output();
    if machine.is_ok_and(|o| o.status.success()) {
        return Ok(PathBuf::from("go"));
    }
    let fetched = root.join("target/go/bin/go");
    if fetched.exists() {
        return Ok(fetched);
    }
    bail!(
        "Go is needed to build the upstream Kubernetes binaries the tests run (kube-apiserver, kube-controller-manager, kube-proxy, etcd): none on PATH and none fetched yet; `cargo xtask setup` fetches go{GO_FETCHED} from the Go module proxy, or install Go 1.26 or newer"
    )
}

/// Without a Go on the machine: Go's own toolchain module (what `GOTOOLCHAIN` downloads) from
/// the module proxy (`$GOPROXY`'s first URL, else proxy.golang.org), unpacked into `target/go`.
fn fetch_go(root: &Path) -> Result<()> {
    if go(root).is_ok() {
        return Ok(());
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no Go on PATH, and no Go toolchain module for the architecture {other}: install Go 1.26 or newer"),
    };
    let proxy = std::env::var("GOPROXY").ok().and_then(|p| p.split([',', '|']).find(|u| u.starts_with("http")).map(|u| u.trim_end_matches('/').to_string()));
    let proxy = proxy.unwrap_or_else(|| "https://proxy.golang.org".into());
    let version = format!("v0.0.1-go{GO_FETCHED}.linux-{arch}");
    let url = format!("{proxy}/golang.org/toolchain/@v/{version}.zip");
    println!("setup: no Go on PATH: fetching go{GO_FETCHED} from {url}");
    let scratch = root.join("target/.go-fetch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let zip = scratch.join("go.zip");
    let st = Command::new("curl").args(["-fsSL", "--retry", "3", "-o"]).arg(&zip).arg(&url).status().context("running curl")?;
    if !st.success() {
        bail!("fetching the Go toolchain: curl {url} failed ({st}): install Go 1.26 or newer, or set GOPROXY to a module proxy that serves golang.org/toolchain");
    }
    let st = Command::new("unzip").args(["-q"]).arg(&zip).arg("-d").arg(&scratch).status().context("running unzip")?;
    if !st.success() {
        bail!("unpacking {}: unzip failed ({st})", zip.display());
    }
    // The module zip holds golang.org/toolchain@VERSION/{bin,pkg,src,...}, without modes.
    let tree = scratch.join(format!("golang.org/toolchain@{version}"));
    for dir in [tree.join("bin"), tree.join("pkg/tool").join(format!("linux_{arch}"))] {
        for e in std::fs::read_dir(&dir).with_context(|| format!("{}: not in the toolchain module", dir.display()))?.flatten() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let dest = root.join("target/go");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tree, &dest)?;
    let _ = std::fs::remove_dir_all(&scratch);
    println!("setup: {} ready", go_version(root)?);
    Ok(())
}

fn go_version(root: &Path) -> Result<String> {
    let out = Command::new(go(root)?).arg("version").env("GOTOOLCHAIN", "local").output().context("running go version")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds what is missing; says what it found.
pub fn build(root: &Path) -> Result<PathBuf> {
    fetch_go(root)?;
    let dir = bin_dir(root)?;
    for (module, pkgs, bins) in MODULES {
        if bins.iter().all(|b| dir.join(b).exists()) {
            println!("setup: {} present ({})", bins.join(", "), dir.display());
            continue;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let src = root.join("xtask/k8s").join(module);
        println!("setup: building {} from the pinned Go modules in {} (minutes, once)", bins.join(", "), src.display());
        let started = std::time::Instant::now();
        // Into a scratch directory first: an interrupted build leaves no half binary behind.
        let scratch = dir.join(format!(".build-{module}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        // One package: named by `-o` (go names `.../server/v3` `server`); several: a directory.
        let target = if pkgs.len() == 1 { scratch.join(bins[0]) } else { scratch.clone() };
        let mut ldflags = "-s -w".to_string();
        if module == "kubernetes" {
            let (v, major, minor) = KUBE_VERSION;
            for pkg in ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"] {
                ldflags += &format!(" -X {pkg}.gitVersion={v} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean");
            }
        }
        let out = Command::new(go(root)?)
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(&target)
            .args(pkgs)
            .current_dir(&src)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=readonly")
            .env("CGO_ENABLED", "0")
            .output()
            .context("starting go build")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "building {} from {} failed ({}). A module the Go proxy could not serve is named in go's words:\n{}",
                bins.join(", "),
                src.display(),
                out.status,
                tail.join("\n")
            );
        }
        for b in bins {
            std::fs::rename(scratch.join(b), dir.join(b)).with_context(|| format!("{b}: not produced by go build"))?;
        }
        let _ = std::fs::remove_dir_all(&scratch);
        println!("setup: built {} in {:.0?}", bins.join(", "), started.elapsed());
    }
    Ok(dir)
}
