//! One rank's life: environment → rendezvous → parity → groups → watchdog, then the envelope
//! endpoint (send/receive with manifest-driven allocation, call_id acceptance, heartbeats, relay
//! to the mesh) and the two ways out: `finish` (drain) and `crash` (abort).
//!
//! Contract:
//! - The environment follows torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`) plus `LOCKSTEP_JOB_TOKEN` (falls back to torchrun's `TORCHELASTIC_RUN_ID`
//!   with the store address and attempt, `crate::torchrun::job_token`), `LOCKSTEP_DUMP_DIR`,
//!   `LOCKSTEP_WATCHDOG_MS`, `LOCKSTEP_DEBUG_COLLECTIVES`, `LOCKSTEP_FAULT`.
//! - Rank 0 hosts the rendezvous (on `MASTER_PORT`, or, under torchrun's agent store, on an
//!   ephemeral port it publishes through that store: `crate::torchrun`). A connection without the job token, with garbage or truncated
//!   bytes, or from a duplicate rank is refused and logged; the job goes on. Every wait in
//!   bootstrap is bounded by the rendezvous timeout.
//! - Parity runs on the control plane **before** any communicator exists: a mismatch ends every
//!   rank with `ParityMismatch` and the per-field diff (B3, G1).
//! - Mesh-side acceptance (docs/spec.md §4): `call_id == last + 1` is accepted; an exact duplicate (same
//!   call_id, cache_epoch and meta digest) is **dropped** after its payload is drained (the
//!   header is a commitment), and counted; a regression, a gap, or a reused call_id with other
//!   content is an invariant violation naming both values. `chunk_index` strictly increases
//!   across INFERs; `cache_epoch` never decreases.
//! - Control-connection loss without a goodbye is `PeerLost` at once (C1); a peer's failure
//!   notice makes every rank dump and exit `PeerFailed`.
//! - `pp` payloads never cross (docs/spec.md §8; `docs/manual/02-deadlock-patterns.md`): rank 0 sends
//!   its INFER payloads at will, but the mesh leader sends a RESULT payload only after rank 0's
//!   `ClearToSend` for that call_id, which rank 0 writes from its receive path right before it
//!   posts the matching receives. Envelopes that arrive while the leader waits for the CTS are
//!   received whole (acceptance + payload) and queued for its next `recv_envelope`. So rank 0
//!   is never inside an INFER payload send while the leader is inside a RESULT payload send —
//!   two blocking sends in opposite directions on one NCCL communicator (and one stream per
//!   rank) that would wait for each other forever. Tripwire: rank 0 issues `pp` payload ops from
//!   one thread at a time (the driver's); heartbeats carry no payload.
//!
//! One envelope path over where tensors live: every send, receive and relay is generic over the
//! tensors' storage (`comm::plane::{IntoPlane, FromPlane}`): host bytes (`Vec<u8>`, staged
//! through the data plane; `&Vec<u8>` for an envelope the caller keeps, via `by_ref`) or the
//! data plane's own buffers (`D::Buffer`, device-resident on NCCL, no host staging).
//!
//! Files, by role: `env.rs` (environment and options), `bootstrap.rs` (rendezvous → parity →
//! groups → lane → readers → watchdog, host and NCCL), `accept.rs` (mesh-side acceptance),
//! `send.rs` (call_id allocation, header then payload, heartbeats, waiting for `ClearToSend`),
//! `recv.rs` (the lane, acceptance, `ClearToSend`, manifest-driven receive buffers and their
//! pool), `relay.rs` (leader → mesh broadcast), `reader.rs` (the control-connection reader
//! thread: peer loss, failure notices). This file: the `Rank` type, accessors, drain, crash.
//!
//! # How to use (one rank)
//! ```no_run
//! use lockstep::rank::{Rank, RankEnv, RankOptions};
//! use lockstep::wire::{prepare, Action, EnvelopeIds, HostTensor, Limits, ReceivedEnvelope};
//! # fn main() -> lockstep::Result<()> {
//! let env = RankEnv::from_env()?;                 // RANK, WORLD_SIZE, MASTER_ADDR, …, token
//! let mut opts = RankOptions::from_env()?;        // watchdog, debug mode, limits
//! opts.fingerprint.set("model.dim", 1536);        // pipeline settings join the parity check
//! let rank = Rank::bootstrap_host(&env, opts)?;   // rendezvous → parity → groups → watchdog
//! if rank.is_driver() {
//!     rank.start_heartbeats(std::time::Duration::from_millis(200))?;
//!     #[derive(serde::Serialize, serde::Deserialize)] struct Plan { steps: u32 }
//!     let t = HostTensor::from_f32("latents", vec![4], &[0.0; 4]);
//!     rank.send_next(|ids| prepare(Action::Infer, ids.with_chunk(0), &Plan { steps: 4 }, vec![t.clone()], &Limits::default()))?;
//!     let result: ReceivedEnvelope = rank.recv_envelope(None)?; // RESULT, in host memory
//!     # let _ = result;
//! } else {
//!     // The leader receives from rank 0 (acceptance: call_id == last + 1, duplicates dropped),
//!     // then relays to the whole mesh; followers get the same envelope from `relay_to_mesh`.
//!     let env: Option<ReceivedEnvelope> =
//!         if rank.is_mesh_leader() { Some(rank.recv_envelope(None)?) } else { None };
//!     let env: ReceivedEnvelope = rank.relay_to_mesh(env)?;
//!     let sum = rank.mesh().all_reduce_f32(&[1.0, 2.0], &[2], rank.deadline())?; // TP collective
//!     # let _ = (env, sum);
//! }
//! rank.finish()?;                                  // drain path: BYE, destroy comms, watchdog armed
//! # Ok(()) }
//! ```
//! Every failure inside ends the process through `comm::watchdog::crash` with a distinct exit
//! code and a flight-recorder dump; callers that get an `Err` back call `rank.crash(&err)`.
mod accept;
mod bootstrap;
mod env;
mod reader;
mod recv;
mod relay;
mod send;

