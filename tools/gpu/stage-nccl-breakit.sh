#!/usr/bin/env bash
# Run HERE: stages the break-it suite on NCCL + the envelope overhead bench into
# /work/main/.gpu-stage-nccl2/ (git-ignored there; the device tool runs over /work/main).
# Stages the current lockstep binary and, on request, `lockstep-ungrouped` built from
# $UNGROUPED_REV's src/rank.rs (per-tensor receive waits), so both run in the same device command.
# That swap only works on a tree from before src/rank.rs became the src/rank/ folder; on a newer
# tree it is skipped (set UNGROUPED_REV on an old checkout to compare).
# Then, with the device tool: command `bash .gpu-stage-nccl2/nccl-breakit-run.sh`,
# carry [".gpu-stage-nccl2"], kind nvidia-h100-x2.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=${STAGE:-/work/main/.gpu-stage-nccl2}
UNGROUPED_REV=${UNGROUPED_REV-59283fb}
rm -rf "$stage"; mkdir -p "$stage/tests"
if [ -n "${UNGROUPED_REV}" ] && [ ! -d src/rank ] && git diff --quiet -- src/rank.rs; then
  git show "$UNGROUPED_REV:src/rank.rs" > src/rank.rs
  trap 'git checkout -- src/rank.rs' EXIT
  cargo build --release --bin lockstep
  cp target/release/lockstep "$stage/lockstep-ungrouped"
  git checkout -- src/rank.rs; trap - EXIT
fi
cargo build --release --bin lockstep
cp target/release/lockstep "$stage/lockstep"
cargo test --release --no-run --message-format=json --test breakit_protocol --test breakit_pipeline 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
strip "$stage"/lockstep* "$stage"/tests/* 2>/dev/null || true
cp tools/gpu/nccl-breakit-run.sh "$stage/"
cp benches/baselines/transport_torch.py "$stage/"
du -sh "$stage"; ls -la "$stage" "$stage/tests"
