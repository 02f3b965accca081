#!/usr/bin/env bash
# Run THERE (GPU host, repository root): one device round for the attention kernels (task K2).
# Order puts the cheap, decisive steps first: attention tests with a short timeout (a pipeline
# deadlock in a new variant must not eat the round), then the kernel bench and the torch SDPA
# baselines in the same command, then compute-sanitizer on small shapes of the new variants.
# A variant whose tests fail or time out is left out of the bench.
# Staged HERE by tools/gpu/stage-attention.sh (carry the stage folder).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
export LOCKSTEP_REQUIRE_GPU=1 LOCKSTEP_BIN="$S/lockstep" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NEW="${NEW:-v3,v3pw,v3t}"      # variants under development
OLD="${OLD:-v1,v2}"       # always benched
T="$S/tests/gpu_kernels"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$O/doctor.log"
good="$OLD"
for v in ${NEW//,/ }; do
  LOCKSTEP_ATTN_VARIANTS=$v timeout 60 "$T" --test-threads=1 --nocapture attention_matches > "$O/t.log" 2>&1
  rc=$?
  { echo "== $v rc=$rc"; cat "$O/t.log"; } >> "$O/tests.log"
  grep -E "rel L2|panicked|test result" "$O/t.log" | tail -n 3
  if [[ $rc == 0 ]]; then good="$good,$v"; else echo "VARIANT $v FAILED rc=$rc (left out of the bench)"; fi
done
good="${good#,}"
timeout 60 "$T" --test-threads=1 --nocapture ring_wraparound 2>&1 | grep -E "over the ring|panicked|test result" | tee "$O/ring.log"
timeout 200 "$S/lockstep" bench kernels --json "$O/bench.json" --variants "$good" > "$O/bench.log" 2>&1
timeout 150 python3 "$S/baselines/attention_torch.py" --json "$O/torch.json" > "$O/torch.log" 2>&1
rm -f "$O/doctor.log" "$O/ring.log" "$O/t.log"  # the device returns at most 8 files
grep -E "attention|copy" "$O/bench.log" | grep -v "^$"; grep -E "sdpa|copy" "$O/torch.log"
for tool in memcheck racecheck; do
  LOCKSTEP_ATTN_VARIANTS="$NEW" timeout 60 "$CS" --tool $tool --error-exitcode 9 "$T" --test-threads=1 odd_shapes > "$O/san-$tool.log" 2>&1
  echo "sanitizer $tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test result' "$O/san-$tool.log" | tr '\n' ' ')"
done