pub use accept::{Acceptance, Verdict};
pub use bootstrap::bootstrap_nccl;
pub use env::{job_id, Backend, RankEnv, RankOptions};

use crate::comm::control::{write_frame, FrameKind};
use crate::comm::group::Group;
use crate::comm::lane::LaneReader;
use crate::comm::plane::DataPlane;
use crate::comm::recorder::{OpContext, OpDesc, Recorder};
use crate::comm::{watchdog, HostPlane};
use crate::error::{Error, Result};
use crate::fault;
use crate::ids::GlobalRank;
use crate::wire::ReceivedEnvelope;
use reader::RecvProgress;
use recv::RecvPool;
use send::Outbox;
use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A bootstrapped rank.
pub struct Rank<D: DataPlane = HostPlane> {
    env: RankEnv,
    opts: RankOptions,
    me: GlobalRank,
    groups: Vec<Group<D>>,
    recorder: Arc<Recorder>,
    outbox: Option<Arc<Outbox>>,
    /// The envelope lane (rank 0 ↔ leader), read by the receiving thread itself.
    inbox: Option<Mutex<LaneReader>>,
    /// Leader: envelopes received whole while waiting for a `ClearToSend`, in arrival order (in
    /// data-plane buffers: `recv_envelope` moves one to the caller's storage as it hands it up).
    stash: Mutex<VecDeque<ReceivedEnvelope<D::Buffer>>>,
    /// Receive buffers handed back with [`Rank::recycle`], by byte length (bounded).
    recv_pool: Mutex<RecvPool<D::Buffer>>,
    /// Receive buffers allocated fresh (not taken from the pool), for tests and reports.
    recv_allocs: AtomicU64,
    /// How many envelopes went into `stash` (the crossing the CTS rule defused).
    stashed: AtomicU64,
    acceptance: Mutex<Acceptance>,
    recv_progress: Arc<Mutex<Option<RecvProgress>>>,
    /// True from "a lane frame is there" until that frame was handled (its payload's receives
    /// posted, or it needed none): the control reader waits for it before it names what a lost
    /// peer interrupted.
    frame_busy: Arc<AtomicBool>,
    hb_stop: Arc<AtomicBool>,
    ctrl_all: Vec<(u32, TcpStream)>,
    plane: Arc<D>,
}

