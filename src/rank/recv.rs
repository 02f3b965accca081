//! Receiving: the envelope lane (rank 0 ↔ leader), acceptance on the leader, `ClearToSend` on
//! rank 0, the payload's receives posted strictly from the manifest into pooled buffers
//! (module contract in `rank/mod.rs`).
use super::accept::Verdict;
use super::reader::RecvProgress;
use super::Rank;
use crate::comm::control::{read_frame, write_frame, FrameKind};
use crate::comm::lane::LaneReader;
use crate::comm::plane::{DataPlane, FromPlane};
use crate::comm::recorder::OpContext;
use crate::comm::recorder::OpDesc;
use crate::error::{Error, Result};
use crate::ids::GroupRank;
use crate::wire::{decode_frame, Header, MetaDoc, ReceivedEnvelope, Tensor, HEADER_LEN};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

impl<D: DataPlane> Rank<D> {
    /// Receives the next envelope from the envelope peer. On the mesh leader, acceptance runs
    /// first (duplicates are drained and dropped); tensors are allocated strictly from the
    /// manifest, in data-plane buffers, and handed up in storage `S`: host bytes
    /// (`ReceivedEnvelope`, NCCL: one download each) or the data plane's buffers
    /// (`ReceivedEnvelope<D::Buffer>`, no host staging: hand them back with [`Rank::recycle`]
    /// when done, so the next envelope with the same manifest allocates nothing). `deadline`
    /// None waits without a local bound (the watchdog still applies).
    pub fn recv_envelope<S: FromPlane<D>>(
        &self,
        deadline: Option<Instant>,
    ) -> Result<ReceivedEnvelope<S>> {
        match self.recv_envelope_inner(deadline)? {
            Some(e) => self.hand_up(e),
            None => {
                let peer = self.outbox.as_ref().map_or(0, |o| o.peer.0);
                Err(Error::Timeout(format!(
                    "no envelope header from global-rank {peer} before the deadline"
                )))
            }
        }
    }

    /// Like [`Rank::recv_envelope`], but "no header started to arrive within `timeout`" is
    /// `Ok(None)`. The timeout only applies before the first byte of a frame: once a header has
    /// started, the frame is read to its end under the rank's op deadline, so a timeout never
    /// consumes half a frame and desynchronizes the lane.
    pub fn try_recv_envelope<S: FromPlane<D>>(
        &self,
        timeout: Duration,
    ) -> Result<Option<ReceivedEnvelope<S>>> {
        self.recv_envelope_inner(Some(Instant::now() + timeout))?
            .map(|e| self.hand_up(e))
            .transpose()
    }

