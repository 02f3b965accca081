#!/usr/bin/env bash
# Run THERE (2-GPU host, repository root), one device command, ≤ 150 s: the protocol break-it C1
# test on NCCL (time-to-detect after the concurrent abort), the `envelope` harness through `Rank`
# (with the ClearToSend hop) vs raw vs staging, and the torch.distributed baseline. Logs in $OUT.
# Staged by: STAGE=/work/main/.gpu-stage-nccl4 tools/gpu/stage-nccl4.sh (from the worktree).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  LOCKSTEP_BIN="$S/lockstep" PYTHONUNBUFFERED=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
t0=$(date +%s)
{ date; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; "$S/lockstep" doctor; } > "$OUT/env.log" 2>&1
grep -E "NVIDIA|nccl|driver" "$OUT/env.log" | head -6
echo "=== C1 on NCCL (3 ranks on 2 GPUs), twice"
for i in 1 2; do
  LOCKSTEP_BACKEND=nccl timeout 40 "$S/tests/breakit_protocol" --test-threads=1 --nocapture --exact c1_driver_killed_worker_exits_with_peer_lost > "$OUT/c1-$i.log" 2>&1
  echo "c1 run $i rc=$?"; grep -E "^C1|test result|panicked" "$OUT/c1-$i.log" | cut -c1-300
done
nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>&1 | tee "$OUT/leftovers.log"
echo "lockstep processes alive: $(pgrep -c -x lockstep || true)"
echo "=== envelope harness (rank 0 GPU 0, leader GPU 1)"
for b in nccl host; do
  LOCKSTEP_BACKEND=$b LOCKSTEP_NCCL_BLOCKING=0 timeout 40 "$S/lockstep" launch -n 2 -- "$S/lockstep" harness envelope --iters 300 > "$OUT/envelope-$b.log" 2>&1
  echo "envelope backend=$b rc=$?"; grep RESULT "$OUT/envelope-$b.log" | cut -c1-300
done
echo "=== torch.distributed baseline (same command), after $(( $(date +%s) - t0 )) s"
PY=python3
for c in python3 /opt/venv/bin/python3 /venv/bin/python3 /usr/local/bin/python3; do
  if "$c" -c 'import torch' 2>/dev/null; then PY=$c; break; fi
done
timeout 60 "$PY" "$S/transport_torch.py" --scale 0.3 --json "$OUT/torch.json" > "$OUT/torch.log" 2>&1
echo "torch rc=$?"; grep -E "^env|env-|^#" "$OUT/torch.log" | cut -c1-160
echo "total $(( $(date +%s) - t0 )) s"
