#!/usr/bin/env python3
"""Independent PyTorch reference for lockstep's generator: Wan 2.1 T2V causal DiT, streamed.

Written from Wan 2.1's published architecture (wan/modules/model.py), not from lockstep's code:
it shares nothing with the Rust side but the weight names and the documented token layout.

Modes
  check     Load a weights file (`lockstep weights save`) and a stream trace (`lockstep weights
            trace`), recompute every generator call of the stream with our own KV-cache
            bookkeeping and print the relative L2 error of each output, plus the stream's Euler
            steps. float64 on the CPU by default (float32 with --device cuda). Exit 1 if any
            error exceeds --tol or the stream breaks a cache rule.
  bench     Time the same model the way a PyTorch user would deploy it: bf16 weights, fp32
            residual stream and norms (Wan's own precision recipe), SDPA, text K/V computed once
            per prompt, a preallocated per-layer KV cache with sink slots + a ring window.
            Eager, or with --compile (regional torch.compile of the transformer block).
  selftest  Write random weights and a fake trace produced by this model, check it (must pass),
            then check deliberately broken variants (must fail). Runs on the CPU in seconds.

Examples
  python wan_reference.py check --weights /tmp/w.safetensors --trace /tmp/t.safetensors
  python wan_reference.py bench --preset wan-1.3b --device cuda --compile --json out.json
  python wan_reference.py bench --preset tiny --device cpu
  python wan_reference.py selftest

Token layout (lockstep's interface, used ONLY to convert trace tensors to and from video):
a chunk is [frames*grid_h*grid_w, 4*C], token = f*gh*gw + h*gw + w, feature = c*4 + kh*2 + kw,
holding video[c, f, 2h+kh, 2w+kw]. Inside the model everything is Wan's: Conv3d patchify,
Wan unpatchify (head feature = (kh*2+kw)*C + c).
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError:  # bench does not need it; check/selftest say so when they do
    safe_open = save_file = None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    name: str
    dim: int
    layers: int
    heads: int
    head_dim: int
    ffn_dim: int
    latent_channels: int
    grid_h: int
    grid_w: int
    frames_per_chunk: int
    text_tokens: int
    text_dim: int
    freq_dim: int
    sink_frames: int
    window_frames: int
    eps: float

    @classmethod
    def from_dict(cls, d):
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"trace config lacks {missing}")
        c = cls(**{n: d[n] for n in names})
        if c.heads * c.head_dim != c.dim:
            # Wan ties head_dim = dim / heads; RMSNorm over `dim` covers all heads.
            raise ValueError(f"heads*head_dim = {c.heads * c.head_dim} != dim {c.dim}")
        if c.head_dim % 2 or c.freq_dim % 2:
            raise ValueError("head_dim and freq_dim must be even")
        return c

    @property
    def tokens_per_frame(self):
        return self.grid_h * self.grid_w

    @property
    def capacity(self):
        return self.sink_frames + self.window_frames


def _wan(name, dim, layers, heads, ffn):
    return Config(name=name, dim=dim, layers=layers, heads=heads, head_dim=128, ffn_dim=ffn,
                  latent_channels=16, grid_h=30, grid_w=52, frames_per_chunk=3, text_tokens=512,
                  text_dim=4096, freq_dim=256, sink_frames=3, window_frames=18, eps=1e-6)


PRESETS = {
    "wan-1.3b": _wan("wan-1.3b", 1536, 30, 12, 8960),
    "wan-14b": _wan("wan-14b", 5120, 40, 40, 13824),
    "tiny": Config(name="tiny", dim=128, layers=2, heads=4, head_dim=32, ffn_dim=384,
                   latent_channels=16, grid_h=8, grid_w=8, frames_per_chunk=3, text_tokens=32,
                   text_dim=64, freq_dim=64, sink_frames=3, window_frames=6, eps=1e-6),
}


def param_shapes(cfg):
    """Wan 2.1 T2V parameter names and shapes (the names of Wan's state_dict)."""
    d, C = cfg.dim, cfg.latent_channels
    s = {
        "patch_embedding.weight": (d, C, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (4 * C, d), "head.head.bias": (4 * C,),
    }
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, d)
        for att in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                s[f"{b}{att}.{lin}.weight"] = (d, d)
                s[f"{b}{att}.{lin}.bias"] = (d,)
            s[f"{b}{att}.norm_q.weight"] = (d,)
            s[f"{b}{att}.norm_k.weight"] = (d,)
        s[b + "norm3.weight"] = (d,)
        s[b + "norm3.bias"] = (d,)
        s[b + "ffn.0.weight"] = (cfg.ffn_dim, d)
        s[b + "ffn.0.bias"] = (cfg.ffn_dim,)
        s[b + "ffn.2.weight"] = (d, cfg.ffn_dim)
        s[b + "ffn.2.bias"] = (d,)
    return s


def random_weights(cfg, seed, dtype=torch.float32, device="cpu"):
    """Seeded random weights with sane activation scales: linears ~ N(0, 1/fan_in) (unit gain),
    small biases, Wan's modulation init (randn / sqrt(dim)), norm weights near 1 but not 1 (so a
    test notices if one is ignored), a non-zero head (Wan initialises it to zero, which would make
    every output 0 and every check vacuous)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        def randn(scale):
            return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)
        if name.endswith("modulation"):
            t = randn(cfg.dim ** -0.5)
        elif "norm" in name and name.endswith(".weight"):
            t = (1.0 + randn(0.1).float()).to(dtype)
        elif name.endswith(".bias"):
            t = randn(0.02)
        else:
            fan_in = math.prod(shape[1:])
            t = randn(fan_in ** -0.5)
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------
# Layout conversions (lockstep tokens <-> video) and Wan's patchify / unpatchify
# ----------------------------------------------------------------------------------------------

def tokens_to_video(tok, cfg, frames):
    """lockstep token layout -> video [C, F, 2*gh, 2*gw] (feature = c*4 + kh*2 + kw)."""
    C, gh, gw = cfg.latent_channels, cfg.grid_h, cfg.grid_w
    t = tok.reshape(frames, gh, gw, C, 2, 2)          # (f, h, w, c, kh, kw)
    return t.permute(3, 0, 1, 4, 2, 5).reshape(C, frames, 2 * gh, 2 * gw)


def video_to_tokens(video, cfg):
    C, frames, gh, gw = cfg.latent_channels, video.shape[1], cfg.grid_h, cfg.grid_w
    v = video.reshape(C, frames, gh, 2, gw, 2)       # (c, f, h, kh, w, kw)
    return v.permute(1, 2, 4, 0, 3, 5).reshape(frames * gh * gw, 4 * C)


def wan_unpatchify(out, cfg, frames):
    """Wan's unpatchify: the 4*C head outputs of token (f, h, w) are ordered (kh, kw, c)."""
    C, gh, gw = cfg.latent_channels, cfg.grid_h, cfg.grid_w
    u = out.reshape(frames, gh, gw, 2, 2, C)          # (f, h, w, kh, kw, c)
    return u.permute(5, 0, 1, 3, 2, 4).reshape(C, frames, 2 * gh, 2 * gw)


# ----------------------------------------------------------------------------------------------
# The model (shared by check and bench)
# ----------------------------------------------------------------------------------------------

def _rope_inv_freqs(head_dim):
    """Wan's 3D RoPE split of head_dim: (frame, row, column) parts of widths
    (d - 4*(d//6), 2*(d//6), 2*(d//6)); within a part of width p, pair j rotates at
    10000^(-2j/p). Returns three float64 vectors of per-pair frequencies."""
    d6 = head_dim // 6
    parts = (head_dim - 4 * d6, 2 * d6, 2 * d6)
    return [10000.0 ** (-torch.arange(0, p, 2, dtype=torch.float64) / p) for p in parts]


class WanDiT:
    """Wan 2.1 T2V DiT forward for one streamed chunk.

    wdtype: dtype of matrices (linears, conv) and of the KV cache / attention inputs.
    adtype: dtype of the residual stream, norms, modulation and RoPE math (Wan keeps these in
    fp32 even when the weights are bf16). check: both float64 (or float32); bench: bf16/fp32.

    The self-attention's keys/values are not the model's business: forward() calls
    attend(layer, q, k, v) and the caller's cache policy decides what q attends over.
    block_pre / block_post take the layer's weights as a dict argument (not via self) so that
    torch.compile produces one graph for all layers instead of one per layer.
    """

    def __init__(self, cfg, weights, wdtype, adtype, device):
        self.cfg, self.wdtype, self.adtype, self.device = cfg, wdtype, adtype, device
        self.heads, self.hd, self.eps = cfg.heads, cfg.head_dim, cfg.eps

        def mat(n):
            return weights[n].to(device=device, dtype=wdtype).contiguous()

        def vec(n):
            return weights[n].to(device=device, dtype=adtype).contiguous()

        def lin(prefix):
            return (mat(prefix + ".weight"), mat(prefix + ".bias"))

        self.patch = lin("patch_embedding")
        self.text0, self.text2 = lin("text_embedding.0"), lin("text_embedding.2")
        self.time0, self.time2 = lin("time_embedding.0"), lin("time_embedding.2")
        self.time_proj = lin("time_projection.1")
        self.head_mod = vec("head.modulation").reshape(2, cfg.dim)
        self.head_lin = lin("head.head")
        self.layers = []
        for i in range(cfg.layers):
            b = f"blocks.{i}."
            p = {"mod": vec(b + "modulation").reshape(6, cfg.dim),
                 "norm3_w": vec(b + "norm3.weight"), "norm3_b": vec(b + "norm3.bias")}
            for short, att in (("sa", "self_attn"), ("ca", "cross_attn")):
                for l in "qkvo":
                    p[f"{short}_{l}_w"], p[f"{short}_{l}_b"] = lin(f"{b}{att}.{l}")
                p[f"{short}_nq"] = vec(f"{b}{att}.norm_q.weight")
                p[f"{short}_nk"] = vec(f"{b}{att}.norm_k.weight")
            p["ffn0_w"], p["ffn0_b"] = lin(b + "ffn.0")
            p["ffn2_w"], p["ffn2_b"] = lin(b + "ffn.2")
            self.layers.append(p)
        self.inv_freqs = [f.to(device) for f in _rope_inv_freqs(cfg.head_dim)]
        self._rope_memo = {}

    # -- small pieces --------------------------------------------------------------------------
    def _linear(self, x, wb):
        return F.linear(x.to(self.wdtype), wb[0], wb[1])

    def _ln(self, x, w=None, b=None):
        return F.layer_norm(x.to(self.adtype), (x.shape[-1],), w, b, self.eps)

    def _rms(self, z, w):
        # RMSNorm over the full dim (all heads at once), as Wan's norm_q / norm_k.
        z = z.to(self.adtype)
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def _sdpa(self, q, k, v):
        # [L, H, d] token-major -> [1, H, L, d] views; softmax scale 1/sqrt(head_dim), no mask.
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], scale=self.hd ** -0.5)
        return o[0].transpose(0, 1)

    @staticmethod
    def _rotate(x, cos, sin):
        # Adjacent pairs (2j, 2j+1) rotate by the angle of pair j (Wan's view_as_complex).
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    # -- per-call inputs -----------------------------------------------------------------------
    def rope(self, start_frame, frames):
        """cos/sin [frames*gh*gw, head_dim/2] for tokens at logical frames start_frame.., rows h,
        columns w. Angles in float64, like Wan; memoised per (start, frames)."""
        key = (start_frame, frames)
        if key not in self._rope_memo:
            cfg = self.cfg
            f = torch.arange(start_frame, start_frame + frames, dtype=torch.float64, device=self.device)
            h = torch.arange(cfg.grid_h, dtype=torch.float64, device=self.device)
            w = torch.arange(cfg.grid_w, dtype=torch.float64, device=self.device)
            ff, hh, ww = torch.meshgrid(f, h, w, indexing="ij")  # token order (f, h, w)
            ang = torch.cat([pos.reshape(-1, 1) * inv[None, :]
                             for pos, inv in zip((ff, hh, ww), self.inv_freqs)], dim=1)
            self._rope_memo[key] = (ang.cos().to(self.adtype), ang.sin().to(self.adtype))
        return self._rope_memo[key]

    def time_embedding(self, t):
        """t (a number) -> e [dim] and e0 [6, dim]. Sinusoid in float64, cos half first."""
        half = self.cfg.freq_dim // 2
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=self.device) / half)
        arg = float(t) * freqs
        emb = torch.cat([arg.cos(), arg.sin()]).to(self.adtype)
        e = self._linear(F.silu(self._linear(emb, self.time0).to(self.adtype)), self.time2).to(self.adtype)
        e0 = self._linear(F.silu(e), self.time_proj).to(self.adtype).reshape(6, self.cfg.dim)
        return e, e0

    def text_context(self, text):
        """Prompt features [text_tokens, text_dim] -> per layer cross-attention (K, V) [Lt, H, d].
        Computed once per prompt: it does not depend on the latent or the timestep."""
        ctx = self._linear(F.gelu(self._linear(text, self.text0), approximate="tanh"), self.text2)
        out = []
        for p in self.layers:
            k = self._rms(self._linear(ctx, (p["ca_k_w"], p["ca_k_b"])), p["ca_nk"])
            v = self._linear(ctx, (p["ca_v_w"], p["ca_v_b"]))
            L = ctx.shape[0]
            out.append((k.reshape(L, self.heads, self.hd).to(self.wdtype).contiguous(),
                        v.reshape(L, self.heads, self.hd).to(self.wdtype).contiguous()))
        return out

    def embed(self, video):
        """Conv3d patchify (kernel = stride = (1, 2, 2)); tokens ordered (f, h, w)."""
        x = F.conv3d(video.to(self.wdtype)[None], self.patch[0], self.patch[1], stride=(1, 2, 2))
        return x.flatten(2)[0].transpose(0, 1).to(self.adtype)

    # -- the block, split around self-attention's key/value source -----------------------------
    def block_pre(self, p, x, e0, cos, sin):
        m = p["mod"] + e0  # shift1, scale1, gate1, shift2, scale2, gate2
        L = x.shape[0]
        xn = (self._ln(x) * (1 + m[1]) + m[0]).to(self.wdtype)
        q = self._rms(self._linear(xn, (p["sa_q_w"], p["sa_q_b"])), p["sa_nq"])
        k = self._rms(self._linear(xn, (p["sa_k_w"], p["sa_k_b"])), p["sa_nk"])
        v = self._linear(xn, (p["sa_v_w"], p["sa_v_b"]))
        q = self._rotate(q.reshape(L, self.heads, self.hd), cos, sin).to(self.wdtype)
        k = self._rotate(k.reshape(L, self.heads, self.hd), cos, sin).to(self.wdtype)
        return q, k, v.reshape(L, self.heads, self.hd).to(self.wdtype)

    def block_post(self, p, x, attn, e0, ck, cv):
        m = p["mod"] + e0
        L = x.shape[0]
        y = self._linear(attn.reshape(L, -1), (p["sa_o_w"], p["sa_o_b"])).to(self.adtype)
        x = x + y * m[2]
        # cross-attention: norm3 has affine weights, no modulation, no gate
        xn = self._ln(x, p["norm3_w"], p["norm3_b"])
        q = self._rms(self._linear(xn, (p["ca_q_w"], p["ca_q_b"])), p["ca_nq"])
        a = self._sdpa(q.reshape(L, self.heads, self.hd).to(self.wdtype), ck, cv)
        x = x + self._linear(a.reshape(L, -1), (p["ca_o_w"], p["ca_o_b"])).to(self.adtype)
        xn = self._ln(x) * (1 + m[4]) + m[3]
        h = F.gelu(self._linear(xn, (p["ffn0_w"], p["ffn0_b"])), approximate="tanh")
        return x + self._linear(h, (p["ffn2_w"], p["ffn2_b"])).to(self.adtype) * m[5]

    def head(self, x, e, frames):
        m = self.head_mod + e  # the dim-sized time embedding e, not e0
        out = self._linear(self._ln(x) * (1 + m[1]) + m[0], self.head_lin).to(self.adtype)
        return wan_unpatchify(out, self.cfg, frames)

    def forward(self, video, t, text_kv, start_frame, attend):
        """video [C, F, 2gh, 2gw] -> video-shaped model output (Wan: the flow velocity)."""
        frames = video.shape[1]
        cos, sin = self.rope(start_frame, frames)
        e, e0 = self.time_embedding(t)
        x = self.embed(video)
        for i, p in enumerate(self.layers):
            q, k, v = self.block_pre(p, x, e0, cos, sin)
            x = self.block_post(p, x, attend(i, q, k, v), e0, *text_kv[i])
        return self.head(x, e, frames)


