//! Every CUDA kernel against its CPU reference in `model::ops`, on fresh random data each run
//! (the seed comes from the clock and is printed; `LOCKSTEP_TEST_SEED` replays one), with every
//! output poisoned (NaN) before the launch so an unwritten element fails. Tolerance: relative L2
//! error ≤ 1e-2 for bf16 outputs; the figures are printed (`--nocapture`).
//! Skips, printing why, without a GPU or kernels.
mod common;
use common::gpu::{dev, Dev};
use common::{fresh_rng, Rng};

use cudarc::driver::CudaSlice;
use half::bf16;
use lockstep::cuda::attention::{attention_fwd, AttentionVariant, AttnShape, ALL_VARIANTS};
use lockstep::cuda::context::Gpu;
use lockstep::cuda::dit_ops::{self, RowShape};
use lockstep::cuda::kv_cache::{kv_append_rope, NoQRope, QRope, RingGeometry, RopeGrid};
use lockstep::model::ops;
use lockstep::Error;

const BF16_TOL: f64 = 1e-2;

/// Attention variants under test: all, or the comma list in `LOCKSTEP_ATTN_VARIANTS` (used on
/// the GPU host to keep compute-sanitizer runs short; the default run always covers all).
fn variants() -> Vec<AttentionVariant> {
    match std::env::var("LOCKSTEP_ATTN_VARIANTS") {
        Ok(list) if !list.is_empty() => list
            .split(',')
            .map(|v| {
                AttentionVariant::parse(v).unwrap_or_else(|e| panic!("LOCKSTEP_ATTN_VARIANTS: {e}"))
            })
            .collect(),
        _ => ALL_VARIANTS.to_vec(),
    }
}

fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = f32::from(bf16::from_f32(*x));
    }
}

/// Every element written (no NaN poison left) and finite.
fn assert_all_written(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element {i} of {} is {} (unwritten or non-finite)",
            v.len(),
            v[i]
        );
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_all_written(what, got);
    let e = ops::rel_l2(got, want);
    println!("  {what}: rel L2 error {e:.3e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
    e
}

/// Runs attention on the GPU and compares `rows` (all when None) against `ops::attention`.
fn check_attention(
    d: &Dev,
    rng: &mut Rng,
    variant: AttentionVariant,
    lq: usize,
    lk: usize,
    heads: usize,
    rows: Option<Vec<usize>>,
) {
    let shape = AttnShape {
        lq,
        lk,
        heads,
        head_dim: 128,
    };
    let hd = heads * 128;
    let (q, qh) = d.rand(lq * hd, 2.0, rng);
    let (k, kh) = d.rand(lk * hd, 2.0, rng);
    let (v, vh) = d.rand(lk * hd, 1.0, rng);
    let mut o = d.poisoned(lq * hd);
    let mut lse = d
        .stream
        .clone_htod(&vec![f32::NAN; lq * heads])
        .unwrap_or_else(|e| panic!("alloc lse: {e}"));
    let scale = 1.0 / (128f32).sqrt();
    attention_fwd(
        &d.gpu,
        &d.stream,
        variant,
        shape,
        scale,
        &q,
        &k,
        &v,
        &mut o,
        Some(&mut lse),
    )
    .unwrap_or_else(|e| panic!("attention launch: {e}"));
    let oh = d.host(&o);
    let lh = d.host_f32(&lse);
    assert_all_written("attention o (all rows)", &oh);
    assert_all_written("attention lse (all rows)", &lh);
    let rows: Vec<usize> = rows.unwrap_or_else(|| (0..lq).collect());
    let qs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| qh[r * hd..(r + 1) * hd].to_vec())
        .collect();
    let (ro, rl) = ops::attention(&qs, &kh, &vh, rows.len(), lk, heads, 128, scale);
    let go: Vec<f32> = rows
        .iter()
        .flat_map(|&r| oh[r * hd..(r + 1) * hd].to_vec())
        .collect();
    let gl: Vec<f32> = rows
        .iter()
        .flat_map(|&r| lh[r * heads..(r + 1) * heads].to_vec())
        .collect();
    println!(
        "attention {} Lq={lq} Lk={lk} H={heads}: {} of {lq} query rows checked",
        variant.as_str(),
        rows.len()
    );
    assert_close("o", &go, &ro, BF16_TOL);
    assert_close("lse", &gl, &rl, 1e-4);
}

