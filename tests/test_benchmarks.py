"""The benchmark harnesses must keep working between the GPU sessions that use them: run them small on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_hf_runs_both_sides_on_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/compare_hf.py",
            "--model",
            "smollm2-135m",
            "--seq",
            "64",
            "--batch",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "models"),
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens_per_s" in out.stdout and "qlora-kit / HF" in out.stdout
    [results] = tmp_path.glob("compare_hf_*.jsonl")
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["hf"]["status"] == record["ours"]["status"] == "ok"
    assert record["ours"]["peak_rss_gib"] > 0 and record["versions"]["bitsandbytes"]
    assert record["ours"]["settings"]["dropout"] == 0.0 and record["hf"]["settings"]["dropout"] == 0.05


@pytest.mark.slow
def test_recompute_benchmark_runs_every_configuration_on_cpu(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/recompute.py",
            "--seq",
            "32",
            "--batch",
            "1",
            "--steps",
            "1",
            "--work",
            str(tmp_path / "models"),
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    [results] = tmp_path.glob("recompute_*.jsonl")
    rows = json.loads(results.read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert [row["settings"]["checkpointed_layers"] for row in rows] == [30, 30, 15, 0]


def test_padding_benchmark_counts_what_grouping_saves():
    from benchmarks.padding import padding_share

    lengths = [10, 200] * 16
    assert padding_share(lengths, per_step=2, steps=16, grouped=True) < 0.01
    assert padding_share(lengths, per_step=2, steps=16, grouped=False) > 0.2


@pytest.mark.slow
def test_data_memory_benchmark_runs_small():
    out = subprocess.run(
        [sys.executable, "benchmarks/data_memory.py", "--examples", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory ratio (b)/(a)" in out.stdout


def test_gpu_smoke_passes_on_the_cpu_it_falls_back_to():
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [line.split()[0] for line in out.stdout.splitlines()[1:] if not line.startswith(" ")] == ["ok"] * 3


@pytest.mark.slow
def test_cpu_contention_benchmark_runs_small(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/cpu_contention.py",
            "--competitors",
            "0",
            "1",
            "--steps",
            "1",
            "--tokens",
            "4",
            "--repeats",
            "1",
            "--results",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 competing: before" in out.stdout and "4-bit / bf16" in out.stdout
    [results] = tmp_path.glob("cpu_contention_*.jsonl")
    rows = json.loads(results.read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 10
    assert all(
        row["threads"] == [1, 1]
        for row in rows
        if row["what"] == "train" and row["policy"] == "after" and row["competitors"] == 1 and os.cpu_count() == 2
    ), "one competitor on two cores: one thread"


def test_export_cost_benchmark_runs_on_the_demo_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/export_cost.py", "--skip-1b", "--folder", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("SmolLM2-135M") == 3 and "merged q8_0" in out.stdout


@pytest.mark.slow
def test_lora_variants_benchmark_runs_every_variant(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/lora_variants.py", "--steps", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(name in out.stdout for name in ("LoRA r16", "rsLoRA r64", "DoRA r16", "LoftQ r16"))


@pytest.mark.slow
def test_preference_memory_benchmark_runs_sft_dpo_and_orpo(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/preference_memory.py", "--steps", "1", "--seq-len", "64", "--micro-batch", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(
        name in out.stdout
        for name in (
            "SFT x2",
            "DPO",
            "DPO pre",
            "ORPO",
            "a second copy of the model would add",
            "precomputed / on the fly",
        )
    )


@pytest.mark.slow
def test_dpo_reference_benchmark_compares_both_ways_per_pair():
    out = subprocess.run(
        [sys.executable, "benchmarks/dpo_reference.py", "--pairs", "4", "--micro-batch", "2", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "precomputed / on the fly, per pair:" in out.stdout


def test_memory_cap_reads_a_stepped_down_run_and_auto_takes_its_what_if_model(
    llama_dir, text_data, tmp_path, monkeypatch, capsys
):
    """benchmarks/memory_cap.py needs a GPU to cap; here, its reading of a run folder (a CPU run with an injected
    out-of-memory error) and its random model, tokenizer and data, which auto must accept for a card."""
    import io

    from rich.console import Console

    from benchmarks.memory_cap import lost_or_repeated_steps, prepare, read_run
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import run_training
    from tests.test_cli import run_cli
    from tests.test_train import flaky_loss

    with monkeypatch.context() as patches:
        flaky_loss(patches, lambda step, batch: step == 2 and batch == 4)
        run_training(
            Recipe(
                model=str(llama_dir), data=str(text_data), rank=4, steps=4, micro_batch=4, grad_accum=1, dropout=0.0
            ),
            tmp_path / "run",
            Console(file=io.StringIO()),
        )
    run = read_run(tmp_path / "run")
    assert run["steps"] == [1, 2, 3, 4] and lost_or_repeated_steps(run, 4) == []
    assert [(d["step"], d["to"]["micro_batch"]) for d in run["step_downs"]] == [(2, 2)]
    assert run["peak_rss_gib"] > 0 and run["planned_gib"] > 0 and run["peak_nvml_gib"] is None
    assert lost_or_repeated_steps({"steps": [1, 2, 2, 4]}, 4) == [3, 2]
    folder, data = prepare("smollm2-135m", tmp_path / "work", seq=128, examples=8, device="cpu")
    code, out, _ = run_cli(
        monkeypatch, capsys, "auto", "--model", folder, "--data", data, "--gpu", "RTX 3060", "--dry-run"
    )
    assert code in (0, None) and "Recipe: 12gb" in out and "seq_len: 2048 -> 128" in out


def test_every_gpu_session_stage_it_lists_exists_and_names_scripts_that_exist(tmp_path):
    import re

    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    listed = set(re.findall(r"^#   bash benchmarks/gpu_session.sh ([\w-]+)", script, re.M))
    cases = set(re.findall(r"^  ([\w-]+)\)$", script, re.M))
    assert listed == cases and {"oom", "what-if", "dora", "tests", "wheels"} <= cases
    assert all((ROOT / path).is_file() for path in re.findall(r"python3 (benchmarks/\w+\.py)", script))
    # The stage that only installs and reports the wheels runs anywhere; python3 is this environment's here.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path))
    out = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "wheels"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bitsandbytes 0." in out.stdout and "datasets " in out.stdout
