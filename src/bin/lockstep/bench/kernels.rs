//! `lockstep bench kernels`: attention TFLOP/s, fused RoPE + KV append GB/s against a
//! device-to-device copy of the same bytes measured in the same run, and the DiT element-wise
//! ops' GB/s against a large D2D copy.
//!
//! Method (METHOD.md): CUDA events around each launch, warm-up first, median of many runs,
//! inputs rotated across several buffer sets when one set would sit in L2, random data (never
//! zeros). The PyTorch baselines (benches/baselines/attention_torch.py) run in the same device
//! command; BENCHMARKS.md pairs the figures.
use crate::cuda::attention::{attention_fwd, AttentionVariant, AttnShape, ALL_VARIANTS};
use crate::cuda::context::{fill_bf16, EventTimer, Fill, Gpu};
use crate::cuda::dit_ops::{self, RowShape};
use crate::cuda::kv_cache::{kv_append_rope, NoQRope, QRope, RingGeometry, RopeGrid};
use crate::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use std::sync::Arc;

fn alloc(stream: &Arc<CudaStream>, n: usize) -> Result<CudaSlice<bf16>> {
    stream
        .alloc_zeros::<bf16>(n)
        .map_err(|e| crate::cuda::context::cuda_err(format!("alloc {n} bf16"), e))
}

fn rand_buf(gpu: &Gpu, stream: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    let mut b = alloc(stream, n)?;
    fill_bf16(gpu, stream, &mut b, Fill::Uniform { seed, amp: 1.0 })?;
    Ok(b)
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    f64::from(v[v.len() / 2])
}

/// Median device time in ms of `iters` runs of `f(i)` after `warmup` runs.
fn time_median(
    gpu: &Gpu,
    stream: &CudaStream,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let t = EventTimer::new(gpu)?;
    for i in 0..warmup {
        f(i)?;
    }
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        t.start(stream)?;
        f(i)?;
        v.push(t.stop_ms(stream)?);
    }
    Ok(median(v))
}

struct Row {
    what: String,
    ms: f64,
    figure: String,
}

/// Entry point: `lockstep bench kernels [--quick] [--json PATH] [--variants v1,v3,...]`
/// (`--variants` restricts the attention kernels timed; default all, in `ALL_VARIANTS` order).
pub fn main(rest: &[String]) -> i32 {
    match run(rest) {
        Ok(()) => 0,
        Err(e) => {
            crate::diag!("bench kernels: {e}");
            e.exit_code().code()
        }
    }
}

