//! Stage 1 (the mesh): acceptance on the leader, plan broadcast, the plan executor with its
//! generator-call count and chunk-end state digest, warm-up of the step-graph set.
//!
//! Contract (SPEC §4, §5, §9):
//! - The leader accepts `call_id == last + 1`; an exact duplicate (same call_id, epoch and meta
//!   digest) is DROPPED (no result cache: Stage 0 already has the one result it will accept);
//!   a regression or a gap crashes at once naming both values. Nothing is broadcast for a
//!   dropped duplicate.
//! - The leader validates the envelope (plan, manifest) before any mesh collective, then
//!   broadcasts the command; every rank executes `PhasePlan::phases()` in order, counts its
//!   generator calls against `expected_generator_calls`, and all-gathers its `StateDigest` at
//!   chunk end: any difference crashes with a per-field diff (F3).
//! - Warm-up captures the step-graph set (the CPU stand-in for CUDA-graph capture) in lockstep
//!   from a broadcast list, before the first INFER; ranks whose sets differ crash there (G2),
//!   and a production call whose signature was not captured is an invariant violation.
use super::envelope::{validate_infer, Action, ChunkResult, Envelope, Tensor, NOISE_TENSOR};
use super::faults::{points, Faults};
use super::report::Trace;
use super::LeaderLink;
use crate::cache::{CacheGeometry, KvCache};
use crate::digest::{fnv64, Fnv64};
use crate::ids::{CacheEpoch, CallId, GlobalRank, GroupRank};
use crate::model::dit::{CacheMode, DitShard, TextKv};
use crate::model::tp::TpComm;
use crate::model::DitConfig;
use crate::plan::{Phase, PhasePlan, StateDigest, OVERRIDE_TENSOR, TIMESTEP_MAX};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What the leader decided about an incoming envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    Process,
    DropDuplicate,
}

/// The leader's call_id / epoch acceptance rule.
#[derive(Debug, Default)]
pub struct Acceptor {
    last: Option<(CallId, CacheEpoch, u64)>,
    pub duplicates_dropped: u64,
}

impl Acceptor {
    pub fn check(
        &mut self,
        call_id: CallId,
        epoch: CacheEpoch,
        meta_digest: u64,
    ) -> Result<Acceptance> {
        let expected = self.last.map_or(CallId(0), |(c, _, _)| c.next());
        if let Some((lc, le, ld)) = self.last {
            if call_id == lc {
                if epoch == le && meta_digest == ld {
                    self.duplicates_dropped += 1;
                    return Ok(Acceptance::DropDuplicate);
                }
                return Err(Error::Invariant(format!(
                    "{call_id} reused with different content: first {le} meta {ld:#018x}, now \
                     {epoch} meta {meta_digest:#018x}"
                )));
            }
            if call_id < lc {
                return Err(Error::Invariant(format!(
                    "call_id regression: got {call_id} after {lc} (expected {expected})"
                )));
            }
            if epoch < le {
                return Err(Error::Invariant(format!(
                    "cache_epoch regression: {call_id} carries {epoch} after {le}"
                )));
            }
        }
        if call_id != expected {
            return Err(Error::Invariant(format!(
                "call_id gap: got {call_id}, expected {expected}"
            )));
        }
        self.last = Some((call_id, epoch, meta_digest));
        Ok(Acceptance::Process)
    }
}

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

/// The mesh's generator (the DiT on the CPU, a calibrated stand-in, later the GPU model).
pub trait Generator: Send {
    /// Computes the prompt's text K/V (once per prompt; may use collectives).
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt_seed: u64) -> Result<()>;
    /// One generator call; returns the model output (same shape as `x`).
    fn call(
        &mut self,
        comm: &mut dyn TpComm,
        cache: &mut KvCache,
        call: Call<'_>,
    ) -> Result<Vec<f32>>;
    /// Cache geometry this generator needs on this rank (zero layers = ledger only).
    fn cache_geometry(&self) -> CacheGeometry;
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
}

