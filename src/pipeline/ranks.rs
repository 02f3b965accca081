//! `lockstep run` as processes: the parent launches rank 0 + the TP mesh through the protocol's
//! launcher (`crate::launch`), each rank bootstraps on the data plane `--backend` /
//! `LOCKSTEP_BACKEND` names (`host`, the default, or `nccl`) and runs its stage over adapters onto
//! the protocol, and the parent merges every rank's report into the summary, the `--metrics` JSON
//! and the `--trace` (one track per rank and stage).
//!
//! Contract:
//! - Everything a rank can get wrong about the configuration is checked in the parent before any
//!   process starts (bad input → exit 74, nothing launched), and again on each rank; every
//!   setting that shapes the mesh's work (model geometry, generator, seed, weights file digest,
//!   recompute schedule, step-graph set, timeouts) joins the parity fingerprint, so ranks started with different
//!   settings fail at startup with a per-field diff, never mid-stream.
//! - `DriverLink` over `Rank`: INFERs go out through `Rank::send_next` (the call_id is the rank's,
//!   shared with its NOOP heartbeats; only a `wire::PreparedEnvelope` is sendable), RESULTs come
//!   back through `Rank::recv_envelope`. `MeshLink` over `Rank`: the protocol's acceptance on the
//!   leader, `Rank::relay_to_mesh` for the relay, RESULTs through `Rank::send_envelope`.
//!   `TpComm` over the `mesh` group's collective wrapper: every TP collective is guarded and
//!   recorded in the flight recorder.
//! - Any error on a rank ends it through the protocol's abort path (`Rank::crash`: diagnosis,
//!   dump, peers told, distinct exit code); the launcher then stops the others and exits with the
//!   primary failure's code, which is the code `lockstep run` returns.
//! - Watchdog: `2 × --timeout` unless `LOCKSTEP_WATCHDOG_MS` says otherwise, so the pipeline's
//!   own bounded waits (a RESULT, an envelope) fire first and name what they waited for.
//!
//! - Backend: everything below is generic over `D: DataPlane`; the parent exports
//!   `LOCKSTEP_BACKEND` from `--backend` before launching, so every rank picks the same plane (and
//!   `data_plane.backend` is a parity field, so a rank that picks another fails at startup). On
//!   `nccl` the tiny model still runs on the CPU: envelope payloads and every TP collective travel
//!   over NCCL (`pp`, `mesh`), each collective uploading its host buffer and downloading the
//!   result. That staging costs two small copies per all-reduce — fine for the tiny preset, whose
//!   point is the protocol on real communicators, not speed; a GPU generator keeps its
//!   activations on the device instead.
//!
//! Tripwires: a rank that dies (peer lost at once), a hung stage (its bounded wait, then the
//! watchdog), parity mismatch (before inference), a rank report missing after a clean exit.
use super::conditioning::PromptTensor;
use super::decode::{CalibratedDecoder, Decoder, NullDecoder, PreviewDecoder, Y4mDecoder};
use super::driver::{DriverConfig, DriverReport};
use super::report::{
    chrome_trace, overlap, percentile, steady_mean, steady_period, Metrics, Span, Trace,
};
use super::stage0::QueueConfig;
use super::stage1::{
    run_follower, run_leader, CalibratedGenerator, ChunkLatent, DitGenerator, Generator,
    GpuGenerator, MeshRank, MeshReport, StepGraphs,
};
use super::{DriverLink, GeneratorKind, MakeEnvelope, MeshLink, RunArgs};
use crate::comm::watchdog::{self, diag};
use crate::comm::{DataPlane, OpContext};
use crate::cuda::device::DeviceBuf;
use crate::exit::ExitCode;
use crate::ids::{CallId, GlobalRank, GroupRank};
use crate::model::dit::DitShard;
use crate::model::gpu::GpuDit;
use crate::model::tp::TpComm;
use crate::model::weights::WeightFile;
use crate::model::DitConfig;
use crate::plan::PlanPolicy;
use crate::rank::{Backend, Rank, RankEnv, RankOptions};
use crate::spans;
use crate::wire::{DType, HostTensor, Limits, PreparedEnvelope, ReceivedEnvelope, Tensor};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the parent wants every rank's report (set by `launch_run`).
const RUN_DIR_ENV: &str = "LOCKSTEP_RUN_DIR";
/// Video frames per latent frame of Wan's VAE (temporal stride 4) in steady streaming.
const VIDEO_FRAMES_PER_LATENT_FRAME: usize = 4;
/// The run's common time origin, µs since the Unix epoch, so every rank's timeline lines up.
const RUN_T0_ENV: &str = "LOCKSTEP_RUN_T0_US";

