//! Connection tracking's lifecycle on the real programs (BPF_PROG_TEST_RUN): TCP and UDP state,
//! netfilter's and kube-proxy's timeouts, the move between the LRU and the assured map, expiry,
//! reopening, SNAT port reuse, stale reply entries, clashing direct flows, and established
//! connections surviving a full LRU map.
use std::net::Ipv4Addr;

use bpf_tests::{fixture::*, packet::*};
use dataplane_agent::bpf::conntrack::{monotonic_ns, CtRow};
use dataplane_common::{
    ct_timeout, names, stat, Ct4Entry, CT_F_CLASH, CT_F_LOCAL_BACKEND, CT_F_REPLY_AT_SOURCE, CT_S_ASSURED, CT_S_ESTABLISHED, CT_S_FIN_ORIG, CT_S_FIN_REPLY, CT_S_SEEN_REPLY,
    CT_TIMEOUT_DEFAULT_S,
};

const SVC: &str = "172.30.0.10";
const CLIENT: (&str, u16) = ("10.0.0.2", 40000);
const BACKEND: &str = "10.180.0.1";

/// A ClusterIP (TCP 80 and UDP 53) over `backends`.
fn web(backends: &[&str]) -> String {
    let eps: String = backends.iter().map(|a| format!("- addresses: [{a}]\n")).collect();
    format!(
        "kind: Service\nmetadata: {{name: web, namespace: t}}\nspec: {{clusterIP: {SVC}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]}}\n---\n\
         kind: EndpointSlice\nmetadata: {{name: web-1, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}"
    )
}

fn client() -> (Ipv4Addr, u16) {
    (ip(CLIENT.0), CLIENT.1)
}

fn svc(port: u16) -> (Ipv4Addr, u16) {
    (ip(SVC), port)
}

/// Both entries of the connection whose forward key starts at `client` (any port when 0).
fn pair(dp: &Datapath, src: (Ipv4Addr, u16)) -> Vec<CtRow> {
    let rows = dp.maps.ct.rows();
    let fwd: Vec<CtRow> = rows
        .iter()
        .filter(|r| !r.is_reply() && r.key.saddr_be == u32::from_ne_bytes(src.0.octets()) && (src.1 == 0 || u16::from_be(r.key.sport_be) == src.1))
        .copied()
        .collect();
    let mut out = fwd.clone();
    for f in &fwd {
        out.extend(rows.iter().filter(|r| r.is_reply() && r.entry.nat_daddr_be == f.key.saddr_be && r.entry.nat_dport_be == f.key.sport_be).copied());
    }
    out
}

/// Asserts both entries are in `assured` (or the LRU map), with `state` bits set, and expire
/// about `timeout_s` from now.
fn assert_pair(rows: &[CtRow], assured: bool, state: u32, timeout_s: u32) {
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let now = monotonic_ns();
    for r in rows {
        assert_eq!(r.assured, assured, "map of {r:#?}");
        assert_eq!(r.entry.state & state, state, "state bits {state:#x} in {r:#?}");
        assert_eq!(r.entry.state & CT_S_ASSURED != 0, assured, "assured bit of {r:#?}");
        let left = r.entry.expires_ns.saturating_sub(now) as f64 / 1e9;
        assert!((timeout_s as f64 - 5.0..=timeout_s as f64 + 1.0).contains(&left), "expires in {left:.1}s, want {timeout_s}s: {r:#?}");
    }
}

/// Sends a TCP segment with `flags` from the client (through from-pod) or from the backend it
/// was translated to (through to-pod, the reply path into a pod of this node); returns the run.
fn from_client(dp: &Datapath, flags: &str) -> Run {
    dp.from_pod(&tcp_flags(client(), svc(80), flags, b""))
}

fn from_backend(dp: &Datapath, backend: (Ipv4Addr, u16), flags: &str) -> Run {
    dp.to_pod(&tcp_flags(backend, client(), flags, b""))
}

fn backend_of(r: &Run) -> (Ipv4Addr, u16) {
    let t = tuple(&r.data);
    (t.dst, t.dport)
}

