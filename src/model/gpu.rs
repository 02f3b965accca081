//! The Wan-style causal DiT on one GPU: bf16 weights and activations, fp32 accumulation; GEMMs
//! through cuBLASLt (`cuda::gemm`, bias and GELU fused in its epilogue, the cross-attention
//! residual accumulated in place), attention, fused RoPE + KV-cache write and the element-wise
//! ops through our kernels (`cuda::{attention, kv_cache, dit_ops}`).
//!
//! Contract:
//! - Built from a `DitShard` (`from_shard`): the same tensors the CPU model computes with, the
//!   head already in the token layout (`model::dit`), rounded once to bf16. The CPU model is the
//!   reference this one is checked against (tests/gpu_model.rs).
//! - The KV cache lives on the device: per layer `[capacity + frames_per_chunk frames,
//!   tokens_per_frame, heads, head_dim]` bf16 — the ledger's slots, plus one chunk of scratch
//!   after them. Which slots a call reads and writes comes from the ledger (`KvCache`), as on
//!   the CPU (docs/manual/22-kv-cache-management.md), and attention reads one contiguous range:
//!   - denoise: the readable slots must be the prefix `[0, r)`; the chunk's K/V go to frames
//!     `[r, r + F)` (free slots or the scratch: never readable), attention over `[0, r + F)`;
//!   - clean pass: the chunk's K/V go to its reserved slots, then attention over the held slots,
//!     which must be the prefix `[0, h)` (= readable after eviction + the chunk);
//!   - recompute: K/V overwrite the recomputed slots (consecutive), attention over them alone.
//!
//!   A ledger whose slots are not laid out so (a window that is not a multiple of the chunk)
//!   is refused with the slots named, never computed wrong. The planner's default (sinks and
//!   window multiples of the chunk) always is.
//! - The timestep embedding and the adaLN modulation (`dim`-sized vectors) are computed on the
//!   host in f32 once per (timestep, frames) and kept on the device; everything per token runs
//!   on the GPU.
//! - Tensor parallel as the CPU model (`model::dit`): each rank holds its heads of the
//!   attention projections and its slice of the FFN (column-parallel in, row-parallel out,
//!   the row-parallel biases on group-rank 0 only so the sum carries them once); per layer
//!   four all-reduces (q/k RMSNorm sums of squares, attention out, cross-attention q sums and
//!   out, FFN out) through the call's `TpComm`. With TP > 1 they are staged through pinned
//!   host buffers (async copies ordered by an event, never a device-wide synchronize): the
//!   path that lets a TP=2 mesh share one GPU over the host data plane, checked against TP=1
//!   (tests/gpu_model.rs). Such calls run eagerly (a host round trip cannot be captured).
//! - Every launch is enqueued on this model's stream; `forward` returns with the output
//!   enqueued, not computed (`cuda-async-execution.md`): a host read of it syncs the stream.
use super::dit::{CacheMode, DitShard, Linear};
use super::tp::TpComm;
use super::DitConfig;
use crate::cache::KvCache;
use crate::cuda::attention::{attention_fwd, AttentionVariant, AttnShape};
use crate::cuda::context::{cuda_err, Gpu};
use crate::cuda::dit_ops::{self, RowShape};
use crate::cuda::gemm::{Epilogue, Gemm, GemmShape};
use crate::cuda::kv_cache::{kv_append_rope_frame_on_device, QRope, RingGeometry, RopeGrid};
use crate::{Error, Result};
use cudarc::driver::{
    sys, CudaEvent, CudaGraph, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    PinnedHostSlice,
};
use half::bf16;
use std::collections::HashMap;
use std::sync::Arc;

/// Timestep modulations kept on the device (each `(layers·6 + 2) · frames · dim` bf16, 1.7 MB
/// at wan-1.3b); a stream uses its denoise timesteps and 0.
const MOD_CACHE_ENTRIES: usize = 16;

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

/// Runs `f` (which allocates model buffers) with cudarc's event tracking off, restoring the
/// context's previous setting after.
fn untracked<R>(ctx: &Arc<cudarc::driver::CudaContext>, f: impl FnOnce() -> R) -> R {
    let tracking = ctx.is_event_tracking();
    // SAFETY: buffers made by `f` are model buffers: allocated, used and freed only on the
    // model's one stream (module contract), so no cross-stream ordering is needed for them.
    unsafe { ctx.disable_event_tracking() };
    let r = f();
    if tracking {
        // SAFETY: restores the previous setting for buffers made after this.
        unsafe { ctx.enable_event_tracking() };
    }
    r
}

/// A linear layer on the device: `w [d_out, d_in]`, bias `[d_out]`.
struct DLinear {
    w: CudaSlice<bf16>,
    b: Option<CudaSlice<bf16>>,
    d_in: usize,
    d_out: usize,
}

impl DLinear {
    fn upload(stream: &Arc<CudaStream>, l: &Linear, bias: Option<&Vec<f32>>) -> Result<Self> {
        let up = |v: &[f32], what: &str| {
            stream
                .clone_htod(&to_bf16(v))
                .map_err(|e| cuda_err(format!("upload {what}"), e))
        };
        let b = match (l.b.as_ref(), bias) {
            (Some(b), _) | (None, Some(b)) => Some(up(b, "bias")?),
            (None, None) => None,
        };
        Ok(Self {
            w: up(&l.w, "weight")?,
            b,
            d_in: l.d_in,
            d_out: l.d_out,
        })
    }
}

/// One block's device weights.
struct GBlock {
    q: DLinear,
    k: DLinear,
    v: DLinear,
    o: DLinear,
    norm_q: CudaSlice<bf16>,
    norm_k: CudaSlice<bf16>,
    cq: DLinear,
    ck: DLinear,
    cv: DLinear,
    co: DLinear,
    cnorm_q: CudaSlice<bf16>,
    cnorm_k: CudaSlice<bf16>,
    ffn1: DLinear,
    ffn2: DLinear,
    /// `[2, frames, dim]`: norm3's bias (shift) and weight − 1 (scale) per frame, so the affine
    /// LayerNorm is `layer_norm_modulate`.
    norm3_mod: CudaSlice<bf16>,
}

/// Activations of one call, allocated once for the largest call (a chunk).
struct Scratch {
    rows: usize,
    x: CudaSlice<bf16>,
    xn: CudaSlice<bf16>,
    q_raw: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    k_raw: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    x_in: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    /// Per call: `[layers, 6, frames, dim]` block modulation + `[2, frames, dim]` head.
    modulation: CudaSlice<bf16>,
}

/// Consecutive cache slots a call writes: frames `chunk_frame..chunk_frame + frames` of the
/// call go to slots `slot..slot + frames`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRun {
    pub slot: u32,
    pub chunk_frame: u32,
    pub frames: u32,
}

/// How one call meets the device cache: where its K/V go, and the slot range attention reads
/// (see the module contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvAccess {
    pub writes: Vec<SlotRun>,
    pub attend: std::ops::Range<u32>,
}

/// Runs of consecutive slots in `slots` (one per frame, in frame order).
fn runs(slots: &[u32]) -> Vec<SlotRun> {
    let mut v: Vec<SlotRun> = Vec::new();
    for (i, &s) in slots.iter().enumerate() {
        match v.last_mut() {
            Some(r) if r.slot + r.frames == s => r.frames += 1,
            _ => v.push(SlotRun {
                slot: s,
                chunk_frame: i as u32,
                frames: 1,
            }),
        }
    }
    v
}