    /// A received envelope's tensors, from data-plane buffers into the caller's storage (host
    /// bytes: one download each on NCCL, a move on the host backend).
    pub(super) fn hand_up<S: FromPlane<D>>(
        &self,
        env: ReceivedEnvelope<D::Buffer>,
    ) -> Result<ReceivedEnvelope<S>> {
        let tensors = env
            .tensors
            .into_iter()
            .map(|t| t.map_data(|b| S::from_plane(b, &*self.plane)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ReceivedEnvelope {
            header: env.header,
            meta: env.meta,
            tensors,
        })
    }

    /// Hands receive buffers back for reuse by later envelopes of the same manifest (at most
    /// a few per byte length are kept; the rest are freed).
    pub fn recycle(&self, tensors: impl IntoIterator<Item = Tensor<D::Buffer>>) {
        let mut pool = self.recv_pool.lock().unwrap_or_else(|p| p.into_inner());
        for t in tensors {
            let len = self.plane.buffer_len(&t.data);
            pool.put(len, t.data);
        }
    }

    /// A receive buffer of `len` bytes: from the pool, else freshly allocated.
    pub(super) fn recv_buffer(&self, len: usize) -> Result<D::Buffer> {
        let pooled = self
            .recv_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(len);
        match pooled {
            Some(b) => Ok(b),
            None => {
                self.recv_allocs.fetch_add(1, Ordering::Relaxed);
                self.plane.alloc_for_recv(len)
            }
        }
    }

    /// How many receive buffers this rank allocated fresh (the rest came from [`Rank::recycle`]).
    pub fn recv_buffers_allocated(&self) -> u64 {
        self.recv_allocs.load(Ordering::Relaxed)
    }

    fn recv_envelope_inner(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        if let Some(e) = self
            .stash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            return Ok(Some(e));
        }
        let inbox = self
            .inbox
            .as_ref()
            .ok_or_else(|| Error::Invariant(format!("{} has no envelope peer", self.me)))?;
        let mut lane = inbox.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match self.read_lane(&mut lane, deadline)? {
                None => return Ok(None),
                Some(LaneFrame::ClearToSend(id)) => {
                    return Err(Error::Invariant(format!(
                        "{}: ClearToSend for call_id {id} while no RESULT payload waits for one",
                        self.me
                    )))
                }
                Some(LaneFrame::Envelope(body)) => {
                    if let Some(e) = self.accept_frame(&body)? {
                        return Ok(Some(e));
                    }
                }
            }
        }
    }

    /// Rank 0, RESULT header read: tells the leader to send the payload now (this thread posts
    /// the receives next and issues no other `pp` op before they complete).
    fn clear_to_send(&self, call_id: u64) -> Result<()> {
        let ob = self.outbox()?;
        let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *c, FrameKind::ClearToSend, &[&call_id.to_le_bytes()]).map_err(|e| {
            Error::PeerLost(format!(
                "control: send ClearToSend for call_id {call_id} to {}: {e}",
                ob.peer
            ))
        })
    }

    /// Reads the next frame of the envelope lane. `None`: no frame started before `deadline`.
    pub(super) fn read_lane(
        &self,
        lane: &mut LaneReader,
        deadline: Option<Instant>,
    ) -> Result<Option<LaneFrame>> {
        let peer = self.outbox.as_ref().map_or(0, |o| o.peer.0);
        let max =
            u32::try_from(HEADER_LEN as u64 + self.opts.limits.max_meta_bytes).unwrap_or(u32::MAX);
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            op: "recv_header".into(),
            peer: Some(peer),
            ..Default::default()
        });
        // Wait for the first byte without consuming anything; only this wait may time out
        // quietly.
        if !lane.readable_by(deadline) {
            self.recorder.note(rec, "no header before the deadline");
            self.recorder.complete(rec);
            return Ok(None);
        }
        // Cleared when the frame is handled (ClearToSend below, envelopes in `accept_frame`).
        self.frame_busy.store(true, Ordering::SeqCst);
        // Data, EOF or an error: read_frame below reports it precisely. The rest of the frame
        // is bounded by the op deadline (a peer that stalls mid-frame is an error, not "nothing
        // arrived").
        lane.bound_reads(self.opts.op_timeout);
        // The name travels beside the reader it names: taken out for the read, put back after
        // (no allocation per frame).
        let what = std::mem::take(&mut lane.what);
        let read = read_frame(lane, max, &what);
        let got = match read {
            Ok(Some((FrameKind::Envelope, body))) => Ok(LaneFrame::Envelope(EnvelopeFrame { body, rec })),
            Ok(Some((FrameKind::ClearToSend, body))) => match <[u8; 8]>::try_from(body.as_slice()) {
                Ok(b) if !self.is_driver() => Ok(LaneFrame::ClearToSend(u64::from_le_bytes(b))),
                _ => Err(Error::Decode(format!(
                    "{what}: malformed or misdirected ClearToSend frame ({} bytes)",
                    body.len()
                ))),
            },
            Ok(Some((k, _))) => Err(Error::Decode(format!("{what}: unexpected {k:?} frame"))),
            Ok(None) => Err(Error::PeerLost(format!(
                "global-rank {peer}{} closed its envelope lane without a goodbye (it died, or left while this rank still waits for envelopes)",
                if peer == 0 { " (driver)" } else { "" }
            ))),
            Err(Error::Timeout(_)) => Err(Error::Timeout(format!(
                "{what}: a frame started but did not complete within the op timeout ({:?}); the peer stalled mid-frame",
                self.opts.op_timeout
            ))),
            Err(e) => Err(e),
        };
        lane.what = what;
        match got {
            Ok(f) => {
                if let LaneFrame::ClearToSend(id) = &f {
                    self.recorder
                        .note(rec, &format!("ClearToSend call_id {id}"));
                    self.recorder.complete(rec);
                    self.frame_busy.store(false, Ordering::SeqCst);
                }
                // Envelope frames: `accept_frame` notes and completes the op.
                Ok(Some(f))
            }
            Err(e) => {
                self.recorder.fail(rec, &e.to_string());
                Err(e)
            }
        }
    }

    /// One envelope frame: decode, acceptance (leader), payload receive. `None`: a duplicate,
    /// drained and dropped.
    pub(super) fn accept_frame(
        &self,
        frame: &EnvelopeFrame,
    ) -> Result<Option<ReceivedEnvelope<D::Buffer>>> {
        struct Handled<'a>(&'a AtomicBool);
        impl Drop for Handled<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _handled = Handled(&self.frame_busy);
        let rec = frame.rec;
        let (h, meta) = match decode_frame(&frame.body, &self.opts.limits) {
            Ok(i) => i,
            Err(e) => {
                self.recorder.fail(rec, &e.to_string());
                return Err(e);
            }
        };
        self.recorder
            .note(rec, &format!("{} call_id {}", h.action().name(), h.call_id));
        self.recorder.complete(rec);
        let verdict = if self.is_mesh_leader() {
            self.acceptance
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check(&h)?
        } else {
            Verdict::Accept
        };
        self.recorder.set_context(OpContext {
            call_id: h.call_id(),
            chunk_index: h.chunk_index(),
            cache_epoch: h.cache_epoch(),
            action: h.action().name().into(),
            phase: "recv".into(),
        });
        if self.is_driver() && meta.as_ref().is_some_and(|m| !m.tensor_specs.is_empty()) {
            self.clear_to_send(h.call_id)?;
        }
        let tensors = self.recv_payload(&h, meta.as_ref())?;
        match verdict {
            Verdict::Accept => Ok(Some(ReceivedEnvelope {
                header: h,
                meta,
                tensors,
            })),
            Verdict::DuplicateDropped => {
                crate::diag!(
                    "lockstep[{}]: dropped duplicate envelope call_id {} cache_epoch {} (payload drained)",
                    self.me, h.call_id, h.cache_epoch
                );
                Ok(None)
            }
        }
    }

    fn recv_payload(&self, h: &Header, meta: Option<&MetaDoc>) -> Result<Vec<Tensor<D::Buffer>>> {
        let Some(meta) = meta.filter(|m| !m.tensor_specs.is_empty()) else {
            return Ok(Vec::new());
        };
        let pp = self.pp();
        let peer = GroupRank(if self.is_driver() { 1 } else { 0 });
        let n = meta.tensor_specs.len();
        let set = |i: usize| {
            if let Ok(mut p) = self.recv_progress.lock() {
                *p = Some(RecvProgress {
                    action: h.action().name(),
                    call_id: h.call_id,
                    done: i,
                    of: n,
                });
            }
        };
        set(0);
        // Limits were checked when the meta was decoded; allocation follows the manifest only.
        let mut bufs = Vec::with_capacity(n);
        for spec in &meta.tensor_specs {
            bufs.push(self.recv_buffer(spec.byte_len as usize)?);
        }
        // All receives in one group, as the sender groups its sends: one launch and one
        // host-visible completion per envelope instead of one per tensor.
        pp.group_start()?;
        let mut tickets = Vec::with_capacity(n);
        for (spec, buf) in meta.tensor_specs.iter().zip(bufs) {
            match pp.recv(buf, peer, spec.dtype, &spec.shape) {
                Ok(tk) => tickets.push(tk),
                Err(e) => {
                    let _ = pp.group_end();
                    return Err(e);
                }
            }
        }
        pp.group_end()?;
        let mut tensors = Vec::with_capacity(n);
        for (i, (spec, tk)) in meta.tensor_specs.iter().zip(tickets).enumerate() {
            let data = pp.wait(tk, self.deadline())?;
            tensors.push(Tensor::new(
                spec.name.clone(),
                spec.dtype,
                spec.shape.clone(),
                data,
            ));
            set(i + 1);
        }
        if let Ok(mut p) = self.recv_progress.lock() {
            *p = None;
        }
        Ok(tensors)
    }
}

