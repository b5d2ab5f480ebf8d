//! The soak workload: servers and clients that move real data through Ferry with real kernel TCP,
//! UDP and (hand-built, raw-socket) SCTP, and check every byte. Every socket operation has a
//! timeout and every loop a bound, so a stalled path fails in bounded time instead of hanging.
//!
//! Server (one per pod, and one in a node's own namespace as a hostNetwork endpoint):
//!   ferry-load serve --name NAME [--tcp PORT] [--udp PORT] [--sctp PORT] [--udp-addr IP] [--lifetime-s S]
//!     TCP, one command per line, any number per connection:
//!       ECHO              -> `NAME PEER` (PEER: the source address the server saw)
//!       BULK UP DOWN      -> reads UP bytes of the up pattern and verifies them, answers
//!                            `GOT N OK` or `GOT N BAD OFFSET`, then sends DOWN bytes of the down
//!                            pattern
//!       WAIT MS           -> says nothing for MS ms, then `NAME PEER` (the server speaks first)
//!       BYE               -> `NAME PEER`, then the server closes (it closes first, as an
//!                            HTTP/1.0 server does: its side keeps the TIME_WAIT)
//!       RAW UP DOWN       -> BULK without the pattern: reads UP bytes and only counts them,
//!                            answers `GOT N OK`, then sends DOWN bytes of one fixed buffer (for
//!                            throughput, where generating and checking the pattern would cost
//!                            more CPU than the network path being measured)
//!     UDP: every datagram is answered with `NAME PEER REQUEST` (the whole request, up to 64 KiB:
//!       a large request gets an equally large answer).
//!     SCTP (raw IP protocol 132: this kernel has no SCTP module): a HEARTBEAT chunk to PORT is
//!       answered with a HEARTBEAT ACK whose info is `NONCE NAME PEER`, CRC32c checked both ways.
//!
//! Clients (all print their results on stdout; errors as `ERR <kind>`):
//!   bulk ADDR --up BYTES --down BYTES [--deadline-s 30] [--stall-s 10] [--bind PORT] [--unverified]
//!       one connection: upload, then download, both verified (with --unverified: `RAW`, bytes
//!       counted, not checked). One line of key=value fields:
//!       `bulk up=BYTES/WANTED up_s= up_gbps= down=BYTES/WANTED down_s= down_gbps= cpu_s= result=`
//!       (`result=ok` or the first failure). cpu_s is this process's user+system time
//!       (getrusage), so `cargo xtask bench` can report throughput and its cost.
//!   churn ADDR --count N [--concurrency C] [--rate R] [--timeout-ms T] [--deadline-s S]
//!         [--max-failures F] [--server-closes] [--from IP,IP...] [--slow-ms MS]
//!       N short connections, C at a time, at most R new ones a second (connection i starts no
//!       earlier than i/R s after the first), one ECHO each, the client closes first (with
//!       --server-closes: one BYE each, and the client reads to the server's close before it
//!       closes). --from: the source addresses, in turn. --slow-ms: a connection that takes
//!       longer (a SYN retransmitted, a stall) counts as the failure `slow`. Prints
//!       `backend NAME COUNT`, `failure KIND COUNT`, `elapsed_s S rate R`, `not-attempted K` when it
//!       stopped early, and last `OK ok, FAILED failed` (not attempted ones count as failed).
//!   idle ADDR --count K [--wait-ms W] [--max-wait-s S]
//!       K connections; each asks ECHO once (its backend), then even ones stay silent (client
//!       first) and odd ones send `WAIT W` (server first). Prints `ready K`, waits for a line on
//!       stdin, then the even ones ask ECHO again and the odd ones read the server's words. One
//!       `conn I MODE before=NAME after=NAME|ERR...` line each, then `OK ok, FAILED failed`: ok
//!       means the same backend answered.
//!   tcp ADDR [--count N] [--bind PORT] [--timeout-ms T]
//!       N connections (from PORT when given, with SO_REUSEADDR), one ECHO each: `NAME PEER`.
//!   udp ADDR [--count N] [--connected] [--timeout-ms T] [--size BYTES]
//!       N new sockets, one datagram each (padded to BYTES, so larger than one packet when asked):
//!       `NAME PEER`, or `ERR <kind> after <ms> ms`.
//!   sctp ADDR [--count N] [--sport PORT] [--timeout-ms T]
//!       N HEARTBEATs (new random source port each unless --sport): `NAME PEER`.
//!   session udp|sctp ADDR [--sport PORT] [--reconnect] [--timeout-ms T]
//!       one flow with a fixed source port; a request per `ask` line on stdin, one answer line
//!       each. UDP uses a connected socket; with --reconnect, an error makes it open and connect
//!       a new socket (what an application does when its socket is destroyed), ready for the
//!       next ask.
//!
//!   steady TCP_ADDR UDP_ADDR [--msg-ms 50] [--conn-ms 100] [--udp-ms 100] [--timeout-ms 900]
//!          [--max-s 600]
//!       Production's steady load, three loops at once until a line on stdin (or --max-s):
//!       one long-lived TCP connection asking ECHO every --msg-ms (each answer from the backend
//!       of the first); a new TCP connection every --conn-ms (ECHO, then close); a UDP query from
//!       a new socket every --udp-ms. Anything not answered within --timeout-ms fails (so a lost
//!       SYN, which TCP would retransmit after a second, counts). Prints `ready` once the
//!       long-lived connection has its first answer; at the end one line per loop,
//!       `long asked=N ok=N broken=B moved=M`, `conn ok=N failed=F worst_ms=W`,
//!       `udp ok=N failed=F worst_ms=W`, each first failure as `error LOOP AT_MS KIND`, and last
//!       `OK ok, FAILED failed`. A fourth loop keeps recent connections: one more every
//!       --recent-ms (50), the newest --recent-keep (40) kept open and each asked ECHO again every
//!       100 ms, so some connections are always a moment old, whatever moment something happens
//!       on the path: `recent opened=N ok=N failed=F moved=M`.
//!
//! Forged packets (as an attacker sends them; needs CAP_NET_RAW):
//!   forge-tcp SRC:PORT DST:PORT FLAGS SEQ ACK [--count N]
//!       N hand-built TCP segments (FLAGS from `SAFRP`, no payload, valid checksums) from a raw
//!       socket with IP_HDRINCL, so any source address and port. Prints `sent N`.
use std::{
    collections::BTreeMap,
    io::{self, BufRead, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Seeds of the two bulk patterns: distinct, so data looped back or mixed up fails verification.
const UP_SEED: u64 = 0x5550_5550_7570_0001;
const DOWN_SEED: u64 = 0x444f_574e_646f_0002;
/// Longest command line a server accepts.
const MAX_LINE: usize = 256;
/// Largest single bulk transfer either side accepts (bounds every loop over it).
const MAX_BULK: u64 = 64 << 30;
/// A server connection idle this long is closed (the soak's idle periods are far shorter).
const SERVER_IDLE: Duration = Duration::from_secs(300);
/// Connections a server serves at once; more are closed at once (bounds its threads).
const MAX_SERVER_CONNS: usize = 4096;

fn main() {
    let args = Args::parse();
    let code = match args.pos.first().map(String::as_str) {
        Some("serve") => serve(&args),
        Some("bulk") => bulk(&args),
        Some("churn") => churn(&args),
        Some("idle") => idle(&args),
        Some("tcp") => tcp_clients(&args),
        Some("udp") => udp_clients(&args),
        Some("sctp") => sctp_clients(&args),
        Some("session") => session(&args),
        Some("forge-tcp") => forge_tcp(&args),
        Some("steady") => steady(&args),
        _ => {
            eprintln!("usage: see the comment at the top of ferry-load.rs");
            2
        }
    };
    let _ = io::stdout().flush();
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args {
    pos: Vec<String>,
    flags: BTreeMap<String, String>,
}

/// Flags without a value.
const SWITCHES: [&str; 4] = ["--connected", "--reconnect", "--unverified", "--server-closes"];

impl Args {
    fn parse() -> Args {
        let mut pos = Vec::new();
        let mut flags = BTreeMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if SWITCHES.contains(&a.as_str()) {
                flags.insert(a, String::new());
            } else if a.starts_with("--") {
                let v = it.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
                // Repeated flags (--tcp 1 --tcp 2) accumulate, comma-separated.
                flags.entry(a).and_modify(|old: &mut String| *old = format!("{old},{v}")).or_insert(v);
            } else {
                pos.push(a);
            }
        }
        Args { pos, flags }
    }

    fn has(&self, k: &str) -> bool {
        self.flags.contains_key(k)
    }

    fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.flags.get(k) {
            Some(v) => v.parse().unwrap_or_else(|_| die(&format!("{k}: bad value {v:?}"))),
            None => default,
        }
    }

    fn list(&self, k: &str) -> Vec<u16> {
        self.flags.get(k).map(|v| v.split(',').map(|p| p.parse().unwrap_or_else(|_| die(&format!("{k}: {p:?}")))).collect()).unwrap_or_default()
    }

    fn addr(&self, i: usize) -> SocketAddrV4 {
        let s = self.pos.get(i).unwrap_or_else(|| die("missing ADDR"));
        s.parse().unwrap_or_else(|_| die(&format!("ADDR {s:?} is not IPv4:PORT")))
    }

    fn ms(&self, k: &str, default: u64) -> Duration {
        Duration::from_millis(self.get(k, default))
    }

    fn secs(&self, k: &str, default: f64) -> Duration {
        Duration::from_secs_f64(self.get(k, default))
    }
}

fn die(msg: &str) -> ! {
    eprintln!("ferry-load: {msg}");
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// The deterministic byte pattern

/// splitmix64: a cheap, well-mixed function of the word index, so a byte's value depends on its
/// offset: reordered, duplicated, lost or corrupted data does not verify.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern's bytes at stream offsets `offset..offset + buf.len()`.
fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() {
        let pos = offset + i as u64;
        let word = mix(seed ^ (pos / 8)).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
    }
}

/// Checks `data` against the pattern at `offset`; the stream offset of the first wrong byte.
fn verify(seed: u64, offset: u64, data: &[u8], scratch: &mut Vec<u8>) -> Result<(), u64> {
    scratch.resize(data.len(), 0);
    fill(seed, offset, scratch);
    if scratch[..] == data[..] {
        return Ok(());
    }
    let i = data.iter().zip(scratch.iter()).position(|(a, b)| a != b).unwrap_or(0);
    Err(offset + i as u64)
}

// ---------------------------------------------------------------------------------------------
// Small socket helpers

fn kind(e: &io::Error) -> String {
    // A receive timeout is EAGAIN (WouldBlock) on a socket: call it what it is.
    if timed_out(e) {
        return "TimedOut".into();
    }
    let k = format!("{:?}", e.kind());
    match e.raw_os_error() {
        // Names the errno where std's kind is vague.
        Some(n) if k == "Other" || k == "Uncategorized" => format!("errno{n}"),
        _ => k,
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn set_int_opt(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    cvt(unsafe { libc::setsockopt(fd, level, name, &v as *const i32 as *const _, 4) }).map(|_| ())
}

/// A TCP connection to `to`, from port `from_port` when given (SO_REUSEADDR, so a port whose
/// previous connection is in TIME_WAIT can be used again), within `timeout`.
fn connect_from(to: SocketAddrV4, from_port: Option<u16>, timeout: Duration) -> io::Result<TcpStream> {
    connect_bound(to, Ipv4Addr::UNSPECIFIED, from_port, timeout)
}

/// `connect_from`, from the source address `from_ip` (any when unspecified).
fn connect_bound(to: SocketAddrV4, from_ip: Ipv4Addr, from_port: Option<u16>, timeout: Duration) -> io::Result<TcpStream> {
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) })?;
    // Owned from here on: closed on every error path.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    if from_port.is_some() || !from_ip.is_unspecified() {
        if from_port.is_some() {
            set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        }
        let sa = sockaddr(SocketAddrV4::new(from_ip, from_port.unwrap_or(0)));
        cvt(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) })?;
    }
    let sa = sockaddr(to);
    let r = unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        let n = cvt(unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) })?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut err: i32 = 0;
        let mut len = 4u32;
        cvt(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut i32 as *mut _, &mut len) })?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Reads one `\n`-terminated line (at most MAX_LINE bytes) byte by byte, so nothing after it is
