//! `lockstep harness` (hidden): a small but real protocol run for the multi-process break-it
//! tests. It drives the production components (bootstrap, parity, envelopes, relay, guarded
//! collectives, heartbeats, watchdog, drain) with a stand-in generator (one TP all_reduce per
//! generator call); faults come only from `LOCKSTEP_FAULT`.
//!
//! Rank 0 sends `--chunks` INFERs (meta: expected generator calls and the latent shape, one
//! `latents` tensor and one `cond` tensor), waits for each RESULT and checks its values, then
//! drains (SHUTDOWN, goodbye, exit 0). The mesh leader accepts, relays to the mesh; every mesh
//! rank validates shapes before any forward, counts generator calls against the plan before
//! each call and before the chunk-end collective; the leader answers with a RESULT.
//!
//! Backend: `LOCKSTEP_BACKEND=host|nccl` (default host; `Backend::from_env`). Every scenario is
//! generic over the data plane, so the break-it suite runs unchanged on NCCL. The backend's name
//! is a parity field, so ranks that disagree fail at startup.
//!
//! Scenario `envelope` (2 ranks): the issue-6 envelope (INFER with a 600 KB latent and a 4 MB
//! conditioning tensor, RESULT with a 600 KB tensor) through `Rank`, then the same bytes as raw
//! data-plane ops on the same `pp` communicator, then rank 0's host staging copies alone — all in
//! one run, so `protocol overhead = Rank round trip − raw round trip` uses one baseline.
use lockstep::comm::{DataPlane, NullPlane};
use lockstep::error::{Error, Result};
use lockstep::fault::{self, points};

use lockstep::ids::GroupRank;
use lockstep::pipeline::report::percentile;
use lockstep::rank::{Backend, Rank, RankEnv, RankOptions};
use lockstep::wire::{
    prepare, prepare_untyped, Action, DType, EnvelopeIds, HostTensor, Limits, PreparedEnvelope,
    ReceivedEnvelope, Tensor, TensorBytes,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct HarnessArgs {
    /// Scenario: stream, bench (header + one-tensor envelope round trips), envelope (issue-6
    /// envelope through `Rank` vs raw data-plane ops; see the module doc).
    #[arg(default_value = "stream")]
    pub scenario: String,
    #[arg(long, default_value_t = 3)]
    pub chunks: u64,
    /// Generator calls per chunk (the plan).
    #[arg(long, default_value_t = 2)]
    pub generator_calls: u32,
    /// Rank 0 idles this long before each chunk after the first (C4).
    #[arg(long, default_value_t = 0)]
    pub idle_ms: u64,
    /// NOOP heartbeat interval; 0 turns heartbeats off.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Watchdog timeout (overrides LOCKSTEP_WATCHDOG_MS).
    #[arg(long)]
    pub watchdog_ms: Option<u64>,
    /// Rank 0 holds after the first chunk, heartbeating, until killed (C1, C3).
    #[arg(long)]
    pub hold: bool,
    /// bench: round trips per measurement.
    #[arg(long, default_value_t = 20000)]
    pub iters: u64,
    /// bench: payload bytes of the envelope round trip.
    #[arg(long, default_value_t = 4_600_000)]
    pub payload_bytes: u64,
    /// Latent frames per chunk (the `latents` tensor is [frames, 4, 8]).
    #[arg(long, default_value_t = 3)]
    pub frames: u64,
    /// envelope: bytes of the latent, conditioning and result tensors.
    #[arg(long, default_value_t = 600 * 1024)]
    pub latent_bytes: u64,
    #[arg(long, default_value_t = 4 << 20)]
    pub cond_bytes: u64,
    #[arg(long, default_value_t = 600 * 1024)]
    pub result_bytes: u64,
    /// stream: keep envelope tensors device-resident (the envelope API over `D::Buffer`, and
    /// `recycle`); the checks read host copies.
    #[arg(long)]
    pub device: bool,
}

/// The harness's typed meta (stands in for the phase plan).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkPlan {
    expected_generator_calls: u32,
    latent_shape: Vec<u64>,
    guidance: f32,
}

