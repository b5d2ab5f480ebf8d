//! An upgrade across a map layout change, and its rollback, under production's steady load (see
//! `restart.rs`): the test builds a second agent from this very tree with the conntrack value
//! changed (a new field, `upgrade_mark`, so 56 -> 64 bytes, and the maps renamed `ct4_v2` ->
//! `ct4_v3` as the layout rule asks), then replaces node1's agent by it and back. Established
//! connections keep their backends, no request fails, and the maps are migrated both ways.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use bpf_tests::{
    lab::{self, Cluster, TempDir},
    steady,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Replaces `from` by `to` in `file`, exactly `n` times.
fn patch(file: &Path, from: &str, to: &str, n: usize) {
    let s = std::fs::read_to_string(file).unwrap();
    assert_eq!(s.matches(from).count(), n, "{}: {from:?}", file.display());
    std::fs::write(file, s.replace(from, to)).unwrap();
}

/// Replaces the identifier `from` (whole words only) by `to` in every .rs file under `dir`.
fn rename_ident(dir: &Path, from: &str, to: &str) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "rs") {
            let s = std::fs::read_to_string(&p).unwrap();
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(i) = rest.find(from) {
                let before = rest[..i].chars().next_back();
                let after = rest[i + from.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                out.push_str(&rest[..i]);
                out.push_str(if word(before) || word(after) { from } else { to });
                rest = &rest[i + from.len()..];
            }
            out.push_str(rest);
            std::fs::write(&p, out).unwrap();
        }
    }
}

/// The agent built from a copy of this tree with the conntrack value changed, built once per
/// test run (its dependencies are cached in target/upgrade-test).
fn changed_agent() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = repo();
        let src = TempDir::new(&format!("upgrade-src-{}", lab::run_id()));
        let files = Command::new("git").args(["ls-files", "-co", "--exclude-standard", "-z"]).current_dir(&root).output().expect("git ls-files");
        assert!(files.status.success());
        for f in String::from_utf8_lossy(&files.stdout).split('\0').filter(|f| !f.is_empty()) {
            let to = src.path.join(f);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            if root.join(f).is_file() {
                std::fs::copy(root.join(f), &to).unwrap();
            }
        }
        let common = src.path.join("dataplane-common/src/lib.rs");
        patch(
            &common,
            "    /// Past this the entry counts as absent on the packet path, and garbage collection deletes it.\n    pub expires_ns: u64,\n}",
            "    /// Past this the entry counts as absent on the packet path, and garbage collection deletes it.\n    pub expires_ns: u64,\n    /// The upgrade test's new field.\n    pub upgrade_mark: u64,\n}",
            1,
        );
        patch(&common, "size_of::<Ct4Entry>() == 56", "size_of::<Ct4Entry>() == 64", 1);
        patch(&common, "\"ct4_v2\"", "\"ct4_v3\"", 1);
        patch(&common, "\"ct4_assured_v2\"", "\"ct4_assured_v3\"", 1);
        patch(&src.path.join("dataplane-common/src/layout.rs"), "last_seen_ns, expires_ns });\nfields!(NodeConfig", "last_seen_ns, expires_ns, upgrade_mark });\nfields!(NodeConfig", 1);
        rename_ident(&src.path.join("dataplane-ebpf/src"), "ct4_v2", "ct4_v3");
        rename_ident(&src.path.join("dataplane-ebpf/src"), "ct4_assured_v2", "ct4_assured_v3");
        build_agent(&src.path, "dataplane-agent-ct4-v3")
    })
}

/// Builds the eBPF object and the agent of the source tree at `src` (dependencies cached in
/// target/upgrade-test) and keeps the agent there as `name`, beside the lab's other binaries
/// for the rest of the run (the source copy goes).
fn build_agent(src: &Path, name: &str) -> PathBuf {
    let target = repo().join("target/upgrade-test");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh(Command::new(&cargo).args(["run", "-q", "-p", "xtask", "--", "build-ebpf"]).current_dir(src).env("CARGO_TARGET_DIR", &target));
    let object = target.join("bpfel-unknown-none/release/dataplane-ebpf");
    sh(Command::new(&cargo).args(["build", "-q", "-p", "dataplane-agent", "--bin", "dataplane-agent"]).current_dir(src).env("CARGO_TARGET_DIR", &target).env("FERRY_EBPF_OBJECT", &object));
    let kept = target.join(name);
    std::fs::copy(target.join("debug/dataplane-agent"), &kept).unwrap();
    kept
}

