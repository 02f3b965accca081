// Attention forward, two lines of kernels (BENCHMARKS.md keeps the history of the variants that
// lost and were deleted: v2, v2b, v3p, v3s, v3ps, v3w, v3t2):
// - v1 (FA2-style, any sm_80+ part; the fallback): mma.sync m16n8k16 bf16, ldmatrix, cp.async
//   double buffering, online softmax in fp32 with exp2 and the softmax scale folded into one FMA.
// - v3 (Hopper, attention_v3.cuh, included at the end): TMA producer warpgroup, mbarrier K/V
//   rings, setmaxnreg, two wgmma consumer warpgroups with intra-warpgroup overlap; v3pw = v3 +
//   ping-pong with 176-key tiles (won at H = 40, Lk 9360-18720 in one run); v3t = v3 for the whole
//   waves, then the last partial wave split along the keys over a cluster (the default: fastest
//   measured at the Wan shapes on H100 and H200).
// All share AttnParams and the contract below; the host picks one (AttentionVariant).
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
// Tripwires: changing BM/BN/WARPS changes the smem size and block the host passes (V1_* in
// attention.rs); the XOR swizzle and the XOR-stepped ldmatrix addresses assume 256-byte rows
// (head dim 128) and row offsets that are multiples of 8 rows; SUB = 64 spills (measured).
#include "common.cuh"
#include "wgmma.cuh"

struct AttnParams {
    const __nv_bfloat16* q;
    const __nv_bfloat16* k;
    const __nv_bfloat16* v;
    __nv_bfloat16* o;
    float* lse;
    uint32_t lq;
    uint32_t lk;
    uint32_t heads;
    uint32_t tile_base;  // v3 only: first (query block, head) work tile of this launch

    uint64_t q_row_stride;
    uint64_t kv_row_stride;
    uint64_t o_row_stride;
    float scale_log2;  // softmax scale * log2(e)
    uint32_t tile_end;  // v3 only: one past the last work tile of this launch (v1/v2 ignore both)
};
static_assert(sizeof(AttnParams) == 88, "AttnParams mirror in src/cuda/attention.rs");

namespace attn_v1 {
constexpr int D = 128;
constexpr int MT = 2;     // m16 MMA tiles per warp: each K/V fragment read from smem feeds MT
                          // MMAs, so smem reads per FLOP drop 1.6x against MT = 1 (MT = 1 with
                          // 8 warps: 262 TFLOP/s on H200, see BENCHMARKS.md); costs 128 regs.
constexpr int WARPS = 4;  // 128 threads at <= 255 regs: 2 blocks per SM, whose softmax and MMA
                          // phases overlap (one block alone stalls the tensor cores at every sync).
constexpr int BM = WARPS * MT * 16;  // 128 query rows per block
constexpr int BN = 64;               // keys per smem tile (one cp.async stage, one barrier)
constexpr int SUB = 32;              // keys per softmax step inside a tile
constexpr int NSUB = SUB / 8;        // n8 subtiles per step
constexpr int THREADS = WARPS * 32;
constexpr int CHUNKS = D / 8;               // 16-byte chunks per row
constexpr int ROW_BYTES = D * 2;            // 256
constexpr int SMEM_Q = BM * ROW_BYTES;      // 32 KB
constexpr int SMEM_KV = BN * ROW_BYTES;     // 16 KB per K or V tile
constexpr int SMEM = SMEM_Q + 4 * SMEM_KV;  // Q + 2 stages x (K, V) = 96 KB: 2 blocks per SM
}  // namespace attn_v1
static_assert(attn_v1::SMEM == 96 * 1024, "V1_SMEM_BYTES in src/cuda/attention.rs");

// Byte offset of 16-byte chunk `c` of row `r` in a 256-byte-row tile. XOR with the row's low 3
// bits puts the 8 rows an ldmatrix phase reads into 8 distinct bank groups.
LS_DEVICE uint32_t attn_swz(int r, int c) { return r * 256 + ((c ^ (r & 7)) << 4); }

