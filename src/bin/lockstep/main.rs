//! The `lockstep` command line: run, launch, doctor, bench, fr, weights. The runtime's
//! subcommands (run, launch, doctor, fr) live in the library module that owns them; the tooling
//! (benchmarks, the protocol harness of the break-it tests, the weights tools) lives beside this
//! file, outside the library. This file only dispatches.
mod bench;
mod harness;
mod weights;

// The benchmarks under `bench/` were library modules and keep their `crate::…` paths (`crate::cuda`,
// `crate::diag!`, `crate::{Error, Result}`, …): they name the library's items through these imports.
use lockstep::{cache, comm, cuda, diag, ids, model, Error, Result};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lockstep",
    version,
    about = "Streaming video DiT across GPUs, in lockstep or crashing with a diagnosis"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Stream chunks through the whole pipeline, launching local ranks (default: tiny preset,
    /// host backend, rank 0 + TP=2).
    Run(Box<lockstep::pipeline::RunArgs>),
    /// Launch N local ranks of a command with the torchrun-style environment.
    Launch(lockstep::launch::LaunchArgs),
    /// What this machine has: kernels, CUDA driver, GPUs, NCCL.
    Doctor(lockstep::doctor::DoctorArgs),
    /// Benchmarks (kernels, transport, wire).
    Bench(bench::BenchArgs),
    /// Flight-recorder tools: `fr analyze DIR`, `fr dump PID…`.
    Fr(lockstep::fr::FrArgs),
    /// DiT weights files: `weights save FILE` (a preset's seeded weights as safetensors),
    /// `weights check FILE` (names, shapes, dtypes, digest).
    Weights(weights::WeightsArgs),
    /// Multi-process protocol harness used by the break-it tests.
    #[command(hide = true)]
    Harness(harness::HarnessArgs),
}

fn main() {
    // A command line that does not parse is bad input (exit 74, like every other refusal of
    // input), not clap's usage code 2; --help and --version still print and exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            std::process::exit(lockstep::exit::ExitCode::BadInput.code());
        }
        Err(e) => e.exit(),
    };
    let code = match cli.cmd {
        None => lockstep::pipeline::main(&lockstep::pipeline::RunArgs::default()),
        Some(Cmd::Run(a)) => lockstep::pipeline::main(&a),
        Some(Cmd::Launch(a)) => lockstep::launch::main(&a),
        Some(Cmd::Doctor(a)) => lockstep::doctor::main(&a),
        Some(Cmd::Bench(a)) => bench::main(&a),
        Some(Cmd::Fr(a)) => lockstep::fr::main(&a),
        Some(Cmd::Harness(a)) => harness::main(&a),
        Some(Cmd::Weights(a)) => weights::main(&a),
    };
    std::process::exit(code);
}
