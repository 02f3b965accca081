#!/usr/bin/env bash
# Second device call: the break-it suite on NCCL after the close/abort fix (non-blocking, the
# default), C1/C4/C5 again with blocking communicators, then the GPU leftover check.
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"; OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 LOCKSTEP_BIN="$S/lockstep" LOCKSTEP_BACKEND=nccl
t0=$(date +%s)
nvidia-smi --query-gpu=index,name --format=csv,noheader
timeout 100 "$S/tests/breakit_protocol" --test-threads=1 --nocapture > "$OUT/breakit-nccl.log" 2>&1
echo "suite (non-blocking) rc=$? after $(( $(date +%s) - t0 )) s"
grep -E "^test |^C1|^C2|^B1|test result|panicked" "$OUT/breakit-nccl.log" | cut -c1-300
for f in c1_ c4_ c5_; do
  LOCKSTEP_NCCL_BLOCKING=1 timeout 30 "$S/tests/breakit_protocol" --test-threads=1 --nocapture $f > "$OUT/breakit-nccl-blocking-$f.log" 2>&1
  echo "blocking $f rc=$?"; grep -E "^C1|test result|panicked" "$OUT/breakit-nccl-blocking-$f.log" | cut -c1-300
done
echo "=== GPU compute apps after (expect none)"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1 | tee "$OUT/leftovers.log"
echo "lockstep processes alive: $(pgrep -c -x lockstep || true); total $(( $(date +%s) - t0 )) s"
