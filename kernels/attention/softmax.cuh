// Attention: the online softmax of both lines. Masking of the keys past Lk, the running row max
// and row sum (fp32), the exp2 of the scores with the softmax scale folded into one FMA, and the
// rescale of the O accumulator when a row max grows. P stays in the accumulator registers and is
// rounded to bf16 by the mainloop for the P·V product (as FA2 does).
//
// Statistics per row: `mrow` is the running max of the raw (unscaled) scores, `lrow` this
// thread's share of the running sum of exp2((s - mrow) * scale_log2); the epilogue finishes the
// sum across the quad of threads that share a row. Key 0 is always valid, so the running max is
// finite after the first step; corr = exp2((old max - new max) * scale_log2) is 0 the first time.
// The O rescale is skipped when no row of the warp grew (warp-uniform): once the running max
// settles, the multiplies of the rescale disappear.
#pragma once
#include "../common.cuh"
#include "tile_sizes.cuh"

// ---- v1 (mma.sync m16n8k16 accumulator layout) ----------------------------------------------
// s[mt][n][{0,1}]: row lane/4 of m-tile mt, keys 8n + 2(lane%4) + {0,1}; s[mt][n][{2,3}]: the row
// 8 below. One SUB-key step of the online softmax.
struct AttnSm80Softmax {
    using Scores = float[attn_v1::MT][attn_v1::NSUB][4];
    // (lrow before mrow: in this order the kernel keeps the register numbering, and so the
    // SASS byte for byte, that it had before the role split, when these were two local arrays)
    float lrow[attn_v1::MT][2];  // this thread's share of the sum
    float mrow[attn_v1::MT][2];  // running max of raw scores

    LS_DEVICE void init() {
#pragma unroll
        for (int mt = 0; mt < attn_v1::MT; ++mt) {
            mrow[mt][0] = mrow[mt][1] = -INFINITY;
            lrow[mt][0] = lrow[mt][1] = 0.f;
        }
    }

    // Scores of keys >= lk become -inf; only the last tile's steps can reach past Lk.
    static LS_DEVICE void mask(Scores& s, int key0, int lk, int lane) {
        using namespace attn_v1;
        if (key0 + SUB > lk) {
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
    }

    // Scores -> probabilities in place; corr = the O rescale factors. Returns whether any row
    // max of the warp grew (then O must be rescaled).
    LS_DEVICE bool online(Scores& s, float (&corr)[attn_v1::MT][2], float sl) {
        using namespace attn_v1;
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
        return __any_sync(0xffffffffu, grew);
    }

    static LS_DEVICE void rescale(float (&o)[attn_v1::MT][16][4], const float (&corr)[attn_v1::MT][2]) {
#pragma unroll
        for (int mt = 0; mt < attn_v1::MT; ++mt)
#pragma unroll
            for (int d = 0; d < 16; ++d) {
                o[mt][d][0] *= corr[mt][0];
                o[mt][d][1] *= corr[mt][0];
                o[mt][d][2] *= corr[mt][1];
                o[mt][d][3] *= corr[mt][1];
            }
    }
};

// ---- v3 line (wgmma m64nBN accumulator layout, one warpgroup = 64 rows) ----------------------
// s[4i + {0,1}]: row warp*16 + lane/4 of the warpgroup, keys 8i + 2(lane%4) + {0,1};
// s[4i + {2,3}]: the row 8 below. One BN-key tile of the online softmax.
template <int BN>
struct AttnSm90Softmax {
    static constexpr int NI = BN / 8;  // n8 column groups of S per thread row pair
    float mrow[2];  // running max of raw scores
    float lrow[2];  // this thread's share of the sum

    LS_DEVICE void init() {
        mrow[0] = mrow[1] = -INFINITY;
        lrow[0] = lrow[1] = 0.f;
    }

    // Scores of key tile j (raw) -> probabilities in place, keys >= lk masked; corr = the O
    // rescale factors. Returns whether any row max of the warp grew.
    LS_DEVICE bool online(float (&s)[BN / 2], int j, float (&corr)[2], float sl, int lk, int lane) {
        if ((j + 1) * BN > lk) {  // only the last tile reaches past Lk
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
    }

    static LS_DEVICE void rescale(float (&o)[64], const float (&corr)[2]) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            o[4 * i] *= corr[0];
            o[4 * i + 1] *= corr[0];
            o[4 * i + 2] *= corr[1];
            o[4 * i + 3] *= corr[1];
        }
    }
};
