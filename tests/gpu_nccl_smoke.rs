//! GPU smoke of the raw NCCL layer (issue 2 item 6, issue 6): two processes, one GPU each.
//!
//! Each test re-executes this test binary with `LOCKSTEP_NCCL_TEST_ROLE` naming the child's role
//! (so no CLI is needed); the parent creates the NCCL unique id (it hosts the bootstrap root) and
//! passes it in `LOCKSTEP_NCCL_TEST_UID`. Skips with a printed reason with fewer than 2 GPUs or no
//! NCCL.
mod common;

use lockstep::comm::nccl::{CommOptions, Communicator, CompletionKind, Gpu, ReduceDtype, UniqueId};
use lockstep::exit::ExitCode;
use lockstep::ids::GroupRank;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROLE: &str = "LOCKSTEP_NCCL_TEST_ROLE";
const UID: &str = "LOCKSTEP_NCCL_TEST_UID";
/// The waiter's own bound on the recv that never completes.
const RECV_DEADLINE: Duration = Duration::from_secs(2);

/// Kills the child on drop so a failing assertion never leaves a process on a GPU.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_self(test: &str, role: &str, uid: &UniqueId) -> Kid {
    let exe = std::env::current_exe().expect("current test binary path");
    let child = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(UID, uid.to_hex())
        .env("NCCL_NVLS_ENABLE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child test process");
    Kid(child)
}

/// Each stdout line of the child on a channel (so the parent waits with a bound).
fn lines(kid: &mut Kid) -> mpsc::Receiver<String> {
    common::lines_of(kid.0.stdout.take().expect("piped stdout")).0
}

fn stderr_of(kid: &mut Kid) -> mpsc::Receiver<String> {
    let mut err = kid.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// Waits for the child's exit with a bound; returns its code (None = killed by a signal).
fn wait_exit(kid: &mut Kid, bound: Duration) -> Option<i32> {
    let until = Instant::now() + bound;
    loop {
        match kid.0.try_wait() {
            Ok(Some(st)) => return st.code(),
            Ok(None) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = kid.0.kill();
                panic!("child did not exit within {bound:?}");
            }
        }
    }
}

fn child_env() -> Option<(String, UniqueId)> {
    let role = std::env::var(ROLE).ok()?;
    let uid = UniqueId::from_hex(&std::env::var(UID).ok()?).ok()?;
    Some((role, uid))
}

fn opts(name: &str, blocking: bool) -> CommOptions {
    CommOptions {
        name: name.into(),
        blocking,
        init_timeout: Duration::from_secs(30),
    }
}

// ---------------------------------------------------------------------------------------------

fn smoke_child(rank: u32, uid: &UniqueId) {
    const N: usize = 1 << 16;
    let gpu = Gpu::open_for_plane(rank as usize).expect("open GPU");
    let t0 = Instant::now();
    let comm = Communicator::init(&gpu, uid, 2, GroupRank(rank), &opts("smoke", false))
        .expect("non-blocking init");
    println!("INIT {:.3} s", t0.elapsed().as_secs_f64());
    let mine: Vec<f32> = (0..N).map(|i| (rank as f32 + 1.0) * i as f32).collect();
    let mut buf = gpu.upload(bytemuck::cast_slice(&mine)).expect("upload");
    let done = gpu
        .completion(CompletionKind::HostFlag)
        .expect("completion");
    let deadline = Instant::now() + Duration::from_secs(20);
    comm.all_reduce_sum(&gpu, &mut buf, N, ReduceDtype::F32, deadline)
        .expect("all-reduce enqueued");
    let t = done.mark().expect("mark");
    comm.wait(&done, t, deadline, "all-reduce")
        .expect("all-reduce completes");
    let bytes = gpu.download(&buf).expect("download");
    let got: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // rank 0 holds i, rank 1 holds 2i: the sum is 3i, exact in f32 for i < 2^16.
    let bad = (0..N).filter(|&i| got[i] != 3.0 * i as f32).count();
    assert_eq!(bad, 0, "{bad} of {N} elements wrong, e.g. [1] = {}", got[1]);
    let closed = comm
        .close(Duration::from_secs(10))
        .expect("finalize + destroy");
    println!(
        "ALLREDUCE ok rank {rank}: {N} f32 summed, close {:.3} s",
        closed.as_secs_f64()
    );
}

