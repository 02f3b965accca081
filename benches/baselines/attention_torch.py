#!/usr/bin/env python3
"""PyTorch baselines for `lockstep bench kernels`, run in the SAME device command on the same card.

- torch SDPA, flash backend (FA2) and cuDNN backend, bf16, the same [L, H, 128] token-major
  memory as our kernel (viewed as [1, H, L, 128] through strides), at heads 12 and 40, Lq 4680,
  Lk 4680 / 9360 / 18720 / 28080; TFLOP/s = 4 * Lq * Lk * H * D / time.
- KV append baseline: torch copy_ of K and V [4680, H, 128] into a cache slice, and a plain
  device-to-device copy of 512 MiB (bytes counted read + write).
Method: CUDA events per call, warm-up, median of N, input sets rotated past the 50 MB L2,
random (never zero) data. Prints one table and, with --json PATH, writes the numbers.
"""
import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, iters, warmup=3):
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)} (median of {a.iters}, CUDA events)")
    rows, out = [], []

    n = 256 << 20
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), a.iters)
    gbs = 2 * n * 2 / (ms * 1e-3) / 1e9
    rows.append(("torch d2d copy 512 MiB (read+write)", ms, f"{gbs:.0f} GB/s"))
    out.append({"bench": "d2d_copy", "ms": ms, "gbs": gbs})
    del src, dst

    lq, d = 4680, 128
    scale = 1.0 / d ** 0.5
    for heads in (12, 40):
        for lk in (4680, 9360, 18720, 28080):
            if a.quick and lk > 9360:
                continue
            set_bytes = 2 * (lq * heads * d * 2 + 2 * lk * heads * d)
            sets = max(1, min(4, -(-(256 << 20) // set_bytes)))
            # [L, H, D] memory, viewed as [1, H, L, D] (what our kernel reads).
            qs = [torch.randn(lq, heads, d, device=dev, dtype=torch.bfloat16).permute(1, 0, 2).unsqueeze(0) for _ in range(sets)]
            ks = [torch.randn(lk, heads, d, device=dev, dtype=torch.bfloat16).permute(1, 0, 2).unsqueeze(0) for _ in range(sets)]
            vs = [torch.randn(lk, heads, d, device=dev, dtype=torch.bfloat16).permute(1, 0, 2).unsqueeze(0) for _ in range(sets)]
            flops = 4.0 * lq * lk * heads * d
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        def run(i):
                            s = i % sets
                            torch.nn.functional.scaled_dot_product_attention(qs[s], ks[s], vs[s], scale=scale)
                        ms = median_ms(run, a.iters)
                    tf = flops / (ms * 1e-3) / 1e12
                    rows.append((f"sdpa {name} H={heads} Lq={lq} Lk={lk}", ms, f"{tf:.1f} TFLOP/s"))
                    out.append({"bench": "attention", "backend": name, "heads": heads, "lq": lq, "lk": lk, "ms": ms, "tflops": tf})
                except Exception as e:  # a backend that refuses the layout is reported, not hidden
                    rows.append((f"sdpa {name} H={heads} Lk={lk}", float("nan"), f"FAILED: {e}"))
            del qs, ks, vs
            torch.cuda.empty_cache()

    for heads in (12, 40):
        t = 4680
        k = torch.randn(t, heads, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(t, heads, d, device=dev, dtype=torch.bfloat16)
        cap = 1560 + 3 * 4680
        kc = torch.empty(cap, heads, d, device=dev, dtype=torch.bfloat16)
        vc = torch.empty_like(kc)

        def app(i):
            off = (i % 3) * t
            kc[off:off + t].copy_(k)
            vc[off:off + t].copy_(v)
        ms = median_ms(app, a.iters)
        b = 4 * t * heads * d * 2
        rows.append((f"torch copy_ K,V append {t}x{heads}x128", ms, f"{b / (ms * 1e-3) / 1e9:.0f} GB/s"))
        out.append({"bench": "kv_append_copy", "heads": heads, "ms": ms, "gbs": b / (ms * 1e-3) / 1e9})

    print(f"{'baseline':<48} {'ms':>10}  figure")
    for what, ms, fig in rows:
        print(f"{what:<48} {ms:>10.4f}  {fig}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
