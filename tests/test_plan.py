import json

import pytest
from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.plan.memory import estimate_peak_memory
from qlora_kit.plan.planner import choose_target, make_plan, render, suggest_fix
from qlora_kit.plan.recipes import Recipe
from qlora_kit.probe.catalog import find_model_shape
from qlora_kit.probe.hardware import Gpu, probe
from qlora_kit.units import GIB


def rendered(report) -> str:
    console = Console(record=True, width=120, file=open("/dev/null", "w"))
    console.print(render(report))
    return console.export_text()


def test_gemma_2b_fits_a_3060_and_the_table_says_so():
    report = make_plan("gemma-2b", Recipe(seq_len=2048, micro_batch=1), choose_target(gpu="RTX 3060"), compare=True)
    assert report.plan.verdict == "fits" and report.fix is None
    text = rendered(report)
    for expected in (
        "FITS",
        "linear weights, NF4",
        "CUDA context",
        "total (what nvidia-smi shows)",
        "Longest sequence",
        "full fine-tuning",
        "Trainable: 19,611,648",
    ):
        assert expected in text
    assert report.alternatives["full_finetune"] > 10 * report.alternatives["qlora_4bit"]
    assert report.alternatives["qlora_4bit"] < report.alternatives["lora_16bit"] < report.alternatives["full_finetune"]


def test_llama_8b_on_6gb_does_not_fit_and_says_why_with_numbers():
    report = make_plan("llama-3.1-8b", Recipe(seq_len=2048), choose_target(vram_gib=6))
    assert report.plan.verdict == "does not fit"
    assert report.longest_seq_at_batch_1 == 0 and "nothing fits" in report.fix and "GiB" in report.fix


def test_the_fix_keeps_the_effective_batch_when_micro_batch_is_enough():
    shape, target = find_model_shape("gemma-2b"), choose_target(vram_gib=6)
    recipe = Recipe(seq_len=2048, micro_batch=8, grad_accum=1)
    assert estimate_peak_memory(shape, recipe).total_bytes > 6 * GIB
    fix = suggest_fix(shape, recipe, target)
    assert fix.startswith("--micro-batch") and "same effective batch of 8" in fix


def test_the_fix_shortens_sequences_when_batch_1_is_not_enough():
    fix = suggest_fix(find_model_shape("gemma-2b"), Recipe(seq_len=8192, micro_batch=1), choose_target(vram_gib=3))
    assert "--seq-len" in fix


def test_tight_when_within_ten_percent_of_the_card():
    shape = find_model_shape("gemma-2b")
    total = estimate_peak_memory(shape, Recipe(seq_len=2048, micro_batch=1)).total_bytes
    report = make_plan(shape, Recipe(seq_len=2048, micro_batch=1), choose_target(vram_gib=1.05 * total / GIB))
    assert report.plan.verdict == "tight"


def test_targets_from_flags_probe_or_ram():
    assert choose_target(gpu="T4").bf16 is False
    with pytest.raises(UserError, match="either --gpu or --vram"):
        choose_target(gpu="T4", vram_gib=8)
    with pytest.raises(UserError, match="must be a positive number of gigabytes"):
        choose_target(vram_gib=-1)
    hardware = probe(check_bnb=False)
    cpu = choose_target(hardware=hardware)
    assert cpu.device == "cpu" and cpu.capacity_bytes > 0 and "No GPU" in cpu.note
    assert choose_target(hardware=hardware, vram_limit=6).name == "6 GB GPU", "no GPU to cap: a card that size"
    hardware.gpus = [Gpu(0, "Tesla T4", "7.5", 15.0, 14.5, False, "nvml")]
    assert choose_target(hardware=hardware).name == "Tesla T4"
    limited = choose_target(hardware=hardware, vram_limit=6)
    assert (limited.name, limited.capacity_bytes, limited.bf16) == ("Tesla T4 (limited to 6 GB)", 6 * GIB, False)
    assert choose_target(hardware=hardware, vram_limit=40).capacity_bytes == int(15.0 * GIB), "never above the card"
    with pytest.raises(UserError, match="either --gpu or --vram-limit"):
        choose_target(gpu="T4", hardware=hardware, vram_limit=6)
    with pytest.raises(UserError, match="--vram-limit must be a positive number of gigabytes, not 0"):
        choose_target(hardware=hardware, vram_limit=0)


def test_no_bf16_card_gets_a_note_about_fp16():
    report = make_plan("smollm2-135m", Recipe(), choose_target(gpu="T4"))
    assert any("fp16" in note for note in report.plan.notes)
    assert report.to_dict()["plan"]["verdict"] == "fits"


