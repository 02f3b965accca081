//! `lockstep run` end to end over real processes: the default job (tiny DiT, rank 0 + TP=2 on the
//! host plane) streams, writes frames a viewer opens and a trace with one track per rank, and
//! ranks started with different pipeline settings fail the parity handshake before inference.
//! Backend: whatever `LOCKSTEP_BACKEND` names (host by default; on nccl without 2 GPUs every test
//! prints `SKIP <test>: …` and returns).
mod common;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn run_streams_tiny_dit_over_rank_processes_with_frames_and_trace() {
    let Some(_serial) =
        common::start("run_streams_tiny_dit_over_rank_processes_with_frames_and_trace")
    else {
        return;
    };
    let (frames, trace, metrics) = (
        common::tmp("frames"),
        common::tmp("trace.json"),
        common::tmp("metrics.json"),
    );
    let _ = std::fs::remove_dir_all(&frames);
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet", "--chunks", "6"])
        .arg("--frames-out")
        .arg(&frames)
        .arg("--trace")
        .arg(&trace)
        .arg("--metrics")
        .arg(&metrics)
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_DUMP_DIR", common::tmp("dumps"));
    let out = common::bounded(cmd, "lockstep run", Duration::from_secs(60));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("generator tiny DiT (CPU)") && stdout.contains("rank 0 + TP=2 mesh"),
        "{stdout}"
    );
    // The summary names the data plane the ranks really bootstrapped on.
    assert!(
        stdout.contains(&format!("data plane {}", common::backend())),
        "{stdout}"
    );
    assert!(
        stdout.contains("chunks emitted             6 / 6"),
        "{stdout}"
    );
    // Three real processes, each bootstrapped and drained.
    for r in 0..3 {
        assert!(
            stderr.contains(&format!("launch: global-rank {r} exit 0 (clean)")),
            "{stderr}"
        );
    }
    // Frames: 3 latent frames per chunk, each a PNG.
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(&frames)
        .expect("frames dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 18, "{pngs:?}");
    let head = std::fs::read(&pngs[0]).expect("png");
    assert_eq!(&head[..8], b"\x89PNG\r\n\x1a\n");
    // Trace: complete events from every rank, with the fields Perfetto needs.
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).expect("trace")).expect("json");
    let ev = t["traceEvents"].as_array().expect("traceEvents");
    let mut pids = BTreeSet::new();
    for e in ev.iter().filter(|e| e["ph"] == "X") {
        for k in ["pid", "tid", "ts", "dur", "name"] {
            assert!(!e[k].is_null(), "event without {k}: {e}");
        }
        pids.insert(e["pid"].as_u64().unwrap_or(99));
    }
    assert_eq!(pids, BTreeSet::from([0, 1, 2]), "one track per rank");
    let m: Value =
        serde_json::from_slice(&std::fs::read(&metrics).expect("metrics")).expect("json");
    assert_eq!(m["chunks_emitted"], 6);
    assert!(m["s1_ms"].as_f64() > Some(0.0), "{m}");
    // Video frames/s: 3 latent frames per chunk × 4 video frames each.
    let (cps, fps) = (
        m["chunks_per_s"].as_f64().unwrap(),
        m["video_fps"].as_f64().unwrap(),
    );
    assert!(
        cps > 0.0 && (fps - 12.0 * cps).abs() < 1e-9 * fps.max(1.0),
        "{m}"
    );
}

