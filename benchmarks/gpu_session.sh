#!/usr/bin/env bash
# Every GPU measurement that issues 4 (memory calibration) and 7 (against the HF recipe) wait for, in stages that
# each fit one 10-minute call of the device tool. Run from anywhere on the GPU machine, with bitsandbytes, pyyaml
# and typer brought as wheels in .whl/ when its image lacks them (benchmarks/README.md says how). Results append
# to benchmarks/results/ and are copied to $OUT when it is set (the device tool brings $OUT back).
#
#   bash benchmarks/gpu_session.sh check                    # versions, probe, gpu_smoke.py (about 2 min)
#   bash benchmarks/gpu_session.sh calibrate gemma-2b       # the calibration grid for one model
#   bash benchmarks/gpu_session.sh calibrate llama-3.1-8b
#   bash benchmarks/gpu_session.sh compare gemma-2b         # seq 2048: batch 1, under 4 GiB, batch 4 (memory ratio)
#   bash benchmarks/gpu_session.sh compare llama-3.1-8b     # seq 2048, batch 1
#   bash benchmarks/gpu_session.sh recompute gemma-2b       # each speed lever alone, seq 2048 x 1
#   bash benchmarks/gpu_session.sh max-seq ours             # llama-3.1-8b's longest sequence under 8 GiB (then: hf)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import bitsandbytes, yaml, typer" 2>/dev/null; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
stage=${1:?"a stage: check, calibrate MODEL, compare MODEL, recompute MODEL, max-seq SIDE"}
case "$stage" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, bitsandbytes, transformers, peft; print(torch.__version__, bitsandbytes.__version__, transformers.__version__, peft.__version__)"
    python3 -m qlora_kit probe || echo "probe failed (above); the measurements below do not need it"
    python3 benchmarks/gpu_smoke.py ;;
  calibrate)
    python3 benchmarks/calibrate_memory.py --models "${2:?a catalogue model}" ;;
  compare)
    model=${2:?a catalogue model}
    python3 benchmarks/compare_hf.py --model "$model" --seq 2048 --batch 1
    if [ "$model" = gemma-2b ]; then
      python3 benchmarks/compare_hf.py --model gemma-2b --seq 2048 --batch 1 --cap-gib 4
      python3 benchmarks/compare_hf.py --model gemma-2b --seq 2048 --batch 4 --ours-layers 0
    fi ;;
  recompute)
    python3 benchmarks/recompute.py --model "${2:?a catalogue model}" --seq 2048 --batch 1 ;;
  max-seq)
    python3 benchmarks/compare_hf.py --model llama-3.1-8b --cap-gib 8 --max-seq --sides "${2:?a side: ours or hf}" ;;
  *)
    echo "unknown stage: $stage" >&2
    exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.jsonl "$OUT"/
fi
