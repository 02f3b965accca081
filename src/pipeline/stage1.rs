//! Stage 1 (the mesh): plan validation on the leader, relay to the mesh, the plan executor with
//! its generator-call count and chunk-end state digest, warm-up of the step-graph set.
//!
//! Contract (docs/spec.md §4, §5, §9):
//! - Acceptance is the protocol's (`Rank::recv_envelope` on the leader): `call_id == last + 1`;
//!   an exact duplicate (same call_id, epoch and meta digest) is DROPPED after its payload is
//!   drained (no result cache: Stage 0 already has the one result it will accept); a regression
//!   or a gap crashes at once naming both values. Nothing is relayed for a dropped duplicate.
//! - The leader validates the envelope (plan, manifest) before any mesh collective, then relays
//!   it (header, meta, tensors: the one wire framing) to the mesh; every rank decodes the plan
//!   from the same canonical meta, executes `PhasePlan::phases()` in order, counts each generator
//!   call against `expected_generator_calls` before issuing it and the total before the chunk-end
//!   collective (B2), and all-gathers its `StateDigest` at chunk end: any difference crashes with
//!   a per-field diff (F3).
//! - Warm-up captures the step-graph set (the CPU stand-in for CUDA-graph capture) from the
//!   parity-checked configuration, before the first INFER, and all-gathers its fingerprint: ranks
//!   whose sets differ crash there (G2); a production call whose signature was not captured is
//!   an invariant violation.
use super::conditioning;
use super::envelope::{prepare_result_in, validate_infer, ResultMeta, NOISE_TENSOR};
use super::MeshLink;
use crate::cache::{CacheGeometry, KvCache};
use crate::cuda::device::DeviceBuf;
use crate::digest::Fnv64;
use crate::fault::{self, points};
use crate::ids::{GlobalRank, GroupRank};
use crate::model::dit::{CacheMode, DitShard, PromptKey, TextKv};
use crate::model::tp::TpComm;
use crate::model::DitConfig;
use crate::plan::{Phase, PhasePlan, StateDigest, OVERRIDE_TENSOR, TIMESTEP_MAX};
use crate::spans::{self, Args, GeneratorCall};
use crate::wire::{Action, EnvelopeIds, HostTensor, Limits, PreparedEnvelope, ReceivedEnvelope};
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The set of step graphs a rank captured in warm-up.
#[derive(Debug, Default, Clone)]
pub struct StepGraphs {
    set: BTreeSet<String>,
}

impl StepGraphs {
    pub fn signature(kind: &str, t: u32, rows: usize) -> String {
        format!("{kind}:t{t}:rows{rows}")
    }

    /// The step set a run needs, derived from the (parity-checked) run configuration.
    pub fn required(cfg: &DitConfig, recompute: bool, sink_frames: u32) -> Vec<String> {
        let rows = cfg.tokens_per_chunk();
        let mut v: Vec<String> = cfg
            .denoise_timesteps
            .iter()
            .map(|t| Self::signature("denoise", *t, rows))
            .collect();
        v.push(Self::signature("clean", 0, rows));
        if recompute {
            v.push(Self::signature(
                "recompute",
                0,
                sink_frames as usize * cfg.tokens_per_frame(),
            ));
        }
        v
    }

    pub fn capture(&mut self, steps: &[String]) {
        self.set.extend(steps.iter().cloned());
    }
    pub fn count(&self) -> u64 {
        self.set.len() as u64
    }
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv64::new();
        for s in &self.set {
            h.update(s.as_bytes()).update(&[0]);
        }
        h.finish()
    }
    pub fn check(&self, sig: &str) -> Result<()> {
        if self.set.contains(sig) {
            Ok(())
        } else {
            Err(Error::Invariant(format!(
                "generator step {sig} was not captured in warm-up (captured: {:?})",
                self.set
            )))
        }
    }
}

/// One generator call as the executor issues it.
pub struct Call<'a> {
    pub x: &'a [f32],
    pub frames: usize,
    pub start_frame: u64,
    pub t: u32,
    pub mode: CacheMode<'a>,
}

/// A generator call without its input: on the latent a generator keeps
/// (`Generator::call_on_latent`), or given one (`with_input`).
pub struct CallSpec<'a> {
    pub frames: usize,
    pub start_frame: u64,
    pub t: u32,
    pub mode: CacheMode<'a>,
}

impl<'a> CallSpec<'a> {
    pub fn with_input(self, x: &'a [f32]) -> Call<'a> {
        Call {
            x,
            frames: self.frames,
            start_frame: self.start_frame,
            t: self.t,
            mode: self.mode,
        }
    }
}

/// What a call reads: host values, or the chunk's latent as the generator keeps it.
#[derive(Clone, Copy)]
enum Input<'a> {
    Host(&'a [f32]),
    Kept,
}

impl Input<'_> {
    /// The chunk's latent: kept by the generator, or these host values.
    fn latent(kept: bool, x: &[f32]) -> Input<'_> {
        if kept {
            Input::Kept
        } else {
            Input::Host(x)
        }
    }
}

fn no_kept_latent<T>(what: &str) -> Result<T> {
    Err(Error::Invariant(format!(
        "{what}: this generator does not keep a latent (keeps_latent is false)"
    )))
}

