"""Checkpoints: everything a run needs to continue exactly, written so an interruption never leaves a broken one.

runs/NAME/checkpoints/step-N/
  adapter/             LoRA weights (safetensors) and config: loadable on their own with PEFT
  optimizer.pt         optimizer state (torch AdamW, or bitsandbytes 8-bit / paged), whole and keyed by name
  state.pt             scheduler, GradScaler and RNG states (python, numpy, torch, CUDA)
  trainer_state.json   step, data position, the step shape after any out-of-memory step-downs, counters
  manifest.json        every file above with its size and sha256, written last
A checkpoint is written to checkpoints/.step-N.partial-* and renamed into place: step-N is complete or absent.
Everything is read back with safetensors or torch.load(weights_only=True), never with pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qlora_kit.plan.memory import optimizer_state_bytes
from qlora_kit.plan.planner import StepShape

MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainerState:
    """Where a run stands (trainer_state.json): with the weights and optimizer, all it needs to continue exactly."""

    shape: StepShape  # as the run last stepped, after any out-of-memory step-downs
    step: int = 0  # optimizer steps done
    position: int = 0  # examples drawn so far, by every rank together
    total_steps: int = 0
    examples: int = 0  # training examples (after packing), to tell a resume on other data
    ranks: int = 1
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    fingerprint: dict = field(default_factory=dict)  # run_folder.fingerprint of the data and base model
    recipe: dict = field(default_factory=dict)  # for people reading the file; recipe.yaml is what a resume uses

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        """Read trainer_state.json, of this version or an earlier one (fields added since take their defaults)."""
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        return cls(**{**values, "shape": StepShape(**values["shape"])})


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """Every trainable (LoRA) tensor whole, on the CPU, by its name in the model. Sharded (FSDP) tensors are
    gathered from every rank, so with several processes every rank must call this, in step."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def gather_optimizer(model, optimizer) -> dict:
    """The optimizer state whole and keyed by parameter name (the same for one GPU, DDP and FSDP, so a run can
    resume under another layout); a collective call, like gather_trainable."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_adapter,
    optimizer_state: dict,
    scheduler,
    scaler,
    trainer_state: TrainerState,
    keep: int,
) -> Path:
    """Write checkpoints/step-{step} atomically (write_adapter(folder) saves the adapter, optimizer_state comes from
    gather_optimizer) and delete all but the newest `keep`; returns its folder."""
    from qlora_kit.files import staged_folder

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"  # replaced when the same step is saved again, after a resume from an earlier one
    # A full disk or a second Ctrl-C leaves no partial folder and the older checkpoints as they were.
    with staged_folder(final) as staging:
        write_adapter(staging / "adapter")
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(
            {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()},
            staging / "state.pt",
        )
        (staging / "trainer_state.json").write_text(trainer_state.to_json())
        write_manifest(staging, step)
    _fsync(root)
    for old in complete_checkpoints(root.parent)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: each file's size and sha256, flushed to disk first, so a torn write is detectable."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path, sync=True)}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    _fsync(folder / MANIFEST)


REQUIRED = ("adapter/adapter_config.json", f"adapter/{ADAPTER_FILE}", "optimizer.pt", "state.pt", "trainer_state.json")


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is whole: every file its manifest lists matches, none
    a resume needs is missing from it, and each opens as what it should be (damage a manifest can agree with)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        listed = {str(name): (int(expected["bytes"]), str(expected["sha256"])) for name, expected in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its manifest is missing or unreadable"
    for name in REQUIRED:
        if name not in listed:
            return f"its manifest does not list {name}"
    for name, (size, sha256) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if file_sha256(path) != sha256:
            return f"{name} does not match its checksum"
    return _unreadable_part(folder)


def _unreadable_part(folder: Path) -> str | None:
    """The first file of a checkpoint that does not open as what it should be, said in a few words, or None."""
    from safetensors import safe_open

    try:
        TrainerState.from_json((folder / "trainer_state.json").read_text())
    except (ValueError, TypeError, KeyError, AttributeError):
        return "trainer_state.json is not a trainer state"
    try:
        rank = int(json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"])
        with safe_open(folder / "adapter" / ADAPTER_FILE, "pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    except Exception:  # safetensors raises its own error types for a file that is not safetensors
        return f"adapter/{ADAPTER_FILE} or adapter_config.json does not open"
    if not shapes or any(
        (".lora_A." in k and s[0] != rank) or (".lora_B." in k and s[-1] != rank) for k, s in shapes.items()
    ):
        return f"the adapter's weights do not have the rank {rank} its config says"
    for name in ("state.pt", "optimizer.pt"):
        try:
            torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a damaged file
            return f"{name} does not open"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (partial ones excluded), newest first, without checking their contents."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=step_of, reverse=True)


def step_of(folder: Path) -> int:
    """The step a checkpoints/step-N folder holds."""
    return int(folder.name.removeprefix("step-"))


def latest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match its manifest, and a sentence for each newer one passed over."""
    passed_over = []
    for folder in complete_checkpoints(run_dir):
        problem = verify(folder)
        if problem is None:
            return folder, passed_over
        passed_over.append(f"{folder.name} is damaged ({problem})")
    return None, passed_over


def file_name(parameter: str) -> str:
    """A trainable parameter's name in PEFT's adapter file, which drops the adapter's name ("default"): ...lora_A.weight;
    DoRA's magnitudes are saved as ...lora_magnitude_vector."""
    return parameter.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(
        ".default.", "."
    )


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler, device: torch.device) -> TrainerState:
    """Restore the adapter weights, optimizer, scheduler, scaler and RNG states; returns trainer_state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # Every rank reads the whole files; sharded (FSDP) parameters then keep their own shard of each tensor.
    options = StateDictOptions(full_state_dict=any(hasattr(p, "full_tensor") for p in model.parameters()), strict=False)
    by_file_name = {file_name(name): name for name, p in model.named_parameters() if p.requires_grad}
    saved = load_file(folder / "adapter" / ADAPTER_FILE, device=str(device))  # PEFT's files drop the adapter's name
    set_model_state_dict(model, {by_file_name[key]: value for key, value in saved.items()}, options=options)
    set_optimizer_state_dict(
        model, optimizer, torch.load(folder / "optimizer.pt", map_location=device, weights_only=True), options=options
    )
    state = torch.load(folder / "state.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    return TrainerState.from_json((folder / "trainer_state.json").read_text())


def rng_state() -> dict:
    """Every random generator a step can draw from, in types that torch.load(weights_only=True) reads back."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_bytes(trainable_params: int, optimizer: str) -> int:
    """About what one checkpoint takes on disk: fp32 LoRA weights plus the optimizer's two moments."""
    return trainable_params * (4 + optimizer_state_bytes(optimizer)) + 2**20


def file_sha256(path: Path, sync: bool = False) -> str:
    """A file's sha256, read in 1 MiB blocks; with sync, flushed to disk first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
