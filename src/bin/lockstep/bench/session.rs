//! `lockstep bench session`: what the session API adds per chunk (issue 11's target: ≤ 50 µs on
//! the host plane). The same stream — calibrated generator at zero cost, null decoder, depth D —
//! driven three ways, interleaved round by round so a change in the machine's load hits all
//! alike: by `lockstep run` (its fixed schedule is itself a session client on a thread of rank
//! 0: the baseline), and by a `Session` client in this process, both ways a server can drive it
//! (`submit` until `Again`, then `recv`: two round trips per chunk; `submit_and_recv`: one). The
//! difference of the steady periods is what the client-side session adds per chunk (the socket
//! round trips, the client's copies); the CPU per chunk of every process (this thread + the
//! reaped rank processes, `getrusage`) says what it costs a loaded machine. Also the bare round
//! trip of one request (a poll with nothing in flight), and the two client loops alternating in
//! segments within one session (what one round trip fewer saves, without separate jobs' noise).
//!
//! Usage: `lockstep bench session [--rounds N] [--chunks K] [--depth D] [--json FILE]`
//! (defaults 5, 2000, 2). Each stream's first 10 % of chunks are its warm-up.
use lockstep::pipeline::{GeneratorKind, RunArgs};
use lockstep::session::{Session, SessionConfig, Submit};
use lockstep::{Error, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

struct Opts {
    rounds: usize,
    chunks: u64,
    depth: usize,
    json: Option<String>,
}

fn parse(rest: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        chunks: 2000,
        depth: 2,
        json: None,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| Error::BadInput(format!("bench session: {a} needs a value")))
        };
        let num = |v: String| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Error::BadInput(format!("bench session: {a} {v:?}: not a count")))
        };
        match a.as_str() {
            "--rounds" => o.rounds = num(val()?)? as usize,
            "--chunks" => o.chunks = num(val()?)?.max(20),
            "--depth" => o.depth = num(val()?)? as usize,
            "--json" => o.json = Some(val()?),
            other => {
                return Err(Error::BadInput(format!(
                    "bench session: unknown argument {other:?}"
                )))
            }
        }
    }
    Ok(o)
}

pub fn main(rest: &[String]) -> i32 {
    match run(rest) {
        Ok(()) => 0,
        Err(e) => {
            lockstep::diag!("bench session: {e}");
            e.exit_code().code()
        }
    }
}

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

/// How the client drives the stream.
#[derive(Clone, Copy, PartialEq)]
enum Loop {
    /// `submit` until `Again`, then `recv`: two round trips per chunk.
    SubmitThenRecv,
    /// `submit_and_recv`: one round trip per chunk.
    Combined,
}

struct Bench {
    exe: PathBuf,
    chunks: u64,
    depth: usize,
}

impl Bench {
    fn warmup(&self) -> u64 {
        self.chunks / 10
    }

    fn run_args(&self) -> RunArgs {
        RunArgs {
            generator: GeneratorKind::Calibrated,
            gen_cost_ms: 0.0,
            depth: self.depth,
            quiet: true,
            ..RunArgs::default()
        }
    }