// Thread t copies chunk t % 16 of rows t / 16 + 8 i: with 128 threads and 16 chunks per row the
// row's low 3 bits, and so the swizzled chunk, are the same for all of a thread's rows, which
// keeps the address arithmetic (and register pressure) of the copy loop to one add per row.
template <int ROWS>
LS_DEVICE void attn_load_rows(uint32_t smem, const __nv_bfloat16* g, uint64_t stride, int row0,
                              int nvalid, int tid) {
    using namespace attn_v1;
    static_assert(THREADS % CHUNKS == 0 && (THREADS / CHUNKS) % 8 == 0, "row step keeps r & 7");
    constexpr int STEP = THREADS / CHUNKS;
    const int c = tid % CHUNKS, r0 = tid / CHUNKS;
    const uint32_t s0 = smem + attn_swz(r0, c);
    const __nv_bfloat16* g0 = g + (uint64_t)(row0 + r0) * stride + c * 8;
#pragma unroll
    for (int i = 0; i < ROWS / STEP; ++i) {
        const bool ok = row0 + r0 + i * STEP < nvalid;
        ls_cp_async16(s0 + i * STEP * ROW_BYTES, ok ? g0 + (uint64_t)i * STEP * stride : g, ok);
    }
}

extern "C" __global__ void __launch_bounds__(attn_v1::THREADS, 2)
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
    float o[MT][16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < 16; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    float mrow[MT][2], lrow[MT][2];  // running max of raw scores; this thread's share of the sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mrow[mt][0] = mrow[mt][1] = -INFINITY;
        lrow[mt][0] = lrow[mt][1] = 0.f;
    }
    const int wrow = warp * MT * 16;  // this warp's first row in the block
    // ldmatrix addresses. Every row an ldmatrix phase reads has r & 7 == lane & 7, so the
    // swizzled chunk (2*ks + hi) ^ (lane & 7) equals (2*ks) ^ (hi ^ (lane & 7)): the per-lane
    // part goes into a base address once, and step ks is one XOR with ks << 5 (row offsets are
    // multiples of 256 and never carry into the chunk bits). Keeps ~80 hoisted addresses out of
    // the register file.
    const int l7 = lane & 7;
    const uint32_t qB = sQ + (wrow + l7 + 8 * ((lane >> 3) & 1)) * ROW_BYTES +
                        (((lane >> 4) ^ l7) << 4);
    const uint32_t kLane = (l7 + 8 * (lane >> 4)) * ROW_BYTES + ((((lane >> 3) & 1) ^ l7) << 4);
    const uint32_t vLane = (l7 + 8 * ((lane >> 3) & 1)) * ROW_BYTES + (((lane >> 4) ^ l7) << 4);

    for (int j = 0; j < ntiles; ++j) {
        ls_cp_async_wait<0>();
        __syncthreads();  // tile j visible to all; every warp is done reading stage (j+1)&1
        if (j + 1 < ntiles) {
            const uint32_t nk = sK0 + ((j + 1) & 1) * 2 * SMEM_KV;
            attn_load_rows<BN>(nk, kg, p.kv_row_stride, (j + 1) * BN, lk, tid);
            attn_load_rows<BN>(nk + SMEM_KV, vg, p.kv_row_stride, (j + 1) * BN, lk, tid);
        }
        ls_cp_async_commit();
        const uint32_t kb = sK0 + (j & 1) * 2 * SMEM_KV;
        const uint32_t kB = kb + kLane;
        const uint32_t vB = kb + SMEM_KV + vLane;

        // The 64-key tile is consumed in two halves of SUB keys: S then needs MT*16 fp32 regs
        // instead of MT*32, which keeps the kernel at <= 255 regs without spills (the full tile
        // spilled 48 bytes); the cost is one more max/rescale round per tile.
#pragma unroll
        for (int half = 0; half < BN / SUB; ++half) {
            const int key0 = j * BN + half * SUB;
            if (key0 >= lk) break;  // uniform: the rest of the last tile is past Lk
            float s[MT][NSUB][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NSUB; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                uint32_t qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ls_ldmatrix_x4(qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3],
                                   (qB + mt * 16 * ROW_BYTES) ^ (ks << 5));
                }
#pragma unroll
                for (int np = 0; np < NSUB / 2; ++np) {
                    uint32_t b0, b1, b2, b3;
                    ls_ldmatrix_x4(b0, b1, b2, b3,
                                   (kB + (half * SUB + np * 16) * ROW_BYTES) ^ (ks << 5));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        ls_mma_bf16_16816(s[mt][2 * np], qa[mt], b0, b1);
                        ls_mma_bf16_16816(s[mt][2 * np + 1], qa[mt], b2, b3);
                    }
                }
            }
            if (key0 + SUB > lk) {  // only the last tile can reach past Lk
#pragma unroll
                for (int n = 0; n < NSUB; ++n) {
                    const int col = key0 + n * 8 + 2 * (lane & 3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (col >= lk) s[mt][n][0] = s[mt][n][2] = -INFINITY;
                        if (col + 1 >= lk) s[mt][n][1] = s[mt][n][3] = -INFINITY;
                    }
                }
            }
            // Online softmax; row r of m-tile mt of this thread is lane/4 (+8 for r = 1). Key 0
            // is always valid, so the running max is finite from the first half on.
            float corr[MT][2];
            bool grew = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float mx = mrow[mt][r];
