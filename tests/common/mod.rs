//! Shared helpers for integration tests.
#![allow(dead_code)]
use std::path::PathBuf;

/// The `lockstep` binary under test. `LOCKSTEP_BIN` overrides the cargo-built path so that the
/// staged test binaries can run on a GPU host (tools/gpu/), where the build tree does not exist.
pub fn lockstep_bin() -> PathBuf {
    match std::env::var_os("LOCKSTEP_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_lockstep")),
    }
}

/// Prints why a GPU test is skipped and returns true when it must skip. GPU tests never pass
/// silently: the reason is printed (run with `--nocapture` to see it).
/// With `LOCKSTEP_REQUIRE_GPU=1` (set on the GPU hosts) a test that would skip fails instead.
pub fn skip_without_gpu(test: &str) -> bool {
    let why = if !lockstep::cuda::embedded::has_kernels() {
        "built without kernels (run tools/install-cuda-toolchain.sh and rebuild)"
    } else if !lockstep::cuda::probe::gpu_available() {
        "no CUDA driver or no GPU visible"
    } else {
        return false;
    };
    if std::env::var("LOCKSTEP_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: LOCKSTEP_REQUIRE_GPU=1 but it would skip: {why}");
    }
    println!("SKIP {test}: {why}");
    true
}

/// Serializes the multi-process tests of one test binary. Each spawns 3–4 rank processes with
/// sub-second watchdogs; running a dozen at once on a 2-core CI machine starves them into
/// timeouts the test did not ask for. Hold the guard for the whole test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The data plane the ranks run on: `LOCKSTEP_BACKEND` (they inherit it), `host` by default.
pub fn backend() -> String {
    std::env::var("LOCKSTEP_BACKEND").unwrap_or_else(|_| "host".into())
}

/// True (after printing why) when the selected backend cannot run here: `nccl` without 2 GPUs
/// or a usable NCCL. Never a silent pass.
pub fn skip_backend_unrunnable(test: &str) -> bool {
    if backend() == "nccl" {
        if let Some(why) = lockstep::comm::nccl::unavailable_reason(2) {
            println!("SKIP {test}: LOCKSTEP_BACKEND=nccl but {why}");
            return true;
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
