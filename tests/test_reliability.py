"""The fault catalogue: kills, signals, full disks, damaged checkpoints, NaN losses, unsafe names and files.

Subprocess tests run the real CLI on a tiny model, with each step slowed (a patch made in the child) so a
signal reliably lands mid-run.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from qlora_kit import checkpoint, run_folder, train
from qlora_kit.errors import UserError
from qlora_kit.recipes import Recipe
from qlora_kit.run_folder import named_run_dir
from qlora_kit.train import run_training

QUIET = Console(file=io.StringIO())
STEPS, EVERY = 20, 5

CHILD = """
import sys, time
import qlora_kit.train as train
original, delay = train.forward_backward, float(sys.argv[1])
def slow(*args, **kwargs):
    time.sleep(delay)
    return original(*args, **kwargs)
train.forward_backward = slow
sys.argv = ["qlora-kit", *sys.argv[2:]]
from qlora_kit.cli import main
main()
"""


def recipe_for(llama_dir, chat_data, **changes) -> Recipe:
    """The recipe the CLI builds from the flags in start_child (so a resume sees the same settings)."""
    settings = dict(model=str(llama_dir), data=str(chat_data), rank=4, steps=STEPS, micro_batch=2, checkpoint_every=EVERY)
    return Recipe(**{**settings, **changes})


def start_child(llama_dir, chat_data, out: Path, step_delay: float = 0.15, *extra: str) -> subprocess.Popen:
    args = ["--model", str(llama_dir), "--data", str(chat_data), "--rank", "4", "--steps", str(STEPS),
            "--micro-batch", "2", "--checkpoint-every", str(EVERY)]
    env = {**os.environ, "QLORA_KIT_CACHE": str(out.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(step_delay), "train", "--out", str(out), "--plain", *args, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1])


def wait_for_step(out: Path, step: int, child: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl records `step` (the child is then mid-way through a later one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line):
            return
        assert child.poll() is None, child.communicate()[0]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_run(resumed: Path, whole: Path) -> None:
    assert losses(resumed) == losses(whole), "every step's loss, before and after the resume, bit for bit"
    a, b = adapter_tensors(resumed), adapter_tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final adapter bit for bit"


@pytest.fixture
def whole_run(llama_dir, chat_data, tmp_path):
    """The uninterrupted reference run."""
    run_training(recipe_for(llama_dir, chat_data), tmp_path / "whole", QUIET)
    return tmp_path / "whole"


def test_a_run_killed_with_sigkill_resumes_exactly(llama_dir, chat_data, tmp_path, whole_run):
    out = tmp_path / "killed"
    child = start_child(llama_dir, chat_data, out)
    wait_for_step(out, 12, child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert max(losses(out)) >= 12 and not (out / "adapter").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(out)][0] == "step-10"
    console = Console(file=io.StringIO(), width=200)
    summary = run_training(recipe_for(llama_dir, chat_data), out, console, resume=True)
    assert "Resuming from step-10" in console.file.getvalue() and summary.steps == STEPS
    assert_same_run(out, whole_run)
    times = [m["time_s"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert times == sorted(times) and summary.seconds >= times[-1], "the run's clock goes on across the resume"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_first_signal_finishes_the_step_checkpoints_and_says_how_to_resume(llama_dir, chat_data, tmp_path, whole_run, sig, code):
    out = tmp_path / "stopped"
    child = start_child(llama_dir, chat_data, out)
    wait_for_step(out, 7, child)
    child.send_signal(sig)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == code, output
    stopped_at = max(losses(out))
    assert 7 <= stopped_at < STEPS and f"step-{stopped_at}" in [p.name for p in checkpoint.complete_checkpoints(out)]
    assert f"qlora-kit train --out {out} --resume" in output.replace("\n", "")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The resume command as printed, through the CLI: only --out and --resume.
    resumed = subprocess.run([sys.executable, "-m", "qlora_kit", "train", "--out", str(out), "--resume", "--quiet"],
                             capture_output=True, text=True, env={**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, whole_run)


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint_whole(llama_dir, chat_data, tmp_path):
    out = tmp_path / "twice"
    child = start_child(llama_dir, chat_data, out, 0.5)
    wait_for_step(out, 6, child)
    child.send_signal(signal.SIGINT)
    time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 130 and "Stopped at once" in output
    assert max(losses(out)) < 8, "it did not go on to finish another step"
    good, passed_over = checkpoint.latest_good_checkpoint(out)
    assert good.name == "step-5" and not passed_over and not list((out / "checkpoints").glob(".*"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(llama_dir, chat_data, tmp_path, whole_run):
    out = tmp_path / "damaged"
    run_training(recipe_for(llama_dir, chat_data, keep_checkpoints=3), out, QUIET)
    newest = out / "checkpoints" / "step-20" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    console = Console(file=io.StringIO(), width=200)
    run_training(recipe_for(llama_dir, chat_data, keep_checkpoints=3), out, console, resume=True)
    assert "step-20 is damaged (optimizer.pt has" in console.file.getvalue()
    assert "Resuming from step-15" in console.file.getvalue()
    assert losses(out) == losses(whole_run) and checkpoint.verify(out / "checkpoints" / "step-20") is None


def test_an_8bit_optimizer_resumes_exactly(llama_dir, chat_data, tmp_path):
    """bitsandbytes' 8-bit AdamW (paged, the default on a GPU; unpaged here) through a checkpoint: its quantized
    states and their scaling constants survive the name-keyed save and load."""
    # Rank 64 makes most LoRA matrices at least 4,096 values: bitsandbytes keeps smaller ones' states in 32-bit.
    recipe = recipe_for(llama_dir, chat_data, steps=8, checkpoint_every=4, keep_checkpoints=3, optimizer="adamw_8bit", rank=64)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_training(recipe, whole, QUIET)
    state = torch.load(whole / "checkpoints" / "step-8" / "optimizer.pt", weights_only=True)["state"]
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state.values()]  # how bitsandbytes nests them
    assert any({"state1", "state2", "qmap1", "absmax1"} <= set(q) and q["state1"].dtype == torch.uint8 for q in quantized)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    console = Console(file=io.StringIO(), width=200)
    run_training(recipe, resumed, console, resume=True)
    assert "Resuming from step-4" in console.file.getvalue() and "AdamW8bit" in console.file.getvalue()
    assert_same_run(resumed, whole)


def test_an_existing_run_needs_resume_or_overwrite(llama_dir, chat_data, tmp_path):
    recipe = recipe_for(llama_dir, chat_data, steps=2)
    run_training(recipe, tmp_path / "run", QUIET)
    with pytest.raises(UserError, match="already holds a run") as error:
        run_training(recipe, tmp_path / "run", QUIET)
    assert "--resume" in error.value.hint and "--overwrite" in error.value.hint
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run_training(recipe, tmp_path / "run", QUIET, overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine", "only the run's own files are replaced"
    assert len(losses(tmp_path / "run")) == 2
    with pytest.raises(UserError, match="these differ: rank"):
        run_training(recipe_for(llama_dir, chat_data, steps=2, rank=8), tmp_path / "run", QUIET, resume=True)
    with pytest.raises(UserError, match="holds no run to resume"):
        run_training(recipe, tmp_path / "empty", QUIET, resume=True)
    with pytest.raises(UserError, match="contradict"):
        run_training(recipe, tmp_path / "run", QUIET, resume=True, overwrite=True)


def test_too_little_disk_is_refused_before_anything_is_written(llama_dir, chat_data, tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with pytest.raises(UserError, match="MiB free; this run's checkpoints and adapter need about"):
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "run", QUIET)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops_clearly(llama_dir, chat_data, tmp_path, monkeypatch, fault):
    original = torch.save

    def failing(obj, path, *args, **kwargs):
        if "step-10" in str(path):
            raise fault
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing)
    with pytest.raises(UserError, match=f"Could not write the checkpoint of step 10: {fault.strerror}") as error:
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "run", QUIET)
    assert "step-5 is intact" in error.value.hint and "--resume" in error.value.hint
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "run")] == ["step-5"]
    assert checkpoint.verify(tmp_path / "run" / "checkpoints" / "step-5") is None
    assert not list((tmp_path / "run" / "checkpoints").glob(".*")), "the partial folder is cleaned up"


def test_a_removed_run_folder_mid_run_stops_clearly(llama_dir, chat_data, tmp_path, monkeypatch):
    import shutil

    original = checkpoint.save_checkpoint

    def remove_then_save(run_dir, step, *args, **kwargs):
        if step == 10:
            shutil.rmtree(run_dir)
            run_dir.write_text("not a folder any more")
        return original(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", remove_then_save)
    with pytest.raises(UserError, match="Could not write the checkpoint of step 10"):
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "run", QUIET)


def test_a_run_folder_deleted_mid_run_is_not_recreated_as_a_finished_run(llama_dir, chat_data, tmp_path, monkeypatch):
    original = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda run_dir, step, *args, **kwargs: (
        shutil.rmtree(run_dir) if step == 10 else original(run_dir, step, *args, **kwargs)))
    with pytest.raises(UserError, match=r"Could not write the checkpoint of step 15: .*run was deleted, moved or replaced"):
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "run", QUIET)
    assert not (tmp_path / "run").exists(), "no adapter/ or checkpoints/ without the run's recipe, plan and metrics"


def nan_on_steps(monkeypatch, bad_steps):
    """Make the loss NaN on the given optimizer steps (counted by forward_backward calls)."""
    original, calls = train.forward_backward, []

    def forward_backward(model, examples, shape, *args):
        calls.append(1)
        loss, tokens, padding = original(model, examples, shape, *args)
        if len(calls) in bad_steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return float("nan"), tokens, padding
        return loss, tokens, padding

    monkeypatch.setattr(train, "forward_backward", forward_backward)


def test_a_nan_step_is_skipped_and_counted(llama_dir, chat_data, tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, {3})
    summary = run_training(recipe_for(llama_dir, chat_data, steps=6), tmp_path / "run", QUIET)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m.get("skipped_update")] == [3] and summary.steps == 6
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "run").values())


def test_nan_steps_in_a_row_stop_the_run_without_a_nan_adapter(llama_dir, chat_data, tmp_path, monkeypatch):
    nan_on_steps(monkeypatch, set(range(3, 100)))
    with pytest.raises(UserError, match="NaN or infinite for 5 steps in a row \\(up to step 7\\)") as error:
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "run", QUIET)
    assert "weights are from step 2" in error.value.message and "--lr" in error.value.hint
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "run").values())


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/b", ".hidden", "", "x" * 101])
def test_run_names_cannot_leave_the_runs_folder(name):
    with pytest.raises(UserError, match="not a plain name"):
        named_run_dir(name)


def test_run_names_that_are_plain_stay_under_runs():
    assert named_run_dir("gemma-2b_v1.2") == Path("runs") / "gemma-2b_v1.2"


def test_adapters_are_read_only_as_safetensors(tmp_path):
    from qlora_kit.adapter import load_with_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="only as safetensors"):
        load_with_adapter(None, tmp_path)


def test_model_code_runs_only_when_trusted(llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from qlora_kit import model as models

    seen = []
    original = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda folder, **kwargs: seen.append(kwargs["trust_remote_code"]) or original(folder, **kwargs))
    models.load_tokenizer(llama_dir)
    models.load_tokenizer(llama_dir, trust_remote_code=True)
    assert seen == [False, True]


def test_a_full_disk_during_a_metrics_write_stops_clearly_and_the_run_resumes(llama_dir, chat_data, tmp_path, monkeypatch):
    from qlora_kit.dashboard import MetricsLog

    original = MetricsLog.write

    def torn(self, record):
        if record.get("step") == 7:
            self.file.write('{"step": 7, "loss": 5.4, "tok')  # what a full disk leaves: half a line
            self.file.flush()
            raise OSError(28, "No space left on device")
        return original(self, record)

    monkeypatch.setattr(MetricsLog, "write", torn)
    with pytest.raises(UserError, match="Could not write metrics.jsonl: No space left on device") as error:
        run_training(recipe_for(llama_dir, chat_data, steps=10), tmp_path / "run", QUIET)
    assert "--resume" in error.value.hint
    monkeypatch.undo()
    summary = run_training(recipe_for(llama_dir, chat_data, steps=10), tmp_path / "run", QUIET, resume=True)
    assert summary.steps == 10 and list(losses(tmp_path / "run")) == list(range(1, 11)), "the torn line is gone"


def truncate_adapter(folder: Path) -> None:
    weights = folder / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def drop_state(folder: Path) -> None:
    (folder / "state.pt").unlink()


def invalid_trainer_state(folder: Path) -> None:
    (folder / "trainer_state.json").write_text('{"step": "twenty"}')


def wrong_rank(folder: Path) -> None:
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))


@pytest.mark.parametrize("damage, problem", [
    (truncate_adapter, "does not open"), (drop_state, "does not list state.pt"),
    (invalid_trainer_state, "trainer_state.json is not a trainer state"), (wrong_rank, "do not have the rank 8"),
    (lambda folder: None, "manifest is missing or unreadable"),  # with "files": [1, 2] below
])
def test_damage_the_manifest_agrees_with_falls_back_to_the_checkpoint_before(llama_dir, chat_data, tmp_path, whole_run,
                                                                              damage, problem):
    out = tmp_path / "damaged"
    run_training(recipe_for(llama_dir, chat_data, keep_checkpoints=3), out, QUIET)
    newest = out / "checkpoints" / "step-20"
    damage(newest)
    (newest / "manifest.json").unlink()
    checkpoint.write_manifest(newest, 20)  # the manifest agrees with the damage: checksums alone cannot see it
    if problem.startswith("manifest"):
        (newest / "manifest.json").write_text('{"step": 20, "files": [1, 2]}')
    console = Console(file=io.StringIO(), width=300)
    run_training(recipe_for(llama_dir, chat_data, keep_checkpoints=3), out, console, resume=True)
    assert "step-20 is damaged (" in console.file.getvalue() and problem in console.file.getvalue()
    assert "Resuming from step-15" in console.file.getvalue()
    assert_same_run(out, whole_run)


@pytest.mark.parametrize("flag", ["--alpha", "--dropout", "--lr", "--epochs", "--eval-fraction"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused_before_a_folder_exists(llama_dir, chat_data, tmp_path, monkeypatch, capsys, flag, value):
    from qlora_kit import cli

    monkeypatch.setattr("sys.argv", ["qlora-kit", "train", "-m", str(llama_dir), "-d", str(chat_data), "--out",
                                     str(tmp_path / "run"), flag, value])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"is {float(value)!r}, but it must be a finite" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_summary_says_how_many_updates_were_skipped(llama_dir, chat_data, tmp_path, monkeypatch):
    from qlora_kit.dashboard import summary_table

    nan_on_steps(monkeypatch, {2, 4})
    summary = run_training(recipe_for(llama_dir, chat_data, steps=6), tmp_path / "run", QUIET)
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(summary, summary.info))
    assert summary.skipped_updates == 2 and "2 of 6 updates: the loss or gradient was NaN/inf" in console.file.getvalue()


@pytest.mark.parametrize("edit", [{"lr": 0.001}, {"rank": 8}])
def test_recipe_yaml_edited_between_stop_and_resume_is_refused(llama_dir, chat_data, tmp_path, edit):
    from qlora_kit.run_folder import recipe_of_run

    recipe = recipe_for(llama_dir, chat_data, steps=10)
    run_training(recipe, tmp_path / "run", QUIET)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-10")
    edited = Recipe(**{**recipe.__dict__, **edit})
    (tmp_path / "run" / "recipe.yaml").write_text(edited.to_yaml())
    name = next(iter(edit))
    with pytest.raises(UserError, match=f"these differ: {name} .* in the checkpoint"):
        run_training(recipe_of_run(tmp_path / "run"), tmp_path / "run", QUIET, resume=True)


def test_a_folder_that_cannot_be_written_is_one_sentence(llama_dir, chat_data, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="Cannot write the run folder .*a-file/run: Not a directory"):
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "a-file" / "run", QUIET)
    (tmp_path / "read-only").mkdir()

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_folder.os, "open", read_only)
    with pytest.raises(UserError, match="read-only: Read-only file system"):
        run_training(recipe_for(llama_dir, chat_data), tmp_path / "read-only", QUIET)


def test_a_recipe_yaml_with_a_python_tag_beside_an_adapter_is_one_sentence(tmp_path):
    from qlora_kit.adapter import run_settings
    from qlora_kit.report import load_run

    (tmp_path / "adapter").mkdir()
    (tmp_path / "recipe.yaml").write_text("rank: !!python/object/apply:os.system ['echo owned']\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "tokens": 1, "rss_gib": 0.1}) + "\n")
    for read in (lambda: run_settings(tmp_path / "adapter"), lambda: load_run(tmp_path)):
        with pytest.raises(UserError, match="recipe.yaml is not a recipe qlora-kit reads"):
            read()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pipe_or_device_as_data_says_what_it_is(tmp_path, kind):
    from qlora_kit.data import read_records

    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    with pytest.raises(UserError, match=f"is {'a pipe' if kind == 'fifo' else 'a device'}.*not a data file"):
        read_records(path)


def test_adapters_and_checkpoints_follow_the_umask(llama_dir, chat_data, tmp_path):
    old = os.umask(0o022)
    try:
        run_training(recipe_for(llama_dir, chat_data, steps=2), tmp_path / "run", QUIET)
    finally:
        os.umask(old)
    for folder in (tmp_path / "run" / "adapter", tmp_path / "run" / "checkpoints" / "step-2"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder


def test_force_starts_a_cpu_run_its_plan_says_cannot_fit(tmp_path):
    from qlora_kit.train import check_fits

    plan = {"plan": {"verdict": "does not fit", "total_bytes": 100 * 2**30, "micro_batch": 64, "seq_len": 4096},
            "target": {"capacity_bytes": 8 * 2**30, "name": "RAM"}, "fix": "--micro-batch 1"}
    with pytest.raises(UserError, match="This run needs about 100.0 GiB of RAM") as error:
        check_fits(plan, torch.device("cpu"), QUIET)
    assert "--force starts it anyway" in error.value.hint
    console = Console(file=io.StringIO(), width=300)
    check_fits(plan, torch.device("cpu"), console, force=True)
    assert "--force: this run needs about 100.0 GiB" in console.file.getvalue()


STUCK_CHILD = """
import hashlib, sys
import qlora_kit.train as train
original, calls, marker = train.forward_backward, [], sys.argv[1]
def stuck(*args, **kwargs):
    calls.append(1)
    if len(calls) == 7:
        open(marker, "w").close()  # tell the test the step is stuck now
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)  # minutes in one C call, as a huge CPU attention would be
    return original(*args, **kwargs)
train.forward_backward = stuck
sys.argv = ["qlora-kit", *sys.argv[2:]]
from qlora_kit.cli import main
main()
"""


def test_two_signals_stop_a_step_stuck_in_one_long_call_and_the_run_resumes_exactly(llama_dir, chat_data, tmp_path, whole_run):
    out, stuck = tmp_path / "stuck", tmp_path / "stuck-now"
    args = ["--model", str(llama_dir), "--data", str(chat_data), "--rank", "4", "--steps", str(STEPS), "--micro-batch", "2",
            "--checkpoint-every", str(EVERY)]
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", STUCK_CHILD, str(stuck), "train", "--out", str(out), "--plain", *args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 120
    while not stuck.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output = child.communicate(timeout=30)[0]
    assert child.returncode == 143 and time.monotonic() - sent < 10, output
    assert "Stopped at once. Resume from step-5 with: qlora-kit train --out" in output and "Traceback" not in output
    run_training(recipe_for(llama_dir, chat_data), out, QUIET, resume=True)
    assert_same_run(out, whole_run)
