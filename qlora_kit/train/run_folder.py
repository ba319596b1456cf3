"""The run folder: everything a run keeps on disk, who may write it, and where a resumed run goes on from.

runs/NAME/
  recipe.yaml      the settings, as the run uses them
  plan.json        the memory plan the settings were chosen by
  metrics.jsonl    one line per optimizer step, and one per out-of-memory step-down
  checkpoints/     step-N folders, each enough to continue exactly (checkpoint.py)
  adapter/         the final PEFT adapter
  .lock            held by the process training here; a second one is refused
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.files import Busy, free_space, hold_lock, release_lock, write_atomically
from qlora_kit.plan.planner import PlanReport
from qlora_kit.plan.recipes import Recipe, load_recipe
from qlora_kit.train import checkpoint

REFERENCE_FILE = "reference_log_probs.safetensors"  # a DPO run's precomputed reference, when the plan chose that
# What a run writes into its folder (--report-to adds the trackers' record and the local stores it keeps there)
RUN_FILES = (
    "recipe.yaml",
    "plan.json",
    "metrics.jsonl",
    "adapter",
    "checkpoints",
    REFERENCE_FILE,
    "trackers.json",
    "tensorboard",
    "wandb",
)
LOCK = ".lock"
PATH_SETTINGS = ("model", "data", "eval_data", "init_adapter")  # the same file by another spelling is the same setting


@dataclass
class RunFolder:
    """A run's folder, locked by this process while it trains; resume_from is the checkpoint a resumed run continues."""

    path: Path
    resume_from: Path | None = None
    lock_fd: int | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def resume_step(self) -> int:
        return checkpoint.step_of(self.resume_from) if self.resume_from else 0

    def close(self) -> None:
        """Let other processes use the folder again."""
        if self.lock_fd is not None:
            release_lock(self.path / LOCK, self.lock_fd)
            self.lock_fd = None

    def unstart(self) -> None:
        """Take back what start() wrote for a new run that could not then begin (a tracker that would not open), so
        the same command can run again; a resumed run's files stay as they were."""
        if not self.resume_from:
            remove_run_files(self.path)

    def gone(self) -> str | None:
        """Why the folder is no longer the one this run started in (deleted, moved or replaced), or None. Writing on
        would recreate a folder without its recipe, plan and metrics that looks like a finished run."""
        if self.lock_fd is None:  # not the writing rank, or no locks on this system
            return None
        try:
            same = (
                os.fstat(self.lock_fd).st_ino == os.stat(self.path / LOCK).st_ino
                and (self.path / "recipe.yaml").is_file()
            )
        except OSError:
            same = False
        return None if same else f"{self.path} was deleted, moved or replaced while the run trained"

    def start(self, recipe: Recipe, plan: PlanReport) -> list[dict]:
        """Create the folder (locked), write recipe.yaml and plan.json, and return the metrics lines of the steps a
        resumed run has done (the later ones are redone, so they are dropped)."""
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        if self.lock_fd is None:
            self.lock_fd = lock(self.path)
            if not self.resume_from and holds_run(self.path):  # another process started a run here meanwhile
                self.close()
                raise UserError(f"{self.path} already holds a run.", hint="Choose another --out.")
        with writing(self.path):  # atomically: a kill while a resume rewrites recipe.yaml must not lose the run
            write_atomically(self.path / "recipe.yaml", recipe.to_yaml())
            if not (
                self.resume_from and (self.path / "plan.json").is_file()
            ):  # a resumed run keeps the plan it started with
                write_atomically(self.path / "plan.json", json.dumps(plan.to_dict(), indent=2))
            return self.history_up_to(self.resume_step)

    def save_reference_log_probs(self, values: dict, trained_on: dict) -> None:
        """Keep DPO's precomputed reference log-probs (a (pairs, 2) tensor per split) of the data and model that
        trained_on (a fingerprint) names, so a resume reads them back."""
        from safetensors.torch import save

        tensors = {name: tensor.contiguous() for name, tensor in values.items()}
        with writing(self.path):  # atomically: a resume finds all of them or none
            write_atomically(
                self.path / REFERENCE_FILE, save(tensors, {"trained_on": json.dumps(trained_on, sort_keys=True)})
            )

    def reference_log_probs(self, trained_on: dict) -> tuple[dict | None, str]:
        """The precomputed DPO reference log-probs this run kept, or None when there are none for trained_on (a
        resume with --allow-changed-data goes on with other data: its pairs need their own); with why a kept file
        was not read when it is damaged (truncated, not safetensors), which a resume then computes again."""
        from safetensors import SafetensorError, safe_open

        path = self.path / REFERENCE_FILE
        if not path.is_file():
            return None, ""
        try:
            with safe_open(path, "pt") as kept:
                if (kept.metadata() or {}).get("trained_on") != json.dumps(trained_on, sort_keys=True):
                    return None, ""
                return {name: kept.get_tensor(name) for name in kept.keys()}, ""
        except (SafetensorError, OSError) as e:
            return None, f"{REFERENCE_FILE} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"

    def plan(self) -> PlanReport | None:
        """The plan the run started with, when it has a readable one."""
        try:
            return PlanReport.from_dict(json.loads((self.path / "plan.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def history_up_to(self, step: int) -> list[dict]:
        """metrics.jsonl's step lines up to `step`, rewriting the file to hold only the lines up to it. A torn line
        (a write cut short by a full disk or a kill) is dropped: the checkpoint holds all that a resume needs."""
        if not self.metrics_path.exists():
            return []
        kept = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(record)
        write_atomically(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
        return [m for m in kept if "loss" in m]


def open_run_folder(path: Path, recipe: Recipe, resume: bool, overwrite: bool, console: Console) -> RunFolder:
    """Check the folder before anything loads: a new run needs it free of runs (or --overwrite); --resume needs a run
    with a good checkpoint and the same settings. A folder that exists is locked from here on."""
    if path.is_file():
        raise UserError(f"{path} is a file, not a run folder.", hint="Choose another --out.")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other.", hint="Pass one of them.")
    if not resume and holds_run(path) and not overwrite:
        raise UserError(
            f"{path} already holds a run.",
            hint="Continue it with --resume, start it again with --overwrite, or choose another --out.",
        )
    if overwrite or resume:
        check_inputs_outside_run_files(path, recipe)
    saved = recipe_of_run(path) if resume else None
    run = RunFolder(path, lock_fd=lock(path) if path.is_dir() else None)
    try:
        if saved:
            check_same_settings(saved, recipe)
            run.resume_from = choose_resume_point(path, console)
        if not run.resume_from:
            remove_run_files(path)  # there with --overwrite, or a --resume before any checkpoint
        remove_staging_leftovers(path)
    except BaseException:
        run.close()
        raise
    return run


def remove_run_files(path: Path) -> None:
    """Delete what a run writes into its folder (RUN_FILES), leaving anything else there."""
    with writing(path):
        for name in RUN_FILES:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with each setting that names a local file or folder (model, data, eval_data, init_adapter) as an
    absolute path: recipe.yaml then means the same files whatever folder a later command runs in."""
    from qlora_kit.probe.sources import path_exists

    found = {
        name: os.path.abspath(Path(value).expanduser())
        for name in PATH_SETTINGS
        if (value := getattr(recipe, name)) and path_exists(Path(value).expanduser())
    }
    return dataclasses.replace(recipe, **found)


def check_inputs_outside_run_files(path: Path, recipe: Recipe) -> None:
    """Refuse a run that reads its model, data or starting adapter from the run files that starting it deletes (a
    --from-adapter runs/x/adapter into --out runs/x --overwrite would delete the adapter it is to start from)."""
    doomed = [(path / name).resolve() for name in RUN_FILES]
    for setting in PATH_SETTINGS:
        value = getattr(recipe, setting)
        if not value or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        for target in doomed:
            if source == target or target in source.parents:
                flag = {"init_adapter": "--from-adapter", "eval_data": "--eval-data"}.get(setting, f"--{setting}")
                raise UserError(
                    f"{flag} {value} is inside {path}, whose {target.name} this run would delete before reading it.",
                    hint=f"Copy it out of {path} first, or start the new run in another --out.",
                )


def recipe_of_run(path: Path) -> Recipe:
    """The settings the run in path started with: a resumed run keeps them (flags may only repeat them)."""
    if not (path / "recipe.yaml").is_file():
        raise UserError(
            f"{path} holds no run to resume.",
            hint="Drop --resume to start a new run there, or pass the --out (or --name) of an earlier run.",
        )
    return load_recipe(path / "recipe.yaml")


def holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def check_same_settings(saved: Recipe, now: Recipe, saved_in: str = "the run") -> None:
    """A resumed run keeps its settings; paths count as the same when they name the same file."""

    def same(name: str) -> bool:
        a, b = getattr(saved, name), getattr(now, name)
        if a == b or name not in PATH_SETTINGS or a is None or b is None:
            return a == b
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()

    changed = [
        f"{f.name} ({getattr(saved, f.name)!r} in {saved_in}, {getattr(now, f.name)!r} now)"
        for f in dataclasses.fields(Recipe)
        if not same(f.name)
    ]
    if changed:
        raise UserError(
            f"A resumed run keeps its settings, but these differ: {', '.join(changed)}.",
            hint="Resume with only --out and --resume, or start a new run.",
        )


def choose_resume_point(path: Path, console: Console) -> Path | None:
    """The newest checkpoint that verifies; newer damaged ones are said and deleted, since their steps are redone.
    None when there is none (the run was killed before its first): the run starts again, as it began."""
    found, passed_over = checkpoint.latest_good_checkpoint(path)
    for sentence in passed_over:
        console.print(f"[yellow]Checkpoint {sentence}; falling back to an earlier one.[/]")
    if found is None:
        console.print(
            f"[yellow]{path} has no whole checkpoint to resume from (it stopped before its first): starting it "
            "again from step 0, with its settings.[/]"
        )
        return None
    for newer in checkpoint.complete_checkpoints(path):
        if checkpoint.step_of(newer) > checkpoint.step_of(found):
            shutil.rmtree(newer)
    return found


def lock(path: Path) -> int | None:
    """Hold path/.lock for this process, or refuse with who holds it (files.hold_lock)."""
    try:
        with writing(path):
            return hold_lock(path / LOCK)
    except Busy as busy:
        raise UserError(
            f"{path} is in use by another qlora-kit process ({busy.holder}).",
            hint="Wait for it to finish or stop it; two processes would write the same files.",
        ) from None


@contextlib.contextmanager
def writing(path: Path):
    """Turn a folder that cannot be written (read-only disk, no permission, full disk) into one sentence."""
    try:
        yield
    except OSError as e:
        raise UserError(
            f"Cannot write the run folder {path}: {e.strerror or e}.",
            hint="Choose another --out, or fix the folder's permissions or free space.",
        ) from None


def remove_staging_leftovers(path: Path) -> None:
    """Delete what writes a killed run never finished left behind (.adapter.partial-*, checkpoints/.step-N.partial-*,
    .metrics.jsonl.partial): whole ones are renamed into place, so these are never read, only left taking disk space."""
    for leftover in [*path.glob(".*.partial*"), *(path / "checkpoints").glob(".*.partial*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def check_free_disk(path: Path, needed: int) -> None:
    """Refuse to start a run whose checkpoints and adapter would not fit on the disk."""
    existing, free = free_space(path)
    if free < needed:
        raise UserError(
            f"The disk holding {existing} has {free / 2**20:,.0f} MiB free; this run's checkpoints and "
            f"adapter need about {needed / 2**20:,.0f} MiB.",
            hint="Free space, choose another --out, or keep fewer checkpoints (keep_checkpoints).",
        )


def fingerprint(data_files: list[str | None], model_folder: Path) -> dict:
    """What a checkpoint was trained on: the data files' content and the base model's config and weight files, so
    a resume can tell when either changed under the same names (or the same content moved to another name)."""
    data = hashlib.sha256(" ".join(checkpoint.file_sha256(Path(name)) if name else "-" for name in data_files).encode())
    config = json.loads((model_folder / "config.json").read_text()) if (model_folder / "config.json").is_file() else {}
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    weights = sorted((p.name, p.stat().st_size) for p in model_folder.glob("*.safetensors"))
    model = hashlib.sha256(json.dumps([config, weights], sort_keys=True, default=str).encode())
    return {"data": data.hexdigest()[:20], "model": model.hexdigest()[:20]}


def check_fingerprint(saved: dict, now: dict, allow_changed_data: bool) -> None:
    """Refuse to resume on another base model, or on changed data unless allowed; older checkpoints have none."""
    if saved.get("model") and saved["model"] != now["model"]:
        raise UserError(
            "The base model differs from the one the checkpoint was trained on (its config or weight files changed).",
            hint="Resume with the model the run started with, or start a new run.",
        )
    if saved.get("data") and saved["data"] != now["data"] and not allow_changed_data:
        raise UserError(
            "The data file's content changed since the checkpoint was written, so the run would go on "
            "with other examples than it started with.",
            hint="Restore the data the run started with, start a new run, or pass --allow-changed-data "
            "to go on with the new content anyway.",
        )


def named_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """root/name for a plain run name; a name with a path in it (../x, /x, a/b) could write outside root, so it is refused."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UserError(
            f"The run name {name!r} is not a plain name.",
            hint="Use letters, digits, '.', '_' and '-' (starting with a letter or digit), or pass --out.",
        )
    return root / name


def next_free_run_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3 ... so repeated runs never overwrite an earlier one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate
