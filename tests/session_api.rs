//! The session API (`lockstep::session`, issue 11): a server's view of a stream over real rank
//! processes on the host plane — prompts in, results out with their ids, backpressure, hard
//! cuts, clean close; a failed rank as an error with its exit code and diagnosis in bounded
//! time; bad input refused with a clear message and no rank left running.
mod common;

use lockstep::exit::ExitCode;
use lockstep::pipeline::{GeneratorKind, RunArgs};
use lockstep::session::{Conditioning, Launch, Session, SessionConfig, Submit};
use lockstep::wire::DType;
use std::time::{Duration, Instant};

fn config(generator: GeneratorKind) -> SessionConfig {
    SessionConfig {
        run: RunArgs {
            generator,
            gen_cost_ms: 2.0,
            timeout: 4.0,
            quiet: true,
            ..RunArgs::default()
        },
        exe: Some(common::lockstep_bin()),
        dump_dir: Some(common::tmp("dumps")),
        ..SessionConfig::default()
    }
}

/// Submits until `Again`, returning how many went out.
fn fill(s: &mut Session) -> usize {
    let mut n = 0;
    while let Submit::Sent(_) = s.submit().expect("submit") {
        n += 1;
        assert!(n <= 64, "submit never answered Again");
    }
    n
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes; /proc/<pid>/stat's state says which.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, a)| a.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
fn session_streams_with_backpressure_cuts_to_a_new_prompt_and_closes_cleanly() {
    let Some(_serial) = common::start("session_streams") else {
        return;
    };
    let mut s = Session::open(&config(GeneratorKind::Dit)).expect("open");
    let model = s.model().clone();
    assert_eq!(
        s.text_shape(),
        [model.text_tokens as u64, model.text_dim as u64]
    );
    let [t, c] = s.text_shape();
    let text: Vec<u8> = (0..t * c)
        .flat_map(|i| ((i % 97) as f32 * 0.01).to_le_bytes())
        .collect();
    let a = Conditioning::from_tensor(&model, DType::F32, &[t, c], &text).expect("prompt a");
    s.set_conditioning(&a)
        .expect("conditioning before the first chunk");

    // D_in = 2: the third submit answers Again at once.
    let t0 = Instant::now();
    assert_eq!(fill(&mut s), 2);
    assert!(t0.elapsed() < Duration::from_secs(3), "submit waited");
    let mut got = Vec::new();
    while got.len() < 4 {
        match s.submit().expect("submit") {
            Submit::Sent(_) => {}
            Submit::Again => {
                let r = s
                    .recv(Duration::from_secs(5))
                    .expect("recv")
                    .expect("a result within 5 s");
                assert_eq!(
                    r.latent.len() as u64,
                    s.latent_shape()[0] * s.latent_shape()[1]
                );
                got.push(r);
            }
        }
    }
    // In call order, chunk = call order within the epoch, all epoch 0.
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.ids.chunk_index.get(), i as u64);
        assert_eq!(r.ids.cache_epoch.get(), 0);
        assert!(r.latent.iter().all(|v| v.is_finite()));
    }
    // The prompt is fixed within an epoch.
    let b = Conditioning::from_seed(99);
    let e = s.set_conditioning(&b).expect_err("mid-epoch prompt change");
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    assert!(e.to_string().contains("change it with a hard cut"), "{e}");

    // Hard cut with chunks in flight: none of epoch 0 surfaces afterwards.
    let epoch = s.cut(Some(&b)).expect("cut");
    assert_eq!(epoch.get(), 1);
    let mut after = Vec::new();
    for _ in 0..40 {
        if after.len() == 3 {
            break;
        }
        if let Submit::Again = s.submit().expect("submit") {
            if let Some(r) = s.recv(Duration::from_secs(5)).expect("recv") {
                after.push(r);
            }
        }
    }
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|r| r.ids.cache_epoch.get() == 1),
        "stale result surfaced"
    );
    let rep = s.close().expect("close drains and every rank exits 0");
    assert!(rep.emitted >= 7, "{rep:?}");
    // Closed means closed.
    let e = s.submit().expect_err("submit after close");
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    assert!(e.to_string().contains("submit after close"), "{e}");
    let e = s.close().expect_err("double close");
    assert!(e.to_string().contains("already closed"), "{e}");
}

