import io
import json

import pytest

from qlora_kit.data.dataset import (
    FALLBACK_TEMPLATE,
    IGNORE,
    cache_key,
    collate,
    epoch_order,
    example_stream,
    pack,
    read_records,
    split_off,
    tokenize,
    tokenize_record,
    truncate,
)
from qlora_kit.errors import UserError
from tests.conftest import build_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write(tmp_path, content, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "arr"}]}\n'


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"text": "ok"}\n{"text": "fine"}\nnot json\n', "line 3: not valid JSON"),
        (
            '{"text": "ok", }\n',
            "line 1: not valid JSON, Expecting property name enclosed in double quotes at column 16 (a trailing comma?)",
        ),
        (
            "{oops\n",
            "line 1: not valid JSON, Expecting property name enclosed in double quotes at column 2: {<<here>>oops.",
        ),
        ("[1, 2]\n", "line 1: a JSON list, not an object"),
        ('{"prompt_text": "x"}\n', "line 1: no known fields (has: prompt_text)"),
        ('{"prompt": "x"}\n', "line 1: missing `completion`"),
        ('{"text": 42}\n', "line 1: `text` must be a string, not int"),
        ('{"text": "  "}\n', "line 1: `text` is empty"),
        ('{"instruction": "do", "output": ""}\n', "line 1: `output` is empty"),
        ('{"messages": []}\n', "`messages` must be a non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1: turn 1 has unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: the conversation has no assistant turn"),
        (
            '{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n',
            "turn 2 has unknown role 'robot'",
        ),
        (
            CHAT + '{"text": "plain"}\n',
            "line 2: looks like text, but the file is chat (from line 1); formats are mixed",
        ),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 14)"),
    ],
)
def test_each_bad_line_names_the_file_the_line_and_the_problem(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(UserError) as error:
        read_records(path)
    assert str(path) in error.value.message and problem in error.value.message
    assert "--skip-bad-lines" in error.value.hint


def test_a_json_error_far_into_a_line_names_its_column_and_shows_where(tmp_path):
    line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant" "content": "arr"}]}'
    column = line.index('"content": "arr"') + 1  # the comma is missing just before it
    loaded = read_records(write(tmp_path, CHAT + line + "\n"), skip_bad_lines=True)
    assert loaded.skipped == [
        f"line 2: not valid JSON, Expecting ',' delimiter at column {column}: "
        '…"role": "assistant" <<here>>"content": "arr"}]}'
    ]
    assert column == 71


def test_absurdly_nested_lines_are_bad_lines_not_crashes(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    loaded = read_records(write(tmp_path, '{"text": "ok"}\n{"text": ' + deep + "}\n"), skip_bad_lines=True)
    assert loaded.skipped == ["line 2: nested too deeply (lists or objects inside each other) to be an example"]
    with pytest.raises(UserError, match="nested too deeply"):
        read_records(write(tmp_path, "[" + deep + "]", name="deep.json"))


def test_the_readme_example_data_is_a_valid_data_file(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [block.split("```")[0] for block in readme.split("```jsonl\n")[1:]]
    assert blocks, "README shows example data"
    for block in blocks:
        loaded = read_records(write(tmp_path, block))
        assert loaded.records and not loaded.skipped


def test_empty_files_missing_files_and_folders(tmp_path):
    for content in ("", "\n\n"):
        with pytest.raises(UserError, match="has no examples"):
            read_records(write(tmp_path, content))
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        read_records(tmp_path)


def test_blank_lines_and_a_byte_order_mark_are_fine(tmp_path):
    loaded = read_records(write(tmp_path, b'\xef\xbb\xbf{"text": "a"}\n\n\n{"text": "b"}\n'))
    assert [r["text"] for r in loaded.records] == ["a", "b"] and loaded.format == "text"


def test_many_problems_show_the_first_five_and_the_total(tmp_path):
    path = write(tmp_path, "oops\n" * 8 + '{"text": "ok"}\n')
    with pytest.raises(UserError, match=r"has 8 bad examples: line 1: .*line 5: .*; and 3 more"):
        read_records(path)
    loaded = read_records(path, skip_bad_lines=True)
    assert len(loaded.records) == 1 and len(loaded.skipped) == 8 and loaded.skipped[0].startswith("line 1:")


def test_skipping_every_line_is_still_an_error(tmp_path):
    with pytest.raises(UserError, match="no examples left after skipping"):
        read_records(write(tmp_path, "oops\n"), skip_bad_lines=True)


@pytest.mark.parametrize(
    "line, format, normalised",
    [
        ({"text": "t"}, "text", {"text": "t"}),
        ({"prompt": "p", "completion": "c"}, "completion", {"prompt": "p", "completion": "c"}),
        (
            {"instruction": "Add", "input": "2 and 2", "output": "4"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]},
        ),
        (
            {"instruction": "Say hi", "output": "hi"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            "sharegpt",
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ),
    ],
)
def test_formats_are_detected_and_normalised(tmp_path, line, format, normalised):
    loaded = read_records(write(tmp_path, json.dumps(line) + "\n"))
    assert loaded.format == format and loaded.records == [normalised]


def test_json_arrays_and_forced_formats(tmp_path):
    loaded = read_records(write(tmp_path, json.dumps([{"text": "a"}, {"text": "b"}]), "data.json"))
    assert len(loaded.records) == 2
    with pytest.raises(UserError, match="item 2: looks like completion, but the file is text"):
        read_records(write(tmp_path, json.dumps([{"text": "a"}, {"prompt": "p", "completion": "c"}]), "mixed.json"))
    with pytest.raises(UserError, match="not an array"):
        read_records(write(tmp_path, '{"text": "a"}', "object.json"))
    with pytest.raises(UserError, match="line 1: looks like text, but the file is chat"):
        read_records(write(tmp_path, '{"text": "a"}\n'), format="chat")


def trained_spans(tokenizer, ids, labels) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_masks_on_smollm2_for_every_format(smollm):
    cases = [
        ({"text": "Plain text."}, ["Plain text.<|im_end|>"]),
        ({"prompt": "Q: 2+2?", "completion": " A: 4"}, [" A: 4<|im_end|>"]),
        (
            {"messages": [{"role": "user", "content": "Add 2 and 2"}, {"role": "assistant", "content": "4"}]},
            ["4<|im_end|>\n"],
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Farewell."},
                ]
            },
            ["Hello!<|im_end|>\n", "Farewell.<|im_end|>\n"],
        ),
    ]
    for record, expected in cases:
        ids, labels = tokenize_record(record, smollm)
        assert trained_spans(smollm, ids, labels) == expected, record
        assert len(ids) == len(labels)
    multi = cases[-1][0]
    ids, labels = tokenize_record(multi, smollm)
    text = smollm.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.count("<|im_start|>assistant") == 2


# Renders the last assistant turn as Qwen3's template does when no reasoning is given (an empty think block) and
# earlier ones without it: a turn's tokens change once later turns follow.
REWRITING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<|assistant|><think></think>"
    "{{ m['content'] }}</s>{% else %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_rewrites_earlier_turns_learns_the_last_turn_as_inference_meets_it(tokenizer):
    from qlora_kit.data.dataset import history_note

    qwen3_like = build_tokenizer()
    qwen3_like.chat_template = REWRITING_TEMPLATE
    chat = [
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four five"},
        {"role": "assistant", "content": "six"},
    ]
    ids, labels = tokenize_record({"messages": chat}, qwen3_like)
    assert trained_spans(qwen3_like, ids, labels) == ["<think></think>six</s>"]  # not the user turns, not "three"
    assert "only the last assistant turn" in history_note([{"messages": chat}], qwen3_like)
    assert history_note([{"messages": chat}], tokenizer) is None  # a template that appends: every turn learned
    one_turn = tokenize_record({"messages": chat[:2]}, qwen3_like)
    assert trained_spans(qwen3_like, *one_turn) == ["<think></think>three</s>"]


def test_train_on_inputs_learns_every_token(smollm):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]}
    [example] = tokenize([record], smollm, seq_len=512, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_a_tokenizer_without_a_chat_template_uses_the_fallback(tokenizer):
    plain = build_tokenizer()
    plain.chat_template = None
    record = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}
    ids, labels = tokenize_record(record, plain)
    assert plain.decode(ids) == "### User:\none two\n\n### Assistant:\nthree\n\n</s>"
    assert trained_spans(plain, ids, labels) == ["three\n\n</s>"]
    assert "### Assistant" in FALLBACK_TEMPLATE


