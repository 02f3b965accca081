//! Stage 0 as steps (`Driver`): plan → preflight → send while the queues have room, receive
//! results while the decode queue has room, decode and emit in order, hard cuts, SHUTDOWN at the
//! end (drain). NOOP heartbeats are the protocol's (`Rank::start_heartbeats`), not these steps'.
//!
//! Who drives them: always the session host (`session::host`), taking one request at a time —
//! from a server's `Session`, or from `lockstep run`'s fixed schedule, a session client on a
//! thread of rank 0 (`session::schedule`). Stage 0 never accumulates: `send_chunk` is offered
//! only while `can_send`, every wait for a result is bounded (`result_timeout` → 71), and with
//! backpressure off (E1) the host takes every result the mesh owes before decoding one.
use super::conditioning::PromptTensor;
use super::decode::{DecodeInput, Decoder};
use super::envelope::{decode_result, prepare_infer, unchecked_infer, NOISE_TENSOR};
use super::stage0::{InFlight, Offer, QueueConfig, Stage0, Stage0Stats};
use super::DriverLink;
use crate::diag::line as diag;
use crate::digest::fnv64;
use crate::fault::{self, points};
use crate::ids::{CacheEpoch, CallId, ChunkIndex, DRIVER};
use crate::model::DitConfig;
use crate::plan::{
    ConditioningSpec, PlanPolicy, Planner, StateDigest, CONDITIONING_TENSOR, OVERRIDE_TENSOR,
};
use crate::spans::{self, Args};
use crate::wire::{EnvelopeIds, HostTensor, Limits, PreparedEnvelope};
use crate::{Error, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DriverConfig {
    pub cfg: DitConfig,
    pub chunks: u64,
    pub queues: QueueConfig,
    pub hard_cut_every: u64,
    pub policy: PlanPolicy,
    /// Step graphs the mesh captures in warm-up (part of the expected digest).
    pub graph_count: u64,
    pub timeout: Duration,
    pub noise_seed: u64,
    pub limits: Limits,
    pub progress: Option<indicatif::ProgressBar>,
    /// The first epoch's prompt as a caller's tensor (`--conditioning`); `None`: the policy's
    /// `prompt_seed`.
    pub conditioning: Option<Arc<PromptTensor>>,
}

#[derive(Debug, Default)]
pub struct DriverReport {
    pub stats: Stage0Stats,
    pub s0_total: Duration,
    pub s1_us: Vec<u64>,
    pub latencies_ms: Vec<f64>,
    pub emit_s: Vec<f64>,
    pub emitted: Vec<(u64, u64)>,
    pub stale: Vec<(u64, u64)>,
    /// Generator calls the plans of every sent INFER name (`expected_generator_calls`), and the
    /// recompute calls among them: what the mesh runs, stale chunks included.
    pub generator_calls: u64,
    pub recompute_calls: u64,
}

fn noise(seed: u64, epoch: u64, chunk: u64, n: usize) -> Vec<f32> {
    let mut s = seed ^ fnv64(&[epoch.to_le_bytes(), chunk.to_le_bytes()].concat());
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Uniform with unit variance.
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 1.732_050_8
        })
        .collect()
}

/// What `Driver::receive` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// A result was accepted into the decode queue.
    Accepted,
    /// A result of an older epoch arrived and was dropped (never decoded, never surfaced).
    DroppedStale,
    /// Nothing arrived within the wait.
    Nothing,
}

/// One decoded chunk as it leaves Stage 0: its ids and its clean latent.
#[derive(Clone, Debug)]
pub struct Emitted {
    pub ids: EnvelopeIds,
    /// Clean latent `[tokens_per_chunk, in_dim]`.
    pub latent: Vec<f32>,
    /// Mesh time for this chunk, µs.
    pub s1_us: u64,
}

/// An epoch's prompt as Stage 0 names it in each plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text features from this seed (`model::dit::prompt_features`).
    Seed(u64),
    /// A caller's conditioning tensor: its values go to the mesh with the epoch's first chunk,
    /// its digest names it in every plan.
    Tensor(Arc<PromptTensor>),
}

