#!/usr/bin/env bash
# Every section the code and docs cite as `docs/spec.md §N` (or the older `SPEC §N`) must exist
# in docs/spec.md as a `## N.` heading. Keeps the citations pointing somewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
have=$(grep -oE '^## [0-9]+\.' docs/spec.md | grep -oE '[0-9]+' | sort -un)
bad=0; count=0
while IFS= read -r hit; do
  loc=${hit%%:*}; rest=${hit#*:}; line=${rest%%:*}; text=${rest#*:}
  # the sections listed after the marker, e.g. "docs/spec.md §4, §5, §9"
  for n in $(sed -E 's/.*(docs\/spec\.md|SPEC) //' <<<"$text" | grep -oE '^(§[0-9]+[,;]? ?)+' | grep -oE '[0-9]+'); do
    count=$((count+1))
    if ! grep -qx "$n" <<<"$have"; then
      echo "$loc:$line cites docs/spec.md §$n, which docs/spec.md does not have" >&2; bad=1
    fi
  done
done < <(grep -rnE '(docs/spec\.md|SPEC) §' src tests ffi docs tools build.rs kernels benches examples 2>/dev/null \
           | grep -v '^tools/check-spec-refs.sh:' || true)
if [ "$count" = 0 ]; then echo "no spec citations found (the pattern is broken?)" >&2; exit 1; fi
echo "spec citations: $count, every cited section exists"
exit $bad
