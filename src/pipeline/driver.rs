//! Stage 0's loop: plan → preflight → send while the queues have room, receive results while the
//! decode queue has room, decode and emit in order, hard cuts on schedule, SHUTDOWN at the end
//! (drain). NOOP heartbeats are the protocol's (`Rank::start_heartbeats`), not this loop's.
//!
//! Priorities per turn: send (if allowed) → decode one (if any is ready) → wait for a result,
//! bounded by `timeout` (→ `Error::Timeout`). Stage 0 never accumulates: with a slow Stage 1 it
//! blocks here, bounded, with at most `d_in` in flight. Only with backpressure off (the E1
//! experiment) does it take every result as soon as the mesh has it — waiting for an outstanding
//! result before decoding, like a consumer with an unbounded receive buffer — which is what lets
//! the decode backlog grow with the run. (A zero-wait poll is not enough to show it: the mesh
//! leader holds a RESULT's payload until rank 0 reads its header and clears it to send, so a
//! Stage 0 that only looks between decodes paces the mesh to its decode rate. With backpressure
//! on, taking results early gains nothing: a result waits as well in the lane as in the queue.)
use super::decode::{DecodeInput, Decoder};
use super::envelope::{decode_result, prepare_infer, unchecked_infer, NOISE_TENSOR};
use super::report::Trace;
use super::stage0::{InFlight, Offer, QueueConfig, Stage0, Stage0Stats};
use super::DriverLink;
use crate::diag::line as diag;
use crate::digest::fnv64;
use crate::fault::{self, points};
use crate::ids::{CallId, ChunkIndex, DRIVER};
use crate::model::DitConfig;
use crate::plan::{PlanPolicy, Planner, StateDigest, OVERRIDE_TENSOR};
use crate::wire::{EnvelopeIds, HostTensor, Limits, PreparedEnvelope};
use crate::{Error, Result};
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
    pub trace: Trace,
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

