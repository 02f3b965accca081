//! Phase plan (docs/spec.md §5) and the chunk-end state digest.
//!
//! Contract:
//! - Every INFER carries a `PhasePlan`: denoise timesteps, whether a recompute call runs (then
//!   `context_frames_override` is REQUIRED — never a fallback), whether the clean cache-update
//!   pass runs, the cache actions (reset / evict / append) and `expected_generator_calls`.
//!   Nothing that gates a collective is decided locally: every mesh rank executes
//!   `PhasePlan::phases()` in order and counts its generator calls against the plan.
//! - `validate` runs before send (Stage 0 preflight) and again on the mesh leader before any
//!   mesh collective; `check_against` dry-runs the cache actions on a ledger.
//! - `canonical_bytes` is deterministic (fixed field order, integers only: timesteps are on a
//!   0..=1000 integer grid), so its digest agrees across ranks and a bug report can be diffed.
//! - `StateDigest` (calls made, cache epoch, cache start frame and length, cache mutation count,
//!   captured step-graph count) is compared across the mesh at chunk end and against Stage 0's
//!   expectation; `diff` names every differing field.
//!
//! Tripwires: F1 (recompute without override fails in `validate`), F3 (out-of-band cache
//! mutation shows up as a digest diff within the chunk), B2 (call count ≠ plan).
use crate::cache::CacheLedger;
use crate::digest::fnv64;
use crate::ids::{CacheEpoch, ChunkIndex};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const PLAN_VERSION: u32 = 1;
/// Timesteps live on an integer grid `0..=TIMESTEP_MAX` (sigma = t / TIMESTEP_MAX).
pub const TIMESTEP_MAX: u32 = 1000;
/// Name of the envelope tensor that carries the recompute context.
pub const OVERRIDE_TENSOR: &str = "context_frames_override";
/// Name of the envelope tensor that carries a caller's conditioning (a text encoder's output).
pub const CONDITIONING_TENSOR: &str = "conditioning";

/// Which cached frames a recompute call overwrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecomputeSpec {
    pub first_frame: u64,
    pub frames: u32,
}

/// The envelope tensor a recompute reads: `[frames · tokens_per_frame, in_dim]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideSpec {
    pub tensor: String,
    pub frames: u32,
}

/// The prompt is a caller's conditioning tensor (`PhasePlan::conditioning`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditioningSpec {
    /// The envelope tensor with its values ([`CONDITIONING_TENSOR`]): on the first chunk of an
    /// epoch (the mesh computes the text K/V from it once); `None` on later chunks, which use
    /// the text K/V the mesh already holds for the digest.
    pub tensor: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CacheActions {
    /// Start a fresh cache world at the plan's epoch (first chunk, or after a hard cut).
    pub reset: bool,
    /// Oldest window frames dropped before the clean pass appends.
    pub evict_frames: u32,
    /// Frames the clean cache-update pass appends (the chunk's frames, or 0).
    pub append_frames: u32,
}

/// One chunk's explicit schedule. Serialized into the envelope meta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhasePlan {
    pub plan_version: u32,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    /// Logical latent frame (within the epoch) of the chunk's first frame: RoPE positions.
    pub start_frame: u64,
    pub frames: u32,
    /// Prompt whose text K/V cross-attention uses (computed once per prompt on the mesh): the
    /// seed of its text features, or, with `conditioning`, the digest of the caller's tensor.
    pub prompt_seed: u64,
    /// The prompt is a caller's tensor whose digest is `prompt_seed`; `None`: the text features
    /// come from the seed. (Absent from the meta when `None`: a seeded plan's bytes are as
    /// before.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditioning: Option<ConditioningSpec>,
    /// Strictly descending, in `1..=TIMESTEP_MAX`; each is one generator call.
    pub denoise_timesteps: Vec<u32>,
    pub recompute: Option<RecomputeSpec>,
    pub context_frames_override: Option<OverrideSpec>,
    pub clean_cache_update: bool,
    pub cache_actions: CacheActions,
    pub expected_generator_calls: u32,
}

