#!/usr/bin/env bash
# GPU host, one short call: `lockstep bench model` against PyTorch (torch.compile, then eager)
# in the same call on the same card, the GPU model's stream check (with CUDA graphs), TP=2 on
# one GPU (staged and through the model's device path), the one-GPU-layer NCCL check, and
# `lockstep run --preset wan-1.3b` with graphs, then `bench session` (host plane, spare cores). Staged by tools/gpu/stage.sh --dir
# .gpu-stage-perf --script tools/gpu/perf-round.sh gpu_model gpu_one_layer gpu_kernels. Logs go into one archive,
# $OUT/perf-round.tgz, refreshed after every step (the device returns only a few files).
set -uo pipefail
# TORCH=0 skips the PyTorch baselines (a round that measures only same-run ratios: floors, E).
ARCHIVE=perf-round.tgz
# shellcheck source=tools/gpu/round-lib.sh
source "$(dirname "$0")/round-lib.sh"
P=wan-1.3b; C=8
step bench model
timeout 150 "$S/lockstep" bench model --preset $P --chunks $C --idle --json "$L/ours-$P.json" > "$L/ours-$P.log" 2>&1; echo "exit $?" >> "$L/ours-$P.log"; cat "$L/ours-$P.log"
step torch compile
[ "${TORCH:-1}" = 0 ] || timeout 120 python3 "$S/baselines/wan_reference.py" bench --preset $P --device cuda --compile --chunks $C --json "$L/torch-compile-$P.json" > "$L/torch-compile-$P.log" 2>&1; echo "exit $?" >> "$L/torch-compile-$P.log"; tail -12 "$L/torch-compile-$P.log"
step gpu_model wrapping stream and TP=2 staged + device path
timeout 240 "$S/tests/gpu_model" --test-threads=1 --nocapture wrapping_stream gpu_tp2 > "$L/gpu_model.log" 2>&1; echo "exit $?" >> "$L/gpu_model.log"
grep -E "graphs captured|worst|device path|differ|kept-latent|test result|panicked|^exit" "$L/gpu_model.log"
step one GPU layer
if [ -x "$S/tests/gpu_one_layer" ]; then
  timeout 60 "$S/tests/gpu_one_layer" --test-threads=1 --nocapture > "$L/gpu_one_layer.log" 2>&1; echo "exit $?" >> "$L/gpu_one_layer.log"
  tail -5 "$L/gpu_one_layer.log"
fi
step lockstep run
LOCKSTEP_CUDA_GRAPHS=on timeout 60 "$S/lockstep" run --preset $P --tp 1 --chunks 16 --timeout 60 --metrics "$L/run-$P.json" > "$L/run-$P.log" 2>&1; echo "exit $?" >> "$L/run-$P.log"; tail -22 "$L/run-$P.log"
step torch eager
[ "${TORCH:-1}" = 0 ] || timeout 90 python3 "$S/baselines/wan_reference.py" bench --preset $P --device cuda --chunks $C --json "$L/torch-eager-$P.json" > "$L/torch-eager-$P.log" 2>&1; echo "exit $?" >> "$L/torch-eager-$P.log"; tail -12 "$L/torch-eager-$P.log"
step latent Euler kernel, latent into a caller's device buffer
if [ -x "$S/tests/gpu_kernels" ]; then
  timeout 60 "$S/tests/gpu_kernels" --test-threads=1 --nocapture latent > "$L/gpu_kernels_latent.log" 2>&1; echo "exit $?" >> "$L/gpu_kernels_latent.log"; tail -4 "$L/gpu_kernels_latent.log"
fi
step bench session
timeout 150 "$S/lockstep" bench session --rounds 5 --chunks 2000 --json "$L/session.json" > "$L/session.log" 2>"$L/session.err"; echo "exit $?" >> "$L/session.log"; tail -8 "$L/session.log"
step done
