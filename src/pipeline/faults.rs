//! The pipeline's fault points (SPEC §12), `LOCKSTEP_FAULT=point[@rank][#nth]`.
//!
//! Same syntax and semantics as `crate::fault` (a point fires only on the named global rank,
//! only on its nth hit, counted per point and rank), but ranks here may be threads of one
//! process (the in-process run), so hits are counted per (point, rank) instead of per process.
//! Unknown `pipeline.*` names are refused; names of other modules' points are left to them.
//! Faults alter inputs or timing of the real code paths; they never replace production code.
use crate::ids::GlobalRank;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every pipeline fault point.
pub mod points {
    /// Stage 0: send the next INFER envelope twice (D1).
    pub const DUP_ENVELOPE: &str = "pipeline.dup_envelope";
    /// Stage 0: give the next envelope an older call_id (D3).
    pub const CALL_ID_REGRESSION: &str = "pipeline.call_id_regression";
    /// Stage 0: plan a recompute but omit `context_frames_override` (F1, caught in preflight).
    pub const OMIT_OVERRIDE: &str = "pipeline.omit_override";
    /// Stage 0: also skip Stage 0's own preflight, so the mesh leader must catch F1.
    pub const SKIP_PREFLIGHT: &str = "pipeline.skip_preflight";
    /// Mesh leader: hold the next result and deliver it after the following one (D2/F2).
    pub const DELAY_RESULT: &str = "pipeline.delay_result";
    /// Stage 0: offer a result from an already-cut epoch to the acceptance rule (F2).
    pub const OFFER_STALE: &str = "pipeline.offer_stale";
    /// Mesh rank: evict one cache frame out of band, outside the plan (F3).
    pub const CACHE_OUT_OF_BAND: &str = "pipeline.cache_out_of_band";
    /// Mesh rank: capture one extra step graph during warm-up (G2).
    pub const GRAPH_SET_SKEW: &str = "pipeline.graph_set_skew";

    pub const ALL: [&str; 8] = [
        DUP_ENVELOPE,
        CALL_ID_REGRESSION,
        OMIT_OVERRIDE,
        SKIP_PREFLIGHT,
        DELAY_RESULT,
        OFFER_STALE,
        CACHE_OUT_OF_BAND,
        GRAPH_SET_SKEW,
    ];
}

#[derive(Debug, Clone)]
struct Spec {
    point: String,
    rank: Option<u32>,
    nth: Option<u64>,
}

/// Parsed pipeline faults, shared by every rank thread of a run.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    specs: Arc<Vec<Spec>>,
    hits: Arc<Mutex<HashMap<(usize, u32), u64>>>,
}

impl Faults {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn from_env() -> Result<Self> {
        match std::env::var("LOCKSTEP_FAULT") {
            Ok(s) => Self::parse(&s),
            Err(_) => Ok(Self::none()),
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let mut specs = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (rest, nth) = match item.split_once('#') {
                Some((r, n)) => match n.parse::<u64>() {
                    Ok(n) if n > 0 => (r, Some(n)),
                    _ => {
                        return Err(Error::BadInput(format!(
                            "LOCKSTEP_FAULT: bad #nth in {item:?}"
                        )))
                    }
                },
                None => (item, None),
            };
            let (point, rank) = match rest.split_once('@') {
                Some((p, r)) => match r.parse::<u32>() {
                    Ok(r) => (p, Some(r)),
                    Err(_) => {
                        return Err(Error::BadInput(format!(
                            "LOCKSTEP_FAULT: bad @rank in {item:?}"
                        )))
                    }
                },
                None => (rest, None),
            };
            if !point.starts_with("pipeline.") {
                continue;
            }
            if !points::ALL.contains(&point) {
                return Err(Error::BadInput(format!(
                    "LOCKSTEP_FAULT: unknown point {point:?} (pipeline points: {})",
                    points::ALL.join(", ")
                )));
            }
            specs.push(Spec {
                point: point.to_owned(),
                rank,
                nth,
            });
        }
        if !specs.is_empty() && !cfg!(feature = "fault-injection") {
            return Err(Error::BadInput(
                "LOCKSTEP_FAULT is set but this build has no fault-injection feature".into(),
            ));
        }
        Ok(Self {
            specs: Arc::new(specs),
            hits: Arc::default(),
        })
    }

    /// True when `point` fires now on `rank`.
    pub fn hit(&self, point: &str, rank: GlobalRank) -> bool {
        if !cfg!(feature = "fault-injection") || self.specs.is_empty() {
            return false;
        }
        let mut fire = false;
        for (i, s) in self
            .specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.point == point)
        {
            if s.rank.is_some_and(|r| r != rank.get()) {
                continue;
            }
            let n = match self.hits.lock() {
                Ok(mut h) => {
                    let c = h.entry((i, rank.get())).or_insert(0);
                    *c += 1;
                    *c
                }
                Err(_) => return false,
            };
            if s.nth.is_none_or(|want| want == n) {
                fire = true;
            }
        }
        if fire {
            eprintln!("lockstep[{rank}]: fault injected: {point}");
        }
        fire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_fault_fires_on_rank_and_nth_only() {
        let f = Faults::parse("pipeline.dup_envelope@0#2, guard.off@1").unwrap();
        let (r0, r1) = (GlobalRank(0), GlobalRank(1));
        assert!(!f.hit(points::DUP_ENVELOPE, r1));
        assert!(!f.hit(points::DUP_ENVELOPE, r0));
        assert!(f.hit(points::DUP_ENVELOPE, r0));
        assert!(!f.hit(points::DUP_ENVELOPE, r0));
        // Several specs of one point count independently.
        let f = Faults::parse("pipeline.dup_envelope#2,pipeline.dup_envelope#3").unwrap();
        let fired: Vec<bool> = (0..4).map(|_| f.hit(points::DUP_ENVELOPE, r0)).collect();
        assert_eq!(fired, vec![false, true, true, false]);
        assert!(Faults::parse("pipeline.nope").is_err());
        assert!(Faults::parse("pipeline.dup_envelope#0").is_err());
    }
}