/// Rewrites both entries of a connection (`f` on each).
fn edit(dp: &mut Datapath, rows: &[CtRow], f: impl Fn(&mut Ct4Entry)) {
    for r in rows {
        let mut e = r.entry;
        f(&mut e);
        let map = if r.assured { &mut dp.maps.ct.assured } else { &mut dp.maps.ct.lru };
        map.insert(r.key, e, 0).unwrap();
    }
}

#[test]
fn tcp_goes_through_syn_established_and_close_with_netfilter_timeouts() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    let syn = from_client(&dp, "S");
    assert_eq!(syn.action, TC_ACT_OK);
    let be = backend_of(&syn);
    assert_eq!(be, (ip(BACKEND), 8080));
    assert_pair(&pair(&dp, client()), false, 0, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_SYN]);

    // The backend's SYN-ACK comes back translated; the connection is replied, not yet assured.
    let synack = from_backend(&dp, be, "SA");
    assert_eq!(tuple(&synack.data).src, ip(SVC));
    assert_pair(&pair(&dp, client()), false, CT_S_SEEN_REPLY, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_SYN]);

    // The client's ACK completes the handshake: established, both entries in the assured map.
    assert_eq!(backend_of(&from_client(&dp, "A")), be);
    assert_pair(&pair(&dp, client()), true, CT_S_ESTABLISHED | CT_S_SEEN_REPLY, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_ESTABLISHED]);
    assert_eq!(dp.stat(stat::CT_ASSURED), 1);

    // Data both ways keeps it there.
    assert_eq!(backend_of(&dp.from_pod(&tcp_flags(client(), svc(80), "PA", b"GET /"))), be);
    assert_eq!(tuple(&from_backend(&dp, be, "PA").data).src, ip(SVC));

    // The client closes its side: half-closed, still assured, kube-proxy's close-wait timeout.
    from_client(&dp, "FA");
    assert_pair(&pair(&dp, client()), true, CT_S_FIN_ORIG, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE_WAIT]);
    // The backend closes too: over, back to the LRU map with TIME_WAIT's timeout; the last ACK
    // is still translated.
    assert_eq!(tuple(&from_backend(&dp, be, "FA").data).src, ip(SVC));
    assert_pair(&pair(&dp, client()), false, CT_S_FIN_ORIG | CT_S_FIN_REPLY, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_TIME_WAIT]);
    assert_eq!(dp.stat(stat::CT_CLOSING), 1);
    assert_eq!(backend_of(&from_client(&dp, "A")), be);

    // A RST instead ends a connection with netfilter's CLOSE timeout.
    let other = (ip(CLIENT.0), 40001);
    let r = dp.from_pod(&tcp_flags(other, svc(80), "S", b""));
    dp.to_pod(&tcp_flags(backend_of(&r), other, "RA", b""));
    assert_pair(&pair(&dp, other), false, dataplane_common::CT_S_RST, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE]);
}

#[test]
fn udp_is_unreplied_then_replied_then_a_stream_with_the_configured_timeouts() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    // The node's kube-proxy-named settings reach the datapath through its config.
    let mut cfg = dp.maps.config.get(&0, 0).unwrap();
    cfg.ct_timeout_s[ct_timeout::UDP] = 45;
    cfg.ct_timeout_s[ct_timeout::UDP_STREAM] = 300;
    dp.maps.set_config(cfg).unwrap();
    let r = dp.from_pod(&udp(client(), svc(53), b"q"));
    let be = backend_of(&r);
    assert_eq!(be, (ip(BACKEND), 5353));
    assert_pair(&pair(&dp, client()), false, 0, 45);
    let reply = dp.to_pod(&udp(be, client(), b"a"));
    assert_eq!(tuple(&reply.data).src, ip(SVC));
    // A query and its answer: replied, but not yet a stream (netfilter's rule), so it stays in
    // the LRU map with the short timeout, evictable like any new flow (DNS churn never fills the
    // assured map).
    assert_pair(&pair(&dp, client()), false, CT_S_SEEN_REPLY, 45);
    // Still talking two seconds after it began: a stream, assured, with the stream timeout.
    let rows = pair(&dp, client());
    let started = monotonic_ns() - 3_000_000_000;
    edit(&mut dp, &rows, |e| e.created_ns = started);
    assert_eq!(backend_of(&dp.from_pod(&udp(client(), svc(53), b"q2"))), be);
    assert_pair(&pair(&dp, client()), true, CT_S_SEEN_REPLY | CT_S_ESTABLISHED, 300);
}