    /// `lockstep run`'s steady period (µs/chunk, from its metrics) and CPU per chunk.
    fn lockstep_run(&self) -> Result<(f64, f64)> {
        let c0 = cpu_us();
        let metrics = std::env::temp_dir().join(format!(
            "lockstep-bench-session-{}.json",
            std::process::id()
        ));
        let out = Command::new(&self.exe)
            .args([
                "run",
                "--quiet",
                "--generator",
                "calibrated",
                "--gen-cost-ms",
                "0",
            ])
            .args(["--chunks", &self.chunks.to_string()])
            .args(["--depth", &self.depth.to_string()])
            .arg("--metrics")
            .arg(&metrics)
            .output()
            .map_err(|e| Error::BadInput(format!("start {}: {e}", self.exe.display())))?;
        if !out.status.success() {
            return Err(Error::Invariant(format!(
                "lockstep run exited {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let m: serde_json::Value = std::fs::read(&metrics)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| Error::Invariant(format!("no metrics at {}", metrics.display())))?;
        let _ = std::fs::remove_file(&metrics);
        let period = m["period_ms"]
            .as_f64()
            .ok_or_else(|| Error::Invariant("metrics without period_ms".into()))?;
        let c1 = cpu_us();
        Ok((
            period * 1e3,
            ((c1.0 - c0.0) + (c1.1 - c0.1)) / self.chunks as f64,
        ))
    }

    fn config(&self) -> SessionConfig {
        SessionConfig {
            run: self.run_args(),
            exe: Some(self.exe.clone()),
            ..SessionConfig::default()
        }
    }

    /// A session stream's steady period (µs/chunk), its CPU per chunk (this thread + every rank
    /// process, whole run) and this thread's own CPU per chunk.
    fn session(&self, how: Loop) -> Result<(f64, f64, f64)> {
        let c0 = cpu_us();
        let mut s = Session::open(&self.config())?;
        let (mut got, mut t_steady) = (0u64, None);
        let wait = Duration::from_secs(10);
        let missing = || Error::Invariant("a result did not come within 10 s".into());
        while got < self.chunks {
            let out = match how {
                Loop::SubmitThenRecv => match s.submit()? {
                    Submit::Sent(_) => None,
                    Submit::Again => Some(s.recv(wait)?.ok_or_else(missing)?),
                },
                Loop::Combined => s.submit_and_recv(wait)?.1,
            };
            if out.is_some() {
                got += 1;
                if got == self.warmup() {
                    t_steady = Some(Instant::now());
                }
            }
        }
        let steady = t_steady.map(|t| t.elapsed()).unwrap_or_default();
        while s.recv(wait)?.is_some() {}
        s.close()?;
        // The rank processes are reaped at close: their CPU counts from then.
        let c1 = cpu_us();
        let n = self.chunks as f64;
        Ok((
            steady.as_secs_f64() * 1e6 / (self.chunks - self.warmup()) as f64,
            ((c1.0 - c0.0) + (c1.1 - c0.1)) / n,
            (c1.0 - c0.0) / n,
        ))
    }

    /// The bare cost of one request, µs: a poll with nothing in flight.
    fn request_round_trip(&self) -> Result<f64> {
        let mut s = Session::open(&self.config())?;
        let n = 5000;
        let t = Instant::now();
        for _ in 0..n {
            if s.recv(Duration::ZERO)?.is_some() {
                return Err(Error::Invariant(
                    "a poll with nothing submitted returned a result".into(),
                ));
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        s.close()?;
        Ok(us)
    }

    /// The two client loops within one session, alternating in segments of `segment` chunks
    /// (the first is the warm-up), so that load changes hit both alike; the median µs/chunk of
    /// each loop's segments.
    fn loops_in_one_session(&self, segments: u64, segment: u64) -> Result<(f64, f64)> {
        let mut s = Session::open(&self.config())?;
        let wait = Duration::from_secs(10);
        let missing = || Error::Invariant("a result did not come within 10 s".into());
        let (mut two, mut one) = (Vec::new(), Vec::new());
        for seg in 0..=segments {
            let how = if seg % 2 == 0 {
                Loop::SubmitThenRecv
            } else {
                Loop::Combined
            };
            let (mut got, t) = (0, Instant::now());
            while got < segment {
                let out = match how {
                    Loop::SubmitThenRecv => match s.submit()? {
                        Submit::Sent(_) => None,
                        Submit::Again => Some(s.recv(wait)?.ok_or_else(missing)?),
                    },
                    Loop::Combined => s.submit_and_recv(wait)?.1,
                };
                got += u64::from(out.is_some());
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / segment as f64;
            if seg > 0 {
                match how {
                    Loop::SubmitThenRecv => two.push(us),
                    Loop::Combined => one.push(us),
                }
            }
        }
        while s.recv(wait)?.is_some() {}
        s.close()?;
        Ok((median(two), median(one)))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(rest: &[String]) -> Result<()> {
    let o = parse(rest)?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::BadInput(format!("bench session: this executable: {e}")))?;
    let b = Bench {
        exe,
        chunks: o.chunks,
        depth: o.depth,
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench session: D = {}, {} rounds of {} chunks (first {} warm-up), rank 0 + TP=2 mesh on \
         the host plane, calibrated generator at 0 ms, null decoder; {cores} cores, load {}",
        o.depth,
        o.rounds,
        o.chunks,
        b.warmup(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Per round: (lockstep run, submit+recv, submit_and_recv) × (period, CPU), the round trip
    // and this thread's CPU per chunk in the two loops.
    let mut rows: Vec<[f64; 9]> = Vec::new();
    for round in 0..o.rounds {
        let (a, ca) = b.lockstep_run()?;
        let (p2, c2, k2) = b.session(Loop::SubmitThenRecv)?;
        let (p1, c1, k1) = b.session(Loop::Combined)?;
        let rtt = b.request_round_trip()?;
        println!(
            "round {round}: period µs/chunk: lockstep run {a:.1} | submit+recv {p2:.1} ({:+.1}) | \
             submit_and_recv {p1:.1} ({:+.1}); CPU µs/chunk: {ca:.1} | {c2:.1} ({:+.1}) | {c1:.1} \
             ({:+.1}); request round trip {rtt:.1} µs; client thread CPU µs/chunk {k2:.1} | {k1:.1}",
            p2 - a,
            p1 - a,
            c2 - ca,
            c1 - ca
        );
        rows.push([a, p2, p1, ca, c2, c1, rtt, k2, k1]);
    }
    let col = |f: &dyn Fn(&[f64; 9]) -> f64| median(rows.iter().map(f).collect());
    let summary = serde_json::json!({
        "depth": o.depth, "rounds": o.rounds, "chunks": o.chunks, "cores": cores,
        "lockstep_run_period_us": col(&|r| r[0]),
        "overhead_period_us": {"submit_then_recv": col(&|r| r[1] - r[0]),
                               "submit_and_recv": col(&|r| r[2] - r[0])},
        "overhead_cpu_us": {"submit_then_recv": col(&|r| r[4] - r[3]),
                            "submit_and_recv": col(&|r| r[5] - r[3])},
        "request_round_trip_us": col(&|r| r[6]),
        "client_thread_cpu_us": {"submit_then_recv": col(&|r| r[7]),
                                 "submit_and_recv": col(&|r| r[8])},
        "rounds_raw": rows,
    });
    println!(
        "median of {} rounds: session overhead per chunk over lockstep run (period): \
         submit_and_recv {:.1} µs, submit+recv {:.1} µs (target ≤ 50 µs); CPU: {:.1} µs, {:.1} \
         µs; request round trip {:.1} µs; lockstep run's own period {:.1} µs/chunk",
        o.rounds,
        col(&|r| r[2] - r[0]),
        col(&|r| r[1] - r[0]),
        col(&|r| r[5] - r[3]),
        col(&|r| r[4] - r[3]),
        col(&|r| r[6]),
        col(&|r| r[0]),
    );
    let segments = 2 * o.rounds as u64;
    let segment = (o.chunks / 8).max(50);
    let (two, one) = b.loops_in_one_session(segments, segment)?;
    println!(
        "one session, {segments} alternating segments of {segment} chunks: submit+recv {two:.1} \
         µs/chunk, submit_and_recv {one:.1} µs/chunk: one round trip fewer saves {:.1} µs/chunk",
        two - one
    );
    let mut summary = summary;
    summary["one_session"] = serde_json::json!({
        "segments": segments, "segment_chunks": segment,
        "submit_then_recv_us": two, "submit_and_recv_us": one,
    });
    if let Some(path) = &o.json {
        std::fs::write(path, summary.to_string())
            .map_err(|e| Error::BadInput(format!("--json {path}: {e}")))?;
    }
    Ok(())
}
