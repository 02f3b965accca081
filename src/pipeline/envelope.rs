//! The pipeline's INFER envelope and RESULT, and the preflight that builds one.
//!
//! Contract: only `prepare_infer` builds an INFER `Envelope`, and only after the plan validated,
//! its canonical meta serialized, and every tensor matched the manifest the plan implies
//! (`noise`: `[tokens_per_chunk, in_dim]`; `context_frames_override`: `[frames · tokens_per_frame,
//! in_dim]` iff a recompute is planned). `validate_infer` re-runs the same checks on the mesh
//! leader before any mesh collective, plus header-vs-plan id agreement. The protocol's
//! `wire::PreparedEnvelope` carries these bytes across processes; here they travel in memory.
use crate::digest::fnv64;
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::model::DitConfig;
use crate::plan::{PhasePlan, StateDigest, OVERRIDE_TENSOR};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const NOISE_TENSOR: &str = "noise";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Infer,
    Noop,
    Shutdown,
}

/// A top-level f32 tensor (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    pub action: Action,
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    /// Canonical plan bytes (empty for NOOP/SHUTDOWN).
    pub meta: Vec<u8>,
    pub meta_digest: u64,
    pub tensors: Vec<Tensor>,
}

impl Envelope {
    /// NOOP / SHUTDOWN: no meta, no tensors.
    pub fn bare(
        action: Action,
        call_id: CallId,
        chunk_index: ChunkIndex,
        epoch: CacheEpoch,
    ) -> Self {
        Self {
            action,
            call_id,
            chunk_index,
            cache_epoch: epoch,
            meta: Vec::new(),
            meta_digest: fnv64(&[]),
            tensors: Vec::new(),
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// What the mesh leader returns for one INFER.
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

fn check_manifest(plan: &PhasePlan, tensors: &[Tensor], cfg: &DitConfig) -> Result<()> {
    let at = format!("{} {}", plan.chunk_index, plan.cache_epoch);
    let tpf = cfg.tokens_per_frame();
    let mut want: Vec<(&str, Vec<usize>)> =
        vec![(NOISE_TENSOR, vec![plan.frames as usize * tpf, cfg.in_dim()])];
    if let Some(o) = &plan.context_frames_override {
        want.push((OVERRIDE_TENSOR, vec![o.frames as usize * tpf, cfg.in_dim()]));
    }
    if plan.frames as usize != cfg.frames_per_chunk {
        return Err(Error::Preflight(format!(
            "plan at {at} has {} frames, the model takes {} per chunk",
            plan.frames, cfg.frames_per_chunk
        )));
    }
    for (name, shape) in &want {
        let Some(t) = tensors.iter().find(|t| t.name == *name) else {
            return Err(Error::Preflight(format!(
                "envelope at {at} lacks tensor {name:?} (shape {shape:?}) that its plan requires"
            )));
        };
        if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(Error::Preflight(format!(
                "tensor {name:?} at {at} has shape {:?} ({} values), the plan requires {shape:?}",
                t.shape,
                t.data.len()
            )));
        }
    }
    if let Some(extra) = tensors
        .iter()
        .find(|t| !want.iter().any(|(n, _)| *n == t.name))
    {
        return Err(Error::Preflight(format!(
            "envelope at {at} carries tensor {:?} that its plan does not declare",
            extra.name
        )));
    }
    Ok(())
}

/// Preflight: validate the plan, serialize meta, check the manifest — then, and only then, an
/// envelope exists to send.
pub fn prepare_infer(
    plan: &PhasePlan,
    call_id: CallId,
    tensors: Vec<Tensor>,
    cfg: &DitConfig,
) -> Result<Envelope> {
    plan.validate()?;
    check_manifest(plan, &tensors, cfg)?;
    let meta = plan.canonical_bytes()?;
    Ok(Envelope {
        action: Action::Infer,
        call_id,
        chunk_index: plan.chunk_index,
        cache_epoch: plan.cache_epoch,
        meta_digest: fnv64(&meta),
        meta,
        tensors,
    })
}

/// Builds an INFER without preflight: only the fault `pipeline.skip_preflight` uses it, to
/// prove the mesh leader's own validation catches what a foreign sender lets through.
pub fn unchecked_infer(
    plan: &PhasePlan,
    call_id: CallId,
    tensors: Vec<Tensor>,
) -> Result<Envelope> {
    let meta = plan.canonical_bytes()?;
    Ok(Envelope {
        action: Action::Infer,
        call_id,
        chunk_index: plan.chunk_index,
        cache_epoch: plan.cache_epoch,
        meta_digest: fnv64(&meta),
        meta,
        tensors,
    })
}

/// Mesh leader, before any mesh collective: decode and re-validate.
pub fn validate_infer(env: &Envelope, cfg: &DitConfig) -> Result<PhasePlan> {
    if fnv64(&env.meta) != env.meta_digest {
        return Err(Error::Decode(format!(
            "meta digest mismatch for {} (meta corrupted in transit)",
            env.call_id
        )));
    }
    let plan = PhasePlan::from_canonical_bytes(&env.meta)?;
    if plan.chunk_index != env.chunk_index || plan.cache_epoch != env.cache_epoch {
        return Err(Error::Invariant(format!(
            "header says {} {} but its plan says {} {}",
            env.chunk_index, env.cache_epoch, plan.chunk_index, plan.cache_epoch
        )));
    }
    plan.validate()?;
    check_manifest(&plan, &env.tensors, cfg)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanPolicy, Planner};

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

    fn noise(cfg: &DitConfig) -> Tensor {
        Tensor {
            name: NOISE_TENSOR.into(),
            shape: vec![cfg.tokens_per_chunk(), cfg.in_dim()],
            data: vec![0.0; cfg.tokens_per_chunk() * cfg.in_dim()],
        }
    }

    #[test]
    fn prepared_infer_validates_on_the_leader() {
        let (cfg, p) = setup(0);
        let plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        let env = prepare_infer(&plan, CallId(0), vec![noise(&cfg)], &cfg).unwrap();
        assert_eq!(validate_infer(&env, &cfg).unwrap(), plan);
        let mut bad = env.clone();
        bad.meta[5] ^= 1;
        assert!(validate_infer(&bad, &cfg).is_err());
        let mut bad = env.clone();
        bad.chunk_index = ChunkIndex(9);
        assert!(validate_infer(&bad, &cfg)
            .unwrap_err()
            .to_string()
            .contains("header says"));
    }

    #[test]
    fn manifest_must_match_the_plan() {
        let (cfg, p) = setup(0);
        let plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        let e = prepare_infer(&plan, CallId(0), vec![], &cfg).unwrap_err();
        assert!(e.to_string().contains("lacks tensor \"noise\""), "{e}");
        let mut n = noise(&cfg);
        n.shape[0] -= 1;
        let e = prepare_infer(&plan, CallId(0), vec![n], &cfg).unwrap_err();
        assert!(e.to_string().contains("has shape"), "{e}");
        let mut extra = noise(&cfg);
        extra.name = "hidden".into();
        let e = prepare_infer(&plan, CallId(0), vec![noise(&cfg), extra], &cfg).unwrap_err();
        assert!(e.to_string().contains("does not declare"), "{e}");
    }

    #[test]
    fn f1_recompute_override_omitted_fails_before_send_and_on_the_leader() {
        let (cfg, mut p) = setup(1);
        let first = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        p.commit(&first).unwrap();
        let mut plan = p.next_plan(ChunkIndex(1), CacheEpoch(0));
        assert!(plan.recompute.is_some());
        // Declared override but tensor missing: the manifest check refuses.
        let e = prepare_infer(&plan, CallId(1), vec![noise(&cfg)], &cfg).unwrap_err();
        assert!(e.to_string().contains("context_frames_override"), "{e}");
        // Override dropped from the plan itself: plan validation refuses, before send…
        plan.context_frames_override = None;
        let e = prepare_infer(&plan, CallId(1), vec![noise(&cfg)], &cfg).unwrap_err();
        assert!(e.to_string().contains("required, never a fallback"), "{e}");
        // …and on the leader, for a sender that skipped preflight.
        let env = unchecked_infer(&plan, CallId(1), vec![noise(&cfg)]).unwrap();
        let e = validate_infer(&env, &cfg).unwrap_err();
        assert!(e.to_string().contains("required, never a fallback"), "{e}");
    }
}