#[test]
fn an_expired_connection_counts_as_absent() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND, "10.180.0.2", "10.180.0.3"]));
    let be = backend_of(&from_client(&dp, "S"));
    from_backend(&dp, be, "SA");
    from_client(&dp, "A");
    let rows = pair(&dp, client());
    let now = monotonic_ns();
    edit(&mut dp, &rows, |e| e.expires_ns = now - 1);
    // The backend's next packet finds nothing: it is not translated.
    let late = from_backend(&dp, be, "PA");
    assert_eq!(tuple(&late.data).src, be.0, "an expired reply entry still translated");
    // The client's next packet is a new connection (a lookup that finds an expired entry deletes it).
    let before = dp.stat(stat::CT_NEW);
    from_client(&dp, "PA");
    assert_eq!(dp.stat(stat::CT_NEW), before + 1);
    assert!(dp.stat(stat::CT_EXPIRED) >= 2, "expired lookups: {}", dp.stat(stat::CT_EXPIRED));
    let fresh = pair(&dp, client());
    assert_eq!(fresh.len(), 2, "{fresh:#?}");
    assert!(fresh.iter().all(|r| r.entry.expires_ns > now), "{fresh:#?}");
}

/// A whole TCP connection from the client through the Service: handshake, then a FIN each way
/// and the last ACK. Returns its backend.
fn closed_connection(dp: &Datapath) -> (Ipv4Addr, u16) {
    let be = backend_of(&from_client(dp, "S"));
    from_backend(dp, be, "SA");
    from_client(dp, "A");
    from_client(dp, "FA");
    from_backend(dp, be, "FA");
    from_client(dp, "A");
    be
}

#[test]
fn a_syn_on_a_closed_connections_tuple_starts_a_new_connection() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    let be = closed_connection(&dp);
    let old = pair(&dp, client());
    assert!(old.iter().all(|r| r.entry.state & CT_S_FIN_REPLY != 0));
    // The client reuses its port at once (netfilter reopens a TIME_WAIT tuple on a SYN).
    assert_eq!(backend_of(&from_client(&dp, "S")), be);
    assert_eq!(dp.stat(stat::CT_REOPEN), 1);
    let new = pair(&dp, client());
    assert_pair(&new, false, 0, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_SYN]);
    assert!(new.iter().all(|r| r.entry.state == dataplane_common::CT_S_SEQ_ORIG), "{new:#?}");
}

#[test]
fn a_blind_rst_does_not_end_a_connection_but_a_real_one_does() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    // The client's segments end at 1000 + 1 (SYN) and then 1000 + 500 (500 bytes from 1000).
    let be = backend_of(&from_client(&dp, "S"));
    from_backend(&dp, be, "SA");
    from_client(&dp, "A");
    dp.from_pod(&tcp_seq(client(), svc(80), "PA", 1000, &[7u8; 500]));
    let established = CT_S_ESTABLISHED | CT_S_SEEN_REPLY;
    // A RST with the client's tuple but a sequence number far from the client's: forged (or
    // stale). It is passed on (the backend ignores it), and the connection stays as it was.
    let blind = dp.from_pod(&tcp_seq(client(), svc(80), "R", 0x7000_0000, b""));
    assert_eq!(tuple(&blind.data).dst, be.0, "the RST is still translated for the endpoint to judge");
    assert_pair(&pair(&dp, client()), true, established, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_ESTABLISHED]);
    assert!(pair(&dp, client()).iter().all(|r| r.entry.state & dataplane_common::CT_S_RST == 0));
    assert_eq!(dp.stat(stat::CT_RST_IGNORED), 1);
    // The same from the backend's side.
    from_backend_seq(&dp, be, "R", 0x1234_5678);
    assert_eq!(dp.stat(stat::CT_RST_IGNORED), 2);
    assert!(pair(&dp, client()).iter().all(|r| r.entry.state & dataplane_common::CT_S_RST == 0));
    // The client's real RST (its next sequence number, 1500) ends it.
    dp.from_pod(&tcp_seq(client(), svc(80), "R", 1500, b""));
    assert_pair(&pair(&dp, client()), false, dataplane_common::CT_S_RST, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE]);
    // A backend refusing the SYN (its first packet a RST) ends the attempt, whatever its number.
    let other = (ip(CLIENT.0), 40002);
    let r = dp.from_pod(&tcp_flags(other, svc(80), "S", b""));
    dp.to_pod(&tcp_seq(backend_of(&r), other, "RA", 0, b""));
    assert_pair(&pair(&dp, other), false, dataplane_common::CT_S_RST, CT_TIMEOUT_DEFAULT_S[ct_timeout::TCP_CLOSE]);
}

