"""Preference tuning: the DPO and ORPO losses against TRL's trainers, the pairs as the model sees them, and runs."""

import io
import json
import math
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from qlora_kit.data.dataset import IGNORE, Example, PreferencePair
from qlora_kit.objectives.preference import PreferenceLoss, log1mexp
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import RunOptions, run_training

PAIRS = [
    {"prompt": "the quick brown", "chosen": "fox jumps over", "rejected": "dog sleeps"},
    {"prompt": "what is two plus two", "chosen": "four, arr", "rejected": "five, I think so"},
]


LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def started_lora(model, seed: int = 1):
    """model (a PeftModel) with B not zero, so the policy differs from its reference, the base with the adapter off."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model


def pairs_from_trl_batch(batch) -> list[PreferencePair]:
    """TRL's collated batch (chosen rows, then rejected rows; completion_mask marks the answers) as our pairs."""
    rows = []
    for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        n = int(attention.sum())
        rows.append(
            Example(ids[:n].tolist(), [t if c else IGNORE for t, c in zip(ids[:n].tolist(), completion[:n].tolist())])
        )
    half = len(rows) // 2
    return [PreferencePair(c, r) for c, r in zip(rows[:half], rows[half:])]


def lora_grads(model) -> dict:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(llama_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        per_device_train_batch_size=2,
        report_to=[],
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=None,
    )
    # A fresh adapter, as qlora-kit's: TRL's reference is then the base with the adapter off, as ours.
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    model = started_lora(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = lora_grads(model)
    model.zero_grad()

    pairs = pairs_from_trl_batch(batch)
    loss_sum, n, _, stats = PreferenceLoss(model, "dpo", 0.1, loss_chunk_tokens=3)(
        pairs, tokenizer.pad_token_id, torch.device("cpu")
    )
    ours = loss_sum / n
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5) and ours.item() != pytest.approx(0.6931, abs=1e-3)
    ours_grads = lora_grads(model)
    assert their_grads.keys() == ours_grads.keys()
    for name in their_grads:
        torch.testing.assert_close(ours_grads[name], their_grads[name], rtol=1e-4, atol=1e-6)


