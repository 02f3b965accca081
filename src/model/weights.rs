//! The DiT's weights: seeded random, or a safetensors file with Wan's parameter names, memory-
//! mapped and sliced per TP rank (docs/spec.md §11).
//!
//! Contract:
//! - `param_specs` is the one list of the model's parameters: Wan's names
//!   (`blocks.{i}.self_attn.q.weight`, …) and Wan's shapes (`patch_embedding.weight` is the
//!   Conv3d kernel `[dim, C, 1, 2, 2]`, `blocks.{i}.modulation` is `[1, 6, dim]`), plus the seeded
//!   init of each. `DitShard` builds itself from a `WeightSource` over these names, so the seeded
//!   model and a file saved from it (`save_seeded`) are the same function, bit for bit in f32.
//! - `WeightFile` maps the file (no read into memory) and checks it against the preset before
//!   anything else uses it: every expected name present with the expected shape, no unexpected
//!   name, dtype in {f32, bf16, f16}. Every problem is reported at once, as typed `WeightIssue`s
//!   naming the tensor (expected vs found shape), in a `BadInput` error (exit 74).
//! - Sharding reads only the rank's slice from the map: rows of a column-parallel weight are one
//!   contiguous byte range, columns of a row-parallel weight one range per row. No rank converts
//!   the full tensor of a sharded weight.
//! - `WeightsDigest` identifies the weights for the parity fingerprint: FNV-1a over the tensor
//!   table (names, dtypes, shapes, offsets, in name order; the free-form `__metadata__` is left
//!   out) and over every data byte when the data is at most `FULL_DIGEST_LIMIT`; above that
//!   over the table plus `SAMPLES_PER_TENSOR` evenly spaced windows of every tensor (a different
//!   file or checkpoint shows; a flipped byte between windows may not — this is a tripwire for
//!   mixed-up files, not an integrity check).
//!
//! Tripwires: the map is read-only and shared with the page cache; a file truncated or rewritten
//! while mapped can fault the process (SIGBUS), so never rewrite a weights file under a running
//! job — write a new file and point the job at it.
use super::ops::gen;
use super::DitConfig;
use crate::digest::Fnv64;
use crate::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Data at most this large is digested in full.
pub const FULL_DIGEST_LIMIT: usize = 64 << 20;
/// Windows per tensor sampled into the digest of a larger file.
pub const SAMPLES_PER_TENSOR: usize = 16;
const SAMPLE_BYTES: usize = 256;

/// The seeded init of a tensor: `offset + U[-scale, scale)` from `(seed, name)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Init {
    pub offset: f32,
    pub scale: f32,
}

/// One parameter of the DiT.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every parameter of the DiT for `cfg`, with Wan's names and shapes, in a stable order.
pub fn param_specs(cfg: &DitConfig) -> Vec<ParamSpec> {
    let d = cfg.dim;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, offset: f32, scale: f32| {
        out.push(ParamSpec {
            name,
            shape,
            init: Init { offset, scale },
        })
    };
    // A linear `[d_out, d_in]` (weight shape given, so the patch embedding keeps Wan's conv
    // kernel shape) with its bias.
    let linear =
        |push: &mut dyn FnMut(String, Vec<usize>, f32, f32), name: &str, shape: Vec<usize>| {
            let d_out = shape[0];
            let d_in: usize = shape[1..].iter().product();
            push(
                format!("{name}.weight"),
                shape,
                0.0,
                1.0 / (d_in as f32).sqrt(),
            );
            push(format!("{name}.bias"), vec![d_out], 0.0, 0.02);
        };
    let c = cfg.latent_channels;
    linear(&mut push, "patch_embedding", vec![d, c, 1, 2, 2]);
    linear(&mut push, "text_embedding.0", vec![d, cfg.text_dim]);
    linear(&mut push, "text_embedding.2", vec![d, d]);
    linear(&mut push, "time_embedding.0", vec![d, cfg.freq_dim]);
    linear(&mut push, "time_embedding.2", vec![d, d]);
    linear(&mut push, "time_projection.1", vec![6 * d, d]);
    for i in 0..cfg.layers {
        let p = |s: &str| format!("blocks.{i}.{s}");
        push(p("modulation"), vec![1, 6, d], 0.0, 0.1);
        for attn in ["self_attn", "cross_attn"] {
            for proj in ["q", "k", "v", "o"] {
                linear(&mut push, &p(&format!("{attn}.{proj}")), vec![d, d]);
            }
            push(p(&format!("{attn}.norm_q.weight")), vec![d], 1.0, 0.1);
            push(p(&format!("{attn}.norm_k.weight")), vec![d], 1.0, 0.1);
        }
        push(p("norm3.weight"), vec![d], 1.0, 0.1);
        push(p("norm3.bias"), vec![d], 0.0, 0.02);
        linear(&mut push, &p("ffn.0"), vec![cfg.ffn_dim, d]);
        linear(&mut push, &p("ffn.2"), vec![d, cfg.ffn_dim]);
    }
    push("head.modulation".into(), vec![1, 2, d], 0.0, 0.1);
    linear(&mut push, "head.head", vec![cfg.in_dim(), d]);
    out
}

