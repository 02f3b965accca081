#!/usr/bin/env bash
# Run HERE (the dev machine): stages the final NCCL device run into ROOT/.gpu-stage-final/
# (git-ignored by /.gpu-stage*/): the lockstep binary, the test binaries it runs (pipeline and
# protocol break-it suites, pipeline_run, gpu_smoke, gpu_nccl_smoke), stripped, and final-run.sh.
# Usage: tools/gpu/stage-final.sh [ROOT]   (ROOT: the checkout to build and stage in; default:
#        the checkout holding this script — the device tool copies /work/main, so run it there).
# Then, with the device tool: command `bash .gpu-stage-final/final-run.sh`,
# carry [".gpu-stage-final"], kind nvidia-h100-x2 (2 GPUs; whole command ≤ 240 s).
set -euo pipefail
ROOT="$(cd "${1:-$(dirname "$0")/../..}" && pwd)"
cd "$ROOT"
stage="$ROOT/.gpu-stage-final"
if [ ! -x .toolchain/nvidia/cu13/bin/nvcc ] && ! command -v nvcc >/dev/null && [ -z "${NVCC:-}" ]; then
  echo "warning: no nvcc: gpu_smoke will SKIP (built without kernels); run tools/install-cuda-toolchain.sh" >&2
fi
rm -rf "$stage"; mkdir -p "$stage/tests"
cargo build --release --bin lockstep
cp target/release/lockstep "$stage/lockstep"
cargo test --release --no-run --message-format=json \
  --test breakit_pipeline --test pipeline_run --test breakit_protocol \
  --test gpu_smoke --test gpu_nccl_smoke 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
for t in breakit_pipeline pipeline_run breakit_protocol gpu_smoke gpu_nccl_smoke; do
  [ -x "$stage/tests/$t" ] || { echo "stage-final: test binary $t missing" >&2; exit 1; }
done
strip "$stage/lockstep" "$stage"/tests/* 2>/dev/null || true
cp tools/gpu/final-run.sh "$stage/final-run.sh"
du -sh "$stage"; ls -la "$stage" "$stage/tests"
