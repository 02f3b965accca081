//! Typed launches of the DiT element-wise kernels (kernels/dit_ops.cu), each the GPU twin of a
//! function in `model::ops` (the CPU reference the tests compare against).
//!
//! Contract:
//! - Row tensors are `[rows, dim]` bf16 row-major with `dim % 8 == 0` and `dim <= MAX_DIM`;
//!   per-frame tensors (shift, scale, gate) are `[frames, dim]` bf16 with
//!   `frames = ceil(rows / tokens_per_frame)`; norm weights `[dim]` bf16; sums of squares fp32
//!   `[rows]`.
//! - Math is fp32 from bf16 inputs, one bf16 rounding per output.
//! - Distributed q/k RMSNorm (TP): `rms_sum_squares` on each rank's shard → all-reduce (sum) →
//!   `rms_norm` with `Some((&sumsq, total_dim))`. Single GPU: `rms_norm` with `None` (one pass).
//! - `gated_residual_layer_norm_modulate` = `gated_residual` then `layer_norm_modulate` on the
//!   updated stream, in one pass (the stream is read once); the LN sees the bf16-rounded stream,
//!   so fused and unfused agree exactly.
//! - Every call checks lengths and alignment, then enqueues on the caller's stream.
use crate::cuda::context::{check_aligned16, check_len, dptr, dptr_mut, Gpu, LaunchCfg};
use crate::{Error, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

/// Mirror of `DitParams` in kernels/dit_ops.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DitParams {
    pub x: u64,
    pub y: u64,
    pub out: u64,
    pub x_out: u64,
    pub weight: u64,
    pub shift: u64,
    pub scale: u64,
    pub gate: u64,
    pub sumsq_in: u64,
    pub sumsq_out: u64,
    pub n: u64,
    pub rows: u32,
    pub dim: u32,
    pub tokens_per_frame: u32,
    pub total_dim: u32,
    pub eps: f32,
    pub _pad0: u32,
}
const _: () = assert!(std::mem::size_of::<DitParams>() == 112);

/// Largest row the row kernels hold in registers (DIT_VPT * 8 * DIT_THREADS).
pub const MAX_DIM: usize = 8192;
const THREADS: u32 = 256;

/// Rows, features, and tokens per latent frame of a row tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowShape {
    pub rows: usize,
    pub dim: usize,
    pub tokens_per_frame: usize,
}

impl RowShape {
    fn check(&self, op: &str) -> Result<()> {
        if self.rows == 0 || self.dim == 0 || self.dim % 8 != 0 || self.dim > MAX_DIM {
            return Err(Error::BadInput(format!(
                "{op}: shape {self:?} (dim must be a multiple of 8 in 8..={MAX_DIM}, rows >= 1)"
            )));
        }
        if self.tokens_per_frame == 0 {
            return Err(Error::BadInput(format!("{op}: tokens_per_frame is 0")));
        }
        if u32::try_from(self.rows).is_err() || self.rows > i32::MAX as usize {
            return Err(Error::BadInput(format!(
                "{op}: {} rows exceed the grid",
                self.rows
            )));
        }
        Ok(())
    }

    fn elems(&self) -> usize {
        self.rows * self.dim
    }

    fn frames(&self) -> usize {
        self.rows.div_ceil(self.tokens_per_frame)
    }

    fn base(&self, eps: f32) -> DitParams {
        DitParams {
            rows: self.rows as u32,
            dim: self.dim as u32,
            tokens_per_frame: self.tokens_per_frame as u32,
            total_dim: self.dim as u32,
            eps,
            n: self.elems() as u64,
            ..DitParams::default()
        }
    }

    fn cfg(&self) -> LaunchCfg {
        LaunchCfg {
            grid: (self.rows as u32, 1, 1),
            block: (THREADS, 1, 1),
            smem_bytes: 0,
        }
    }

    fn desc(&self) -> String {
        format!("[{}, {}]", self.rows, self.dim)
    }
}

