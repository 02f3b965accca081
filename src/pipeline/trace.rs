//! A stream's generator calls, recorded on the real Stage 1 path, for checking the model against
//! an independent implementation (`lockstep weights trace`, `benches/baselines/wan_reference.py`)
//! and against a ring-free re-computation (tests/model_stream.rs).
//!
//! Contract: `record_stream` drives `chunks` chunks through the same code `lockstep run` uses on
//! a mesh rank — Stage 0's `Planner` builds each plan (evictions, clean passes, recomputes from
//! the sink frames' latents), `MeshRank::execute` runs it over the ring cache at TP=1 — and
//! records every generator call's input and output with what the plan did to the cache right
//! before it (`reset_before`, `evict_before`). Nothing here computes: it only watches.
//!
//! The trace file (safetensors, all f32): `text [text_tokens, text_dim]` (the prompt's features),
//! `call{n}.x` / `call{n}.out` `[frames · tokens_per_frame, C · 4]` in the model's token layout
//! (`model::dit`), and `__metadata__["lockstep.trace"]`, JSON `{config, calls: [{n, chunk, kind,
//! t, start_frame, frames, evict_before, reset_before}]}`.
use super::envelope::NOISE_TENSOR;
use super::stage1::{Call, ChunkLatent, DitGenerator, Generator, MeshRank, Prompt, StepGraphs};
use crate::cache::{CacheGeometry, KvCache};
use crate::cuda::context::Gpu;
use crate::ids::{CacheEpoch, ChunkIndex, GlobalRank};
use crate::model::dit::{prompt_features, CacheMode, DitShard};
use crate::model::tp::{SoloComm, TpComm};
use crate::model::weights::WeightFile;
use crate::model::DitConfig;
use crate::plan::{PhasePlan, PlanPolicy, Planner, OVERRIDE_TENSOR};
use crate::wire::HostTensor;
use crate::{Error, Result};
use safetensors::tensor::TensorView;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One recorded generator call.
#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    pub n: usize,
    pub chunk: u64,
    /// `denoise`, `clean` or `recompute`.
    pub kind: &'static str,
    pub t: u32,
    pub start_frame: u64,
    pub frames: usize,
    /// Frames the plan evicted since the previous call.
    pub evict_before: u32,
    /// Whether the plan reset the cache since the previous call.
    pub reset_before: bool,
    #[serde(skip)]
    pub x: Vec<f32>,
    #[serde(skip)]
    pub out: Vec<f32>,
}

/// A recorded stream: its calls, the prompt features, and each chunk's clean latent.
pub struct StreamTrace {
    pub cfg: DitConfig,
    pub text: Vec<f32>,
    pub calls: Vec<CallRecord>,
    pub latents: Vec<Vec<f32>>,
}

/// What the executor is about to run: the chunk and the plan's cache actions not yet attached
/// to a recorded call.
#[derive(Default)]
struct ChunkInfo {
    chunk: u64,
    reset_pending: bool,
    evict_pending: u32,
}

/// Wraps a generator and records each call. The plan's reset is attached to the chunk's first
/// call, its eviction to the clean pass (the plan evicts right before it).
struct Recorder<'g> {
    inner: &'g mut dyn Generator,
    calls: Vec<CallRecord>,
    info: Arc<Mutex<ChunkInfo>>,
}

