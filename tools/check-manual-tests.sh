#!/usr/bin/env bash
# Keeps the manual's claims real (docs/manual/):
# 1. every test a contract bullet names (written `test: name`, the name in backticks) exists in
#    `cargo test -- --list`;
# 2. a bullet that states an exit or status code (70..77: "exit 74", "status 74", "exits 73") is
#    checked by one of its tests: the test's body, or a function of its file that the body calls,
#    mentions that number or its name (`bad-input`, `BadInput`, …);
# 3. a compile-fail doctest a bullet names (written `doctest: path` then the block's tag, e.g.
#    `compile_fail,E0308`, each in backticks) exists in that file with that pinned error code.
set -euo pipefail
cd "$(dirname "$0")/.."
list=$(cargo test -q -- --list 2>/dev/null | grep ': test$' | sed 's/: test$//' | sed 's/.*:://')
missing=0; count=0
for name in $(grep -rhoE 'test: `[a-z0-9_]+`' docs/manual | sed -E 's/test: `([a-z0-9_]+)`/\1/' | sort -u); do
  count=$((count+1))
  if ! grep -qx "$name" <<<"$list"; then echo "docs/manual names missing test: $name" >&2; missing=1; fi
done
echo "manual names $count tests"

doctests=0
while IFS= read -r cite; do
  [ -n "$cite" ] || continue
  file=$(sed -E 's/doctest: `([^`]+)` `([^`]+)`/\1/' <<<"$cite")
  tag=$(sed -E 's/doctest: `([^`]+)` `([^`]+)`/\2/' <<<"$cite")
  doctests=$((doctests+1))
  if [ ! -f "$file" ] || ! grep -qF '```'"$tag" "$file"; then
    echo "docs/manual names a doctest \`$tag\` in $file, which is not there" >&2; missing=1
  fi
done < <(grep -rhoE 'doctest: `[^`]+` `compile_fail,E[0-9]{4}`' docs/manual | sort -u)
echo "manual names $doctests compile-fail doctests"

python3 - <<'PY' || missing=1
import glob, re, sys

NAMES = {70: "invariant-violation", 71: "watchdog-timeout", 72: "peer-lost", 73: "parity-mismatch",
         74: "bad-input", 75: "signal", 76: "device-error", 77: "peer-failed"}
VARIANTS = {70: ["InvariantViolation", "Invariant("], 71: ["WatchdogTimeout"], 72: ["PeerLost"],
            73: ["ParityMismatch"], 74: ["BadInput"], 75: ["ExitCode::Signal"],
            76: ["DeviceError"], 77: ["PeerFailed"]}

# Every function's body, by file (top-level, nested, or a row `fn name() = Case { … };` of a
# table-driven suite: a body ends at the `}` or `};` of its indent).
by_file = {}
for f in glob.glob("tests/**/*.rs", recursive=True) + glob.glob("src/**/*.rs", recursive=True):
    lines = open(f, encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        m = re.match(r'^(\s*)(?:pub(?:\([a-z]+\))? )?fn ([a-z0-9_]+)\s*[(<]', line)
        if not m:
            continue
        indent, name = m.groups()
        j = i + 1
        while j < len(lines) and lines[j] not in (indent + "}", indent + "};"):
            j += 1
        by_file.setdefault(f, {}).setdefault(name, []).append("\n".join(lines[i:j + 1]))


def texts(test):
    """The test's body and the bodies of its file's functions that the body calls."""
    out = []
    for fns in by_file.values():
        for body in fns.get(test, []):
            out.append(body)
            for name, bodies in fns.items():
                if name != test and re.search(r'\b%s\s*[(:<]' % re.escape(name), body):
                    out.extend(bodies)
    return out


claim_re = re.compile(r'\b(?:exit(?:s|ing)?(?: with)?(?: code)?|status(?:es)?|code)\s+(7[0-7])\b')
bad, claims = 0, 0
for md in sorted(glob.glob("docs/manual/*.md")):
    bullets, cur = [], None
    for n, line in enumerate(open(md, encoding="utf-8").read().split("\n"), 1):
        if line.startswith("- "):
            cur = [n, line]
            bullets.append(cur)
        elif cur is not None and line.startswith("  "):
            cur[1] += "\n" + line
        else:
            cur = None
    for n, text in bullets:
        tests = re.findall(r'test: `([a-z0-9_]+)`', text)
        if not tests:
            continue
        stated = re.sub(r'test: `[a-z0-9_]+`', '', text)
        for code in sorted({int(c) for c in claim_re.findall(stated)}):
            claims += 1
            pats = [re.compile(r'(?<![\d.])%d(?![\d.])' % code)]
            pats += [re.compile(re.escape(v)) for v in [NAMES[code]] + VARIANTS[code]]
            if not any(p.search(b) for t in tests for b in texts(t) for p in pats):
                bad = 1
                print(f"{md}:{n}: the bullet states exit/status {code}, but none of its tests "
                      f"({', '.join(tests)}) mentions {code} or `{NAMES[code]}`", file=sys.stderr)
print(f"manual bullets state {claims} exit/status codes, each checked by a cited test")
sys.exit(bad)
PY
exit $missing
