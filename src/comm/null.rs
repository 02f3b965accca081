//! A data plane that moves no bytes: every op completes at once and a buffer is only a length.
//! It exists to measure the protocol's own cost (`lockstep harness protocol`): run `Rank` over
//! it and what remains is preflight, headers on the control plane, acceptance, manifest-driven
//! allocation, guards and the flight recorder — everything but the tensor bytes.
//!
//! Contract: **not a transport.** Receives complete without data (a received buffer reads as
//! zeros), and mismatched collectives do not hang; nothing but the protocol benchmark selects it
//! (it is not a `LOCKSTEP_BACKEND` value, and its name `null` never matches a real plane's in the
//! parity check).
use super::plane::{AbortHandle, DataPlane, FromPlane, IntoPlane};
use super::spec::{GroupSpec, PeerTable};
use crate::error::Result;
use crate::ids::GroupRank;
use crate::wire::{DType, TensorBytes};
use std::time::Instant;

/// A buffer of the null plane: a length, no memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullBuf(pub usize);

impl TensorBytes for NullBuf {
    fn byte_len(&self) -> u64 {
        self.0 as u64
    }
}

/// Device-resident on the null plane: its buffers are envelope storage as they are.
impl IntoPlane<NullPlane> for NullBuf {
    fn into_plane(self, _plane: &NullPlane) -> Result<NullBuf> {
        Ok(self)
    }
}

impl FromPlane<NullPlane> for NullBuf {
    fn from_plane(buf: NullBuf, _plane: &NullPlane) -> Result<NullBuf> {
        Ok(buf)
    }
}

#[derive(Default)]
pub struct NullPlane;

impl DataPlane for NullPlane {
    type Buffer = NullBuf;
    type Comm = ();
    type Pending = NullBuf;

    fn name(&self) -> &'static str {
        "null"
    }
    fn bootstrap_blob(&self, _spec: &GroupSpec) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn create_comm(
        &self,
        _spec: &GroupSpec,
        _me: GroupRank,
        _blob: &[u8],
        _peers: &PeerTable,
        _deadline: Instant,
    ) -> Result<()> {
        Ok(())
    }
    fn destroy_comm(&self, _comm: ()) -> Result<()> {
        Ok(())
    }
    fn alloc(&self, bytes: usize) -> Result<NullBuf> {
        Ok(NullBuf(bytes))
    }
    fn upload(&self, host: &[u8]) -> Result<NullBuf> {
        Ok(NullBuf(host.len()))
    }
    fn download(&self, buf: &NullBuf) -> Result<Vec<u8>> {
        Ok(vec![0; buf.0])
    }
    fn buffer_len(&self, buf: &NullBuf) -> usize {
        buf.0
    }
    fn send(&self, _comm: &(), buf: NullBuf, _peer: GroupRank) -> Result<NullBuf> {
        Ok(buf)
    }
    fn recv(&self, _comm: &(), buf: NullBuf, _peer: GroupRank) -> Result<NullBuf> {
        Ok(buf)
    }
    fn all_reduce_sum(&self, _comm: &(), buf: NullBuf, _dtype: DType) -> Result<NullBuf> {
        Ok(buf)
    }
    fn broadcast(&self, _comm: &(), buf: NullBuf, _root: GroupRank) -> Result<NullBuf> {
        Ok(buf)
    }
    fn all_gather(&self, _comm: &(), _send: NullBuf, recv: NullBuf) -> Result<NullBuf> {
        Ok(recv)
    }
    fn group_start(&self, _comm: &()) -> Result<()> {
        Ok(())
    }
    fn group_end(&self, _comm: &()) -> Result<()> {
        Ok(())
    }
    fn poll(&self, _pending: &NullBuf) -> bool {
        true
    }
    fn wait(&self, pending: NullBuf, _deadline: Instant) -> Result<NullBuf> {
        Ok(pending)
    }
    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(|| {})
    }
}