impl Generator for DitGenerator {
    fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt_seed: u64) -> Result<()> {
        if self
            .text
            .as_ref()
            .is_some_and(|t| t.prompt_seed == prompt_seed)
        {
            return Ok(());
        }
        self.text = Some(self.shard.text_kv(comm, prompt_seed)?);
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
    fn set_prompt(&mut self, _comm: &mut dyn TpComm, _prompt_seed: u64) -> Result<()> {
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

/// What the leader broadcasts to the mesh.
#[derive(Debug, Clone, PartialEq)]
pub enum MeshCommand {
    Warmup {
        steps: Vec<String>,
    },
    Infer {
        call_id: CallId,
        plan: PhasePlan,
        tensors: Vec<Tensor>,
    },
    Noop,
    Shutdown,
}

#[derive(Serialize, Deserialize)]
struct CmdHead {
    kind: String,
    call_id: u64,
    steps: Vec<String>,
    plan: Option<PhasePlan>,
    tensors: Vec<(String, Vec<usize>)>,
}

impl MeshCommand {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (kind, call_id, steps, plan, tensors): (
            &str,
            u64,
            Vec<String>,
            Option<PhasePlan>,
            &[Tensor],
        ) = match self {
            MeshCommand::Warmup { steps } => ("warmup", 0, steps.clone(), None, &[]),
            MeshCommand::Infer {
                call_id,
                plan,
                tensors,
            } => (
                "infer",
                call_id.get(),
                Vec::new(),
                Some(plan.clone()),
                tensors,
            ),
            MeshCommand::Noop => ("noop", 0, Vec::new(), None, &[]),
            MeshCommand::Shutdown => ("shutdown", 0, Vec::new(), None, &[]),
        };
        let head = CmdHead {
            kind: kind.into(),
            call_id,
            steps,
            plan,
            tensors: tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        };
        let h = serde_json::to_vec(&head)
            .map_err(|e| Error::Preflight(format!("mesh command does not serialize: {e}")))?;
        let mut out = Vec::with_capacity(4 + h.len());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        for t in tensors {
            out.extend_from_slice(bytemuck::cast_slice(&t.data));
        }
        Ok(out)
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| Error::Decode(format!("mesh command: {m}"));
        let n = b
            .get(..4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| bad("shorter than its length prefix"))? as usize;
        let h = b.get(4..4 + n).ok_or_else(|| bad("truncated head"))?;
        let head: CmdHead = serde_json::from_slice(h).map_err(|e| bad(&e.to_string()))?;
        let mut off = 4 + n;
        let mut tensors = Vec::new();
        for (name, shape) in head.tensors {
            let len = shape.iter().product::<usize>() * 4;
            let raw = b
                .get(off..off + len)
                .ok_or_else(|| bad("truncated tensor data"))?;
            let data = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            off += len;
            tensors.push(Tensor { name, shape, data });
        }
        match head.kind.as_str() {
            "warmup" => Ok(MeshCommand::Warmup { steps: head.steps }),
            "infer" => Ok(MeshCommand::Infer {
                call_id: CallId(head.call_id),
                plan: head.plan.ok_or_else(|| bad("infer without plan"))?,
                tensors,
            }),
            "noop" => Ok(MeshCommand::Noop),
            "shutdown" => Ok(MeshCommand::Shutdown),
            k => Err(bad(&format!("unknown kind {k:?}"))),
        }
    }
}

/// One mesh rank's state across chunks.
pub struct MeshRank<'a> {
    pub comm: &'a mut dyn TpComm,
    pub gen: &'a mut dyn Generator,
    pub cache: KvCache,
    pub graphs: StepGraphs,
    pub global_rank: GlobalRank,
    pub cfg: DitConfig,
    pub faults: Faults,
}

impl<'a> MeshRank<'a> {
    pub fn new(
        comm: &'a mut dyn TpComm,
        gen: &'a mut dyn Generator,
        global_rank: GlobalRank,
        cfg: &DitConfig,
        faults: Faults,
    ) -> Result<Self> {
        let cache = KvCache::new(gen.cache_geometry())?;
        Ok(Self {
            comm,
            gen,
            cache,
            graphs: StepGraphs::default(),
            global_rank,
            cfg: cfg.clone(),
            faults,
        })
    }

