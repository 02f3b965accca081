//! `lockstep run --trace` and NVTX end to end over real rank processes (`crate::spans`,
//! `docs/manual/tracing.md`): every generator call the plans name is a span on each mesh rank's
//! track, with its args and its collectives nested inside it (TP=2; none at TP=1), and with NVTX
//! on, the ranges a stand-in `libnvToolsExt` receives are exactly the trace's spans.
mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// One `lockstep run --trace --metrics` on the tiny preset; returns (trace, metrics, stderr).
fn traced_run(
    name: &str,
    tp: u32,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> (Value, Value, String) {
    let (trace, metrics) = (
        common::fresh_tmp(&format!("{name}-trace.json")),
        common::fresh_tmp(&format!("{name}-metrics.json")),
    );
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet", "--tp", &tp.to_string()])
        .args(extra)
        .arg("--trace")
        .arg(&trace)
        .arg("--metrics")
        .arg(&metrics)
        .env_remove("LOCKSTEP_FAULT")
        .env_remove("LOCKSTEP_NVTX")
        .env_remove("LOCKSTEP_NVTX_LIB")
        .env_remove("NSYS_PROFILING_SESSION_ID")
        .env("LOCKSTEP_DUMP_DIR", common::tmp("dumps"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::bounded(cmd, "lockstep run", Duration::from_secs(60));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    // The summary ends its throughput lines with the video frame rate.
    assert!(stdout.contains("video frames/s"), "{stdout}");
    let read = |p: &PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(p).expect("output file")).expect("json")
    };
    (read(&trace), read(&metrics), stderr)
}

/// The complete events of one rank (pid = global rank).
fn spans_of(trace: &Value, pid: u64) -> Vec<Value> {
    trace["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X" && e["pid"].as_u64() == Some(pid))
        .cloned()
        .collect()
}

fn is_gen(e: &Value) -> bool {
    !e["args"]["kind"].is_null()
}
fn is_collective(e: &Value) -> bool {
    !e["args"]["op"].is_null()
}
fn f(e: &Value, k: &str) -> f64 {
    e[k].as_f64().unwrap_or(f64::NAN)
}
/// `inner` lies inside `outer` on the same track (what makes Perfetto draw it nested).
fn nested(inner: &Value, outer: &Value) -> bool {
    inner["tid"] == outer["tid"]
        && f(inner, "ts") >= f(outer, "ts")
        && f(inner, "ts") + f(inner, "dur") <= f(outer, "ts") + f(outer, "dur") + 1e-3
}
fn u(e: &Value, k: &str) -> u64 {
    e["args"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("span without args.{k}: {e}"))
}

#[test]
fn run_trace_has_each_generator_call_per_mesh_rank_with_its_collectives_nested() {
    let test = "run_trace_has_each_generator_call_per_mesh_rank_with_its_collectives_nested";
    let Some(_serial) = common::start(test) else {
        return;
    };
    let cfg = lockstep::model::DitConfig::tiny();
    let chunks = 6u64;
    let (trace, m, _) = traced_run(
        "tp2",
        2,
        &[
            "--chunks",
            "6",
            "--recompute-every",
            "2",
            "--hard-cut-every",
            "4",
        ],
        &[],
    );
    // What the plans named (rank 0 counts every INFER's expected_generator_calls): one denoise
    // call per timestep and one clean call per chunk, plus the recomputes the plans scheduled.
    let (calls, recomputes) = (
        m["generator_calls"].as_u64().expect("generator_calls"),
        m["recompute_calls"].as_u64().expect("recompute_calls"),
    );
    let per_chunk = cfg.denoise_timesteps.len() as u64 + 1;
    assert_eq!(calls, chunks * per_chunk + recomputes, "{m}");
    assert!(
        recomputes > 0,
        "the run should recompute at least once: {m}"
    );
    let mut collective_names = Vec::new();
    for pid in [1, 2] {
        let ev = spans_of(&trace, pid);
        let gens: Vec<&Value> = ev.iter().filter(|e| is_gen(e)).collect();
        assert_eq!(
            gens.len() as u64,
            calls,
            "global-rank {pid}: one span per call"
        );
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_chunk_calls: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
        for g in &gens {
            let kind = g["args"]["kind"].as_str().expect("kind").to_string();
            let (t, frames) = (u(g, "t"), u(g, "frames"));
            assert_eq!(
                g["name"],
                format!("gen {kind} t={t} frames={frames}"),
                "{g}"
            );
            if kind == "denoise" {
                assert!(cfg.denoise_timesteps.contains(&(t as u32)), "{g}");
                assert_eq!(frames, cfg.frames_per_chunk as u64, "{g}");
            } else {
                assert_eq!(t, 0, "{g}");
            }
            *by_kind.entry(kind).or_default() += 1;
            per_chunk_calls
                .entry((u(g, "epoch"), u(g, "chunk")))
                .or_default()
                .push(u(g, "call"));
            assert!(u(g, "call") <= u(g, "of"), "{g}");
            // TP=2: the call's all-reduces are inside it, on the same track.
            let inside = ev
                .iter()
                .filter(|c| is_collective(c) && nested(c, g))
                .count();
            assert!(inside > 0, "global-rank {pid}: no collective inside {g}");
        }
        assert_eq!(
            by_kind,
            BTreeMap::from([
                ("clean".to_string(), chunks),
                (
                    "denoise".to_string(),
                    chunks * cfg.denoise_timesteps.len() as u64
                ),
                ("recompute".to_string(), recomputes),
            ]),
            "global-rank {pid}"
        );
        // Every chunk the mesh ran, and each call numbered 1..=of exactly once.
        assert_eq!(per_chunk_calls.len() as u64, chunks, "{per_chunk_calls:?}");
        for (ids, mut n) in per_chunk_calls {
            n.sort_unstable();
            assert_eq!(n, (1..=n.len() as u64).collect::<Vec<_>>(), "chunk {ids:?}");
        }
        // Generator calls sit inside their chunk's `generate` span.
        for g in &gens {
            assert!(
                ev.iter().any(|c| c["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("generate "))
                    && c["args"]["chunk"] == g["args"]["chunk"]
                    && nested(g, c)),
                "global-rank {pid}: {g} outside its generate span"
            );
        }
        let names: Vec<String> = ev
            .iter()
            .filter(|e| is_collective(e))
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert!(
            names.iter().all(|n| n.ends_with(" B")
                && (n.starts_with("all_reduce f32 ") || n.starts_with("all_gather u64 "))),
            "{names:?}"
        );
        collective_names.push((ev, names));
    }
    // Lockstep: both mesh ranks issued the same collectives, in the same order.
    let order = |(ev, names): &(Vec<Value>, Vec<String>)| -> Vec<String> {
        let mut v: Vec<(f64, &String)> = ev
            .iter()
            .filter(|e| is_collective(e))
            .map(|e| f(e, "ts"))
            .zip(names)
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.into_iter().map(|(_, n)| n.clone()).collect()
    };
    assert_eq!(order(&collective_names[0]), order(&collective_names[1]));
    // Rank 0 runs no generator and no TP collective.
    assert!(spans_of(&trace, 0)
        .iter()
        .all(|e| !is_gen(e) && !is_collective(e)));

    // TP=1: the same generator calls, and no collective spans at all (a group of one moves
    // nothing).
    let (trace, m, _) = traced_run("tp1", 1, &["--chunks", "3"], &[]);
    let ev = spans_of(&trace, 1);
    assert_eq!(
        ev.iter().filter(|e| is_gen(e)).count() as u64,
        m["generator_calls"].as_u64().expect("generator_calls")
    );
    assert!(ev.iter().filter(|e| is_gen(e)).count() >= 3 * 5);
    let all: Vec<Value> = (0..2).flat_map(|p| spans_of(&trace, p)).collect();
    assert!(!all.iter().any(is_collective), "TP=1 made collective spans");
}

/// A stand-in `libnvToolsExt`: each push and pop appended to `$LOCKSTEP_TEST_NVTX_LOG.<RANK>`.
const NVTX_SHIM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
static FILE *out(void) {
    static FILE *f;
    if (!f) {
        char path[4096];
        const char *p = getenv("LOCKSTEP_TEST_NVTX_LOG"), *r = getenv("RANK");
        snprintf(path, sizeof path, "%s.%s", p ? p : "/dev/null", r ? r : "x");
        f = fopen(path, "w");
    }
    return f;
}
int nvtxRangePushA(const char *message) {
    FILE *f = out();
    if (f) { fprintf(f, "push %s\n", message); fflush(f); }
    return 0;
}
int nvtxRangePop(void) {
    FILE *f = out();
    if (f) { fputs("pop\n", f); fflush(f); }
    return 0;
}
"#;

#[test]
fn nvtx_ranges_are_the_trace_spans_pushed_and_popped_in_pairs() {
    let test = "nvtx_ranges_are_the_trace_spans_pushed_and_popped_in_pairs";
    let Some(_serial) = common::start(test) else {
        return;
    };
    let dir = common::fresh_tmp("nvtx");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let (src, lib) = (dir.join("nvtx_shim.c"), dir.join("libnvToolsExt.so.1"));
    std::fs::write(&src, NVTX_SHIM).expect("write shim");
    let cc = match Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            // Not a GPU skip (`common::skip` would fail it on the GPU hosts): said, not passed.
            println!("SKIP {test}: no C compiler `cc` to build the stand-in NVTX library ({e})");
            return;
        }
    };
    assert!(
        cc.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let log = dir.join("ranges");
    let (trace, _, stderr) = traced_run(
        "nvtx",
        2,
        &["--chunks", "3"],
        &[
            ("LOCKSTEP_NVTX", Path::new("1")),
            ("LOCKSTEP_NVTX_LIB", &lib),
            ("LOCKSTEP_TEST_NVTX_LOG", &log),
        ],
    );
    assert!(!stderr.contains("NVTX requested"), "{stderr}");
    for rank in 0..3u64 {
        let text = std::fs::read_to_string(format!("{}.{rank}", log.display()))
            .unwrap_or_else(|e| panic!("global-rank {rank} pushed no NVTX range: {e}"));
        let (mut pushed, mut depth, mut pops, mut nested_collective) = (Vec::new(), 0i64, 0, false);
        let mut stack: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("push ") {
                nested_collective |= name.starts_with("all_reduce ")
                    && stack.last().is_some_and(|p| p.starts_with("gen "));
                stack.push(name.to_string());
                pushed.push(name.to_string());
                depth += 1;
            } else {
                assert_eq!(line, "pop");
                assert!(
                    stack.pop().is_some(),
                    "global-rank {rank}: pop without push"
                );
                pops += 1;
                depth -= 1;
            }
        }
        assert_eq!(depth, 0, "global-rank {rank}: unbalanced ranges");
        assert_eq!(pops, pushed.len(), "global-rank {rank}");
        let mut traced: Vec<String> = spans_of(&trace, rank)
            .iter()
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert!(!traced.is_empty(), "global-rank {rank}: empty track");
        pushed.sort();
        traced.sort();
        assert_eq!(
            pushed, traced,
            "global-rank {rank}: NVTX names != trace names"
        );
        if rank > 0 {
            assert!(
                nested_collective,
                "global-rank {rank}: no all_reduce inside a gen range"
            );
        }
    }
}