#[test]
fn pipeline_settings_that_differ_on_one_rank_fail_parity_before_inference() {
    let Some(_serial) =
        common::start("pipeline_settings_that_differ_on_one_rank_fail_parity_before_inference")
    else {
        return;
    };
    // Launch the ranks by hand so that global-rank 2 gets another weight seed.
    let bin = common::lockstep_bin();
    let script = format!(
        "if [ \"$RANK\" = 2 ]; then seed=7; else seed=0; fi; exec '{}' run --quiet --chunks 2 \
         --generator calibrated --gen-cost-ms 1 --seed $seed",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["launch", "-n", "3", "--dump-dir"])
        .arg(common::tmp("parity-dumps"))
        .args(["--", "sh", "-c", &script])
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_RENDEZVOUS_MS", "5000");
    let out = common::bounded(cmd, "lockstep launch", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("parity mismatch between ranks")
            && stderr.contains("startup parity handshake failed before inference")
            && stderr.contains(r#"pipeline.seed: global-rank 0,1 = "0"; global-rank 2 = "7""#),
        "{stderr}"
    );
    assert!(!stderr.contains("generate"), "{stderr}");
}

#[test]
fn run_started_by_a_plain_launcher_reports_from_rank0() {
    let Some(_serial) = common::start("run_started_by_a_plain_launcher_reports_from_rank0") else {
        return;
    };
    // torchrun/Slurm style: something else starts the ranks with the torchrun environment; each
    // is `lockstep run` in rank mode, and rank 0 prints the summary and writes the metrics.
    let metrics = common::tmp("plain-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let bin = common::lockstep_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["launch", "-n", "3", "--dump-dir"])
        .arg(common::tmp("plain-dumps"))
        .arg("--")
        .arg(&bin)
        .args([
            "run",
            "--quiet",
            "--chunks",
            "3",
            "--generator",
            "calibrated",
        ])
        .arg("--metrics")
        .arg(&metrics)
        .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "lockstep launch", Duration::from_secs(10));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("chunks emitted             3 / 3"),
        "{stdout}"
    );
    let m: Value =
        serde_json::from_slice(&std::fs::read(&metrics).expect("metrics")).expect("json");
    assert_eq!(m["chunks_emitted"], 3);
}

#[test]
fn c1_mesh_rank_killed_mid_stream_ends_every_rank_fast_with_a_diagnosis() {
    let Some(_serial) =
        common::start("c1_mesh_rank_killed_mid_stream_ends_every_rank_fast_with_a_diagnosis")
    else {
        return;
    };
    let frames = common::tmp("kill-frames");
    let _ = std::fs::remove_dir_all(&frames);
    let mut child = Command::new(common::lockstep_bin())
        .args([
            "run",
            "--quiet",
            "--chunks",
            "400",
            "--generator",
            "calibrated",
            "--gen-cost-ms",
            "2",
        ])
        .arg("--frames-out")
        .arg(&frames)
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_DUMP_DIR", common::tmp("kill-dumps"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep");
    let (rx, _all) = common::stderr_lines(&mut child);
    let mut seen = Vec::new();
    let mut victim = None;
    while victim.is_none() {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the launcher did not name global-rank 2's pid: {seen:?}");
        };
        victim = line
            .strip_prefix("launch: global-rank 2 pid ")
            .and_then(|p| p.trim().parse::<i32>().ok());
        seen.push(line);
    }
    // Mid-stream = rank 0 has decoded a chunk (its frames are on disk); then SIGKILL the mesh
    // follower (no goodbye, no dump).
    let t = std::time::Instant::now();
    while std::fs::read_dir(&frames).map_or(0, |d| d.count()) < 3 {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no frame decoded within 10 s: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = std::time::Instant::now();
    // Never kill(0, …): that would signal this test's own process group.
    let pid = victim
        .filter(|p| *p > 0)
        .unwrap_or_else(|| panic!("no valid pid for global-rank 2: {seen:?}"));
    // SAFETY: kill(2) on a rank pid the launcher just printed; it is our grandchild.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut code = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        match child.try_wait() {
            Ok(Some(s)) => {
                code = s.code();
                break;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("try_wait: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = killed_at.elapsed();
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("lockstep run still alive 10 s after a mesh rank died (a hang)");
    }
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l);
    }
    let all = seen.join("\n");
    // The launcher reports the killed rank as the primary failure (128 + SIGKILL).
    assert_eq!(code, Some(137), "{all}");
    assert!(
        all.contains("launch: global-rank 2 killed by signal 9 (SIGKILL)")
            && all
                .contains("lockstep[global-rank 0]: exit 72 (peer-lost): peer lost: global-rank 2"),
        "{all}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}\n{all}");
    println!("killed mid-stream; lockstep run exited {elapsed:?} later:\n{all}");
}

