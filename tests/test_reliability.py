"""The fault catalogue: kills, signals, full disks, damaged checkpoints, NaN losses, unsafe names and files.

Subprocess tests run the real CLI on a tiny model, with each step slowed (a patch made in the child) so a
signal reliably lands mid-run.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from qlora_kit.cli import app as cli
from qlora_kit.errors import UserError
from qlora_kit.plan.recipes import Recipe, load_recipe
from qlora_kit.probe.sources import IDENTITY_FILE, model_identity
from qlora_kit.train import checkpoint, loop, run as train, run_folder
from qlora_kit.train.run import RunOptions, run_training
from qlora_kit.train.run_folder import named_run_dir
from tests.tiny_models import save_tiny_model

QUIET = Console(file=io.StringIO())
STEPS, EVERY = 20, 5

CHILD = """
import sys, time
import qlora_kit.train.loop as loop
original, delay = loop.forward_backward, float(sys.argv[1])
def slow(*args, **kwargs):
    time.sleep(delay)
    return original(*args, **kwargs)
loop.forward_backward = slow
sys.argv = ["qlora-kit", *sys.argv[2:]]
from qlora_kit.cli.app import main
main()
"""


def recipe_for(llama_dir, chat_data, **changes) -> Recipe:
    """The recipe the CLI builds from the flags in start_child (so a resume sees the same settings)."""
    settings = dict(
        model=str(llama_dir), data=str(chat_data), rank=4, steps=STEPS, micro_batch=2, checkpoint_every=EVERY
    )
    return Recipe(**{**settings, **changes})


def start_child(llama_dir, chat_data, out: Path, step_delay: float = 0.15, *extra: str) -> subprocess.Popen:
    args = [
        "--model",
        str(llama_dir),
        "--data",
        str(chat_data),
        "--rank",
        "4",
        "--steps",
        str(STEPS),
        "--micro-batch",
        "2",
        "--checkpoint-every",
        str(EVERY),
    ]
    env = {**os.environ, "QLORA_KIT_CACHE": str(out.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(step_delay), "train", "--out", str(out), "--plain", *args, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parents[1],
    )


def wait_for_step(out: Path, step: int, child: subprocess.Popen, timeout: float = 120) -> None:
    """Block until metrics.jsonl records `step` (the child is then mid-way through a later one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line
        ):
            return
        assert child.poll() is None, child.communicate()[0]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def losses(out: Path) -> dict[int, float]:
    return {
        m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    }


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
    summary = run_training(recipe_for(llama_dir, chat_data), out, console, RunOptions(resume=True))
    assert "Resuming from step-10" in console.file.getvalue() and summary.steps == STEPS
    assert_same_run(out, whole_run)
    times = [m["time_s"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert times == sorted(times) and summary.seconds >= times[-1], "the run's clock goes on across the resume"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_first_signal_finishes_the_step_checkpoints_and_says_how_to_resume(
    llama_dir, chat_data, tmp_path, whole_run, sig, code
):
    out = tmp_path / "stopped"
    child = start_child(llama_dir, chat_data, out)
    wait_for_step(out, 7, child)
    child.send_signal(sig)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == code, output
    stopped_at = max(losses(out))
    assert 7 <= stopped_at < STEPS and f"step-{stopped_at}" in [p.name for p in checkpoint.complete_checkpoints(out)]
    # On one line whatever the width (the path is longer than 80 columns), so it copies as one command.
    assert f"Resume with: qlora-kit train --out {out} --resume\n" in output, output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The resume command as printed, through the CLI: only --out and --resume.
    resumed = subprocess.run(
        [sys.executable, "-m", "qlora_kit", "train", "--out", str(out), "--resume", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache")},
    )
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
    assert child.returncode == 130 and "Stopped at once" in output, output
    assert max(losses(out)) < 8, "it did not go on to finish another step"
    good, passed_over = checkpoint.latest_good_checkpoint(out)
    assert good.name == "step-5" and not passed_over and not list((out / "checkpoints").glob(".*"))


def test_an_8bit_optimizer_resumes_exactly(llama_dir, chat_data, tmp_path):
    """bitsandbytes' 8-bit AdamW (paged, the default on a GPU; unpaged here) through a checkpoint: its quantized
    states and their scaling constants survive the name-keyed save and load."""
    # Rank 64 makes most LoRA matrices at least 4,096 values: bitsandbytes keeps smaller ones' states in 32-bit.
    recipe = recipe_for(
        llama_dir, chat_data, steps=8, checkpoint_every=4, keep_checkpoints=3, optimizer="adamw_8bit", rank=64
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_training(recipe, whole, QUIET)
    state = torch.load(whole / "checkpoints" / "step-8" / "optimizer.pt", weights_only=True)["state"]
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state.values()]  # how bitsandbytes nests them
    assert any(
        {"state1", "state2", "qmap1", "absmax1"} <= set(q) and q["state1"].dtype == torch.uint8 for q in quantized
    )
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    console = Console(file=io.StringIO(), width=200)
    run_training(recipe, resumed, console, RunOptions(resume=True))
    assert "Resuming from step-4" in console.file.getvalue() and "AdamW8bit" in console.file.getvalue()
    assert_same_run(resumed, whole)


def test_an_existing_run_needs_resume_or_overwrite(llama_dir, chat_data, tmp_path):
    recipe = recipe_for(llama_dir, chat_data, steps=2)
    run_training(recipe, tmp_path / "run", QUIET)
    with pytest.raises(UserError, match="already holds a run") as error:
        run_training(recipe, tmp_path / "run", QUIET)
    assert "--resume" in error.value.hint and "--overwrite" in error.value.hint
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run_training(recipe, tmp_path / "run", QUIET, RunOptions(overwrite=True))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine", "only the run's own files are replaced"
    assert len(losses(tmp_path / "run")) == 2
    with pytest.raises(UserError, match="these differ: rank"):
        run_training(
            recipe_for(llama_dir, chat_data, steps=2, rank=8), tmp_path / "run", QUIET, RunOptions(resume=True)
        )
    with pytest.raises(UserError, match="holds no run to resume"):
        run_training(recipe, tmp_path / "empty", QUIET, RunOptions(resume=True))
    with pytest.raises(UserError, match="contradict"):
        run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True, overwrite=True))


@pytest.mark.parametrize("name", ["../escape", "/etc", "a/b", ".hidden", "", "x" * 101])
def test_run_names_cannot_leave_the_runs_folder(name):
    with pytest.raises(UserError, match="not a plain name"):
        named_run_dir(name)


def test_run_names_that_are_plain_stay_under_runs():
    assert named_run_dir("gemma-2b_v1.2") == Path("runs") / "gemma-2b_v1.2"


def test_adapters_are_read_only_as_safetensors(tmp_path):
    from qlora_kit.adapter.folder import load_with_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="only as safetensors"):
        load_with_adapter(None, tmp_path)


def test_model_code_runs_only_when_trusted(llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from qlora_kit.model import load as models

    seen = []
    original = AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        lambda folder, **kwargs: seen.append(kwargs["trust_remote_code"]) or original(folder, **kwargs),
    )
    models.load_tokenizer(llama_dir)
    models.load_tokenizer(llama_dir, trust_remote_code=True)
    assert seen == [False, True]