/// consumed from the stream. `Ok(None)` on a clean end of stream.
fn read_line(s: &mut impl Read) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < MAX_LINE {
        match s.read(&mut b) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream inside a line")),
            Ok(_) if b[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).trim().to_string())),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
}

/// A line on stdin within `timeout`; None on timeout or end of input.
fn stdin_line(timeout: Duration) -> Option<String> {
    let mut pfd = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n <= 0 {
        return None;
    }
    let mut line = String::new();
    match io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim().to_string()),
    }
}

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Server

fn serve(a: &Args) -> i32 {
    let name: Arc<str> = a.flags.get("--name").cloned().unwrap_or_else(|| die("serve needs --name")).into();
    let lifetime = a.secs("--lifetime-s", 3600.0);
    let mut threads = Vec::new();
    for port in a.list("--tcp") {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| die(&format!("bind tcp {port}: {e}")));
        let n = name.clone();
        threads.push(std::thread::spawn(move || tcp_server(l, n)));
    }
    // On a multi-homed host (a node) a UDP server must answer from the address it was reached at:
    // one bound to 0.0.0.0 answers from whatever source the route picks, which no proxy
    // (kube-proxy included) can match to the request. `--udp-addr` binds it to one address.
    let udp_addr: std::net::Ipv4Addr = a.flags.get("--udp-addr").map(|s| s.parse().unwrap_or_else(|_| die("--udp-addr"))).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    for port in a.list("--udp") {
        let u = UdpSocket::bind((udp_addr, port)).unwrap_or_else(|e| die(&format!("bind udp {udp_addr}:{port}: {e}")));
        let n = name.clone();
        threads.push(std::thread::spawn(move || udp_server(u, n)));
    }
    let sctp = a.list("--sctp");
    if !sctp.is_empty() {
        let fd = raw_sctp_socket().unwrap_or_else(|e| die(&format!("raw SCTP socket: {e}")));
        let n = name.clone();
        threads.push(std::thread::spawn(move || sctp_server(fd, sctp, n)));
    }
    // A server is not a loop without end either: it exits after its lifetime (the tests kill it
    // long before).
    std::thread::sleep(lifetime);
    0
}

