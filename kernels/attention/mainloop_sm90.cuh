// Attention v3 line main loop (Hopper, FA3-style warp specialization): the shared-memory layout
// and its mbarriers, the TMA producer, and the consumers' wgmma pipeline.
//
// Roles (one block = 3 warpgroups = 384 threads, one block per SM; kernel_sm90.cuh wires them):
// - warpgroup 0, the producer: gives its registers away (setmaxnreg.dec to PRODUCER_REGS) and
//   one thread issues every load as TMA (cp.async.bulk.tensor.3d with host-made CUtensorMaps):
//   Q once per work tile, then K_j and V_j into STAGES-deep rings. Each stage has a "full"
//   mbarrier (TMA transaction bytes) and an "empty" mbarrier (one arrival per consumer warp once
//   it no longer reads the stage).
// - warpgroups 1 and 2, the consumers (setmaxnreg.inc to CONSUMER_REGS): 64 query rows each.
//   Both GEMMs are wgmma. Intra-warpgroup overlap (FA3): in iteration j the warpgroup issues
//   S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits only for S_j, and runs the softmax
//   of S_j (softmax.cuh) while P V is still on the tensor cores. PINGPONG additionally orders
//   the two consumers' GEMM issue with two named barriers, so that one warpgroup's softmax runs
//   under the other's GEMMs.
// No block-wide barrier after setup: the warpgroups only meet at mbarriers and named barriers.
//
// Shared layout: every tile is stored as two column halves (head dims 0-63, 64-127), each
// [rows][128 B] in the 128-byte swizzle (16-byte chunk c of row r at c ^ (r & 7)), which is
// exactly what TMA's SWIZZLE_128B writes for a {64, rows} box and what the wgmma descriptors
// read; every region is 1024-byte aligned.
//
// Tripwires: the host's tensor-map boxes must be {TMA_BOX_DIMS, 1, BM or BN} with SWIZZLE_128B
// (the expect-tx byte counts below assume full boxes: out-of-range rows are zero-filled and
// still counted); the K/V stage parity is (j / STAGES) & 1.
#pragma once
#include "../common.cuh"
#include "../sm90.cuh"
#include "params.cuh"
#include "scheduler.cuh"
#include "softmax.cuh"
#include "tile_sizes.cuh"

// Shared-window addresses of the Q tile, the K and V rings and their mbarriers.
// bars: [0] Q full, then per stage s: K full, K empty, V full, V empty; last: Q empty.
template <int BN>
struct AttnSm90Smem {
    static constexpr int NBARS = 2 + 4 * attn_v3::STAGES;
    uint32_t sQ;      // Q: two halves of Q_HALF
    uint32_t sK;      // K stage s at sK + s * SMEM_KV
    uint32_t sV;      // V stage s at sV + s * SMEM_KV
    uint32_t barQ;    // Q full
    uint32_t emptyQ;  // Q empty

    LS_DEVICE AttnSm90Smem(uint8_t* smem, uint64_t* bars) {
        using namespace attn_v3;
        const uint32_t base = (ls_smem_addr(smem) + 1023u) & ~1023u;
        sQ = base;
        sK = sQ + SMEM_Q;
        sV = sK + STAGES * Tile<BN>::SMEM_KV;
        barQ = ls_smem_addr(&bars[0]);
        emptyQ = barQ + 8u * (1 + 4 * STAGES);
    }
    LS_DEVICE uint32_t fullK(int s) const { return barQ + 8u * (1 + 4 * s); }
    LS_DEVICE uint32_t emptyK(int s) const { return barQ + 8u * (2 + 4 * s); }
    LS_DEVICE uint32_t fullV(int s) const { return barQ + 8u * (3 + 4 * s); }
    LS_DEVICE uint32_t emptyV(int s) const { return barQ + 8u * (4 + 4 * s); }

