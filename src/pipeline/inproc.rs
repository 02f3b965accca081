//! `lockstep run` in one process: rank 0 on the calling thread, each mesh rank on its own thread,
//! the `pp` link and the mesh group over channels.
//!
//! Contract: crash > hang holds here too. A rank that fails returns its error and drops its
//! channels, so every peer blocked on it fails with `PeerLost` at once; every other wait is
//! bounded by `--timeout`. The run's diagnosis names the root cause — the earliest error that is
//! not a consequence (`PeerLost`) of another rank's failure — and the process exits with that
//! error's code.
use super::decode::{CalibratedDecoder, Decoder, NullDecoder, PreviewDecoder};
use super::driver::{run_driver, DriverConfig, DriverReport};
use super::envelope::{ChunkResult, Envelope};
use super::faults::Faults;
use super::report::{chrome_trace, overlap, percentile, steady_period, Metrics, Trace};
use super::stage0::QueueConfig;
use super::stage1::{
    run_follower, run_leader, CalibratedGenerator, DitGenerator, Generator, MeshRank, MeshReport,
    StepGraphs,
};
use super::{DriverLink, GeneratorKind, LeaderLink, RunArgs};
use crate::ids::{GlobalRank, DRIVER};
use crate::model::tp::{ThreadComm, TpComm};
use crate::model::DitConfig;
use crate::plan::PlanPolicy;
use crate::{Error, Result};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

struct ChanDriver {
    tx: Sender<Envelope>,
    rx: Receiver<ChunkResult>,
}

impl DriverLink for ChanDriver {
    fn send(&mut self, env: &Envelope) -> Result<()> {
        self.tx.send(env.clone()).map_err(|_| {
            Error::PeerLost(format!(
                "mesh leader (global-rank 1) is gone; could not send {}",
                env.call_id
            ))
        })
    }
    fn recv_result(&mut self, timeout: Duration) -> Result<Option<ChunkResult>> {
        let lost = || {
            Error::PeerLost(
                "mesh leader (global-rank 1) is gone while stage 0 waited for a RESULT".into(),
            )
        };
        if timeout.is_zero() {
            return match self.rx.try_recv() {
                Ok(r) => Ok(Some(r)),
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(lost()),
            };
        }
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(Some(r)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(lost()),
        }
    }
}

struct ChanLeader {
    rx: Receiver<Envelope>,
    tx: Sender<ChunkResult>,
}

impl LeaderLink for ChanLeader {
    fn recv_envelope(&mut self, timeout: Duration) -> Result<Option<Envelope>> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Ok(Some(e)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::PeerLost(
                "global-rank 0 (stage 0) is gone while the mesh leader waited for an envelope"
                    .into(),
            )),
        }
    }
    fn send_result(&mut self, r: ChunkResult) -> Result<()> {
        let c = r.call_id;
        self.tx.send(r).map_err(|_| {
            Error::PeerLost(format!(
                "global-rank 0 (stage 0) is gone; could not return {c}"
            ))
        })
    }
}

/// A failed run: the root-cause rank and error, plus what the other ranks saw.
#[derive(Debug)]
pub struct Failure {
    pub rank: GlobalRank,
    pub error: Error,
    pub others: Vec<(GlobalRank, Error)>,
}

impl Failure {
    fn setup(error: Error) -> Self {
        Self {
            rank: DRIVER,
            error,
            others: Vec::new(),
        }
    }

    pub fn diagnosis(&self) -> String {
        let code = self.error.exit_code();
        let mut s = format!(
            "lockstep run failed: {} exited {} ({}): {}",
            self.rank,
            code.code(),
            code.name(),
            self.error
        );
        for (r, e) in &self.others {
            s.push_str(&format!("\n  then {r}: {e}"));
        }
        s
    }
}

fn role(rank: u32) -> &'static str {
    match rank {
        0 => "stage 0",
        1 => "mesh leader",
        _ => "mesh",
    }
}

/// How long a failed run waits for the other ranks' diagnoses before exiting.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

