#!/usr/bin/env bash
# GPU host (H200: the 14B model's bf16 weights and KV ring need ~60 GB of GPU memory and its f32
# seeded shard ~56 GB of host memory): `lockstep bench model --preset wan-14b` against the PyTorch
# implementation (eager) in the same call on the same card. Staged by tools/gpu/stage.sh --dir
# .gpu-stage-14b --script tools/gpu/wan14b-round.sh gpu_model. Logs: $OUT/wan14b-round.tgz.
set -uo pipefail
ARCHIVE=wan14b-round.tgz
# shellcheck source=tools/gpu/round-lib.sh
source "$(dirname "$0")/round-lib.sh"
P=wan-14b; C=${CHUNKS:-4}
free -g | head -2
step bench model $P
/usr/bin/time -v timeout 300 "$S/lockstep" bench model --preset $P --chunks $C --json "$L/ours-$P.json" > "$L/ours-$P.log" 2> "$L/ours-$P.time"; echo "exit $?" >> "$L/ours-$P.log"; cat "$L/ours-$P.log"; grep -E "Maximum resident|Elapsed" "$L/ours-$P.time"
step torch eager $P
timeout 240 python3 "$S/baselines/wan_reference.py" bench --preset $P --device cuda --chunks $C --json "$L/torch-eager-$P.json" > "$L/torch-eager-$P.log" 2>&1; echo "exit $?" >> "$L/torch-eager-$P.log"; tail -12 "$L/torch-eager-$P.log"
step done
