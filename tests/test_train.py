import dataclasses
import io
import json
import math

import pytest
import torch
from rich.console import Console

from qlora_kit.data import dataset as data
from qlora_kit.errors import UserError
from qlora_kit.model import load as models
from qlora_kit.plan.recipes import Recipe, count_steps, load_recipe
from qlora_kit.train.loop import StepsKept, lr_multiplier, train_model
from qlora_kit.train.run import RunOptions, run_training

CPU = torch.device("cpu")
QUIET = Console(file=io.StringIO())


def trained(folder, data_path, recipe, steps):
    """Train a fresh LoRA model in-process; returns the model, its state before training, and the losses."""
    tokenizer = models.load_tokenizer(folder)
    examples = data.tokenize(data.read_records(data_path).records, tokenizer, recipe.seq_len)
    torch.manual_seed(recipe.seed)
    model = models.attach_lora(models.load_base_4bit(folder, torch.float32, CPU), recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = StepsKept()
    recipe = dataclasses.replace(recipe, steps=steps)
    train_model(model, examples, recipe, hooks, pad_id=tokenizer.pad_token_id, dtype=torch.float32)
    return model, before, [m["loss"] for m in hooks.steps]


def test_loss_falls_and_only_lora_weights_change(tiny_model_dir, text_data):
    recipe = Recipe(rank=8, lr=1e-2, micro_batch=4, warmup_ratio=0.1, dropout=0.0)
    model, before, losses = trained(tiny_model_dir, text_data, recipe, steps=40)
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if "lora_" in k}
    assert changed and changed <= lora_keys
    frozen = [k for k in before if k not in lora_keys]
    assert any("embed" in k for k in frozen) and any("absmax" in k or "quant" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), "frozen base must stay bit-identical"


def test_same_seed_gives_identical_runs_on_cpu(llama_dir, text_data):
    recipe = Recipe(rank=4, micro_batch=2, dropout=0.1)
    *_, first = trained(llama_dir, text_data, recipe, steps=4)
    *_, second = trained(llama_dir, text_data, recipe, steps=4)
    assert first == second


def test_gradient_accumulation_matches_one_large_batch(llama_dir, text_data):
    # Labelled tokens differ per example; normalising per step (not per micro-batch) keeps these equal.
    one = Recipe(rank=4, micro_batch=4, grad_accum=1, dropout=0.0, warmup_ratio=0.0)
    split = dataclasses.replace(one, micro_batch=1, grad_accum=4)
    model_a, _, loss_a = trained(llama_dir, text_data, one, steps=2)
    model_b, _, loss_b = trained(llama_dir, text_data, split, steps=2)
    assert loss_a[0] == pytest.approx(loss_b[0], rel=1e-5)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_schedule_warms_up_then_decays_by_cosine():
    factor = lr_multiplier(100, Recipe(warmup_ratio=0.1))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5)
    assert 0 < factor(99) < 0.001
    assert lr_multiplier(10, Recipe(schedule="constant", warmup_ratio=0))(9) == 1.0


def test_steps_come_from_epochs_unless_given():
    assert count_steps(10, Recipe(micro_batch=2, grad_accum=2, epochs=1)) == 3
    assert count_steps(10, Recipe(micro_batch=2, epochs=2.5)) == math.ceil(12.5)
    assert count_steps(10, Recipe(steps=7)) == 7


def test_run_writes_recipe_metrics_and_a_peft_adapter(llama_dir, chat_data, tmp_path):
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=3, micro_batch=2)
    out = tmp_path / "runs" / "one"
    summary = run_training(recipe, out, QUIET)
    assert summary.steps == 3 and summary.adapter_bytes > 0
    assert load_recipe(out / "recipe.yaml") == recipe
    plan = json.loads((out / "plan.json").read_text())
    assert plan["plan"]["trainable_params"] == summary.trainable_params and plan["plan"]["verdict"] == "fits"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "step_s", "rss_gib", "mem_alloc_gib"} <= set(lines[0])
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    }
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging folder or lock left behind"


