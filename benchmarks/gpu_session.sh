#!/usr/bin/env bash
# Every GPU measurement that issue 22 lists (memory calibration, the HF comparison, runs under a memory cap), in
# stages that each fit one 10-minute call of the device tool. Run from anywhere on the GPU machine. Wheels the GPU
# image lacks are brought in folders .whl*/ (benchmarks/README.md says how; at most 64 MiB a call, so bitsandbytes
# in one call and datasets with pyarrow in the next) and installed into .gpu-site/, which stays between calls while
# the machine is warm. Results append to benchmarks/results/ and are copied to $OUT when it is set (the device
# tool brings $OUT back).
#
#   bash benchmarks/gpu_session.sh wheels                   # install what .whl*/ holds, nothing else
#   bash benchmarks/gpu_session.sh check                    # versions, probe, gpu_smoke.py (about 2 min)
#   bash benchmarks/gpu_session.sh tests                    # the default test suite on the GPU (needs datasets)
#   bash benchmarks/gpu_session.sh calibrate gemma-2b       # the calibration grid for one model
#   bash benchmarks/gpu_session.sh calibrate llama-3.1-8b
#   bash benchmarks/gpu_session.sh dora gemma-2b            # DoRA's points of the grid (its memory on a GPU)
#   bash benchmarks/gpu_session.sh compare gemma-2b         # seq 2048: batch 1, under 4 GiB, batch 4 (memory ratio)
#   bash benchmarks/gpu_session.sh compare llama-3.1-8b     # seq 2048, batch 1
#   bash benchmarks/gpu_session.sh recompute gemma-2b       # each speed lever alone, seq 2048 x 1
#   bash benchmarks/gpu_session.sh max-seq ours             # llama-3.1-8b's longest sequence under 8 GiB (then: hf)
#   bash benchmarks/gpu_session.sh oom                      # train --vram-limit 4 at a micro-batch that does not fit
#   bash benchmarks/gpu_session.sh what-if gemma-2b         # auto --gpu for an RTX 3060, a T4, a GTX 1080 (needs datasets)
#   bash benchmarks/gpu_session.sh what-if llama-3.2-3b
set -euo pipefail
cd "$(dirname "$0")/.."
site="$PWD/.gpu-site"
for wheels in .whl*/; do
  if [ -d "$wheels" ] && compgen -G "$wheels*.whl" >/dev/null; then
    python3 -m pip install -q --no-deps --upgrade --target "$site" "$wheels"*.whl
  fi
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}:$PWD" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
stage=${1:?"a stage: wheels, check, tests, calibrate MODEL, dora MODEL, compare MODEL, recompute MODEL, max-seq SIDE, oom, what-if MODEL"}
case "$stage" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, bitsandbytes, transformers, peft; print(torch.__version__, bitsandbytes.__version__, transformers.__version__, peft.__version__)"
    python3 -m qlora_kit probe || echo "probe failed (above); the measurements below do not need it"
    python3 benchmarks/gpu_smoke.py ;;
  wheels)
    python3 -c "import bitsandbytes, yaml, typer; print('bitsandbytes', bitsandbytes.__version__)"
    python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__)" || echo "no datasets yet: bring it in .whl2/" ;;
  tests)
    python3 -m pytest -x -q -p no:cacheprovider ;;
  calibrate)
    python3 benchmarks/calibrate_memory.py --models "${2:?a catalogue model}" ;;
  dora)
    python3 benchmarks/calibrate_memory.py --models "${2:?a catalogue model}" --seqs 512,2048 --batches 1,4 --ranks 16 \
      --checkpointing on,off --variants lora,dora ;;
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
  oom)
    python3 benchmarks/memory_cap.py oom --model gemma-2b --cap-gib 4 --seq 2048 --micro-batch 8 --steps 6 ;;
  what-if)
    for card in "RTX 3060" T4 "GTX 1080"; do
      python3 benchmarks/memory_cap.py what-if --model "${2:?a catalogue model}" --gpu "$card" --steps 6
    done ;;
  *)
    echo "unknown stage: $stage" >&2
    exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.jsonl "$OUT"/
fi
