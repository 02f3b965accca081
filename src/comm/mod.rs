//! Groups and the collective wrapper, control plane, rendezvous, parity handshake, data planes
//! (host, nccl), flight recorder, watchdog.
pub mod nccl;
