// Attention: the launch parameter structs, mirrored field for field by src/cuda/attention.rs
// (`AttnParams`, `AttnV3Params`; sizes and the offset of the plain params asserted on both
// sides, so a drifted mirror fails to compile rather than at run time).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <cuda_bf16.h>

// Every variant: pointers, shapes, strides, scale (the contract is in kernels/attention.cu).
struct AttnParams {
    const __nv_bfloat16* q;
    const __nv_bfloat16* k;
    const __nv_bfloat16* v;
    __nv_bfloat16* o;
    float* lse;
    uint32_t lq;
    uint32_t lk;
    uint32_t heads;
    uint32_t tile_base;  // v3 only: first (query block, head) work tile of this launch

    uint64_t q_row_stride;
    uint64_t kv_row_stride;
    uint64_t o_row_stride;
    float scale_log2;  // softmax scale * log2(e)
    uint32_t tile_end;  // v3 only: one past the last work tile of this launch (v1 ignores both)
};
static_assert(sizeof(AttnParams) == 88, "AttnParams mirror in src/cuda/attention.rs");

// The driver's CUtensorMap (128 bytes, opaque); passed by value inside the __grid_constant__
// params so its address is a param-space address TMA can read.
struct alignas(128) LsTmaDesc {
    uint64_t opaque[16];
};
// v3 line: three tensor maps (encoded on the host per launch), then the plain params.
struct AttnV3Params {
    // Coordinates are {head dim, head, token}: q dims {128, H, Lq}, byte strides {256,
    // q_row_stride * 2} (increasing, as the driver documents), box {64, 1, 128}.
    LsTmaDesc tq;
    LsTmaDesc tk;  // k: dims {128, H, Lk}, box {64, 1, BN}
    LsTmaDesc tv;  // v: as k
    AttnParams p;  // pointers for the epilogue, shapes, scale
};
static_assert(sizeof(AttnV3Params) == 512, "AttnV3Params mirror in src/cuda/attention.rs");
static_assert(offsetof(AttnV3Params, p) == 384, "AttnV3Params mirror in src/cuda/attention.rs");