impl Prompt {
    /// `PhasePlan::prompt_seed`: the seed, or the tensor's digest.
    pub fn key(&self) -> u64 {
        match self {
            Prompt::Seed(s) => *s,
            Prompt::Tensor(t) => t.digest(),
        }
    }
}

/// Stage 0 as steps: the one driver. The session host (`crate::session::host`) drives a stream
/// through these steps, for a server's `Session` and for `lockstep run`'s schedule alike; it has
/// no send, receive or decode path of its own.
pub struct Driver<'a> {
    dc: &'a DriverConfig,
    s0: Stage0,
    planner: Planner,
    rep: DriverReport,
    t_start: Instant,
    sent: u64,
    sent_in_epoch: u64,
    last_call: Option<CallId>,
    /// Sink-frame latents of the current epoch: the recompute context.
    anchor: Option<Vec<f32>>,
    epoch_first: Option<ChunkIndex>,
    /// The prompt of the current epoch.
    prompt: Prompt,
}

impl<'a> Driver<'a> {
    pub fn new(dc: &'a DriverConfig) -> Result<Self> {
        Ok(Self {
            s0: Stage0::new(dc.queues)?,
            planner: Planner::new(dc.policy.clone())?,
            rep: DriverReport::default(),
            t_start: Instant::now(),
            sent: 0,
            sent_in_epoch: 0,
            last_call: None,
            anchor: None,
            epoch_first: None,
            prompt: match &dc.conditioning {
                Some(t) => Prompt::Tensor(t.clone()),
                None => Prompt::Seed(dc.policy.prompt_seed),
            },
            dc,
        })
    }

    /// D_in (and, with backpressure, D_out) has room for one more chunk.
    pub fn can_send(&self) -> bool {
        self.s0.can_send()
    }
    /// Chunks sent so far (all epochs).
    pub fn sent(&self) -> u64 {
        self.sent
    }
    /// Chunks sent in the current epoch.
    pub fn sent_in_epoch(&self) -> u64 {
        self.sent_in_epoch
    }
    pub fn epoch(&self) -> CacheEpoch {
        self.s0.epoch()
    }
    pub fn outstanding(&self) -> usize {
        self.s0.outstanding()
    }
    pub fn ready_len(&self) -> usize {
        self.s0.ready_len()
    }
    pub fn can_receive(&self) -> bool {
        self.s0.can_receive()
    }
    /// The current prompt's key (`PhasePlan::prompt_seed`).
    pub fn prompt_seed(&self) -> u64 {
        self.prompt.key()
    }
    /// The prompt the next chunk's plan names (takes effect at the next plan; the session
    /// changes it only before an epoch's first chunk, or together with a hard cut).
    pub fn set_prompt(&mut self, p: Prompt) {
        self.prompt = p;
    }