fn from_backend_seq(dp: &Datapath, backend: (Ipv4Addr, u16), flags: &str, seq: u32) -> Run {
    dp.to_pod(&tcp_seq(backend, client(), flags, seq, b""))
}

#[test]
fn a_stale_reply_entry_never_hijacks_a_direct_connection() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    // A pod talks to the Service from port P, and the connection ends.
    let be = closed_connection(&dp);
    // Then it connects from P straight to the backend pod.
    let direct = dp.from_pod(&tcp_flags(client(), be, "S", b""));
    assert_eq!(direct.action, TC_ACT_OK);
    assert_eq!(tuple(&direct.data), tuple(&tcp_flags(client(), be, "S", b"")), "the direct SYN was translated");
    assert_eq!(dp.stat(stat::CT_STALE), 1);
    assert!(pair(&dp, client()).is_empty(), "stale entries left: {:#?}", pair(&dp, client()));
    // The backend's SYN-ACK reaches the pod as the backend, not as the Service.
    let synack = tcp_flags(be, client(), "SA", b"");
    assert_eq!(dp.to_pod(&synack).data, synack);

    // The same when only the SYN-ACK meets the stale entry (the SYN left another way).
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    let be = backend_of(&from_client(&dp, "S"));
    from_backend(&dp, be, "RA");
    let synack = tcp_flags(be, client(), "SA", b"");
    assert_eq!(dp.to_pod(&synack).data, synack, "a SYN-ACK on a closed connection's reply tuple was translated");
    assert_eq!(dp.stat(stat::CT_STALE), 1);
}

#[test]
fn a_direct_flow_clashing_with_a_live_service_connection_gets_another_source_port() {
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]));
    let src = (ip(CLIENT.0), 5000);
    let be = backend_of(&dp.from_pod(&udp(src, svc(53), b"q")));
    dp.to_pod(&udp(be, src, b"a"));
    // The same pod, from the same port, straight to the backend: on the wire the two flows
    // would be one tuple, so the direct one gets another source port (netfilter does the same).
    let direct = dp.from_pod(&udp(src, be, b"direct"));
    let t = tuple(&direct.data);
    assert_eq!((t.src, t.dst, t.dport), (src.0, be.0, be.1));
    assert_ne!(t.sport, src.1, "the clashing flow kept its port");
    assert_eq!(dp.stat(stat::CT_CLASH), 1);
    assert!(dp.maps.ct.rows().iter().any(|r| r.entry.flags & CT_F_CLASH != 0));
    // Replies to each are told apart.
    let to_direct = dp.to_pod(&udp(be, (src.0, t.sport), b"d"));
    assert_eq!(tuple(&to_direct.data), tuple(&udp(be, src, b"d")), "the direct flow's reply");
    let to_service = dp.to_pod(&udp(be, src, b"s"));
    assert_eq!(tuple(&to_service.data), tuple(&udp(svc(53), src, b"s")), "the Service flow's reply");
    assert_checksums(&to_direct.data);
    assert_checksums(&direct.data);

    // The same with the backend on this node: its replies are translated where they leave it,
    // and must not be translated again on the way into the client.
    let mut dp = Datapath::new();
    dp.apply_yaml(&web(&[BACKEND]).replace("- addresses: [10.180.0.1]", "- {addresses: [10.0.0.5], nodeName: node1}"));
    let be = backend_of(&dp.from_pod(&udp(src, svc(53), b"q")));
    assert_eq!(be, (ip("10.0.0.5"), 5353));
    // The Service flow's answer: translated leaving the backend's veth, untouched entering the client's.
    let answered = dp.from_pod(&udp(be, src, b"a"));
    assert_eq!(tuple(&answered.data), tuple(&udp(svc(53), src, b"a")));
    assert_eq!(dp.to_pod(&answered.data).data, answered.data);
    let direct = dp.from_pod(&udp(src, be, b"direct"));
    let t = tuple(&direct.data);
    assert_ne!(t.sport, src.1);
    let back = dp.from_pod(&udp(be, (src.0, t.sport), b"d"));
    assert_eq!(tuple(&back.data), tuple(&udp(be, src, b"d")), "the direct reply leaving the backend");
    assert_eq!(tuple(&dp.to_pod(&back.data).data), tuple(&udp(be, src, b"d")), "the direct reply was translated twice");
}

