//! Session overhead per chunk (issue 11 target: ≤ 50 µs on the host plane): the same stream —
//! calibrated generator at zero cost, null decoder, D = 2 — driven by `lockstep run`'s own
//! schedule (`run_driver`) and by a `Session` client; the difference of their steady periods is
//! what the session adds per chunk (its socket round trips and the client's copies).
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
            quiet: true,
            ..RunArgs::default()
        },
        exe: Some(common::lockstep_bin()),
        ..SessionConfig::default()
    }
}

/// The steady period of a session stream (µs/chunk) and its CPU per chunk (the client thread +
/// every rank process, whole run, µs).
fn session_period_us(how: Loop) -> (f64, f64) {
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
    (
        steady.as_secs_f64() * 1e6 / (CHUNKS - WARMUP) as f64,
        cpu_per_chunk(c0, cpu_us()),
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn session_overhead_per_chunk_against_run_driver() {
    let _serial = common::serial();
    let rounds = std::env::var("LOCKSTEP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Per round: (run_driver, submit+recv, submit_and_recv) × (period, CPU) and the round trip.
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for _ in 0..rounds {
        // Interleaved, so a change in the machine's load hits all three alike.
        let (a, ca) = run_period_us();
        let (b, cb) = session_period_us(Loop::SubmitThenRecv);
        let (c, cc) = session_period_us(Loop::Combined);
        let rtt = request_round_trip_us();
        println!(
            "period µs/chunk: run_driver {a:.1} | submit+recv {b:.1} ({:+.1}) | submit_and_recv \
             {c:.1} ({:+.1}); CPU µs/chunk: {ca:.1} | {cb:.1} ({:+.1}) | {cc:.1} ({:+.1}); \
             bare request round trip {rtt:.1} µs",
            b - a,
            c - a,
            cb - ca,
            cc - ca
        );
        rows.push([a, b, c, ca, cb, cc, rtt]);
    }
    let col = |f: &dyn Fn(&[f64; 7]) -> f64| median(rows.iter().map(f).collect());
    println!(
        "median of {rounds}: session overhead per chunk (period): submit+recv {:.1} µs, \
         submit_and_recv {:.1} µs; (CPU): submit+recv {:.1} µs, submit_and_recv {:.1} µs; \
         request round trip {:.1} µs",
        col(&|r| r[1] - r[0]),
        col(&|r| r[2] - r[0]),
        col(&|r| r[4] - r[3]),
        col(&|r| r[5] - r[3]),
        col(&|r| r[6]),
    );
}
