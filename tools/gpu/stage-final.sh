#!/usr/bin/env bash
# Run HERE: stages the final NCCL device run (lockstep run --backend nccl, pipeline + protocol
# break-it suites on NCCL, pipeline_run, GPU smokes, doctor, leftover check) into .gpu-stage-final/.
# Then, with the device tool: command `bash .gpu-stage-final/run.sh`, carry [".gpu-stage-final"],
# kind nvidia-h100-x2, timeout_s 420 (2 GPUs; the script stops itself within 400 s).
exec "$(dirname "$0")/stage.sh" --dir .gpu-stage-final --script tools/gpu/final-run.sh \
  breakit_pipeline pipeline_run breakit_protocol gpu_smoke gpu_nccl_smoke