/// The prompt a chunk's plan names, as the generator gets it.
#[derive(Clone, Copy, Debug)]
pub enum Prompt<'a> {
    /// Text features from this seed (`model::dit::prompt_features`).
    Seed(u64),
    /// A caller's conditioning tensor: its values (f32, `[text_tokens, text_dim]`) and digest.
    Tensor { digest: u64, features: &'a [f32] },
    /// The conditioning tensor with this digest, whose values came with the epoch's first
    /// chunk: the generator holds its text K/V.
    Held(u64),
}

impl Prompt<'_> {
    /// The key its text K/V are kept under.
    pub fn key(&self) -> PromptKey {
        match self {
            Prompt::Seed(s) => PromptKey::Seed(*s),
            Prompt::Tensor { digest, .. } | Prompt::Held(digest) => PromptKey::Tensor(*digest),
        }
    }

    /// Errors unless `held` (the key of the text K/V a generator holds) is this prompt's, for
    /// a `Held` prompt (whose values are not here to compute them again).
    pub fn check_held(&self, held: Option<PromptKey>) -> Result<()> {
        match self {
            Prompt::Held(d) if held != Some(PromptKey::Tensor(*d)) => {
                Err(Error::Invariant(format!(
                    "the plan names conditioning tensor {d:#018x}, whose values came with its \
                     epoch's first chunk, but this rank's text K/V are of {held:?}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The mesh's generator (the DiT on the CPU, a calibrated stand-in, later the GPU model).
pub trait Generator: Send {
    /// Computes the prompt's text K/V (once per prompt; may use collectives): from the seed's
    /// features, or from a caller's tensor's values.
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt: &Prompt<'_>) -> Result<()>;
    /// One generator call; returns the model output (same shape as `x`).
    fn call(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        call: Call<'_>,
    ) -> Result<Vec<f32>>;
    /// Cache geometry this generator needs on this rank (zero layers = ledger only).
    fn cache_geometry(&self) -> CacheGeometry;
    /// CUDA graphs captured so far (`None`: this generator does not capture).
    fn captured_graphs(&self) -> Option<usize> {
        None
    }
    /// Whether this generator keeps a chunk's latent itself between calls (on its device). The
    /// executor then hands the latent over once (`load_latent`), issues the calls on it
    /// (`call_on_latent`) and the Euler steps (`euler_step`: the host's f32 arithmetic bit for
    /// bit), and takes the clean latent back once (`read_latent`); a recompute's context frames
    /// still come as host values (`call`). Otherwise the executor keeps the latent in host f32.
    fn keeps_latent(&self) -> bool {
        false
    }
    /// Takes the chunk's initial latent (f32, the model's token layout).
    fn load_latent(&mut self, _x: &[f32]) -> Result<()> {
        no_kept_latent("load_latent")
    }
    /// The same from a data-plane buffer on this rank's GPU (a device-resident envelope's
    /// noise: f32 bytes), when the generator keeps the latent on that GPU.
    fn load_latent_device(&mut self, _buf: &DeviceBuf) -> Result<()> {
        no_kept_latent("load_latent_device")
    }
    /// One call on the kept latent; its output stays with the generator for `euler_step`.
    fn call_on_latent(
        &mut self,
        _comm: &mut dyn TpComm,
        _cache: &mut KvCache,
        _call: CallSpec<'_>,
    ) -> Result<()> {
        no_kept_latent("call_on_latent")
    }
    /// `latent += dt · output` of the last `call_on_latent`.
    fn euler_step(&mut self, _dt: f32) -> Result<()> {
        no_kept_latent("euler_step")
    }
    /// The kept latent, on the host.
    fn read_latent(&mut self, _comm: &mut dyn TpComm) -> Result<Vec<f32>> {
        no_kept_latent("read_latent")
    }
    /// The kept latent copied into `buf` (a data-plane buffer on this rank's GPU), complete on
    /// return.
    fn read_latent_device(&mut self, _comm: &mut dyn TpComm, _buf: &mut DeviceBuf) -> Result<()> {
        no_kept_latent("read_latent_device")
    }
}

/// The tiny DiT, TP-sharded.
pub struct DitGenerator {
    shard: DitShard,
    text: Option<TextKv>,
}

impl DitGenerator {
    pub fn new(cfg: &DitConfig, seed: u64, rank: GroupRank, tp: u32) -> Result<Self> {
        Ok(Self {
            shard: DitShard::random(cfg, seed, rank.get(), tp)?,
            text: None,
        })
    }

    /// A generator over an already built shard (e.g. `DitShard::from_source` on a weights file).
    pub fn from_shard(shard: DitShard) -> Self {
        Self { shard, text: None }
    }
}

impl Generator for DitGenerator {
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt: &Prompt<'_>) -> Result<()> {
        let held = self.text.as_ref().map(|t| t.key);
        if held == Some(prompt.key()) {
            return Ok(());
        }
        prompt.check_held(held)?;
        self.text = Some(match prompt {
            Prompt::Seed(s) => self.shard.text_kv(comm, *s)?,
            Prompt::Tensor { features, .. } => {
                self.shard.text_kv_from(comm, prompt.key(), features)?
            }
            Prompt::Held(_) => unreachable_held()?,
        });
        Ok(())
    }

    fn call(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        c: Call<'_>,
    ) -> Result<Vec<f32>> {
        let text = self
            .text
            .as_ref()
            .ok_or_else(|| Error::Invariant("generator call before the prompt was set".into()))?;
        self.shard
            .forward(comm, cache, text, c.x, c.frames, c.start_frame, c.t, c.mode)
    }

    fn cache_geometry(&self) -> CacheGeometry {
        let c = self.shard.config();
        CacheGeometry {
            layers: c.layers,
            tokens_per_frame: c.tokens_per_frame(),
            heads: self.shard.local_heads(),
            head_dim: c.head_dim,
            sink_frames: c.sink_frames,
            window_frames: c.window_frames,
        }
    }
}

/// The DiT on a GPU (`model::gpu`): this rank's TP shard; its all-reduces go through the call's
/// `TpComm`. Its K/V live on the device; the host `KvCache` it asks for holds only the ledger,
/// which says for each call where the chunk's K/V go and which slots attention reads
/// (`KvAccess::from_ledger`). It keeps the chunk's latent on the device (`keeps_latent`): the
/// latent crosses the host as f32 through pinned buffers once in and once out per chunk, the
/// Euler steps run on the device; a recompute's context frames are uploaded for their call.
pub struct GpuGenerator {
    model: crate::model::gpu::GpuDit,
    /// The prompt whose text K/V the model holds.
    held: Option<PromptKey>,
}

impl GpuGenerator {
    pub fn new(model: crate::model::gpu::GpuDit) -> Self {
        Self { model, held: None }
    }
}

/// Where a call's K/V go and what its attention reads in the device cache, from the ledger.
fn device_kv(
    mode: CacheMode<'_>,
    cache: &KvCache,
    frames: usize,
) -> Result<crate::model::gpu::KvAccess> {
    let f = u32::try_from(frames)
        .map_err(|_| Error::Invariant(format!("{frames} frames in one call")))?;
    crate::model::gpu::KvAccess::from_ledger(mode, cache, f)
}

impl Generator for GpuGenerator {
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt: &Prompt<'_>) -> Result<()> {
        if self.held == Some(prompt.key()) {
            return Ok(());
        }
        prompt.check_held(self.held)?;
        let seeded;
        let (key, features) = match prompt {
            Prompt::Seed(s) => {
                seeded = crate::model::dit::prompt_features(self.model.config(), *s);
                (*s, seeded.as_slice())
            }
            Prompt::Tensor { digest, features } => (*digest, *features),
            Prompt::Held(_) => unreachable_held()?,
        };
        // The key of a seed and of a tensor may not collide in the model's own cache: it is
        // told to compute whenever this generator's key changes.
        self.held = None;
        self.model.set_prompt_features(comm, key, features)?;
        self.held = Some(prompt.key());
        Ok(())
    }

    fn call(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        c: Call<'_>,
    ) -> Result<Vec<f32>> {
        let kv = device_kv(c.mode, cache, c.frames)?;
        self.model
            .forward_host(c.x, c.frames, c.start_frame, c.t, &kv, comm)
    }

    fn captured_graphs(&self) -> Option<usize> {
        self.model.captured_graphs()
    }

    fn keeps_latent(&self) -> bool {
        true
    }

    fn load_latent(&mut self, x: &[f32]) -> Result<()> {
        self.model.load_latent(x)
    }

    fn load_latent_device(&mut self, buf: &DeviceBuf) -> Result<()> {
        self.model.load_latent_device(buf)
    }

    fn call_on_latent(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        c: CallSpec<'_>,
    ) -> Result<()> {
        let kv = device_kv(c.mode, cache, c.frames)?;
        self.model
            .forward_latent(c.frames, c.start_frame, c.t, &kv, comm)
    }

    fn euler_step(&mut self, dt: f32) -> Result<()> {
        self.model.euler_step(dt)
    }

    fn read_latent(&mut self, comm: &mut dyn TpComm) -> Result<Vec<f32>> {
        self.model.read_latent(comm)
    }

    fn read_latent_device(&mut self, comm: &mut dyn TpComm, buf: &mut DeviceBuf) -> Result<()> {
        self.model.read_latent_device(comm, buf)
    }

    fn cache_geometry(&self) -> CacheGeometry {
        let c = self.model.config();
        CacheGeometry {
            layers: 0,
            tokens_per_frame: c.tokens_per_frame(),
            heads: 0,
            head_dim: 0,
            sink_frames: c.sink_frames,
            window_frames: c.window_frames,
        }
    }
}

/// A generator with a calibrated cost per call and no math: for overlap and backpressure
/// experiments (E1–E3) and the soak test. The cost is waited out (it stands for device time,
/// during which the host thread is idle), so it holds on a loaded 2-core machine.
pub struct CalibratedGenerator {
    cost_per_call: Duration,
    cfg: DitConfig,
}

impl CalibratedGenerator {
    pub fn new(cfg: &DitConfig, cost_per_call: Duration) -> Self {
        Self {
            cost_per_call,
            cfg: cfg.clone(),
        }
    }
}

impl Generator for CalibratedGenerator {
    fn set_prompt(&mut self, _comm: &mut dyn TpComm, _prompt: &Prompt<'_>) -> Result<()> {
        Ok(())
    }

    fn call(
        &mut self,
        _comm: &mut dyn TpComm,
        _cache: &mut KvCache,
        c: Call<'_>,
    ) -> Result<Vec<f32>> {
        let until = Instant::now() + self.cost_per_call;
        // The output is a fixed function of the input, so results are checkable.
        let out = c.x.iter().map(|v| v * 0.5).collect();
        let left = until.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
        Ok(out)
    }

    fn cache_geometry(&self) -> CacheGeometry {
        CacheGeometry {
            layers: 0,
            tokens_per_frame: self.cfg.tokens_per_frame(),
            heads: 0,
            head_dim: 0,
            sink_frames: self.cfg.sink_frames,
            window_frames: self.cfg.window_frames,
        }
    }
}

/// `Prompt::Held` past `check_held`: the key matched, so it never computes.
fn unreachable_held<T>() -> Result<T> {
    Err(Error::Invariant(
        "a held prompt reached the text K/V computation".into(),
    ))
}

/// One mesh rank's state across chunks.
pub struct MeshRank<'a> {
    pub comm: &'a mut dyn TpComm,
    pub gen: &'a mut dyn Generator,
    pub cache: KvCache,
    pub graphs: StepGraphs,
    pub global_rank: GlobalRank,
    pub cfg: DitConfig,
    /// The prompt this rank's generator was last given (whatever the generator does with it).
    prompt: Option<PromptKey>,
}

impl<'a> MeshRank<'a> {
    pub fn new(
        comm: &'a mut dyn TpComm,
        gen: &'a mut dyn Generator,
        global_rank: GlobalRank,
        cfg: &DitConfig,
    ) -> Result<Self> {
        let cache = KvCache::new(gen.cache_geometry())?;
        Ok(Self {
            comm,
            gen,
            cache,
            graphs: StepGraphs::default(),
            global_rank,
            cfg: cfg.clone(),
            prompt: None,
        })
    }

    /// Gives the generator the plan's prompt; returns the state digest's `prompt` word: the
    /// seed, or the digest of the conditioning tensor as this rank received it.
    fn set_prompt(&mut self, plan: &PhasePlan, tensors: &[HostTensor]) -> Result<u64> {
        let spec = plan.conditioning.as_ref().map(|c| c.tensor.as_deref());
        let (prompt_word, features);
        let prompt = match spec {
            None => {
                prompt_word = plan.prompt_seed;
                Prompt::Seed(plan.prompt_seed)
            }
            Some(None) => {
                prompt_word = plan.prompt_seed;
                let p = Prompt::Held(plan.prompt_seed);
                p.check_held(self.prompt)?;
                p
            }
            Some(Some(name)) => {
                let t = tensors.iter().find(|t| t.name == name).ok_or_else(|| {
                    Error::Invariant(format!(
                        "conditioning tensor {name:?} missing at {} {}",
                        plan.chunk_index, plan.cache_epoch
                    ))
                })?;
                let mut bytes = std::borrow::Cow::Borrowed(t.data.as_slice());
                if fault::hit(points::CORRUPT_CONDITIONING) {
                    let mut b = t.data.clone();
                    if let Some(x) = b.first_mut() {
                        *x ^= 0x40;
                    }
                    bytes = std::borrow::Cow::Owned(b);
                }
                prompt_word = conditioning::digest(t.dtype, &t.shape, &bytes);
                features = conditioning::features(t.dtype, &bytes)?;
                Prompt::Tensor {
                    digest: prompt_word,
                    features: &features,
                }
            }
        };
        self.gen.set_prompt(self.comm, &prompt)?;
        self.prompt = Some(prompt.key());
        Ok(prompt_word)
    }

    /// Captures the step set (derived from the parity-checked configuration) and checks, with a
    /// mesh all-gather, that every rank captured the same one.
    pub fn warmup(&mut self, steps: &[String]) -> Result<()> {
        self.graphs.capture(steps);
        if fault::hit(points::GRAPH_SET_SKEW) {
            self.graphs.capture(&[StepGraphs::signature(
                "denoise",
                999,
                self.cfg.tokens_per_chunk(),
            )]);
        }
        let all = self
            .comm
            .all_gather_u64(&[self.graphs.count(), self.graphs.fingerprint()])?;
        if all.iter().any(|w| w != &all[0]) {
            let lines: Vec<String> = all
                .iter()
                .enumerate()
                .map(|(r, w)| {
                    format!(
                        "group-rank {r}: {} graphs, fingerprint {:#018x}",
                        w.first().copied().unwrap_or(0),
                        w.get(1).copied().unwrap_or(0)
                    )
                })
                .collect();
            return Err(Error::Invariant(format!(
                "captured step-graph sets differ in warm-up (before the first INFER): {}",
                lines.join("; ")
            )));
        }
        Ok(())
    }

    /// One generator call, counted against the plan **before** it is issued (B2): a call the
    /// plan does not name never reaches the collectives inside it, which the other ranks would
    /// not join. Each issued call is a span (`gen <kind> t=… frames=…`, `crate::spans`), with
    /// the call's collectives inside it.
    /// Returns the call's output when its input was host values (`Input::Host`); a call on the
    /// kept latent leaves its output with the generator.
    fn gen_call(
        &mut self,
        kind: &'static str,
        call: CallSpec<'_>,
        input: Input<'_>,
        calls: &mut u32,
        plan: &PhasePlan,
    ) -> Result<Option<Vec<f32>>> {
        if *calls >= plan.expected_generator_calls {
            return Err(Error::Invariant(format!(
                "plan mismatch: plan says {} generator calls, this rank is about to make call {} \
                 (stopped before issuing it) at {} {}",
                plan.expected_generator_calls,
                *calls + 1,
                plan.chunk_index,
                plan.cache_epoch
            )));
        }
        self.graphs.check(&StepGraphs::signature(
            kind,
            call.t,
            call.frames * self.cfg.tokens_per_frame(),
        ))?;
        *calls += 1;
        let _span = spans::generator_call(GeneratorCall {
            kind,
            t: call.t,
            frames: u32::try_from(call.frames).unwrap_or(u32::MAX),
            chunk: plan.chunk_index.get(),
            epoch: plan.cache_epoch.get(),
            call: *calls,
            of: plan.expected_generator_calls,
        });
        match input {
            Input::Host(x) => self
                .gen
                .call(self.comm, &mut self.cache, call.with_input(x))
                .map(Some),
            Input::Kept => self
                .gen
                .call_on_latent(self.comm, &mut self.cache, call)
                .map(|()| None),
        }
    }

    /// Executes one plan; returns the clean latent and the mesh-agreed state digest.
    pub fn execute(
        &mut self,
        plan: &PhasePlan,
        tensors: &[HostTensor],
    ) -> Result<(Vec<f32>, StateDigest)> {
        match self.execute_with(plan, tensors, None, None)? {
            (ChunkLatent::Host(x), d) => Ok((x, d)),
            (ChunkLatent::Device(_), _) => Err(Error::Invariant(
                "a device latent without a result buffer".into(),
            )),
        }
    }

    /// `execute` with the chunk's noise as it arrived in a data-plane buffer on this rank's GPU
    /// (`device_noise`, then absent from `tensors`): a generator that keeps the latent takes it
    /// there in place (`load_latent_device`). With `result` (a data-plane buffer on this GPU,
    /// the latent's size) and a generator that keeps the latent, the clean latent is copied
    /// there and returned as `ChunkLatent::Device`, never crossing the host.
    pub fn execute_with(
        &mut self,
        plan: &PhasePlan,
        tensors: &[HostTensor],
        device_noise: Option<&DeviceBuf>,
        result: Option<DeviceBuf>,
    ) -> Result<(ChunkLatent, StateDigest)> {
        let at = format!("{} {}", plan.chunk_index, plan.cache_epoch);
        // The manifest was validated (f32, shapes) before any collective; this only decodes.
        let tensor = |name: &str| -> Result<Vec<f32>> {
            tensors
                .iter()
                .find(|t| t.name == name)
                .and_then(HostTensor::to_f32)
                .ok_or_else(|| Error::Invariant(format!("f32 tensor {name:?} missing at {at}")))
        };
        if !plan.cache_actions.reset && self.cache.ledger().epoch() != plan.cache_epoch {
            return Err(Error::Invariant(format!(
                "plan at {at} meets a cache at {} without a reset",
                self.cache.ledger().epoch()
            )));
        }
        let prompt = self.set_prompt(plan, tensors)?;
        let frames = plan.frames as usize;
        // Where the latent lives between the calls: with the generator (its device) or here.
        let kept = self.gen.keeps_latent();
        let mut x = match (device_noise, kept) {
            (Some(buf), true) => {
                // Read back at the end of the chunk (`read_latent`); nothing on the host before.
                self.gen.load_latent_device(buf)?;
                Vec::new()
            }
            (Some(_), false) => {
                return Err(Error::Invariant(format!(
                    "the noise of {at} was kept on the device for a generator that does not \
                     keep the latent there"
                )))
            }
            (None, _) => {
                let x = tensor(NOISE_TENSOR)?;
                if kept {
                    self.gen.load_latent(&x)?;
                }
                x
            }
        };
        let mut calls = 0u32;
        for phase in plan.phases() {
            match phase {
                Phase::CacheReset => self.cache.ledger_mut().reset(plan.cache_epoch)?,
                Phase::Recompute(r) => {
                    let ctx = tensor(OVERRIDE_TENSOR)?;
                    let slots = self
                        .cache
                        .ledger_mut()
                        .recompute_slots(r.first_frame, r.frames)?;
                    let call = CallSpec {
                        frames: r.frames as usize,
                        start_frame: r.first_frame,
                        t: 0,
                        mode: CacheMode::Overwrite(&slots),
                    };
                    self.gen_call("recompute", call, Input::Host(&ctx), &mut calls, plan)?;
                }
                Phase::Denoise { t, t_next } => {
                    if fault::hit(points::SKIP_GENERATOR_CALL) {
                        // One step the plan names is left out; the count below must catch it.
                        continue;
                    }
                    let call = CallSpec {
                        frames,
                        start_frame: plan.start_frame,
                        t,
                        mode: CacheMode::Read,
                    };
                    let v =
                        self.gen_call("denoise", call, Input::latent(kept, &x), &mut calls, plan)?;
                    // Flow-matching Euler step on the integer timestep grid.
                    let dt = (t_next as f32 - t as f32) / TIMESTEP_MAX as f32;
                    match v {
                        Some(v) => x.iter_mut().zip(&v).for_each(|(a, b)| *a += dt * b),
                        None => self.gen.euler_step(dt)?,
                    }
                }
                Phase::CacheEvict(n) => self.cache.ledger_mut().evict(n)?,
                Phase::CleanCacheUpdate => {
                    let slots = self.cache.ledger_mut().append(plan.frames)?;
                    let call = CallSpec {
                        frames,
                        start_frame: plan.start_frame,
                        t: 0,
                        mode: CacheMode::Append(&slots),
                    };
                    // The pass attends over the readable cache (after the plan's eviction,
                    // without the slots just reserved) + the chunk, and writes the chunk's K/V
                    // into the slots in every layer; only then are they readable.
                    self.gen_call("clean", call, Input::latent(kept, &x), &mut calls, plan)?;
                    self.cache.ledger_mut().mark_written();
                }
            }
        }
        if fault::hit(points::EXTRA_GENERATOR_CALL) {
            // One call more than the plan names, the same as the last; the check before each
            // call must stop it.
            let call = CallSpec {
                frames,
                start_frame: plan.start_frame,
                t: 0,
                mode: CacheMode::Read,
            };
            self.gen_call("clean", call, Input::latent(kept, &x), &mut calls, plan)?;
        }
        let out = match (kept, result) {
            (true, Some(mut buf)) => {
                self.gen.read_latent_device(self.comm, &mut buf)?;
                ChunkLatent::Device(buf)
            }
            (true, None) => ChunkLatent::Host(self.gen.read_latent(self.comm)?),
            (false, _) => ChunkLatent::Host(std::mem::take(&mut x)),
        };
        if fault::hit(points::CACHE_OUT_OF_BAND) {
            // An out-of-band mutation: not in the plan. The digest below must catch it.
            let l = self.cache.ledger_mut();
            if l.window_len() > 0 {
                l.evict(1)?;
            } else {
                l.reset(plan.cache_epoch)?;
            }
        }
        if calls != plan.expected_generator_calls {
            return Err(Error::Invariant(format!(
                "plan mismatch: plan says {} generator calls, this rank made {calls} (checked \
                 before the chunk-end collective) at {at}",
                plan.expected_generator_calls
            )));
        }
        let digest = StateDigest::from_ledger(
            u64::from(calls),
            self.cache.ledger(),
            self.graphs.count(),
            prompt,
        );
        let all = self.comm.all_gather_u64(&digest.to_words())?;
        let all: Vec<StateDigest> = all
            .iter()
            .map(|w| StateDigest::from_words(w))
            .collect::<Result<_>>()?;
        StateDigest::compare_all(&all, &at)?;
        Ok((out, digest))
    }
}

/// A chunk's clean latent as Stage 1 hands it on: host f32, or a data-plane buffer on the
/// rank's GPU (f32 bytes) for a device-resident RESULT.
pub enum ChunkLatent {
    Host(Vec<f32>),
    Device(DeviceBuf),
}

/// Counters a mesh rank reports at the end.
#[derive(Debug, Default, Clone)]
pub struct MeshReport {
    pub chunks: u64,
    pub duplicates_dropped: u64,
    pub noops: u64,
}

/// Leader loop: warm-up, then receive (accepted by the protocol) → validate → relay → execute →
/// RESULT, until SHUTDOWN. Every receive is bounded by `timeout` (NOOP heartbeats from rank 0
/// keep an idle mesh alive).
pub fn run_leader<L: MeshLink + ?Sized>(
    rank: &mut MeshRank<'_>,
    link: &mut L,
    steps: &[String],
    timeout: Duration,
    limits: &Limits,
) -> Result<MeshReport> {
    let mut report = MeshReport::default();
    {
        let _span = spans::enter(|| "warm-up".into());
        rank.warmup(steps)?;
    }
    let mut held: Option<PreparedEnvelope<L::Buf>> = None;
    loop {
        let env = link.recv_envelope(timeout)?.ok_or_else(|| {
            Error::Timeout(format!(
                "mesh leader: no envelope from global-rank 0 (not even a NOOP heartbeat) within \
                 {timeout:?}"
            ))
        })?;
        let t_recv = Instant::now();
        if let Some(r) = held.take() {
            link.send_result(r)?;
        }
        match env.action() {
            Action::Noop => {
                report.noops += 1;
                link.relay(Some(env))?;
            }
            Action::Shutdown => {
                link.relay(Some(env))?;
                break;
            }
            Action::Result => {
                return Err(Error::Invariant(format!(
                    "mesh leader received a RESULT ({}) from global-rank 0",
                    env.header.call_id()
                )))
            }
            Action::Infer => {
                let span = generate_span(&env);
                // Validate before any mesh collective; the relay is the first one.
                let plan = validate_infer(&env, &rank.cfg)?;
                let env = link.relay(Some(env))?;
                link.set_phase("generate");
                let ids = EnvelopeIds {
                    call_id: env.header.call_id(),
                    chunk_index: plan.chunk_index,
                    cache_epoch: plan.cache_epoch,
                };
                let (latent, digest) = execute_received(rank, &*link, &plan, env.tensors, true)?;
                let t_done = Instant::now();
                drop(span);
                report.chunks += 1;
                let meta = ResultMeta {
                    digest,
                    s1_us: t_done.duration_since(t_recv).as_micros() as u64,
                };
                let data = link.result_storage(latent)?;
                let r = prepare_result_in(ids, &meta, data, &rank.cfg, limits)?;
                if fault::hit(points::DELAY_RESULT) {
                    held = Some(r);
                } else {
                    link.send_result(r)?;
                }
            }
        }
    }
    if let Some(r) = held.take() {
        link.send_result(r)?;
    }
    report.duplicates_dropped = link.duplicates_dropped();
    Ok(report)
}

/// Non-leader loop: warm-up, then follow the leader's relays until SHUTDOWN.
pub fn run_follower<L: MeshLink + ?Sized>(
    rank: &mut MeshRank<'_>,
    link: &mut L,
    steps: &[String],
) -> Result<MeshReport> {
    let mut report = MeshReport::default();
    {
        let _span = spans::enter(|| "warm-up".into());
        rank.warmup(steps)?;
    }
    loop {
        let env = link.relay(None)?;
        match env.action() {
            Action::Noop => report.noops += 1,
            Action::Shutdown => break,
            Action::Result => {
                return Err(Error::Invariant(format!(
                    "the mesh leader relayed a RESULT ({})",
                    env.header.call_id()
                )))
            }
            Action::Infer => {
                let _span = generate_span(&env);
                let plan = validate_infer(&env, &rank.cfg)?;
                link.set_phase("generate");
                execute_received(rank, &*link, &plan, env.tensors, false)?;
                report.chunks += 1;
            }
        }
    }
    Ok(report)
}

/// Executes a received (validated, relayed) INFER: the noise stays in its data-plane buffer
/// when that is GPU memory and the generator keeps the latent there (device-resident: one
/// device-to-device copy into the model); every other tensor comes to the host.
fn execute_received<L: MeshLink + ?Sized>(
    rank: &mut MeshRank<'_>,
    link: &L,
    plan: &PhasePlan,
    tensors: Vec<crate::wire::Tensor<L::Buf>>,
    leader: bool,
) -> Result<(ChunkLatent, StateDigest)> {
    let keep = rank.gen.keeps_latent();
    let mut host = Vec::with_capacity(tensors.len());
    let mut device_noise = None;
    for t in tensors {
        if keep && t.name == NOISE_TENSOR {
            let crate::wire::Tensor {
                name,
                dtype,
                shape,
                data,
            } = t;
            match link.take_device(data) {
                Ok(buf) => device_noise = Some(buf),
                Err(data) => host.push(link.to_host(crate::wire::Tensor {
                    name,
                    dtype,
                    shape,
                    data,
                })?),
            }
        } else {
            host.push(link.to_host(t)?);
        }
    }
    // The leader's RESULT leaves from a plane buffer on the GPU when the noise came in one.
    let result = match (&device_noise, leader) {
        (Some(_), true) => {
            let bytes = rank.cfg.tokens_per_chunk() * rank.cfg.in_dim() * 4;
            link.result_buffer(bytes)?
        }
        _ => None,
    };
    rank.execute_with(plan, &host, device_noise.as_ref(), result)
}

/// A mesh rank's chunk: `generate <chunk> <epoch>`, from the header's ids (before validation,
/// which is inside it).
fn generate_span<S>(env: &ReceivedEnvelope<S>) -> spans::Guard {
    let h = &env.header;
    spans::enter_with(
        Args::Chunk {
            call_id: Some(h.call_id().get()),
            chunk: h.chunk_index().get(),
            epoch: h.cache_epoch().get(),
        },
        || format!("generate {} {}", h.chunk_index(), h.cache_epoch()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CacheEpoch, CallId, ChunkIndex};

    /// The protocol's acceptance (which the leader's `MeshLink` uses) never lets an epoch go
    /// backwards, even with a correct call_id.
    #[test]
    fn epoch_regression_crashes() {
        let h = |call: u64, epoch: u64| {
            *PreparedEnvelope::noop(EnvelopeIds {
                call_id: CallId(call),
                chunk_index: ChunkIndex(0),
                cache_epoch: CacheEpoch(epoch),
            })
            .header()
        };
        let mut a = crate::rank::Acceptance::default();
        a.check(&h(1, 2)).unwrap();
        let e = a.check(&h(2, 1)).unwrap_err().to_string();
        assert!(e.contains("cache_epoch regression"), "{e}");
    }

    /// A generator that keeps the latent (as the GPU model does on its device), here on the
    /// host: the executor's kept-latent path, checkable without a GPU.
    struct KeptOnHost {
        inner: DitGenerator,
        x: Vec<f32>,
        out: Option<Vec<f32>>,
        loads: usize,
        steps: usize,
        reads: usize,
    }

    impl Generator for KeptOnHost {
        fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt: &Prompt<'_>) -> Result<()> {
            self.inner.set_prompt(comm, prompt)
        }
        fn call(
            &mut self,
            comm: &mut dyn TpComm,
            cache: &mut KvCache,
            c: Call<'_>,
        ) -> Result<Vec<f32>> {
            self.inner.call(comm, cache, c)
        }
        fn cache_geometry(&self) -> CacheGeometry {
            self.inner.cache_geometry()
        }
        fn keeps_latent(&self) -> bool {
            true
        }
        fn load_latent(&mut self, x: &[f32]) -> Result<()> {
            self.loads += 1;
            self.x = x.to_vec();
            Ok(())
        }
        fn call_on_latent(
            &mut self,
            comm: &mut dyn TpComm,
            cache: &mut KvCache,
            c: CallSpec<'_>,
        ) -> Result<()> {
            let x = std::mem::take(&mut self.x);
            let out = self.inner.call(comm, cache, c.with_input(&x));
            self.x = x;
            self.out = Some(out?);
            Ok(())
        }
        fn euler_step(&mut self, dt: f32) -> Result<()> {
            let v = self
                .out
                .take()
                .ok_or_else(|| Error::Invariant("step without an output".into()))?;
            self.steps += 1;
            self.x.iter_mut().zip(&v).for_each(|(a, b)| *a += dt * b);
            Ok(())
        }
        fn read_latent(&mut self, _comm: &mut dyn TpComm) -> Result<Vec<f32>> {
            self.reads += 1;
            Ok(self.x.clone())
        }
    }

    #[test]
    fn a_generator_that_keeps_the_latent_streams_the_same_latents_bit_for_bit() {
        use crate::pipeline::trace::{stream_latents, StreamSpec};
        let cfg = DitConfig::tiny();
        // Wraps the ring and recomputes the sinks (a host-input call between kept ones).
        let stream = StreamSpec {
            chunks: 7,
            recompute_every: 3,
            noise_seed: 5,
            prompt_seed: 9,
        };
        let mut host = DitGenerator::new(&cfg, 3, GroupRank(0), 1).unwrap();
        assert!(!host.keeps_latent());
        let want = stream_latents(&mut host, &cfg, &stream).unwrap();
        let mut kept = KeptOnHost {
            inner: DitGenerator::new(&cfg, 3, GroupRank(0), 1).unwrap(),
            x: Vec::new(),
            out: None,
            loads: 0,
            steps: 0,
            reads: 0,
        };
        let got = stream_latents(&mut kept, &cfg, &stream).unwrap();
        assert_eq!(got.len(), 7);
        for (c, (g, w)) in got.iter().zip(&want).enumerate() {
            let same =
                g.len() == w.len() && g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "chunk {c}: the kept latent differs from the host executor's"
            );
        }
        // One load and one read per chunk, one step per denoise call.
        let n = cfg.denoise_timesteps.len() * 7;
        assert_eq!((kept.loads, kept.reads, kept.steps), (7, 7, n));
        // The stream did change the latent (a step that did nothing would also be "equal").
        assert!(got[0].iter().zip(&want[1]).any(|(a, b)| a != b));
    }

    #[test]
    fn at_tp2_the_kept_latent_streams_what_the_host_loop_streams_on_both_ranks() {
        use crate::model::tp::ThreadComm;
        use crate::pipeline::trace::{stream_latents_tp, StreamSpec};
        let cfg = DitConfig::tiny();
        let stream = StreamSpec {
            chunks: 5,
            recompute_every: 3,
            noise_seed: 2,
            prompt_seed: 4,
        };
        let run = |kept: bool| -> Vec<Vec<Vec<f32>>> {
            let comms = ThreadComm::group(2, Duration::from_secs(60));
            std::thread::scope(|sc| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut comm)| {
                        let cfg = &cfg;
                        sc.spawn(move || {
                            let g = DitGenerator::new(cfg, 3, GroupRank(r as u32), 2).unwrap();
                            if kept {
                                let mut k = KeptOnHost {
                                    inner: g,
                                    x: Vec::new(),
                                    out: None,
                                    loads: 0,
                                    steps: 0,
                                    reads: 0,
                                };
                                stream_latents_tp(&mut k, &mut comm, cfg, &stream).unwrap()
                            } else {
                                let mut g = g;
                                stream_latents_tp(&mut g, &mut comm, cfg, &stream).unwrap()
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let host = run(false);
        let kept = run(true);
        assert_eq!(kept[0].len(), 5);
        for r in 0..2 {
            for (c, (k, h)) in kept[r].iter().zip(&host[r]).enumerate() {
                assert!(
                    k.iter().zip(h).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rank {r} chunk {c}: kept latent differs from the host loop's"
                );
            }
        }
        assert_eq!(kept[0], kept[1], "the two TP ranks' latents differ");
    }

    #[test]
    fn a_host_generator_refuses_the_kept_latent_calls() {
        let cfg = DitConfig::tiny();
        let mut g = DitGenerator::new(&cfg, 3, GroupRank(0), 1).unwrap();
        let e = g.euler_step(0.5).unwrap_err().to_string();
        assert!(e.contains("does not keep a latent"), "{e}");
        let e = g.load_latent(&[0.0]).unwrap_err().to_string();
        assert!(e.contains("load_latent"), "{e}");
    }

    #[test]
    fn step_graphs_refuse_uncaptured_steps() {
        let cfg = DitConfig::tiny();
        let mut g = StepGraphs::default();
        g.capture(&StepGraphs::required(&cfg, false, 3));
        assert_eq!(g.count(), 5);
        g.check(&StepGraphs::signature("denoise", 750, 192))
            .unwrap();
        let e = g
            .check(&StepGraphs::signature("recompute", 0, 192))
            .unwrap_err();
        assert!(e.to_string().contains("not captured in warm-up"), "{e}");
    }
}