def test_text_learns_every_token_and_truncation_drops_what_has_nothing_to_learn(tokenizer):
    [example] = tokenize([{"text": "the quick brown fox"}], tokenizer, seq_len=64)
    assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id
    [cut] = tokenize([{"text": "one two three four five six seven eight nine ten " * 5}], tokenizer, seq_len=10)
    assert len(cut.input_ids) == 10
    prompt_only = {
        "messages": [{"role": "user", "content": "the quick brown fox jumps"}, {"role": "assistant", "content": "ok"}]
    }
    with pytest.raises(UserError, match="No example has any token left"):
        tokenize([prompt_only], tokenizer, seq_len=4)


def test_collate_pads_right_to_the_longest_example(tokenizer):
    examples = tokenize([{"text": "one"}, {"text": "one two three four"}], tokenizer, seq_len=64)
    input_ids, mask, labels, positions = collate(examples, pad_id=0)
    short = len(examples[0].input_ids)
    assert input_ids.shape[1] == max(len(e.input_ids) for e in examples)
    assert mask[0, :short].all() and not mask[0, short:].any()
    assert (labels[0, short:] == IGNORE).all() and (input_ids[0, short:] == 0).all() and positions is None


def test_stream_covers_every_example_per_epoch_in_a_seeded_order(tokenizer):
    examples = tokenize([{"text": f"{w} fox"} for w in "one two three four five".split()], tokenizer, seq_len=32)

    def first_epochs(seed):
        stream = example_stream(examples, seed)
        return [next(stream) for _ in range(10)]

    a = first_epochs(0)
    assert [(epoch, e.input_ids) for epoch, e in a] == [(epoch, e.input_ids) for epoch, e in first_epochs(0)]
    assert [epoch for epoch, _ in a] == [0] * 5 + [1] * 5
    assert sorted(e.input_ids for _, e in a[:5]) == sorted(e.input_ids for e in examples)