/// A ClusterIP whose one endpoint, 10.0.0.5, is a pod of this node (node1).
fn web_local() -> String {
    web(&[BACKEND]).replace("- addresses: [10.180.0.1]", "- {addresses: [10.0.0.5], nodeName: node1}")
}

/// The reply entries of the Service connections (the clashing flows' left out).
fn service_replies(dp: &Datapath) -> Vec<CtRow> {
    dp.maps.ct.rows().into_iter().filter(|r| r.is_reply() && r.entry.flags & CT_F_CLASH == 0).collect()
}

#[test]
fn a_local_backend_behind_a_link_without_ferrys_programs_is_answered_translated() {
    // A pod of this node behind a link the agent did not attach to (a CNI naming its links
    // otherwise than --pod-interfaces, a bridge, a tunnel, a route over another interface): its
    // replies never pass a from-pod hook, so the to-pod hook on the client's veth is the first
    // to see them and must translate them (kube-proxy's conntrack does, whatever the link).
    let mut dp = Datapath::new();
    dp.apply_yaml(&web_local());
    let syn = from_client(&dp, "S");
    let be = backend_of(&syn);
    assert_eq!(be, (ip("10.0.0.5"), 8080));
    let reply = service_replies(&dp);
    assert_eq!(reply.len(), 1, "{reply:#?}");
    assert!(reply[0].entry.flags & CT_F_LOCAL_BACKEND != 0, "{reply:#?}");
    assert_eq!(reply[0].entry.flags & CT_F_REPLY_AT_SOURCE, 0, "no reply has left the backend yet: {reply:#?}");
    // The SYN-ACK entering the client's veth, never translated before: translated here.
    let synack = from_backend(&dp, be, "SA");
    assert_eq!(synack.action, TC_ACT_OK);
    assert_eq!(tuple(&synack.data), tuple(&tcp_flags(svc(80), client(), "SA", b"")), "the backend's reply reached the client untranslated");
    assert_checksums(&synack.data);
    // The same when the backend's link is an external interface: passed there (a pod's
    // connection), translated entering the client.
    let seen = dp.from_world(&tcp_flags(be, client(), "A", b"x"));
    assert_eq!(tuple(&seen.data), tuple(&tcp_flags(be, client(), "A", b"")), "from-world passes a pod connection's reply");
    assert_eq!(tuple(&dp.to_pod(&seen.data).data), tuple(&tcp_flags(svc(80), client(), "A", b"")));
    assert_eq!(service_replies(&dp)[0].entry.flags & CT_F_REPLY_AT_SOURCE, 0, "{:#?}", service_replies(&dp));

    // Behind one of Ferry's pod links the reply is translated leaving the backend, and the
    // connection is marked so that it is never translated twice.
    let mut dp = Datapath::new();
    dp.apply_yaml(&web_local());
    let be = backend_of(&from_client(&dp, "S"));
    let left = dp.from_pod(&tcp_flags(be, client(), "SA", b""));
    assert_eq!(tuple(&left.data), tuple(&tcp_flags(svc(80), client(), "SA", b"")));
    let reply = service_replies(&dp);
    assert!(reply[0].entry.flags & CT_F_REPLY_AT_SOURCE != 0, "{reply:#?}");
    assert_eq!(dp.to_pod(&left.data).data, left.data, "translated again entering the client");
}