def test_orpo_loss_and_gradients_equal_trl_orpo_trainer(llama_dir, tmp_path):
    """TRL takes ORPO's NLL over prompt and answer, averaged over all tokens of the batch; qlora-kit (as the paper)
    over each answer, averaged per pair. With a prompt of BOS alone and chosen answers of one length they are the same
    number, and so must the losses be."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rows = [
        {"prompt": "", "chosen": "cat sits down", "rejected": "dog sleeps"},
        {"prompt": "", "chosen": "dog runs over", "rejected": "fox jumps over"},
    ]
    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.25,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_length=64,
    )
    trainer = ORPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    model = started_lora(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs, _ = trainer.get_batch_loss_metrics(model, batch)
    theirs.backward()
    their_grads = lora_grads(model)
    model.zero_grad()

    pairs = [
        PreferencePair(
            *(
                Example(
                    batch[f"{side}_input_ids"][i][batch[f"{side}_attention_mask"][i].bool()].tolist(),
                    batch[f"{side}_labels"][i][batch[f"{side}_attention_mask"][i].bool()].tolist(),
                )
                for side in ("chosen", "rejected")
            )
        )
        for i in range(len(rows))
    ]
    assert len({len(p.chosen) for p in pairs}) == 1 and pairs[0].chosen.labels[0] == IGNORE
    loss_sum, n, _, _ = PreferenceLoss(model, "orpo", 0.25, loss_chunk_tokens=5)(
        pairs, tokenizer.pad_token_id, torch.device("cpu")
    )
    ours = loss_sum / n
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours_grads = lora_grads(model)
    assert their_grads.keys() == ours_grads.keys()
    for name in their_grads:
        torch.testing.assert_close(ours_grads[name], their_grads[name], rtol=1e-4, atol=1e-6)


def test_log1mexp_is_accurate_at_both_ends():
    """Near 0 the naive log(1 - exp(x)) is log(0) in float32, far below it 1 - exp(x) rounds to 1."""
    x = torch.tensor([-1e-8, -1e-3, -0.5, -1.0, -30.0])
    expected = [
        math.log(-math.expm1(v)) if v >= -1 else -math.exp(v) - math.exp(2 * v) / 2 for v in x.double().tolist()
    ]
    torch.testing.assert_close(log1mexp(x).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.log(1 - torch.exp(x[:1])).isinf() and torch.log(1 - torch.exp(x[-1:])) == 0


# The data: the conventional preference formats, detected per file, answers masked, bad lines named.

PROMPT = [{"role": "user", "content": "Add 2 and 2"}]


@pytest.mark.parametrize(
    "line, format, normalised",
    [
        (
            {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
            "preference",
            {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
        ),
        (
            {
                "prompt": PROMPT,
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
            "preference_chat",
            {
                "messages": PROMPT,
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ),
        (
            {"messages": PROMPT, "chosen": "4", "rejected": "5"},
            "preference_chat",
            {
                "messages": PROMPT,
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ),
        (
            {"prompt": "Add 2 and 2", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
            "preference_chat",
            {
                "messages": PROMPT,
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ),
    ],
)
def test_preference_formats_are_detected_and_normalised(tmp_path, line, format, normalised):
    from qlora_kit.data.dataset import read_records

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n")
    loaded = read_records(path)
    assert loaded.format == format and loaded.records == [normalised]


@pytest.mark.parametrize(
    "line, problem",
    [
        (
            {"prompt": "p", "chosen": "a"},
            "line 1: missing `rejected`: a preference example needs a chosen and a rejected answer",
        ),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 1: `chosen` and `rejected` are the same answer"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, "line 1: `chosen` is empty"),
        ({"chosen": "a", "rejected": "b"}, "line 1: missing `prompt`"),
        ({"messages": PROMPT, "chosen": "", "rejected": "b"}, "line 1: turn 1 of `chosen` has empty `content`"),
        (
            {"messages": PROMPT, "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "line 1: `chosen` has no assistant turn",
        ),
    ],
)
def test_each_bad_preference_line_is_named_with_its_problem(tmp_path, line, problem):
    from qlora_kit.data.dataset import read_records
    from qlora_kit.errors import UserError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(UserError) as error:
        read_records(path)
    assert problem in error.value.message


def test_only_the_answers_are_learned_in_both_forms(smollm):
    from qlora_kit.data.dataset import tokenize_preference
    from tests.test_data import trained_spans

    (chosen, chosen_labels), (rejected, rejected_labels) = tokenize_preference(
        {"prompt": "Q: 2+2?", "chosen": " A: 4", "rejected": " A: 5"}, smollm
    )
    assert trained_spans(smollm, chosen, chosen_labels) == [" A: 4<|im_end|>"]
    assert trained_spans(smollm, rejected, rejected_labels) == [" A: 5<|im_end|>"]
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}, *PROMPT]
    (chosen, chosen_labels), (rejected, rejected_labels) = tokenize_preference(
        {
            "messages": earlier,
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        smollm,
    )
    # The prompt's own assistant turn is context, not an answer to prefer.
    assert trained_spans(smollm, chosen, chosen_labels) == ["4<|im_end|>\n"]
    assert trained_spans(smollm, rejected, rejected_labels) == ["5<|im_end|>\n"]
    assert smollm.decode(chosen).count("Ahoy") == 1


def test_data_check_shows_both_answers_as_the_model_sees_them(tmp_path):
    from rich.console import Console as RichConsole

    from qlora_kit.data.dataset import check_report
    from tests.tiny_models import build_tokenizer

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    report, refusals = check_report(path, build_tokenizer(), seq_len=64)
    console = RichConsole(file=io.StringIO(), width=200)
    console.print(report)
    shown = console.file.getvalue()
    assert not refusals and "preference" in shown
    assert "Chosen:" in shown and "Rejected:" in shown and "dog" in shown


# Runs: DPO and ORPO train through the same loop as SFT, with the same checkpoints and exact resume.


def preference_file(folder, n: int = 12, chat: bool = False):
    rows = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f" {2 * i}, arr", "rejected": f" {2 * i + 1}, I think"}
        for i in range(n)
    ]
    if chat:
        rows = [
            {
                "messages": [{"role": "user", "content": r["prompt"]}],
                "chosen": r["chosen"].strip(),
                "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
            }
            for r in rows
        ]
    path = folder / ("chat-pairs.jsonl" if chat else "pairs.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metric_lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, chat", [("dpo", False), ("orpo", True)])
def test_a_preference_run_learns_to_prefer_and_reports_rewards(llama_dir, tmp_path, method, chat):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = Recipe(
        model=str(llama_dir),
        data=str(preference_file(tmp_path, chat=chat)),
        method=method,
        rank=4,
        lr=1e-2,
        steps=4,
        micro_batch=2,
        grad_accum=2,
        eval_fraction=0.25,
    )
    summary = run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    lines = metric_lines(tmp_path / "run")
    assert all({"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= m.keys() for m in lines)
    assert summary.rewards["eval_reward_accuracy"] == lines[-1]["eval_reward_accuracy"]
    last = lines[-1]
    assert last["loss"] < lines[0]["loss"] and last["eval_reward_accuracy"] == 1.0 and last["eval_reward_margin"] > 0
    if method == "dpo":  # at the start the adapter is off, so the policy is its reference
        assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and lines[0]["reward_margin"] == 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "run" / "adapter")
    from qlora_kit.train.dashboard import describe_step
    from qlora_kit.train.report import load_run, summary_table, write_png
    from tests.test_report import png_size

    assert "accuracy 1.00 margin" in describe_step(last)
    from qlora_kit.train.dashboard import summary_table as end_of_run_table

    console = Console(file=io.StringIO(), width=200)
    console.print(end_of_run_table(summary, summary.info))
    assert "rewards" in console.file.getvalue() and "accuracy 100%" in console.file.getvalue()
    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(load_run(tmp_path / "run")))
    assert "rewards" in console.file.getvalue() and "eval: margin +" in console.file.getvalue()
    assert png_size(write_png([load_run(tmp_path / "run")], tmp_path / "run.png")) == (1000, 700)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_resumes_exactly(llama_dir, tmp_path, method):
    from tests.test_train import stopped_and_resumed_equals_whole

    stopped_and_resumed_equals_whole(
        Recipe(
            model=str(llama_dir),
            data=str(preference_file(tmp_path)),
            method=method,
            rank=4,
            lr=1e-2,
            steps=6,
            micro_batch=2,
            checkpoint_every=2,
            keep_checkpoints=3,
            dropout=0.1,
        ),
        tmp_path,
    )


def test_method_and_data_must_match(llama_dir, text_data, tmp_path):
    from qlora_kit.errors import UserError

    pairs = preference_file(tmp_path)
    cases = [
        (dict(data=str(pairs)), "holds preference pairs", "--method dpo"),
        (dict(data=str(text_data), method="dpo"), "--method dpo learns from preference pairs", '"chosen"'),
        (dict(data=str(pairs), method="orpo", packing=True), "--packing does not apply", "Leave it out"),
        (dict(data=str(pairs), method="orpo", reference="precomputed"), "--method orpo has none", "--method dpo"),
    ]
    for settings, said, hint in cases:
        with pytest.raises(UserError, match=said) as error:
            run_training(
                Recipe(model=str(llama_dir), steps=1, **settings), tmp_path / "refused", Console(file=io.StringIO())
            )
        assert hint in error.value.hint and not (tmp_path / "refused").exists()


def test_dpo_from_an_sft_adapter_compares_with_that_adapter_and_resumes_exactly(llama_dir, tmp_path):
    """DPO after SFT: the reference is the SFT adapter the run starts from (so the first loss is log 2 exactly, the
    policy being its reference), not the bare base; only the adapter that trains is saved."""
    from tests.test_train import stopped_and_resumed_equals_whole

    pairs = preference_file(tmp_path)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n"
            for p in map(json.loads, pairs.read_text().splitlines())
        )
    )
    run_training(
        Recipe(model=str(llama_dir), data=str(sft), rank=4, lr=5e-2, steps=4, micro_batch=4),
        tmp_path / "sft",
        Console(file=io.StringIO()),
    )
    recipe = Recipe(
        model=str(llama_dir),
        data=str(pairs),
        method="dpo",
        lr=1e-2,
        steps=6,
        micro_batch=2,
        checkpoint_every=2,
        keep_checkpoints=3,
        init_adapter=str(tmp_path / "sft" / "adapter"),
    )
    stopped_and_resumed_equals_whole(recipe, tmp_path)
    lines = metric_lines(tmp_path / "whole")
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and lines[-1]["loss"] < lines[0]["loss"]
    assert sorted(p.name for p in (tmp_path / "whole" / "adapter").iterdir() if p.is_dir()) == []
    run_training(replace(recipe, reference="precomputed"), tmp_path / "kept", Console(file=io.StringIO()))
    kept = [m["loss"] for m in metric_lines(tmp_path / "kept") if "loss" in m]
    assert kept == pytest.approx([m["loss"] for m in lines if "loss" in m], rel=1e-4), "precomputed from that adapter"


def test_plan_and_auto_count_both_sequences_of_a_pair(llama_dir, tmp_path):
    from qlora_kit.cli.auto import run_auto
    from qlora_kit.plan.memory import estimate_peak_memory
    from qlora_kit.probe.catalog import find_model_shape

    shape = find_model_shape("llama-3.1-8b")
    sft, dpo, orpo = (
        estimate_peak_memory(shape, Recipe(seq_len=1024, micro_batch=2, method=m)) for m in ("sft", "dpo", "orpo")
    )
    doubled = estimate_peak_memory(shape, Recipe(seq_len=1024, micro_batch=4))
    assert (
        dpo.components["saved_activations"]
        == orpo.components["saved_activations"]
        == doubled.components["saved_activations"]
    )
    assert sft.total_bytes < orpo.total_bytes <= dpo.total_bytes and "not a second model" in " ".join(dpo.notes)
    after_sft = estimate_peak_memory(
        shape, Recipe(seq_len=1024, micro_batch=2, method="dpo", init_adapter="runs/sft/adapter")
    )
    assert (
        after_sft.total_bytes - dpo.total_bytes == after_sft.components["reference_adapter"] == 4 * dpo.trainable_params
    )
    console = Console(file=io.StringIO(), width=200)
    choice = run_auto(str(llama_dir), preference_file(tmp_path), None, console, dry_run=True)
    said = console.file.getvalue()
    assert choice.recipe.method == "dpo" and "holds preference pairs: training with DPO" in said
    assert "method: sft -> dpo  (the data holds preference pairs)" in said and "DPO reference: " in said
    choice = run_auto(
        str(llama_dir), preference_file(tmp_path), None, Console(file=io.StringIO()), dry_run=True, method="orpo"
    )
    assert choice.recipe.method == "orpo"


def test_eval_on_preference_pairs_says_where_the_reward_accuracy_is(tmp_path):
    from qlora_kit.errors import UserError
    from qlora_kit.inference.evaluation import run_eval

    with pytest.raises(UserError, match="holds preference pairs") as error:
        run_eval("smollm2-135m", None, preference_file(tmp_path))
    assert "eval_reward_accuracy" in error.value.hint


def test_out_of_memory_in_a_preference_step_steps_down_and_loses_no_step(llama_dir, tmp_path, monkeypatch):
    from qlora_kit.objectives import preference

    real, calls = preference.PreferenceLoss.forward, []

    def forward(self, pairs, pad_id, device):
        calls.append(len(pairs))
        if len(calls) == 3:  # step 3's micro-batch of 4 pairs
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, pairs, pad_id, device)

    monkeypatch.setattr(preference.PreferenceLoss, "forward", forward)
    recipe = Recipe(
        model=str(llama_dir), data=str(preference_file(tmp_path)), method="dpo", rank=4, steps=4, micro_batch=4
    )
    summary = run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    assert summary.step_downs == ["micro-batch 4 -> 2"] and calls[:5] == [4, 4, 4, 2, 2]
    steps = [m for m in metric_lines(tmp_path / "run") if "loss" in m]
    assert [(m["step"], m["micro_batch"]) for m in steps] == [(1, 4), (2, 4), (3, 2), (4, 2)], "no step lost"


def test_a_precomputed_reference_trains_as_the_one_on_the_fly_and_resumes_from_the_kept_values(
    llama_dir, tmp_path, monkeypatch
):
    """Precomputed once (and kept in the run folder), the reference gives the same run as computing it in each step;
    a resumed run reads the kept values back instead of computing them again."""
    from qlora_kit.objectives.preference import reference_log_probs
    from qlora_kit.train import run as train
    from tests.test_train import stopped_and_resumed_equals_whole

    settings = dict(
        model=str(llama_dir),
        data=str(preference_file(tmp_path)),
        method="dpo",
        rank=4,
        lr=1e-2,
        steps=6,
        micro_batch=2,
        checkpoint_every=2,
        keep_checkpoints=3,
        dropout=0.1,
        eval_fraction=0.25,
        eval_every=3,
    )
    run_training(Recipe(**settings, reference="on_the_fly"), tmp_path / "on-the-fly", Console(file=io.StringIO()))
    computed = []
    monkeypatch.setattr(
        train, "reference_log_probs", lambda *a, **k: computed.append(1) or reference_log_probs(*a, **k)
    )
    stopped_and_resumed_equals_whole(Recipe(**settings, reference="precomputed"), tmp_path)
    assert len(computed) == 2, "train and eval pairs once, in the whole run; the resumed run read them back"
    fly, kept = metric_lines(tmp_path / "on-the-fly"), metric_lines(tmp_path / "whole")
    for name in ("loss", "reward_margin", "eval_reward_margin", "eval_loss"):
        values = [[m[name] for m in lines if name in m] for lines in (kept, fly)]
        assert len(values[0]) >= 2 and values[0] == pytest.approx(values[1], rel=1e-4, abs=1e-6), name
    assert json.loads((tmp_path / "whole" / "plan.json").read_text())["reference"]["mode"] == "precomputed"
    # Resumed on changed pairs (--allow-changed-data), the kept values are not theirs: they are computed again.
    import shutil

    from qlora_kit.plan.recipes import load_recipe
    from qlora_kit.train import checkpoint

    shutil.copytree(tmp_path / "whole", tmp_path / "changed")
    shutil.rmtree(checkpoint.complete_checkpoints(tmp_path / "changed")[0])
    data = tmp_path / "pairs.jsonl"
    data.write_text(data.read_text().replace("I think", "I guess"))
    run_training(
        load_recipe(tmp_path / "changed" / "recipe.yaml"),
        tmp_path / "changed",
        Console(file=io.StringIO()),
        RunOptions(resume=True, allow_changed_data=True),
    )
    assert len(computed) == 4


def test_the_plan_precomputes_the_reference_when_that_takes_fewer_passes_or_only_that_fits():
    from qlora_kit.plan.memory import estimate_peak_memory
    from qlora_kit.plan.planner import Target, choose_reference, make_plan, reference_forwards
    from qlora_kit.probe.catalog import find_model_shape

    recipe = Recipe(method="dpo", micro_batch=2, grad_accum=4, eval_every=10)
    assert reference_forwards(recipe, total_steps=25, pairs=100, eval_pairs=20) == (25 * 8 + 3 * 20, 120)
    assert reference_forwards(recipe, total_steps=25, pairs=100, eval_pairs=0, world=2) == (25 * 16, 100)
    fits = lambda mode: True  # noqa: E731
    assert choose_reference("auto", (260, 120), fits)[0] == "precomputed"  # more than one pass over the pairs
    assert choose_reference("auto", (100, 120), fits)[0] == "on_the_fly"  # less than an epoch: no pass to save
    assert choose_reference("on_the_fly", (260, 120), fits) == ("on_the_fly", "as the recipe asks")
    assert choose_reference("auto", None, lambda mode: mode == "precomputed")[0] == "precomputed"
    assert choose_reference("auto", None, fits)[0] == "on_the_fly"

    shape = find_model_shape("llama-3.1-8b")
    unchecked = Recipe(method="dpo", seq_len=1024, micro_batch=1, gradient_checkpointing=False)
    fly, kept = (estimate_peak_memory(shape, replace(unchecked, reference=m)) for m in ("on_the_fly", "precomputed"))
    assert (
        kept.details["reference_forward"] == 0 < fly.details["reference_forward"] and kept.total_bytes < fly.total_bytes
    )
    card = Target("between", "cuda", (fly.total_bytes + kept.total_bytes) // 2)
    assert make_plan(shape, unchecked, card).reference["mode"] == "precomputed"  # only precomputed fits this card
    report = make_plan(shape, replace(unchecked, gradient_checkpointing=True), card, reference_forwards=(300, 200))
    assert (
        report.reference["mode"] == "precomputed"
        and "200 pair forward passes before the first step" in report.reference["why"]
    )
    console = Console(file=io.StringIO(), width=200)
    console.print(report.render())
    assert "DPO reference: precomputed (200 pair forward passes" in console.file.getvalue()
    assert make_plan(shape, Recipe(method="orpo"), card).reference is None


def test_a_pair_cut_shorter_by_a_step_down_loses_its_precomputed_reference(llama_dir):
    from qlora_kit.data.dataset import truncate
    from qlora_kit.model.load import attach_lora, load_base_4bit

    short, long = (
        PreferencePair(
            Example([1, 2, 3], [IGNORE, 2, 3]), Example([1, 2, 4, 5][:n], [IGNORE, 2, 4, 5][:n]), (-1.5, -2.5)
        )
        for n in (3, 4)
    )
    assert [p.reference for p in truncate([short, long], 3)] == [(-1.5, -2.5), None]
    model = attach_lora(load_base_4bit(llama_dir, torch.float32, torch.device("cpu")), Recipe(rank=4))
    loss = PreferenceLoss(model, "dpo", 0.1)
    computed = loss([replace(short, reference=None), replace(long, reference=None)], 0, torch.device("cpu"))
    mixed = loss([short, replace(long, reference=None)], 0, torch.device("cpu"))  # one pair without: all on the fly
    assert torch.equal(mixed[0], computed[0]) and computed[3]["reward_chosen"] == 0  # a fresh adapter is its reference
    kept = loss([short, long], 0, torch.device("cpu"))  # every pair has its values: they are used
    policy_chosen = loss.answer_log_probs([short, long], 0, torch.device("cpu"))[0][:2]
    assert kept[3]["reward_chosen"].item() == pytest.approx(0.1 * (policy_chosen + 1.5).sum().item(), rel=1e-6)