fn run(rest: &[String]) -> Result<()> {
    let quick = rest.iter().any(|a| a == "--quick");
    let json_path = rest
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| rest.get(i + 1))
        .cloned();
    let variants: Vec<AttentionVariant> = match rest
        .iter()
        .position(|a| a == "--variants")
        .and_then(|i| rest.get(i + 1))
    {
        Some(list) => list
            .split(',')
            .map(AttentionVariant::parse)
            .collect::<Result<_>>()?,
        None => ALL_VARIANTS.to_vec(),
    };
    let iters = if quick { 5 } else { 30 };
    let gpu = Gpu::open(0)?;
    let stream = gpu.new_stream()?;
    println!(
        "bench kernels on {} (median of {iters}, CUDA events)",
        gpu.name()
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut json = Vec::new();

    // Device-to-device copy ceiling: 512 MiB each way.
    let copy_n = 256 << 20;
    let src = rand_buf(&gpu, &stream, copy_n, 1)?;
    let mut dst = alloc(&stream, copy_n)?;
    let ms = time_median(&gpu, &stream, 3, iters, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| crate::cuda::context::cuda_err("memcpy_dtod", e))
    })?;
    let copy_gbs = 2.0 * (copy_n * 2) as f64 / (ms * 1e-3) / 1e9;
    rows.push(Row {
        what: "d2d copy 512 MiB (read+write)".into(),
        ms,
        figure: format!("{copy_gbs:.0} GB/s"),
    });
    json.push(
        serde_json::json!({"bench": "d2d_copy", "bytes": copy_n * 2, "ms": ms, "gbs": copy_gbs}),
    );
    drop((src, dst));

    // Attention v1 at the benchmark shapes.
    let lq = 4680;
    for heads in [12usize, 40] {
        for lk in [4680usize, 9360, 18720, 28080] {
            if quick && lk > 9360 {
                continue;
            }
            let shape = AttnShape {
                lq,
                lk,
                heads,
                head_dim: 128,
            };
            let (qn, kn) = (lq * heads * 128, lk * heads * 128);
            let set_bytes = 2 * (qn + 2 * kn);
            // Rotate sets so that together they exceed the 50 MB L2 several times over.
            let sets = (256usize << 20).div_ceil(set_bytes).clamp(1, 4);
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            let mut os = Vec::new();
            for s in 0..sets as u64 {
                qs.push(rand_buf(&gpu, &stream, qn, 10 + s)?);
                ks.push(rand_buf(&gpu, &stream, kn, 20 + s)?);
                vs.push(rand_buf(&gpu, &stream, kn, 30 + s)?);
                os.push(alloc(&stream, qn)?);
            }
            let scale = 1.0 / (128f32).sqrt();
            for &variant in &variants {
                let ms = time_median(&gpu, &stream, 3, iters, |i| {
                    let s = i % sets;
                    let (q, k, v) = (&qs[s], &ks[s], &vs[s]);
                    attention_fwd(
                        &gpu, &stream, variant, shape, scale, q, k, v, &mut os[s], None,
                    )
                })?;
                let tflops = shape.flops() / (ms * 1e-3) / 1e12;
                rows.push(Row {
                    what: format!("attention {} H={heads} Lk={lk}", variant.as_str()),
                    ms,
                    figure: format!("{tflops:.1} TFLOP/s"),
                });
                json.push(serde_json::json!({"bench": "attention", "variant": variant.as_str(), "heads": heads, "lq": lq, "lk": lk, "ms": ms, "tflops": tflops}));
            }
        }
    }

    // Fused RoPE + KV append vs a D2D copy of the same bytes (K and V in, K and V out).
    for heads in [12usize, 40] {
        let t = 4680usize;
        let n = t * heads * 128;
        let ring = RingGeometry {
            sink_slots: 1560,
            window_slots: 3 * 4680,
        };
        let cap = ring.capacity() * heads * 128;
        let k_new = rand_buf(&gpu, &stream, n, 40)?;
        let v_new = rand_buf(&gpu, &stream, n, 41)?;
        let mut q = rand_buf(&gpu, &stream, n, 42)?;
        let mut kc = alloc(&stream, cap)?;
        let mut vc = alloc(&stream, cap)?;
        let grid = RopeGrid {
            start_frame: 3,
            grid_h: 30,
            grid_w: 52,
        };
        // Chunk i of a long stream: logical start rotates through the ring (wraps included).
        let start = |i: usize| (1560 + (i % 7) * 4680) as u32;
        let ms_kv = time_median(&gpu, &stream, 3, iters, |i| {
            kv_append_rope(
                &gpu,
                &stream,
                ring,
                start(i),
                t,
                heads,
                128,
                grid,
                &k_new,
                &v_new,
                &mut kc,
                &mut vc,
                NoQRope::None,
            )
        })?;
        let ms_kvq = time_median(&gpu, &stream, 3, iters, |i| {
            kv_append_rope::<CudaSlice<bf16>, CudaSlice<bf16>>(
                &gpu,
                &stream,
                ring,
                start(i),
                t,
                heads,
                128,
                grid,
                &k_new,
                &v_new,
                &mut kc,
                &mut vc,
                QRope::InPlace(&mut q),
            )
        })?;
        // Baseline: two D2D copies of the same sizes into the cache (what a non-fused append
        // without RoPE would cost at best).
        let ms_copy = time_median(&gpu, &stream, 3, iters, |i| {
            let off = ((i % 3) * t) * heads * 128;
            let mut kd = kc.slice_mut(off..off + n);
            stream
                .memcpy_dtod(&k_new, &mut kd)
                .map_err(|e| crate::cuda::context::cuda_err("memcpy_dtod", e))?;
            let mut vd = vc.slice_mut(off..off + n);
            stream
                .memcpy_dtod(&v_new, &mut vd)
                .map_err(|e| crate::cuda::context::cuda_err("memcpy_dtod", e))
        })?;
        let bytes = 4.0 * (n * 2) as f64;
        let gbs = |ms: f64, b: f64| b / (ms * 1e-3) / 1e9;
        rows.push(Row {
            what: format!("d2d copy K,V {t}x{heads}x128 (baseline)"),
            ms: ms_copy,
            figure: format!("{:.0} GB/s", gbs(ms_copy, bytes)),
        });
        rows.push(Row {
            what: format!("kv append+rope {t}x{heads}x128"),
            ms: ms_kv,
            figure: format!(
                "{:.0} GB/s = {:.2}x copy",
                gbs(ms_kv, bytes),
                ms_copy / ms_kv
            ),
        });
        rows.push(Row {
            what: format!("kv append+rope +Q {t}x{heads}x128"),
            ms: ms_kvq,
            figure: format!("{:.0} GB/s", gbs(ms_kvq, bytes * 1.5)),
        });
        json.push(serde_json::json!({"bench": "kv_append", "heads": heads, "tokens": t, "ms": ms_kv, "ms_with_q": ms_kvq, "ms_d2d_copy": ms_copy, "gbs": gbs(ms_kv, bytes), "gbs_copy": gbs(ms_copy, bytes), "ratio_to_copy": ms_copy / ms_kv}));
    }

    // DiT element-wise ops (rows = one chunk of 4680 tokens, 1560 per frame).
    for dim in [1536usize, 5120] {
        let shape = RowShape {
            rows: 4680,
            dim,
            tokens_per_frame: 1560,
        };
        let n = shape.rows * dim;
        let fe = 3 * dim;
        let x = rand_buf(&gpu, &stream, n, 50)?;
        let mut x2 = rand_buf(&gpu, &stream, n, 51)?;
        let y = rand_buf(&gpu, &stream, n, 52)?;
        let w = rand_buf(&gpu, &stream, dim, 53)?;
        let shift = rand_buf(&gpu, &stream, fe, 54)?;
        let scale = rand_buf(&gpu, &stream, fe, 55)?;
        let gate = rand_buf(&gpu, &stream, fe, 56)?;
        let mut out = alloc(&stream, n)?;
        let b = (n * 2) as f64;
        let gbs = |ms: f64, bytes: f64| bytes / (ms * 1e-3) / 1e9;
        let ms = time_median(&gpu, &stream, 3, iters, |_| {
            dit_ops::rms_norm(&gpu, &stream, shape, &x, &w, None, 1e-6, &mut out)
        })?;
        rows.push(Row {
            what: format!("rms_norm 4680x{dim}"),
            ms,
            figure: format!("{:.0} GB/s", gbs(ms, 2.0 * b)),
        });
        let ms = time_median(&gpu, &stream, 3, iters, |_| {
            dit_ops::layer_norm_modulate(&gpu, &stream, shape, &x, &shift, &scale, 1e-6, &mut out)
        })?;
        rows.push(Row {
            what: format!("layer_norm_modulate 4680x{dim}"),
            ms,
            figure: format!("{:.0} GB/s", gbs(ms, 2.0 * b)),
        });
        let ms_gr = time_median(&gpu, &stream, 3, iters, |_| {
            dit_ops::gated_residual(&gpu, &stream, shape, &mut x2, &y, &gate)
        })?;
        rows.push(Row {
            what: format!("gated_residual 4680x{dim}"),
            ms: ms_gr,
            figure: format!("{:.0} GB/s", gbs(ms_gr, 3.0 * b)),
        });
        let ms_f = time_median(&gpu, &stream, 3, iters, |_| {
            dit_ops::gated_residual_layer_norm_modulate(
                &gpu, &stream, shape, &mut x2, &y, &gate, &shift, &scale, 1e-6, &mut out,
            )
        })?;
        rows.push(Row {
            what: format!("gated_residual+ln_modulate fused 4680x{dim}"),
            ms: ms_f,
            figure: format!("{:.0} GB/s", gbs(ms_f, 4.0 * b)),
        });
        json.push(serde_json::json!({"bench": "dit_ops", "dim": dim, "gated_residual_ms": ms_gr, "fused_ms": ms_f}));
    }
    let ffn = 4680 * 13824;
    let mut h = rand_buf(&gpu, &stream, ffn, 60)?;
    let ms = time_median(&gpu, &stream, 3, iters, |_| {
        dit_ops::gelu_tanh(&gpu, &stream, &mut h)
    })?;
    rows.push(Row {
        what: "gelu_tanh 4680x13824 in place".into(),
        ms,
        figure: format!("{:.0} GB/s", 2.0 * (ffn * 2) as f64 / (ms * 1e-3) / 1e9),
    });

    println!("{:<48} {:>10}  figure", "kernel", "ms");
    for r in &rows {
        println!("{:<48} {:>10.4}  {}", r.what, r.ms, r.figure);
    }
    if let Some(p) = json_path {
        let text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::BadInput(format!("bench json: {e}")))?;
        std::fs::write(&p, text).map_err(|e| Error::io(format!("write {p}"), e))?;
    }
    Ok(())
}
