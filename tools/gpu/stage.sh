#!/usr/bin/env bash
# Run HERE (the dev machine; GPU hosts have no Rust): builds the release lockstep binary and test
# binaries and stages them, stripped, with a run script and the PyTorch baselines, into one
# git-ignored folder of this checkout that the device tool's `carry` can name.
#
# Usage: tools/gpu/stage.sh [--dir NAME] [--script FILE] [test-target ...]
#   --dir NAME     stage folder under the checkout (default .gpu-stage; must match /.gpu-stage*/)
#   --script FILE  the run script copied in as NAME/run.sh (default tools/gpu/run-all.sh)
#   test-target    integration test targets to stage (default: every one)
# Then, on the device: command `bash NAME/run.sh`, carry ["NAME"].
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=.gpu-stage
script=tools/gpu/run-all.sh
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) stage="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    *) targets+=(--test "$1"); shift ;;
  esac
done
case "$stage" in .gpu-stage*) ;; *) echo "stage.sh: --dir must start with .gpu-stage (git-ignored)" >&2; exit 2 ;; esac
[ ${#targets[@]} -eq 0 ] && targets=(--tests)
if [ ! -x .toolchain/nvidia/cu13/bin/nvcc ] && ! command -v nvcc >/dev/null && [ -z "${NVCC:-}" ]; then
  echo "stage.sh: warning: no nvcc, the binaries carry no kernels (run tools/install-cuda-toolchain.sh)" >&2
fi
rm -rf "$stage"; mkdir -p "$stage/tests"
cargo build --release --bin lockstep
cp target/release/lockstep "$stage/lockstep"
cargo test --release --no-run --message-format=json "${targets[@]}" 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
for t in "${targets[@]}"; do
  [ "$t" = --test ] || [ "$t" = --tests ] || [ -x "$stage/tests/$t" ] || { echo "stage.sh: test binary $t missing" >&2; exit 1; }
done
strip "$stage/lockstep" "$stage"/tests/* 2>/dev/null || true
cp "$script" "$stage/run.sh"; cp tools/gpu/round-lib.sh "$stage/round-lib.sh"
[ -d benches/baselines ] && cp -r benches/baselines "$stage/baselines"
du -sh "$stage"; ls "$stage/tests"
