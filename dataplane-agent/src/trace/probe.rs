//! Node-originated flows, which the socket hooks handle and `BPF_PROG_TEST_RUN` cannot drive:
//! run with real sockets by a child process in a throwaway network namespace (its own, created
//! by unshare and gone when it exits) and a throwaway cgroup that carries private copies of the
//! socket programs. Nothing outside the child's namespace sees a packet.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use aya::Ebpf;

use super::Outcome;
use crate::{attach, model::Proto};

/// A cgroup made for one trace run, removed on drop (after its processes exited).
pub struct TraceCgroup {
    pub path: PathBuf,
}

impl TraceCgroup {
    pub fn create(ebpf: &mut Ebpf) -> Result<Self, String> {
        let root = attach::cgroup2_root().ok_or("no cgroup v2 mount: node flows need one")?;
        let path = root.join(format!("ferry-trace-{}-{}", std::process::id(), unique()));
        std::fs::create_dir(&path).map_err(|e| format!("creating cgroup {}: {e}", path.display()))?;
        let cg = TraceCgroup { path };
        attach::attach_cgroup(ebpf, &cg.path).map_err(|e| format!("attaching socket hooks to {}: {e}", cg.path.display()))?;
        Ok(cg)
    }
}

impl Drop for TraceCgroup {
    fn drop(&mut self) {
        // The programs stay attached until the object is dropped, which does not block rmdir.
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Spawns `dataplane-agent __sock-probe` inside the cgroup and a new network namespace.
pub fn run_probe(cg: &TraceCgroup, proto: Proto, dst: SocketAddrV4, listen: &BTreeSet<SocketAddrV4>, attempts: usize) -> Result<Vec<Outcome>, String> {
    // /proc/self/exe: this very binary, even if its file was replaced since it started.
    let procs = cg.path.join("cgroup.procs");
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__sock-probe")
        .arg(proto.to_string())
        .arg(dst.to_string())
        .arg(attempts.to_string())
        .args(listen.iter().map(|a| a.to_string()));
    unsafe {
        cmd.pre_exec(move || {
            // Into the trace cgroup ("0" = the writing process), then into a private netns.
            std::fs::write(&procs, "0")?;
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().map_err(|e| format!("starting socket probe: {e}"))?;
    if !out.status.success() {
        return Err(format!("socket probe failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.split_once(' ') {
            Some(("to", a)) => a.parse().map(Outcome::To).map_err(|_| format!("probe said {l:?}")),
            Some(("error", e)) => Ok(Outcome::Error(e.to_string())),
            _ => match l {
                "refused" => Ok(Outcome::Reject),
                "denied" => Ok(Outcome::Drop(None)),
                _ => Err(format!("probe said {l:?}")),
            },
        })
        .collect()
}

/// The child's side. Runs in its own network namespace: every address is made local (a `local`
/// route for 0.0.0.0/0 on lo), listeners wait on every port of interest, and each attempt
/// reports where the connection (or datagram) really arrived.
pub fn probe_main(args: &[String]) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    let [proto, dst, attempts, listen @ ..] = args else { return Err(bad("usage: __sock-probe PROTO DST ATTEMPTS LISTEN...")) };
    let proto = Proto::parse_lower(proto).ok_or_else(|| bad("proto"))?;
    let dst: SocketAddrV4 = dst.parse().map_err(|_| bad("dst"))?;
    let attempts: usize = attempts.parse().map_err(|_| bad("attempts"))?;
    let listen: Vec<SocketAddrV4> = listen.iter().map(|s| s.parse().map_err(|_| bad("listen"))).collect::<Result<_, _>>()?;
    for args in [&["link", "set", "lo", "up"][..], &["route", "add", "local", "0.0.0.0/0", "dev", "lo"][..]] {
        let st = Command::new("ip").args(args).status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!("ip {}: {st}", args.join(" "))));
        }
    }
    let ports: BTreeSet<u16> = listen.iter().map(|a| a.port()).collect();
    let mut stdout = std::io::stdout().lock();
    match proto {
        Proto::Tcp => {
            let listeners: Vec<TcpListener> = ports
                .iter()
                .map(|p| {
                    let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .collect::<std::io::Result<_>>()?;
            for _ in 0..attempts {
                let line = match TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(2)) {
                    Ok(mut s) => {
                        // getpeername4 must report the Service, not the backend.
                        let peer = s.peer_addr()?;
                        match accept_any(&listeners) {
                            Some(a) if peer == SocketAddr::V4(dst) => {
                                let _ = s.write_all(b"x");
                                format!("to {a}")
                            }
                            Some(a) => format!("error connected to {a} but getpeername says {peer}"),
                            None => "error connected but no listener accepted".into(),
                        }
                    }
                    Err(e) => io_outcome(&e),
                };
                writeln!(stdout, "{line}")?;
            }
        }
        Proto::Udp => {
            // One socket per expected address: each arrival names its address. A datagram sent
            // anywhere else finds no socket and is reported as "nothing arrived".
            let mut socks = Vec::new();
            for a in &listen {
                let s = UdpSocket::bind(a)?;
                s.set_nonblocking(true)?;
                socks.push((*a, s));
            }
            for _ in 0..attempts {
                let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                client.set_read_timeout(Some(Duration::from_secs(2)))?;
                let line = match client.send_to(b"ferry-probe", dst) {
                    Err(e) => io_outcome(&e),
                    Ok(_) => match recv_any(&socks) {
                        Some((at, from, sock)) => {
                            let _ = sock.send_to(b"reply", from);
                            let mut buf = [0u8; 16];
                            // recvmsg4 must report the Service as the reply's source.
                            match client.recv_from(&mut buf) {
                                Ok((_, src)) if src == SocketAddr::V4(dst) => format!("to {at}"),
                                Ok((_, src)) => format!("error reply from {at} arrived from {src}"),
                                Err(e) => format!("error no reply from {at}: {e}"),
                            }
                        }
                        None => "error nothing arrived at any expected address".into(),
                    },
                };
                writeln!(stdout, "{line}")?;
            }
        }
        Proto::Sctp => return Err(bad("sctp is not probed")),
    }
    Ok(())
}

fn io_outcome(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::PermissionDenied => "denied".into(),
        _ => format!("error {e}"),
    }
}

fn accept_any(listeners: &[TcpListener]) -> Option<SocketAddrV4> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for l in listeners {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 1];
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                let _ = s.read(&mut b);
                if let Ok(SocketAddr::V4(a)) = s.local_addr() {
                    return Some(a);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn recv_any(socks: &[(SocketAddrV4, UdpSocket)]) -> Option<(SocketAddrV4, SocketAddr, &UdpSocket)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        for (a, s) in socks {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                return Some((*a, from, s));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}
