//! Fault injection (docs/spec.md §12): `LOCKSTEP_FAULT=point[@rank][#nth]`, comma-separated,
//! compiled in with the `fault-injection` feature (on by default).
//!
//! Contract: a point fires only where the code calls [`hit`] with its name, only on the named
//! global rank (all ranks when `@rank` is absent), and only on its `nth` hit (every hit when
//! `#nth` is absent; hits count from 1 per point and process). An unknown point name is a
//! startup error, never a silent no-op. Without the feature, [`hit`] is always false.
//! Faults alter inputs or timing of the real code paths; they never replace production code.
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every fault point, by name. Documented in docs/manual/03-graceful-shutdown.md.
pub mod points {
    /// Harness rank 0: put a NaN into the typed meta of the next INFER (A1).
    pub const META_NAN: &str = "wire.meta_nan";
    /// Harness rank 0: add a bool tensor to the next INFER (A2).
    pub const DTYPE_BOOL: &str = "wire.dtype_bool";
    /// Harness rank 0: hide a tensor inside untyped meta of the next INFER (A3).
    pub const NESTED_TENSOR: &str = "wire.nested_tensor";
    /// Collective wrapper: skip the membership/role guard (B1's unguarded half).
    pub const GUARD_OFF: &str = "guard.off";
    /// Harness mesh rank: issue the TP all_reduce on `world` instead of `mesh` (B1).
    pub const TP_ON_WORLD: &str = "harness.tp_on_world";
    /// Harness mesh leader: issue the TP all_reduce on `pp` instead of `mesh` (B1; unlike `world`,
    /// `pp` has an NCCL communicator, so the unguarded call really hangs on both backends).
    pub const TP_ON_PP: &str = "harness.tp_on_pp";
    /// Harness rank 0 (non-member): issue a `mesh` collective (B1 guard).
    pub const NON_MEMBER_COLLECTIVE: &str = "harness.non_member_collective";
    /// Pipeline mesh rank: make one generator call more than the plan says (B2).
    pub const EXTRA_GENERATOR_CALL: &str = "pipeline.extra_generator_call";
    /// Pipeline mesh rank: leave out one denoising step's generator call (B2).
    pub const SKIP_GENERATOR_CALL: &str = "pipeline.skip_generator_call";
    /// Rank bootstrap: create the groups in another order (B3).
    pub const GROUPS_REORDER: &str = "groups.reorder";
    /// Harness rank 0: SIGKILL itself while the mesh waits for the next header (C1).
    pub const KILL_DRIVER: &str = "harness.kill_driver";
    /// Envelope send: SIGKILL the sender after the header and the first half of the payload's
    /// tensors (none of a one-tensor payload) (C2).
    pub const KILL_MID_PAYLOAD: &str = "send.kill_mid_payload";
    /// Teardown: block forever where communicators are destroyed (C5).
    pub const TEARDOWN_HANG: &str = "teardown.hang";
    /// Parity fingerprint: flip the CUDA-graphs execution flag on this rank (G1).
    pub const FLIP_GRAPHS: &str = "parity.flip_graphs";
    /// Pipeline mesh rank: expect one frame more in the noise tensor than the envelope and its
    /// plan carry (G3).
    pub const SHAPE_SKEW: &str = "pipeline.shape_skew";
    /// Harness mesh rank: issue the generator all_reduce in bf16 instead of f32 (fr analyze demo).
    pub const DTYPE_SKEW: &str = "harness.dtype_skew";
    /// Pipeline stage 0: send the next INFER envelope twice (D1).
    pub const DUP_ENVELOPE: &str = "pipeline.dup_envelope";
    /// Pipeline stage 0: give the next INFER an already-used call_id (D3).
    pub const CALL_ID_REGRESSION: &str = "pipeline.call_id_regression";
    /// Pipeline stage 0: plan a recompute but omit `context_frames_override` (F1, preflight).
    pub const OMIT_OVERRIDE: &str = "pipeline.omit_override";
    /// Pipeline stage 0: skip the pipeline's own preflight, so the mesh leader must catch F1.
    pub const SKIP_PREFLIGHT: &str = "pipeline.skip_preflight";
    /// Pipeline mesh leader: hold the next RESULT until the following envelope (D2).
    pub const DELAY_RESULT: &str = "pipeline.delay_result";
    /// Pipeline mesh rank: evict one cache frame out of band, outside the plan (F3).
    pub const CACHE_OUT_OF_BAND: &str = "pipeline.cache_out_of_band";
    /// Pipeline mesh rank: flip one byte of the conditioning tensor as received, before the
    /// rank digests and embeds it (the chunk-end state digest must catch it).
    pub const CORRUPT_CONDITIONING: &str = "pipeline.corrupt_conditioning";
    /// Pipeline mesh rank: capture one extra step graph during warm-up (G2).
    pub const GRAPH_SET_SKEW: &str = "pipeline.graph_set_skew";
    /// Rank 0: SIGKILL itself after offering the envelope lane's ring, before it unlinks the
    /// file (the launcher's sweep removes it).
    pub const LANE_KILL_AFTER_OFFER: &str = "lane.kill_after_offer";

