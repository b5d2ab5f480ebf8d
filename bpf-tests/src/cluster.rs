//! A real control plane for tests: etcd, kube-apiserver (TLS, RBAC, a service-account issuer)
//! and kube-controller-manager from `cargo xtask setup`'s pinned upstream builds, started by
//! `cargo xtask cluster up` in a network namespace of the caller's own, and the agent run
//! against it as the DaemonSet's ServiceAccount.
use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::lab::TempDir;
use dataplane_agent::model::{Frontend, L4Addr, Proto};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A control plane of this test's own, taken down (processes, namespace, state) on drop.
pub struct ControlPlane {
    pub dir: TempDir,
    pub ns: String,
}

impl ControlPlane {
    pub fn up() -> ControlPlane {
        let dir = TempDir::new(&format!("cp-{}", crate::lab::run_id()));
        // In a process group of its own, as `cluster down` below: a Ctrl-C meant for the lab must
        // not stop it half-way (with servers started and not yet in its pid file).
        use std::os::unix::process::CommandExt;
        let out = Command::new(root().join("target/debug/xtask")).args(["cluster", "up"]).env("FERRY_CLUSTER_DIR", &dir.path).process_group(0).output().expect("xtask cluster up");
        let cp = ControlPlane { ns: std::fs::read_to_string(dir.path.join("netns")).unwrap_or_default().trim().to_string(), dir };
        assert!(out.status.success(), "cargo xtask cluster up: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        cp
    }

    /// An API request as the admin (system:masters): (HTTP status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.api_as(method, path, body, "application/json")
    }

    /// Creates every object of a manifest file of `deploy/` (YAML, as the API server takes it).
    pub fn apply_deploy(&self, file: &str) {
        let text = std::fs::read_to_string(root().join("deploy").join(file)).unwrap();
        for doc in text.split("\n---").filter(|d| d.contains("kind:")) {
            let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
            let kind = v["kind"].as_str().unwrap();
            let path = match kind {
                "ServiceAccount" => format!("/api/v1/namespaces/{}/serviceaccounts", v["metadata"]["namespace"].as_str().unwrap()),
                "ClusterRole" => "/apis/rbac.authorization.k8s.io/v1/clusterroles".into(),
                "ClusterRoleBinding" => "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".into(),
                other => panic!("{file}: {other} not expected"),
            };
            let (code, body) = self.api_as("POST", &path, Some(doc), "application/yaml");
            assert_eq!(code, 201, "{file} {kind}: {body}");
        }
    }

    /// A kubeconfig for the DaemonSet's ServiceAccount (kube-system/ferry), with a token from the
    /// TokenRequest API, as the kubelet mounts one.
    pub fn service_account_kubeconfig(&self) -> PathBuf {
        self.service_account_kubeconfig_at("https://127.0.0.1:6443")
    }

