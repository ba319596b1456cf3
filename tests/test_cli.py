import json
import shutil

import pytest
import torch

from qlora_kit.cli import app as cli


def run_cli(monkeypatch, capsys, *args):
    """Run `qlora-kit ARGS` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.argv", ["qlora-kit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_the_verbs(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and all(verb in out for verb in ("train", "generate", "demo"))
    code, out, _ = run_cli(monkeypatch, capsys, "train", "--help")
    assert code == 0 and "--micro-batch" in out and "LoRA rank" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing data", "does not exist"),
        ("empty data", "has no examples"),
        ("bad line", "line 2: not valid JSON"),
        ("unknown model", "No model found"),
        ("existing run", "already holds a run"),
        ("bad setting", "`rank` is 0"),
        ("name with a path", "is not a plain name"),
        ("nothing to resume", "holds no run to resume"),
    ],
)
def test_user_errors_are_one_sentence_and_a_hint(monkeypatch, capsys, tmp_path, llama_dir, case, message):
    data = tmp_path / "data.jsonl"
    data.write_text({"empty data": "", "bad line": '{"text": "ok"}\n{oops\n'}.get(case, '{"text": "hello"}\n'))
    if case == "missing data":
        data = tmp_path / "missing.jsonl"
    model = tmp_path / "no-such-model" if case == "unknown model" else llama_dir
    out = tmp_path / "run"
    if case == "existing run":
        out.mkdir()
        (out / "metrics.jsonl").write_text("")
    extra = {"bad setting": ["--rank", "0"], "nothing to resume": ["--resume"]}.get(case, [])
    where = ["--name", "../escape"] if case == "name with a path" else ["--out", out]
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--model", model, "--data", data, *where, "--steps", "1", *extra
    )
    assert code == 1
    assert "Error:" in err and message in err and "Hint:" in err
    assert "Traceback" not in err
    if case != "existing run":
        assert not out.exists(), "nothing may be written when the input is bad"


def test_train_then_generate_through_the_cli(monkeypatch, capsys, tmp_path, llama_dir, chat_data):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--model",
        llama_dir,
        "--data",
        chat_data,
        "--out",
        out,
        "--steps",
        "3",
        "--rank",
        "4",
        "--micro-batch",
        "2",
    )
    assert code in (0, None)
    assert "Trainable:" in stdout and "Optimizer: torch AdamW" in stdout and "plain PEFT" in stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "step 3/3" in stdout, "not a terminal: compact lines instead of the live view"
    code, quiet, _ = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--model",
        llama_dir,
        "--data",
        chat_data,
        "--out",
        tmp_path / "q",
        "--steps",
        "2",
        "--rank",
        "4",
        "--quiet",
        "--chat-template-kwargs",
        "enable_thinking=false",
    )
    assert "Trainable:" not in quiet and "step 1/2" not in quiet and "plain PEFT" in quiet
    # the template's variable, kept in the recipe and in the template saved beside the adapter
    assert "chat_template_kwargs: enable_thinking=false" in (tmp_path / "q" / "recipe.yaml").read_text()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "q" / "adapter").chat_template.startswith(
        "{%- set enable_thinking = false %}"
    )
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "generate",
        "--adapter",
        out,
        "--prompt",
        "one two?",  # the run: its adapter
        "--max-new-tokens",
        "4",
    )
    assert code in (0, None) and stdout.strip()
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        chat_data,
        "--model",
        llama_dir,
        "--out",
        tmp_path / "more",
        "--from-adapter",
        out,
        "--steps",
        "1",
        "--quiet",
    )
    assert code in (0, None) and "rank: 4" in (tmp_path / "more" / "recipe.yaml").read_text()
    assert f"init_adapter: {out / 'adapter'}" in (tmp_path / "more" / "recipe.yaml").read_text()
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        chat_data,
        "--eval-data",
        tmp_path / "nope.jsonl",
        "--model",
        llama_dir,
        "--out",
        tmp_path / "held",
    )
    assert (
        code == 1
        and "nope.jsonl does not exist" in err
        and "with --eval-data" in err
        and not (tmp_path / "held").exists()
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--resume", "--from-adapter", out / "adapter")
    assert code == 1 and "--from-adapter starts a new run" in err and "Use one" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(
            monkeypatch,
            capsys,
            "train",
            "--model",
            llama_dir,
            "--data",
            chat_data,
            "--out",
            tmp_path / "capped",
            "--vram-limit",
            "6",
        )
        assert (
            code == 1
            and "--vram-limit 6 caps GPU memory, and this machine has no GPU" in err
            and "plan --vram 6" in err
        )
        assert not (tmp_path / "capped").exists()


def test_generate_with_a_folder_that_is_not_an_adapter(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--adapter", tmp_path, "--prompt", "hi")
    assert code == 1 and "holds no adapter_config.json" in err


@pytest.mark.parametrize(
    "command", [["generate", "--prompt", "hi"], ["chat"], ["eval", "--data", "d.jsonl"], ["merge", "--out", "merged"]]
)
def test_a_missing_adapter_is_named_before_anything_loads(monkeypatch, capsys, tmp_path, command):
    import sys

    for heavy in (
        "qlora_kit.adapter.folder",
        "qlora_kit.inference.chat",
        "qlora_kit.inference.evaluation",
        "qlora_kit.export.merge",
    ):
        monkeypatch.setitem(sys.modules, heavy, None)  # importing one now would fail: the check must come first
    code, _, err = run_cli(monkeypatch, capsys, *command, "--adapter", tmp_path / "no-such-run" / "adapter")
    assert code == 1 and "no-such-run/adapter does not exist" in err and "Traceback" not in err


def test_help_fits_80_columns_without_cutting_flag_names(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    for command in (["train"], ["plan"], ["auto"], ["generate"], ["data", "check"]):
        code, out, _ = run_cli(monkeypatch, capsys, *command, "--help")
        assert code == 0 and "…" not in out and max(map(len, out.splitlines())) <= 80, command
    code, out, _ = run_cli(monkeypatch, capsys, "train", "--help")
    out = " ".join(out.split())
    for flag in (
        "--micro-batch",
        "--uncheckpointed-layers",
        "--trust-remote-code",
        "--gradient-checkpointing / --no-gradient-checkpointing",
    ):
        assert flag in out, flag
    assert "keeping its activations. [default: on]" in out and "--checkpointing" not in out, "old names are not shown"
    assert "prompt/completion, alpaca, chat messages or sharegpt conversations" in out
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--help")
    assert "--micro-batch, --batch" in out


def test_probe_and_plan_commands(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "probe", "--json")
    assert code in (0, None) and "ram_total_gib" in json.loads(out)
    code, out, _ = run_cli(
        monkeypatch, capsys, "plan", "--model", "gemma-2b", "--gpu", "RTX 3060", "--seq-len", "2048", "--batch", "1"
    )
    assert code in (0, None) and "FITS" in out
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--model", "llama-3.1-8b", "--vram", "6", "--json")
    assert code == 3 and json.loads(out)["plan"]["verdict"] == "does not fit", (
        "does not fit: a non-zero exit for scripts"
    )
    assert "Qwen/Qwen2.5-3B" in json.loads(out)["models_that_fit"]
    code, out, _ = run_cli(monkeypatch, capsys, "plan", "--model", "llama-3.1-8b", "--vram", "6")
    assert code == 3 and "To make it fit" in out and "Catalogue models that fit these settings" in " ".join(out.split())
    code, _, err = run_cli(monkeypatch, capsys, "plan", "--model", "gemma2b", "--vram", "4")
    assert code == 1 and "Did you mean: gemma-2b" in err and "Traceback" not in err


def test_recipes_list_show_and_a_broken_recipe(monkeypatch, capsys, tmp_path, llama_dir, chat_data):
    code, out, _ = run_cli(monkeypatch, capsys, "recipes")
    assert code in (0, None) and all(name in out for name in ("4gb", "12gb", "24gb", "cpu"))
    code, out, _ = run_cli(monkeypatch, capsys, "recipes", "show", "8gb")
    assert code in (0, None) and "micro_batch: 2" in out and "# LoRA rank" in out
    broken = tmp_path / "broken.yaml"
    broken.write_text("rank: 16\nseq_len: lots\n")
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--recipe",
        broken,
        "--model",
        llama_dir,
        "--data",
        chat_data,
        "--out",
        tmp_path / "r",
    )
    assert code == 1 and str(broken) in err and "`seq_len` is 'lots'" in err and "int from 8" in err


def test_auto_dry_run_through_the_cli(monkeypatch, capsys, chat_data):
    code, out, _ = run_cli(
        monkeypatch, capsys, "auto", "--model", "gemma-2b", "--data", chat_data, "--gpu", "RTX 3060", "--dry-run"
    )
    assert code in (0, None) and "Recipe: 12gb" in out and "Planned peak" in out
    code, _, err = run_cli(
        monkeypatch, capsys, "auto", "--model", "llama-3.1-8b", "--data", chat_data, "--vram-limit", "6", "--dry-run"
    )
    assert code == 1 and "does not fit" in err and "These catalogue models fit" in err


def test_data_check_shows_format_lengths_problems_and_the_trained_tokens(monkeypatch, capsys, tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    good = '{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}\n'
    data.write_text(good * 3 + '{"messages": [{"role": "user", "content": "x"}]}\n')
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", data, "--model", llama_dir, "--seq", "64")
    assert code == 1 and "train would refuse" in err and "1 bad line." in err, "a check fails where train would"
    for expected in (
        "chat",
        "3 (1 bad lines not counted)",
        "p50",
        "longer than 64",
        "duplicates",
        "line 4: the conversation has no assistant turn",
        "First example as the model sees it",
        "<|assistant|>three</s>",
    ):
        assert expected in out, expected
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", data)
    assert "estimated" in out
    data.write_text(good * 3)
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", data)
    assert code in (0, None) and "Bad lines" not in out


def test_data_check_says_whether_the_thinking_switch_is_set(monkeypatch, capsys, tmp_path, llama_dir):
    import shutil

    from tests.test_data import THINKING_TEMPLATE

    model = shutil.copytree(llama_dir, tmp_path / "qwen3-like")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": THINKING_TEMPLATE}))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}\n'
    )
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", data, "--model", model)
    assert code in (0, None) and "thinking switch (enable_thinking), not set here" in " ".join(out.split())
    code, out, _ = run_cli(
        monkeypatch, capsys, "data", "check", data, "--model", model, "--chat-template-kwargs", "enable_thinking=false"
    )
    assert code in (0, None) and "Chats render with enable_thinking=false" in " ".join(out.split())
    code, _, err = run_cli(
        monkeypatch, capsys, "data", "check", data, "--model", model, "--chat-template-kwargs", "think"
    )
    assert code == 1 and "'think' is not KEY=VALUE" in err


def test_data_check_lists_every_bad_line(monkeypatch, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n' + '{"text": "x",}\n' * 14)
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", data)
    assert code == 1 and "14 bad lines" in err
    assert all(f"line {n}: not valid JSON" in out for n in range(2, 16))


def test_skip_bad_lines_and_eval_fraction_through_train(monkeypatch, capsys, tmp_path, llama_dir, chat_data):
    data = tmp_path / "mixed.jsonl"
    data.write_text(chat_data.read_text() + "not json\n")
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--model", llama_dir, "--data", data, "--out", tmp_path / "a", "--steps", "1"
    )
    assert code == 1 and "line 9: not valid JSON" in err and "--skip-bad-lines" in err
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--model",
        llama_dir,
        "--data",
        data,
        "--out",
        tmp_path / "b",
        "--steps",
        "2",
        "--skip-bad-lines",
        "--eval-fraction",
        "0.25",
        "--rank",
        "4",
    )
    out = " ".join(out.split())  # rich wraps long lines
    assert code in (0, None) and "Skipped 1 bad examples" in out and "6 chat examples" in out and "2 held out" in out
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in lines[-1]


def test_auto_resume_continues_the_run_it_started(monkeypatch, capsys, tmp_path, llama_dir, chat_data):
    out = tmp_path / "auto-run"
    code, _, err = run_cli(
        monkeypatch, capsys, "auto", "--model", llama_dir, "--data", chat_data, "--out", out, "--plain"
    )
    assert code in (0, None), err
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    shutil.rmtree(out / "adapter")  # as if killed after the final checkpoint, before the adapter was written
    code, stdout, err = run_cli(
        monkeypatch, capsys, "auto", "--model", llama_dir, "--data", chat_data, "--out", out, "--resume", "--plain"
    )
    assert code in (0, None), err
    assert f"Resuming from step-{steps}" in stdout and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == steps


def test_bitsandbytes_optional_kernel_warning_stays_off_the_screen():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import qlora_kit, bitsandbytes"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "kernels" not in out.stderr, out.stderr


def test_peft_advice_to_library_authors_stays_off_the_screen_and_ours_shows():
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        cli._quiet_libraries()
        warnings.warn_explicit(
            "Already found a `peft_config` attribute", UserWarning, "peft_model.py", 1, module="peft.peft_model"
        )
        warnings.warn_explicit(
            "fan_in_fan_out is set to True", UserWarning, "layer.py", 1, module="peft.tuners.lora.layer"
        )
        warnings.warn_explicit("our own", UserWarning, "train.py", 1, module="qlora_kit.train.run")
    assert [str(w.message) for w in shown] == ["our own"]


def test_the_flags_users_have_today_still_work_and_every_setting_has_one(monkeypatch, capsys, tmp_path, llama_dir):
    from qlora_kit.plan.recipes import Recipe

    old = [
        "--format",
        "auto",
        "--train-on-inputs",
        "--skip-bad-lines",
        "--packing",
        "--drop-long",
        "--no-group-by-length",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--dropout",
        "0.1",
        "--seq-len",
        "64",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        "3",
        "--epochs",
        "1",
        "--lr",
        "0.001",
        "--seed",
        "1",
        "--precision",
        "fp32",
        "--optimizer",
        "adamw",
        "--parallel",
        "ddp",
        "--no-checkpointing",
        "--uncheckpointed-layers",
        "0",
        "--checkpoint-every",
        "5",
        "--keep-checkpoints",
        "1",
        "--eval-every",
        "2",
        "--eval-fraction",
        "0.1",
        "--eval-data",
        tmp_path / "none.jsonl",
    ]
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "-m", llama_dir, "-d", tmp_path / "missing.jsonl", "--out", tmp_path / "run", *old
    )
    assert code == 1 and "does not exist" in err, "every flag parsed; the run stops at the missing data"
    assert "--checkpointing is now --gradient-checkpointing" in err
    code, out, _ = run_cli(monkeypatch, capsys, "train", "--help")
    for name in Recipe.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in out, name
    code, _, err = run_cli(monkeypatch, capsys, "train", "--precision", "fp8")
    assert code == 2 and "fp8" in err and "bf16" in err, "a wrong choice is a usage error listing the right ones"