#[test]
fn a_clashing_direct_reply_before_any_service_reply_is_not_translated_twice() {
    // The Service connection has had no reply yet when the pod's direct flow clashes with it:
    // the direct flow's reply, translated leaving the backend, becomes the Service connection's
    // reply tuple, and the to-pod hook must not take it for an untranslated Service reply.
    let mut dp = Datapath::new();
    dp.apply_yaml(&web_local());
    let src = (ip(CLIENT.0), 5000);
    let be = backend_of(&dp.from_pod(&udp(src, svc(53), b"q")));
    let direct = dp.from_pod(&udp(src, be, b"direct"));
    let t = tuple(&direct.data);
    assert_ne!(t.sport, src.1, "the clashing flow kept its port");
    let back = dp.from_pod(&udp(be, (src.0, t.sport), b"d"));
    assert_eq!(tuple(&back.data), tuple(&udp(be, src, b"d")), "the direct reply leaving the backend");
    assert_eq!(tuple(&dp.to_pod(&back.data).data), tuple(&udp(be, src, b"d")), "the direct reply was translated twice");
    // The Service's own reply afterwards: translated once, leaving the backend.
    let answered = dp.from_pod(&udp(be, src, b"a"));
    assert_eq!(tuple(&answered.data), tuple(&udp(svc(53), src, b"a")));
    assert_eq!(dp.to_pod(&answered.data).data, answered.data);
}

#[test]
fn established_connections_survive_a_full_lru_map() {
    // A small LRU map, filled many times over by one-packet flows, with random backend choice:
    // a lost entry would send the next packet to another backend, or leave a reply untranslated.
    let mut dp = Datapath::with_capacities(&[(names::CONNTRACK, 1024)]);
    let backends: Vec<String> = (1..=8).map(|i| format!("10.180.0.{i}")).collect();
    let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
    dp.rec.algorithm = dataplane_agent::reconcile::Algorithm::Random;
    dp.apply_yaml(&web(&refs));
    let clients: Vec<(Ipv4Addr, u16)> = (0..8).map(|i| (ip(CLIENT.0), 41000 + i)).collect();
    let mut chosen = Vec::new();
    for c in &clients {
        let be = backend_of(&dp.from_pod(&tcp_flags(*c, svc(80), "S", b"")));
        dp.to_pod(&tcp_flags(be, *c, "SA", b""));
        dp.from_pod(&tcp_flags(*c, svc(80), "A", b""));
        chosen.push(be);
    }
    for i in 0..20_000u32 {
        let src = (Ipv4Addr::from(0x0a00_1000 + (i >> 8)), 1024 + (i & 0xff) as u16);
        dp.from_pod(&udp(src, svc(53), b"x"));
    }
    let created = dp.stat(stat::CT_CREATED);
    let lru_now = dp.maps.ct.rows().iter().filter(|r| !r.assured).count() as u64;
    assert!(created > lru_now + 10_000, "the LRU map did not overflow: {created} created, {lru_now} present");
    for (c, be) in clients.iter().zip(&chosen) {
        assert_eq!(backend_of(&dp.from_pod(&tcp_flags(*c, svc(80), "PA", b"after"))), *be, "client {c:?} moved");
        let reply = dp.to_pod(&tcp_flags(*be, *c, "PA", b"server first"));
        assert_eq!(tuple(&reply.data).src, ip(SVC), "reply to {c:?} untranslated");
    }
    assert!(dp.maps.ct.rows().iter().filter(|r| r.assured).count() >= 16);
}

