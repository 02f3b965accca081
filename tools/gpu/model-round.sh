#!/usr/bin/env bash
# GPU host: one round for the GPU model — the cuBLASLt GEMM tests, the GPU DiT against the CPU
# reference, and (when staged) the PyTorch reference check/bench. Staged by
#   tools/gpu/stage.sh --dir .gpu-stage-model --script tools/gpu/model-round.sh gpu_kernels gpu_gemm gpu_model
#   cp tools/gpu/model-bench-round.sh .gpu-stage-model/bench.sh   (optional: the benchmark too)
# Logs into $OUT (or ./out). A skipped GPU test fails here (LOCKSTEP_REQUIRE_GPU=1).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$O/gpu.txt"
if ! ldconfig -p | grep -q 'libcublasLt.so'; then
  d=$(dirname "$(find / -name 'libcublasLt.so*' -not -path '/proc/*' 2>/dev/null | head -1)")
  echo "libcublasLt not in ldconfig; using $d"; export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 MATMUL_NUM_THREADS="$(nproc)"
rc=0
for t in gpu_kernels gpu_gemm gpu_model; do
  [ -x "$S/tests/$t" ] || continue
  f=""; [ "$t" = gpu_kernels ] && f="${KERNELS_FILTER:-}"; [ "$t" = gpu_model ] && f="${MODEL_FILTER:-}"
  echo "=== $t $f"
  timeout "${T_LIMIT:-300}" "$S/tests/$t" --test-threads=1 --nocapture $f 2>&1 | tee "$O/$t.log" | grep -vE "^  \[" | tail -60
  r=${PIPESTATUS[0]}; echo "=== $t exit $r"; [ "$r" = 0 ] || rc=1
done
# The model benchmark round (ours + PyTorch, same card) when staged beside.
[ -x "$S/lockstep" ] && [ -f "$S/bench.sh" ] && { bash "$S/bench.sh" || rc=1; }
exit $rc
