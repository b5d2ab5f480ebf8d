//! The network namespace trace's test runs happen in, so that the FIB lookups the programs make
//! (to send a translated packet out, to check its size against the path MTU) see a node of the
//! scenario's making rather than whatever machine runs trace: the node's addresses on one link
//! of `node.mtu` bytes, and a default route over it. Created per scenario, entered by the calling
//! thread only, and removed (the thread back in its own namespace) when dropped.
//!
//! Each pod of the node that sends gets its own interface, routed to its address as a routed CNI
//! sets a pod up, so the datapath's anti-spoofing sees what it sees on a node: a pod's packets
//! come in on the interface its address is routed through.
use std::{cell::RefCell, collections::BTreeMap, net::Ipv4Addr, os::fd::AsRawFd, process::Command};

pub struct TraceNet {
    name: String,
    orig: std::fs::File,
    /// Pod address -> the ifindex of its interface (host side).
    ifaces: RefCell<BTreeMap<Ipv4Addr, u32>>,
    /// The node's link to the outside (`t0`): where packets from outside come in.
    pub uplink: u32,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

impl TraceNet {
    pub fn enter(node_ips: &[Ipv4Addr], mtu: u16) -> Result<TraceNet, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("ferry-trace-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let orig = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| format!("own network namespace: {e}"))?;
        ip(&["netns", "add", &name])?;
        // From here on, dropping the guard removes the namespace.
        let mut net = TraceNet { name, orig, ifaces: RefCell::default(), uplink: 0 };
        let n = net.name.as_str();
        let mtu = mtu.to_string();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "t0", "type", "veth", "peer", "name", "t1"])?;
        ip(&["-n", n, "link", "set", "t1", "up"])?;
        ip(&["-n", n, "link", "set", "t0", "mtu", &mtu, "up"])?;
        for a in node_ips {
            ip(&["-n", n, "addr", "add", &format!("{a}/32"), "dev", "t0"])?;
        }
        ip(&["-n", n, "route", "add", "default", "dev", "t0"])?;
        let f = std::fs::File::open(format!("/run/netns/{n}")).map_err(|e| format!("netns {n}: {e}"))?;
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("entering netns {n}: {}", std::io::Error::last_os_error()));
        }
        // FIB lookups answer only where forwarding is on (this thread now sees this namespace's
        // /proc/sys/net).
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| format!("ip_forward in {n}: {e}"))?;
        let t0 = std::ffi::CString::new("t0").expect("name");
        net.uplink = unsafe { libc::if_nametoindex(t0.as_ptr()) };
        if net.uplink == 0 {
            return Err(format!("t0 in {}: {}", net.name, std::io::Error::last_os_error()));
        }
        Ok(net)
    }
}

impl TraceNet {
    /// The interface of the pod at `ip`, created on first use: the host end of a veth, up, with a
    /// route to `ip/32` over it.
    pub fn pod_iface(&self, addr: Ipv4Addr) -> Result<u32, String> {
        if let Some(i) = self.ifaces.borrow().get(&addr) {
            return Ok(*i);
        }
        let n = self.name.as_str();
        let k = self.ifaces.borrow().len();
        let (host, peer) = (format!("p{k}"), format!("q{k}"));
        ip(&["-n", n, "link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        ip(&["-n", n, "link", "set", &peer, "up"])?;
        ip(&["-n", n, "link", "set", &host, "up"])?;
        ip(&["-n", n, "route", "add", &format!("{addr}/32"), "dev", &host])?;
        // This thread is in the namespace: the name resolves there.
        let c = std::ffi::CString::new(host.clone()).map_err(|e| e.to_string())?;
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("{host} in {n}: {}", std::io::Error::last_os_error()));
        }
        self.ifaces.borrow_mut().insert(addr, ifindex);
        Ok(ifindex)
    }
}

impl Drop for TraceNet {
    fn drop(&mut self) {
        unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