    /// Plans, preflights and sends the next chunk (the caller checked `can_send`).
    pub fn send_chunk(&mut self, link: &mut dyn DriverLink) -> Result<EnvelopeIds> {
        let dc = self.dc;
        let cfg = &dc.cfg;
        let (tpf, in_dim) = (cfg.tokens_per_frame(), cfg.in_dim());
        let chunk_len = cfg.tokens_per_chunk() * in_dim;
        let t = Instant::now();
        let chunk = ChunkIndex(self.sent);
        let epoch = self.s0.epoch();
        let _span = spans::enter_with(
            Args::Chunk {
                // Assigned under the send lock, after this span opens.
                call_id: None,
                chunk: chunk.get(),
                epoch: epoch.get(),
            },
            || format!("send {chunk} {epoch}"),
        );
        let mut plan = self.planner.next_plan(chunk, epoch);
        plan.prompt_seed = self.prompt.key();
        if plan.recompute.is_some() && self.anchor.is_none() {
            // The anchor chunk's result is not back yet (deep queues): no recompute this
            // chunk. Decided here, on rank 0, and sent explicitly in the plan.
            plan.recompute = None;
            plan.context_frames_override = None;
            plan.expected_generator_calls = plan.implied_generator_calls();
        }
        let mut tensors = vec![HostTensor::from_f32(
            NOISE_TENSOR,
            vec![cfg.tokens_per_chunk() as u64, in_dim as u64],
            &noise(dc.noise_seed, epoch.get(), chunk.get(), chunk_len),
        )];
        if let (Some(r), Some(a)) = (plan.recompute, &self.anchor) {
            let n = r.frames as usize * tpf * in_dim;
            let ctx = a.get(..n).ok_or_else(|| {
                Error::Invariant("anchor latent shorter than the sink frames".into())
            })?;
            tensors.push(HostTensor::from_f32(
                OVERRIDE_TENSOR,
                vec![(r.frames as usize * tpf) as u64, in_dim as u64],
                ctx,
            ));
        }
        if let Prompt::Tensor(t) = &self.prompt {
            // The values go once per epoch, with its first chunk; later plans name the digest.
            plan.conditioning = Some(ConditioningSpec {
                tensor: plan
                    .cache_actions
                    .reset
                    .then(|| CONDITIONING_TENSOR.to_string()),
            });
            if plan.cache_actions.reset {
                tensors.push(t.to_tensor());
            }
        }
        if plan.recompute.is_some() && fault::hit(points::OMIT_OVERRIDE) {
            plan.context_frames_override = None;
            tensors.retain(|t| t.name != OVERRIDE_TENSOR);
        }
        let skip_preflight = fault::hit(points::SKIP_PREFLIGHT);
        let regress = fault::hit(points::CALL_ID_REGRESSION);
        let dup = fault::hit(points::DUP_ENVELOPE);
        let (call_id, env_copy) = if regress {
            // D3: an INFER carrying a call_id older than the last one, sent as is.
            let used = CallId(self.last_call.map_or(0, |c| c.get().saturating_sub(1)));
            let ids = EnvelopeIds {
                call_id: used,
                chunk_index: chunk,
                cache_epoch: epoch,
            };
            let env = prepare_infer(&plan, ids, tensors, cfg, &dc.limits)?;
            link.send_again(&env)?;
            (used, None)
        } else {
            let mut copy: Option<PreparedEnvelope> = None;
            let (plan_ref, limits, copy_ref) = (&plan, &dc.limits, &mut copy);
            let call_id = link.send_next(Box::new(move |ids| {
                let env = if skip_preflight {
                    unchecked_infer(plan_ref, ids, tensors, limits)?
                } else {
                    prepare_infer(plan_ref, ids, tensors, cfg, limits)?
                };
                if dup {
                    *copy_ref = Some(env.clone());
                }
                Ok(env)
            }))?;
            (call_id, copy)
        };
        self.last_call = Some(call_id);
        if let Some(env) = env_copy {
            link.send_again(&env)?;
        }
        self.rep.generator_calls += u64::from(plan.expected_generator_calls);
        self.rep.recompute_calls += u64::from(plan.recompute.is_some());
        let expected = if skip_preflight {
            // The mesh must refuse this envelope; nothing will come back to compare.
            StateDigest::from_words(&[0; 7])?
        } else {
            let after = self.planner.commit(&plan)?;
            StateDigest::from_ledger(
                u64::from(plan.expected_generator_calls),
                &after,
                dc.graph_count,
                plan.prompt_seed,
            )
        };
        self.s0.on_sent(InFlight {
            call_id,
            chunk_index: chunk,
            cache_epoch: epoch,
            expected,
            sent_at: t,
        });
        if plan.cache_actions.reset {
            self.epoch_first = Some(chunk);
            self.sent_in_epoch = 0;
        }
        self.sent += 1;
        self.sent_in_epoch += 1;
        self.rep.s0_total += t.elapsed();
        Ok(EnvelopeIds {
            call_id,
            chunk_index: chunk,
            cache_epoch: epoch,
        })
    }

    /// Hard cut: a new epoch; results of the old one still in flight are dropped on arrival and
    /// accepted ones not yet decoded are flushed (stale results never surface).
    pub fn hard_cut(&mut self) -> CacheEpoch {
        let e = self.s0.hard_cut();
        self.planner.hard_cut();
        self.anchor = None;
        self.epoch_first = None;
        self.sent_in_epoch = 0;
        drop(spans::enter(|| format!("hard cut → {e}")));
        e
    }

