import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.plan.memory import MemoryPlan
from qlora_kit.plan.planner import PlanReport, Target
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train import run_folder
from qlora_kit.train.run import RunOptions, run_training
from qlora_kit.train.run_folder import RunFolder, open_run_folder

QUIET = Console(file=io.StringIO())
A_PLAN = PlanReport(
    MemoryPlan("m", "cpu", 64, 1, 8, {"weights": 2**30}, 0, 0, 0), Target("RAM", "cpu", 2**33), 64, 1, None
)


def finished_run(llama_dir, data, out, **changes):
    recipe = Recipe(
        **{**dict(model=str(llama_dir), data=str(data), rank=4, steps=2, micro_batch=2, checkpoint_every=1), **changes}
    )
    run_training(recipe, out, QUIET)
    shutil.rmtree(out / "checkpoints" / "step-2")  # so a resume has a step left to do
    return recipe


def test_a_second_process_on_a_folder_in_use_is_refused_and_named(tmp_path):
    (tmp_path / "run").mkdir()
    first = open_run_folder(tmp_path / "run", Recipe(), resume=False, overwrite=True, console=QUIET)
    with pytest.raises(UserError, match=rf"in use by another qlora-kit process \(pid {os.getpid()} on .*, since "):
        open_run_folder(tmp_path / "run", Recipe(), resume=False, overwrite=True, console=QUIET)
    first.close()
    assert not (tmp_path / "run" / ".lock").exists()
    open_run_folder(tmp_path / "run", Recipe(), resume=False, overwrite=True, console=QUIET).close()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    code = "import os, sys, pathlib; from qlora_kit.train.run_folder import lock; lock(pathlib.Path(sys.argv[1])); os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert (tmp_path / ".lock").exists(), "the file stays, but the kernel released the lock with the process"
    open_run_folder(tmp_path, Recipe(), resume=False, overwrite=True, console=QUIET).close()


def test_two_runs_started_on_one_new_folder_are_refused_once_it_holds_a_run(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.start(Recipe(), A_PLAN)
    second = RunFolder(tmp_path / "run")
    with pytest.raises(UserError, match="in use by another qlora-kit process"):
        second.start(Recipe(), A_PLAN)
    folder.close()
    with pytest.raises(UserError, match="already holds a run"):
        second.start(Recipe(), A_PLAN)


def test_a_resume_refuses_data_changed_in_place_unless_allowed(llama_dir, chat_data, tmp_path):
    data = tmp_path / "data.jsonl"
    shutil.copy(chat_data, data)
    recipe = finished_run(llama_dir, data, tmp_path / "run")
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # shuffled: same lines, other order
    with pytest.raises(UserError, match="data file's content changed") as error:
        run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True))
    assert "--allow-changed-data" in error.value.hint
    assert run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True, allow_changed_data=True)).steps == 2


def test_a_resume_refuses_another_base_model_under_the_run_s_settings(llama_dir, chat_data, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(llama_dir, other)
    recipe = finished_run(other, chat_data, tmp_path / "run")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(UserError, match="base model differs"):
        run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True, allow_changed_data=True))


def test_the_same_data_file_by_another_path_is_the_same_setting(llama_dir, chat_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(chat_data, tmp_path / "data.jsonl")
    recipe = finished_run(llama_dir, "data.jsonl", tmp_path / "run")
    absolute = Recipe(**{**recipe.__dict__, "data": str(tmp_path / "data.jsonl")})
    assert run_training(absolute, tmp_path / "run", QUIET, RunOptions(resume=True)).steps == 2


def test_a_torn_metrics_line_is_dropped_when_the_run_resumes(llama_dir, chat_data, tmp_path):
    recipe = finished_run(llama_dir, chat_data, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "loss": 5.4, "lr": 0.0')  # a write a full disk cut short
    run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]


def test_rewriting_the_metrics_is_all_or_nothing(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    original = "".join(json.dumps({"step": n, "loss": 1.0}) + "\n" for n in (1, 2, 3))
    folder.metrics_path.write_text(original)

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        folder.history_up_to(1)
    assert folder.metrics_path.read_text() == original, "a kill mid-rewrite leaves the old file whole"
    monkeypatch.undo()
    assert [m["step"] for m in folder.history_up_to(1)] == [1]