#[test]
fn snat_ports_of_closed_connections_are_reused() {
    let mut dp = Datapath::new();
    // Two source ports only.
    let mut cfg = dp.maps.config.get(&0, 0).unwrap();
    cfg.snat_port_min = 61000;
    cfg.snat_port_max = 61001;
    dp.maps.set_config(cfg).unwrap();
    dp.apply_yaml(
        "kind: Service\nmetadata: {name: np, namespace: t}\nspec: {type: NodePort, clusterIP: 172.30.0.20, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}\n---\n\
         kind: EndpointSlice\nmetadata: {name: np-1, namespace: t, labels: {kubernetes.io/service-name: np}}\naddressType: IPv4\nports: [{port: 8080}]\n\
         endpoints: [{addresses: [10.180.0.1], nodeName: node2}]\n",
    );
    let np = (ip("192.168.0.2"), 30080);
    let c = |i: u8| (Ipv4Addr::new(203, 0, 113, i), 40000);
    let open = |dp: &Datapath, i: u8| -> Option<u16> {
        let r = dp.from_world(&tcp_flags(c(i), np, "S", b""));
        (r.action != TC_ACT_SHOT).then(|| tuple(&r.data).sport)
    };
    let p1 = open(&dp, 1).expect("first connection");
    let p2 = open(&dp, 2).expect("second connection");
    assert_ne!(p1, p2);
    assert_eq!(open(&dp, 3), None, "a third live connection found a port");
    // The first connection closes; a while later its port goes to the next connection.
    let be = (ip("10.180.0.1"), 8080);
    dp.from_world(&tcp_flags(be, (ip("192.168.0.2"), p1), "SA", b""));
    dp.from_world(&tcp_flags(c(1), np, "A", b""));
    dp.from_world(&tcp_flags(c(1), np, "FA", b""));
    dp.from_world(&tcp_flags(be, (ip("192.168.0.2"), p1), "FA", b""));
    let closed = pair(&dp, c(1));
    assert_eq!(closed.len(), 2, "{closed:#?}");
    assert_eq!(open(&dp, 3), None, "a just-closed connection's port was taken at once");
    let three_s_ago = monotonic_ns() - 3_000_000_000;
    edit(&mut dp, &closed, |e| e.last_seen_ns = three_s_ago);
    assert_eq!(open(&dp, 3), Some(p1));
    assert_eq!(dp.stat(stat::PORT_REUSE), 1);
    // The old connection's straggler is not translated onto the new one.
    assert!(pair(&dp, c(1)).iter().all(|r| r.is_reply()), "{:#?}", pair(&dp, c(1)));
    let straggler = dp.from_world(&tcp_flags(c(1), np, "A", b""));
    assert!(straggler.action == TC_ACT_SHOT || tuple(&straggler.data).sport != p1, "a straggler of the closed connection used its old port");
    // A connection whose last ACK was seen (TIME_WAIT proper) gives its port up at once.
    dp.from_world(&tcp_flags(be, (ip("192.168.0.2"), p2), "SA", b""));
    dp.from_world(&tcp_flags(c(2), np, "A", b""));
    dp.from_world(&tcp_flags(c(2), np, "FA", b""));
    dp.from_world(&tcp_flags(be, (ip("192.168.0.2"), p2), "FA", b""));
    dp.from_world(&tcp_flags(c(2), np, "A", b""));
    assert!(pair(&dp, c(2)).iter().all(|r| r.entry.state & dataplane_common::CT_S_TIME_WAIT != 0), "{:#?}", pair(&dp, c(2)));
    assert_eq!(open(&dp, 4), Some(p2));
    assert_eq!(dp.stat(stat::PORT_REUSE), 2);
}

/// `web` over `backends` and, beside it, `web2` (172.30.0.11, the same ports, with `affinity`
/// on both when set) over `other`: the backends `other` names stay in the maps whatever `web`
/// has.
fn two_services(backends: &[&str], other: &[&str], affinity: bool) -> String {
    let aff = if affinity { ", sessionAffinity: ClientIP" } else { "" };
    let svc = |name: &str, vip: &str, eps: &[&str]| {
        let eps: String = eps.iter().map(|a| format!("- addresses: [{a}]\n")).collect();
        format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: {vip}{aff}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]}}\n---\n\
             kind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}"
        )
    };
    format!("{}\n---\n{}", svc("web", SVC, backends), svc("web2", "172.30.0.11", other))
}

/// Keys of `lb4_gone_v1`: (frontend, backend id) pairs taken out.
fn gone_pairs(dp: &Datapath) -> Vec<(u32, u32)> {
    dp.maps.gone.keys().map(|k| k.unwrap()).map(|k| (k.svc_id, k.backend_id)).collect()
}