/// Where a `DitShard` gets its weights. Every tensor is viewed as `[shape[0], rest]` (a 1-D
/// tensor as `[n, 1]`), row-major.
pub trait WeightSource {
    /// All of tensor `name`.
    fn full(&self, name: &str) -> Result<Vec<f32>>;
    /// Rows `lo..hi` (column-parallel shard; of a 1-D tensor: elements `lo..hi`).
    fn rows(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>>;
    /// Columns `lo..hi` of every row (row-parallel shard).
    fn cols(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>>;
    /// The weight seed, for seeded weights.
    fn seed(&self) -> Option<u64> {
        None
    }
}

fn row_len(shape: &[usize]) -> usize {
    shape.iter().skip(1).product()
}

fn check_range(name: &str, what: &str, lo: usize, hi: usize, n: usize) -> Result<()> {
    if lo > hi || hi > n {
        return Err(Error::Invariant(format!(
            "weight {name}: {what} {lo}..{hi} out of 0..{n}"
        )));
    }
    Ok(())
}

/// Random weights from a seed (the same values `DitShard::random` always had).
pub struct SeededWeights {
    seed: u64,
    specs: HashMap<String, ParamSpec>,
}

impl SeededWeights {
    pub fn new(cfg: &DitConfig, seed: u64) -> Self {
        Self {
            seed,
            specs: param_specs(cfg)
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        }
    }

    fn spec(&self, name: &str) -> Result<&ParamSpec> {
        self.specs
            .get(name)
            .ok_or_else(|| Error::Invariant(format!("the DiT has no parameter {name}")))
    }
}

/// The seeded values of one parameter.
fn seeded(seed: u64, s: &ParamSpec) -> Vec<f32> {
    let v = gen(seed, &s.name, s.numel(), s.init.scale);
    if s.init.offset == 0.0 {
        v
    } else {
        v.into_iter().map(|x| s.init.offset + x).collect()
    }
}

impl WeightSource for SeededWeights {
    fn full(&self, name: &str) -> Result<Vec<f32>> {
        Ok(seeded(self.seed, self.spec(name)?))
    }
    fn rows(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let s = self.spec(name)?;
        check_range(name, "rows", lo, hi, s.shape[0])?;
        let rl = row_len(&s.shape);
        Ok(seeded(self.seed, s)[lo * rl..hi * rl].to_vec())
    }
    fn cols(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let s = self.spec(name)?;
        let rl = row_len(&s.shape);
        check_range(name, "columns", lo, hi, rl)?;
        Ok(seeded(self.seed, s)
            .chunks_exact(rl.max(1))
            .flat_map(|r| r[lo..hi].iter().copied())
            .collect())
    }
    fn seed(&self) -> Option<u64> {
        Some(self.seed)
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

/// Element types a weights file may hold (converted to f32 for the CPU model).
pub const ALLOWED_DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::BF16, Dtype::F16];

/// One thing wrong with a weights file for a preset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightIssue {
    Missing {
        name: String,
        expected: Vec<usize>,
    },
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    DType {
        name: String,
        dtype: String,
    },
    Unexpected {
        name: String,
        shape: Vec<usize>,
    },
}

impl fmt::Display for WeightIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightIssue::Missing { name, expected } => {
                write!(f, "missing tensor {name} (expected shape {expected:?})")
            }
            WeightIssue::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "tensor {name} has shape {found:?}, expected {expected:?}"
            ),
            WeightIssue::DType { name, dtype } => write!(
                f,
                "tensor {name} has dtype {dtype}, allowed: F32, BF16, F16"
            ),
            WeightIssue::Unexpected { name, shape } => {
                write!(f, "unexpected tensor {name} (shape {shape:?})")
            }
        }
    }
}

