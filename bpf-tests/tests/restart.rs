//! Hitless restarts, under production's steady load: a long-lived TCP connection exchanging a
//! message every 50 ms, a new TCP connection every 100 ms and a UDP query every 100 ms, from a
//! pod to a ClusterIP and from outside to a source-translated NodePort (its backend on the other
//! node), all through node1, whose agent is restarted, killed, kept down, or started with the
//! API server unreachable. Every request must be answered within 900 ms (a lost SYN, which TCP
//! retransmits after a second, fails), and the long-lived connections must neither break nor
//! change backend: 0 failed, asserted.
//!
//! The upgrade across a map layout change, and its rollback, is in `upgrade.rs`.
use std::time::Duration;

use bpf_tests::{
    lab::{self, Cluster},
    steady::{lab, start_load},
};

/// Waits (bounded) until node `i`'s log, from `since`, satisfies `f`.
fn wait_since(c: &mut Cluster, i: usize, since: usize, f: impl Fn(&str) -> bool) {
    c.wait_log(i, |l| f(&l[since.min(l.len())..]));
}

#[test]
fn a_sigterm_restart_loses_nothing() {
    let (mut c, _d) = lab();
    let load = start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.stop_agent(0);
    c.start_agent(0);
    std::thread::sleep(Duration::from_secs(2));
    load.finish("a SIGTERM restart of node1's agent");
}

#[test]
fn sigkill_then_a_restart_loses_nothing() {
    let (mut c, _d) = lab();
    let load = start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.kill_agent(0);
    std::thread::sleep(Duration::from_secs(1));
    c.start_agent(0);
    std::thread::sleep(Duration::from_secs(2));
    load.finish("SIGKILL of node1's agent, then a restart");
}

#[test]
fn ten_seconds_without_the_agent_lose_nothing() {
    let (mut c, _d) = lab();
    let load = start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.stop_agent(0);
    std::thread::sleep(Duration::from_secs(10));
    c.start_agent(0);
    std::thread::sleep(Duration::from_secs(2));
    load.finish("node1's agent down for 10 s");
}

#[test]
fn a_start_with_the_api_server_unreachable_serves_from_the_pinned_maps() {
    let (mut c, _d) = lab();
    let load = start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.stop_agent(0);
    // Nothing listens on 127.0.0.1:1 in node1's namespace: every list fails, and keeps failing.
    let since = c.spawn_agent(0, &lab::agent_bin(), false, &["--master", "http://127.0.0.1:1", "--healthz-timeout-seconds", "2"]);
    wait_since(&mut c, 0, since, |l| l.contains("datapath attached") && l.contains("waiting for the initial lists"));
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.matches("adopted: program replaced in place").count() >= 12, "{log}");
    std::thread::sleep(Duration::from_secs(4));
    // Alive, its datapath attached: /livez 200 (the kubelet leaves it alone); not in sync:
    // /healthz 503 once the first sync has waited longer than the timeout.
    let ns = c.nodes[0].ns.name.clone();
    let live = bpf_tests::fakeapi::http_get_in(&ns, "127.0.0.1:10256", "/livez").expect("/livez answers");
    let health = bpf_tests::fakeapi::http_get_in(&ns, "127.0.0.1:10256", "/healthz").expect("/healthz answers");
    assert_eq!((live.0, health.0), (200, 503), "{live:?} {health:?}");
    assert!(live.1.contains("\"datapathAttached\": true"), "{live:?}");
    let agent = c.nodes[0].agent.as_mut().unwrap();
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited:\n{}", c.agent_log(0));
    load.finish("a start of node1's agent with the API server unreachable");
    // Back to the manifests: the usual start, nothing rewritten.
    c.stop_agent(0);
    c.start_agent(0);
    let log = c.agent_log(0);
    assert!(log.lines().filter(|l| l.contains("synced")).last().unwrap().contains("writes=0 deletes=0"), "{log}");
}

/// The load can fail: taking Ferry off node1 (`run --cleanup`) for two seconds while it runs is
/// seen, as broken connections and failed requests (what the old agent's detach-on-stop did
/// at every restart).
#[test]
fn the_load_sees_an_outage() {
    let (mut c, _d) = lab();
    let load = start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.stop_agent(0);
    let pin = c.nodes[0].pin.path.to_str().unwrap().to_string();
    let out = c.nodes[0].ns.cmd(&[lab::agent_bin().to_str().unwrap(), "run", "--cleanup", "--pin-dir", &pin]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_secs(2));
    c.start_agent(0);
    std::thread::sleep(Duration::from_secs(1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load.finish("an outage")));
    let msg = result.expect_err("an outage went unseen").downcast::<String>().map(|b| *b).unwrap_or_default();
    assert!(msg.contains("failures through an outage") && msg.contains("broken=1"), "{msg}");
}