#[test]
fn session_prompt_is_a_real_input_same_prompt_same_latents_other_prompt_other_latents() {
    let Some(_serial) = common::start("session_prompt") else {
        return;
    };
    let first = |c: Conditioning| -> Vec<f32> {
        let mut s = Session::open(&config(GeneratorKind::Dit)).expect("open");
        s.set_conditioning(&c).expect("conditioning");
        assert!(matches!(s.submit().expect("submit"), Submit::Sent(_)));
        let r = s
            .recv(Duration::from_secs(5))
            .expect("recv")
            .expect("result");
        s.close().expect("close");
        r.latent
    };
    let a = first(Conditioning::from_seed(1));
    assert_eq!(
        a,
        first(Conditioning::from_seed(1)),
        "same prompt, other latents"
    );
    assert_ne!(
        a,
        first(Conditioning::from_seed(2)),
        "the prompt changed nothing"
    );
}

#[test]
fn session_submit_and_recv_is_submit_then_recv_in_one_call_and_keeps_the_pipeline_full() {
    let Some(_serial) = common::start("session_submit_and_recv") else {
        return;
    };
    let n = 6;
    // The reference: submit until Again, then recv.
    let mut s = Session::open(&config(GeneratorKind::Calibrated)).expect("open");
    let mut want = Vec::new();
    while want.len() < n {
        if let Submit::Again = s.submit().expect("submit") {
            want.push(
                s.recv(Duration::from_secs(5))
                    .expect("recv")
                    .expect("result"),
            );
        }
    }
    // With room left it submits and polls: a chunk that takes 10 ms is not waited for.
    while s.recv(Duration::from_secs(5)).expect("drain").is_some() {}
    let (sub, r) = s.submit_and_recv(Duration::from_secs(30)).expect("turn");
    assert!(matches!(sub, Submit::Sent(_)));
    assert!(r.is_none(), "waited for a result with room left in D_in");
    s.close().expect("close");
    // One call per turn.
    let mut s = Session::open(&config(GeneratorKind::Calibrated)).expect("open");
    let (mut got, mut calls, mut sent, mut max_in_flight) = (Vec::new(), 0, 0, 0);
    while got.len() < n {
        let (sub, r) = s
            .submit_and_recv(Duration::from_secs(5))
            .expect("submit_and_recv");
        calls += 1;
        if let Submit::Sent(ids) = sub {
            assert_eq!(ids.chunk_index.get(), sent, "chunks go out in order");
            sent += 1;
        }
        max_in_flight = max_in_flight.max(s.in_flight() + usize::from(r.is_some()));
        got.extend(r);
        assert!(calls <= 64, "no progress");
    }
    // D_in = 2 in flight while waiting, one result per call once full: n results in n + 1
    // calls (the first one only fills the pipeline).
    assert_eq!(max_in_flight, 2, "the pipeline was not kept full");
    assert!(calls <= n + 1, "{calls} calls for {n} results");
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.ids.chunk_index.get(), i as u64);
        assert_eq!(a.ids, b.ids, "same ids as submit + recv");
        assert_eq!(
            a.latent, b.latent,
            "chunk {i}: same latent as submit + recv"
        );
    }
    s.close().expect("close");
}

