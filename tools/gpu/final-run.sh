#!/usr/bin/env bash
# Run THERE (a 2-GPU host, from the repository root), everything with LOCKSTEP_BACKEND=nccl and
# NCCL_NVLS_ENABLE=0 (3 ranks on 2 GPUs: rank 0 → GPU 0, mesh → GPU 1 and GPU 0):
#   env + doctor, `lockstep run --backend nccl` (16 chunks, summary + metrics), the pipeline
#   break-it tests, the pipeline run tests, the protocol break-it tests, gpu_smoke,
#   gpu_nccl_smoke, the envelope harness (host-tensor and device-resident Rank vs raw) with the
#   torch.distributed baseline, then a leftover-process check. Each step is bounded by what is left of a
#   400 s budget (pass timeout_s 420 to the device call; its limit is 600 s). Logs under $OUT (8 files).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export LOCKSTEP_REQUIRE_GPU=1 LOCKSTEP_BACKEND=nccl NCCL_NVLS_ENABLE=0 LOCKSTEP_BIN="$S/lockstep" \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s); BUDGET=400
# left CAP: seconds for the next step, at most CAP and what the budget still holds (≥ 1).
left() { local l=$(( BUDGET - ($(date +%s) - t0) )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
step() { echo "=== $1 (after $(( $(date +%s) - t0 )) s)"; }
sum() { grep -E "^test |SKIP|test result|panicked|FAILED" "$1" | cut -c1-300; }

step "env + doctor"
{ date; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  timeout 20 "$S/lockstep" doctor; echo "doctor rc=$?"; } > "$OUT/env.log" 2>&1
grep -E "NVIDIA|H100|H200|nccl|NCCL|rc=" "$OUT/env.log" | head -8

step "lockstep run --backend nccl --chunks 16"
timeout "$(left 45)" "$S/lockstep" run --backend nccl --chunks 16 --quiet --timeout 10 \
  --metrics /tmp/lockstep-final-metrics.json > "$OUT/run.log" 2>&1
echo "run rc=$?" | tee -a "$OUT/run.log"
cat /tmp/lockstep-final-metrics.json >> "$OUT/run.log" 2>/dev/null
grep -vE '^\s*([][{}",]|[0-9])' "$OUT/run.log" | head -30

step "pipeline break-it (D1-D3, E3, F1-F3, G2 on nccl)"
timeout "$(left 70)" "$S/tests/breakit_pipeline" --test-threads=1 --nocapture > "$OUT/breakit-pipeline.log" 2>&1
echo "breakit_pipeline rc=$?"; sum "$OUT/breakit-pipeline.log"

step "pipeline run tests"
timeout "$(left 50)" "$S/tests/pipeline_run" --test-threads=1 --nocapture > "$OUT/pipeline-run.log" 2>&1
echo "pipeline_run rc=$?"; sum "$OUT/pipeline-run.log"; grep -E "envelopes received while" "$OUT/pipeline-run.log"

step "protocol break-it"
timeout "$(left 80)" "$S/tests/breakit_protocol" --test-threads=1 --nocapture > "$OUT/breakit-protocol.log" 2>&1
echo "breakit_protocol rc=$?"; sum "$OUT/breakit-protocol.log"

step "envelope: Rank host tensors / Rank device-resident / raw / staging, then torch (same command)"
{ timeout "$(left 40)" "$S/lockstep" launch -n 2 -- "$S/lockstep" harness envelope --iters 300
  echo "envelope rc=$?"
  for lane in shm tcp; do  # the protocol's own cost on this host's CPUs (null data plane)
    LOCKSTEP_LANE=$lane timeout "$(left 30)" "$S/lockstep" launch -n 2 -- "$S/lockstep" harness protocol --iters 30000
    echo "protocol lane=$lane rc=$?"; done
  PY=""; for c in python3 python; do
    if "$c" -c 'import torch' 2>/dev/null; then PY=$c; break; fi; done
  if [ -n "$PY" ]; then timeout "$(left 60)" "$PY" "$S/baselines/transport_torch.py" --scale 0.3; echo "torch rc=$?"
  else echo "torch: not importable here; no baseline"; fi
} > "$OUT/envelope.log" 2>&1
grep -E "RESULT|rc=|^env|env-" "$OUT/envelope.log" | cut -c1-220

step "gpu_smoke + gpu_nccl_smoke"
{ echo "--- gpu_smoke"; timeout "$(left 20)" "$S/tests/gpu_smoke" --test-threads=1 --nocapture; echo "gpu_smoke rc=$?"
  echo "--- gpu_nccl_smoke"; timeout "$(left 60)" "$S/tests/gpu_nccl_smoke" --test-threads=1 --nocapture; echo "gpu_nccl_smoke rc=$?"
} > "$OUT/gpu-smoke.log" 2>&1
sum "$OUT/gpu-smoke.log"; grep -E "rc=" "$OUT/gpu-smoke.log"

step "leftovers (expect none)"
{ nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1
  echo "lockstep processes alive: $(pgrep -c -x lockstep || true)"
  ps -eo pid,etimes,comm | grep -E "lockstep|breakit|pipeline_run|gpu_" | grep -v grep || true
} > "$OUT/leftovers.log" 2>&1
cat "$OUT/leftovers.log"
echo "total $(( $(date +%s) - t0 )) s"
