//! cuBLASLt GEMMs (src/cuda/gemm.rs) against the CPU reference `ops::linear`
//! (+ `ops::gelu_tanh`) in f32 from the same bf16 inputs, on fresh random data each run (the
//! seed comes from the clock and is printed; `LOCKSTEP_TEST_SEED` replays one), with the output
//! poisoned (NaN) before every call that does not accumulate, so an unwritten element — or a
//! read of `y` when beta = 0 — fails. Tolerance: relative L2 error ≤ 1e-2; the figures are
//! printed (`--nocapture`).
//! Shapes: Wan 2.1 1.3B's (4680 tokens; 1536→1536, 1536→8960 + GELU, 8960→1536; 512 text tokens
//! 4096→1536; 1 row 1536→9216) and small odd ones, each without bias, with bias, with GELU
//! (+ bias) and accumulating. Every case runs; a case cuBLASLt refuses is listed, then the test
//! fails. Skips, printing why, without a GPU, kernels or libcublasLt; with
//! `LOCKSTEP_REQUIRE_GPU=1` a skip is a failure.
mod common;
use common::{fresh_rng, Rng};

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;
use lockstep::cuda::gemm::{bench_shapes, Epilogue, Gemm, GemmCase, GemmShape};
use lockstep::model::ops;
use lockstep::Error;

const BF16_TOL: f64 = 1e-2;

/// The common device plus a cuBLASLt handle on its stream.
struct Dev {
    dev: common::gpu::Dev,
    gemm: Gemm,
}

impl std::ops::Deref for Dev {
    type Target = common::gpu::Dev;
    fn deref(&self) -> &common::gpu::Dev {
        &self.dev
    }
}

fn dev(test: &str) -> Option<Dev> {
    let dev = common::gpu::dev(test)?;
    let gemm = match Gemm::new(dev.stream.clone()) {
        Ok(g) => g,
        Err(Error::LibraryMissing(m)) => {
            common::skip(test, &format!("cuBLASLt is not loadable: {m}"));
            return None;
        }
        Err(e) => panic!("Gemm::new: {e}"),
    };
    let (ver, lib) = gemm.library();
    println!("{test}: {} with cuBLASLt {ver} ({lib})", dev.gpu.name());
    Some(Dev { dev, gemm })
}

/// Index of the first non-finite element (unwritten NaN poison, or an overflow).
fn first_non_finite(v: &[f32]) -> Option<usize> {
    v.iter().position(|x| !x.is_finite())
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    d_in: usize,
    d_out: usize,
    bias: bool,
    gelu: bool,
    accumulate: bool,
}

impl Case {
    fn shape(&self) -> GemmShape {
        GemmShape {
            rows: self.rows,
            d_in: self.d_in,
            d_out: self.d_out,
        }
    }

    fn label(&self) -> String {
        format!(
            "{}{}{}{}",
            self.shape(),
            if self.bias { " +bias" } else { "" },
            if self.gelu { " gelu" } else { "" },
            if self.accumulate { " +=y" } else { "" }
        )
    }
}

/// The rows whose reference is computed: all of a small output, else 256 spread over it
/// (first and last included). Every row is checked for being written.
fn checked_rows(rows: usize) -> Vec<usize> {
    if rows <= 512 {
        return (0..rows).collect();
    }
    let mut v: Vec<usize> = (0..255).map(|i| i * rows / 255).collect();
    v.push(rows - 1);
    v.dedup();
    v
}

fn gather(v: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| v[r * width..(r + 1) * width].iter().copied())
        .collect()
}