#[test]
fn a_udp_connection_moves_off_a_backend_that_left_its_service_without_a_conntrack_walk() {
    const B: [&str; 2] = ["10.180.0.1", "10.180.0.2"];
    let mut dp = Datapath::new();
    dp.apply_yaml(&two_services(&B, &B, false));
    let udp_be = backend_of(&dp.from_pod(&udp(client(), svc(53), b"q")));
    let tcp_client = (ip(CLIENT.0), 40001);
    let tcp_be = backend_of(&dp.from_pod(&tcp_flags(tcp_client, svc(80), "S", b"")));
    dp.to_pod(&tcp_flags(tcp_be, tcp_client, "SA", b""));
    let left = udp_be.0.to_string();
    let stays: Vec<&str> = B.iter().copied().filter(|b| *b != left).collect();
    let rows_before = dp.maps.ct.rows().len();
    // The UDP connection's backend leaves web; web2 keeps it, so it stays in the backend map
    // (the datapath's own check of the backend would not see it go).
    dp.apply_yaml(&two_services(&stays, &B, false));
    let udp_fe = dp.rec.applied.frontends.iter().find(|(fe, _)| fe.addr.port == 53 && fe.addr.addr == ip(SVC)).map(|(_, af)| af.svc_id).unwrap();
    let left_id = dp.rec.applied.backends.iter().find(|(b, _)| b.addr == udp_be.0 && b.port == 5353).map(|(_, (id, _))| *id).unwrap();
    assert!(gone_pairs(&dp).contains(&(udp_fe, left_id)), "{:?}", gone_pairs(&dp));
    // The TCP port's pair is marked too (affinity would read it); TCP connections never do.
    assert_eq!(gone_pairs(&dp).len(), 2, "{:?}", gone_pairs(&dp));
    assert_eq!(dp.maps.ct.rows().len(), rows_before, "the sync removed no conntrack entry (no walk)");
    // Its next datagram moves to a backend web still has; the TCP connection keeps its own.
    let reopens = dp.stat(stat::CT_REOPEN);
    let next = backend_of(&dp.from_pod(&udp(client(), svc(53), b"q2")));
    assert_eq!(next, (ip(stays[0]), 5353));
    assert_eq!(dp.stat(stat::CT_REOPEN), reopens + 1);
    assert_eq!(backend_of(&dp.from_pod(&tcp_flags(tcp_client, svc(80), "A", b"x"))), tcp_be, "graceful termination: TCP keeps its backend");
    // It stays there (no reopen per packet).
    assert_eq!(backend_of(&dp.from_pod(&udp(client(), svc(53), b"q3"))), next);
    assert_eq!(dp.stat(stat::CT_REOPEN), reopens + 1);
    // The backend comes back: unmarked, and a connection to it is left alone again.
    dp.apply_yaml(&two_services(&B, &B, false));
    assert_eq!(gone_pairs(&dp), vec![]);
    let other_port = (ip(CLIENT.0), 40002);
    for port in 40002..40100 {
        let c = (ip(CLIENT.0), port);
        if backend_of(&dp.from_pod(&udp(c, svc(53), b"q"))) == udp_be {
            let before = dp.stat(stat::CT_REOPEN);
            assert_eq!(backend_of(&dp.from_pod(&udp(c, svc(53), b"q2"))), udp_be);
            assert_eq!(dp.stat(stat::CT_REOPEN), before);
            return;
        }
    }
    panic!("no client port from {other_port:?} on reached {udp_be:?}");
}

#[test]
fn an_affinity_client_chooses_again_when_its_backend_leaves_the_service() {
    const B: [&str; 2] = ["10.180.0.1", "10.180.0.2"];
    let mut dp = Datapath::new();
    dp.apply_yaml(&two_services(&B, &B, true));
    let first = backend_of(&dp.from_pod(&tcp_flags(client(), svc(80), "S", b"")));
    // Affinity: every new connection of this client gets the same backend.
    for port in 41000..41010 {
        assert_eq!(backend_of(&dp.from_pod(&tcp_flags((ip(CLIENT.0), port), svc(80), "S", b""))), first);
    }
    let stays: Vec<&str> = B.iter().copied().filter(|b| *b != first.0.to_string()).collect();
    let affinity_before = dp.maps.affinity.keys().count();
    dp.apply_yaml(&two_services(&stays, &B, true));
    assert_eq!(dp.maps.affinity.keys().count(), affinity_before, "no walk over the affinity map: the entry stays");
    assert!(!gone_pairs(&dp).is_empty(), "a TCP port with affinity marks its lost backend");
    // The client's next connection chooses again, and sticks to its new choice.
    let next = backend_of(&dp.from_pod(&tcp_flags((ip(CLIENT.0), 42000), svc(80), "S", b"")));
    assert_eq!(next, (ip(stays[0]), 8080));
    for port in 42001..42010 {
        assert_eq!(backend_of(&dp.from_pod(&tcp_flags((ip(CLIENT.0), port), svc(80), "S", b""))), next);
    }
}