    // One thread, before the block's only __syncthreads.
    LS_DEVICE void init_barriers() const {
        using namespace attn_v3;
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
};

// ---- producer (one thread of warpgroup 0) ----------------------------------------------------
template <int BN, int SPLIT>
LS_DEVICE void attn_sm90_producer(const AttnV3Params& P, const AttnSm90Smem<BN>& sm,
                                  const AttnSm90Schedule<BN, SPLIT>& sched) {
    using namespace attn_v3;
    constexpr int KV_HALF = Tile<BN>::KV_HALF, SMEM_KV = Tile<BN>::SMEM_KV;
    int it = 0;  // K/V tiles loaded so far by this block (all work tiles)
    int tc = 0;  // work tiles started by this block
    for (int tile = sched.first_tile; tile < sched.total; tile += sched.tile_stride, ++tc) {
        const int h = sched.head(tile), m0 = sched.row0(tile);
        // The consumers release Q once the last S GEMM of the previous work tile is done.
        if (tc > 0) ls_mbar_wait(sm.emptyQ, (uint32_t)(tc - 1) & 1u);
        ls_mbar_arrive_expect_tx(sm.barQ, SMEM_Q);
        ls_tma_load_3d(sm.sQ, &P.tq, sm.barQ, 0, h, m0);
        ls_tma_load_3d(sm.sQ + Q_HALF, &P.tq, sm.barQ, 64, h, m0);
        for (int j = 0; j < sched.ntiles; ++j, ++it) {
            const int s = it % STAGES;
            const uint32_t ph = (uint32_t)(it / STAGES) & 1u;
            // Stage s was last used by K/V tile it - STAGES; wait for its release.
            if (it >= STAGES) ls_mbar_wait(sm.emptyK(s), ph ^ 1u);
            ls_mbar_arrive_expect_tx(sm.fullK(s), SMEM_KV);
            const int key0 = (sched.j0 + j) * BN;
            ls_tma_load_3d(sm.sK + s * SMEM_KV, &P.tk, sm.fullK(s), 0, h, key0);
            ls_tma_load_3d(sm.sK + s * SMEM_KV + KV_HALF, &P.tk, sm.fullK(s), 64, h, key0);
            if (it >= STAGES) ls_mbar_wait(sm.emptyV(s), ph ^ 1u);
            ls_mbar_arrive_expect_tx(sm.fullV(s), SMEM_KV);
            ls_tma_load_3d(sm.sV + s * SMEM_KV, &P.tv, sm.fullV(s), 0, h, key0);
            ls_tma_load_3d(sm.sV + s * SMEM_KV + KV_HALF, &P.tv, sm.fullV(s), 64, h, key0);
        }
    }
}

// ---- consumers ---------------------------------------------------------------------------------
// Ping-pong: round r of consumer c waits on barrier BAR_PP_BASE + c and then lets the other
// consumer go. Consumer 1 starts by releasing consumer 0 (kernel_sm90.cuh). Both run ntiles + 1
// rounds per work tile on the same work tiles, and consumer 1 skips its very last release (last
// round of its last work tile) so every barrier sees matched sync/arrive counts.
template <bool PINGPONG>
LS_DEVICE void attn_sm90_pp_begin(int cw) {
    if constexpr (PINGPONG) ls_named_sync(attn_v3::BAR_PP_BASE + cw, 256);
}
// (cw, round_max, last_work by reference: taken by value they changed the v3pw SASS.)
template <bool PINGPONG>
LS_DEVICE void attn_sm90_pp_end(const int& cw, int round, const int& round_max,
                                const bool& last_work) {
    if constexpr (PINGPONG) {
        if (!(cw == 1 && round == round_max && last_work))
            ls_named_arrive(attn_v3::BAR_PP_BASE + (cw ^ 1), 256);
    }
}

// P (probabilities of one tile, fp32 accumulators) -> bf16 A fragments of the P V wgmma.
template <int BN>
LS_DEVICE void attn_sm90_pack_p(uint32_t (&pa)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = ls_pack_bf16x2(s[8 * kk], s[8 * kk + 1]);
        pa[kk][1] = ls_pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = ls_pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = ls_pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
    }
}
// S = Q K^T for this warpgroup's 64 rows: 8 k16 steps, Q and K from shared memory (SS).
template <int BN>
LS_DEVICE void attn_sm90_issue_s(float (&s)[BN / 2], uint32_t qWg, uint32_t kb) {
    using namespace attn_v3;
    constexpr int KV_HALF = Tile<BN>::KV_HALF;
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        const uint64_t da = ls_gmma_desc_sw128(qWg + (ks / 4) * Q_HALF + (ks % 4) * 32, 0, 1024);
        const uint64_t db = ls_gmma_desc_sw128(kb + (ks / 4) * KV_HALF + (ks % 4) * 32, 0, 1024);
        ls_wgmma_m64nNk16_ss<BN>(s, da, db, ks > 0);
    }
}
// O += P V: P from registers (RS), V from shared memory read transposed.
template <int BN>
LS_DEVICE void attn_sm90_issue_pv(float (&o)[64], const uint32_t (&pa)[BN / 16][4], uint32_t vb) {
    constexpr int KV_HALF = attn_v3::Tile<BN>::KV_HALF;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        // 16 keys = two 8-row groups (SBO 1024); dims 64-127 are the other half (LBO).
        const uint64_t db = ls_gmma_desc_sw128(vb + kk * 16 * 128, KV_HALF, 1024);
        ls_wgmma_m64n128k16_rs_tb(o, pa[kk], db);
    }
}
// One arrival per warp: the wgmma that read the stage has completed for the whole warpgroup
// once any of its threads has passed the wait, and __syncwarp orders this warp's lanes.
LS_DEVICE void attn_sm90_release(uint32_t bar, int lane) {
    __syncwarp();
    if (lane == 0) ls_mbar_arrive(bar);
}

