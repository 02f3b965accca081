// Attention forward, version 3 (Hopper, FA3-style warp specialization). Included by attention.cu
// (shares AttnParams and the contract written there: any Lq, Lk >= 1, lse [Lq, H], no mask).
//
// Roles (one block = 3 warpgroups = 384 threads, one block per SM):
// - warpgroup 0, the producer: gives its registers away (setmaxnreg.dec to 24) and one thread
//   issues every load as TMA (cp.async.bulk.tensor.3d with host-made CUtensorMaps): Q once, then
//   K_j and V_j into STAGES-deep rings. Each stage has a "full" mbarrier (TMA transaction bytes)
//   and an "empty" mbarrier (one arrival per consumer warp once it no longer reads the stage).
// - warpgroups 1 and 2, the consumers (setmaxnreg.inc to 240): 64 query rows each. Both GEMMs
//   are wgmma. Intra-warpgroup overlap (FA3): in iteration j the warpgroup issues S_j = Q K_j^T
//   and O += P_{j-1} V_{j-1} back to back, waits only for S_j, and runs the softmax of S_j while
//   P V is still on the tensor cores. PINGPONG additionally orders the two consumers' GEMM issue
//   with two named barriers, so that one warpgroup's softmax runs under the other's GEMMs.
// No block-wide barrier after setup: the warpgroups only meet at mbarriers and named barriers.
//
// Shared layout: every tile is stored as two column halves (head dims 0-63, 64-127), each
// [rows][128 B] in the 128-byte swizzle (16-byte chunk c of row r at c ^ (r & 7)), which is
// exactly what TMA's SWIZZLE_128B writes for a {64, rows} box and what the wgmma descriptors of
// v2 read; every region is 1024-byte aligned.
//
// Tripwires: THREADS/SMEM/BM mirror V3_* in src/cuda/attention.rs; the tensor-map box there must
// be {64, 1, BM or BN} with SWIZZLE_128B (the expect-tx byte counts below assume full boxes:
// out-of-range rows are zero-filled and still counted); the barrier ids and register budgets
// are in attn_v3 below with their reasons; the K/V stage parity is (j / STAGES) & 1.
#pragma once
#include "common.cuh"
#include "wgmma.cuh"

namespace attn_v3 {
constexpr int D = 128;
constexpr int BM = 128;      // two consumer warpgroups x 64 rows (wgmma M is 64 per warpgroup)
// Keys per stage (BN) is a template parameter of the kernel: 128 (v3, v3p: S is m64n128, 64
// fp32 regs) or 176 (v3w, v3pw: FA3's choice for head dim 128; S 88 + P 44 + O 64 regs still fit
// 240, and the per-tile fixed costs - row max/sum shuffles, barrier round trips - are spread
// over 1.375x more keys).
constexpr int STAGES = 2;    // K and V rings: Q 32 KB + 2 x 2 x BN x 256 B = 160 KB (BN 128) or
                             // 208 KB (BN 176) of 227 KB
constexpr int THREADS = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr int CONSUMER_WARPS = 8;  // arrivals that empty a stage (one per consumer warp)
constexpr int PRODUCER_REGS = 24;  // one thread issues TMA; 24 is the floor FA3 uses
constexpr int CONSUMER_REGS = 240;  // 24 * 128 + 240 * 256 = 64512 <= 65536 registers per SM;
                                    // o 64 + S 64 + P 32 + softmax state fit without spills
constexpr int BAR_PP_BASE = 1;  // named barriers 1 and 2: "consumer c may issue its GEMMs"
constexpr int BAR_SPLIT = 3;    // named barrier 3: both consumers done with every stage (v3t)
// v3t: a split piece's unnormalized O (fp32) goes to shared memory over the K/V stages, rows
// padded to 136 floats (544 B: float2 stores of 8 rows spread over banks, float4 reads aligned),
// then the per-row (max * scale_log2, sum) pairs.
constexpr int SPLIT_ROW = 136;
constexpr int SPLIT_O_BYTES = BM * SPLIT_ROW * 4;  // 68 KB, inside the 128 KB of K/V stages
constexpr int Q_HALF = BM * 128;      // 16 KB: one TMA box {64 dims, 1 head, 128 rows}
constexpr int SMEM_Q = 2 * Q_HALF;    // 32 KB
template <int BN>
struct Tile {
    static constexpr int KV_HALF = BN * 128;     // one TMA box {64 dims, 1 head, BN rows}
    static constexpr int SMEM_KV = 2 * KV_HALF;  // one K or V stage
    static constexpr int SMEM = SMEM_Q + 2 * STAGES * SMEM_KV + 1024;  // + alignment slack
    static_assert(KV_HALF % 1024 == 0, "swizzle atoms need 1024-byte aligned halves");
};
}  // namespace attn_v3
static_assert(attn_v3::Tile<128>::SMEM == 161 * 1024, "V3_SMEM_BYTES in src/cuda/attention.rs");
static_assert(attn_v3::Tile<176>::SMEM == 209 * 1024, "V3W_SMEM_BYTES in src/cuda/attention.rs");

