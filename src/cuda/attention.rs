//! Typed launch of the attention forward kernels (kernels/attention.cu).
//!
//! Contract:
//! - `q [Lq, H, 128]`, `k, v [Lk, H, 128]`, `o [Lq, H, 128]` bf16, contiguous token-major; no
//!   mask; any `Lq, Lk >= 1`. K/V rows may be in any order (attention is a set operation): a ring
//!   cache is passed as the contiguous view of its occupied slots, sinks and window alike.
//! - `lse` (optional) is fp32 `[Lq, H]`, the natural log-sum-exp of the scaled scores, the same
//!   layout as `ops::attention`'s second output.
//! - Shapes, buffer lengths and 16-byte alignment are checked before the launch; the launch is
//!   enqueued on the caller's stream (see context.rs for what `Ok` means).
//! - `AttentionVariant` is an execution flag: `LOCKSTEP_KERNEL_VARIANT` (default v3t) is parsed
//!   at startup (`AttentionVariant::from_env`), its canonical name joins the parity fingerprint
//!   (`exec.kernel_variant`), and the GPU model runs exactly it; ranks that differ fail startup.
//!
//! - v3 (`V3Tma*`) loads through TMA: three `CUtensorMap`s are encoded on the host per launch
//!   (`cuTensorMapEncodeTiled`, a CPU-only driver call) over the same `[L, H, 128]` memory as
//!   3-D tensors `{128, L, H}`; rows past `L` are zero-filled by the copy engine.
//! - v3t (`V3TmaSplitTail`) enqueues two launches on the stream: v3 over the whole waves,
//!   then the last partial wave's tiles split along the keys over 2- or 4-CTA clusters
//!   (`split_tail_plan`); the second reads nothing the first writes, so stream order suffices.
//!
//! Tripwire: `V1_SMEM_BYTES`/`V3_SMEM_BYTES`/`V3W_SMEM_BYTES` mirror `attn_v1::SMEM`/... (asserted
//! in the kernel); every variant uses 128-row query blocks (`V1_BM`; v3 numbers its (query block,
//! head) work tiles in a 1-D grid); the v3 tensor-map box
//! `{64, 1, 128}` with 128-byte swizzle is what kernels/attention_v3.cuh expects byte for byte.
use crate::cuda::context::{check_aligned16, check_len, cuda_err, dptr, dptr_mut, Gpu, LaunchCfg};
use crate::{Error, Result};
use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

/// Mirror of `AttnParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub lq: u32,
    pub lk: u32,
    pub heads: u32,
    /// v3 only: first (query block, head) work tile of this launch.
    pub tile_base: u32,
    pub q_row_stride: u64,
    pub kv_row_stride: u64,
    pub o_row_stride: u64,
    pub scale_log2: f32,
    /// v3 only: one past the last work tile of this launch (v1/v2 ignore both).
    pub tile_end: u32,
}
const _: () = assert!(std::mem::size_of::<AttnParams>() == 88);

/// Every attention variant the build carries (the ones that won somewhere; BENCHMARKS.md keeps
/// the history of those that lost and were deleted).
pub const ALL_VARIANTS: [AttentionVariant; 4] = [
    AttentionVariant::V1Fa2,
    AttentionVariant::V3Tma,
    AttentionVariant::V3TmaPingPongWide,
    AttentionVariant::V3TmaSplitTail,
];

/// Which attention kernel runs. Selectable at run time; its name enters the parity fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionVariant {
    /// FA2-style: mma.sync m16n8k16, ldmatrix, cp.async double buffering (any sm_80+ part): the
    /// portable fallback.
    V1Fa2,
    /// Hopper (FA3-style): a producer warpgroup issues TMA loads into 2-stage K/V rings with
    /// full/empty mbarriers; two consumer warpgroups (setmaxnreg 240) run both GEMMs as wgmma
    /// with intra-warpgroup overlap; no block-wide barrier in the main loop.
    V3Tma,
    /// v3 with ping-pong consumers and 176-key tiles (won at H = 40, Lk 9360–18720, in one run).
    V3TmaPingPongWide,
    /// v3 for the full waves, then the work tiles of the last partial wave split along the keys
    /// over clusters of 2 or 4 CTAs (combined through distributed shared memory), so the tail
    /// wave takes a half or a quarter of a block's time (`split_tail_plan`). The default: the
    /// fastest measured at the Wan shapes on H100 and H200 (1.04–1.20× cuDNN at H = 12).
    #[default]
    V3TmaSplitTail,
}