fn tcp_server(l: TcpListener, name: Arc<str>) {
    let active = Arc::new(AtomicUsize::new(0));
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        if active.load(Ordering::Relaxed) >= MAX_SERVER_CONNS {
            continue; // dropped: closed at once
        }
        active.fetch_add(1, Ordering::Relaxed);
        let (n, act) = (name.clone(), active.clone());
        std::thread::spawn(move || {
            let _ = tcp_conn(s, &n);
            act.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn tcp_conn(mut s: TcpStream, name: &str) -> io::Result<()> {
    s.set_read_timeout(Some(SERVER_IDLE))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    // Bounded: a connection carries at most this many commands.
    for _ in 0..1_000_000 {
        let Some(line) = read_line(&mut s)? else { return Ok(()) };
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["ECHO"] => s.write_all(format!("{name} {peer}\n").as_bytes())?,
            ["BYE"] => {
                s.write_all(format!("{name} {peer}\n").as_bytes())?;
                return Ok(());
            }
            ["WAIT", ms] => {
                let ms: u64 = ms.parse().unwrap_or(0).min(600_000);
                std::thread::sleep(Duration::from_millis(ms));
                s.write_all(format!("{name} {peer}\n").as_bytes())?;
            }
            [cmd @ ("BULK" | "RAW"), up, down] => {
                let (up, down): (u64, u64) = (up.parse().unwrap_or(0), down.parse().unwrap_or(0));
                if up > MAX_BULK || down > MAX_BULK {
                    s.write_all(b"ERR too large\n")?;
                    return Ok(());
                }
                let checked = *cmd == "BULK";
                let (got, bad) = receive_pattern(&mut s, UP_SEED, up, checked);
                match bad {
                    None => s.write_all(format!("GOT {got} OK\n").as_bytes())?,
                    Some(off) => {
                        s.write_all(format!("GOT {got} BAD {off}\n").as_bytes())?;
                        return Ok(());
                    }
                }
                send_pattern(&mut s, DOWN_SEED, down, None, checked).1?;
            }
            _ => s.write_all(b"ERR unknown command\n")?,
        }
    }
    Ok(())
}

/// Reads `want` bytes of the pattern; (bytes read, offset of the first wrong byte or of the
/// point where the stream ended or failed early). Unless `checked`, bytes are only counted.
fn receive_pattern(s: &mut TcpStream, seed: u64, want: u64, checked: bool) -> (u64, Option<u64>) {
    let mut buf = vec![0u8; 256 << 10];
    let mut scratch = Vec::new();
    let mut got = 0u64;
    while got < want {
        let n = ((want - got) as usize).min(buf.len());
        match s.read(&mut buf[..n]) {
            Ok(0) => return (got, Some(got)),
            Ok(k) => {
                if checked {
                    if let Err(off) = verify(seed, got, &buf[..k], &mut scratch) {
                        return (got + k as u64, Some(off));
                    }
                }
                got += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (got, Some(got)),
        }
    }
    (got, None)
}

/// Writes `len` bytes of the pattern; (bytes written, result). `deadline`: give up then.
/// Unless `checked`, the buffer is filled once (the start of the pattern) and sent as it is.
fn send_pattern(s: &mut TcpStream, seed: u64, len: u64, deadline: Option<Instant>, checked: bool) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 256 << 10];
    if !checked {
        fill(seed, 0, &mut buf);
    }
    let mut sent = 0u64;
    while sent < len {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return (sent, Err(io::Error::new(io::ErrorKind::TimedOut, "deadline")));
        }
        let n = ((len - sent) as usize).min(buf.len());
        if checked {
            fill(seed, sent, &mut buf[..n]);
        }
        // write, not write_all: a short write is counted, then the rest is regenerated.
        match s.write(&buf[..n]) {
            Ok(0) => return (sent, Err(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(k) => sent += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (sent, Err(e)),
        }
    }
    (sent, Ok(()))
}

fn udp_server(u: UdpSocket, name: Arc<str>) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, from)) = u.recv_from(&mut buf) {
            let mut answer = format!("{name} {from} ").into_bytes();
            answer.extend_from_slice(&buf[..n]);
            answer.push(b'\n');
            answer.truncate(65507);
            let _ = u.send_to(&answer, from);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SCTP over raw IP sockets: just enough SCTP (common header, one HEARTBEAT or HEARTBEAT ACK
// chunk, RFC 9260) to carry a request and its answer through Ferry's port translation and CRC32c
// patching with real packets.

const IPPROTO_SCTP: i32 = 132;
const CHUNK_HEARTBEAT: u8 = 4;
const CHUNK_HEARTBEAT_ACK: u8 = 5;
/// The verification tag every packet of this tool carries (no association is set up; Ferry does
/// not track SCTP state).
const VTAG: u32 = 0x4665_7272; // "Ferr"

/// CRC32c (Castagnoli), reflected, as SCTP uses it (RFC 9260 appendix A). The same function as
/// dataplane-agent/src/packet.rs, repeated so this tool stays std + libc only (a bench or another
/// machine runs it without the agent crate).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// An SCTP packet: common header, then one chunk of `chunk_type` holding a Heartbeat Info
/// parameter with `info`; the CRC32c over everything (checksum field zero) stored little-endian
/// on the wire, as SCTP does.
fn sctp_packet(sport: u16, dport: u16, chunk_type: u8, info: &[u8]) -> Vec<u8> {
    let param_len = 4 + info.len();
    let chunk_len = 4 + param_len;
    let mut p = Vec::with_capacity(12 + chunk_len + 3);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&VTAG.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&[chunk_type, 0]);
    p.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes()); // Heartbeat Info
    p.extend_from_slice(&(param_len as u16).to_be_bytes());
    p.extend_from_slice(info);
    while p.len() % 4 != 0 {
        p.push(0); // chunks are padded to 4 bytes; the padding is not in the length
    }
    let c = crc32c(&p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// A received SCTP packet, from an IPv4 datagram as a raw socket returns it.
struct SctpIn {
    src: Ipv4Addr,
    sport: u16,
    dport: u16,
    crc_ok: bool,
    chunk_type: u8,
    info: Vec<u8>,
}

fn parse_sctp(d: &[u8]) -> Option<SctpIn> {
    if d.len() < 20 || d[9] != IPPROTO_SCTP as u8 {
        return None;
    }
    let ihl = (d[0] & 0x0f) as usize * 4;
    let tot = (u16::from_be_bytes([d[2], d[3]]) as usize).min(d.len());
    let s = d.get(ihl..tot)?;
    if s.len() < 12 + 8 {
        return None;
    }
    let mut zeroed = s.to_vec();
    zeroed[8..12].fill(0);
    let crc_ok = crc32c(&zeroed).to_le_bytes() == s[8..12];
    let chunk_len = u16::from_be_bytes([s[14], s[15]]) as usize;
    let param_len = u16::from_be_bytes([s[18], s[19]]) as usize;
    let info = s.get(20..(12 + chunk_len).min(12 + 4 + param_len).min(s.len())).unwrap_or(&[]).to_vec();
    Some(SctpIn {
        src: Ipv4Addr::new(d[12], d[13], d[14], d[15]),
        sport: u16::from_be_bytes([s[0], s[1]]),
        dport: u16::from_be_bytes([s[2], s[3]]),
        crc_ok,
        chunk_type: s[12],
        info,
    })
}

/// A raw IPv4 socket for protocol 132: receives every SCTP packet addressed to this namespace,
/// sends an SCTP packet with a kernel-built IP header.
fn raw_sctp_socket() -> io::Result<RawFd> {
    cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, IPPROTO_SCTP) })
}