#[test]
fn run_refuses_unwritable_output_paths_before_any_rank_starts() {
    let dir = common::tmp("outputs-check");
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("no-such-dir").join("m.json");
    let cases: [(&str, std::ffi::OsString, &str); 3] = [
        ("--metrics", missing.clone().into(), "does not exist"),
        ("--trace", dir.clone().into(), "is a directory"),
        (
            "--frames-out",
            dir.join("m.json").join("x").into(),
            "cannot create it",
        ),
    ];
    // A regular file where --frames-out wants a directory.
    std::fs::write(dir.join("m.json"), b"{}").unwrap();
    for (flag, path, why) in cases {
        let mut cmd = Command::new(common::lockstep_bin());
        cmd.args(["run", "--quiet", "--chunks", "1"])
            .arg(flag)
            .arg(&path)
            .env_remove("LOCKSTEP_FAULT");
        let out = common::bounded(
            cmd,
            "lockstep run with a bad output",
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(why),
            "{flag}: {stderr}"
        );
        assert!(!stderr.contains("launch: global-rank"), "{flag}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_refuses_bad_numbers_and_unparsable_arguments_with_exit_74() {
    for (args, want) in [
        (&["--chunks", "-1"][..], "unexpected argument '-1'"),
        (
            &["--timeout", "1e300"][..],
            "--timeout must be a number of seconds in 0..=604800, got 1e300",
        ),
        (
            &["--timeout=-1"][..],
            "--timeout must be a number of seconds in 0..=604800, got -1",
        ),
    ] {
        let mut cmd = Command::new(common::lockstep_bin());
        cmd.args(["run", "--quiet"])
            .args(args)
            .env_remove("LOCKSTEP_FAULT");
        let out = common::bounded(
            cmd,
            "lockstep run with a bad number",
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(
            stderr.len() < 400,
            "{args:?}: a short diagnosis, got {} bytes",
            stderr.len()
        );
    }
}

#[test]
fn unresolvable_master_addr_a_taken_or_zero_master_port_are_bad_input() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (rank, addr, port, want) in [
        (
            "1",
            "no.such.host.invalid",
            "29555",
            "MASTER_ADDR no.such.host.invalid:29555 does not resolve",
        ),
        (
            "0",
            "127.0.0.1",
            port.as_str(),
            "rendezvous: cannot bind MASTER_ADDR:MASTER_PORT",
        ),
        (
            "1",
            "127.0.0.1",
            "0",
            "MASTER_PORT=0: the rendezvous needs a fixed port",
        ),
    ] {
        let mut cmd = Command::new(common::lockstep_bin());
        cmd.args(["run", "--quiet", "--chunks", "1", "--tp", "1"])
            .env_remove("LOCKSTEP_FAULT")
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("MASTER_ADDR", addr),
                ("MASTER_PORT", port),
                ("LOCKSTEP_JOB_TOKEN", "t"),
            ]);
        let out = common::bounded(cmd, "rank with a bad MASTER_ADDR", Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(74), "{addr}:{port}: {stderr}");
        assert!(stderr.contains(want), "{addr}:{port}: {stderr}");
    }
    drop(taken);
}

