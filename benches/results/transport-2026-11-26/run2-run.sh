#!/usr/bin/env bash
# NCCL helper's device run: smoke + fault tests; ours and torch, default NCCL env, then both with
# more p2p channels. Logs in $OUT.
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LOCKSTEP_BIN="$S/lockstep" PYTHONUNBUFFERED=1
PY=python3
{ date; nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; "$S/lockstep" doctor; } > "$OUT/env.log" 2>&1
head -12 "$OUT/env.log"
echo "=== smoke + fault tests"
timeout 150 "$S/tests/gpu_nccl_smoke" --test-threads=1 --nocapture > "$OUT/smoke.log" 2>&1; echo "smoke rc=$?"
grep -E "^test .*(ok|FAILED)$|waiter ended|children done|panicked|test result" "$OUT/smoke.log" | cut -c1-330
echo "=== ours (default env)"
timeout 150 "$S/lockstep" bench transport --json "$OUT/ours1.json" > "$OUT/bench1.log" 2>&1; echo "bench rc=$?"
grep -E "64 |5423168|268435456|#|rror" "$OUT/bench1.log" | cut -c1-110
echo "=== torch (default env)"
timeout 200 "$PY" "$S/baselines/transport_torch.py" --json "$OUT/torch1.json" > "$OUT/torch1.log" 2>&1; echo "torch rc=$?"
grep -E "^pingpong|^allreduce|^env|^#" "$OUT/torch1.log" | cut -c1-110
export NCCL_MIN_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32
echo "=== ours (NCCL_MIN_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32)"
timeout 150 "$S/lockstep" bench transport > "$OUT/bench2.log" 2>&1; echo "bench rc=$?"
grep -E "5423168|16777216|268435456" "$OUT/bench2.log" | grep -v event | cut -c1-110
echo "=== torch (same env)"
timeout 200 "$PY" "$S/baselines/transport_torch.py" > "$OUT/torch2.log" 2>&1; echo "torch rc=$?"
grep -E "5423168|16777216|268435456" "$OUT/torch2.log" | grep -v RESULT | cut -c1-110