#[test]
fn session_frames_come_with_results_when_asked() {
    let Some(_serial) = common::start("session_frames") else {
        return;
    };
    let mut cfg = config(GeneratorKind::Calibrated);
    cfg.frames = true;
    let video = common::tmp("session.y4m");
    cfg.run.video_out = Some(video.clone());
    let mut s = Session::open(&cfg).expect("open");
    // Nothing in flight: a poll answers at once, and "forever" is a bounded wait, not a panic.
    assert!(s.recv(Duration::ZERO).expect("poll").is_none());
    assert!(s
        .recv(Duration::MAX)
        .expect("nothing to wait for")
        .is_none());
    assert!(matches!(s.submit().expect("submit"), Submit::Sent(_)));
    let r = s.recv(Duration::MAX).expect("recv").expect("result");
    assert_eq!(r.frames.len(), s.model().frames_per_chunk);
    assert!(r.frame_h > 0 && r.frame_w > 0);
    for f in &r.frames {
        assert_eq!(f.len(), (r.frame_h * r.frame_w * 3) as usize);
    }
    s.close().expect("close");
    // Rank 0's decoder wrote the same frames as a Y4M video (`run.video_out`).
    let y4m = std::fs::read(&video).expect("video written");
    assert!(y4m.starts_with(b"YUV4MPEG2 W"));
    let frame = 6 + (r.frame_w * r.frame_h * 3 / 2) as usize;
    let header = y4m.iter().position(|b| *b == b'\n').expect("header") + 1;
    assert_eq!(y4m.len(), header + r.frames.len() * frame);
    let _ = std::fs::remove_file(&video);
}

#[test]
fn session_mesh_rank_killed_mid_stream_is_an_error_with_exit_code_and_diagnosis_in_bound() {
    let Some(_serial) = common::start("session_kill") else {
        return;
    };
    let mut s = Session::open(&config(GeneratorKind::Calibrated)).expect("open");
    fill(&mut s);
    s.recv(Duration::from_secs(5))
        .expect("recv")
        .expect("result");
    let victim = s.rank_pid(2).expect("mesh rank 2's pid");
    let launcher_ranks: Vec<u32> = (0..3).filter_map(|r| s.rank_pid(r)).collect();
    assert_eq!(launcher_ranks.len(), 3);
    // SAFETY: SIGKILL to a rank process this test's session started.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let t0 = Instant::now();
    // Watchdog bound = 2 × timeout = 8 s; the error must reach the caller within it + 1 s.
    let err = loop {
        match s.submit() {
            Ok(Submit::Sent(_)) => {}
            Ok(Submit::Again) => match s.recv(Duration::from_millis(200)) {
                Ok(_) => {}
                Err(e) => break e,
            },
            Err(e) => break e,
        }
        assert!(t0.elapsed() < Duration::from_secs(9), "no error after 9 s");
    };
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(9), "error after {took:?}");
    let msg = err.to_string();
    assert!(msg.contains("the job exited"), "{msg}");
    assert!(
        msg.contains("killed by signal 9") || msg.contains("peer-lost"),
        "{msg}"
    );
    assert!(
        msg.contains("global-rank 2"),
        "diagnosis does not name the dead rank: {msg}"
    );
    // The same error again, at once; no rank left running.
    let again = s.submit().expect_err("after failure");
    assert!(again.to_string().contains("already failed"), "{again}");
    for pid in launcher_ranks {
        assert!(!pid_alive(pid), "rank pid {pid} still running");
    }
}