/// What identifies a weights file across ranks (see the module contract for what it covers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsDigest {
    pub fnv64: u64,
    /// Every data byte was hashed (else sampled windows).
    pub full: bool,
    pub file_bytes: u64,
}

impl fmt::Display for WeightsDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fnv64 {:016x} ({}, {} bytes)",
            self.fnv64,
            if self.full {
                "tensor table + all data"
            } else {
                "tensor table + sampled data"
            },
            self.file_bytes
        )
    }
}

#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file.
pub struct WeightFile {
    path: PathBuf,
    map: Mmap,
    header_end: usize,
    tensors: BTreeMap<String, Entry>,
    digest: WeightsDigest,
}

impl fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("digest", &self.digest)
            .finish()
    }
}

impl WeightFile {
    /// Maps and parses `path` (header and offsets only; no tensor data is read except what the
    /// digest covers).
    pub fn open(path: &Path) -> Result<Self> {
        // What the user named must be a readable regular file: a missing path, a directory or
        // a FIFO (whose open would block forever) is bad input (exit 74), said before opening.
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::BadInput(format!("weights {}: {e}", path.display())))?;
        if !meta.is_file() {
            let kind = if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file (a FIFO, socket or device)"
            };
            return Err(Error::BadInput(format!(
                "weights {} is {kind}; give a .safetensors file",
                path.display()
            )));
        }
        let file = std::fs::File::open(path)
            .map_err(|e| Error::BadInput(format!("opening weights {}: {e}", path.display())))?;
        // SAFETY: the map is read-only and this process never writes the file; another process
        // truncating it while mapped is the documented tripwire (module comment).
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mapping weights {}", path.display()), e))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::BadInput(format!(
                "weights {} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        let header_end = 8 + n;
        let tensors: BTreeMap<String, Entry> = meta
            .tensors()
            .into_iter()
            .map(|(name, info): (String, &TensorInfo)| {
                let e = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: header_end + info.data_offsets.0,
                    end: header_end + info.data_offsets.1,
                };
                (name, e)
            })
            .collect();
        let digest = digest(&map, header_end, &tensors, FULL_DIGEST_LIMIT);
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_end,
            tensors,
            digest,
        })
    }

    /// Opens `path` and refuses it unless it fits preset `cfg` exactly.
    pub fn open_for(path: &Path, cfg: &DitConfig) -> Result<Self> {
        let f = Self::open(path)?;
        let issues = f.check(cfg);
        if issues.is_empty() {
            return Ok(f);
        }
        // The first problems name the tensors; a file for another preset would list them all.
        const SHOWN: usize = 24;
        let mut list: Vec<String> = issues
            .iter()
            .take(SHOWN)
            .map(|i| format!("  - {i}"))
            .collect();
        if issues.len() > SHOWN {
            list.push(format!(
                "  - … and {} more (`lockstep weights check` lists them all)",
                issues.len() - SHOWN
            ));
        }
        Err(Error::BadInput(format!(
            "weights {} do not fit preset {} ({} problem{}):\n{}",
            path.display(),
            cfg.name,
            issues.len(),
            if issues.len() == 1 { "" } else { "s" },
            list.join("\n")
        )))
    }

    /// Everything wrong with this file for preset `cfg` (empty: it fits).
    pub fn check(&self, cfg: &DitConfig) -> Vec<WeightIssue> {
        let specs = param_specs(cfg);
        let mut issues = Vec::new();
        for s in &specs {
            match self.tensors.get(&s.name) {
                None => issues.push(WeightIssue::Missing {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                }),
                Some(e) => {
                    if e.shape != s.shape {
                        issues.push(WeightIssue::Shape {
                            name: s.name.clone(),
                            expected: s.shape.clone(),
                            found: e.shape.clone(),
                        });
                    }
                    if !ALLOWED_DTYPES.contains(&e.dtype) {
                        issues.push(WeightIssue::DType {
                            name: s.name.clone(),
                            dtype: format!("{:?}", e.dtype),
                        });
                    }
                }
            }
        }
        let known: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        for (name, e) in &self.tensors {
            if !known.contains(name.as_str()) {
                issues.push(WeightIssue::Unexpected {
                    name: name.clone(),
                    shape: e.shape.clone(),
                });
            }
        }
        issues
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn digest(&self) -> &WeightsDigest {
        &self.digest
    }
    /// Bytes of the JSON header (with its 8-byte length).
    pub fn header_len(&self) -> usize {
        self.header_end
    }
    /// Distinct dtypes in the file, for the operator (`lockstep weights check`).
    pub fn dtypes(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .tensors
            .values()
            .map(|e| format!("{:?}", e.dtype))
            .collect();
        d.sort();
        d.dedup();
        d
    }
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        let e = self.tensors.get(name).ok_or_else(|| {
            Error::BadInput(format!(
                "weights {}: missing tensor {name}",
                self.path.display()
            ))
        })?;
        if !ALLOWED_DTYPES.contains(&e.dtype) {
            return Err(Error::BadInput(format!(
                "weights {}: tensor {name} has dtype {:?}, allowed: F32, BF16, F16",
                self.path.display(),
                e.dtype
            )));
        }
        Ok(e)
    }

    /// Elements `[a, b)` of `e` (flat indices), converted to f32 and appended to `out`.
    fn read(&self, name: &str, e: &Entry, a: usize, b: usize, out: &mut Vec<f32>) -> Result<()> {
        let es = e.dtype.size();
        let (s, t) = (e.start + a * es, e.start + b * es);
        let bytes = self.map.get(s..t).filter(|_| t <= e.end).ok_or_else(|| {
            Error::Invariant(format!(
                "weights {}: tensor {name} elements {a}..{b} outside its data",
                self.path.display()
            ))
        })?;
        decode(e.dtype, bytes, out)
    }
}

