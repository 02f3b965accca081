//! Compiles `kernels/*.cu` into `sm_90a` cubins, embeds them, and records a kernel build id.
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `nvcc` on `PATH`, then the
//! project's pinned toolchain (`.toolchain/nvidia/cu13/bin/nvcc`, made by
//! `tools/install-cuda-toolchain.sh`). With no nvcc (or `LOCKSTEP_NO_KERNELS=1`) the crate builds
//! with no kernels and prints one warning; GPU paths then report "built without kernels".
//!
//! Outputs in OUT_DIR: one `<name>.cubin` per kernel file, `ptxas-report.txt` (nvcc's
//! `-Xptxas -v` resource report, also embedded so `lockstep doctor --ptxas` can print it),
//! `kernels.rs` and `kernel_consts.rs`, both included by `src/cuda/embedded.rs`.
//!
//! Kernel constants the host needs (tile sizes, threads per block, dynamic shared memory, TMA
//! boxes) have one source: `kernels/attention/tile_sizes.cuh`, which nvcc includes. This script
//! parses its `constexpr int NAME = <expr>;` lines (per namespace; expressions of integer
//! literals, earlier names, `+ - * / %` and parentheses, evaluated as C++ `int` would), emits
//! them as `pub const NAME: u32` in `kernel_consts.rs` (module per namespace), and hashes every
//! `namespace::NAME=value` into the kernel build id, so two ranks built with different tiles
//! fail the parity check even before their cubins are compared. The parse runs with or without
//! nvcc: the host code compiles against the same numbers either way.
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

/// The header whose `constexpr int` lines build.rs exports to Rust (see the module comment).
const CONSTS_HEADER: &str = "kernels/attention/tile_sizes.cuh";

/// `(namespace, [(name, value)])` in file order, from the `constexpr int NAME = EXPR;` lines
/// directly inside `namespace X { ... }` blocks of a kernel header. Any such line that does not
/// parse, names an unknown constant, divides by zero or leaves `0..=u32::MAX` is an error (the
/// build fails with the line), so the header cannot silently drift from what Rust sees.
type ConstGroups = Vec<(String, Vec<(String, i64)>)>;
fn parse_kernel_consts(text: &str) -> Result<ConstGroups, String> {
    let mut groups: ConstGroups = Vec::new();
    // Brace depth before the current line, and the depth of the open namespace's body.
    let mut depth = 0usize;
    let mut body: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("").trim();
        let at = || format!("{CONSTS_HEADER}:{}: {}", i + 1, raw.trim());
        if let Some(rest) = line.strip_prefix("namespace ") {
            if body.is_some() {
                return Err(format!("{}: nested namespace", at()));
            }
            groups.push((rest.trim_end_matches('{').trim().to_owned(), Vec::new()));
            body = Some(depth + 1);
        } else if let Some(rest) = line.strip_prefix("constexpr int ") {
            if body != Some(depth) {
                return Err(format!("{}: constant outside a namespace body", at()));
            }
            let (name, expr) = rest
                .strip_suffix(';')
                .and_then(|r| r.split_once('='))
                .ok_or_else(|| format!("{}: expected `constexpr int NAME = EXPR;`", at()))?;
            let name = name.trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("{}: bad constant name", at()));
            }
            let known = &groups.last().expect("inside a namespace").1;
            let value = eval_const_expr(expr, known).map_err(|e| format!("{}: {e}", at()))?;
            if !(0..=i64::from(u32::MAX)).contains(&value) {
                return Err(format!("{}: value {value} does not fit u32", at()));
            }
            groups
                .last_mut()
                .expect("inside a namespace")
                .1
                .push((name.to_owned(), value));
        }
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| format!("{}: unbalanced }}", at()))?;
                    if body.is_some_and(|b| depth < b) {
                        body = None;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(groups)
}

