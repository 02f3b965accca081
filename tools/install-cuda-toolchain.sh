#!/usr/bin/env bash
# Installs the pinned CUDA 13.0.x nvcc toolchain from PyPI into .toolchain/ (git-ignored).
# Every wheel is pinned: the nvcc wheel does not pin its dependencies, and a newer cicc emits
# PTX that the CUDA 13.0 driver of the GPU hosts rejects (CUDA error 222).
# Idempotent: a complete install is detected and left alone. Prints the nvcc path last.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${LOCKSTEP_TOOLCHAIN_DIR:-$root/.toolchain}"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
stamp="$dest/.pins"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [[ -x "$nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "toolchain already installed" >&2
  echo "$nvcc"; exit 0
fi
rm -rf "$dest"; mkdir -p "$dest"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "${pins[@]}"
[[ -x "$nvcc" ]] || { echo "install-cuda-toolchain: nvcc not found at $nvcc after install" >&2; exit 1; }
echo "${pins[*]}" > "$stamp"
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
