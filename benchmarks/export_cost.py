"""What `qlora-kit export` costs: time and peak RSS of each export against the size of the model, for SmolLM2-135M
and the catalogue's Llama-3.2-1B config with random weights (no download).

Each export runs in its own process, so its peak RSS is its own (VmHWM); Python with torch and the export's
imports is measured alone as the floor. Times are set against copying the same safetensors files in the same
script, the least any export that reads and writes the whole model can take.

    python benchmarks/export_cost.py [--folder /tmp/export-bench] [--skip-1b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(code: str) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of a Python process running code. The peak is the process's own VmHWM, read as it
    ends: rusage's maxrss would count the memory of this process, which forked it, before the exec."""
    started = time.perf_counter()
    report = "; import re; print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    done = subprocess.run([sys.executable, "-c", code + report], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {code}\n{done.stderr}")
    peak_kib = int(done.stdout.split("VmHWM")[-1])
    return time.perf_counter() - started, peak_kib / 2**20


def random_lora_adapter(base: Path, folder: Path, rank: int = 16) -> Path:
    """A LoRA adapter on every linear layer of base's blocks, with random A and B: what export reads from a run."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tensors = {}
    for file in base.glob("*.safetensors"):
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                if name.endswith(".weight") and name.rsplit(".", 2)[-2] in targets:
                    out_features, in_features = weights.get_slice(name).get_shape()
                    module = "base_model.model." + name.removesuffix(".weight")
                    tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features) / math.sqrt(in_features)
                    tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, rank) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": list(targets),
                "base_model_name_or_path": str(base),
            }
        )
    )
    return folder


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.random_model import build_random_model
    from qlora_kit.export.gguf import merged_export_ram
    from qlora_kit.probe.sources import resolve_model
    from tests.tiny_models import build_tokenizer

    args.folder.mkdir(parents=True, exist_ok=True)
    models = {"SmolLM2-135M": resolve_model("smollm2-135m")}
    if not args.skip_1b:
        llama_1b = args.folder / "llama-3.2-1b"
        if not (llama_1b / "config.json").is_file():
            build_random_model("llama-3.2-1b", llama_1b, device="cpu")
            build_tokenizer().save_pretrained(llama_1b)  # a stand-in: export needs a tokenizer to write
        models["Llama-3.2-1B (random)"] = llama_1b

    floor_s, floor_gib = run_measured("import torch, gguf, safetensors, transformers, qlora_kit.export.gguf")
    print(
        f"uptime: {os.getloadavg()}; floor (Python, torch, transformers, gguf imported): {floor_gib:.2f} GiB RSS, {floor_s:.1f} s"
    )
    print(
        f"{'model':<24}{'weights GiB':>12}{'export':>22}{'seconds':>9}{'x copy':>8}{'peak RSS GiB':>14}"
        f"{'said GiB':>10}{'RSS / weights':>15}{'out GiB':>9}"
    )
    for label, base in models.items():
        adapter = random_lora_adapter(base, args.folder / f"{base.name}-adapter")
        size = model_bytes(base)
        copy_started = time.perf_counter()
        for file in base.glob("*.safetensors"):
            shutil.copyfile(file, args.folder / "copy.safetensors")
        copy_s = time.perf_counter() - copy_started
        (args.folder / "copy.safetensors").unlink()
        for form, quant in [("adapter", None), ("merged", "f16"), ("merged", "q8_0")]:
            out = args.folder / f"{base.name}-{form}-{quant}.gguf"
            call = (
                f"export_gguf_adapter({str(adapter)!r}, {str(out)!r}, {str(base)!r})"
                if form == "adapter"
                else f"export_merged_gguf({str(adapter)!r}, {str(out)!r}, {str(base)!r}, {quant!r})"
            )
            seconds, peak = run_measured(f"from qlora_kit.export.gguf import *; {call}")
            said = "" if form == "adapter" else f"{merged_export_ram(base) / 2**30:.2f}"
            print(
                f"{label:<24}{size / 2**30:>12.2f}{form + ' ' + (quant or 'f32'):>22}{seconds:>9.1f}"
                f"{seconds / copy_s:>8.1f}{peak:>14.2f}{said:>10}{peak / (size / 2**30):>15.2f}"
                f"{out.stat().st_size / 2**30:>9.3f}"
            )
            out.unlink()


if __name__ == "__main__":
    main()