pub fn main(args: &HarnessArgs) -> i32 {
    if !["stream", "bench", "envelope", "protocol"].contains(&args.scenario.as_str()) {
        lockstep::diag!("harness: unknown scenario {:?}", args.scenario);
        return lockstep::exit::ExitCode::BadInput.code();
    }
    let setup = || -> Result<(RankEnv, RankOptions, Backend)> {
        let env = RankEnv::from_env()?;
        let mut opts = RankOptions::from_env()?;
        if let Some(ms) = args.watchdog_ms {
            opts.watchdog = Duration::from_millis(ms);
            opts.op_timeout = opts.watchdog * 2;
        }
        opts.fingerprint
            .set("harness.generator_calls", args.generator_calls);
        Ok((env, opts, Backend::from_env()?))
    };
    let (env, opts, backend) = match setup() {
        Ok(v) => v,
        Err(e) => {
            lockstep::diag!("harness: {e}");
            return e.exit_code().code();
        }
    };
    if args.scenario == "protocol" {
        // The protocol's own cost: `Rank` over a plane that moves no bytes (see `comm::null`).
        let rank = Rank::bootstrap_with(&env, opts, |_, _| Ok((NullPlane, String::new())));
        return run(rank, &env, args);
    }
    match backend {
        Backend::Host => run(Rank::bootstrap_host(&env, opts), &env, args),
        Backend::Nccl => run(lockstep::rank::bootstrap_nccl(&env, opts), &env, args),
    }
}

fn run<D: DataPlane>(rank: Result<Rank<D>>, env: &RankEnv, args: &HarnessArgs) -> i32 {
    let rank = match rank {
        Ok(r) => r,
        Err(e) => {
            lockstep::diag!(
                "lockstep[global-rank {}]: exit {} ({}): {e}",
                env.rank,
                e.exit_code().code(),
                e.exit_code().name()
            );
            return e.exit_code().code();
        }
    };
    let r = match (args.scenario.as_str(), rank.is_driver()) {
        ("bench", true) => bench_driver(&rank, args),
        ("bench", false) => bench_mesh(&rank),
        ("envelope", true) => envelope_driver(&rank, args),
        ("envelope", false) => envelope_mesh(&rank, args),
        ("protocol", true) => protocol_driver(&rank, args),
        ("protocol", false) => protocol_mesh(&rank, args),
        (_, true) => driver(&rank, args),
        (_, false) => mesh(&rank, args),
    };
    match r {
        Ok(()) => match rank.finish() {
            Ok(()) => 0,
            Err(e) => lockstep::comm::watchdog::crash(&e, true),
        },
        Err(e) => rank.crash(&e),
    }
}

fn latent_shape(args: &HarnessArgs) -> Vec<u64> {
    vec![args.frames, 4, 8]
}

fn driver<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    if args.heartbeat_ms > 0 {
        rank.start_heartbeats(Duration::from_millis(args.heartbeat_ms))?;
    }
    if fault::hit(points::NON_MEMBER_COLLECTIVE) {
        // B1 guard: rank 0 is not in `mesh`; the wrapper must refuse before the call.
        rank.mesh().all_reduce_f32(&[1.0], &[1], rank.deadline())?;
    }
    let shape = latent_shape(args);
    let numel: u64 = shape.iter().product();
    let tp = rank.tp_size();
    for chunk in 0..args.chunks {
        if chunk > 0 && args.idle_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.idle_ms));
        }
        let latents: Vec<f32> = (0..numel).map(|i| (chunk * 1000 + i) as f32).collect();
        let plan = ChunkPlan {
            expected_generator_calls: args.generator_calls,
            latent_shape: shape.clone(),
            guidance: if fault::hit(points::META_NAN) {
                f32::NAN
            } else {
                5.0
            },
        };
        let mut tensors = vec![
            HostTensor::from_f32("latents", shape.clone(), &latents),
            HostTensor::from_f32("cond", vec![4], &[chunk as f32; 4]),
        ];
        if fault::hit(points::DTYPE_BOOL) {
            tensors.push(HostTensor::new(
                "mask",
                DType::Bool,
                vec![4],
                vec![1, 0, 1, 0],
            ));
        }
        let nested = fault::hit(points::NESTED_TENSOR);
        let json = nested.then(|| {
            format!(
                r#"{{"expected_generator_calls":{},"latent_shape":{:?},"guidance":5.0,"extra":{{"mask":{{"dtype":"f32","shape":[4],"data":[1,0,1,0]}}}}}}"#,
                args.generator_calls, shape
            )
        });
        fn build<S: TensorBytes>(
            ids: EnvelopeIds,
            json: Option<&str>,
            plan: &ChunkPlan,
            tensors: Vec<Tensor<S>>,
        ) -> Result<PreparedEnvelope<S>> {
            match json {
                Some(j) => prepare_untyped(Action::Infer, ids, j, tensors, &Limits::default()),
                None => prepare(Action::Infer, ids, plan, tensors, &Limits::default()),
            }
        }
        let res = if args.device {
            let dev = upload_tensors(rank, &tensors)?;
            rank.send_next(|ids| build(ids.with_chunk(chunk), json.as_deref(), &plan, dev))?;
            host_copy(
                rank,
                rank.recv_envelope::<D::Buffer>(Some(rank.deadline()))?,
            )?
        } else {
            rank.send_next(|ids| build(ids.with_chunk(chunk), json.as_deref(), &plan, tensors))?;
            rank.recv_envelope::<Vec<u8>>(Some(rank.deadline()))?
        };
        if res.action() != Action::Result || res.header.chunk_index != chunk {
            return Err(Error::Invariant(format!(
                "harness: expected RESULT for chunk_index {chunk}, got {} chunk_index {}",
                res.action().name(),
                res.header.chunk_index
            )));
        }
        let out = res.tensor("out").and_then(|t| t.to_f32()).ok_or_else(|| {
            Error::Invariant("harness: RESULT without an f32 `out` tensor".into())
        })?;
        // Each generator call all-reduces (cond + group rank); after the plan's calls every
        // value equals calls × Σ_r (chunk + r).
        let want = f64::from(args.generator_calls)
            * (0..tp).map(|r| (chunk + u64::from(r)) as f64).sum::<f64>();
        if out.iter().any(|&v| (f64::from(v) - want).abs() > 1e-3) {
            return Err(Error::Invariant(format!(
                "harness: chunk {chunk} result {out:?}, expected {want}"
            )));
        }
        lockstep::diag!("harness[global-rank 0]: chunk {chunk} ok ({out:?})");
        if args.hold {
            lockstep::diag!(
                "harness[global-rank 0]: holding (heartbeats on); pid {}",
                std::process::id()
            );
            loop {
                std::thread::park();
            }
        }
        if fault::hit(points::KILL_DRIVER) {
            lockstep::diag!("harness[global-rank 0]: fault: SIGKILL self");
            // SAFETY: signalling our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
    rank.stop_heartbeats();
    rank.send_next(|ids| Ok(lockstep::wire::PreparedEnvelope::shutdown(ids)))?;
    if args.device {
        lockstep::diag!(
            "harness[global-rank 0]: device-resident: {} receive buffer(s) allocated for {} RESULT(s)",
            rank.recv_buffers_allocated(),
            args.chunks
        );
    }
    lockstep::diag!("harness[global-rank 0]: drained: SHUTDOWN sent");
    Ok(())
}

