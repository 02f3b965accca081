//! Break-it tests B2, C2, D1–D3, E1–E3, F1–F3, G2, G3 (docs/spec.md §12) against `lockstep run`,
//! i.e. real rank processes (rank 0 + the mesh, launched by the protocol's launcher) on the data plane
//! `LOCKSTEP_BACKEND` names (`host` by default, in CI; `nccl` on a 2-GPU host: rank 0 → GPU 0, the
//! TP=2 mesh → GPU 1 and GPU 0; the ranks inherit the variable, and every clean run's metrics must
//! name that plane). With `nccl` and no 2 GPUs / no usable NCCL every test prints `SKIP <test>: …`
//! and returns. E1 and E2 skip only on nccl (they say why).
//! Each asserts the exit code and the diagnosis — the failing rank's own line
//! `lockstep[global-rank R]: exit N (name): …` — and ends in bounded time (a run that outlives its
//! bound is killed and the test fails).
mod common;

use serde_json::Value;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

struct Run {
    code: i32,
    stderr: String,
    metrics: Option<Value>,
}

/// Runs `lockstep run --quiet <args>` with `LOCKSTEP_FAULT=fault`, bounded by `bound`.
fn run(name: &str, args: &[&str], fault: Option<&str>, bound: Duration) -> Run {
    run_env(name, args, fault, &[], bound)
}

/// [`run`] with extra environment for every rank.
fn run_env(
    name: &str,
    args: &[&str],
    fault: Option<&str>,
    env: &[(&str, &str)],
    bound: Duration,
) -> Run {
    let metrics = common::tmp(&format!("{name}.json"));
    let _ = std::fs::remove_file(&metrics);
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.arg("run")
        .arg("--quiet")
        .args(args)
        .arg("--metrics")
        .arg(&metrics);
    let dumps = common::tmp(&format!("{name}-dumps"));
    let _ = std::fs::remove_dir_all(&dumps);
    cmd.env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_DUMP_DIR", dumps)
        .envs(env.iter().copied());
    if let Some(f) = fault {
        cmd.env("LOCKSTEP_FAULT", f);
    }
    let out = common::bounded(cmd, &format!("{name}: lockstep run"), bound);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let metrics: Option<Value> = std::fs::read(&metrics)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(m) = &metrics {
        // The run really used the backend under test (the ranks inherit LOCKSTEP_BACKEND).
        let want = format!("data plane {}, lane ", common::backend());
        assert!(
            m["generator"].as_str().is_some_and(|g| g.contains(&want)),
            "{name}: metrics do not name {want:?}: {}",
            m["generator"]
        );
    }
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr,
        metrics,
    }
}

const FAST: &[&str] = &[
    "--generator",
    "calibrated",
    "--gen-cost-ms",
    "1",
    "--timeout",
    "5",
];
const BOUND: Duration = Duration::from_secs(10);

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

/// A rank's flight-recorder dump of a [`run`] named `name`.
fn dump(name: &str, rank: u32) -> String {
    std::fs::read_to_string(
        common::tmp(&format!("{name}-dumps")).join(format!("rank-{rank}.jsonl")),
    )
    .unwrap_or_default()
}

/// A crash case of the common shape: `lockstep run` (the fast calibrated arguments plus `args`)
/// with a fault, then the run's exit code, the diagnosis lines stderr must contain (the failing
/// rank's own `lockstep[global-rank R]: exit N (name): …` line first), and what it must not.
struct Case {
    args: &'static [&'static str],
    /// `LOCKSTEP_FAULT` for every rank.
    fault: &'static str,
    code: i32,
    diagnosis: &'static [&'static str],
    /// Text stderr must not contain (`watchdog`: it ended by the check, not by a timeout).
    absent: &'static [&'static str],
}

const CASE: Case = Case {
    args: &[],
    fault: "",
    code: 0,
    diagnosis: &[],
    absent: &[],
};

