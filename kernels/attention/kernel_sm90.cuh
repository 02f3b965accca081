// Attention v3 line (Hopper): the kernel body that wires the roles together. Setup (shared
// layout and mbarriers, mainloop_sm90.cuh), then warpgroup 0 becomes the TMA producer and
// warpgroups 1 and 2 the wgmma consumers; the consumers walk their work tiles (scheduler.cuh),
// run the pipelined main loop with the online softmax (softmax.cuh) and end each tile with the
// store epilogue, or with the cluster combine for a split piece (epilogue.cuh).
// Template: PINGPONG (consumers alternate GEMM issue), BN (keys per K/V stage), SPLIT (1, or the
// cluster size of v3t's tail launch). Launch: 1-D grid, THREADS threads, one block per SM,
// Tile<BN>::SMEM bytes of dynamic shared memory (attn_v3 in tile_sizes.cuh).
#pragma once
#include "epilogue.cuh"
#include "mainloop_sm90.cuh"
#include "params.cuh"
#include "scheduler.cuh"
#include "softmax.cuh"
#include "tile_sizes.cuh"

template <bool PINGPONG, int BN, int SPLIT>
LS_DEVICE void attention_fwd_sm90(const AttnV3Params& P) {
    using namespace attn_v3;
    constexpr int KK = BN / 16;  // k16 steps of P V
    extern __shared__ __align__(1024) uint8_t smem_v3[];
    __shared__ __align__(8) uint64_t bars[AttnSm90Smem<BN>::NBARS];
    const AttnParams& p = P.p;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int lq = (int)p.lq, lk = (int)p.lk;
    const AttnSm90Schedule<BN, SPLIT> sched(p, lq, lk);
    const AttnSm90Smem<BN> sm(smem_v3, bars);

    if (tid == 0) {
        ls_prefetch_tmap(&P.tq);
        ls_prefetch_tmap(&P.tk);
        ls_prefetch_tmap(&P.tv);
        sm.init_barriers();
    }
    __syncthreads();  // the only block-wide barrier: barriers initialised before anyone waits

    if (wg == 0) {
        // ------------------------------------------------------------------ producer
        ls_setmaxnreg_dec<PRODUCER_REGS>();
        if (warp == 0 && lane == 0) attn_sm90_producer<BN, SPLIT>(P, sm, sched);
        if constexpr (SPLIT > 1) {
            // The producer takes part in both cluster barriers of the split epilogue.
            ls_cluster_sync();
            ls_cluster_sync();
        }
        return;
    }

    // ---------------------------------------------------------------------- consumers
    ls_setmaxnreg_inc<CONSUMER_REGS>();
    const int cw = wg - 1;  // consumer 0 or 1: query rows cw * 64 .. cw * 64 + 63 of the block
    const float sl = p.scale_log2;
    const uint32_t qWg = sm.sQ + cw * 64 * 128;
    float o[64];
    AttnSm90Softmax<BN> softmax;
    uint32_t pa[KK][4];  // P of the previous tile, bf16, A-fragment layout
    if constexpr (PINGPONG) {
        if (cw == 1) ls_named_arrive(BAR_PP_BASE + 0, 256);
    }

    int it = 0;  // K/V tiles consumed so far by this block (all work tiles)
    int tc = 0;
    for (int tile = sched.first_tile; tile < sched.total;
         tile += sched.tile_stride, ++tc, it += sched.ntiles) {
        const int h = sched.head(tile), m0 = sched.row0(tile);
        const bool last_work = sched.last(tile);
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.f;
        softmax.init();
        // Scratch of the role functions lives here (see attn_sm90_consumer_mainloop for why).
        float s_first[BN / 2], corr_first[2], s_next[BN / 2], corr_next[2];
        attn_sm90_consumer_mainloop<PINGPONG, BN>(sm, qWg, tc, it, sched.ntiles, sched.j0, cw, lane,
                                                  lk, sl, last_work, o, pa, softmax, s_first,
                                                  corr_first, s_next, corr_next);
        if constexpr (SPLIT > 1) {
            float mq[SPLIT], wq[SPLIT], acc[8];
            attn_sm90_epilogue_split<BN, SPLIT>(p, o, softmax, lq, sl, smem_v3, sm.sK, sched.piece,
                                                h, m0, cw, warp, lane, tid, mq, wq, acc);
        } else {
            attn_sm90_epilogue<BN>(p, o, softmax, lq, sl, h, m0, cw, warp, lane);
        }
    }
}