fn mesh<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    let me = rank
        .mesh()
        .me()
        .ok_or_else(|| Error::Invariant("harness: mesh rank outside `mesh`".into()))?;
    let mut told_idle = false;
    let mut infers = 0u64;
    loop {
        let leader = rank.is_mesh_leader();
        let env = if args.device {
            let got = if leader {
                Some(rank.recv_envelope::<D::Buffer>(None)?)
            } else {
                None
            };
            host_copy(rank, rank.relay_to_mesh::<D::Buffer, D::Buffer>(got)?)?
        } else {
            let got = if leader {
                Some(rank.recv_envelope::<Vec<u8>>(None)?)
            } else {
                None
            };
            rank.relay_to_mesh::<Vec<u8>, Vec<u8>>(got)?
        };
        match env.action() {
            Action::Noop => {
                if args.hold && rank.is_mesh_leader() && !told_idle {
                    told_idle = true;
                    lockstep::diag::line(&format!(
                        "harness[global-rank 1]: idle between chunks (heartbeat call_id {}), waiting for a header",
                        env.header.call_id
                    ));
                }
                continue;
            }
            Action::Shutdown => {
                if args.device {
                    lockstep::diag!(
                        "harness[{}]: device-resident: {} receive buffer(s) allocated for {infers} INFER(s)",
                        rank.global(),
                        rank.recv_buffers_allocated()
                    );
                }
                lockstep::diag!("harness[{}]: SHUTDOWN received; draining", rank.global());
                return Ok(());
            }
            Action::Result => {
                return Err(Error::Invariant("harness: RESULT sent to the mesh".into()))
            }
            Action::Infer => infers += 1,
        }
        let meta = env
            .meta
            .as_ref()
            .ok_or_else(|| Error::Invariant("harness: INFER without meta".into()))?;
        let plan: ChunkPlan = meta.body_as()?;
        rank.recorder().set_phase("validate");
        // Shapes are the pipeline's contract to check (G3 runs on `pipeline/envelope.rs`); the
        // harness only refuses what it cannot compute with.
        let expect = latent_shape(args);
        let latents = env
            .tensor("latents")
            .ok_or_else(|| Error::Invariant("harness: envelope without `latents`".into()))?;
        if latents.shape != expect || plan.latent_shape != expect {
            return Err(Error::Invariant(format!(
                "harness: tensor `latents` has shape {:?} (plan says {:?}), expected {:?}",
                latents.shape, plan.latent_shape, expect
            )));
        }
        let cond = env
            .tensor("cond")
            .and_then(|t| t.to_f32())
            .ok_or_else(|| Error::Invariant("harness: envelope without f32 `cond`".into()))?;
        rank.recorder().set_phase("generator");
        // The plan's call count is the pipeline's to check (B2 runs on `pipeline/stage1.rs`);
        // this stand-in generator makes exactly the calls its plan names.
        let contrib: Vec<f32> = cond.iter().map(|c| c + me.0 as f32).collect();
        let mut acc = vec![0f32; contrib.len()];
        let mut calls = 0u32;
        for _ in 0..plan.expected_generator_calls {
            let out = generator_call(rank, &contrib)?;
            for (a, o) in acc.iter_mut().zip(out) {
                *a += o;
            }
            calls += 1;
            rank.progress();
        }
        rank.recorder().set_phase("chunk_end");
        // Chunk-end state digest: every mesh rank must have made the same number of calls.
        let sum = rank
            .mesh()
            .all_reduce_f32(&[calls as f32], &[1], rank.deadline())?;
        let want = calls as f32 * rank.tp_size() as f32;
        if sum.first().copied() != Some(want) {
            return Err(Error::Invariant(format!(
                "state digest drift at chunk end: Σ generator calls {sum:?}, expected {want}"
            )));
        }
        if rank.is_mesh_leader() {
            rank.recorder().set_phase("result");
            let h = env.header;
            let ids = EnvelopeIds::of(&h);
            let out = vec![HostTensor::from_f32("out", vec![acc.len() as u64], &acc)];
            if args.device {
                let dev = upload_tensors(rank, &out)?;
                let sent = rank.send_envelope(prepare(
                    Action::Result,
                    ids,
                    &plan,
                    dev,
                    &Limits::default(),
                )?)?;
                if sent.len() != 1 {
                    return Err(Error::Invariant(format!(
                        "harness: send_envelope handed back {} tensors, sent 1",
                        sent.len()
                    )));
                }
            } else {
                rank.send_envelope(prepare(
                    Action::Result,
                    ids,
                    &plan,
                    out,
                    &Limits::default(),
                )?)?;
            }
        }
    }
}

