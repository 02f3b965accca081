#!/usr/bin/env bash
# Run THERE (GPU host): tests + sanitizer of $NEW on odd shapes, then the kernel bench REPEATED in
# rotated variant orders between two torch SDPA baselines, so run-to-run spread (clocks, order)
# is measured in the same command as the differences between variants.
# Staged HERE by tools/gpu/stage-attention.sh (copy this file into the stage as repeat.sh).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
export LOCKSTEP_REQUIRE_GPU=1 LOCKSTEP_BIN="$S/lockstep" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NEW="${NEW:-v3t}"
ORDERS="${ORDERS:-v3,v3t,v3pw v3pw,v3,v3t v3t,v3pw,v3}"
T="$S/tests/gpu_kernels"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
LOCKSTEP_ATTN_VARIANTS=$NEW timeout 60 "$T" --test-threads=1 --nocapture attention_matches > "$O/tests.log" 2>&1
echo "tests $NEW rc=$? $(grep -E 'test result' "$O/tests.log" | tr '\n' ' ')"
timeout 150 python3 "$S/baselines/attention_torch.py" --json "$O/torch1.json" > /tmp/torch1.log 2>&1
n=0
for order in $ORDERS; do
  n=$((n + 1))
  timeout 120 "$S/lockstep" bench kernels --json "$O/bench$n.json" --variants "$order" > "/tmp/bench$n.log" 2>&1
  echo "bench $n ($order) rc=$?"
done
timeout 150 python3 "$S/baselines/attention_torch.py" --json "$O/torch2.json" > /tmp/torch2.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv,noheader
for tool in memcheck racecheck; do
  LOCKSTEP_ATTN_VARIANTS="$NEW" timeout 60 "$CS" --tool $tool --error-exitcode 9 "$T" --test-threads=1 odd_shapes > "$O/san.log" 2>&1
  echo "sanitizer $tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test result' "$O/san.log" | tr '\n' ' ')"
done
# Short table last (the reply carries the end of the output); at most 8 files come back.
python3 - "$O" <<'PY'
import json, sys, glob, statistics
o = sys.argv[1]
ours, sd = {}, {}
for f in sorted(glob.glob(o + "/bench*.json")):
    for r in json.load(open(f)):
        if r.get("bench") == "attention":
            ours.setdefault((r["heads"], r["lk"], r["variant"].split("-")[0]), []).append(r["tflops"])
for f in sorted(glob.glob(o + "/torch*.json")):
    for r in json.load(open(f)):
        if r.get("bench") == "attention":
            sd.setdefault((r["heads"], r["lk"], r["backend"]), []).append(r["tflops"])
vs = sorted({k[2] for k in ours})
print("H Lk " + " ".join(f"{v}(min/med/max)" for v in vs) + " cudnn(2 runs) flash")
for h in (12, 40):
    for lk in (4680, 9360, 18720, 28080):
        c = sd.get((h, lk, "cudnn"), [float("nan")])
        cells = []
        for v in vs:
            x = ours.get((h, lk, v), [float("nan")])
            cells.append(f"{min(x):.0f}/{statistics.median(x):.0f}/{max(x):.0f}={statistics.median(x)/statistics.mean(c):.3f}x")
        print(h, lk, " ".join(cells), "/".join(f"{x:.0f}" for x in c), "/".join(f"{x:.0f}" for x in sd.get((h, lk, "flash"), [])))
PY
