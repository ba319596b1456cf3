"""Runs held to less GPU memory than the card has, through the CLI as users run it (issue 22, items 4 and 5).

  oom:     `train --vram-limit CAP` with a micro-batch the plan says does not fit: the run must step down on the
           real allocator's out-of-memory error and still make every step once, its reserved memory under the cap.
  what-if: `auto --gpu CARD` on the lent GPU: auto chooses for that card and the run is held to its memory; its
           measured peak (nvidia-smi's and torch's reserved plus the CUDA context) against the plan's, step-downs
           counted (none expected when the plan is right).

Each model is its catalogue config with random weights (benchmarks/random_model.py) and the tests' small BPE
tokenizer; the data is random text, every example cut to --seq tokens. Results append to
benchmarks/results/cap_runs_<device>.jsonl. Needs a CUDA GPU (the CLI refuses a cap without one); on a CPU the
test suite checks the run-folder reading below on a CPU run with an injected out-of-memory error.

  python benchmarks/memory_cap.py oom --model gemma-2b --cap-gib 4 --seq 2048 --micro-batch 8 --steps 6
  python benchmarks/memory_cap.py what-if --model gemma-2b --gpu "RTX 3060" --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.probe.hardware import CUDA_CONTEXT_BYTES  # noqa: E402
from qlora_kit.units import GIB  # noqa: E402


def read_run(run_dir: Path) -> dict:
    """What a finished run folder says about memory and steps: the steps made (in order), the out-of-memory
    step-downs, the largest reserved / nvidia-smi / RSS readings (GiB), and its plan's target and total."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "loss" in m and "event" not in m]
    plan = json.loads((run_dir / "plan.json").read_text())

    def largest(key: str) -> float | None:
        values = [m[key] for m in steps if m.get(key) is not None]
        return max(values) if values else None

    return {
        "steps": [m["step"] for m in steps],
        "step_downs": [
            {"step": m["step"], "from": m["from"], "to": m["to"]}
            for m in lines
            if m.get("event") == "out_of_memory_step_down"
        ],
        "peak_reserved_gib": largest("mem_reserved_gib"),
        "peak_nvml_gib": largest("nvml_used_gib"),
        "peak_rss_gib": largest("rss_gib"),
        "target": plan["target"]["name"],
        "capacity_gib": plan["target"]["capacity_bytes"] / GIB,
        "planned_gib": plan["plan"]["total_bytes"] / GIB,
    }


def lost_or_repeated_steps(run: dict, total: int) -> list[int]:
    """Steps of 1..total the run did not make exactly once, in order (empty when none was lost or redone)."""
    return sorted(set(range(1, total + 1)) ^ set(run["steps"])) + sorted(
        {s for s in run["steps"] if run["steps"].count(s) > 1}
    )


def prepare(name: str, work: Path, seq: int, examples: int, device: str = "cuda") -> tuple[Path, Path]:
    """A random-weight model folder with a tokenizer, and a data file of `examples` random texts of about seq tokens."""
    from benchmarks.random_model import build_random_model
    from tests.tiny_models import build_tokenizer

    folder = build_random_model(name, work / name, device)
    if not (folder / "tokenizer.json").is_file():
        build_tokenizer().save_pretrained(folder)
    data = work / f"random-text-{seq}-{examples}.jsonl"
    if not data.is_file():
        from transformers import AutoTokenizer

        tokenizer, rng = AutoTokenizer.from_pretrained(folder), random.Random(0)
        words = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)
        ]
        with open(data, "w") as f:  # the text of seq tokens: auto reads the sequence length off the data
            for _ in range(examples):
                ids = tokenizer(" ".join(rng.choice(words) for _ in range(seq)), add_special_tokens=False).input_ids
                f.write(json.dumps({"text": tokenizer.decode(ids[: seq - 1])}) + "\n")
    return folder, data


def run_cli(*args: str) -> float:
    """qlora-kit as users run it, in its own process; the seconds it took. A failure stops the benchmark."""
    started = time.time()
    path = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )  # bitsandbytes may come from a wheel folder
    subprocess.run([sys.executable, "-m", "qlora_kit", *args], check=True, env={**os.environ, "PYTHONPATH": path})
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["oom", "what-if"])
    parser.add_argument("--model", default="gemma-2b", help="a catalogue model, built with random weights")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="oom: the --vram-limit")
    parser.add_argument("--gpu", default="RTX 3060", help="what-if: the catalogued card auto chooses for")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8, help="oom: a micro-batch that does not fit under the cap")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", default="/tmp/qlora-kit-calibration", help="where random models and data are saved")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    import torch

    assert torch.cuda.is_available(), "a memory cap needs a CUDA GPU: run this on one (benchmarks/gpu_session.sh)"
    work = Path(args.work)
    # auto chooses its batch from the data too: with few examples it would shrink it to make 10 steps an epoch
    folder, data = prepare(args.model, work, args.seq, 512)
    run_dir = work / "runs" / f"{args.stage}-{args.model}-{int(time.time())}"
    common = ["--data", str(data), "--out", str(run_dir), "--steps", str(args.steps), "--plain"]
    if args.stage == "oom":
        seconds = run_cli(
            "train",
            "--model",
            str(folder),
            *common,
            "--vram-limit",
            str(args.cap_gib),
            "--seq-len",
            str(args.seq),
            "--micro-batch",
            str(args.micro_batch),
            "--grad-accum",
            "1",
            "--eval-fraction",
            "0",
        )
    else:
        seconds = run_cli("auto", "--model", str(folder), *common, "--gpu", args.gpu)
    run = read_run(run_dir)
    missing = lost_or_repeated_steps(run, args.steps)
    context = CUDA_CONTEXT_BYTES / GIB  # outside torch's reserved memory, inside nvidia-smi's
    measured = run["peak_nvml_gib"] or run["peak_reserved_gib"] + context
    record = {
        **vars(args),
        **run,
        "seconds": round(seconds, 1),
        "lost_or_repeated_steps": missing,
        "measured_over_planned": measured / run["planned_gib"],
        "device": torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "versions": {p: metadata.version(p) for p in ("torch", "bitsandbytes", "transformers", "peft")},
        "command": " ".join(["python", "benchmarks/memory_cap.py", *sys.argv[1:]]),
    }
    out = Path(args.out) / f"cap_runs_{record['device'].replace(' ', '_')}.jsonl"  # not memory_*: calibration points
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(
        f"{args.stage} {args.model} on {run['target']}: steps {run['steps']} ({'none' if not missing else missing} lost "
        f"or repeated), {len(run['step_downs'])} step-downs {[(d['step'], d['to']) for d in run['step_downs']]}, "
        f"peak reserved {run['peak_reserved_gib']:.2f} GiB, nvidia-smi {run['peak_nvml_gib'] or float('nan'):.2f} GiB "
        f"of {run['capacity_gib']:.2f} ({run['capacity_gib'] - context:.2f} for torch), planned {run['planned_gib']:.2f} "
        f"(measured/planned {record['measured_over_planned']:.2f}); "
        f"{seconds:.0f} s; appended to {out}"
    )
    if missing or (args.stage == "oom" and not run["step_downs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
