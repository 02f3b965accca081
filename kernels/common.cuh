// Shared device helpers for every kernel family. One family per .cu file; entry points are
// extern "C" and named <op>_<dtype>; each family has one #[repr(C)] params struct mirrored in
// src/cuda/.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#define LS_DEVICE __device__ __forceinline__

LS_DEVICE float ls_bf16_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
LS_DEVICE __nv_bfloat16 ls_f32_to_bf16(float x) { return __float2bfloat16_rn(x); }