/// (key size, value size) of a map pinned under node `i`'s pin directory, or None.
fn pinned(c: &Cluster, i: usize, name: &str) -> Option<(u32, u32)> {
    let fd = dataplane_agent::links::obj_get(&c.nodes[i].pin.path.join(name)).ok()?;
    let info = dataplane_agent::migrate::map_info(std::os::fd::AsFd::as_fd(&fd)).ok()?;
    Some((info.key_size, info.value_size))
}

#[test]
fn an_upgrade_across_a_conntrack_layout_change_and_its_rollback_lose_nothing() {
    let changed = changed_agent();
    let (mut c, _dir) = steady::lab();
    let load = steady::start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pinned(&c, 0, "ct4_assured_v2"), Some((16, 56)));
    // A busy node: 30 000 more tracked connections, so each pass over the maps takes a while and
    // connections opened meanwhile (the load's recent ones, one every 50 ms) must keep their
    // entries across the swap. (The README says how long the last pass leaves uncovered.)
    fill_conntrack(&c, 0, 30_000);

    // The upgrade.
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent_bin(0, changed);
    let log = c.agent_log(0)[since..].to_string();
    let copied = |map: &str, from: &str| -> u64 {
        log.lines()
            .find(|l| l.contains(&format!("map {map}: layout changed")) && l.contains(&format!("copied from {from} ")))
            .and_then(|l| l.split(" entries copied").next()?.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no migration of {map} from {from}:\n{log}"))
    };
    assert!(log.contains("value 56 -> 64 bytes, new (zero): upgrade_mark"), "{log}");
    // The long-lived connections (and what the short ones left) are assured entries.
    assert!(copied("ct4_assured_v3", "ct4_assured_v2") >= 4, "{log}");
    copied("ct4_v3", "ct4_v2");
    assert!(log.matches("adopted: program replaced in place").count() >= 12, "{log}");
    assert_eq!((pinned(&c, 0, "ct4_assured_v3"), pinned(&c, 0, "ct4_assured_v2")), (Some((16, 64)), None));
    assert_eq!((pinned(&c, 0, "ct4_v3"), pinned(&c, 0, "ct4_v2")), (Some((16, 64)), None));
    std::thread::sleep(Duration::from_secs(2));

    // A rollback to a version that cannot read the newer maps (here: their layouts forgotten,
    // as if no agent had recorded them) refuses by name and leaves the running datapath alone.
    c.stop_agent(0);
    for m in ["ct4_v3", "ct4_assured_v3"] {
        dataplane_agent::migrate::forget_one(&c.nodes[0].pin.path, m).unwrap();
    }
    let since = c.spawn_agent(0, &lab::agent_bin(), true, &[]);
    let status = exited(&mut c, 0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(!status.success() && log.contains("ct4_v3 holds the running datapath's state in a layout no Ferry recorded") && log.contains("the running datapath is untouched"), "{status}:\n{log}");
    assert!(!log.contains("adopted"), "{log}");
    assert_eq!(pinned(&c, 0, "ct4_assured_v3"), Some((16, 64)));
    // The newer agent again: its own maps, used as they are (and recorded again).
    let since = c.agent_log(0).len();
    c.start_agent_bin(0, changed);
    let log = c.agent_log(0)[since..].to_string();
    assert!(!log.contains("layout changed") && log.lines().filter(|l| l.contains("synced")).last().unwrap().contains("writes=0 deletes=0"), "{log}");
    std::thread::sleep(Duration::from_secs(1));

    // Stale maps under the older agent's own names (as an upgrade killed after its swap leaves
    // them): the rollback must take the state from the maps the attached programs use.
    for m in ["ct4_v2", "ct4_assured_v2"] {
        plant_stale(&c, 0, m);
    }

    // The rollback: the older agent reads the newer layout from the pinned record.
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent(0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.contains("map ct4_assured_v2: layout changed (value 64 -> 56 bytes, dropped: upgrade_mark)"), "{log}");
    assert!(log.contains("map ct4_assured_v2: pinned in place of ct4_assured_v3, which is removed"), "{log}");
    assert_eq!((pinned(&c, 0, "ct4_assured_v2"), pinned(&c, 0, "ct4_assured_v3")), (Some((16, 56)), None));
    std::thread::sleep(Duration::from_secs(2));
    load.finish("an upgrade across a conntrack layout change and its rollback");
}

/// The agent's exit status once it has stopped by itself (bounded: 15 s).
fn exited(c: &mut Cluster, i: usize) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = c.nodes[i].agent.as_mut().unwrap().child.try_wait().unwrap() {
            c.nodes[i].agent = None;
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not stop:\n{}", c.agent_log(i));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An upgrade that stops half-way (after copying the maps, before swapping the programs), then a
/// rollback, then the upgrade again: nothing the interrupted start left is ever taken for
/// current state, and no connection breaks.
#[test]
fn an_upgrade_interrupted_after_the_copy_then_a_rollback_then_the_upgrade_again_lose_nothing() {
    let changed = changed_agent();
    let (mut c, _dir) = steady::lab();
    let load = steady::start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    c.stop_agent(0);
    // A cgroup that does not exist: the start fails after the copy, before any program is swapped.
    let since = c.spawn_agent(0, changed, true, &["--cgroup", "/sys/fs/cgroup/ferry-no-such-cgroup"]);
    let status = exited(&mut c, 0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(!status.success() && log.contains("entries copied from ct4_v2") && log.contains("ferry-no-such-cgroup"), "{status}\n{log}");
    // What it left: the copies, staged, never in place.
    assert_eq!((pinned(&c, 0, "ct4_v3"), pinned(&c, 0, "new__ct4_v3").is_some(), pinned(&c, 0, "ct4_v2")), (None, true, Some((16, 56))));
    // The rollback (the version still serving): removes the staged copies, uses its maps as they are.
    let since = c.agent_log(0).len();
    c.start_agent(0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(!log.contains("layout changed") && pinned(&c, 0, "new__ct4_v3").is_none(), "{log}");
    std::thread::sleep(Duration::from_secs(2));
    // The upgrade again: copies the current state, not what the interrupted start copied.
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent_bin(0, changed);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.contains("map ct4_assured_v3: layout changed") && log.contains("map ct4_assured_v3: pinned in place of ct4_assured_v2, which is removed"), "{log}");
    std::thread::sleep(Duration::from_secs(2));
    load.finish("an interrupted upgrade, a rollback and the upgrade again");
}

/// Adds `n` established connections of clients nobody runs (203.0.x.y) to node `i`'s assured
/// conntrack, as a busy node holds them.
fn fill_conntrack(c: &Cluster, i: usize, n: u32) {
    use aya::maps::{HashMap, Map, MapData};
    use dataplane_common::{Ct4Entry, Ct4Key};
    let data = MapData::from_pin(c.nodes[i].pin.path.join("ct4_assured_v2")).unwrap();
    let mut m: HashMap<MapData, Ct4Key, Ct4Entry> = HashMap::try_from(Map::HashMap(data)).unwrap();
    let now = dataplane_agent::bpf::conntrack::monotonic_ns();
    for k in 0..n {
        let key = Ct4Key { saddr_be: u32::from_be_bytes([203, 0, (k >> 8) as u8, k as u8]).to_be(), daddr_be: u32::from_be_bytes([10, 96, 3, 10]).to_be(), sport_be: ((k >> 16) as u16 + 1000).to_be(), dport_be: 80u16.to_be(), proto: 6, pad: [0; 3] };
        let e = Ct4Entry { created_ns: now, last_seen_ns: now, expires_ns: now + 3_600_000_000_000, ..Default::default() };
        m.insert(key, e, 0).unwrap();
    }
}

/// Pins an empty map under `name` with the layout this (older) build records for it, beside
/// the newer agent's live one.
fn plant_stale(c: &Cluster, i: usize, name: &str) {
    let dir = &c.nodes[i].pin.path;
    let path = dir.join(name);
    let st = Command::new("bpftool")
        .args(["map", "create", path.to_str().unwrap(), "type", "hash", "key", "16", "value", "56", "entries", "1024", "name", name, "flags", "1"])
        .status()
        .unwrap();
    assert!(st.success());
    let text = dataplane_agent::migrate::layouts().into_iter().find(|l| l.name == name).unwrap().text();
    dataplane_agent::migrate::record_one(dir, name, &text).unwrap();
}

/// The last commit whose hashing tables were one inner array per frontend (`lb4_chash_v2`, a
/// hash of arrays, and `lb4_svc_v2` with `table_size`): the Ferry nodes run before the flat
/// table array.
const PER_FRONTEND_TABLES: &str = "916fe3b";

/// The agent of [`PER_FRONTEND_TABLES`], built once per test run from git (its dependencies are
/// cached in target/upgrade-test, as the changed agent's).
fn per_frontend_tables_agent() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = repo();
        let src = TempDir::new(&format!("upgrade-old-{}", lab::run_id()));
        let archive = Command::new("git").args(["archive", "--format=tar", PER_FRONTEND_TABLES]).current_dir(&root).output().expect("git archive");
        assert!(archive.status.success(), "git archive {PER_FRONTEND_TABLES}: {}", String::from_utf8_lossy(&archive.stderr));
        // `-m`: the files get the time of extraction, not the commit's, so cargo rebuilds what an
        // earlier build in the shared target directory (another source copy) left.
        let mut tar = Command::new("tar").args(["-x", "-m", "-C"]).arg(&src.path).stdin(std::process::Stdio::piped()).spawn().expect("tar");
        std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
        drop(tar.stdin.take());
        assert!(tar.wait().unwrap().success());
        build_agent(&src.path, "dataplane-agent-chash-v2")
    })
}