/// `--device`: host tensors → data-plane buffers (what a producer on the device would hand over).
fn upload_tensors<D: DataPlane>(
    rank: &Rank<D>,
    tensors: &[HostTensor],
) -> Result<Vec<Tensor<D::Buffer>>> {
    tensors
        .iter()
        .map(|t| t.clone().map_data(|d| rank.plane().upload(&d)))
        .collect()
}

/// `--device`: a host copy of a device-resident envelope for the checks; the buffers go back to
/// the receive pool, so the next envelope of the same manifest reuses them.
fn host_copy<D: DataPlane>(
    rank: &Rank<D>,
    env: ReceivedEnvelope<D::Buffer>,
) -> Result<ReceivedEnvelope> {
    let mut tensors = Vec::with_capacity(env.tensors.len());
    for t in &env.tensors {
        tensors.push(HostTensor::new(
            t.name.clone(),
            t.dtype,
            t.shape.clone(),
            rank.plane().download(&t.data)?,
        ));
    }
    rank.recycle(env.tensors);
    Ok(ReceivedEnvelope {
        header: env.header,
        meta: env.meta,
        tensors,
    })
}

/// One stand-in generator call: one TP all_reduce on `mesh` (or, under faults, on `world`, on
/// `pp`, or in another dtype).
fn generator_call<D: DataPlane>(rank: &Rank<D>, contrib: &[f32]) -> Result<Vec<f32>> {
    let shape = [contrib.len() as u64];
    let d = Instant::now() + rank.options().op_timeout;
    if fault::hit(points::TP_ON_WORLD) {
        return rank.world().all_reduce_f32(contrib, &shape, d);
    }
    if fault::hit(points::TP_ON_PP) {
        return rank.pp().all_reduce_f32(contrib, &shape, d);
    }
    if fault::hit(points::DTYPE_SKEW) {
        let bf: Vec<u8> = contrib
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let g = rank.mesh();
        let t = g.all_reduce_sum(g.plane().upload(&bf)?, DType::Bf16, &shape)?;
        let out = g.plane().download(&g.wait(t, d)?)?;
        return Ok(out
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect());
    }
    rank.mesh().all_reduce_f32(contrib, &shape, d)
}

/// The `q` quantile of sorted samples (the library's [`percentile`]); NaN when there are none.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        f64::NAN
    } else {
        percentile(sorted, q)
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| quantile(&v, q);
    (
        at(0.5),
        at(0.99),
        v.iter().sum::<f64>() / v.len().max(1) as f64,
    )
}

