import json
import shutil

import pytest

from qlora_kit.export.ollama import ChatTurns, chat_turns, go_template, training_system_prompt, write_modelfile
from tests.test_cli import run_cli

# Chat templates as the model families ship them (shortened where they only add tool calling).
CHATML_WITH_DEFAULT_SYSTEM = (  # SmolLM2, Qwen2.5
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI_3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA_3 = (  # no system turn: a system message opens the first user turn
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
LLAMA_2 = (  # the system prompt goes inside the first user turn, as Gemma 3's
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture
def tokenizer_with():
    from tests.tiny_models import build_tokenizer

    def make(template, bos="<s>", eos="</s>"):
        tokenizer = build_tokenizer()
        tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token = template, bos, eos
        return tokenizer

    return make


def test_chatml_with_a_default_system_prompt_becomes_ollamas_go_template(tokenizer_with):
    turns = chat_turns(tokenizer_with(CHATML_WITH_DEFAULT_SYSTEM, eos="<|im_end|>"))
    assert turns == ChatTurns(
        preamble="<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n",
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        answer=("<|im_start|>assistant\n", "<|im_end|>\n"),
        answer_opening="<|im_start|>assistant\n",
    )
    # The shape of Ollama's own templates: the system prompt or the default, then each turn; an answer left open
    # when it is the last message (Ollama continues it).
    assert go_template(turns) == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
        "{{ else }}<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n{{ end }}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ if $last }}<|im_start|>assistant\n{{ end }}'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}'
        "{{ end }}{{ end }}"
    )


@pytest.mark.parametrize("template, system", [(LLAMA_3, True), (GEMMA, False), (PHI_3, True)])
def test_each_familys_template_is_read_as_text_around_turns(tokenizer_with, template, system):
    """chat_turns keeps pieces only when they rebuild the template's own output for every conversation shape."""
    turns = chat_turns(tokenizer_with(template))
    assert turns is not None and (turns.system is not None) == system


def test_a_template_without_a_system_turn_gets_the_system_prompt_in_the_first_user_turn(tokenizer_with):
    llama_2 = chat_turns(tokenizer_with(LLAMA_2))
    assert llama_2.system_in_first_turn and llama_2.system == ("<<SYS>>\n", "\n<</SYS>>\n\n")
    turns = chat_turns(tokenizer_with(GEMMA_3, bos="<bos>"))
    assert turns.system_in_first_turn and turns.system == ("", "\n\n") and turns.user[0] == "<start_of_turn>user\n"
    template = go_template(turns, "<bos>")
    # Once, in the first user turn: Go's text/template assigns the outer $system inside range.
    assert template.startswith("{{ $system := .System }}{{ range")
    assert (
        '{{ if eq .Role "user" }}<start_of_turn>user\n{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
        "{{ .Content }}"
    ) in template


def test_the_bos_token_is_left_to_llama_cpp_when_the_gguf_adds_it(tokenizer_with):
    turns = chat_turns(tokenizer_with(GEMMA, bos="<bos>"))
    assert turns.preamble == "<bos>"
    assert go_template(turns, bos_token="<bos>").startswith("{{ range $i")
    assert go_template(turns).startswith("<bos>{{ range $i")


NUMBERED = "{% for m in messages %}<|{{ m['role'] }}|>{{ loop.index }}. {{ m['content'] }}</s>{% endfor %}"


@pytest.mark.parametrize("template", ["numbered", "qwen3-like"])
def test_a_template_with_logic_beyond_turns_gets_no_template(tokenizer_with, tmp_path, template):
    from tests.test_data import THINKING_TEMPLATE

    tokenizer = tokenizer_with({"numbered": NUMBERED, "qwen3-like": THINKING_TEMPLATE}[template])
    assert chat_turns(tokenizer) is None
    modelfile, templated = write_modelfile(tmp_path, "./m.gguf", None, tokenizer, None, adds_bos=False)
    assert (
        not templated and "TEMPLATE" not in modelfile.read_text() and 'PARAMETER stop "</s>"' in modelfile.read_text()
    )


def test_go_templates_print_braces_in_the_text_literally():
    turns = ChatTurns("", None, ("{{user}}", "\n"), ("", "\n"), "")
    assert go_template(turns).startswith("{{ range $i, $_ := .Messages }}") and '{{ "{{" }}user}}' in go_template(turns)


def write_run(folder, records):
    (folder / "adapter").mkdir(parents=True)
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "recipe.yaml").write_text(f"model: m\ndata: {folder / 'd.jsonl'}\n")
    return folder / "adapter"


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_the_system_prompt_is_the_one_every_training_conversation_began_with(tmp_path):
    same = [chat(("system", "Talk like a pirate."), ("user", f"q{i}"), ("assistant", "a")) for i in range(3)]
    assert training_system_prompt(write_run(tmp_path / "same", same)) == "Talk like a pirate."
    mixed = same + [chat(("user", "q"), ("assistant", "a"))]
    assert training_system_prompt(write_run(tmp_path / "mixed", mixed)) is None
    gone = write_run(tmp_path / "gone", same)
    (tmp_path / "gone" / "d.jsonl").unlink()
    assert training_system_prompt(gone) is None, "data that has moved says nothing"
    assert training_system_prompt(tmp_path / "not-a-run") is None


def test_export_ollama_writes_the_modelfile_for_each_form(adapters_for_ollama, tmp_path, monkeypatch, capsys):
    run = adapters_for_ollama
    code, out, _ = run_cli(monkeypatch, capsys, "export", "--adapter", run / "adapter", "--ollama")
    modelfile = (run / "Modelfile").read_text()
    assert code == 0 and f"ollama create run -f {run / 'Modelfile'}" in out
    assert "ADAPTER ./adapter.gguf" in modelfile and 'SYSTEM """Talk like a pirate."""' in modelfile
    assert 'TEMPLATE """{{ if .System }}<|system|>{{ .System }}</s>' in modelfile
    code, out, _ = run_cli(
        monkeypatch, capsys, "export", "--adapter", run / "adapter", "--format", "gguf", "--ollama", "--overwrite"
    )  # the Modelfile of the first export is replaced
    modelfile = (run / "Modelfile").read_text()
    assert code == 0 and "FROM ./run-f16.gguf" in modelfile and "ADAPTER" not in modelfile


@pytest.fixture
def adapters_for_ollama(tmp_path, tiny_model_dir):
    """A finished run whose every training conversation has the same system prompt."""
    import io

    from rich.console import Console

    from qlora_kit.plan.recipes import Recipe
    from qlora_kit.train.run import run_training

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(chat(("system", "Talk like a pirate."), ("user", f"q{i}"), ("assistant", "arr"))) + "\n"
            for i in range(4)
        )
    )
    run = tmp_path / "run"
    run_training(
        Recipe(model=str(tiny_model_dir), data=str(data), rank=4, steps=1, micro_batch=4),
        run,
        Console(file=io.StringIO()),
    )
    return run


def test_what_export_refuses_on_the_command_line(tmp_path, monkeypatch, capsys, tiny_model_dir):
    code, _, err = run_cli(monkeypatch, capsys, "export", "--format", "gguf")
    assert code == 1 and "Give the --adapter" in err and "--model BASE" in err
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, adapter)  # anything with an adapter's files gets past the folder check
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    code, _, err = run_cli(monkeypatch, capsys, "export", "--adapter", adapter, "--quant", "q8_0")
    assert code == 1 and "--quant applies to --format gguf" in err