/// Runs one case; `Ok(rel L2 error)` or `Err(why)` (refused by cuBLASLt, unwritten, too far).
fn run_case(d: &mut Dev, rng: &mut Rng, c: Case) -> Result<f64, String> {
    let (x, xh) = d.rand(c.rows * c.d_in, 1.0, rng);
    // Uniform weights with variance 3/d_in keep the outputs O(1) (GELU sees both tails).
    let (w, wh) = d.rand(c.d_out * c.d_in, 3.0 / (c.d_in as f32).sqrt(), rng);
    let bias = c.bias.then(|| d.rand(c.d_out, 0.5, rng));
    let (mut y, y_old) = if c.accumulate {
        let (y, h) = d.rand(c.rows * c.d_out, 1.0, rng);
        (y, Some(h))
    } else {
        (d.poisoned(c.rows * c.d_out), None)
    };
    let epilogue = if c.gelu {
        Epilogue::Gelu
    } else {
        Epilogue::None
    };
    let b: Option<&dyn DevicePtr<bf16>> = bias.as_ref().map(|(b, _)| b as &dyn DevicePtr<bf16>);
    d.gemm
        .linear(c.shape(), &x, &w, b, &mut y, epilogue, c.accumulate)
        .map_err(|e| format!("refused: {e}"))?;
    let got = d.host(&y);
    if let Some(i) = first_non_finite(&got) {
        return Err(format!(
            "element {i} (row {}, col {}) of {} is {} (unwritten or non-finite)",
            i / c.d_out,
            i % c.d_out,
            got.len(),
            got[i]
        ));
    }
    let rows = checked_rows(c.rows);
    let xs = gather(&xh, c.d_in, &rows);
    let mut want = ops::linear(
        &xs,
        rows.len(),
        &wh,
        c.d_in,
        c.d_out,
        bias.as_ref().map(|(_, h)| h.as_slice()),
    );
    if let Some(old) = &y_old {
        for (o, y0) in want.iter_mut().zip(gather(old, c.d_out, &rows)) {
            *o += y0;
        }
    }
    if c.gelu {
        ops::gelu_tanh(&mut want);
    }
    let e = ops::rel_l2(&gather(&got, c.d_out, &rows), &want);
    if e <= BF16_TOL {
        Ok(e)
    } else {
        Err(format!("relative L2 error {e:.3e} > {BF16_TOL:.0e}"))
    }
}