impl AttentionVariant {
    /// `LOCKSTEP_KERNEL_VARIANT` (a name `parse` accepts), or the default (v3t).
    pub fn from_env() -> Result<Self> {
        match std::env::var("LOCKSTEP_KERNEL_VARIANT") {
            Ok(v) if !v.is_empty() && v != "default" => Self::parse(&v)
                .map_err(|e| Error::BadInput(format!("LOCKSTEP_KERNEL_VARIANT: {e}"))),
            _ => Ok(Self::default()),
        }
    }

    /// Stable name for the parity handshake and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionVariant::V1Fa2 => "v1-fa2-mma-sync",
            AttentionVariant::V3Tma => "v3-tma-ws",
            AttentionVariant::V3TmaPingPongWide => "v3pw-tma-ws-pingpong-bn176",
            AttentionVariant::V3TmaSplitTail => "v3t-tma-ws-split-tail",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "v1" | "v1-fa2-mma-sync" => Ok(AttentionVariant::V1Fa2),
            "v3" | "v3-tma-ws" => Ok(AttentionVariant::V3Tma),
            "v3pw" | "v3pw-tma-ws-pingpong-bn176" => Ok(AttentionVariant::V3TmaPingPongWide),
            "v3t" | "v3t-tma-ws-split-tail" => Ok(AttentionVariant::V3TmaSplitTail),
            other => Err(Error::BadInput(format!(
                "unknown attention variant {other:?} (known: v1-fa2-mma-sync, v3-tma-ws, \
                 v3pw-tma-ws-pingpong-bn176, v3t-tma-ws-split-tail; v2, v2b, v3p, v3s, v3ps, v3w \
                 and v3t2 lost their benchmarks and were deleted)"
            ))),
        }
    }
}

pub const HEAD_DIM: usize = 128;
const V1_BM: u32 = 128;
const V1_THREADS: u32 = 128;
const V1_SMEM_BYTES: u32 = 128 * 256 + 4 * 64 * 256;
const V3_THREADS: u32 = 384;
const V3_SMEM_BYTES: u32 = 161 * 1024;
const V3W_SMEM_BYTES: u32 = 209 * 1024;
/// Rows per TMA box: Q tiles (`attn_v3::BM`) and K/V tiles of v3/v3t (BN 128) and of v3pw
/// (BN 176); head dims per box: 64 (one 128-byte swizzled row).
const V3_BOX_ROWS: u32 = 128;
const V3W_BOX_ROWS: u32 = 176;
const V3_BOX_DIMS: u32 = 64;
/// Most CTAs v3t splits one tail tile over (cluster size; the kernels exist for 2 and 4).
pub const V3T_MAX_SPLIT: usize = 4;

/// How v3t runs `tiles` work tiles of `key_tiles` 128-key tiles each on `sms` multiprocessors
/// (one block each): `(full, tail, split)` = the first `full` tiles one block per tile (whole
/// waves), the last `tail` tiles split over `split` CTAs each (2 or 4; 1 = no tail launch).
/// The tail must fit one wave (`tail * split <= sms`) and every piece must get a key tile;
/// `max_split` caps the cluster size (4 for v3t).
pub fn split_tail_plan(
    tiles: usize,
    sms: usize,
    key_tiles: usize,
    max_split: usize,
) -> (usize, usize, usize) {
    let sms = sms.max(1);
    let tail = tiles % sms;
    if tail == 0 {
        return (tiles, 0, 1);
    }
    let split = match (sms / tail).min(key_tiles).min(max_split) {
        s if s >= 4 => 4,
        s if s >= 2 => 2,
        _ => 1,
    };
    if split == 1 {
        (tiles, 0, 1)
    } else {
        (tiles - tail, tail, split)
    }
}

