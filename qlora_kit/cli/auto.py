"""`qlora-kit auto`: probe, choose a recipe for this machine (or a named card), explain the choice, and train with it."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from qlora_kit.architectures.shape import ModelShape
from qlora_kit.errors import UserError
from qlora_kit.plan.choose import (
    Choice,
    choose_recipe,
    reference_forwards_of,
    render_choice,
)
from qlora_kit.plan.planner import Target, catalogue_models_that_fit, choose_target, describe_reference, make_plan
from qlora_kit.plan.recipes import Recipe, with_overrides
from qlora_kit.probe.catalog import find_model_shape
from qlora_kit.units import GIB


def run_auto(
    model: str,
    data_path: Path,
    out: Path | None,
    console: Console,
    vram_limit: float | None = None,
    gpu: str | None = None,
    dry_run: bool = False,
    display: str = "auto",
    trust_remote_code: bool = False,
    gpus: int = 1,
    steps: int | None = None,
    epochs: float | None = None,
    data_split: str = "train",
    data_config: str | None = None,
    report_to: list[str] | None = None,
    **lora,
):
    """Probe, choose, print the choice, and (unless dry_run) train with it, for `steps` optimizer steps or `epochs`
    passes over the data when given (else the recipe's); data_split and data_config choose a hub dataset's part;
    report_to: the trackers the steps also go to.
    lora: the settings the user chose for what is learned (method, beta, target_modules, use_rslora, use_dora,
    lora_init, init_adapter, chat_template_kwargs), which the choice plans with and keeps; preference data without
    a method trains with DPO."""
    from qlora_kit.data import dataset as data_module
    from qlora_kit.model.load import load_tokenizer
    from qlora_kit.probe.sources import resolve_model
    from qlora_kit.train.run import RunOptions, run_training
    from qlora_kit.train.run_folder import next_free_run_dir

    loaded = data_module.read_records(data_path, can_skip=False, split=data_split, config=data_config)
    with_overrides(Recipe(), steps=steps, epochs=epochs)  # a bad value is reported before anything is loaded
    from_data = _settings_from_data(loaded, data_path, lora, console)
    chosen = lora_choices(lora)
    shape = find_model_shape(model)
    target = _target_here(gpu, vram_limit, gpus, dry_run)
    if os.environ.get("RANK", "0") != "0":  # rank 0 explains the choice; every rank makes the same one
        console = Console(quiet=True)
    try:
        tokenizer = load_tokenizer(
            resolve_model(model, trust_remote_code, console), trust_remote_code, chosen.get("chat_template_kwargs", "")
        )
    except UserError:
        if not dry_run:
            raise
        tokenizer = None
    lengths = data_lengths(loaded.records, tokenizer, tokenizer and data_module.cache_key(loaded, tokenizer))
    choice = choose_recipe(shape, target, lengths, chosen, from_data)
    if tokenizer is None:
        choice.warnings.append(
            "The model's tokenizer is not available here: token lengths are estimated at 4 characters per token."
        )
    console.print(render_choice(choice, shape, model))
    check_choice_fits(choice, shape, target)
    recipe = with_overrides(
        choice.recipe,
        model=model,
        data=str(data_path),
        steps=steps,
        epochs=epochs,
        data_split=data_split,
        data_config=data_config,
    )
    # The run keeps the plan that made the choice (plan.json, the dashboard's marks), not one of its own for one GPU.
    plan = make_plan(
        shape,
        recipe,
        replace(target, strategy=recipe.parallel),
        reference_forwards=reference_forwards_of(recipe, len(lengths), target.gpus),
    )
    if dry_run:  # a run says it as it starts
        if plan.reference:
            console.print(f"DPO reference: {describe_reference(plan.reference)}")
        return choice
    return run_training(
        recipe,
        out or next_free_run_dir(Path("runs"), "auto"),
        console,
        RunOptions(display=display, trust_remote_code=trust_remote_code, plan=plan, report_to=report_to),
    )


def _settings_from_data(loaded, data_path: Path, lora: dict, console: Console) -> dict:
    """What the data decides when the user did not: preference pairs train with DPO."""
    from qlora_kit.data.dataset import PREFERENCE_FORMATS

    if loaded.format in PREFERENCE_FORMATS and lora.get("method") is None:
        console.print(f"{data_path} holds preference pairs: training with DPO (--method orpo for ORPO).")
        return {"method": "dpo"}  # pairs of a chosen and a rejected answer are what DPO learns from
    return {}


def _target_here(gpu: str | None, vram_limit: float | None, gpus: int, dry_run: bool) -> Target:
    """The card to choose for (--gpu), else this machine's GPU (capped at vram_limit) or RAM, times the GPUs the run
    trains on; a choice for a card is trained only on a machine with a GPU."""
    from qlora_kit.probe.hardware import probe

    hardware = probe(check_bnb=False)
    target = choose_target(gpu=gpu, hardware=hardware, vram_limit=vram_limit)
    gpus = int(os.environ.get("WORLD_SIZE", gpus))  # under torchrun: one process per GPU
    if gpus > 1:
        target = replace(target, gpus=gpus)
    if not dry_run and target.device == "cuda" and not hardware.gpus:
        raise UserError(
            f"This machine has no GPU, so it cannot train the choice made for {target.name}.",
            hint="Add --dry-run to see the choice, or drop --gpu/--vram-limit to train on the CPU.",
        )
    return target


def check_choice_fits(choice: Choice, shape: ModelShape, target: Target) -> None:
    """Refuse a choice that does not fit even at the smallest settings, naming catalogue models that would."""
    if choice.fits:
        return
    smaller = catalogue_models_that_fit(replace(target, strategy=choice.recipe.parallel), choice.recipe)
    raise UserError(
        f"{shape.name} does not fit {target.name} even at the smallest settings: "
        f"{choice.planned_bytes / GIB:.1f} GiB planned for {target.capacity_bytes / GIB:.1f} GiB.",
        hint=(f"These catalogue models fit: {', '.join(smaller[:4])}." if smaller else "Use a larger card.")
        + " `qlora-kit plan` shows the details.",
    )


def data_lengths(records: list[dict], tokenizer=None, cache_key: str | None = None) -> list[int]:
    """Token count per example; without a tokenizer, about 4 characters per token. The tokenized table is cached
    under cache_key, so the training run that follows does not tokenize again."""
    from qlora_kit.data.dataset import tokenize

    if tokenizer is None:
        return [max(1, len(json.dumps(r)) // 4) for r in records]
    return tokenize(records, tokenizer, seq_len=2**31 - 1, cache_key=cache_key).lengths


def lora_choices(lora: dict) -> dict:
    """The settings the user chose for the adapter, with those an adapter to start from fixes (rank, alpha,
    layers, variant): auto plans with them and does not change them."""
    from qlora_kit.model.load import settings_from_adapter

    given = with_overrides(Recipe(), **lora)
    if not given.init_adapter:
        return {k: v for k, v in lora.items() if v is not None}
    fixed = settings_from_adapter(given)
    return {
        **{k: v for k, v in lora.items() if v is not None},
        **{k: getattr(fixed, k) for k in ("rank", "alpha", "target_modules", "use_rslora", "use_dora")},
    }
