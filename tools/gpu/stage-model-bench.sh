#!/usr/bin/env bash
# HERE: stage the release lockstep binary, the PyTorch baselines and model-bench-round.sh into
# .gpu-stage-bench/ (git-ignored). Device: command `bash .gpu-stage-bench/run.sh`, carry it.
set -euo pipefail
cd "$(dirname "$0")/../.."
s=.gpu-stage-bench
rm -rf "$s"; mkdir -p "$s"
cargo build --release --bin lockstep
cp target/release/lockstep "$s/lockstep"; strip "$s/lockstep"
cp -r benches/baselines "$s/baselines"
cp tools/gpu/model-bench-round.sh "$s/run.sh"
du -sh "$s"
