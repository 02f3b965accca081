#!/usr/bin/env bash
# GPU host, the shortest whole round (for a nearly spent device budget), most important first:
# the one-GPU-layer NCCL check, `lockstep run --preset wan-1.3b` (E, fps), `lockstep bench model`
# (per-call floor ratio, same run), TP=2 on one GPU (staged and device path), the wrapping stream
# check, then `bench session` (the session's overhead per chunk, on this host's spare cores).
# No PyTorch baseline: only same-run ratios are claimed from it. Lives beside the staged
# binaries of tools/gpu/stage.sh --dir .gpu-stage-perf ... gpu_model gpu_one_layer gpu_kernels (copied in as
# quick.sh). Logs: $OUT/quick-round.tgz, refreshed after every step.
set -uo pipefail
ARCHIVE=quick-round.tgz
# shellcheck source=tools/gpu/round-lib.sh
source "$(dirname "$0")/round-lib.sh"
P=wan-1.3b; C=8
step one GPU layer
timeout 60 "$S/tests/gpu_one_layer" --test-threads=1 --nocapture > "$L/gpu_one_layer.log" 2>&1; echo "exit $?" >> "$L/gpu_one_layer.log"; tail -4 "$L/gpu_one_layer.log"
step lockstep run
LOCKSTEP_CUDA_GRAPHS=on timeout 60 "$S/lockstep" run --preset $P --tp 1 --chunks 16 --timeout 60 --metrics "$L/run-$P.json" --trace "$L/run-$P.trace.json" > "$L/run-$P.log" 2>&1; echo "exit $?" >> "$L/run-$P.log"; tail -22 "$L/run-$P.log"
step bench model
timeout 150 "$S/lockstep" bench model --preset $P --chunks $C --idle --json "$L/ours-$P.json" > "$L/ours-$P.log" 2>&1; echo "exit $?" >> "$L/ours-$P.log"; cat "$L/ours-$P.log"
step gpu_model TP=2 staged + device path
timeout 180 "$S/tests/gpu_model" --test-threads=1 --nocapture gpu_tp2 > "$L/gpu_model_tp2.log" 2>&1; echo "exit $?" >> "$L/gpu_model_tp2.log"
grep -E "worst|device path|kept-latent|test result|panicked|^exit" "$L/gpu_model_tp2.log"
step gpu_model wrapping stream
timeout 150 "$S/tests/gpu_model" --test-threads=1 --nocapture wrapping_stream > "$L/gpu_model.log" 2>&1; echo "exit $?" >> "$L/gpu_model.log"
grep -E "graphs captured|worst|differ|test result|panicked|^exit" "$L/gpu_model.log"
step latent Euler kernel, latent into a caller's device buffer
if [ -x "$S/tests/gpu_kernels" ]; then
  timeout 60 "$S/tests/gpu_kernels" --test-threads=1 --nocapture latent > "$L/gpu_kernels_latent.log" 2>&1; echo "exit $?" >> "$L/gpu_kernels_latent.log"; tail -4 "$L/gpu_kernels_latent.log"
fi
step bench session
timeout 150 "$S/lockstep" bench session --rounds 5 --chunks 2000 --json "$L/session.json" > "$L/session.log" 2>"$L/session.err"; echo "exit $?" >> "$L/session.log"; tail -8 "$L/session.log"
step done