struct RankOutcome {
    rank: GlobalRank,
    at: Instant,
    result: std::result::Result<(), Error>,
}

pub(crate) struct Setup {
    cfg: DitConfig,
    tp: u32,
    dc: DriverConfig,
    steps: Vec<String>,
    timeout: Duration,
}

fn setup(args: &RunArgs, faults: Faults) -> Result<Setup> {
    let cfg = DitConfig::preset(&args.preset)?;
    if cfg.name != "tiny" && args.generator == GeneratorKind::Dit {
        return Err(Error::BadInput(format!(
            "preset {} is geometry-only on the CPU; run it with --generator calibrated (or on a GPU \
             build)",
            cfg.name
        )));
    }
    cfg.check_tp(args.tp)?;
    let secs = |v: f64, what: &str| -> Result<Duration> {
        Duration::try_from_secs_f64(v)
            .map_err(|_| Error::BadInput(format!("{what} must be a non-negative number, got {v}")))
    };
    let timeout = secs(args.timeout, "--timeout")?;
    let heartbeat = Duration::from_millis(args.heartbeat_ms.max(1));
    if heartbeat >= timeout {
        return Err(Error::BadInput(format!(
            "--heartbeat-ms {} must be well under --timeout {:?}",
            args.heartbeat_ms, timeout
        )));
    }
    let policy = PlanPolicy {
        frames_per_chunk: cfg.frames_per_chunk as u32,
        denoise_timesteps: cfg.denoise_timesteps.clone(),
        clean_cache_update: true,
        recompute_every: args.recompute_every,
        sink_frames: cfg.sink_frames,
        window_frames: cfg.window_frames,
        prompt_seed: args.seed ^ 0x5eed,
    };
    let steps = StepGraphs::required(&cfg, args.recompute_every > 0, cfg.sink_frames);
    let mut graphs = StepGraphs::default();
    graphs.capture(&steps);
    let queues = QueueConfig {
        d_in: args.depth_in.unwrap_or(args.depth),
        d_out: args.depth_out.unwrap_or(args.depth),
        backpressure: !args.no_backpressure,
    };
    let progress = (!args.quiet).then(|| {
        let pb = indicatif::ProgressBar::new(args.chunks);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} chunks {pos}/{len} [{bar:30}] {per_sec} eta {eta}",
        ) {
            pb.set_style(style);
        }
        pb
    });
    Ok(Setup {
        tp: args.tp,
        steps,
        timeout,
        dc: DriverConfig {
            cfg: cfg.clone(),
            chunks: args.chunks,
            queues,
            hard_cut_every: args.hard_cut_every,
            policy,
            graph_count: graphs.count(),
            timeout,
            heartbeat,
            noise_seed: args.seed,
            faults,
            progress,
        },
        cfg,
    })
}

fn make_decoder(args: &RunArgs, cfg: &DitConfig) -> Result<Box<dyn Decoder>> {
    let inner: Option<Box<dyn Decoder>> = match &args.frames_out {
        Some(d) => Some(Box::new(PreviewDecoder::new(d.clone(), cfg)?)),
        None => None,
    };
    if args.decoder_cost_ms > 0.0 {
        let cost = Duration::try_from_secs_f64(args.decoder_cost_ms / 1e3)
            .map_err(|_| Error::BadInput("--decoder-cost-ms must be ≥ 0".into()))?;
        return Ok(Box::new(CalibratedDecoder::new(cost, inner)));
    }
    Ok(inner.unwrap_or_else(|| Box::new(NullDecoder)))
}