def test_existing_run_and_bad_input_write_nothing(llama_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("rank: 8\n")
    with pytest.raises(UserError, match="already holds a run"):
        run_training(Recipe(model=str(llama_dir), data=str(chat_data)), out, QUIET)
    assert [p.name for p in out.iterdir()] == ["recipe.yaml"]
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="does not exist"):
        run_training(Recipe(model=str(llama_dir), data=str(tmp_path / "missing.jsonl")), fresh, QUIET)
    with pytest.raises(UserError, match="No model found"):
        run_training(Recipe(model=str(tmp_path / "no-model"), data=str(chat_data)), fresh, QUIET)
    assert not fresh.exists()


def flaky_loss(monkeypatch, fails):
    """Make the loss raise CUDA's out-of-memory error on the last micro-batch of the steps fails(step, batch) picks,
    after earlier micro-batches have already accumulated gradients."""
    from qlora_kit.objectives import sft as losses
    from qlora_kit.train import loop

    real_loss, real_step = losses.chunked_cross_entropy, loop.forward_backward
    state = {"step": 1, "calls": 0, "per_step": 0}

    def loss(hidden, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["per_step"] and fails(state["step"], hidden.shape[0]):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_loss(hidden, *args, **kwargs)

    def forward_backward(loop_state, examples, *args):
        state["calls"], state["per_step"] = 0, -(-len(examples) // loop_state.progress.shape.micro_batch)
        result = real_step(loop_state, examples, *args)
        state["step"] += 1
        return result

    monkeypatch.setattr(losses, "chunked_cross_entropy", loss)
    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def test_out_of_memory_steps_down_and_loses_no_step(llama_dir, text_data, tmp_path, monkeypatch):
    flaky_loss(monkeypatch, lambda step, batch: (step == 2 and batch == 4) or (step == 4 and batch == 2))
    recipe = Recipe(
        model=str(llama_dir), data=str(text_data), rank=4, steps=6, micro_batch=4, grad_accum=2, dropout=0.0
    )
    console = Console(file=io.StringIO())
    summary = run_training(recipe, tmp_path / "run", console)
    assert summary.steps == 6 and summary.step_downs == ["micro-batch 4 -> 2", "micro-batch 2 -> 1"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["to"]["micro_batch"]) for m in lines if "event" in m] == [(2, 2), (4, 1)]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6], "no step lost, none repeated"
    assert [(m["micro_batch"], m["grad_accum"]) for m in steps] == [(4, 2), (2, 4), (2, 4), (1, 8), (1, 8), (1, 8)]
    assert "Out of memory at step 2" in console.file.getvalue()


def test_out_of_memory_in_evaluation_steps_down_like_in_training(llama_dir, text_data, tmp_path, monkeypatch):
    from qlora_kit.objectives import sft as losses

    real = losses.chunked_cross_entropy

    def loss(hidden, *args, **kwargs):  # evaluation runs without gradients; a micro-batch of 4 does not fit there
        if not torch.is_grad_enabled() and hidden.shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(losses, "chunked_cross_entropy", loss)
    recipe = Recipe(
        model=str(llama_dir),
        data=str(text_data),
        eval_data=str(text_data),
        eval_every=2,
        rank=4,
        steps=4,
        micro_batch=4,
        dropout=0.0,
    )
    console = Console(file=io.StringIO(), width=200)
    summary = run_training(recipe, tmp_path / "run", console)
    assert summary.steps == 4 and summary.step_downs == ["micro-batch 4 -> 2"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "event" in m] == [2]
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 4] and lines[-1]["micro_batch"] == 2
    assert "Out of memory at step 2" in console.file.getvalue()