/// Evaluates `+ - * / %` with parentheses over integer literals and earlier names, with C++
/// `int` semantics (32-bit, division truncating toward zero).
fn eval_const_expr(expr: &str, known: &[(String, i64)]) -> Result<i64, String> {
    let mut toks: Vec<String> = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut t = String::new();
            while let Some(&d) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' {
                    t.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            toks.push(t);
        } else if "+-*/%()".contains(c) {
            toks.push(c.to_string());
            chars.next();
        } else {
            return Err(format!("unexpected {c:?} in {expr:?}"));
        }
    }
    struct P<'a> {
        toks: &'a [String],
        pos: usize,
        known: &'a [(String, i64)],
    }
    fn int(v: i64) -> Result<i64, String> {
        i32::try_from(v)
            .map(i64::from)
            .map_err(|_| format!("{v} overflows int"))
    }
    impl P<'_> {
        fn peek(&self) -> Option<&str> {
            self.toks.get(self.pos).map(String::as_str)
        }
        fn sum(&mut self) -> Result<i64, String> {
            let mut v = self.product()?;
            while let Some(op @ ("+" | "-")) = self.peek() {
                let add = op == "+";
                self.pos += 1;
                let r = self.product()?;
                v = int(if add { v + r } else { v - r })?;
            }
            Ok(v)
        }
        fn product(&mut self) -> Result<i64, String> {
            let mut v = self.atom()?;
            while let Some(op @ ("*" | "/" | "%")) = self.peek() {
                let op = op.to_owned();
                self.pos += 1;
                let r = self.atom()?;
                v = match op.as_str() {
                    "*" => int(v * r)?,
                    _ if r == 0 => return Err("division by zero".to_owned()),
                    "/" => v / r,
                    _ => v % r,
                };
            }
            Ok(v)
        }
        fn atom(&mut self) -> Result<i64, String> {
            let t = self.peek().ok_or("expression ends early")?.to_owned();
            self.pos += 1;
            if t == "(" {
                let v = self.sum()?;
                if self.peek() != Some(")") {
                    return Err("missing )".to_owned());
                }
                self.pos += 1;
                Ok(v)
            } else if t == "-" {
                Ok(-self.atom()?)
            } else if t.starts_with(|c: char| c.is_ascii_digit()) {
                t.parse::<i64>()
                    .map_err(|_| format!("bad integer {t:?}"))
                    .and_then(int)
            } else {
                self.known
                    .iter()
                    .find(|(n, _)| *n == t)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| format!("unknown name {t:?} (define it above, same namespace)"))
            }
        }
    }
    let mut p = P {
        toks: &toks,
        pos: 0,
        known,
    };
    let v = p.sum()?;
    if p.pos != toks.len() {
        return Err(format!("trailing tokens in {expr:?}"));
    }
    Ok(v)
}

/// Every file under `dir`, recursively (for rerun-if-changed).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                files_under(&p, out);
            } else {
                out.push(p);
            }
        }
    }
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
    let mut all_files = Vec::new();
    files_under(&kdir, &mut all_files);
    all_files.sort();
    for p in &all_files {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // Entry files are the top-level .cu files; headers (also under kernels/attention/) are
    // included by them.
    let sources: Vec<PathBuf> = all_files
        .iter()
        .filter(|p| p.parent() == Some(kdir.as_path()) && p.extension().is_some_and(|x| x == "cu"))
        .cloned()
        .collect();

    let consts_text = fs::read_to_string(manifest.join(CONSTS_HEADER))
        .unwrap_or_else(|e| panic!("read {CONSTS_HEADER}: {e}"));
    let consts = parse_kernel_consts(&consts_text).unwrap_or_else(|e| panic!("{e}"));
    let mut consts_rs = String::new();
    let _ = writeln!(
        consts_rs,
        "// Generated by build.rs from {CONSTS_HEADER} (the reasons for each number are there)."
    );
    for (ns, items) in &consts {
        let _ = writeln!(consts_rs, "/// `namespace {ns}` of `{CONSTS_HEADER}`.");
        let _ = writeln!(consts_rs, "pub mod {ns} {{");
        for (name, value) in items {
            let _ = writeln!(consts_rs, "    pub const {name}: u32 = {value};");
        }
        let _ = writeln!(consts_rs, "}}");
    }
    fs::write(out.join("kernel_consts.rs"), consts_rs).expect("write kernel_consts.rs");

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
            for (ns, items) in &consts {
                for (name, value) in items {
                    build_id = fnv1a64(build_id, format!("{ns}::{name}={value};").as_bytes());
                }
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
        "/// Hash of arch, nvcc flags, the exported kernel constants and every cubin; \"none\" when built without kernels."
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