#[test]
fn nvtx_requested_without_a_library_says_so_once_per_rank_and_the_run_goes_on() {
    let test = "nvtx_requested_without_a_library_says_so_once_per_rank_and_the_run_goes_on";
    let Some(_serial) = common::start(test) else {
        return;
    };
    let missing = common::tmp("no-such-dir/libnvToolsExt.so.1");
    // Under nsys (its session variable set, LOCKSTEP_NVTX unset) NVTX is on by default.
    let (trace, m, stderr) = traced_run(
        "nvtx-missing",
        1,
        &["--chunks", "2"],
        &[
            ("NSYS_PROFILING_SESSION_ID", Path::new("7")),
            ("LOCKSTEP_NVTX_LIB", &missing),
        ],
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("NVTX requested"))
        .collect();
    assert_eq!(lines.len(), 2, "one line per rank process:\n{stderr}");
    assert!(
        lines.iter().all(|l| l.contains("NSYS_PROFILING_SESSION_ID")
            && l.contains(&missing.display().to_string())),
        "{lines:?}"
    );
    assert_eq!(
        spans_of(&trace, 1).iter().filter(|e| is_gen(e)).count() as u64,
        m["generator_calls"].as_u64().expect("generator_calls")
    );
    // LOCKSTEP_NVTX=0 wins over nsys: nothing loaded, nothing said.
    let (_, _, stderr) = traced_run(
        "nvtx-off",
        1,
        &["--chunks", "2"],
        &[
            ("NSYS_PROFILING_SESSION_ID", Path::new("7")),
            ("LOCKSTEP_NVTX", Path::new("0")),
            ("LOCKSTEP_NVTX_LIB", &missing),
        ],
    );
    assert!(!stderr.contains("NVTX"), "{stderr}");
}
