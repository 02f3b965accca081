// Attention forward, version 1 (FA2-style): mma.sync m16n8k16 bf16, ldmatrix, cp.async double
// buffering, online softmax in fp32 with exp2 and the softmax scale folded into one FMA.
//
// Contract (mirrored by src/cuda/attention.rs, which checks it before every launch):
// - q [Lq, H, 128], k/v [Lk, H, 128], o [Lq, H, 128], all bf16, token-major; the row stride
//   (elements between consecutive tokens) is given per tensor, head h starts at h*128.
// - No mask. Any Lk >= 1 and any Lq >= 1: the last key tile is masked to -inf past Lk, rows past
//   Lq are computed on zeros and never stored. Out-of-range rows are zero-filled by cp.async
//   (src-size 0), never read.
// - K/V rows may be in any order (attention is a set operation), so a ring cache is passed as
//   one contiguous [Lk, H, 128] view of its occupied slots.
// - lse (optional, may be null): fp32 [Lq, H], natural log-sum-exp of the scaled scores.
// - Softmax statistics (running max, running sum) and the O accumulator are fp32; P is rounded
//   to bf16 for the P·V product (as FA2 does).
//
// Tripwires: changing BM/BN/WARPS changes the smem size the host passes (kSmemBytes, mirrored
// in attention.rs); the XOR swizzle assumes 256-byte rows (head dim 128).
#include "common.cuh"

struct AttnParams {
    const __nv_bfloat16* q;
    const __nv_bfloat16* k;
    const __nv_bfloat16* v;
    __nv_bfloat16* o;
    float* lse;
    uint32_t lq;
    uint32_t lk;
    uint32_t heads;
    uint32_t _pad0;
    uint64_t q_row_stride;
    uint64_t kv_row_stride;
    uint64_t o_row_stride;
    float scale_log2;  // softmax scale * log2(e)
    uint32_t _pad1;
};
static_assert(sizeof(AttnParams) == 88, "AttnParams mirror in src/cuda/attention.rs");

namespace attn_v1 {
constexpr int D = 128;
constexpr int BM = 128;  // query rows per block: 8 warps x one m16 MMA tile each
constexpr int BN = 64;   // keys per tile: 64 keeps S at 32 fp32 regs per thread
constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int CHUNKS = D / 8;           // 16-byte chunks per row
constexpr int ROW_BYTES = D * 2;        // 256
constexpr int SMEM_Q = BM * ROW_BYTES;  // 32 KB
constexpr int SMEM_KV = BN * ROW_BYTES; // 16 KB per K or V tile
constexpr int SMEM = SMEM_Q + 4 * SMEM_KV;  // Q + 2 stages x (K, V) = 96 KB
}  // namespace attn_v1

// Byte offset of 16-byte chunk `c` of row `r` in a 256-byte-row tile. XOR with the row's low 3
// bits puts the 8 rows an ldmatrix phase reads into 8 distinct bank groups.
LS_DEVICE uint32_t attn_swz(int r, int c) { return r * 256 + ((c ^ (r & 7)) << 4); }

template <int ROWS>
LS_DEVICE void attn_load_rows(uint32_t smem, const __nv_bfloat16* g, uint64_t stride, int row0,
                              int nvalid, int tid) {
    using namespace attn_v1;
#pragma unroll
    for (int i = tid; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const bool ok = row0 + r < nvalid;
        const __nv_bfloat16* src = g + (uint64_t)(ok ? row0 + r : 0) * stride + c * 8;
        ls_cp_async16(smem + attn_swz(r, c), src, ok);
    }
}

