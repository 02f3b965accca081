//! Groups and the collective wrapper, control plane, rendezvous, parity handshake, data planes
//! (host, nccl), flight recorder, watchdog.
//!
//! # How to use (one rank)
//! ```no_run
//! use lockstep::rank::{Rank, RankEnv, RankOptions};
//! use lockstep::wire::{prepare, Action, EnvelopeIds, HostTensor, Limits};
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
//!     let result = rank.recv_envelope(None)?;     // RESULT from the mesh leader
//!     # let _ = result;
//! } else {
//!     // The leader receives from rank 0 (acceptance: call_id == last + 1, duplicates dropped),
//!     // then relays to the whole mesh; followers get the same envelope from `relay_to_mesh`.
//!     let env = if rank.is_mesh_leader() { Some(rank.recv_envelope(None)?) } else { None };
//!     let env = rank.relay_to_mesh(env.as_ref())?;
//!     let sum = rank.mesh().all_reduce_f32(&[1.0, 2.0], &[2], rank.deadline())?; // TP collective
//!     # let _ = (env, sum);
//! }
//! rank.finish()?;                                  // drain path: BYE, destroy comms, watchdog armed
//! # Ok(()) }
//! ```
//! Every failure inside ends the process through [`watchdog::crash`] with a distinct exit code
//! and a flight-recorder dump; callers that get an `Err` back call `rank.crash(&err)`.
pub mod control;
pub mod group;
pub mod host;
pub mod lane;
pub mod nccl;
pub mod null;
pub mod parity;
pub mod plane;
pub mod recorder;
pub mod watchdog;

pub use group::{standard_groups, Group, GroupRole, GroupSpec, PeerTable, Ticket};
pub use host::HostPlane;
pub use null::{NullBuf, NullPlane};
pub use parity::Fingerprint;
pub use plane::{AbortHandle, DataPlane};
pub use recorder::{OpContext, Recorder};
