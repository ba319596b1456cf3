"""--report-to: what each tracker wrote, read back from its own offline store (TensorBoard's event files, the W&B
offline run's records, Trackio's local database, MLflow's file store), and a resume going on in the same runs."""

import io
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.train import trackers
from qlora_kit.train.trackers import parse_report_to, tracked_values

ROOT = Path(__file__).parents[1]
needs_all = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(p) is None for p in trackers.TRACKERS),
    reason="the trackers' packages (the test extra) are not installed",
)


def test_report_to_takes_several_and_names_the_extra_of_a_missing_one(monkeypatch):
    import importlib.util

    assert parse_report_to(None) == [] and parse_report_to(["none"]) == []
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else found("json"))
    assert parse_report_to(["TensorBoard,trackio", "tensorboard"]) == ["tensorboard", "trackio"]
    with pytest.raises(UserError, match="--report-to wandb needs the wandb package") as missing:
        parse_report_to(["tensorboard", "wandb"])
    assert missing.value.hint == 'pip install "qlora-kit[wandb]"'
    with pytest.raises(UserError, match="Did you mean: mlflow"):
        parse_report_to(["mlfow"])


def test_a_step_becomes_train_eval_and_memory_series_with_the_plan_beside_the_measure():
    line = {
        "step": 3,
        "loss": 2.5,
        "lr": 1e-4,
        "tokens_per_s": 900.0,
        "rss_gib": 1.5,
        "eval_loss": 2.7,
        "reward_margin": 0.2,
        "eval_reward_accuracy": 0.75,
        "skipped_update": False,
        "kind": "step",
        "grad_norm": float("nan"),
    }
    assert tracked_values(line, planned_gib=2.0) == {
        "train/loss": 2.5,
        "train/lr": 1e-4,
        "train/tokens_per_s": 900.0,
        "memory/rss_gib": 1.5,
        "eval/loss": 2.7,
        "train/reward_margin": 0.2,
        "eval/reward_accuracy": 0.75,
        "memory/planned_gib": 2.0,
        "memory/measured_over_planned": 0.75,
    }


def wandb_records(run_file: Path):
    """The protobuf records of a W&B offline run file (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, part = run_file.read_bytes(), 7, b""  # 7: the ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


@needs_all
def test_every_tracker_holds_each_step_and_the_recipe(llama_dir, chat_data, tmp_path):
    """One run reporting to all four, as a user starts it (no W&B login: offline), each store read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tracked"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "NETRC"):
        env.pop(name, None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_kit",
            "train",
            "--model",
            str(llama_dir),
            "--data",
            str(chat_data),
            "--out",
            str(run),
            "--steps",
            "3",
            "--rank",
            "4",
            "--plain",
            "--report-to",
            "all",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "wandb:" not in done.stdout and "* Trackio" not in done.stdout, done.stdout  # their banners stay off
    assert "W&B: offline (no W&B login found)" in done.stdout and "tensorboard --logdir" in done.stdout
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in steps}
    assert sorted(losses) == [1, 2, 3]

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)
    assert {"memory/rss_gib", "memory/planned_gib", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert "recipe" in str(events.Tags()["tensors"])

    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1  # no login: logged offline, for `wandb sync`
    records = list(wandb_records(offline[0]))
    history = {
        int(i["_step"]): float(i["train/loss"])
        for i in (
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        )
    }
    assert history == pytest.approx(losses)
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "run"
        for item in r.run.config.update
    }
    assert config["rank"] == 4 and config["model"] == str(llama_dir) and config["planned_gib"] > 0

    with sqlite3.connect(tmp_path / "trackio" / "qlora-kit.db") as db:
        logged = {
            step: json.loads(metrics)["train/loss"]
            for step, metrics in db.execute("select step, metrics from metrics where run_name = 'tracked'")
        }
        recipe = json.loads(db.execute("select config from configs where run_name = 'tracked'").fetchone()[0])
    assert logged == pytest.approx(losses) and recipe["rank"] == 4

    (experiment,) = [
        p for p in (tmp_path / "mlruns").iterdir() if p.is_dir() and (p / "meta.yaml").is_file() and p.name != "0"
    ]
    (mlflow_run,) = [p for p in experiment.iterdir() if (p / "metrics").is_dir()]
    series = (mlflow_run / "metrics" / "train" / "loss").read_text().split("\n")
    assert {int(step): float(value) for _, value, step in (row.split() for row in series if row)} == pytest.approx(
        losses
    )
    assert (mlflow_run / "params" / "rank").read_text() == "4"
    assert set(json.loads((run / "trackers.json").read_text())) == set(trackers.TRACKERS)