    /// Captures the broadcast step set and checks that every rank captured the same one.
    pub fn warmup(&mut self, steps: &[String]) -> Result<()> {
        self.graphs.capture(steps);
        if self.faults.hit(points::GRAPH_SET_SKEW, self.global_rank) {
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

    fn gen_call(&mut self, kind: &str, call: Call<'_>, calls: &mut u32) -> Result<Vec<f32>> {
        self.graphs.check(&StepGraphs::signature(
            kind,
            call.t,
            call.x.len() / self.cfg.in_dim().max(1),
        ))?;
        *calls += 1;
        self.gen.call(self.comm, &mut self.cache, call)
    }

    /// Executes one plan; returns the clean latent and the mesh-agreed state digest.
    pub fn execute(
        &mut self,
        plan: &PhasePlan,
        tensors: &[Tensor],
    ) -> Result<(Vec<f32>, StateDigest)> {
        let at = format!("{} {}", plan.chunk_index, plan.cache_epoch);
        let tensor = |name: &str| -> Result<&Tensor> {
            tensors
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| Error::Invariant(format!("tensor {name:?} missing at {at}")))
        };
        if !plan.cache_actions.reset && self.cache.ledger().epoch() != plan.cache_epoch {
            return Err(Error::Invariant(format!(
                "plan at {at} meets a cache at {} without a reset",
                self.cache.ledger().epoch()
            )));
        }
        self.gen.set_prompt(self.comm, plan.prompt_seed)?;
        let frames = plan.frames as usize;
        let mut x = tensor(NOISE_TENSOR)?.data.clone();
        let mut calls = 0u32;
        for phase in plan.phases() {
            match phase {
                Phase::CacheReset => self.cache.ledger_mut().reset(plan.cache_epoch)?,
                Phase::Recompute(r) => {
                    let ctx = tensor(OVERRIDE_TENSOR)?.data.clone();
                    let slots = self
                        .cache
                        .ledger_mut()
                        .recompute_slots(r.first_frame, r.frames)?;
                    let call = Call {
                        x: &ctx,
                        frames: r.frames as usize,
                        start_frame: r.first_frame,
                        t: 0,
                        mode: CacheMode::Overwrite(&slots),
                    };
                    self.gen_call("recompute", call, &mut calls)?;
                }
                Phase::Denoise { t, t_next } => {
                    let call = Call {
                        x: &x,
                        frames,
                        start_frame: plan.start_frame,
                        t,
                        mode: CacheMode::Read,
                    };
                    let v = self.gen_call("denoise", call, &mut calls)?;
                    // Flow-matching Euler step on the integer timestep grid.
                    let dt = (t_next as f32 - t as f32) / TIMESTEP_MAX as f32;
                    x.iter_mut().zip(&v).for_each(|(a, b)| *a += dt * b);
                }
                Phase::CacheEvict(n) => self.cache.ledger_mut().evict(n)?,
                Phase::CleanCacheUpdate => {
                    let slots = self.cache.ledger_mut().append(plan.frames)?;
                    let call = Call {
                        x: &x,
                        frames,
                        start_frame: plan.start_frame,
                        t: 0,
                        mode: CacheMode::Append(&slots),
                    };
                    self.gen_call("clean", call, &mut calls)?;
                }
            }
        }
        if self.faults.hit(points::CACHE_OUT_OF_BAND, self.global_rank) {
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
                "generator calls at {at}: made {calls}, plan expected {}",
                plan.expected_generator_calls
            )));
        }
        let digest =
            StateDigest::from_ledger(u64::from(calls), self.cache.ledger(), self.graphs.count());
        let all = self.comm.all_gather_u64(&digest.to_words())?;
        let all: Vec<StateDigest> = all
            .iter()
            .map(|w| StateDigest::from_words(w))
            .collect::<Result<_>>()?;
        StateDigest::compare_all(&all, &at)?;
        Ok((x, digest))
    }
}