/// The one driver of the table's cases: skips (with the reason) where the backend cannot run,
/// else runs, asserts, and returns the run for any case-specific check. The run's dumps are
/// [`dump`]`(test, rank)`.
fn breakit(test: &str, case: Case) -> Option<Run> {
    let _serial = common::start(test)?;
    let r = run(test, &args(case.args), Some(case.fault), BOUND);
    assert_eq!(
        r.code, case.code,
        "{test}: exit code; stderr:\n{}",
        r.stderr
    );
    for d in case.diagnosis {
        assert!(
            r.stderr.contains(d),
            "{test}: missing {d:?} in stderr:\n{}",
            r.stderr
        );
    }
    for a in case.absent {
        assert!(
            !r.stderr.contains(a),
            "{test}: stderr contains {a:?}:\n{}",
            r.stderr
        );
    }
    Some(r)
}

/// One `#[test]` per row, named by its SPEC id (`docs/spec.md §12`), so a failure names the case.
macro_rules! breakit_cases {
    ($($(#[$doc:meta])* fn $test:ident() = $case:expr;)*) => {$(
        $(#[$doc])*
        #[test]
        fn $test() {
            breakit(stringify!($test), $case);
        }
    )*};
}

breakit_cases! {
    /// B2: one call fewer than the plan (a denoising step left out) is caught before the
    /// chunk-end collective (tiny preset: 4 denoising steps + the clean pass = 5 calls a chunk).
    fn b2_plan_missing_generator_call_crashes_before_chunk_end() = Case {
        args: &["--chunks", "4"],
        fault: "pipeline.skip_generator_call@2#1",
        code: 70,
        diagnosis: &["lockstep[global-rank 2]: exit 70 (invariant-violation): invariant violated: plan \
             mismatch: plan says 5 generator calls, this rank made 4 (checked before the \
             chunk-end collective)"],
        absent: &["watchdog"],
    };
    /// D3: rank 0 sends an INFER with an older call_id: the leader crashes at once.
    fn d3_call_id_regression_crashes_receiver_immediately() = Case {
        args: &["--chunks", "8"],
        fault: "pipeline.call_id_regression@0#4",
        code: 70,
        diagnosis: &[
            "lockstep[global-rank 1]: exit 70 (invariant-violation): invariant violated: call_id \
             regression: got call_id ",
            "launch: failed: global-rank 1 exit 70",
        ],
        ..CASE
    };
    /// F1: recompute planned without `context_frames_override`: Stage 0's preflight refuses it.
    fn f1_recompute_without_override_fails_before_send() = Case {
        args: &["--chunks", "6", "--recompute-every", "2"],
        fault: "pipeline.omit_override",
        code: 74,
        diagnosis: &[
            "lockstep[global-rank 0]: exit 74 (bad-input): preflight rejected envelope (nothing \
             was sent)",
            "context_frames_override is missing: it is required, never a fallback",
        ],
        ..CASE
    };
    /// F1: the same envelope past a skipped Stage 0 check: the mesh leader refuses it before any
    /// collective. Only the first recompute chunk (chunk 2, the 3rd envelope) omits the override
    /// and skips Stage 0's preflight, so the leader is the one that refuses.
    fn f1_mesh_leader_refuses_missing_override_before_any_collective() = Case {
        args: &["--chunks", "6", "--recompute-every", "2"],
        fault: "pipeline.omit_override#1,pipeline.skip_preflight#3",
        code: 74,
        diagnosis: &[
            "lockstep[global-rank 1]: exit 74 (bad-input)",
            "required, never a fallback",
        ],
        ..CASE
    };
    /// F3: one mesh rank evicts a cache frame outside the plan: the state digest trips at the
    /// end of that chunk.
    fn f3_out_of_band_cache_mutation_trips_digest_within_one_chunk() = Case {
        args: &["--chunks", "8"],
        fault: "pipeline.cache_out_of_band@2#4",
        code: 70,
        diagnosis: &[
            "state digest drift across the mesh after chunk_index 3 cache_epoch 0",
            "cache_len_frames: group-rank 0=9 group-rank 1=8",
        ],
        ..CASE
    };
    /// G2: one mesh rank captures an extra step graph: caught in warm-up, before any INFER is
    /// generated.
    fn g2_graph_set_skew_fails_in_warmup_not_in_production() = Case {
        args: &["--chunks", "4"],
        fault: "pipeline.graph_set_skew@2",
        code: 70,
        diagnosis: &[
            "captured step-graph sets differ in warm-up (before the first INFER)",
            "group-rank 1: 7 graphs",
        ],
        absent: &["generate"],
    };
}

/// B2: one call more than the plan is caught before it is issued; the failure reaches every
/// rank: each dumps and exits 77 naming the origin.
#[test]
fn b2_plan_extra_generator_call_crashes_before_collective() {
    let test = "b2_plan_extra_generator_call_crashes_before_collective";
    let Some(_) = breakit(
        test,
        Case {
            args: &["--chunks", "4"],
            fault: "pipeline.extra_generator_call@2",
            code: 70,
            diagnosis: &[
                "lockstep[global-rank 2]: exit 70 (invariant-violation): invariant violated: plan \
                 mismatch: plan says 5 generator calls, this rank is about to make call 6 (stopped \
                 before issuing it)",
                "lockstep[global-rank 0]: exit 77 (peer-failed): peer failed: global-rank 2 \
                 failed with exit 70",
                "lockstep[global-rank 1]: exit 77 (peer-failed): peer failed: global-rank 2 \
                 failed with exit 70",
            ],
            absent: &["watchdog"],
        },
    ) else {
        return;
    };
    for rank in [0, 1] {
        assert!(
            !dump(test, rank).is_empty(),
            "global-rank {rank} left no dump"
        );
    }
}

/// G3: rank 2 expects one frame (64 tokens) more than the envelope and its plan carry: envelope
/// validation catches it before any forward.
#[test]
fn g3_shape_skew_caught_before_forward() {
    let test = "g3_shape_skew_caught_before_forward";
    let Some(_) = breakit(
        test,
        Case {
            args: &["--chunks", "4"],
            fault: "pipeline.shape_skew@2",
            code: 70,
            diagnosis: &["lockstep[global-rank 2]: exit 70 (invariant-violation): invariant violated: shape \
                 skew caught by envelope validation before any forward: tensor `noise` has shape \
                 [192, 64] (plan says [192, 64]), this rank expects [256, 64]"],
            ..CASE
        },
    ) else {
        return;
    };
    let d = dump(test, 2);
    assert!(!d.is_empty(), "rank 2 left no dump");
    assert!(!d.contains("\"phase\":\"generate\""), "a forward ran:\n{d}");
}

#[test]
fn d1_duplicate_envelope_is_dropped_and_output_emitted_once() {
    let Some(_serial) = common::start("d1_duplicate_envelope_is_dropped_and_output_emitted_once")
    else {
        return;
    };
    let r = run(
        "d1",
        &args(&["--chunks", "6"]),
        Some("pipeline.dup_envelope@0#3"),
        BOUND,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The mesh leader's acceptance (the protocol's) drops it; NOOP heartbeats share the call_id
    // sequence, so the exact id is not fixed.
    assert!(
        r.stderr
            .contains("lockstep[global-rank 1]: dropped duplicate envelope call_id ")
            && r.stderr.contains(" cache_epoch 0 (payload drained)"),
        "{}",
        r.stderr
    );
    let m = r.metrics.expect("metrics");
    assert_eq!(m["duplicates_dropped"], 1);
    let emitted = common::epoch_chunk_pairs(&m, "emitted");
    assert_eq!(emitted.len(), 6);
    assert_eq!(
        emitted.iter().collect::<HashSet<_>>().len(),
        6,
        "each output once"
    );
}

#[test]
fn d2_result_delayed_past_hard_cut_is_dropped_never_decoded() {
    let Some(_serial) = common::start("d2_result_delayed_past_hard_cut_is_dropped_never_decoded")
    else {
        return;
    };
    // The 3rd result (chunk 2) is held by the mesh leader until the next envelope arrives; a
    // hard cut happens right after chunk 2 is sent, so it comes back from a dead epoch.
    let r = run(
        "d2",
        &args(&["--chunks", "8", "--hard-cut-every", "3"]),
        Some("pipeline.delay_result@1#3"),
        BOUND,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "lockstep[global-rank 0]: dropped stale result chunk_index 2 cache_epoch 0 (current \
             cache_epoch 1)"
        ),
        "{}",
        r.stderr
    );
    let m = r.metrics.expect("metrics");
    let stale = common::epoch_chunk_pairs(&m, "stale");
    let emitted = common::epoch_chunk_pairs(&m, "emitted");
    assert!(stale.contains(&(0, 2)), "{stale:?}");
    assert!(
        !emitted.contains(&(0, 2)),
        "stale result was decoded: {emitted:?}"
    );
    assert!(emitted.iter().all(|e| !stale.contains(e)));
}

#[test]
fn e1_backpressure_disabled_queue_grows_bounded_when_enabled() {
    let _serial = common::serial();
    if common::skip_on_nccl(
        "e1_backpressure_disabled_queue_grows_bounded_when_enabled",
        "Stage 0's queueing policy is host-side and identical on every data plane; its 2-4 \
             full runs would spend the short device budget on communicator setup",
    ) {
        return;
    }
    let slow_decode = [
        "--chunks",
        "30",
        "--decoder-cost-ms",
        "8",
        "--recompute-every",
        "0",
    ];
    let off = run(
        "e1-off",
        &args(&[&slow_decode[..], &["--no-backpressure"]].concat()),
        None,
        BOUND,
    );
    let on = run("e1-on", &args(&slow_decode), None, BOUND);
    assert_eq!(off.code, 0, "{}", off.stderr);
    assert_eq!(on.code, 0, "{}", on.stderr);
    let (mo, mn) = (off.metrics.expect("metrics"), on.metrics.expect("metrics"));
    let (grown, bounded) = (
        mo["max_ready"].as_u64().unwrap_or(0),
        mn["max_ready"].as_u64().unwrap_or(99),
    );
    println!(
        "E1: decode queue high-water mark: backpressure off {grown}, on {bounded} (D_out = 2)"
    );
    // 30 chunks, decode (8 ms) a little slower than the mesh: without backpressure Stage 0
    // takes every result as soon as the mesh has it, so the backlog grows with the run (≥ 3 ×
    // D_out here, ~the chunk count) instead of staying at D_out.
    assert!(
        grown >= 6,
        "without backpressure the decode queue should grow, got {grown}"
    );
    assert!(
        bounded <= 2,
        "with backpressure the decode queue is bounded by D_out, got {bounded}"
    );
}

#[test]
fn e2_depth_sweep_d1_collapses_overlap_d2_is_stable() {
    let _serial = common::serial();
    if common::skip_on_nccl(
        "e2_depth_sweep_d1_collapses_overlap_d2_is_stable",
        "Stage 0's queueing policy is host-side and identical on every data plane; its 2-4 \
             full runs would spend the short device budget on communicator setup",
    ) {
        return;
    }
    // S1 = 5 calls × 5 ms (waited out like device time), S0 = 25 ms busy decode: equal stages,
    // so serial execution gives period ≈ 50 ms (η ≈ 0) and overlap gives ≈ 25 ms (η ≈ 1).
    let mut table = Vec::new();
    for d in ["1", "2", "3", "4"] {
        let r = run(
            &format!("e2-{d}"),
            &[
                "--generator",
                "calibrated",
                "--gen-cost-ms",
                "5",
                "--decoder-cost-ms",
                "25",
                "--chunks",
                "16",
                "--tp",
                "1",
                "--recompute-every",
                "0",
                "--depth",
                d,
                "--timeout",
                "5",
            ],
            None,
            BOUND,
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let m = r.metrics.expect("metrics");
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        table.push((d, f("s0_ms"), f("s1_ms"), f("period_ms"), f("e"), f("eta")));
    }
    println!("E2 depth sweep:\n  D   S0 ms   S1 ms   period ms   E      η");
    for (d, s0, s1, p, e, eta) in &table {
        println!("  {d}  {s0:6.1}  {s1:6.1}  {p:8.1}   {e:.3}  {eta:.3}");
    }
    let (_, _, _, _, _, eta1) = table[0];
    let (_, _, _, _, e2, eta2) = table[1];
    assert!(eta1 < 0.35, "D=1 must collapse overlap, η = {eta1}");
    assert!(
        eta2 > 0.6 && e2 > 0.75,
        "D=2 must overlap stably, E = {e2}, η = {eta2}"
    );
}

#[test]
fn e3_stage1_slowed_stage0_blocks_bounded_without_accumulating() {
    let Some(_serial) =
        common::start("e3_stage1_slowed_stage0_blocks_bounded_without_accumulating")
    else {
        return;
    };
    let r = run(
        "e3",
        &[
            "--generator",
            "calibrated",
            "--gen-cost-ms",
            "6",
            "--chunks",
            "10",
            "--timeout",
            "5",
            "--recompute-every",
            "0",
        ],
        None,
        BOUND,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = r.metrics.expect("metrics");
    assert!(m["max_in_flight"].as_u64() <= Some(2), "{m}");
    assert!(m["max_ready"].as_u64() <= Some(2), "{m}");
    // Slowed beyond the wait bound: Stage 0 gives up with a diagnosis instead of waiting forever.
    let r = run(
        "e3-stuck",
        &[
            "--generator",
            "calibrated",
            "--gen-cost-ms",
            "3000",
            "--chunks",
            "2",
            "--timeout",
            "0.5",
            "--heartbeat-ms",
            "100",
        ],
        None,
        BOUND,
    );
    assert_eq!(r.code, 71, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "lockstep[global-rank 0]: exit 71 (watchdog-timeout): timed out: stage 0 waited 500ms \
             for a RESULT (expected_next call_id 1,"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn f2_stale_epoch_results_after_hard_cuts_are_refused_in_a_run() {
    let Some(_serial) =
        common::start("f2_stale_epoch_results_after_hard_cuts_are_refused_in_a_run")
    else {
        return;
    };
    let r = run(
        "f2",
        &args(&["--chunks", "9", "--hard-cut-every", "3"]),
        None,
        BOUND,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = r.metrics.expect("metrics");
    let stale = common::epoch_chunk_pairs(&m, "stale");
    let emitted = common::epoch_chunk_pairs(&m, "emitted");
    assert_eq!(m["hard_cuts"], 2);
    assert!(
        !stale.is_empty(),
        "every hard cut leaves a result in flight"
    );
    assert!(
        emitted.iter().all(|e| !stale.contains(e)),
        "a stale result was decoded"
    );
    assert!(r.stderr.contains("dropped stale result"), "{}", r.stderr);
}

/// C2: rank 0 SIGKILLs itself after the INFER header and the first half of its payload (none of
/// the one `noise` tensor); the mesh leader, inside the pipeline's receive, is told by the
/// control plane at once (exit 72, naming how far the payload got). The second INFER (call_id 2)
/// at depth 1 is the one: rank 0 sends it only after the first RESULT, so the leader is already
/// waiting for it (the first can arrive while the leader is still in warm-up, before any receive
/// exists to interrupt); heartbeats at 1 s keep NOOPs out of the call_id sequence.
fn c2_case(name: &str, env: &[(&str, &str)]) {
    let r = run_env(
        name,
        &args(&["--chunks", "4", "--depth", "1", "--heartbeat-ms", "1000"]),
        Some("send.kill_mid_payload@0#2"),
        env,
        BOUND,
    );
    assert_eq!(r.code, 137, "{}", r.stderr);
    for needle in [
        "launch: global-rank 0 killed by signal 9 (SIGKILL)",
        "global-rank 1]: exit 72 (peer-lost): peer lost: global-rank 0 (driver)",
        "(receiving the payload of INFER call_id 2: 0 of 1 tensors complete)",
    ] {
        assert!(
            r.stderr.contains(needle),
            "missing {needle:?}:\n{}",
            r.stderr
        );
    }
}

#[test]
fn c2_sender_killed_mid_payload_detected_by_receiver() {
    let Some(_serial) = common::start("c2_sender_killed_mid_payload_detected_by_receiver") else {
        return;
    };
    c2_case("c2", &[]);
}

#[test]
fn c2_tcp_lane_sender_killed_mid_payload_detected_by_receiver() {
    let Some(_serial) = common::start("c2_tcp_lane_sender_killed_mid_payload_detected_by_receiver")
    else {
        return;
    };
    // The same C2 with the envelope lane forced onto TCP (shared memory is the default on one
    // host): the header travels on the socket itself, and its EOF is the death notice.
    c2_case("c2tcp", &[("LOCKSTEP_LANE", "tcp")]);
}
