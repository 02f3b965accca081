// Attention: which work a block does. The mapping from the launch grid to (head, first query
// row, key tiles) for both lines, in one place so the host's grid (src/cuda/attention.rs:
// `attention_fwd`, `split_tail_plan`) and the kernels agree.
//
// - v1: grid (query blocks, heads, 1); block (x, y) computes query rows [x*BM, x*BM + BM) of
//   head y over all keys.
// - v3 line: work tiles are (query block, head) pairs numbered query block fastest, in a 1-D
//   grid; one launch runs tiles [tile_base, tile_end). With SPLIT = 1 block b runs tiles
//   tile_base + b, + gridDim.x, ... (one tile per block when the host launches one block per
//   tile, which it does for every variant; the loop keeps a persistent launch expressible).
//   K/V stages and their phases run on across the work tiles of a block (global K/V tile
//   counter); Q's full/empty phases flip once per work tile.
// - v3t's tail launch (SPLIT = 2 or 4, __cluster_dims__(SPLIT)): the SPLIT CTAs of a cluster
//   share one work tile; CTA rank r takes key tiles [r*n/SPLIT, (r+1)*n/SPLIT) of the n tiles
//   (the host guarantees n >= SPLIT, so no piece is empty); the epilogue combines the pieces.
#pragma once
#include "../common.cuh"
#include "../sm90.cuh"
#include "params.cuh"
#include "tile_sizes.cuh"

// v1: this block's head and first query row.
struct AttnSm80Tile {
    int h;
    int m0;
};
LS_DEVICE AttnSm80Tile attn_sm80_tile() {
    AttnSm80Tile t;
    t.h = blockIdx.y;
    t.m0 = blockIdx.x * attn_v1::BM;
    return t;
}

// v3 line: this block's work tiles and, for a split piece, its key tiles.
template <int BN, int SPLIT>
struct AttnSm90Schedule {
    static_assert(SPLIT == 1 || SPLIT == 2 || SPLIT == 4, "combine splits 128 rows evenly");
    int piece;        // this CTA's rank in its cluster (0 without a split)
    int j0;           // first key tile of this piece
    int ntiles;       // key tiles of this piece
    int nqb;          // query blocks per head
    int total;        // one past the last work tile of this launch
    int first_tile;   // this block's first work tile
    int tile_stride;  // distance between this block's work tiles

    LS_DEVICE AttnSm90Schedule(const AttnParams& p, int lq, int lk) {
        piece = SPLIT > 1 ? (int)ls_cluster_ctarank() : 0;
        const int ntiles_all = (lk + BN - 1) / BN;
        j0 = piece * ntiles_all / SPLIT;
        ntiles = (piece + 1) * ntiles_all / SPLIT - j0;
        nqb = (lq + attn_v3::BM - 1) / attn_v3::BM;
        total = (int)p.tile_end;
        first_tile = (int)p.tile_base + (int)blockIdx.x / SPLIT;
        tile_stride = (int)gridDim.x / SPLIT;
    }
    LS_DEVICE int head(int tile) const { return tile / nqb; }
    LS_DEVICE int row0(int tile) const { return (tile % nqb) * attn_v3::BM; }
    // No later work tile for this block (ping-pong skips its final hand-off there).
    LS_DEVICE bool last(int tile) const { return tile + tile_stride >= total; }
};
