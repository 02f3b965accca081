// Attention: every tuning number in one place, each with the reason it has its value (tile
// sizes, threads, register budgets, pipeline depth, shared-memory sizes, named-barrier ids).
//
// One source of truth for the host as well: build.rs parses every line of the form
//     constexpr int NAME = <integer expression>;
// that sits directly inside `namespace attn_v1` or `namespace attn_v3` below, evaluates it, emits
// it as `pub const NAME: u32` in `kernel_consts::{attn_v1, attn_v3}` (OUT_DIR/kernel_consts.rs,
// used by src/cuda/attention.rs for block sizes, dynamic shared memory and TMA boxes) and hashes
// the name=value pairs into the kernel build id. Such lines may use integer literals, names
// defined above them in the same namespace, + - * / % and parentheses; anything else on a
// `constexpr int` line fails the build. Other lines (templates, static_asserts) are not parsed.
//
// Numbers measured on H200 (and checked on H100) are in BENCHMARKS.md, "Kernels".
#pragma once

// ---- v1: FA2-style (mma.sync m16n8k16, ldmatrix, cp.async), any sm_80+ part: the fallback ----
namespace attn_v1 {
constexpr int D = 128;    // head dim: the swizzle and the XOR-stepped ldmatrix addresses assume
                          // 256-byte rows
constexpr int MT = 2;     // m16 MMA tiles per warp: each K/V fragment read from smem feeds MT
                          // MMAs, so smem reads per FLOP drop 1.6x against MT = 1 (MT = 1 with
                          // 8 warps: 262 TFLOP/s on H200, see BENCHMARKS.md); costs 128 regs.
constexpr int WARPS = 4;  // 128 threads at <= 255 regs: 2 blocks per SM, whose softmax and MMA
                          // phases overlap (one block alone stalls the tensor cores at every sync).
constexpr int BM = WARPS * MT * 16;  // 128 query rows per block
constexpr int BN = 64;               // keys per smem tile (one cp.async stage, one barrier)
constexpr int SUB = 32;              // keys per softmax step inside a tile: S then takes MT*16
                                     // fp32 regs, not MT*32 (the full 64-key tile spilled 48 B;
                                     // SUB = 64 spills, measured)
constexpr int NSUB = SUB / 8;        // n8 subtiles per step
constexpr int THREADS = WARPS * 32;
constexpr int CHUNKS = D / 8;               // 16-byte chunks per row
constexpr int ROW_BYTES = D * 2;            // 256
constexpr int SMEM_Q = BM * ROW_BYTES;      // 32 KB
constexpr int SMEM_KV = BN * ROW_BYTES;     // 16 KB per K or V tile
constexpr int SMEM = SMEM_Q + 4 * SMEM_KV;  // Q + 2 stages x (K, V) = 96 KB: 2 blocks per SM
}  // namespace attn_v1
static_assert(attn_v1::SMEM == 96 * 1024, "two v1 blocks must fit one SM's 228 KB");

