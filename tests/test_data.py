import pytest
import torch

from qlora_kit.data import IGNORE, collate, example_stream, read_jsonl, tokenize, truncate
from qlora_kit.errors import UserError
from tests.conftest import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("content, message", [
    ("", "has no examples"),
    ("\n\n", "has no examples"),
    ('{"text": "ok"}\n{"text": "fine"}\nnot json\n', "line 3 is not valid JSON"),
    ('[1, 2]\n', "line 1 is a JSON list"),
    ('{"prompt": "x"}\n', "neither `text` nor `messages`"),
    ('{"text": ""}\n', "`text` must be a non-empty string"),
    ('{"messages": []}\n', "`messages` must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', "message 1 needs a string `role` and a string `content`"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
])
def test_bad_jsonl_names_the_problem_and_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        read_jsonl(path)
    assert error.value.hint


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder, not a data file"):
        read_jsonl(tmp_path)


def test_text_examples_learn_every_token_and_end_with_eos(tokenizer):
    [example] = tokenize([{"text": "the quick brown fox"}], tokenizer, seq_len=64)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_chat_examples_learn_only_the_final_reply(tokenizer):
    messages = [{"role": "user", "content": "one two three?"}, {"role": "assistant", "content": "four five"}]
    [example] = tokenize([{"messages": messages}], tokenizer, seq_len=64)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tokenizer.decode(learned) == "four five</s>"
    assert example.labels[0] == IGNORE


def test_truncation_and_dropping_examples_with_nothing_to_learn(tokenizer):
    long = {"text": "one two three four five six seven eight nine ten " * 5}
    [example] = tokenize([long], tokenizer, seq_len=10)
    assert len(example.input_ids) == 10
    prompt_only = {"messages": [{"role": "user", "content": "the quick brown fox jumps"}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(UserError, match="No example has any token left"):
        tokenize([prompt_only], tokenizer, seq_len=4)


def test_collate_pads_right_to_the_longest_example(tokenizer):
    examples = tokenize([{"text": "one"}, {"text": "one two three four"}], tokenizer, seq_len=64)
    input_ids, mask, labels = collate(examples, pad_id=0)
    short = len(examples[0].input_ids)
    assert input_ids.shape[1] == max(len(e.input_ids) for e in examples)
    assert mask[0, :short].all() and not mask[0, short:].any()
    assert (labels[0, short:] == IGNORE).all() and (input_ids[0, short:] == 0).all()


def test_stream_covers_every_example_per_epoch_in_a_seeded_order(tokenizer):
    examples = tokenize([{"text": f"{w} fox"} for w in "one two three four five".split()], tokenizer, seq_len=32)

    def first_epochs(seed):
        stream = example_stream(examples, torch.Generator().manual_seed(seed))
        return [next(stream) for _ in range(10)]

    a = first_epochs(0)
    assert [(epoch, e.input_ids) for epoch, e in a] == [(epoch, e.input_ids) for epoch, e in first_epochs(0)]
    assert [epoch for epoch, _ in a] == [0] * 5 + [1] * 5
    assert sorted(e.input_ids for _, e in a[:5]) == sorted(e.input_ids for e in examples)


def test_truncate_cuts_ids_and_labels_together(tokenizer):
    [example] = truncate(tokenize([{"text": "one two three four five six"}], tokenizer, seq_len=64), 3)
    assert len(example.input_ids) == len(example.labels) == 3