#[test]
fn nccl_nonblocking_pair_all_reduce_sums_across_two_processes() {
    let name = "nccl_nonblocking_pair_all_reduce_sums_across_two_processes";
    if let Some((role, uid)) = child_env() {
        let rank: u32 = role
            .strip_prefix("smoke:")
            .and_then(|r| r.parse().ok())
            .expect("role smoke:<rank>");
        smoke_child(rank, &uid);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let uid = UniqueId::new().expect("ncclGetUniqueId");
    let mut kids: Vec<Kid> = (0..2)
        .map(|r| spawn_self(name, &format!("smoke:{r}"), &uid))
        .collect();
    let outs: Vec<_> = kids.iter_mut().map(lines).collect();
    let errs: Vec<_> = kids.iter_mut().map(stderr_of).collect();
    for (r, kid) in kids.iter_mut().enumerate() {
        let code = wait_exit(kid, Duration::from_secs(60));
        let out: Vec<String> = outs[r].try_iter().collect();
        let err = errs[r]
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        println!("rank {r} exit {code:?}\n{}\n{err}", out.join("\n"));
        assert_eq!(code, Some(0), "rank {r} failed:\n{err}");
        assert!(
            out.iter()
                .any(|l| l.contains(&format!("ALLREDUCE ok rank {r}"))),
            "rank {r} did not report the checked sum: {out:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn kill_child(role: &str, uid: &UniqueId) {
    let (who, mode) = role
        .strip_prefix("kill:")
        .and_then(|r| r.split_once(':'))
        .expect("role kill:<victim|waiter>:<blocking|nonblocking>");
    let blocking = mode == "blocking";
    let rank = if who == "victim" { 0 } else { 1 };
    let gpu = Gpu::open_for_plane(rank as usize).expect("open GPU");
    let comm =
        Communicator::init(&gpu, uid, 2, GroupRank(rank), &opts("kill", blocking)).expect("init");
    let mut buf = gpu.alloc(4096).expect("alloc");
    let done = gpu
        .completion(CompletionKind::HostFlag)
        .expect("completion");
    let deadline = Instant::now() + Duration::from_secs(20);
    // One real exchange first, so the point-to-point connection exists and the recv below waits
    // in the kernel (on the stream), not in NCCL's connection setup.
    if who == "victim" {
        comm.send(&gpu, &buf, 4096, GroupRank(1), deadline)
            .expect("warm send");
    } else {
        comm.recv(&gpu, &mut buf, 4096, GroupRank(0), deadline)
            .expect("warm recv");
    }
    let t = done.mark().expect("mark");
    comm.wait(&done, t, deadline, "warm-up")
        .expect("warm-up completes");
    if who == "victim" {
        println!("VICTIM ready");
        // Block until the parent kills us (or closes stdin); the parent decides when.
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
        std::process::exit(0);
    }
    comm.recv(&gpu, &mut buf, 4096, GroupRank(0), deadline)
        .expect("recv enqueued");
    let t = done.mark().expect("mark");
    println!("POSTED recv");
    let posted = Instant::now();
    let err = comm
        .wait(&done, t, posted + RECV_DEADLINE, "recv from rank 0")
        .expect_err("the peer is dead: the recv cannot complete");
    let waited = posted.elapsed();
    let took = comm
        .abort(&err.to_string(), ExitCode::WatchdogTimeout)
        .expect("ncclCommAbort succeeds with the peer dead");
    eprintln!(
        "waiter: {err}; waited {:.3} s, ncclCommAbort returned in {:.3} s",
        waited.as_secs_f64(),
        took.as_secs_f64()
    );
    drop(done);
    drop(buf);
    drop(comm);
    std::process::exit(ExitCode::WatchdogTimeout.code());
}

fn peer_killed_during_recv(name: &str, mode: &str) {
    if let Some((role, uid)) = child_env() {
        kill_child(&role, &uid);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let uid = UniqueId::new().expect("ncclGetUniqueId");
    let mut victim = spawn_self(name, &format!("kill:victim:{mode}"), &uid);
    let mut waiter = spawn_self(name, &format!("kill:waiter:{mode}"), &uid);
    let vout = lines(&mut victim);
    let wout = lines(&mut waiter);
    let werr = stderr_of(&mut waiter);
    common::wait_line(&vout, "VICTIM ready", Duration::from_secs(30));
    common::wait_line(&wout, "POSTED recv", Duration::from_secs(30));
    victim.0.kill().expect("SIGKILL the victim");
    let killed = Instant::now();
    let _ = victim.0.wait();
    let code = wait_exit(&mut waiter, RECV_DEADLINE + Duration::from_secs(8));
    let ended = killed.elapsed();
    let err = werr
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    println!(
        "{mode}: waiter ended {:.3} s after the kill (deadline {:.1} s); stderr:\n{err}",
        ended.as_secs_f64(),
        RECV_DEADLINE.as_secs_f64()
    );
    assert_eq!(code, Some(ExitCode::WatchdogTimeout.code()), "{err}");
    // Our deadline ends the wait, unless NCCL reports the dead peer first (also acceptable).
    assert!(
        err.contains("did not complete within") || err.contains("async error"),
        "{err}"
    );
    assert!(err.contains("ncclCommAbort returned in"), "{err}");
    assert!(
        ended < RECV_DEADLINE + Duration::from_secs(2),
        "waiter took {ended:?} after the kill"
    );
}

#[test]
fn nccl_blocking_peer_killed_during_recv_is_ended_by_deadline_and_abort() {
    peer_killed_during_recv(
        "nccl_blocking_peer_killed_during_recv_is_ended_by_deadline_and_abort",
        "blocking",
    );
}

#[test]
fn nccl_nonblocking_peer_killed_during_recv_is_ended_by_deadline_and_abort() {
    peer_killed_during_recv(
        "nccl_nonblocking_peer_killed_during_recv_is_ended_by_deadline_and_abort",
        "nonblocking",
    );
}

#[test]
fn nccl_missing_library_is_an_error_value_not_a_panic() {
    // Runs everywhere: with no NCCL here the loader answers LibraryMissing; on a GPU host it loads.
    match lockstep::comm::nccl::api::api() {
        Ok(api) => assert!(api.version >= 22800, "version {}", api.version),
        Err(e) => {
            assert!(matches!(e, lockstep::Error::LibraryMissing(_)), "{e:?}");
            assert!(e.to_string().contains("libnccl.so.2"), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Child of the init tests: inits rank `rank` of 2 on GPU `gpu`, reports, exits with the error's
/// exit code (or 0).
fn init_child(role: &str, uid: &UniqueId) {
    let parts: Vec<&str> = role.split(':').collect();
    let (gpu_ix, rank, blocking, timeout_s): (usize, u32, bool, u64) = match parts.as_slice() {
        ["init", g, r, m, t] => (
            g.parse().expect("gpu"),
            r.parse().expect("rank"),
            *m == "blocking",
            t.parse().expect("timeout"),
        ),
        _ => panic!("role init:<gpu>:<rank>:<mode>:<timeout_s>"),
    };
    let gpu = Gpu::open_for_plane(gpu_ix).expect("open GPU");
    let o = CommOptions {
        name: "init-test".into(),
        blocking,
        init_timeout: Duration::from_secs(timeout_s),
    };
    println!("INIT start");
    match Communicator::init(&gpu, uid, 2, GroupRank(rank), &o) {
        Ok(c) => {
            println!("INIT ok");
            drop(c);
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("init failed: {e}");
            std::process::exit(e.exit_code().code());
        }
    }
}

fn run_init_children(name: &str, roles: &[String], bound: Duration) -> Vec<(Option<i32>, String)> {
    let uid = UniqueId::new().expect("ncclGetUniqueId");
    let mut kids: Vec<Kid> = roles.iter().map(|r| spawn_self(name, r, &uid)).collect();
    let errs: Vec<_> = kids.iter_mut().map(stderr_of).collect();
    let t0 = Instant::now();
    let res: Vec<(Option<i32>, String)> = kids
        .iter_mut()
        .zip(errs)
        .map(|(k, e)| {
            let code = wait_exit(k, bound);
            (
                code,
                e.recv_timeout(Duration::from_secs(5)).unwrap_or_default(),
            )
        })
        .collect();
    println!(
        "{name}: children done in {:.3} s: {res:?}",
        t0.elapsed().as_secs_f64()
    );
    res
}

#[test]
fn nccl_two_ranks_of_one_communicator_on_one_gpu_fail_init_not_hang() {
    let name = "nccl_two_ranks_of_one_communicator_on_one_gpu_fail_init_not_hang";
    if let Some((role, uid)) = child_env() {
        init_child(&role, &uid);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let roles = vec![
        "init:0:0:nonblocking:20".to_string(),
        "init:0:1:nonblocking:20".to_string(),
    ];
    let res = run_init_children(name, &roles, Duration::from_secs(40));
    for (code, err) in &res {
        assert_eq!(*code, Some(ExitCode::DeviceError.code()), "{err}");
        assert!(err.contains("ncclCommInitRankConfig"), "{err}");
        assert!(
            err.contains("uplicate GPU") || err.contains("invalid usage"),
            "{err}"
        );
    }
}

#[test]
fn nccl_blocking_init_without_its_peer_hard_exits_at_the_tripwire() {
    let name = "nccl_blocking_init_without_its_peer_hard_exits_at_the_tripwire";
    if let Some((role, uid)) = child_env() {
        init_child(&role, &uid);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let t0 = Instant::now();
    let res = run_init_children(
        name,
        &["init:0:0:blocking:2".to_string()],
        Duration::from_secs(20),
    );
    let took = t0.elapsed();
    let (code, err) = &res[0];
    assert_eq!(*code, Some(ExitCode::WatchdogTimeout.code()), "{err}");
    assert!(err.contains("hard exit 71"), "{err}");
    assert!(err.contains("did not return within 2.0 s"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn nccl_nonblocking_init_without_its_peer_times_out_and_aborts() {
    let name = "nccl_nonblocking_init_without_its_peer_times_out_and_aborts";
    if let Some((role, uid)) = child_env() {
        init_child(&role, &uid);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let t0 = Instant::now();
    let res = run_init_children(
        name,
        &["init:0:0:nonblocking:2".to_string()],
        Duration::from_secs(20),
    );
    let took = t0.elapsed();
    let (code, err) = &res[0];
    assert_eq!(*code, Some(ExitCode::WatchdogTimeout.code()), "{err}");
    assert!(
        err.contains("still ncclInProgress at its deadline"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------

fn three_child(rank: u32) {
    let uids: Vec<UniqueId> = std::env::var(UID)
        .expect("uids")
        .split(',')
        .map(|h| UniqueId::from_hex(h).expect("uid hex"))
        .collect();
    let (pp, mesh) = (&uids[0], &uids[1]);
    // rank 0 -> GPU 0, rank 1 -> GPU 1, rank 2 -> GPU 0 (shares GPU 0 with rank 0, never a comm).
    let gpu = Gpu::open_for_plane(if rank == 1 { 1 } else { 0 }).expect("open GPU");
    let done = gpu
        .completion(CompletionKind::HostFlag)
        .expect("completion");
    let dl = Instant::now() + Duration::from_secs(30);
    const N: usize = 1 << 18;
    let ones: Vec<u8> = std::iter::repeat_n(1.0f32.to_le_bytes(), N)
        .flatten()
        .collect();
    let twos: Vec<u8> = std::iter::repeat_n(2.0f32.to_le_bytes(), N)
        .flatten()
        .collect();
    match rank {
        0 => {
            let c = Communicator::init(&gpu, pp, 2, GroupRank(0), &opts("pp", true)).expect("pp");
            let buf = gpu.upload(&ones).expect("upload");
            c.send(&gpu, &buf, N * 4, GroupRank(1), dl).expect("send");
            let t = done.mark().expect("mark");
            c.wait(&done, t, dl, "pp send").expect("pp send completes");
            c.close(Duration::from_secs(10)).expect("close pp");
        }
        1 => {
            let p = Communicator::init(&gpu, pp, 2, GroupRank(1), &opts("pp", true)).expect("pp");
            let m =
                Communicator::init(&gpu, mesh, 2, GroupRank(0), &opts("mesh", true)).expect("mesh");
            let mut buf = gpu.alloc(N * 4).expect("alloc");
            p.recv(&gpu, &mut buf, N * 4, GroupRank(0), dl)
                .expect("recv");
            m.all_reduce_sum(&gpu, &mut buf, N, ReduceDtype::F32, dl)
                .expect("all-reduce");
            let t = done.mark().expect("mark");
            m.wait(&done, t, dl, "mesh all-reduce").expect("completes");
            let got = gpu.download(&buf).expect("download");
            let want = 3.0f32.to_le_bytes();
            assert!(
                got.chunks_exact(4).all(|c| c == want),
                "pp data + mesh sum wrong"
            );
            m.close(Duration::from_secs(10)).expect("close mesh");
            p.close(Duration::from_secs(10)).expect("close pp");
        }
        _ => {
            let m =
                Communicator::init(&gpu, mesh, 2, GroupRank(1), &opts("mesh", true)).expect("mesh");
            let mut buf = gpu.upload(&twos).expect("upload");
            m.all_reduce_sum(&gpu, &mut buf, N, ReduceDtype::F32, dl)
                .expect("all-reduce");
            let t = done.mark().expect("mark");
            m.wait(&done, t, dl, "mesh all-reduce").expect("completes");
            let got = gpu.download(&buf).expect("download");
            let want = 3.0f32.to_le_bytes();
            assert!(got.chunks_exact(4).all(|c| c == want), "mesh sum wrong");
            m.close(Duration::from_secs(10)).expect("close mesh");
        }
    }
    println!("THREE ok rank {rank}");
}

#[test]
fn nccl_three_ranks_on_two_gpus_work_when_gpu_sharers_share_no_communicator() {
    let name = "nccl_three_ranks_on_two_gpus_work_when_gpu_sharers_share_no_communicator";
    if let Ok(role) = std::env::var(ROLE) {
        let rank = role
            .strip_prefix("three:")
            .and_then(|r| r.parse().ok())
            .expect("role three:<rank>");
        three_child(rank);
        return;
    }
    if common::skip_without_nccl(name, 2) {
        return;
    }
    let pp = UniqueId::new().expect("pp id");
    let mesh = UniqueId::new().expect("mesh id");
    let exe = std::env::current_exe().expect("exe");
    let mut kids: Vec<Kid> = (0..3)
        .map(|r| {
            Kid(Command::new(&exe)
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(ROLE, format!("three:{r}"))
                .env(UID, format!("{},{}", pp.to_hex(), mesh.to_hex()))
                .env("NCCL_NVLS_ENABLE", "0")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"))
        })
        .collect();
    let outs: Vec<_> = kids.iter_mut().map(lines).collect();
    let errs: Vec<_> = kids.iter_mut().map(stderr_of).collect();
    for (r, kid) in kids.iter_mut().enumerate() {
        let code = wait_exit(kid, Duration::from_secs(60));
        let out: Vec<String> = outs[r].try_iter().collect();
        let err = errs[r]
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        assert_eq!(code, Some(0), "rank {r}: {err}");
        assert!(
            out.iter()
                .any(|l| l.contains(&format!("THREE ok rank {r}"))),
            "rank {r}: {out:?}"
        );
    }
}
