//! lockstep: a streaming, chunk-by-chunk video diffusion transformer across GPUs — tensor
//! parallel inside a mesh, pipeline parallel between a driver rank and the mesh — under one rule:
//! every rank moves in lockstep, or the job crashes fast with a diagnosis. Never a hang.
//!
//! Start at `docs/architecture.md` for which module does what.
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cache;
pub mod comm;
pub mod cuda;
pub mod diag;
pub mod digest;
pub mod doctor;
pub mod error;
pub mod exit;
pub mod fault;
pub mod ffi;
pub mod fr;
pub mod ids;
pub mod launch;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod rank;
pub mod session;
pub mod spans;
pub mod torchrun;
pub mod wire;

pub use error::{Error, Result};

/// `eprintln!` for diagnoses: formats the whole line first and writes it with one `write`, so
/// lines from ranks that share a pipe (the launcher's stderr) never interleave mid-line.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::diag::line(&format!($($arg)*))
    };
}