impl Generator for Recorder<'_> {
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt: &Prompt<'_>) -> Result<()> {
        self.inner.set_prompt(comm, prompt)
    }

    fn call(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        c: Call<'_>,
    ) -> Result<Vec<f32>> {
        let kind = match c.mode {
            CacheMode::Read => "denoise",
            CacheMode::Append(_) => "clean",
            CacheMode::Overwrite(_) => "recompute",
        };
        let (chunk, reset_before, evict_before) = {
            let mut i = self
                .info
                .lock()
                .map_err(|_| Error::Invariant("trace: chunk info lock poisoned".into()))?;
            let reset = std::mem::take(&mut i.reset_pending);
            let evict = if kind == "clean" {
                std::mem::take(&mut i.evict_pending)
            } else {
                0
            };
            (i.chunk, reset, evict)
        };
        let (x, t, start_frame, frames) = (c.x.to_vec(), c.t, c.start_frame, c.frames);
        let out = self.inner.call(comm, cache, c)?;
        self.calls.push(CallRecord {
            n: self.calls.len(),
            chunk,
            kind,
            t,
            start_frame,
            frames,
            evict_before,
            reset_before,
            x,
            out: out.clone(),
        });
        Ok(out)
    }

    fn cache_geometry(&self) -> CacheGeometry {
        self.inner.cache_geometry()
    }
}

/// Noise of chunk `chunk`: deterministic, unit variance.
pub fn chunk_noise(seed: u64, chunk: u64, n: usize) -> Vec<f32> {
    crate::model::dit::gen(
        seed ^ chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        "noise",
        n,
        1.732_050_8,
    )
}

/// Streams `chunks` chunks of one epoch through `MeshRank::execute` at TP=1 and records every
/// generator call. `recompute_every` > 0 recomputes the sink frames from the first chunk's
/// latent every that many chunks (as `lockstep run --recompute-every` does).
pub fn record_stream(
    shard: DitShard,
    chunks: u64,
    recompute_every: u32,
    noise_seed: u64,
    prompt_seed: u64,
) -> Result<StreamTrace> {
    let cfg = shard.config().clone();
    let mut gen = DitGenerator::from_shard(shard);
    record_stream_with(
        &mut gen,
        &cfg,
        chunks,
        recompute_every,
        noise_seed,
        prompt_seed,
    )
}

/// `record_stream` with any generator (the GPU model's, for one). The recorder reads every
/// call's input and output on the host, so the executor keeps the latent on the host here
/// whatever the generator could do (`Generator::keeps_latent`).
pub fn record_stream_with(
    gen: &mut dyn Generator,
    cfg: &DitConfig,
    chunks: u64,
    recompute_every: u32,
    noise_seed: u64,
    prompt_seed: u64,
) -> Result<StreamTrace> {
    let info = Arc::new(Mutex::new(ChunkInfo::default()));
    let mut rec = Recorder {
        inner: gen,
        calls: Vec::new(),
        info: info.clone(),
    };
    let stream = StreamSpec {
        chunks,
        recompute_every,
        noise_seed,
        prompt_seed,
    };
    let latents = drive_stream(
        &mut rec,
        &mut SoloComm,
        cfg,
        &stream,
        None,
        &mut |chunk, plan| {
            *info
                .lock()
                .map_err(|_| Error::Invariant("trace: chunk info lock poisoned".into()))? =
                ChunkInfo {
                    chunk,
                    reset_pending: plan.cache_actions.reset,
                    evict_pending: plan.cache_actions.evict_frames,
                };
            Ok(())
        },
    )?;
    Ok(StreamTrace {
        text: prompt_features(cfg, prompt_seed),
        cfg: cfg.clone(),
        calls: rec.calls,
        latents,
    })
}

/// A stream of one epoch as `record_stream` drives it.
#[derive(Clone, Copy, Debug)]
pub struct StreamSpec {
    pub chunks: u64,
    /// Recompute the sink frames from the first chunk's latent every that many chunks (0: never).
    pub recompute_every: u32,
    pub noise_seed: u64,
    pub prompt_seed: u64,
}

/// The clean latents of `stream` through `MeshRank::execute` at TP=1 with `gen` as it is (a
/// generator that keeps the latent on its device does so): the stream `record_stream` records,
/// without watching it.
pub fn stream_latents(
    gen: &mut dyn Generator,
    cfg: &DitConfig,
    stream: &StreamSpec,
) -> Result<Vec<Vec<f32>>> {
    drive_stream(gen, &mut SoloComm, cfg, stream, None, &mut |_, _| Ok(()))
}

