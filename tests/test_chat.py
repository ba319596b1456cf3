import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from qlora_kit.adapter import folder as adapter
from qlora_kit.adapter.folder import Sampling, load_with_adapters
from qlora_kit.errors import UserError
from qlora_kit.inference import chat
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training
from tests.conftest import write_jsonl
from tests.test_cli import run_cli

GREEDY = Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def two_adapters(llama_dir, tmp_path_factory):
    """Two adapters of the tiny Llama, trained on different text, as runs/pirate/adapter and runs/french/adapter."""
    root = tmp_path_factory.mktemp("runs")
    for name, text in (("pirate", "arr matey the sea"), ("french", "bonjour le monde")):
        data = write_jsonl(root / f"{name}.jsonl", [{"text": text}] * 8)
        recipe = Recipe(model=str(llama_dir), data=str(data), rank=8, lr=5e-2, steps=6, micro_batch=4, dropout=0.0)
        run_training(recipe, root / name, Console(file=io.StringIO()))
    return root / "pirate" / "adapter", root / "french" / "adapter"


def test_several_adapters_share_one_base_and_switch_by_name(two_adapters, llama_dir):
    model, tokenizer, names = load_with_adapters(None, list(two_adapters))
    assert names == ["pirate", "french"]
    prompts = [
        "the",
        "hello world, this is a tiny tokenizer for tests",
        "one two",
    ]  # unequal: batched with left padding
    rows = list(chat.answer_each(model, tokenizer, prompts, [None, *names], GREEDY))
    for name, folder in zip(names, two_adapters):  # each switched, batched answer is what that adapter alone gives
        alone, alone_tokenizer = adapter.load_with_adapter(None, folder)
        assert [r["replies"][name] for r in rows] == [adapter.generate(alone, alone_tokenizer, p, 6) for p in prompts]
    plain, plain_tokenizer = adapter.load_with_adapter(str(llama_dir), None)
    assert [r["replies"]["base"] for r in rows] == [adapter.generate(plain, plain_tokenizer, p, 6) for p in prompts]
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model.set_adapter("pirate")
        pirate = model(input_ids=ids).logits
        model.set_adapter("french")
        assert not torch.equal(pirate, model(input_ids=ids).logits)


def test_adapters_of_different_bases_need_a_model(two_adapters, tmp_path):
    other = tmp_path / "other" / "adapter"
    other.mkdir(parents=True)
    for f in two_adapters[0].iterdir():
        if f.name != "base_model.json":  # as another tool's adapter: its base named only in adapter_config.json
            (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "some/other-model"}))
    with pytest.raises(UserError, match="trained on different bases"):
        load_with_adapters(None, [two_adapters[0], other])


def test_the_chat_loop_keeps_history_and_obeys_commands(two_adapters, monkeypatch):
    model, tokenizer, names = load_with_adapters(None, list(two_adapters))
    seen = []

    def fake_reply(model, tokenizer, messages, sampling, streamer, stop=None):
        seen.append((model.active_adapter, [dict(m) for m in messages]))
        streamer.on_finalized_text("ok", stream_end=False)
        streamer.end()
        return "ok"

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    lines = iter(
        [
            "hello",
            "/system Be brief.",
            "again",
            "/adapter french",
            "bonjour",
            "/adapter nope",
            "/reset",
            "fresh",
            "/adapters",
            "/wat",
            "",
            "/quit",
            "never read",
        ]
    )
    console = Console(file=io.StringIO(), width=200)
    transcript = chat.run_chat(model, tokenizer, names, console, GREEDY, read_line=lambda: next(lines))
    assert transcript == [{"role": "user", "content": "fresh"}, {"role": "assistant", "content": "ok"}]
    assert seen[0] == ("pirate", [{"role": "user", "content": "hello"}])
    assert seen[1][1][0] == {"role": "system", "content": "Be brief."} and len(seen[1][1]) == 4
    assert seen[2][0] == "french" and len(seen) == 4 and len(seen[3][1]) == 2
    shown = console.file.getvalue()
    assert "No adapter named 'nope'" in shown and "Unknown command /wat" in shown and "model> ok" in shown


def test_chat_streams_a_real_reply_and_ends_at_end_of_input(two_adapters):
    model, tokenizer, names = load_with_adapters(None, [two_adapters[0]])
    lines = iter(["the sea", "/base", "the sea"])

    def read_line():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    transcript = chat.run_chat(model, tokenizer, names, Console(file=io.StringIO()), GREEDY, read_line=read_line)
    assert [m["role"] for m in transcript] == ["user", "assistant", "user", "assistant"]
    assert transcript[1]["content"] == adapter.generate(model, tokenizer, "the sea", 6)


