//! Sending: call_id allocation under the send lock (shared with heartbeats), header and meta on
//! the envelope lane, then the payload on `pp` in one group; the leader's wait for rank 0's
//! `ClearToSend` before a RESULT payload (module contract in `rank/mod.rs`).
use super::recv::LaneFrame;
use super::Rank;
use crate::comm::control::{write_frame, FrameKind};
use crate::comm::lane::LaneWriter;
use crate::comm::plane::{DataPlane, IntoPlane};
use crate::comm::recorder::OpDesc;
use crate::comm::watchdog;
use crate::error::{Error, Result};
use crate::fault;
use crate::ids::{CallId, GlobalRank, GroupRank};
use crate::wire::{Action, EnvelopeIds, Header, PreparedEnvelope, Tensor, HEADER_LEN};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

impl<D: DataPlane> Rank<D> {
    /// Sends the envelope `make(ids)` returns, with `ids.call_id` the next call_id (allocated
    /// under the send lock, so heartbeats and envelopes share one monotonic sequence). Preflight
    /// errors consume no call_id and send nothing. The tensors may live on either side
    /// (`S`: host bytes are uploaded before the header goes out; data-plane buffers are sent as
    /// they are); they come back as data-plane buffers once the sends completed, for reuse.
    pub fn send_next<S: IntoPlane<D>>(
        &self,
        make: impl FnOnce(EnvelopeIds) -> Result<PreparedEnvelope<S>>,
    ) -> Result<(CallId, Vec<Tensor<D::Buffer>>)> {
        let ob = self.outbox()?.clone();
        let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
        let ids = EnvelopeIds {
            call_id: CallId(st.next_call_id),
            ..st.last_ids
        };
        let env = make(ids)?;
        check_allocated_id(env.header(), ids)?;
        let back = self.send_prepared(&ob, &mut st, env)?;
        Ok((ids.call_id, back))
    }

    /// Sends a prepared envelope as is (tests use it to send duplicates and regressions; pass
    /// `env.by_ref()` to keep it). Hands the tensors back as in [`Rank::send_next`].
    pub fn send_envelope<S: IntoPlane<D>>(
        &self,
        env: PreparedEnvelope<S>,
    ) -> Result<Vec<Tensor<D::Buffer>>> {
        let ob = self.outbox()?.clone();
        let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
        self.send_prepared(&ob, &mut st, env)
    }

    /// The one send path: every tensor into the data plane **before** the header goes out (an
    /// upload that fails must not strand a peer that already read the header), then the parts.
    fn send_prepared<S: IntoPlane<D>>(
        &self,
        ob: &Outbox,
        st: &mut SendState,
        env: PreparedEnvelope<S>,
    ) -> Result<Vec<Tensor<D::Buffer>>> {
        let (h, meta, tensors) = env.into_parts();
        let bufs = tensors
            .into_iter()
            .map(|t| t.map_data(|d| d.into_plane(&*self.plane)))
            .collect::<Result<Vec<_>>>()?;
        self.send_locked(ob, st, &h, &meta, bufs)
    }

