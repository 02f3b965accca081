//! Soak (bounded): 500 small chunks through `lockstep run` with hard cuts every 7 chunks of an
//! epoch and pseudo-random duplicate envelopes and delayed results injected. Asserts every
//! (epoch, chunk) output is emitted exactly once, nothing stale is decoded, every chunk is
//! accounted for (emitted, dropped stale, or flushed by a cut), both queues stay bounded, and the
//! run ends by drain with exit 0.
mod common;

use serde_json::Value;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

#[test]
fn soak_500_chunks_with_cuts_duplicates_and_delays_emits_each_output_once() {
    let _serial = common::serial();
    // Fixed-seed pseudo-random fault positions (reproducible).
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        1 + s % m
    };
    let mut faults = Vec::new();
    for _ in 0..8 {
        faults.push(format!("pipeline.dup_envelope@0#{}", next(480)));
        faults.push(format!("pipeline.delay_result@1#{}", next(300)));
    }
    let metrics = common::tmp("metrics.json");
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--chunks",
        "500",
        "--generator",
        "calibrated",
        "--gen-cost-ms",
        "0",
        "--depth",
        "3",
        "--hard-cut-every",
        "7",
        "--recompute-every",
        "3",
        "--timeout",
        "10",
        "--heartbeat-ms",
        "20",
    ])
    .arg("--metrics")
    .arg(&metrics)
    .env("LOCKSTEP_FAULT", faults.join(","));
    let out = common::bounded(cmd, "soak", Duration::from_secs(50));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let m: Value =
        serde_json::from_slice(&std::fs::read(&metrics).expect("metrics")).expect("json");
    let (emitted, stale) = (
        common::epoch_chunk_pairs(&m, "emitted"),
        common::epoch_chunk_pairs(&m, "stale"),
    );
    let unique: HashSet<_> = emitted.iter().collect();
    assert_eq!(unique.len(), emitted.len(), "an output was emitted twice");
    assert!(
        emitted.iter().all(|e| !stale.contains(e)),
        "a stale result was decoded"
    );
    // Emitted in order: chunk indices strictly increase, epochs never go back.
    assert!(emitted
        .windows(2)
        .all(|w| w[0].1 < w[1].1 && w[0].0 <= w[1].0));
    let flushed = m["flushed_undecoded"].as_u64().unwrap_or(0);
    assert_eq!(
        emitted.len() as u64 + stale.len() as u64 + flushed,
        500,
        "{m}"
    );
    assert!(m["hard_cuts"].as_u64() >= Some(60), "{m}");
    assert!(m["duplicates_dropped"].as_u64() >= Some(1), "{m}");
    assert!(m["max_in_flight"].as_u64() <= Some(3), "{m}");
    assert!(m["max_ready"].as_u64() <= Some(3), "{m}");
    println!(
        "soak: emitted {}, stale dropped {}, flushed {flushed}, duplicates dropped {}, hard cuts {}, wall {} s",
        emitted.len(),
        stale.len(),
        m["duplicates_dropped"],
        m["hard_cuts"],
        m["wall_s"]
    );
}