/// What every rank derives from the arguments (identically: it is parity-checked).
struct Setup {
    cfg: DitConfig,
    tp: u32,
    steps: Vec<String>,
    timeout: Duration,
    heartbeat: Duration,
    gen_cost: Duration,
    policy: PlanPolicy,
    queues: QueueConfig,
    /// `--weights`, mapped and checked against the preset.
    weights: Option<WeightFile>,
    /// `effective_generator`.
    generator: GeneratorKind,
}

/// The generator a run uses: `--generator` as given, except that a Wan preset asked of the
/// CPU DiT (the default) runs on the GPU when the build has kernels and a GPU is visible.
/// Every rank derives the same answer on one host; the parity fingerprint compares it.
pub fn effective_generator(args: &RunArgs, cfg: &DitConfig) -> Result<GeneratorKind> {
    let gpu_ok = crate::cuda::embedded::has_kernels() && crate::cuda::probe::gpu_available();
    match args.generator {
        GeneratorKind::Dit if cfg.name != "tiny" => {
            if gpu_ok {
                Ok(GeneratorKind::Gpu)
            } else {
                Err(Error::BadInput(format!(
                    "preset {} runs on a GPU (this {}); run it with --generator calibrated here",
                    cfg.name,
                    if crate::cuda::embedded::has_kernels() {
                        "machine shows no GPU"
                    } else {
                        "build has no kernels"
                    }
                )))
            }
        }
        GeneratorKind::Gpu if !gpu_ok => Err(Error::BadInput(
            "--generator gpu needs a build with kernels and a visible GPU (`lockstep doctor`)"
                .into(),
        )),
        g => Ok(g),
    }
}

fn setup(args: &RunArgs) -> Result<Setup> {
    let cfg = DitConfig::preset(&args.preset)?;
    let generator = effective_generator(args, &cfg)?;
    cfg.check_tp(args.tp)?;
    // Checked here, on the parent and on every rank, so a file that does not fit the preset
    // fails before any process starts and before any collective.
    let weights = match &args.weights {
        Some(_) if generator == GeneratorKind::Calibrated => {
            return Err(Error::BadInput(
                "--weights loads the DiT; it means nothing with --generator calibrated".into(),
            ))
        }
        Some(p) => Some(WeightFile::open_for(p, &cfg)?),
        None => None,
    };
    // A week bounds every duration: beyond it a "bound" bounds nothing, and the value is
    // printed as the user could have typed it (`{v:e}` for huge numbers, never 300 digits).
    let secs = |v: f64, what: &str| -> Result<Duration> {
        const MAX_S: f64 = 7.0 * 24.0 * 3600.0;
        if !(0.0..=MAX_S).contains(&v) {
            return Err(Error::BadInput(format!(
                "{what} must be a number of seconds in 0..={MAX_S}, got {}",
                if v.abs() >= 1e6 {
                    format!("{v:e}")
                } else {
                    format!("{v}")
                }
            )));
        }
        Duration::try_from_secs_f64(v)
            .map_err(|_| Error::BadInput(format!("{what} must be a non-negative number, got {v}")))
    };
    let timeout = secs(args.timeout, "--timeout")?;
    let gen_cost = secs(args.gen_cost_ms / 1e3, "--gen-cost-ms")?;
    secs(args.decoder_cost_ms / 1e3, "--decoder-cost-ms")?;
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
    let queues = QueueConfig {
        d_in: args.depth_in.unwrap_or(args.depth),
        d_out: args.depth_out.unwrap_or(args.depth),
        backpressure: !args.no_backpressure,
    };
    if queues.d_in == 0 || queues.d_out == 0 {
        return Err(Error::BadInput(format!(
            "queue depths must be ≥ 1 (d_in {}, d_out {})",
            queues.d_in, queues.d_out
        )));
    }
    let steps = StepGraphs::required(&cfg, args.recompute_every > 0, cfg.sink_frames);
    Ok(Setup {
        tp: args.tp,
        steps,
        timeout,
        heartbeat,
        gen_cost,
        policy,
        queues,
        weights,
        cfg,
        generator,
    })
}

fn make_decoder(args: &RunArgs, cfg: &DitConfig) -> Result<Box<dyn Decoder>> {
    let mut inner: Option<Box<dyn Decoder>> = match &args.frames_out {
        Some(d) => Some(Box::new(PreviewDecoder::new(d.clone(), cfg)?)),
        None => None,
    };
    // session/video: `--video-out` (Y4M) after any PNGs.
    if let Some(p) = &args.video_out {
        inner = Some(Box::new(Y4mDecoder::new(p.clone(), cfg, inner)?));
    }
    if args.decoder_cost_ms > 0.0 {
        let cost = Duration::try_from_secs_f64(args.decoder_cost_ms / 1e3)
            .map_err(|_| Error::BadInput("--decoder-cost-ms must be ≥ 0".into()))?;
        return Ok(Box::new(CalibratedDecoder::new(cost, inner)));
    }
    Ok(inner.unwrap_or_else(|| Box::new(NullDecoder)))
}