# ----------------------------------------------------------------------------------------------
# check: the stream semantics, as a list of cached logical frames (no ring)
# ----------------------------------------------------------------------------------------------

class StreamError(Exception):
    pass


class FrameCache:
    """Per layer: logical frame -> (K, V) of that frame, K after RMSNorm and RoPE at the frame's
    own position. `frames` lists cached frames oldest first; the first `n_sinks` are sinks (the
    first sink_frames frames appended in the epoch) and are never evicted."""

    def __init__(self, cfg, sdpa):
        self.cfg, self.sdpa, self.pending = cfg, sdpa, {}
        self.reset()

    def reset(self):
        self.frames, self.n_sinks, self.appended = [], 0, 0
        self.kv = [dict() for _ in range(self.cfg.layers)]

    def evict(self, n):
        window = self.frames[self.n_sinks:]
        if n > len(window):
            raise StreamError(f"evict {n} but only {len(window)} non-sink frames cached")
        for f in window[:n]:
            for layer in self.kv:
                del layer[f]
        self.frames = self.frames[:self.n_sinks] + window[n:]

    def begin(self, kind, start_frame, frames):
        tpf = self.cfg.tokens_per_frame
        own = list(range(start_frame, start_frame + frames))
        if kind == "recompute":
            missing = [f for f in own if f not in self.frames]
            if missing:
                raise StreamError(f"recompute of frames {missing} that are not cached")
        elif kind == "clean":
            dup = [f for f in own if f in self.frames]
            if dup:
                raise StreamError(f"clean pass appends frames {dup} that are already cached")
            if len(self.frames) + frames > self.cfg.capacity:
                raise StreamError(f"clean pass overflows: {len(self.frames)} cached + {frames} "
                                  f"> capacity {self.cfg.capacity}")
        elif kind != "denoise":
            raise StreamError(f"unknown call kind {kind!r}")
        self.kind, self.own, self.tpf, self.pending = kind, own, tpf, {}

    def attend(self, layer, q, k, v):
        if self.kind == "recompute":
            K, V = k, v                      # the call's own tokens only
        else:                                # denoise / clean: cache + own tokens
            K = torch.cat([self.kv[layer][f][0] for f in self.frames] + [k])
            V = torch.cat([self.kv[layer][f][1] for f in self.frames] + [v])
        if self.kind in ("clean", "recompute"):
            for j, f in enumerate(self.own):  # written at end(): visible from the next call on
                sl = slice(j * self.tpf, (j + 1) * self.tpf)
                self.pending[(layer, f)] = (k[sl].clone(), v[sl].clone())
        return self.sdpa(q, K, V)

    def end(self):
        for (layer, f), kv in self.pending.items():
            self.kv[layer][f] = kv
        self.pending = {}
        if self.kind == "clean":
            for f in self.own:
                self.frames.append(f)
                if self.appended < self.cfg.sink_frames:
                    self.n_sinks += 1
                self.appended += 1