/// bench (rank 0): header round trips (NOOP → RESULT header), then envelope round trips carrying
/// `payload_bytes` of tensors to the leader (answered by a header-only RESULT).
fn bench_driver<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Empty {}
    let mut header_us = Vec::new();
    let warm = 500u64;
    for i in 0..(args.iters + warm) {
        let t = Instant::now();
        rank.send_next(|ids| Ok(lockstep::wire::PreparedEnvelope::noop(ids)))?;
        rank.recv_envelope::<Vec<u8>>(Some(rank.deadline()))?;
        if i >= warm {
            header_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let n = (args.payload_bytes / 4) as usize;
    let t_data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let tensor = HostTensor::from_f32("payload", vec![n as u64], &t_data);
    let iters = (args.iters / 100).clamp(20, 200);
    let mut env_us = Vec::new();
    for i in 0..(iters + 5) {
        let t = Instant::now();
        rank.send_next(|ids| {
            prepare(
                Action::Infer,
                ids.with_chunk(i),
                &Empty {},
                vec![tensor.clone()],
                &Limits::default(),
            )
        })?;
        rank.recv_envelope::<Vec<u8>>(Some(rank.deadline()))?;
        if i >= 5 {
            env_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (h50, h99, hmean) = percentiles(header_us);
    let (e50, e99, emean) = percentiles(env_us);
    println!(
        "{{\"bench\":\"wire.header_rtt\",\"iters\":{},\"p50_us\":{h50:.2},\"p99_us\":{h99:.2},\"mean_us\":{hmean:.2}}}",
        args.iters
    );
    println!(
        "{{\"bench\":\"wire.envelope_rtt\",\"payload_bytes\":{},\"iters\":{iters},\"p50_us\":{e50:.1},\"p99_us\":{e99:.1},\"mean_us\":{emean:.1},\"p50_gbps\":{:.3}}}",
        n * 4,
        (n * 4) as f64 / e50 / 1e3
    );
    rank.send_next(|ids| Ok(lockstep::wire::PreparedEnvelope::shutdown(ids)))?;
    Ok(())
}

/// bench (mesh): the leader answers every envelope with a header-only RESULT.
fn bench_mesh<D: DataPlane>(rank: &Rank<D>) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Empty {}
    if !rank.is_mesh_leader() {
        return Ok(());
    }
    loop {
        let env = rank.recv_envelope::<Vec<u8>>(None)?;
        if env.action() == Action::Shutdown {
            return Ok(());
        }
        let h = env.header;
        rank.send_envelope(prepare(
            Action::Result,
            EnvelopeIds::of(&h),
            &Empty {},
            Vec::<HostTensor>::new(),
            &Limits::default(),
        )?)?;
    }
}

/// Deterministic bytes for a tensor of `n` bytes (checked once at the far end).
fn pattern(n: u64, salt: u64) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + salt) % 251) as u8).collect()
}

fn u8_tensor(name: &str, n: u64, salt: u64) -> HostTensor {
    HostTensor::new(name, DType::U8, vec![n], pattern(n, salt))
}

const ENVELOPE_WARMUP: u64 = 10;

fn json_row(bench: &str, backend: &str, bytes: u64, samples: Vec<f64>) -> (f64, String) {
    let n = samples.len();
    let mut v = samples;
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| quantile(&v, q);
    let p50 = at(0.5);
    (
        p50,
        format!(
            "{{\"bench\":\"{bench}\",\"backend\":\"{backend}\",\"bytes\":{bytes},\"iters\":{n},\"p50_us\":{p50:.2},\"p10_us\":{:.2},\"p90_us\":{:.2}}}",
            at(0.1),
            at(0.9)
        ),
    )
}