/// `stream_latents` with every chunk's noise handed to the executor in GPU memory of `gpu` and
/// its clean latent taken back in GPU memory (`MeshRank::execute_with`), as Stage 1 does with
/// envelopes on the NCCL plane: the device-resident path on one GPU, without NCCL. `gen` must
/// keep the latent on `gpu` (the GPU model on that `Gpu`).
pub fn stream_latents_device_resident(
    gen: &mut dyn Generator,
    gpu: &Gpu,
    cfg: &DitConfig,
    stream: &StreamSpec,
) -> Result<Vec<Vec<f32>>> {
    drive_stream(gen, &mut SoloComm, cfg, stream, Some(gpu), &mut |_, _| {
        Ok(())
    })
}

/// One chunk with its noise uploaded into a GPU buffer first and its latent read back from
/// the result buffer after (the copies a data plane would have made).
fn execute_device_resident(
    mesh: &mut MeshRank<'_>,
    gpu: &Gpu,
    plan: &PhasePlan,
    mut tensors: Vec<HostTensor>,
) -> Result<Vec<f32>> {
    let i = tensors
        .iter()
        .position(|t| t.name == NOISE_TENSOR)
        .ok_or_else(|| Error::Invariant("chunk without noise".into()))?;
    let noise = tensors.remove(i);
    let dev = gpu.upload(&noise.data)?;
    let out = gpu.alloc(noise.data.len())?;
    match mesh.execute_with(plan, &tensors, Some(&dev), Some(out))? {
        (ChunkLatent::Device(b), _) => {
            let bytes = gpu.download(&b)?;
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
        (ChunkLatent::Host(_), _) => Err(Error::Invariant(
            "a device-resident chunk came back on the host".into(),
        )),
    }
}

/// `stream_latents` for one rank of a TP group: every rank of the group drives the same stream
/// with its `comm` (its generator's shard of that group), as the mesh's ranks do.
pub fn stream_latents_tp(
    gen: &mut dyn Generator,
    comm: &mut dyn TpComm,
    cfg: &DitConfig,
    stream: &StreamSpec,
) -> Result<Vec<Vec<f32>>> {
    drive_stream(gen, comm, cfg, stream, None, &mut |_, _| Ok(()))
}

/// Plans and executes `stream`'s chunks; `before` sees each plan right before its execution.
fn drive_stream(
    gen: &mut dyn Generator,
    comm: &mut dyn TpComm,
    cfg: &DitConfig,
    stream: &StreamSpec,
    device: Option<&Gpu>,
    before: &mut dyn FnMut(u64, &PhasePlan) -> Result<()>,
) -> Result<Vec<Vec<f32>>> {
    let mut planner = Planner::new(PlanPolicy {
        frames_per_chunk: cfg.frames_per_chunk as u32,
        denoise_timesteps: cfg.denoise_timesteps.clone(),
        clean_cache_update: true,
        recompute_every: stream.recompute_every,
        sink_frames: cfg.sink_frames,
        window_frames: cfg.window_frames,
        prompt_seed: stream.prompt_seed,
    })?;
    let in_dim = cfg.in_dim();
    let mut latents: Vec<Vec<f32>> = Vec::new();
    let global = GlobalRank(1 + comm.rank().get());
    let mut mesh = MeshRank::new(comm, gen, global, cfg)?;
    let steps = StepGraphs::required(cfg, stream.recompute_every > 0, cfg.sink_frames);
    mesh.warmup(&steps)?;
    for chunk in 0..stream.chunks {
        let plan = planner.next_plan(ChunkIndex(chunk), CacheEpoch(0));
        let mut tensors = vec![HostTensor::from_f32(
            NOISE_TENSOR,
            vec![cfg.tokens_per_chunk() as u64, in_dim as u64],
            &chunk_noise(stream.noise_seed, chunk, cfg.tokens_per_chunk() * in_dim),
        )];
        if let Some(r) = plan.recompute {
            let n = r.frames as usize * cfg.tokens_per_frame() * in_dim;
            let anchor = latents
                .first()
                .ok_or_else(|| Error::Invariant("recompute before the first latent".into()))?;
            let ctx = anchor
                .get(..n)
                .ok_or_else(|| Error::Invariant("first latent shorter than the sinks".into()))?;
            tensors.push(HostTensor::from_f32(
                OVERRIDE_TENSOR,
                vec![
                    (r.frames as usize * cfg.tokens_per_frame()) as u64,
                    in_dim as u64,
                ],
                ctx,
            ));
        }
        planner.commit(&plan)?;
        before(chunk, &plan)?;
        let latent = match device {
            None => mesh.execute(&plan, &tensors)?.0,
            Some(gpu) => execute_device_resident(&mut mesh, gpu, &plan, tensors)?,
        };
        latents.push(latent);
    }
    Ok(latents)
}

/// Writes `trace` as a safetensors file (see the module comment for the layout).
pub fn write_trace(trace: &StreamTrace, path: &Path) -> Result<()> {
    let c = &trace.cfg;
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = vec![(
        "text".into(),
        vec![c.text_tokens, c.text_dim],
        bytes(&trace.text),
    )];
    for r in &trace.calls {
        let shape = vec![r.frames * c.tokens_per_frame(), c.in_dim()];
        owned.push((format!("call{}.x", r.n), shape.clone(), bytes(&r.x)));
        owned.push((format!("call{}.out", r.n), shape, bytes(&r.out)));
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invariant(format!("trace tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = serde_json::json!({
        "config": {
            "name": c.name, "dim": c.dim, "layers": c.layers, "heads": c.heads,
            "head_dim": c.head_dim, "ffn_dim": c.ffn_dim, "latent_channels": c.latent_channels,
            "grid_h": c.grid_h, "grid_w": c.grid_w, "frames_per_chunk": c.frames_per_chunk,
            "text_tokens": c.text_tokens, "text_dim": c.text_dim, "freq_dim": c.freq_dim,
            "sink_frames": c.sink_frames, "window_frames": c.window_frames, "eps": c.eps,
        },
        "calls": trace.calls,
    });
    let info = std::collections::HashMap::from([("lockstep.trace".to_string(), meta.to_string())]);
    safetensors::serialize_to_file(views, &Some(info), path)
        .map_err(|e| Error::BadInput(format!("writing trace {}: {e}", path.display())))
}

/// `lockstep weights trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// Output file (safetensors).
    pub out: PathBuf,
    /// Weights file (as `lockstep weights save` writes it).
    #[arg(long)]
    pub weights: PathBuf,
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override the preset's layer count (e.g. a 2-layer `wan-1.3b`).
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long, default_value_t = 6)]
    pub chunks: u64,
    /// Recompute the sink frames every N chunks (0 = never).
    #[arg(long, default_value_t = 0)]
    pub recompute_every: u32,
    #[arg(long, default_value_t = 1)]
    pub noise_seed: u64,
    #[arg(long, default_value_t = 7)]
    pub prompt_seed: u64,
}

pub fn trace_cmd(a: &TraceArgs) -> Result<()> {
    let cfg = DitConfig::preset(&a.preset)?.with_layers(a.layers)?;
    let file = WeightFile::open_for(&a.weights, &cfg)?;
    let shard = DitShard::from_source(&cfg, &file, 0, 1)?;
    let trace = record_stream(
        shard,
        a.chunks,
        a.recompute_every,
        a.noise_seed,
        a.prompt_seed,
    )?;
    write_trace(&trace, &a.out)?;
    println!(
        "wrote {} ({} calls over {} chunks, preset {} with {} layers)",
        a.out.display(),
        trace.calls.len(),
        a.chunks,
        cfg.name,
        cfg.layers
    );
    Ok(())
}