def test_generate_a_file_of_prompts_with_compare(two_adapters, monkeypatch, capsys, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the"}, "hello"])
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "generate",
        "--file",
        prompts,
        "--compare",
        "--json",
        "--max-new-tokens",
        "4",
        "--adapter",
        two_adapters[0],
        "--adapter",
        two_adapters[1],
    )
    assert code in (0, None), err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["the", "hello"] and list(rows[0]["replies"]) == ["base", "pirate", "french"]
    code, out, _ = run_cli(
        monkeypatch, capsys, "generate", "--prompt", "the", "--compare", "--adapter", two_adapters[0]
    )
    assert code in (0, None) and "base" in out and "pirate" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ("{oops\n", "line 1: not valid JSON"),
        ('{"text": "x"}\n', "line 1: no non-empty `prompt`"),
    ],
)
def test_prompt_files_with_problems(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        chat.read_prompts(tmp_path / "p.jsonl")


# The real CLI in a child process, each answer (or streamed token) slowed so that a signal lands mid-way.
SLOW_CHILD = """
import sys, time
import qlora_kit.inference.chat as chat
from transformers import TextIteratorStreamer
answer_each, put = chat.answer_each, TextIteratorStreamer.put
def slow_answers(*args, **kwargs):
    for row in answer_each(*args, **kwargs):
        time.sleep(0.1)
        yield row
def slow_put(self, value):
    time.sleep(0.1)
    return put(self, value)
chat.answer_each, TextIteratorStreamer.put = slow_answers, slow_put
sys.argv = ["qlora-kit", *sys.argv[1:]]
from qlora_kit.cli.app import main
main()
"""


def start_slow(tmp_path: Path, *args, **popen) -> subprocess.Popen:
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, *map(str, args)], env=env, text=True, cwd=Path(__file__).parents[1], **popen
    )


def test_an_interrupted_generate_keeps_each_answer_and_the_same_command_answers_the_rest(
    two_adapters, tmp_path, monkeypatch, capsys
):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"the sea {i}"} for i in range(300)])
    answers = tmp_path / "answers.jsonl"
    command = [
        "generate",
        "--adapter",
        two_adapters[0],
        "--file",
        prompts,
        "--output",
        answers,
        "--max-new-tokens",
        "2",
    ]
    child = start_slow(tmp_path, *command, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (answers.exists() and len(answers.read_text().splitlines()) >= 10):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    kept = [json.loads(line) for line in answers.read_text().splitlines()]
    assert child.returncode == 130 and "Traceback" not in err, err
    assert 10 <= len(kept) < 300 and [row["prompt"] for row in kept] == [f"the sea {i}" for i in range(len(kept))]
    stopped = re.search(r"Stopped after (\d+) of 300 prompts; their answers are in .*answers.jsonl", err)
    assert stopped and len(kept) - 1 <= int(stopped.group(1)) <= len(kept), err
    assert len(kept) - 1 <= len(out.splitlines()) <= len(kept)  # --json printed each answer as it came

    code, out, err = run_cli(monkeypatch, capsys, *command)
    assert code in (0, None), err
    assert f"answers {len(kept)} of the 300 prompts already; answering the other {300 - len(kept)}" in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [f"the sea {i}" for i in range(300)] and rows[: len(kept)] == kept


def test_ctrl_c_in_chat_stops_the_reply_not_the_session_and_a_line_not_utf8_is_asked_again(two_adapters, tmp_path):
    # Greedy: a sampled reply may end within the second before the Ctrl-C, and the Ctrl-C then meets the prompt
    child = start_slow(
        tmp_path,
        "chat",
        "--adapter",
        two_adapters[0],
        "--max-new-tokens",
        "200",
        "--temperature",
        "0",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: child.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(text: str, after: int = 0) -> int:
        deadline = time.monotonic() + 120
        while (found := "".join(seen).find(text, after)) < 0:
            assert child.poll() is None and time.monotonic() < deadline, "".join(seen)
            time.sleep(0.05)
        return found

    wait_for("Chatting with")
    child.stdin.buffer.write(b"\xff\xfe the sea\n")  # not UTF-8
    child.stdin.write("the sea\n")
    child.stdin.flush()
    time.sleep(1.0 + 0 * wait_for("model>"))  # a few tokens into the reply
    child.send_signal(signal.SIGINT)
    stopped = wait_for("(stopped)")
    child.stdin.write("one two\n")  # the session goes on
    child.stdin.flush()
    wait_for("model>", stopped)
    child.stdin.close()
    assert child.wait(timeout=120) == 0
    reader.join(timeout=10)
    transcript = "".join(seen)
    assert "That line is not UTF-8 text; type it again." in transcript and "Traceback" not in transcript, transcript
