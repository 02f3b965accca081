//! NCCL data plane: raw NCCL loaded with `dlopen` (cudarc's `nccl::sys` types, our own function
//! table), device buffers and stream completion through cudarc's driver API.
//!
//! Layers (cudarc's habit): `api` (function table, error strings) → `comm` (`Communicator` RAII,
//! `AbortHandle`, `Tripwire`, abort-all), over the CUDA layer's `Gpu`, `DeviceBuf` and
//! `Completion` (`crate::cuda`: one GPU stack for NCCL, the kernels and the model).
//! `plane` is the NCCL backend of `comm::plane::DataPlane` (a rank bootstraps on it with
//! `rank::bootstrap_nccl`; this backend never names `rank`). The two-process transport benchmark
//! (`lockstep bench transport`) is tooling in the CLI binary: `src/bin/lockstep/bench/transport.rs`.
//!
//! Contract (details in each submodule):
//! - A missing or too-old libnccl is `Error::LibraryMissing`, never a panic. Lookup order:
//!   `$LOCKSTEP_NCCL_PATH`, `libnccl.so.2`, `libnccl.so`.
//! - Every NCCL call is checked and reported with NCCL's own string and code.
//! - "Returned Ok" means "enqueued on the stream" for blocking and non-blocking communicators
//!   alike (non-blocking: `ncclCommGetAsyncError` polled until `ncclSuccess`).
//! - Completion is seen per stream (`Completion`), never with a device-wide synchronize; every
//!   wait has a deadline and polls the async error.
//! - Abort is always reachable: `ncclCommAbort` when no thread is inside NCCL, a hard `_exit` with
//!   a diagnosis otherwise. Blocking init and teardown are bounded by a tripwire.
//! - No live communicator at exit: `Drop` finalizes/destroys or aborts; an `atexit` hook aborts
//!   what is left.
//!
//! Tripwires: two ranks of one communicator must not share a GPU; `ncclGroupStart/End` pairs are
//! per thread; a non-blocking call queried before it is enqueued looks complete with stale data.
pub mod api;
pub mod comm;
pub mod plane;

/// The GPU types are the CUDA layer's own (`crate::cuda`): re-exported so that NCCL users name
/// one set of types, not a second device layer.
pub use crate::cuda::{gpu_count, Completion, CompletionKind, DeviceBuf, Gate, Gpu, Ticket};
pub use comm::{
    abort_all_live, hard_exit, AbortHandle, CapturedOps, CommOptions, Communicator, ReduceDtype,
    ReduceElem, Tripwire, UniqueId, ABORT_GRACE,
};
pub use plane::{NcclComm, NcclPending, NcclPlane};

/// A group's NCCL communicator with this rank's GPU: what a model needs to sum its own device
/// buffers over the group on its own stream (`DataPlane::device_group`).
pub struct DeviceGroup<'a> {
    pub comm: &'a Communicator,
    pub gpu: &'a std::sync::Arc<Gpu>,
}

/// Why NCCL work cannot run here, or `None` when there are ≥ `gpus` GPUs and a usable NCCL.
/// Tests and benchmarks print this as their skip reason.
pub fn unavailable_reason(gpus: usize) -> Option<String> {
    match gpu_count() {
        Err(e) => return Some(format!("no CUDA driver: {e}")),
        Ok(n) if n < gpus => {
            return Some(format!("needs {gpus} GPUs, the driver shows {n}"));
        }
        Ok(_) => {}
    }
    match api::api() {
        Err(e) => Some(format!("no usable NCCL: {e}")),
        Ok(_) => None,
    }
}
