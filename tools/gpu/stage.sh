#!/usr/bin/env bash
# Run HERE (the dev machine): builds release test and bench binaries and stages them, stripped,
# with the lockstep binary, the run script and the baselines, into .gpu-stage/ (git-ignored).
# Then, with the device tool: run command `bash .gpu-stage/run-all.sh [FILTER]`, carry [".gpu-stage"].
# Usage: tools/gpu/stage.sh [test-target ...]   (default: every integration test target)
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=.gpu-stage
rm -rf "$stage"; mkdir -p "$stage/tests"
targets=()
for t in "$@"; do targets+=(--test "$t"); done
[ ${#targets[@]} -eq 0 ] && targets=(--tests)
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
strip "$stage/lockstep" "$stage"/tests/* 2>/dev/null || true
cp tools/gpu/run-all.sh "$stage/run-all.sh"
[ -d benches/baselines ] && cp -r benches/baselines "$stage/baselines"
du -sh "$stage"; ls "$stage/tests"