/// Little-endian `dtype` elements → f32.
fn decode(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        other => {
            return Err(Error::BadInput(format!(
                "weights dtype {other:?} is not one of F32, BF16, F16"
            )))
        }
    }
    Ok(())
}

/// f32 → little-endian `dtype` elements.
fn encode(dtype: SaveDType, v: &[f32]) -> Vec<u8> {
    match dtype {
        SaveDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        SaveDType::Bf16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        SaveDType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn digest(
    map: &[u8],
    header_end: usize,
    tensors: &BTreeMap<String, Entry>,
    full_limit: usize,
) -> WeightsDigest {
    // The tensor table in canonical form (by name), not the header's bytes: the header's
    // free-form metadata map is written in no fixed order, and it does not change the weights.
    let mut h = Fnv64::new();
    for (name, e) in tensors {
        h.update(name.as_bytes()).update(&[0]);
        h.update(format!("{:?}", e.dtype).as_bytes()).update(&[0]);
        h.update_u64(e.shape.len() as u64);
        for d in &e.shape {
            h.update_u64(*d as u64);
        }
        h.update_u64((e.start - header_end) as u64);
        h.update_u64((e.end - header_end) as u64);
    }
    let data = &map[header_end.min(map.len())..];
    let full = data.len() <= full_limit;
    if full {
        h.update(data);
    } else {
        // In file order, so the walk is sequential.
        let mut entries: Vec<&Entry> = tensors.values().collect();
        entries.sort_by_key(|e| e.start);
        for e in entries {
            let len = e.end - e.start;
            let windows = if len <= SAMPLES_PER_TENSOR * SAMPLE_BYTES {
                vec![(e.start, e.end)]
            } else {
                // The first window starts the tensor, the last one ends it.
                (0..SAMPLES_PER_TENSOR)
                    .map(|k| {
                        let s = e.start + k * (len - SAMPLE_BYTES) / (SAMPLES_PER_TENSOR - 1);
                        (s, s + SAMPLE_BYTES)
                    })
                    .collect()
            };
            for (s, t) in windows {
                if let Some(b) = map.get(s..t) {
                    h.update(b);
                }
            }
        }
    }
    WeightsDigest {
        fnv64: h.finish(),
        full,
        file_bytes: map.len() as u64,
    }
}

impl WeightSource for WeightFile {
    fn full(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let n: usize = e.shape.iter().product();
        let mut out = Vec::with_capacity(n);
        self.read(name, e, 0, n, &mut out)?;
        Ok(out)
    }
    fn rows(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let rows = e.shape.first().copied().unwrap_or(1);
        check_range(name, "rows", lo, hi, rows)?;
        let rl = row_len(&e.shape);
        let mut out = Vec::with_capacity((hi - lo) * rl);
        self.read(name, e, lo * rl, hi * rl, &mut out)?;
        Ok(out)
    }
    fn cols(&self, name: &str, lo: usize, hi: usize) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let rows = e.shape.first().copied().unwrap_or(1);
        let rl = row_len(&e.shape);
        check_range(name, "columns", lo, hi, rl)?;
        let mut out = Vec::with_capacity(rows * (hi - lo));
        for r in 0..rows {
            self.read(name, e, r * rl + lo, r * rl + hi, &mut out)?;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Saving seeded weights (so the loader can be exercised end to end).

/// Element type of a saved file.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SaveDType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl SaveDType {
    fn dtype(self) -> Dtype {
        match self {
            SaveDType::F32 => Dtype::F32,
            SaveDType::Bf16 => Dtype::BF16,
            SaveDType::F16 => Dtype::F16,
        }
    }
}

/// One seeded tensor, generated only when the writer asks for its bytes (one at a time).
struct Lazy<'a> {
    spec: &'a ParamSpec,
    seed: u64,
    dtype: SaveDType,
}

impl View for Lazy<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(encode(self.dtype, &seeded(self.seed, self.spec)))
    }
    fn data_len(&self) -> usize {
        self.spec.numel() * self.dtype.dtype().size()
    }
}

