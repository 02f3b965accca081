#!/usr/bin/env bash
# Run THERE (the GPU host, from the repository root): every staged test binary, then doctor,
# logs under $OUT (or ./out). Usage: bash .gpu-stage/run.sh [test-name-filter]
# A test that would skip fails here (LOCKSTEP_REQUIRE_GPU=1): run it on a host with 2 GPUs.
set -uo pipefail
stage="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD/out}"; mkdir -p "$out"
export LOCKSTEP_REQUIRE_GPU=1 LOCKSTEP_BIN="$stage/lockstep" NCCL_NVLS_ENABLE=0 LOCKSTEP_NCCL_PATH="${LOCKSTEP_NCCL_PATH:-}"
# PyTorch is on the GPU hosts: tests/torchrun runs its real-torchrun cases against it.
if command -v torchrun >/dev/null; then export LOCKSTEP_TORCHRUN="$(command -v torchrun)"; fi
filter="${1:-}"
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; "$stage/lockstep" doctor; } 2>&1 | tee "$out/doctor.log"
rc=0
for t in "$stage"/tests/*; do
  name=$(basename "$t")
  echo "=== $name" | tee -a "$out/tests.log"
  timeout 300 "$t" --test-threads=1 --nocapture $filter >>"$out/tests.log" 2>&1 || { echo "FAILED $name" | tee -a "$out/tests.log"; rc=1; }
done
grep -E "^test |SKIP|FAILED|test result" "$out/tests.log" | tail -n 80
exit $rc