/// Runs every case, prints one line each, fails at the end listing every failure.
fn run_cases(d: &mut Dev, rng: &mut Rng, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        match run_case(d, rng, *c) {
            Ok(e) => println!(
                "  {:<36} rel L2 error {e:.3e} (tol {BF16_TOL:.0e})",
                c.label()
            ),
            Err(why) => {
                println!("  {:<36} FAILED: {why}", c.label());
                failures.push(format!("{}: {why}", c.label()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} case(s) failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn case(rows: usize, d_in: usize, d_out: usize, bias: bool, gelu: bool, acc: bool) -> Case {
    Case {
        rows,
        d_in,
        d_out,
        bias,
        gelu,
        accumulate: acc,
    }
}

#[test]
fn gemm_matches_cpu_reference_at_wan_shapes() {
    let test = "gemm_matches_cpu_reference_at_wan_shapes";
    let Some(mut d) = dev(test) else {
        return;
    };
    let mut rng = fresh_rng(test);
    let t = 4680;
    let cases = [
        // Self-attention q/k/v/o projections: no bias, bias, bias + residual accumulate.
        case(t, 1536, 1536, false, false, false),
        case(t, 1536, 1536, true, false, false),
        case(t, 1536, 1536, true, false, true),
        // FFN up (GELU + bias) and down (bias; bias + accumulate).
        case(t, 1536, 8960, true, true, false),
        case(t, 1536, 8960, false, true, false),
        case(t, 8960, 1536, true, false, false),
        case(t, 8960, 1536, true, false, true),
        // Cross-attention k/v from 512 text tokens of width 4096; time projection (one row).
        case(512, 4096, 1536, true, false, false),
        case(1, 1536, 9216, true, false, false),
        case(1, 1536, 9216, false, false, true),
    ];
    run_cases(&mut d, &mut rng, &cases);
}

#[test]
fn gemm_matches_cpu_reference_at_small_odd_shapes() {
    let test = "gemm_matches_cpu_reference_at_small_odd_shapes";
    let Some(mut d) = dev(test) else {
        return;
    };
    let mut rng = fresh_rng(test);
    let mut cases = Vec::new();
    for rows in [1, 7, 192] {
        for (d_in, d_out) in [(64, 128), (128, 384), (384, 128)] {
            for (bias, gelu, acc) in [
                (false, false, false),
                (true, false, false),
                (false, true, false),
                (true, true, false),
                (false, false, true),
                (true, false, true),
            ] {
                cases.push(case(rows, d_in, d_out, bias, gelu, acc));
            }
        }
    }
    run_cases(&mut d, &mut rng, &cases);
}

/// erf through the Chebyshev-fitted erfc of Numerical Recipes (§6.2; fractional error of erfc
/// below 1.2e-7 everywhere), ample for telling the two GELUs apart.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// Which GELU is cuBLASLt's? W = I makes the epilogue see exactly the bf16 inputs, swept over
/// [-5, 3); the output is compared with `ops::gelu_tanh` (must pass the tolerance) and, for
/// information, with the exact erf GELU.
#[test]
fn gemm_gelu_epilogue_is_the_tanh_approximation() {
    let test = "gemm_gelu_epilogue_is_the_tanh_approximation";
    let Some(mut d) = dev(test) else {
        return;
    };
    let (rows, dim) = (256, 64);
    let n = rows * dim;
    let xh: Vec<f32> = (0..n)
        .map(|i| f32::from(bf16::from_f32(-5.0 + 8.0 * i as f32 / n as f32)))
        .collect();
    let wh: Vec<f32> = (0..dim * dim)
        .map(|i| if i / dim == i % dim { 1.0 } else { 0.0 })
        .collect();
    let x = d.upload(&xh);
    let w = d.upload(&wh);
    let shape = GemmShape {
        rows,
        d_in: dim,
        d_out: dim,
    };
    let mut y = d.poisoned(n);
    d.gemm
        .linear(shape, &x, &w, None, &mut y, Epilogue::Gelu, false)
        .unwrap_or_else(|e| panic!("gelu probe: {e}"));
    let got = d.host(&y);
    if let Some(i) = first_non_finite(&got) {
        panic!("gelu probe: element {i} is {} (unwritten)", got[i]);
    }
    let mut tanh_ref = xh.clone();
    ops::gelu_tanh(&mut tanh_ref);
    let erf_ref: Vec<f32> = xh
        .iter()
        .map(|&v| {
            let v = f64::from(v);
            (0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))) as f32
        })
        .collect();
    let rms = |r: &[f32]| {
        let s: f64 = got
            .iter()
            .zip(r)
            .map(|(g, w)| (f64::from(*g) - f64::from(*w)).powi(2))
            .sum();
        (s / n as f64).sqrt()
    };
    let max_abs = |r: &[f32]| {
        got.iter()
            .zip(r)
            .map(|(g, w)| (f64::from(*g) - f64::from(*w)).abs())
            .fold(0.0f64, f64::max)
    };
    let (e_tanh, e_erf) = (ops::rel_l2(&got, &tanh_ref), ops::rel_l2(&got, &erf_ref));
    println!(
        "  gelu probe over [-5, 3): vs gelu_tanh rel L2 {e_tanh:.3e}, rms {:.3e}, max abs {:.3e}",
        rms(&tanh_ref),
        max_abs(&tanh_ref)
    );
    println!(
        "  gelu probe over [-5, 3): vs erf GELU  rel L2 {e_erf:.3e}, rms {:.3e}, max abs {:.3e} \
         ({} is closer)",
        rms(&erf_ref),
        max_abs(&erf_ref),
        if rms(&tanh_ref) <= rms(&erf_ref) {
            "tanh"
        } else {
            "erf"
        }
    );
    // Over the whole sweep bf16 rounding of the output (up to 8e-3 near |y| = 3) swamps the
    // two GELUs' difference (at most 4.7e-4 absolute). In the negative tail they differ in
    // relative terms (erf/tanh - 1: 2.9% at x = -2.5, 11% at -3, 32% at -3.5) while a bf16
    // output is good to 0.4%: the relative error there tells them apart (information only:
    // how precisely cuBLASLt evaluates tanh in the tail is not documented).
    let tail: Vec<usize> = (0..n).filter(|&i| (-3.5..=-2.5).contains(&xh[i])).collect();
    let tail_rel = |r: &[f32]| {
        let s: f64 = tail
            .iter()
            .map(|&i| ((f64::from(got[i]) - f64::from(r[i])) / f64::from(r[i])).powi(2))
            .sum();
        (s / tail.len() as f64).sqrt()
    };
    let (t_tanh, t_erf) = (tail_rel(&tanh_ref), tail_rel(&erf_ref));
    println!(
        "  gelu probe tail [-3.5, -2.5] ({} points): rms relative error vs gelu_tanh {t_tanh:.3e}, \
         vs erf GELU {t_erf:.3e} ({} is closer)",
        tail.len(),
        if t_tanh <= t_erf { "tanh" } else { "erf" }
    );
    assert!(
        e_tanh <= BF16_TOL,
        "gelu probe: relative L2 error vs gelu_tanh {e_tanh:.3e} > {BF16_TOL:.0e}"
    );
}

/// A repeated key runs no heuristic and gives bitwise-identical output; a new bias buffer on a
/// cached key is honoured; bad inputs are refused before cuBLASLt runs anything.
#[test]
fn gemm_plan_cache_reuses_the_heuristic_and_repeats_bitwise() {
    let test = "gemm_plan_cache_reuses_the_heuristic_and_repeats_bitwise";
    let Some(mut d) = dev(test) else {
        return;
    };
    let mut rng = fresh_rng(test);
    for (shape, epilogue) in [
        (
            GemmShape {
                rows: 192,
                d_in: 128,
                d_out: 384,
            },
            Epilogue::None,
        ),
        (
            GemmShape {
                rows: 4680,
                d_in: 1536,
                d_out: 8960,
            },
            Epilogue::Gelu,
        ),
        (
            GemmShape {
                rows: 4680,
                d_in: 8960,
                d_out: 1536,
            },
            Epilogue::None,
        ),
    ] {
        let GemmShape { rows, d_in, d_out } = shape;
        let (x, _) = d.rand(rows * d_in, 1.0, &mut rng);
        let (w, _) = d.rand(d_out * d_in, 3.0 / (d_in as f32).sqrt(), &mut rng);
        let (b1, _) = d.rand(d_out, 0.5, &mut rng);
        let (b2, _) = d.rand(d_out, 0.5, &mut rng);
        let mut y = d.poisoned(rows * d_out);
        let q0 = d.gemm.heuristic_queries();
        let run = |d: &mut Dev, b: &CudaSlice<bf16>, y: &mut CudaSlice<bf16>| -> Vec<u16> {
            d.poison(y);
            d.gemm
                .linear(shape, &x, &w, Some(b), y, epilogue, false)
                .unwrap_or_else(|e| panic!("{shape}: {e}"));
            d.host_bits(y).iter().map(|v| v.to_bits()).collect()
        };
        let first = run(&mut d, &b1, &mut y);
        assert_eq!(d.gemm.heuristic_queries(), q0 + 1, "{shape}: first call");
        let plans = d.gemm.cached_plans();
        for _ in 0..3 {
            let again = run(&mut d, &b1, &mut y);
            assert_eq!(
                d.gemm.heuristic_queries(),
                q0 + 1,
                "{shape}: a repeated call ran the heuristic"
            );
            assert_eq!(d.gemm.cached_plans(), plans);
            let diff = first.iter().zip(&again).filter(|(a, b)| a != b);
            assert_eq!(
                diff.count(),
                0,
                "{shape}: a repeated call is not bitwise identical"
            );
        }
        // Same key, other bias buffer: no heuristic, and the new bias is used (the cached
        // descriptor's bias pointer is refreshed on every call).
        let other = run(&mut d, &b2, &mut y);
        assert_eq!(
            d.gemm.heuristic_queries(),
            q0 + 1,
            "{shape}: new bias buffer"
        );
        assert_ne!(other, first, "{shape}: the second bias buffer was ignored");
        let back = run(&mut d, &b1, &mut y);
        assert_eq!(back, first, "{shape}: switching back to the first bias");
        println!(
            "  {shape} {epilogue:?} +bias: 1 heuristic query for 6 calls, 4 bitwise-identical \
             outputs, bias pointer refreshed"
        );
    }

    // A new key (same shape, accumulate) is one more query.
    let shape = GemmShape {
        rows: 192,
        d_in: 128,
        d_out: 384,
    };
    let (x, _) = d.rand(192 * 128, 1.0, &mut rng);
    let (w, _) = d.rand(384 * 128, 0.25, &mut rng);
    let (mut y, _) = d.rand(192 * 384, 1.0, &mut rng);
    let q = d.gemm.heuristic_queries();
    d.gemm
        .linear(shape, &x, &w, None, &mut y, Epilogue::None, true)
        .unwrap_or_else(|e| panic!("accumulate: {e}"));
    assert_eq!(d.gemm.heuristic_queries(), q + 1, "new key (accumulate)");
    d.gemm
        .prepare(shape, false, Epilogue::None, true)
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    assert_eq!(d.gemm.heuristic_queries(), q + 1, "prepare of a cached key");

    // Refusals, before any heuristic: wrong length, 2-byte-misaligned view, GELU + accumulate.
    let q = d.gemm.heuristic_queries();
    let short = d.poisoned(192 * 128 - 8);
    let r = d
        .gemm
        .linear(shape, &short, &w, None, &mut y, Epilogue::None, false);
    assert!(matches!(r, Err(Error::BadInput(_))), "short x: {r:?}");
    println!(
        "  short x refused: {}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
    let wide = d.poisoned(192 * 128 + 1);
    let off = wide.slice(1..);
    let r = d
        .gemm
        .linear(shape, &off, &w, None, &mut y, Epilogue::None, false);
    assert!(matches!(r, Err(Error::BadInput(_))), "misaligned x: {r:?}");
    println!(
        "  misaligned x refused: {}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
    let r = d
        .gemm
        .linear(shape, &x, &w, None, &mut y, Epilogue::Gelu, true);
    assert!(
        matches!(r, Err(Error::BadInput(_))),
        "gelu + accumulate: {r:?}"
    );
    let zero = GemmShape {
        rows: 0,
        d_in: 128,
        d_out: 384,
    };
    let r = d
        .gemm
        .linear(zero, &x, &w, None, &mut y, Epilogue::None, false);
    assert!(matches!(r, Err(Error::BadInput(_))), "zero rows: {r:?}");
    assert_eq!(
        d.gemm.heuristic_queries(),
        q,
        "a refused call ran the heuristic"
    );
    d.stream
        .synchronize()
        .unwrap_or_else(|e| panic!("synchronize: {e}"));
}

/// `bench_shapes` runs and returns sane figures (printed; BENCHMARKS-grade numbers come from
/// `lockstep bench`, not from this test).
#[test]
fn gemm_bench_shapes_runs() {
    let test = "gemm_bench_shapes_runs";
    let Some(d) = dev(test) else {
        return;
    };
    let shape = |rows, d_in, d_out| GemmShape { rows, d_in, d_out };
    let cases = [
        GemmCase {
            shape: shape(4680, 1536, 1536),
            bias: true,
            epilogue: Epilogue::None,
        },
        GemmCase {
            shape: shape(4680, 1536, 8960),
            bias: true,
            epilogue: Epilogue::Gelu,
        },
        GemmCase {
            shape: shape(4680, 8960, 1536),
            bias: true,
            epilogue: Epilogue::None,
        },
        GemmCase {
            shape: shape(512, 4096, 1536),
            bias: true,
            epilogue: Epilogue::None,
        },
        GemmCase {
            shape: shape(1, 1536, 9216),
            bias: true,
            epilogue: Epilogue::None,
        },
    ];
    let rows = bench_shapes(&d.gpu, &cases, 20).unwrap_or_else(|e| panic!("bench: {e}"));
    assert_eq!(rows.len(), cases.len());
    for (c, ms, tflops) in rows {
        println!(
            "  bench {} bias={} {:?}: {ms:.4} ms median, {tflops:.1} TFLOP/s",
            c.shape, c.bias, c.epilogue
        );
        assert!(
            ms.is_finite() && ms > 0.0 && tflops.is_finite(),
            "{c:?}: {ms} ms"
        );
    }
}
