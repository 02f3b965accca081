//! Run metrics, the summary table, and the Chrome/Perfetto trace.
//!
//! Definitions (docs/spec.md §7): S0 = mean Stage 0 time per chunk (envelope build + decode), S1 = mean
//! mesh time per chunk (envelope received → result ready, measured by the leader) over the
//! steady state, period = steady-state mean interval between emitted outputs, E = max(S0, S1) /
//! period, η = (S0 + S1 − period) / min(S0, S1). The steady state excludes the first quarter of
//! the run (warm-up), for S1 and the period alike: a generator whose cost grows while its KV
//! cache fills (the DiT) would otherwise be compared at its early, cheap chunks against a period
//! of its late ones. η ≈ 0 means the stages ran one after the other; η ≈ 1 means the shorter
//! stage was hidden entirely.
//!
//! The trace is Chrome trace-event JSON (`traceEvents`, complete events `ph: "X"` with
//! pid = global rank, tid = the lane (one per thread that records: `stage0`, `stage1`), ts/dur
//! in µs from the run start, `args` where the span has them, plus process/thread name
//! metadata), which Perfetto and chrome://tracing load. The spans come from `crate::spans`
//! (`Trace::collect`), so each is also the NVTX range of the same name when NVTX is on.
use crate::spans;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Span {
    pub lane: String,
    pub name: String,
    pub ts_us: f64,
    pub dur_us: f64,
    /// The Chrome trace's `args` (generator call: kind, t, frames, chunk, …; collective: op,
    /// dtype, bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
}

/// One rank's timeline.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub rank: u32,
    pub t0: Option<Instant>,
    pub spans: Vec<Span>,
}

impl Trace {
    pub fn new(rank: u32, t0: Instant) -> Self {
        Self {
            rank,
            t0: Some(t0),
            spans: Vec::new(),
        }
    }

    pub fn span(&mut self, lane: &str, name: &str, start: Instant, end: Instant) {
        self.push(lane, name.into(), None, start, end);
    }

    fn push(
        &mut self,
        lane: &str,
        name: String,
        args: Option<serde_json::Value>,
        start: Instant,
        end: Instant,
    ) {
        let Some(t0) = self.t0 else { return };
        // Whole nanoseconds, so a span that ends inside another does in µs too.
        let us = |d: std::time::Duration| d.as_nanos() as f64 / 1e3;
        self.spans.push(Span {
            lane: lane.into(),
            name,
            ts_us: us(start.saturating_duration_since(t0)),
            dur_us: us(end.saturating_duration_since(start)),
            args,
        });
    }

    /// Takes every span this process recorded (`crate::spans::take`) into this timeline.
    pub fn collect(&mut self) {
        for f in spans::take() {
            let args = f.args.to_json();
            self.push(&f.lane, f.name, args, f.start, f.end);
        }
    }
}

/// Chrome trace JSON of every rank's timeline.
pub fn chrome_trace(traces: &[Trace]) -> serde_json::Value {
    let mut ev = Vec::new();
    for t in traces {
        let role = if t.rank == 0 {
            "stage 0 (driver)"
        } else {
            "stage 1 (mesh)"
        };
        ev.push(
            serde_json::json!({"ph": "M", "name": "process_name", "pid": t.rank, "tid": 0,
            "args": {"name": format!("global-rank {} — {role}", t.rank)}}),
        );
        let mut lanes: Vec<&str> = t.spans.iter().map(|s| s.lane.as_str()).collect();
        lanes.sort_unstable();
        lanes.dedup();
        for (i, l) in lanes.iter().enumerate() {
            ev.push(
                serde_json::json!({"ph": "M", "name": "thread_name", "pid": t.rank,
                "tid": i, "args": {"name": l}}),
            );
        }
        for s in &t.spans {
            let tid = lanes.iter().position(|l| *l == s.lane).unwrap_or(0);
            let mut x = serde_json::json!({"ph": "X", "name": s.name, "cat": s.lane,
                "pid": t.rank, "tid": tid, "ts": s.ts_us, "dur": s.dur_us});
            if let (Some(a), Some(o)) = (&s.args, x.as_object_mut()) {
                o.insert("args".into(), a.clone());
            }
            ev.push(x);
        }
    }
    serde_json::json!({ "traceEvents": ev, "displayTimeUnit": "ms" })
}

