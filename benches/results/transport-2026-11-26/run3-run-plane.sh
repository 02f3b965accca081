#!/usr/bin/env bash
# Step-4 verification (not yet run): the protocol over the NCCL data plane (3 ranks on 2 GPUs,
# rank 0 + TP=1), the raw smoke/fault tests again, and a short bench (CapturedOps graph path).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LOCKSTEP_BIN="$S/lockstep"
nvidia-smi --query-gpu=index,name --format=csv
timeout 200 "$S/tests/gpu_nccl_plane" --test-threads=1 --nocapture > "$OUT/plane.log" 2>&1; echo "plane rc=$?"
grep -E "^test |PLANE|ranks done|panicked|child failed|test result" "$OUT/plane.log" | cut -c1-300
timeout 150 "$S/tests/gpu_nccl_smoke" --test-threads=1 --nocapture > "$OUT/smoke.log" 2>&1; echo "smoke rc=$?"
grep -E "test result" "$OUT/smoke.log"
timeout 120 "$S/lockstep" bench transport --scale 0.3 > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
grep -E "graph|gated" "$OUT/bench.log" | grep -E " 64 |5423168" | cut -c1-110