/// The order every mesh rank executes a plan in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    CacheReset,
    /// Generator call over the override frames; overwrites their cached K/V.
    Recompute(RecomputeSpec),
    /// Generator call at timestep `t`, Euler step to `t_next`; reads the cache.
    Denoise {
        t: u32,
        t_next: u32,
    },
    CacheEvict(u32),
    /// Generator call on the clean latent (t = 0) that appends the chunk's K/V.
    CleanCacheUpdate,
}

impl Phase {
    pub fn is_generator_call(&self) -> bool {
        matches!(
            self,
            Phase::Recompute(_) | Phase::Denoise { .. } | Phase::CleanCacheUpdate
        )
    }
}

impl PhasePlan {
    /// Generator calls implied by the plan's fields.
    pub fn implied_generator_calls(&self) -> u32 {
        self.denoise_timesteps.len() as u32
            + u32::from(self.recompute.is_some())
            + u32::from(self.clean_cache_update)
    }

    /// Self-consistency, before send and before any mesh collective.
    pub fn validate(&self) -> Result<()> {
        let at = format!("{} {}", self.chunk_index, self.cache_epoch);
        if self.plan_version != PLAN_VERSION {
            return Err(Error::Preflight(format!(
                "phase plan version {} (this build speaks {PLAN_VERSION}) at {at}",
                self.plan_version
            )));
        }
        if self.frames == 0 {
            return Err(Error::Preflight(format!(
                "phase plan with 0 frames at {at}"
            )));
        }
        if self.denoise_timesteps.is_empty() {
            return Err(Error::Preflight(format!(
                "phase plan without denoise timesteps at {at}"
            )));
        }
        let ok_range = self
            .denoise_timesteps
            .iter()
            .all(|t| (1..=TIMESTEP_MAX).contains(t));
        let descending = self.denoise_timesteps.windows(2).all(|w| w[0] > w[1]);
        if !ok_range || !descending {
            return Err(Error::Preflight(format!(
                "denoise timesteps {:?} must be strictly descending in 1..={TIMESTEP_MAX} at {at}",
                self.denoise_timesteps
            )));
        }
        match (&self.recompute, &self.context_frames_override) {
            (Some(r), None) => {
                return Err(Error::Preflight(format!(
                    "recompute of frames {}..{} planned at {at} but {OVERRIDE_TENSOR} is missing: \
                     it is required, never a fallback",
                    r.first_frame,
                    r.first_frame + u64::from(r.frames)
                )))
            }
            (None, Some(_)) => {
                return Err(Error::Preflight(format!(
                    "{OVERRIDE_TENSOR} present at {at} but no recompute is planned"
                )))
            }
            (Some(r), Some(o)) if r.frames != o.frames || r.frames == 0 => {
                return Err(Error::Preflight(format!(
                    "recompute of {} frames but {OVERRIDE_TENSOR} carries {} at {at}",
                    r.frames, o.frames
                )))
            }
            (Some(_), Some(o)) if o.tensor != OVERRIDE_TENSOR => {
                return Err(Error::Preflight(format!(
                    "recompute override names tensor {:?}, expected {OVERRIDE_TENSOR:?} at {at}",
                    o.tensor
                )))
            }
            _ => {}
        }
        if let Some(c) = &self.conditioning {
            match c.tensor.as_deref() {
                None if self.cache_actions.reset => {
                    return Err(Error::Preflight(format!(
                        "the prompt at {at} is a conditioning tensor, but the first chunk of an \
                         epoch does not carry {CONDITIONING_TENSOR}: its values are required \
                         there (the mesh computes the text K/V from them)"
                    )))
                }
                Some(t) if t != CONDITIONING_TENSOR => {
                    return Err(Error::Preflight(format!(
                        "conditioning names tensor {t:?}, expected {CONDITIONING_TENSOR:?} at {at}"
                    )))
                }
                _ => {}
            }
        }
        let want_append = if self.clean_cache_update {
            self.frames
        } else {
            0
        };
        if self.cache_actions.append_frames != want_append {
            return Err(Error::Preflight(format!(
                "cache append of {} frames at {at}, but only the clean cache-update pass appends \
                 ({} frames)",
                self.cache_actions.append_frames, want_append
            )));
        }
        let implied = self.implied_generator_calls();
        if self.expected_generator_calls != implied {
            return Err(Error::Preflight(format!(
                "expected_generator_calls {} but the plan implies {implied} \
                 ({} denoise + recompute {} + clean pass {}) at {at}",
                self.expected_generator_calls,
                self.denoise_timesteps.len(),
                self.recompute.is_some(),
                self.clean_cache_update
            )));
        }
        Ok(())
    }

