//! Stage 0 (driver) and Stage 1 (mesh) of the streaming pipeline, and `lockstep run`.
//!
//! Contract: `lockstep run` launches rank 0 + a TP mesh as separate local processes (through
//! the protocol's launcher), each rank bootstraps with `Rank::bootstrap_host` (rendezvous →
//! parity, with the pipeline's settings in the fingerprint → groups → watchdog), streams chunks,
//! and the run ends by drain (SHUTDOWN, every rank exits 0) or by a crash with the failing
//! rank's diagnosis and exit code (`exit.rs`). Every wait is bounded by `--timeout`; rank 0
//! sends NOOP heartbeats through the protocol when it has sent nothing for `--heartbeat-ms`.
//!
//! Transport: the stage code is written against two small link traits (`DriverLink`,
//! `MeshLink`) and the model's `TpComm`; `ranks` implements them over the protocol's `Rank`
//! (envelopes = `wire::PreparedEnvelope` on the control plane + `pp` group, relay and TP
//! collectives on the `mesh` group's guarded, recorded collective wrapper). There is no
//! in-process transport: the break-it tests, E2 and the soak run the real processes.
pub mod conditioning;
pub mod decode;
pub mod driver;
pub mod envelope;
pub mod ranks;
pub mod report;
pub mod stage0;
pub mod stage1;
pub mod trace;

use crate::cuda::device::DeviceBuf;
use crate::ids::CallId;
use crate::wire::{
    EnvelopeIds, HostTensor, PreparedEnvelope, ReceivedEnvelope, Tensor, TensorBytes,
};
use crate::Result;
use stage1::ChunkLatent;
use std::path::PathBuf;
use std::time::Duration;

/// Builds the envelope for the call_id the link allocates.
pub type MakeEnvelope<'a> = Box<dyn FnOnce(EnvelopeIds) -> Result<PreparedEnvelope> + 'a>;

/// Stage 0's end of the `pp` link.
pub trait DriverLink {
    /// Sends the envelope `make` prepares for the next call_id (allocated by the link, shared
    /// with NOOP heartbeats); returns that call_id. A preflight error sends nothing.
    fn send_next(&mut self, make: MakeEnvelope<'_>) -> Result<CallId>;
    /// Sends an already prepared envelope as is (fault injection: duplicates, regressions).
    fn send_again(&mut self, env: &PreparedEnvelope) -> Result<()>;
    /// The next envelope from the mesh leader, or `None` when none arrived within `timeout`
    /// (zero = poll).
    fn recv(&mut self, timeout: Duration) -> Result<Option<ReceivedEnvelope>>;
    /// Stops heartbeats and sends SHUTDOWN (drain).
    fn shutdown(&mut self) -> Result<CallId>;
}

/// A mesh rank's view of the protocol. Envelopes stay in the data plane's buffers (`Buf`:
/// host bytes on the host plane, GPU memory on NCCL) until Stage 1 asks for host bytes
/// (`to_host`) or takes a buffer as GPU memory (`take_device`).
pub trait MeshLink {
    /// Where a received envelope's tensor bytes live.
    type Buf: TensorBytes;
    /// Leader only: the next envelope rank 0 sent that acceptance let through (duplicates are
    /// dropped, regressions and gaps are errors), or `None` after `timeout`.
    fn recv_envelope(&mut self, timeout: Duration) -> Result<Option<ReceivedEnvelope<Self::Buf>>>;
    /// Leader only: a RESULT to rank 0.
    fn send_result(&mut self, env: PreparedEnvelope<Self::Buf>) -> Result<()>;
    /// Leader only: a buffer of `bytes` on this rank's GPU for a device-resident RESULT, when
    /// the plane's buffers are GPU memory (`None`: results leave as host bytes).
    fn result_buffer(&self, bytes: usize) -> Result<Option<DeviceBuf>>;
    /// The chunk's latent as the plane's buffer for its RESULT (host f32 bytes uploaded, or the
    /// device buffer as it is).
    fn result_storage(&self, latent: ChunkLatent) -> Result<Self::Buf>;
    /// The leader passes the envelope it accepted and gets it back once the mesh has it;
    /// followers pass `None` and get the same one.
    fn relay(
        &mut self,
        env: Option<ReceivedEnvelope<Self::Buf>>,
    ) -> Result<ReceivedEnvelope<Self::Buf>>;
    /// A tensor's bytes on the host (a download when the plane's buffers are GPU memory).
    fn to_host(&self, t: Tensor<Self::Buf>) -> Result<HostTensor>;
    /// The buffer as GPU memory of this rank's GPU, or back when it lives on the host.
    fn take_device(&self, buf: Self::Buf) -> std::result::Result<DeviceBuf, Self::Buf>;
    /// Duplicates acceptance dropped so far (leader).
    fn duplicates_dropped(&self) -> u64;
    /// Names the phase the next ops belong to (flight-recorder context).
    fn set_phase(&mut self, _phase: &'static str) {}
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GeneratorKind {
    /// The tiny Wan-style DiT on the CPU, TP-sharded.
    #[default]
    Dit,
    /// A calibrated cost per generator call and no math (overlap experiments, soak).
    Calibrated,
    /// The DiT on a GPU (`model::gpu`: our kernels + cuBLASLt, bf16), TP=1. The default for
    /// the Wan presets when the build has kernels and a GPU is visible.
    Gpu,
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
    /// Write the preview decoder's frames as a Y4M video here (besides any PNGs).
    #[arg(long)]
    pub video_out: Option<PathBuf>,
    /// Write the run's metrics as JSON here.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write a Chrome/Perfetto trace here: per rank, Stage 0's steps, each generator call and
    /// each TP collective (docs/manual/tracing.md).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Weight seed (also seeds the noise and the prompt).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The prompt as a text encoder's output: a safetensors file holding `[text_tokens,
    /// text_dim]` (f32, f16 or bf16; its only tensor, or `--conditioning-tensor`). Its values go
    /// to every mesh rank, whose model embeds them. Default: text features from the seed.
    #[arg(long)]
    pub conditioning: Option<PathBuf>,
    /// Which tensor of the `--conditioning` file, when it holds several.
    #[arg(long, requires = "conditioning")]
    pub conditioning_tensor: Option<String>,
    /// DiT weights from this safetensors file (Wan's names; memory-mapped, each mesh rank reads
    /// its TP shard) instead of seeded random weights. `lockstep weights save` writes one.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Bound on every wait (result, envelope, collective), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// NOOP heartbeat interval, ms.
    #[arg(long, default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Data plane of the ranks: host or nccl (default: `LOCKSTEP_BACKEND`, else host).
    #[arg(long)]
    pub backend: Option<String>,
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
            video_out: None,
            metrics: None,
            trace: None,
            seed: 0,
            conditioning: None,
            conditioning_tensor: None,
            weights: None,
            timeout: 10.0,
            heartbeat_ms: 200,
            quiet: false,
            backend: None,
        }
    }
}

/// `lockstep run`: returns the process exit code. With `RANK` in the environment this process
/// is one rank of a run (started by the launcher, or by torchrun/Slurm); otherwise it launches
/// the ranks and reports.
pub fn main(args: &RunArgs) -> i32 {
    if std::env::var_os("RANK").is_some() {
        ranks::rank_main(args)
    } else {
        ranks::launch_run(args)
    }
}