impl KvAccess {
    /// The access of a call in `mode` over `cache`'s ledger, or why the device layout cannot
    /// serve it (never a silently different attended set).
    pub fn from_ledger(mode: CacheMode<'_>, cache: &KvCache, frames: u32) -> Result<Self> {
        let readable = cache.ledger().readable_slots();
        let prefix = |set: &[u32]| set.iter().enumerate().all(|(i, &s)| s == i as u32);
        let refuse = |what: &str| {
            Err(Error::Invariant(format!(
                "GPU kv cache: {what} (readable slots {readable:?}, mode {mode:?}); the device \
                 layout needs the held slots to be a prefix (window and sinks multiples of the \
                 chunk)"
            )))
        };
        match mode {
            CacheMode::Read => {
                if !prefix(&readable) {
                    return refuse("readable slots are not a prefix");
                }
                let r = readable.len() as u32;
                Ok(Self {
                    writes: vec![SlotRun {
                        slot: r,
                        chunk_frame: 0,
                        frames,
                    }],
                    attend: 0..r + frames,
                })
            }
            CacheMode::Append(slots) => {
                let mut held = readable.clone();
                held.extend_from_slice(slots);
                held.sort_unstable();
                if !prefix(&held) || slots.len() != frames as usize {
                    return refuse("readable + reserved slots are not a prefix");
                }
                Ok(Self {
                    writes: runs(slots),
                    attend: 0..held.len() as u32,
                })
            }
            CacheMode::Overwrite(slots) => {
                let r = runs(slots);
                match r.as_slice() {
                    [one] if one.frames == frames => Ok(Self {
                        attend: one.slot..one.slot + frames,
                        writes: r,
                    }),
                    _ => refuse("recomputed slots are not consecutive"),
                }
            }
        }
    }
}

/// The DiT on one GPU.
pub struct GpuDit {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    gemm: Gemm,
    variant: AttentionVariant,
    cfg: DitConfig,
    /// The host shard keeps the `dim`-sized parts (time MLP, modulation vectors).
    host: DitShard,
    patch: DLinear,
    text1: DLinear,
    text2: DLinear,
    head: DLinear,
    blocks: Vec<GBlock>,
    cache_k: Vec<CudaSlice<bf16>>,
    cache_v: Vec<CudaSlice<bf16>>,
    text_k: Vec<CudaSlice<bf16>>,
    text_v: Vec<CudaSlice<bf16>>,
    prompt: Option<u64>,
    s: Scratch,
    /// The chunk's first frame, read by the RoPE kernel (so a graph replays for any chunk).
    frame_base: CudaSlice<u32>,
    /// Where `frame_base` is uploaded from: page-locked slots, never a pageable copy.
    frame_ring: PinnedRing,
    /// Captured calls by how they meet the cache (`None`: graphs off).
    graphs: Option<HashMap<GraphKey, OwnedGraph>>,
    /// Group rank and size of this shard.
    tp_rank: usize,
    tp: usize,
    /// TP > 1: the all-reduces' device and pinned host buffers.
    reduce: Option<TpBuffers>,
    /// Pinned host sides of what crosses the host every call: the modulation (up), and for
    /// host callers (`forward_host`) the latents in and out.
    pinned_mod: PinnedStage<bf16>,
    /// Device modulation by (t, frames), at most `MOD_CACHE_ENTRIES`.
    mod_cache: HashMap<(u32, usize), CudaSlice<bf16>>,
    pinned_in: PinnedStage<bf16>,
    pinned_out: PinnedStage<bf16>,
    /// The chunk's latent kept on the device between its calls (`load_latent` … `read_latent`):
    /// f32 `[rows, in_dim]`, its first `latent_len` values live.
    latent: CudaSlice<f32>,
    latent_len: usize,
    pinned_latent: PinnedStage<f32>,
    /// Whether `s.x_in` holds `bf16(latent)` (a host input or `input_mut` overwrites it).
    input_is_latent: bool,
    /// Whether `s.out` holds the output of a call on the latent not yet stepped with.
    out_of_latent: bool,
}

/// What a TP > 1 forward needs besides the TP = 1 scratch.
struct TpBuffers {
    /// `[2 · max(rows, text_tokens)]` f32: per-row sums of squares of the distributed RMSNorm.
    sumsq: CudaSlice<f32>,
    /// `[frames, dim]` of ones: the cross-attention residual's gate once it is all-reduced.
    ones: CudaSlice<bf16>,
    staging: HostStaging,
}

