//! Shared helpers for integration tests.
#![allow(dead_code)]
pub mod gpu;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `lockstep` binary under test. `LOCKSTEP_BIN` overrides the cargo-built path so that the
/// staged test binaries can run on a GPU host (tools/gpu/), where the build tree does not exist.
pub fn lockstep_bin() -> PathBuf {
    match std::env::var_os("LOCKSTEP_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_lockstep")),
    }
}

/// Every skip goes through here: prints `SKIP <test>: <why>` and returns true, so a skipped test
/// never passes silently (run with `--nocapture` to see it). With `LOCKSTEP_REQUIRE_GPU=1` (set
/// by the GPU run scripts, tools/gpu/) a test that would skip fails instead.
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var("LOCKSTEP_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: LOCKSTEP_REQUIRE_GPU=1 but it would skip: {why}");
    }
    println!("SKIP {test}: {why}");
    true
}

/// True (after [`skip`]) when a GPU test cannot run here: no kernels embedded, or no GPU.
pub fn skip_without_gpu(test: &str) -> bool {
    let why = if !lockstep::cuda::embedded::has_kernels() {
        "built without kernels (run tools/install-cuda-toolchain.sh and rebuild)"
    } else if !lockstep::cuda::probe::gpu_available() {
        "no CUDA driver or no GPU visible"
    } else {
        return false;
    };
    skip(test, why)
}

/// True (after [`skip`]) when an NCCL test cannot run here: fewer than `gpus` GPUs or no usable
/// NCCL.
pub fn skip_without_nccl(test: &str, gpus: usize) -> bool {
    match lockstep::comm::nccl::unavailable_reason(gpus) {
        Some(why) => skip(test, &why),
        None => false,
    }
}

/// Serializes the multi-process tests of one test binary. Each spawns 3–4 rank processes with
/// sub-second watchdogs; running a dozen at once on a 2-core CI machine starves them into
/// timeouts the test did not ask for. Hold the guard for the whole test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The preamble of a multi-process test: the [`serial`] guard (hold it for the whole test), or
/// `None` after [`skip_backend_unrunnable`] said why the selected backend cannot run here.
pub fn start(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = serial();
    if skip_backend_unrunnable(test) {
        return None;
    }
    Some(guard)
}

/// The data plane the ranks run on: `LOCKSTEP_BACKEND` (they inherit it), `host` by default.
pub fn backend() -> String {
    std::env::var("LOCKSTEP_BACKEND").unwrap_or_else(|_| "host".into())
}

/// True (after [`skip`]) when the selected backend cannot run here: `nccl` without 2 GPUs or a
/// usable NCCL.
pub fn skip_backend_unrunnable(test: &str) -> bool {
    if backend() == "nccl" {
        if let Some(why) = lockstep::comm::nccl::unavailable_reason(2) {
            return skip(test, &format!("LOCKSTEP_BACKEND=nccl but {why}"));
        }
    }
    false
}

/// True (after printing why) when the backend is NCCL and the test does not apply there, or the
/// backend cannot run here.
pub fn skip_on_nccl(test: &str, why: &str) -> bool {
    if backend() == "nccl" {
        println!("SKIP {test} on nccl: {why}");
        return true;
    }
    skip_backend_unrunnable(test)
}

/// Runs `cmd` with piped output, killing it (and failing the test) after `bound`: a hang in the
/// code under test ends the test with a diagnosis instead of hanging the suite.
pub fn bounded(
    mut cmd: std::process::Command,
    what: &str,
    bound: std::time::Duration,
) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(o) => o.expect("wait for lockstep"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of the child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not finish within {bound:?} (a hang)");
        }
    }
}

/// A scratch path of this test binary: `$TMPDIR/lockstep-<test crate>-<pid>-<name>`. Not created.
pub fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "lockstep-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ))
}

/// [`tmp`] with whatever an earlier run left there removed.
pub fn fresh_tmp(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_file(&d);
    d
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for `MASTER_PORT`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits for a line containing `needle` on `rx` and returns it; fails the test after `bound`.
pub fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, bound: Duration) -> String {
    let end = Instant::now() + bound;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("no line containing {needle:?} within {bound:?}"),
        }
    }
}

/// Reads `r` line by line on a thread; lines arrive on the returned channel, and the thread
/// returns all of them when `r` ends.
pub fn lines_of<R: std::io::Read + Send + 'static>(
    r: R,
) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    (rx, h)
}

/// [`lines_of`] a child's stderr (piped).
pub fn stderr_lines(
    child: &mut Child,
) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    lines_of(child.stderr.take().expect("stderr piped"))
}

/// Waits for a child with a hard bound and returns its exit code (128 + signal when killed by
/// one); a hang fails the test (and kills the child).
pub fn wait_bounded(child: &mut Child, bound: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
            });
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            panic!("process still running after {bound:?}: a hang");
        }
        // Polling a child's exit status; not synchronization between test steps.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A seeded SplitMix64 generator for the GPU tests' random inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A fresh [`Rng`]: seeded from `LOCKSTEP_TEST_SEED`, else from the clock; the seed is printed so
/// a failure can be replayed.
pub fn fresh_rng(test: &str) -> Rng {
    let seed = std::env::var("LOCKSTEP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: seed {seed} (replay with LOCKSTEP_TEST_SEED={seed})");
    Rng(seed)
}

/// A `lockstep run --metrics` list of (cache_epoch, chunk_index) pairs: `emitted` or `stale`.
pub fn epoch_chunk_pairs(metrics: &serde_json::Value, key: &str) -> Vec<(u64, u64)> {
    metrics[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_u64()?, p[1].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}
