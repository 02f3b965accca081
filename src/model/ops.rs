//! CPU reference math: the tiny model runs on these, and every CUDA kernel is tested against
//! them. Plain f32, row-major, no cleverness beyond a well-kept GEMM (matrixmultiply).
//!
//! Layout contract shared with `kernels/*.cu`:
//! - activations `[rows, dim]`; attention tensors `[L, H, D]` (token-major);
//! - linear weights `[out, in]` (PyTorch/Wan convention), `y = x · wᵀ + b`;
//! - per-frame adaLN tensors `[frames, dim]`, token `l` belongs to frame `l / tokens_per_frame`;
//! - 3D RoPE (Wan): head dim `D` splits into `D_t = D - 4·(D/6)`, `D_h = D_w = 2·(D/6)` (for
//!   D = 128: 44, 42, 42); inside each part, pairs `(x[2j], x[2j+1])` rotate by
//!   `pos · 10000^(-2j / D_part)` with pos = frame, row or column of the token.
use crate::digest::fnv64;

/// `y[m, out] = x[m, in] · w[out, in]ᵀ (+ b[out])`.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &[f32],
    d_in: usize,
    d_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), m * d_in, "linear: x is not [m, in]");
    assert_eq!(w.len(), d_out * d_in, "linear: w is not [out, in]");
    let mut y = vec![0.0f32; m * d_out];
    if let Some(b) = bias {
        assert_eq!(b.len(), d_out, "linear: bias is not [out]");
        for row in y.chunks_exact_mut(d_out) {
            row.copy_from_slice(b);
        }
    }
    if m == 0 || d_out == 0 {
        return y;
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    // SAFETY: pointers and strides describe the exact buffers checked above: x is m×in with row
    // stride in; wᵀ is read as in×out with row stride 1 and column stride in; y is m×out.
    unsafe {
        matrixmultiply::sgemm(
            m,
            d_in,
            d_out,
            1.0,
            x.as_ptr(),
            d_in as isize,
            1,
            w.as_ptr(),
            1,
            d_in as isize,
            beta,
            y.as_mut_ptr(),
            d_out as isize,
            1,
        );
    }
    y
}

/// Per-row sum of squares of `x[rows, dim]` — the partial that the distributed q/k RMSNorm
/// all-reduces across tensor-parallel ranks.
pub fn sum_squares(x: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * dim);
    x.chunks_exact(dim.max(1))
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// RMSNorm given the (possibly all-reduced) per-row sum of squares over `total_dim` features:
/// `y = x / sqrt(sumsq / total_dim + eps) * weight`. With `sumsq = sum_squares(x)` and
/// `total_dim = dim` it is the plain RMSNorm; in TP each rank passes the all-reduced sum.
pub fn rms_norm_with_sumsq(
    x: &mut [f32],
    rows: usize,
    dim: usize,
    sumsq: &[f32],
    total_dim: usize,
    weight: &[f32],
    eps: f32,
) {
    assert_eq!(x.len(), rows * dim);
    assert_eq!(sumsq.len(), rows);
    assert_eq!(weight.len(), dim);
    for (r, row) in x.chunks_exact_mut(dim.max(1)).enumerate() {
        let inv = 1.0 / (sumsq[r] / total_dim as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// Plain RMSNorm over the last dimension.
pub fn rms_norm(x: &mut [f32], rows: usize, dim: usize, weight: &[f32], eps: f32) {
    let ss = sum_squares(x, rows, dim);
    rms_norm_with_sumsq(x, rows, dim, &ss, dim, weight, eps);
}

/// LayerNorm without affine, then adaLN modulation per frame:
/// `y = LN(x) · (1 + scale[frame]) + shift[frame]`.
pub fn layer_norm_modulate(
    x: &[f32],
    rows: usize,
    dim: usize,
    tokens_per_frame: usize,
    shift: &[f32],
    scale: &[f32],
    eps: f32,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * dim);
    let frames = rows.div_ceil(tokens_per_frame.max(1));
    assert!(
        shift.len() >= frames * dim && scale.len() >= frames * dim,
        "adaLN tensors are not [frames, dim]"
    );
    let mut y = vec![0.0f32; x.len()];
    for (r, (xr, yr)) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)).enumerate() {
        let f = r / tokens_per_frame;
        let mean = xr.iter().sum::<f32>() / dim as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        let (sh, sc) = (
            &shift[f * dim..(f + 1) * dim],
            &scale[f * dim..(f + 1) * dim],
        );
        for i in 0..dim {
            yr[i] = (xr[i] - mean) * inv * (1.0 + sc[i]) + sh[i];
        }
    }
    y
}

