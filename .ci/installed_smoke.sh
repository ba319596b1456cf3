#!/usr/bin/env bash
# The product as most users get it: a wheel built from this checkout, installed (not editable) in a fresh virtual
# environment and run from a folder outside the checkout, so nothing can be read from the source tree.
# Usage: .ci/installed_smoke.sh [WORK_DIR]   (a new temporary folder by default)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
echo "installed smoke test in $work"
if [ -z "${1:-}" ]; then  # our own temporary folder (a 1.6 GB environment): gone when the script ends, however
  trap 'rm -rf "$work"' EXIT
fi

# shellcheck source=.ci/pip_quietly.sh
. "$root/.ci/pip_quietly.sh"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
pip_quietly install --upgrade pip
pip_quietly install "torch==2.13.0+cpu"  # first, or the project's torch requirement pulls the CUDA build
pip_quietly wheel --no-deps "$root" -w "$work/dist"
pip_quietly install "$work"/dist/qlora_kit-*.whl
python "$root/tests/tiny_models.py" "$work/tiny-llama" > /dev/null 2>&1

cd "$work"
cat > data.jsonl <<'DATA'
{"messages": [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris, arr!"}]}
{"messages": [{"role": "user", "content": "one two three?"}, {"role": "assistant", "content": "four five, arr!"}]}
{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "a pirate sails the sea"}]}
DATA
cat > pairs.jsonl <<'DATA'
{"prompt": [{"role": "user", "content": "what is the capital of france?"}], "chosen": "paris, arr!", "rejected": "Paris."}
{"prompt": [{"role": "user", "content": "one two three?"}], "chosen": "four five, arr!", "rejected": "four five."}
DATA

# Each command must exit 0, print no traceback, and leave the user's screen free of library noise.
run() {
  echo "\$ qlora-kit $*"
  if ! qlora-kit "$@" > out.txt 2> err.txt; then
    cat out.txt err.txt
    echo "FAILED: qlora-kit $*"
    exit 1
  fi
  if grep -q -e Traceback -e "kernels-community" err.txt; then
    cat err.txt
    echo "FAILED: qlora-kit $* printed a traceback or a library warning"
    exit 1
  fi
}
expect() {  # the last command's output must contain this
  grep -q -e "$1" out.txt || { cat out.txt; echo "FAILED: expected '$1' in the output"; exit 1; }
}

run probe --json
python -c "import json; json.load(open('out.txt'))['bnb_4bit'] == 'works' or exit('4-bit check failed')"
run recipes
expect 8gb
expect cpu
run recipes show 8gb
python -c "import yaml; assert yaml.safe_load(open('out.txt'))['rank'] > 0"
run plan --model gemma-2b --gpu "RTX 3060" --json
python -c "import json; assert json.load(open('out.txt'))['plan']['verdict'] == 'fits'"
run plan --model gemma-2b --recipe 8gb --gpu "RTX 3060"
expect FITS
run data check data.jsonl
expect chat
run train --model tiny-llama --data data.jsonl --out runs/smoke --steps 3 --rank 4 --plain
expect "plain PEFT"
test -f runs/smoke/adapter/adapter_model.safetensors
run generate --adapter runs/smoke/adapter --prompt "hello" --max-new-tokens 4
test -f runs/smoke/adapter/base_model.json
printf '{"prompt": "hello"}\n{"prompt": "one two"}\n' > prompts.jsonl
run generate --adapter runs/smoke/adapter --file prompts.jsonl --output answers.jsonl --max-new-tokens 2
expect "Wrote 2 answers to answers.jsonl"
test "$(wc -l < answers.jsonl)" -eq 2
run report runs/smoke
expect "runs/smoke"
run export --adapter runs/smoke/adapter
expect "llama-cli"
python -c "import gguf; assert gguf.GGUFReader('runs/smoke/adapter.gguf').fields['general.type'].contents() == 'adapter'"
run export --adapter runs/smoke/adapter --format gguf --quant q8_0 --ollama
expect "ollama create smoke"
grep -q "FROM ./smoke-q8_0.gguf" runs/smoke/Modelfile
run data check pairs.jsonl
expect preference_chat
run train --model tiny-llama --data pairs.jsonl --method dpo --reference precomputed --out runs/dpo --steps 2 --rank 4 \
    --micro-batch 2 --plain
expect "accuracy"
expect "DPO reference computed for"
test -f runs/dpo/reference_log_probs.safetensors
echo "installed smoke test passed"