/// envelope (rank 0): see the module doc. Prints `RESULT {json}` lines.
fn envelope_driver<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Empty {}
    let iters = args.iters.max(1);
    let total = ENVELOPE_WARMUP + iters;
    let backend = rank.plane().name();
    let latent = u8_tensor("latents", args.latent_bytes, 2);
    let cond = u8_tensor("cond", args.cond_bytes, 3);
    let want = pattern(args.result_bytes, 4);
    let bytes = args.latent_bytes + args.cond_bytes + args.result_bytes;

    // 1. Through the protocol: preflight, header + meta on the lane, tensors on `pp`, acceptance
    // and manifest-driven receive on the leader, the RESULT back the same way.
    let mut through_rank = Vec::new();
    for i in 0..total {
        // The caller hands its tensors over (no copy inside the timed region).
        let tensors = vec![latent.clone(), cond.clone()];
        let t = Instant::now();
        rank.send_next(|ids| {
            prepare(
                Action::Infer,
                ids.with_chunk(i),
                &Empty {},
                tensors,
                &Limits::default(),
            )
        })?;
        let res = rank.recv_envelope::<Vec<u8>>(Some(rank.deadline()))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 && res.tensor("out").map(|t| &t.data) != Some(&want) {
            return Err(Error::Invariant(
                "envelope bench: RESULT bytes differ from what the leader sent".into(),
            ));
        }
        if i >= ENVELOPE_WARMUP {
            through_rank.push(us);
        }
    }

    // 1b. Through the protocol with device-resident tensors: the same envelope, its tensors in
    // data-plane buffers uploaded once (handed back by each send), the RESULT received into a
    // recycled buffer. No host staging: Rank − raw here is the protocol's own cost.
    let plane = rank.plane();
    let mut dev = vec![
        latent.clone().map_data(|d| plane.upload(&d))?,
        cond.clone().map_data(|d| plane.upload(&d))?,
    ];
    let mut through_rank_device = Vec::new();
    for i in 0..total {
        let t = Instant::now();
        let (_, back) = rank.send_next(|ids| {
            prepare(
                Action::Infer,
                ids.with_chunk(total + i),
                &Empty {},
                dev,
                &Limits::default(),
            )
        })?;
        dev = back;
        let res = rank.recv_envelope::<D::Buffer>(Some(rank.deadline()))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 {
            let got = res
                .tensor("out")
                .map(|t| plane.download(&t.data))
                .transpose()?;
            if got.as_ref() != Some(&want) {
                return Err(Error::Invariant(
                    "envelope bench: device RESULT bytes differ from what the leader sent".into(),
                ));
            }
        }
        rank.recycle(res.tensors);
        if i >= ENVELOPE_WARMUP {
            through_rank_device.push(us);
        }
    }
    drop(dev);

    // 2. The same bytes as raw data-plane ops on the same `pp` communicator (no header, no
    // recorder, no staging): the transfer floor this run can reach.
    let comm = rank.pp().raw_comm().ok_or_else(|| {
        Error::Invariant("envelope bench: rank 0 holds no `pp` communicator".into())
    })?;
    let peer = GroupRank(1);
    let mut l = plane.upload(&latent.data)?;
    let mut c = plane.upload(&cond.data)?;
    let mut r = plane.alloc(args.result_bytes as usize)?;
    let mut raw = Vec::new();
    for i in 0..total {
        let d = rank.deadline();
        let t = Instant::now();
        plane.group_start(comm)?;
        let a = plane.send(comm, l, peer);
        let b = plane.send(comm, c, peer);
        plane.group_end(comm)?;
        l = plane.wait(a?, d)?;
        c = plane.wait(b?, d)?;
        r = plane.wait(plane.recv(comm, r, peer)?, d)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i == 0 && plane.download(&r)? != want {
            return Err(Error::Invariant(
                "envelope bench: raw result bytes differ from what the leader sent".into(),
            ));
        }
        if i >= ENVELOPE_WARMUP {
            raw.push(us);
        }
        rank.progress();
    }

    // 3. The host staging copies the host-tensor API implies for one round trip (both sides'
    // uploads and downloads, done here on this rank's device).
    let mut staging = Vec::new();
    for i in 0..total {
        let t = Instant::now();
        let a = plane.upload(&latent.data)?;
        let b = plane.upload(&cond.data)?;
        let _ = plane.download(&a)?;
        let _ = plane.download(&b)?;
        let o = plane.upload(&want)?;
        let _ = plane.download(&o)?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i >= ENVELOPE_WARMUP {
            staging.push(us);
        }
    }
    rank.send_next(|ids| Ok(lockstep::wire::PreparedEnvelope::shutdown(ids)))?;

    let (p_rank, row_rank) = json_row("envelope.rank", backend, bytes, through_rank);
    let (p_dev, row_dev) = json_row("envelope.rank_device", backend, bytes, through_rank_device);
    let (p_raw, row_raw) = json_row("envelope.raw", backend, bytes, raw);
    let (p_stage, row_stage) = json_row("envelope.staging", backend, bytes, staging);
    println!("RESULT {row_rank}");
    println!("RESULT {row_dev}");
    println!("RESULT {row_raw}");
    println!("RESULT {row_stage}");
    println!(
        "RESULT {{\"bench\":\"envelope.overhead\",\"backend\":\"{backend}\",\"rank_minus_raw_p50_us\":{:.2},\"rank_minus_raw_minus_staging_p50_us\":{:.2},\"rank_device_minus_raw_p50_us\":{:.2}}}",
        p_rank - p_raw,
        p_rank - p_raw - p_stage,
        p_dev - p_raw
    );
    Ok(())
}

