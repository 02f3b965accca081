#!/usr/bin/env bash
# Run THERE (GPU host, repository root), one device call = one round for the kernels: smoke and
# kernel tests, compute-sanitizer memcheck + racecheck on the small-shape tests, the kernel
# benchmark and the PyTorch baselines in the same command. Logs under $OUT.
# Staged HERE by tools/gpu/stage-kernels.sh into .gpu-stage-kernels/ (carry it).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
export LOCKSTEP_REQUIRE_GPU=1 LOCKSTEP_BIN="$S/lockstep" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
what="${1:-all}"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv; "$S/lockstep" doctor; } 2>&1 | tee "$O/doctor.log"
if [[ $what == all || $what == tests ]]; then
  timeout 60 "$S/tests/gpu_smoke" --test-threads=1 --nocapture 2>&1 | tee "$O/smoke.log" | grep -E "^test |loaded|SKIP|panicked|result"
  timeout 240 "$S/tests/gpu_kernels" --test-threads=1 --nocapture 2>&1 | tee "$O/kernels.log" | grep -E "^test |rel L2|attention Lq|SKIP|panicked|result|seed"
fi
if [[ $what == all || $what == sanitize ]]; then
  for tool in memcheck racecheck; do
    timeout 150 "$CS" --tool $tool --error-exitcode 9 "$S/tests/gpu_kernels" --test-threads=1 odd_shapes 2>&1 | tail -n 4 | tee -a "$O/sanitizer.log"
    timeout 100 "$CS" --tool $tool --error-exitcode 9 "$S/tests/gpu_kernels" --test-threads=1 ring_wraparound 2>&1 | tail -n 4 | tee -a "$O/sanitizer.log"
  done
fi
if [[ $what == all || $what == bench ]]; then
  timeout 200 "$S/lockstep" bench kernels --json "$O/bench.json" 2>&1 | tee "$O/bench.log"
  timeout 200 python3 "$S/baselines/attention_torch.py" --json "$O/torch.json" 2>&1 | tee "$O/torch.log"
fi
