// Attention v1 main loop (FA2-style, any sm_80+ part): cp.async double-buffered K/V tiles of
// BN keys, ldmatrix fragments from XOR-swizzled shared memory, mma.sync m16n8k16 for S = QK^T
// and O += PV, the online softmax (softmax.cuh) between them in SUB-key steps. One block =
// WARPS warps x MT*16 query rows, one __syncthreads per K/V tile; two blocks per SM overlap
// each other's softmax with MMA (tile_sizes.cuh has the numbers and their reasons).
//
// Tripwires: the XOR swizzle and the XOR-stepped ldmatrix addresses assume 256-byte rows (head
// dim 128) and row offsets that are multiples of 8 rows. Out-of-range rows are zero-filled by
// cp.async (src-size 0), never read.
#pragma once
#include "../common.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "tile_sizes.cuh"

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

// Runs every key tile for the block's query rows [m0, m0 + BM) of head h; leaves O
// (unnormalized) in `o` and the row statistics in `sm`. `wrow` = this warp's first row.
LS_DEVICE void attn_sm80_mainloop(const AttnParams& p, uint8_t* smem, int h, int m0, int tid,
                                  int wrow, float (&o)[attn_v1::MT][16][4], AttnSm80Softmax& sm) {
    using namespace attn_v1;
    const int lane = tid & 31;
    const int lk = (int)p.lk;

    const uint32_t sQ = ls_smem_addr(smem);
    const uint32_t sK0 = sQ + SMEM_Q;
    // stage s: K at sK0 + s*2*SMEM_KV, V right after it
    const __nv_bfloat16* qg = p.q + (uint64_t)h * D;
    const __nv_bfloat16* kg = p.k + (uint64_t)h * D;
    const __nv_bfloat16* vg = p.v + (uint64_t)h * D;

    attn_load_rows<BM>(sQ, qg, p.q_row_stride, m0, (int)p.lq, tid);
    attn_load_rows<BN>(sK0, kg, p.kv_row_stride, 0, lk, tid);
    attn_load_rows<BN>(sK0 + SMEM_KV, vg, p.kv_row_stride, 0, lk, tid);
    ls_cp_async_commit();

    const int ntiles = (lk + BN - 1) / BN;
    const float sl = p.scale_log2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < 16; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    sm.init();
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

        // The BN-key tile is consumed in BN / SUB steps of SUB keys (register budget, see
        // tile_sizes.cuh); the cost is one more max/rescale round per tile.
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
            AttnSm80Softmax::mask(s, key0, lk, lane);
            float corr[MT][2];
            if (sm.online(s, corr, sl)) AttnSm80Softmax::rescale(o, corr);
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
}