def test_a_redone_step_gives_the_same_update(llama_dir, text_data, tmp_path, monkeypatch):
    recipe = Recipe(rank=4, micro_batch=4, grad_accum=1, dropout=0.0, warmup_ratio=0.0)
    clean, _, clean_losses = trained(llama_dir, text_data, recipe, steps=3)
    flaky_loss(monkeypatch, lambda step, batch: batch == 4)  # every step fails at micro-batch 4 and is redone at 2
    redone, _, redone_losses = trained(llama_dir, text_data, recipe, steps=3)
    assert redone_losses == pytest.approx(clean_losses, rel=1e-5)
    for (name, a), b in zip(clean.named_parameters(), redone.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_when_nothing_fits_the_run_stops_with_the_adapter_saved(llama_dir, text_data, tmp_path, monkeypatch):
    from qlora_kit.objectives import sft as losses

    real = losses.chunked_cross_entropy
    calls = {"n": 0}

    def loss(hidden, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the first micro-batch works, everything after runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(losses, "chunked_cross_entropy", loss)
    recipe = Recipe(model=str(llama_dir), data=str(text_data), rank=4, steps=5, micro_batch=1, seq_len=256)
    with pytest.raises(UserError, match="Out of memory even at micro-batch 1") as error:
        run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    assert "The adapter of step 1 is saved" in error.value.hint
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_held_out_data_is_evaluated_on_schedule_and_at_the_end(llama_dir, text_data, tmp_path):
    recipe = Recipe(
        model=str(llama_dir),
        data=str(text_data),
        eval_data=str(text_data),
        eval_every=2,
        rank=8,
        lr=1e-2,
        steps=5,
        micro_batch=4,
        dropout=0.0,
    )
    run_training(recipe, tmp_path / "run", QUIET)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {line["step"]: line["eval_loss"] for line in lines if "eval_loss" in line}
    assert sorted(evaluated) == [2, 4, 5]
    assert evaluated[5] < evaluated[2], "training on the same data lowers the held-out loss"


def test_evaluation_leaves_training_exactly_as_it_was(llama_dir, text_data):
    from qlora_kit.objectives.sft import evaluate

    recipe = Recipe(rank=4, micro_batch=4, dropout=0.1)
    tokenizer = models.load_tokenizer(llama_dir)
    examples = data.tokenize(data.read_records(text_data).records, tokenizer, recipe.seq_len)
    torch.manual_seed(0)
    model = models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, CPU), recipe)
    first = evaluate(model, examples, recipe.micro_batch, tokenizer.pad_token_id, CPU)
    assert evaluate(model, examples, recipe.micro_batch, tokenizer.pad_token_id, CPU) == first, (
        "no dropout in evaluation"
    )
    assert model.training and all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_a_packed_sequence_gives_each_example_the_hidden_states_it_has_alone(llama_dir):
    """Restarting position ids must mean no attention across packed examples (transformers' block-diagonal mask)."""
    from qlora_kit.objectives.sft import final_hidden_states as forward

    model = models.attach_lora(models.load_base_4bit(llama_dir, torch.float32, CPU), Recipe(rank=4, dropout=0.0))
    decoder = models.lm_parts(model)[0]
    a, b = data.Example([5, 9, 14, 20], [5, 9, 14, 20]), data.Example([7, 8, 30], [7, 8, 30])
    [packed] = data.pack([a, b], seq_len=16, seed=0)
    first, second = (a, b) if packed.input_ids[: len(a)] == a.input_ids else (b, a)
    with models.no_dropout(model), torch.no_grad():
        together = forward(decoder, [packed], 0, CPU)[0][0]
        alone = [forward(decoder, [e], 0, CPU)[0][0] for e in (first, second)]
    torch.testing.assert_close(together[: len(first)], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[len(first) :], alone[1], rtol=1e-4, atol=1e-4)