def test_force_starts_a_cpu_run_its_plan_says_cannot_fit(tmp_path):
    from qlora_kit.plan.memory import MemoryPlan
    from qlora_kit.plan.planner import PlanReport, Target
    from qlora_kit.train.run import check_fits

    needs = MemoryPlan("m", "cpu", 4096, 64, 8, {"activations": 100 * 2**30}, 0, 0, 0, capacity_bytes=8 * 2**30)
    plan = PlanReport(needs, Target("RAM", "cpu", 8 * 2**30), 512, 1, "--micro-batch 1")
    with pytest.raises(UserError, match="This run needs about 100.0 GiB of RAM") as error:
        check_fits(plan, torch.device("cpu"), QUIET)
    assert "--force starts it anyway" in error.value.hint
    console = Console(file=io.StringIO(), width=300)
    check_fits(plan, torch.device("cpu"), console, force=True)
    assert "--force: this run needs about 100.0 GiB" in console.file.getvalue()


STUCK_CHILD = """
import hashlib, sys
import qlora_kit.train.loop as loop
original, calls, marker = loop.forward_backward, [], sys.argv[1]
def stuck(*args, **kwargs):
    calls.append(1)
    if len(calls) == 7:
        open(marker, "w").close()  # tell the test the step is stuck now
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)  # minutes in one C call, as a huge CPU attention would be
    return original(*args, **kwargs)
loop.forward_backward = stuck
sys.argv = ["qlora-kit", *sys.argv[2:]]
from qlora_kit.cli.app import main
main()
"""


def test_two_signals_stop_a_step_stuck_in_one_long_call_and_the_run_resumes_exactly(
    llama_dir, chat_data, tmp_path, whole_run
):
    out, stuck = tmp_path / "stuck", tmp_path / "stuck-now"
    args = [
        "--model",
        str(llama_dir),
        "--data",
        str(chat_data),
        "--rank",
        "4",
        "--steps",
        str(STEPS),
        "--micro-batch",
        "2",
        "--checkpoint-every",
        str(EVERY),
    ]
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", STUCK_CHILD, str(stuck), "train", "--out", str(out), "--plain", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parents[1],
    )
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
    run_training(recipe_for(llama_dir, chat_data), out, QUIET, RunOptions(resume=True))
    assert_same_run(out, whole_run)


# The fault catalogue: every fault a user can meet, as they meet it, through the CLI in this process. Each row says
# what it does to the run, the exit code, the one line that must say what happened (no traceback), and what must
# hold afterwards: in most rows that `train --out X --resume` finishes the run bit for bit as if nothing happened.
# Faults are injected through the code's own write helpers; a kill is an exception nothing but `finally` sees.
# The faults only a separate process can meet (SIGKILL, signals, a step stuck in C, Ctrl-C to parallel tokenizing
# workers) are the subprocess tests above, the kill at every write point below, and test_data.py's Ctrl-C test.
# docs/training.md's table follows this one.


class Killed(BaseException):
    """A SIGKILL at that instant, as far as the run's files can tell: nothing runs after it but `finally` blocks."""