def test_plan_for_several_gpus_through_the_cli(monkeypatch, capsys):
    from tests.test_cli import run_cli

    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "plan",
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "RTX 3090",
        "--gpus",
        "2",
        "--strategy",
        "fsdp",
        "--json",
    )
    assert code in (0, None) and "fsdp_gathered_weights" in json.loads(out)["plan"]["components"]
    code, _, err = run_cli(
        monkeypatch, capsys, "plan", "--model", "gemma-2b", "--gpu", "T4", "--gpus", "2", "--strategy", "zero"
    )
    assert code == 1 and "Unknown --strategy zero" in err


def test_spare_memory_is_offered_as_layers_that_skip_recomputation():
    from typer.testing import CliRunner

    from qlora_kit.cli.app import app

    roomy = make_plan("gemma-2b", Recipe(seq_len=2048, micro_batch=4), choose_target(gpu="RTX 3090"))
    layers = roomy.uncheckpointed_layers
    assert 0 < layers < 18 and f"--uncheckpointed-layers {layers}" in rendered(roomy)
    faster = make_plan(
        "gemma-2b", Recipe(seq_len=2048, micro_batch=4, uncheckpointed_layers=layers), choose_target(gpu="RTX 3090")
    )
    assert faster.plan.verdict == "fits" and faster.faster is None, "nothing more to spare"
    assert faster.plan.total_bytes <= 0.9 * faster.target.capacity_bytes
    assert make_plan("gemma-2b", Recipe(seq_len=512, micro_batch=1), choose_target(gpu="RTX 3090")).faster.startswith(
        "--no-gradient-checkpointing"
    )
    assert make_plan("llama-3.1-8b", Recipe(seq_len=2048), choose_target(vram_gib=6)).faster is None
    result = CliRunner().invoke(
        app, ["plan", "--model", "gemma-2b", "--gpu", "RTX 3090", "--seq-len", "2048", "--no-checkpointing", "--json"]
    )
    plan = json.loads(result.stdout)["plan"]  # the flag's old name still works, with a line saying the new one
    assert "--checkpointing is now --gradient-checkpointing" in result.stderr
    assert plan["details"]["checkpointed_layers"] == 0 and result.exit_code == (
        3 if plan["verdict"] == "does not fit" else 0
    )


def test_a_cpu_plan_says_the_ram_other_programs_hold():
    cpu = choose_target(hardware=probe(check_bnb=False))
    assert cpu.name.startswith("this machine's free RAM (no GPU, ") and "GiB in use" in cpu.name
    assert "other programs hold the rest" in cpu.note


def test_plan_from_an_adapter_takes_its_settings_and_counts_dpos_frozen_copy(monkeypatch, capsys, tmp_path):
    from tests.test_cli import run_cli

    adapter = tmp_path / "sft-adapter"
    adapter.mkdir()
    import torch
    from safetensors.torch import save_file

    layer = "base_model.model.model.layers.0.self_attn.q_proj"  # plan reads the shapes only, to check the rank
    save_file(
        {f"{layer}.lora_A.weight": torch.zeros(64, 8), f"{layer}.lora_B.weight": torch.zeros(8, 64)},
        adapter / "adapter_model.safetensors",
    )
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 64, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": True}
        )
    )
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "plan",
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "RTX 3060",
        "--method",
        "dpo",
        "--from-adapter",
        str(adapter),
        "--json",
    )
    report = json.loads(out)
    expected = estimate_peak_memory(
        find_model_shape("llama-3.1-8b"), Recipe(rank=64, target_modules="q_proj,v_proj", use_dora=True)
    )
    assert report["plan"]["rank"] == 64 and report["plan"]["trainable_params"] == expected.trainable_params
    assert report["plan"]["components"]["reference_adapter"] == 4 * expected.trainable_params
    assert report["reference"]["mode"] == "on_the_fly"
    code, _, err = run_cli(
        monkeypatch, capsys, "plan", "--model", "llama-3.1-8b", "--from-adapter", str(adapter), "--rank", "8"
    )
    assert code == 1 and "rank 8 (the adapter's: 64)" in err


def test_plan_refuses_a_reference_setting_for_a_method_without_one(monkeypatch, capsys):
    from tests.test_cli import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "plan", "--model", "llama-3.1-8b", "--reference", "precomputed")
    assert code == 1 and "--method sft has none" in err and "Leave --reference out" in err
