//! The data-plane trait: one interface, three backends (`host.rs`; `nccl/`, the folder, whose
//! `nccl/plane.rs` implements it; `null.rs` for protocol-cost benchmarks).
//!
//! Contract (shaped after NCCL so that backend fits without contortions):
//! - Buffers are backend-owned (`Buffer`: host `Vec<u8>`, NCCL device memory). An op takes its
//!   buffer **by value** and `wait` hands it back: no aliasing while an op is in flight. A buffer
//!   can be an envelope tensor's storage (`wire::Tensor<D::Buffer>`): device-resident envelopes
//!   travel without host staging.
//! - Stream order: a backend runs every op of a process on one stream (NCCL: `Gpu::stream`). A
//!   buffer handed to an op must have been produced on that stream or be complete (the caller
//!   synchronized, or a CUDA event on its producer stream was waited on by the plane's stream);
//!   when `wait` returns, the host has seen the op complete, so any stream may consume the buffer.
//! - Ops are **asynchronous**: they return a `Pending` at once (enqueued, like NCCL on a stream)
//!   and complete in issue order per communicator; `wait(pending, deadline)` bounds the wait.
//! - `group_start`/`group_end` bracket ops that must progress together (a send and a recv between
//!   the same pair, several tensors of one envelope).
//! - Matching is NCCL's: members must issue the same collectives in the same order with the same
//!   dtype/size/root. A mismatch **hangs** (the host backend parks until aborted); the
//!   collective wrapper's guards and the watchdog are what turn that into a crash.
//! - [`AbortHandle`] is `Send + Sync` and callable from the watchdog thread while another thread
//!   is blocked in `wait`; after an abort every pending and later op fails.
use super::spec::{GroupSpec, PeerTable};
use crate::error::Result;
use crate::ids::GroupRank;
use crate::wire::{DType, TensorBytes};
use std::sync::Arc;
use std::time::Instant;

/// Aborts a data plane from any thread (watchdog, signal thread, peer-failure reader).
#[derive(Clone)]
pub struct AbortHandle(Arc<dyn Fn() + Send + Sync>);

impl AbortHandle {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        AbortHandle(Arc::new(f))
    }
    pub fn abort(&self) {
        (self.0)()
    }
}

/// Where an envelope's tensor bytes live on their way **into** data plane `D`: host bytes are
/// uploaded (owned ones without a copy where the plane keeps host memory), a plane buffer goes
/// as it is. The envelope endpoint has one send path and one relay path over this, whichever side
/// of the PCIe bus the caller keeps its tensors.
pub trait IntoPlane<D: DataPlane>: TensorBytes {
    fn into_plane(self, plane: &D) -> Result<D::Buffer>;
}

/// Where an envelope's tensor bytes live on their way **out of** data plane `D`: moved to host
/// bytes (a download; none on the host plane), or kept in the plane's buffer.
pub trait FromPlane<D: DataPlane>: TensorBytes + Sized {
    fn from_plane(buf: D::Buffer, plane: &D) -> Result<Self>;
}

impl<D: DataPlane> IntoPlane<D> for Vec<u8> {
    fn into_plane(self, plane: &D) -> Result<D::Buffer> {
        plane.upload_owned(self)
    }
}

impl<D: DataPlane> IntoPlane<D> for &Vec<u8> {
    fn into_plane(self, plane: &D) -> Result<D::Buffer> {
        plane.upload(self)
    }
}

impl<D: DataPlane> FromPlane<D> for Vec<u8> {
    fn from_plane(buf: D::Buffer, plane: &D) -> Result<Self> {
        plane.take_host(buf)
    }
}

