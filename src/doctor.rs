//! `lockstep doctor`: what this machine has (kernels, CUDA driver, GPUs, NCCL) and, for each
//! missing piece, what to do about it. Never panics on a missing library.
use crate::cuda::{embedded, probe};
use serde::Serialize;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print nvcc's ptxas resource report of the embedded kernels (used by the spill check).
    #[arg(long)]
    pub ptxas: bool,
    /// Exit non-zero if any embedded kernel spills registers.
    #[arg(long)]
    pub deny_spills: bool,
}

#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub count: usize,
    pub files: Vec<String>,
    pub arch: &'static str,
    pub build_id: &'static str,
    pub nvcc_version: &'static str,
    pub spills: Vec<(String, u64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub lockstep_version: &'static str,
    pub kernels: KernelReport,
    pub driver: Result<probe::DriverInfo, String>,
    pub nccl: Result<probe::NcclInfo, String>,
    /// cuBLASLt (the GPU model's GEMMs): the library found, or why not.
    pub cublaslt: Result<String, String>,
    /// The envelope lane rank 0 would offer on this host: `shm` (a ring file in /dev/shm could
    /// be created) or why not.
    pub lane: Result<&'static str, String>,
    /// What to do about each missing piece.
    pub advice: Vec<String>,
}

pub fn report() -> DoctorReport {
    let kernels = KernelReport {
        count: embedded::CUBINS.len(),
        files: embedded::CUBINS
            .iter()
            .map(|(n, _)| format!("{n}.cu"))
            .collect(),
        arch: embedded::KERNEL_ARCH,
        build_id: embedded::KERNEL_BUILD_ID,
        nvcc_version: embedded::NVCC_VERSION,
        spills: embedded::spills(),
    };
    let driver = probe::driver_info().map_err(|e| e.to_string());
    let nccl = probe::nccl_info().map_err(|e| e.to_string());
    let cublaslt =
        probe::Library::open_first("cuBLASLt", &cudarc::get_lib_name_candidates("cublasLt"))
            .map(|l| l.path)
            .map_err(|e| e.to_string());
    let lane = lane_check();
    let mut advice = Vec::new();
    if let Err(e) = &lane {
        advice.push(format!(
            "envelope lane falls back to TCP ({e}): headers cost a few µs more per hop"
        ));
    }
    if kernels.count == 0 {
        advice.push("no kernels embedded: run tools/install-cuda-toolchain.sh (or set NVCC / CUDA_HOME), then rebuild".to_owned());
    }
    if !kernels.spills.is_empty() {
        advice.push(
            "some kernels spill registers (see `lockstep doctor --ptxas`): retune tiles".to_owned(),
        );
    }
    match &driver {
        Err(_) => advice.push(
            "no CUDA driver: GPU paths are unavailable; `lockstep run` uses the host backend"
                .to_owned(),
        ),
        Ok(d) if d.gpus.is_empty() => advice
            .push("CUDA driver loaded but no GPU visible: check CUDA_VISIBLE_DEVICES".to_owned()),
        Ok(d) => {
            if d.gpus.iter().any(|g| g.compute_capability != (9, 0)) {
                advice.push("kernels are built for sm_90a (Hopper); GPUs of other architectures cannot load them".to_owned());
            }
        }
    }
    if cublaslt.is_err() {
        advice.push("no cuBLASLt: the GPU model cannot run (install the CUDA runtime libraries, e.g. libcublas, or put libcublasLt.so on LD_LIBRARY_PATH)".to_owned());
    }
    if nccl.is_err() {
        advice.push("no NCCL: install libnccl2 or set LOCKSTEP_NCCL_PATH=/path/to/libnccl.so.2 (the host backend still works)".to_owned());
    }
    DoctorReport {
        lockstep_version: env!("CARGO_PKG_VERSION"),
        kernels,
        driver,
        nccl,
        cublaslt,
        lane,
        advice,
    }
}

/// Whether this host can carry the envelope lane over shared memory: `LOCKSTEP_LANE` allows it
/// and a ring file can be created (and is removed again) in /dev/shm.
fn lane_check() -> Result<&'static str, String> {
    if !crate::comm::lane::want_shm().map_err(|e| e.to_string())? {
        return Err("LOCKSTEP_LANE=tcp".into());
    }
    let dir = std::path::Path::new(crate::comm::lane::SHM_DIR);
    let (_ring, path) =
        crate::comm::lane::ShmRing::create(dir, "doctor").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    Ok("shm")
}

fn human(r: &DoctorReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "lockstep {}", r.lockstep_version);
    let k = &r.kernels;
    if k.count == 0 {
        let _ = writeln!(s, "kernels : none (built without kernels)");
    } else {
        let _ = writeln!(
            s,
            "kernels : {} files [{}], arch {}, build id {}",
            k.count,
            k.files.join(", "),
            k.arch,
            k.build_id
        );
        let _ = writeln!(s, "nvcc    : {}", k.nvcc_version);
        let _ = writeln!(
            s,
            "spills  : {}",
            if k.spills.is_empty() {
                "none".to_owned()
            } else {
                format!("{:?}", k.spills)
            }
        );
    }
    match &r.driver {
        Ok(d) => {
            let _ = writeln!(
                s,
                "driver  : {} (CUDA {}.{})",
                d.library,
                d.driver_version / 1000,
                (d.driver_version % 1000) / 10
            );
            for g in &d.gpus {
                let _ = writeln!(
                    s,
                    "gpu {}   : {}, sm_{}{}, {:.1} GiB",
                    g.index,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.memory_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "driver  : unavailable ({e})");
        }
    }
    match &r.nccl {
        Ok(n) => {
            let _ = writeln!(
                s,
                "nccl    : {} (version {}.{}.{})",
                n.library,
                n.version / 10000,
                (n.version / 100) % 100,
                n.version % 100
            );
        }
        Err(e) => {
            let _ = writeln!(s, "nccl    : unavailable ({e})");
        }
    }
    match &r.cublaslt {
        Ok(p) => {
            let _ = writeln!(s, "cublaslt: {p}");
        }
        Err(e) => {
            let _ = writeln!(s, "cublaslt: unavailable ({e})");
        }
    }
    match &r.lane {
        Ok(t) => {
            let _ = writeln!(
                s,
                "lane    : {t} (envelope headers over shared-memory rings)"
            );
        }
        Err(e) => {
            let _ = writeln!(s, "lane    : tcp ({e})");
        }
    }
    for a in &r.advice {
        let _ = writeln!(s, "advice  : {a}");
    }
    s
}

/// Runs `lockstep doctor`; returns the process exit code.
pub fn main(args: &DoctorArgs) -> i32 {
    if args.ptxas {
        print!("{}", embedded::PTXAS_REPORT);
    }
    let r = report();
    if args.json {
        match serde_json::to_string_pretty(&r) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                crate::diag!("doctor: cannot serialize report: {e}");
                return crate::exit::ExitCode::BadInput.code();
            }
        }
    } else if !args.ptxas {
        print!("{}", human(&r));
    }
    if args.deny_spills && !r.kernels.spills.is_empty() {
        crate::diag!("doctor: register spills in {:?}", r.kernels.spills);
        return crate::exit::ExitCode::DeviceError.code();
    }
    0
}