def test_truncate_cuts_ids_and_labels_together(tokenizer):
    [example] = truncate(tokenize([{"text": "one two three four five six"}], tokenizer, seq_len=64), 3)
    assert len(example.input_ids) == len(example.labels) == 3


def test_evaluation_split_is_seeded_and_keeps_both_sides(tokenizer):
    examples = tokenize(
        [{"text": f"{w} fox"} for w in "one two three four five six seven eight".split()], tokenizer, 32
    )
    train, held = split_off(examples, 0.25, seed=0)
    assert (len(train), len(held)) == (6, 2) and split_off(examples, 0.25, seed=0)[1].rows == held.rows
    assert len(split_off(examples[:2], 0.5, seed=0)[0]) == 1
    with pytest.raises(UserError, match="at least 2 examples"):
        split_off(examples[:1], 0.5, seed=0)


def test_packing_fills_sequences_restarts_positions_and_masks_boundaries(tokenizer):
    examples = tokenize(
        [{"text": w} for w in ["one two", "three four five", "six", "seven eight nine ten"]], tokenizer, 12
    )
    packed = pack(examples, seq_len=24, seed=0)  # each example is at most 12 tokens: any two fit together
    assert sum(len(p) for p in packed) == sum(len(e) for e in examples) and all(len(p) <= 24 for p in packed)
    assert len(packed) < len(examples)
    for p in packed:
        starts = [i for i, position in enumerate(p.position_ids) if position == 0]
        assert starts[0] == 0 and all(p.labels[i] == IGNORE for i in starts), (
            "no example is predicted from the one before"
        )
    input_ids, mask, labels, positions = collate(packed, pad_id=0)
    assert positions is not None and positions.shape == input_ids.shape


