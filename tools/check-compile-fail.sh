#!/usr/bin/env bash
# Every compile-fail doctest in src/ that pins an error code (```compile_fail,E0451) must fail to
# compile with exactly that error and no other. Stable rustdoc checks only that such a block
# fails, not why (the code is checked on nightly only), so a block that breaks for an unrelated
# reason (a typo, type inference) would prove nothing; this compiles each block with rustc against
# the built library and compares the error codes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --lib --quiet
python3 - <<'PY'
import glob, itertools, os, re, subprocess, sys, tempfile

deps = "target/debug/deps"
def newest(pattern):
    found = glob.glob(pattern)
    return max(found, key=os.path.getmtime) if found else None

lib = newest(f"{deps}/liblockstep-*.rlib") or newest("target/debug/liblockstep.rlib")
if lib is None:
    sys.exit("check-compile-fail: no liblockstep rlib under target/debug (cargo build --lib?)")
crates = []
in_deps = False
for line in open("Cargo.toml", encoding="utf-8"):
    if line.startswith("["):
        in_deps = line.strip() == "[dependencies]"
    elif in_deps and "=" in line:
        crates.append(line.split("=")[0].strip().replace("-", "_"))

blocks = []
for f in sorted(glob.glob("src/**/*.rs", recursive=True)):
    lines = open(f, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r'^\s*//[/!] ?```compile_fail,(E\d{4})\s*$', lines[i])
        if m:
            code, start, body = m.group(1), i + 1, []
            i += 1
            while i < len(lines) and not re.match(r'^\s*//[/!] ?```\s*$', lines[i]):
                text = re.sub(r'^\s*//[/!] ?', '', lines[i])
                body.append(text[2:] if text.startswith("# ") else text)
                i += 1
            blocks.append((f, start, code, "\n".join(body)))
        i += 1

bad = 0
with tempfile.TemporaryDirectory() as tmp:
    for f, line, code, body in blocks:
        src = body if re.search(r'\bfn main\b', body) else "fn main() {\n" + body + "\n}\n"
        path = os.path.join(tmp, "block.rs")
        open(path, "w", encoding="utf-8").write(src)
        cmd = ["rustc", "--edition", "2021", "--crate-type", "bin", "--emit", "metadata",
               "-o", os.path.join(tmp, "block.rmeta"), "-L", f"dependency={deps}",
               "--extern", f"lockstep={lib}"]
        # A crate the block names directly may exist in several builds (profiles); the one the
        # library was built against is the one with which the block type-checks as intended.
        used = [c for c in crates if re.search(r'\b%s::' % c, body)]
        choices = [sorted(glob.glob(f"{deps}/lib{c}-*.rlib"), key=os.path.getmtime,
                          reverse=True)[:4] or [None] for c in used]
        first = matched = None
        for combo in itertools.islice(itertools.product(*choices), 16):
            extra = []
            for c, rlib in zip(used, combo):
                if rlib:
                    extra += ["--extern", f"{c}={rlib}"]
            out = subprocess.run(cmd + extra + [path], capture_output=True, text=True)
            codes = sorted(set(re.findall(r'^error\[(E\d{4})\]', out.stderr, re.M)))
            others = [l for l in out.stderr.split("\n")
                      if l.startswith("error") and not l.startswith("error[")
                      and not l.startswith("error: aborting")]
            first = first or (out.returncode, codes, others)
            if out.returncode != 0 and codes == [code] and not others:
                matched = (out.returncode, codes, others)
                break
        # Report the newest builds' result when no combination gives exactly the pinned code.
        rc, codes, others = matched or first
        if rc == 0 or codes != [code] or others:
            bad = 1
            print(f"{f}:{line}: compile_fail,{code} fails with {codes or 'no error code'}"
                  f"{' and ' + '; '.join(others) if others else ''}"
                  f"{' (it compiles)' if rc == 0 else ''}", file=sys.stderr)
print(f"compile-fail doctests: {len(blocks)}"
      + ("" if bad else ", each fails with its pinned error code only"))
sys.exit(bad)
PY