extern "C" __global__ void __launch_bounds__(attn_v1::THREADS, 1)
    attention_fwd_v1_bf16(const AttnParams p) {
    using namespace attn_v1;
    extern __shared__ __align__(128) uint8_t smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.y;
    const int m0 = blockIdx.x * BM;
    const int lq = (int)p.lq, lk = (int)p.lk;

    const uint32_t sQ = ls_smem_addr(smem);
    const uint32_t sK0 = sQ + SMEM_Q;
    // stage s: K at sK0 + s*2*SMEM_KV, V right after it
    const __nv_bfloat16* qg = p.q + (uint64_t)h * D;
    const __nv_bfloat16* kg = p.k + (uint64_t)h * D;
    const __nv_bfloat16* vg = p.v + (uint64_t)h * D;

    attn_load_rows<BM>(sQ, qg, p.q_row_stride, m0, lq, tid);
    attn_load_rows<BN>(sK0, kg, p.kv_row_stride, 0, lk, tid);
    attn_load_rows<BN>(sK0 + SMEM_KV, vg, p.kv_row_stride, 0, lk, tid);
    ls_cp_async_commit();

    const int ntiles = (lk + BN - 1) / BN;
    const float sl = p.scale_log2;
    uint32_t qf[8][4];
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY};  // running max of raw scores (unscaled)
    float lrow[2] = {0.f, 0.f};              // this thread's share of the running sum

    for (int j = 0; j < ntiles; ++j) {
        ls_cp_async_wait<0>();
        __syncthreads();  // tile j visible to all; every warp is done reading stage (j+1)&1
        if (j == 0) {
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                const int c = 2 * ks + (lane >> 4);
                ls_ldmatrix_x4(qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], sQ + attn_swz(r, c));
            }
        }
        if (j + 1 < ntiles) {
            const uint32_t nk = sK0 + ((j + 1) & 1) * 2 * SMEM_KV;
            attn_load_rows<BN>(nk, kg, p.kv_row_stride, (j + 1) * BN, lk, tid);
            attn_load_rows<BN>(nk + SMEM_KV, vg, p.kv_row_stride, (j + 1) * BN, lk, tid);
        }
        ls_cp_async_commit();
        const uint32_t kb = sK0 + (j & 1) * 2 * SMEM_KV;
        const uint32_t vb = kb + SMEM_KV;

        // S = Q K^T for this warp's 16 rows x 64 keys.
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t b0, b1, b2, b3;
                const int r = np * 16 + (lane & 7) + 8 * (lane >> 4);
                const int c = 2 * ks + ((lane >> 3) & 1);
                ls_ldmatrix_x4(b0, b1, b2, b3, kb + attn_swz(r, c));
                ls_mma_bf16_16816(s[2 * np], qf[ks], b0, b1);
                ls_mma_bf16_16816(s[2 * np + 1], qf[ks], b2, b3);
            }
        }
        if ((j + 1) * BN > lk) {  // only the last tile can reach past Lk
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                const int col = j * BN + n * 8 + 2 * (lane & 3);
                if (col >= lk) s[n][0] = s[n][2] = -INFINITY;
                if (col + 1 >= lk) s[n][1] = s[n][3] = -INFINITY;
            }
        }
        // Online softmax; row r of this thread is lane/4 (+8 for r = 1).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = mrow[r];
#pragma unroll
            for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float corr = exp2f((mrow[r] - mx) * sl);  // 0 on the first tile (-inf)
            mrow[r] = mx;
            const float msl = mx * sl;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
                s[n][2 * r] = exp2f(fmaf(s[n][2 * r], sl, -msl));
                s[n][2 * r + 1] = exp2f(fmaf(s[n][2 * r + 1], sl, -msl));
                sum += s[n][2 * r] + s[n][2 * r + 1];
            }
            lrow[r] = lrow[r] * corr + sum;
#pragma unroll
            for (int d = 0; d < 16; ++d) {
                o[d][2 * r] *= corr;
                o[d][2 * r + 1] *= corr;
            }
        }
        // O += P V: the S accumulators of key subtiles 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            a[0] = ls_pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = ls_pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = ls_pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = ls_pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < 8; ++dp) {
                uint32_t b0, b1, b2, b3;
                const int r = kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                const int c = 2 * dp + (lane >> 4);
                ls_ldmatrix_x4_trans(b0, b1, b2, b3, vb + attn_swz(r, c));
                ls_mma_bf16_16816(o[2 * dp], a, b0, b1);
                ls_mma_bf16_16816(o[2 * dp + 1], a, b2, b3);
            }
        }
    }
    ls_cp_async_wait<0>();

    // Epilogue: finish the row sums across the quad, normalise, store bf16 (and the LSE).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = m0 + warp * 16 + (lane >> 2) + 8 * r;
        if (row < lq) {
            const float inv = 1.f / l;
            __nv_bfloat16* og = p.o + (uint64_t)row * p.o_row_stride + (uint64_t)h * D;
#pragma unroll
            for (int d = 0; d < 16; ++d) {
                const int col = d * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t*>(og + col) =
                    ls_pack_bf16x2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
            }
            if (p.lse != nullptr && (lane & 3) == 0) {
                p.lse[(uint64_t)row * p.heads + h] = (mrow[r] * sl + __log2f(l)) * 0.69314718055994531f;
            }
        }
    }
}