/// The run's numbers (also the `--metrics` JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Metrics {
    pub preset: String,
    pub generator: String,
    pub tp: u32,
    pub depth_in: usize,
    pub depth_out: usize,
    pub backpressure: bool,
    pub chunks_requested: u64,
    pub chunks_emitted: u64,
    /// Generator calls the plans of every INFER sent named (stale chunks included: the mesh
    /// runs them), and the recompute calls among them.
    #[serde(default)]
    pub generator_calls: u64,
    #[serde(default)]
    pub recompute_calls: u64,
    pub s0_ms: f64,
    pub s1_ms: f64,
    pub period_ms: f64,
    pub e: f64,
    pub eta: f64,
    pub chunks_per_s: f64,
    /// Video frames per second in steady state: chunks/s × latent frames per chunk × 4 (the
    /// Wan VAE decodes 4 video frames per latent frame once streaming).
    #[serde(default)]
    pub video_fps: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub stale_dropped: u64,
    pub flushed_undecoded: u64,
    pub duplicates_dropped: u64,
    /// Envelopes the leader received while a RESULT payload waited for rank 0's ClearToSend.
    #[serde(default)]
    pub envelopes_awaiting_cts: u64,
    pub hard_cuts: u64,
    pub noops_sent: u64,
    /// CUDA graphs the mesh leader's GPU generator captured (`None`: no capturing generator).
    #[serde(default)]
    pub cuda_graphs: Option<usize>,
    pub max_in_flight: usize,
    pub max_ready: usize,
    pub wall_s: f64,
    /// (cache_epoch, chunk_index) of every emitted output, in emit order.
    pub emitted: Vec<(u64, u64)>,
    /// (cache_epoch, chunk_index) of every result dropped as stale.
    pub stale: Vec<(u64, u64)>,
    pub frames_dir: Option<String>,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Index of the first steady-state sample of `n` (the first quarter is warm-up; at least two
/// samples stay for a period).
fn steady_start(n: usize) -> usize {
    (n / 4).min(n.saturating_sub(2))
}

/// Steady-state mean of per-chunk samples (in chunk order): the same chunks `steady_period`
/// spans.
pub fn steady_mean(samples: &[f64]) -> f64 {
    let tail = &samples[steady_start(samples.len())..];
    if tail.is_empty() {
        return 0.0;
    }
    tail.iter().sum::<f64>() / tail.len() as f64
}

/// Steady-state period from emit times (seconds): skip the first quarter.
pub fn steady_period(emit_s: &[f64]) -> f64 {
    if emit_s.len() < 2 {
        return 0.0;
    }
    let k = steady_start(emit_s.len());
    (emit_s[emit_s.len() - 1] - emit_s[k]) / (emit_s.len() - 1 - k) as f64
}

/// E and η from S0, S1 and the period (any unit).
pub fn overlap(s0: f64, s1: f64, period: f64) -> (f64, f64) {
    if period <= 0.0 || s0.min(s1) <= 0.0 {
        return (0.0, 0.0);
    }
    (s0.max(s1) / period, (s0 + s1 - period) / s0.min(s1))
}

impl Metrics {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let row = |s: &mut String, k: &str, v: String| s.push_str(&format!("  {k:<26} {v}\n"));
        s.push_str(&format!(
            "lockstep run — preset {}, generator {}, rank 0 + TP={} mesh, D_in={} D_out={}{}\n",
            self.preset,
            self.generator,
            self.tp,
            self.depth_in,
            self.depth_out,
            if self.backpressure {
                ""
            } else {
                " (backpressure OFF)"
            }
        ));
        row(
            &mut s,
            "chunks emitted",
            format!("{} / {}", self.chunks_emitted, self.chunks_requested),
        );
        row(
            &mut s,
            "S0 (build + decode)",
            format!("{:.2} ms", self.s0_ms),
        );
        row(
            &mut s,
            "S1 (mesh generate)",
            format!("{:.2} ms", self.s1_ms),
        );
        row(
            &mut s,
            "period (steady state)",
            format!("{:.2} ms", self.period_ms),
        );
        row(&mut s, "E = max(S0,S1)/period", format!("{:.3}", self.e));
        let (lo, hi) = (self.s0_ms.min(self.s1_ms), self.s0_ms.max(self.s1_ms));
        let eta = if lo < 0.05 * hi {
            // η divides by the smaller stage: below 5 % of the larger it only measures noise.
            format!(
                "{:.3} (not meaningful: one stage < 5 % of the other; read E)",
                self.eta
            )
        } else {
            format!("{:.3}", self.eta)
        };
        row(&mut s, "η = (S0+S1−period)/min", eta);
        row(
            &mut s,
            "throughput",
            format!("{:.2} chunks/s", self.chunks_per_s),
        );
        row(
            &mut s,
            "video frames/s",
            format!("{:.1} (4 per latent frame)", self.video_fps),
        );
        row(
            &mut s,
            "chunk latency p50 / p99",
            format!("{:.2} / {:.2} ms", self.latency_p50_ms, self.latency_p99_ms),
        );
        row(
            &mut s,
            "stale results dropped",
            format!("{}", self.stale_dropped),
        );
        row(
            &mut s,
            "flushed before decode",
            format!("{}", self.flushed_undecoded),
        );
        row(
            &mut s,
            "duplicates dropped",
            format!("{}", self.duplicates_dropped),
        );
        row(
            &mut s,
            "envelopes during CTS wait",
            format!("{}", self.envelopes_awaiting_cts),
        );
        row(&mut s, "hard cuts", format!("{}", self.hard_cuts));
        row(
            &mut s,
            "NOOP heartbeats sent",
            format!("{}", self.noops_sent),
        );
        row(
            &mut s,
            "max in flight / ready",
            format!("{} / {}", self.max_in_flight, self.max_ready),
        );
        if let Some(n) = self.cuda_graphs {
            row(&mut s, "CUDA graphs captured", format!("{n}"));
        }
        row(&mut s, "wall", format!("{:.2} s", self.wall_s));
        if let Some(d) = &self.frames_dir {
            row(&mut s, "frames", d.clone());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s1_is_averaged_over_the_same_steady_state_as_the_period() {
        // A generator that gets slower while its cache fills, then flat: 8 chunks.
        let s1 = [100.0, 200.0, 400.0, 400.0, 400.0, 400.0, 400.0, 400.0];
        assert_eq!(steady_mean(&s1), 400.0);
        // Emits every 0.4 s once steady: the period spans the same chunks (2..8).
        let emit = [0.1, 0.3, 0.6, 1.0, 1.4, 1.8, 2.2, 2.6];
        assert!((steady_period(&emit) - 0.4).abs() < 1e-12);
        let (e, _) = overlap(1.0, steady_mean(&s1), steady_period(&emit) * 1e3);
        assert!((e - 1.0).abs() < 1e-9, "E {e}");
        // The all-chunk mean (337.5) would have reported E = 0.84 for a mesh never idle.
        assert!(s1.iter().sum::<f64>() / 8.0 / 400.0 < 0.85);
        assert_eq!(steady_mean(&[]), 0.0);
        assert_eq!(steady_mean(&[5.0]), 5.0);
    }

    #[test]
    fn overlap_scores_match_their_definitions() {
        let (e, eta) = overlap(10.0, 10.0, 20.0);
        assert!(
            (e - 0.5).abs() < 1e-9 && eta.abs() < 1e-9,
            "serial: {e} {eta}"
        );
        let (e, eta) = overlap(10.0, 10.0, 10.0);
        assert!(
            (e - 1.0).abs() < 1e-9 && (eta - 1.0).abs() < 1e-9,
            "overlapped: {e} {eta}"
        );
        assert_eq!(overlap(0.0, 1.0, 1.0), (0.0, 0.0));
        assert!((steady_period(&[0.0, 5.0, 6.0, 7.0, 8.0]) - 1.0).abs() < 1e-9);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }

    #[test]
    fn chrome_trace_has_the_fields_perfetto_needs() {
        let t0 = Instant::now();
        let mut t = Trace::new(1, t0);
        t.span(
            "stage1",
            "generate",
            t0,
            t0 + std::time::Duration::from_millis(2),
        );
        t.push(
            "stage1",
            "all_reduce f32 8 B".into(),
            Some(serde_json::json!({"op": "all_reduce", "bytes": 8})),
            t0,
            t0 + std::time::Duration::from_millis(1),
        );
        let v = chrome_trace(&[t]);
        let ev = v["traceEvents"].as_array().unwrap();
        let x = ev.iter().find(|e| e["ph"] == "X").unwrap();
        for k in ["pid", "tid", "ts", "dur", "name"] {
            assert!(!x[k].is_null(), "missing {k}");
        }
        assert!((x["dur"].as_f64().unwrap() - 2000.0).abs() < 1.0);
        assert!(x.get("args").is_none(), "{x}");
        let c = ev
            .iter()
            .find(|e| e["name"] == "all_reduce f32 8 B")
            .unwrap();
        assert_eq!(
            (c["args"]["bytes"].as_u64(), c["tid"].as_u64()),
            (Some(8), x["tid"].as_u64())
        );
    }
}
