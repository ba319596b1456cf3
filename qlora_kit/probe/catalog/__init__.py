"""Offline catalogues, as data: config facts of popular models (models.yaml) and GPU specs (gpus.yaml).

Lookups accept what people type ("gemma-2b", "rtx 4060 ti 16gb", "3060") and fail with the closest names.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError


@functools.cache
def read_catalogue(name: str):
    """One of the catalogue files (models.yaml, gpus.yaml), parsed; installed with the package."""
    return yaml.safe_load(resources.files(__name__).joinpath(name).read_text())


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram_gib: float
    compute_capability: str
    bf16: bool


def _models() -> dict:
    return read_catalogue("models.yaml")


@functools.cache
def gpu_catalogue() -> list[GpuSpec]:
    """Every catalogued GPU, in the file's order (by family)."""
    entries = read_catalogue("gpus.yaml")
    return [GpuSpec(e["name"], e["vram_gib"], e["compute_capability"], e["bf16"]) for e in entries]


@functools.cache
def _gpu_aliases() -> dict[str, str]:
    entries = read_catalogue("gpus.yaml")
    return {_normal(alias): e["name"] for e in entries for alias in [e["name"], *e["aliases"]]}


def model_ids() -> list[str]:
    """Hub ids of every catalogued model."""
    return list(_models()["models"])


def _normal(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "")
    return re.sub(r"[^a-z0-9.]", "", text)


def find_gpu(query: str) -> GpuSpec:
    """The catalogued GPU a user means: exact name or alias, else a unique partial match."""
    by_name = {g.name: g for g in gpu_catalogue()}
    aliases = _gpu_aliases()
    key = _normal(query)
    if key in aliases:
        return by_name[aliases[key]]
    partial = sorted({name for alias, name in aliases.items() if key and key in alias})
    # "rtx 4060 ti" means the desktop card in some memory size, not the laptop or the Super variant.
    same_card = [name for name in partial if re.fullmatch(r"(\d+gb)?", _normal(name).replace(key, "", 1))]
    partial = same_card or partial
    if len(partial) == 1:
        return by_name[partial[0]]
    if partial:
        raise UserError(
            f"'{query}' matches several GPUs: {', '.join(partial[:8])}.",
            hint="Give the full name, e.g. with its memory size.",
        )
    close = difflib.get_close_matches(key, aliases, n=5, cutoff=0.5)
    names = sorted({aliases[c] for c in close})
    raise UserError(
        f"Unknown GPU '{query}'." + (f" Did you mean: {', '.join(names)}?" if names else ""),
        hint="Use --vram GB for a card that is not in the catalogue.",
    )


def catalogue_id(query: str) -> str | None:
    """The hub id that a catalogue name or hub id stands for, whatever its case ("Gemma-2B" -> google/gemma-2b)."""
    for model_id, config in _models()["models"].items():
        if query.lower() in [model_id.lower(), *config.get("short", [])]:
            return model_id
    return None


def model_names() -> list[str]:
    """Every name the catalogue answers to: hub ids and the short names people type."""
    return [n for model_id, c in _models()["models"].items() for n in (model_id, *c.get("short", []))]


def did_you_mean(query: str, names: list[str], cutoff: float = 0.6) -> str:
    """' Did you mean: a, b?' for the names closest to a mistyped one (any case), or ''."""
    lower = {n.lower(): n for n in names}
    close = [lower[c] for c in difflib.get_close_matches(query.lower(), lower, n=4, cutoff=cutoff)]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def find_model_shape(query: str) -> ModelShape:
    """Config facts for a catalogue name or hub id, a local model folder, a .gguf file, or a cached hub model."""
    catalogue = _models()
    model_id = catalogue_id(query)
    if model_id is not None:
        return ModelShape.from_config(model_id, catalogue["models"][model_id])
    config = _local_config(query)
    if config is not None:
        try:
            return ModelShape.from_config(query, config)
        except KeyError as e:
            raise UserError(
                f"The config of {query} gives no {e.args[0]}, which the plan needs to size the model.",
                hint="Restore the model's own config.json, or plan a catalogue model of the same size.",
            ) from None
    raise UserError(
        f"No config found for '{query}': not in the catalogue, not a local folder, and not in the hub cache "
        "or on the hub." + did_you_mean(query, model_names(), cutoff=0.4),
        hint="Pass a model folder with config.json, or one of: "
        + ", ".join(c["short"][0] for c in catalogue["models"].values()),
    )


def _local_config(query: str) -> dict | None:
    from qlora_kit.probe.sources import hub_id_of, path_exists, read_model_config

    path = Path(query).expanduser()
    exists = path_exists(path)  # False for a name too long to be a path, too
    if exists and path.is_dir() and (path / "config.json").is_file():
        return read_model_config(path)
    if exists and path.is_file() and path.suffix == ".gguf":
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    if not exists and hub_id_of(query):
        from qlora_kit.probe.hub import fetch_config

        config = fetch_config(hub_id_of(query))  # config.json alone, from the cache or the hub
        if config is None:
            raise UserError(
                f"{query} is not in the catalogue or the local Hugging Face cache, and the hub cannot be "
                "reached (no network, or HF_HUB_OFFLINE is set) to read its config.json.",
                hint="Plan it on a machine with network (plan fetches config.json alone, a few kB), or "
                "pass a model folder, or a catalogue model of the same size.",
            )
        return config
    return None