/// A page-locked host buffer the model's stream copies to and from, with the event of its
/// last copy: the host touches it only after that copy completed (`host`), never through a
/// device-wide or stream-wide synchronize, and copies from it are truly asynchronous.
struct PinnedStage<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> {
    stream: Arc<CudaStream>,
    buf: PinnedHostSlice<T>,
    last_copy: CudaEvent,
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> PinnedStage<T> {
    fn new(stream: &Arc<CudaStream>, elems: usize, what: &str) -> Result<Self> {
        let ctx = stream.context();
        // SAFETY: page-locked, not write-combined (the host reads it); no element is read
        // before a download or the host wrote it.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<T>(elems, 0) }
            .map_err(|e| cuda_err(format!("pinned {what} ({elems} elements)"), e))?;
        let last_copy = ctx
            .new_event(None)
            .map_err(|e| cuda_err(format!("event for pinned {what}"), e))?;
        Ok(Self {
            stream: stream.clone(),
            buf,
            last_copy,
        })
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    /// The host side, once the last copy to or from it has completed.
    fn host(&mut self, what: &str) -> Result<&mut [T]> {
        self.last_copy
            .synchronize()
            .map_err(|e| cuda_err(format!("wait for the {what} copy"), e))?;
        self.buf
            .as_mut_slice()
            .map_err(|e| cuda_err(format!("pinned {what}"), e))
    }

    fn mark(&self, what: &str) -> Result<()> {
        self.last_copy
            .record(&self.stream)
            .map_err(|e| cuda_err(format!("record the {what} copy"), e))
    }

    /// Enqueues device → `[..src.len()]`.
    fn download(&mut self, src: &impl DevicePtr<T>, what: &str) -> Result<()> {
        if src.len() > self.len() {
            return Err(Error::Invariant(format!(
                "download of {what}: {} values, pinned stage holds {}",
                src.len(),
                self.len()
            )));
        }
        self.stream
            .memcpy_dtoh(src, &mut self.buf)
            .map_err(|e| cuda_err(format!("download {what}"), e))?;
        self.mark(what)
    }

    /// Enqueues `[..dst.len()]` → device.
    fn upload(&mut self, dst: &mut CudaViewMut<'_, T>, what: &str) -> Result<()> {
        let n = dst.len();
        if n > self.len() {
            return Err(Error::Invariant(format!(
                "upload of {what}: {n} values, pinned stage holds {}",
                self.len()
            )));
        }
        self.last_copy
            .synchronize()
            .map_err(|e| cuda_err(format!("wait for the {what} copy"), e))?;
        let src = self
            .buf
            .as_slice()
            .map_err(|e| cuda_err(format!("pinned {what}"), e))?;
        self.stream
            .memcpy_htod(&src[..n], dst)
            .map_err(|e| cuda_err(format!("upload {what}"), e))?;
        self.mark(what)
    }
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Drop for PinnedStage<T> {
    fn drop(&mut self) {
        // A copy may still be in flight: the host memory outlives it.
        if let Err(e) = self.last_copy.synchronize() {
            tracing::warn!("pinned stage dropped while its last copy failed: {e}");
        }
    }
}

/// Per-call scalars (the chunk's first frame) uploaded from page-locked memory: a ring of
/// slots, each with the event of its last copy, reused `RING_SLOTS` uploads later. The host
/// waits only if the copy from that many calls ago has not run yet (never, in a stream that
/// keeps a few calls in flight), never on the call before, and the copy is a true async DMA
/// (a pageable source may make the driver synchronize with the stream).
struct PinnedRing {
    stream: Arc<CudaStream>,
    buf: PinnedHostSlice<u32>,
    events: Vec<CudaEvent>,
    next: usize,
}

const RING_SLOTS: usize = 32;

impl PinnedRing {
    fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        // SAFETY: page-locked, not write-combined; a slot is written by the host only after
        // its last copy's event completed.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u32>(RING_SLOTS, 0) }
            .map_err(|e| cuda_err("pinned per-call scalars", e))?;
        let events = (0..RING_SLOTS)
            .map(|_| {
                ctx.new_event(None)
                    .map_err(|e| cuda_err("event for a pinned scalar slot", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stream: stream.clone(),
            buf,
            events,
            next: 0,
        })
    }

    /// Enqueues `value` → `dst[0]` on the stream.
    fn upload(&mut self, value: u32, dst: &mut CudaSlice<u32>) -> Result<()> {
        let i = self.next % RING_SLOTS;
        self.next = self.next.wrapping_add(1);
        let ev = &self.events[i];
        // An event never recorded counts as complete.
        ev.synchronize()
            .map_err(|e| cuda_err("wait for a pinned scalar slot", e))?;
        let host = self
            .buf
            .as_mut_slice()
            .map_err(|e| cuda_err("pinned per-call scalars", e))?;
        host[i] = value;
        let src = self
            .buf
            .as_slice()
            .map_err(|e| cuda_err("pinned per-call scalars", e))?;
        self.stream
            .memcpy_htod(&src[i..i + 1], &mut dst.slice_mut(..1))
            .map_err(|e| cuda_err("upload a per-call scalar", e))?;
        ev.record(&self.stream)
            .map_err(|e| cuda_err("record a pinned scalar copy", e))
    }
}

impl Drop for PinnedRing {
    fn drop(&mut self) {
        // Copies may still be in flight: the host memory outlives them.
        for e in &self.events {
            if let Err(e) = e.synchronize() {
                tracing::warn!("pinned scalar ring dropped while a copy failed: {e}");
            }
        }
    }
}

/// The pinned buffers through which a TP > 1 all-reduce crosses the host: download, the sum
/// over the group in f32 on the host, upload (all on the model's stream).
struct HostStaging {
    b16: PinnedStage<bf16>,
    f32: PinnedStage<f32>,
    host: Vec<f32>,
}

impl HostStaging {
    fn new(stream: &Arc<CudaStream>, bf16_elems: usize, f32_elems: usize) -> Result<Self> {
        Ok(Self {
            b16: PinnedStage::new(stream, bf16_elems, "all-reduce staging")?,
            f32: PinnedStage::new(stream, f32_elems, "all-reduce staging")?,
            host: Vec::new(),
        })
    }

    fn all_reduce_bf16(
        &mut self,
        comm: &mut dyn TpComm,
        buf: &mut CudaViewMut<'_, bf16>,
        what: &str,
    ) -> Result<()> {
        let n = buf.len();
        self.b16.download(buf, what)?;
        let pinned = self.b16.host(what)?;
        self.host.clear();
        self.host.extend(pinned[..n].iter().map(|v| v.to_f32()));
        comm.all_reduce_sum(&mut self.host)?;
        for (p, v) in pinned[..n].iter_mut().zip(&self.host) {
            *p = bf16::from_f32(*v);
        }
        self.b16.upload(buf, what)
    }

    fn all_reduce_f32(
        &mut self,
        comm: &mut dyn TpComm,
        buf: &mut CudaViewMut<'_, f32>,
        what: &str,
    ) -> Result<()> {
        let n = buf.len();
        self.f32.download(buf, what)?;
        comm.all_reduce_sum(&mut self.f32.host(what)?[..n])?;
        self.f32.upload(buf, what)
    }
}

/// A captured graph owned by one model. CUDA graph handles are not tied to a thread; the
/// driver asks only that calls on one graph be serialized, which a single owner (`&mut`
/// access through `GpuDit`) guarantees. So the model may move to another thread (`Send`), and
/// is never shared (`Sync` is not claimed).
struct OwnedGraph(CudaGraph);

// SAFETY: see the type's comment: moved, never shared; every use goes through its one owner.
unsafe impl Send for OwnedGraph {}

/// What a captured call depends on besides device memory: its frame count, where its K/V go
/// and the key range attention reads. Everything else a call changes (input, modulation, the
/// chunk's first frame) is written to device memory before the replay.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    frames: usize,
    writes: Vec<(u32, u32, u32)>,
    attend: (u32, u32),
}

impl GraphKey {
    fn of(frames: usize, kv: &KvAccess) -> Self {
        Self {
            frames,
            writes: kv
                .writes
                .iter()
                .map(|r| (r.slot, r.chunk_frame, r.frames))
                .collect(),
            attend: (kv.attend.start, kv.attend.end),
        }
    }
}

/// The collectives of one call: none at TP = 1; at TP > 1 staged through the model's
/// buffers and the caller's `TpComm`, in the same order on every rank.
struct Reducer<'a> {
    comm: &'a mut dyn TpComm,
    bufs: Option<&'a mut TpBuffers>,
    /// The model's stream: device-path sums are enqueued here, after the kernels that wrote
    /// their operands.
    stream: Arc<CudaStream>,
}

/// One distributed RMSNorm operand: input, weight (this rank's part), output.
type NormItem<'x, 'a, 'b> = (
    &'x CudaView<'a, bf16>,
    &'x CudaSlice<bf16>,
    &'x mut CudaViewMut<'b, bf16>,
);

impl Reducer<'_> {
    /// RMSNorm over all heads of each item: at TP = 1 the row's own sum; at TP > 1 the local
    /// sums of squares of all items in one all-reduce, then each normalized over `total_dim`.
    fn rms_norm<const N: usize>(
        &mut self,
        gpu: &Gpu,
        st: &Arc<CudaStream>,
        shape: RowShape,
        items: [NormItem<'_, '_, '_>; N],
        total_dim: usize,
        eps: f32,
    ) -> Result<()> {
        let Some(b) = self.bufs.as_mut() else {
            for (x, w, out) in items {
                dit_ops::rms_norm(gpu, st, shape, x, w, None, eps, out)?;
            }
            return Ok(());
        };
        let rows = shape.rows;
        for (i, (x, _, _)) in items.iter().enumerate() {
            let mut part = b.sumsq.slice_mut(i * rows..(i + 1) * rows);
            dit_ops::rms_sum_squares(gpu, st, shape, *x, &mut part)?;
        }
        let mut sums = b.sumsq.slice_mut(..N * rows);
        if self.comm.has_device_path() {
            self.comm.device_all_reduce_f32(st, &mut sums)?;
        } else {
            b.staging
                .all_reduce_f32(&mut *self.comm, &mut sums, "RMSNorm sums of squares")?;
        }
        for (i, (x, w, out)) in items.into_iter().enumerate() {
            let ss = b.sumsq.slice(i * rows..(i + 1) * rows);
            dit_ops::rms_norm(gpu, st, shape, x, w, Some((&ss, total_dim)), eps, out)?;
        }
        Ok(())
    }

    /// Sums a row-parallel output over the group (identity at TP = 1): on the model's stream
    /// through the group's device path (NCCL, in place), else staged through pinned host memory.
    fn all_reduce(&mut self, buf: &mut CudaViewMut<'_, bf16>, what: &str) -> Result<()> {
        match self.bufs.as_mut() {
            None => Ok(()),
            Some(_) if self.comm.has_device_path() => {
                self.comm.device_all_reduce_bf16(&self.stream, buf)
            }
            Some(b) => b.staging.all_reduce_bf16(&mut *self.comm, buf, what),
        }
    }

    /// `x += y` (the gate of ones), for a residual whose product was all-reduced.
    fn residual_add(
        &mut self,
        gpu: &Gpu,
        st: &Arc<CudaStream>,
        shape: RowShape,
        x: &mut CudaViewMut<'_, bf16>,
        y: &CudaSlice<bf16>,
    ) -> Result<()> {
        let b = self
            .bufs
            .as_ref()
            .ok_or_else(|| Error::Invariant("residual_add at TP = 1".into()))?;
        let fd = shape.rows / shape.tokens_per_frame * shape.dim;
        let n = shape.rows * shape.dim;
        dit_ops::gated_residual(gpu, st, shape, x, &y.slice(..n), &b.ones.slice(..fd))
    }
}

impl GpuDit {
    /// Uploads `shard` (group rank `shard.rank` of `shard.tp`) to `gpu`; attention runs
    /// `variant`.
    pub fn from_shard(gpu: Arc<Gpu>, shard: DitShard, variant: AttentionVariant) -> Result<Self> {
        let cfg = shard.config().clone();
        if cfg.head_dim != 128 {
            return Err(Error::BadInput(format!(
                "the GPU model's attention kernels need head_dim 128 (preset {} has {})",
                cfg.name, cfg.head_dim
            )));
        }
        // Every buffer of the model lives and is used on its one stream, so cudarc's
        // cross-stream event tracking has nothing to order; it is off for them because an event
        // recorded outside a CUDA-graph capture cannot be waited on inside one.
        let ctx = gpu.context().clone();
        untracked(&ctx, || Self::build(gpu, shard, variant))
    }

