// Attention: the epilogues. Finish each row's sum across the quad of threads that share it,
// normalise O by it, round to bf16 and store; write the natural-log LSE when asked
// (lse = (max * scale_log2 + log2(sum)) * ln 2). Rows past Lq were computed on zeros and are
// never stored.
//
// v3t's split pieces instead leave their unnormalized O (fp32) and per-row (max * scale_log2,
// sum) in their own shared memory over the K/V stages; after a cluster barrier every CTA
// combines BM/SPLIT rows of all pieces through distributed shared memory (mapa +
// ld.shared::cluster) and stores them; a second cluster barrier keeps every CTA's shared memory
// alive until all reads are done. No workspace, no combine kernel.
#pragma once
#include "../common.cuh"
#include "../sm90.cuh"
#include "params.cuh"
#include "softmax.cuh"
#include "tile_sizes.cuh"

// v1: warp rows [wrow, wrow + MT*16) of the block's query rows starting at m0.
LS_DEVICE void attn_sm80_epilogue(const AttnParams& p, const float (&o)[attn_v1::MT][16][4],
                                  const AttnSm80Softmax& sm, int h, int m0, int wrow, int lane) {
    using namespace attn_v1;
    const int lq = (int)p.lq;
    const float sl = p.scale_log2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = sm.lrow[mt][r];
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
                        (sm.mrow[mt][r] * sl + __log2f(l)) * 0.69314718055994531f;
                }
            }
        }
    }
}

// v3 line, one consumer warpgroup (cw) of a whole work tile: its 64 rows from m0 + cw*64.
template <int BN>
LS_DEVICE void attn_sm90_epilogue(const AttnParams& p, const float (&o)[64],
                                  const AttnSm90Softmax<BN>& sm, int lq, float sl, int h, int m0,
                                  int cw, int warp, int lane) {
    using namespace attn_v3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = sm.lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = m0 + cw * 64 + warp * 16 + (lane >> 2) + 8 * r;
        if (row < lq) {
            const float inv = 1.f / l;
            __nv_bfloat16* og = p.o + (uint64_t)row * p.o_row_stride + (uint64_t)h * D;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const int col = i * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t*>(og + col) =
                    ls_pack_bf16x2(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
            }
            if (p.lse != nullptr && (lane & 3) == 0) {
                p.lse[(uint64_t)row * p.heads + h] = (sm.mrow[r] * sl + __log2f(l)) * 0.69314718055994531f;
            }
        }
    }
}

// v3t, one split piece (cluster rank `piece` of SPLIT), called by both consumer warpgroups
// once their last GEMM is done. `smem` is the block's dynamic shared memory (generic pointer)
// and `sK` the shared-window address of the K stages, which the partials overwrite. The
// producer warpgroup takes part in both cluster barriers (see kernel_sm90.cuh). mq, wq, acc are
// scratch owned by the caller (why: attn_sm90_consumer_mainloop in mainloop_sm90.cuh).
template <int BN, int SPLIT>
LS_DEVICE void attn_sm90_epilogue_split(const AttnParams& p, const float (&o)[64],
                                        const AttnSm90Softmax<BN>& sm, int lq, float sl,
                                        uint8_t* smem, uint32_t sK, int piece, int h, int m0,
                                        int cw, int warp, int lane, int tid, float (&mq)[SPLIT],
                                        float (&wq)[SPLIT], float (&acc)[8]) {
    using namespace attn_v3;
    // Both consumers have finished every GEMM (so every TMA write to the stages completed and
    // was read) before either overwrites the stages with generic stores.
    ls_named_sync(BAR_SPLIT, 256);
    ls_fence_proxy_async_smem();
    const uint32_t sO = sK;                   // [BM][SPLIT_ROW] fp32
    const uint32_t sML = sK + SPLIT_O_BYTES;  // [BM] max * sl, then [BM] sum
    float* gO = reinterpret_cast<float*>(smem + (sO - ls_smem_addr(smem)));
    float* gML = reinterpret_cast<float*>(smem + (sML - ls_smem_addr(smem)));
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = sm.lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int rl = cw * 64 + warp * 16 + (lane >> 2) + 8 * r;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            *reinterpret_cast<float2*>(gO + rl * SPLIT_ROW + i * 8 + 2 * (lane & 3)) =
                make_float2(o[4 * i + 2 * r], o[4 * i + 2 * r + 1]);
        }
        if ((lane & 3) == 0) {
            gML[rl] = sm.mrow[r] * sl;
            gML[BM + rl] = l;
        }
    }
    ls_cluster_sync();  // every piece's partials are written and visible cluster-wide
    constexpr int RPC = BM / SPLIT;   // rows this CTA combines
    constexpr int TPR = 256 / RPC;    // threads per row (2 * SPLIT)
    constexpr int DPT = D / TPR;      // dims per thread (64 / SPLIT)
    const int t = tid - 128;
    const int rl = piece * RPC + t / TPR, d0 = (t % TPR) * DPT;
    float mmax = -INFINITY;
#pragma unroll
    for (int q = 0; q < SPLIT; ++q) {
        mq[q] = ls_ld_cluster_f32(ls_mapa(sML + 4u * rl, q));
        mmax = fmaxf(mmax, mq[q]);
    }
    float lsum = 0.f;
#pragma unroll
    for (int q = 0; q < SPLIT; ++q) {
        wq[q] = exp2f(mq[q] - mmax);  // every piece saw >= 1 real key: mq finite
        lsum += wq[q] * ls_ld_cluster_f32(ls_mapa(sML + 4u * (BM + rl), q));
    }
    const float inv = 1.f / lsum;
    const int row = m0 + rl;
    if (row < lq) {
        __nv_bfloat16* og = p.o + (uint64_t)row * p.o_row_stride + (uint64_t)h * D + d0;
#pragma unroll
        for (int c = 0; c < DPT / 8; ++c) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
            for (int q = 0; q < SPLIT; ++q) {
                const uint32_t a = ls_mapa(sO + 4u * (rl * SPLIT_ROW + d0 + 8 * c), q);
                const float4 x = ls_ld_cluster_f32x4(a), y = ls_ld_cluster_f32x4(a + 16u);
                acc[0] += wq[q] * x.x; acc[1] += wq[q] * x.y; acc[2] += wq[q] * x.z; acc[3] += wq[q] * x.w;
                acc[4] += wq[q] * y.x; acc[5] += wq[q] * y.y; acc[6] += wq[q] * y.z; acc[7] += wq[q] * y.w;
            }
            uint4 pk;
            pk.x = ls_pack_bf16x2(acc[0] * inv, acc[1] * inv);
            pk.y = ls_pack_bf16x2(acc[2] * inv, acc[3] * inv);
            pk.z = ls_pack_bf16x2(acc[4] * inv, acc[5] * inv);
            pk.w = ls_pack_bf16x2(acc[6] * inv, acc[7] * inv);
            *reinterpret_cast<uint4*>(og + 8 * c) = pk;
        }
        if (p.lse != nullptr && (t % TPR) == 0) {
            p.lse[(uint64_t)row * p.heads + h] = (mmax + __log2f(lsum)) * 0.69314718055994531f;
        }
    }
    ls_cluster_sync();  // no CTA leaves (freeing its shared memory) while others read it
}