pub trait DataPlane: Send + Sync + Sized + 'static {
    /// Memory an op reads/writes (host: `Vec<u8>`; NCCL: device allocation). It can be an
    /// envelope tensor's storage as it is (device-resident envelopes).
    type Buffer: Send + TensorBytes + IntoPlane<Self> + FromPlane<Self> + 'static;
    /// One communicator (one per group this rank belongs to).
    type Comm: Send + Sync + 'static;
    /// An enqueued op.
    type Pending: Send + 'static;

    fn name(&self) -> &'static str;
    /// Called on world rank 0 for every group in creation order; the rendezvous ships the blob to
    /// every member (NCCL: the unique id; host: empty).
    fn bootstrap_blob(&self, spec: &GroupSpec) -> Result<Vec<u8>>;
    /// Creates this rank's communicator for `spec`; `deadline` bounds the wait for peers.
    fn create_comm(
        &self,
        spec: &GroupSpec,
        me: GroupRank,
        blob: &[u8],
        peers: &PeerTable,
        deadline: Instant,
    ) -> Result<Self::Comm>;
    /// Destroys a communicator (may hang on NCCL: the watchdog stays armed around it).
    fn destroy_comm(&self, comm: Self::Comm) -> Result<()>;

    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;
    fn upload(&self, host: &[u8]) -> Result<Self::Buffer>;
    /// [`DataPlane::upload`] of bytes the caller gives up (the host backend keeps them as they
    /// are). Default: `upload`.
    fn upload_owned(&self, host: Vec<u8>) -> Result<Self::Buffer> {
        self.upload(&host)
    }
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<u8>>;
    /// Moves a buffer's bytes to the host, consuming it (host backend: no copy).
    fn take_host(&self, buf: Self::Buffer) -> Result<Vec<u8>> {
        self.download(&buf)
    }
    /// The buffer as GPU memory a model on this rank's GPU can read in place (NCCL: it is one),
    /// or the buffer back when this plane's buffers live on the host.
    fn take_device(
        buf: Self::Buffer,
    ) -> std::result::Result<crate::cuda::device::DeviceBuf, Self::Buffer> {
        Err(buf)
    }
    /// GPU memory as this plane's buffer (NCCL: it is one), or back when the plane's buffers
    /// live on the host.
    fn from_device(
        buf: crate::cuda::device::DeviceBuf,
    ) -> std::result::Result<Self::Buffer, crate::cuda::device::DeviceBuf> {
        Err(buf)
    }
    /// Whether this plane's buffers are GPU memory (`take_device`/`from_device` succeed).
    const DEVICE_BUFFERS: bool = false;
    /// A buffer of `bytes` whose contents the next op overwrites (a receive target): backends
    /// may skip zeroing it. Default: `alloc`.
    fn alloc_for_recv(&self, bytes: usize) -> Result<Self::Buffer> {
        self.alloc(bytes)
    }
    fn buffer_len(&self, buf: &Self::Buffer) -> usize;
    /// The plane's communicator for a model's own device buffers (NCCL: the group's
    /// `Communicator` and this rank's GPU), so that the GPU model sums its partials on its own
    /// stream with no host crossing. `None` (the default, host planes): the model stages its
    /// sums through the host and the plane's ordinary collectives.
    fn device_group<'a>(
        &'a self,
        _comm: &'a Self::Comm,
    ) -> Option<crate::comm::nccl::DeviceGroup<'a>> {
        None
    }

    fn send(&self, comm: &Self::Comm, buf: Self::Buffer, peer: GroupRank) -> Result<Self::Pending>;
    fn recv(&self, comm: &Self::Comm, buf: Self::Buffer, peer: GroupRank) -> Result<Self::Pending>;
    fn all_reduce_sum(
        &self,
        comm: &Self::Comm,
        buf: Self::Buffer,
        dtype: DType,
    ) -> Result<Self::Pending>;
    fn broadcast(
        &self,
        comm: &Self::Comm,
        buf: Self::Buffer,
        root: GroupRank,
    ) -> Result<Self::Pending>;
    /// `recv` must hold `group size × len(send)` bytes; completes with `recv`.
    fn all_gather(
        &self,
        comm: &Self::Comm,
        send: Self::Buffer,
        recv: Self::Buffer,
    ) -> Result<Self::Pending>;

    fn group_start(&self, comm: &Self::Comm) -> Result<()>;
    fn group_end(&self, comm: &Self::Comm) -> Result<()>;

    /// True when the op has completed (or failed: then `wait` returns the error).
    fn poll(&self, pending: &Self::Pending) -> bool;
    /// Waits until the op completes or `deadline` passes (→ `Error::Timeout`).
    fn wait(&self, pending: Self::Pending, deadline: Instant) -> Result<Self::Buffer>;

    fn abort_handle(&self) -> AbortHandle;
}
