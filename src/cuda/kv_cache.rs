//! Typed launch of the fused RoPE + KV-cache append (kernels/kv_cache.cu), and the ring-slot
//! arithmetic it shares with the host.
//!
//! Contract:
//! - The cache of one layer is `k_cache, v_cache [sink_slots + window_slots, H, D]` bf16. Token
//!   number `n` of the epoch (counted from the epoch's first token) lives in slot
//!   `RingGeometry::slot(n)`: sinks first, then the window wraps. Evicting is moving the host's
//!   idea of the window start: no bytes move. Recompute writes the same slots again.
//! - `kv_append_rope` writes tokens `logical_start .. logical_start + T` of `k_new` (RoPE applied,
//!   `ops::rope_3d` convention, positions from `RopeGrid`) and `v_new` (copied) into their slots,
//!   and optionally applies the same RoPE to Q in the same pass.
//! - One launch never writes one slot twice (checked: the tokens that land in the window are at
//!   most `window_slots`), so the result does not depend on thread order.
//! - Attention then reads the occupied slots `[0, occupied)` as one `[Lk, H, D]` view.
use crate::cuda::context::{check_aligned16, check_len, dptr, dptr_mut, Gpu, LaunchCfg};
use crate::{Error, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

/// Mirror of `KvAppendParams` in kernels/kv_cache.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KvAppendParams {
    pub k_new: u64,
    pub v_new: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub q_in: u64,
    pub q_out: u64,
    pub tokens: u32,
    pub heads: u32,
    pub head_dim: u32,
    pub start_frame: u32,
    pub grid_h: u32,
    pub grid_w: u32,
    pub logical_start: u32,
    pub sink_slots: u32,
    pub window_slots: u32,
    pub _pad0: u32,
    /// Device `u32` added to `start_frame` (0: none); see `kv_append_rope_frame_on_device`.
    pub start_frame_dev: u64,
}
const _: () = assert!(std::mem::size_of::<KvAppendParams>() == 96);

const TOKENS_PER_BLOCK: u32 = 2;
const THREADS: u32 = 256;

/// Ring layout of one layer's cache, in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    pub sink_slots: u32,
    pub window_slots: u32,
}

impl RingGeometry {
    pub fn capacity(&self) -> usize {
        self.sink_slots as usize + self.window_slots as usize
    }

    /// Slot of the epoch's `n`-th token (the kernel computes the same).
    pub fn slot(&self, n: u32) -> Result<u32> {
        if n < self.sink_slots {
            Ok(n)
        } else if self.window_slots == 0 {
            Err(Error::BadInput(format!(
                "kv cache: token {n} is past the {} sink slots and the window is empty",
                self.sink_slots
            )))
        } else {
            Ok(self.sink_slots + (n - self.sink_slots) % self.window_slots)
        }
    }
}

/// Where a chunk's tokens sit in space-time, for RoPE (`ops::token_position`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeGrid {
    pub start_frame: u32,
    pub grid_h: u32,
    pub grid_w: u32,
}

/// Q's RoPE in the same pass: in place, or from `input` into `output`.
pub enum QRope<'a, I: DevicePtr<bf16>, O: DevicePtrMut<bf16>> {
    None,
    InPlace(&'a mut O),
    OutOfPlace { input: &'a I, output: &'a mut O },
}

/// `QRope::None` with concrete types, for calls without Q.
pub type NoQRope<'a> = QRope<'a, cudarc::driver::CudaSlice<bf16>, cudarc::driver::CudaSlice<bf16>>;

/// Enqueues the fused RoPE(K) + append(K, V) (+ RoPE(Q)) for `tokens` new tokens on `stream`.
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn kv_append_rope<I, O>(
    gpu: &Gpu,
    stream: &CudaStream,
    ring: RingGeometry,
    logical_start: u32,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    grid: RopeGrid,
    k_new: &impl DevicePtr<bf16>,
    v_new: &impl DevicePtr<bf16>,
    k_cache: &mut impl DevicePtrMut<bf16>,
    v_cache: &mut impl DevicePtrMut<bf16>,
    q: QRope<'_, I, O>,
) -> Result<()>
where
    I: DevicePtr<bf16>,
    O: DevicePtrMut<bf16>,
{
    kv_append_rope_impl(
        gpu,
        stream,
        ring,
        logical_start,
        tokens,
        heads,
        head_dim,
        grid,
        k_new,
        v_new,
        k_cache,
        v_cache,
        q,
        None,
    )
}

/// `kv_append_rope` with RoPE frames `grid.start_frame + *frame_base + t / tokens_per_frame`:
/// the chunk's first frame is read from device memory when the kernel runs, so a captured CUDA
/// graph replays for any chunk (the host writes `frame_base` before each replay).
#[allow(clippy::too_many_arguments)]
#[track_caller]
pub fn kv_append_rope_frame_on_device<I, O>(
    gpu: &Gpu,
    stream: &CudaStream,
    ring: RingGeometry,
    logical_start: u32,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    grid: RopeGrid,
    k_new: &impl DevicePtr<bf16>,
    v_new: &impl DevicePtr<bf16>,
    k_cache: &mut impl DevicePtrMut<bf16>,
    v_cache: &mut impl DevicePtrMut<bf16>,
    q: QRope<'_, I, O>,
    frame_base: &dyn DevicePtr<u32>,
) -> Result<()>
where
    I: DevicePtr<bf16>,
    O: DevicePtrMut<bf16>,
{
    kv_append_rope_impl(
        gpu,
        stream,
        ring,
        logical_start,
        tokens,
        heads,
        head_dim,
        grid,
        k_new,
        v_new,
        k_cache,
        v_cache,
        q,
        Some(frame_base),
    )
}

