//! Stage 0 (driver) and Stage 1 (mesh) of the streaming pipeline, and `lockstep run`.
//!
//! Contract: `lockstep run` streams chunks through rank 0 + a TP mesh and ends by drain
//! (SHUTDOWN, exit 0) or by a crash with a diagnosis and the exit code of the failing rank's
//! error (`exit.rs`). Every wait is bounded by `--timeout`; rank 0 sends NOOP heartbeats when it
//! has sent nothing for `--heartbeat-ms`.
//!
//! Transport: this module is written against two small link traits (`DriverLink`,
//! `LeaderLink`) and the model's `TpComm`. Today `lockstep run` connects them in one process
//! (`inproc`: one thread per rank, channels); a vanished rank disconnects its channels, so its
//! peers fail with `PeerLost` at once instead of hanging. The multi-process wiring onto the
//! protocol core (`comm`, `wire`, `launch`) plugs in behind the same traits.
pub mod decode;
pub mod driver;
pub mod envelope;
pub mod faults;
pub mod inproc;
pub mod report;
pub mod stage0;
pub mod stage1;

use crate::Result;
use envelope::{ChunkResult, Envelope};
use std::path::PathBuf;
use std::time::Duration;

/// Stage 0's end of the `pp` link.
pub trait DriverLink: Send {
    fn send(&mut self, env: &Envelope) -> Result<()>;
    /// A result, or `None` when none arrived within `timeout` (zero = poll).
    fn recv_result(&mut self, timeout: Duration) -> Result<Option<ChunkResult>>;
}

/// The mesh leader's end of the `pp` link.
pub trait LeaderLink: Send {
    fn recv_envelope(&mut self, timeout: Duration) -> Result<Option<Envelope>>;
    fn send_result(&mut self, r: ChunkResult) -> Result<()>;
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GeneratorKind {
    /// The tiny Wan-style DiT on the CPU, TP-sharded.
    #[default]
    Dit,
    /// A calibrated cost per generator call and no math (overlap experiments, soak).
    Calibrated,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Chunks to stream.
    #[arg(long, default_value_t = 16)]
    pub chunks: u64,
    /// Tensor-parallel degree of the mesh (ranks 1..=TP).
    #[arg(long, default_value_t = 2)]
    pub tp: u32,
    /// Queue depth D (both D_in and D_out unless overridden).
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// D_in override.
    #[arg(long)]
    pub depth_in: Option<usize>,
    /// D_out override.
    #[arg(long)]
    pub depth_out: Option<usize>,
    /// Disable backpressure on D_out (E1 experiment only: the decode queue then grows).
    #[arg(long)]
    pub no_backpressure: bool,
    /// Hard cut after every N chunks of an epoch (0 = never).
    #[arg(long, default_value_t = 0)]
    pub hard_cut_every: u64,
    /// Recompute the sink frames every N chunks of an epoch (0 = never).
    #[arg(long, default_value_t = 4)]
    pub recompute_every: u32,
    /// Model preset (only `tiny` runs on the CPU).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Generator on the mesh.
    #[arg(long, value_enum, default_value_t = GeneratorKind::Dit)]
    pub generator: GeneratorKind,
    /// Cost per generator call of the calibrated generator, ms.
    #[arg(long, default_value_t = 5.0)]
    pub gen_cost_ms: f64,
    /// Extra busy-wait per decoded chunk on Stage 0, ms (calibrated-cost decoder).
    #[arg(long, default_value_t = 0.0)]
    pub decoder_cost_ms: f64,
    /// Write preview PNG frames here (default: none).
    #[arg(long)]
    pub frames_out: Option<PathBuf>,
    /// Write the run's metrics as JSON here.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write a Chrome/Perfetto trace here.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Weight seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bound on every wait (result, envelope, collective), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// NOOP heartbeat interval, ms.
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            chunks: 16,
            tp: 2,
            depth: 2,
            depth_in: None,
            depth_out: None,
            no_backpressure: false,
            hard_cut_every: 0,
            recompute_every: 4,
            preset: "tiny".into(),
            generator: GeneratorKind::Dit,
            gen_cost_ms: 5.0,
            decoder_cost_ms: 0.0,
            frames_out: None,
            metrics: None,
            trace: None,
            seed: 0,
            timeout: 10.0,
            heartbeat_ms: 200,
            quiet: false,
        }
    }
}

/// `lockstep run`: returns the process exit code.
pub fn main(args: &RunArgs) -> i32 {
    match inproc::run(args) {
        Ok(m) => {
            println!("{}", m.summary());
            crate::exit::ExitCode::Clean.code()
        }
        Err(f) => {
            eprintln!("{}", f.diagnosis());
            f.error.exit_code().code()
        }
    }
}
