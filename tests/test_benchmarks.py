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
    out = subprocess.run([sys.executable, "benchmarks/compare_hf.py", "--model", "smollm2-135m", "--seq", "64", "--batch", "1",
                          "--steps", "1", "--device", "cpu", "--work", str(tmp_path / "models"), "--results", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens_per_s" in out.stdout and "qlora-kit / HF" in out.stdout
    [results] = tmp_path.glob("compare_hf_*.jsonl")
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["hf"]["status"] == record["ours"]["status"] == "ok"
    assert record["ours"]["peak_rss_gib"] > 0 and record["versions"]["bitsandbytes"]
    assert record["ours"]["settings"]["dropout"] == 0.0 and record["hf"]["settings"]["dropout"] == 0.05


@pytest.mark.slow
def test_recompute_benchmark_runs_every_configuration_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/recompute.py", "--seq", "32", "--batch", "1", "--steps", "1",
                          "--work", str(tmp_path / "models"), "--results", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
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
    out = subprocess.run([sys.executable, "benchmarks/data_memory.py", "--examples", "300"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory ratio (b)/(a)" in out.stdout


def test_gpu_smoke_passes_on_the_cpu_it_falls_back_to():
    out = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [line.split()[0] for line in out.stdout.splitlines()[1:] if not line.startswith(" ")] == ["ok"] * 3


@pytest.mark.slow
def test_cpu_contention_benchmark_runs_small(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/cpu_contention.py", "--competitors", "0", "1", "--steps", "1", "--tokens", "4",
                          "--repeats", "1", "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 competing: before" in out.stdout and "4-bit / bf16" in out.stdout
    [results] = tmp_path.glob("cpu_contention_*.jsonl")
    rows = json.loads(results.read_text())["rows"]
    assert [row["status"] for row in rows] == ["ok"] * 10
    assert all(row["threads"] == [1, 1] for row in rows if row["what"] == "train" and row["policy"] == "after"
               and row["competitors"] == 1 and os.cpu_count() == 2), "one competitor on two cores: one thread"


def test_export_cost_benchmark_runs_on_the_demo_model(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/export_cost.py", "--skip-1b", "--folder", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("SmolLM2-135M") == 3 and "merged q8_0" in out.stdout


@pytest.mark.slow
def test_lora_variants_benchmark_runs_every_variant(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/lora_variants.py", "--steps", "1", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(name in out.stdout for name in ("LoRA r16", "rsLoRA r64", "DoRA r16", "LoftQ r16"))


@pytest.mark.slow
def test_preference_memory_benchmark_runs_sft_dpo_and_orpo(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/preference_memory.py", "--steps", "1", "--seq-len", "64",
                          "--micro-batch", "1"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(name in out.stdout for name in ("SFT x2", "DPO", "DPO pre", "ORPO", "a second copy of the model would add", "precomputed / on the fly"))


@pytest.mark.slow
def test_dpo_reference_benchmark_compares_both_ways_per_pair():
    out = subprocess.run([sys.executable, "benchmarks/dpo_reference.py", "--pairs", "4", "--micro-batch", "2",
                          "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "precomputed / on the fly, per pair:" in out.stdout