pub fn run_driver(
    link: &mut dyn DriverLink,
    decoder: &mut dyn Decoder,
    dc: &DriverConfig,
    trace: Trace,
) -> Result<DriverReport> {
    let cfg = &dc.cfg;
    let mut s0 = Stage0::new(dc.queues)?;
    let mut planner = Planner::new(dc.policy.clone())?;
    let mut rep = DriverReport {
        trace,
        ..Default::default()
    };
    let t_start = Instant::now();
    let (tpf, in_dim) = (cfg.tokens_per_frame(), cfg.in_dim());
    let chunk_len = cfg.tokens_per_chunk() * in_dim;
    let mut sent = 0u64;
    let mut sent_in_epoch = 0u64;
    let mut last_call: Option<CallId> = None;
    // Sink-frame latents of the current epoch: the recompute context.
    let mut anchor: Option<Vec<f32>> = None;
    let mut epoch_first: Option<ChunkIndex> = None;
    loop {
        if sent < dc.chunks && s0.can_send() {
            let t = Instant::now();
            let chunk = ChunkIndex(sent);
            let epoch = s0.epoch();
            let mut plan = planner.next_plan(chunk, epoch);
            if plan.recompute.is_some() && anchor.is_none() {
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
            if let (Some(r), Some(a)) = (plan.recompute, &anchor) {
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
            if plan.recompute.is_some() && fault::hit(points::OMIT_OVERRIDE) {
                plan.context_frames_override = None;
                tensors.retain(|t| t.name != OVERRIDE_TENSOR);
            }
            let skip_preflight = fault::hit(points::SKIP_PREFLIGHT);
            let regress = fault::hit(points::CALL_ID_REGRESSION);
            let dup = fault::hit(points::DUP_ENVELOPE);
            let (call_id, env_copy) = if regress {
                // D3: an INFER carrying a call_id older than the last one, sent as is.
                let used = CallId(last_call.map_or(0, |c| c.get().saturating_sub(1)));
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
            last_call = Some(call_id);
            if let Some(env) = env_copy {
                link.send_again(&env)?;
            }
            let expected = if skip_preflight {
                // The mesh must refuse this envelope; nothing will come back to compare.
                StateDigest::from_words(&[0; 6])?
            } else {
                let after = planner.commit(&plan)?;
                StateDigest::from_ledger(
                    u64::from(plan.expected_generator_calls),
                    &after,
                    dc.graph_count,
                )
            };
            s0.on_sent(InFlight {
                call_id,
                chunk_index: chunk,
                cache_epoch: epoch,
                expected,
                sent_at: t,
            });
            if plan.cache_actions.reset {
                epoch_first = Some(chunk);
                sent_in_epoch = 0;
            }
            sent += 1;
            sent_in_epoch += 1;
            let now = Instant::now();
            rep.s0_total += now - t;
            rep.trace
                .span("stage0", &format!("send {chunk} {epoch}"), t, now);
            if dc.hard_cut_every > 0 && sent_in_epoch % dc.hard_cut_every == 0 && sent < dc.chunks {
                let e = s0.hard_cut();
                planner.hard_cut();
                anchor = None;
                epoch_first = None;
                let now = Instant::now();
                rep.trace
                    .span("stage0", &format!("hard cut → {e}"), now, now);
            }
            continue;
        }
        if s0.can_receive() && (s0.ready_len() == 0 || !dc.queues.backpressure) {
            let wait = if s0.ready_len() == 0 || !dc.queues.backpressure {
                dc.timeout
            } else {
                Duration::ZERO
            };
            let t = Instant::now();
            match link.recv(wait)? {
                Some(env) => {
                    let r = decode_result(&env)?;
                    if s0.ready_len() == 0 {
                        rep.trace.span("stage0", "wait result", t, Instant::now());
                    }
                    let (epoch, chunk) = (r.cache_epoch.get(), r.chunk_index.get());
                    let is_anchor =
                        epoch_first == Some(r.chunk_index) && r.cache_epoch == s0.epoch();
                    let latent_head: Option<Vec<f32>> = is_anchor.then(|| {
                        let n = (cfg.sink_frames as usize * tpf * in_dim).min(r.latent.len());
                        r.latent[..n].to_vec()
                    });
                    match s0.offer(r)? {
                        Offer::Accepted => {
                            if let Some(a) = latent_head {
                                anchor = Some(a);
                            }
                        }
                        Offer::DroppedStale => {
                            diag(&format!(
                                "lockstep[{DRIVER}]: dropped stale result chunk_index {chunk} \
                                 cache_epoch {epoch} (current {})",
                                s0.epoch()
                            ));
                            rep.stale.push((epoch, chunk));
                        }
                    }
                    continue;
                }
                None if s0.ready_len() == 0 => {
                    return Err(Error::Timeout(format!(
                        "stage 0 waited {:?} for a RESULT (expected_next {}, {} outstanding, {})",
                        dc.timeout,
                        s0.expected_next()
                            .map_or("none (only cut envelopes)".into(), |c| c.to_string()),
                        s0.outstanding(),
                        s0.epoch()
                    )));
                }
                None => {}
            }
        }
        if let Some(r) = s0.pop_ready() {
            let t = Instant::now();
            decoder.decode(&DecodeInput {
                chunk_index: r.chunk_index.get(),
                cache_epoch: r.cache_epoch.get(),
                latent: &r.latent,
                frames: cfg.frames_per_chunk,
            })?;
            let now = Instant::now();
            rep.s0_total += now - t;
            rep.trace
                .span("stage0", &format!("decode {}", r.chunk_index), t, now);
            rep.s1_us.push(r.s1_us);
            rep.latencies_ms
                .push(now.duration_since(r.sent_at).as_secs_f64() * 1e3);
            rep.emit_s.push(now.duration_since(t_start).as_secs_f64());
            rep.emitted.push((r.cache_epoch.get(), r.chunk_index.get()));
            if let Some(pb) = &dc.progress {
                pb.inc(1);
            }
            continue;
        }
        if sent >= dc.chunks && s0.outstanding() == 0 {
            break;
        }
        return Err(Error::Invariant(format!(
            "stage 0 can neither send, receive nor decode ({} outstanding, {} ready, {} of {} \
             sent)",
            s0.outstanding(),
            s0.ready_len(),
            sent,
            dc.chunks
        )));
    }
    link.shutdown()?;
    rep.stats = s0.stats().clone();
    Ok(rep)
}
