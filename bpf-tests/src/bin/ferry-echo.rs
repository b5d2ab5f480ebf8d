//! The lab's workload: a TCP and UDP echo server that answers with its pod's name and the source
//! address it saw, and the matching clients. Every operation has a timeout, so nothing hangs.
//!
//!   ferry-echo serve NAME TCP_PORT UDP_PORT
//!   ferry-echo tcp ADDR N          N new connections, one request each
//!   ferry-echo udp ADDR N          N new sockets (new source ports), one datagram each
//!   ferry-echo udp-connected ADDR N  as udp, on connected sockets (ICMP errors are reported)
//!   ferry-echo http-get ADDR       GET / over HTTP/1.1: `STATUS BODY` on one line
//!   ferry-echo tcp-session ADDR    one connection; a request per line on stdin
//!   ferry-echo udp-session ADDR    one socket (fixed source port); a request per line on stdin
//! Client output: one line per request, `NAME SEEN_SOURCE`, or `ERR <what>`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["serve", name, tcp, udp] => serve(name, tcp.parse().unwrap(), udp.parse().unwrap()),
        ["tcp", addr, n] => (0..n.parse::<usize>().unwrap()).for_each(|_| println!("{}", tcp_once(addr.parse().unwrap()))),
        ["udp", addr, n] => (0..n.parse::<usize>().unwrap()).for_each(|_| println!("{}", udp_once(addr.parse().unwrap()))),
        ["udp-connected", addr, n] => (0..n.parse::<usize>().unwrap()).for_each(|_| println!("{}", udp_connected_once(addr.parse().unwrap()))),
        ["http-get", addr] => println!("{}", http_get(addr.parse().unwrap())),
        ["tcp-session", addr] => tcp_session(addr.parse().unwrap()),
        ["udp-session", addr] => udp_session(addr.parse().unwrap()),
        _ => {
            eprintln!("usage: see the comment at the top of ferry-echo.rs");
            std::process::exit(2);
        }
    }
}

fn serve(name: &str, tcp: u16, udp: u16) {
    let l = TcpListener::bind(("0.0.0.0", tcp)).expect("bind tcp");
    let u = UdpSocket::bind(("0.0.0.0", udp)).expect("bind udp");
    let n = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            if let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(format!("{n} {from}\n").as_bytes(), from);
            }
        }
    });
    for s in l.incoming().flatten() {
        let n = name.to_string();
        std::thread::spawn(move || {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                if line.is_err() || w.write_all(format!("{n} {peer}\n").as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
}

fn err(e: std::io::Error) -> String {
    format!("ERR {:?}", e.kind())
}

fn tcp_once(addr: SocketAddr) -> String {
    let s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return err(e),
    };
    exchange(&s)
}

fn exchange(s: &TcpStream) -> String {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = s;
    if let Err(e) = w.write_all(b"hi\n") {
        return err(e);
    }
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(0) => "ERR closed".into(),
        Ok(_) => line.trim().to_string(),
        Err(e) => err(e),
    }
}

fn udp_exchange(u: &UdpSocket, addr: SocketAddr) -> String {
    if let Err(e) = u.send_to(b"hi", addr) {
        return err(e);
    }
    let mut buf = [0u8; 512];
    match u.recv_from(&mut buf) {
        Ok((n, from)) if from == addr => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Ok((_, from)) => format!("ERR reply from {from}, not {addr}"),
        Err(e) => err(e),
    }
}

fn udp_once(addr: SocketAddr) -> String {
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    u.set_read_timeout(Some(TIMEOUT)).unwrap();
    udp_exchange(&u, addr)
}

fn udp_connected_once(addr: SocketAddr) -> String {
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    u.set_read_timeout(Some(TIMEOUT)).unwrap();
    if let Err(e) = u.connect(addr).and_then(|_| u.send(b"hi")) {
        return err(e);
    }
    let mut buf = [0u8; 512];
    match u.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Err(e) => err(e),
    }
}

fn http_get(addr: SocketAddr) -> String {
    use std::io::Read;
    let mut s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return err(e),
    };
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    if let Err(e) = s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()) {
        return err(e);
    }
    let mut resp = String::new();
    if let Err(e) = s.read_to_string(&mut resp) {
        return err(e);
    }
    let status = resp.split_whitespace().nth(1).unwrap_or("?").to_string();
    let body: String = resp.split("\r\n\r\n").nth(1).unwrap_or("").split_whitespace().collect();
    format!("{status} {body}")
}

fn tcp_session(addr: SocketAddr) {
    let s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", err(e));
            return;
        }
    };
    for _ in std::io::stdin().lines() {
        println!("{}", exchange(&s));
    }
}

fn udp_session(addr: SocketAddr) {
    let u = UdpSocket::bind("0.0.0.0:0").unwrap();
    u.set_read_timeout(Some(TIMEOUT)).unwrap();
    for _ in std::io::stdin().lines() {
        println!("{}", udp_exchange(&u, addr));
    }
}
