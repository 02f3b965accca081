#!/usr/bin/env bash
# The C ABI stays honest: builds the cdylib, checks that every `lockstep_*` symbol it exports is
# declared in ffi/lockstep.h and every function declared there is exported, then compiles
# ffi/example.c against the header and library (strict C11 and C++ header check) and runs it.
# The example exits non-zero if any expectation (valid envelope, A1/A2/A3 rejections, garbage
# header codes) fails. Usage: tools/check-ffi.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug; flags=()
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); fi
CC=${CC:-cc}

cargo build --quiet --lib "${flags[@]}"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
lib="$target_dir/$profile/liblockstep.so"
[ -f "$lib" ] || { echo "check-ffi: $lib not built" >&2; exit 1; }

exported=$(nm -D --defined-only "$lib" | awk '$2 == "T" && $3 ~ /^lockstep_/ {print $3}' | sort -u)
# Preprocess (drops comments) so that only real declarations count.
declared=$("$CC" -E -P ffi/lockstep.h | grep -oE '\blockstep_[a-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u)
if [ -z "$exported" ] || [ -z "$declared" ]; then
  echo "check-ffi: found no symbols (exported: $(wc -w <<<"$exported"), declared: $(wc -w <<<"$declared"))" >&2; exit 1
fi
only_lib=$(comm -23 <(echo "$exported") <(echo "$declared"))
only_h=$(comm -13 <(echo "$exported") <(echo "$declared"))
if [ -n "$only_lib" ] || [ -n "$only_h" ]; then
  [ -z "$only_lib" ] || echo "check-ffi: exported by $lib but not declared in ffi/lockstep.h: $only_lib" >&2
  [ -z "$only_h" ] || echo "check-ffi: declared in ffi/lockstep.h but not exported: $only_h" >&2
  exit 1
fi
echo "check-ffi: $(wc -l <<<"$exported") symbols exported and declared"

out="$target_dir/ffi"; mkdir -p "$out"
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -Iffi ffi/example.c \
  -L"$target_dir/$profile" -llockstep -Wl,-rpath,"$target_dir/$profile" -o "$out/example"
if command -v c++ >/dev/null; then
  # The header must also be valid C++ (extern "C" block, no C-only constructs outside guards).
  echo '#include "lockstep.h"
int main() { return lockstep_version() == nullptr; }' | c++ -std=c++17 -Wall -Werror -Iffi -x c++ - \
    -L"$target_dir/$profile" -llockstep -Wl,-rpath,"$target_dir/$profile" -o "$out/cxx-check"
  "$out/cxx-check"
fi
"$out/example"
