//! CUDA layer — the crate's one GPU stack: library presence checks (`probe`, the loader layer),
//! checked wrappers that keep CUDA's own error string (`context::cuda_err`), and the safe types
//! (`context::Gpu` with its stream and kernels, `device::{DeviceBuf, Completion, Gate}`,
//! pinned staging in the model); then typed kernel launches (`attention`, `kv_cache`,
//! `dit_ops`) and cuBLASLt (`gemm`). The NCCL layer (`comm::nccl`) and the model take these
//! same types. cudarc (dynamic loading) is the driver binding; it panics if a library is absent,
//! so every entry point here checks presence first (`probe`) and returns `Error::LibraryMissing`.
pub mod attention;
pub mod context;
pub mod device;
pub mod dit_ops;
pub mod embedded;
pub mod gemm;
pub mod kv_cache;
pub mod probe;

pub use context::Gpu;
pub use device::{gpu_count, Completion, CompletionKind, DeviceBuf, Gate, Ticket};