/// Mirror of `AttnV3Params` in kernels/attention_v3.cuh: three tensor maps, then the v1 params.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct AttnV3Params {
    tq: sys::CUtensorMap,
    tk: sys::CUtensorMap,
    tv: sys::CUtensorMap,
    p: AttnParams,
}
const _: () = assert!(std::mem::size_of::<AttnV3Params>() == 512);
// A reordered field keeps the size; the offset of the plain params catches that.
const _: () = assert!(std::mem::offset_of!(AttnV3Params, p) == 384);

/// Encodes the TMA descriptor of one `[rows, heads, 128]` bf16 tensor (row stride `row_stride`
/// elements) as the 3-D tensor `{128, heads, rows}` (strides increasing, as the driver documents)
/// read in `{64, 1, 128}` boxes with the 128-byte swizzle: one box = 128 token rows of 128 bytes
/// of one head. Out-of-bounds rows read as zero (OOB fill NONE means zeros).
fn encode_tmap(
    what: &str,
    ptr: u64,
    rows: usize,
    heads: usize,
    row_stride: usize,
    box_rows: u32,
) -> Result<sys::CUtensorMap> {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims: [u64; 3] = [HEAD_DIM as u64, heads as u64, rows as u64];
    // Byte strides of dims 1 and 2 (dim 0 is contiguous): heads, then tokens.
    let strides: [u64; 2] = [(HEAD_DIM * 2) as u64, (row_stride * 2) as u64];
    let boxd: [u32; 3] = [V3_BOX_DIMS, 1, box_rows];
    let estr: [u32; 3] = [1, 1, 1];
    // SAFETY: all arrays live across the call and have the rank (3) the call is told; ptr is a
    // 16-byte aligned device address of a buffer whose length the caller checked; the call only
    // writes `map`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            estr.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(|e| {
        cuda_err(
            format!("cuTensorMapEncodeTiled({what}: {rows} x {heads} x {HEAD_DIM})"),
            e,
        )
    })?;
    Ok(map)
}