/// Runs the whole pipeline in this process. `Ok` = drained cleanly.
pub fn run(args: &RunArgs) -> std::result::Result<Metrics, Failure> {
    let faults = Faults::from_env().map_err(Failure::setup)?;
    let s = setup(args, faults.clone()).map_err(Failure::setup)?;
    let mut decoder = make_decoder(args, &s.cfg).map_err(Failure::setup)?;
    let gen_cost = Duration::try_from_secs_f64(args.gen_cost_ms / 1e3)
        .map_err(|_| Failure::setup(Error::BadInput("--gen-cost-ms must be ≥ 0".into())))?;
    let t0 = Instant::now();
    let (env_tx, env_rx) = channel();
    let (res_tx, res_rx) = channel();
    let mut leader_link = Some(ChanLeader {
        rx: env_rx,
        tx: res_tx,
    });
    let (out_tx, out_rx) = channel::<(RankOutcome, Option<MeshReport>)>();
    let mut handles = Vec::new();
    for comm in ThreadComm::group(s.tp, s.timeout) {
        let grank = GlobalRank(comm.rank().get() + 1);
        let link = if grank.get() == 1 {
            leader_link.take()
        } else {
            None
        };
        let (cfg, steps, faults, out_tx) = (
            s.cfg.clone(),
            s.steps.clone(),
            faults.clone(),
            out_tx.clone(),
        );
        let (kind, seed, tp, timeout) = (args.generator, args.seed, s.tp, s.timeout);
        handles.push(std::thread::spawn(move || {
            let mut comm = comm;
            let res = (|| -> Result<MeshReport> {
                let mut gen: Box<dyn Generator> = match kind {
                    GeneratorKind::Dit => Box::new(DitGenerator::new(&cfg, seed, comm.rank(), tp)?),
                    GeneratorKind::Calibrated => Box::new(CalibratedGenerator::new(&cfg, gen_cost)),
                };
                let mut rank = MeshRank::new(&mut comm, gen.as_mut(), grank, &cfg, faults)?;
                let trace = Trace::new(grank.get(), t0);
                match link {
                    Some(mut l) => run_leader(&mut rank, &mut l, steps, timeout, trace),
                    None => run_follower(&mut rank, trace),
                }
            })();
            let at = Instant::now();
            // Drop the comm before reporting, so peers blocked on this rank wake at once.
            drop(comm);
            let (result, report) = match res {
                Ok(r) => (Ok(()), Some(r)),
                Err(e) => (Err(e), None),
            };
            let _ = out_tx.send((
                RankOutcome {
                    rank: grank,
                    at,
                    result,
                },
                report,
            ));
        }));
    }
    drop(out_tx);
    drop(leader_link);
    let mut link = ChanDriver {
        tx: env_tx,
        rx: res_rx,
    };
    let driver = run_driver(&mut link, decoder.as_mut(), &s.dc, Trace::new(0, t0));
    let driver_at = Instant::now();
    drop(link);
    if let Some(pb) = &s.dc.progress {
        pb.finish_and_clear();
    }
    let mut outcomes = Vec::new();
    let mut mesh_reports = Vec::new();
    let (driver_result, driver_report): (std::result::Result<(), Error>, Option<DriverReport>) =
        match driver {
            Ok(r) => (Ok(()), Some(r)),
            Err(e) => (Err(e), None),
        };
    outcomes.push(RankOutcome {
        rank: DRIVER,
        at: driver_at,
        result: driver_result,
    });
    // Every mesh thread reports exactly once and its waits are bounded. After a failure we do
    // not wait for a rank that is busy computing: crash fast (the process exit ends it), the
    // way the launcher SIGKILLs ranks that outlive the grace period.
    let failed = outcomes.iter().any(|o| o.result.is_err());
    let deadline = Instant::now() + if failed { FAILURE_GRACE } else { s.timeout * 2 };
    let mut missing = s.tp as usize;
    while missing > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match out_rx.recv_timeout(left) {
            Ok((o, r)) => {
                missing -= 1;
                let failed_now = o.result.is_err();
                outcomes.push(o);
                if let Some(r) = r {
                    mesh_reports.push(r);
                }
                if failed_now && !failed {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if missing == 0 {
        for h in handles {
            let _ = h.join();
        }
    } else if outcomes.iter().all(|o| o.result.is_ok()) {
        outcomes.push(RankOutcome {
            rank: GlobalRank(1),
            at: Instant::now(),
            result: Err(Error::Timeout(format!(
                "{missing} mesh rank(s) did not finish within {:?} after stage 0 drained",
                s.timeout * 2
            ))),
        });
    }
    let mut errors: Vec<(GlobalRank, Instant, Error)> = outcomes
        .into_iter()
        .filter_map(|o| o.result.err().map(|e| (o.rank, o.at, e)))
        .collect();
    if !errors.is_empty() {
        // Root cause: earliest error that is not a consequence of another rank's failure.
        errors.sort_by_key(|(r, at, e)| (matches!(e, Error::PeerLost(_)), *at, *r));
        let (rank, _, error) = errors.remove(0);
        return Err(Failure {
            rank,
            error,
            others: errors.into_iter().map(|(r, _, e)| (r, e)).collect(),
        });
    }
    let Some(d) = driver_report else {
        return Err(Failure::setup(Error::Invariant(
            "stage 0 ended without a report".into(),
        )));
    };
    let m = metrics(args, &s, decoder.name(), &d, &mesh_reports, t0.elapsed());
    if let Some(p) = &args.metrics {
        let j = serde_json::to_vec_pretty(&m)
            .map_err(|e| Failure::setup(Error::BadInput(e.to_string())))?;
        std::fs::write(p, j)
            .map_err(|e| Failure::setup(Error::io(format!("writing {}", p.display()), e)))?;
    }
    if let Some(p) = &args.trace {
        let mut traces = vec![d.trace.clone()];
        traces.extend(mesh_reports.iter().map(|r| r.trace.clone()));
        traces.sort_by_key(|t| t.rank);
        let j = serde_json::to_vec(&chrome_trace(&traces))
            .map_err(|e| Failure::setup(Error::BadInput(e.to_string())))?;
        std::fs::write(p, j)
            .map_err(|e| Failure::setup(Error::io(format!("writing {}", p.display()), e)))?;
    }
    Ok(m)
}

fn metrics(
    args: &RunArgs,
    s: &Setup,
    decoder: String,
    d: &DriverReport,
    mesh: &[MeshReport],
    wall: Duration,
) -> Metrics {
    let n = d.emitted.len().max(1) as f64;
    let s0_ms = d.s0_total.as_secs_f64() * 1e3 / n;
    let s1_ms = d.s1_us.iter().sum::<u64>() as f64 / 1e3 / n;
    let period_ms = steady_period(&d.emit_s) * 1e3;
    let (e, eta) = overlap(s0_ms, s1_ms, period_ms);
    let mut lat = d.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    Metrics {
        preset: s.cfg.name.into(),
        generator: format!(
            "{} / decoder {decoder}",
            match args.generator {
                GeneratorKind::Dit => "tiny DiT (CPU)".to_string(),
                GeneratorKind::Calibrated => format!("calibrated {} ms/call", args.gen_cost_ms),
            }
        ),
        tp: s.tp,
        depth_in: s.dc.queues.d_in,
        depth_out: s.dc.queues.d_out,
        backpressure: s.dc.queues.backpressure,
        chunks_requested: args.chunks,
        chunks_emitted: d.emitted.len() as u64,
        s0_ms,
        s1_ms,
        period_ms,
        e,
        eta,
        chunks_per_s: if period_ms > 0.0 {
            1e3 / period_ms
        } else {
            0.0
        },
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
        stale_dropped: d.stats.stale_dropped,
        flushed_undecoded: d.stats.flushed_undecoded,
        duplicates_dropped: mesh.iter().map(|m| m.duplicates_dropped).sum(),
        hard_cuts: d.stats.hard_cuts,
        noops_sent: d.noops,
        max_in_flight: d.stats.max_in_flight,
        max_ready: d.stats.max_ready,
        wall_s: wall.as_secs_f64(),
        emitted: d.emitted.clone(),
        stale: d.stale.clone(),
        frames_dir: args.frames_out.as_ref().map(|p| p.display().to_string()),
    }
}

/// The role of a global rank, for messages.
pub fn rank_role(rank: GlobalRank) -> &'static str {
    role(rank.get())
}
