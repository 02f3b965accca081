//! The pipeline's content inside the protocol's one framing (`wire`): the INFER envelope (meta =
//! the phase plan, tensors = the plan's manifest) and the RESULT envelope (meta = state digest +
//! mesh time, tensor = the clean latent).
//!
//! Contract: only `prepare_infer` builds an INFER, and only after the plan validated and every
//! tensor matched the manifest the plan implies (`noise`: `[tokens_per_chunk, in_dim]` f32;
//! `context_frames_override`: `[frames · tokens_per_frame, in_dim]` f32 iff a recompute is
//! planned) — then `wire::prepare` runs the protocol's preflight, so what comes out is a
//! `PreparedEnvelope`, the only sendable thing. `validate_infer` re-runs the same checks on the
//! mesh (leader first, before any mesh collective) plus header-vs-plan id agreement.
//! Every mesh rank then checks the chunk's tensor against its own model geometry (G3: shape skew,
//! exit 70, before any forward).
//! Tripwires: F1 (recompute without override: refused before send and on the leader), a tensor
//! the plan does not declare, a header whose ids disagree with its plan.
use crate::fault::{self, points};
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::model::DitConfig;
use crate::plan::{PhasePlan, StateDigest, OVERRIDE_TENSOR};
use crate::wire::{
    prepare, Action, DType, EnvelopeIds, HostTensor, Limits, PreparedEnvelope, ReceivedEnvelope,
    Tensor, TensorBytes,
};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const NOISE_TENSOR: &str = "noise";
pub const LATENT_TENSOR: &str = "latent";

/// A decoded RESULT: what the mesh leader returns for one INFER.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkResult {
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    /// Clean latent `[tokens_per_chunk, in_dim]`.
    pub latent: Vec<f32>,
    pub digest: StateDigest,
    /// Mesh time for this chunk (envelope received → result ready), microseconds.
    pub s1_us: u64,
}

/// The RESULT's typed meta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub digest: StateDigest,
    pub s1_us: u64,
}

fn check_manifest<S: TensorBytes>(
    plan: &PhasePlan,
    tensors: &[Tensor<S>],
    cfg: &DitConfig,
) -> Result<()> {
    let at = format!("{} {}", plan.chunk_index, plan.cache_epoch);
    let tpf = cfg.tokens_per_frame();
    const LATENT: &[DType] = &[DType::F32];
    // A text encoder's output may be half precision; the mesh converts it.
    const TEXT: &[DType] = &[DType::F32, DType::F16, DType::Bf16];
    let mut want: Vec<(&str, Vec<u64>, &[DType])> = vec![(
        NOISE_TENSOR,
        vec![(plan.frames as usize * tpf) as u64, cfg.in_dim() as u64],
        LATENT,
    )];
    if let Some(o) = &plan.context_frames_override {
        want.push((
            OVERRIDE_TENSOR,
            vec![(o.frames as usize * tpf) as u64, cfg.in_dim() as u64],
            LATENT,
        ));
    }
    if let Some(name) = plan.conditioning.as_ref().and_then(|c| c.tensor.as_deref()) {
        want.push((
            name,
            vec![cfg.text_tokens as u64, cfg.text_dim as u64],
            TEXT,
        ));
    }
    if plan.frames as usize != cfg.frames_per_chunk {
        return Err(Error::Preflight(format!(
            "plan at {at} has {} frames, the model takes {} per chunk",
            plan.frames, cfg.frames_per_chunk
        )));
    }
    for (name, shape, dtypes) in &want {
        let Some(t) = tensors.iter().find(|t| t.name == *name) else {
            return Err(Error::Preflight(format!(
                "envelope at {at} lacks tensor {name:?} (shape {shape:?}) that its plan requires"
            )));
        };
        let n: u64 = shape.iter().product();
        if &t.shape != shape
            || !dtypes.contains(&t.dtype)
            || t.data.byte_len() != n * t.dtype.size()
        {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(Error::Preflight(format!(
                "tensor {name:?} at {at} is {} {:?} ({} bytes), the plan requires {} {shape:?}",
                t.dtype.name(),
                t.shape,
                t.data.byte_len(),
                names.join("/")
            )));
        }
    }
    if let Some(extra) = tensors
        .iter()
        .find(|t| !want.iter().any(|(n, _, _)| *n == t.name))
    {
        return Err(Error::Preflight(format!(
            "envelope at {at} carries tensor {:?} that its plan does not declare",
            extra.name
        )));
    }
    Ok(())
}

fn infer_ids(plan: &PhasePlan, ids: EnvelopeIds) -> EnvelopeIds {
    EnvelopeIds {
        call_id: ids.call_id,
        chunk_index: plan.chunk_index,
        cache_epoch: plan.cache_epoch,
    }
}