    pub const ALL: [&str; 25] = [
        META_NAN,
        DTYPE_BOOL,
        NESTED_TENSOR,
        GUARD_OFF,
        TP_ON_WORLD,
        NON_MEMBER_COLLECTIVE,
        EXTRA_GENERATOR_CALL,
        SKIP_GENERATOR_CALL,
        GROUPS_REORDER,
        KILL_DRIVER,
        KILL_MID_PAYLOAD,
        TEARDOWN_HANG,
        FLIP_GRAPHS,
        SHAPE_SKEW,
        DTYPE_SKEW,
        DUP_ENVELOPE,
        CALL_ID_REGRESSION,
        OMIT_OVERRIDE,
        SKIP_PREFLIGHT,
        DELAY_RESULT,
        CACHE_OUT_OF_BAND,
        GRAPH_SET_SKEW,
        TP_ON_PP,
        LANE_KILL_AFTER_OFFER,
        CORRUPT_CONDITIONING,
    ];
}

/// One parsed `point[@rank][#nth]`.
#[derive(Debug)]
pub struct FaultSpec {
    pub point: String,
    pub rank: Option<u32>,
    pub nth: Option<u64>,
    hits: AtomicU64,
}

/// Parses a `LOCKSTEP_FAULT` value.
pub fn parse(s: &str) -> Result<Vec<FaultSpec>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (rest, nth) = match item.split_once('#') {
            Some((r, n)) => (
                r,
                Some(n.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::BadInput(format!("LOCKSTEP_FAULT: bad #nth in {item:?}"))
                })?),
            ),
            None => (item, None),
        };
        let (point, rank) = match rest.split_once('@') {
            Some((p, r)) => (
                p,
                Some(r.parse::<u32>().map_err(|_| {
                    Error::BadInput(format!("LOCKSTEP_FAULT: bad @rank in {item:?}"))
                })?),
            ),
            None => (rest, None),
        };
        if !points::ALL.contains(&point) {
            return Err(Error::BadInput(format!(
                "LOCKSTEP_FAULT: unknown point {point:?} (known: {})",
                points::ALL.join(", ")
            )));
        }
        out.push(FaultSpec {
            point: point.to_owned(),
            rank,
            nth,
            hits: AtomicU64::new(0),
        });
    }
    Ok(out)
}

struct Armed {
    rank: u32,
    specs: Vec<FaultSpec>,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Reads `LOCKSTEP_FAULT` for this rank. Call once at rank start; later calls are ignored.
pub fn init(rank: u32) -> Result<()> {
    let specs = match std::env::var("LOCKSTEP_FAULT") {
        Ok(s) => parse(&s)?,
        Err(_) => Vec::new(),
    };
    if !specs.is_empty() && !cfg!(feature = "fault-injection") {
        return Err(Error::BadInput(
            "LOCKSTEP_FAULT is set but this build has no fault-injection feature".into(),
        ));
    }
    let _ = ARMED.set(Armed { rank, specs });
    Ok(())
}

/// True when `point` fires now on this rank.
pub fn hit(point: &str) -> bool {
    if !cfg!(feature = "fault-injection") {
        return false;
    }
    let Some(armed) = ARMED.get() else {
        return false;
    };
    let mut fire = false;
    for s in armed.specs.iter().filter(|s| s.point == point) {
        if s.rank.is_some_and(|r| r != armed.rank) {
            continue;
        }
        let n = s.hits.fetch_add(1, Ordering::SeqCst) + 1;
        if s.nth.is_none_or(|want| want == n) {
            fire = true;
        }
    }
    if fire {
        crate::diag!(
            "lockstep[global-rank {}]: fault injected: {point}",
            armed.rank
        );
    }
    fire
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_spec_parses_rank_and_nth() {
        let v = parse("guard.off@2#3, teardown.hang").unwrap();
        assert_eq!(v[0].point, "guard.off");
        assert_eq!(v[0].rank, Some(2));
        assert_eq!(v[0].nth, Some(3));
        assert_eq!(v[1].rank, None);
        assert_eq!(v[1].nth, None);
    }

    #[test]
    fn unknown_fault_point_is_refused() {
        let err = parse("guard.of").unwrap_err().to_string();
        assert!(err.contains("unknown point \"guard.of\""), "{err}");
    }
}
