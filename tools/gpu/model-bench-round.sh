#!/usr/bin/env bash
# GPU host: `lockstep bench model` (the GPU DiT, per call and per chunk as the cache fills, and
# its GEMM floor) and the PyTorch implementation of the same model (benches/baselines/
# wan_reference.py bench, eager and torch.compile) in one round, same card. Staged by
#   tools/gpu/stage-model-bench.sh   (→ .gpu-stage-bench/)
# Logs and JSON into $OUT (or ./out).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$O/gpu.txt"
if ! ldconfig -p | grep -q 'libcublasLt.so'; then
  d=$(dirname "$(find / -name 'libcublasLt.so*' -not -path '/proc/*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi
P=${PRESET:-wan-1.3b}; C=${CHUNKS:-8}
echo "=== lockstep bench model $P"
timeout 240 "$S/lockstep" bench model --preset "$P" --chunks "$C" --json "$O/ours-$P.json" 2>&1 | tee "$O/ours-$P.log"
echo "=== torch eager $P"
timeout 240 python3 "$S/baselines/wan_reference.py" bench --preset "$P" --device cuda --chunks "$C" --json "$O/torch-eager-$P.json" 2>&1 | tail -40 | tee "$O/torch-eager-$P.log"
if [ "${COMPILE:-1}" = 1 ]; then
  echo "=== torch compile $P"
  timeout "${COMPILE_LIMIT:-200}" python3 "$S/baselines/wan_reference.py" bench --preset "$P" --device cuda --compile --chunks "$C" --json "$O/torch-compile-$P.json" 2>&1 | tail -40 | tee "$O/torch-compile-$P.log"
fi
if [ "${RUN:-1}" = 1 ]; then
  echo "=== lockstep run --preset $P (rank 0 + TP=1 mesh on one GPU, host data plane)"
  timeout 240 "$S/lockstep" run --preset "$P" --tp 1 --chunks "${RUN_CHUNKS:-24}" --timeout 120 \
    --metrics "$O/run-$P.json" --trace "$O/run-$P.trace.json" --frames-out "$O/frames-$P" 2>&1 | tail -30 | tee "$O/run-$P.log"
  ls "$O/frames-$P" 2>/dev/null | head -3
fi