    fn build(gpu: Arc<Gpu>, shard: DitShard, variant: AttentionVariant) -> Result<Self> {
        let cfg = shard.config().clone();
        let stream = gpu.new_stream()?;
        let gemm = Gemm::new(stream.clone())?;
        let st = &stream;
        let up = |v: &[f32], what: &str| -> Result<CudaSlice<bf16>> {
            st.clone_htod(&to_bf16(v))
                .map_err(|e| cuda_err(format!("upload {what}"), e))
        };
        let f = cfg.frames_per_chunk.max(cfg.sink_frames as usize);
        let d = cfg.dim;
        let (tp_rank, tp) = (shard.rank, shard.tp);
        // Row-parallel biases are added once: by group-rank 0, before the sum.
        let once = |b: &Option<Vec<f32>>| b.clone().filter(|_| tp_rank == 0);
        let blocks = shard
            .blocks
            .iter()
            .map(|b| -> Result<GBlock> {
                let mut n3 = Vec::with_capacity(2 * f * d);
                for _ in 0..f {
                    n3.extend_from_slice(&b.norm3_b);
                }
                for _ in 0..f {
                    n3.extend(b.norm3_w.iter().map(|w| w - 1.0));
                }
                Ok(GBlock {
                    q: DLinear::upload(st, &b.q, None)?,
                    k: DLinear::upload(st, &b.k, None)?,
                    v: DLinear::upload(st, &b.v, None)?,
                    o: DLinear::upload(st, &b.o, once(&b.o_bias).as_ref())?,
                    norm_q: up(&b.norm_q, "norm_q")?,
                    norm_k: up(&b.norm_k, "norm_k")?,
                    cq: DLinear::upload(st, &b.cq, None)?,
                    ck: DLinear::upload(st, &b.ck, None)?,
                    cv: DLinear::upload(st, &b.cv, None)?,
                    co: DLinear::upload(st, &b.co, once(&b.co_bias).as_ref())?,
                    cnorm_q: up(&b.cnorm_q, "cnorm_q")?,
                    cnorm_k: up(&b.cnorm_k, "cnorm_k")?,
                    ffn1: DLinear::upload(st, &b.ffn1, None)?,
                    ffn2: DLinear::upload(st, &b.ffn2, once(&b.ffn2_bias).as_ref())?,
                    norm3_mod: up(&n3, "norm3")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = f * cfg.tokens_per_frame();
        // This rank's heads and FFN slice.
        let row_kv = cfg.heads / tp * cfg.head_dim;
        let ffn = cfg.ffn_dim / tp;
        let cap = (cfg.sink_frames + cfg.window_frames) as usize + cfg.frames_per_chunk;
        let zeros = |n: usize, what: &str| -> Result<CudaSlice<bf16>> {
            st.alloc_zeros::<bf16>(n)
                .map_err(|e| cuda_err(format!("alloc {what} ({n} bf16)"), e))
        };
        let cache_elems = cap * cfg.tokens_per_frame() * row_kv;
        let mut cache_k = Vec::new();
        let mut cache_v = Vec::new();
        for _ in 0..cfg.layers {
            cache_k.push(zeros(cache_elems, "kv cache K")?);
            cache_v.push(zeros(cache_elems, "kv cache V")?);
        }
        let s = Scratch {
            rows,
            x: zeros(rows * d, "x")?,
            xn: zeros(rows * d, "xn")?,
            q_raw: zeros(rows * row_kv, "q_raw")?,
            q: zeros(rows * row_kv, "q")?,
            k_raw: zeros(rows * row_kv, "k_raw")?,
            k: zeros(rows * row_kv, "k")?,
            v: zeros(rows * row_kv, "v")?,
            attn: zeros(rows * row_kv, "attn")?,
            y: zeros(rows * d, "y")?,
            h: zeros(rows * ffn, "ffn hidden")?,
            x_in: zeros(rows * cfg.in_dim(), "x_in")?,
            out: zeros(rows * cfg.in_dim(), "out")?,
            modulation: zeros((cfg.layers * 6 + 2) * f * d, "modulation")?,
        };
        let reduce = if tp > 1 {
            let big = rows.max(cfg.text_tokens);
            Some(TpBuffers {
                sumsq: st
                    .alloc_zeros::<f32>(2 * big)
                    .map_err(|e| cuda_err("alloc sums of squares", e))?,
                ones: st
                    .clone_htod(&vec![bf16::ONE; f * d])
                    .map_err(|e| cuda_err("upload ones", e))?,
                staging: HostStaging::new(st, rows * d, 2 * big)?,
            })
        } else {
            None
        };
        Ok(Self {
            tp_rank,
            tp,
            reduce,
            pinned_mod: PinnedStage::new(st, (cfg.layers * 6 + 2) * f * d, "modulation")?,
            mod_cache: HashMap::new(),
            pinned_in: PinnedStage::new(st, rows * cfg.in_dim(), "generator input")?,
            pinned_out: PinnedStage::new(st, rows * cfg.in_dim(), "generator output")?,
            latent: st
                .alloc_zeros::<f32>(rows * cfg.in_dim())
                .map_err(|e| cuda_err("alloc latent", e))?,
            latent_len: 0,
            pinned_latent: PinnedStage::new(st, rows * cfg.in_dim(), "latent")?,
            input_is_latent: false,
            out_of_latent: false,
            patch: DLinear::upload(st, &shard.patch, None)?,
            text1: DLinear::upload(st, &shard.text1, None)?,
            text2: DLinear::upload(st, &shard.text2, None)?,
            head: DLinear::upload(st, &shard.head, None)?,
            blocks,
            cache_k,
            cache_v,
            text_k: Vec::new(),
            text_v: Vec::new(),
            prompt: None,
            s,
            frame_ring: PinnedRing::new(st)?,
            frame_base: st
                .alloc_zeros::<u32>(1)
                .map_err(|e| cuda_err("alloc frame base", e))?,
            graphs: None,
            gpu,
            gemm,
            variant,
            cfg,
            host: shard,
            stream,
        })
    }

    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn linear(
        gemm: &mut Gemm,
        l: &DLinear,
        rows: usize,
        x: &impl DevicePtr<bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        epilogue: Epilogue,
        accumulate: bool,
    ) -> Result<()> {
        let shape = GemmShape {
            rows,
            d_in: l.d_in,
            d_out: l.d_out,
        };
        let b = l.b.as_ref().map(|b| b as &dyn DevicePtr<bf16>);
        gemm.linear(shape, x, &l.w, b, y, epilogue, accumulate)
    }

    /// A row-parallel projection: this rank's partial product, summed over the group (at TP > 1;
    /// the bias rides on group-rank 0's partial).
    #[allow(clippy::too_many_arguments)]
    fn row_parallel(
        gemm: &mut Gemm,
        red: &mut Reducer<'_>,
        l: &DLinear,
        rows: usize,
        x: &impl DevicePtr<bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        what: &str,
    ) -> Result<()> {
        Self::linear(gemm, l, rows, x, y, Epilogue::None, false)?;
        red.all_reduce(y, what)
    }

    /// The prompt's text K/V, once per prompt: embedding (GELU fused), then per layer K
    /// (RMSNorm over all heads) and V.
    /// With TP > 1 every rank of the group calls it (the norm's all-reduces go through `comm`).
    pub fn set_prompt(&mut self, comm: &mut dyn TpComm, prompt_seed: u64) -> Result<()> {
        if self.prompt == Some(prompt_seed) {
            return Ok(());
        }
        let feats = super::dit::prompt_features(&self.cfg, prompt_seed);
        self.set_prompt_features(comm, prompt_seed, &feats)
    }

    /// The text K/V from features `[text_tokens, text_dim]` (a caller's conditioning tensor's
    /// values, or a seed's), kept under `key`; always computed (the caller keeps track).
    pub fn set_prompt_features(
        &mut self,
        comm: &mut dyn TpComm,
        key: u64,
        feats: &[f32],
    ) -> Result<()> {
        let want = self.cfg.text_tokens * self.cfg.text_dim;
        if feats.len() != want {
            return Err(Error::Invariant(format!(
                "text features of {} values, the model takes {want}",
                feats.len()
            )));
        }
        // The text K/V are read inside captured graphs: untracked like every model buffer.
        let ctx = self.gpu.context().clone();
        untracked(&ctx, || self.make_text_kv(comm, key, feats))
    }

    fn make_text_kv(
        &mut self,
        comm: &mut dyn TpComm,
        prompt_seed: u64,
        feats: &[f32],
    ) -> Result<()> {
        let c = self.cfg.clone();
        let lt = c.text_tokens;
        let st = self.stream.clone();
        let feats = st
            .clone_htod(&to_bf16(feats))
            .map_err(|e| cuda_err("upload prompt features", e))?;
        let alloc = |n: usize| {
            st.alloc_zeros::<bf16>(n)
                .map_err(|e| cuda_err("alloc text activations", e))
        };
        let mut ctx1 = alloc(lt * c.dim)?;
        let mut ctx = alloc(lt * c.dim)?;
        Self::linear(
            &mut self.gemm,
            &self.text1,
            lt,
            &feats,
            &mut ctx1.slice_mut(..),
            Epilogue::Gelu,
            false,
        )?;
        Self::linear(
            &mut self.gemm,
            &self.text2,
            lt,
            &ctx1,
            &mut ctx.slice_mut(..),
            Epilogue::None,
            false,
        )?;
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        let local = c.heads / self.tp * c.head_dim;
        let mut k_raw = alloc(lt * local)?;
        for b in &self.blocks {
            let mut k = alloc(lt * local)?;
            let mut v = alloc(lt * local)?;
            Self::linear(
                &mut self.gemm,
                &b.ck,
                lt,
                &ctx,
                &mut k_raw.slice_mut(..),
                Epilogue::None,
                false,
            )?;
            let shape = RowShape {
                rows: lt,
                dim: local,
                tokens_per_frame: lt,
            };
            let mut red = Reducer {
                comm: &mut *comm,
                bufs: self.reduce.as_mut(),
                stream: st.clone(),
            };
            red.rms_norm(
                &self.gpu,
                &st,
                shape,
                [(&k_raw.slice(..), &b.cnorm_k, &mut k.slice_mut(..))],
                c.dim,
                c.eps,
            )?;
            Self::linear(
                &mut self.gemm,
                &b.cv,
                lt,
                &ctx,
                &mut v.slice_mut(..),
                Epilogue::None,
                false,
            )?;
            ks.push(k);
            vs.push(v);
        }
        self.text_k = ks;
        self.text_v = vs;
        self.prompt = Some(prompt_seed);
        Ok(())
    }

    /// Puts the call's modulation in place: per layer the six `[frames, dim]` adaLN tensors
    /// (`modulation + e0`), then the head's shift and scale (`head.modulation + e`). They
    /// depend only on (t, frames), and a stream uses a handful of timesteps, so each is computed
    /// on the host once, uploaded once (pinned) and kept on the device; a call copies its
    /// tensors device to device into the buffer the kernels (and captured graphs) read.
    fn upload_modulation(&mut self, t: u32, frames: usize) -> Result<()> {
        let key = (t, frames);
        if !self.mod_cache.contains_key(&key) {
            // Bounded: a caller that sweeps timesteps recomputes instead of growing forever.
            if self.mod_cache.len() >= MOD_CACHE_ENTRIES {
                self.mod_cache.clear();
            }
            let ctx = self.gpu.context().clone();
            let dev = untracked(&ctx, || self.compute_modulation(t, frames))?;
            self.mod_cache.insert(key, dev);
        }
        let src = self
            .mod_cache
            .get(&key)
            .ok_or_else(|| Error::Invariant("modulation cache entry vanished".into()))?;
        let n = src.len();
        self.stream
            .memcpy_dtod(src, &mut self.s.modulation.slice_mut(..n))
            .map_err(|e| cuda_err("copy the modulation", e))
    }

    /// The modulation of (t, frames), computed on the host (f32) and uploaded through pinned
    /// memory into a new device buffer.
    fn compute_modulation(&mut self, t: u32, frames: usize) -> Result<CudaSlice<bf16>> {
        let d = self.cfg.dim;
        let (e, e0) = self.host.time_embedding(t);
        let mut m: Vec<f32> = Vec::with_capacity((self.cfg.layers * 6 + 2) * frames * d);
        for b in &self.host.blocks {
            for i in 0..6 {
                let part: Vec<f32> = (0..d)
                    .map(|j| b.modulation[i * d + j] + e0[i * d + j])
                    .collect();
                for _ in 0..frames {
                    m.extend_from_slice(&part);
                }
            }
        }
        for i in 0..2 {
            let part: Vec<f32> = (0..d)
                .map(|j| self.host.head_mod[i * d + j] + e[j])
                .collect();
            for _ in 0..frames {
                m.extend_from_slice(&part);
            }
        }
        let n = m.len();
        let mut dev = self
            .stream
            .alloc_zeros::<bf16>(n)
            .map_err(|e| cuda_err(format!("alloc modulation ({n} bf16)"), e))?;
        // Through pinned memory: waits only for the previous modulation upload.
        let host = self.pinned_mod.host("modulation")?;
        for (h, v) in host[..n].iter_mut().zip(&m) {
            *h = bf16::from_f32(*v);
        }
        self.pinned_mod
            .upload(&mut dev.slice_mut(..), "modulation")?;
        Ok(dev)
    }

    /// The input buffer of the next call (`[rows, in_dim]` bf16): a caller (or a receive)
    /// fills its first `frames · tokens_per_frame` rows.
    pub fn input_mut(&mut self) -> CudaViewMut<'_, bf16> {
        self.input_is_latent = false;
        self.out_of_latent = false;
        self.s.x_in.slice_mut(..)
    }

    /// One generator call on device data: the first `frames · tokens_per_frame` rows of the
    /// input buffer (`input_mut`) at timestep `t`, chunk starting at logical frame
    /// `start_frame`; `kv` says where its K/V go and what attention reads. Returns a view of
    /// the output `[rows, in_dim]` (valid until the next call), enqueued on `stream()`. With
    /// TP > 1 every rank of the group makes the same call (its all-reduces go through `comm`);
    /// at TP = 1 `comm` is not used.
    pub fn forward_device(
        &mut self,
        frames: usize,
        start_frame: u64,
        t: u32,
        kv: &KvAccess,
        comm: &mut dyn TpComm,
    ) -> Result<CudaView<'_, bf16>> {
        // This call overwrites the output an Euler step would read.
        self.out_of_latent = false;
        let c = self.cfg.clone();
        let rows = frames * c.tokens_per_frame();
        if rows > self.s.rows || frames == 0 {
            return Err(Error::Invariant(format!(
                "GPU generator call of {frames} frames; sized for {} rows",
                self.s.rows
            )));
        }
        let cap = (c.sink_frames + c.window_frames) as usize + c.frames_per_chunk;
        let lk_range = kv.attend.start as usize..kv.attend.end as usize;
        let fits = kv.writes.iter().all(|r| {
            (r.slot + r.frames) as usize <= cap && (r.chunk_frame + r.frames) as usize <= frames
        });
        if lk_range.end > cap || lk_range.is_empty() || !fits {
            return Err(Error::Invariant(format!(
                "GPU kv cache: {kv:?} for a call of {frames} frames does not fit {cap} frame slots"
            )));
        }
        self.upload_modulation(t, frames)?;
        let sf = u32::try_from(start_frame)
            .map_err(|_| Error::Invariant(format!("start frame {start_frame} exceeds u32")))?;
        let st = self.stream.clone();
        self.frame_ring.upload(sf, &mut self.frame_base)?;
        let key = GraphKey::of(frames, kv);
        // A TP > 1 call crosses the host for its all-reduces: it cannot be captured.
        let graphs = self.graphs.as_ref().filter(|_| self.reduce.is_none());
        match graphs.map(|g| g.contains_key(&key)) {
            None => self.enqueue_call(frames, kv, comm)?,
            Some(true) => {
                let g = self
                    .graphs
                    .as_ref()
                    .and_then(|g| g.get(&key))
                    .ok_or_else(|| Error::Invariant("captured graph vanished".into()))?;
                g.0.launch()
                    .map_err(|e| cuda_err("cuGraphLaunch (generator call)", e))?;
            }
            Some(false) => {
                // First call of this kind: run it eagerly (warms the GEMM plans, kernel
                // attributes and clocks), then capture it for every later call.
                self.enqueue_call(frames, kv, comm)?;
                st.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| cuda_err("cuStreamBeginCapture", e))?;
                let r = self.enqueue_call(frames, kv, comm);
                let g = st.end_capture(sys::CUgraphInstantiate_flags(0));
                r?;
                let g = g
                    .map_err(|e| cuda_err("cuStreamEndCapture / instantiate", e))?
                    .ok_or_else(|| Error::Cuda("stream capture produced no graph".into()))?;
                if let Some(m) = self.graphs.as_mut() {
                    m.insert(key, OwnedGraph(g));
                }
            }
        }
        let on = rows * c.in_dim();
        Ok(self.s.out.slice(..on))
    }

    /// Captured graphs so far (`None`: graphs off, or TP > 1 where calls run eagerly).
    pub fn captured_graphs(&self) -> Option<usize> {
        self.graphs
            .as_ref()
            .filter(|_| self.reduce.is_none())
            .map(HashMap::len)
    }

    /// Turns CUDA graphs on (each distinct kind of call is captured at its first use and
    /// replayed after) or off (every call launched kernel by kernel; drops the captured set).
    /// At TP > 1 (all-reduces staged through the host) calls stay eager either way.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs = on.then(HashMap::new);
    }

