#!/usr/bin/env bash
# Run HERE (from the nccl4 worktree): stages lockstep + the breakit_protocol test binary +
# nccl4-run.sh + the torch baseline into $STAGE (default /work/main/.gpu-stage-nccl4, git-ignored
# there; the device tool copies /work/main). Then: command `bash .gpu-stage-nccl4/nccl4-run.sh`,
# carry [".gpu-stage-nccl4"], kind nvidia-h100-x2.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${STAGE:-/work/main/.gpu-stage-nccl4}
rm -rf "$stage"; mkdir -p "$stage/tests"
cargo build --release --bin lockstep
cp target/release/lockstep "$stage/lockstep"
cargo test --release --no-run --message-format=json --test breakit_protocol 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
strip "$stage"/lockstep "$stage"/tests/* 2>/dev/null || true
cp tools/gpu/nccl4-run.sh benches/baselines/transport_torch.py "$stage/"
du -sh "$stage"; ls -la "$stage" "$stage/tests"