/// Geometry of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Matrix FLOPs of the forward pass (QKᵀ and PV), the figure benchmarks divide by time.
    pub fn flops(&self) -> f64 {
        4.0 * self.lq as f64 * self.lk as f64 * self.heads as f64 * self.head_dim as f64
    }

    fn check(&self) -> Result<()> {
        if self.head_dim != HEAD_DIM {
            return Err(Error::BadInput(format!(
                "attention: head dim {} unsupported (kernel is built for {HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.lq == 0 || self.lk == 0 || self.heads == 0 {
            return Err(Error::BadInput(format!(
                "attention: empty shape {self:?} (Lq, Lk and H must be >= 1)"
            )));
        }
        if self.heads > 65_535 || self.lq.div_ceil(V1_BM as usize) > i32::MAX as usize {
            return Err(Error::BadInput(format!(
                "attention: shape {self:?} exceeds the launch grid"
            )));
        }
        if u32::try_from(self.lq).is_err() || u32::try_from(self.lk).is_err() {
            return Err(Error::BadInput(format!(
                "attention: Lq/Lk of {self:?} exceed u32"
            )));
        }
        Ok(())
    }
}

/// Enqueues `o = softmax(q kᵀ · scale) v` (and the LSE when asked) on `stream`.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn attention_fwd(
    gpu: &Gpu,
    stream: &CudaStream,
    variant: AttentionVariant,
    shape: AttnShape,
    scale: f32,
    q: &impl DevicePtr<bf16>,
    k: &impl DevicePtr<bf16>,
    v: &impl DevicePtr<bf16>,
    o: &mut impl DevicePtrMut<bf16>,
    lse: Option<&mut dyn LseOut>,
) -> Result<()> {
    shape.check()?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::BadInput(format!(
            "attention: softmax scale {scale} must be finite and > 0"
        )));
    }
    let row = shape.heads * shape.head_dim;
    let sq = format!("[{}, {}, {}]", shape.lq, shape.heads, shape.head_dim);
    let sk = format!("[{}, {}, {}]", shape.lk, shape.heads, shape.head_dim);
    check_len("attention q", q.len(), shape.lq * row, &sq)?;
    check_len("attention k", k.len(), shape.lk * row, &sk)?;
    check_len("attention v", v.len(), shape.lk * row, &sk)?;
    check_len("attention o", o.len(), shape.lq * row, &sq)?;
    let (func, threads, smem) = match variant {
        AttentionVariant::V1Fa2 => ("attention_fwd_v1_bf16", V1_THREADS, V1_SMEM_BYTES),
        AttentionVariant::V3Tma | AttentionVariant::V3TmaSplitTail => {
            ("attention_fwd_v3_bf16", V3_THREADS, V3_SMEM_BYTES)
        }
        AttentionVariant::V3TmaPingPongWide => {
            ("attention_fwd_v3pw_bf16", V3_THREADS, V3W_SMEM_BYTES)
        }
    };
    let kern = gpu.kernel("attention", func)?;
    gpu.set_max_dynamic_smem(&kern, smem)?;
    let (qp, _gq) = dptr(q, stream);
    let (kp, _gk) = dptr(k, stream);
    let (vp, _gv) = dptr(v, stream);
    let (op, _go) = dptr_mut(o, stream);
    let (lp, _gl) = match lse {
        Some(l) => {
            check_len(
                "attention lse",
                l.elems(),
                shape.lq * shape.heads,
                &format!("[{}, {}]", shape.lq, shape.heads),
            )?;
            let (p, g) = l.ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    for (what, p) in [("q", qp), ("k", kp), ("v", vp), ("o", op)] {
        check_aligned16(what, p)?;
    }
    let params = AttnParams {
        q: qp,
        k: kp,
        v: vp,
        o: op,
        lse: lp,
        lq: shape.lq as u32,
        lk: shape.lk as u32,
        heads: shape.heads as u32,
        tile_base: 0,
        q_row_stride: row as u64,
        kv_row_stride: row as u64,
        o_row_stride: row as u64,
        scale_log2: scale * std::f32::consts::LOG2_E,
        tile_end: 0,
    };
    let cfg = LaunchCfg {
        grid: (
            shape.lq.div_ceil(V1_BM as usize) as u32,
            shape.heads as u32,
            1,
        ),
        block: (threads, 1, 1),
        smem_bytes: smem,
    };
    let wide = variant == AttentionVariant::V3TmaPingPongWide;
    match variant {
        AttentionVariant::V3Tma
        | AttentionVariant::V3TmaPingPongWide
        | AttentionVariant::V3TmaSplitTail => {
            // v3 numbers its work tiles (query block, head) in one 1-D grid, as an i32.
            let tiles = shape.lq.div_ceil(V1_BM as usize) * shape.heads;
            if tiles > i32::MAX as usize {
                return Err(Error::BadInput(format!(
                    "attention: shape {shape:?} has {tiles} work tiles, more than v3 indexes"
                )));
            }
            let sms = || -> Result<usize> {
                let n = gpu
                    .context()
                    .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .map_err(|e| cuda_err("cuDeviceGetAttribute(multiprocessor count)", e))?;
                Ok(n.max(1) as usize)
            };
            let key_tiles = shape.lk.div_ceil(V3_BOX_ROWS as usize);
            let (full, tail, split) = match variant {
                AttentionVariant::V3TmaSplitTail => {
                    split_tail_plan(tiles, sms()?, key_tiles, V3T_MAX_SPLIT)
                }
                _ => (tiles, 0, 1),
            };
            let blocks = full;
            let kv_box = if wide { V3W_BOX_ROWS } else { V3_BOX_ROWS };
            let mut p3 = AttnV3Params {
                tq: encode_tmap("q", qp, shape.lq, shape.heads, row, V3_BOX_ROWS)?,
                tk: encode_tmap("k", kp, shape.lk, shape.heads, row, kv_box)?,
                tv: encode_tmap("v", vp, shape.lk, shape.heads, row, kv_box)?,
                p: AttnParams {
                    tile_base: 0,
                    tile_end: full as u32,
                    ..params
                },
            };
            if full > 0 {
                let cfg = LaunchCfg {
                    grid: (blocks as u32, 1, 1),
                    ..cfg
                };
                // SAFETY: AttnV3Params mirrors the kernel's struct (size asserted on both
                // sides); the tensor maps cover exactly the checked q/k/v buffers; tiles
                // [0, full) exist; guards live past enqueue.
                unsafe { gpu.launch(&kern, cfg, stream, &p3)? };
            }
            if tail > 0 {
                let tail_func = if split == 4 {
                    "attention_fwd_v3t4_bf16"
                } else {
                    "attention_fwd_v3t2_bf16"
                };
                let tk = gpu.kernel("attention", tail_func)?;
                gpu.set_max_dynamic_smem(&tk, V3_SMEM_BYTES)?;
                p3.p.tile_base = full as u32;
                p3.p.tile_end = tiles as u32;
                // The kernel's __cluster_dims__(split) groups consecutive blocks: the grid is a
                // multiple of it by construction.
                let cfg = LaunchCfg {
                    grid: ((tail * split) as u32, 1, 1),
                    ..cfg
                };
                // SAFETY: as above; tiles [full, tiles) exist and every piece of a tail tile has
                // at least one key tile (split <= key tiles, split_tail_plan).
                unsafe { gpu.launch(&tk, cfg, stream, &p3)? };
            }
            Ok(())
        }
        // SAFETY: AttnParams mirrors the kernel's struct; every buffer length and the alignment
        // were checked above against the shape the kernel indexes; the guards live until after
        // enqueue.
        _ => unsafe { gpu.launch(&kern, cfg, stream, &params) },
    }
}

/// An fp32 buffer that can take the LSE (object-safe so `Option<&mut dyn LseOut>` works for
/// any cudarc slice or view).
pub trait LseOut {
    fn elems(&self) -> usize;
    fn ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>);
}