#[test]
fn a_dump_directory_that_cannot_take_dumps_is_bad_input_before_any_rank_starts() {
    let file = common::tmp("dump-dir-is-a-file");
    std::fs::write(&file, b"x").unwrap();
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["launch", "-n", "2", "--dump-dir"])
        .arg(file.join("dumps"))
        .args(["--", "true"])
        .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "launch with a bad dump dir", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("dump directory") && stderr.contains("cannot create it"),
        "{stderr}"
    );
    assert!(!stderr.contains("global-rank 0 pid"), "{stderr}");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_duplicated_rank_is_told_why_and_the_job_goes_on() {
    let _serial = common::serial();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let rank = |r: &str| {
        let mut c = Command::new(common::lockstep_bin());
        c.args(["run", "--quiet", "--chunks", "2", "--tp", "2"])
            .env_remove("LOCKSTEP_FAULT")
            .envs([
                ("RANK", r),
                ("LOCAL_RANK", r),
                ("WORLD_SIZE", "3"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("LOCKSTEP_JOB_TOKEN", "dup-test"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    // Two processes claim RANK=1; whichever registers second is the duplicate.
    let procs: Vec<(&str, std::process::Child)> = ["0", "1", "1", "2"]
        .into_iter()
        .map(|r| (r, rank(r).spawn().unwrap()))
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    let mut results = Vec::new();
    for (r, mut c) in procs {
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > until {
                let _ = c.kill();
                panic!("RANK={r} did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        results.push((r, st.code(), err));
    }
    let code = |i: usize| results[i].1;
    assert_eq!((code(0), code(3)), (Some(0), Some(0)), "{results:?}");
    let mut ones = [code(1), code(2)];
    ones.sort();
    assert_eq!(ones, [Some(0), Some(74)], "{results:?}");
    let dup = if code(1) == Some(74) {
        &results[1].2
    } else {
        &results[2].2
    };
    // Refused either while registering ("RANK=1 is already registered … pid") or after the
    // last rank got in ("the rendezvous is closed"): both say it is a duplicated RANK.
    assert!(
        dup.contains("exit 74 (bad-input)") && dup.contains("duplicated RANK"),
        "{dup}"
    );
}

#[test]
fn a_run_sweeps_the_run_folders_of_runs_that_were_sigkilled() {
    let _serial = common::serial();
    // A pid that existed and is gone: a child that has exited and been reaped.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let stale = std::env::temp_dir().join(format!("lockstep-run-{pid}-dead"));
    std::fs::create_dir_all(&stale).unwrap();
    let mine = std::env::temp_dir().join(format!("lockstep-run-{}-alive", std::process::id()));
    std::fs::create_dir_all(&mine).unwrap();
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet", "--chunks", "1"])
        .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "lockstep run", Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists(), "the folder of a dead run is swept");
    assert!(mine.exists(), "the folder of a live process is kept");
    let _ = std::fs::remove_dir_all(&mine);
}

/// Runs `lockstep run` (rank 0 + TP=2), sends `sig` to global rank `victim` once the ranks are
/// up (~1.5 s in, usually mid-stream), and returns the run's stderr and `fr analyze`'s output.
fn run_with_a_rank_signalled(name: &str, victim: u32, sig: i32) -> (Option<i32>, String, String) {
    let dumps = common::tmp(name);
    let _ = std::fs::remove_dir_all(&dumps);
    let mut child = Command::new(common::lockstep_bin())
        .args(["run", "--quiet", "--chunks", "400"])
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_WATCHDOG_MS", "1000")
        .env("LOCKSTEP_DUMP_DIR", &dumps)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, reader) = common::stderr_lines(&mut child);
    let want = format!("launch: global-rank {victim} pid ");
    let pid: i32 = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the launcher names every rank's pid");
        if let Some(p) = line.strip_prefix(&want) {
            break p.trim().parse().unwrap();
        }
    };
    // Not a synchronization point: the diagnosis must be right whenever the signal lands
    // (bootstrap or mid-stream); the pause only makes mid-stream the usual case.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling a child process of this test (a rank of the run it started).
    unsafe { libc::kill(pid, sig) };
    let until = std::time::Instant::now() + Duration::from_secs(40);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            // SAFETY: as above (un-stop the victim so nothing stays pinned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{name}: the run did not end within 40 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    let fr = Command::new(common::lockstep_bin())
        .args(["fr", "analyze"])
        .arg(&dumps)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dumps);
    (
        code,
        stderr,
        String::from_utf8_lossy(&fr.stdout).into_owned(),
    )
}

#[test]
fn a_stopped_mesh_rank_is_named_the_culprit_by_the_launcher_and_fr_analyze() {
    let _serial = common::serial();
    let (code, stderr, fr) = run_with_a_rank_signalled("culprit-stop", 2, libc::SIGSTOP);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(
        stderr.contains("launch: culprit: global-rank 2: it did not exit on SIGTERM"),
        "{stderr}"
    );
    assert!(fr.contains("culprit: global-rank 2 (left no dump"), "{fr}");
    assert!(
        !fr.contains("culprit: global-rank 1\n") && !fr.contains("culprit: global-rank 0\n"),
        "{fr}"
    );
}

#[test]
fn a_sigkilled_driver_is_named_the_culprit_by_the_launcher_and_fr_analyze() {
    let _serial = common::serial();
    let (code, stderr, fr) = run_with_a_rank_signalled("culprit-kill", 0, libc::SIGKILL);
    assert!(code.is_some_and(|c| c != 0), "{stderr}");
    assert!(
        stderr.contains("launch: failed: global-rank 0 killed by signal 9"),
        "{stderr}"
    );
    assert!(fr.contains("culprit: global-rank 0 (left no dump"), "{fr}");
    assert!(
        !fr.contains("culprit: global-rank 1\n") && !fr.contains("culprit: global-rank 2\n"),
        "{fr}"
    );
}

#[test]
fn run_backend_option_refuses_unknown_plane_before_any_rank_starts() {
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet", "--chunks", "1", "--backend", "gloo"])
        .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "lockstep run --backend gloo", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("lockstep run: exit 74 (bad-input)") && stderr.contains("gloo"),
        "{stderr}"
    );
    // Refused in the parent: no rank was launched.
    assert!(!stderr.contains("launch: global-rank"), "{stderr}");
}

#[test]
fn pp_result_payload_waits_for_clear_to_send_while_infers_keep_arriving() {
    let Some(_serial) =
        common::start("pp_result_payload_waits_for_clear_to_send_while_infers_keep_arriving")
    else {
        return;
    };
    // D_in = 2: rank 0 sends INFER k+1 while the mesh still generates chunk k (20 ms a call), so
    // RESULT k and INFER k+1 want `pp` at the same time. On NCCL two opposite blocking sends on
    // one communicator wait for each other forever; the rule: the leader holds the RESULT
    // payload until rank 0's ClearToSend, receiving the INFERs that arrive meanwhile whole.
    let metrics = common::tmp("cts-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--chunks",
        "8",
        "--depth",
        "2",
        "--generator",
        "calibrated",
        "--gen-cost-ms",
        "20",
        "--recompute-every",
        "0",
        "--timeout",
        "5",
    ])
    .arg("--metrics")
    .arg(&metrics)
    .env_remove("LOCKSTEP_FAULT")
    .env("LOCKSTEP_DUMP_DIR", common::tmp("cts-dumps"));
    let out = common::bounded(cmd, "lockstep run (crossing)", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let m: Value = serde_json::from_slice(&std::fs::read(&metrics).expect("metrics written"))
        .expect("metrics JSON");
    assert_eq!(m["chunks_emitted"], 8, "{m}");
    let crossed = m["envelopes_awaiting_cts"].as_u64().unwrap_or(0);
    println!("envelopes received while a RESULT awaited ClearToSend: {crossed} of 8 chunks");
    assert!(
        crossed >= 1,
        "the crossing never happened, so this run proves nothing about it: {m}"
    );
    let emitted: Vec<u64> = m["emitted"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p[1].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(emitted, (0..8).collect::<Vec<_>>(), "in order, each once");
}

/// Ranks started by hand (not through a fault point) whose environment really differs: the
/// attention choice (`LOCKSTEP_KERNEL_VARIANT`) or CUDA graphs (`LOCKSTEP_CUDA_GRAPHS`) on one
/// rank. Every rank exits 73 at startup naming the field and who holds which value; no chunk runs.
#[test]
fn ranks_with_a_different_attention_choice_or_graphs_setting_exit_at_startup() {
    let _serial = common::serial();
    for (var, odd, field, want) in [
        (
            "LOCKSTEP_KERNEL_VARIANT",
            "v1",
            "exec.kernel_variant",
            "exec.kernel_variant: global-rank 0,1 = \"auto-shape-table-r1\"; global-rank 2 = \"v1-fa2-mma-sync\"",
        ),
        (
            "LOCKSTEP_CUDA_GRAPHS",
            "on",
            "exec.cuda_graphs",
            "exec.cuda_graphs: global-rank 0,1 = \"off\"; global-rank 2 = \"on\"",
        ),
    ] {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port().to_string()
        };
        let procs: Vec<std::process::Child> = ["0", "1", "2"]
            .into_iter()
            .map(|r| {
                let mut c = Command::new(common::lockstep_bin());
                c.args(["run", "--quiet", "--chunks", "2", "--tp", "2"])
                    .args(["--generator", "calibrated"])
                    .env_remove("LOCKSTEP_FAULT")
                    .env_remove("LOCKSTEP_KERNEL_VARIANT")
                    .env_remove("LOCKSTEP_CUDA_GRAPHS")
                    .envs([
                        ("RANK", r),
                        ("LOCAL_RANK", r),
                        ("WORLD_SIZE", "3"),
                        ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", port.as_str()),
                        ("LOCKSTEP_JOB_TOKEN", "parity-env-test"),
                    ])
                    .env("LOCKSTEP_DUMP_DIR", common::fresh_tmp("parity-env-dumps"))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped());
                if r == "2" {
                    c.env(var, odd);
                }
                c.spawn().unwrap()
            })
            .collect();
        for (r, mut c) in procs.into_iter().enumerate() {
            let code = common::wait_bounded(&mut c, Duration::from_secs(30));
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            assert_eq!(code, 73, "{field}: global-rank {r}: {err}");
            assert!(err.contains("parity-mismatch"), "{field}: rank {r}: {err}");
            if r == 0 {
                // Rank 0 holds every rank's fingerprint: it names the field and the split.
                assert!(err.contains(want), "{field}: rank 0: {err}");
            }
        }
    }
}

/// SIGUSR1 (`lockstep fr dump PID`) is a dump on request: the rank writes its flight recorder and
/// goes on; the run still drains and exits 0.
#[test]
fn fr_dump_pid_makes_a_rank_dump_on_request_and_the_run_goes_on() {
    let _serial = common::serial();
    let test = "fr_dump_pid_makes_a_rank_dump_on_request_and_the_run_goes_on";
    if common::skip_backend_unrunnable(test) {
        return;
    }
    let frames = common::fresh_tmp("usr1-frames");
    let dumps = common::fresh_tmp("usr1-dumps");
    let mut child = Command::new(common::lockstep_bin())
        .args([
            "run",
            "--quiet",
            "--chunks",
            "300",
            "--generator",
            "calibrated",
            "--gen-cost-ms",
            "2",
        ])
        .arg("--frames-out")
        .arg(&frames)
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_DUMP_DIR", &dumps)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep");
    let (rx, all) = common::stderr_lines(&mut child);
    let line = common::wait_line(&rx, "launch: global-rank 1 pid ", Duration::from_secs(10));
    let pid: i32 = line
        .rsplit(' ')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .filter(|p| *p > 0)
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    // Mid-stream (rank 0 decoded a chunk, so the leader's signal thread is long up).
    let t = std::time::Instant::now();
    while std::fs::read_dir(&frames).map_or(0, |d| d.count()) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no frame within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fr = Command::new(common::lockstep_bin());
    fr.args(["fr", "dump", &pid.to_string()]);
    let out = common::bounded(fr, "lockstep fr dump", Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("fr dump: asked pid {pid} to dump"))
    );
    let code = common::wait_bounded(&mut child, Duration::from_secs(20));
    let stderr = all.join().unwrap_or_default();
    assert_eq!(
        code, 0,
        "a dump on request does not end the rank:\n{stderr}"
    );
    assert!(
        stderr.contains("lockstep: flight recorder dumped to") && stderr.contains("(on request)"),
        "{stderr}"
    );
    let dump = std::fs::read_to_string(dumps.join("rank-1.jsonl")).unwrap_or_default();
    assert!(dump.contains("dump requested (SIGUSR1)"), "{dump}");
    let _ = std::fs::remove_dir_all(&frames);
    let _ = std::fs::remove_dir_all(&dumps);
}