fn raw_send(fd: RawFd, to: Ipv4Addr, pkt: &[u8]) -> io::Result<()> {
    let sa = sockaddr(SocketAddrV4::new(to, 0));
    cvt(unsafe { libc::sendto(fd, pkt.as_ptr() as *const _, pkt.len(), 0, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) } as i32)
        .map(|_| ())
}

/// One datagram from the raw socket within `timeout`.
fn raw_recv(fd: RawFd, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let n = cvt(unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1).min(i32::MAX as u128) as i32) })?;
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::TimedOut));
    }
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

fn sctp_server(fd: RawFd, ports: Vec<u16>, name: Arc<str>) {
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = raw_recv(fd, &mut buf, Duration::from_secs(60)) else { continue };
        let Some(p) = parse_sctp(&buf[..n]) else { continue };
        if !ports.contains(&p.dport) || p.chunk_type != CHUNK_HEARTBEAT {
            continue;
        }
        if !p.crc_ok {
            // A corrupted request is not answered; the client reports a timeout, and this names why.
            eprintln!("sctp: bad CRC32c from {}:{}", p.src, p.sport);
            continue;
        }
        let nonce = String::from_utf8_lossy(&p.info).split_whitespace().next().unwrap_or("").to_string();
        let info = format!("{nonce} {name} {}:{}", p.src, p.sport);
        let _ = raw_send(fd, p.src, &sctp_packet(p.dport, p.sport, CHUNK_HEARTBEAT_ACK, info.as_bytes()));
    }
}

/// Sends one HEARTBEAT from `sport` to `to` and waits for its ACK from `to` (addresses and ports
/// as the client addressed them: Ferry must have translated the answer back). `NAME PEER`.
fn sctp_exchange(fd: RawFd, sport: u16, to: SocketAddrV4, nonce: u64, timeout: Duration) -> String {
    let info = format!("{nonce:016x}");
    if let Err(e) = raw_send(fd, *to.ip(), &sctp_packet(sport, to.port(), CHUNK_HEARTBEAT, info.as_bytes())) {
        return format!("ERR send-{}", kind(&e));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    // Bounded by the deadline: every receive waits at most until then.
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        let n = match raw_recv(fd, &mut buf, left) {
            Ok(n) => n,
            Err(e) if timed_out(&e) => break,
            Err(e) => return format!("ERR recv-{}", kind(&e)),
        };
        let Some(p) = parse_sctp(&buf[..n]) else { continue };
        if p.dport != sport || p.chunk_type != CHUNK_HEARTBEAT_ACK {
            continue;
        }
        let text = String::from_utf8_lossy(&p.info).to_string();
        let mut w = text.split_whitespace();
        if w.next() != Some(info.as_str()) {
            continue; // an answer to an earlier request
        }
        if p.src != *to.ip() || p.sport != to.port() {
            return format!("ERR answer-from-{}:{}", p.src, p.sport);
        }
        if !p.crc_ok {
            return "ERR bad-crc32c".into();
        }
        return w.collect::<Vec<_>>().join(" ");
    }
    "ERR TimedOut".into()
}

fn random_u64() -> u64 {
    let mut v = 0u64;
    unsafe { libc::getrandom(&mut v as *mut u64 as *mut _, 8, 0) };
    v
}

// ---------------------------------------------------------------------------------------------
// Clients

fn bulk(a: &Args) -> i32 {
    let addr = a.addr(1);
    let up: u64 = a.get("--up", 16u64 << 20);
    let down: u64 = a.get("--down", 16u64 << 20);
    let deadline = Instant::now() + a.secs("--deadline-s", 30.0);
    let stall = a.secs("--stall-s", 10.0);
    let bind = a.flags.get("--bind").map(|p| p.parse().unwrap_or_else(|_| die("--bind")));
    let checked = !a.has("--unverified");
    let cpu0 = cpu_seconds();
    let r = bulk_run(addr, up, down, deadline, stall, bind, checked);
    let gbps = |b: u64, s: f64| if s > 0.0 { b as f64 * 8.0 / s / 1e9 } else { 0.0 };
    println!(
        "bulk up={}/{up} up_s={:.3} up_gbps={:.2} down={}/{down} down_s={:.3} down_gbps={:.2} cpu_s={:.3} result={}",
        r.up,
        r.up_s,
        gbps(r.up, r.up_s),
        r.down,
        r.down_s,
        gbps(r.down, r.down_s),
        cpu_seconds() - cpu0,
        r.result.replace(' ', "_")
    );
    i32::from(r.result != "ok")
}

struct BulkResult {
    up: u64,
    up_s: f64,
    down: u64,
    down_s: f64,
    result: String,
}

