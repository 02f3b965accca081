// DiT element-wise ops: RMSNorm (with the partial sum of squares that the distributed q/k
// RMSNorm all-reduces), LayerNorm + adaLN shift/scale per frame, gated residual, GELU-tanh, and
// the fused gated-residual + LayerNorm-modulate pair (one pass instead of two over the stream),
// and the Euler step of a chunk's latent kept on the device (f32, bit for bit the host's).
//
// Contract (mirrored by src/cuda/dit_ops.rs, which checks it before every launch):
// - Row ops: x [rows, dim] bf16 row-major, one block per row, the row held in registers (one read,
//   one write). dim % 8 == 0 and dim <= DIT_MAX_DIM; pointers 16-byte aligned.
// - Per-frame tensors (shift, scale, gate) are [frames, dim] bf16; row r uses frame
//   r / tokens_per_frame (ops::layer_norm_modulate, ops::gated_residual).
// - Math in fp32 from bf16 inputs, one bf16 rounding per output, sums in fp32.
// - rms_norm: y = x / sqrt(sumsq / total_dim + eps) * weight, sumsq = sumsq_in[r] when given (the
//   all-reduced TP sum), else this row's own sum; sumsq_out (optional) receives this row's own
//   sum of squares (ops::sum_squares), so one launch serves the single-GPU case.
//
// Tripwire: DIT_VPT * 8 * DIT_THREADS bounds dim (8192); a larger model dim needs a larger VPT.
#include "common.cuh"

struct DitParams {
    const __nv_bfloat16* x;
    const __nv_bfloat16* y;
    __nv_bfloat16* out;
    __nv_bfloat16* x_out;  // fused residual: the updated stream (may alias x)
    const __nv_bfloat16* weight;
    const __nv_bfloat16* shift;
    const __nv_bfloat16* scale;
    const __nv_bfloat16* gate;
    const float* sumsq_in;
    float* sumsq_out;
    uint64_t n;  // elements, for the flat element-wise ops
    uint32_t rows;
    uint32_t dim;
    uint32_t tokens_per_frame;
    uint32_t total_dim;
    float eps;
    uint32_t _pad0;
};
static_assert(sizeof(DitParams) == 112, "DitParams mirror in src/cuda/dit_ops.rs");

constexpr int DIT_THREADS = 256;
constexpr int DIT_VPT = 4;  // 16-byte vectors per thread: dim <= 4 * 8 * 256 = 8192

struct Row {
    float v[DIT_VPT][8];
};

LS_DEVICE void dit_load(Row& r, const __nv_bfloat16* base, int nvec) {
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k) {
        const int i = threadIdx.x + k * DIT_THREADS;
        if (i < nvec) {
            const uint4 u = reinterpret_cast<const uint4*>(base)[i];
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 f = ls_unpack_bf16x2(w[e]);
                r.v[k][2 * e] = f.x;
                r.v[k][2 * e + 1] = f.y;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) r.v[k][e] = 0.f;
        }
    }
}

LS_DEVICE void dit_load_vec(float (&f)[8], const __nv_bfloat16* base, int i) {
    const uint4 u = reinterpret_cast<const uint4*>(base)[i];
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 t = ls_unpack_bf16x2(w[e]);
        f[2 * e] = t.x;
        f[2 * e + 1] = t.y;
    }
}

LS_DEVICE void dit_store_vec(__nv_bfloat16* base, int i, const float (&f)[8]) {
    uint4 u;
    uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = ls_pack_bf16x2(f[2 * e], f[2 * e + 1]);
    reinterpret_cast<uint4*>(base)[i] = u;
}

LS_DEVICE float dit_row_sum(const Row& r) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) s += r.v[k][e];
    return s;
}

extern "C" __global__ void __launch_bounds__(DIT_THREADS) rms_norm_bf16(const DitParams p) {
    __shared__ float scratch[32];
    const uint64_t row = blockIdx.x;
    const int nvec = (int)p.dim / 8;
    Row r;
    dit_load(r, p.x + row * p.dim, nvec);
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += r.v[k][e] * r.v[k][e];
    ss = ls_block_sum(ss, scratch);
    if (p.sumsq_out != nullptr && threadIdx.x == 0) p.sumsq_out[row] = ss;
    if (p.out == nullptr) return;  // partial-sum-only launch (distributed RMSNorm, step 1)
    const float total = p.sumsq_in != nullptr ? p.sumsq_in[row] : ss;
    const float inv = rsqrtf(total / (float)p.total_dim + p.eps);
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k) {
        const int i = threadIdx.x + k * DIT_THREADS;
        if (i < nvec) {
            float w[8];
            dit_load_vec(w, p.weight, i);
#pragma unroll
            for (int e = 0; e < 8; ++e) r.v[k][e] = r.v[k][e] * inv * w[e];
            dit_store_vec(p.out + row * p.dim, i, r.v[k]);
        }
    }
}

