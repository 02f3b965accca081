#!/usr/bin/env bash
# GPU host, one call, most important first (what finished comes back even if the call is cut):
# the GPU model against the CPU reference (with CUDA graphs; TP=2 on one GPU vs TP=1),
# the attention kernels (every variant, the per-shape table) and cubin loading, `lockstep bench
# model`, the PyTorch implementation eager, `lockstep run --preset wan-1.3b`
# (TP=1 with graphs, then TP=2 on the one GPU), the kernel tests touched by
# this change, then torch.compile. Staged by tools/gpu/stage.sh --dir .gpu-stage-model
# --script tools/gpu/final-model-round.sh gpu_kernels gpu_gemm gpu_model gpu_smoke. Logs into $OUT.
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$O/gpu.txt"
if ! ldconfig -p | grep -q 'libcublasLt.so'; then
  d=$(dirname "$(find / -name 'libcublasLt.so*' -not -path '/proc/*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 MATMUL_NUM_THREADS="$(nproc)"
P=wan-1.3b; C=8
step() { echo "=== $* ($(date +%T))"; }
step gpu_model
timeout 200 "$S/tests/gpu_model" --test-threads=1 --nocapture > "$O/gpu_model.log" 2>&1; echo "exit $?" >> "$O/gpu_model.log"
grep -vE "teacher-forced: call|CUDA graphs: call|TP=1: call|2 layers: call|TP=2 vs TP=1 \(both GPU\): call" "$O/gpu_model.log" | tail -24
step gpu_kernels attention + gpu_smoke
timeout 120 "$S/tests/gpu_kernels" --test-threads=1 --nocapture attention > "$O/gpu_kernels_attn.log" 2>&1; echo "exit $?" >> "$O/gpu_kernels_attn.log"; grep -E "^test |test result|exit" "$O/gpu_kernels_attn.log"
timeout 30 "$S/tests/gpu_smoke" --test-threads=1 > "$O/gpu_smoke.log" 2>&1; echo "exit $?" >> "$O/gpu_smoke.log"; grep -E "test result|exit" "$O/gpu_smoke.log"
step bench model
timeout 120 "$S/lockstep" bench model --preset $P --chunks $C --json "$O/ours-$P.json" > "$O/ours-$P.log" 2>&1; echo "exit $?" >> "$O/ours-$P.log"; cat "$O/ours-$P.log"
step torch eager
timeout 150 python3 "$S/baselines/wan_reference.py" bench --preset $P --device cuda --chunks $C --json "$O/torch-eager-$P.json" > "$O/torch-eager-$P.log" 2>&1; echo "exit $?" >> "$O/torch-eager-$P.log"; tail -16 "$O/torch-eager-$P.log"
step lockstep run
LOCKSTEP_CUDA_GRAPHS=on timeout 120 "$S/lockstep" run --preset $P --tp 1 --chunks 16 --timeout 120 --metrics "$O/run-$P.json" --trace "$O/run-$P.trace.json" > "$O/run-$P.log" 2>&1; echo "exit $?" >> "$O/run-$P.log"; tail -25 "$O/run-$P.log"
step lockstep run TP=2 on one GPU
timeout 150 "$S/lockstep" run --preset $P --tp 2 --chunks 2 --timeout 140 --metrics "$O/run-$P-tp2.json" > "$O/run-$P-tp2.log" 2>&1; echo "exit $?" >> "$O/run-$P-tp2.log"; tail -20 "$O/run-$P-tp2.log"
step gpu_kernels + gpu_gemm
timeout 90 "$S/tests/gpu_kernels" --test-threads=1 --nocapture kv_append > "$O/gpu_kernels.log" 2>&1; echo "exit $?" >> "$O/gpu_kernels.log"; grep -E "^test |test result|exit" "$O/gpu_kernels.log"
timeout 30 "$S/tests/gpu_gemm" --test-threads=1 --nocapture > "$O/gpu_gemm.log" 2>&1; echo "exit $?" >> "$O/gpu_gemm.log"; grep -E "^test |test result|exit|negative|tail" "$O/gpu_gemm.log"
step torch compile
timeout 200 python3 "$S/baselines/wan_reference.py" bench --preset $P --device cuda --compile --chunks $C --json "$O/torch-compile-$P.json" > "$O/torch-compile-$P.log" 2>&1; echo "exit $?" >> "$O/torch-compile-$P.log"; tail -16 "$O/torch-compile-$P.log"
step done
