//! The GPU DiT (`model::gpu`, bf16, cuBLASLt + our kernels) against the CPU reference model
//! (`model::dit`, f32) on the same weights: every generator call of a stream that wraps the
//! ring and recomputes the sinks, fed the reference's inputs (teacher-forced, so errors do not
//! compound through the Euler steps) with the GPU's own device cache; then the whole stream run
//! by the Stage 1 executor on the GPU generator, its clean latents against the reference's, and
//! once more with the chunk's latent kept on the device (Euler steps on the GPU): bitwise equal.
//! Wan 1.3B widths (dim 1536, 12 heads × 128, FFN 8960, 512 text tokens × 4096), 2 layers; the
//! stream on a small patch grid (the CPU reference is the slow side), and one chunk at the full
//! 30 × 52 grid. Then tensor parallel: a TP=2 group on the one GPU (two models, two threads,
//! all-reduces staged through pinned host memory) against TP=1, both ranks bitwise equal.
//! Relative L2 errors are printed. Skips, printing why, without a GPU.
mod common;

use lockstep::cache::{CacheGeometry, KvCache};
use lockstep::cuda::attention::AttentionVariant;
use lockstep::cuda::context::Gpu;
use lockstep::ids::CacheEpoch;
use lockstep::model::dit::{CacheMode, DitShard};
use lockstep::model::gpu::{GpuDit, KvAccess};
use lockstep::model::ops;
use lockstep::model::tp::{SoloComm, ThreadComm, TpComm};
use lockstep::model::DitConfig;
use lockstep::pipeline::stage1::GpuGenerator;
use lockstep::pipeline::trace::{
    record_stream, record_stream_with, stream_latents, stream_latents_device_resident,
    stream_latents_tp, StreamSpec, StreamTrace,
};
use std::sync::Arc;

/// bf16 weights and activations over 2 layers against f32 (seen: 5.5e-3 per call on an H100).
const TOL: f64 = 1.5e-2;