/// Gated residual per frame: `x += y · gate[frame]`.
pub fn gated_residual(
    x: &mut [f32],
    y: &[f32],
    rows: usize,
    dim: usize,
    tokens_per_frame: usize,
    gate: &[f32],
) {
    assert_eq!(x.len(), rows * dim);
    assert_eq!(y.len(), rows * dim);
    for (r, (xr, yr)) in x.chunks_exact_mut(dim).zip(y.chunks_exact(dim)).enumerate() {
        let g = &gate[(r / tokens_per_frame) * dim..(r / tokens_per_frame + 1) * dim];
        for i in 0..dim {
            xr[i] += yr[i] * g[i];
        }
    }
}

/// GELU with the tanh approximation, in place.
pub fn gelu_tanh(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x {
        let u = *v;
        *v = 0.5 * u * (1.0 + (C * (u + 0.044_715 * u * u * u)).tanh());
    }
}

/// The three RoPE parts of a head dim: (D_t, D_h, D_w).
pub fn rope_split(head_dim: usize) -> (usize, usize, usize) {
    let s = 2 * (head_dim / 6);
    (head_dim - 2 * s, s, s)
}

/// Token `l` of a chunk whose first latent frame is `start_frame`, on a `grid_h × grid_w` patch
/// grid, sits at (frame, row, col).
pub fn token_position(
    l: usize,
    start_frame: usize,
    grid_h: usize,
    grid_w: usize,
) -> (usize, usize, usize) {
    let per_frame = grid_h * grid_w;
    (
        start_frame + l / per_frame,
        (l % per_frame) / grid_w,
        l % grid_w,
    )
}

/// Applies Wan-style 3D RoPE in place to `x[L, H, D]` for tokens of a chunk starting at
/// `start_frame` (positions from `token_position`).
pub fn rope_3d(
    x: &mut [f32],
    len: usize,
    heads: usize,
    head_dim: usize,
    start_frame: usize,
    grid_h: usize,
    grid_w: usize,
) {
    assert_eq!(x.len(), len * heads * head_dim);
    let (dt, dh, dw) = rope_split(head_dim);
    let parts = [(0usize, dt), (dt, dh), (dt + dh, dw)];
    for l in 0..len {
        let (f, r, c) = token_position(l, start_frame, grid_h, grid_w);
        let pos = [f as f64, r as f64, c as f64];
        for h in 0..heads {
            let base = (l * heads + h) * head_dim;
            for (p, &(off, d)) in parts.iter().enumerate() {
                for j in 0..d / 2 {
                    let theta = pos[p] * 10000f64.powf(-(2.0 * j as f64) / d as f64);
                    let (s, co) = (theta.sin() as f32, theta.cos() as f32);
                    let i0 = base + off + 2 * j;
                    let (a, b) = (x[i0], x[i0 + 1]);
                    x[i0] = a * co - b * s;
                    x[i0 + 1] = a * s + b * co;
                }
            }
        }
    }
}

/// Unmasked attention of `q[Lq, H, D]` over `k, v[Lk, H, D]` with softmax scale `scale`.
/// Returns `(out[Lq, H, D], lse[Lq, H])` where `lse` is the natural log-sum-exp of the scaled
/// scores. Accumulates in f64 so it can serve as the oracle for bf16 kernels.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lq: usize,
    lk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(q.len(), lq * heads * head_dim);
    assert_eq!(k.len(), lk * heads * head_dim);
    assert_eq!(v.len(), lk * heads * head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; lq * heads];
    // Query rows are independent: split them over the machine's threads. Each output element
    // is computed by one thread in one fixed order, so the result does not depend on the split.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = lq.div_ceil(threads.clamp(1, lq.max(1))).max(1);
    std::thread::scope(|sc| {
        for (ci, (oc, lc)) in out
            .chunks_mut(per * heads * head_dim)
            .zip(lse.chunks_mut(per * heads))
            .enumerate()
        {
            sc.spawn(move || {
                attention_rows(q, k, v, ci * per, oc, lc, lk, heads, head_dim, scale);
            });
        }
    });
    (out, lse)
}

/// Attention of the query rows `first..first + out.len() / (heads · head_dim)` (one thread's
/// share of `attention`), f64 accumulation.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    first: usize,
    out: &mut [f32],
    lse: &mut [f32],
    lk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let mut s = vec![0.0f64; lk];
    let mut acc = vec![0.0f64; head_dim];
    for il in 0..out.len() / (heads * head_dim) {
        let i = first + il;
        for h in 0..heads {
            let qi = &q[(i * heads + h) * head_dim..][..head_dim];
            let mut mx = f64::NEG_INFINITY;
            for (j, sj) in s.iter_mut().enumerate() {
                let kj = &k[(j * heads + h) * head_dim..][..head_dim];
                let dot: f64 = qi
                    .iter()
                    .zip(kj)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                *sj = dot * f64::from(scale);
                mx = mx.max(*sj);
            }
            if lk == 0 {
                continue;
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut denom = 0.0f64;
            for (j, sj) in s.iter().enumerate() {
                let p = (sj - mx).exp();
                denom += p;
                let vj = &v[(j * heads + h) * head_dim..][..head_dim];
                for (a, b) in acc.iter_mut().zip(vj) {
                    *a += p * f64::from(*b);
                }
            }
            let o = &mut out[(il * heads + h) * head_dim..][..head_dim];
            for (oo, a) in o.iter_mut().zip(&acc) {
                *oo = (a / denom) as f32;
            }
            lse[il * heads + h] = (mx + denom.ln()) as f32;
        }
    }
}