    /// Header + meta on the envelope lane, then the tensors on `pp` in one group. Returns the
    /// tensors once every send completed.
    fn send_locked(
        &self,
        ob: &Outbox,
        st: &mut SendState,
        h: &Header,
        meta: &[u8],
        tensors: Vec<Tensor<D::Buffer>>,
    ) -> Result<Vec<Tensor<D::Buffer>>> {
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            seq: h.call_id,
            op: send_header_label(h.action()).into(),
            peer: Some(ob.peer.0),
            bytes: (HEADER_LEN + meta.len()) as u64,
            ..Default::default()
        });
        {
            let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
            write_frame(&mut *c, FrameKind::Envelope, &[&h.encode(), meta]).map_err(|e| {
                Error::PeerLost(format!(
                    "control: send {} header to {}: {e}",
                    h.action().name(),
                    ob.peer
                ))
            })?;
        }
        self.recorder.complete(rec);
        st.next_call_id = st.next_call_id.max(h.call_id + 1);
        st.last_ids = EnvelopeIds::of(h);
        st.last_send = Instant::now();
        if tensors.is_empty() {
            return Ok(tensors);
        }
        if !self.is_driver() {
            // Leader → rank 0: only once rank 0 is known to be receiving (module contract).
            self.await_clear_to_send(h.call_id)?;
        }
        let pp = self.pp();
        let peer = GroupRank(if self.is_driver() { 1 } else { 0 });
        let n = tensors.len();
        let mut tensors = tensors.into_iter();
        if fault::hit(fault::points::KILL_MID_PAYLOAD) {
            // C2: the header and the first half of the tensors (none of one) are out; die
            // before the rest, so the receiver is always left inside the payload.
            let half = n / 2;
            for t in tensors.by_ref().take(half) {
                let tk = pp.send(t.data, peer, t.dtype, &t.shape)?;
                pp.wait(tk, self.deadline())?;
            }
            crate::diag!(
                "lockstep[{}]: fault: SIGKILL after the header and {half} of {n} tensors",
                self.me
            );
            // SAFETY: sending a signal to our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        pp.group_start()?;
        let mut sent = Vec::with_capacity(n);
        for t in tensors {
            match pp.send(t.data, peer, t.dtype, &t.shape) {
                Ok(tk) => sent.push((t.name, t.dtype, t.shape, tk)),
                Err(e) => {
                    let _ = pp.group_end();
                    return Err(e);
                }
            }
        }
        pp.group_end()?;
        let mut back = Vec::with_capacity(n);
        for (name, dtype, shape, tk) in sent {
            back.push(Tensor::new(
                name,
                dtype,
                shape,
                pp.wait(tk, self.deadline())?,
            ));
        }
        Ok(back)
    }

    /// Starts rank 0's heartbeat thread: a NOOP whenever nothing was sent for `interval`.
    pub fn start_heartbeats(&self, interval: Duration) -> Result<()> {
        let ob = self.outbox()?.clone();
        let stop = self.hb_stop.clone();
        let rec = self.recorder.clone();
        let tick = (interval / 4).max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("lockstep-heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    let mut st = ob.state.lock().unwrap_or_else(|p| p.into_inner());
                    if stop.load(Ordering::SeqCst) || st.last_send.elapsed() < interval {
                        continue;
                    }
                    let ids = EnvelopeIds {
                        call_id: CallId(st.next_call_id),
                        ..st.last_ids
                    };
                    let env = PreparedEnvelope::noop(ids);
                    let id = rec.enqueue(OpDesc {
                        group: "control".into(),
                        seq: ids.call_id.0,
                        op: "send_header NOOP".into(),
                        peer: Some(ob.peer.0),
                        bytes: HEADER_LEN as u64,
                        ..Default::default()
                    });
                    let r = {
                        let mut c = ob.ctrl.lock().unwrap_or_else(|p| p.into_inner());
                        write_frame(&mut *c, FrameKind::Envelope, &[&env.header_bytes()])
                    };
                    if let Err(e) = r {
                        watchdog::crash(
                            &Error::PeerLost(format!("heartbeat to {}: {e}", ob.peer)),
                            true,
                        );
                    }
                    rec.complete(id);
                    st.next_call_id += 1;
                    st.last_ids.call_id = ids.call_id;
                    st.last_send = Instant::now();
                }
            })
            .map_err(|e| Error::io("spawn heartbeat", e))?;
        Ok(())
    }

    pub fn stop_heartbeats(&self) {
        self.hb_stop.store(true, Ordering::SeqCst);
    }

    /// Leader, RESULT header sent: reads the lane until rank 0's `ClearToSend` for `call_id`,
    /// receiving every envelope that comes first whole (acceptance, payload) into the stash, so
    /// rank 0's INFER sends complete. Bounded by the op deadline.
    fn await_clear_to_send(&self, call_id: u64) -> Result<()> {
        let inbox = self
            .inbox
            .as_ref()
            .ok_or_else(|| Error::Invariant(format!("{} has no envelope peer", self.me)))?;
        let mut lane = inbox.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = self.deadline();
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            seq: call_id,
            op: "await_clear_to_send".into(),
            peer: Some(0),
            ..Default::default()
        });
        loop {
            let got = match self.read_lane(&mut lane, Some(deadline)) {
                Ok(g) => g,
                Err(e) => {
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
            };
            match got {
                None => {
                    let e = Error::Timeout(format!(
                        "RESULT call_id {call_id}: global-rank 0 did not clear its payload to \
                         send (no ClearToSend) within the op timeout ({:?})",
                        self.opts.op_timeout
                    ));
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
                Some(LaneFrame::ClearToSend(id)) if id == call_id => {
                    self.recorder.complete(rec);
                    return Ok(());
                }
                Some(LaneFrame::ClearToSend(id)) => {
                    let e = Error::Invariant(format!(
                        "ClearToSend for call_id {id} while RESULT call_id {call_id} waits for one"
                    ));
                    self.recorder.fail(rec, &e.to_string());
                    return Err(e);
                }
                Some(LaneFrame::Envelope(body)) => {
                    if let Some(e) = self.accept_frame(&body)? {
                        self.stashed.fetch_add(1, Ordering::Relaxed);
                        self.stash
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back(e);
                    }
                    // Receiving is progress: rank 0 may send several envelopes before it reads
                    // our RESULT header.
                    self.recorder.progress();
                }
            }
        }
    }
}

/// The send side's sequence: next call_id, last ids sent, when (heartbeats fill idle time).
pub(super) struct SendState {
    pub(super) next_call_id: u64,
    pub(super) last_ids: EnvelopeIds,
    pub(super) last_send: Instant,
}

/// The control connection to the envelope peer (rank 0 ↔ mesh leader).
pub(super) struct Outbox {
    pub(super) ctrl: Mutex<LaneWriter>,
    pub(super) state: Mutex<SendState>,
    pub(super) peer: GlobalRank,
}

/// The flight-recorder name of a header send (static: no allocation per envelope).
fn send_header_label(a: Action) -> &'static str {
    match a {
        Action::Infer => "send_header INFER",
        Action::Noop => "send_header NOOP",
        Action::Shutdown => "send_header SHUTDOWN",
        Action::Result => "send_header RESULT",
    }
}

/// `send_next`: the envelope `make` built must carry the call_id allocated for it.
fn check_allocated_id(h: &Header, ids: EnvelopeIds) -> Result<()> {
    if h.call_id() != ids.call_id {
        return Err(Error::Invariant(format!(
            "send_next: envelope carries {} but {} was allocated",
            h.call_id(),
            ids.call_id
        )));
    }
    Ok(())
}