    /// The phases in execution order.
    pub fn phases(&self) -> Vec<Phase> {
        let mut p = Vec::new();
        if self.cache_actions.reset {
            p.push(Phase::CacheReset);
        }
        if let Some(r) = self.recompute {
            p.push(Phase::Recompute(r));
        }
        for (i, &t) in self.denoise_timesteps.iter().enumerate() {
            let t_next = self.denoise_timesteps.get(i + 1).copied().unwrap_or(0);
            p.push(Phase::Denoise { t, t_next });
        }
        if self.cache_actions.evict_frames > 0 {
            p.push(Phase::CacheEvict(self.cache_actions.evict_frames));
        }
        if self.clean_cache_update {
            p.push(Phase::CleanCacheUpdate);
        }
        p
    }

    /// Applies the plan's cache actions to `ledger` (a dry run on a clone, or the real one).
    /// Fails when the plan does not fit the cache it will meet.
    pub fn apply_to_ledger(&self, ledger: &mut CacheLedger) -> Result<()> {
        let at = format!("{} {}", self.chunk_index, self.cache_epoch);
        if self.cache_actions.reset {
            ledger.reset(self.cache_epoch)?;
        } else if ledger.epoch() != self.cache_epoch {
            return Err(Error::Invariant(format!(
                "plan at {at} changes the cache epoch (cache is at {}) without a reset",
                ledger.epoch()
            )));
        }
        if self.start_frame != ledger.next_frame() {
            return Err(Error::Invariant(format!(
                "plan at {at} starts at frame {} but the cache expects frame {}",
                self.start_frame,
                ledger.next_frame()
            )));
        }
        if let Some(r) = self.recompute {
            ledger.recompute_slots(r.first_frame, r.frames)?;
        }
        if self.cache_actions.evict_frames > 0 {
            ledger.evict(self.cache_actions.evict_frames)?;
        }
        if self.cache_actions.append_frames > 0 {
            ledger.append(self.cache_actions.append_frames)?;
            // The clean pass writes what it reserved before the chunk ends.
            ledger.mark_written();
        }
        Ok(())
    }

    /// `validate` plus a dry run against the cache state the plan will meet.
    pub fn check_against(&self, ledger: &CacheLedger) -> Result<CacheLedger> {
        self.validate()?;
        let mut l = ledger.clone();
        self.apply_to_ledger(&mut l)?;
        Ok(l)
    }

    /// Deterministic bytes: serde_json of a struct writes fields in declaration order and the
    /// plan holds only integers, bools and strings.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self)
            .map_err(|e| Error::Preflight(format!("phase plan does not serialize: {e}")))
    }

    pub fn from_canonical_bytes(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| Error::Decode(format!("phase plan: {e}")))
    }

    pub fn digest(&self) -> Result<u64> {
        Ok(fnv64(&self.canonical_bytes()?))
    }
}

/// How Stage 0 schedules chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanPolicy {
    pub frames_per_chunk: u32,
    pub denoise_timesteps: Vec<u32>,
    pub clean_cache_update: bool,
    /// Recompute the sink frames every N chunks of an epoch (0 = never).
    pub recompute_every: u32,
    pub sink_frames: u32,
    pub window_frames: u32,
    pub prompt_seed: u64,
}

/// Stage 0's plan builder: keeps a shadow cache ledger so every plan fits the cache the mesh
/// will have when it runs that plan (envelopes are executed in call order).
#[derive(Clone, Debug)]
pub struct Planner {
    policy: PlanPolicy,
    ledger: CacheLedger,
    chunk_in_epoch: u64,
    reset_pending: bool,
}

