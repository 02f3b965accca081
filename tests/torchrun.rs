//! torchrun as the launcher: ranks started with torchrun's environment rendezvous through its
//! agent's TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`: rank 0 publishes its own listener
//! there, nobody binds `MASTER_PORT` again), write `TORCHELASTIC_ERROR_FILE` so torchrun's "root
//! cause" is the failing rank, and name a lost peer even when torchrun's SIGTERM overtakes them.
//!
//! CI has no PyTorch: these tests run the ranks against a small TCPStore written here from the
//! protocol (the client side lockstep speaks: VALIDATE, SET, WAIT, GET; CHECK for the test's own
//! look-ups). The `real_torchrun_*` tests run the real torchrun when one is found
//! (`LOCKSTEP_TORCHRUN`, else `torchrun` on `PATH`) and skip with the reason printed otherwise.
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The stand-in's keys and values, and the condition WAIT sleeps on.
type Shared = Arc<(Mutex<HashMap<String, Vec<u8>>>, Condvar)>;

/// A TCPStore server from the protocol: one thread per connection, a key-value map, WAIT
/// answered once every key exists.
struct StoreStandIn {
    port: u16,
    data: Shared,
}

fn read_u64(s: &mut TcpStream) -> Option<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn read_bytes(s: &mut TcpStream) -> Option<Vec<u8>> {
    let n = read_u64(s)?;
    if n > 1 << 20 {
        return None;
    }
    let mut v = vec![0u8; n as usize];
    s.read_exact(&mut v).ok()?;
    Some(v)
}

fn read_key(s: &mut TcpStream) -> Option<String> {
    String::from_utf8(read_bytes(s)?).ok()
}

fn serve(mut s: TcpStream, data: Shared) -> Option<()> {
    let (map, cv) = &*data;
    // The first query of a connection validates it.
    let mut q = [0u8; 1];
    s.read_exact(&mut q).ok()?;
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).ok()?;
    if q[0] != 0 || u32::from_le_bytes(magic) != 0x3C85_F7CE {
        return None;
    }
    loop {
        s.read_exact(&mut q).ok()?;
        match q[0] {
            // SET key value: no answer.
            1 => {
                let k = read_key(&mut s)?;
                let v = read_bytes(&mut s)?;
                map.lock().ok()?.insert(k, v);
                cv.notify_all();
            }
            // GET key: the value.
            3 => {
                let k = read_key(&mut s)?;
                let v = map.lock().ok()?.get(&k).cloned()?;
                let mut out = (v.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(&v);
                s.write_all(&out).ok()?;
            }
            // CHECK n keys: READY (0) or NOT_READY (1).
            5 => {
                let n = read_u64(&mut s)?;
                let keys: Option<Vec<String>> = (0..n).map(|_| read_key(&mut s)).collect();
                let keys = keys?;
                let m = map.lock().ok()?;
                let ready = keys.iter().all(|k| m.contains_key(k));
                s.write_all(&[if ready { 0 } else { 1 }]).ok()?;
            }
            // WAIT n keys: STOP_WAITING (0) once all exist.
            6 => {
                let n = read_u64(&mut s)?;
                let keys: Option<Vec<String>> = (0..n).map(|_| read_key(&mut s)).collect();
                let keys = keys?;
                let mut m = map.lock().ok()?;
                let until = Instant::now() + Duration::from_secs(60);
                while !keys.iter().all(|k| m.contains_key(k)) {
                    let left = until.checked_duration_since(Instant::now())?;
                    m = cv.wait_timeout(m, left).ok()?.0;
                }
                drop(m);
                s.write_all(&[0]).ok()?;
            }
            _ => return None,
        }
    }
}