def test_drop_long_drops_instead_of_cutting(tokenizer):
    records = [{"text": "one"}, {"text": "one two three four five six seven eight nine ten"}]
    assert len(tokenize(records, tokenizer, seq_len=6)) == 2 and tokenize(records, tokenizer, seq_len=6).truncated == 1
    kept = tokenize(records, tokenizer, seq_len=6, drop_long=True)
    assert len(kept) == 1 and kept.truncated == 0


def test_parquet_and_csv_through_datasets(tmp_path):
    from datasets import Dataset

    rows = [
        {"instruction": "Add 2 and 2", "input": "", "output": "4"},
        {"instruction": "Say hi", "input": None, "output": "hi"},
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("prompt,completion\nQ: 1+1?, A: 2\nQ: 2+2?,\n")
    loaded = read_records(tmp_path / "d.parquet")
    assert loaded.format == "alpaca" and loaded.records[1]["messages"][0]["content"] == "Say hi"
    with pytest.raises(UserError, match="row 2: missing `completion`"):
        read_records(tmp_path / "d.csv")
    assert len(read_records(tmp_path / "d.csv", skip_bad_lines=True).records) == 1


def test_length_grouping_pads_less_and_still_draws_every_example_once_per_epoch():
    lengths = [(i * 37) % 200 + 1 for i in range(100)]  # lengths spread from 1 to 200
    per_step = 8

    def padding(order):
        steps = [order[k : k + per_step] for k in range(0, len(order), per_step)]
        return sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in steps)

    grouped = [epoch_order(lengths, seed=0, epoch=epoch, per_step=per_step, group_by_length=True) for epoch in range(3)]
    assert all(sorted(order) == list(range(100)) for order in grouped)
    shuffled = [epoch_order(lengths, seed=0, epoch=epoch) for epoch in range(3)]
    assert padding(sum(grouped, [])) < padding(sum(shuffled, [])) / 4  # steps cut along the whole stream
    assert epoch_order(lengths, 0, 1, per_step, True) != epoch_order(lengths, 0, 0, per_step, True)


def test_grouped_steps_stay_aligned_when_an_epoch_is_not_a_whole_number_of_steps():
    lengths = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]  # 10 distinct lengths, steps of 4: epochs end mid-step
    stream = [i for epoch in range(4) for i in epoch_order(lengths, 0, epoch, per_step=4, group_by_length=True)]
    steps = [[lengths[i] for i in stream[k : k + 4]] for k in range(0, 40, 4)]
    within_epoch = [s for k, s in enumerate(steps) if (4 * k) // 10 == (4 * k + 3) // 10]
    assert len(within_epoch) == 8 and all(max(s) - min(s) == 3 for s in within_epoch), "neighbours in length"


def test_a_stream_started_at_a_position_continues_the_uninterrupted_stream(tokenizer):
    examples = tokenize([{"text": " ".join(["fox"] * n)} for n in range(1, 12)], tokenizer, seq_len=32)
    whole = example_stream(examples, 3, per_step=4, group_by_length=True)
    drawn = [(epoch, e.input_ids) for epoch, e in (next(whole) for _ in range(30))]
    resumed = example_stream(examples, 3, per_step=4, group_by_length=True, start=13)
    assert [(epoch, e.input_ids) for epoch, e in (next(resumed) for _ in range(17))] == drawn[13:]


def test_tokenized_tables_are_cached_and_memory_mapped(tmp_path, tokenizer, tokenized_cache):
    loaded = read_records(
        write(tmp_path, "".join(json.dumps({"text": f"{w} fox"}) + "\n" for w in ["one", "two", "three"]))
    )
    key = cache_key(loaded, tokenizer)
    first = tokenize(loaded.records, tokenizer, 32, cache_key=key)
    assert (tokenized_cache / key).is_dir() and first.table.cache_files, "read back from disk, not held in memory"
    again = tokenize([], tokenizer, 32, cache_key=key)  # the records are not even needed: the table is reused
    assert [e.input_ids for e in again] == [e.input_ids for e in first]
    (tmp_path / "data.jsonl").write_text('{"text": "changed"}\n')
    assert cache_key(read_records(tmp_path / "data.jsonl"), tokenizer) != key


def test_large_files_tokenize_in_several_processes_with_the_same_result(tokenizer, monkeypatch):
    records = [
        {"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a " * (i % 7 + 1)}]}
        for i in range(40)
    ]
    alone = tokenize(records, tokenizer, 64)
    monkeypatch.setattr("qlora_kit.data.dataset.PARALLEL_FROM", 10)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    together = tokenize(records, tokenizer, 64)
    assert [(e.input_ids, e.labels) for e in together] == [(e.input_ids, e.labels) for e in alone]