/// One bulk transfer; unless `checked` (the `RAW` command), data is sent from one fixed buffer
/// and received bytes are only counted.
fn bulk_run(addr: SocketAddrV4, up: u64, down: u64, deadline: Instant, stall: Duration, bind: Option<u16>, checked: bool) -> BulkResult {
    let mut r = BulkResult { up: 0, up_s: 0.0, down: 0, down_s: 0.0, result: String::new() };
    // Each blocking call waits for progress at most `stall`, and never past the deadline.
    let op_timeout = || deadline.saturating_duration_since(Instant::now()).min(stall).max(Duration::from_millis(1));
    let mut s = match connect_from(addr, bind, op_timeout().min(Duration::from_secs(5))) {
        Ok(s) => s,
        Err(e) => {
            r.result = format!("connect-{}", kind(&e));
            return r;
        }
    };
    let past_deadline = |what: &str, e: &io::Error| {
        if Instant::now() >= deadline {
            format!("{what}-deadline")
        } else if timed_out(e) {
            format!("{what}-stalled")
        } else {
            format!("{what}-{}", kind(e))
        }
    };
    let t0 = Instant::now();
    let _ = s.set_write_timeout(Some(op_timeout()));
    let cmd = if checked { "BULK" } else { "RAW" };
    if let Err(e) = s.write_all(format!("{cmd} {up} {down}\n").as_bytes()) {
        r.result = past_deadline("request", &e);
        return r;
    }
    // Upload, chunk by chunk, refreshing the timeout as the deadline approaches.
    let mut buf = vec![0u8; 256 << 10];
    if !checked {
        fill(UP_SEED, 0, &mut buf);
    }
    while r.up < up {
        let _ = s.set_write_timeout(Some(op_timeout()));
        if Instant::now() >= deadline {
            r.up_s = t0.elapsed().as_secs_f64();
            r.result = "up-deadline".into();
            return r;
        }
        let n = ((up - r.up) as usize).min(buf.len());
        if checked {
            fill(UP_SEED, r.up, &mut buf[..n]);
        }
        match s.write(&buf[..n]) {
            Ok(0) => {
                r.result = "up-WriteZero".into();
                return r;
            }
            Ok(k) => r.up += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                r.up_s = t0.elapsed().as_secs_f64();
                r.result = past_deadline("up", &e);
                return r;
            }
        }
    }
    // The server's verdict on the upload: the upload is done when the server has verified it.
    let _ = s.set_read_timeout(Some(op_timeout()));
    let status = read_line(&mut s);
    r.up_s = t0.elapsed().as_secs_f64();
    match status {
        Ok(Some(l)) if l == format!("GOT {up} OK") => {}
        Ok(Some(l)) => {
            r.result = format!("up-server-said:{l}");
            return r;
        }
        Ok(None) => {
            r.result = "up-closed-before-verdict".into();
            return r;
        }
        Err(e) => {
            r.result = past_deadline("up-verdict", &e);
            return r;
        }
    }
    // Download, verified as it arrives.
    let t1 = Instant::now();
    let mut scratch = Vec::new();
    while r.down < down {
        if Instant::now() >= deadline {
            r.down_s = t1.elapsed().as_secs_f64();
            r.result = "down-deadline".into();
            return r;
        }
        let _ = s.set_read_timeout(Some(op_timeout()));
        let n = ((down - r.down) as usize).min(buf.len());
        match s.read(&mut buf[..n]) {
            Ok(0) => {
                r.down_s = t1.elapsed().as_secs_f64();
                r.result = "down-closed-early".into();
                return r;
            }
            Ok(k) => {
                if let Err(off) = if checked { verify(DOWN_SEED, r.down, &buf[..k], &mut scratch) } else { Ok(()) } {
                    r.down_s = t1.elapsed().as_secs_f64();
                    r.result = format!("down-corrupt-at-{off}");
                    return r;
                }
                r.down += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                r.down_s = t1.elapsed().as_secs_f64();
                r.result = past_deadline("down", &e);
                return r;
            }
        }
    }
    r.down_s = t1.elapsed().as_secs_f64();
    r.result = "ok".into();
    r
}

/// One ECHO on a connection; `Ok(NAME PEER)`.
fn echo_once(s: &mut TcpStream, timeout: Duration) -> Result<String, String> {
    s.set_write_timeout(Some(timeout)).map_err(|e| format!("setsockopt-{}", kind(&e)))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| format!("setsockopt-{}", kind(&e)))?;
    s.write_all(b"ECHO\n").map_err(|e| format!("write-{}", kind(&e)))?;
    read_answer(s)
}

/// One BYE on a connection and the server's close after its answer; `Ok(NAME PEER)`.
fn bye_once(s: &mut TcpStream, timeout: Duration) -> Result<String, String> {
    s.set_write_timeout(Some(timeout)).map_err(|e| format!("setsockopt-{}", kind(&e)))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| format!("setsockopt-{}", kind(&e)))?;
    s.write_all(b"BYE\n").map_err(|e| format!("write-{}", kind(&e)))?;
    let answer = read_answer(s)?;
    let mut rest = [0u8; 64];
    match s.read(&mut rest) {
        Ok(0) => Ok(answer),
        Ok(_) => Err("data-after-bye".into()),
        Err(e) => Err(format!("close-{}", kind(&e))),
    }
}

/// Reads one `NAME PEER` line.
fn read_answer(s: &mut TcpStream) -> Result<String, String> {
    match read_line(s) {
        Ok(Some(l)) if l.split_whitespace().count() == 2 => Ok(l),
        Ok(Some(l)) => Err(format!("bad-answer:{}", l.replace(' ', "_"))),
        Ok(None) => Err("closed".into()),
        Err(e) => Err(format!("read-{}", kind(&e))),
    }
}

/// Counts by name: answers by backend, failures by kind.
type Tally = (BTreeMap<String, usize>, BTreeMap<String, usize>);

