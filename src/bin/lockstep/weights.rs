//! `lockstep weights`: save a preset's seeded weights, check a file against a preset, record a
//! trace for another implementation. The library part (names, shapes, loading, digest) is
//! `lockstep::model::weights`.
use lockstep::model::weights::{save_seeded, SaveDType, WeightFile};
use lockstep::model::DitConfig;
use lockstep::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct WeightsArgs {
    #[command(subcommand)]
    pub cmd: WeightsCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WeightsCmd {
    /// Write a preset's seeded random weights as a safetensors file (Wan's names and shapes).
    Save {
        /// Output file.
        out: PathBuf,
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Weight seed (the same as `lockstep run --seed`).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = SaveDType::F32)]
        dtype: SaveDType,
        /// Override the preset's layer count (e.g. a 2-layer `wan-1.3b` for checks).
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Check a weights file against a preset: names, shapes, dtypes; print its digest.
    Check {
        file: PathBuf,
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        layers: Option<usize>,
    },
    /// Record a stream's generator calls (inputs and outputs) on the CPU model with a weights
    /// file, for checking another implementation against it
    /// (`benches/baselines/wan_reference.py check`).
    Trace(lockstep::pipeline::trace::TraceArgs),
}

/// `weights check`: every problem on stderr (not truncated), the digest on stdout.
fn check_cmd(file: &Path, preset: &str, layers: Option<usize>) -> Result<()> {
    let cfg = DitConfig::preset(preset)?.with_layers(layers)?;
    let f = WeightFile::open(file)?;
    let issues = f.check(&cfg);
    for i in &issues {
        lockstep::diag!("  - {i}");
    }
    if !issues.is_empty() {
        return Err(Error::BadInput(format!(
            "weights {} do not fit preset {preset} ({} problems, listed above)",
            file.display(),
            issues.len()
        )));
    }
    println!(
        "{} fits preset {preset}: {} tensors, dtypes {}, {}",
        file.display(),
        f.tensor_count(),
        f.dtypes().join(","),
        f.digest()
    );
    Ok(())
}

/// `lockstep weights …`: returns the exit code.
pub fn main(args: &WeightsArgs) -> i32 {
    let r = match &args.cmd {
        WeightsCmd::Save {
            out,
            preset,
            seed,
            dtype,
            layers,
        } => DitConfig::preset(preset)
            .and_then(|cfg| cfg.with_layers(*layers))
            .and_then(|cfg| save_seeded(&cfg, *seed, *dtype, out))
            .and_then(|()| WeightFile::open(out))
            .map(|f| {
                println!(
                    "wrote {} ({} tensors, {:?}, preset {preset}, seed {seed}): {}",
                    out.display(),
                    f.tensor_count(),
                    dtype,
                    f.digest()
                )
            }),
        WeightsCmd::Check {
            file,
            preset,
            layers,
        } => check_cmd(file, preset, *layers),
        WeightsCmd::Trace(a) => lockstep::pipeline::trace::trace_cmd(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            let code = e.exit_code();
            lockstep::diag!(
                "lockstep weights: exit {} ({}): {e}",
                code.code(),
                code.name()
            );
            code.code()
        }
    }
}
