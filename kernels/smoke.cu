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