    /// This shard's group rank and group size.
    pub fn tp(&self) -> (usize, usize) {
        (self.tp_rank, self.tp)
    }

    /// Enqueues one call's kernels (eagerly, or into a capture); reads the input buffer, the
    /// modulation and the frame base from device memory.
    fn enqueue_call(&mut self, frames: usize, kv: &KvAccess, comm: &mut dyn TpComm) -> Result<()> {
        let c = self.cfg.clone();
        let (d, hd, tpf) = (c.dim, c.head_dim, c.tokens_per_frame());
        let rows = frames * tpf;
        // This rank's heads and FFN slice.
        let heads = c.heads / self.tp;
        let ffn = c.ffn_dim / self.tp;
        let fe_tok = heads * hd;
        let mut red = Reducer {
            comm,
            bufs: self.reduce.as_mut(),
            stream: self.stream.clone(),
        };
        let frame_elems = tpf * fe_tok;
        let lk_range = kv.attend.start as usize..kv.attend.end as usize;
        let gpu = self.gpu.clone();
        let st = self.stream.clone();
        let shape = RowShape {
            rows,
            dim: d,
            tokens_per_frame: tpf,
        };
        let fd = frames * d;
        let s = &mut self.s;
        let gemm = &mut self.gemm;
        // Patch embedding.
        Self::linear(
            gemm,
            &self.patch,
            rows,
            &s.x_in.slice(..rows * c.in_dim()),
            &mut s.x.slice_mut(..rows * d),
            Epilogue::None,
            false,
        )?;
        let scale = 1.0 / (hd as f32).sqrt();
        let rk = rows * fe_tok;
        for (li, b) in self.blocks.iter().enumerate() {
            let mo = |i: usize| li * 6 * fd + i * fd;
            let m = &s.modulation;
            // Self-attention.
            dit_ops::layer_norm_modulate(
                &gpu,
                &st,
                shape,
                &s.x.slice(..rows * d),
                &m.slice(mo(0)..mo(0) + fd),
                &m.slice(mo(1)..mo(1) + fd),
                c.eps,
                &mut s.xn.slice_mut(..rows * d),
            )?;
            let xn = s.xn.slice(..rows * d);
            Self::linear(
                gemm,
                &b.q,
                rows,
                &xn,
                &mut s.q_raw.slice_mut(..rk),
                Epilogue::None,
                false,
            )?;
            Self::linear(
                gemm,
                &b.k,
                rows,
                &xn,
                &mut s.k_raw.slice_mut(..rk),
                Epilogue::None,
                false,
            )?;
            Self::linear(
                gemm,
                &b.v,
                rows,
                &xn,
                &mut s.v.slice_mut(..rk),
                Epilogue::None,
                false,
            )?;
            let qshape = RowShape {
                rows,
                dim: fe_tok,
                tokens_per_frame: tpf,
            };
            red.rms_norm(
                &gpu,
                &st,
                qshape,
                [
                    (&s.q_raw.slice(..rk), &b.norm_q, &mut s.q.slice_mut(..rk)),
                    (&s.k_raw.slice(..rk), &b.norm_k, &mut s.k.slice_mut(..rk)),
                ],
                d,
                c.eps,
            )?;
            // RoPE(Q) in place and RoPE(K) + V into the cache frames, one launch per run of
            // consecutive slots.
            for r in &kv.writes {
                let (slot0, f0, nf) = (r.slot as usize, r.chunk_frame as usize, r.frames as usize);
                let toks = nf * tpf;
                let (ta, tb) = (f0 * tpf, (f0 + nf) * tpf);
                let (ca, cb) = (slot0 * frame_elems, (slot0 + nf) * frame_elems);
                let mut qv = s.q.slice_mut(ta * fe_tok..tb * fe_tok);
                kv_append_rope_frame_on_device(
                    &gpu,
                    &st,
                    RingGeometry {
                        sink_slots: toks as u32,
                        window_slots: 0,
                    },
                    0,
                    toks,
                    heads,
                    hd,
                    RopeGrid {
                        start_frame: f0 as u32,
                        grid_h: c.grid_h as u32,
                        grid_w: c.grid_w as u32,
                    },
                    &s.k.slice(ta * fe_tok..tb * fe_tok),
                    &s.v.slice(ta * fe_tok..tb * fe_tok),
                    &mut self.cache_k[li].slice_mut(ca..cb),
                    &mut self.cache_v[li].slice_mut(ca..cb),
                    QRope::<CudaView<'_, bf16>, CudaViewMut<'_, bf16>>::InPlace(&mut qv),
                    &self.frame_base,
                )?;
            }
            let (ka, kb) = (lk_range.start * frame_elems, lk_range.end * frame_elems);
            attention_fwd(
                &gpu,
                &st,
                self.variant,
                AttnShape {
                    lq: rows,
                    lk: lk_range.len() * tpf,
                    heads,
                    head_dim: hd,
                },
                scale,
                &s.q.slice(..rk),
                &self.cache_k[li].slice(ka..kb),
                &self.cache_v[li].slice(ka..kb),
                &mut s.attn.slice_mut(..rk),
                None,
            )?;
            Self::row_parallel(
                gemm,
                &mut red,
                &b.o,
                rows,
                &s.attn.slice(..rk),
                &mut s.y.slice_mut(..rows * d),
                "attention out",
            )?;
            // x += gate1 · y, then norm3 (affine LayerNorm as a fixed modulation) for cross-attn.
            dit_ops::gated_residual_layer_norm_modulate(
                &gpu,
                &st,
                shape,
                &mut s.x.slice_mut(..rows * d),
                &s.y.slice(..rows * d),
                &m.slice(mo(2)..mo(2) + fd),
                &b.norm3_mod.slice(..fd),
                &b.norm3_mod
                    .slice(b.norm3_mod.len() / 2..b.norm3_mod.len() / 2 + fd),
                c.eps,
                &mut s.xn.slice_mut(..rows * d),
            )?;
            // Cross-attention; its residual is accumulated by the out projection's epilogue.
            Self::linear(
                gemm,
                &b.cq,
                rows,
                &s.xn.slice(..rows * d),
                &mut s.q_raw.slice_mut(..rk),
                Epilogue::None,
                false,
            )?;
            red.rms_norm(
                &gpu,
                &st,
                qshape,
                [(&s.q_raw.slice(..rk), &b.cnorm_q, &mut s.q.slice_mut(..rk))],
                d,
                c.eps,
            )?;
            attention_fwd(
                &gpu,
                &st,
                self.variant,
                AttnShape {
                    lq: rows,
                    lk: c.text_tokens,
                    heads,
                    head_dim: hd,
                },
                scale,
                &s.q.slice(..rk),
                &self.text_k[li],
                &self.text_v[li],
                &mut s.attn.slice_mut(..rk),
                None,
            )?;
            if red.bufs.is_none() {
                Self::linear(
                    gemm,
                    &b.co,
                    rows,
                    &s.attn.slice(..rk),
                    &mut s.x.slice_mut(..rows * d),
                    Epilogue::None,
                    true,
                )?;
            } else {
                // TP > 1: the partial products are summed first, then added to x.
                Self::row_parallel(
                    gemm,
                    &mut red,
                    &b.co,
                    rows,
                    &s.attn.slice(..rk),
                    &mut s.y.slice_mut(..rows * d),
                    "cross-attention out",
                )?;
                red.residual_add(&gpu, &st, shape, &mut s.x.slice_mut(..rows * d), &s.y)?;
            }
            // FFN: GELU fused into the first GEMM's epilogue.
            dit_ops::layer_norm_modulate(
                &gpu,
                &st,
                shape,
                &s.x.slice(..rows * d),
                &m.slice(mo(3)..mo(3) + fd),
                &m.slice(mo(4)..mo(4) + fd),
                c.eps,
                &mut s.xn.slice_mut(..rows * d),
            )?;
            Self::linear(
                gemm,
                &b.ffn1,
                rows,
                &s.xn.slice(..rows * d),
                &mut s.h.slice_mut(..rows * ffn),
                Epilogue::Gelu,
                false,
            )?;
            Self::row_parallel(
                gemm,
                &mut red,
                &b.ffn2,
                rows,
                &s.h.slice(..rows * ffn),
                &mut s.y.slice_mut(..rows * d),
                "FFN out",
            )?;
            dit_ops::gated_residual(
                &gpu,
                &st,
                shape,
                &mut s.x.slice_mut(..rows * d),
                &s.y.slice(..rows * d),
                &m.slice(mo(5)..mo(5) + fd),
            )?;
        }
        let ho = c.layers * 6 * fd;
        let m = &s.modulation;
        dit_ops::layer_norm_modulate(
            &gpu,
            &st,
            shape,
            &s.x.slice(..rows * d),
            &m.slice(ho..ho + fd),
            &m.slice(ho + fd..ho + 2 * fd),
            c.eps,
            &mut s.xn.slice_mut(..rows * d),
        )?;
        let on = rows * c.in_dim();
        Self::linear(
            gemm,
            &self.head,
            rows,
            &s.xn.slice(..rows * d),
            &mut s.out.slice_mut(..on),
            Epilogue::None,
            false,
        )?;
        Ok(())
    }
}

/// Host-facing calls for the Stage 1 executor (`pipeline::stage1::GpuGenerator`): f32 latents
/// in and out through pinned buffers, the copies asynchronous on the model's stream; the call
/// returns when its output download (an event) completed. Device-resident envelopes skip them.
impl GpuDit {
    /// One generator call from and to host f32 (`[frames · tokens_per_frame, in_dim]`).
    pub fn forward_host(
        &mut self,
        x: &[f32],
        frames: usize,
        start_frame: u64,
        t: u32,
        kv: &KvAccess,
        comm: &mut dyn TpComm,
    ) -> Result<Vec<f32>> {
        let n = frames * self.cfg.tokens_per_frame() * self.cfg.in_dim();
        if x.len() != n || n > self.s.x_in.len() {
            return Err(Error::Invariant(format!(
                "GPU generator input has {} values, expected {n}",
                x.len()
            )));
        }
        self.input_is_latent = false;
        self.out_of_latent = false;
        let host = self.pinned_in.host("generator input")?;
        for (h, v) in host[..n].iter_mut().zip(x) {
            *h = bf16::from_f32(*v);
        }
        self.pinned_in
            .upload(&mut self.s.x_in.slice_mut(..n), "generator input")?;
        self.forward_device(frames, start_frame, t, kv, comm)?;
        let out = self.s.out.slice(..n);
        self.pinned_out.download(&out, "generator output")?;
        // Waits for this call's download (its event), not for the device.
        let host = self.pinned_out.host("generator output")?;
        let out = host[..n].iter().map(|v| v.to_f32()).collect();
        // The stream passed this call's device-path sums (if any): their records complete.
        comm.settle_device_ops();
        Ok(out)
    }
}

/// A chunk's latent kept on the device (`pipeline::stage1::Generator::keeps_latent`): Stage 1's
/// denoise loop without a host round trip per call. The latent (f32) is uploaded once per chunk
/// through pinned memory (`load_latent`); each call reads `bf16(latent)` (`forward_latent`);
/// the Euler step runs on the device (`euler_step`, the host executor's f32 arithmetic bit for
/// bit); the clean latent comes back once (`read_latent`). The host waits once per chunk, on
/// the latent's download, instead of once per call.
impl GpuDit {
    /// Takes a chunk's initial latent (f32 `[frames · tokens_per_frame, in_dim]`) onto the
    /// device.
    pub fn load_latent(&mut self, x: &[f32]) -> Result<()> {
        let n = x.len();
        let in_dim = self.cfg.in_dim();
        if n == 0 || n % (self.cfg.tokens_per_frame() * in_dim) != 0 || n > self.latent.len() {
            return Err(Error::Invariant(format!(
                "latent of {n} values: not whole frames of {} tokens × {in_dim}, or more than \
                 the {} the model is sized for",
                self.cfg.tokens_per_frame(),
                self.latent.len()
            )));
        }
        self.pinned_latent.host("latent")?[..n].copy_from_slice(x);
        self.pinned_latent
            .upload(&mut self.latent.slice_mut(..n), "latent")?;
        self.latent_len = n;
        self.out_of_latent = false;
        self.latent_to_input()
    }

