//! Compiles `kernels/*.cu` into `sm_90a` cubins, embeds them, and records a kernel build id.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `nvcc` on `PATH`, then the
//! project's pinned toolchain (`.toolchain/nvidia/cu13/bin/nvcc`, made by
//! `tools/install-cuda-toolchain.sh`). With no nvcc (or `LOCKSTEP_NO_KERNELS=1`) the crate builds
//! with no kernels and prints one warning; GPU paths then report "built without kernels".
//!
//! Outputs in OUT_DIR: one `<name>.cubin` per kernel file, `ptxas-report.txt` (nvcc's
//! `-Xptxas -v` resource report, also embedded so `lockstep doctor --ptxas` can print it), and
//! `kernels.rs`, included by `src/cuda/embedded.rs`.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: &str = "sm_90a";
// Flags are part of the build id: two ranks built with different flags must not pass parity.
const NVCC_FLAGS: &[&str] = &[
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "-Xptxas",
    "-v",
    "--expt-relaxed-constexpr",
];

fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    if let Ok(path) = env::var("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = manifest.join(".toolchain/nvidia/cu13/bin/nvcc");
    p.is_file().then_some(p)
}

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for var in [
        "NVCC",
        "CUDA_HOME",
        "PATH",
        "LOCKSTEP_NO_KERNELS",
        "LOCKSTEP_NVCC_LINEINFO",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=.toolchain/nvidia/cu13/bin/nvcc");

    let kdir = manifest.join("kernels");
    let mut sources: Vec<PathBuf> = Vec::new();
    if let Ok(rd) = fs::read_dir(&kdir) {
        for e in rd.flatten() {
            let p = e.path();
            println!("cargo:rerun-if-changed={}", p.display());
            if p.extension().is_some_and(|x| x == "cu") {
                sources.push(p);
            }
        }
    }
    sources.sort();

    let disabled = env::var("LOCKSTEP_NO_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = if disabled { None } else { find_nvcc(&manifest) };
    let mut gen = String::new();
    let mut report = String::new();
    let mut entries = Vec::new();
    let mut build_id = fnv1a64(0xcbf2_9ce4_8422_2325, ARCH.as_bytes());
    let mut nvcc_version = String::new();

    match &nvcc {
        None => {
            println!(
                "cargo:warning=lockstep: no nvcc found (NVCC, CUDA_HOME, PATH, .toolchain); building WITHOUT kernels. Run tools/install-cuda-toolchain.sh to embed them."
            );
        }
        Some(nvcc) => {
            nvcc_version = Command::new(nvcc)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().find(|l| l.contains("release")).map(str::to_owned))
                .unwrap_or_default();
            // -lineinfo embeds the checkout's absolute path in the cubin, which would make the
            // build id depend on where the tree lives; opt in for profiling only.
            let mut flags: Vec<&str> = NVCC_FLAGS.to_vec();
            if env::var("LOCKSTEP_NVCC_LINEINFO").is_ok_and(|v| v == "1") {
                flags.push("-lineinfo");
            }
            for f in &flags {
                build_id = fnv1a64(build_id, f.as_bytes());
            }
            for src in &sources {
                let name = src
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .expect("kernel file name is UTF-8")
                    .to_owned();
                let cubin = out.join(format!("{name}.cubin"));
                let output = Command::new(nvcc)
                    .arg("-cubin")
                    .arg(format!("-arch={ARCH}"))
                    .args(&flags)
                    // Relative source paths from the manifest dir: -lineinfo embeds them in the
                    // cubin, and the build id must not depend on where the checkout lives.
                    .current_dir(&manifest)
                    .arg("-I")
                    .arg("kernels")
                    .arg("-o")
                    .arg(&cubin)
                    .arg(
                        Path::new("kernels").join(src.file_name().expect("kernel file has a name")),
                    )
                    .output()
                    .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
                let stderr = String::from_utf8_lossy(&output.stderr);
                if !output.status.success() {
                    panic!("nvcc failed on {}:\n{stderr}", src.display());
                }
                let _ = writeln!(report, "### {name}.cu\n{stderr}");
                let bytes = fs::read(&cubin).expect("nvcc wrote the cubin");
                build_id = fnv1a64(build_id, name.as_bytes());
                build_id = fnv1a64(build_id, &bytes);
                entries.push((name, cubin));
            }
        }
    }
    fs::write(out.join("ptxas-report.txt"), &report).expect("write ptxas report");

    let _ = writeln!(gen, "/// Embedded cubins: (kernel file stem, cubin bytes).");
    let _ = writeln!(gen, "pub const CUBINS: &[(&str, &[u8])] = &[");
    for (name, path) in &entries {
        let _ = writeln!(
            gen,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    let _ = writeln!(gen, "];");
    let id = if entries.is_empty() {
        "none".to_owned()
    } else {
        format!("{build_id:016x}")
    };
    let _ = writeln!(
        gen,
        "/// Hash of arch, nvcc flags and every cubin; \"none\" when built without kernels."
    );
    let _ = writeln!(gen, "pub const KERNEL_BUILD_ID: &str = {id:?};");
    let _ = writeln!(gen, "pub const KERNEL_ARCH: &str = {ARCH:?};");
    let _ = writeln!(gen, "pub const NVCC_VERSION: &str = {nvcc_version:?};");
    let _ = writeln!(
        gen,
        "pub const PTXAS_REPORT: &str = include_str!({:?});",
        out.join("ptxas-report.txt").display().to_string()
    );
    fs::write(out.join("kernels.rs"), gen).expect("write kernels.rs");
}