@dataclass
class Case:
    """What a catalogue row works with: the reference run, the row's own folder, and the fault's patches."""

    ref: SimpleNamespace
    tmp: Path
    patches: pytest.MonkeyPatch
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    cleanup: contextlib.ExitStack

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    def train(self, *extra, out: Path | None = None, model: Path | None = None, data: Path | None = None) -> list:
        """The reference run's command line, into this row's folder."""
        return [
            "train",
            "--out",
            out or self.out,
            "--model",
            model or self.ref.model,
            "--data",
            data or self.ref.data,
            "--rank",
            "4",
            "--steps",
            STEPS,
            "--micro-batch",
            "2",
            "--checkpoint-every",
            EVERY,
            "--plain",
            *extra,
        ]

    def resume(self) -> list:
        return ["train", "--out", self.out, "--resume", "--plain"]

    def copy_of_reference(self, stopped_at: int | None = None) -> None:
        """The reference run in this row's folder; stopped_at drops the checkpoints after that step, as a stop there."""
        shutil.copytree(self.ref.run, self.out)
        for folder in checkpoint.complete_checkpoints(self.out):
            if stopped_at and checkpoint.step_of(folder) > stopped_at:
                shutil.rmtree(folder)

    def cli(self, *args) -> tuple[int, str, str]:
        """Run `qlora-kit ARGS` in this process: (exit code, stdout, stderr)."""
        self.monkeypatch.setattr("sys.argv", ["qlora-kit", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out, err = self.capsys.readouterr()
        return exit_info.value.code, out, err


def resumes_exactly(case: Case) -> None:
    code, out, err = case.cli(*case.resume())
    assert code == 0, out + err
    assert_same_run(case.out, case.ref.run)


def same_as_reference(case: Case) -> None:
    assert_same_run(case.out, case.ref.run)


def no_run_left(case: Case) -> None:
    assert not run_folder.holds_run(case.out), "nothing that blocks this --out"


def runs_when_trusted(command: Callable[[Case], list]) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        code, out, err = case.cli(*command(case), "--trust-remote-code")
        assert code == 0, out + err

    return check


def finite_adapter(case: Case) -> None:
    assert all(torch.isfinite(t).all() for t in adapter_tensors(case.out).values())


def nothing_ran(case: Case) -> None:
    assert not (case.tmp / "owned").exists(), "the recipe's !!python tag ran"


def full_disk_mid_metrics(case: Case, patches) -> list:
    from qlora_kit.train.dashboard import MetricsLog

    original = MetricsLog.write

    def torn(self, record):
        if record.get("step") == 7:
            self.file.write('{"step": 7, "loss": 5.4, "tok')  # what a full disk leaves: half a line
            self.file.flush()
            raise OSError(28, "No space left on device")
        return original(self, record)

    patches.setattr(MetricsLog, "write", torn)
    return case.train()


def torn_metrics_line(case: Case, patches) -> list:
    case.copy_of_reference(stopped_at=15)
    with open(case.out / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "loss": 5.4, "lr": 0.0')
    return case.resume()


def failed_checkpoint_write(error: OSError):
    def cause(case: Case, patches) -> list:
        original = torch.save
        patches.setattr(
            checkpoint.torch,
            "save",
            lambda obj, path, *args, **kwargs: (
                _raise(error) if "step-10" in str(path) else original(obj, path, *args, **kwargs)
            ),
        )
        return case.train()

    return cause


def _raise(error: BaseException):
    raise error


def little_disk(case: Case, patches) -> list:
    patches.setattr(run_folder.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    return case.train()


def killed_rewriting_metrics(case: Case, patches) -> list:
    case.copy_of_reference(stopped_at=15)
    patches.setattr(run_folder.os, "fsync", lambda fd: _raise(Killed()))
    return case.resume()


def deleted_mid_run(case: Case, patches) -> list:
    original = checkpoint.save_checkpoint
    patches.setattr(
        checkpoint,
        "save_checkpoint",
        lambda run_dir, step, *args, **kwargs: (
            shutil.rmtree(run_dir) if step == 10 else original(run_dir, step, *args, **kwargs)
        ),
    )
    return case.train()


def replaced_by_a_file_mid_run(case: Case, patches) -> list:
    original = checkpoint.save_checkpoint

    def replace_then_save(run_dir, step, *args, **kwargs):
        if step == 10:
            shutil.rmtree(run_dir)
            run_dir.write_text("not a folder any more")
        return original(run_dir, step, *args, **kwargs)

    patches.setattr(checkpoint, "save_checkpoint", replace_then_save)
    return case.train()


def plan_cannot_fit(case: Case, patches) -> list:
    from qlora_kit.probe.hardware import probe

    patches.setattr(train, "probe", lambda **kwargs: replace(probe(**kwargs), ram_available_gib=0.001))
    return case.train()


def torn_optimizer(folder: Path) -> None:
    state = folder / "optimizer.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


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


def damaged_checkpoint(damage: Callable[[Path], None], manifest_agrees: bool = True):
    """Damage the newest checkpoint; manifest_agrees rewrites its manifest to match, so checksums alone cannot see it."""

    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        newest = case.out / "checkpoints" / f"step-{STEPS}"
        damage(newest)
        if manifest_agrees:
            (newest / "manifest.json").unlink()
            checkpoint.write_manifest(newest, STEPS)
        return case.resume()

    return cause


def garbled_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"step": 20, "files": [1, 2]}')


def nan_on_steps(monkeypatch, bad_steps: set) -> None:
    """Make the loss NaN on the given optimizer steps (counted by forward_backward calls)."""
    original, calls = loop.forward_backward, []

    def forward_backward(state, *args):
        calls.append(1)
        loss, tokens, padding, stats = original(state, *args)
        if len(calls) in bad_steps:
            for p in state.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return float("nan"), tokens, padding, stats
        return loss, tokens, padding, stats

    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def nan_updates(steps: set):
    def cause(case: Case, patches) -> list:
        nan_on_steps(patches, steps)
        return case.train()

    return cause


def recipe_edited(edit: dict):
    def cause(case: Case, patches) -> list:
        case.copy_of_reference(stopped_at=15)
        recipe = load_recipe(case.out / "recipe.yaml")
        (case.out / "recipe.yaml").write_text(Recipe(**{**recipe.__dict__, **edit}).to_yaml())
        return case.resume()

    return cause


def recipe_put_back(case: Case) -> None:
    shutil.copy(case.ref.run / "recipe.yaml", case.out / "recipe.yaml")
    resumes_exactly(case)


def unwritable_out(error: OSError):
    def cause(case: Case, patches) -> list:
        case.out.mkdir()
        patches.setattr(run_folder.os, "open", lambda *args, **kwargs: _raise(error))
        return case.train()

    return cause


def out_under_a_file(case: Case, patches) -> list:
    (case.tmp / "a-file").write_text("")
    return case.train(out=case.tmp / "a-file" / "run")


def with_python_tag(command: Callable[[Case], list]):
    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        (case.out / "recipe.yaml").write_text(f"rank: !!python/object/apply:os.system ['touch {case.tmp}/owned']\n")
        return command(case)

    return cause


def deep_json_data(command: str):
    def cause(case: Case, patches) -> list:
        deep = case.tmp / "deep.jsonl"
        deep.write_text('{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        return ["data", "check", deep] if command == "data check" else case.train(data=deep)

    return cause


def fifo_as_data(case: Case, patches) -> list:
    os.mkfifo(case.tmp / "pipe")
    return case.train(data=case.tmp / "pipe")


def with_umask(case: Case, patches) -> list:
    case.cleanup.callback(os.umask, os.umask(0o027))
    return case.train()


def folders_follow_umask(case: Case) -> None:
    for folder in (case.out / "adapter", case.out / "checkpoints" / f"step-{STEPS}"):
        assert folder.stat().st_mode & 0o777 == 0o750, folder


def trained_with_custom_tokenizer(case: Case) -> list:
    return case.train(model=case.ref.custom_tokenizer)


def generate_with(model_key: str):
    return lambda case: ["generate", "--model", getattr(case.ref, model_key), "--prompt", "hi", "--max-new-tokens", "2"]


def eval_with_custom_tokenizer(case: Case) -> list:
    return ["eval", "--model", case.ref.custom_tokenizer, "--data", case.ref.data]


def merge_into_custom_model(case: Case) -> list:
    return [
        "merge",
        "--adapter",
        case.ref.custom_model_adapter,
        "--model",
        case.ref.custom_model,
        "--out",
        case.tmp / "merged",
    ]


def data_check_with_custom_tokenizer(case: Case) -> list:
    return ["data", "check", case.ref.data, "--model", case.ref.custom_tokenizer]


def as_is(command: Callable[[Case], list]):
    return lambda case, patches: command(case)


def export_with(fault: Callable[[Case, pytest.MonkeyPatch], list]):
    """`qlora-kit export` of a copy of the reference run's adapter, with what fault adds to the command line."""

    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        return ["export", "--adapter", case.out / "adapter", *fault(case, patches)]

    return cause


def base_gone(case: Case, patches) -> list:
    recipe = load_recipe(case.out / "recipe.yaml")
    (case.out / "recipe.yaml").write_text(replace(recipe, model=str(case.tmp / "moved-away")).to_yaml())
    return []


def base_of_another_architecture(case: Case, patches) -> list:
    shutil.copytree(case.ref.model, case.tmp / "neox")
    config = json.loads((case.tmp / "neox" / "config.json").read_text())
    (case.tmp / "neox" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    return ["--model", case.tmp / "neox"]


def no_llama_cpp(case: Case, patches) -> list:
    patches.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    return ["--format", "gguf", "--quant", "q4_k_m"]


def full_disk_mid_export(case: Case, patches) -> list:
    import gguf

    def torn(writer, *args, **kwargs):
        writer.fout[0].write(b"\0" * 1000)  # part of the tensors, then the disk is full
        raise OSError(28, "No space left on device")

    patches.setattr(gguf.GGUFWriter, "write_tensors_to_file", torn)
    return ["--format", "gguf"]


def little_ram(case: Case, patches) -> list:
    patches.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=10 * 2**20))
    return ["--format", "gguf"]


def nothing_exported(case: Case) -> None:
    left = [path.name for path in case.tmp.rglob("*") if ".gguf" in path.name or path.name.endswith(".partial")]
    assert not left, f"half-written files left: {left}"


# Issue 31's faults: export, --from-adapter, DPO, generate, report and plan under faults and hostile files.


def file_states(folder: Path) -> dict[str, tuple]:
    """Every file and link under folder, by path: its bytes' hash or where the link points."""
    import hashlib

    states = {}
    for path in folder.rglob("*"):
        if path.is_symlink():
            states[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            states[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return states


def run_adapter(case: Case) -> Path:
    return case.out / "adapter"


def with_reference(command: Callable[[Case], list]):
    """command, on a copy of the reference run."""

    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        return command(case)

    return cause


def base_replaced_by(model_key: str, command: Callable[[Case], list]):
    """command, after the reference run's base (here at tmp/base, as its recipe and adapter record) was replaced by
    another model under the same path."""

    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        base = shutil.copytree(case.ref.model, case.tmp / "base")
        (run_adapter(case) / IDENTITY_FILE).write_text(json.dumps(model_identity(base, str(base))))
        recipe = load_recipe(case.out / "recipe.yaml")
        (case.out / "recipe.yaml").write_text(replace(recipe, model=str(base)).to_yaml())
        shutil.rmtree(base)
        shutil.copytree(getattr(case.ref, model_key), base)
        return command(case)

    return cause


def adapter_from_elsewhere(case: Case, patches) -> list:
    """A plain PEFT adapter (no base_model.json, its base not on this machine) on a model of other shapes."""
    case.copy_of_reference()
    (run_adapter(case) / IDENTITY_FILE).unlink()
    config = json.loads((run_adapter(case) / "adapter_config.json").read_text())
    (run_adapter(case) / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "someone/else"})
    )
    return ["generate", "--adapter", run_adapter(case), "--model", case.ref.narrow, "--prompt", "hi"]


def gemma_adapter(case: Case, patches) -> list:
    """An adapter recorded as trained on a Gemma of the same shapes, to start a run on the Llama from."""
    case.copy_of_reference()
    (run_adapter(case) / IDENTITY_FILE).write_text(json.dumps(model_identity(case.ref.gemma, str(case.ref.gemma))))
    return case.train("--from-adapter", run_adapter(case), out=case.tmp / "second")


def edited_adapter_config(edit: dict, command: Callable[[Case], list]):
    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        config = json.loads((run_adapter(case) / "adapter_config.json").read_text())
        (run_adapter(case) / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        return command(case)

    return cause


def damaged_adapter_file(name: str, content: Callable[[bytes], bytes], command: Callable[[Case], list]):
    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        path = run_adapter(case) / name
        path.write_bytes(content(path.read_bytes()))
        return command(case)

    return cause


def export_of(case: Case, *flags) -> list:
    return ["export", "--adapter", run_adapter(case), *flags]


def generate_of(case: Case) -> list:
    return ["generate", "--adapter", run_adapter(case), "--prompt", "hi", "--max-new-tokens", "2"]


def victim(case: Case) -> Path:
    return case.tmp / "victim"


def links_planted(*names: str, flags: tuple = ()):
    """An export after links to a file of the user's were planted at the output's names (and the old fixed staging
    name) in the run folder."""

    def cause(case: Case, patches) -> list:
        case.copy_of_reference()
        victim(case).write_bytes(b"precious")
        for name in names:
            (case.out / name).symlink_to(victim(case))
        return export_of(case, *flags)

    return cause


def links_replaced_not_followed(*names: str):
    def check(case: Case) -> None:
        assert victim(case).read_bytes() == b"precious"
        for name in names:
            assert (case.out / name).is_file() and not (case.out / name).is_symlink(), name
        assert not [p.name for p in case.out.iterdir() if p.name.endswith(".partial") and not p.is_symlink()]

    return check


def full_disk_mid_modelfile(case: Case, patches) -> list:
    original = Path.write_text

    def torn(path, text, *args, **kwargs):
        if path.name != "Modelfile":
            return original(path, text, *args, **kwargs)
        original(path, text[:10])
        raise OSError(28, "No space left on device")

    patches.setattr(Path, "write_text", torn)
    case.copy_of_reference()
    return export_of(case, "--ollama")


def run_folder_in_use(case: Case, patches) -> list:
    from qlora_kit.files import release_lock

    case.copy_of_reference(stopped_at=15)
    held = run_folder.lock(case.out)
    case.cleanup.callback(release_lock, case.out / run_folder.LOCK, held)
    return case.resume()


def export_already_running(case: Case, patches) -> list:
    from qlora_kit.files import only_writer

    case.copy_of_reference()
    case.cleanup.enter_context(only_writer(case.out / "adapter.gguf", "exporting to"))
    return export_of(case)


def full_disk_mid_adapter_export(case: Case, patches) -> list:
    full_disk_mid_export(case, patches)
    return ["--format", "gguf-adapter"]


def preference_pairs(case: Case) -> Path:
    """DPO pairs whose answers differ only past 16 tokens (they start alike), and pairs that differ early."""
    alike = " ".join(["four five"] * 12)
    pairs = [
        {"prompt": "one two three?", "chosen": alike + " paris, arr!", "rejected": alike + " one"},
        {"prompt": "one two three?", "chosen": "four five, arr!", "rejected": "paris"},
    ] * 2
    return write_lines(case.tmp / "pairs.jsonl", pairs)


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reference_damaged_on_resume(case: Case, patches) -> list:
    """A DPO run with a precomputed reference, stopped at step 2, its reference file torn before the resume."""
    data = write_lines(
        case.tmp / "dpo.jsonl",
        [
            {"prompt": "one two three?", "chosen": "four five, arr!", "rejected": "paris"},
            {"prompt": "what is the capital?", "chosen": "paris, arr!", "rejected": "four"},
        ]
        * 2,
    )
    code, out, err = case.cli(
        "train",
        "--out",
        case.out,
        "--model",
        case.ref.model,
        "--data",
        data,
        "--method",
        "dpo",
        "--reference",
        "precomputed",
        "--rank",
        "4",
        "--steps",
        "4",
        "--micro-batch",
        "2",
        "--checkpoint-every",
        "2",
        "--plain",
    )
    assert code in (0, None), out + err
    shutil.rmtree(case.out / "checkpoints" / "step-4")
    kept = case.out / run_folder.REFERENCE_FILE
    kept.write_bytes(kept.read_bytes()[:40])
    return case.resume()


def reference_computed_again(case: Case) -> None:
    from safetensors import safe_open

    with safe_open(case.out / run_folder.REFERENCE_FILE, "pt") as kept:
        assert set(kept.keys()) == {"train"}


def config_of_base(config: dict | str, command: Callable[[Case, Path], list]):
    """command on a copy of the tiny model whose config.json is `config` (text as it is, or a dict as JSON)."""

    def cause(case: Case, patches) -> list:
        base = shutil.copytree(case.ref.model, case.tmp / "base")
        (base / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return command(case, base)

    return cause


def sizes(**changes) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        **changes,
    }


def plan_of(case: Case, base: Path) -> list:
    return ["plan", "--model", base, "--vram", "8"]


def train_on(case: Case, base: Path) -> list:
    return case.train(model=base)


def with_report_folder(case: Case, patches) -> list:
    case.copy_of_reference()
    (case.tmp / "plots").mkdir()
    return ["report", case.out, "--png", case.tmp / "plots"]


def plot_in_the_folder(case: Case) -> None:
    assert (case.tmp / "plots" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bad_line_in(name: str, command: Callable[[Case, Path], list]):
    def cause(case: Case, patches) -> list:
        data = case.tmp / name
        data.write_text(case.ref.data.read_text() + "not json\n")
        return command(case, data)

    return cause


def into_folder(name: str, cause: Callable[[Case, pytest.MonkeyPatch], list]):
    """cause's training run, with --out tmp/name."""

    def wrapped(case: Case, patches) -> list:
        cause(case, patches)
        return case.train(out=case.tmp / name)

    return wrapped


def umask_022(case: Case, patches) -> list:
    case.cleanup.callback(os.umask, os.umask(0o022))
    return case.train()


def files_follow_umask_022(case: Case) -> None:
    for path in (
        case.out / "adapter",
        case.out / "adapter" / "adapter_model.safetensors",
        case.out / "adapter" / IDENTITY_FILE,
        case.out / "checkpoints" / f"step-{STEPS}" / "adapter" / "adapter_model.safetensors",
    ):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def recorded_absolute_paths(case: Case, patches) -> list:
    """A run started with --model and --data relative to the folder it started in."""
    shutil.copytree(case.ref.model, case.tmp / "tiny")
    shutil.copy(case.ref.data, case.tmp / "chat.jsonl")
    case.monkeypatch.chdir(case.tmp)
    return case.train("--steps", "2", model=Path("tiny"), data=Path("chat.jsonl"))


def paths_absolute_in_the_run(case: Case) -> None:
    recipe = load_recipe(case.out / "recipe.yaml")
    assert recipe.model == str(case.tmp / "tiny") and recipe.data == str(case.tmp / "chat.jsonl")
    assert json.loads((case.out / "adapter" / IDENTITY_FILE).read_text())["path"] == str(case.tmp / "tiny")


def model_file_written(name: str):
    return lambda case: (case.out / name).stat().st_size > 0


def ollama_modelfile_from_anywhere(case: Case) -> None:
    links_replaced_not_followed("Modelfile", "adapter.gguf")(case)
    from_line = next(line for line in (case.out / "Modelfile").read_text().splitlines() if line.startswith("FROM "))
    assert Path(from_line.removeprefix("FROM ")).is_absolute(), from_line


@dataclass(frozen=True)
class Fault:
    item: int  # its number in the issue that listed the faults (18; 11: export's, from 19; 12-20: issue 31's 1-9;
    # 0: the table's rows from the run-folder issue, whose lock and fingerprints tests/test_run_folder.py tests too)
    name: str
    cause: Callable  # (case, patches) -> the command line, with the fault set up
    code: int | None  # the exit code; None: the process was killed
    says: str  # regex: the one error line when code is 1, else what the output shows
    then: Callable[[Case], None] | None = resumes_exactly
    hint: str = ""  # regex the hint line must match


TRUSTED = "ships its own Python code .* only when you allow it"
FINITE = "is (nan|inf), but it must be a finite"
FAULTS = [
    Fault(
        1,
        "full disk during a metrics write",
        full_disk_mid_metrics,
        1,
        "Could not write metrics.jsonl: No space left on device",
        hint="--resume",
    ),
    Fault(1, "torn last line in metrics.jsonl", torn_metrics_line, 0, "Resuming from step-15", same_as_reference),
    Fault(
        1,
        "full disk during a checkpoint write",
        failed_checkpoint_write(OSError(28, "No space left on device")),
        1,
        "Could not write the checkpoint of step 10: No space left on device",
        hint="step-5 is intact.*--resume",
    ),
    Fault(
        1,
        "no permission to write a checkpoint",
        failed_checkpoint_write(PermissionError(13, "Permission denied")),
        1,
        "Could not write the checkpoint of step 10: Permission denied",
        hint="step-5 is intact",
    ),
    Fault(
        1,
        "too little disk for the run",
        little_disk,
        1,
        "MiB free; this run's checkpoints and adapter need about",
        no_run_left,
    ),
    Fault(2, "kill while a resume rewrites metrics.jsonl", killed_rewriting_metrics, None, "", resumes_exactly),
    Fault(
        3,
        "run folder deleted mid-run",
        deleted_mid_run,
        1,
        "Could not write the checkpoint of step 15: .*run was deleted, moved or replaced",
        lambda case: not case.out.exists(),
    ),
    Fault(
        3,
        "run folder replaced by a file mid-run",
        replaced_by_a_file_mid_run,
        1,
        "Could not write the checkpoint of step 10",
        lambda case: case.out.is_file(),
    ),
    Fault(
        4,
        "a run its plan says cannot fit",
        plan_cannot_fit,
        1,
        r"This run needs about .* GiB of RAM .*, and 0.0 GiB is free",
        no_run_left,
        hint="--force starts it anyway",
    ),
    Fault(
        5,
        "torn optimizer state",
        damaged_checkpoint(torn_optimizer, manifest_agrees=False),
        0,
        "step-20 is damaged \\(optimizer.pt has",
        same_as_reference,
    ),
    Fault(
        5,
        "truncated adapter, manifest agrees",
        damaged_checkpoint(truncate_adapter),
        0,
        "step-20 is damaged .*does not open",
        same_as_reference,
    ),
    Fault(
        5,
        "state file dropped, manifest agrees",
        damaged_checkpoint(drop_state),
        0,
        "does not list state.pt",
        same_as_reference,
    ),
    Fault(
        5,
        "invalid trainer_state.json, manifest agrees",
        damaged_checkpoint(invalid_trainer_state),
        0,
        "trainer_state.json is not a trainer state",
        same_as_reference,
    ),
    Fault(
        5,
        "adapter of another rank, manifest agrees",
        damaged_checkpoint(wrong_rank),
        0,
        "do not have the rank 8",
        same_as_reference,
    ),
    Fault(
        5,
        "manifest listing numbers",
        damaged_checkpoint(garbled_manifest, manifest_agrees=False),
        0,
        "manifest is missing or unreadable",
        same_as_reference,
    ),
    *[
        Fault(
            6,
            f"{flag} {value}",
            as_is(lambda case, flag=flag, value=value: case.train(flag, value)),
            1,
            FINITE,
            no_run_left,
        )
        for flag, value in [
            ("--alpha", "nan"),
            ("--dropout", "inf"),
            ("--lr", "nan"),
            ("--epochs", "inf"),
            ("--eval-fraction", "nan"),
        ]
    ],
    Fault(
        6,
        "updates skipped as NaN",
        nan_updates({2, 4}),
        0,
        "2 of 20 updates: the loss or gradient was NaN/inf",
        finite_adapter,
    ),
    Fault(
        6,
        "NaN for steps in a row",
        nan_updates(set(range(3, 100))),
        1,
        r"NaN or infinite for 5 steps in a row \(up to step 7\).*weights are from step 2",
        finite_adapter,
        hint="--lr",
    ),
    Fault(
        7,
        "lr edited in recipe.yaml before a resume",
        recipe_edited({"lr": 0.001}),
        1,
        "these differ: lr .* in the checkpoint",
        recipe_put_back,
    ),
    Fault(
        7,
        "rank edited in recipe.yaml before a resume",
        recipe_edited({"rank": 8}),
        1,
        "these differ: rank",
        recipe_put_back,
    ),
    Fault(
        8,
        "read-only --out",
        unwritable_out(OSError(30, "Read-only file system")),
        1,
        "Cannot write the run folder .*: Read-only file system",
        no_run_left,
    ),
    Fault(
        8,
        "--out without write permission",
        unwritable_out(PermissionError(13, "Permission denied")),
        1,
        "Cannot write the run folder .*: Permission denied",
        no_run_left,
    ),
    Fault(
        8, "--out under a file", out_under_a_file, 1, "Cannot write the run folder .*a-file/run: Not a directory", None
    ),
    Fault(
        8,
        "tokenizer code in train",
        as_is(trained_with_custom_tokenizer),
        1,
        TRUSTED,
        runs_when_trusted(trained_with_custom_tokenizer),
        hint="--trust-remote-code",
    ),
    Fault(
        8,
        "tokenizer code in data check",
        as_is(data_check_with_custom_tokenizer),
        1,
        TRUSTED,
        runs_when_trusted(data_check_with_custom_tokenizer),
    ),
    Fault(
        8,
        "tokenizer code in generate",
        as_is(generate_with("custom_tokenizer")),
        1,
        TRUSTED,
        runs_when_trusted(generate_with("custom_tokenizer")),
    ),
    Fault(
        8,
        "tokenizer code in eval",
        as_is(eval_with_custom_tokenizer),
        1,
        TRUSTED,
        runs_when_trusted(eval_with_custom_tokenizer),
    ),
    Fault(
        8, "model code in merge", as_is(merge_into_custom_model), 1, TRUSTED, runs_when_trusted(merge_into_custom_model)
    ),
    Fault(
        8,
        "model code in generate",
        as_is(generate_with("custom_model")),
        1,
        TRUSTED,
        runs_when_trusted(generate_with("custom_model")),
    ),
    Fault(
        8,
        "!!python recipe.yaml in generate",
        with_python_tag(
            lambda case: ["generate", "--adapter", case.out / "adapter", "--prompt", "hi", "--max-new-tokens", "2"]
        ),
        1,
        "recipe.yaml is not a recipe qlora-kit reads",
        nothing_ran,
    ),
    Fault(
        8,
        "!!python recipe.yaml in eval",
        with_python_tag(lambda case: ["eval", "--adapter", case.out / "adapter", "--data", case.ref.data]),
        1,
        "recipe.yaml is not a recipe qlora-kit reads",
        nothing_ran,
    ),
    Fault(
        8,
        "!!python recipe.yaml in report",
        with_python_tag(lambda case: ["report", case.out]),
        1,
        "recipe.yaml is not a recipe qlora-kit reads",
        nothing_ran,
    ),
    Fault(
        8,
        "!!python recipe.yaml in a resume",
        with_python_tag(lambda case: case.resume()),
        1,
        "recipe.yaml is not a recipe qlora-kit reads",
        nothing_ran,
    ),
    Fault(
        8,
        "depth-100k JSON line in data check",
        deep_json_data("data check"),
        1,
        "train would refuse .*deep.jsonl: 1 bad line",
        None,
    ),
    Fault(8, "depth-100k JSON line in train", deep_json_data("train"), 1, "line 2: nested too deeply", no_run_left),
    Fault(
        9,
        "/dev/zero as data",
        as_is(lambda case: case.train(data=Path("/dev/zero"))),
        1,
        "/dev/zero is a device",
        no_run_left,
    ),
    Fault(9, "a FIFO as data", fifo_as_data, 1, "pipe is a pipe \\(FIFO\\)", no_run_left),
    Fault(
        9,
        "/dev/stdin as data",
        as_is(lambda case: case.train(data=Path("/dev/stdin"))),
        1,
        "/dev/stdin is (a pipe|a device|not a regular file)",
        no_run_left,
    ),
    Fault(10, "umask 027", with_umask, 0, "adapter", folders_follow_umask),
    Fault(
        11,
        "export: the base model moved away",
        export_with(base_gone),
        1,
        "No model found at .*moved-away",
        nothing_exported,
    ),
    Fault(
        11,
        "export: an architecture llama.cpp does not run",
        export_with(base_of_another_architecture),
        1,
        "Exporting gpt_neox models to GGUF is not supported yet",
        nothing_exported,
        hint=r"Supported: Gemma \(gemma\), Gemma 2 \(gemma2\)",
    ),
    Fault(
        11,
        "export: a k-quant without llama.cpp installed",
        export_with(no_llama_cpp),
        1,
        "--quant q4_k_m needs llama.cpp's quantizer",
        nothing_exported,
        hint=r"qlora-kit\[export\].*ollama create",
    ),
    Fault(
        11,
        "export: full disk mid-export",
        export_with(full_disk_mid_export),
        1,
        "Could not write .*run-f16.gguf: No space left on device",
        nothing_exported,
        hint="Nothing was left there",
    ),
    Fault(
        11,
        "export: too little RAM for a merged export",
        export_with(little_ram),
        1,
        "needs about .* GiB of RAM at its peak, and 0.0 GiB is available",
        nothing_exported,
        hint="--format gguf-adapter",
    ),
    Fault(
        11,
        "export: --quant on the adapter form",
        export_with(lambda case, patches: ["--quant", "q8_0"]),
        1,
        "--quant applies to --format gguf",
        nothing_exported,
        hint="--format gguf --quant q8_0",
    ),
    Fault(
        0,
        "a second process on the run folder",
        run_folder_in_use,
        1,
        r"run is in use by another qlora-kit process \(pid \d+ on .*, since",
        resumes_exactly,
        hint="Wait for it",
    ),
    # Issue 31's list, items 1-9 as 12-20.
    Fault(
        12,
        "--from-adapter its own run's adapter, with --overwrite",
        with_reference(lambda case: case.train("--from-adapter", run_adapter(case), "--overwrite")),
        1,
        "--from-adapter .*/run/adapter is inside .*/run, whose adapter this run would delete before reading it",
        same_as_reference,
        hint="Copy it out of",
    ),
    Fault(
        13,
        "export: the base replaced by a Gemma of the same shapes",
        base_replaced_by("gemma", lambda case: export_of(case, "--format", "gguf")),
        1,
        "was trained on another model: model_type 'llama' when it trained, 'gemma' in",
        nothing_exported,
        hint="was replaced since: restore the model it held",
    ),
    Fault(
        13,
        "adapter export: the base replaced by a model of other shapes",
        base_replaced_by("narrow", export_of),
        1,
        "was trained on another model: hidden_size 64 when it trained, 32 in",
        nothing_exported,
    ),
    Fault(
        13,
        "generate: the base replaced by other weights of the same architecture",
        base_replaced_by("other_weights", generate_of),
        1,
        "The base model at .* is not the one .* was trained on: its weights changed since",
        None,
        hint="pass --model to use the adapter on this one anyway",
    ),
    Fault(
        13,
        "merge: the base replaced by a model of other shapes",
        base_replaced_by(
            "narrow", lambda case: ["merge", "--adapter", run_adapter(case), "--out", case.tmp / "merged"]
        ),
        1,
        "was trained on another model",
        None,
    ),
    Fault(
        13,
        "eval: the base replaced by a model of other shapes",
        base_replaced_by("narrow", lambda case: ["eval", "--adapter", run_adapter(case), "--data", case.ref.data]),
        1,
        "was trained on another model",
        None,
    ),
    Fault(
        13,
        "generate: a PEFT adapter from elsewhere on a model of other shapes",
        adapter_from_elsewhere,
        1,
        "was made for another model: its .* maps 128 to 64 features, the one in .* 128 to 32",
        None,
    ),
    Fault(
        13,
        "recipe.yaml and base_model.json record absolute paths",
        recorded_absolute_paths,
        0,
        "adapter",
        paths_absolute_in_the_run,
    ),
    Fault(
        14,
        "export: links planted at the output and the old staging name, --overwrite",
        links_planted("run-f16.gguf", ".run-f16.gguf.partial", flags=("--format", "gguf", "--overwrite")),
        0,
        "Wrote .*run-f16.gguf",
        links_replaced_not_followed("run-f16.gguf"),
    ),
    Fault(
        14,
        "export: a link planted at the output, without --overwrite",
        links_planted("adapter.gguf"),
        1,
        "adapter.gguf already exists",
        None,
        hint="Pass --overwrite to replace it",
    ),
    Fault(
        14,
        "export --ollama: a link planted at the Modelfile, --overwrite",
        links_planted("Modelfile", "adapter.gguf", flags=("--ollama", "--overwrite")),
        0,
        "ollama create run -f",
        ollama_modelfile_from_anywhere,
    ),
    Fault(
        14,
        "export --ollama: full disk while writing the Modelfile",
        full_disk_mid_modelfile,
        1,
        "Could not write .*/run/Modelfile: No space left on device",
        lambda case: not (case.out / "Modelfile").exists(),
    ),
    Fault(
        14,
        "export: another export to the same --out running",
        export_already_running,
        1,
        "Another qlora-kit process is exporting to .*adapter.gguf \\(pid",
        nothing_exported,
        hint="Wait for it",
    ),
    Fault(
        15,
        "export: adapter_config.json's r beside rank-4 tensors",
        edited_adapter_config({"r": 1000000000}, export_of),
        1,
        "says rank 1000000000, but the adapter's weights have rank 4",
        nothing_exported,
        hint="restore the adapter's own adapter_config.json",
    ),
    Fault(
        16,
        "train: DPO pairs the same within --seq-len",
        as_is(lambda case: case.train("--method", "dpo", "--seq-len", "16", data=preference_pairs(case))),
        1,
        "has 2 preference pairs whose chosen and rejected answers are the same within the first 16 tokens \\(line 1, line 3\\)",
        no_run_left,
        hint="--skip-bad-lines",
    ),
    Fault(
        16,
        "data check: DPO pairs the same within --seq-len",
        as_is(lambda case: ["data", "check", preference_pairs(case), "--model", case.ref.model, "--seq-len", "16"]),
        1,
        "train would refuse .*pairs.jsonl",
        None,
    ),
    Fault(
        18,
        "export --out an existing folder",
        with_reference(lambda case: export_of(case, "--out", case.out)),
        1,
        "--out .*/run is a folder; this writes one file",
        nothing_exported,
    ),
    Fault(
        18,
        "export --out under a file",
        with_reference(lambda case: export_of(case, "--out", case.out / "recipe.yaml" / "x.gguf")),
        1,
        "Cannot write .*: .*recipe.yaml is a file, not a folder",
        nothing_exported,
    ),
    Fault(
        18,
        "merge --out an existing file",
        with_reference(lambda case: ["merge", "--adapter", run_adapter(case), "--out", case.out / "recipe.yaml"]),
        1,
        "--out .*recipe.yaml is a file; merge writes a model folder there",
        None,
    ),
    Fault(
        18,
        "generate: adapter_config.json not JSON",
        damaged_adapter_file("adapter_config.json", lambda b: b[:20], generate_of),
        1,
        "adapter_config.json is not valid JSON",
        None,
        hint="The adapter folder is damaged",
    ),
    Fault(
        18,
        "export: adapter_config.json a JSON list",
        damaged_adapter_file("adapter_config.json", lambda b: b"[1, 2]", export_of),
        1,
        "adapter_config.json holds a JSON list, not an adapter config",
        nothing_exported,
    ),
    Fault(
        18,
        "export: adapter_model.safetensors truncated",
        damaged_adapter_file(
            "adapter_model.safetensors", lambda b: b[: len(b) // 2], lambda case: export_of(case, "--format", "gguf")
        ),
        1,
        "adapter_model.safetensors does not open as safetensors",
        nothing_exported,
    ),
    Fault(
        18,
        "adapter export: full disk mid-export",
        export_with(full_disk_mid_adapter_export),
        1,
        "Could not write .*adapter.gguf: No space left on device",
        nothing_exported,
        hint="Nothing was left there",
    ),
    Fault(
        18,
        "DPO resume: the precomputed reference torn",
        reference_damaged_on_resume,
        0,
        "reference_log_probs.safetensors is damaged .*: computing the reference again",
        reference_computed_again,
    ),
    Fault(
        18,
        "report --png x.txt",
        with_reference(lambda case: ["report", case.out, "--png", case.tmp / "x.txt"]),
        1,
        "--png .*x.txt does not name a .png file",
        None,
        hint="e.g. --png .*x.png",
    ),
    Fault(
        18,
        "report --png under a file",
        with_reference(lambda case: ["report", case.out, "--png", case.out / "recipe.yaml" / "x.png"]),
        1,
        "Cannot write .*x.png: .*recipe.yaml is a file, not a folder",
        None,
    ),
    Fault(
        18,
        "report --png where it may not write",
        with_reference(lambda case: ["report", case.out, "--png", "/proc/x.png"]),
        1,
        "Could not write /proc/x.png",
        None,
    ),
    *[
        Fault(
            18,
            f"plan --vram {value}",
            as_is(lambda case, value=value: ["plan", "--model", case.ref.model, "--vram", value]),
            1,
            f"--vram must be a positive number of gigabytes, not {value}",
            None,
        )
        for value in ("nan", "inf", "-1")
    ],
    Fault(
        18,
        "train --vram-limit nan",
        as_is(lambda case: case.train("--vram-limit", "nan")),
        1,
        "--vram-limit must be a positive number of gigabytes, not nan",
        no_run_left,
    ),
    *[
        Fault(
            18,
            f"{command} a model name of 300 characters",
            as_is(
                lambda case, command=command, name=name: (
                    ["plan", "--model", name, "--vram", "8"] if command == "plan" else case.train(model=name)
                )
            ),
            1,
            "No (config|model) found (for|at) '?" + name[:20],
            no_run_left,
        )
        for command in ("plan", "train")
        for name in ("a" * 300, "org/" + "a" * 300)
    ],
    *[
        Fault(
            18,
            f"train: config.json {what}",
            config_of_base(config, train_on),
            1,
            says,
            no_run_left,
            hint="Restore the model's own config.json",
        )
        for what, config, says in [
            ("garbage", "garbage{", "base/config.json is not valid JSON"),
            ("a string", '"a string"', "base/config.json holds a JSON str, not a model config"),
            ("without model_type", {"hidden_size": 64}, "base/config.json names no model_type"),
        ]
    ],
    Fault(
        18,
        "plan: config.json without the sizes",
        config_of_base({"model_type": "llama"}, plan_of),
        1,
        "The config of .*base gives no num_attention_heads",
        None,
    ),
    *[
        Fault(
            19,
            f"plan: config.json with {key} {value}",
            config_of_base(sizes(**{key: value}), plan_of),
            1,
            f"base/config.json gives {key} {value}; it must be a whole number above 0",
            None,
        )
        for key, value in [("hidden_size", 0), ("hidden_size", -64), ("num_attention_heads", 0)]
    ],
    Fault(
        19,
        "plan --vram 0",
        as_is(lambda case: ["plan", "--model", case.ref.model, "--vram", "0"]),
        1,
        "--vram must be a positive number of gigabytes, not 0",
        None,
    ),
    Fault(
        19,
        'plan --gpu ""',
        as_is(lambda case: ["plan", "--model", case.ref.model, "--gpu", ""]),
        1,
        "Unknown GPU ''",
        None,
    ),
    Fault(
        19,
        "auto --epochs 0",
        as_is(
            lambda case: [
                "auto",
                "--model",
                case.ref.model,
                "--data",
                case.ref.data,
                "--out",
                case.out,
                "--epochs",
                "0",
            ]
        ),
        1,
        "`epochs` is 0 and `steps` is 0, so there is nothing to train",
        no_run_left,
        hint="--epochs above 0",
    ),
    Fault(
        19,
        "export --quant Q8_0",
        with_reference(lambda case: export_of(case, "--format", "gguf", "--quant", "Q8_0")),
        0,
        "Wrote .*run-q8_0.gguf",
        model_file_written("run-q8_0.gguf"),
    ),
    Fault(
        19,
        "export: an existing file at --out",
        with_reference(lambda case: export_of(case, "--out", case.out / "metrics.jsonl")),
        1,
        "metrics.jsonl already exists",
        nothing_exported,
        hint="--overwrite",
    ),
    Fault(
        19,
        "train --from-adapter: a Gemma adapter onto a Llama of the same shapes",
        gemma_adapter,
        1,
        "was trained on another model: model_type 'gemma' when it trained, 'llama' in",
        None,
    ),
    Fault(20, "report --png a folder", with_report_folder, 0, "Plot written to .*plots/report.png", plot_in_the_folder),
    Fault(
        20,
        "eval: a bad data line",
        bad_line_in("bad.jsonl", lambda case, data: ["eval", "--model", case.ref.model, "--data", data]),
        1,
        "bad.jsonl has 1 bad example",
        None,
        hint="^Hint: Fix them: `qlora-kit data check .*bad.jsonl` lists each",
    ),
    Fault(
        20,
        "a path with a space in a printed command",
        into_folder("my run", failed_checkpoint_write(OSError(28, "No space left on device"))),
        1,
        "Could not write the checkpoint of step 10",
        None,
        hint="resume: qlora-kit train --out '.*/my run' --resume",
    ),
    Fault(
        20,
        "an ESC character in a file name",
        bad_line_in("bad\x1b[2Jname.jsonl", lambda case, data: case.train(data=data)),
        1,
        r"bad\\x1b\[2Jname.jsonl has 1 bad example",
        no_run_left,
    ),
    Fault(20, "umask 022", umask_022, 0, "adapter", files_follow_umask_022),
]


def test_the_catalogue_has_every_fault_the_issue_listed():
    # 1-10: issue 18's list; 11: export's (issue 19); 12-20: issue 31's 1-9 (its 6, signals, is in test_chat and test_cli)
    assert {fault.item for fault in FAULTS} == set(range(0, 21)) - {17}


@pytest.fixture(scope="module")
def reference(llama_dir, tmp_path_factory) -> SimpleNamespace:
    """The uninterrupted run the catalogue compares with, its model and data, and two model folders that ship code:
    one whose tokenizer is its own class, one whose model is."""
    folder = tmp_path_factory.mktemp("catalogue")
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("what is the capital of france?", "paris, arr!"), ("one two three?", "four five, arr!")]
    ]
    data_file = folder / "chat.jsonl"
    data_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats * 4))
    with pytest.MonkeyPatch.context() as patches:
        patches.setattr("qlora_kit.data.dataset.cache_dir", lambda: folder / "cache")
        run_training(recipe_for(llama_dir, data_file), folder / "reference", QUIET)
    custom_model = with_model_code(llama_dir, folder / "custom-model")
    # The reference adapter as if trained on the custom model (its weights are the same): what merge is given.
    custom_model_adapter = shutil.copytree(folder / "reference" / "adapter", folder / "custom-model-run" / "adapter")
    (custom_model_adapter / IDENTITY_FILE).write_text(json.dumps(model_identity(custom_model, str(custom_model))))
    return SimpleNamespace(
        run=folder / "reference",
        model=llama_dir,
        data=data_file,
        custom_tokenizer=with_tokenizer_code(llama_dir, folder / "custom-tokenizer"),
        custom_model=custom_model,
        custom_model_adapter=custom_model_adapter,
        gemma=save_tiny_model(folder / "gemma", "gemma"),  # the Llama's shapes, another architecture
        other_weights=save_tiny_model(folder / "llama-seed-1", "llama", seed=1),
        narrow=save_tiny_model(folder / "narrow", "llama", hidden_size=32),
    )


def with_tokenizer_code(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    (folder / "tokenization_mine.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass MineTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="MineTokenizer", auto_map={"AutoTokenizer": ["tokenization_mine.MineTokenizer", None]}
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def with_model_code(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    (folder / "modeling_mine.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        'class MineConfig(LlamaConfig):\n    model_type = "mine"\n\n\n'
        "class MineForCausalLM(LlamaForCausalLM):\n    config_class = MineConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="mine",
        architectures=["MineForCausalLM"],
        auto_map={"AutoConfig": "modeling_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{fault.item}: {fault.name}" for fault in FAULTS])
def test_fault_catalogue(fault, reference, tmp_path, monkeypatch, capsys):
    with contextlib.ExitStack() as cleanup, pytest.MonkeyPatch.context() as patches:
        case = Case(reference, tmp_path, patches, monkeypatch, capsys, cleanup)
        command = fault.cause(case, patches)
        before = file_states(tmp_path)
        if fault.code is None:
            with pytest.raises(Killed):
                case.cli(*command)
            capsys.readouterr()
        else:
            code, out, err = case.cli(*command)
            assert code == fault.code and "Traceback" not in out + err, out + err
            if code == 1:
                error, *hint = err.strip().splitlines()
                assert error.startswith("Error: ") and re.search(fault.says, error), err
                assert len(hint) <= 1 and all(line.startswith("Hint: ") for line in hint), err
                assert re.search(fault.hint, hint[0] if hint else ""), err
                after = file_states(tmp_path)  # a refusal leaves every file as it was: nothing changed or lost
                assert not [path for path, state in before.items() if after.get(path) != state], err
            else:
                assert re.search(fault.says, out.replace("\n", " ")), out
    if fault.then:  # the fault is over (the disk freed, the process restarted): what the user runs next
        fault.then(case)


def kill_at_every_write(llama_dir, chat_data, tmp_path, every_nth: int, flags: tuple = ()) -> list[dict]:
    """Run tests/kill_at_every_write.py: one row per write point killed, with what the user did after and its result."""
    result = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("kill_at_every_write.py")),
            str(llama_dir),
            str(chat_data),
            str(tmp_path),
            str(every_nth),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_every_kill_recovers(rows: list[dict]) -> None:
    assert rows and all(row["killed"] == 137 for row in rows)
    failed = [row for row in rows if not row["same"] or row["traceback"]]
    assert not failed, "\n".join(
        f"{row['point']}/{row['of']} {row['write']}: {row['then']} -> {row['said']}" for row in failed
    )


def test_a_kill_at_every_fifth_write_point_recovers_exactly(llama_dir, chat_data, tmp_path):
    rows = kill_at_every_write(llama_dir, chat_data, tmp_path, every_nth=5)
    assert_every_kill_recovers(rows)
    assert rows[0]["of"] >= 40 and {row["then"] for row in rows} == {"again", "resume"}


@pytest.mark.slow
def test_a_kill_at_every_write_point_recovers_exactly(llama_dir, chat_data, tmp_path):
    assert_every_kill_recovers(kill_at_every_write(llama_dir, chat_data, tmp_path, every_nth=1))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dora", "loftq", "rslora-from-adapter", "dpo"])
def test_a_kill_at_every_third_write_point_of_each_lora_variant_recovers_exactly(
    llama_dir, chat_data, tmp_path, variant
):
    """DoRA keeps magnitudes beside A and B, LoftQ starts from computed weights, a run from an adapter loads them
    first, DPO learns from pairs (with its reference precomputed and kept): each must come back from a kill exactly
    as the plain run does."""
    flags = {
        "dora": ("--use-dora",),
        "loftq": ("--lora-init", "loftq"),
        "dpo": ("--method", "dpo", "--reference", "precomputed"),
    }.get(variant)
    if variant == "dpo":
        from tests.test_preference import preference_file

        chat_data = preference_file(tmp_path, chat=True)
    if variant == "rslora-from-adapter":
        train.run_training(
            Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=1, micro_batch=2, use_rslora=True),
            tmp_path / "a",
            Console(quiet=True),
            RunOptions(display="quiet"),
        )
        flags = ("--from-adapter", str(tmp_path / "a" / "adapter"))
    (tmp_path / "kills").mkdir()
    assert_every_kill_recovers(kill_at_every_write(llama_dir, chat_data, tmp_path / "kills", every_nth=3, flags=flags))
