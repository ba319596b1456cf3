"""What `push` sends and says, without a hub: the files a run puts up under each flag, the base the pushed files
name, and the card. The upload itself runs against the stand-in hub in tests/test_hub.py."""

import io
import json
import shutil

import pytest
from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.export.push import adapter_and_run, files_to_push, hub_base, push_card
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir):
    """A finished run of two steps on the tiny llama, with a checkpoint."""
    folder = tmp_path_factory.mktemp("push")
    data = folder / "d.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(8)))
    run_training(
        Recipe(model=str(llama_dir), data=str(data), rank=4, steps=2, micro_batch=4, checkpoint_every=1),
        folder / "run",
        Console(file=io.StringIO()),
    )
    return folder / "run"


def test_only_the_adapter_folder_s_own_files_unless_asked(run, tmp_path):
    adapter, found = adapter_and_run(run)
    assert (adapter, found) == (run / "adapter", run) == adapter_and_run(run / "adapter")
    plain = files_to_push(adapter, run)
    assert set(plain) == {p.name for p in adapter.iterdir()} - {"README.md"}  # the pushed card replaces README.md
    with pytest.raises(UserError, match="no GGUF export"):
        files_to_push(adapter, run, gguf=True)
    (run / "adapter.gguf").write_bytes(b"GGUF")
    (run / "Modelfile").write_text("FROM ./adapter.gguf\n")
    try:
        assert set(files_to_push(adapter, run, gguf=True)) == set(plain) | {"adapter.gguf", "Modelfile"}
    finally:
        (run / "adapter.gguf").unlink()
        (run / "Modelfile").unlink()
    with_checkpoints = files_to_push(adapter, run, checkpoints=True)
    assert "checkpoints/step-2/optimizer.pt" in with_checkpoints and not any(
        name.startswith("checkpoints/") for name in plain
    )


def test_a_lone_adapter_folder_is_its_own_run_and_a_planted_link_stays_home(run, tmp_path):
    lone = tmp_path / "my-adapter"
    shutil.copytree(run / "adapter", lone)
    (tmp_path / "secret").write_text("not for the hub")
    (lone / "notes.txt").symlink_to(tmp_path / "secret")
    assert adapter_and_run(lone) == (lone, lone)
    assert "notes.txt" not in files_to_push(lone, lone)
    with pytest.raises(UserError, match="No run folder at"):
        adapter_and_run(tmp_path / "typo")


def test_the_pushed_files_name_the_base_by_its_hub_id_never_a_local_path(run):
    adapter = run / "adapter"
    with pytest.raises(UserError, match="trained on the local folder") as refused:
        hub_base(adapter)
    assert "--base ORG/NAME" in refused.value.hint
    base, local = hub_base(adapter, "org/tiny-llama@v1")
    assert (
        base == "org/tiny-llama"
        and local == json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    card = push_card(adapter, run, "me/fox", list(files_to_push(adapter, run)), base, local)
    assert local not in card and str(run) not in card and "base_model: org/tiny-llama" in card
    assert 'PeftModel.from_pretrained(base, "me/fox")' in card and "path/to/this/folder" not in card
    assert "predicted" in card and "fingerprint as `--resume` checks it" in card and "rank: 4" in card