class Recorder:
    """A stand-in tracker: what it was opened with and what it was sent."""

    opened: list = []

    def __init__(self, run_dir, config, run_id, start_step):
        self.run_id, self.steps, self.where = run_id or "first-id", [], "Recorder"
        Recorder.opened.append((self.run_id, start_step, self))

    def log(self, values, step):
        self.steps.append(step)

    def close(self):
        pass


class Breaking(Recorder):
    def log(self, values, step):
        if step == 2:
            raise ConnectionError("server went away\nand more")


@needs_all
def test_a_resume_goes_on_in_the_same_tracker_run(llama_dir, chat_data, tmp_path, monkeypatch):
    """Stopped after step 3 with its last checkpoint at step 2, resumed without --report-to: the same MLflow run
    and the same TensorBoard folder, holding each step once (step 3 trained twice, kept once)."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import RunOptions, run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setitem(trackers.OPENERS, "trackio", Recorder)  # trackio's store is fixed once per process
    monkeypatch.setattr(Recorder, "opened", [])
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=4, checkpoint_every=2, micro_batch=2)
    whole = tmp_path / "whole"
    run_training(recipe, whole, Console(file=io.StringIO()), RunOptions(report_to=["tensorboard", "mlflow", "trackio"]))
    assert Recorder.opened[0][:2] == ("first-id", 0) and Recorder.opened[0][2].steps == [1, 2, 3, 4]
    run_id = json.loads((whole / "trackers.json").read_text())["mlflow"]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    run_training(recipe, resumed, Console(file=io.StringIO()), RunOptions(resume=True))  # no --report-to: the run's own
    assert Recorder.opened[1][:2] == ("first-id", 2) and Recorder.opened[1][2].steps == [3, 4]
    assert json.loads((resumed / "trackers.json").read_text())["mlflow"] == run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 4]  # the whole run's, then the resume's 3 and 4
    events = EventAccumulator(str(resumed / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_tracker_that_fails_mid_run_is_said_once_and_costs_no_step(llama_dir, chat_data, tmp_path, monkeypatch):
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import RunOptions, run_training

    monkeypatch.setitem(trackers.OPENERS, "mlflow", Breaking)
    shown = Console(file=io.StringIO(), width=300)
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=3, micro_batch=2)
    assert run_training(recipe, tmp_path / "run", shown, RunOptions(display="plain", report_to=["mlflow"])).steps == 3
    said = shown.file.getvalue()
    assert said.count("--report-to mlflow stopped at step 2 (ConnectionError: server went away)") == 1, said


def test_a_tracker_that_will_not_start_is_one_sentence_and_leaves_no_run_behind(
    llama_dir, chat_data, tmp_path, monkeypatch
):
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import RunOptions, run_training

    def refuses(*args):
        raise RuntimeError("The store is read-only. Long explanation follows.\nMore lines.")

    monkeypatch.setitem(trackers.OPENERS, "mlflow", refuses)
    monkeypatch.setitem(trackers.OPENERS, "tensorboard", Recorder)
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=1, micro_batch=2)
    with pytest.raises(UserError, match=r"^--report-to mlflow could not start: RuntimeError: The store is read-only$"):
        run_training(
            recipe, tmp_path / "run", Console(file=io.StringIO()), RunOptions(report_to=["tensorboard", "mlflow"])
        )
    assert run_training(recipe, tmp_path / "run", Console(file=io.StringIO())).steps == 1  # the same --out again