#[test]
fn session_bad_input_is_refused_with_a_clear_message() {
    let _serial = common::serial();
    let model = lockstep::model::DitConfig::preset("tiny").expect("tiny");
    let (t, c) = (model.text_tokens as u64, model.text_dim as u64);
    let bytes = vec![0u8; (t * c * 4) as usize];
    let e = Conditioning::from_tensor(&model, DType::F32, &[t, c + 1], &bytes).unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    assert!(e.to_string().contains("shape"), "{e}");
    let e = Conditioning::from_tensor(&model, DType::I32, &[t, c], &bytes).unwrap_err();
    assert!(e.to_string().contains("not a float type"), "{e}");
    let e = Conditioning::from_tensor(&model, DType::Bf16, &[t, c], &bytes).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = Conditioning::from_safetensors(&model, &common::tmp("missing.safetensors"), None)
        .unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    let junk = common::tmp("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").expect("write");
    let e = Conditioning::from_safetensors(&model, &junk, None).unwrap_err();
    assert!(e.to_string().contains("not safetensors"), "{e}");
    let _ = std::fs::remove_file(&junk);

    let mut cfg = config(GeneratorKind::Calibrated);
    cfg.run.preset = "no-such-preset".into();
    let e = Session::open(&cfg).err().expect("unknown preset");
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    let mut cfg = config(GeneratorKind::Calibrated);
    cfg.exe = Some(common::tmp("not-a-binary"));
    let e = Session::open(&cfg).err().expect("missing executable");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn session_opened_twice_on_one_port_fails_the_second_with_bad_input() {
    let Some(_serial) = common::start("session_twice") else {
        return;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let token = format!("session-test-{}", std::process::id());
    let join = Launch::Join {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        token: token.clone(),
    };
    let mut cfg = config(GeneratorKind::Calibrated);
    cfg.launch = join.clone();
    // The mesh ranks, started by "someone else" (here: this test) with the job's environment.
    let mesh: Vec<std::process::Child> = (1..=2)
        .map(|r| {
            std::process::Command::new(common::lockstep_bin())
                .args([
                    "run",
                    "--quiet",
                    "--generator",
                    "calibrated",
                    "--gen-cost-ms",
                    "2",
                ])
                .args(["--timeout", "4"])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "3")
                .env("LOCAL_RANK", r.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("LOCKSTEP_JOB_TOKEN", &token)
                .env("LOCKSTEP_DUMP_DIR", common::tmp("dumps"))
                .env_remove("LOCKSTEP_RUN_DIR")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("mesh rank")
        })
        .collect();
    let mut first = Session::open(&cfg).expect("first session");
    let t0 = Instant::now();
    let e = Session::open(&cfg)
        .err()
        .expect("second session on the same port");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(e.exit_code(), ExitCode::BadInput, "{e}");
    assert!(e.to_string().contains("cannot bind"), "{e}");
    // The first is untouched by it.
    assert!(matches!(first.submit().expect("submit"), Submit::Sent(_)));
    assert!(first.recv(Duration::from_secs(5)).expect("recv").is_some());
    first.close().expect("close");
    for mut m in mesh {
        let st = m.wait().expect("mesh rank exit");
        assert_eq!(st.code(), Some(0));
    }
}

#[test]
fn session_conditioning_from_a_safetensors_file_equals_the_same_tensor_given_directly() {
    let model = lockstep::model::DitConfig::preset("tiny").expect("tiny");
    let (t, c) = (model.text_tokens, model.text_dim);
    let vals: Vec<f32> = (0..t * c).map(|i| (i % 13) as f32 * 0.5).collect();
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![t, c], &bytes)
        .expect("view");
    let file = common::tmp("prompt.safetensors");
    safetensors::serialize_to_file([("text", view)], &None, &file).expect("save");
    let direct = Conditioning::from_tensor(&model, DType::F32, &[t as u64, c as u64], &bytes)
        .expect("tensor");
    let from_file = Conditioning::from_safetensors(&model, &file, None).expect("file");
    assert_eq!(direct, from_file);
    let named = Conditioning::from_safetensors(&model, &file, Some("text")).expect("named");
    assert_eq!(direct, named);
    let e = Conditioning::from_safetensors(&model, &file, Some("other")).unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::BadInput);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn session_dropped_without_close_leaves_no_rank_running() {
    let Some(_serial) = common::start("session_drop") else {
        return;
    };
    let mut s = Session::open(&config(GeneratorKind::Calibrated)).expect("open");
    fill(&mut s);
    let pids: Vec<u32> = (0..3).filter_map(|r| s.rank_pid(r)).collect();
    assert_eq!(pids.len(), 3, "every rank's pid");
    let t0 = Instant::now();
    drop(s);
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "drop took {:?}",
        t0.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pids {
        assert!(
            !pid_alive(p),
            "rank pid {p} still running after the session was dropped"
        );
    }
}