/// The pipeline's share of the parity fingerprint: every setting that shapes the mesh's work.
fn fingerprint(opts: &mut RankOptions, args: &RunArgs, s: &Setup) {
    let fp = &mut opts.fingerprint;
    fp.set("pipeline.model", format!("{:?}", s.cfg))
        .set("pipeline.tp", s.tp)
        .set("pipeline.generator", format!("{:?}", s.generator))
        .set("pipeline.gen_cost_us", s.gen_cost.as_micros())
        .set("pipeline.seed", args.seed)
        .set(
            "pipeline.weights",
            match &s.weights {
                Some(f) => f.digest().to_string(),
                None => "seeded".to_string(),
            },
        )
        .set("pipeline.recompute_every", args.recompute_every)
        .set("pipeline.step_graphs", s.steps.join(","))
        .set("pipeline.timeout_ms", s.timeout.as_millis())
        .set("pipeline.heartbeat_ms", s.heartbeat.as_millis());
}

// ---------------------------------------------------------------------------------------------
// Adapters onto the protocol.

/// Stage 0's link: envelopes through the rank's envelope endpoint.
struct RankDriver<'a, D: DataPlane> {
    rank: &'a Rank<D>,
}

impl<D: DataPlane> DriverLink for RankDriver<'_, D> {
    fn send_next(&mut self, make: MakeEnvelope<'_>) -> Result<CallId> {
        let rank = self.rank;
        rank.send_next(move |ids| {
            let env = make(ids)?;
            note_send(rank, &env);
            Ok(env)
        })
        .map(|(id, _)| id)
    }
    fn send_again(&mut self, env: &PreparedEnvelope) -> Result<()> {
        note_send(self.rank, env);
        self.rank.send_envelope(env.by_ref()).map(drop)
    }
    fn recv(&mut self, timeout: Duration) -> Result<Option<ReceivedEnvelope>> {
        recv_within(self.rank, timeout)
    }
    fn shutdown(&mut self) -> Result<CallId> {
        // No NOOP may follow the SHUTDOWN.
        self.rank.stop_heartbeats();
        self.rank
            .send_next(Box::new(|ids| Ok(PreparedEnvelope::shutdown(ids))))
            .map(|(id, _)| id)
    }
}

/// Flight-recorder context for the envelope about to go out, so its header and payload ops carry
/// its ids in a dump.
fn note_send<D: DataPlane, S>(rank: &Rank<D>, env: &PreparedEnvelope<S>) {
    let h = env.header();
    rank.set_context(OpContext {
        call_id: h.call_id(),
        chunk_index: h.chunk_index(),
        cache_epoch: h.cache_epoch(),
        action: h.action().name().into(),
        phase: "send".into(),
    });
}

/// `Rank::try_recv_envelope`: `None` when no header started to arrive within `timeout`; a
/// frame that started is always read whole (a stall mid-frame is an error).
fn recv_within<D: DataPlane>(
    rank: &Rank<D>,
    timeout: Duration,
) -> Result<Option<ReceivedEnvelope>> {
    rank.try_recv_envelope(timeout)
}

/// A mesh rank's link: acceptance + relay + RESULTs, all the protocol's.
struct RankMesh<'a, D: DataPlane> {
    rank: &'a Rank<D>,
}

impl<D: DataPlane> MeshLink for RankMesh<'_, D> {
    type Buf = D::Buffer;
    fn recv_envelope(&mut self, timeout: Duration) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        self.rank.try_recv_envelope(timeout)
    }
    fn send_result(&mut self, env: PreparedEnvelope<D::Buffer>) -> Result<()> {
        note_send(self.rank, &env);
        self.rank.send_envelope(env).map(drop)
    }
    fn result_buffer(&self, bytes: usize) -> Result<Option<DeviceBuf>> {
        if !D::DEVICE_BUFFERS {
            return Ok(None);
        }
        let b = self.rank.mesh().plane().alloc(bytes)?;
        Ok(D::take_device(b).ok())
    }
    fn result_storage(&self, latent: ChunkLatent) -> Result<D::Buffer> {
        match latent {
            ChunkLatent::Host(v) => {
                let bytes = bytemuck::cast_slice::<f32, u8>(&v).to_vec();
                self.rank.mesh().plane().upload_owned(bytes)
            }
            ChunkLatent::Device(b) => D::from_device(b).map_err(|_| {
                Error::Invariant(format!(
                    "a device-resident RESULT on the {} data plane, whose buffers are host memory",
                    self.rank.mesh().plane().name()
                ))
            }),
        }
    }
    fn relay(
        &mut self,
        env: Option<ReceivedEnvelope<D::Buffer>>,
    ) -> Result<ReceivedEnvelope<D::Buffer>> {
        self.rank.relay_to_mesh(env)
    }
    fn to_host(&self, t: Tensor<D::Buffer>) -> Result<HostTensor> {
        let plane = self.rank.mesh().plane();
        t.map_data(|b| plane.take_host(b))
    }
    fn take_device(&self, buf: D::Buffer) -> std::result::Result<DeviceBuf, D::Buffer> {
        D::take_device(buf)
    }
    fn duplicates_dropped(&self) -> u64 {
        self.rank.dropped_duplicates()
    }
    fn set_phase(&mut self, phase: &'static str) {
        self.rank.recorder().set_phase(phase);
    }
}