#[test]
fn a_rollback_to_per_frontend_tables_and_the_upgrade_to_the_flat_array_lose_nothing() {
    let old = per_frontend_tables_agent();
    let (mut c, _dir) = steady::lab();
    let load = steady::start_load(&c);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pinned(&c, 0, "lb4_svc_v3"), Some((8, 20)));
    assert_eq!(pinned(&c, 0, "lb4_chash_flat_v1"), Some((4, 8)));

    // The rollback: the older agent takes the service entries into lb4_svc_v2 (no table fields:
    // table_size 0) and makes its own lb4_chash_v2; until its first sync writes the tables, its
    // programs find none and pick at random. Connections keep their backends (conntrack).
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent_bin(0, old);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.contains("map lb4_svc_v2: layout changed (value 20 -> 16 bytes"), "{log}");
    assert_eq!((pinned(&c, 0, "lb4_svc_v2"), pinned(&c, 0, "lb4_svc_v3")), (Some((8, 16)), None));
    // Its own table map; the flat array, which another version recorded and this one does not
    // use, is unpinned after the swap.
    assert!(pinned(&c, 0, "lb4_chash_v2").is_some(), "{log}");
    assert!(log.contains("map lb4_chash_flat_v1: pinned by another version of Ferry, not used by this one: removed") && pinned(&c, 0, "lb4_chash_flat_v1").is_none(), "{log}");
    std::thread::sleep(Duration::from_secs(2));

    // The upgrade: service entries into lb4_svc_v3 (table_off and table_len 0: random until the
    // first sync), the tables rebuilt into a new flat array, lb4_chash_v2 unpinned after the
    // swap (a rollback must not find its stale tables).
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent(0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.contains("map lb4_svc_v3: layout changed (value 16 -> 20 bytes"), "{log}");
    assert!(log.contains("map lb4_chash_v2: pinned by another version of Ferry, not used by this one: removed"), "{log}");
    assert_eq!((pinned(&c, 0, "lb4_svc_v3"), pinned(&c, 0, "lb4_svc_v2"), pinned(&c, 0, "lb4_chash_v2")), (Some((8, 20)), None, None));
    let maps = dataplane_agent::bpf::BpfMaps::from_pins(&c.nodes[0].pin.path).unwrap();
    let frontends: Vec<dataplane_common::Lb4Service> = maps.services.iter().flatten().map(|(_, s)| s).filter(|s| s.flags & dataplane_common::SVC_F_ADDR_ONLY == 0 && s.count > 0).collect();
    assert!(!frontends.is_empty() && frontends.iter().all(|s| s.table_len > 0), "a frontend without its table after the first sync: {frontends:?}");
    std::thread::sleep(Duration::from_secs(1));
    // A restart over the flat array adopts every table: nothing to write.
    c.stop_agent(0);
    let since = c.agent_log(0).len();
    c.start_agent(0);
    let log = c.agent_log(0)[since..].to_string();
    assert!(log.lines().filter(|l| l.contains("synced")).last().unwrap().contains("writes=0 deletes=0"), "{log}");
    std::thread::sleep(Duration::from_secs(2));
    load.finish("a rollback to per-frontend tables and the upgrade to the flat array");
}
