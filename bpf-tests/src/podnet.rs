//! A node's pod interfaces for packet tests: a test namespace in which each pod's host-side
//! interface `hN` is routed to the pod's address (`/32`), as a routed CNI sets pods up, so that
//! the agent's code finds every pod's interface by its route and a test can run a program "on"
//! a pod's interface (`SkbIn::ifindex`). The calling thread is inside the namespace while the
//! value lives; everything goes with it.
use crate::lab;

pub struct PodNet {
    _entered: lab::Entered,
    _ns: lab::Netns,
    /// The host-side interface of each pod, in the order given.
    pub ifs: Vec<u32>,
}

impl PodNet {
    /// A namespace with the node's address `node` on an uplink (default route behind it) and one
    /// routed interface per pod address in `pods`.
    pub fn new(tag: &str, node: &str, pods: &[&str]) -> PodNet {
        let ns = lab::Netns::new(format!("ferry-{tag}-{}", lab::run_id()));
        ns.sysctl("net.ipv4.ip_forward=1");
        ns.exec_ok(&["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
        ns.exec_ok(&["ip", "link", "set", "up1", "up"]);
        ns.exec_ok(&["ip", "link", "set", "up0", "up"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{node}/24"), "dev", "up0"]);
        ns.exec_ok(&["ip", "route", "add", "default", "via", &gateway(node), "dev", "up0"]);
        for (i, pod) in pods.iter().enumerate() {
            let (h, p) = (format!("h{i}"), format!("p{i}"));
            ns.exec_ok(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &p]);
            ns.exec_ok(&["ip", "link", "set", &p, "up"]);
            ns.exec_ok(&["ip", "link", "set", &h, "up"]);
            ns.exec_ok(&["ip", "route", "add", &format!("{pod}/32"), "dev", &h]);
        }
        let entered = ns.enter();
        let ifs: Vec<u32> = (0..pods.len())
            .map(|i| {
                let c = std::ffi::CString::new(format!("h{i}")).unwrap();
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            })
            .collect();
        assert!(ifs.iter().all(|i| *i > 1), "{ifs:?}");
        PodNet { _entered: entered, _ns: ns, ifs }
    }
}

/// The uplink's gateway: the first address of the node's /24.
fn gateway(node: &str) -> String {
    let ip: std::net::Ipv4Addr = node.parse().expect("node address");
    let o = ip.octets();
    format!("{}.{}.{}.1", o[0], o[1], o[2])
}