impl Planner {
    pub fn new(policy: PlanPolicy) -> Result<Self> {
        let ledger = CacheLedger::new(policy.sink_frames, policy.window_frames)?;
        if policy.frames_per_chunk > policy.window_frames + policy.sink_frames
            && policy.clean_cache_update
        {
            return Err(Error::BadInput(format!(
                "a chunk of {} frames cannot fit a cache of {} sink + {} window frames",
                policy.frames_per_chunk, policy.sink_frames, policy.window_frames
            )));
        }
        Ok(Self {
            policy,
            ledger,
            chunk_in_epoch: 0,
            reset_pending: true,
        })
    }

    pub fn policy(&self) -> &PlanPolicy {
        &self.policy
    }
    pub fn ledger(&self) -> &CacheLedger {
        &self.ledger
    }

    /// Called by a hard cut: the next plan resets the cache.
    pub fn hard_cut(&mut self) {
        self.reset_pending = true;
    }

    /// Frames a recompute at the next chunk would cover, if one is due (the sink frames).
    pub fn recompute_due(&self) -> Option<RecomputeSpec> {
        let every = u64::from(self.policy.recompute_every);
        let sinks = if self.reset_pending {
            0
        } else {
            self.ledger.sinks_len()
        };
        (every > 0 && self.chunk_in_epoch > 0 && self.chunk_in_epoch % every == 0 && sinks > 0)
            .then_some(RecomputeSpec {
                first_frame: 0,
                frames: sinks,
            })
    }

    /// Builds the next chunk's plan. The shadow ledger advances only when `commit` is called
    /// with the plan (after preflight succeeded), so a rejected plan leaves no trace.
    pub fn next_plan(&self, chunk_index: ChunkIndex, epoch: CacheEpoch) -> PhasePlan {
        let p = &self.policy;
        let (start_frame, evict) = if self.reset_pending {
            (0, 0)
        } else {
            (
                self.ledger.next_frame(),
                if p.clean_cache_update {
                    self.ledger.evict_needed_for(p.frames_per_chunk)
                } else {
                    0
                },
            )
        };
        let recompute = self.recompute_due();
        let mut plan = PhasePlan {
            plan_version: PLAN_VERSION,
            chunk_index,
            cache_epoch: epoch,
            start_frame,
            frames: p.frames_per_chunk,
            prompt_seed: p.prompt_seed,
            conditioning: None,
            denoise_timesteps: p.denoise_timesteps.clone(),
            recompute,
            context_frames_override: recompute.map(|r| OverrideSpec {
                tensor: OVERRIDE_TENSOR.to_string(),
                frames: r.frames,
            }),
            clean_cache_update: p.clean_cache_update,
            cache_actions: CacheActions {
                reset: self.reset_pending,
                evict_frames: evict,
                append_frames: if p.clean_cache_update {
                    p.frames_per_chunk
                } else {
                    0
                },
            },
            expected_generator_calls: 0,
        };
        plan.expected_generator_calls = plan.implied_generator_calls();
        plan
    }

    /// Checks `plan` against the shadow ledger and advances it. Returns the ledger after the
    /// plan (Stage 0's expectation for the chunk-end digest).
    pub fn commit(&mut self, plan: &PhasePlan) -> Result<CacheLedger> {
        let after = plan.check_against(&self.ledger)?;
        self.ledger = after.clone();
        self.chunk_in_epoch = if plan.cache_actions.reset {
            1
        } else {
            self.chunk_in_epoch + 1
        };
        self.reset_pending = false;
        Ok(after)
    }
}

/// Chunk-end state of one mesh rank. Equal on every rank, and equal to Stage 0's expectation,
/// or the job crashes with `diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub calls_made: u64,
    pub cache_epoch: u64,
    pub cache_start_frame: u64,
    pub cache_len_frames: u64,
    pub cache_mutations: u64,
    pub graph_count: u64,
    /// The prompt the text K/V were computed from: its seed, or the digest of the conditioning
    /// tensor as this rank received it (Stage 0 expects the plan's `prompt_seed`).
    pub prompt: u64,
}