/// `‖a − b‖ / ‖b‖` (relative L2 error against reference `b`).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Deterministic uniform values in `[-scale, scale)` for a named tensor (splitmix64).
pub fn gen(seed: u64, name: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed ^ fnv64(name.as_bytes());
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    #[test]
    fn linear_matches_naive_loop() {
        let mut s = 1;
        let (m, i, o) = (5, 7, 3);
        let x = rand_vec(m * i, &mut s);
        let w = rand_vec(o * i, &mut s);
        let b = rand_vec(o, &mut s);
        let y = linear(&x, m, &w, i, o, Some(&b));
        for r in 0..m {
            for c in 0..o {
                let want: f32 = b[c] + (0..i).map(|t| x[r * i + t] * w[c * i + t]).sum::<f32>();
                assert!((y[r * o + c] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn distributed_rms_norm_equals_full_rms_norm() {
        let mut s = 2;
        let (rows, dim) = (4, 8);
        let x = rand_vec(rows * dim, &mut s);
        let w = rand_vec(dim, &mut s);
        let mut full = x.clone();
        rms_norm(&mut full, rows, dim, &w, 1e-6);
        // Two shards of 4 features each, sum of squares all-reduced by hand.
        let split = |v: &[f32], lo: usize| -> Vec<f32> {
            v.chunks(dim).flat_map(|r| r[lo..lo + 4].to_vec()).collect()
        };
        let (mut a, mut b) = (split(&x, 0), split(&x, 4));
        let total: Vec<f32> = sum_squares(&a, rows, 4)
            .iter()
            .zip(sum_squares(&b, rows, 4))
            .map(|(p, q)| p + q)
            .collect();
        rms_norm_with_sumsq(&mut a, rows, 4, &total, dim, &w[..4], 1e-6);
        rms_norm_with_sumsq(&mut b, rows, 4, &total, dim, &w[4..], 1e-6);
        for r in 0..rows {
            for c in 0..4 {
                assert!((a[r * 4 + c] - full[r * dim + c]).abs() < 1e-5);
                assert!((b[r * 4 + c] - full[r * dim + 4 + c]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_origin() {
        let mut s = 3;
        let (l, h, d) = (8, 2, 12);
        let x = rand_vec(l * h * d, &mut s);
        let mut y = x.clone();
        rope_3d(&mut y, l, h, d, 0, 2, 2);
        for t in 0..l * h {
            let n0: f32 = x[t * d..][..d].iter().map(|v| v * v).sum();
            let n1: f32 = y[t * d..][..d].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
        // token 0 sits at (0, 0, 0): unrotated.
        assert_eq!(&x[..h * d], &y[..h * d]);
        assert_eq!(rope_split(128), (44, 42, 42));
    }

    #[test]
    fn attention_is_a_set_operation_over_keys() {
        // Permuting keys and values together leaves the output unchanged: the ring cache needs
        // no reordering (docs/spec.md §6).
        let mut s = 4;
        let (lq, lk, h, d) = (3, 5, 2, 4);
        let q = rand_vec(lq * h * d, &mut s);
        let k = rand_vec(lk * h * d, &mut s);
        let v = rand_vec(lk * h * d, &mut s);
        let (o1, l1) = attention(&q, &k, &v, lq, lk, h, d, 0.5);
        let perm = [3, 0, 4, 1, 2];
        let pk: Vec<f32> = perm
            .iter()
            .flat_map(|&j| k[j * h * d..][..h * d].to_vec())
            .collect();
        let pv: Vec<f32> = perm
            .iter()
            .flat_map(|&j| v[j * h * d..][..h * d].to_vec())
            .collect();
        let (o2, l2) = attention(&q, &pk, &pv, lq, lk, h, d, 0.5);
        assert!(rel_l2(&o2, &o1) < 1e-6);
        assert!(rel_l2(&l2, &l1) < 1e-6);
    }

    #[test]
    fn gelu_tanh_known_values() {
        let mut x = [0.0f32, 1.0, -1.0];
        gelu_tanh(&mut x);
        assert!(x[0].abs() < 1e-7);
        assert!((x[1] - 0.841_192).abs() < 1e-5);
        assert!((x[2] + 0.158_808).abs() < 1e-5);
    }
}
