//! CUDA layer: embedded kernels, library presence checks, context/streams/events, typed kernel
//! launches. cudarc (dynamic loading) is the driver binding; it panics if a library is absent,
//! so every entry point here checks presence first (`probe`) and returns `Error::LibraryMissing`.
pub mod attention;
pub mod context;
pub mod dit_ops;
pub mod embedded;
pub mod gemm;
pub mod kv_cache;
pub mod probe;