/// Writes the seeded weights of preset `cfg` to `path` (one tensor in memory at a time).
pub fn save_seeded(cfg: &DitConfig, seed: u64, dtype: SaveDType, path: &Path) -> Result<()> {
    let specs = param_specs(cfg);
    let tensors = specs
        .iter()
        .map(|spec| (spec.name.clone(), Lazy { spec, seed, dtype }));
    let meta: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("lockstep.preset".to_string(), cfg.name.to_string()),
        ("lockstep.seed".to_string(), seed.to_string()),
    ]
    .into();
    safetensors::serialize_to_file(tensors, &Some(meta), path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => {
            Error::io(format!("writing weights {}", path.display()), io)
        }
        other => Error::Invariant(format!(
            "serializing weights to {}: {other}",
            path.display()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "lockstep-weights-unit-{}-{name}.safetensors",
            std::process::id()
        ))
    }

    /// A file holding exactly `tensors` (name, dtype, shape, little-endian bytes).
    fn write(path: &Path, tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, path).unwrap();
    }

    /// The seeded tiny tensors as f32 bytes, with `edit` applied to the list.
    fn tiny_with(
        file: &str,
        edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
    ) -> PathBuf {
        let cfg = DitConfig::tiny();
        let mut t: Vec<_> = param_specs(&cfg)
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Dtype::F32,
                    s.shape.clone(),
                    encode(SaveDType::F32, &seeded(3, s)),
                )
            })
            .collect();
        edit(&mut t);
        let p = tmp(file);
        write(&p, t);
        p
    }

    #[test]
    fn param_specs_use_wan_names_and_shapes() {
        let cfg = DitConfig::wan_1_3b();
        let specs = param_specs(&cfg);
        let shape = |n: &str| specs.iter().find(|s| s.name == n).map(|s| s.shape.clone());
        assert_eq!(
            shape("patch_embedding.weight"),
            Some(vec![1536, 16, 1, 2, 2])
        );
        assert_eq!(shape("text_embedding.0.weight"), Some(vec![1536, 4096]));
        assert_eq!(shape("time_embedding.0.weight"), Some(vec![1536, 256]));
        assert_eq!(shape("time_projection.1.weight"), Some(vec![9216, 1536]));
        assert_eq!(shape("blocks.29.modulation"), Some(vec![1, 6, 1536]));
        assert_eq!(shape("blocks.0.self_attn.q.weight"), Some(vec![1536, 1536]));
        assert_eq!(shape("blocks.0.cross_attn.norm_k.weight"), Some(vec![1536]));
        assert_eq!(shape("blocks.0.ffn.0.weight"), Some(vec![8960, 1536]));
        assert_eq!(shape("blocks.0.ffn.2.weight"), Some(vec![1536, 8960]));
        assert_eq!(shape("head.modulation"), Some(vec![1, 2, 1536]));
        assert_eq!(shape("head.head.weight"), Some(vec![64, 1536]));
        assert_eq!(shape("blocks.30.modulation"), None);
        // 12 embedding tensors + 3 head + 27 per block.
        assert_eq!(specs.len(), 12 + 3 + 27 * 30);
        // Wan 2.1 T2V 1.3B has about 1.3 B parameters (text width 4096, as in the checkpoint).
        let n: usize = specs.iter().map(ParamSpec::numel).sum();
        assert!((1_000_000_000..1_500_000_000).contains(&n), "{n}");
    }

    #[test]
    fn saved_seeded_file_reads_back_identical_tensors_and_shards() {
        let cfg = DitConfig::tiny();
        let p = tmp("roundtrip");
        save_seeded(&cfg, 5, SaveDType::F32, &p).unwrap();
        let f = WeightFile::open_for(&p, &cfg).unwrap();
        let s = SeededWeights::new(&cfg, 5);
        for spec in param_specs(&cfg) {
            let n = &spec.name;
            assert_eq!(f.full(n).unwrap(), s.full(n).unwrap(), "{n}");
            let rows = spec.shape[0];
            assert_eq!(
                f.rows(n, rows / 4, rows - rows / 4).unwrap(),
                s.rows(n, rows / 4, rows - rows / 4).unwrap()
            );
            let rl = row_len(&spec.shape);
            if rl > 1 {
                assert_eq!(
                    f.cols(n, rl / 4, rl / 2).unwrap(),
                    s.cols(n, rl / 4, rl / 2).unwrap()
                );
            }
        }
        // Out-of-range slices are errors, not panics.
        assert!(f.rows("head.head.weight", 3, 999).is_err());
        assert!(f.cols("head.head.weight", 0, 999).is_err());
        assert!(f
            .full("no.such.tensor")
            .unwrap_err()
            .to_string()
            .contains("no.such.tensor"));
        assert!(f.digest().full);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn missing_tensor_fails_naming_it_and_its_shape() {
        let p = tiny_with("missing", |t| {
            t.retain(|(n, ..)| n != "blocks.1.self_attn.k.weight")
        });
        let cfg = DitConfig::tiny();
        let issues = WeightFile::open(&p).unwrap().check(&cfg);
        assert_eq!(
            issues,
            vec![WeightIssue::Missing {
                name: "blocks.1.self_attn.k.weight".into(),
                expected: vec![128, 128]
            }]
        );
        let e = WeightFile::open_for(&p, &cfg).unwrap_err();
        assert!(matches!(e, Error::BadInput(_)), "{e}");
        assert!(
            e.to_string()
                .contains("missing tensor blocks.1.self_attn.k.weight (expected shape [128, 128])"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn wrong_shape_fails_naming_expected_and_found() {
        let p = tiny_with("shape", |t| {
            for (n, _, s, _) in t.iter_mut() {
                if n == "blocks.0.ffn.0.weight" {
                    *s = vec![128, 384];
                }
            }
        });
        let e = WeightFile::open_for(&p, &DitConfig::tiny()).unwrap_err();
        assert!(
            e.to_string()
                .contains("tensor blocks.0.ffn.0.weight has shape [128, 384], expected [384, 128]"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn unexpected_names_and_disallowed_dtypes_are_reported_together() {
        let p = tiny_with("extra", |t| {
            t.push((
                "blocks.0.self_attn.k_img.weight".into(),
                Dtype::F32,
                vec![2],
                vec![0; 8],
            ));
            for (n, d, s, b) in t.iter_mut() {
                if n == "head.modulation" {
                    *d = Dtype::F64;
                    *b = vec![0; s.iter().product::<usize>() * 8];
                }
            }
        });
        let issues = WeightFile::open(&p).unwrap().check(&DitConfig::tiny());
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.contains(&WeightIssue::DType {
            name: "head.modulation".into(),
            dtype: "F64".into()
        }));
        assert!(issues.contains(&WeightIssue::Unexpected {
            name: "blocks.0.self_attn.k_img.weight".into(),
            shape: vec![2]
        }));
        let e = WeightFile::open_for(&p, &DitConfig::tiny())
            .unwrap_err()
            .to_string();
        assert!(e.contains("(2 problems)") && e.contains("dtype F64"), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn bf16_and_f16_files_load_within_their_rounding() {
        let cfg = DitConfig::tiny();
        let s = SeededWeights::new(&cfg, 1);
        for (dt, tol) in [
            (SaveDType::Bf16, 1.0 / 256.0),
            (SaveDType::F16, 1.0 / 2048.0),
        ] {
            let p = tmp(&format!("{dt:?}"));
            save_seeded(&cfg, 1, dt, &p).unwrap();
            let f = WeightFile::open_for(&p, &cfg).unwrap();
            assert_eq!(f.dtypes(), vec![format!("{:?}", dt.dtype())]);
            for name in ["blocks.0.self_attn.q.weight", "blocks.1.norm3.weight"] {
                let (a, b) = (f.full(name).unwrap(), s.full(name).unwrap());
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= tol * y.abs() + 1e-7,
                        "{dt:?} {name}: {x} vs {y}"
                    );
                }
                assert_ne!(a, b, "{dt:?} rounds something");
            }
            let _ = std::fs::remove_file(&p);
        }
    }

    #[test]
    fn digest_identifies_the_file_content() {
        let cfg = DitConfig::tiny();
        let (a, b) = (tmp("digest-a"), tmp("digest-b"));
        save_seeded(&cfg, 1, SaveDType::F32, &a).unwrap();
        save_seeded(&cfg, 1, SaveDType::F32, &b).unwrap();
        let da = WeightFile::open(&a).unwrap().digest().clone();
        assert_eq!(&da, WeightFile::open(&b).unwrap().digest());
        // Same header, one data byte changed: the data hash tells.
        let mut bytes = std::fs::read(&b).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&b, &bytes).unwrap();
        let db = WeightFile::open(&b).unwrap().digest().clone();
        assert_ne!(da.fnv64, db.fnv64);
        // Sampled mode (forced): says so, differs from the full hash, is stable, and still sees
        // a change in a tensor's last bytes (its last window ends the tensor).
        let sampled = |p: &Path| {
            let f = WeightFile::open(p).unwrap();
            digest(&f.map, f.header_end, &f.tensors, 0)
        };
        let sa = sampled(&a);
        assert!(!sa.full && sa.fnv64 != da.fnv64);
        assert_eq!(sa, sampled(&a));
        assert_ne!(sa.fnv64, sampled(&b).fnv64);
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
    }

    #[test]
    fn a_file_that_is_not_safetensors_is_bad_input_naming_it() {
        let p = tmp("garbage");
        std::fs::write(&p, b"not a safetensors file at all").unwrap();
        let e = WeightFile::open(&p).unwrap_err();
        assert!(matches!(e, Error::BadInput(_)), "{e}");
        assert!(
            e.to_string().contains("not a valid safetensors file"),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
        let e = WeightFile::open(&tmp("absent")).unwrap_err();
        assert!(matches!(e, Error::BadInput(_)), "{e}");
        assert!(e.to_string().contains("absent"), "{e}");
        assert_eq!(e.exit_code().code(), 74);
    }

    #[test]
    fn a_directory_or_a_fifo_as_weights_is_bad_input_without_blocking() {
        let e = WeightFile::open(&std::env::temp_dir()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert_eq!(e.exit_code().code(), 74);
        let p = tmp("fifo");
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO for reading would block until a writer comes: the check refuses first.
        let e = WeightFile::open(&p).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(e.exit_code().code(), 74);
        let _ = std::fs::remove_file(&p);
    }
}