/// allocates its receive buffers once. Bounded per length, so a caller that recycles more than
/// it receives cannot grow it without limit.
pub(super) struct RecvPool<B> {
    free: std::collections::HashMap<usize, Vec<B>>,
}

impl<B> Default for RecvPool<B> {
    fn default() -> Self {
        RecvPool {
            free: std::collections::HashMap::new(),
        }
    }
}

/// Buffers of one length the pool keeps at most.
const RECV_POOL_PER_LEN: usize = 4;

impl<B> RecvPool<B> {
    fn take(&mut self, len: usize) -> Option<B> {
        self.free.get_mut(&len).and_then(Vec::pop)
    }
    fn put(&mut self, len: usize, b: B) {
        let v = self.free.entry(len).or_default();
        if v.len() < RECV_POOL_PER_LEN {
            v.push(b);
        }
    }
}

pub(super) enum LaneFrame {
    Envelope(EnvelopeFrame),
    ClearToSend(u64),
}

/// An envelope frame's bytes and its still-open `recv_header` flight-recorder op.
pub(super) struct EnvelopeFrame {
    body: Vec<u8>,
    rec: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_pool_reuses_by_length_and_keeps_a_bounded_number() {
        let mut pool = RecvPool::<Vec<u8>>::default();
        assert!(pool.take(8).is_none());
        for i in 0..(RECV_POOL_PER_LEN + 3) {
            pool.put(8, vec![i as u8; 8]);
        }
        pool.put(16, vec![0; 16]);
        let mut got = 0;
        while let Some(b) = pool.take(8) {
            assert_eq!(b.len(), 8);
            got += 1;
        }
        assert_eq!(
            got, RECV_POOL_PER_LEN,
            "at most {RECV_POOL_PER_LEN} kept per length"
        );
        assert_eq!(pool.take(16).map(|b| b.len()), Some(16));
        assert!(pool.take(16).is_none());
    }
}