    /// Waits up to `wait` (zero = poll) for one RESULT and offers it to Stage 0's acceptance.
    pub fn receive(&mut self, link: &mut dyn DriverLink, wait: Duration) -> Result<Received> {
        let cfg = &self.dc.cfg;
        let (tpf, in_dim) = (cfg.tokens_per_frame(), cfg.in_dim());
        // A wait with nothing to decode meanwhile is Stage 0 stalled on the mesh (a poll is not).
        let span = (!wait.is_zero() && self.s0.ready_len() == 0)
            .then(|| spans::enter(|| "wait result".into()));
        let Some(env) = link.recv(wait)? else {
            return Ok(Received::Nothing);
        };
        let r = decode_result(&env)?;
        drop(span);
        let (epoch, chunk) = (r.cache_epoch.get(), r.chunk_index.get());
        let is_anchor = self.epoch_first == Some(r.chunk_index) && r.cache_epoch == self.s0.epoch();
        let latent_head: Option<Vec<f32>> = is_anchor.then(|| {
            let n = (cfg.sink_frames as usize * tpf * in_dim).min(r.latent.len());
            r.latent[..n].to_vec()
        });
        match self.s0.offer(r)? {
            Offer::Accepted => {
                if let Some(a) = latent_head {
                    self.anchor = Some(a);
                }
                Ok(Received::Accepted)
            }
            Offer::DroppedStale => {
                diag(&format!(
                    "lockstep[{DRIVER}]: dropped stale result chunk_index {chunk} cache_epoch \
                     {epoch} (current {})",
                    self.s0.epoch()
                ));
                self.rep.stale.push((epoch, chunk));
                Ok(Received::DroppedStale)
            }
        }
    }

    /// The error of a receive that waited its whole bound with nothing to decode.
    pub fn result_timeout(&self) -> Error {
        Error::Timeout(format!(
            "stage 0 waited {:?} for a RESULT (expected_next {}, {} outstanding, {})",
            self.dc.timeout,
            self.s0
                .expected_next()
                .map_or("none (only cut envelopes)".into(), |c| c.to_string()),
            self.s0.outstanding(),
            self.s0.epoch()
        ))
    }

    /// Decodes the next accepted result, in order, and records it; `None` when none is ready.
    pub fn decode_next(&mut self, decoder: &mut dyn Decoder) -> Result<Option<Emitted>> {
        let Some(r) = self.s0.pop_ready() else {
            return Ok(None);
        };
        let t = Instant::now();
        let span = spans::enter_with(
            Args::Chunk {
                call_id: Some(r.call_id.get()),
                chunk: r.chunk_index.get(),
                epoch: r.cache_epoch.get(),
            },
            || format!("decode {}", r.chunk_index),
        );
        decoder.decode(&DecodeInput {
            chunk_index: r.chunk_index.get(),
            cache_epoch: r.cache_epoch.get(),
            latent: &r.latent,
            frames: self.dc.cfg.frames_per_chunk,
        })?;
        drop(span);
        let now = Instant::now();
        let rep = &mut self.rep;
        rep.s0_total += now - t;
        rep.s1_us.push(r.s1_us);
        rep.latencies_ms
            .push(now.duration_since(r.sent_at).as_secs_f64() * 1e3);
        rep.emit_s
            .push(now.duration_since(self.t_start).as_secs_f64());
        rep.emitted.push((r.cache_epoch.get(), r.chunk_index.get()));
        if let Some(pb) = &self.dc.progress {
            pb.inc(1);
        }
        Ok(Some(Emitted {
            ids: EnvelopeIds {
                call_id: r.call_id,
                chunk_index: r.chunk_index,
                cache_epoch: r.cache_epoch,
            },
            latent: r.latent,
            s1_us: r.s1_us,
        }))
    }

    /// Drain is the caller's (nothing outstanding); sends SHUTDOWN and hands back the report.
    pub fn finish(self, link: &mut dyn DriverLink) -> Result<DriverReport> {
        link.shutdown()?;
        let mut rep = self.rep;
        rep.stats = self.s0.stats().clone();
        Ok(rep)
    }
}