    /// [`ControlPlane::service_account_kubeconfig`] for the API server at `server` (its
    /// certificate names 127.0.0.1 and 10.250.0.1).
    pub fn service_account_kubeconfig_at(&self, server: &str) -> PathBuf {
        let req = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}"#;
        let (code, body) = self.api("POST", "/api/v1/namespaces/kube-system/serviceaccounts/ferry/token", Some(req));
        assert_eq!(code, 201, "{body}");
        let v: serde_yaml::Value = serde_yaml::from_str(&body).unwrap();
        let token = v["status"]["token"].as_str().unwrap();
        let path = self.dir.path.join("ferry.kubeconfig");
        let ca = self.dir.path.join("pki/ca.crt");
        std::fs::write(
            &path,
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}\nusers:\n- name: ferry\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: ferry}}\ncurrent-context: c\n", ca.display()),
        )
        .unwrap();
        path
    }

    /// POSTs each body to `path` as the admin, a hundred requests per curl; asserts every one
    /// was created.
    pub fn create_many(&self, path: &str, bodies: &[String]) {
        if let Err(e) = self.try_create_many(path, bodies) {
            panic!("{e}");
        }
    }

    /// [`Self::create_many`], saying what went wrong instead of panicking (the bench stops with
    /// "interrupted" when a Ctrl-C reached its curls).
    pub fn try_create_many(&self, path: &str, bodies: &[String]) -> Result<(), String> {
        let pki = self.dir.path.join("pki");
        for chunk in bodies.chunks(100) {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{}", self.ns)).arg("curl");
            for (i, b) in chunk.iter().enumerate() {
                if i > 0 {
                    cmd.arg("--next");
                }
                cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}\n", "--max-time", "10", "--cacert"]).arg(pki.join("ca.crt"));
                cmd.arg("--cert").arg(pki.join("admin.crt")).arg("--key").arg(pki.join("admin.key"));
                cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]).arg(format!("https://127.0.0.1:6443{path}"));
            }
            let out = cmd.output().map_err(|e| format!("curl: {e}"))?;
            let codes = String::from_utf8_lossy(&out.stdout).into_owned();
            if codes.lines().filter(|c| *c == "201").count() != chunk.len() {
                return Err(format!("POST {path}: not every object created ({} of {}): {codes}", codes.lines().filter(|c| *c == "201").count(), chunk.len()));
            }
        }
        Ok(())
    }

    /// The audit log's events (one JSON object a line): the agent's requests, as the API server
    /// saw them.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path.join("audit.log")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Kills kube-apiserver (SIGKILL, as a crash) and starts it again with the same command line,
    /// appending to its log; returns once it is ready again (at most 120 s). The pid file is
    /// updated, so `cluster down` stops the new one.
    pub fn restart_apiserver(&self) {
        let args = self.stop_apiserver();
        self.start_apiserver(&args);
    }

    /// Kills kube-apiserver (SIGKILL, as a crash) and returns once its port is closed; returns
    /// its command line, for [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&self) -> Vec<String> {
        let pids_file = self.dir.path.join("pids");
        let pids: Vec<i32> = std::fs::read_to_string(&pids_file).unwrap().lines().filter_map(|l| l.trim().parse().ok()).collect();
        // `cluster up` writes etcd's, kube-apiserver's, kube-controller-manager's; `ip netns exec`
        // execs, so the pid is the server's and its command line the server's.
        let old = pids[1];
        let cmdline = std::fs::read(format!("/proc/{old}/cmdline")).unwrap();
        let args: Vec<String> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        assert!(args[0].ends_with("kube-apiserver"), "pid {old} is not kube-apiserver: {args:?}");
        unsafe { libc::kill(-old, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Gone when its listener is (a zombie leader may still have threads holding it).
        let listening = || Command::new("nsenter").arg(format!("--net=/run/netns/{}", self.ns)).args(["ss", "-Hltn", "sport = :6443"]).output().is_ok_and(|o| !o.stdout.is_empty());
        while listening() {
            assert!(Instant::now() < deadline, "kube-apiserver {old} still listens 10 s after SIGKILL");
            std::thread::sleep(Duration::from_millis(50));
        }
        args
    }

    /// Starts kube-apiserver with `args` (from [`ControlPlane::stop_apiserver`]), appending to
    /// its log; returns once it is ready (at most 120 s). The pid file is updated, so `cluster
    /// down` stops it.
    pub fn start_apiserver(&self, args: &[String]) {
        let pids_file = self.dir.path.join("pids");
        let mut pids: Vec<i32> = std::fs::read_to_string(&pids_file).unwrap().lines().filter_map(|l| l.trim().parse().ok()).collect();
        let log = std::fs::OpenOptions::new().append(true).open(self.dir.path.join("kube-apiserver.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("restart kube-apiserver");
        pids[1] = child.id() as i32;
        std::fs::write(&pids_file, pids.iter().map(|p| format!("{p}\n")).collect::<String>()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.api("GET", "/readyz", None).0 != 200 {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path.join("kube-apiserver.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!("kube-apiserver not ready again within 120 s; its log ends:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A request to etcd's HTTP gateway (inside the namespace): its JSON answer.
    pub fn etcd(&self, path: &str, body: &str) -> serde_json::Value {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["curl", "-sf", "--max-time", "10", "-X", "POST", "--data-binary", body])
            .arg(format!("http://127.0.0.1:2379{path}"))
            .output()
            .expect("curl");
        assert!(out.status.success(), "etcd {path} {body}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("etcd {path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Compacts etcd at its current revision (physically: the history is gone, a watch from an
    /// older resourceVersion gets 410 Gone); returns the revision.
    pub fn compact_etcd(&self) -> i64 {
        let status = self.etcd("/v3/maintenance/status", "{}");
        let rev: i64 = status["header"]["revision"].as_str().and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("no revision: {status}"));
        self.etcd("/v3/kv/compaction", &format!("{{\"revision\": {rev}, \"physical\": true}}"));
        rev
    }

    /// curl in the control plane's namespace with the admin's credentials: the request's own
    /// options and URL to add.
    pub fn curl(&self) -> Command {
        let pki = self.dir.path.join("pki");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns)).args(["curl", "-s", "--cacert"]);
        cmd.arg(pki.join("ca.crt")).arg("--cert").arg(pki.join("admin.crt")).arg("--key").arg(pki.join("admin.key"));
        cmd
    }

    pub fn api_as(&self, method: &str, path: &str, body: Option<&str>, content_type: &str) -> (u16, String) {
        let mut cmd = self.curl();
        cmd.args(["--max-time", "10", "-w", "\n%{http_code}", "-X", method]);
        if let Some(b) = body {
            cmd.args(["-H", &format!("Content-Type: {content_type}"), "--data-binary", b]);
        }
        let out = cmd.arg(format!("https://127.0.0.1:6443{path}")).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        use std::os::unix::process::CommandExt;
        let _ = Command::new(root().join("target/debug/xtask")).args(["cluster", "down"]).env("FERRY_CLUSTER_DIR", &self.dir.path).process_group(0).output();
    }
}

/// The agent in the control plane's namespace, with a pin dir of its own; stopped and cleaned
/// up (`run --cleanup`) on drop.
pub struct Agent {
    pub child: Child,
    pub ns: String,
    pub pin: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// The agent as node `cp1`, with the test's flags.
    pub fn start(cp: &ControlPlane, kubeconfig: &Path) -> Agent {
        let mut args: Vec<String> = ["--service-cidr", "10.96.0.0/16", "--cluster-cidr", "10.201.0.0/16", "--kubeconfig"].map(String::from).into();
        args.push(kubeconfig.display().to_string());
        Agent::start_args(cp, &args)
    }

    /// The agent with `args` after the ones every test needs (node, interfaces, endpoints).
    pub fn start_args(cp: &ControlPlane, args: &[String]) -> Agent {
        let pin = PathBuf::from(format!("/sys/fs/bpf/ferry-api-{}", crate::lab::run_id()));
        let log = cp.dir.path.join("agent.log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", cp.ns))
            .arg(crate::lab::agent_bin())
            .args(["run", "--node", "cp1", "--node-ip", "10.250.0.1", "--cgroup", "none", "--external-interfaces", "nomatch*", "--pod-interfaces", "nomatch*"])
            .args(["--healthz-bind-address", "", "--metrics-bind-address", "127.0.0.1:10249"])
            .args(args)
            .arg("--pin-dir")
            .arg(&pin)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the agent");
        Agent { child, ns: cp.ns.clone(), pin, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 30 s) for a sync line of the agent's log holding `what`.
    pub fn wait_synced(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains("synced")).last().is_some_and(|l| l.contains(what)) {
                return;
            }
            assert!(Instant::now() < deadline, "no sync with {what:?} within 30 s:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's /metrics, from inside its namespace.
    pub fn metrics(&self) -> String {
        let out = Command::new("nsenter").arg(format!("--net=/run/netns/{}", self.ns)).args(["curl", "-s", "--max-time", "5", "http://127.0.0.1:10249/metrics"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The service CIDRs in the datapath's map.
    pub fn service_cidrs(&self) -> Vec<String> {
        let maps = dataplane_agent::bpf::BpfMaps::from_pins(&self.pin).expect("pinned maps");
        let mut out: Vec<String> = maps.service_cidrs.iter().flatten().map(|(k, _)| format!("{}/{}", Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len())).collect();
        out.sort();
        out
    }

    pub fn has_frontend(&self, addr: &str, port: u16) -> bool {
        backends(&self.pin, addr, port).is_some()
    }
}

/// The backend count of the TCP ClusterIP frontend `addr:port` in the maps pinned at `pin`
/// (`None`: no such frontend).
pub fn backends(pin: &Path, addr: &str, port: u16) -> Option<u16> {
    let maps = dataplane_agent::bpf::BpfMaps::from_pins(pin).expect("pinned maps");
    let fe = Frontend::internal(L4Addr { addr: addr.parse::<Ipv4Addr>().unwrap(), port, proto: Proto::Tcp });
    maps.services.get(&dataplane_agent::reconcile::lb4_key(&fe), 0).ok().map(|s| s.count)
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("nsenter").arg(format!("--net=/run/netns/{}", self.ns)).arg(crate::lab::agent_bin()).args(["run", "--cleanup", "--cgroup", "none", "--pin-dir"]).arg(&self.pin).output();
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