fn ptr_in<'a>(
    what: &str,
    buf: &'a impl DevicePtr<bf16>,
    want: usize,
    shape: &str,
    stream: &'a CudaStream,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    check_len(what, buf.len(), want, shape)?;
    let (p, g) = dptr(buf, stream);
    check_aligned16(what, p)?;
    Ok((p, g))
}

fn ptr_out<'a>(
    what: &str,
    buf: &'a mut impl DevicePtrMut<bf16>,
    want: usize,
    shape: &str,
    stream: &'a CudaStream,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    check_len(what, buf.len(), want, shape)?;
    let (p, g) = dptr_mut(buf, stream);
    check_aligned16(what, p)?;
    Ok((p, g))
}

/// `sumsq[r] = Σ x[r, :]²` (`ops::sum_squares`): this rank's partial for the distributed
/// RMSNorm.
#[track_caller]
pub fn rms_sum_squares(
    gpu: &Gpu,
    stream: &CudaStream,
    shape: RowShape,
    x: &impl DevicePtr<bf16>,
    sumsq: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    shape.check("rms_sum_squares")?;
    let k = gpu.kernel("dit_ops", "rms_norm_bf16")?;
    let (xp, _g1) = ptr_in("x", x, shape.elems(), &shape.desc(), stream)?;
    check_len(
        "sumsq",
        sumsq.len(),
        shape.rows,
        &format!("[{}]", shape.rows),
    )?;
    let (sp, _g2) = dptr_mut(sumsq, stream);
    let p = DitParams {
        x: xp,
        sumsq_out: sp,
        ..shape.base(0.0)
    };
    // SAFETY: DitParams mirrors the kernel; lengths/alignment checked; out null = sums only.
    unsafe { gpu.launch(&k, shape.cfg(), stream, &p) }
}

/// `out = x / sqrt(sumsq / total_dim + eps) * weight` (`ops::rms_norm_with_sumsq`). With
/// `all_reduced = None` the row's own sum is used (`ops::rms_norm`).
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn rms_norm(
    gpu: &Gpu,
    stream: &CudaStream,
    shape: RowShape,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    all_reduced: Option<(&dyn SumsqIn, usize)>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    shape.check("rms_norm")?;
    let k = gpu.kernel("dit_ops", "rms_norm_bf16")?;
    let d = shape.desc();
    let (xp, _g1) = ptr_in("x", x, shape.elems(), &d, stream)?;
    let (wp, _g2) = ptr_in(
        "weight",
        weight,
        shape.dim,
        &format!("[{}]", shape.dim),
        stream,
    )?;
    let (op, _g3) = ptr_out("out", out, shape.elems(), &d, stream)?;
    let mut p = DitParams {
        x: xp,
        weight: wp,
        out: op,
        ..shape.base(eps)
    };
    let _g4 = match all_reduced {
        Some((s, total_dim)) => {
            check_len("sumsq", s.elems(), shape.rows, &format!("[{}]", shape.rows))?;
            if total_dim < shape.dim || u32::try_from(total_dim).is_err() {
                return Err(Error::BadInput(format!(
                    "rms_norm: total dim {total_dim} < shard dim {}",
                    shape.dim
                )));
            }
            let (sp, g) = s.ptr(stream);
            p.sumsq_in = sp;
            p.total_dim = total_dim as u32;
            Some(g)
        }
        None => None,
    };
    // SAFETY: as above.
    unsafe { gpu.launch(&k, shape.cfg(), stream, &p) }
}

/// An fp32 `[rows]` buffer read by `rms_norm` (object-safe over cudarc slices and views).
pub trait SumsqIn {
    fn elems(&self) -> usize;
    fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>);
}

impl<T: DevicePtr<f32>> SumsqIn for T {
    fn elems(&self) -> usize {
        self.len()
    }
    fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        self.device_ptr(stream)
    }
}