#[test]
fn attention_matches_cpu_reference_at_odd_shapes() {
    let Some(d) = dev("attention_matches_cpu_reference_at_odd_shapes") else {
        return;
    };
    let mut rng = fresh_rng("attention odd shapes");
    // (Lq, Lk, H): Lk = 1; Lk and Lq off the 64/128 tiles; exact tiles; one query; v3t splits.
    for (lq, lk, h) in [
        (1, 1, 1),
        (77, 1, 3),
        (130, 100, 2),
        (128, 64, 1),
        (200, 65, 5),
        (33, 1000, 2),
        (1, 4097, 1),
        // v3t on 132 SMs: (33, 1000, 2) and (1, 4097, 1) split 4 ways, 50 tiles of 3 key tiles
        // split 2 ways (the second piece holds the partial last key tile).
        (100, 300, 50),
    ] {
        for variant in variants() {
            check_attention(&d, &mut rng, variant, lq, lk, h, None);
        }
    }
}

#[test]
fn attention_matches_cpu_reference_at_benchmark_shapes() {
    let Some(d) = dev("attention_matches_cpu_reference_at_benchmark_shapes") else {
        return;
    };
    let mut rng = fresh_rng("attention benchmark shapes");
    for heads in [12, 40] {
        for lk in [4680, 9360, 18720, 28080] {
            let lq = 4680;
            // The CPU cannot do all rows: first, last, one inside a later block, one random.
            let rows = vec![0, 4679, 128 * 17 + 5, rng.below(lq)];
            for variant in variants() {
                check_attention(&d, &mut rng, variant, lq, lk, heads, Some(rows.clone()));
            }
        }
    }
}

#[test]
fn attention_auto_runs_the_shape_table_kernel_bit_for_bit() {
    let Some(d) = dev("attention_auto_runs_the_shape_table_kernel_bit_for_bit") else {
        return;
    };
    let mut rng = fresh_rng("attention auto");
    // (Lq, Lk, H): one shape per SHAPE_TABLE row and either side of its Lk bound.
    for (lq, lk, heads) in [
        (300, 4680, 40),
        (300, 9360, 40),
        (300, 9361, 40),
        (300, 1000, 12),
    ] {
        let shape = AttnShape {
            lq,
            lk,
            heads,
            head_dim: 128,
        };
        let chosen = AttentionVariant::Auto.for_shape(&shape);
        assert!(ALL_VARIANTS.contains(&chosen));
        let hd = heads * 128;
        let (q, _) = d.rand(lq * hd, 2.0, &mut rng);
        let (k, _) = d.rand(lk * hd, 2.0, &mut rng);
        let (v, _) = d.rand(lk * hd, 1.0, &mut rng);
        let scale = 1.0 / (128f32).sqrt();
        let run = |variant| {
            let mut o = d.poisoned(lq * hd);
            let mut lse = d
                .stream
                .clone_htod(&vec![f32::NAN; lq * heads])
                .unwrap_or_else(|e| panic!("alloc lse: {e}"));
            attention_fwd(
                &d.gpu,
                &d.stream,
                variant,
                shape,
                scale,
                &q,
                &k,
                &v,
                &mut o,
                Some(&mut lse),
            )
            .unwrap_or_else(|e| panic!("attention launch: {e}"));
            let bits = |x: Vec<f32>| x.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            (bits(d.host(&o)), bits(d.host_f32(&lse)))
        };
        let auto = run(AttentionVariant::Auto);
        let named = run(chosen);
        println!(
            "attention auto Lq={lq} Lk={lk} H={heads}: runs {}",
            chosen.as_str()
        );
        assert!(
            auto == named,
            "Auto at {shape:?} differs from {} run directly",
            chosen.as_str()
        );
    }
}