/// Counters a mesh rank reports at the end.
#[derive(Debug, Default, Clone)]
pub struct MeshReport {
    pub chunks: u64,
    pub duplicates_dropped: u64,
    pub noops: u64,
    pub trace: Trace,
}

/// Leader loop: warm-up, then receive → accept → validate → broadcast → execute → result, until
/// SHUTDOWN. Every receive is bounded by `timeout`.
pub fn run_leader(
    rank: &mut MeshRank<'_>,
    link: &mut dyn LeaderLink,
    steps: Vec<String>,
    timeout: Duration,
    mut trace: Trace,
) -> Result<MeshReport> {
    let mut report = MeshReport::default();
    let mut acceptor = Acceptor::default();
    let warm = MeshCommand::Warmup {
        steps: steps.clone(),
    };
    let mut b = warm.encode()?;
    rank.comm.broadcast_bytes(GroupRank(0), &mut b)?;
    let t = Instant::now();
    rank.warmup(&steps)?;
    trace.span("stage1", "warm-up", t, Instant::now());
    let mut held: Option<ChunkResult> = None;
    loop {
        let env: Envelope = link.recv_envelope(timeout)?.ok_or_else(|| {
            Error::Timeout(format!(
                "mesh leader: no envelope from global-rank 0 (not even a NOOP heartbeat) within \
                 {timeout:?}"
            ))
        })?;
        let t_recv = Instant::now();
        if let Some(r) = held.take() {
            link.send_result(r)?;
        }
        if acceptor.check(env.call_id, env.cache_epoch, env.meta_digest)?
            == Acceptance::DropDuplicate
        {
            eprintln!(
                "lockstep[{}]: dropped duplicate envelope {} {} (dedupe by id + epoch)",
                rank.global_rank, env.call_id, env.cache_epoch
            );
            report.duplicates_dropped = acceptor.duplicates_dropped;
            continue;
        }
        match env.action {
            Action::Noop => {
                report.noops += 1;
                let mut b = MeshCommand::Noop.encode()?;
                rank.comm.broadcast_bytes(GroupRank(0), &mut b)?;
            }
            Action::Shutdown => {
                let mut b = MeshCommand::Shutdown.encode()?;
                rank.comm.broadcast_bytes(GroupRank(0), &mut b)?;
                break;
            }
            Action::Infer => {
                // Validate and allocate before any mesh collective.
                let plan = validate_infer(&env, &rank.cfg)?;
                let cmd = MeshCommand::Infer {
                    call_id: env.call_id,
                    plan: plan.clone(),
                    tensors: env.tensors,
                };
                let mut b = cmd.encode()?;
                rank.comm.broadcast_bytes(GroupRank(0), &mut b)?;
                let MeshCommand::Infer { tensors, .. } = cmd else {
                    return Err(Error::Invariant("mesh command changed kind".into()));
                };
                let (latent, digest) = rank.execute(&plan, &tensors)?;
                let t_done = Instant::now();
                trace.span(
                    "stage1",
                    &format!("generate {} {}", plan.chunk_index, plan.cache_epoch),
                    t_recv,
                    t_done,
                );
                report.chunks += 1;
                let r = ChunkResult {
                    call_id: env.call_id,
                    chunk_index: plan.chunk_index,
                    cache_epoch: plan.cache_epoch,
                    latent,
                    digest,
                    s1_us: t_done.duration_since(t_recv).as_micros() as u64,
                };
                if rank.faults.hit(points::DELAY_RESULT, rank.global_rank) {
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
    report.trace = trace;
    Ok(report)
}

/// Non-leader loop: follow the leader's broadcasts until SHUTDOWN.
pub fn run_follower(rank: &mut MeshRank<'_>, mut trace: Trace) -> Result<MeshReport> {
    let mut report = MeshReport::default();
    loop {
        let mut b = Vec::new();
        rank.comm.broadcast_bytes(GroupRank(0), &mut b)?;
        let t = Instant::now();
        match MeshCommand::decode(&b)? {
            MeshCommand::Warmup { steps } => {
                rank.warmup(&steps)?;
                trace.span("stage1", "warm-up", t, Instant::now());
            }
            MeshCommand::Noop => report.noops += 1,
            MeshCommand::Shutdown => break,
            MeshCommand::Infer { plan, tensors, .. } => {
                plan.validate()?;
                rank.execute(&plan, &tensors)?;
                trace.span(
                    "stage1",
                    &format!("generate {} {}", plan.chunk_index, plan.cache_epoch),
                    t,
                    Instant::now(),
                );
                report.chunks += 1;
            }
        }
    }
    report.trace = trace;
    Ok(report)
}

/// Digest of a step list (for logs).
pub fn steps_digest(steps: &[String]) -> u64 {
    fnv64(steps.join(",").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn d1_exact_duplicate_is_dropped_and_counted() {
        let mut a = Acceptor::default();
        assert_eq!(
            a.check(CallId(0), CacheEpoch(0), 7).unwrap(),
            Acceptance::Process
        );
        assert_eq!(
            a.check(CallId(0), CacheEpoch(0), 7).unwrap(),
            Acceptance::DropDuplicate
        );
        assert_eq!(a.duplicates_dropped, 1);
        assert_eq!(
            a.check(CallId(1), CacheEpoch(0), 8).unwrap(),
            Acceptance::Process
        );
        let e = a
            .check(CallId(1), CacheEpoch(0), 9)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reused with different content"), "{e}");
    }

    #[test]
    fn d3_call_id_regression_and_gap_crash_with_both_values() {
        let mut a = Acceptor::default();
        for c in 0..4 {
            a.check(CallId(c), CacheEpoch(0), c).unwrap();
        }
        let e = a.check(CallId(2), CacheEpoch(0), 2).unwrap_err();
        assert!(matches!(e, Error::Invariant(_)));
        assert!(
            e.to_string()
                .contains("call_id regression: got call_id 2 after call_id 3 (expected call_id 4)"),
            "{e}"
        );
        let e = a
            .check(CallId(6), CacheEpoch(0), 6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("call_id gap: got call_id 6, expected call_id 4"),
            "{e}"
        );
        let e = a.check(CallId(4), CacheEpoch(0), 4);
        assert!(e.is_ok());
        let mut b = Acceptor::default();
        assert!(
            b.check(CallId(1), CacheEpoch(0), 0).is_err(),
            "first call must be call_id 0"
        );
    }

    #[test]
    fn epoch_regression_crashes() {
        let mut a = Acceptor::default();
        a.check(CallId(0), CacheEpoch(2), 0).unwrap();
        let e = a
            .check(CallId(1), CacheEpoch(1), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache_epoch regression"), "{e}");
    }

    #[test]
    fn mesh_command_round_trips() {
        let cfg = DitConfig::tiny();
        let plan = crate::plan::Planner::new(crate::plan::PlanPolicy {
            frames_per_chunk: 3,
            denoise_timesteps: cfg.denoise_timesteps.clone(),
            clean_cache_update: true,
            recompute_every: 0,
            sink_frames: 3,
            window_frames: 6,
            prompt_seed: 1,
        })
        .unwrap()
        .next_plan(crate::ids::ChunkIndex(0), CacheEpoch(0));
        let cmds = vec![
            MeshCommand::Warmup {
                steps: vec!["a".into()],
            },
            MeshCommand::Infer {
                call_id: CallId(3),
                plan,
                tensors: vec![Tensor {
                    name: "noise".into(),
                    shape: vec![2, 2],
                    data: vec![1.0, -2.0, 3.5, 0.25],
                }],
            },
            MeshCommand::Noop,
            MeshCommand::Shutdown,
        ];
        for c in cmds {
            let b = c.encode().unwrap();
            assert_eq!(MeshCommand::decode(&b).unwrap(), c);
            assert!(MeshCommand::decode(&b[..b.len() - 3]).is_err());
        }
        assert!(MeshCommand::decode(&[1]).is_err());
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
