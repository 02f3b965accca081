# Sourced by the GPU round scripts (staged beside them by tools/gpu/stage.sh): the common
# preamble. Sets S (the stage folder), O ($OUT), L (a log folder), finds cuBLASLt and CUPTI (for
# `bench model --idle`), exports the run's GPU settings, writes the card's name to $L/gpu.txt,
# and defines `step NAME` (prints the step, then packs $L into $O/$ARCHIVE so a call cut short
# still returns what it logged). The caller sets ARCHIVE (e.g. perf-round.tgz) before sourcing.
S="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
O="${OUT:-$PWD/out}"; mkdir -p "$O"; L="$(mktemp -d)"
if ! ldconfig -p | grep -q 'libcublasLt.so'; then
  d=$(dirname "$(find / -name 'libcublasLt.so*' -not -path '/proc/*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi
# CUPTI for `bench model --idle` (the GPU idle share): a toolkit's, else PyTorch's cu13 wheel's.
if ! ldconfig -p | grep -q 'libcupti.so'; then
  c=$(find / -name 'libcupti.so*' -path '*cu13*' -not -path '/proc/*' 2>/dev/null | head -1)
  [ -n "$c" ] || c=$(find / -name 'libcupti.so*' -path '*CUPTI*' -not -path '/proc/*' 2>/dev/null | head -1)
  [ -z "$c" ] || export LD_LIBRARY_PATH="$(dirname "$c"):${LD_LIBRARY_PATH:-}"
fi
export LOCKSTEP_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 MATMUL_NUM_THREADS="$(nproc)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$L/gpu.txt"; cat "$L/gpu.txt"
{ echo "cupti: ${c:-$(ldconfig -p | grep -m1 libcupti)}"; echo "nsys: $(command -v nsys || ls -d /opt/nvidia/nsight-systems*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)"; ls /usr/local/cuda/bin | tr '\n' ' '; echo; } >> "$L/gpu.txt"
pack() { tar czf "$O/$ARCHIVE" -C "$L" .; }
step() { echo "=== $* ($(date +%T))"; pack; }