impl<D: DataPlane> Rank<D> {
    pub fn global(&self) -> GlobalRank {
        self.me
    }
    pub fn world_size(&self) -> u32 {
        self.env.world_size
    }
    pub fn tp_size(&self) -> u32 {
        self.env.world_size - 1
    }
    pub fn env(&self) -> &RankEnv {
        &self.env
    }
    pub fn options(&self) -> &RankOptions {
        &self.opts
    }
    pub fn is_driver(&self) -> bool {
        self.me.0 == 0
    }
    pub fn is_mesh_leader(&self) -> bool {
        self.me.0 == 1
    }
    pub fn is_mesh(&self) -> bool {
        self.me.0 >= 1
    }
    pub fn plane(&self) -> &D {
        &self.plane
    }
    /// Groups in creation order.
    pub fn groups(&self) -> &[Group<D>] {
        &self.groups
    }
    fn group(&self, name: &str) -> &Group<D> {
        // The table always holds world, pp and mesh (parity guarantees every rank agrees).
        self.groups
            .iter()
            .find(|g| g.name() == name)
            .unwrap_or(&self.groups[0])
    }
    pub fn world(&self) -> &Group<D> {
        self.group("world")
    }
    pub fn pp(&self) -> &Group<D> {
        self.group("pp")
    }
    pub fn mesh(&self) -> &Group<D> {
        self.group("mesh")
    }
    /// The envelope lane's transport (`shm` or `tcp`; `none` on ranks without a lane).
    pub fn lane_transport(&self) -> &'static str {
        self.inbox.as_ref().map_or("none", |l| {
            l.lock().unwrap_or_else(|p| p.into_inner()).transport()
        })
    }
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }
    /// The bound for one blocking wait started now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.opts.op_timeout
    }
    /// Marks progress for the watchdog (a compute step finished).
    pub fn progress(&self) {
        self.recorder.progress();
    }
    pub fn set_context(&self, ctx: OpContext) {
        self.recorder.set_context(ctx);
    }
    /// Leader: envelopes rank 0 sent while a RESULT payload waited for its `ClearToSend` (each
    /// one a send that, without the rule, would have crossed the RESULT on `pp`).
    pub fn envelopes_received_awaiting_cts(&self) -> u64 {
        self.stashed.load(Ordering::Relaxed)
    }

    pub fn dropped_duplicates(&self) -> u64 {
        self.acceptance.lock().map_or(0, |a| a.dropped_duplicates())
    }
    /// Ends this rank through the abort path (dump, notify, exit with the error's code).
    pub fn crash(&self, err: &Error) -> ! {
        watchdog::crash(err, true)
    }

    fn outbox(&self) -> Result<&Arc<Outbox>> {
        self.outbox.as_ref().ok_or_else(|| {
            Error::Invariant(format!(
                "{} has no envelope peer (only rank 0 and the mesh leader exchange envelopes)",
                self.me
            ))
        })
    }

    /// Drain path, last step: say goodbye on the control plane, destroy communicators. The
    /// watchdog stays armed, so a hanging teardown still ends in a hard exit (C5).
    pub fn finish(mut self) -> Result<()> {
        self.stop_heartbeats();
        let rec = self.recorder.enqueue_started(OpDesc {
            group: "control".into(),
            op: "teardown".into(),
            ..Default::default()
        });
        self.recorder.set_phase("teardown");
        for (_, s) in self.ctrl_all.iter_mut() {
            let _ = write_frame(s, FrameKind::Bye, &[]);
        }
        if fault::hit(fault::points::TEARDOWN_HANG) {
            // Stands in for an ncclCommDestroy that never returns.
            loop {
                std::thread::park();
            }
        }
        for g in self.groups.iter_mut() {
            if let Some(c) = g.take_comm() {
                self.plane.destroy_comm(c)?;
                // Each communicator gone is progress (NCCL finalize + destroy takes 0.2–0.5 s
                // per communicator); a teardown that stops moving still trips the watchdog.
                self.recorder.progress();
            }
        }
        self.recorder.complete(rec);
        Ok(())
    }
}
