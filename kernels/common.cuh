// Shared device helpers for every kernel family. One family per .cu file; entry points are
// extern "C" and named <op>_<dtype>; each family has one #[repr(C)] params struct mirrored in
// src/cuda/ (sizes asserted on both sides, so a drifted mirror fails to compile, not at run time).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define LS_DEVICE __device__ __forceinline__

LS_DEVICE float ls_bf16_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
LS_DEVICE __nv_bfloat16 ls_f32_to_bf16(float x) { return __float2bfloat16_rn(x); }

// Two floats -> one packed bf16x2 register (low half = a), round to nearest even.
LS_DEVICE uint32_t ls_pack_bf16x2(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
}
LS_DEVICE float2 ls_unpack_bf16x2(uint32_t u) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&u);
    return __bfloat1622float2(v);
}

LS_DEVICE uint32_t ls_smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared async copy; when `valid` is false nothing is read and the 16 bytes are
// zero-filled (src-size 0), so out-of-range rows become zeros instead of garbage/NaN.
LS_DEVICE void ls_cp_async16(uint32_t smem, const void* gmem, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(n));
}
LS_DEVICE void ls_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
LS_DEVICE void ls_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

LS_DEVICE void ls_ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
LS_DEVICE void ls_ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// D += A(16x16, row) * B(16x8, col), bf16 inputs, fp32 accumulators.
LS_DEVICE void ls_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

LS_DEVICE float ls_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the total. Contains __syncthreads: call from all threads.
LS_DEVICE float ls_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = ls_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.f;
    return ls_warp_sum(t);
}