// One work tile for consumer warpgroup cw: waits for Q (work tile tc of this block), runs the
// ntiles key tiles of this piece (global K/V tile counter `it` at its first), leaves O
// unnormalized in `o` and the row statistics in `sm_`. `o` must be zero and `sm_` initialised.
// s_first/corr_first (first key tile) and s_next/corr_next (the others) are scratch for S and
// the rescale factors, owned by the caller: an array declared inside a force-inlined function
// is hoisted to the front of the kernel's entry block, which reorders register promotion and
// changes ptxas's register allocation (not the math); declared in the kernel body, as before
// the role split, they keep the v3 line's SASS byte for byte what it was.
template <bool PINGPONG, int BN>
LS_DEVICE void attn_sm90_consumer_mainloop(const AttnSm90Smem<BN>& sm, uint32_t qWg, int tc,
                                           int it, int ntiles, int j0, int cw, int lane, int lk,
                                           float sl, bool last_work, float (&o)[64],
                                           uint32_t (&pa)[BN / 16][4], AttnSm90Softmax<BN>& sm_,
                                           float (&s_first)[BN / 2], float (&corr_first)[2],
                                           float (&s_next)[BN / 2], float (&corr_next)[2]) {
    using namespace attn_v3;
    constexpr int SMEM_KV = Tile<BN>::SMEM_KV;
    constexpr int KK = BN / 16;  // k16 steps of P V
    const int round_max = ntiles;  // ping-pong rounds 0 .. ntiles
    ls_mbar_wait(sm.barQ, (uint32_t)tc & 1u);
    {
        const int st = it % STAGES;
        ls_mbar_wait(sm.fullK(st), (uint32_t)(it / STAGES) & 1u);
        float (&s)[BN / 2] = s_first;
        attn_sm90_pp_begin<PINGPONG>(cw);
        ls_wgmma_fence();
        attn_sm90_issue_s<BN>(s, qWg, sm.sK + st * SMEM_KV);
        ls_wgmma_commit();
        attn_sm90_pp_end<PINGPONG>(cw, 0, round_max, last_work);
        ls_wgmma_wait<0>();
        ls_fence_regs(s);
        attn_sm90_release(sm.emptyK(st), lane);
        if (ntiles == 1) attn_sm90_release(sm.emptyQ, lane);
        float (&corr)[2] = corr_first;
        sm_.online(s, j0, corr, sl, lk, lane);  // o is all zero: no rescale
        attn_sm90_pack_p<BN>(pa, s);
    }
    for (int j = 1; j < ntiles; ++j) {
        const int g = it + j;
        const int st = g % STAGES, sp = (g - 1) % STAGES;
        const uint32_t ph = (uint32_t)(g / STAGES) & 1u, php = (uint32_t)((g - 1) / STAGES) & 1u;
        ls_mbar_wait(sm.fullK(st), ph);
        ls_mbar_wait(sm.fullV(sp), php);
        float (&s)[BN / 2] = s_next;
        attn_sm90_pp_begin<PINGPONG>(cw);
        ls_fence_regs(o);
        ls_wgmma_fence();
        attn_sm90_issue_s<BN>(s, qWg, sm.sK + st * SMEM_KV);
        ls_wgmma_commit();
        attn_sm90_issue_pv<BN>(o, pa, sm.sV + sp * SMEM_KV);
        ls_wgmma_commit();
        attn_sm90_pp_end<PINGPONG>(cw, j, round_max, last_work);
        ls_wgmma_wait<1>();  // S_j done; P_{j-1} V_{j-1} may still run
        ls_fence_regs(s);
        attn_sm90_release(sm.emptyK(st), lane);
        if (j == ntiles - 1) attn_sm90_release(sm.emptyQ, lane);  // last S GEMM of this work tile is done
        float (&corr)[2] = corr_next;
        const bool grew = sm_.online(s, j0 + j, corr, sl, lk, lane);
        ls_wgmma_wait<0>();  // P_{j-1} V_{j-1} done: O holds tiles < j, pa is free
        ls_fence_regs(o);
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) ls_fence_regs_u32(pa[kk]);  // read asynchronously until here
        attn_sm90_release(sm.emptyV(sp), lane);
        if (grew) AttnSm90Softmax<BN>::rescale(o, corr);
        attn_sm90_pack_p<BN>(pa, s);
    }
    {
        const int g = it + ntiles - 1;
        const int sp = g % STAGES;
        ls_mbar_wait(sm.fullV(sp), (uint32_t)(g / STAGES) & 1u);
        attn_sm90_pp_begin<PINGPONG>(cw);
        ls_fence_regs(o);
        ls_wgmma_fence();
        attn_sm90_issue_pv<BN>(o, pa, sm.sV + sp * SMEM_KV);
        ls_wgmma_commit();
        attn_sm90_pp_end<PINGPONG>(cw, round_max, round_max, last_work);
        ls_wgmma_wait<0>();
        ls_fence_regs(o);
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) ls_fence_regs_u32(pa[kk]);
        attn_sm90_release(sm.emptyV(sp), lane);
    }
}