    /// `load_latent` from a data-plane buffer on this model's GPU (a device-resident envelope's
    /// noise tensor, f32 bytes): one device-to-device copy, no host crossing. The buffer's
    /// receive has completed (the plane hands an envelope up only then).
    pub fn load_latent_device(&mut self, buf: &crate::cuda::device::DeviceBuf) -> Result<()> {
        if !buf.is_on(&self.gpu) {
            return Err(Error::Invariant(
                "device-resident latent from another GPU's context than the model's".into(),
            ));
        }
        let n = buf.len() / std::mem::size_of::<f32>();
        let in_dim = self.cfg.in_dim();
        if n == 0
            || buf.len() % std::mem::size_of::<f32>() != 0
            || n % (self.cfg.tokens_per_frame() * in_dim) != 0
            || n > self.latent.len()
        {
            return Err(Error::Invariant(format!(
                "device-resident latent of {} bytes: not whole f32 frames of {} tokens × {in_dim}, \
                 or more than the {} values the model is sized for",
                buf.len(),
                self.cfg.tokens_per_frame(),
                self.latent.len()
            )));
        }
        let src = buf.view_as::<f32>(n)?;
        self.stream
            .memcpy_dtod(&src, &mut self.latent.slice_mut(..n))
            .map_err(|e| cuda_err("copy the received latent into the model", e))?;
        self.latent_len = n;
        self.out_of_latent = false;
        self.latent_to_input()
    }

