#!/usr/bin/env bash
# Run THERE (2-GPU host, from the repository root): the break-it suite with LOCKSTEP_BACKEND=nccl
# (3 ranks on 2 GPUs), a GPU-leftover check, the envelope overhead bench (through `Rank` vs raw
# ops on the same communicator; non-blocking and blocking communicators; grouped and per-tensor
# receive) and the torch.distributed baseline, all in one command. Logs under $OUT.
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  LOCKSTEP_BIN="$S/lockstep" PYTHONUNBUFFERED=1 TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
t0=$(date +%s)
{ date; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; "$S/lockstep" doctor; } > "$OUT/env.log" 2>&1
grep -E "NVIDIA|nccl|driver" "$OUT/env.log" | head -6
echo "=== break-it suite, LOCKSTEP_BACKEND=nccl"
LOCKSTEP_BACKEND=nccl timeout 170 "$S/tests/breakit_protocol" --test-threads=1 --nocapture > "$OUT/breakit-nccl.log" 2>&1
echo "breakit rc=$? after $(( $(date +%s) - t0 )) s"
grep -E "^test |SKIP|^C1|^C2|^B1|test result|panicked" "$OUT/breakit-nccl.log" | cut -c1-400
# B2, C2, G3 (and D–G) run the real pipeline: the same on NCCL.
LOCKSTEP_BACKEND=nccl timeout 120 "$S/tests/breakit_pipeline" --test-threads=1 --nocapture > "$OUT/breakit-pipeline-nccl.log" 2>&1
echo "breakit_pipeline rc=$? after $(( $(date +%s) - t0 )) s"
grep -E "^test |SKIP|test result|panicked" "$OUT/breakit-pipeline-nccl.log" | cut -c1-400
echo "=== GPU compute apps after the suite (expect none)"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1 | tee "$OUT/leftovers.log"
echo "lockstep processes alive: $(pgrep -c -x lockstep || true)"
echo "=== envelope: Rank vs raw, same communicator (rank 0 GPU 0, leader GPU 1)"
for v in "lockstep nccl 0" "lockstep nccl 1" "lockstep-ungrouped nccl 0" "lockstep-ungrouped nccl 1" "lockstep host 0"; do
  set -- $v
  [ -x "$S/$1" ] || continue
  log="$OUT/envelope-$1-$2-blocking$3.log"
  LOCKSTEP_BACKEND=$2 LOCKSTEP_NCCL_BLOCKING=$3 timeout 40 "$S/$1" launch -n 2 -- "$S/$1" harness envelope --iters 300 > "$log" 2>&1
  echo "$1 backend=$2 blocking=$3 rc=$?"
  grep RESULT "$log" | cut -c1-220
done
echo "=== torch.distributed baseline (same command), after $(( $(date +%s) - t0 )) s"
PY=python3
for c in python3 /opt/venv/bin/python3 /venv/bin/python3 /usr/local/bin/python3 $(ls -d /opt/*/bin/python3 /root/*/bin/python3 2>/dev/null); do
  if "$c" -c 'import torch' 2>/dev/null; then PY=$c; break; fi
done
echo "python: $PY"
timeout 100 "$PY" "$S/transport_torch.py" --scale 0.3 --json "$OUT/torch.json" > "$OUT/torch.log" 2>&1
echo "torch rc=$?"
grep -E "^env|^pingpong +torch +64 |^#" "$OUT/torch.log" | cut -c1-120
echo "total $(( $(date +%s) - t0 )) s"