/// Preflight: validate the plan, check the manifest, then the protocol's preflight — then, and
/// only then, an envelope exists to send. `ids.call_id` is the one the rank allocated.
pub fn prepare_infer(
    plan: &PhasePlan,
    ids: EnvelopeIds,
    tensors: Vec<HostTensor>,
    cfg: &DitConfig,
    limits: &Limits,
) -> Result<PreparedEnvelope> {
    plan.validate()?;
    check_manifest(plan, &tensors, cfg)?;
    prepare(Action::Infer, infer_ids(plan, ids), plan, tensors, limits)
}

/// An INFER without the pipeline's plan checks (the protocol's preflight still runs): only the
/// fault `pipeline.skip_preflight` uses it, to prove the mesh leader's own validation catches
/// what a foreign sender lets through.
pub fn unchecked_infer(
    plan: &PhasePlan,
    ids: EnvelopeIds,
    tensors: Vec<HostTensor>,
    limits: &Limits,
) -> Result<PreparedEnvelope> {
    prepare(Action::Infer, infer_ids(plan, ids), plan, tensors, limits)
}

/// Mesh side, before any mesh collective: decode the plan from the meta and re-validate.
pub fn validate_infer<S: TensorBytes>(
    env: &ReceivedEnvelope<S>,
    cfg: &DitConfig,
) -> Result<PhasePlan> {
    let h = &env.header;
    let meta = env
        .meta
        .as_ref()
        .ok_or_else(|| Error::Decode(format!("INFER {} arrived without meta", h.call_id())))?;
    let plan: PhasePlan = meta.body_as()?;
    if plan.chunk_index != h.chunk_index() || plan.cache_epoch != h.cache_epoch() {
        return Err(Error::Invariant(format!(
            "header says {} {} but its plan says {} {}",
            h.chunk_index(),
            h.cache_epoch(),
            plan.chunk_index,
            plan.cache_epoch
        )));
    }
    plan.validate()?;
    check_manifest(&plan, &env.tensors, cfg)?;
    check_rank_shapes(&plan, &env.tensors, cfg)?;
    Ok(plan)
}

/// G3, on every mesh rank after the manifest matched its plan: the chunk's tensor has the shape
/// this rank's own model geometry computes with (`[frames_per_chunk · tokens_per_frame,
/// in_dim]`), so a rank whose expectation differs stops here, before any forward collective.
fn check_rank_shapes<S: TensorBytes>(
    plan: &PhasePlan,
    tensors: &[Tensor<S>],
    cfg: &DitConfig,
) -> Result<()> {
    let tpf = cfg.tokens_per_frame() as u64;
    let plan_says = vec![u64::from(plan.frames) * tpf, cfg.in_dim() as u64];
    let mut expect = vec![cfg.frames_per_chunk as u64 * tpf, cfg.in_dim() as u64];
    if fault::hit(points::SHAPE_SKEW) {
        expect[0] += tpf;
    }
    let Some(t) = tensors.iter().find(|t| t.name == NOISE_TENSOR) else {
        return Ok(()); // check_manifest requires it; nothing to compare.
    };
    if t.shape != expect {
        return Err(Error::Invariant(format!(
            "shape skew caught by envelope validation before any forward: tensor `{}` has shape \
             {:?} (plan says {plan_says:?}), this rank expects {expect:?}",
            t.name, t.shape
        )));
    }
    Ok(())
}

/// The RESULT for the INFER with `ids` (same call_id, chunk_index and cache_epoch).
pub fn prepare_result(
    ids: EnvelopeIds,
    meta: &ResultMeta,
    latent: &[f32],
    cfg: &DitConfig,
    limits: &Limits,
) -> Result<PreparedEnvelope> {
    let shape = vec![cfg.tokens_per_chunk() as u64, cfg.in_dim() as u64];
    if latent.len() as u64 != shape.iter().product::<u64>() {
        return Err(Error::Invariant(format!(
            "RESULT {} latent has {} values, the model's chunk is {shape:?}",
            ids.call_id,
            latent.len()
        )));
    }
    let t = HostTensor::from_f32(LATENT_TENSOR, shape, latent);
    prepare(Action::Result, ids, meta, vec![t], limits)
}

