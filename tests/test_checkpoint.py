import json
import random

import numpy as np
import pytest
import torch

from qlora_kit.plan.recipes import Recipe
from qlora_kit.train import checkpoint
from qlora_kit.train.run import run_training
from tests.test_train import QUIET


@pytest.fixture
def run(llama_dir, chat_data, tmp_path):
    """A finished 6-step run with checkpoints every 2 steps, the newest 2 kept."""
    recipe = Recipe(
        model=str(llama_dir),
        data=str(chat_data),
        rank=4,
        steps=6,
        micro_batch=2,
        checkpoint_every=2,
        keep_checkpoints=2,
    )
    run_training(recipe, tmp_path / "run", QUIET)
    return tmp_path / "run"


def test_checkpoints_hold_everything_to_resume_and_only_the_newest_are_kept(run):
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == ["step-6", "step-4"]
    folder = run / "checkpoints" / "step-6"
    assert {p.name for p in folder.iterdir()} == {
        "adapter",
        "optimizer.pt",
        "state.pt",
        "trainer_state.json",
        "manifest.json",
    }
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (
        folder / "adapter" / "adapter_config.json"
    ).is_file()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["position"] == 12 and state["shape"]["micro_batch"] == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "optimizer.pt" in manifest["files"] and "adapter/adapter_model.safetensors" in manifest["files"]
    assert checkpoint.verify(folder) is None
    assert not list((run / "checkpoints").glob(".*")), "no partial folder is left behind"


def test_a_truncated_or_altered_file_is_caught_by_the_manifest(run):
    folder = run / "checkpoints" / "step-6"
    optimizer = folder / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    assert "optimizer.pt has" in checkpoint.verify(folder)
    state = folder / "state.pt"
    state.write_bytes(b"x" + state.read_bytes()[1:])
    (folder / "optimizer.pt").unlink()
    assert checkpoint.verify(folder) == "optimizer.pt is missing"
    good, passed_over = checkpoint.latest_good_checkpoint(run)
    assert good.name == "step-4" and passed_over == ["step-6 is damaged (optimizer.pt is missing)"]
    (folder / "manifest.json").write_text("{")
    assert checkpoint.verify(folder) == "its manifest is missing or unreadable"


def test_random_states_survive_a_round_trip_through_weights_only_loading(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_size_estimate_counts_the_optimizer_state():
    assert (
        checkpoint.checkpoint_bytes(10**6, "adamw") > checkpoint.checkpoint_bytes(10**6, "paged_adamw_8bit") > 6 * 10**6
    )
