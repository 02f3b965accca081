#!/usr/bin/env bash
# Run HERE: builds the release lockstep binary and the gpu_kernels test binary, and stages them
# (stripped) with tools/gpu/attention-round.sh and the PyTorch baselines into DEST (default
# /work/main/.gpu-stage-kernels2, which the device tool's `carry` names).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest="${1:-/work/main/.gpu-stage-kernels2}"
rm -rf "$dest"; mkdir -p "$dest/tests"
cargo build --release --bin lockstep
cp target/release/lockstep "$dest/lockstep"
cargo test --release --no-run --message-format=json --test gpu_kernels 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$dest/tests/$name"; done
strip "$dest/lockstep" "$dest"/tests/* 2>/dev/null || true
cp tools/gpu/attention-round.sh "$dest/round.sh"
cp tools/gpu/attention-repeat.sh "$dest/repeat.sh"
cp -r benches/baselines "$dest/baselines"
du -sh "$dest"; ls "$dest" "$dest/tests"