#[test]
fn attention_rejects_mismatched_buffers_before_launch() {
    let Some(d) = dev("attention_rejects_mismatched_buffers_before_launch") else {
        return;
    };
    let mut rng = fresh_rng("attention shape check");
    let (q, _) = d.rand(10 * 128, 1.0, &mut rng);
    let (k, _) = d.rand(5 * 128, 1.0, &mut rng);
    let mut o = d.poisoned(10 * 128);
    let shape = AttnShape {
        lq: 10,
        lk: 6, // k holds 5 rows
        heads: 1,
        head_dim: 128,
    };
    let r = attention_fwd(
        &d.gpu,
        &d.stream,
        AttentionVariant::V1Fa2,
        shape,
        0.1,
        &q,
        &k,
        &k,
        &mut o,
        None,
    );
    match r {
        Err(Error::BadInput(m)) => assert!(m.contains("attention k"), "{m}"),
        other => panic!("expected BadInput naming k, got {other:?}"),
    }
}

/// Host mirror of one ring cache: `[capacity, H, D]` f32.
struct HostRing {
    k: Vec<f32>,
    v: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn append_chunk(
    d: &Dev,
    rng: &mut Rng,
    ring: RingGeometry,
    host: &mut HostRing,
    kc: &mut CudaSlice<bf16>,
    vc: &mut CudaSlice<bf16>,
    logical_start: u32,
    tokens: usize,
    heads: usize,
    grid: RopeGrid,
) {
    let row = heads * 128;
    let (kn, mut kh) = d.rand(tokens * row, 1.0, rng);
    let (vn, vh) = d.rand(tokens * row, 1.0, rng);
    let (qn, mut qh) = d.rand(tokens * row, 1.0, rng);
    let mut qo = d.poisoned(tokens * row);
    kv_append_rope::<CudaSlice<bf16>, CudaSlice<bf16>>(
        &d.gpu,
        &d.stream,
        ring,
        logical_start,
        tokens,
        heads,
        128,
        grid,
        &kn,
        &vn,
        kc,
        vc,
        QRope::OutOfPlace {
            input: &qn,
            output: &mut qo,
        },
    )
    .unwrap_or_else(|e| panic!("kv append launch: {e}"));
    let (gh, gw, f0) = (
        grid.grid_h as usize,
        grid.grid_w as usize,
        grid.start_frame as usize,
    );
    ops::rope_3d(&mut kh, tokens, heads, 128, f0, gh, gw);
    ops::rope_3d(&mut qh, tokens, heads, 128, f0, gh, gw);
    let q_gpu = d.host(&qo);
    assert_close("q rope (same pass)", &q_gpu, &qh, BF16_TOL);
    for t in 0..tokens {
        let s = ring
            .slot(logical_start + t as u32)
            .unwrap_or_else(|e| panic!("{e}")) as usize;
        host.k[s * row..(s + 1) * row].copy_from_slice(&kh[t * row..(t + 1) * row]);
        host.v[s * row..(s + 1) * row].copy_from_slice(&vh[t * row..(t + 1) * row]);
    }
}

#[test]
fn kv_append_rope_matches_cpu_through_ring_wraparound_with_sinks_and_attention_reads_it() {
    let Some(d) =
        dev("kv_append_rope_matches_cpu_through_ring_wraparound_with_sinks_and_attention_reads_it")
    else {
        return;
    };
    let mut rng = fresh_rng("kv ring");
    // 2 frames of 3x4 patches per chunk = 24 tokens; sinks = the first chunk; window = 2 chunks.
    let (heads, per_chunk) = (3usize, 24usize);
    let ring = RingGeometry {
        sink_slots: 24,
        window_slots: 48,
    };
    let row = heads * 128;
    let cap = ring.capacity();
    let mut kc = d.poisoned(cap * row);
    let mut vc = d.poisoned(cap * row);
    let mut host = HostRing {
        k: vec![f32::NAN; cap * row],
        v: vec![f32::NAN; cap * row],
    };
    // Chunks 0..5: chunk 3 wraps onto chunk 1's slots, chunk 4 onto chunk 2's; then chunk 4 is
    // recomputed (new values, same slots).
    for (c, chunk) in [0u32, 1, 2, 3, 4, 4].into_iter().enumerate() {
        let grid = RopeGrid {
            start_frame: 2 * chunk,
            grid_h: 3,
            grid_w: 4,
        };
        println!("append #{c}: chunk {chunk}");
        append_chunk(
            &d,
            &mut rng,
            ring,
            &mut host,
            &mut kc,
            &mut vc,
            chunk * per_chunk as u32,
            per_chunk,
            heads,
            grid,
        );
    }
    let kg = d.host(&kc);
    let vg = d.host(&vc);
    assert_close("k cache (RoPE applied, ring slots)", &kg, &host.k, BF16_TOL);
    assert_eq!(
        vg, host.v,
        "v cache must be an exact copy in the right slots"
    );
    // Attention of a new chunk's queries over the whole ring (slots in ring order, not time
    // order) equals attention over the same rows on the CPU.
    let lq = 50;
    let (q, qh) = d.rand(lq * row, 1.0, &mut rng);
    let shape = AttnShape {
        lq,
        lk: cap,
        heads,
        head_dim: 128,
    };
    let scale = 1.0 / (128f32).sqrt();
    let (ro, _) = ops::attention(&qh, &kg, &vg, lq, cap, heads, 128, scale);
    for variant in variants() {
        let mut o = d.poisoned(lq * row);
        attention_fwd(
            &d.gpu, &d.stream, variant, shape, scale, &q, &kc, &vc, &mut o, None,
        )
        .unwrap_or_else(|e| panic!("attention launch: {e}"));
        assert_close(
            &format!("attention {} over the ring", variant.as_str()),
            &d.host(&o),
            &ro,
            BF16_TOL,
        );
    }
}

#[test]
fn kv_append_rope_matches_cpu_at_benchmark_shape_with_late_frames() {
    let Some(d) = dev("kv_append_rope_matches_cpu_at_benchmark_shape_with_late_frames") else {
        return;
    };
    let mut rng = fresh_rng("kv benchmark shape");
    let (heads, tokens) = (12usize, 4680usize);
    let ring = RingGeometry {
        sink_slots: 1560,
        window_slots: 3 * 4680,
    };
    let row = heads * 128;
    let mut kc = d.poisoned(ring.capacity() * row);
    let mut vc = d.poisoned(ring.capacity() * row);
    let mut host = HostRing {
        k: vec![f32::NAN; ring.capacity() * row],
        v: vec![f32::NAN; ring.capacity() * row],
    };
    // Frame 300 (a long stream): angles up to 300 rad must stay accurate. Logical start chosen
    // so the chunk wraps around the end of the window.
    let start = 1560 + 3 * 4680 - 1000;
    let grid = RopeGrid {
        start_frame: 300,
        grid_h: 30,
        grid_w: 52,
    };
    append_chunk(
        &d, &mut rng, ring, &mut host, &mut kc, &mut vc, start, tokens, heads, grid,
    );
    let kg = d.host(&kc);
    let vg = d.host(&vc);
    let written: Vec<usize> = (0..tokens)
        .map(|t| ring.slot(start + t as u32).unwrap_or(0) as usize)
        .collect();
    let pick = |v: &[f32]| -> Vec<f32> {
        written
            .iter()
            .flat_map(|&s| v[s * row..(s + 1) * row].to_vec())
            .collect()
    };
    assert_close(
        "k cache at 4680x12x128, frame 300",
        &pick(&kg),
        &pick(&host.k),
        BF16_TOL,
    );
    assert_eq!(pick(&vg), pick(&host.v), "v cache exact copy");
    // Slots not written keep their poison: nothing outside the chunk's slots was touched.
    let untouched = (0..ring.capacity())
        .filter(|s| !written.contains(s))
        .take(5)
        .all(|s| kg[s * row].is_nan());
    assert!(untouched, "kv append wrote outside its slots");
}

#[test]
fn kv_append_rejects_a_chunk_larger_than_the_window() {
    let Some(d) = dev("kv_append_rejects_a_chunk_larger_than_the_window") else {
        return;
    };
    let ring = RingGeometry {
        sink_slots: 4,
        window_slots: 8,
    };
    let mut kc = d.poisoned(ring.capacity() * 128);
    let mut vc = d.poisoned(ring.capacity() * 128);
    let kn = d.poisoned(10 * 128);
    let r = kv_append_rope(
        &d.gpu,
        &d.stream,
        ring,
        4,
        10,
        1,
        128,
        RopeGrid {
            start_frame: 0,
            grid_h: 1,
            grid_w: 10,
        },
        &kn,
        &kn,
        &mut kc,
        &mut vc,
        NoQRope::None,
    );
    match r {
        Err(Error::BadInput(m)) => assert!(m.contains("window of 8 slots"), "{m}"),
        other => panic!("expected BadInput, got {other:?}"),
    }
}

fn check_dit_ops(d: &Dev, rng: &mut Rng, rows: usize, dim: usize, tpf: usize) {
    println!("dit ops rows={rows} dim={dim} tokens_per_frame={tpf}");
    let shape = RowShape {
        rows,
        dim,
        tokens_per_frame: tpf,
    };
    let n = rows * dim;
    let frames = rows.div_ceil(tpf);
    let (x, xh) = d.rand(n, 2.0, rng);
    let (y, yh) = d.rand(n, 1.0, rng);
    let (w, wh) = d.rand(dim, 1.0, rng);
    let (shift, shh) = d.rand(frames * dim, 0.5, rng);
    let (scale, sch) = d.rand(frames * dim, 0.5, rng);
    let (gate, gh) = d.rand(frames * dim, 1.0, rng);
    let eps = 1e-6;

    // RMSNorm, single GPU (one pass computes its own sum of squares and reports it).
    let mut out = d.poisoned(n);
    let mut ss = d
        .stream
        .clone_htod(&vec![f32::NAN; rows])
        .unwrap_or_else(|e| panic!("{e}"));
    dit_ops::rms_sum_squares(&d.gpu, &d.stream, shape, &x, &mut ss)
        .unwrap_or_else(|e| panic!("{e}"));
    dit_ops::rms_norm(&d.gpu, &d.stream, shape, &x, &w, None, eps, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want = xh.clone();
    ops::rms_norm(&mut want, rows, dim, &wh, eps);
    assert_close("rms_norm", &d.host(&out), &want, BF16_TOL);
    assert_close(
        "sum of squares",
        &d.host_f32(&ss),
        &ops::sum_squares(&xh, rows, dim),
        1e-4, // fp32 sums of up to 8192 terms in a different order than the CPU's
    );

    // Distributed RMSNorm: two shards of dim/2 (when that is a multiple of 8), partial sums
    // all-reduced by hand, each shard normalised with the total.
    if dim % 16 == 0 {
        let hd = dim / 2;
        let sh = RowShape { dim: hd, ..shape };
        let shard = |v: &[f32], lo: usize| -> Vec<f32> {
            v.chunks(dim)
                .flat_map(|r| r[lo..lo + hd].to_vec())
                .collect()
        };
        let mut total = vec![0.0f32; rows];
        let mut shards = Vec::new();
        for lo in [0, hd] {
            let xs = d.upload(&shard(&xh, lo));
            let mut part = d
                .stream
                .clone_htod(&vec![f32::NAN; rows])
                .unwrap_or_else(|e| panic!("{e}"));
            dit_ops::rms_sum_squares(&d.gpu, &d.stream, sh, &xs, &mut part)
                .unwrap_or_else(|e| panic!("{e}"));
            for (t, p) in total.iter_mut().zip(d.host_f32(&part)) {
                *t += p;
            }
            shards.push((lo, xs));
        }
        let total_dev = d
            .stream
            .clone_htod(&total)
            .unwrap_or_else(|e| panic!("{e}"));
        for (lo, xs) in &shards {
            let ws = d.upload(&wh[*lo..*lo + hd]);
            let mut o = d.poisoned(rows * hd);
            dit_ops::rms_norm(
                &d.gpu,
                &d.stream,
                sh,
                xs,
                &ws,
                Some((&total_dev, dim)),
                eps,
                &mut o,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_close(
                &format!("distributed rms_norm shard at {lo}"),
                &d.host(&o),
                &shard(&want, *lo),
                BF16_TOL,
            );
        }
    }

    // LayerNorm + adaLN.
    let mut out = d.poisoned(n);
    dit_ops::layer_norm_modulate(&d.gpu, &d.stream, shape, &x, &shift, &scale, eps, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    let want = ops::layer_norm_modulate(&xh, rows, dim, tpf, &shh, &sch, eps);
    assert_close("layer_norm_modulate", &d.host(&out), &want, BF16_TOL);

    // Gated residual in place.
    let mut xr = d.upload(&xh);
    dit_ops::gated_residual(&d.gpu, &d.stream, shape, &mut xr, &y, &gate)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut want_x = xh.clone();
    ops::gated_residual(&mut want_x, &yh, rows, dim, tpf, &gh);
    let got_x = d.host(&xr);
    assert_close("gated_residual", &got_x, &want_x, BF16_TOL);

    // Fused gated residual + LN-modulate: x as the unfused kernel leaves it, out = LN of that.
    let mut xf = d.upload(&xh);
    let mut out = d.poisoned(n);
    dit_ops::gated_residual_layer_norm_modulate(
        &d.gpu, &d.stream, shape, &mut xf, &y, &gate, &shift, &scale, eps, &mut out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let got_xf = d.host(&xf);
    assert_eq!(
        got_xf, got_x,
        "fused residual must equal the unfused one bit for bit"
    );
    let mut xb = want_x.clone();
    round_bf16(&mut xb);
    let want = ops::layer_norm_modulate(&xb, rows, dim, tpf, &shh, &sch, eps);
    assert_close(
        "gated_residual+layer_norm_modulate fused",
        &d.host(&out),
        &want,
        BF16_TOL,
    );

    // GELU-tanh in place.
    let mut g = d.upload(&xh);
    dit_ops::gelu_tanh(&d.gpu, &d.stream, &mut g).unwrap_or_else(|e| panic!("{e}"));
    let mut want = xh.clone();
    ops::gelu_tanh(&mut want);
    assert_close("gelu_tanh", &d.host(&g), &want, BF16_TOL);
}

#[test]
fn dit_ops_match_cpu_reference_at_model_and_odd_shapes() {
    let Some(d) = dev("dit_ops_match_cpu_reference_at_model_and_odd_shapes") else {
        return;
    };
    let mut rng = fresh_rng("dit ops");
    check_dit_ops(&d, &mut rng, 4680, 5120, 1560); // wan-14b chunk
    check_dit_ops(&d, &mut rng, 4680, 1536, 1560); // wan-1.3b chunk
    check_dit_ops(&d, &mut rng, 7, 1544, 3); // odd: dim not a multiple of 2048, partial frame
    check_dit_ops(&d, &mut rng, 1, 8, 1); // one row, one vector
}

/// The device latent's Euler step and its bf16 input against the host executor's arithmetic
/// (`x += dt * v` in f32, then `bf16::from_f32`), bit for bit: normal values, subnormals
/// (which `--use_fast_math` would flush: the kernel must not), zeros and a length that is not a
/// multiple of 8; outputs poisoned first.
#[test]
fn latent_euler_step_is_the_host_executors_f32_arithmetic_bit_for_bit() {
    let Some(d) = dev("latent_euler_step_is_the_host_executors_f32_arithmetic_bit_for_bit") else {
        return;
    };
    let mut rng = fresh_rng("latent euler");
    let mut unit = move || (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    for n in [4680 * 64, 1003, 1] {
        // Latents: subnormals (positive and negative), zeros, normal values. Velocities: zero
        // where the latent is subnormal (it must stay so), subnormal (a subnormal product),
        // normal values.
        let mut x: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => f32::from_bits(0x0000_0123),
                1 => -f32::MIN_POSITIVE * 0.75,
                2 => 0.0,
                _ => unit() * 3.0,
            })
            .collect();
        let v: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 | 1 => 0.0,
                3 => 1e-38 * unit(),
                _ => unit() * 4.0,
            })
            .map(|v| f32::from(bf16::from_f32(v)))
            .collect();
        let v_dev = d.upload(&v);
        let dt = -0.25f32;
        let mut lat = d
            .stream
            .clone_htod(&x)
            .unwrap_or_else(|e| panic!("upload: {e}"));
        let mut x_in = d.poisoned(n);
        dit_ops::latent_to_input(&d.gpu, &d.stream, &lat, &mut x_in)
            .unwrap_or_else(|e| panic!("{e}"));
        let want_in: Vec<u16> = x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        let got_in: Vec<u16> = d.host_bits(&x_in).iter().map(|b| b.to_bits()).collect();
        assert_eq!(got_in, want_in, "latent_to_input, n = {n}");
        for step in 0..3 {
            let dt = dt * (step + 1) as f32;
            d.poison(&mut x_in);
            dit_ops::euler_step(&d.gpu, &d.stream, &mut lat, &v_dev, dt, &mut x_in)
                .unwrap_or_else(|e| panic!("{e}"));
            x.iter_mut().zip(&v).for_each(|(a, b)| *a += dt * b);
            let got = d.host_f32(&lat);
            let bad = got
                .iter()
                .zip(&x)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(
                bad, 0,
                "euler_step n = {n} step {step}: {bad} latents differ"
            );
            let want_in: Vec<u16> = x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
            let got_in: Vec<u16> = d.host_bits(&x_in).iter().map(|b| b.to_bits()).collect();
            assert_eq!(got_in, want_in, "euler_step input, n = {n} step {step}");
        }
        assert!(
            x.iter().any(|v| v.is_subnormal()),
            "the check must cover subnormals"
        );
    }
    // Lengths that disagree are refused before a launch.
    let lat = d
        .stream
        .alloc_zeros::<f32>(16)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut short = d.poisoned(8);
    let e = dit_ops::latent_to_input(&d.gpu, &d.stream, &lat, &mut short).unwrap_err();
    assert!(matches!(e, Error::BadInput(_)), "{e:?}");
}

/// The C ABI's `lockstep_chunk_copy_latent_to_device`: a chunk's latent lands bit for bit in a
/// device buffer of the caller's current context, copied on the caller's stream, and the chunk
/// may be freed as soon as the call returns.
#[test]
fn a_chunks_latent_lands_in_the_callers_device_buffer_on_its_stream() {
    use cudarc::driver::DevicePtr;
    use lockstep::ffi::session::{
        lockstep_chunk_copy_latent_to_device, LockstepChunk, LockstepIds,
    };
    let Some(d) = dev("a_chunks_latent_lands_in_the_callers_device_buffer_on_its_stream") else {
        return;
    };
    let n = 4680 * 64;
    let latent: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let chunk = Box::new(LockstepChunk {
        ids: LockstepIds {
            call_id: 1,
            chunk_index: 0,
            cache_epoch: 0,
        },
        s1_us: 0,
        latent: latent.as_ptr(),
        latent_len: n as u64,
        latent_shape: [4680, 64],
        frames: std::ptr::null(),
        n_frames: 0,
        frame_h: 0,
        frame_w: 0,
        reserved: 0,
    });
    let dst = d
        .stream
        .alloc_zeros::<f32>(n)
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _g) = dst.device_ptr(&d.stream);
    d.gpu
        .context()
        .bind_to_thread()
        .unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: a live chunk; `p` holds n f32 in the current context; the stream is live.
    let st = unsafe {
        lockstep_chunk_copy_latent_to_device(
            &*chunk,
            p,
            (n * 4) as u64,
            d.stream.cu_stream().cast(),
        )
    };
    assert_eq!(st, 0);
    // The chunk and its latent may go at once.
    drop(chunk);
    let want: Vec<u32> = latent.iter().map(|v| v.to_bits()).collect();
    drop(latent);
    drop(_g);
    let got: Vec<u32> = d.host_f32(&dst).iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, want);
}

#[test]
fn gpu_open_without_driver_or_kernels_is_an_error_value_not_a_panic() {
    // Runs everywhere: on a CPU machine it must return an error (cudarc would panic); on a GPU
    // host with kernels it must succeed.
    let gpu_ready =
        lockstep::cuda::embedded::has_kernels() && lockstep::cuda::probe::gpu_available();
    match Gpu::open(0) {
        Ok(g) => assert!(gpu_ready, "opened {} although no GPU was probed", g.name()),
        Err(e) => {
            assert!(!gpu_ready, "GPU present but open failed: {e}");
            assert!(
                matches!(
                    e,
                    Error::NoKernels(_) | Error::LibraryMissing(_) | Error::BadInput(_)
                ),
                "{e:?}"
            );
            println!("no GPU here, as expected: {e}");
        }
    }
}