/// The model's TP group: the `mesh` group's collective wrapper (guarded, recorded, bounded).
struct MeshComm<'a, D: DataPlane> {
    rank: &'a Rank<D>,
    me: GroupRank,
    size: u32,
}

impl<'a, D: DataPlane> MeshComm<'a, D> {
    fn new(rank: &'a Rank<D>) -> Result<Self> {
        let mesh = rank.mesh();
        let me = mesh.me().ok_or_else(|| {
            Error::Invariant(format!(
                "{} runs the generator but is not a member of `mesh`",
                rank.global()
            ))
        })?;
        Ok(Self {
            rank,
            me,
            size: mesh.size(),
        })
    }
}

impl<D: DataPlane> TpComm for MeshComm<'_, D> {
    fn rank(&self) -> GroupRank {
        self.me
    }
    fn size(&self) -> u32 {
        self.size
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        // A group of one moves nothing: no span (as `SoloComm`).
        let _span = (self.size > 1)
            .then(|| spans::collective("all_reduce", "f32", std::mem::size_of_val(buf) as u64));
        let out =
            self.rank
                .mesh()
                .all_reduce_f32(buf, &[buf.len() as u64], self.rank.deadline())?;
        if out.len() != buf.len() {
            return Err(Error::Invariant(format!(
                "mesh all_reduce returned {} values for {}",
                out.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn has_device_path(&self) -> bool {
        self.rank.mesh().has_device_path()
    }
    fn device_all_reduce_bf16(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
    ) -> Result<()> {
        let shape = [buf.len() as u64];
        // The span covers the enqueue (the sum itself runs on the model's stream; Nsight shows
        // the kernel under this range's name).
        let _s = spans::collective("device all_reduce", "bf16", shape[0] * 2);
        self.rank
            .mesh()
            .device_all_reduce(stream, buf, &shape, self.rank.deadline())
    }
    fn device_all_reduce_f32(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let shape = [buf.len() as u64];
        let _s = spans::collective("device all_reduce", "f32", shape[0] * 4);
        self.rank
            .mesh()
            .device_all_reduce(stream, buf, &shape, self.rank.deadline())
    }
    fn settle_device_ops(&mut self) {
        self.rank.mesh().settle_device_ops();
    }
    fn all_gather_u64(&mut self, local: &[u64]) -> Result<Vec<Vec<u64>>> {
        let _span = (self.size > 1)
            .then(|| spans::collective("all_gather", "u64", std::mem::size_of_val(local) as u64));
        let mesh = self.rank.mesh();
        let plane = mesh.plane();
        let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
        let send = crate::comm::DataPlane::upload(plane, &bytes)?;
        let recv = crate::comm::DataPlane::alloc(plane, bytes.len() * self.size as usize)?;
        // Counters travel as i64 bit patterns (u64 is not a wire dtype).
        let t = mesh.all_gather(send, recv, DType::I64, &[local.len() as u64])?;
        let out = crate::comm::DataPlane::download(plane, &mesh.wait(t, self.rank.deadline())?)?;
        if out.len() != bytes.len() * self.size as usize {
            return Err(Error::Invariant(format!(
                "mesh all_gather returned {} bytes, expected {}",
                out.len(),
                bytes.len() * self.size as usize
            )));
        }
        Ok(out
            .chunks_exact(bytes.len().max(1))
            .map(|r| {
                r.chunks_exact(8)
                    .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect()
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// One rank.

/// What a rank hands the parent after a clean run.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RankReport {
    rank: u32,
    spans: Vec<Span>,
    /// Rank 0: the run's numbers (mesh counters filled in by the parent).
    metrics: Option<Metrics>,
    chunks: u64,
    noops: u64,
    duplicates_dropped: u64,
    #[serde(default)]
    envelopes_awaiting_cts: u64,
    #[serde(default)]
    cuda_graphs: Option<usize>,
}

fn run_t0() -> Instant {
    let now = Instant::now();
    let Some(t0_us) = std::env::var(RUN_T0_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return now;
    };
    let now_us = unix_us();
    now.checked_sub(Duration::from_micros(now_us.saturating_sub(t0_us)))
        .unwrap_or(now)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn early_exit(rank: &str, e: &Error) -> i32 {
    let code = e.exit_code();
    let line = format!(
        "lockstep[{rank}]: exit {} ({}): {e}",
        code.code(),
        code.name()
    );
    diag(&line);
    crate::torchrun::write_error_file(
        &format!(
            "lockstep {rank}: exit {} ({}): {}",
            code.code(),
            code.name(),
            e.to_string().lines().next().unwrap_or("")
        ),
        &line,
        code,
    );
    code.code()
}

/// One rank of `lockstep run` (the environment names it). Returns its exit code; a failure after
/// bootstrap never returns (the protocol's abort path exits).
pub fn rank_main(args: &RunArgs) -> i32 {
    let env = match RankEnv::from_env() {
        Ok(e) => e,
        Err(e) => return early_exit("rank ?", &e),
    };
    let who = GlobalRank(env.rank).to_string();
    let s = match setup(args) {
        Ok(s) => s,
        Err(e) => return early_exit(&who, &e),
    };
    if env.world_size != s.tp + 1 {
        let e = Error::BadInput(format!(
            "WORLD_SIZE={} but --tp {} needs rank 0 + {} mesh ranks",
            env.world_size, s.tp, s.tp
        ));
        return early_exit(&who, &e);
    }
    let mut opts = match RankOptions::from_env() {
        Ok(o) => o,
        Err(e) => return early_exit(&who, &e),
    };
    if std::env::var_os("LOCKSTEP_WATCHDOG_MS").is_none() {
        opts.watchdog = s.timeout * 2;
        opts.op_timeout = s.timeout * 4;
    }
    fingerprint(&mut opts, args, &s);
    let backend = match backend_of(args) {
        Ok(b) => b,
        Err(e) => return early_exit(&who, &e),
    };
    match backend {
        Backend::Host => serve(Rank::bootstrap_host(&env, opts), &who, args, &s),
        Backend::Nccl => serve(crate::rank::bootstrap_nccl(&env, opts), &who, args, &s),
    }
}

/// `--backend` when given, else `LOCKSTEP_BACKEND` (default host).
fn backend_of(args: &RunArgs) -> Result<Backend> {
    match &args.backend {
        Some(b) => Backend::parse(b).map_err(|_| {
            Error::BadInput(format!(
                "--backend {b:?} is not a data plane (host or nccl)"
            ))
        }),
        None => Backend::from_env(),
    }
}

/// One bootstrapped rank's run, on whichever data plane.
fn serve<D: DataPlane>(rank: Result<Rank<D>>, who: &str, args: &RunArgs, s: &Setup) -> i32 {
    let rank = match rank {
        Ok(r) => r,
        Err(e) => return early_exit(who, &e),
    };
    let t0 = run_t0();
    let report = match run_rank(&rank, args, s, t0) {
        Ok(r) => r,
        Err(e) => rank.crash(&e),
    };
    if let Err(e) = write_report(&report) {
        rank.crash(&e);
    }
    if rank.is_driver() && std::env::var_os(RUN_DIR_ENV).is_none() {
        // Started without `lockstep run`'s parent (torchrun, Slurm): rank 0 reports what it has
        // (its own timeline; the mesh's counters stay 0).
        if let Some(m) = report.metrics.clone() {
            let own = Trace {
                rank: report.rank,
                t0: None,
                spans: report.spans.clone(),
            };
            if let Err(e) = publish(args, &m, &[own]) {
                rank.crash(&e);
            }
        }
    }
    match rank.finish() {
        Ok(()) => ExitCode::Clean.code(),
        Err(e) => watchdog::crash(&e, true),
    }
}

fn run_rank<D: DataPlane>(
    rank: &Rank<D>,
    args: &RunArgs,
    s: &Setup,
    t0: Instant,
) -> Result<RankReport> {
    let me = rank.global();
    let limits: Limits = rank.options().limits;
    // Fine-grained spans only when a trace was asked for (`crate::spans`: off costs nothing).
    spans::record_trace(args.trace.is_some());
    let timeline = || {
        let mut t = Trace::new(me.get(), t0);
        t.collect();
        t.spans
    };
    let mut graphs = StepGraphs::default();
    graphs.capture(&s.steps);
    if rank.is_driver() {
        let mut decoder = make_decoder(args, &s.cfg)?;
        let progress = (!args.quiet).then(|| {
            let pb = indicatif::ProgressBar::new(args.chunks);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} chunks {pos}/{len} [{bar:30}] {per_sec} eta {eta}",
            ) {
                pb.set_style(style);
            }
            pb
        });
        let dc = DriverConfig {
            cfg: s.cfg.clone(),
            chunks: args.chunks,
            queues: s.queues,
            hard_cut_every: args.hard_cut_every,
            policy: s.policy.clone(),
            graph_count: graphs.count(),
            timeout: s.timeout,
            noise_seed: args.seed,
            limits,
            progress,
            conditioning: conditioning_of(args, &s.cfg)?.map(std::sync::Arc::new),
        };
        rank.start_heartbeats(s.heartbeat)?;
        let mut link = RankDriver { rank };
        spans::set_lane("stage0");
        // Rank 0 serves a session: a server's (`Session::open` set the socket), or this run's
        // own fixed schedule, a session client on a thread of this process.
        let d = match crate::session::host::socket_from_env() {
            Some(sock) => crate::session::host::serve(&sock, &mut link, decoder.as_mut(), &dc),
            None => crate::session::schedule::run(&mut link, decoder.as_mut(), &dc),
        };
        if let Some(pb) = &dc.progress {
            pb.finish_and_clear();
        }
        let d = d?;
        // The data plane joins the summary's first line, so a log says which backend it measured.
        let what = format!(
            "{} / data plane {}, lane {}",
            decoder.name(),
            rank.plane().name(),
            rank.lane_transport()
        );
        let m = metrics(args, s, what, &d, t0.elapsed());
        return Ok(RankReport {
            rank: me.get(),
            spans: timeline(),
            metrics: Some(m),
            ..Default::default()
        });
    }
    let mut comm = MeshComm::new(rank)?;
    let mut gen: Box<dyn Generator> = match s.generator {
        GeneratorKind::Gpu => {
            // The rank's GPU by the NCCL plane's rule (`LOCKSTEP_GPU`, else LOCAL_RANK mod
            // #GPUs); on one GPU rank 0 and the mesh share it (rank 0 computes nothing there).
            // On a GPU data plane the model shares the plane's `Gpu` (one context, one set of
            // kernels; its TP sums run on NCCL in place, `TpComm::has_device_path`).
            let gpu = match rank.mesh().device_gpu() {
                Some(g) => g,
                None => {
                    let ordinal = crate::cuda::probe::rank_gpu_ordinal(rank.env().local_rank)?;
                    std::sync::Arc::new(crate::cuda::context::Gpu::open(ordinal)?)
                }
            };
            let shard = match &s.weights {
                Some(f) => DitShard::from_source(&s.cfg, f, comm.rank().get(), s.tp)?,
                None => DitShard::random(&s.cfg, args.seed, comm.rank().get(), s.tp)?,
            };
            // The variant the parity fingerprint carries (`exec.kernel_variant`).
            let variant = crate::cuda::attention::AttentionVariant::from_env()?;
            let mut model = GpuDit::from_shard(gpu, shard, variant)?;
            // The parity fingerprint carries the same variable (`exec.cuda_graphs`).
            model.set_cuda_graphs(
                std::env::var("LOCKSTEP_CUDA_GRAPHS").is_ok_and(|v| v == "on" || v == "1"),
            );
            Box::new(GpuGenerator::new(model))
        }
        GeneratorKind::Dit => match &s.weights {
            Some(f) => Box::new(DitGenerator::from_shard(DitShard::from_source(
                &s.cfg,
                f,
                comm.rank().get(),
                s.tp,
            )?)),
            None => Box::new(DitGenerator::new(&s.cfg, args.seed, comm.rank(), s.tp)?),
        },
        GeneratorKind::Calibrated => Box::new(CalibratedGenerator::new(&s.cfg, s.gen_cost)),
    };
    let mut mesh_rank = MeshRank::new(&mut comm, gen.as_mut(), me, &s.cfg)?;
    let mut link = RankMesh { rank };
    spans::set_lane("stage1");
    let r: MeshReport = if rank.is_mesh_leader() {
        run_leader(&mut mesh_rank, &mut link, &s.steps, s.timeout, &limits)?
    } else {
        run_follower(&mut mesh_rank, &mut link, &s.steps)?
    };
    drop(mesh_rank);
    let cuda_graphs = gen.captured_graphs();
    Ok(RankReport {
        rank: me.get(),
        spans: timeline(),
        metrics: None,
        chunks: r.chunks,
        noops: r.noops,
        duplicates_dropped: r.duplicates_dropped,
        envelopes_awaiting_cts: rank.envelopes_received_awaiting_cts(),
        cuda_graphs,
    })
}

/// `--conditioning`: the prompt tensor (read by the parent to refuse a bad file before any rank
/// starts, and by rank 0, which sends its values; the mesh ranks never read the file).
fn conditioning_of(args: &RunArgs, cfg: &DitConfig) -> Result<Option<PromptTensor>> {
    args.conditioning
        .as_ref()
        .map(|p| PromptTensor::from_safetensors(cfg, p, args.conditioning_tensor.as_deref()))
        .transpose()
}

fn report_path(dir: &Path, rank: u32) -> PathBuf {
    dir.join(format!("rank-{rank}.json"))
}

fn write_report(r: &RankReport) -> Result<()> {
    let Some(dir) = std::env::var_os(RUN_DIR_ENV).map(PathBuf::from) else {
        return Ok(());
    };
    let j = serde_json::to_vec(r)
        .map_err(|e| Error::Invariant(format!("rank report does not serialize: {e}")))?;
    let p = report_path(&dir, r.rank);
    std::fs::write(&p, j).map_err(|e| Error::io(format!("writing {}", p.display()), e))
}

fn metrics(
    args: &RunArgs,
    s: &Setup,
    decoder: String,
    d: &DriverReport,
    wall: Duration,
) -> Metrics {
    let n = d.emitted.len().max(1) as f64;
    let s0_ms = d.s0_total.as_secs_f64() * 1e3 / n;
    let s1: Vec<f64> = d.s1_us.iter().map(|us| *us as f64 / 1e3).collect();
    let s1_ms = steady_mean(&s1);
    let period_ms = steady_period(&d.emit_s) * 1e3;
    let (e, eta) = overlap(s0_ms, s1_ms, period_ms);
    let mut lat = d.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    Metrics {
        preset: s.cfg.name.into(),
        generator: format!(
            "{} / decoder {decoder}",
            match s.generator {
                GeneratorKind::Gpu => match &s.weights {
                    Some(f) => format!("{} DiT (GPU, bf16), weights {}", s.cfg.name, f.digest()),
                    None => format!("{} DiT (GPU, bf16)", s.cfg.name),
                },
                GeneratorKind::Dit => match &s.weights {
                    Some(f) => format!("tiny DiT (CPU), weights {}", f.digest()),
                    None => "tiny DiT (CPU)".to_string(),
                },
                GeneratorKind::Calibrated => format!("calibrated {} ms/call", args.gen_cost_ms),
            }
        ),
        tp: s.tp,
        depth_in: s.queues.d_in,
        depth_out: s.queues.d_out,
        backpressure: s.queues.backpressure,
        chunks_requested: args.chunks,
        chunks_emitted: d.emitted.len() as u64,
        generator_calls: d.generator_calls,
        recompute_calls: d.recompute_calls,
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
        video_fps: if period_ms > 0.0 {
            1e3 / period_ms * (s.cfg.frames_per_chunk * VIDEO_FRAMES_PER_LATENT_FRAME) as f64
        } else {
            0.0
        },
        latency_p50_ms: percentile(&lat, 0.5),
        latency_p99_ms: percentile(&lat, 0.99),
        stale_dropped: d.stats.stale_dropped,
        flushed_undecoded: d.stats.flushed_undecoded,
        duplicates_dropped: 0,
        envelopes_awaiting_cts: 0,
        hard_cuts: d.stats.hard_cuts,
        noops_sent: 0,
        cuda_graphs: None,
        max_in_flight: d.stats.max_in_flight,
        max_ready: d.stats.max_ready,
        wall_s: wall.as_secs_f64(),
        emitted: d.emitted.clone(),
        stale: d.stale.clone(),
        frames_dir: args.frames_out.as_ref().map(|p| p.display().to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// `LaunchArgs` built through its own parser, so the launcher's defaults apply.
#[derive(clap::Parser, Debug)]
struct LaunchCli {
    #[command(flatten)]
    launch: crate::launch::LaunchArgs,
}

/// `lockstep run` without `RANK`: validate, launch rank 0 + the mesh as processes running this
/// same command line, then merge their reports.
pub fn launch_run(args: &RunArgs) -> i32 {
    match launch_and_report(args) {
        Ok(code) => code,
        Err(e) => {
            let code = e.exit_code();
            diag(&format!(
                "lockstep run: exit {} ({}): {e}",
                code.code(),
                code.name()
            ));
            code.code()
        }
    }
}

/// Removes `lockstep-run-<pid>-*` folders (the per-run report exchange) left by a `lockstep run`
/// that was SIGKILLed (no chance to clean up): those whose pid is no longer alive.
fn sweep_dead_run_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("lockstep-run-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = pid > 0
            && (unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if !alive && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// An output file the run will write at its end must be writable now: a run of an hour must not
/// end in a write error. Checks the parent is a writable directory and the path is not one.
fn check_output_file(flag: &str, path: &std::path::Path) -> Result<()> {
    let bad = |why: String| Error::BadInput(format!("{flag} {}: {why}", path.display()));
    if path.is_dir() {
        return Err(bad("is a directory".into()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(bad(format!(
            "its directory {} does not exist",
            parent.display()
        )));
    }
    let probe = parent.join(format!(".lockstep-write-check-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| bad(format!("cannot write there: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn launch_and_report(args: &RunArgs) -> Result<i32> {
    // Refuse what every rank would refuse, before any process exists.
    let s = setup(args)?;
    if let Some(p) = &args.metrics {
        check_output_file("--metrics", p)?;
    }
    if let Some(p) = &args.trace {
        check_output_file("--trace", p)?;
    }
    if let Some(p) = &args.video_out {
        check_output_file("--video-out", p)?;
    }
    conditioning_of(args, &s.cfg)?;
    if let Some(d) = &args.frames_out {
        std::fs::create_dir_all(d).map_err(|e| {
            Error::BadInput(format!(
                "--frames-out {}: cannot create it: {e}",
                d.display()
            ))
        })?;
    }
    let backend = backend_of(args)?;
    if let Ok(f) = std::env::var("LOCKSTEP_FAULT") {
        crate::fault::parse(&f)?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("locating this executable", e))?;
    sweep_dead_run_dirs();
    let dir = std::env::temp_dir().join(format!(
        "lockstep-run-{}-{:x}",
        std::process::id(),
        unix_us()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // The ranks inherit these (the parent is still single-threaded here).
    std::env::set_var(RUN_DIR_ENV, &dir);
    std::env::set_var(RUN_T0_ENV, unix_us().to_string());
    std::env::set_var("LOCKSTEP_BACKEND", backend.name());
    let mut argv: Vec<std::ffi::OsString> =
        vec!["launch".into(), "-n".into(), (s.tp + 1).to_string().into()];
    if let Some(d) = std::env::var_os("LOCKSTEP_DUMP_DIR") {
        argv.extend(["--dump-dir".into(), d]);
    }
    argv.extend(["--".into(), exe.into_os_string()]);
    argv.extend(std::env::args_os().skip(1));
    let cli = <LaunchCli as clap::Parser>::try_parse_from(argv)
        .map_err(|e| Error::BadInput(format!("launcher arguments: {e}")))?;
    let t0 = Instant::now();
    let code = crate::launch::main(&cli.launch);
    let wall = t0.elapsed();
    let out = if code == ExitCode::Clean.code() {
        report(args, &dir, s.tp + 1, wall).map(|()| code)
    } else {
        let name = match ExitCode::from_code(code) {
            Some(c) => c.name().to_string(),
            None if code > 128 => format!("a rank was killed by signal {}", code - 128),
            None => "unknown".into(),
        };
        diag(&format!(
            "lockstep run failed: exit {code} ({name}); the failing rank's diagnosis is above"
        ));
        Ok(code)
    };
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn read_report(dir: &Path, rank: u32) -> Result<RankReport> {
    let p = report_path(dir, rank);
    let b = std::fs::read(&p).map_err(|e| {
        Error::io(
            format!(
                "global-rank {rank} exited cleanly but left no report {}",
                p.display()
            ),
            e,
        )
    })?;
    serde_json::from_slice(&b)
        .map_err(|e| Error::Decode(format!("report of global-rank {rank}: {e}")))
}

fn report(args: &RunArgs, dir: &Path, world: u32, wall: Duration) -> Result<()> {
    let reports: Vec<RankReport> = (0..world)
        .map(|r| read_report(dir, r))
        .collect::<Result<_>>()?;
    let mut m = reports
        .first()
        .and_then(|r| r.metrics.clone())
        .ok_or_else(|| Error::Invariant("rank 0's report carries no metrics".into()))?;
    if let Some(leader) = reports.get(1) {
        m.duplicates_dropped = leader.duplicates_dropped;
        m.envelopes_awaiting_cts = leader.envelopes_awaiting_cts;
        m.noops_sent = leader.noops;
        m.cuda_graphs = leader.cuda_graphs;
    }
    m.wall_s = wall.as_secs_f64();
    let traces: Vec<Trace> = reports
        .into_iter()
        .map(|r| Trace {
            rank: r.rank,
            t0: None,
            spans: r.spans,
        })
        .collect();
    publish(args, &m, &traces)
}

/// Summary on stdout, `--metrics` and `--trace` files.
fn publish(args: &RunArgs, m: &Metrics, traces: &[Trace]) -> Result<()> {
    println!("{}", m.summary());
    if let Some(p) = &args.metrics {
        let j = serde_json::to_vec_pretty(m)
            .map_err(|e| Error::Invariant(format!("metrics do not serialize: {e}")))?;
        std::fs::write(p, j).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    if let Some(p) = &args.trace {
        let j = serde_json::to_vec(&chrome_trace(traces))
            .map_err(|e| Error::Invariant(format!("trace does not serialize: {e}")))?;
        std::fs::write(p, j).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    Ok(())
}