impl StateDigest {
    pub const FIELDS: [&'static str; 7] = [
        "calls_made",
        "cache_epoch",
        "cache_start_frame",
        "cache_len_frames",
        "cache_mutations",
        "graph_count",
        "prompt",
    ];

    pub fn from_ledger(
        calls_made: u64,
        ledger: &CacheLedger,
        graph_count: u64,
        prompt: u64,
    ) -> Self {
        Self {
            calls_made,
            cache_epoch: ledger.epoch().get(),
            cache_start_frame: ledger.start_frame(),
            cache_len_frames: u64::from(ledger.readable_frames()),
            cache_mutations: ledger.mutations(),
            graph_count,
            prompt,
        }
    }

    pub fn to_words(&self) -> [u64; 7] {
        [
            self.calls_made,
            self.cache_epoch,
            self.cache_start_frame,
            self.cache_len_frames,
            self.cache_mutations,
            self.graph_count,
            self.prompt,
        ]
    }

    pub fn from_words(w: &[u64]) -> Result<Self> {
        match w {
            [a, b, c, d, e, f, g] => Ok(Self {
                calls_made: *a,
                cache_epoch: *b,
                cache_start_frame: *c,
                cache_len_frames: *d,
                cache_mutations: *e,
                graph_count: *f,
                prompt: *g,
            }),
            _ => Err(Error::Decode(format!(
                "state digest has {} words, expected 7",
                w.len()
            ))),
        }
    }

    /// `field: a=x b=y` for each differing field; empty when equal.
    pub fn diff(&self, other: &StateDigest, a: &str, b: &str) -> Vec<String> {
        let (x, y) = (self.to_words(), other.to_words());
        Self::FIELDS
            .iter()
            .zip(x.iter().zip(y.iter()))
            .filter(|(_, (p, q))| p != q)
            .map(|(name, (p, q))| format!("{name}: {a}={p} {b}={q}"))
            .collect()
    }

