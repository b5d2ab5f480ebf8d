//! `cargo xtask cluster up|down`: a real Kubernetes control plane (etcd, kube-apiserver with
//! TLS, a service-account issuer and RBAC, kube-controller-manager with the EndpointSlice
//! controller) in a network namespace of its own, from the binaries `setup` builds. Nothing is
//! added to the root namespace: the API server answers inside its namespace, on 127.0.0.1:6443
//! and on `CP_ADDR`, the address other test namespaces reach it at once a link joins them.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The control plane's address inside its namespace (a dummy interface there).
pub const CP_ADDR: &str = "10.250.0.1";
/// kube-apiserver's --service-cluster-ip-range (the lab's service CIDR lies inside it).
pub const SERVICE_RANGE: &str = "10.96.0.0/16";

/// Where a running control plane keeps its state: `FERRY_CLUSTER_DIR` (tests give each run its
/// own), else one per checkout.
fn state(root: &Path) -> PathBuf {
    std::env::var_os("FERRY_CLUSTER_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target/cluster"))
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    sh(Command::new("openssl").args(args).current_dir(dir))
}

/// A certificate signed by the cluster CA: `name.crt`/`name.key`, with a subject and SANs.
fn cert(pki: &Path, name: &str, subject: &str, sans: &str, server: bool) -> Result<()> {
    let ext = format!(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={}\n{}",
        if server { "serverAuth" } else { "clientAuth" },
        if sans.is_empty() { String::new() } else { format!("subjectAltName={sans}\n") }
    );
    std::fs::write(pki.join(format!("{name}.ext")), ext)?;
    openssl(pki, &["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", subject])?;
    openssl(pki, &["x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "3650", "-out", &format!("{name}.crt"), "-extfile", &format!("{name}.ext")])
}

/// A kubeconfig for a client certificate `name`, talking to `server`.
pub fn kubeconfig(pki: &Path, name: &str, server: &str) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry-test\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\nusers:\n- name: {name}\n  user: {{client-certificate: \"{}\", client-key: \"{}\"}}\ncontexts:\n- name: ferry-test\n  context: {{cluster: ferry-test, user: {name}}}\ncurrent-context: ferry-test\n",
        p("ca.crt"),
        p(&format!("{name}.crt")),
        p(&format!("{name}.key"))
    )
}

/// Starts a detached process inside the namespace, its output in `log`; returns its pid.
fn spawn(ns: &str, log: &Path, args: &[String]) -> Result<u32> {
    let out = std::fs::File::create(log)?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", args[0]))?;
    Ok(child.id())
}

use std::os::unix::process::CommandExt;

/// Asks the API server for `path` with the admin certificate, from inside the namespace.
fn get(ns: &str, pki: &Path, path: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sf", "--max-time", "2", "--cacert"])
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("admin.crt"))
        .arg("--key")
        .arg(pki.join("admin.key"))
        .arg(format!("https://127.0.0.1:6443{path}"))
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Brings a control plane up (or says where the running one is); prints its kubeconfig. A start
/// that fails takes down what it started.
pub fn up(root: &Path, bins: &Path) -> Result<()> {
    let r = start(root, bins);
    if r.is_err() {
        let _ = down(root);
    }
    r
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by whoever adopted it) still answers kill(pid, 0).
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z'))).unwrap_or(false);
    unsafe { libc::kill(pid, 0) == 0 && !zombie }
}

fn start(root: &Path, bins: &Path) -> Result<()> {
    let dir = state(root);
    if let Ok(ns) = std::fs::read_to_string(dir.join("netns")) {
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let running = pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()).filter(|p| alive(*p)).count() == 3;
        if running && Path::new("/run/netns").join(ns.trim()).exists() {
            println!("cluster: running in network namespace {} (cargo xtask cluster down stops it)\nkubeconfig: {}", ns.trim(), dir.join("admin.kubeconfig").display());
            return Ok(());
        }
        down(root)?;
    }
    for b in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        if !bins.join(b).exists() {
            bail!("{b} is not built: run cargo xtask setup");
        }
    }
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ns = format!("ferry-cp-{:x}", std::process::id());
    std::fs::write(dir.join("netns"), &ns)?;
    sh(Command::new("ip").args(["netns", "add", &ns]))?;
    sh(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
    // On the namespace's loopback (no dummy device needed): a link to another test namespace
    // routes to it.
    sh(Command::new("ip").args(["-n", &ns, "addr", "add", &format!("{CP_ADDR}/32"), "dev", "lo"]))?;

    // PKI: a CA, the API server's serving certificate, client certificates for the admin
    // (system:masters) and the controller manager, and the service-account key pair.
    openssl(&pki, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=ferry-test-ca"])?;
    let sans = format!("IP:127.0.0.1,IP:{CP_ADDR},IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local");
    cert(&pki, "apiserver", "/CN=kube-apiserver", &sans, true)?;
    cert(&pki, "admin", "/O=system:masters/CN=ferry-admin", "", false)?;
    cert(&pki, "controller-manager", "/CN=system:kube-controller-manager", "", false)?;
    openssl(&pki, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    let server = "https://127.0.0.1:6443";
    std::fs::write(dir.join("admin.kubeconfig"), kubeconfig(&pki, "admin", server))?;
    std::fs::write(dir.join("controller-manager.kubeconfig"), kubeconfig(&pki, "controller-manager", server))?;

    let b = |n: &str| bins.join(n).display().to_string();
    let p = |f: &str| pki.join(f).display().to_string();
    let d = |f: &str| dir.join(f).display().to_string();
    let etcd = spawn(&ns, &dir.join("etcd.log"), &[
        b("etcd"),
        format!("--data-dir={}", d("etcd")),
        "--listen-client-urls=http://127.0.0.1:2379".into(),
        "--advertise-client-urls=http://127.0.0.1:2379".into(),
        "--listen-peer-urls=http://127.0.0.1:2380".into(),
        "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
        "--initial-cluster=default=http://127.0.0.1:2380".into(),
        "--log-level=warn".into(),
    ])?;
    // NodePorts from kube-proxy's own test cases (3001, ...) lie below the default range:
    // `cargo xtask conformance` widens it for its control plane.
    let node_ports = std::env::var("FERRY_NODE_PORT_RANGE").unwrap_or_else(|_| "30000-32767".into());
    // An audit log of the agent's requests only (the DaemonSet's ServiceAccount): tests read how
    // it lists and watches (resourceVersion, limit, continue, allowWatchBookmarks).
    std::fs::write(
        dir.join("audit-policy.yaml"),
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n  users: [\"system:serviceaccount:kube-system:ferry\"]\n- level: None\n",
    )?;
    let apiserver = spawn(&ns, &dir.join("kube-apiserver.log"), &[
        b("kube-apiserver"),
        format!("--service-node-port-range={node_ports}"),
        format!("--audit-policy-file={}", d("audit-policy.yaml")),
        format!("--audit-log-path={}", d("audit.log")),
        "--etcd-servers=http://127.0.0.1:2379".into(),
        "--bind-address=0.0.0.0".into(),
        format!("--advertise-address={CP_ADDR}"),
        "--secure-port=6443".into(),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_RANGE}"),
        "--authorization-mode=Node,RBAC".into(),
        "--allow-privileged=true".into(),
    ])?;
    std::fs::write(dir.join("pids"), format!("{etcd}\n{apiserver}\n"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(&ns, &pki, "/readyz").is_none() {
        if Instant::now() > deadline {
            bail!("kube-apiserver not ready within 120 s; its log: {}", d("kube-apiserver.log"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let kcm = spawn(&ns, &dir.join("kube-controller-manager.log"), &[
        b("kube-controller-manager"),
        format!("--kubeconfig={}", d("controller-manager.kubeconfig")),
        format!("--authentication-kubeconfig={}", d("controller-manager.kubeconfig")),
        format!("--authorization-kubeconfig={}", d("controller-manager.kubeconfig")),
        "--leader-elect=false".into(),
        "--use-service-account-credentials=true".into(),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
        format!("--service-cluster-ip-range={SERVICE_RANGE}"),
        "--controllers=*".into(),
    ])?;
    std::fs::write(dir.join("pids"), format!("{etcd}\n{apiserver}\n{kcm}\n"))?;
    // The controller manager is up when its EndpointSlice controller has written the slice of
    // the `kubernetes` Service.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(&ns, &pki, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices").is_some_and(|s| s.contains("\"kubernetes.io/service-name\"")) {
        if Instant::now() > deadline {
            bail!("kube-controller-manager wrote no EndpointSlice within 60 s; its log: {}", d("kube-controller-manager.log"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // That slice is kube-apiserver's own (its endpoint reconciler writes it), so it does not
    // show the controller manager's controllers running: the finalizer its
    // service-cidr-controller puts on the default ServiceCIDR does (they start together).
    while !get(&ns, &pki, "/apis/networking.k8s.io/v1/servicecidrs/kubernetes").is_some_and(|s| s.contains("networking.k8s.io/service-cidr-finalizer")) {
        if Instant::now() > deadline {
            bail!("kube-controller-manager's controllers did not start within 60 s; its log: {}", d("kube-controller-manager.log"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "cluster: etcd, kube-apiserver and kube-controller-manager up in network namespace {ns} (API server https://127.0.0.1:6443 there, and {CP_ADDR}:6443)\nkubeconfig: {}\n(use it inside the namespace: ip netns exec {ns} ...; cargo xtask cluster down stops it)",
        d("admin.kubeconfig")
    );
    Ok(())
}

/// Stops the control plane and removes its namespace and state.
pub fn down(root: &Path) -> Result<()> {
    let dir = state(root);
    if let Ok(pids) = std::fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()).rev() {
            // Each runs in its own process group (ip netns exec and the binary).
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(500));
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
    if let Ok(ns) = std::fs::read_to_string(dir.join("netns")) {
        if Path::new("/run/netns").join(ns.trim()).exists() {
            sh(Command::new("ip").args(["netns", "del", ns.trim()]))?;
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!("cluster: down");
    Ok(())
}