/// envelope (mesh leader): answers each INFER with a RESULT, then mirrors the raw round trips,
/// then waits for SHUTDOWN. Other mesh ranks have nothing to do.
fn envelope_mesh<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Empty {}
    if !rank.is_mesh_leader() {
        return Ok(());
    }
    let total = ENVELOPE_WARMUP + args.iters.max(1);
    let out = u8_tensor("out", args.result_bytes, 4);
    let want_l = pattern(args.latent_bytes, 2);
    let want_c = pattern(args.cond_bytes, 3);
    for i in 0..total {
        let reply = vec![out.clone()];
        let env = rank.recv_envelope::<Vec<u8>>(None)?;
        if env.action() != Action::Infer {
            return Err(Error::Invariant(format!(
                "envelope bench: expected INFER {i}, got {}",
                env.action().name()
            )));
        }
        if i == 0
            && (env.tensor("latents").map(|t| &t.data) != Some(&want_l)
                || env.tensor("cond").map(|t| &t.data) != Some(&want_c))
        {
            return Err(Error::Invariant(
                "envelope bench: INFER bytes differ from what rank 0 sent".into(),
            ));
        }
        let h = env.header;
        rank.send_envelope(prepare(
            Action::Result,
            EnvelopeIds::of(&h),
            &Empty {},
            reply,
            &Limits::default(),
        )?)?;
    }
    // 1b. Device-resident: receive into recycled buffers, answer from one uploaded buffer.
    let plane = rank.plane();
    let mut reply = vec![out.clone().map_data(|d| plane.upload(&d))?];
    for i in 0..total {
        let env = rank.recv_envelope::<D::Buffer>(None)?;
        if env.action() != Action::Infer {
            return Err(Error::Invariant(format!(
                "envelope bench: expected device INFER {i}, got {}",
                env.action().name()
            )));
        }
        if i == 0 {
            let l = env
                .tensor("latents")
                .map(|t| plane.download(&t.data))
                .transpose()?;
            let c = env
                .tensor("cond")
                .map(|t| plane.download(&t.data))
                .transpose()?;
            if l.as_ref() != Some(&want_l) || c.as_ref() != Some(&want_c) {
                return Err(Error::Invariant(
                    "envelope bench: device INFER bytes differ from what rank 0 sent".into(),
                ));
            }
        }
        let h = env.header;
        rank.recycle(env.tensors);
        reply = rank.send_envelope(prepare(
            Action::Result,
            EnvelopeIds::of(&h),
            &Empty {},
            reply,
            &Limits::default(),
        )?)?;
    }
    drop(reply);

    let comm = rank.pp().raw_comm().ok_or_else(|| {
        Error::Invariant("envelope bench: the leader holds no `pp` communicator".into())
    })?;
    let peer = GroupRank(0);
    let mut l = plane.alloc(args.latent_bytes as usize)?;
    let mut c = plane.alloc(args.cond_bytes as usize)?;
    let mut r = plane.upload(&out.data)?;
    for i in 0..total {
        let d = rank.deadline();
        plane.group_start(comm)?;
        let a = plane.recv(comm, l, peer);
        let b = plane.recv(comm, c, peer);
        plane.group_end(comm)?;
        l = plane.wait(a?, d)?;
        c = plane.wait(b?, d)?;
        if i == 0 && (plane.download(&l)? != want_l || plane.download(&c)? != want_c) {
            return Err(Error::Invariant(
                "envelope bench: raw INFER bytes differ from what rank 0 sent".into(),
            ));
        }
        r = plane.wait(plane.send(comm, r, peer)?, d)?;
        rank.progress();
    }
    let env = rank.recv_envelope::<Vec<u8>>(None)?;
    if env.action() != Action::Shutdown {
        return Err(Error::Invariant(format!(
            "envelope bench: expected SHUTDOWN, got {}",
            env.action().name()
        )));
    }
    Ok(())
}

/// CPU time of the calling thread: (total from `CLOCK_THREAD_CPUTIME_ID`, user and system from
/// `getrusage(RUSAGE_THREAD)`; the kernel splits the precise total by tick sampling), and the
/// time spent spinning for headers (`rank::lane_spin_us`), in µs.
fn thread_cpu_us() -> (f64, f64, f64, f64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscalls filling caller-owned structs.
    let total = if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
        ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
    } else {
        f64::NAN
    };
    // SAFETY: as above; `rusage` is plain old data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage; getrusage only writes it.
    let (user, sys) = if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } == 0 {
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        (us(ru.ru_utime), us(ru.ru_stime))
    } else {
        (f64::NAN, f64::NAN)
    };
    (total, user, sys, lockstep::comm::lane::spin_us())
}