/// `out = LN(x) · (1 + scale[frame]) + shift[frame]` (`ops::layer_norm_modulate`).
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn layer_norm_modulate(
    gpu: &Gpu,
    stream: &CudaStream,
    shape: RowShape,
    x: &impl DevicePtr<bf16>,
    shift: &impl DevicePtr<bf16>,
    scale: &impl DevicePtr<bf16>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    shape.check("layer_norm_modulate")?;
    let k = gpu.kernel("dit_ops", "layer_norm_modulate_bf16")?;
    let d = shape.desc();
    let fd = format!("[{}, {}]", shape.frames(), shape.dim);
    let fe = shape.frames() * shape.dim;
    let (xp, _g1) = ptr_in("x", x, shape.elems(), &d, stream)?;
    let (shp, _g2) = ptr_in("shift", shift, fe, &fd, stream)?;
    let (scp, _g3) = ptr_in("scale", scale, fe, &fd, stream)?;
    let (op, _g4) = ptr_out("out", out, shape.elems(), &d, stream)?;
    let p = DitParams {
        x: xp,
        shift: shp,
        scale: scp,
        out: op,
        ..shape.base(eps)
    };
    // SAFETY: as above.
    unsafe { gpu.launch(&k, shape.cfg(), stream, &p) }
}

/// `x += y · gate[frame]` in place (`ops::gated_residual`).
#[track_caller]
pub fn gated_residual(
    gpu: &Gpu,
    stream: &CudaStream,
    shape: RowShape,
    x: &mut impl DevicePtrMut<bf16>,
    y: &impl DevicePtr<bf16>,
    gate: &impl DevicePtr<bf16>,
) -> Result<()> {
    shape.check("gated_residual")?;
    let k = gpu.kernel("dit_ops", "gated_residual_bf16")?;
    let d = shape.desc();
    let fd = format!("[{}, {}]", shape.frames(), shape.dim);
    let (xp, _g1) = ptr_out("x", x, shape.elems(), &d, stream)?;
    let (yp, _g2) = ptr_in("y", y, shape.elems(), &d, stream)?;
    let (gp, _g3) = ptr_in("gate", gate, shape.frames() * shape.dim, &fd, stream)?;
    let p = DitParams {
        x: xp,
        x_out: xp,
        y: yp,
        gate: gp,
        ..shape.base(0.0)
    };
    // SAFETY: as above; x is read and written by the same thread per element (in place is safe).
    unsafe { gpu.launch(&k, shape.cfg(), stream, &p) }
}

/// Fused `gated_residual` (x updated in place) then `layer_norm_modulate` of the new x into out.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn gated_residual_layer_norm_modulate(
    gpu: &Gpu,
    stream: &CudaStream,
    shape: RowShape,
    x: &mut impl DevicePtrMut<bf16>,
    y: &impl DevicePtr<bf16>,
    gate: &impl DevicePtr<bf16>,
    shift: &impl DevicePtr<bf16>,
    scale: &impl DevicePtr<bf16>,
    eps: f32,
    out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    shape.check("gated_residual_layer_norm_modulate")?;
    let k = gpu.kernel("dit_ops", "gated_residual_bf16")?;
    let d = shape.desc();
    let fd = format!("[{}, {}]", shape.frames(), shape.dim);
    let fe = shape.frames() * shape.dim;
    let (xp, _g1) = ptr_out("x", x, shape.elems(), &d, stream)?;
    let (yp, _g2) = ptr_in("y", y, shape.elems(), &d, stream)?;
    let (gp, _g3) = ptr_in("gate", gate, fe, &fd, stream)?;
    let (shp, _g4) = ptr_in("shift", shift, fe, &fd, stream)?;
    let (scp, _g5) = ptr_in("scale", scale, fe, &fd, stream)?;
    let (op, _g6) = ptr_out("out", out, shape.elems(), &d, stream)?;
    let p = DitParams {
        x: xp,
        x_out: xp,
        y: yp,
        gate: gp,
        shift: shp,
        scale: scp,
        out: op,
        ..shape.base(eps)
    };
    // SAFETY: as above.
    unsafe { gpu.launch(&k, shape.cfg(), stream, &p) }
}

