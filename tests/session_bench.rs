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

const CHUNKS: u64 = 3000;
const WARMUP: u64 = 300;

fn run_period_us() -> f64 {
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
    m["period_ms"].as_f64().expect("period_ms") * 1e3
}

fn session_period_us() -> (f64, f64, f64) {
    let cfg = SessionConfig {
        run: RunArgs {
            generator: GeneratorKind::Calibrated,
            gen_cost_ms: 0.0,
            quiet: true,
            ..RunArgs::default()
        },
        exe: Some(common::lockstep_bin()),
        ..SessionConfig::default()
    };
    let mut s = Session::open(&cfg).expect("open");
    let (mut got, mut t_steady) = (0u64, None);
    let (mut submit_ns, mut submits) = (0u128, 0u64);
    while got < CHUNKS {
        let t = Instant::now();
        let r = s.submit().expect("submit");
        submit_ns += t.elapsed().as_nanos();
        submits += 1;
        if let Submit::Again = r {
            s.recv(Duration::from_secs(5))
                .expect("recv")
                .expect("result");
            got += 1;
            if got == WARMUP {
                t_steady = Some(Instant::now());
            }
        }
    }
    let steady = t_steady.expect("warm-up done").elapsed();
    // Drain, then the bare cost of one request: a poll with nothing in flight is one socket
    // round trip and rank 0's dispatch, no driver work.
    while s.recv(Duration::from_secs(5)).expect("drain").is_some() {}
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        assert!(s.recv(Duration::ZERO).expect("poll").is_none());
    }
    let rtt_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    s.close().expect("close");
    (
        steady.as_secs_f64() * 1e6 / (CHUNKS - WARMUP) as f64,
        submit_ns as f64 / submits as f64 / 1e3,
        rtt_us,
    )
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn session_overhead_per_chunk_against_run_driver() {
    let _serial = common::serial();
    let mut rows = Vec::new();
    for _ in 0..3 {
        let a = run_period_us();
        let (b, submit_us, rtt) = session_period_us();
        rows.push((a, b, rtt));
        println!(
            "run_driver period {a:.1} µs/chunk, session period {b:.1} µs/chunk, \
             difference {:.1} µs/chunk (mean submit call {submit_us:.1} µs); \
             one request round trip {rtt:.1} µs",
            b - a
        );
    }
    rows.sort_by(|x, y| (x.1 - x.0).total_cmp(&(y.1 - y.0)));
    let (a, b, _) = rows[1];
    rows.sort_by(|x, y| x.2.total_cmp(&y.2));
    println!(
        "median of 3: period difference {:.1} µs/chunk; request round trip {:.1} µs \
         (a chunk costs two: submit + recv)",
        b - a,
        rows[1].2
    );
}
