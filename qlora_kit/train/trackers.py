"""--report-to: each step's line of metrics.jsonl also sent to the experiment trackers people already use
(TensorBoard, Weights & Biases, Trackio, MLflow), with the recipe as the run's config.

Each tracker is an optional extra (`pip install "qlora-kit[wandb]"`), imported only when asked for, and each
keeps its own offline habit: TensorBoard writes event files into the run folder; W&B logs offline (a folder
`wandb sync` uploads later) when WANDB_MODE says so or no W&B login is found; Trackio writes its local database
(TRACKIO_DIR); MLflow writes wherever MLFLOW_TRACKING_URI points (a file: store, sqlite, or a server). What each
tracker calls the run is kept in the run folder (trackers.json), so a --resume goes on in the same tracker run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.files import write_atomically

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # each the name of its package and of its extra
RECORD_FILE = "trackers.json"  # in the run folder: which trackers a run reports to, and their run ids
PROJECT = "qlora-kit"  # the project or experiment runs go to unless the tracker's own variable names one


def parse_report_to(values: list[str] | None) -> list[str]:
    """The trackers --report-to names (repeated or comma-separated; "all", "none"), each checked to be installed."""
    import importlib.util

    from qlora_kit.probe.catalog import did_you_mean

    names: list[str] = []
    for value in values or []:
        for name in (part.strip().lower() for part in value.split(",")):
            if name in ("", "none"):
                continue
            if name not in (*TRACKERS, "all"):
                raise UserError(
                    f"--report-to {name!r} is not a tracker qlora-kit knows." + did_you_mean(name, TRACKERS),
                    hint=f"Choose from {', '.join(TRACKERS)} (or all); several at once: --report-to tensorboard,wandb.",
                )
            names += [t for t in (TRACKERS if name == "all" else (name,)) if t not in names]
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        extras = ",".join(missing)
        raise UserError(
            f"--report-to {' and '.join(missing)} needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}, which is not installed.",
            hint=f'pip install "qlora-kit[{extras}]"',
        )
    return names


def tracked_values(line: dict, planned_gib: float | None) -> dict[str, float]:
    """A step's line as tracker series: train/*, eval/*, memory/* (with the plan's figure beside the measured one),
    system/*; what is not a finite number (a CPU run's GPU figures) is left out."""
    values = {}
    for key, value in line.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key.startswith("eval_"):
            values[f"eval/{key.removeprefix('eval_')}"] = float(value)
        elif key.startswith(("mem_", "rss_", "nvml_", "ram_", "swap_")):
            values[f"memory/{key.removeprefix('mem_')}"] = float(value)
        elif key.startswith(("gpu_", "cpu_")):
            values[f"system/{key}"] = float(value)
        else:
            values[f"train/{key}"] = float(value)
    # what the plan's total predicts, as the dashboard's memory bar compares it: nvidia-smi's figure on a GPU
    measured = line.get("nvml_used_gib") or line.get("mem_reserved_gib") or line.get("rss_gib")
    if planned_gib and measured:
        values["memory/planned_gib"] = planned_gib
        values["memory/measured_over_planned"] = measured / planned_gib
    return values


class Trackers:
    """The trackers a run reports to: log() each step's line, close() at the end (also after a failure)."""

    def __init__(
        self, run_dir: Path, names: list[str], config: dict, planned_gib: float | None, start_step: int = 0, warn=print
    ):  # warn: how a tracker failing mid-run is said (the dashboard's note, once it is up)
        self.planned_gib, self.warn = planned_gib, warn
        self.open: dict[str, object] = {}
        record_file = Path(run_dir) / RECORD_FILE
        ids = _read_record(record_file) if start_step else {}
        for name in names:
            try:
                self.open[name] = OPENERS[name](Path(run_dir), config, ids.get(name), start_step)
            except Exception as e:  # a tracker's own setup (its store, its login): said before the first step
                self.close()
                raise UserError(f"--report-to {name} could not start: {_first_line(e)}", hint=HINTS[name]) from None
        self.where = [tracker.where for tracker in self.open.values()]
        write_atomically(
            record_file, json.dumps({name: getattr(t, "run_id", None) for name, t in self.open.items()}, indent=2)
        )

    def log(self, line: dict) -> None:
        """Send one step's line to every tracker; one that fails is said once and dropped, the run goes on (its
        metrics.jsonl holds every step)."""
        values = tracked_values(line, self.planned_gib)
        for name, tracker in list(self.open.items()):
            try:
                tracker.log(values, line["step"])
            except Exception as e:
                self.warn(
                    f"--report-to {name} stopped at step {line['step']} ({_first_line(e)}); metrics.jsonl "
                    "goes on holding every step."
                )
                del self.open[name]

    def close(self) -> None:
        for tracker in self.open.values():
            with contextlib.suppress(Exception):  # one tracker failing to flush must not cost the run's own end
                tracker.close()
        self.open = {}


HINTS = {
    "tensorboard": "Check that the run folder is writable.",
    "wandb": "Log in with `wandb login` (or set WANDB_API_KEY), or run with WANDB_MODE=offline and `wandb sync` "
    "the run's wandb/ folder later.",
    "trackio": "Check TRACKIO_DIR (its local store) or, for a Space, your `hf auth login`.",
    "mlflow": "Point MLFLOW_TRACKING_URI at your tracking server or store: sqlite:///mlflow.db (with the full "
    "mlflow package), or a file:./mlruns store with MLFLOW_ALLOW_FILE_STORE=true.",
}


def _first_line(error: Exception) -> str:
    """An exception's first sentence: trackers explain themselves at length."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].split('. ')[0][:200].rstrip('.')}" if text else type(error).__name__


def recorded_trackers(run_dir: Path) -> list[str]:
    """The trackers a run reported to (for a --resume that names none)."""
    return [name for name in _read_record(Path(run_dir) / RECORD_FILE) if name in TRACKERS]


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _quietly():
    """Trackers print banners on stdout; the run's own display owns the terminal."""
    return contextlib.redirect_stdout(io.StringIO())


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the steps after the checkpoint a resume goes on from are written again, not twice
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.where = f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None, start_step: int):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_login_found() else "offline")
        with _quietly():
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or PROJECT,
                name=run_dir.name,
                config=config,
                dir=str(run_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(silent=True),
            )  # its lines (on stderr) would tear the display
        self.run_id = self.run.id
        self.where = (
            f"W&B: offline{'' if os.environ.get('WANDB_MODE') else ' (no W&B login found)'}; `wandb sync "
            f"{Path(self.run.dir).parent}` uploads it"
            if mode == "offline"
            else f"W&B: {self.run.url or self.run.name}"
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        with _quietly():
            self.run.finish()


def _wandb_login_found() -> bool:
    """Whether W&B has credentials here (WANDB_API_KEY, or `wandb login`'s netrc entry): without any, wandb.init
    would stop the run to ask for them."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackio:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None, start_step: int):
        import trackio

        with _quietly():
            self.run = trackio.init(
                project=os.environ.get("TRACKIO_PROJECT") or PROJECT,
                name=run_id or run_dir.name,
                config=config,
                resume="allow" if run_id else "never",
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
            )
        self.run_id = self.run.name
        self.where = f"Trackio: trackio show --project {self.run.project}"

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import trackio

        with _quietly():
            trackio.finish()  # also forgets the run, which trackio would otherwise finish again, aloud, at exit


class MLflow:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None, start_step: int):
        import mlflow

        self.client = mlflow.MlflowClient()
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            for key, value in config.items():  # params are strings of at most 6000 characters
                self.client.log_param(run_id, key, str(value)[:6000])
        else:
            self.client.update_run(run_id, status="RUNNING")  # a resume: the same run, running again
        self.run_id = run_id
        self.where = f"MLflow: run {run_id} at {mlflow.get_tracking_uri()}"

    def log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}
