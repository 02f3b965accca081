//! Session overhead per chunk (issue 11 target: ≤ 50 µs on the host plane): the same stream —
//! calibrated generator at zero cost, null decoder, D = 2 (`LOCKSTEP_BENCH_DEPTH`) — driven by
//! `lockstep run` (its fixed schedule is a session client on a thread of rank 0; before that
//! landed, its own loop `run_driver`) and by a `Session` client in this process, both ways it
//! can (submit until `Again` then `recv`: two round trips per chunk; `submit_and_recv`: one),
//! interleaved for `LOCKSTEP_BENCH_ROUNDS` rounds (default 5); the difference of the steady
//! periods is what the session adds per chunk (socket round trips, the client's copies), and
//! the CPU per chunk of every process says what it costs a loaded machine.
//! Ignored by default (a measurement, not a check): run with
//! `cargo test --release --test session_bench -- --ignored --nocapture`.
mod common;

use lockstep::pipeline::{GeneratorKind, RunArgs};
use lockstep::session::{Session, SessionConfig, Submit};
use std::process::Command;
use std::time::{Duration, Instant};

const CHUNKS: u64 = 2000;
const WARMUP: u64 = 200;

/// CPU time (user + system) of this thread and of every reaped descendant, µs.
fn cpu_us() -> (f64, f64) {
    let get = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid `who` and a writable rusage.
        unsafe { libc::getrusage(who, &mut r) };
        let t = |v: libc::timeval| v.tv_sec as f64 * 1e6 + v.tv_usec as f64;
        t(r.ru_utime) + t(r.ru_stime)
    };
    (get(libc::RUSAGE_THREAD), get(libc::RUSAGE_CHILDREN))
}

/// CPU µs per chunk spent between two `cpu_us` readings (this thread + the job's processes).
fn cpu_per_chunk(a: (f64, f64), b: (f64, f64)) -> f64 {
    ((b.0 - a.0) + (b.1 - a.1)) / CHUNKS as f64
}

fn run_period_us() -> (f64, f64) {
    let c0 = cpu_us();
    let metrics = common::tmp("metrics.json");
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--generator",
        "calibrated",
        "--gen-cost-ms",
        "0",
    ])
    .args(["--chunks", &CHUNKS.to_string()])
    .args(["--depth", &depth().to_string()])
    .arg("--metrics")
    .arg(&metrics);
    let out = common::bounded(cmd, "lockstep run", Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metrics).expect("metrics")).expect("json");
    let _ = std::fs::remove_file(&metrics);
    (
        m["period_ms"].as_f64().expect("period_ms") * 1e3,
        cpu_per_chunk(c0, cpu_us()),
    )
}

/// How the bench's client drives the stream.
#[derive(Clone, Copy, PartialEq)]
enum Loop {
    /// `submit` until `Again`, then `recv`: two round trips per chunk.
    SubmitThenRecv,
    /// `submit_and_recv`: one round trip per chunk.
    Combined,
}

fn config() -> SessionConfig {
    SessionConfig {
        run: RunArgs {
            generator: GeneratorKind::Calibrated,
            gen_cost_ms: 0.0,
            depth: depth(),
            quiet: true,
            ..RunArgs::default()
        },
        exe: Some(common::lockstep_bin()),
        ..SessionConfig::default()
    }
}

/// The steady period of a session stream (µs/chunk), its CPU per chunk (the client thread +
/// every rank process, whole run, µs) and the client thread's own CPU per chunk (µs).
fn session_period_us(how: Loop) -> (f64, f64, f64) {
    let c0 = cpu_us();
    let mut s = Session::open(&config()).expect("open");
    let (mut got, mut t_steady) = (0u64, None);
    let wait = Duration::from_secs(5);
    while got < CHUNKS {
        let out = match how {
            Loop::SubmitThenRecv => match s.submit().expect("submit") {
                Submit::Sent(_) => None,
                Submit::Again => Some(s.recv(wait).expect("recv").expect("result")),
            },
            Loop::Combined => s.submit_and_recv(wait).expect("submit_and_recv").1,
        };
        if out.is_some() {
            got += 1;
            if got == WARMUP {
                t_steady = Some(Instant::now());
            }
        }
    }
    let steady = t_steady.expect("warm-up done").elapsed();
    while s.recv(wait).expect("drain").is_some() {}
    s.close().expect("close");
    // The job's processes are reaped at close: their CPU counts from then.
    let c1 = cpu_us();
    (
        steady.as_secs_f64() * 1e6 / (CHUNKS - WARMUP) as f64,
        cpu_per_chunk(c0, c1),
        (c1.0 - c0.0) / CHUNKS as f64,
    )
}