// The driver's CUtensorMap (128 bytes, opaque); passed by value inside the __grid_constant__
// params so its address is a param-space address TMA can read.
struct alignas(128) LsTmaDesc {
    uint64_t opaque[16];
};
struct AttnV3Params {
    // Coordinates are {head dim, head, token}: q dims {128, H, Lq}, byte strides {256,
    // q_row_stride * 2} (increasing, as the driver documents), box {64, 1, 128}.
    LsTmaDesc tq;
    LsTmaDesc tk;  // k: dims {128, H, Lk}, box {64, 1, 128}
    LsTmaDesc tv;  // v: as k
    AttnParams p;  // pointers for the epilogue, shapes, scale
};
static_assert(sizeof(AttnV3Params) == 512, "AttnV3Params mirror in src/cuda/attention.rs");
static_assert(offsetof(AttnV3Params, p) == 384, "AttnV3Params mirror in src/cuda/attention.rs");

// Work tiles are (query block, head) pairs numbered query block fastest; this launch runs tiles
// [tile_base, tile_end). With SPLIT = 1 block b runs tiles tile_base + b, + gridDim.x, ... (one
// tile per block when the host launches one block per tile; a persistent launch uses one block
// per SM, and the producer then loads the next tile's Q and first K/V while the consumers
// finish the current one). K/V stages and their phases run on across tiles (global K/V tile
// counter), Q's full/empty phases flip once per work tile.
// SPLIT > 1 (v3t's tail launch, __cluster_dims__(SPLIT)): the SPLIT CTAs of a cluster share one
// work tile; CTA rank r takes key tiles [r*n/SPLIT, (r+1)*n/SPLIT) (the host guarantees n >=
// SPLIT, so no piece is empty), leaves its unnormalized O and (max, sum) in its shared memory,
// and after a cluster barrier each CTA combines 128/SPLIT rows of all pieces through
// distributed shared memory and stores them; a second cluster barrier keeps every CTA's shared
// memory alive until all reads are done.
template <bool PINGPONG, int BN, int SPLIT>
LS_DEVICE void attention_fwd_v3_body(const AttnV3Params& P) {
    using namespace attn_v3;
    constexpr int KV_HALF = Tile<BN>::KV_HALF, SMEM_KV = Tile<BN>::SMEM_KV;
    constexpr int NI = BN / 8;    // n8 column groups of S per thread row pair
    constexpr int KK = BN / 16;   // k16 steps of P V
    extern __shared__ __align__(1024) uint8_t smem_v3[];
    // [0] Q full, then per stage s: K full, K empty, V full, V empty; last: Q empty.
    __shared__ __align__(8) uint64_t bars[2 + 4 * STAGES];
    const AttnParams& p = P.p;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int lq = (int)p.lq, lk = (int)p.lk;
    static_assert(SPLIT == 1 || SPLIT == 2 || SPLIT == 4, "combine splits 128 rows evenly");
    const int piece = SPLIT > 1 ? (int)ls_cluster_ctarank() : 0;
    const int ntiles_all = (lk + BN - 1) / BN;
    const int j0 = piece * ntiles_all / SPLIT;  // first key tile of this piece
    const int ntiles = (piece + 1) * ntiles_all / SPLIT - j0;
    const int nqb = (lq + BM - 1) / BM;
    const int total = (int)p.tile_end;
    const int first_tile = (int)p.tile_base + (int)blockIdx.x / SPLIT;
    const int tile_stride = (int)gridDim.x / SPLIT;

    const uint32_t base = (ls_smem_addr(smem_v3) + 1023u) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK = sQ + SMEM_Q;             // K stage s at sK + s * SMEM_KV
    const uint32_t sV = sK + STAGES * SMEM_KV;   // V stage s at sV + s * SMEM_KV
    const uint32_t barQ = ls_smem_addr(&bars[0]);
    auto fullK = [&](int s) { return barQ + 8u * (1 + 4 * s); };
    auto emptyK = [&](int s) { return barQ + 8u * (2 + 4 * s); };
    auto fullV = [&](int s) { return barQ + 8u * (3 + 4 * s); };
    auto emptyV = [&](int s) { return barQ + 8u * (4 + 4 * s); };
    const uint32_t emptyQ = barQ + 8u * (1 + 4 * STAGES);

    if (tid == 0) {
        ls_prefetch_tmap(&P.tq);
        ls_prefetch_tmap(&P.tk);
        ls_prefetch_tmap(&P.tv);
        ls_mbar_init(barQ, 1);
        ls_mbar_init(emptyQ, CONSUMER_WARPS);
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            ls_mbar_init(fullK(s), 1);
            ls_mbar_init(emptyK(s), CONSUMER_WARPS);
            ls_mbar_init(fullV(s), 1);
            ls_mbar_init(emptyV(s), CONSUMER_WARPS);
        }
        ls_fence_mbar_init();
    }
    __syncthreads();  // the only block-wide barrier: barriers initialised before anyone waits

    if (wg == 0) {
        // ------------------------------------------------------------------ producer
        ls_setmaxnreg_dec<PRODUCER_REGS>();
        if (warp == 0 && lane == 0) {
            int it = 0;  // K/V tiles loaded so far by this block (all work tiles)
            int tc = 0;  // work tiles started by this block
            for (int tile = first_tile; tile < total; tile += tile_stride, ++tc) {
                const int h = tile / nqb, m0 = (tile % nqb) * BM;
                // The consumers release Q once the last S GEMM of the previous work tile is done.
                if (tc > 0) ls_mbar_wait(emptyQ, (uint32_t)(tc - 1) & 1u);
                ls_mbar_arrive_expect_tx(barQ, SMEM_Q);
                ls_tma_load_3d(sQ, &P.tq, barQ, 0, h, m0);
                ls_tma_load_3d(sQ + Q_HALF, &P.tq, barQ, 64, h, m0);
                for (int j = 0; j < ntiles; ++j, ++it) {
                    const int s = it % STAGES;
                    const uint32_t ph = (uint32_t)(it / STAGES) & 1u;
                    // Stage s was last used by K/V tile it - STAGES; wait for its release.
                    if (it >= STAGES) ls_mbar_wait(emptyK(s), ph ^ 1u);
                    ls_mbar_arrive_expect_tx(fullK(s), SMEM_KV);
                    const int key0 = (j0 + j) * BN;
                    ls_tma_load_3d(sK + s * SMEM_KV, &P.tk, fullK(s), 0, h, key0);
                    ls_tma_load_3d(sK + s * SMEM_KV + KV_HALF, &P.tk, fullK(s), 64, h, key0);
                    if (it >= STAGES) ls_mbar_wait(emptyV(s), ph ^ 1u);
                    ls_mbar_arrive_expect_tx(fullV(s), SMEM_KV);
                    ls_tma_load_3d(sV + s * SMEM_KV, &P.tv, fullV(s), 0, h, key0);
                    ls_tma_load_3d(sV + s * SMEM_KV + KV_HALF, &P.tv, fullV(s), 64, h, key0);
                }
            }
        }
        if constexpr (SPLIT > 1) {
            // The producer takes part in both cluster barriers of the combine (see below).
            ls_cluster_sync();
            ls_cluster_sync();
        }
        return;
    }

    // ---------------------------------------------------------------------- consumers
    ls_setmaxnreg_inc<CONSUMER_REGS>();
    const int cw = wg - 1;  // consumer 0 or 1: query rows cw * 64 .. cw * 64 + 63 of the block
    const float sl = p.scale_log2;
    const uint32_t qWg = sQ + cw * 64 * 128;
    float o[64];
    float mrow[2], lrow[2];
    uint32_t pa[KK][4];  // P of the previous tile, bf16, A-fragment layout
    // Ping-pong: round r of consumer c waits on barrier BAR_PP_BASE + c and then lets the other
    // consumer go. Consumer 1 starts by releasing consumer 0. Both run ntiles + 1 rounds per work
    // tile on the same work tiles, and consumer 1 skips its very last release (last round of
    // its last work tile) so every barrier sees matched sync/arrive counts.
    const int round_max = ntiles;  // rounds 0 .. ntiles
    bool last_work = false;
    auto pp_begin = [&]() {
        if constexpr (PINGPONG) ls_named_sync(BAR_PP_BASE + cw, 256);
    };
    auto pp_end = [&](int round) {
        if constexpr (PINGPONG) {
            if (!(cw == 1 && round == round_max && last_work)) ls_named_arrive(BAR_PP_BASE + (cw ^ 1), 256);
        }
    };
    if constexpr (PINGPONG) {
        if (cw == 1) ls_named_arrive(BAR_PP_BASE + 0, 256);
    }

    // Softmax of S (scores of tile j, raw) in place into probabilities; returns the O rescale
    // factors and whether any row max of this warp grew.
    auto softmax = [&](float (&s)[BN / 2], int j, float (&corr)[2]) -> bool {
        // Accumulator layout: s[4i + {0,1}] row warp*16 + lane/4, keys 8i + 2(lane%4) + {0,1};
        // s[4i + {2,3}] the row 8 below. Only the last tile reaches past Lk.
        if ((j + 1) * BN > lk) {
#pragma unroll
            for (int i = 0; i < NI; ++i) {
                const int col = j * BN + i * 8 + 2 * (lane & 3);
                if (col >= lk) s[4 * i] = s[4 * i + 2] = -INFINITY;
                if (col + 1 >= lk) s[4 * i + 1] = s[4 * i + 3] = -INFINITY;
            }
        }
        bool grew = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = mrow[r];
#pragma unroll
            for (int i = 0; i < NI; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            grew |= mx > mrow[r];
            corr[r] = exp2f((mrow[r] - mx) * sl);  // 0 on the first tile (mrow = -inf)
            mrow[r] = mx;
            const float msl = mx * sl;
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < NI; ++i) {
                s[4 * i + 2 * r] = exp2f(fmaf(s[4 * i + 2 * r], sl, -msl));
                s[4 * i + 2 * r + 1] = exp2f(fmaf(s[4 * i + 2 * r + 1], sl, -msl));
                sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
            }
            lrow[r] = lrow[r] * corr[r] + sum;
        }
        return __any_sync(0xffffffffu, grew);
    };
    auto pack_p = [&](const float (&s)[BN / 2]) {
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
            pa[kk][0] = ls_pack_bf16x2(s[8 * kk], s[8 * kk + 1]);
            pa[kk][1] = ls_pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = ls_pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = ls_pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    auto issue_s = [&](float (&s)[BN / 2], uint32_t kb) {
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
            const uint64_t da = ls_gmma_desc_sw128(qWg + (ks / 4) * Q_HALF + (ks % 4) * 32, 0, 1024);
            const uint64_t db = ls_gmma_desc_sw128(kb + (ks / 4) * KV_HALF + (ks % 4) * 32, 0, 1024);
            ls_wgmma_m64nNk16_ss<BN>(s, da, db, ks > 0);
        }
    };
    auto issue_pv = [&](uint32_t vb) {
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
            // 16 keys = two 8-row groups (SBO 1024); dims 64-127 are the other half (LBO).
            const uint64_t db = ls_gmma_desc_sw128(vb + kk * 16 * 128, KV_HALF, 1024);
            ls_wgmma_m64n128k16_rs_tb(o, pa[kk], db);
        }
    };
    // One arrival per warp: the wgmma that read the stage has completed for the whole warpgroup
    // once any of its threads has passed the wait, and __syncwarp orders this warp's lanes.
    auto release = [&](uint32_t bar) {
        __syncwarp();
        if (lane == 0) ls_mbar_arrive(bar);
    };

    int it = 0;  // K/V tiles consumed so far by this block (all work tiles)
    int tc = 0;
    for (int tile = first_tile; tile < total; tile += tile_stride, ++tc, it += ntiles) {
    const int h = tile / nqb, m0 = (tile % nqb) * BM;
    last_work = tile + tile_stride >= total;
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    mrow[0] = mrow[1] = -INFINITY;
    lrow[0] = lrow[1] = 0.f;
    ls_mbar_wait(barQ, (uint32_t)tc & 1u);
    {
        const int st = it % STAGES;
        ls_mbar_wait(fullK(st), (uint32_t)(it / STAGES) & 1u);
        float s[BN / 2];
        pp_begin();
        ls_wgmma_fence();
        issue_s(s, sK + st * SMEM_KV);
        ls_wgmma_commit();
        pp_end(0);
        ls_wgmma_wait<0>();
        ls_fence_regs(s);
        release(emptyK(st));
        if (ntiles == 1) release(emptyQ);
        float corr[2];
        softmax(s, j0, corr);  // o is all zero: no rescale
        pack_p(s);
    }
    for (int j = 1; j < ntiles; ++j) {
        const int g = it + j;
        const int st = g % STAGES, sp = (g - 1) % STAGES;
        const uint32_t ph = (uint32_t)(g / STAGES) & 1u, php = (uint32_t)((g - 1) / STAGES) & 1u;
        ls_mbar_wait(fullK(st), ph);
        ls_mbar_wait(fullV(sp), php);
        float s[BN / 2];
        pp_begin();
        ls_fence_regs(o);
        ls_wgmma_fence();
        issue_s(s, sK + st * SMEM_KV);
        ls_wgmma_commit();
        issue_pv(sV + sp * SMEM_KV);
        ls_wgmma_commit();
        pp_end(j);
        ls_wgmma_wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run
        ls_fence_regs(s);
        release(emptyK(st));
        if (j == ntiles - 1) release(emptyQ);  // last S GEMM of this work tile is done
        float corr[2];
        const bool grew = softmax(s, j0 + j, corr);
        ls_wgmma_wait<0>();  // P_{j-1} V_{j-1} done: O holds tiles < j, pa is free
        ls_fence_regs(o);
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) ls_fence_regs_u32(pa[kk]);  // read asynchronously until here
        release(emptyV(sp));
        if (grew) {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                o[4 * i] *= corr[0];
                o[4 * i + 1] *= corr[0];
                o[4 * i + 2] *= corr[1];
                o[4 * i + 3] *= corr[1];
            }
        }
        pack_p(s);
    }
    {
        const int g = it + ntiles - 1;
        const int sp = g % STAGES;
        ls_mbar_wait(fullV(sp), (uint32_t)(g / STAGES) & 1u);
        pp_begin();
        ls_fence_regs(o);
        ls_wgmma_fence();
        issue_pv(sV + sp * SMEM_KV);
        ls_wgmma_commit();
        pp_end(round_max);
        ls_wgmma_wait<0>();
        ls_fence_regs(o);
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) ls_fence_regs_u32(pa[kk]);
        release(emptyV(sp));
    }

    if constexpr (SPLIT > 1) {
        // ---- split piece: partial O to shared memory, then combine across the cluster.
        // Both consumers have finished every GEMM (so every TMA write to the stages completed
        // and was read) before either overwrites the stages with generic stores.
        ls_named_sync(BAR_SPLIT, 256);
        ls_fence_proxy_async_smem();
        const uint32_t sO = sK;                  // [BM][SPLIT_ROW] fp32
        const uint32_t sML = sK + SPLIT_O_BYTES;  // [BM] max * sl, then [BM] sum
        float* gO = reinterpret_cast<float*>(smem_v3 + (sO - ls_smem_addr(smem_v3)));
        float* gML = reinterpret_cast<float*>(smem_v3 + (sML - ls_smem_addr(smem_v3)));
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = lrow[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int rl = cw * 64 + warp * 16 + (lane >> 2) + 8 * r;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                *reinterpret_cast<float2*>(gO + rl * SPLIT_ROW + i * 8 + 2 * (lane & 3)) =
                    make_float2(o[4 * i + 2 * r], o[4 * i + 2 * r + 1]);
            }
            if ((lane & 3) == 0) {
                gML[rl] = mrow[r] * sl;
                gML[BM + rl] = l;
            }
        }
        ls_cluster_sync();  // every piece's partials are written and visible cluster-wide
        constexpr int RPC = BM / SPLIT;   // rows this CTA combines
        constexpr int TPR = 256 / RPC;    // threads per row (2 * SPLIT)
        constexpr int DPT = D / TPR;      // dims per thread (64 / SPLIT)
        const int t = tid - 128;
        const int rl = piece * RPC + t / TPR, d0 = (t % TPR) * DPT;
        float mq[SPLIT], wq[SPLIT];
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
                float acc[8];
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
    } else {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
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
                p.lse[(uint64_t)row * p.heads + h] = (mrow[r] * sl + __log2f(l)) * 0.69314718055994531f;
            }
        }
    }
    }  // SPLIT == 1 epilogue
    }  // work tiles
}

// Grid: 1-D, one block per work tile (tiles [tile_base, tile_end)).
extern "C" __global__ void __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_v3_body<false, 128, 1>(P);
}

// v3pw: ping-pong consumers, 176-key tiles (K/V tensor maps with 176-row boxes).
extern "C" __global__ void __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3pw_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_v3_body<true, 176, 1>(P);
}

// v3t's tail launch (AttentionVariant::V3TmaSplitTail): the work tiles of the last partial wave,
// each split over a cluster of 2 or 4 CTAs along the keys (the host launches the full waves
// with attention_fwd_v3_bf16 first). Grid = tail tiles x SPLIT.
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3t2_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_v3_body<false, 128, 2>(P);
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3t4_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_v3_body<false, 128, 4>(P);
}