/// `x = gelu_tanh(x)` in place over all elements (`ops::gelu_tanh`); length % 8 == 0.
#[track_caller]
pub fn gelu_tanh(gpu: &Gpu, stream: &CudaStream, x: &mut impl DevicePtrMut<bf16>) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    if n % 8 != 0 {
        return Err(Error::BadInput(format!(
            "gelu_tanh: {n} elements (must be a multiple of 8)"
        )));
    }
    let k = gpu.kernel("dit_ops", "gelu_tanh_bf16")?;
    let (xp, _g) = dptr_mut(x, stream);
    check_aligned16("x", xp)?;
    let p = DitParams {
        x: xp,
        out: xp,
        n: n as u64,
        ..DitParams::default()
    };
    // A grid of a few waves: grid-stride loop inside.
    let blocks = (n / 8).div_ceil(THREADS as usize).min(132 * 16) as u32;
    let cfg = LaunchCfg {
        grid: (blocks, 1, 1),
        block: (THREADS, 1, 1),
        smem_bytes: 0,
    };
    // SAFETY: as above; n elements checked, each read and written by one thread.
    unsafe { gpu.launch(&k, cfg, stream, &p) }
}

/// Mirror of `LatentParams` in kernels/dit_ops.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LatentParams {
    latent: u64,
    v: u64,
    x_out: u64,
    n: u64,
    dt: f32,
    _pad0: u32,
}
const _: () = assert!(std::mem::size_of::<LatentParams>() == 40);

fn launch_latent(gpu: &Gpu, stream: &CudaStream, p: &LatentParams) -> Result<()> {
    let k = gpu.kernel("dit_ops", "latent_euler_step_bf16")?;
    let n = p.n as usize;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 132 * 16) as u32;
    let cfg = LaunchCfg {
        grid: (blocks, 1, 1),
        block: (THREADS, 1, 1),
        smem_bytes: 0,
    };
    // SAFETY: the callers checked that every pointer holds `n` elements of its type; each
    // element is read and written by one thread (grid-stride loop).
    unsafe { gpu.launch(&k, cfg, stream, p) }
}

/// `x_out = bf16(latent)` (round to nearest even, as `half::bf16::from_f32`): the model's input
/// from a chunk's f32 latent kept on the device.
pub fn latent_to_input(
    gpu: &Gpu,
    stream: &CudaStream,
    latent: &impl DevicePtr<f32>,
    x_out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let n = latent.len();
    let shape = format!("[{n}]");
    check_len("input", x_out.len(), n, &shape)?;
    if n == 0 {
        return Ok(());
    }
    let (lp, _gl) = dptr(latent, stream);
    let (xp, _gx) = dptr_mut(x_out, stream);
    launch_latent(
        gpu,
        stream,
        &LatentParams {
            latent: lp,
            x_out: xp,
            n: n as u64,
            ..LatentParams::default()
        },
    )
}

/// The flow-matching Euler step on the device: `latent += dt · v` in f32 (a product, then a
/// sum, each rounded: the host executor's arithmetic bit for bit), then `x_out = bf16(latent)`,
/// the next call's input. `v` is the call's output (bf16).
pub fn euler_step(
    gpu: &Gpu,
    stream: &CudaStream,
    latent: &mut impl DevicePtrMut<f32>,
    v: &impl DevicePtr<bf16>,
    dt: f32,
    x_out: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let n = latent.len();
    let shape = format!("[{n}]");
    check_len("velocity", v.len(), n, &shape)?;
    check_len("input", x_out.len(), n, &shape)?;
    if !dt.is_finite() {
        return Err(Error::BadInput(format!(
            "euler_step: dt {dt} is not finite"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (lp, _gl) = dptr_mut(latent, stream);
    let (vp, _gv) = dptr(v, stream);
    let (xp, _gx) = dptr_mut(x_out, stream);
    launch_latent(
        gpu,
        stream,
        &LatentParams {
            latent: lp,
            v: vp,
            x_out: xp,
            n: n as u64,
            dt,
            _pad0: 0,
        },
    )
}