def test_an_unwritable_cache_only_costs_the_reuse(tokenizer, tokenized_cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("datasets.Dataset.save_to_disk", refuse)
    examples = tokenize([{"text": "one two"}], tokenizer, 32, cache_key="k")
    assert len(examples) == 1 and not (tokenized_cache / "k").exists()


def test_truncation_and_train_on_inputs_apply_to_the_cached_table(tokenizer):
    records = [
        {"prompt": "one", "completion": " two three four five six"},
        {"prompt": "one two three four five six", "completion": " x"},
    ]
    prompt = len(tokenizer("one")["input_ids"])
    [short] = tokenize(records, tokenizer, seq_len=prompt + 2)  # the second's completion lies beyond: nothing to learn
    assert len(short.input_ids) == prompt + 2 and short.labels[:prompt] == [IGNORE] * prompt
    both = tokenize(records, tokenizer, seq_len=prompt + 2, train_on_inputs=True)
    assert len(both) == 2 and all(e.labels == e.input_ids for e in both) and both.lengths == [prompt + 2] * 2


def test_data_check_counts_as_nothing_to_learn_what_training_drops(tmp_path):
    from rich.console import Console

    from qlora_kit.data.dataset import check_report

    records = [
        {"prompt": "one", "completion": " two"},
        {"prompt": "one two three four five six seven", "completion": " eight"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    tokenizer = build_tokenizer()
    console = Console(record=True, width=200, file=io.StringIO())
    report, refusals = check_report(path, tokenizer, seq_len=6)
    console.print(report)
    assert refusals == []
    dropped = len(records) - len(tokenize(records, tokenizer, seq_len=6))
    assert dropped == 1 and f"nothing to learn   │ {dropped} (dropped in training)" in console.export_text()


def test_data_check_refuses_what_training_refuses(tmp_path):
    from qlora_kit.data.dataset import check_report

    bad = write(tmp_path, '{"text": "ok"}\n' + "oops\n" * 12)
    report, refusals = check_report(bad)
    assert [why for why, _ in refusals] == ["12 bad lines"] and "--skip-bad-lines" in refusals[0][1]
    with pytest.raises(UserError):
        read_records(bad)  # what train does with the same file
    records = [{"prompt": "one two three four five six seven", "completion": " eight"}]
    nothing = write_jsonl(tmp_path / "long.jsonl", records)
    _, refusals = check_report(nothing, build_tokenizer(), seq_len=6)
    assert refusals and "no example has a token to learn" in refusals[0][0] and "--seq-len" in refusals[0][1]
    with pytest.raises(UserError, match="No example has any token left"):
        tokenize(records, build_tokenizer(), 6)


SLOW_TOKENIZING_CHILD = """
import sys, time
import qlora_kit.data.dataset as data
original, marker = data._tokenize_batch, sys.argv[1]
def slow(*args, **kwargs):
    open(marker, "w").close()  # a worker has started: the test presses Ctrl-C now
    time.sleep(60)
    return original(*args, **kwargs)
data._tokenize_batch = slow
sys.argv = ["qlora-kit", *sys.argv[2:]]
from qlora_kit.cli.app import main
main()
"""


def test_ctrl_c_during_parallel_tokenizing_stops_with_130_and_no_traceback(llama_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from qlora_kit.data.dataset import PARALLEL_FROM

    data_file = tmp_path / "many.jsonl"
    data_file.write_text("".join(json.dumps({"text": f"line {n}"}) + "\n" for n in range(PARALLEL_FROM)))
    marker = tmp_path / "tokenizing"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_TOKENIZING_CHILD,
            str(marker),
            "train",
            "-m",
            str(llama_dir),
            "-d",
            str(data_file),
            "--out",
            str(tmp_path / "run"),
            "--plain",
        ],
        env={**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache")},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0]
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group, workers included
    output = child.communicate(timeout=30)[0]
    assert child.returncode == 130 and "Traceback" not in output, output


# Qwen3's thinking switch, in small: the generation prompt opens an empty think block when thinking is off.
THINKING_TEMPLATE = REWRITING_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
    "<think></think>{% endif %}{% endif %}",
)


def test_chat_template_kwargs_set_the_thinking_switch_in_training_data_check_and_the_saved_template(tmp_path):
    from transformers import AutoTokenizer

    from qlora_kit.data.dataset import thinking_note
    from qlora_kit.model.load import load_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "qwen3-like")
    chat = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}
    default = load_tokenizer(tmp_path / "qwen3-like")
    assert trained_spans(default, *tokenize_record(chat, default)) == ["<think></think>three</s>"]
    assert "not set here" in thinking_note(default) and "enable_thinking=false" in thinking_note(default)
    off = load_tokenizer(tmp_path / "qwen3-like", chat_template_kwargs="enable_thinking=false")
    assert trained_spans(off, *tokenize_record(chat, off)) == ["three</s>"]  # the empty block is the prompt's
    assert thinking_note(off).startswith("Chats render with enable_thinking=false")
    records = read_records(write_jsonl(tmp_path / "chat.jsonl", [chat]))
    assert cache_key(records, off) != cache_key(records, default)  # a tokenized cache of one is not the other's
    off.save_pretrained(tmp_path / "adapter")  # as training saves it beside the adapter: inference renders alike
    prompt = AutoTokenizer.from_pretrained(tmp_path / "adapter").apply_chat_template(
        chat["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|assistant|><think></think>")
    assert thinking_note(build_tokenizer()) is None  # no switch, nothing said


@pytest.mark.parametrize("given, says", [("enable_thinking", "is not KEY=VALUE"), ("1x=2", "is not KEY=VALUE")])
def test_chat_template_kwargs_that_are_not_key_value_pairs_are_refused(given, says):
    from qlora_kit.model.load import parse_template_variables

    with pytest.raises(UserError, match=says):
        parse_template_variables(given)
    assert parse_template_variables("enable_thinking=False, depth=2,name=x") == {
        "enable_thinking": False,
        "depth": 2,
        "name": "x",
    }


# Gemma's layout in small: no system turn; a system message opens the first user turn.
FOLDING_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + ' ' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<|{{ m['role'] }}|>{{ (first if loop.first else '') + m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_data_check_says_where_a_template_without_a_system_turn_puts_the_system_message(tokenizer):
    from qlora_kit.data.dataset import system_note

    gemma_like = build_tokenizer()
    gemma_like.chat_template = FOLDING_TEMPLATE
    chat = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "one two"},
                {"role": "assistant", "content": "three"},
            ]
        }
    ]
    assert "puts each system message at the start of the first user turn" in system_note(chat, gemma_like)
    ids, labels = tokenize_record(chat[0], gemma_like)
    assert gemma_like.decode(ids).startswith("<s><|user|>be brief one two</s>")
    assert trained_spans(gemma_like, ids, labels) == ["three</s>"]
    assert system_note(chat, tokenizer) is None  # a template with a system turn
    assert system_note([{"messages": chat[0]["messages"][1:]}], gemma_like) is None  # no system message in the data
    dropping = build_tokenizer()
    dropping.chat_template = CHAT_TEMPLATE_WITHOUT_SYSTEM
    assert "leaves system messages out" in system_note(chat, dropping)


CHAT_TEMPLATE_WITHOUT_SYSTEM = (
    "{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