impl<T: DevicePtrMut<f32>> LseOut for T {
    fn elems(&self) -> usize {
        self.len()
    }
    fn ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        self.device_ptr_mut(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_variant_names_round_trip_for_the_parity_fingerprint() {
        for v in ALL_VARIANTS {
            assert_eq!(AttentionVariant::parse(v.as_str()).ok(), Some(v));
        }
        assert!(AttentionVariant::parse("v9").is_err());
    }

    #[test]
    fn attention_shape_rejects_empty_and_wrong_head_dim() {
        let ok = AttnShape {
            lq: 1,
            lk: 1,
            heads: 1,
            head_dim: 128,
        };
        assert!(ok.check().is_ok());
        assert!(AttnShape { lk: 0, ..ok }.check().is_err());
        assert!(AttnShape { head_dim: 64, ..ok }.check().is_err());
        assert_eq!(ok.flops(), 512.0);
    }

    #[test]
    fn v3t_split_tail_plan_fills_the_last_wave_without_empty_pieces() {
        // H200 (132 SMs), Lq 4680: H = 40 -> 1480 tiles, 11 full waves + 28 tiles split 4 ways.
        assert_eq!(split_tail_plan(1480, 132, 37, 4), (1452, 28, 4));
        // H = 12 -> 444 tiles: 48 left, 132 / 48 = 2 pieces each.
        assert_eq!(split_tail_plan(444, 132, 37, 4), (396, 48, 2));
        // Whole waves: nothing to split.
        assert_eq!(split_tail_plan(264, 132, 37, 4), (264, 0, 1));
        // One key tile cannot be split; a tail larger than half a wave is not split.
        assert_eq!(split_tail_plan(10, 132, 1, 4), (10, 0, 1));
        assert_eq!(split_tail_plan(100, 132, 37, 4), (100, 0, 1));
        // Small problems: the whole grid is the tail; never more pieces than key tiles.
        assert_eq!(split_tail_plan(3, 132, 2, 4), (0, 3, 2));
        assert_eq!(split_tail_plan(3, 132, 3, 4), (0, 3, 2));
        // A cap of 2 keeps clusters at 2.
        assert_eq!(split_tail_plan(1480, 132, 37, 2), (1452, 28, 2));
        for max in [2, 4] {
            for tiles in 1..600 {
                for kt in 1..9 {
                    let (full, tail, split) = split_tail_plan(tiles, 132, kt, max);
                    assert_eq!(full + tail, tiles);
                    assert!(split == 1 || (tail * split <= 132 && split <= kt && split <= max));
                    assert!(full % 132 == 0 || tail == 0);
                }
            }
        }
    }
}