// LN (no affine) of the row held in r, then adaLN with frame f's shift/scale, stored to out.
LS_DEVICE void dit_ln_modulate_store(Row& r, const DitParams& p, uint64_t row, int nvec,
                                     float* scratch) {
    const float mean = ls_block_sum(dit_row_sum(r), scratch) / (float)p.dim;
    float var = 0.f;
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k) {
        const int i = threadIdx.x + k * DIT_THREADS;
        if (i < nvec)
#pragma unroll
            for (int e = 0; e < 8; ++e) var += (r.v[k][e] - mean) * (r.v[k][e] - mean);
    }
    var = ls_block_sum(var, scratch) / (float)p.dim;
    const float inv = rsqrtf(var + p.eps);
    const uint64_t f = row / p.tokens_per_frame;
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k) {
        const int i = threadIdx.x + k * DIT_THREADS;
        if (i < nvec) {
            float sh[8], sc[8];
            dit_load_vec(sh, p.shift + f * p.dim, i);
            dit_load_vec(sc, p.scale + f * p.dim, i);
#pragma unroll
            for (int e = 0; e < 8; ++e) r.v[k][e] = (r.v[k][e] - mean) * inv * (1.f + sc[e]) + sh[e];
            dit_store_vec(p.out + row * p.dim, i, r.v[k]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(DIT_THREADS) layer_norm_modulate_bf16(const DitParams p) {
    __shared__ float scratch[32];
    const uint64_t row = blockIdx.x;
    const int nvec = (int)p.dim / 8;
    Row r;
    dit_load(r, p.x + row * p.dim, nvec);
    dit_ln_modulate_store(r, p, row, nvec, scratch);
}

// x_out = x + y * gate[frame]; when out is non-null also out = LN(x_out) * (1 + scale) + shift
// (the next block's modulated norm) without re-reading the stream.
extern "C" __global__ void __launch_bounds__(DIT_THREADS) gated_residual_bf16(const DitParams p) {
    __shared__ float scratch[32];
    const uint64_t row = blockIdx.x;
    const int nvec = (int)p.dim / 8;
    const uint64_t f = row / p.tokens_per_frame;
    Row r;
    dit_load(r, p.x + row * p.dim, nvec);
#pragma unroll
    for (int k = 0; k < DIT_VPT; ++k) {
        const int i = threadIdx.x + k * DIT_THREADS;
        if (i < nvec) {
            float yv[8], g[8];
            dit_load_vec(yv, p.y + row * p.dim, i);
            dit_load_vec(g, p.gate + f * p.dim, i);
#pragma unroll
            for (int e = 0; e < 8; ++e) r.v[k][e] = r.v[k][e] + yv[e] * g[e];
            dit_store_vec(p.x_out + row * p.dim, i, r.v[k]);
            // LN sees the stream as stored (bf16), so fused == unfused bit for bit.
#pragma unroll
            for (int e = 0; e < 8; ++e) r.v[k][e] = __bfloat162float(__float2bfloat16_rn(r.v[k][e]));
        }
    }
    if (p.out != nullptr) dit_ln_modulate_store(r, p, row, nvec, scratch);
}

LS_DEVICE float dit_gelu(float u) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * u * (1.f + tanhf(c * (u + 0.044715f * u * u * u)));
}

// out[i] = gelu_tanh(x[i]) over n elements (n % 8 == 0); out may alias x.
extern "C" __global__ void __launch_bounds__(DIT_THREADS) gelu_tanh_bf16(const DitParams p) {
    const uint64_t nvec = p.n / 8;
    for (uint64_t i = blockIdx.x * (uint64_t)DIT_THREADS + threadIdx.x; i < nvec;
         i += (uint64_t)gridDim.x * DIT_THREADS) {
        float f[8];
        const uint4 u = reinterpret_cast<const uint4*>(p.x)[i];
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float2 t = ls_unpack_bf16x2(w[e]);
            f[2 * e] = dit_gelu(t.x);
            f[2 * e + 1] = dit_gelu(t.y);
        }
        uint4 o;
        uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
        for (int e = 0; e < 4; ++e) ow[e] = ls_pack_bf16x2(f[2 * e], f[2 * e + 1]);
        reinterpret_cast<uint4*>(p.out)[i] = o;
    }
}

// The chunk's latent on the device (Stage 1's denoise loop without a host round trip):
// latent [n] f32, the model's input x_out [n] bf16, the call's output v [n] bf16.
struct LatentParams {
    float* latent;
    const __nv_bfloat16* v;  // nullptr: convert only
    __nv_bfloat16* x_out;
    uint64_t n;
    float dt;
    uint32_t _pad0;
};
static_assert(sizeof(LatentParams) == 40, "LatentParams mirror in src/cuda/dit_ops.rs");

// IEEE f32 product and sum, each rounded to nearest even, subnormals kept: this file is built
// with --use_fast_math (which flushes subnormals in __fmul_rn/__fadd_rn), and the latent must
// step as the host's f32 code steps it.
LS_DEVICE float ieee_mul_f32(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
LS_DEVICE float ieee_add_f32(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// With v: the flow-matching Euler step latent[i] += dt * v[i], rounded as the host's f32 code
// rounds it (a product, then a sum: no fused multiply-add, no flush to zero, so the device and
// the host executor agree bit for bit). Then (with or without v) x_out[i] = bf16_rn(latent[i]):
// the next call's input, as the host path rounds it before its upload.
extern "C" __global__ void __launch_bounds__(DIT_THREADS) latent_euler_step_bf16(const LatentParams p) {
    for (uint64_t i = blockIdx.x * (uint64_t)DIT_THREADS + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * DIT_THREADS) {
        float x = p.latent[i];
        if (p.v != nullptr) {
            x = ieee_add_f32(x, ieee_mul_f32(p.dt, __bfloat162float(p.v[i])));
            p.latent[i] = x;
        }
        p.x_out[i] = __float2bfloat16_rn(x);
    }
}
