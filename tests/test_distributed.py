"""Data parallel training with two processes on CPU (torchrun, gloo): the GPU path runs the same code over NCCL."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qlora_kit.plan.recipes import Recipe
from qlora_kit.train import checkpoint
from qlora_kit.train.distributed import without_gpus_flag
from qlora_kit.train.run import RunOptions, run_training
from tests.test_reliability import adapter_tensors, losses

ARGS = ["--rank", "4", "--steps", "6", "--micro-batch", "2", "--checkpoint-every", "3", "--dropout", "0", "--plain"]


def torchrun(out: Path, llama_dir, chat_data, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "qlora_kit",
        "train",
        "--model",
        str(llama_dir),
        "--data",
        str(chat_data),
        "--out",
        str(out),
        *ARGS,
        *extra,
    ]
    env = {**os.environ, "QLORA_KIT_CACHE": str(out.parent / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from tests.conftest import write_jsonl

    return write_jsonl(
        tmp_path_factory.mktemp("data") / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"what is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{2 * i}, arr"},
                ]
            }
            for i in range(12)
        ],
    )


@pytest.fixture(scope="module")
def single_run(llama_dir, chat_data, tmp_path_factory):
    """The reference: one process, micro-batch 2 x accumulation 2 (the effective batch of two ranks at 2)."""
    out = tmp_path_factory.mktemp("single") / "run"
    recipe = Recipe(
        model=str(llama_dir),
        data=str(chat_data),
        rank=4,
        steps=6,
        micro_batch=2,
        grad_accum=2,
        checkpoint_every=3,
        dropout=0.0,
    )
    run_training(recipe, out, Console(file=io.StringIO()))
    return out


@pytest.fixture(scope="module")
def ddp_run(llama_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(out, llama_dir, chat_data)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, chat_data, result


def assert_same_training(out, reference):
    ours, theirs = losses(out), losses(reference)
    for step in ours:  # the same examples and gradient; only the summation order differs
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), step
    a, b = adapter_tensors(out), adapter_tensors(reference)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_two_processes_train_like_one_with_the_same_effective_batch(ddp_run, single_run):
    out, chat_data, result = ddp_run
    assert result.stdout.count("Trainable:") == 1, "only rank 0 speaks"
    assert "Data parallel (DDP) over 2 processes: 2 examples each, 4 a step" in result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7)), "one metrics line per step, written once"
    assert all(m["ranks"] == 2 and len(m["rank_memory"]) == 2 for m in lines), "every rank's memory is recorded"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "metrics.jsonl",
        "plan.json",
        "recipe.yaml",
    ]

    assert_same_training(out, single_run)


def test_a_distributed_run_resumes_across_ranks_and_on_one_process(ddp_run, llama_dir, tmp_path):
    import shutil

    out, chat_data, _ = ddp_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "step-6" / "optimizer.pt").write_bytes(b"torn")
    resumed = torchrun(copy, llama_dir, chat_data, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming from step-3" in resumed.stdout and losses(copy) == losses(out)
    assert checkpoint.verify(copy / "checkpoints" / "step-6") is None

    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    shutil.rmtree(alone / "checkpoints" / "step-6")
    console = Console(file=io.StringIO(), width=300)
    recipe = Recipe(
        model=str(llama_dir), data=str(chat_data), rank=4, steps=6, micro_batch=2, checkpoint_every=3, dropout=0.0
    )
    run_training(recipe, alone, console, RunOptions(resume=True))
    assert "Resuming on 1 process(es) instead of 2: a step now takes 2 examples instead of 4" in console.file.getvalue()
    assert len(losses(alone)) == 6


@pytest.mark.parametrize(
    "parallel, banner, extra",
    [
        # FSDP wraps each decoder layer; the last one kept whole (not recomputed) must train the same.
        ("fsdp", "Sharded (FSDP) over 2 processes", ["--uncheckpointed-layers", "1"]),
        ("fsdp_offload", "Sharded (FSDP, shards in host RAM) over 2 processes", []),
    ],
)
def test_fsdp_shards_the_4bit_model_trains_like_one_process_and_resumes(
    llama_dir, chat_data, single_run, tmp_path, parallel, banner, extra
):
    import shutil

    out = tmp_path / parallel
    result = torchrun(out, llama_dir, chat_data, "--parallel", parallel, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert banner in result.stdout
    assert not extra or "uncheckpointed_layers: 1" in (out / "recipe.yaml").read_text()
    assert_same_training(out, single_run)
    shutil.rmtree(out / "checkpoints" / "step-6")  # resume from step 3's whole tensors, re-sharded on load
    resumed = torchrun(out, llama_dir, chat_data, "--parallel", parallel, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming from step-3" in resumed.stdout
    assert_same_training(out, single_run)


def test_gpus_flag_is_removed_for_the_processes_torchrun_starts():
    assert without_gpus_flag(["train", "--gpus", "2", "--out", "x", "--gpus=4"]) == ["train", "--out", "x"]


@pytest.mark.parametrize("parallel, variant", [("ddp", "use_dora"), ("fsdp", "use_dora"), ("fsdp", "loftq")])
def test_lora_variants_train_over_two_processes_like_one(llama_dir, chat_data, tmp_path, parallel, variant):
    """DoRA's magnitudes are parameters of their own that DDP must reduce and FSDP shard; LoftQ's start is computed
    on every rank and must be the same on each."""
    settings = {"use_dora": True} if variant == "use_dora" else {"lora_init": "loftq"}
    flags = ["--use-dora"] if variant == "use_dora" else ["--lora-init", "loftq"]
    reference = tmp_path / "single"
    run_training(
        Recipe(
            model=str(llama_dir),
            data=str(chat_data),
            rank=4,
            steps=6,
            micro_batch=2,
            grad_accum=2,
            checkpoint_every=3,
            dropout=0.0,
            **settings,
        ),
        reference,
        Console(file=io.StringIO()),
    )
    out = tmp_path / parallel
    result = torchrun(out, llama_dir, chat_data, "--parallel", parallel, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_training(out, reference)
    if variant == "use_dora":
        assert any("lora_magnitude_vector" in key for key in adapter_tensors(out))


@pytest.mark.parametrize(
    "parallel, from_adapter, reference",
    [("ddp", False, "on_the_fly"), ("fsdp", False, "auto"), ("fsdp", True, "on_the_fly")],
)
def test_dpo_over_two_processes_trains_like_one(llama_dir, tmp_path, parallel, from_adapter, reference):
    """The reference pass (the adapter switched off, or the adapter the run started from switched in) runs inside
    the wrapped loss module on every rank, or before the first step on every rank (auto precomputes it here: 24
    pairs drawn from 12)."""
    from tests.test_preference import preference_file

    pairs = preference_file(tmp_path)
    start = {}
    if from_adapter:
        run_training(
            Recipe(model=str(llama_dir), data=str(pairs), method="orpo", rank=4, steps=2, lr=1e-2),
            tmp_path / "first",
            Console(file=io.StringIO()),
        )
        start = {"init_adapter": str(tmp_path / "first" / "adapter")}
    single = tmp_path / "single"
    run_training(
        Recipe(
            model=str(llama_dir),
            data=str(pairs),
            method="dpo",
            rank=4,
            steps=6,
            micro_batch=2,
            grad_accum=2,
            checkpoint_every=3,
            dropout=0.0,
            reference=reference,
            **start,
        ),
        single,
        Console(file=io.StringIO()),
    )
    out = tmp_path / parallel
    flags = ["--from-adapter", start["init_adapter"]] if from_adapter else []
    result = torchrun(
        out, llama_dir, pairs, "--parallel", parallel, "--method", "dpo", "--reference", reference, *flags
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_training(out, single)
    mode = json.loads((out / "plan.json").read_text())["reference"]["mode"]
    assert mode == ("precomputed" if reference == "auto" else reference)
    assert (out / "reference_log_probs.safetensors").is_file() == (mode == "precomputed")
    if from_adapter:
        assert losses(out)[1] == pytest.approx(0.6931, abs=1e-4), "the reference is the adapter the run started from"