/// The bare cost of one request, µs: a poll with nothing in flight is one socket round trip
/// and rank 0's dispatch, no driver work.
fn request_round_trip_us() -> f64 {
    let mut s = Session::open(&config()).expect("open");
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        assert!(s.recv(Duration::ZERO).expect("poll").is_none());
    }
    let rtt_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    s.close().expect("close");
    rtt_us
}

/// Queue depth D of every stream (`LOCKSTEP_BENCH_DEPTH`, default 2). With D = 1 nothing
/// overlaps: each chunk's period is the whole chain (send, mesh, result, decode, the client's
/// turn), so every µs the session adds shows in it, and the machine is less contended.
fn depth() -> usize {
    std::env::var("LOCKSTEP_BENCH_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn session_overhead_per_chunk_against_lockstep_run() {
    let _serial = common::serial();
    let rounds = std::env::var("LOCKSTEP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Per round: (lockstep run, submit+recv, submit_and_recv) × (period, CPU), the round trip
    // and the client thread's CPU per chunk in the two loops.
    let mut rows: Vec<[f64; 9]> = Vec::new();
    for _ in 0..rounds {
        // Interleaved, so a change in the machine's load hits all three alike.
        let (a, ca) = run_period_us();
        let (b, cb, kb) = session_period_us(Loop::SubmitThenRecv);
        let (c, cc, kc) = session_period_us(Loop::Combined);
        let rtt = request_round_trip_us();
        println!(
            "period µs/chunk: lockstep run {a:.1} | submit+recv {b:.1} ({:+.1}) | submit_and_recv \
             {c:.1} ({:+.1}); CPU µs/chunk: {ca:.1} | {cb:.1} ({:+.1}) | {cc:.1} ({:+.1}); \
             bare request round trip {rtt:.1} µs; client thread CPU µs/chunk {kb:.1} | {kc:.1}",
            b - a,
            c - a,
            cb - ca,
            cc - ca
        );
        rows.push([a, b, c, ca, cb, cc, rtt, kb, kc]);
    }
    let col = |f: &dyn Fn(&[f64; 9]) -> f64| median(rows.iter().map(f).collect());
    println!(
        "D = {}, median of {rounds}: session overhead per chunk (period): submit+recv {:.1} µs, \
         submit_and_recv {:.1} µs; (CPU): submit+recv {:.1} µs, submit_and_recv {:.1} µs; \
         request round trip {:.1} µs; client thread CPU per chunk: submit+recv {:.1} µs, \
         submit_and_recv {:.1} µs",
        depth(),
        col(&|r| r[1] - r[0]),
        col(&|r| r[2] - r[0]),
        col(&|r| r[4] - r[3]),
        col(&|r| r[5] - r[3]),
        col(&|r| r[6]),
        col(&|r| r[7]),
        col(&|r| r[8]),
    );
}

/// The two client loops within one session, alternating in short segments, so that a change
/// in the machine's load (other builds on a shared host) hits both alike: what one round trip
/// per chunk saves over two, without the noise of separate jobs.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn session_loops_compared_within_one_session() {
    let _serial = common::serial();
    const SEGMENT: u64 = 250;
    let segments = 2 * std::env::var("LOCKSTEP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(8);
    let mut s = Session::open(&config()).expect("open");
    let wait = Duration::from_secs(5);
    let (mut two, mut one) = (Vec::new(), Vec::new());
    for seg in 0..=segments {
        let how = if seg % 2 == 0 {
            Loop::SubmitThenRecv
        } else {
            Loop::Combined
        };
        let (mut got, t) = (0, Instant::now());
        while got < SEGMENT {
            let out = match how {
                Loop::SubmitThenRecv => match s.submit().expect("submit") {
                    Submit::Sent(_) => None,
                    Submit::Again => Some(s.recv(wait).expect("recv").expect("result")),
                },
                Loop::Combined => s.submit_and_recv(wait).expect("submit_and_recv").1,
            };
            got += u64::from(out.is_some());
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / SEGMENT as f64;
        // Segment 0 is the warm-up.
        if seg > 0 {
            match how {
                Loop::SubmitThenRecv => two.push(us),
                Loop::Combined => one.push(us),
            }
        }
    }
    while s.recv(wait).expect("drain").is_some() {}
    s.close().expect("close");
    let (a, b) = (median(two.clone()), median(one.clone()));
    println!(
        "D = {}, one session, {} segments of {SEGMENT} chunks each: submit+recv {a:.1} µs/chunk \
         (segments {two:.0?}), submit_and_recv {b:.1} µs/chunk (segments {one:.0?}): one round \
         trip fewer saves {:.1} µs/chunk",
        depth(),
        two.len() + one.len(),
        a - b
    );
}