// ---- v3: Hopper (TMA producer warpgroup, mbarrier rings, two wgmma consumer warpgroups) -------
namespace attn_v3 {
constexpr int D = 128;       // head dim: a row is two 128-byte swizzle rows (dims 0-63, 64-127)
constexpr int BM = 128;      // two consumer warpgroups x 64 rows (wgmma M is 64 per warpgroup)
// Keys per K/V stage (BN, a template parameter of the kernel body):
constexpr int BN_BASE = 128;  // v3, v3t: S is m64n128 = 64 fp32 regs per thread
constexpr int BN_WIDE = 176;  // v3pw: FA3's choice for head dim 128; S 88 + P 44 + O 64 regs
                              // still fit 240, and the per-tile fixed costs (row max/sum
                              // shuffles, barrier round trips) spread over 1.375x more keys
constexpr int STAGES = 2;    // K and V rings: Q 32 KB + 2 x 2 x BN x 256 B = 160 KB (BN 128) or
                             // 208 KB (BN 176) of 227 KB
constexpr int THREADS = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr int CONSUMER_WARPS = 8;  // arrivals that empty a stage (one per consumer warp)
constexpr int PRODUCER_REGS = 24;  // one thread issues TMA; 24 is the floor FA3 uses
constexpr int CONSUMER_REGS = 240;  // 24 * 128 + 240 * 256 = 64512 <= 65536 registers per SM;
                                    // o 64 + S 64 + P 32 + softmax state fit without spills
// Named barriers (ids 1..15; 0 is __syncthreads), enumerated here so they never collide:
constexpr int BAR_PP_BASE = 1;  // 1 and 2: "consumer c may issue its GEMMs" (ping-pong, v3pw)
constexpr int BAR_SPLIT = 3;    // both consumers done with every stage (v3t's split epilogue)
// TMA boxes: {TMA_BOX_DIMS head dims, 1 head, BM or BN rows}; 64 bf16 = one 128-byte swizzle row.
constexpr int TMA_BOX_DIMS = 64;
// v3t: a split piece's unnormalized O (fp32) goes to shared memory over the K/V stages, rows
// padded to 136 floats (544 B: float2 stores of 8 rows spread over banks, float4 reads aligned),
// then the per-row (max * scale_log2, sum) pairs.
constexpr int SPLIT_ROW = 136;
constexpr int SPLIT_O_BYTES = BM * SPLIT_ROW * 4;  // 68 KB, inside the 128 KB of K/V stages
constexpr int SPLIT_MAX = 4;  // most CTAs one tail tile is split over (cluster kernels: 2 and 4)
constexpr int Q_HALF = BM * 128;      // 16 KB: one TMA box {64 dims, 1 head, 128 rows}
constexpr int SMEM_Q = 2 * Q_HALF;    // 32 KB
// Dynamic shared memory per block (+ 1024 B slack to align the base to 1024 for the swizzle):
constexpr int SMEM_KV_BASE = 2 * BN_BASE * 128;               // one K or V stage, BN 128
constexpr int SMEM_BASE = SMEM_Q + 2 * STAGES * SMEM_KV_BASE + 1024;  // 161 KB: v3, v3t
constexpr int SMEM_KV_WIDE = 2 * BN_WIDE * 128;               // one K or V stage, BN 176
constexpr int SMEM_WIDE = SMEM_Q + 2 * STAGES * SMEM_KV_WIDE + 1024;  // 209 KB: v3pw
template <int BN>
struct Tile {
    static constexpr int KV_HALF = BN * 128;     // one TMA box {64 dims, 1 head, BN rows}
    static constexpr int SMEM_KV = 2 * KV_HALF;  // one K or V stage
    static constexpr int SMEM = SMEM_Q + 2 * STAGES * SMEM_KV + 1024;  // + alignment slack
    static_assert(KV_HALF % 1024 == 0, "swizzle atoms need 1024-byte aligned halves");
};
}  // namespace attn_v3
static_assert(attn_v3::Tile<attn_v3::BN_BASE>::SMEM == attn_v3::SMEM_BASE, "v3 smem formula");
static_assert(attn_v3::Tile<attn_v3::BN_WIDE>::SMEM == attn_v3::SMEM_WIDE, "v3pw smem formula");
static_assert(attn_v3::SMEM_BASE == 161 * 1024 && attn_v3::SMEM_WIDE == 209 * 1024,
              "one block per SM within the 227 KB opt-in limit");
static_assert(attn_v3::SPLIT_O_BYTES + 2 * attn_v3::BM * 4 <=
                  2 * attn_v3::STAGES * attn_v3::SMEM_KV_BASE,
              "v3t's partial O and (max, sum) fit over the K/V stages");
static_assert(attn_v3::TMA_BOX_DIMS * 2 == 128, "a box row is one 128-byte swizzle row");