    fn latent_to_input(&mut self) -> Result<()> {
        let n = self.latent_len;
        dit_ops::latent_to_input(
            &self.gpu,
            &self.stream,
            &self.latent.slice(..n),
            &mut self.s.x_in.slice_mut(..n),
        )?;
        self.input_is_latent = true;
        Ok(())
    }

    /// One generator call on the latent (`forward_device` with `bf16(latent)` as its input);
    /// its output stays on the device for `euler_step`.
    pub fn forward_latent(
        &mut self,
        frames: usize,
        start_frame: u64,
        t: u32,
        kv: &KvAccess,
        comm: &mut dyn TpComm,
    ) -> Result<()> {
        let n = frames * self.cfg.tokens_per_frame() * self.cfg.in_dim();
        if self.latent_len == 0 || n != self.latent_len {
            return Err(Error::Invariant(format!(
                "generator call on the device latent: {frames} frames ({n} values), the latent \
                 holds {} (none loaded: 0)",
                self.latent_len
            )));
        }
        if !self.input_is_latent {
            // A host input (a recompute's context frames) was read since: convert again.
            self.latent_to_input()?;
        }
        self.forward_device(frames, start_frame, t, kv, comm)?;
        self.out_of_latent = true;
        Ok(())
    }

    /// `latent += dt · v` with `v` the last `forward_latent`'s output, and the next call's input
    /// with it; each output steps the latent once.
    pub fn euler_step(&mut self, dt: f32) -> Result<()> {
        if !self.out_of_latent {
            return Err(Error::Invariant(
                "Euler step on the device latent without a call's output on it".into(),
            ));
        }
        let n = self.latent_len;
        dit_ops::euler_step(
            &self.gpu,
            &self.stream,
            &mut self.latent.slice_mut(..n),
            &self.s.out.slice(..n),
            dt,
            &mut self.s.x_in.slice_mut(..n),
        )?;
        self.out_of_latent = false;
        self.input_is_latent = true;
        Ok(())
    }

