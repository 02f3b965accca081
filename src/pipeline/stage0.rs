//! Stage 0 (rank 0, the driver) as a pure state machine: bounded queues, acceptance, hard cuts.
//!
//! Contract (docs/spec.md §4, §7):
//! - At most `d_in` envelopes in flight and at most `d_out` results awaiting decode. Stage 0
//!   sends only while both have room (with backpressure on) and receives a result only while the
//!   decode queue has room, so a full `D_out` stops sending.
//! - A result is accepted only if `cache_epoch == current ∧ call_id == expected_next` (the oldest
//!   envelope in flight); its state digest must equal the one Stage 0's shadow ledger predicts.
//!   A stale epoch is dropped on sight and counted; anything else is an invariant violation.
//! - Outputs leave `pop_ready` once each, in call order.
//! - `hard_cut` bumps the epoch and flushes both queues in one step. Envelopes of the old epoch
//!   that are still in flight keep counting against `d_in` until their (stale) results come back,
//!   so the bound on the transport stays true across cuts.
//!
//! Tripwires: D2/F2 (stale result dropped, never decoded), E1 (`backpressure = false` lets the
//! decode queue grow, shown by `max_ready`), E3 (slow Stage 1 → `can_send` false, no growth).
use super::envelope::ChunkResult;
use crate::ids::{CacheEpoch, CallId, ChunkIndex};
use crate::plan::StateDigest;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub d_in: usize,
    pub d_out: usize,
    /// Off only for the E1 experiment: sending and receiving ignore `d_out`.
    pub backpressure: bool,
}

#[derive(Clone, Debug)]
pub struct InFlight {
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    pub expected: StateDigest,
    pub sent_at: Instant,
}

#[derive(Clone, Debug)]
pub struct Ready {
    pub call_id: CallId,
    pub chunk_index: ChunkIndex,
    pub cache_epoch: CacheEpoch,
    pub latent: Vec<f32>,
    pub sent_at: Instant,
    pub s1_us: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    Accepted,
    DroppedStale,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stage0Stats {
    pub stale_dropped: u64,
    /// Accepted results flushed by a hard cut before decode (never decoded).
    pub flushed_undecoded: u64,
    pub hard_cuts: u64,
    pub max_in_flight: usize,
    pub max_ready: usize,
    pub emitted: u64,
}

pub struct Stage0 {
    q: QueueConfig,
    epoch: CacheEpoch,
    in_flight: VecDeque<InFlight>,
    stale_outstanding: VecDeque<CallId>,
    ready: VecDeque<Ready>,
    stats: Stage0Stats,
}

impl Stage0 {
    pub fn new(q: QueueConfig) -> Result<Self> {
        if q.d_in == 0 || q.d_out == 0 {
            return Err(Error::BadInput(format!(
                "queue depths must be ≥ 1 (d_in {}, d_out {})",
                q.d_in, q.d_out
            )));
        }
        Ok(Self {
            q,
            epoch: CacheEpoch(0),
            in_flight: VecDeque::new(),
            stale_outstanding: VecDeque::new(),
            ready: VecDeque::new(),
            stats: Stage0Stats::default(),
        })
    }

    pub fn epoch(&self) -> CacheEpoch {
        self.epoch
    }
    pub fn stats(&self) -> &Stage0Stats {
        &self.stats
    }
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }
    /// Envelopes the mesh still owes a result for (current and cut epochs).
    pub fn outstanding(&self) -> usize {
        self.in_flight.len() + self.stale_outstanding.len()
    }
    pub fn expected_next(&self) -> Option<CallId> {
        self.in_flight.front().map(|f| f.call_id)
    }

    pub fn can_send(&self) -> bool {
        self.outstanding() < self.q.d_in
            && (!self.q.backpressure || self.ready.len() < self.q.d_out)
    }

    pub fn can_receive(&self) -> bool {
        self.outstanding() > 0 && (!self.q.backpressure || self.ready.len() < self.q.d_out)
    }

