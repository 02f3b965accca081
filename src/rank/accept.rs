//! Mesh-side acceptance of incoming envelopes (module contract in `rank/mod.rs`): `call_id ==
//! last + 1` accepted, an exact duplicate dropped, anything else an invariant violation naming
//! both values.
use crate::error::{Error, Result};
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::wire::{Action, Header};

#[derive(Debug, Default)]
pub struct Acceptance {
    last: Option<(CallId, CacheEpoch, u64)>,
    last_infer_chunk: Option<ChunkIndex>,
    dropped_duplicates: u64,
}

/// What acceptance decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Same call_id, cache_epoch and meta digest as the last accepted envelope: dropped.
    DuplicateDropped,
}

impl Acceptance {
    pub fn check(&mut self, h: &Header) -> Result<Verdict> {
        let (id, epoch, digest) = (h.call_id(), h.cache_epoch(), h.meta_digest);
        let expected = self.last.map_or(CallId(1), |(c, _, _)| c.next());
        if let Some((lc, le, ld)) = self.last {
            if id == lc {
                if epoch == le && digest == ld {
                    self.dropped_duplicates += 1;
                    return Ok(Verdict::DuplicateDropped);
                }
                return Err(Error::Invariant(format!(
                    "{id} reused with different content: last accepted cache_epoch {} meta digest {ld:#x}, got cache_epoch {} meta digest {digest:#x}",
                    le.0, epoch.0
                )));
            }
            if epoch < le {
                return Err(Error::Invariant(format!(
                    "cache_epoch regression: got cache_epoch {} after cache_epoch {} ({id})",
                    epoch.0, le.0
                )));
            }
        }
        if id != expected {
            let kind = if id < expected { "regression" } else { "gap" };
            let last = self
                .last
                .map_or("none".to_string(), |(c, _, _)| c.0.to_string());
            return Err(Error::Invariant(format!(
                "call_id {kind}: got call_id {} but expected call_id {} (last accepted call_id {last})",
                id.0, expected.0
            )));
        }
        if h.action() == Action::Infer {
            if let Some(prev) = self.last_infer_chunk {
                if h.chunk_index() <= prev {
                    return Err(Error::Invariant(format!(
                        "chunk_index not increasing: got chunk_index {} after chunk_index {} ({id})",
                        h.chunk_index().0,
                        prev.0
                    )));
                }
            }
            self.last_infer_chunk = Some(h.chunk_index());
        }
        self.last = Some((id, epoch, digest));
        Ok(Verdict::Accept)
    }
    pub fn dropped_duplicates(&self) -> u64 {
        self.dropped_duplicates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{prepare, EnvelopeIds, HostTensor, Limits, PreparedEnvelope};

    fn header(call: u64, chunk: u64, epoch: u64, action: Action) -> Header {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct M {
            x: u32,
        }
        let ids = EnvelopeIds {
            call_id: CallId(call),
            chunk_index: ChunkIndex(chunk),
            cache_epoch: CacheEpoch(epoch),
        };
        match action {
            Action::Noop => *PreparedEnvelope::noop(ids).header(),
            _ => *prepare(
                action,
                ids,
                &M { x: chunk as u32 },
                Vec::<HostTensor>::new(),
                &Limits::default(),
            )
            .unwrap()
            .header(),
        }
    }

    #[test]
    fn acceptance_takes_last_plus_one() {
        let mut a = Acceptance::default();
        assert_eq!(
            a.check(&header(1, 0, 0, Action::Infer)).unwrap(),
            Verdict::Accept
        );
        assert_eq!(
            a.check(&header(2, 0, 0, Action::Noop)).unwrap(),
            Verdict::Accept
        );
        assert_eq!(
            a.check(&header(3, 1, 0, Action::Infer)).unwrap(),
            Verdict::Accept
        );
    }

    #[test]
    fn acceptance_drops_exact_duplicate() {
        let mut a = Acceptance::default();
        let h = header(1, 0, 0, Action::Infer);
        a.check(&h).unwrap();
        assert_eq!(a.check(&h).unwrap(), Verdict::DuplicateDropped);
        assert_eq!(a.dropped_duplicates(), 1);
    }

    #[test]
    fn acceptance_crashes_on_call_id_regression_with_both_values() {
        let mut a = Acceptance::default();
        for c in 1..=5 {
            a.check(&header(c, c, 0, Action::Infer)).unwrap();
        }
        let err = a
            .check(&header(3, 9, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("call_id regression: got call_id 3 but expected call_id 6"),
            "{err}"
        );
    }

    #[test]
    fn acceptance_crashes_on_call_id_gap() {
        let mut a = Acceptance::default();
        a.check(&header(1, 0, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(3, 1, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("call_id gap: got call_id 3 but expected call_id 2"),
            "{err}"
        );
    }

    #[test]
    fn acceptance_refuses_reused_call_id_with_other_content() {
        let mut a = Acceptance::default();
        a.check(&header(1, 0, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(1, 0, 1, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reused with different content"), "{err}");
    }

    #[test]
    fn acceptance_refuses_non_increasing_chunk_index() {
        let mut a = Acceptance::default();
        a.check(&header(1, 4, 0, Action::Infer)).unwrap();
        let err = a
            .check(&header(2, 4, 0, Action::Infer))
            .unwrap_err()
            .to_string();
        assert!(err.contains("chunk_index not increasing"), "{err}");
    }
}