    /// The latent copied device to device into `buf` (a data-plane buffer on this model's GPU:
    /// a device-resident RESULT), complete when this returns (an event, the host's one wait of
    /// the chunk): the chunk's calls and steps have run, so their device-path sums settle.
    pub fn read_latent_device(
        &mut self,
        comm: &mut dyn TpComm,
        buf: &mut crate::cuda::device::DeviceBuf,
    ) -> Result<()> {
        let n = self.latent_len;
        if n == 0 {
            return Err(Error::Invariant(
                "read of a device latent never loaded".into(),
            ));
        }
        if !buf.is_on(&self.gpu) || buf.len() != n * std::mem::size_of::<f32>() {
            return Err(Error::Invariant(format!(
                "device-resident result: a buffer of {} bytes{} for a latent of {n} f32",
                buf.len(),
                if buf.is_on(&self.gpu) {
                    ""
                } else {
                    " in another GPU's context"
                }
            )));
        }
        let mut dst = buf.view_as_mut::<f32>(n)?;
        self.stream
            .memcpy_dtod(&self.latent.slice(..n), &mut dst)
            .map_err(|e| cuda_err("copy the latent into the result buffer", e))?;
        // The plane sends from `buf` on its own schedule: the copy completes first.
        self.pinned_latent.mark("latent")?;
        self.pinned_latent.host("latent")?;
        comm.settle_device_ops();
        Ok(())
    }

    /// The latent back on the host, once its download (an event) completed: the chunk's calls
    /// and steps before it have run, so the records of their device-path sums complete.
    pub fn read_latent(&mut self, comm: &mut dyn TpComm) -> Result<Vec<f32>> {
        let n = self.latent_len;
        if n == 0 {
            return Err(Error::Invariant(
                "read of a device latent never loaded".into(),
            ));
        }
        self.pinned_latent
            .download(&self.latent.slice(..n), "latent")?;
        let out = self.pinned_latent.host("latent")?[..n].to_vec();
        comm.settle_device_ops();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheGeometry;
    use crate::ids::CacheEpoch;

    fn cache(sinks: u32, window: u32) -> KvCache {
        let mut c = KvCache::new(CacheGeometry {
            layers: 0,
            tokens_per_frame: 1,
            heads: 0,
            head_dim: 0,
            sink_frames: sinks,
            window_frames: window,
        })
        .unwrap();
        c.ledger_mut().reset(CacheEpoch(0)).unwrap();
        c
    }

    #[test]
    fn device_kv_access_follows_the_ledger_through_a_wrapping_ring() {
        let mut c = cache(3, 6);
        let mut seen = Vec::new();
        for _chunk in 0..6 {
            let read = KvAccess::from_ledger(CacheMode::Read, &c, 3).unwrap();
            let n = c.ledger().evict_needed_for(3);
            c.ledger_mut().evict(n).unwrap();
            let slots = c.ledger_mut().append(3).unwrap();
            let clean = KvAccess::from_ledger(CacheMode::Append(&slots), &c, 3).unwrap();
            c.ledger_mut().mark_written();
            seen.push((read, clean));
        }
        // Chunk 0: empty cache, the chunk alone; its clean pass writes the sinks.
        assert_eq!(seen[0].0.attend, 0..3);
        assert_eq!(
            seen[0].1.writes,
            vec![SlotRun {
                slot: 0,
                chunk_frame: 0,
                frames: 3
            }]
        );
        // Chunk 3 onwards: the ring is full, denoise reads all 9 cached frames + the scratch.
        assert_eq!(seen[3].0.attend, 0..12);
        assert_eq!(seen[3].0.writes[0].slot, 9);
        // Its clean pass writes the evicted frames' slots (3..6) and reads exactly 9 frames.
        assert_eq!(
            seen[3].1.writes,
            vec![SlotRun {
                slot: 3,
                chunk_frame: 0,
                frames: 3
            }]
        );
        assert_eq!(seen[3].1.attend, 0..9);
        assert_eq!(seen[4].1.writes[0].slot, 6);
        assert_eq!(seen[5].1.writes[0].slot, 3);
        let r = KvAccess::from_ledger(CacheMode::Overwrite(&[0, 1, 2]), &c, 3).unwrap();
        assert_eq!(r.attend, 0..3);
        assert!(KvAccess::from_ledger(CacheMode::Overwrite(&[0, 2, 3]), &c, 3).is_err());
    }

    #[test]
    fn a_ring_the_device_layout_cannot_serve_is_refused_naming_the_slots() {
        // A window of 4 with chunks of 3: after a wrap the held slots are not a prefix.
        let mut c = cache(1, 4);
        for _ in 0..3 {
            let n = c.ledger().evict_needed_for(3);
            c.ledger_mut().evict(n).unwrap();
            c.ledger_mut().append(3).unwrap();
            c.ledger_mut().mark_written();
        }
        let n = c.ledger().evict_needed_for(3);
        c.ledger_mut().evict(n).unwrap();
        let e = KvAccess::from_ledger(CacheMode::Read, &c, 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a prefix") && e.contains("readable slots"),
            "{e}"
        );
    }
}
