// Attention v1 (FA2-style, any sm_80+ part; the fallback): the kernel body that wires the roles
// together — scheduler.cuh picks the block's (head, query rows), mainloop_sm80.cuh runs every
// key tile with the online softmax of softmax.cuh, epilogue.cuh normalises and stores.
// Launch: grid (ceil(Lq / BM), H, 1), THREADS threads, SMEM bytes of dynamic shared memory,
// two blocks per SM (attn_v1 in tile_sizes.cuh).
#pragma once
#include "epilogue.cuh"
#include "mainloop_sm80.cuh"
#include "params.cuh"
#include "scheduler.cuh"
#include "softmax.cuh"
#include "tile_sizes.cuh"

LS_DEVICE void attention_fwd_sm80(const AttnParams& p) {
    using namespace attn_v1;
    extern __shared__ __align__(128) uint8_t smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const AttnSm80Tile t = attn_sm80_tile();
    const int wrow = warp * MT * 16;  // this warp's first row in the block
    float o[MT][16][4];
    AttnSm80Softmax sm;
    attn_sm80_mainloop(p, smem, t.h, t.m0, tid, wrow, o, sm);
    attn_sm80_epilogue(p, o, sm, t.h, t.m0, wrow, lane);
}