/// `prepare_result` over the latent's f32 bytes as they are stored (host bytes, or a
/// data-plane buffer on the GPU for a device-resident RESULT).
pub fn prepare_result_in<S: TensorBytes>(
    ids: EnvelopeIds,
    meta: &ResultMeta,
    data: S,
    cfg: &DitConfig,
    limits: &Limits,
) -> Result<PreparedEnvelope<S>> {
    let shape = vec![cfg.tokens_per_chunk() as u64, cfg.in_dim() as u64];
    let want = shape.iter().product::<u64>() * DType::F32.size();
    if data.byte_len() != want {
        return Err(Error::Invariant(format!(
            "RESULT {} latent has {} bytes, the model's chunk is {shape:?} f32 ({want} bytes)",
            ids.call_id,
            data.byte_len()
        )));
    }
    let t = Tensor::new(LATENT_TENSOR, DType::F32, shape, data);
    prepare(Action::Result, ids, meta, vec![t], limits)
}

/// Rank 0: a received RESULT as a `ChunkResult` (typed errors for anything else).
pub fn decode_result(env: &ReceivedEnvelope) -> Result<ChunkResult> {
    let h = &env.header;
    if env.action() != Action::Result {
        return Err(Error::Invariant(format!(
            "stage 0 expected a RESULT from the mesh leader, got {} {}",
            env.action().name(),
            h.call_id()
        )));
    }
    let meta: ResultMeta = env
        .meta
        .as_ref()
        .ok_or_else(|| Error::Decode(format!("RESULT {} arrived without meta", h.call_id())))?
        .body_as()?;
    let latent = env
        .tensor(LATENT_TENSOR)
        .and_then(HostTensor::to_f32)
        .ok_or_else(|| {
            Error::Decode(format!(
                "RESULT {} lacks an f32 tensor {LATENT_TENSOR:?}",
                h.call_id()
            ))
        })?;
    Ok(ChunkResult {
        call_id: h.call_id(),
        chunk_index: h.chunk_index(),
        cache_epoch: h.cache_epoch(),
        latent,
        digest: meta.digest,
        s1_us: meta.s1_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanPolicy, Planner};
    use crate::wire::{Header, MetaDoc};

    fn setup(recompute_every: u32) -> (DitConfig, Planner) {
        let cfg = DitConfig::tiny();
        let p = Planner::new(PlanPolicy {
            frames_per_chunk: 3,
            denoise_timesteps: cfg.denoise_timesteps.clone(),
            clean_cache_update: true,
            recompute_every,
            sink_frames: 3,
            window_frames: 6,
            prompt_seed: 1,
        })
        .unwrap();
        (cfg, p)
    }

    fn noise(cfg: &DitConfig) -> HostTensor {
        let n = cfg.tokens_per_chunk() * cfg.in_dim();
        HostTensor::from_f32(
            NOISE_TENSOR,
            vec![cfg.tokens_per_chunk() as u64, cfg.in_dim() as u64],
            &vec![0.0; n],
        )
    }

    fn ids(call: u64) -> EnvelopeIds {
        EnvelopeIds {
            call_id: CallId(call),
            ..Default::default()
        }
    }

    /// What the receiving side reconstructs from the bytes a `PreparedEnvelope` puts on the wire.
    fn received(env: &PreparedEnvelope) -> ReceivedEnvelope {
        let l = Limits::default();
        let header = Header::decode(&env.header_bytes()).unwrap();
        let meta = MetaDoc::decode(
            env.meta_bytes(),
            header.meta_digest,
            header.n_tensors,
            header.payload_bytes,
            &l,
        )
        .unwrap();
        ReceivedEnvelope {
            header,
            meta: Some(meta),
            tensors: env.tensors().to_vec(),
        }
    }

    #[test]
    fn prepared_infer_validates_on_the_leader() {
        let (cfg, p) = setup(0);
        let l = Limits::default();
        let plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        let env = prepare_infer(&plan, ids(1), vec![noise(&cfg)], &cfg, &l).unwrap();
        assert_eq!(env.header().chunk_index(), plan.chunk_index);
        assert_eq!(validate_infer(&received(&env), &cfg).unwrap(), plan);
        let other = p.next_plan(ChunkIndex(9), CacheEpoch(0));
        let mut bad = received(&env);
        bad.meta =
            received(&prepare_infer(&other, ids(1), vec![noise(&cfg)], &cfg, &l).unwrap()).meta;
        let e = validate_infer(&bad, &cfg).unwrap_err().to_string();
        assert!(e.contains("header says"), "{e}");
    }

    #[test]
    fn a_conditioning_tensor_in_half_precision_travels_and_is_checked_on_both_sides() {
        use crate::plan::{ConditioningSpec, CONDITIONING_TENSOR};
        let (cfg, p) = setup(0);
        let l = Limits::default();
        let mut plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        plan.conditioning = Some(ConditioningSpec {
            tensor: Some(CONDITIONING_TENSOR.into()),
        });
        let shape = vec![cfg.text_tokens as u64, cfg.text_dim as u64];
        let text = HostTensor::new(
            CONDITIONING_TENSOR,
            DType::Bf16,
            shape.clone(),
            vec![0u8; cfg.text_tokens * cfg.text_dim * 2],
        );
        let env = prepare_infer(&plan, ids(1), vec![noise(&cfg), text.clone()], &cfg, &l)
            .expect("bf16 conditioning");
        assert_eq!(validate_infer(&received(&env), &cfg).unwrap(), plan);
        // The plan names it: without it, nothing is sent.
        let e = prepare_infer(&plan, ids(1), vec![noise(&cfg)], &cfg, &l).unwrap_err();
        assert!(
            e.to_string().contains("lacks tensor \"conditioning\""),
            "{e}"
        );
        // Another shape or an integer dtype is refused.
        let mut wrong = text.clone();
        wrong.shape = vec![shape[0] + 1, shape[1]];
        let e = prepare_infer(&plan, ids(1), vec![noise(&cfg), wrong], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("f32/f16/bf16"), "{e}");
        let mut int = text;
        int.dtype = DType::U8;
        int.data.truncate(cfg.text_tokens * cfg.text_dim);
        let e = prepare_infer(&plan, ids(1), vec![noise(&cfg), int], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("is u8"), "{e}");
    }

    #[test]
    fn manifest_must_match_the_plan() {
        let (cfg, p) = setup(0);
        let l = Limits::default();
        let plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        let e = prepare_infer(&plan, ids(1), vec![], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("lacks tensor \"noise\""), "{e}");
        let mut n = noise(&cfg);
        n.shape[0] -= 1;
        let e = prepare_infer(&plan, ids(1), vec![n], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("the plan requires f32"), "{e}");
        let mut extra = noise(&cfg);
        extra.name = "hidden".into();
        let e = prepare_infer(&plan, ids(1), vec![noise(&cfg), extra], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("does not declare"), "{e}");
    }

    #[test]
    fn f1_recompute_override_omitted_fails_before_send_and_on_the_leader() {
        let (cfg, mut p) = setup(1);
        let l = Limits::default();
        let first = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        p.commit(&first).unwrap();
        let mut plan = p.next_plan(ChunkIndex(1), CacheEpoch(0));
        assert!(plan.recompute.is_some());
        // Declared override but tensor missing: the manifest check refuses.
        let e = prepare_infer(&plan, ids(2), vec![noise(&cfg)], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("context_frames_override"), "{e}");
        // Override dropped from the plan itself: plan validation refuses, before send…
        plan.context_frames_override = None;
        let e = prepare_infer(&plan, ids(2), vec![noise(&cfg)], &cfg, &l).unwrap_err();
        assert!(e.to_string().contains("required, never a fallback"), "{e}");
        // …and on the leader, for a sender that skipped the pipeline's preflight.
        let env = unchecked_infer(&plan, ids(2), vec![noise(&cfg)], &l).unwrap();
        let e = validate_infer(&received(&env), &cfg).unwrap_err();
        assert!(e.to_string().contains("required, never a fallback"), "{e}");
    }

    #[test]
    fn result_round_trips_through_the_wire_framing() {
        let l = Limits::default();
        let ids = EnvelopeIds {
            call_id: CallId(7),
            chunk_index: ChunkIndex(3),
            cache_epoch: CacheEpoch(1),
        };
        let digest = StateDigest {
            calls_made: 5,
            cache_epoch: 1,
            cache_start_frame: 0,
            cache_len_frames: 3,
            cache_mutations: 2,
            graph_count: 5,
            prompt: 7,
        };
        let meta = ResultMeta { digest, s1_us: 42 };
        let cfg = DitConfig::tiny();
        let latent: Vec<f32> = (0..cfg.tokens_per_chunk() * cfg.in_dim())
            .map(|i| i as f32 * 0.5)
            .collect();
        let env = prepare_result(ids, &meta, &latent, &cfg, &l).unwrap();
        assert_eq!(
            env.tensors()[0].shape,
            vec![cfg.tokens_per_chunk() as u64, cfg.in_dim() as u64]
        );
        let r = decode_result(&received(&env)).unwrap();
        assert_eq!(
            (r.call_id, r.chunk_index, r.cache_epoch),
            (CallId(7), ChunkIndex(3), CacheEpoch(1))
        );
        assert_eq!((r.latent, r.digest, r.s1_us), (latent, digest, 42));
        assert!(prepare_result(ids, &meta, &[1.0], &cfg, &l).is_err());
    }
}
