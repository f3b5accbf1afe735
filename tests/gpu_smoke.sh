#!/usr/bin/env bash
# The single-GPU smoke suite (`make test-gpu`): the tests marked `gpu` (tests/test_gpu.py) with
# the container's Python ($GPU_PY, default python3: NVIDIA's PyTorch image has torch,
# Transformer Engine and apex; `make test`'s .venv has a CPU torch and sees none of them).
#
#   GPU_PY=python3 bash tests/gpu_smoke.sh [extra pytest args, e.g. -k fp8]
#
# Without CUDA it prints one line and exits 0. Otherwise it installs requirements-gpu.txt
# when one of its packages is missing (never torch, TE or apex: those are the container's),
# runs the suite, then prints the environment, one line per check (status, seconds, name,
# skip or failure reason, and what the check printed: losses, bench rows) and the totals,
# ready to paste. Exit status: pytest's.
set -u
cd "$(dirname "$0")/.."
PY="${GPU_PY:-python3}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "make test-gpu: needs a CUDA GPU ($PY has no torch with a CUDA device here); nothing run"
    exit 0
fi

# requirements-gpu.txt and the files it includes: install them all when any is missing.
missing=$("$PY" - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, version

def pins(path):
    for line in open(path):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            yield from pins(line[3:].strip())
        elif m := re.match(r"([A-Za-z0-9_.\-]+)\s*==", line):
            yield m.group(1)

missing = []
for name in pins("requirements-gpu.txt"):
    try:
        version(name)
    except PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
EOF
)
if [ -n "$missing" ]; then
    echo "installing requirements-gpu.txt (missing: $missing)"
    PIP_CONSTRAINT= "$PY" -m pip install --disable-pip-version-check -q -r requirements-gpu.txt || exit 1
fi

out=$(mktemp -d -t gpu-smoke-XXXX)
started=$(date +%s)
# --continue-on-collection-errors: a test file that does not import in the container (it
# collects every file to find the `gpu` marks) must not stop the GPU checks.
"$PY" -m pytest -m gpu tests -q -rA --durations=0 -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$out/junit.xml" -o junit_logging=system-out "$@" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}

"$PY" - "$out/junit.xml" "$(( $(date +%s) - started ))" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import version

import torch

def v(name):
    try:
        return version(name)
    except Exception:
        return "absent"

print("\n== environment")
print(f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
      f"transformer-engine {v('transformer-engine') if v('transformer-engine') != 'absent' else v('transformer_engine')}, "
      f"megatron-core {v('megatron-core')}, transformers {v('transformers')}, apex {v('apex')}")
print("== checks")
counts = {}
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError) as e:
    print(f"no junit report ({e}): see the pytest output above")
    cases = []
for case in cases:
    status, reason = "PASS", ""
    for tag, name in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
        node = case.find(tag)
        if node is not None:
            status, reason = name, " ".join((node.get("message") or "").split())[:300]
            break
    counts[status] = counts.get(status, 0) + 1
    test = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
    print(f"{status:5} {float(case.get('time', 0)):7.1f}s  {test}" + (f"  [{reason}]" if reason else ""))
    printed = case.find("system-out")
    for line in (printed.text or "").splitlines() if printed is not None else []:
        if line.strip() and not (line.startswith("---") and "Captured" in line):   # pytest's section header
            print(f"      | {line}")
print("== totals: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + f" in {sys.argv[2]} s")
EOF
exit "$rc"