#pragma unroll
                    for (int n = 0; n < NSUB; ++n)
                        mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    grew |= mx > mrow[mt][r];
                    corr[mt][r] = exp2f((mrow[mt][r] - mx) * sl);  // 0 the first time (-inf)
                    mrow[mt][r] = mx;
                    const float msl = mx * sl;
                    float sum = 0.f;
#pragma unroll
                    for (int n = 0; n < NSUB; ++n) {
                        s[mt][n][2 * r] = exp2f(fmaf(s[mt][n][2 * r], sl, -msl));
                        s[mt][n][2 * r + 1] = exp2f(fmaf(s[mt][n][2 * r + 1], sl, -msl));
                        sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
                    }
                    lrow[mt][r] = lrow[mt][r] * corr[mt][r] + sum;
                }
            }
            // Once the running max settles (after the first few tiles on real data) no row of
            // the warp grows and the 128 multiplies of the O rescale are skipped (warp-uniform).
            if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int d = 0; d < 16; ++d) {
                        o[mt][d][0] *= corr[mt][0];
                        o[mt][d][1] *= corr[mt][0];
                        o[mt][d][2] *= corr[mt][1];
                        o[mt][d][3] *= corr[mt][1];
                    }
            }
            // O += P V: the S accumulators of key subtiles 2kk, 2kk+1 are the A fragment of
            // k-step kk (P rounded to bf16, as FA2 does).
#pragma unroll
            for (int kk = 0; kk < NSUB / 2; ++kk) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = ls_pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = ls_pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = ls_pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = ls_pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < 8; ++dp) {
                    uint32_t b0, b1, b2, b3;
                    ls_ldmatrix_x4_trans(b0, b1, b2, b3,
                                         (vB + (half * SUB + kk * 16) * ROW_BYTES) ^ (dp << 5));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        ls_mma_bf16_16816(o[mt][2 * dp], a[mt], b0, b1);
                        ls_mma_bf16_16816(o[mt][2 * dp + 1], a[mt], b2, b3);
                    }
                }
            }
        }
    }
    ls_cp_async_wait<0>();

    // Epilogue: finish the row sums across the quad, normalise, store bf16 (and the LSE).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = lrow[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int row = m0 + wrow + mt * 16 + (lane >> 2) + 8 * r;
            if (row < lq) {
                const float inv = 1.f / l;
                __nv_bfloat16* og = p.o + (uint64_t)row * p.o_row_stride + (uint64_t)h * D;
#pragma unroll
                for (int d = 0; d < 16; ++d) {
                    const int col = d * 8 + 2 * (lane & 3);
                    *reinterpret_cast<uint32_t*>(og + col) =
                        ls_pack_bf16x2(o[mt][d][2 * r] * inv, o[mt][d][2 * r + 1] * inv);
                }
                if (p.lse != nullptr && (lane & 3) == 0) {
                    p.lse[(uint64_t)row * p.heads + h] =
                        (mrow[mt][r] * sl + __log2f(l)) * 0.69314718055994531f;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Version 3 lives in its own header (roles, tile sizes and barrier ids in one place).
#include "attention_v3.cuh"
