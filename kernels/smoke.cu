// Smoke kernel: proves an embedded cubin loads and runs (used by `lockstep doctor` and the GPU
// smoke test). out[i] = a * i + b for i < n.
#include "common.cuh"

struct SmokeParams {
    float* out;
    float a;
    float b;
    uint32_t n;
};

extern "C" __global__ void smoke_affine_f32(SmokeParams p) {
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.out[i] = p.a * float(i) + p.b;
}
static_assert(sizeof(SmokeParams) == 24, "SmokeParams mirror in src/cuda/context.rs");

// Test and benchmark data on the device (no host round trip for hundreds of MB): mode 0 writes
// the constant bit pattern `bits` (e.g. 0x7FC0, a bf16 NaN, to poison outputs); mode 1 writes a
// hash of (seed, index) as a uniform value in [-amp, amp), rounded to bf16.
struct FillParams {
    uint16_t* out;
    uint64_t n;
    uint64_t seed;
    float amp;
    uint32_t mode;
    uint32_t bits;
    uint32_t _pad;
};
static_assert(sizeof(FillParams) == 40, "FillParams mirror in src/cuda/context.rs");

__device__ __forceinline__ uint64_t fill_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void fill_bf16(FillParams p) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        if (p.mode == 0) {
            p.out[i] = (uint16_t)p.bits;
        } else {
            const uint64_t h = fill_mix(p.seed * 0x9e3779b97f4a7c15ull + i);
            const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // [0, 1)
            __nv_bfloat16 b = __float2bfloat16_rn((2.f * u - 1.f) * p.amp);
            p.out[i] = *reinterpret_cast<uint16_t*>(&b);
        }
    }
}