/// What `lockstep run` uses: `LOCKSTEP_KERNEL_VARIANT`, else the per-shape table (`Auto`).
fn variant() -> AttentionVariant {
    AttentionVariant::from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// Replays `trace` call by call on the GPU (the reference's inputs), driving a ledger the way
/// the Stage 1 executor does; returns the worst relative error and every output.
fn replay(model: &mut GpuDit, trace: &StreamTrace, label: &str) -> (f64, Vec<Vec<f32>>) {
    replay_tp(model, &mut SoloComm, trace, label)
}

/// `replay` for one rank of a TP group: every rank makes the same calls with its `comm`.
fn replay_tp(
    model: &mut GpuDit,
    comm: &mut dyn TpComm,
    trace: &StreamTrace,
    label: &str,
) -> (f64, Vec<Vec<f32>>) {
    let cfg = &trace.cfg;
    let mut cache = KvCache::new(CacheGeometry {
        layers: 0,
        tokens_per_frame: cfg.tokens_per_frame(),
        heads: 0,
        head_dim: 0,
        sink_frames: cfg.sink_frames,
        window_frames: cfg.window_frames,
    })
    .unwrap();
    model.set_prompt(comm, 7).unwrap();
    let mut worst = 0f64;
    let mut outs = Vec::new();
    for c in &trace.calls {
        if c.reset_before {
            cache.ledger_mut().reset(CacheEpoch(0)).unwrap();
        }
        let f = c.frames as u32;
        let (out, kind) = match c.kind {
            "denoise" => {
                let kv = KvAccess::from_ledger(CacheMode::Read, &cache, f).unwrap();
                (
                    model
                        .forward_host(&c.x, c.frames, c.start_frame, c.t, &kv, comm)
                        .unwrap(),
                    "denoise",
                )
            }
            "clean" => {
                cache.ledger_mut().evict(c.evict_before).unwrap();
                let slots = cache.ledger_mut().append(f).unwrap();
                let kv = KvAccess::from_ledger(CacheMode::Append(&slots), &cache, f).unwrap();
                let out = model
                    .forward_host(&c.x, c.frames, c.start_frame, c.t, &kv, comm)
                    .unwrap();
                cache.ledger_mut().mark_written();
                (out, "clean")
            }
            "recompute" => {
                let slots = cache
                    .ledger_mut()
                    .recompute_slots(c.start_frame, f)
                    .unwrap();
                let kv = KvAccess::from_ledger(CacheMode::Overwrite(&slots), &cache, f).unwrap();
                (
                    model
                        .forward_host(&c.x, c.frames, c.start_frame, c.t, &kv, comm)
                        .unwrap(),
                    "recompute",
                )
            }
            other => panic!("unknown call kind {other}"),
        };
        let e = ops::rel_l2(&out, &c.out);
        println!(
            "{label}: call {} chunk {} {kind} t={}: rel L2 {e:.3e}",
            c.n, c.chunk, c.t
        );
        assert!(
            e.is_finite() && e < TOL,
            "{label}: call {} ({kind}) rel L2 {e}",
            c.n
        );
        worst = worst.max(e);
        outs.push(out);
    }
    (worst, outs)
}

fn wan_widths(layers: usize, grid: Option<(usize, usize)>) -> DitConfig {
    let mut c = DitConfig::wan_1_3b().with_layers(Some(layers)).unwrap();
    if let Some((h, w)) = grid {
        c.grid_h = h;
        c.grid_w = w;
        c.window_frames = 6;
    }
    c
}

#[test]
fn gpu_model_matches_the_cpu_reference_over_a_wrapping_stream_with_recompute() {
    let test = "gpu_model_matches_the_cpu_reference_over_a_wrapping_stream_with_recompute";
    if common::skip_without_gpu(test) {
        return;
    }
    let gpu = Arc::new(Gpu::open(0).unwrap_or_else(|e| panic!("open GPU 0: {e}")));
    let cfg = wan_widths(2, Some((6, 8)));
    let t0 = std::time::Instant::now();
    let trace = record_stream(DitShard::random(&cfg, 3, 0, 1).unwrap(), 6, 4, 1, 7).unwrap();
    println!("{test}: CPU reference stream in {:.1?}", t0.elapsed());
    let shard = DitShard::random(&cfg, 3, 0, 1).unwrap();
    let mut model = GpuDit::from_shard(gpu.clone(), shard, variant()).unwrap();
    let (worst, eager) = replay(&mut model, &trace, "small grid, teacher-forced");
    // CUDA graphs: the same calls captured at first use and replayed after give bitwise the
    // same outputs, from a small fixed set of graphs.
    model.set_cuda_graphs(true);
    let (_, graphed) = replay(&mut model, &trace, "small grid, CUDA graphs");
    let n = model.captured_graphs().unwrap();
    println!(
        "{test}: {n} graphs captured for {} calls",
        trace.calls.len()
    );
    for (i, (a, b)) in graphed.iter().zip(&eager).enumerate() {
        assert!(
            a == b,
            "call {i}: graph replay differs from the eager launch"
        );
    }
    assert!(
        n > 0 && n < trace.calls.len(),
        "{n} graphs for {} calls",
        trace.calls.len()
    );
    // The whole stream on the GPU through the Stage 1 executor (its own trajectory).
    let shard = DitShard::random(&cfg, 3, 0, 1).unwrap();
    let gpu_kept = gpu.clone();
    let gpu_dev = gpu.clone();
    let model = GpuDit::from_shard(gpu, shard, variant()).unwrap();
    let mut gen = GpuGenerator::new(model);
    let gtrace = record_stream_with(&mut gen, &cfg, 6, 4, 1, 7).unwrap();
    let mut worst_latent = 0f64;
    for (i, (a, b)) in gtrace.latents.iter().zip(&trace.latents).enumerate() {
        let e = ops::rel_l2(a, b);
        println!("{test}: chunk {i} clean latent, GPU stream vs CPU stream: rel L2 {e:.3e}");
        worst_latent = worst_latent.max(e);
    }
    assert_eq!(gtrace.calls.len(), trace.calls.len());
    assert!(
        worst_latent < TOL,
        "GPU stream latents: worst rel L2 {worst_latent}"
    );
    println!("{test}: worst per call {worst:.3e}, worst latent {worst_latent:.3e} (tol {TOL})");
    // The same stream with the latent kept on the device (what `lockstep run` does: one upload
    // and one download per chunk, the Euler steps on the GPU; graphs on): bitwise the
    // host-latent stream above, whose Euler steps ran on the host.
    let shard = DitShard::random(&cfg, 3, 0, 1).unwrap();
    let mut model = GpuDit::from_shard(gpu_kept, shard, variant()).unwrap();
    model.set_cuda_graphs(true);
    let mut gen = GpuGenerator::new(model);
    assert!(lockstep::pipeline::stage1::Generator::keeps_latent(&gen));
    let stream = StreamSpec {
        chunks: 6,
        recompute_every: 4,
        noise_seed: 1,
        prompt_seed: 7,
    };
    let kept = stream_latents(&mut gen, &cfg, &stream).unwrap();
    assert_eq!(kept.len(), gtrace.latents.len());
    for (i, (a, b)) in kept.iter().zip(&gtrace.latents).enumerate() {
        let differ = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        println!("{test}: chunk {i} latent kept on the device vs stepped on the host: {differ} values differ");
        assert!(
            a.len() == b.len() && differ == 0,
            "chunk {i}: {differ} of {} values differ",
            a.len()
        );
    }
    // Device-resident (what Stage 1 does with envelopes on the NCCL plane): each chunk's noise
    // handed over in GPU memory and its latent taken back in GPU memory (one device-to-device
    // copy each way): bitwise the stream above.
    let shard = DitShard::random(&cfg, 3, 0, 1).unwrap();
    let mut model = GpuDit::from_shard(gpu_dev.clone(), shard, variant()).unwrap();
    model.set_cuda_graphs(true);
    let mut gen = GpuGenerator::new(model);
    let dev = stream_latents_device_resident(&mut gen, &gpu_dev, &cfg, &stream).unwrap();
    assert_eq!(dev.len(), kept.len());
    for (i, (a, b)) in dev.iter().zip(&kept).enumerate() {
        let differ = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        println!("{test}: chunk {i} latent device-resident in and out vs kept from the host: {differ} values differ");
        assert!(
            a.len() == b.len() && differ == 0,
            "chunk {i}: {differ} of {} values differ",
            a.len()
        );
    }
}

#[test]
fn gpu_model_matches_the_cpu_reference_at_full_wan_1_3b_geometry() {
    let test = "gpu_model_matches_the_cpu_reference_at_full_wan_1_3b_geometry";
    if common::skip_without_gpu(test) {
        return;
    }
    let gpu = Arc::new(Gpu::open(0).unwrap_or_else(|e| panic!("open GPU 0: {e}")));
    let cfg = wan_widths(2, None);
    let t0 = std::time::Instant::now();
    // One chunk (4 denoise steps over the chunk alone, then its clean pass).
    let trace = record_stream(DitShard::random(&cfg, 3, 0, 1).unwrap(), 1, 0, 1, 7).unwrap();
    println!("{test}: CPU reference in {:.1?}", t0.elapsed());
    let shard = DitShard::random(&cfg, 3, 0, 1).unwrap();
    let mut model = GpuDit::from_shard(gpu, shard, variant()).unwrap();
    let (worst, _) = replay(&mut model, &trace, "wan-1.3b 2 layers");
    println!("{test}: worst per call {worst:.3e} (tol {TOL})");
}

#[test]
fn gpu_tp2_on_one_gpu_matches_tp1_over_a_wrapping_stream() {
    let test = "gpu_tp2_on_one_gpu_matches_tp1_over_a_wrapping_stream";
    if common::skip_without_gpu(test) {
        return;
    }
    let gpu = Arc::new(Gpu::open(0).unwrap_or_else(|e| panic!("open GPU 0: {e}")));
    let cfg = wan_widths(2, Some((6, 8)));
    let trace = record_stream(DitShard::random(&cfg, 3, 0, 1).unwrap(), 6, 4, 1, 7).unwrap();
    // TP=1 on the GPU: the baseline TP=2 must meet (and its own error to the CPU reference).
    let mut one = GpuDit::from_shard(
        gpu.clone(),
        DitShard::random(&cfg, 3, 0, 1).unwrap(),
        variant(),
    )
    .unwrap();
    let (worst1, outs1) = replay(&mut one, &trace, "TP=1");
    drop(one);
    // TP=2: both group ranks on this GPU, each on its own thread and stream; sums staged
    // through pinned host memory by the model (a host group).
    let results = tp2_on_one_gpu(&gpu, &cfg, &trace, false);
    let mut worst_vs_tp1 = 0f64;
    for (i, ((o0, o1), base)) in results[0]
        .1
        .iter()
        .zip(&results[1].1)
        .zip(&outs1)
        .enumerate()
    {
        assert!(o0 == o1, "call {i}: the two TP ranks' outputs differ");
        let e = ops::rel_l2(o0, base);
        println!("{test}: call {i}: TP=2 vs TP=1 (both GPU): rel L2 {e:.3e}");
        worst_vs_tp1 = worst_vs_tp1.max(e);
    }
    assert_eq!(results[0].1.len(), trace.calls.len());
    assert!(
        worst_vs_tp1 < TOL,
        "TP=2 vs TP=1: worst rel L2 {worst_vs_tp1}"
    );
    println!(
        "{test}: TP=2 vs TP=1 worst {worst_vs_tp1:.3e}; vs the CPU reference: TP=2 {:.3e}, \
         TP=1 {worst1:.3e} (tol {TOL})",
        results[0].0
    );
    // The same group through the model's device path (what NCCL serves on two GPUs): the sums
    // are handed to the group as device buffers on the model's stream. Same arithmetic (bf16
    // operands summed in f32, rounded once), so bitwise the outputs of the staged path.
    let device = tp2_on_one_gpu(&gpu, &cfg, &trace, true);
    for (i, (d, h)) in device[0].1.iter().zip(&results[0].1).enumerate() {
        assert!(
            d == h,
            "call {i}: device-path TP=2 differs from the staged TP=2"
        );
    }
    println!(
        "{test}: device path: {} calls bitwise equal to the staged path",
        device[0].1.len()
    );
    // The whole stream through the Stage 1 executor with the latent kept on the device
    // (`lockstep run --tp 2 --generator gpu`): TP=2 on both ranks bitwise equal, and within
    // bf16 tolerance of the TP=1 stream kept the same way.
    let stream = StreamSpec {
        chunks: 6,
        recompute_every: 4,
        noise_seed: 1,
        prompt_seed: 7,
    };
    let mut gen1 = GpuGenerator::new(
        GpuDit::from_shard(
            gpu.clone(),
            DitShard::random(&cfg, 3, 0, 1).unwrap(),
            variant(),
        )
        .unwrap(),
    );
    let tp1 = stream_latents(&mut gen1, &cfg, &stream).unwrap();
    drop(gen1);
    let comms = ThreadComm::group(2, std::time::Duration::from_secs(60));
    let tp2: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut comm)| {
                let (gpu, cfg, stream) = (gpu.clone(), &cfg, &stream);
                sc.spawn(move || {
                    let shard = DitShard::random(cfg, 3, r as u32, 2).unwrap();
                    let mut g =
                        GpuGenerator::new(GpuDit::from_shard(gpu, shard, variant()).unwrap());
                    stream_latents_tp(&mut g, &mut comm, cfg, stream).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst_stream = 0f64;
    for (i, ((a, b), one)) in tp2[0].iter().zip(&tp2[1]).zip(&tp1).enumerate() {
        assert!(a == b, "chunk {i}: the TP ranks' kept latents differ");
        let e = ops::rel_l2(a, one);
        println!("{test}: chunk {i}: kept-latent stream, TP=2 vs TP=1: rel L2 {e:.3e}");
        worst_stream = worst_stream.max(e);
    }
    assert_eq!(tp2[0].len(), 6);
    assert!(
        worst_stream < TOL,
        "kept-latent stream TP=2 vs TP=1: worst rel L2 {worst_stream}"
    );
}

/// A host group that claims a device path, as a GPU data plane does: the model hands it its
/// device buffers (`device_all_reduce_*` on the model's stream) instead of staging them. Here
/// the sum itself still crosses the host (two ranks share one GPU, which NCCL refuses), but
/// every call site of the model's device path runs, in the same order on both ranks.
struct DevicePathComm {
    inner: ThreadComm,
    device_sums: usize,
    settled: usize,
}

impl DevicePathComm {
    fn sum_on_host<T: Copy + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, T>,
        to: impl Fn(T) -> f32,
        from: impl Fn(f32) -> T,
    ) -> lockstep::Result<()> {
        let map = |e: cudarc::driver::DriverError| lockstep::Error::Cuda(e.to_string());
        let mut host = vec![from(0.0); buf.len()];
        stream.memcpy_dtoh(buf, &mut host).map_err(map)?;
        stream.synchronize().map_err(map)?;
        let mut v: Vec<f32> = host.iter().map(|x| to(*x)).collect();
        self.inner.all_reduce_sum(&mut v)?;
        let back: Vec<T> = v.into_iter().map(from).collect();
        stream.memcpy_htod(&back, buf).map_err(map)?;
        self.device_sums += 1;
        Ok(())
    }
}

impl TpComm for DevicePathComm {
    fn rank(&self) -> lockstep::ids::GroupRank {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> lockstep::Result<()> {
        self.inner.all_reduce_sum(buf)
    }
    fn all_gather_u64(&mut self, local: &[u64]) -> lockstep::Result<Vec<Vec<u64>>> {
        self.inner.all_gather_u64(local)
    }
    fn has_device_path(&self) -> bool {
        true
    }
    fn device_all_reduce_bf16(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
    ) -> lockstep::Result<()> {
        self.sum_on_host(stream, buf, |x| x.to_f32(), half::bf16::from_f32)
    }
    fn device_all_reduce_f32(
        &mut self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> lockstep::Result<()> {
        self.sum_on_host(stream, buf, |x| x, |x| x)
    }
    fn settle_device_ops(&mut self) {
        self.settled += 1;
    }
}

/// Both ranks of a TP=2 group on this GPU, each on its own thread, model and stream; with
/// `device_path`, through `DevicePathComm` (asserting the model used only the device path).
fn tp2_on_one_gpu(
    gpu: &Arc<Gpu>,
    cfg: &DitConfig,
    trace: &StreamTrace,
    device_path: bool,
) -> Vec<(f64, Vec<Vec<f32>>)> {
    let comms = ThreadComm::group(2, std::time::Duration::from_secs(60));
    std::thread::scope(|sc| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let gpu = gpu.clone();
                sc.spawn(move || {
                    let shard = DitShard::random(cfg, 3, r as u32, 2).unwrap();
                    let mut m = GpuDit::from_shard(gpu, shard, variant()).unwrap();
                    assert_eq!(m.tp(), (r, 2));
                    // Graphs asked for: TP=2 calls run eagerly, so none are captured.
                    m.set_cuda_graphs(true);
                    let label = format!(
                        "TP=2 rank {r}{}",
                        if device_path { " (device path)" } else { "" }
                    );
                    if !device_path {
                        let mut comm = comm;
                        let out = replay_tp(&mut m, &mut comm, trace, &label);
                        assert_eq!(m.captured_graphs(), None);
                        return out;
                    }
                    let mut comm = DevicePathComm {
                        inner: comm,
                        device_sums: 0,
                        settled: 0,
                    };
                    let out = replay_tp(&mut m, &mut comm, trace, &label);
                    // Every sum went through the device path: per layer the q/k norm, the
                    // attention output, the cross-attention q norm and output, the FFN output
                    // per call (5), and per prompt 1 per layer (text-K norm).
                    let layers = cfg.layers;
                    let want = trace.calls.len() * 5 * layers + layers;
                    assert_eq!(comm.device_sums, want, "device-path sums on rank {r}");
                    assert_eq!(comm.settled, trace.calls.len(), "settled calls on rank {r}");
                    assert_eq!(m.captured_graphs(), None);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