def test_packed_training_runs_and_reports_the_fill(llama_dir, text_data, tmp_path):
    console = Console(file=io.StringIO(), width=200)
    recipe = Recipe(model=str(llama_dir), data=str(text_data), rank=4, steps=3, micro_batch=2, seq_len=64, packing=True)
    summary = run_training(recipe, tmp_path / "run", console)
    assert summary.steps == 3 and "Packing: 16 examples in" in console.file.getvalue()
    unpacked = run_training(
        dataclasses.replace(recipe, packing=False, group_by_length=False), tmp_path / "plain", console
    )
    assert 0 <= summary.padding_pct < unpacked.padding_pct, "packing leaves less padding than padding to the batch"


def test_keeping_the_last_layers_whole_trains_exactly_like_recomputing_them(llama_dir, text_data):
    every = Recipe(rank=4, micro_batch=2, dropout=0.0, gradient_checkpointing=True)
    model_a, _, loss_a = trained(llama_dir, text_data, every, steps=3)
    model_b, _, loss_b = trained(llama_dir, text_data, dataclasses.replace(every, uncheckpointed_layers=1), steps=3)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_out_of_memory_first_recomputes_every_layer_and_a_resume_keeps_it_so(
    llama_dir, text_data, tmp_path, monkeypatch
):
    flaky_loss(monkeypatch, lambda step, batch: step == 2 and batch == 4)
    recipe = Recipe(
        model=str(llama_dir),
        data=str(text_data),
        rank=4,
        steps=4,
        micro_batch=4,
        dropout=0.0,
        gradient_checkpointing=True,
        uncheckpointed_layers=1,
        checkpoint_every=2,
    )
    summary = run_training(recipe, tmp_path / "run", QUIET)
    assert summary.step_downs == ["uncheckpointed layers 1 -> 0", "micro-batch 4 -> 2"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["shape"]["uncheckpointed_layers"] == 0 and state["shape"]["micro_batch"] == 2

    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    monkeypatch.undo()
    from qlora_kit.train import loop

    calls = []
    real = models.set_checkpointing
    spy = lambda model, **kw: (calls.append(kw), real(model, **kw))  # noqa: E731
    monkeypatch.setattr(models, "set_checkpointing", spy)  # as attach_lora calls it
    monkeypatch.setattr(loop, "set_checkpointing", spy)  # as resuming calls it
    run_training(recipe, tmp_path / "run", QUIET, RunOptions(resume=True))
    assert calls[0]["uncheckpointed_layers"] == 1, "the recipe's setting, when LoRA is attached"
    assert calls[-1] == {"offload": False, "uncheckpointed_layers": 0}, "then the checkpoint's, as the run last stepped"


def test_a_run_with_memory_to_spare_says_how_to_go_faster(llama_dir, text_data, tmp_path):
    console = Console(file=io.StringIO(), width=300)
    run_training(
        Recipe(model=str(llama_dir), data=str(text_data), rank=4, steps=1, gradient_checkpointing=True),
        tmp_path / "run",
        console,
    )
    assert "Room to go faster: --no-gradient-checkpointing" in console.file.getvalue(), (
        "a tiny model's activations fit any machine"
    )


def test_staging_folders_a_killed_run_left_are_removed_when_it_resumes(llama_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    recipe = Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=2, micro_batch=2, checkpoint_every=1)
    run_training(recipe, out, QUIET)
    leftovers = [out / ".adapter.partial-x1y2", out / "checkpoints" / ".step-3.partial-z9"]
    for folder in leftovers:
        (folder / "adapter").mkdir(parents=True)
    run_training(dataclasses.replace(recipe, steps=2), out, QUIET, RunOptions(resume=True))
    assert not any(folder.exists() for folder in leftovers)
    for folder in leftovers:
        folder.mkdir()
    run_training(recipe, out, QUIET, RunOptions(overwrite=True))
    assert not any(folder.exists() for folder in leftovers)


def test_a_cpu_run_its_plan_says_cannot_fit_stops_before_loading_the_model(llama_dir, tmp_path, monkeypatch):
    from qlora_kit.train import run as train

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(train, "load_base_4bit", refuse)
    long_text = tmp_path / "long.jsonl"
    long_text.write_text(json.dumps({"text": "one two three four five six seven eight nine ten " * 200}) + "\n")
    recipe = Recipe(model=str(llama_dir), data=str(long_text), seq_len=100_000, micro_batch=4096)
    with pytest.raises(
        UserError, match=r"This run needs about .* GiB of RAM \(micro-batch 4096 x \d+ tokens\)"
    ) as error:
        run_training(recipe, tmp_path / "run", QUIET)
    assert "To make it fit: --micro-batch" in error.value.hint
    assert not (tmp_path / "run").exists()


def test_the_plan_is_made_for_the_longest_example_not_an_unused_seq_len(llama_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    run_training(Recipe(model=str(llama_dir), data=str(chat_data), rank=4, steps=1, seq_len=100_000), out, QUIET)
    longest = max(
        len(e) for e in data.tokenize(data.read_records(chat_data).records, models.load_tokenizer(llama_dir), 512)
    )
    assert json.loads((out / "plan.json").read_text())["plan"]["seq_len"] == longest


def test_signal_handling_ends_quietly_when_its_watcher_has_ended_first():
    """After a second Ctrl-C the watcher thread can end, closing its pipe, before training leaves the block; waking
    it then hit EPIPE, and the run exited 1 instead of 130 (seen in CI)."""
    import os
    import threading
    import time
    from types import SimpleNamespace

    from qlora_kit.train.signals import StopOnSignal

    signals = StopOnSignal(SimpleNamespace(note=print, restore_terminal=lambda: None))
    signals.__enter__()
    signals.done.set()
    os.write(signals.wakeup, b"\0")
    deadline = time.monotonic() + 10
    while any(t.name == "qlora-kit-signals" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    signals.__exit__(None, None, None)


def metric_lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_from_an_adapter_continues_from_its_loss_and_records_its_lineage(llama_dir, text_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    settings = dict(model=str(llama_dir), data=str(text_data), micro_batch=4, eval_fraction=0.25)
    run_training(
        Recipe(**settings, rank=4, alpha=8, target_modules="q_proj,v_proj", lr=5e-2, steps=6), tmp_path / "a", QUIET
    )
    # lr 0: one step that changes nothing, then the evaluation every run ends with.
    run_training(
        Recipe(**settings, lr=0.0, steps=1, init_adapter=str(tmp_path / "a" / "adapter")), tmp_path / "b", QUIET
    )
    first = [m["eval_loss"] for m in metric_lines(tmp_path / "a") if "eval_loss" in m]
    then = [m["eval_loss"] for m in metric_lines(tmp_path / "b") if "eval_loss" in m]
    assert then[0] == pytest.approx(first[-1], rel=1e-6)  # measured: equal to the last digit
    recipe = load_recipe(tmp_path / "b" / "recipe.yaml")
    assert (recipe.rank, recipe.alpha, recipe.target_modules) == (4, 8.0, "q_proj,v_proj"), "taken from the adapter"
    a, b = (
        load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "b" / "adapter")
    run_training(
        Recipe(**settings, lr=1e-2, steps=1, init_adapter=str(tmp_path / "b" / "adapter")), tmp_path / "c", QUIET
    )
    card = (tmp_path / "c" / "adapter" / "README.md").read_text()
    assert f"{tmp_path / 'a' / 'adapter'} → {tmp_path / 'b' / 'adapter'} → this adapter" in card


def test_a_run_from_an_adapter_refuses_settings_its_adapter_contradicts(llama_dir, text_data, tmp_path):
    run_training(
        Recipe(model=str(llama_dir), data=str(text_data), rank=4, steps=1, micro_batch=4), tmp_path / "a", QUIET
    )
    with pytest.raises(
        UserError, match=r"has its own LoRA settings, and these differ: rank 8 \(the adapter's: 4\)"
    ) as error:
        run_training(
            Recipe(
                model=str(llama_dir), data=str(text_data), rank=8, steps=1, init_adapter=str(tmp_path / "a" / "adapter")
            ),
            tmp_path / "b",
            QUIET,
        )
    assert "takes them from it" in error.value.hint and not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="lora_init loftq says how a fresh adapter starts") as error:
        run_training(
            Recipe(
                model=str(llama_dir),
                data=str(text_data),
                lora_init="loftq",
                steps=1,
                init_adapter=str(tmp_path / "a" / "adapter"),
            ),
            tmp_path / "b",
            QUIET,
        )
    assert "Leave lora_init out" in error.value.hint and not (tmp_path / "b").exists()


def stopped_and_resumed_equals_whole(recipe, tmp_path) -> None:
    """Train recipe whole; train it again stopped after its step-2 checkpoint and resumed: every loss and every
    adapter tensor must be the same."""
    import shutil

    from safetensors.torch import load_file

    from qlora_kit.train import checkpoint

    run_training(recipe, tmp_path / "whole", QUIET)
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    for folder in checkpoint.complete_checkpoints(tmp_path / "stopped"):
        if checkpoint.step_of(folder) > 2:
            shutil.rmtree(folder)
    run_training(
        load_recipe(tmp_path / "stopped" / "recipe.yaml"), tmp_path / "stopped", QUIET, RunOptions(resume=True)
    )
    assert [m.get("loss") for m in metric_lines(tmp_path / "stopped")] == [
        m.get("loss") for m in metric_lines(tmp_path / "whole")
    ]
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("stopped", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_from_an_adapter_resumes_exactly(llama_dir, text_data, tmp_path):
    settings = dict(model=str(llama_dir), data=str(text_data), micro_batch=2, rank=4)
    run_training(Recipe(**settings, steps=2), tmp_path / "a", QUIET)
    stopped_and_resumed_equals_whole(
        Recipe(
            **settings,
            steps=6,
            checkpoint_every=2,
            keep_checkpoints=3,
            dropout=0.1,
            init_adapter=str(tmp_path / "a" / "adapter"),
        ),
        tmp_path,
    )


@pytest.mark.parametrize(
    "variant",
    [dict(use_rslora=True, rank=16), dict(use_dora=True), dict(lora_init="loftq")],
    ids=["rslora", "dora", "loftq"],
)
def test_each_lora_variant_trains_resumes_exactly_and_merges_as_it_runs(llama_dir, text_data, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_kit.export.merge import merge_adapter

    recipe = Recipe(
        **{
            **dict(
                model=str(llama_dir),
                data=str(text_data),
                micro_batch=2,
                rank=4,
                lr=2e-2,
                steps=6,
                checkpoint_every=2,
                keep_checkpoints=3,
                dropout=0.1,
            ),
            **variant,
        }
    )
    stopped_and_resumed_equals_whole(recipe, tmp_path)
    adapter = tmp_path / "whole" / "adapter"
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    loftq = variant.get("lora_init") == "loftq"
    # A LoftQ adapter corrects NF4's rounding, so the model it makes is the 4-bit one as trained (dequantized: bnb's
    # CPU matmul on 4-bit weights itself differs by ~0.4%); merged from the 16-bit base, the weights it adapts (all
    # linear layers here) are rounded first.
    base = (
        models.load_base_4bit(llama_dir, torch.float32, CPU).dequantize()
        if loftq
        else AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    )
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
        for from_quantized in [False, True] if loftq else [False]:
            merged = AutoModelForCausalLM.from_pretrained(
                merge_adapter(
                    None, adapter, tmp_path / f"m{from_quantized}", dtype="fp32", from_quantized=from_quantized
                )
            )
            got = merged(input_ids=ids).logits
            assert float((got - expected).norm() / expected.norm()) < 1e-4
        if loftq:  # the correction added to unrounded weights would make another model
            plain = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
            wrong = PeftModel.from_pretrained(plain, adapter)(input_ids=ids).logits
            assert float((wrong - expected).norm() / expected.norm()) > 1e-2
