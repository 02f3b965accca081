// KV cache: fused 3D RoPE + append into ring slots (and, in the same pass, RoPE on Q).
//
// Contract (mirrored by src/cuda/kv_cache.rs, which checks it before every launch):
// - k_new, v_new [T, H, D] bf16 (the new chunk, K before RoPE); k_cache, v_cache [S, H, D] bf16.
// - Token t goes to cache row slot(t), ring arithmetic on its logical index
//   n = logical_start + t (tokens since the epoch began): n < sink_slots -> n; else
//   sink_slots + (n - sink_slots) % window_slots (kv_cache.rs `RingGeometry::slot` is the host
//   mirror). No device slot map: the launch is fully described by its params (graph-capturable,
//   nothing to upload). Evict is host-side
//   arithmetic (the window start moves); no bytes move. Recompute writes the same slots again.
// - K gets RoPE exactly as ops::rope_3d (Wan 3D split D_t = D - 4*(D/6), D_h = D_w = 2*(D/6);
//   pair (x[2j], x[2j+1]) of a part rotates by pos * 10000^(-2j / D_part), pos = frame, row or
//   column of token t from ops::token_position with start_frame (+ *start_frame_dev when set),
//   grid_h, grid_w). V is copied.
// - Optional q_in/q_out [T, H, D] (both null or both set, may alias): Q gets the same RoPE.
// - Angles are computed in fp64 once per token (64 per block), so large frame indices keep
//   full fp32 accuracy; the element work is fp32.
//
// Tripwires: D must be a multiple of 8 and at most 256 (16-byte vectors, cos/sin table size);
// slots written by one launch must be distinct (the host checks the ring case: T <= window).
#include "common.cuh"

struct KvAppendParams {
    const __nv_bfloat16* k_new;
    const __nv_bfloat16* v_new;
    __nv_bfloat16* k_cache;
    __nv_bfloat16* v_cache;
    const __nv_bfloat16* q_in;
    __nv_bfloat16* q_out;
    uint32_t tokens;
    uint32_t heads;
    uint32_t head_dim;
    uint32_t start_frame;
    uint32_t grid_h;
    uint32_t grid_w;
    uint32_t logical_start;
    uint32_t sink_slots;
    uint32_t window_slots;
    uint32_t _pad0;
    // Optional: a device word added to start_frame (the chunk's first frame), so one captured
    // graph serves every chunk: the host writes the frame before replaying it. Null: 0.
    const uint32_t* start_frame_dev;
};
static_assert(sizeof(KvAppendParams) == 96, "KvAppendParams mirror in src/cuda/kv_cache.rs");

constexpr int KV_THREADS = 256;
constexpr int KV_MAX_D = 256;
constexpr int KV_TOKENS_PER_BLOCK = 2;  // two tokens' worth of 16-byte loads in flight per block

LS_DEVICE void kv_rotate8(uint4& u, const float2* cs, int pair0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 x = ls_unpack_bf16x2(w[i]);
        const float2 t = cs[pair0 + i];  // (cos, sin)
        w[i] = ls_pack_bf16x2(x.x * t.x - x.y * t.y, x.x * t.y + x.y * t.x);
    }
}

extern "C" __global__ void __launch_bounds__(KV_THREADS)
    kv_append_rope_bf16(const KvAppendParams p) {
    __shared__ float2 cs[KV_TOKENS_PER_BLOCK][KV_MAX_D / 2];
    const int D = (int)p.head_dim;
    const int half = D / 2;
    const int s = 2 * (D / 6);
    const int dt = D - 2 * s;
    const uint32_t per_frame = p.grid_h * p.grid_w;
    const int t0 = blockIdx.x * KV_TOKENS_PER_BLOCK;
    const uint32_t frame0 = p.start_frame + (p.start_frame_dev != nullptr ? *p.start_frame_dev : 0u);

    // cos/sin table per token: pair index i in [0, D/2).
    for (int i = threadIdx.x; i < KV_TOKENS_PER_BLOCK * half; i += blockDim.x) {
        const int tt = i / half, pi = i % half;
        const uint32_t t = (uint32_t)(t0 + tt);
        if (t >= p.tokens) continue;
        double pos;
        int j, dpart;
        if (2 * pi < dt) {
            pos = (double)(frame0 + t / per_frame);
            j = pi;
            dpart = dt;
        } else if (2 * pi < dt + s) {
            pos = (double)((t % per_frame) / p.grid_w);
            j = pi - dt / 2;
            dpart = s;
        } else {
            pos = (double)(t % p.grid_w);
            j = pi - (dt + s) / 2;
            dpart = s;
        }
        const double theta = pos * exp2(-(2.0 * j / dpart) * 13.287712379549449);  // log2(1e4)
        double sn, cn;
        sincos(theta, &sn, &cn);
        cs[tt][pi] = make_float2((float)cn, (float)sn);
    }
    __syncthreads();

    const int vec_per_head = D / 8;
    const int vec_per_tok = (int)p.heads * vec_per_head;
    for (int i = threadIdx.x; i < KV_TOKENS_PER_BLOCK * vec_per_tok; i += blockDim.x) {
        const int tt = i / vec_per_tok, e = i % vec_per_tok;
        const uint32_t t = (uint32_t)(t0 + tt);
        if (t >= p.tokens) break;  // i only grows, and tt with it
        const uint32_t n = p.logical_start + t;
        const uint32_t slot =
            n < p.sink_slots ? n : p.sink_slots + (n - p.sink_slots) % p.window_slots;
        const uint64_t src = (uint64_t)t * vec_per_tok + e;
        const uint64_t dst = (uint64_t)slot * vec_per_tok + e;
        const int pair0 = (e % vec_per_head) * 4;
        uint4 k = __ldcs(reinterpret_cast<const uint4*>(p.k_new) + src);
        const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p.v_new) + src);
        uint4 q;
        const bool do_q = p.q_in != nullptr;
        if (do_q) q = __ldcs(reinterpret_cast<const uint4*>(p.q_in) + src);
        kv_rotate8(k, cs[tt], pair0);
        reinterpret_cast<uint4*>(p.k_cache)[dst] = k;
        reinterpret_cast<uint4*>(p.v_cache)[dst] = v;
        if (do_q) {
            kv_rotate8(q, cs[tt], pair0);
            reinterpret_cast<uint4*>(p.q_out)[src] = q;
        }
    }
}