/// Per-round-trip CPU of this rank's thread over the timed iterations, as one RESULT line.
fn protocol_row(
    who: &str,
    plane: &str,
    lane: &str,
    iters: u64,
    wall: Vec<f64>,
    cpu0: (f64, f64, f64, f64),
) -> String {
    let cpu1 = thread_cpu_us();
    let n = iters.max(1) as f64;
    let (p50, p99, mean) = percentiles(wall);
    format!(
        "{{\"bench\":\"protocol.{who}\",\"plane\":\"{plane}\",\"lane\":\"{lane}\",\"iters\":{iters},\"wall_p50_us\":{p50:.2},\"wall_p99_us\":{p99:.2},\"wall_mean_us\":{mean:.2},\"cpu_us_per_rt\":{:.2},\"user_us_per_rt\":{:.2},\"sys_us_per_rt\":{:.2},\"spin_us_per_rt\":{:.2},\"cpu_minus_spin_us_per_rt\":{:.2}}}",
        (cpu1.0 - cpu0.0) / n,
        (cpu1.1 - cpu0.1) / n,
        (cpu1.2 - cpu0.2) / n,
        (cpu1.3 - cpu0.3) / n,
        ((cpu1.0 - cpu0.0) - (cpu1.3 - cpu0.3)) / n
    )
}

/// A u8 tensor of `n` bytes in a fresh data-plane buffer (null plane: a length only).
fn plane_tensor<D: DataPlane>(rank: &Rank<D>, name: &str, n: u64) -> Result<Tensor<D::Buffer>> {
    Ok(Tensor::new(
        name,
        DType::U8,
        vec![n],
        rank.plane().alloc(n as usize)?,
    ))
}

/// protocol (rank 0): device-resident INFER envelopes (issue-6 manifest) through `Rank` over the
/// null plane, each answered by a RESULT; per round trip: wall time, and this thread's CPU.
fn protocol_driver<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Plan {
        expected_generator_calls: u32,
        latent_shape: Vec<u64>,
    }
    let iters = args.iters.max(1);
    let warm = (iters / 10).max(10);
    let plan = Plan {
        expected_generator_calls: args.generator_calls,
        latent_shape: latent_shape(args),
    };
    let mut wall = Vec::with_capacity(iters as usize);
    let mut dev = vec![
        plane_tensor(rank, "latents", args.latent_bytes)?,
        plane_tensor(rank, "cond", args.cond_bytes)?,
    ];
    let mut cpu0 = thread_cpu_us();
    for i in 0..(warm + iters) {
        if i == warm {
            cpu0 = thread_cpu_us();
        }
        let t = Instant::now();
        dev = rank
            .send_next(|ids| {
                prepare(
                    Action::Infer,
                    ids.with_chunk(i),
                    &plan,
                    dev,
                    &Limits::default(),
                )
            })?
            .1;
        let res = rank.recv_envelope::<D::Buffer>(Some(rank.deadline()))?;
        if res.action() != Action::Result || res.header.chunk_index != i {
            return Err(Error::Invariant(format!(
                "protocol bench: expected RESULT for chunk_index {i}, got {} chunk_index {}",
                res.action().name(),
                res.header.chunk_index
            )));
        }
        rank.recycle(res.tensors);
        if i >= warm {
            wall.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let row = protocol_row(
        "rank0",
        rank.plane().name(),
        rank.lane_transport(),
        iters,
        wall,
        cpu0,
    );
    rank.send_next(|ids| Ok(lockstep::wire::PreparedEnvelope::shutdown(ids)))?;
    println!("RESULT {row}");
    Ok(())
}

/// protocol (mesh leader): receives each INFER device-resident, answers with a RESULT carrying
/// one tensor of `--result-bytes`; reports its thread's CPU per round trip.
fn protocol_mesh<D: DataPlane>(rank: &Rank<D>, args: &HarnessArgs) -> Result<()> {
    #[derive(Serialize, Deserialize)]
    struct Empty {}
    if !rank.is_mesh_leader() {
        return Ok(());
    }
    let iters = args.iters.max(1);
    let warm = (iters / 10).max(10);
    let mut wall = Vec::with_capacity(iters as usize);
    let mut cpu0 = thread_cpu_us();
    let mut reply = vec![plane_tensor(rank, "out", args.result_bytes)?];
    for i in 0.. {
        if i == warm {
            cpu0 = thread_cpu_us();
        }
        let env = rank.recv_envelope::<D::Buffer>(None)?;
        // Time from "header read" to "RESULT sent": the leader's side of one round trip.
        let t = Instant::now();
        match env.action() {
            Action::Shutdown => break,
            Action::Infer => {}
            other => {
                return Err(Error::Invariant(format!(
                    "protocol bench: expected INFER, got {}",
                    other.name()
                )))
            }
        }
        let h = env.header;
        rank.recycle(env.tensors);
        reply = rank.send_envelope(prepare(
            Action::Result,
            EnvelopeIds::of(&h),
            &Empty {},
            reply,
            &Limits::default(),
        )?)?;
        if i >= warm {
            wall.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!(
        "RESULT {}",
        protocol_row(
            "leader",
            rank.plane().name(),
            rank.lane_transport(),
            iters,
            wall,
            cpu0,
        )
    );
    Ok(())
}