#[allow(clippy::too_many_arguments)]
#[track_caller]
fn kv_append_rope_impl<I, O>(
    gpu: &Gpu,
    stream: &CudaStream,
    ring: RingGeometry,
    logical_start: u32,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    grid: RopeGrid,
    k_new: &impl DevicePtr<bf16>,
    v_new: &impl DevicePtr<bf16>,
    k_cache: &mut impl DevicePtrMut<bf16>,
    v_cache: &mut impl DevicePtrMut<bf16>,
    q: QRope<'_, I, O>,
    frame_base: Option<&dyn DevicePtr<u32>>,
) -> Result<()>
where
    I: DevicePtr<bf16>,
    O: DevicePtrMut<bf16>,
{
    if tokens == 0 {
        return Ok(());
    }
    if head_dim % 8 != 0 || head_dim == 0 || head_dim > 256 || heads == 0 {
        return Err(Error::BadInput(format!(
            "kv append: head dim {head_dim} (must be a multiple of 8, <= 256), heads {heads}"
        )));
    }
    if grid.grid_h == 0 || grid.grid_w == 0 {
        return Err(Error::BadInput(format!(
            "kv append: empty RoPE grid {grid:?}"
        )));
    }
    let t32 = u32::try_from(tokens)
        .map_err(|_| Error::BadInput(format!("kv append: {tokens} tokens exceed u32")))?;
    let last = logical_start.checked_add(t32 - 1).ok_or_else(|| {
        Error::BadInput(format!(
            "kv append: token index {logical_start} + {tokens} overflows u32"
        ))
    })?;
    // Distinct slots: at most window_slots tokens may land in the window part.
    let in_window = (last + 1).saturating_sub(logical_start.max(ring.sink_slots));
    if in_window > 0 && in_window > ring.window_slots {
        return Err(Error::BadInput(format!(
            "kv append: {in_window} tokens land in a window of {} slots (ring {ring:?}, tokens {logical_start}..={last}); one launch would overwrite its own writes",
            ring.window_slots
        )));
    }
    let row = heads * head_dim;
    let shape_new = format!("[{tokens}, {heads}, {head_dim}]");
    let shape_cache = format!("[{}, {heads}, {head_dim}]", ring.capacity());
    check_len("kv append k_new", k_new.len(), tokens * row, &shape_new)?;
    check_len("kv append v_new", v_new.len(), tokens * row, &shape_new)?;
    check_len(
        "kv append k_cache",
        k_cache.len(),
        ring.capacity() * row,
        &shape_cache,
    )?;
    check_len(
        "kv append v_cache",
        v_cache.len(),
        ring.capacity() * row,
        &shape_cache,
    )?;
    let kern = gpu.kernel("kv_cache", "kv_append_rope_bf16")?;
    let (kn, _g1) = dptr(k_new, stream);
    let (vn, _g2) = dptr(v_new, stream);
    let (kc, _g3) = dptr_mut(k_cache, stream);
    let (vc, _g4) = dptr_mut(v_cache, stream);
    let (qi, qo, _g5, _g6) = match q {
        QRope::None => (0, 0, None, None),
        QRope::InPlace(buf) => {
            check_len("kv append q", buf.len(), tokens * row, &shape_new)?;
            let (p, g) = dptr_mut(buf, stream);
            (p, p, None, Some(g))
        }
        QRope::OutOfPlace { input, output } => {
            check_len("kv append q_in", input.len(), tokens * row, &shape_new)?;
            check_len("kv append q_out", output.len(), tokens * row, &shape_new)?;
            let (pi, gi) = dptr(input, stream);
            let (po, go) = dptr_mut(output, stream);
            (pi, po, Some(gi), Some(go))
        }
    };
    let (fb, _g7) = match frame_base {
        Some(b) => {
            check_len("kv append frame_base", b.len(), 1, "[1]")?;
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    for (what, p) in [
        ("k_new", kn),
        ("v_new", vn),
        ("k_cache", kc),
        ("v_cache", vc),
        ("q_in", qi),
        ("q_out", qo),
    ] {
        check_aligned16(what, p)?;
    }
    let params = KvAppendParams {
        k_new: kn,
        v_new: vn,
        k_cache: kc,
        v_cache: vc,
        q_in: qi,
        q_out: qo,
        tokens: t32,
        heads: heads as u32,
        head_dim: head_dim as u32,
        start_frame: grid.start_frame,
        grid_h: grid.grid_h,
        grid_w: grid.grid_w,
        logical_start,
        sink_slots: ring.sink_slots,
        window_slots: ring.window_slots,
        _pad0: 0,
        start_frame_dev: fb,
    };
    let cfg = LaunchCfg {
        grid: (t32.div_ceil(TOKENS_PER_BLOCK), 1, 1),
        block: (THREADS, 1, 1),
        smem_bytes: 0,
    };
    // SAFETY: params mirrors the kernel struct; all lengths checked against the shapes the
    // kernel indexes (slots < capacity by the ring arithmetic); guards live past the enqueue.
    unsafe { gpu.launch(&kern, cfg, stream, &params) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_sinks_and_wraps_the_window() {
        let r = RingGeometry {
            sink_slots: 3,
            window_slots: 4,
        };
        let slots: Vec<u32> = (0..12).map(|n| r.slot(n).unwrap_or(u32::MAX)).collect();
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 3]);
        let no_window = RingGeometry {
            sink_slots: 2,
            window_slots: 0,
        };
        assert!(no_window.slot(2).is_err());
    }
}
