#!/usr/bin/env bash
# Run HERE: stages the kernels round (GPU smoke + kernel tests, compute-sanitizer, bench kernels,
# PyTorch baselines) into .gpu-stage-kernels/. Then, with the device tool: command
# `bash .gpu-stage-kernels/run.sh all`, carry [".gpu-stage-kernels"], one GPU.
exec "$(dirname "$0")/stage.sh" --dir .gpu-stage-kernels --script tools/gpu/kernels-round.sh \
  gpu_smoke gpu_kernels
