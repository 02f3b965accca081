//! Groups and the collective wrapper, control plane, rendezvous, parity handshake, data planes
//! (host, nccl), flight recorder, watchdog.
//!
//! The envelope endpoint built on these (bootstrap, send/receive, relay) is `crate::rank`; nothing
//! here imports it.
pub mod control;
pub mod group;
pub mod host;
pub mod lane;
pub mod nccl;
pub mod null;
pub mod parity;
pub mod plane;
pub mod recorder;
pub mod spec;
pub mod watchdog;

pub use group::{standard_groups, Group, GroupRole, GroupSpec, PeerTable, Ticket};
pub use host::HostPlane;
pub use null::{NullBuf, NullPlane};
pub use parity::Fingerprint;
pub use plane::{AbortHandle, DataPlane};
pub use recorder::{OpContext, Recorder};