    /// Compares every rank's digest (index = group rank) with group-rank 0's; the error names
    /// each differing field with both values.
    pub fn compare_all(all: &[StateDigest], at: &str) -> Result<()> {
        let Some(first) = all.first() else {
            return Ok(());
        };
        let mut lines = Vec::new();
        for (r, d) in all.iter().enumerate().skip(1) {
            for l in first.diff(d, "group-rank 0", &format!("group-rank {r}")) {
                lines.push(l);
            }
        }
        if lines.is_empty() {
            Ok(())
        } else {
            Err(Error::Invariant(format!(
                "state digest drift across the mesh after {at}: {}",
                lines.join("; ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(recompute_every: u32) -> PlanPolicy {
        PlanPolicy {
            frames_per_chunk: 3,
            denoise_timesteps: vec![1000, 750, 500, 250],
            clean_cache_update: true,
            recompute_every,
            sink_frames: 3,
            window_frames: 6,
            prompt_seed: 7,
        }
    }

    #[test]
    fn planner_first_plan_resets_and_counts_calls() {
        let mut p = Planner::new(policy(0)).unwrap();
        let plan = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        assert!(plan.cache_actions.reset);
        assert_eq!(plan.expected_generator_calls, 5);
        assert_eq!(plan.start_frame, 0);
        plan.validate().unwrap();
        p.commit(&plan).unwrap();
        let phases = plan.phases();
        assert_eq!(phases.first(), Some(&Phase::CacheReset));
        assert_eq!(phases.last(), Some(&Phase::CleanCacheUpdate));
        assert_eq!(
            phases.iter().filter(|p| p.is_generator_call()).count(),
            plan.expected_generator_calls as usize
        );
        assert_eq!(
            phases[4],
            Phase::Denoise { t: 250, t_next: 0 },
            "the last denoise step lands on the clean latent"
        );
    }

    #[test]
    fn conditioning_values_are_required_on_the_first_chunk_of_an_epoch_and_absent_from_seeded_meta()
    {
        let mut p = Planner::new(policy(0)).unwrap();
        let mut first = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        // A seeded plan's canonical bytes say nothing of conditioning (as before the field).
        let seeded = String::from_utf8(first.canonical_bytes().unwrap()).unwrap();
        assert!(!seeded.contains("conditioning"), "{seeded}");
        first.conditioning = Some(ConditioningSpec { tensor: None });
        let e = first.validate().unwrap_err().to_string();
        assert!(e.contains("does not carry conditioning"), "{e}");
        first.conditioning = Some(ConditioningSpec {
            tensor: Some("text".into()),
        });
        assert!(first.validate().is_err());
        first.conditioning = Some(ConditioningSpec {
            tensor: Some(CONDITIONING_TENSOR.into()),
        });
        first.validate().unwrap();
        p.commit(&first).unwrap();
        // Later chunks use the text K/V the mesh holds: no tensor needed.
        let mut next = p.next_plan(ChunkIndex(1), CacheEpoch(0));
        next.conditioning = Some(ConditioningSpec { tensor: None });
        next.validate().unwrap();
        let back = PhasePlan::from_canonical_bytes(&next.canonical_bytes().unwrap()).unwrap();
        assert_eq!(back, next);
    }

    #[test]
    fn planner_rolls_the_window_with_o1_evictions() {
        let mut p = Planner::new(policy(0)).unwrap();
        let mut evictions = Vec::new();
        for c in 0..8 {
            let plan = p.next_plan(ChunkIndex(c), CacheEpoch(0));
            assert_eq!(plan.start_frame, 3 * c);
            evictions.push(plan.cache_actions.evict_frames);
            p.commit(&plan).unwrap();
            assert!(p.ledger().len_frames() <= 9);
        }
        // Chunk 0 fills sinks, 1-2 fill the window, then every chunk evicts one chunk's frames.
        assert_eq!(evictions, vec![0, 0, 0, 3, 3, 3, 3, 3]);
        assert_eq!(p.ledger().start_frame(), 18);
    }

    #[test]
    fn planner_hard_cut_resets_next_plan() {
        let mut p = Planner::new(policy(0)).unwrap();
        for c in 0..3 {
            let plan = p.next_plan(ChunkIndex(c), CacheEpoch(0));
            p.commit(&plan).unwrap();
        }
        p.hard_cut();
        let plan = p.next_plan(ChunkIndex(3), CacheEpoch(1));
        assert!(plan.cache_actions.reset);
        assert_eq!(plan.start_frame, 0);
        assert_eq!(plan.cache_actions.evict_frames, 0);
        let after = p.commit(&plan).unwrap();
        assert_eq!(after.epoch(), CacheEpoch(1));
        assert_eq!(after.len_frames(), 3);
    }

    #[test]
    fn planner_schedules_recompute_with_override() {
        let mut p = Planner::new(policy(2)).unwrap();
        let mut with = Vec::new();
        for c in 0..5 {
            let plan = p.next_plan(ChunkIndex(c), CacheEpoch(0));
            if plan.recompute.is_some() {
                assert_eq!(plan.expected_generator_calls, 6);
                assert_eq!(
                    plan.context_frames_override.as_ref().map(|o| o.frames),
                    Some(3)
                );
                with.push(c);
            }
            p.commit(&plan).unwrap();
        }
        assert_eq!(with, vec![2, 4]);
    }

    #[test]
    fn f1_recompute_without_override_fails_validation() {
        let mut p = Planner::new(policy(1)).unwrap();
        let first = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        p.commit(&first).unwrap();
        let mut plan = p.next_plan(ChunkIndex(1), CacheEpoch(0));
        assert!(plan.recompute.is_some());
        plan.context_frames_override = None;
        let e = plan.validate().unwrap_err();
        assert!(matches!(e, Error::Preflight(_)));
        assert!(
            e.to_string()
                .contains("context_frames_override is missing: it is required, never a fallback"),
            "{e}"
        );
        // A rejected plan leaves the shadow ledger untouched.
        let before = p.ledger().clone();
        assert!(p.commit(&plan).is_err());
        assert_eq!(p.ledger(), &before);
    }

    #[test]
    fn validation_rejects_inconsistent_plans() {
        let p = Planner::new(policy(0)).unwrap();
        let good = p.next_plan(ChunkIndex(0), CacheEpoch(0));
        type Mutation = Box<dyn Fn(&mut PhasePlan)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|p| p.expected_generator_calls += 1), "implies 5"),
            (
                Box::new(|p| p.denoise_timesteps = vec![500, 750]),
                "descending",
            ),
            (
                Box::new(|p| p.denoise_timesteps = vec![]),
                "without denoise",
            ),
            (Box::new(|p| p.denoise_timesteps = vec![1001]), "descending"),
            (
                Box::new(|p| p.cache_actions.append_frames = 1),
                "only the clean",
            ),
            (Box::new(|p| p.plan_version = 9), "version"),
            (
                Box::new(|p| {
                    p.context_frames_override = Some(OverrideSpec {
                        tensor: OVERRIDE_TENSOR.into(),
                        frames: 1,
                    })
                }),
                "no recompute is planned",
            ),
        ];
        for (mutate, want) in cases {
            let mut bad = good.clone();
            mutate(&mut bad);
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[test]
    fn dry_run_rejects_plans_that_do_not_fit_the_cache() {
        let mut p = Planner::new(policy(0)).unwrap();
        for c in 0..3 {
            let plan = p.next_plan(ChunkIndex(c), CacheEpoch(0));
            p.commit(&plan).unwrap();
        }
        let mut plan = p.next_plan(ChunkIndex(3), CacheEpoch(0));
        plan.cache_actions.evict_frames = 0;
        let e = plan.check_against(p.ledger()).unwrap_err().to_string();
        assert!(e.contains("must evict first"), "{e}");
        let mut plan = p.next_plan(ChunkIndex(3), CacheEpoch(1));
        plan.cache_actions.reset = false;
        let e = plan.check_against(p.ledger()).unwrap_err().to_string();
        assert!(e.contains("without a reset"), "{e}");
        let mut plan = p.next_plan(ChunkIndex(3), CacheEpoch(0));
        plan.start_frame += 1;
        let e = plan.check_against(p.ledger()).unwrap_err().to_string();
        assert!(e.contains("expects frame 9"), "{e}");
    }

    #[test]
    fn canonical_bytes_round_trip_and_are_stable() {
        let p = Planner::new(policy(0)).unwrap();
        let plan = p.next_plan(ChunkIndex(4), CacheEpoch(2));
        let b = plan.canonical_bytes().unwrap();
        assert_eq!(plan.canonical_bytes().unwrap(), b);
        let back = PhasePlan::from_canonical_bytes(&b).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.digest().unwrap(), plan.digest().unwrap());
        let s = String::from_utf8(b).unwrap();
        assert!(
            s.starts_with("{\"plan_version\":1,\"chunk_index\":4,\"cache_epoch\":2"),
            "{s}"
        );
        assert!(PhasePlan::from_canonical_bytes(b"{nope").is_err());
    }

    #[test]
    fn state_digest_diff_names_fields_and_values() {
        let mut l = CacheLedger::new(3, 6).unwrap();
        l.append(3).unwrap();
        // The digest counts readable frames: a pending reservation is not among them.
        assert_eq!(StateDigest::from_ledger(5, &l, 5, 9).cache_len_frames, 0);
        l.mark_written();
        let a = StateDigest::from_ledger(5, &l, 5, 9);
        let mut b = a;
        b.cache_len_frames = 2;
        b.calls_made = 4;
        b.prompt = 8;
        let d = a.diff(&b, "x", "y");
        assert_eq!(
            d,
            vec![
                "calls_made: x=5 y=4",
                "cache_len_frames: x=3 y=2",
                "prompt: x=9 y=8"
            ]
        );
        let e = StateDigest::compare_all(&[a, a, b], "chunk_index 3").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("state digest drift"), "{s}");
        assert!(
            s.contains("cache_len_frames: group-rank 0=3 group-rank 2=2"),
            "{s}"
        );
        StateDigest::compare_all(&[a, a], "x").unwrap();
        assert_eq!(StateDigest::from_words(&a.to_words()).unwrap(), a);
        assert!(StateDigest::from_words(&[1, 2]).is_err());
    }
}