    pub fn on_sent(&mut self, f: InFlight) {
        self.in_flight.push_back(f);
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.outstanding());
    }

    /// The acceptance rule.
    pub fn offer(&mut self, r: ChunkResult) -> Result<Offer> {
        if r.cache_epoch != self.epoch {
            if let Some(i) = self.stale_outstanding.iter().position(|c| *c == r.call_id) {
                self.stale_outstanding.remove(i);
            }
            self.stats.stale_dropped += 1;
            return Ok(Offer::DroppedStale);
        }
        let Some(front) = self.in_flight.front() else {
            return Err(Error::Invariant(format!(
                "result {} {} {} but nothing of {} is in flight",
                r.call_id, r.chunk_index, r.cache_epoch, self.epoch
            )));
        };
        if r.call_id != front.call_id || r.chunk_index != front.chunk_index {
            return Err(Error::Invariant(format!(
                "result {} {} is out of order: expected_next is {} {} ({})",
                r.call_id, r.chunk_index, front.call_id, front.chunk_index, self.epoch
            )));
        }
        let diff = front.expected.diff(&r.digest, "plan", "mesh");
        if !diff.is_empty() {
            return Err(Error::Invariant(format!(
                "mesh state digest after {} {} differs from the plan: {}",
                r.chunk_index,
                r.cache_epoch,
                diff.join("; ")
            )));
        }
        let Some(f) = self.in_flight.pop_front() else {
            return Err(Error::Invariant(
                "in-flight queue emptied underneath".into(),
            ));
        };
        self.ready.push_back(Ready {
            call_id: f.call_id,
            chunk_index: f.chunk_index,
            cache_epoch: f.cache_epoch,
            latent: r.latent,
            sent_at: f.sent_at,
            s1_us: r.s1_us,
        });
        self.stats.max_ready = self.stats.max_ready.max(self.ready.len());
        Ok(Offer::Accepted)
    }

    /// Next output to decode and emit, in order; each accepted result leaves here once.
    pub fn pop_ready(&mut self) -> Option<Ready> {
        let r = self.ready.pop_front()?;
        self.stats.emitted += 1;
        Some(r)
    }

    /// Bumps the epoch and flushes both queues in one step.
    pub fn hard_cut(&mut self) -> CacheEpoch {
        self.epoch = self.epoch.next();
        self.stale_outstanding
            .extend(self.in_flight.drain(..).map(|f| f.call_id));
        self.stats.flushed_undecoded += self.ready.len() as u64;
        self.ready.clear();
        self.stats.hard_cuts += 1;
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> StateDigest {
        StateDigest {
            calls_made: 5,
            cache_epoch: 0,
            cache_start_frame: 0,
            cache_len_frames: 3,
            cache_mutations: 2,
            graph_count: 5,
            prompt: 7,
        }
    }

    /// The rank allocates call_ids (shared with NOOP heartbeats); here: chunk + 1.
    fn send(s: &mut Stage0, chunk: u64) -> CallId {
        let c = CallId(chunk + 1);
        s.on_sent(InFlight {
            call_id: c,
            chunk_index: ChunkIndex(chunk),
            cache_epoch: s.epoch(),
            expected: StateDigest {
                cache_epoch: s.epoch().get(),
                ..digest()
            },
            sent_at: Instant::now(),
        });
        c
    }

    fn result(c: CallId, chunk: u64, epoch: u64) -> ChunkResult {
        ChunkResult {
            call_id: c,
            chunk_index: ChunkIndex(chunk),
            cache_epoch: CacheEpoch(epoch),
            latent: vec![chunk as f32],
            digest: StateDigest {
                cache_epoch: epoch,
                ..digest()
            },
            s1_us: 1,
        }
    }

    fn q(d: usize, backpressure: bool) -> QueueConfig {
        QueueConfig {
            d_in: d,
            d_out: d,
            backpressure,
        }
    }

    #[test]
    fn d_in_bounds_sends_and_full_d_out_stops_sending() {
        let mut s = Stage0::new(q(2, true)).unwrap();
        let a = send(&mut s, 0);
        let b = send(&mut s, 1);
        assert!(!s.can_send(), "d_in = 2 envelopes in flight");
        assert_eq!(s.offer(result(a, 0, 0)).unwrap(), Offer::Accepted);
        assert!(s.can_send());
        let c = send(&mut s, 2);
        assert_eq!(s.offer(result(b, 1, 0)).unwrap(), Offer::Accepted);
        assert_eq!(s.ready_len(), 2);
        assert!(!s.can_send(), "D_out full stops sending");
        assert!(!s.can_receive(), "D_out full stops receiving");
        assert_eq!(s.pop_ready().map(|r| r.chunk_index), Some(ChunkIndex(0)));
        assert!(s.can_receive());
        assert_eq!(s.offer(result(c, 2, 0)).unwrap(), Offer::Accepted);
        assert_eq!(s.stats().max_ready, 2);
        assert_eq!(s.stats().max_in_flight, 2);
    }

    #[test]
    fn out_of_order_result_is_an_invariant_violation() {
        let mut s = Stage0::new(q(2, true)).unwrap();
        let _a = send(&mut s, 0);
        let b = send(&mut s, 1);
        let e = s.offer(result(b, 1, 0)).unwrap_err().to_string();
        assert!(
            e.contains("out of order: expected_next is call_id 1"),
            "{e}"
        );
    }

    #[test]
    fn digest_that_differs_from_the_plan_is_refused_with_a_diff() {
        let mut s = Stage0::new(q(2, true)).unwrap();
        let a = send(&mut s, 0);
        let mut r = result(a, 0, 0);
        r.digest.cache_len_frames = 2;
        let e = s.offer(r).unwrap_err().to_string();
        assert!(e.contains("cache_len_frames: plan=3 mesh=2"), "{e}");
    }

    #[test]
    fn f2_stale_epoch_result_is_refused_and_counted() {
        let mut s = Stage0::new(q(2, true)).unwrap();
        let a = send(&mut s, 0);
        let b = send(&mut s, 1);
        assert_eq!(s.offer(result(a, 0, 0)).unwrap(), Offer::Accepted);
        s.hard_cut();
        assert_eq!(s.ready_len(), 0, "hard cut flushes the decode queue");
        assert_eq!(s.stats().flushed_undecoded, 1);
        assert_eq!(s.outstanding(), 1, "cut envelope still owes a result");
        assert!(s.can_send());
        let c = send(&mut s, 2);
        assert!(!s.can_send(), "stale outstanding still counts against d_in");
        assert_eq!(s.offer(result(b, 1, 0)).unwrap(), Offer::DroppedStale);
        assert_eq!(s.ready_len(), 0, "stale result never reaches decode");
        assert_eq!(s.stats().stale_dropped, 1);
        assert_eq!(s.outstanding(), 1);
        // A stale result nobody was waiting for is dropped too, never accepted.
        assert_eq!(
            s.offer(result(CallId(99), 9, 0)).unwrap(),
            Offer::DroppedStale
        );
        assert_eq!(s.offer(result(c, 2, 1)).unwrap(), Offer::Accepted);
        assert_eq!(s.pop_ready().map(|r| r.cache_epoch), Some(CacheEpoch(1)));
        assert!(s.pop_ready().is_none());
    }

    #[test]
    fn without_backpressure_the_decode_queue_grows() {
        let mut s = Stage0::new(q(2, false)).unwrap();
        for chunk in 0..20 {
            let c = send(&mut s, chunk);
            assert!(s.can_receive());
            s.offer(result(c, chunk, 0)).unwrap();
        }
        assert_eq!(s.stats().max_ready, 20);
        let mut s = Stage0::new(q(2, true)).unwrap();
        let mut chunk = 0;
        while chunk < 20 {
            if s.can_send() {
                let c = send(&mut s, chunk);
                if s.can_receive() {
                    s.offer(result(c, chunk, 0)).unwrap();
                }
                chunk += 1;
            } else {
                assert!(s.pop_ready().is_some() || s.can_receive());
                if s.ready_len() == 0 {
                    break;
                }
            }
        }
        assert!(s.stats().max_ready <= 2);
    }

    #[test]
    fn depth_zero_is_refused() {
        assert!(Stage0::new(q(0, true)).is_err());
        assert!(Stage0::new(q(1, true)).is_ok());
    }
}