impl StoreStandIn {
    fn start() -> StoreStandIn {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the store stand-in");
        let port = l.local_addr().expect("store address").port();
        let data: Shared = Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
        let d = data.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let d = d.clone();
                std::thread::spawn(move || serve(c, d));
            }
        });
        StoreStandIn { port, data }
    }
    fn keys(&self) -> HashMap<String, Vec<u8>> {
        self.data.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-torchrun-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// One rank of `lockstep run` with the environment torchrun gives its workers (agent store on).
fn torchrun_rank(r: u32, world: u32, port: u16, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(common::lockstep_bin());
    c.args(["run", "--quiet", "--tp", &(world - 1).to_string()])
        .args(args)
        .env_remove("LOCKSTEP_FAULT")
        .env_remove("LOCKSTEP_JOB_TOKEN")
        .env_remove("LOCKSTEP_RUN_DIR")
        .envs([
            ("RANK", r.to_string()),
            ("LOCAL_RANK", r.to_string()),
            ("GROUP_RANK", "0".into()),
            ("ROLE_RANK", r.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
            ("TORCHELASTIC_RUN_ID", "none".into()),
            ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
            ("TORCHELASTIC_RESTART_COUNT", "0".into()),
            ("TORCHELASTIC_MAX_RESTARTS", "0".into()),
        ])
        .env(
            "TORCHELASTIC_ERROR_FILE",
            dir.join(format!("error-{r}.json")),
        )
        .env("LOCKSTEP_DUMP_DIR", dir.join("dumps"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Waits for every child (bounded), returning (exit code, stderr) per rank.
fn wait_all(children: Vec<Child>, bound: Duration) -> Vec<(Option<i32>, String)> {
    let until = Instant::now() + bound;
    let mut out = Vec::new();
    let mut children: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut readers = Vec::new();
    for c in children.iter_mut().flatten() {
        let mut e = c.stderr.take();
        readers.push(std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = e.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        }));
    }
    let mut codes = vec![None; children.len()];
    loop {
        let mut done = true;
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(ch) = c {
                match ch.try_wait() {
                    Ok(Some(st)) => {
                        codes[i] = Some(st.code());
                        *c = None;
                    }
                    _ => done = false,
                }
            }
        }
        if done {
            break;
        }
        if Instant::now() > until {
            for ch in children.iter_mut().flatten() {
                let _ = ch.kill();
            }
            panic!("the ranks did not finish within {bound:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for (i, r) in readers.into_iter().enumerate() {
        out.push((codes[i].flatten(), r.join().unwrap_or_default()));
    }
    out
}

const QUICK: [&str; 6] = [
    "--chunks",
    "2",
    "--generator",
    "calibrated",
    "--gen-cost-ms",
    "1",
];

#[test]
fn ranks_under_torchrun_rendezvous_through_its_agent_store_without_binding_master_port() {
    let _serial = common::serial();
    let store = StoreStandIn::start();
    let dir = tmp("agent-store");
    let children: Vec<Child> = (0..3)
        .map(|r| {
            torchrun_rank(r, 3, store.port, &dir, &QUICK)
                .spawn()
                .expect("spawn a rank")
        })
        .collect();
    let res = wait_all(children, Duration::from_secs(10));
    for (r, (code, err)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "global-rank {r}: {err}");
    }
    // Rank 0's own listener, published under the job's key: another port than the store's.
    let keys = store.keys();
    let (key, addr) = keys
        .iter()
        .find(|(k, _)| k.starts_with("/lockstep/") && k.ends_with("/attempt_0/rendezvous"))
        .unwrap_or_else(|| panic!("rank 0 published its address: {keys:?}"));
    let addr: std::net::SocketAddr = String::from_utf8_lossy(addr)
        .parse()
        .unwrap_or_else(|_| panic!("{key} holds an address"));
    assert_ne!(addr.port(), store.port, "{key}");
    assert!(
        !dir.join("error-0.json").exists(),
        "a clean run writes no error file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_under_torchrun_waits_for_rank_0_in_the_store_and_times_out_naming_it() {
    let _serial = common::serial();
    let store = StoreStandIn::start();
    let dir = tmp("no-rank-0");
    let mut c = torchrun_rank(1, 2, store.port, &dir, &QUICK);
    c.env("LOCKSTEP_RENDEZVOUS_MS", "500");
    let res = wait_all(
        vec![c.spawn().expect("spawn a rank")],
        Duration::from_secs(10),
    );
    let (code, err) = &res[0];
    assert_eq!(*code, Some(71), "{err}");
    assert!(
        err.contains("was not published within the rendezvous timeout")
            && err.contains("global-rank 0 did not start"),
        "{err}"
    );
    let file = std::fs::read_to_string(dir.join("error-1.json")).unwrap_or_default();
    assert!(file.contains("exit 71 (watchdog-timeout)"), "{file}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn error_file(dir: &Path, r: u32) -> Option<serde_json::Value> {
    let t = std::fs::read_to_string(dir.join(format!("error-{r}.json"))).ok()?;
    serde_json::from_str(&t).ok()
}

fn stamp(v: &serde_json::Value) -> u64 {
    v["message"]["extraInfo"]["timestamp"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_failing_rank_writes_torchruns_error_file_and_is_the_earliest_failure() {
    let _serial = common::serial();
    let store = StoreStandIn::start();
    let dir = tmp("error-file");
    let children: Vec<Child> = (0..3)
        .map(|r| {
            let mut c = torchrun_rank(r, 3, store.port, &dir, &QUICK);
            c.env("LOCKSTEP_FAULT", "pipeline.extra_generator_call@2");
            c.spawn().expect("spawn a rank")
        })
        .collect();
    let res = wait_all(children, Duration::from_secs(10));
    assert_eq!(res[2].0, Some(70), "{}", res[2].1);
    let culprit = error_file(&dir, 2).expect("global-rank 2 wrote its error file");
    let msg = culprit["message"]["message"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("lockstep global-rank 2: exit 70 (invariant-violation)"),
        "{culprit}"
    );
    let details = culprit["message"]["extraInfo"]["py_callstack"]
        .as_str()
        .unwrap_or("");
    assert!(details.contains("flight recorder dumped to"), "{culprit}");
    // torchrun's root cause is the smallest timestamp: every consequence is stamped later.
    for r in [0, 1] {
        if res[r as usize].0 == Some(0) {
            continue;
        }
        let f = error_file(&dir, r).expect("a failing rank writes its error file");
        assert!(
            stamp(&f) > stamp(&culprit),
            "global-rank {r}'s {f} must sort after {culprit}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sigterm_right_after_a_peer_died_still_names_the_lost_peer() {
    let _serial = common::serial();
    for victim in [2u32, 1, 0] {
        sigterm_right_after_a_death(victim);
    }
}

/// SIGKILLs `victim` and SIGTERMs every other rank at the same instant (what torchrun does at
/// its next poll, here at worst): every survivor's diagnosis and error file name the victim.
fn sigterm_right_after_a_death(victim: u32) {
    let store = StoreStandIn::start();
    let dir = tmp(&format!("sigterm-after-death-{victim}"));
    let args = [
        "--chunks",
        "100000",
        "--generator",
        "calibrated",
        "--gen-cost-ms",
        "1",
    ];
    let children: Vec<Child> = (0..3)
        .map(|r| {
            torchrun_rank(r, 3, store.port, &dir, &args)
                .spawn()
                .expect("spawn a rank")
        })
        .collect();
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    // The ranks are up once rank 0 published its address; the pause makes mid-stream the usual
    // case, it synchronizes nothing.
    let until = Instant::now() + Duration::from_secs(10);
    while !store.keys().keys().any(|k| k.starts_with("/lockstep/")) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: signalling child processes this test started.
    unsafe {
        libc::kill(pids[victim as usize], libc::SIGKILL);
        for (r, p) in pids.iter().enumerate() {
            if r as u32 != victim {
                libc::kill(*p, libc::SIGTERM);
            }
        }
    }
    let res = wait_all(children, Duration::from_secs(10));
    let lost = format!("global-rank {victim}");
    for r in (0..3u32).filter(|r| *r != victim) {
        let (code, err) = &res[r as usize];
        assert!(
            matches!(code, Some(72) | Some(75) | Some(77)),
            "victim {victim}: global-rank {r}: {code:?} {err}"
        );
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("lockstep[global-rank {r}]: exit")))
            .unwrap_or_else(|| panic!("global-rank {r} printed its diagnosis: {err}"));
        println!("{line}");
        // A rank with a control connection to the victim (rank 0 to everyone, every rank to
        // rank 0) sees the death at once and names it. A mesh rank whose only link to a dead
        // mesh peer is idle may truly not have seen it when the SIGTERM lands: it says it was
        // signalled and blames nobody else.
        let sees_it = r == 0 || victim == 0;
        if sees_it || !line.contains("exit 75 (signal)") {
            assert!(
                line.contains(&lost),
                "victim {victim}: global-rank {r} names the lost peer {lost}: {line}"
            );
            let f = error_file(&dir, r).expect("error file");
            assert!(
                f["message"]["extraInfo"]["py_callstack"]
                    .as_str()
                    .is_some_and(|s| s.contains(&lost)),
                "{f}"
            );
        } else {
            assert!(
                !line.contains("failed with exit"),
                "victim {victim}: global-rank {r} blames nobody else: {line}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The real torchrun, when there is one.
fn torchrun() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LOCKSTEP_TORCHRUN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("torchrun"))
            .find(|p| p.is_file())
    })
}

fn skip_without_torchrun(test: &str) -> Option<PathBuf> {
    let t = torchrun();
    if t.is_none() {
        println!(
            "SKIP {test}: no torchrun (set LOCKSTEP_TORCHRUN or put torchrun on PATH; CI has no \
             PyTorch, the TCPStore stand-in tests above cover the protocol there)"
        );
    }
    t
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn torchrun_cmd(torchrun: &Path, dir: &Path, launch: &[String], run: &[&str]) -> Command {
    let mut c = Command::new(torchrun);
    c.args(launch)
        .arg("--no-python")
        .arg(common::lockstep_bin())
        .args(["run", "--quiet"])
        .args(run)
        .current_dir(dir)
        .env_remove("LOCKSTEP_FAULT")
        .env_remove("LOCKSTEP_JOB_TOKEN")
        .env_remove("LOCKSTEP_RUN_DIR")
        .env("LOCKSTEP_DUMP_DIR", dir.join("dumps"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn real_torchrun_one_node_launches_rank_0_and_a_tp_2_mesh_standalone_and_static() {
    let _serial = common::serial();
    let Some(tr) = skip_without_torchrun(
        "real_torchrun_one_node_launches_rank_0_and_a_tp_2_mesh_standalone_and_static",
    ) else {
        return;
    };
    let dir = tmp("real-one-node");
    let port = free_port().to_string();
    let mut run = vec!["--tp", "2"];
    run.extend(QUICK);
    // c10d (standalone) and static rendezvous (run id `none`, the agent's store on the port).
    for launch in [
        vec!["--standalone", "--nproc-per-node", "3"],
        vec![
            "--nnodes",
            "1",
            "--nproc-per-node",
            "3",
            "--master-port",
            &port,
        ],
    ] {
        let launch: Vec<String> = launch.into_iter().map(String::from).collect();
        let c = torchrun_cmd(&tr, &dir, &launch, &run)
            .spawn()
            .expect("spawn torchrun");
        let res = wait_all(vec![c], Duration::from_secs(60));
        assert_eq!(res[0].0, Some(0), "{launch:?}: {}", res[0].1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn real_torchrun_two_agents_c10d_rendezvous_world_3() {
    let _serial = common::serial();
    let Some(tr) = skip_without_torchrun("real_torchrun_two_agents_c10d_rendezvous_world_3") else {
        return;
    };
    let dir = tmp("real-two-nodes");
    let port = free_port().to_string();
    let mut run = vec!["--tp", "2"];
    run.extend(QUICK);
    // Two agents on one host stand for two nodes: 2 + 1 workers (world 3) through c10d.
    let agents: Vec<Child> = ["2", "1"]
        .into_iter()
        .map(|n| {
            let launch: Vec<String> = [
                "--nnodes",
                "2",
                "--nproc-per-node",
                n,
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                &format!("127.0.0.1:{port}"),
                "--rdzv-id",
                "lockstep-two-agents",
            ]
            .map(String::from)
            .to_vec();
            torchrun_cmd(&tr, &dir, &launch, &run)
                .spawn()
                .expect("spawn torchrun")
        })
        .collect();
    let res = wait_all(agents, Duration::from_secs(90));
    for (i, (code, err)) in res.iter().enumerate() {
        assert_eq!(*code, Some(0), "agent {i}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn real_torchrun_root_cause_is_the_failing_rank() {
    let _serial = common::serial();
    let Some(tr) = skip_without_torchrun("real_torchrun_root_cause_is_the_failing_rank") else {
        return;
    };
    let dir = tmp("real-root-cause");
    let launch: Vec<String> = ["--standalone", "--nproc-per-node", "3"]
        .map(String::from)
        .to_vec();
    let mut run = vec!["--tp", "2"];
    run.extend(QUICK);
    // A rank that fails on its own (its error file), and a rank SIGKILLed mid-payload (no file:
    // the agent stamps it when it polls) whose consequence, rank 0's peer-lost, has a lower
    // local rank and must still not be the root cause.
    for (fault, culprit, root_says) in [
        (
            "pipeline.extra_generator_call@2",
            2,
            "exit 70 (invariant-violation)",
        ),
        ("send.kill_mid_payload@1#1", 1, "Signal 9 (SIGKILL)"),
    ] {
        let mut c = torchrun_cmd(&tr, &dir, &launch, &run);
        c.env("LOCKSTEP_FAULT", fault);
        let res = wait_all(
            vec![c.spawn().expect("spawn torchrun")],
            Duration::from_secs(60),
        );
        let (code, err) = &res[0];
        assert_ne!(*code, Some(0), "{fault}: {err}");
        let root = err
            .split("Root Cause (first observed failure):")
            .nth(1)
            .unwrap_or_else(|| panic!("{fault}: torchrun printed a root cause: {err}"));
        let root: String = root.lines().take(12).collect::<Vec<_>>().join("\n");
        assert!(
            root.contains(&format!("rank      : {culprit}")) && root.contains(root_says),
            "{fault}: torchrun's root cause is global-rank {culprit} ({root_says}):\n{root}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
