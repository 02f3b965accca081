// Attention forward: the extern "C" entry points, one per variant (thin: each is a kernel body
// from kernels/attention/ with its template arguments). Two lines of kernels; BENCHMARKS.md keeps
// the figures and the history of the variants that lost and were deleted (v2, v2b, v3p, v3s,
// v3ps, v3w, v3t2):
// - v1 (FA2-style, any sm_80+ part; the fallback): mma.sync m16n8k16 bf16, ldmatrix, cp.async
//   double buffering (attention/kernel_sm80.cuh).
// - v3 line (Hopper, FA3-style; attention/kernel_sm90.cuh): TMA producer warpgroup, mbarrier
//   K/V rings, setmaxnreg, two wgmma consumer warpgroups with intra-warpgroup overlap. v3 =
//   128-key tiles; v3pw = ping-pong consumers with 176-key tiles; v3t = v3 for the whole waves,
//   then the last partial wave split along the keys over a cluster (the tail kernels below).
// The host picks one per call (src/cuda/attention.rs: `AttentionVariant`, per-shape table).
//
// Where things are (kernels/attention/):
//   tile_sizes.cuh     every tile size, thread count, register budget, smem size, barrier id,
//                      each with its reason; build.rs emits them for the host (one source)
//   params.cuh         AttnParams / AttnV3Params (mirrored in src/cuda/attention.rs)
//   scheduler.cuh      grid -> (head, query rows, key tiles); split pieces of v3t
//   mainloop_sm80.cuh  v1: cp.async loads, ldmatrix, mma.sync S and PV
//   mainloop_sm90.cuh  v3 line: smem layout + mbarriers, TMA producer, wgmma consumer pipeline
//   softmax.cuh        masking past Lk, online softmax, O rescale (both lines)
//   epilogue.cuh       O normalisation, bf16 store, LSE; v3t's cluster combine
//   kernel_sm80.cuh, kernel_sm90.cuh   the kernel bodies wiring those roles
//
// Contract (mirrored by src/cuda/attention.rs, which checks it before every launch):
// - q [Lq, H, 128], k/v [Lk, H, 128], o [Lq, H, 128], all bf16, token-major; the row stride
//   (elements between consecutive tokens) is given per tensor, head h starts at h*128.
// - No mask. Any Lk >= 1 and any Lq >= 1: the last key tile is masked to -inf past Lk, rows past
//   Lq are computed on zeros and never stored. Out-of-range rows are zero-filled (cp.async
//   src-size 0 in v1, TMA out-of-bounds fill in v3), never read.
// - K/V rows may be in any order (attention is a set operation), so a ring cache is passed as
//   one contiguous [Lk, H, 128] view of its occupied slots.
// - lse (optional, may be null): fp32 [Lq, H], natural log-sum-exp of the scaled scores.
// - Softmax statistics (running max, running sum) and the O accumulator are fp32; P is rounded
//   to bf16 for the P·V product (as FA2 does).
#include "attention/kernel_sm80.cuh"
#include "attention/kernel_sm90.cuh"

// v1: grid (ceil(Lq / 128), H), 128 threads, attn_v1::SMEM bytes.
extern "C" __global__ void __launch_bounds__(attn_v1::THREADS, 2)
    attention_fwd_v1_bf16(const AttnParams p) {
    attention_fwd_sm80(p);
}

// v3 (and v3t's whole waves): grid = one block per work tile of [tile_base, tile_end).
extern "C" __global__ void __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_sm90<false, attn_v3::BN_BASE, 1>(P);
}

// v3pw: ping-pong consumers, 176-key tiles (K/V tensor maps with 176-row boxes).
extern "C" __global__ void __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3pw_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_sm90<true, attn_v3::BN_WIDE, 1>(P);
}

// v3t's tail launch (AttentionVariant::V3TmaSplitTail): the work tiles of the last partial wave,
// each split over a cluster of 2 or 4 CTAs along the keys (the host launches the full waves
// with attention_fwd_v3_bf16 first). Grid = tail tiles x SPLIT.
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3t2_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_sm90<false, attn_v3::BN_BASE, 2>(P);
}

extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(attn_v3::THREADS, 1)
    attention_fwd_v3t4_bf16(const __grid_constant__ AttnV3Params P) {
    attention_fwd_sm90<false, attn_v3::BN_BASE, 4>(P);
}
static_assert(attn_v3::SPLIT_MAX == 4, "the widest tail cluster above (src/cuda: V3T_MAX_SPLIT)");
