//! The session's foreign clients, run inside `cargo test` (CI's test command): the C example
//! (`ffi/session_example.c`) compiled with `cc -std=c11 -Werror -pedantic` against the cdylib
//! and run against real rank processes (stream + hard cut + clean close; a mesh rank killed
//! mid-stream), and the Python ctypes client (`examples/session_client.py`) doing the same.
//! Each skips with a printed reason only when `cc` / `python3` is absent.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn has(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The cdylib cargo built for these tests (`target/<profile>/deps/`, or uplifted).
fn find_cdylib() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let deps = me.parent()?;
    [
        Some(deps.join("liblockstep.so")),
        deps.parent().map(|p| p.join("liblockstep.so")),
    ]
    .into_iter()
    .flatten()
    .find(|c| c.is_file())
}

fn cdylib() -> PathBuf {
    find_cdylib().expect("liblockstep.so beside the test binary")
}

/// A staged run on a GPU host (`tools/gpu/`: test binaries + `lockstep` only, `LOCKSTEP_BIN`
/// set) has neither the cdylib nor the sources: skip there, with the reason. In a build tree
/// (CI's `cargo test`) both exist and the tests always run.
fn skip_when_staged(test: &str) -> bool {
    let have = find_cdylib().is_some() && repo().join("ffi/session_example.c").is_file();
    if !have && std::env::var_os("LOCKSTEP_BIN").is_some() {
        println!("SKIP {test}: staged run without the cdylib and the example sources");
        return true;
    }
    false
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn build_c_example() -> PathBuf {
    let lib = cdylib();
    let dir = lib.parent().expect("lib dir");
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = common::tmp(&format!("example-{n}"));
    let st = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(format!("-I{}", repo().join("ffi").display()))
        .arg(repo().join("ffi/session_example.c"))
        .arg(format!("-L{}", dir.display()))
        .arg("-llockstep")
        // DT_RPATH (not RUNPATH): found before LD_LIBRARY_PATH, which cargo points at
        // `target/<profile>`, where a `cargo build` may have left an older cdylib.
        .arg(format!("-Wl,--disable-new-dtags,-rpath,{}", dir.display()))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed to build ffi/session_example.c");
    out
}

fn run_bounded(mut cmd: Command, what: &str) -> (Option<i32>, String) {
    cmd.env("LOCKSTEP_BIN", common::lockstep_bin())
        .env("LOCKSTEP_DUMP_DIR", common::tmp("dumps"));
    let out = common::bounded(cmd, what, Duration::from_secs(40));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn c_example_streams_cuts_and_closes_against_real_mesh_ranks() {
    let _serial = common::serial();
    if !has("cc") {
        println!("SKIP c_example_streams: no `cc` on this machine");
        return;
    }
    if common::skip_backend_unrunnable("c_example_streams") || skip_when_staged("c_example_streams")
    {
        return;
    }
    let exe = build_c_example();
    let mut cmd = Command::new(&exe);
    cmd.arg("stream");
    let (code, text) = run_bounded(cmd, "session_example stream");
    let _ = std::fs::remove_file(&exe);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("session_example stream: 8 chunks"), "{text}");
    assert!(text.contains("all 3 ranks exited cleanly"), "{text}");
}

#[test]
fn c_example_sees_a_killed_mesh_rank_as_an_error_in_bounded_time() {
    let _serial = common::serial();
    if !has("cc") {
        println!("SKIP c_example_kill: no `cc` on this machine");
        return;
    }
    if common::skip_backend_unrunnable("c_example_kill") || skip_when_staged("c_example_kill") {
        return;
    }
    let exe = build_c_example();
    let mut cmd = Command::new(&exe);
    cmd.arg("kill");
    let (code, text) = run_bounded(cmd, "session_example kill");
    let _ = std::fs::remove_file(&exe);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("session_example kill: status 7"), "{text}");
}

#[test]
fn python_client_streams_cuts_and_closes_and_sees_a_killed_rank() {
    let _serial = common::serial();
    if !has("python3") {
        println!("SKIP python_client: no `python3` on this machine");
        return;
    }
    if common::skip_backend_unrunnable("python_client") || skip_when_staged("python_client") {
        return;
    }
    let script = repo().join("examples/session_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg("--lib").arg(cdylib());
    let (code, text) = run_bounded(cmd, "session_client.py");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("session_client stream: 6 chunks, ok"),
        "{text}"
    );
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg("--lib").arg(cdylib()).arg("--kill");
    let (code, text) = run_bounded(cmd, "session_client.py --kill");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("session_client kill: status 7"), "{text}");
}
