#!/usr/bin/env bash
# Every test named in docs/manual/ (a backticked identifier ending a contract bullet, written
# `test: name`) must exist in `cargo test -- --list`. Keeps the manual's claims real.
set -euo pipefail
cd "$(dirname "$0")/.."
list=$(cargo test -q -- --list 2>/dev/null | grep ': test$' | sed 's/: test$//' | sed 's/.*:://')
missing=0; count=0
for name in $(grep -rhoE 'test: `[a-z0-9_]+`' docs/manual | sed -E 's/test: `([a-z0-9_]+)`/\1/' | sort -u); do
  count=$((count+1))
  if ! grep -qx "$name" <<<"$list"; then echo "docs/manual names missing test: $name" >&2; missing=1; fi
done
echo "manual names $count tests"
exit $missing