fn churn(a: &Args) -> i32 {
    let addr = a.addr(1);
    let count: usize = a.get("--count", 1000);
    let conc: usize = a.get::<usize>("--concurrency", 8).clamp(1, 256);
    let timeout = a.ms("--timeout-ms", 2000);
    let max_failures: usize = a.get("--max-failures", usize::MAX);
    let rate: f64 = a.get("--rate", 0.0);
    let deadline = Instant::now() + a.secs("--deadline-s", 120.0);
    let server_closes = a.has("--server-closes");
    let slow = a.flags.get("--slow-ms").map(|_| a.ms("--slow-ms", 0));
    let from: Arc<[Ipv4Addr]> = match a.flags.get("--from") {
        Some(v) => v.split(',').map(|ip| ip.parse().unwrap_or_else(|_| die(&format!("--from: {ip:?}")))).collect(),
        None => Arc::from([Ipv4Addr::UNSPECIFIED]),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // (answers by backend, failures by kind)
    let results: Arc<Mutex<Tally>> = Arc::default();
    let started = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (next, failed, results, from) = (next.clone(), failed.clone(), results.clone(), from.clone());
            std::thread::spawn(move || loop {
                if Instant::now() >= deadline || failed.load(Ordering::Relaxed) >= max_failures {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                if rate > 0.0 {
                    // Paced: a rate the test states, whatever the machine's speed.
                    let at = started + Duration::from_secs_f64(i as f64 / rate);
                    if at > deadline {
                        return;
                    }
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                }
                let t0 = Instant::now();
                let r = connect_bound(addr, from[i % from.len()], None, timeout).map_err(|e| format!("connect-{}", kind(&e))).and_then(|mut s| {
                    if server_closes {
                        bye_once(&mut s, timeout)
                    } else {
                        echo_once(&mut s, timeout)
                    }
                });
                // The stream was dropped inside: the client closed (first, unless the server did).
                let r = match (r, slow) {
                    (Ok(_), Some(limit)) if t0.elapsed() > limit => Err("slow".to_string()),
                    (r, _) => r,
                };
                let mut g = results.lock().unwrap();
                match r {
                    Ok(l) => *g.0.entry(l.split_whitespace().next().unwrap_or("").to_string()).or_default() += 1,
                    Err(k) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        *g.1.entry(k).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let g = results.lock().unwrap();
    let ok: usize = g.0.values().sum();
    let bad: usize = g.1.values().sum();
    for (n, c) in &g.0 {
        println!("backend {n} {c}");
    }
    for (k, c) in &g.1 {
        println!("failure {k} {c}");
    }
    println!("elapsed_s {elapsed:.2} rate {:.0}", (ok + bad) as f64 / elapsed.max(1e-9));
    let not_attempted = count - ok - bad;
    if not_attempted > 0 {
        let why = if Instant::now() >= deadline { "deadline" } else { "max-failures" };
        println!("not-attempted {not_attempted} ({why})");
    }
    println!("{ok} ok, {} failed", bad + not_attempted);
    i32::from(ok != count)
}

fn idle(a: &Args) -> i32 {
    let addr = a.addr(1);
    let count: usize = a.get::<usize>("--count", 16).min(1000);
    let wait_ms: u64 = a.get("--wait-ms", 20_000);
    let max_wait = a.secs("--max-wait-s", 300.0);
    let t = Duration::from_secs(5);
    // (stream, server-first, backend before, when WAIT was sent)
    let mut conns: Vec<(Option<TcpStream>, bool, String, Instant)> = Vec::new();
    for i in 0..count {
        let server_first = i % 2 == 1;
        let r = connect_from(addr, None, t).map_err(|e| format!("connect-{}", kind(&e))).and_then(|mut s| {
            let name = echo_once(&mut s, t)?;
            if server_first {
                s.write_all(format!("WAIT {wait_ms}\n").as_bytes()).map_err(|e| format!("write-{}", kind(&e)))?;
            }
            Ok((s, name.split_whitespace().next().unwrap_or("").to_string()))
        });
        match r {
            Ok((s, name)) => conns.push((Some(s), server_first, name, Instant::now())),
            Err(e) => conns.push((None, server_first, format!("ERR-{e}"), Instant::now())),
        }
    }
    println!("ready {}", conns.iter().filter(|c| c.0.is_some()).count());
    let _ = io::stdout().flush();
    let go = stdin_line(max_wait);
    let mut ok = 0;
    for (i, (s, server_first, before, waited)) in conns.iter_mut().enumerate() {
        let mode = if *server_first { "server-first" } else { "client-first" };
        let after = match (s.as_mut(), &go) {
            (None, _) => "ERR setup-failed".to_string(),
            (_, None) => "ERR no-go-from-stdin".to_string(),
            (Some(s), Some(_)) if *server_first => {
                // The server speaks WAIT ms after the request; allow 5 s more. All waits started
                // together, so once that has passed for one it has for all: what was said is
                // already buffered, and a short read suffices.
                let left = (*waited + Duration::from_millis(wait_ms) + t).saturating_duration_since(Instant::now()).max(Duration::from_millis(200));
                let _ = s.set_read_timeout(Some(left));
                read_answer(s).map(|l| l.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_else(|e| format!("ERR {e}"))
            }
            (Some(s), Some(_)) => echo_once(s, t).map(|l| l.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_else(|e| format!("ERR {e}")),
        };
        if after == *before && !before.starts_with("ERR") {
            ok += 1;
        }
        println!("conn {i} {mode} before={before} after={}", after.replace(' ', "_"));
    }
    println!("{ok} ok, {} failed", count - ok);
    i32::from(ok != count)
}

fn tcp_clients(a: &Args) -> i32 {
    let addr = a.addr(1);
    let count: usize = a.get::<usize>("--count", 1).min(100_000);
    let timeout = a.ms("--timeout-ms", 2000);
    let bind = a.flags.get("--bind").map(|p| p.parse().unwrap_or_else(|_| die("--bind")));
    for _ in 0..count {
        let r = connect_from(addr, bind, timeout).map_err(|e| format!("connect-{}", kind(&e))).and_then(|mut s| echo_once(&mut s, timeout));
        println!("{}", r.unwrap_or_else(|e| format!("ERR {e}")));
    }
    0
}

/// One datagram (`ASK SEQ`, padded with `.` to `size` bytes) and its answer on `u` (connected
/// when `to` is None); `NAME PEER`. The answer must carry the whole request back.
fn udp_exchange(u: &UdpSocket, to: Option<SocketAddr>, seq: u64, size: usize) -> Result<String, io::Error> {
    let mut req = format!("ASK {seq} ").into_bytes();
    if req.len() < size {
        req.resize(size.min(65507), b'.');
    }
    match to {
        Some(a) => u.send_to(&req, a)?,
        None => u.send(&req)?,
    };
    let mut buf = vec![0u8; 65536];
    // Bounded: stale answers (to earlier requests) are skipped, at most this many.
    for _ in 0..64 {
        let n = match to {
            Some(a) => {
                let (n, from) = u.recv_from(&mut buf)?;
                if from != a {
                    return Err(io::Error::other(format!("answer-from-{from}")));
                }
                n
            }
            None => u.recv(&mut buf)?,
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let w: Vec<&str> = text.split_whitespace().collect();
        if w.len() >= 4 && w[2] == "ASK" && w[3] == seq.to_string() {
            let head = w[0].len() + w[1].len() + 2;
            if n != head + req.len() + 1 || buf[head..n - 1] != req[..] {
                return Err(io::Error::other(format!("answer-of-{n}-bytes-to-{}", req.len())));
            }
            return Ok(format!("{} {}", w[0], w[1]));
        }
    }
    Err(io::Error::other("no-matching-answer"))
}

fn udp_clients(a: &Args) -> i32 {
    let addr = SocketAddr::V4(a.addr(1));
    let count: usize = a.get::<usize>("--count", 1).min(100_000);
    let timeout = a.ms("--timeout-ms", 2000);
    let connected = a.has("--connected");
    let size: usize = a.get("--size", 0);
    for seq in 0..count as u64 {
        let t0 = Instant::now();
        let r = UdpSocket::bind("0.0.0.0:0").and_then(|u| {
            u.set_read_timeout(Some(timeout))?;
            if connected {
                u.connect(addr)?;
                udp_exchange(&u, None, seq, size)
            } else {
                udp_exchange(&u, Some(addr), seq, size)
            }
        });
        match r {
            Ok(l) => println!("{l}"),
            Err(e) => println!("ERR {} after {} ms", kind_or_text(&e), t0.elapsed().as_millis()),
        }
    }
    0
}

/// The ones' complement sum of `data` folded to 16 bits, not inverted (RFC 1071).
fn csum_fold(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn forge_tcp(a: &Args) -> i32 {
    let (src, dst) = (a.addr(1), a.addr(2));
    let flags: u8 = a.pos.get(3).unwrap_or_else(|| die("missing FLAGS")).chars().fold(0, |f, c| {
        f | match c {
            'F' => 0x01,
            'S' => 0x02,
            'R' => 0x04,
            'P' => 0x08,
            'A' => 0x10,
            _ => die(&format!("FLAGS: {c:?} is not one of SAFRP")),
        }
    });
    let num = |i: usize, what: &str| -> u32 { a.pos.get(i).and_then(|v| v.parse().ok()).unwrap_or_else(|| die(&format!("{what}: a number"))) };
    let (seq, ack) = (num(4, "SEQ"), num(5, "ACK"));
    let count: usize = a.get::<usize>("--count", 1).min(100_000);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = !csum_fold(&pseudo, 0);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&(random_u64() as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = !csum_fold(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let pkt = [&ip[..], &tcp[..]].concat();
    // IPPROTO_RAW: the header is the caller's (IP_HDRINCL implied).
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) }).unwrap_or_else(|e| die(&format!("raw socket: {e}")));
    let _owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    for _ in 0..count {
        if let Err(e) = raw_send(fd, *dst.ip(), &pkt) {
            die(&format!("send: {e}"));
        }
    }
    println!("sent {count}");
    0
}

fn kind_or_text(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::Other && e.raw_os_error().is_none() {
        e.to_string()
    } else {
        kind(e)
    }
}

fn sctp_clients(a: &Args) -> i32 {
    let addr = a.addr(1);
    let count: usize = a.get::<usize>("--count", 1).min(100_000);
    let timeout = a.ms("--timeout-ms", 2000);
    let fixed: Option<u16> = a.flags.get("--sport").map(|p| p.parse().unwrap_or_else(|_| die("--sport")));
    let fd = raw_sctp_socket().unwrap_or_else(|e| die(&format!("raw SCTP socket: {e}")));
    for _ in 0..count {
        let sport = fixed.unwrap_or_else(|| 20000 + (random_u64() % 40000) as u16);
        println!("{}", sctp_exchange(fd, sport, addr, random_u64(), timeout));
    }
    0
}

fn session(a: &Args) -> i32 {
    let proto = a.pos.get(1).cloned().unwrap_or_default();
    let addr = a.addr(2);
    let timeout = a.ms("--timeout-ms", 500);
    let sport: u16 = a.get("--sport", 0);
    let reconnect = a.has("--reconnect");
    // Bounded: a session answers at most this many requests, and waits at most 10 minutes for one.
    let max_requests = 100_000;
    match proto.as_str() {
        "udp" => {
            let open = || -> io::Result<UdpSocket> {
                let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
                let u = unsafe { UdpSocket::from_raw_fd(fd) };
                // The fixed source port may still be held by the socket being replaced.
                set_int_opt(u.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                let sa = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport));
                cvt(unsafe { libc::bind(u.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) })?;
                u.set_read_timeout(Some(timeout))?;
                u.connect(SocketAddr::V4(addr))?;
                Ok(u)
            };
            let mut sock = open();
            for seq in 0..max_requests {
                if stdin_line(Duration::from_secs(600)).is_none() {
                    break;
                }
                let r = match &sock {
                    Ok(u) => udp_exchange(u, None, seq, 0),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                match r {
                    Ok(l) => println!("{l}"),
                    Err(e) => {
                        println!("ERR {}", kind_or_text(&e));
                        if reconnect {
                            drop(sock);
                            sock = open();
                        }
                    }
                }
                let _ = io::stdout().flush();
            }
        }
        "sctp" => {
            let fd = raw_sctp_socket().unwrap_or_else(|e| die(&format!("raw SCTP socket: {e}")));
            let sport = if sport == 0 { 20000 + (random_u64() % 40000) as u16 } else { sport };
            for _ in 0..max_requests {
                if stdin_line(Duration::from_secs(600)).is_none() {
                    break;
                }
                println!("{}", sctp_exchange(fd, sport, addr, random_u64(), timeout));
                let _ = io::stdout().flush();
            }
        }
        _ => die("session udp|sctp ADDR"),
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_dependent_and_verifies_in_any_chunking() {
        let mut whole = vec![0u8; 1000];
        fill(UP_SEED, 0, &mut whole);
        let mut part = vec![0u8; 333];
        fill(UP_SEED, 7, &mut part);
        assert_eq!(&whole[7..340], &part[..]);
        let mut scratch = Vec::new();
        assert_eq!(verify(UP_SEED, 7, &part, &mut scratch), Ok(()));
        assert!(verify(DOWN_SEED, 7, &part, &mut scratch).is_err(), "the other pattern must not verify");
        part[100] ^= 1;
        assert_eq!(verify(UP_SEED, 7, &part, &mut scratch), Err(107));
    }

    #[test]
    fn sctp_packets_carry_a_valid_crc32c() {
        // RFC 3720 B.4's first vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        let p = sctp_packet(1000, 2000, CHUNK_HEARTBEAT, b"0123456789abcdef");
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        let tot = (20 + p.len()) as u16;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&p);
        let s = parse_sctp(&ip).unwrap();
        assert!(s.crc_ok);
        assert_eq!((s.sport, s.dport, s.chunk_type, &s.info[..]), (1000, 2000, CHUNK_HEARTBEAT, &b"0123456789abcdef"[..]));
    }
}

/// What one `steady` loop saw.
#[derive(Default)]
struct Steady {
    ok: u64,
    failed: u64,
    worst: Duration,
    /// (ms since the start, kind) of the first few failures.
    errors: Vec<(u128, String)>,
}

impl Steady {
    fn record(&mut self, started: Instant, t0: Instant, r: Result<String, String>) -> Option<String> {
        let took = t0.elapsed();
        self.worst = self.worst.max(took);
        match r {
            Ok(name) => {
                self.ok += 1;
                Some(name)
            }
            Err(e) => {
                self.failed += 1;
                if self.errors.len() < 5 {
                    self.errors.push((t0.duration_since(started).as_millis(), e));
                }
                None
            }
        }
    }
}

/// Runs `op` every `period` (never two at once) until `stop`; each result into the tally.
fn steady_loop(period: Duration, stop: &std::sync::atomic::AtomicBool, started: Instant, deadline: Instant, mut op: impl FnMut() -> Result<String, String>) -> Steady {
    let mut st = Steady::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let t0 = Instant::now();
        st.record(started, t0, op());
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    st
}

fn steady(a: &Args) -> i32 {
    let tcp = a.addr(1);
    let udp = SocketAddr::V4(a.addr(2));
    let timeout = a.ms("--timeout-ms", 900);
    let (msg, conn, udp_every) = (a.ms("--msg-ms", 50), a.ms("--conn-ms", 100), a.ms("--udp-ms", 100));
    let started = Instant::now();
    let deadline = started + a.secs("--max-s", 600.0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The long-lived connection: up and answered before `ready`.
    let mut long = match connect_from(tcp, None, timeout) {
        Ok(s) => s,
        Err(e) => {
            println!("error long 0 connect-{}", kind(&e));
            println!("0 ok, 1 failed");
            return 1;
        }
    };
    let first = match echo_once(&mut long, timeout) {
        Ok(l) => l.split_whitespace().next().unwrap_or("").to_string(),
        Err(e) => {
            println!("error long 0 {e}");
            println!("0 ok, 1 failed");
            return 1;
        }
    };
    println!("ready");
    let _ = io::stdout().flush();
    let (s1, s2, s3, s4) = (stop.clone(), stop.clone(), stop.clone(), stop.clone());
    let (recent_every, keep) = (a.ms("--recent-ms", 50), a.get::<usize>("--recent-keep", 40).clamp(1, 1000));
    let recent_t = std::thread::spawn(move || {
        // (connection, its backend, when it was last asked)
        let mut kept: std::collections::VecDeque<(TcpStream, String, Instant)> = Default::default();
        let (mut opened, mut moved) = (0u64, 0u64);
        let st = steady_loop(recent_every, &s4, started, deadline, || {
            let mut s = connect_from(tcp, None, timeout).map_err(|e| format!("connect-{}", kind(&e)))?;
            let who = echo_once(&mut s, timeout)?.split_whitespace().next().unwrap_or("").to_string();
            opened += 1;
            kept.push_back((s, who, Instant::now()));
            if kept.len() > keep {
                kept.pop_front();
            }
            // Every kept connection not asked for 100 ms is asked now; the first failure ends
            // this round (and counts).
            let mut failure = None;
            kept.retain_mut(|(s, who, last)| {
                if failure.is_some() || last.elapsed() < Duration::from_millis(100) {
                    return true;
                }
                *last = Instant::now();
                match echo_once(s, timeout) {
                    Ok(l) => {
                        if l.split_whitespace().next() != Some(who.as_str()) {
                            moved += 1;
                        }
                        true
                    }
                    Err(e) => {
                        failure = Some(format!("kept-{e}"));
                        false
                    }
                }
            });
            match failure {
                Some(e) => Err(e),
                None => Ok(String::new()),
            }
        });
        (st, opened, moved)
    });
    let long_t = std::thread::spawn(move || {
        let mut broken = false;
        let mut moved = 0u64;
        let st = steady_loop(msg, &s1, started, deadline, || {
            if broken {
                // A broken connection stays broken: every later message fails too.
                return Err("broken".into());
            }
            let r = echo_once(&mut long, timeout);
            match &r {
                Err(_) => broken = true,
                Ok(l) if l.split_whitespace().next() != Some(first.as_str()) => moved += 1,
                Ok(_) => {}
            }
            r
        });
        (st, broken, moved)
    });
    let conn_t = std::thread::spawn(move || {
        steady_loop(conn, &s2, started, deadline, || {
            let mut s = connect_from(tcp, None, timeout).map_err(|e| format!("connect-{}", kind(&e)))?;
            echo_once(&mut s, timeout.saturating_sub(Duration::from_millis(1)).max(Duration::from_millis(1)))
        })
    });
    let udp_t = std::thread::spawn(move || {
        let mut seq = 0u64;
        steady_loop(udp_every, &s3, started, deadline, || {
            seq += 1;
            let u = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind-{}", kind(&e)))?;
            u.set_read_timeout(Some(timeout)).map_err(|e| format!("setsockopt-{}", kind(&e)))?;
            udp_exchange(&u, Some(udp), seq, 0).map_err(|e| if timed_out(&e) { "timeout".into() } else { kind_or_text(&e) })
        })
    });
    // Until told (a line or EOF on stdin) or the deadline.
    let waiter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = io::stdin().lock().read_line(&mut line);
            stop.store(true, Ordering::Relaxed);
        })
    };
    let (long_st, broken, moved) = long_t.join().unwrap_or_default();
    let conn_st = conn_t.join().unwrap_or_default();
    let udp_st = udp_t.join().unwrap_or_default();
    let (recent_st, opened, recent_moved) = recent_t.join().unwrap_or_default();
    drop(waiter);
    println!("long asked={} ok={} broken={} moved={moved}", long_st.ok + long_st.failed, long_st.ok, broken as u8);
    println!("conn ok={} failed={} worst_ms={}", conn_st.ok, conn_st.failed, conn_st.worst.as_millis());
    println!("udp ok={} failed={} worst_ms={}", udp_st.ok, udp_st.failed, udp_st.worst.as_millis());
    println!("recent opened={opened} ok={} failed={} moved={recent_moved}", recent_st.ok, recent_st.failed);
    for (what, st) in [("long", &long_st), ("conn", &conn_st), ("udp", &udp_st), ("recent", &recent_st)] {
        for (at, e) in &st.errors {
            println!("error {what} {at} {e}");
        }
    }
    let ok = long_st.ok + conn_st.ok + udp_st.ok + recent_st.ok;
    let failed = long_st.failed + conn_st.failed + udp_st.failed + moved + recent_st.failed + recent_moved;
    println!("{ok} ok, {failed} failed");
    if failed == 0 { 0 } else { 1 }
}