def load_trace(path):
    meta = {}
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if "lockstep.trace" not in meta:
        raise SystemExit(f"{path}: no 'lockstep.trace' metadata (keys: {sorted(meta)})")
    return json.loads(meta["lockstep.trace"]), tensors


def load_weights(path, cfg, log):
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        w = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta:
        log(f"weights metadata keys: {sorted(meta)}")
    want = param_shapes(cfg)
    problems = []
    for n, shape in want.items():
        if n not in w:
            problems.append(f"missing tensor {n} {list(shape)}")
        elif tuple(w[n].shape) != shape:
            problems.append(f"{n}: shape {list(w[n].shape)}, Wan's is {list(shape)}")
    extra = sorted(set(w) - set(want))
    if extra:
        log(f"note: {len(extra)} tensors not in Wan 2.1 T2V, ignored: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    dtypes = sorted({str(t.dtype) for t in w.values()})
    log(f"weights: {len(w)} tensors, dtypes {dtypes}")
    return w, problems


def rel_l2(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_check(weights_path, trace_path, tol=1e-4, device="cpu", log=print):
    """Returns (ok, max_call_err, max_euler_err, n_problems)."""
    trace, tensors = load_trace(trace_path)
    cfg = Config.from_dict(trace["config"])
    dtype = torch.float64 if device == "cpu" else torch.float32
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32 here
        torch.backends.cudnn.allow_tf32 = False
    log(f"config {cfg.name}: dim {cfg.dim}, {cfg.layers} layers, {cfg.heads}x{cfg.head_dim} heads, "
        f"ffn {cfg.ffn_dim}, C {cfg.latent_channels}, grid {cfg.grid_h}x{cfg.grid_w}, "
        f"{cfg.frames_per_chunk} frames/chunk, text {cfg.text_tokens}x{cfg.text_dim}, freq {cfg.freq_dim}, "
        f"sink {cfg.sink_frames} + window {cfg.window_frames}, eps {cfg.eps}; computing in {dtype} on {device}")
    weights, problems = load_weights(weights_path, cfg, log)
    if problems:
        for p in problems:
            log(f"WEIGHTS: {p}")
        log(f"FAIL: {len(problems)} weight problems")
        return False, float("inf"), float("inf"), len(problems)
    model = WanDiT(cfg, weights, dtype, dtype, device)
    text = tensors["text"]
    if tuple(text.shape) != (cfg.text_tokens, cfg.text_dim):
        log(f"STREAM: text is {list(text.shape)}, config says [{cfg.text_tokens}, {cfg.text_dim}]")
    text_kv = model.text_context(text.to(device=device, dtype=dtype))
    cache = FrameCache(cfg, model._sdpa)

    calls = sorted(trace["calls"], key=lambda c: c["n"])
    problems = []
    if [c["n"] for c in calls] != list(range(len(calls))):
        problems.append(f"call numbers are not 0..{len(calls) - 1}")
    max_err, max_euler, n_bad = 0.0, 0.0, 0
    last_denoise = {}   # chunk -> (x tokens, t, our out tokens) of its latest denoise call
    for c in calls:
        n, kind, frames, start = c["n"], c["kind"], c["frames"], c["start_frame"]
        t = float(c["t"])
        tag = f"call {n} chunk {c['chunk']} kind {kind} t={c['t']}"
        try:
            if c.get("reset_before"):
                cache.reset()
            ev = int(c.get("evict_before", 0))
            if ev or kind == "clean":
                need = max(0, len(cache.frames) + frames - cfg.capacity)
                if ev != need:
                    problems.append(f"{tag}: evict_before {ev}, but {len(cache.frames)} cached + "
                                    f"{frames} frames into capacity {cfg.capacity} needs {need}")
            cache.evict(ev)
            cached_before = len(cache.frames)
            x_tok = tensors[f"call{n}.x"]
            ref_tok = tensors[f"call{n}.out"]
            want = (frames * cfg.tokens_per_frame, 4 * cfg.latent_channels)
            if tuple(x_tok.shape) != want or tuple(ref_tok.shape) != want:
                raise StreamError(f"x {list(x_tok.shape)} / out {list(ref_tok.shape)}, expected {list(want)}")
            cache.begin(kind, start, frames)
            video = tokens_to_video(x_tok.to(device=device, dtype=dtype), cfg, frames)
            with torch.no_grad():
                out = model.forward(video, t, text_kv, start, cache.attend)
            cache.end()
        except StreamError as e:
            problems.append(f"{tag}: {e}")
            log(f"{tag}: STREAM ERROR {e}")
            continue
        mine = video_to_tokens(out, cfg).cpu()
        err = rel_l2(mine, ref_tok)
        max_err = max(max_err, err)
        bad = not err <= tol
        n_bad += bad
        attended = "own only" if kind == "recompute" else f"{cached_before} cached + {frames} own"
        extra = f" (evicted {ev})" if ev else ""
        extra += " (reset)" if c.get("reset_before") else ""
        log(f"{tag}: rel L2 = {err:.3e}{'  <-- over tol' if bad else ''}   "
            f"[frames {start}..{start + frames - 1}, attends {attended} frames{extra}]")
        # Euler: x_{k+1} = x_k + (t_{k+1} - t_k)/1000 * out_k, with OUR out_k; clean is at t = 0.
        if kind in ("denoise", "clean") and c["chunk"] in last_denoise:
            px, pt, pout = last_denoise[c["chunk"]]
            t_next = t if kind == "denoise" else 0.0
            expect = px.double() + (t_next - pt) / 1000.0 * pout
            e_err = rel_l2(expect, x_tok)
            max_euler = max(max_euler, e_err)
            bad = not e_err <= tol
            n_bad += bad
            log(f"  euler chunk {c['chunk']} t {pt:g} -> {t_next:g} ({kind} x): rel L2 = {e_err:.3e}"
                f"{'  <-- over tol' if bad else ''}")
            if kind == "clean" and t != 0:
                problems.append(f"{tag}: clean pass at t={t}, expected 0")
        if kind == "denoise":
            last_denoise[c["chunk"]] = (x_tok, t, mine)
        elif kind == "clean":
            last_denoise.pop(c["chunk"], None)
    for p in problems:
        log(f"STREAM: {p}")
    ok = n_bad == 0 and not problems and bool(calls)
    log(f"{'PASS' if ok else 'FAIL'}: {len(calls)} calls, max rel L2 {max_err:.3e}, max Euler rel L2 "
        f"{max_euler:.3e}, {n_bad} over tol {tol:g}, {len(problems)} stream problems")
    return ok, max_err, max_euler, len(problems)


# ----------------------------------------------------------------------------------------------
# selftest: a fake trace from this model, then broken variants that check must catch
# ----------------------------------------------------------------------------------------------

def make_fake_trace(cfg, weights, path, seed, fault=None):
    """A stream in the trace format: epoch 1 = 5 chunks (fills 0, 3, 6, 9, 9 with sink 3 +
    window 6, so two evictions) and a recompute of the sink frames before chunk 3; epoch 2 =
    2 chunks after a reset. Computed in float64 with inputs rounded to float32 as stored.
    fault: None | 'rope' (every chunk's RoPE from frame 0) | 'layout' (tokens written in Wan's
    (kh, kw, c) feature order instead of lockstep's (c, kh, kw)) | 'evict' (metadata claims one
    more eviction than needed at each eviction) | 'norecompute' (the recompute call's K/V are
    dropped instead of replacing the sinks')."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    model = WanDiT(cfg, weights, dt, dt, "cpu")
    text = torch.randn(cfg.text_tokens, cfg.text_dim, generator=g)
    text_kv = model.text_context(text.double())
    cache = FrameCache(cfg, model._sdpa)
    Fc = cfg.frames_per_chunk
    shape = (cfg.latent_channels, Fc, 2 * cfg.grid_h, 2 * cfg.grid_w)
    calls, tensors = [], {"text": text}

    def to_tokens(video):
        if fault == "layout":
            u = video.reshape(cfg.latent_channels, Fc, cfg.grid_h, 2, cfg.grid_w, 2)
            return u.permute(1, 2, 4, 3, 5, 0).reshape(-1, 4 * cfg.latent_channels)
        return video_to_tokens(video, cfg)

    def call(chunk, kind, t, start, video, evict=0, reset=False):
        n = len(calls)
        video = video.float().double()   # the trace stores f32; compute from what is stored
        if reset:
            cache.reset()
        cache.evict(evict)
        cache.begin(kind, start, Fc)
        out = model.forward(video, t, text_kv, 0 if fault == "rope" else start, cache.attend)
        if fault == "norecompute" and kind == "recompute":
            cache.pending = {}           # the recompute's K/V never reach the cache
        cache.end()
        claimed = evict + 1 if (fault == "evict" and evict) else evict
        calls.append({"n": n, "chunk": chunk, "kind": kind, "t": t, "start_frame": start,
                      "frames": Fc, "evict_before": claimed, "reset_before": reset})
        tensors[f"call{n}.x"] = to_tokens(video).float().contiguous()
        tensors[f"call{n}.out"] = to_tokens(out).float().contiguous()
        return out

    chunk = 0
    for epoch_chunks in (5, 2):
        first_clean = None
        for j in range(epoch_chunks):
            start = j * Fc
            if j == 3:  # re-prefill the sinks from a fresh latent: its K/V must replace theirs
                call(chunk, "recompute", 0, 0, torch.randn(shape, generator=g, dtype=dt))
            x = torch.randn(shape, generator=g, dtype=dt)
            ts = [1000, 750, 500, 250]
            for k, t in enumerate(ts):
                out = call(chunk, "denoise", t, start, x, reset=(j == 0 and k == 0))
                x = x.float().double() + ((ts[k + 1] if k + 1 < len(ts) else 0) - t) / 1000.0 * out
            need = max(0, len(cache.frames) + Fc - cfg.capacity)
            call(chunk, "clean", 0, start, x, evict=need)
            chunk += 1
    meta = {"lockstep.trace": json.dumps({"config": dataclasses.asdict(cfg), "calls": calls})}
    save_file(tensors, path, metadata=meta)


def ring_vs_list(cfg, weights, chunks):
    """The bench's RingKV and the check's FrameCache must give the same outputs on the same
    stream (float64), through evictions and ring wrap-around: the bench times the model that
    check validates."""
    model = WanDiT(cfg, weights, torch.float64, torch.float64, "cpu")
    g = torch.Generator().manual_seed(5)
    text_kv = model.text_context(torch.randn(cfg.text_tokens, cfg.text_dim, generator=g, dtype=torch.float64))
    ring = RingKV(cfg, "cpu", torch.float64, model._sdpa)
    frames = FrameCache(cfg, model._sdpa)
    Fc, worst = cfg.frames_per_chunk, 0.0
    shape = (cfg.latent_channels, Fc, 2 * cfg.grid_h, 2 * cfg.grid_w)
    ts = [1000.0, 750.0, 500.0, 250.0, 0.0]
    for c in range(chunks):
        start, x = c * Fc, torch.randn(shape, generator=g, dtype=torch.float64)
        for k, t in enumerate(ts):
            kind = "denoise" if k < 4 else "clean"
            if kind == "clean":
                need = max(0, len(frames.frames) + Fc - cfg.capacity)
                frames.evict(need)
                ring.evict(need)
            ring.prepare(kind)
            frames.begin(kind, start, Fc)
            a = model.forward(x, t, text_kv, start, ring.attend)
            b = model.forward(x, t, text_kv, start, frames.attend)
            frames.end()
            worst = max(worst, rel_l2(a, b))
            if k < 4:
                x = x + (ts[k + 1] - t) / 1000.0 * b
    return worst


def selftest(args):
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="wan_reference_selftest_")
    wpath, tpath = os.path.join(tmp, "w.safetensors"), os.path.join(tmp, "t.safetensors")
    weights = random_weights(cfg, seed=1)
    save_file(weights, wpath)

    def quiet_check(w, t):
        lines = []
        ok, err, eul, probs = run_check(w, t, args.tol, "cpu", log=lines.append)
        shown = ([l for l in lines if "STREAM" in l][:3] + [l for l in lines if "over tol" in l][:3]
                 + [lines[-1]])
        for l in shown:
            print("    " + l)
        return ok

    results = []
    print("=== selftest 1: faithful trace (must PASS) ===")
    make_fake_trace(cfg, weights, tpath, seed=2)
    ok, _, _, _ = run_check(wpath, tpath, args.tol, "cpu")
    results.append(("faithful trace", True, ok))

    print("\n=== selftest 2: one weight tensor perturbed by 1% (blocks.1.self_attn.k.weight) (must FAIL) ===")
    bad = dict(weights)
    w = bad["blocks.1.self_attn.k.weight"]
    bad["blocks.1.self_attn.k.weight"] = w + 0.01 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    p2 = os.path.join(tmp, "w_perturbed.safetensors")
    save_file(bad, p2)
    results.append(("perturbed weight", False, quiet_check(p2, tpath)))

    print("\n=== selftest 3: head output rows permuted to (c, kh, kw) order (must FAIL) ===")
    C = cfg.latent_channels
    perm = torch.tensor([(kh * 2 + kw) * C + c for c in range(C) for kh in range(2) for kw in range(2)])
    bad = dict(weights)
    bad["head.head.weight"] = weights["head.head.weight"][perm].contiguous()
    bad["head.head.bias"] = weights["head.head.bias"][perm].contiguous()
    p3 = os.path.join(tmp, "w_headperm.safetensors")
    save_file(bad, p3)
    results.append(("head layout permuted", False, quiet_check(p3, tpath)))

    for i, (fault, what) in enumerate((("rope", "trace generated with RoPE frames from 0 in every chunk"),
                                       ("layout", "trace tokens in Wan's (kh, kw, c) feature order"),
                                       ("evict", "trace metadata claims one eviction too many"),
                                       ("norecompute", "trace generated without the recompute's K/V replacement")),
                                      start=4):
        print(f"\n=== selftest {i}: {what} (must FAIL) ===")
        p = os.path.join(tmp, f"t_{fault}.safetensors")
        make_fake_trace(cfg, weights, p, seed=2, fault=fault)
        results.append((what, False, quiet_check(wpath, p)))

    # window 5 with 3-frame chunks: evictions of 1 then 3, chunks straddle the ring's end
    for n, win in ((8, 6), (9, 5)):
        c2 = dataclasses.replace(cfg, window_frames=win)
        print(f"\n=== selftest {n}: bench's ring KV cache vs check's frame list, float64, 8 chunks, "
              f"sink 3 + window {win} (must agree) ===")
        err = ring_vs_list(c2, weights, chunks=8)
        print(f"    max rel L2 between the two cache implementations over 40 calls: {err:.3e}")
        results.append((f"ring KV == frame list, window {win}", True, err <= args.tol))

    print("\n=== selftest summary ===")
    all_ok = True
    for what, want, got in results:
        good = want == got
        all_ok &= good
        print(f"  {'ok ' if good else 'BAD'}  {what}: expected {'PASS' if want else 'FAIL'}, got {'PASS' if got else 'FAIL'}")
    print(f"selftest {'passed' if all_ok else 'FAILED'} (files in {tmp})")
    return 0 if all_ok else 1


# ----------------------------------------------------------------------------------------------
# bench: bf16 deployment with a preallocated ring KV cache
# ----------------------------------------------------------------------------------------------

class RingKV:
    """Per-layer K/V buffers [(capacity + frames_per_chunk) * tokens_per_frame, H, d] bf16.

    Frame slots 0..S-1 hold the epoch's sinks; slots S..S+W-1 are a ring for the window (evict =
    advance the head, no copy). One extra chunk of slots past the capacity is scratch: the
    denoise calls of a chunk attend over [cache + their own tokens], and when the cache is full
    the own K/V go there, so SDPA always reads ONE contiguous prefix instead of a torch.cat of
    the whole cache per layer per call. The invariant that makes the prefix work: occupied slots
    are always 0..n-1 (before the first eviction the ring has not wrapped; from the first
    eviction on, every clean pass leaves the cache exactly full)."""

    def __init__(self, cfg, device, dtype, sdpa):
        self.cfg, self.tpf, F_, self.sdpa = cfg, cfg.tokens_per_frame, cfg.frames_per_chunk, sdpa
        n_tok = (cfg.capacity + F_) * self.tpf
        self.k = [torch.empty(n_tok, cfg.heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.device, self._idx = device, {}
        self.reset()

    def reset(self):
        self.sinks, self.head, self.wlen = 0, 0, 0

    @property
    def n(self):
        return self.sinks + self.wlen

    def evict(self, count):
        assert count <= self.wlen, "evicting more than the window holds"
        self.head = (self.head + count) % self.cfg.window_frames
        self.wlen -= count

    def _append_slot(self):
        S, W = self.cfg.sink_frames, self.cfg.window_frames
        if self.sinks < S:
            self.sinks += 1
            return self.sinks - 1
        assert self.wlen < W, "append without room: evict first"
        self.wlen += 1
        return S + (self.head + self.wlen - 1) % W

    def prepare(self, kind):
        F_, S, W = self.cfg.frames_per_chunk, self.cfg.sink_frames, self.cfg.window_frames
        if kind == "denoise":
            slots = list(range(self.n, self.n + F_))    # free slots, or the scratch when full
            attend = self.n + F_
        elif kind == "clean":
            slots = [self._append_slot() for _ in range(F_)]
            attend = self.n
        else:
            raise ValueError(kind)
        occupied = set(range(self.sinks)) | {S + (self.head + i) % W for i in range(self.wlen)}
        assert occupied == set(range(self.n)), "occupied slots are not a prefix"
        key = tuple(slots)
        if key not in self._idx:  # token indices of the slots, kept on the device
            self._idx[key] = torch.cat([torch.arange(s * self.tpf, (s + 1) * self.tpf) for s in slots]).to(self.device)
        self.idx, self.n_tok = self._idx[key], attend * self.tpf

    def attend(self, layer, q, k, v):
        self.k[layer].index_copy_(0, self.idx, k)
        self.v[layer].index_copy_(0, self.idx, v)
        return self.sdpa(q, self.k[layer][:self.n_tok], self.v[layer][:self.n_tok])


class Timer:
    """CUDA events on a GPU (no sync inside the stream), perf_counter on the CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def bench_stream(model, cache, text_kv, chunks, timer, seed):
    """One stream from an empty cache: per chunk 4 denoise calls (t = 1000, 750, 500, 250, Euler
    steps between) and a clean pass at t = 0 that writes the cache. Returns per-chunk records."""
    cfg = model.cfg
    Fc = cfg.frames_per_chunk
    shape = (cfg.latent_channels, Fc, 2 * cfg.grid_h, 2 * cfg.grid_w)
    g = torch.Generator(device=model.device).manual_seed(seed)
    cache.reset()
    recs = []
    ts = [1000.0, 750.0, 500.0, 250.0]
    for c in range(chunks):
        fill, start = cache.n, c * Fc
        marks = [timer.mark()]
        x = torch.randn(shape, generator=g, device=model.device, dtype=torch.float32)
        for k, t in enumerate(ts):
            cache.prepare("denoise")
            s = timer.mark()
            out = model.forward(x, t, text_kv, start, cache.attend)
            marks.append((s, timer.mark()))
            x = x + ((ts[k + 1] if k + 1 < len(ts) else 0.0) - t) / 1000.0 * out
        cache.evict(max(0, cache.n + Fc - cfg.capacity))
        cache.prepare("clean")
        s = timer.mark()
        model.forward(x, 0.0, text_kv, start, cache.attend)
        marks.append((s, timer.mark()))
        marks.append(timer.mark())
        recs.append((fill, marks))
    timer.sync()
    out = []
    for fill, marks in recs:
        calls = [timer.ms(a, b) for a, b in marks[1:-1]]
        out.append({"fill": fill, "chunk_ms": timer.ms(marks[0], marks[-1]),
                    "denoise_ms": calls[:-1], "clean_ms": calls[-1]})
    return out


def bench(args):
    cfg = dataclasses.replace(PRESETS[args.preset])
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    n_params = sum(math.prod(s) for s in param_shapes(cfg).values())
    kv_gib = 2 * cfg.layers * (cfg.capacity + cfg.frames_per_chunk) * cfg.tokens_per_frame * cfg.dim * 2 / 2 ** 30
    print(f"bench {cfg.name}: {cfg.layers} layers, dim {cfg.dim}, {n_params / 1e9:.2f} B params "
          f"({n_params * 2 / 2 ** 30:.1f} GiB bf16), KV cache {kv_gib:.1f} GiB, on {card}, torch {torch.__version__}")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        weights = random_weights(cfg, args.seed, dtype=torch.bfloat16, device=dev)
        model = WanDiT(cfg, weights, torch.bfloat16, torch.float32, dev)
        del weights
        text = torch.randn(cfg.text_tokens, cfg.text_dim, device=dev, dtype=torch.bfloat16,
                           generator=torch.Generator(device=dev).manual_seed(args.seed + 1))
        text_kv = model.text_context(text)   # once per prompt, outside the timings
        cache = RingKV(cfg, dev, torch.bfloat16, model._sdpa)
        mode = "eager"
        if args.compile:
            # Regional compilation (what torch's docs and diffusers recommend for repeated
            # blocks): the two halves of the block around the cache's SDPA are compiled once and
            # reused by every layer (weights come in as a dict argument). Static shapes: the
            # query side never changes shape, so no recompiles over cache fill; the KV write +
            # self-attention SDPA stay eager (inductor would call the same SDPA kernel).
            model.block_pre = torch.compile(model.block_pre, mode=args.compile_mode, fullgraph=True, dynamic=False)
            model.block_post = torch.compile(model.block_post, mode=args.compile_mode, fullgraph=True, dynamic=False)
            mode = f"torch.compile(mode={args.compile_mode!r}, regional: block halves; self-attn SDPA + KV write eager)"
        timer = Timer(cuda)
        # Warm-up: one whole stream visits every shape (every cache fill) and pays all compiles.
        t0 = time.perf_counter()
        bench_stream(model, cache, text_kv, args.chunks, timer, args.seed)
        warm_s = time.perf_counter() - t0
        runs = [bench_stream(model, cache, text_kv, args.chunks, timer, args.seed + 1 + r) for r in range(args.repeats)]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    by_fill = {}
    for run in runs:
        for rec in run:
            d = by_fill.setdefault(rec["fill"], {"chunk": [], "denoise": [], "clean": []})
            d["chunk"].append(rec["chunk_ms"])
            d["denoise"].extend(rec["denoise_ms"])
            d["clean"].append(rec["clean_ms"])
    print(f"mode: {mode}; warm-up stream {warm_s:.1f} s (compiles included); {args.repeats} timed streams of "
          f"{args.chunks} chunks; {'CUDA events' if cuda else 'perf_counter (CPU: timings not meaningful)'}"
          + (f"; peak {peak:.1f} GiB" if cuda else ""))
    print(f"{'cache fill (frames)':>20} {'n chunks':>9} {'chunk ms':>10} {'denoise ms':>11} {'clean ms':>9}")
    med = {}
    for fill in sorted(by_fill):
        d = by_fill[fill]
        med[fill] = {k: statistics.median(v) for k, v in d.items()}
        print(f"{fill:>20} {len(d['chunk']):>9} {med[fill]['chunk']:>10.2f} {med[fill]['denoise']:>11.2f} {med[fill]['clean']:>9.2f}")
    if args.json:
        res = {"baseline": "benches/baselines/wan_reference.py bench", "card": card, "device": dev,
               "torch": torch.__version__, "mode": mode, "compile": bool(args.compile),
               "compile_mode": args.compile_mode if args.compile else None,
               "precision": "bf16 weights/KV/attention, fp32 residual, norms, modulation, RoPE",
               "attention": "torch.nn.functional.scaled_dot_product_attention (default backend choice)",
               "preset": args.preset, "config": dataclasses.asdict(cfg), "params": n_params,
               "chunks": args.chunks, "repeats": args.repeats, "warmup_s": warm_s,
               "timer": "cuda events" if cuda else "perf_counter",
               "peak_gib": peak if cuda else None,
               "median_ms_by_fill": {str(f): m for f, m in med.items()},
               "ms_by_fill": {str(f): d for f, d in by_fill.items()}}
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="recompute a lockstep stream trace")
    c.add_argument("--weights", required=True)
    c.add_argument("--trace", required=True)
    c.add_argument("--tol", type=float, default=1e-5)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b = sub.add_parser("bench", help="time the model as a PyTorch deployment")
    b.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    b.add_argument("--layers", type=int, help="override the preset's layer count")
    b.add_argument("--device", help="cuda (default when available) or cpu")
    b.add_argument("--compile", action="store_true")
    b.add_argument("--compile-mode", default="default",
                   help="torch.compile mode (default | max-autotune-no-cudagraphs | ...)")
    b.add_argument("--chunks", type=int, default=10)
    b.add_argument("--repeats", type=int, default=3, help="timed streams after the warm-up stream")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json")
    s = sub.add_parser("selftest", help="fake trace: must pass; broken variants: must fail")
    s.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    if a.cmd in ("check", "selftest") and safe_open is None:
        raise SystemExit("needs the safetensors package")
    if a.cmd == "check":
        ok = run_check(a.weights, a.trace, a.tol, a.device)[0]
        return 0 if ok else 1
    if a.cmd == "bench":
        return bench(a)
    return selftest(a)


if __name__ == "__main__":
    sys.exit(main())
