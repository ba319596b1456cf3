"""The hub as users meet it, against a local stand-in of its download API (tests/hub_stand_in.py) that the real
huggingface_hub client talks to: exactly the files a model needs, gated/missing/offline said in one sentence,
the free disk checked first, an interrupted download continued, plan from config.json alone."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.errors import UserError
from qlora_kit.probe import hub
from qlora_kit.probe.sources import resolve_model
from tests.hub_stand_in import HubStandIn
from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).parents[1]


def test_only_what_a_fine_tune_reads_is_fetched():
    llama3 = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "LICENSE",
        "README.md",
        "USE_POLICY.md",
        ".gitattributes",
    ]
    assert hub.files_a_model_needs(llama3) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    gpt_oss = [
        "config.json",
        "model-00000-of-00002.safetensors",
        "model.safetensors.index.json",
        "metal/model.bin",
        "original/model--00001-of-00002.safetensors",
        "chat_template.jinja",
        "tokenizer.json",
    ]
    assert "metal/model.bin" not in hub.files_a_model_needs(gpt_oss)
    assert "chat_template.jinja" in hub.files_a_model_needs(gpt_oss)
    mistral = [
        "config.json",
        "consolidated.safetensors",
        "model.safetensors",
        "tekken.json",
        "params.json",
        "pytorch_model.bin",
        "additional_chat_templates/tool_use.jinja",
        "modeling_x.py",
    ]
    assert hub.files_a_model_needs(mistral) == [
        "additional_chat_templates/tool_use.jinja",
        "config.json",
        "model.safetensors",
        "tekken.json",
    ]
    assert "modeling_x.py" in hub.files_a_model_needs(mistral, trust_remote_code=True)
    tokenizers = ["config.json", "model.safetensors", "qwen.tiktoken", "vocab.json", "merges.txt", "spiece.model"]
    assert hub.files_a_model_needs(tokenizers) == sorted(tokenizers)


@pytest.mark.parametrize(
    "files, says",
    [
        (["config.json", "pytorch_model.bin"], "only as pickled PyTorch files"),
        (["config.json", "model.gguf"], "holds no .safetensors weights"),
    ],
)
def test_a_repo_without_safetensors_is_refused_before_a_download(files, says):
    with pytest.raises(UserError, match=says):
        hub.files_a_model_needs(files, "org/old")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 saved by transformers 5: its chat template in chat_template.jinja, as on the hub."""
    folder = save_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3")
    assert (folder / "chat_template.jinja").is_file()
    return folder


@pytest.fixture
def stand_in(qwen3_dir, tmp_path, monkeypatch):
    """The stand-in hub serving org/tiny-qwen3 (with an original/ copy of its weights and a README), the hub client
    pointed at it in this process, and an empty Hugging Face cache."""
    from huggingface_hub import constants

    with HubStandIn() as server:
        weights = (qwen3_dir / "model.safetensors").read_bytes()
        server.add_model("org/tiny-qwen3", qwen3_dir, {"original/model.safetensors": weights, "README.md": b"# tiny"})
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        yield server


def fetched(server: HubStandIn) -> set[str]:
    return {
        path.split("/resolve/")[1].split("/", 1)[1]
        for method, path, _ in server.requests
        if method == "GET" and "/resolve/" in path
    }


def asked(server: HubStandIn) -> list:
    """The requests a download made (not the hub client's own daily registry fetch)."""
    return [r for r in server.requests if not r[1].startswith("/api/agent-harnesses")]


def test_a_hub_model_is_fetched_once_with_its_chat_template_and_found_offline_after(stand_in, monkeypatch):
    from huggingface_hub import constants

    folder = resolve_model("org/tiny-qwen3")
    assert fetched(stand_in) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    }
    assert (folder / "chat_template.jinja").is_file() and not (folder / "original").exists()
    from qlora_kit.model.load import load_tokenizer

    assert load_tokenizer(folder).chat_template  # the model's own template, not a fallback layout
    stand_in.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny-qwen3") == folder and resolve_model("org/tiny-qwen3@main") == folder
    assert asked(stand_in) == []  # a complete cached snapshot asks nothing of the hub


def test_a_revision_is_fetched_by_name_and_an_unknown_one_is_said(stand_in):
    commit = stand_in.repos["models/org/tiny-qwen3"]["commit"]
    assert resolve_model(f"org/tiny-qwen3@{commit}").name == commit
    with pytest.raises(UserError, match="org/tiny-qwen3 has no revision 'v9'") as refused:
        resolve_model("org/tiny-qwen3@v9")
    assert "leave the @revision out" in refused.value.hint


def test_a_gated_repo_says_to_accept_the_licence_and_log_in(stand_in):
    stand_in.gated.add("org/tiny-qwen3")
    with pytest.raises(UserError, match="org/tiny-qwen3 is a gated model.*you are not logged in") as refused:
        resolve_model("org/tiny-qwen3")
    assert "https://huggingface.co/org/tiny-qwen3" in refused.value.hint and "hf auth login" in refused.value.hint
    assert fetched(stand_in) == {"config.json"} or fetched(stand_in) == set()  # refused at the first, small file


def test_a_missing_repo_is_not_called_a_cache_problem(stand_in):
    with pytest.raises(UserError, match="There is no model org/nothing-here on the Hugging Face hub") as refused:
        resolve_model("org/nothing-here")
    assert "cache" not in refused.value.message and "hf auth login" in refused.value.hint
    with pytest.raises(UserError, match="Did you mean: google/gemma-2b"):
        resolve_model("google/gema-2b")


def test_an_adapter_on_the_hub_is_named_as_a_folder_is(stand_in, tmp_path, monkeypatch):
    """--adapter ORG/NAME fetches the adapter repo's own files; a path whose first folder is here stays a path, and
    a model repo is not taken for an adapter."""
    from huggingface_hub import constants

    from qlora_kit.probe.sources import adapter_in, check_adapter_folder

    stand_in.add_repo(
        "me/fox-adapter",
        {
            "adapter_config.json": b'{"r": 4}',
            "adapter_model.safetensors": b"x",
            "tokenizer.json": b"{}",
            "README.md": b"# fox",
            "optimizer.pt": b"big",
        },
    )
    folder = adapter_in("me/fox-adapter")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="Adapter folder runs/typo does not exist"):
        check_adapter_folder(adapter_in("runs/typo"))
    with pytest.raises(UserError, match="org/tiny-qwen3 holds no adapter_config.json, so it is not a PEFT adapter"):
        adapter_in("org/tiny-qwen3")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert adapter_in("me/fox-adapter") == folder  # cached: found offline
    with pytest.raises(
        UserError, match="me/other is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    ) as refused:
        adapter_in("me/other")
    assert "pass a local adapter folder" in refused.value.hint


def test_offline_says_what_the_cache_holds_and_how_to_get_the_rest(stand_in, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError, match="org/tiny-qwen3 is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    ) as refused:
        resolve_model("org/tiny-qwen3")
    assert "unset HF_HUB_OFFLINE" in refused.value.hint and asked(stand_in) == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    with pytest.raises(
        UserError, match="not in the local Hugging Face cache, and the hub cannot be reached"
    ) as refused:
        resolve_model("org/tiny-qwen3")
    assert "hf download org/tiny-qwen3" in refused.value.hint


def test_too_little_free_disk_is_said_before_the_first_byte(stand_in, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(UserError, match=r"org/tiny-qwen3 needs .* GiB more in .*hf-cache, and that disk has 0.00 GiB"):
        resolve_model("org/tiny-qwen3")
    assert fetched(stand_in) == set()


def test_plan_reads_a_hub_model_from_its_config_alone(stand_in):
    from qlora_kit.probe.catalog import find_model_shape

    shape = find_model_shape("org/tiny-qwen3")
    assert shape.hidden_size == 64
    assert fetched(stand_in) == {"config.json"}


def test_plan_of_a_hub_model_says_when_the_hub_cannot_be_reached(stand_in, monkeypatch):
    """Not "no such model": the listing fails at once (a file download would retry for half a minute first)."""
    from huggingface_hub import constants

    from qlora_kit.probe.catalog import find_model_shape

    find_model_shape("org/tiny-qwen3")  # planned once online: its config.json is cached
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    assert find_model_shape("org/tiny-qwen3").hidden_size == 64
    with pytest.raises(
        UserError,
        match="org/other-model is not in the catalogue or the local Hugging Face cache, and the hub cannot be reached",
    ) as refused:
        find_model_shape("org/other-model")
    assert "on a machine with network" in refused.value.hint
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert find_model_shape("org/tiny-qwen3").hidden_size == 64
    with pytest.raises(UserError, match="the hub cannot be reached"):
        find_model_shape("org/other-model")


def cli(*args, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_kit", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_an_interrupted_download_continues_where_it_stopped(tmp_path):
    """Ctrl-C halfway through the weights, then train from the same clean HF_HOME: the rest is asked for with a
    Range, not again, and the model's own chat template is used. The weights are 30 MB: the hub client writes what
    it receives in 10 MB pieces."""
    qwen3_dir = save_tiny_model(tmp_path / "qwen3", "qwen3", hidden_size=512, intermediate_size=2048)
    weights = (qwen3_dir / "model.safetensors").read_bytes()
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "a pirate sails the sea"}]
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    with HubStandIn() as server:
        server.add_model("org/tiny-qwen3", qwen3_dir)
        server.stall_after["model.safetensors"] = len(weights) // 2
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(ROOT),
        }
        first = cli(
            "train",
            "--model",
            "org/tiny-qwen3",
            "--data",
            "data.jsonl",
            "--out",
            "runs/cut",
            "--steps",
            "1",
            "--plain",
            env=env,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 120
        while not any(m == "GET" and p.endswith("model.safetensors") for m, p, _ in server.requests):
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        time.sleep(1)  # half the file is on its way to the disk
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 130 and "Traceback" not in err, err
        assert "stopped at model.safetensors: the same command continues it" in out + err
        del server.stall_after["model.safetensors"]
        again = cli(
            "train",
            "--model",
            "org/tiny-qwen3",
            "--data",
            "data.jsonl",
            "--out",
            "runs/x",
            "--steps",
            "1",
            "--rank",
            "4",
            "--plain",
            env=env,
            cwd=tmp_path,
        )
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0 and "Traceback" not in err, err
        checked = cli("data", "check", "data.jsonl", "--model", "org/tiny-qwen3", env=env, cwd=tmp_path)
        out, err = checked.communicate(timeout=300)
        assert checked.returncode == 0 and "<|user|>" in out and "### User" not in out, out  # the model's template
    first_try, second_try = [r for m, p, r in server.requests if m == "GET" and p.endswith("model.safetensors")]
    assert first_try is None and int(second_try.removeprefix("bytes=").removesuffix("-")) >= 10 * 2**20
    [snapshot] = (tmp_path / "hf" / "hub" / "models--org--tiny-qwen3" / "snapshots").iterdir()
    assert (snapshot / "model.safetensors").read_bytes() == weights


def test_plan_says_what_training_would_download_first(stand_in, monkeypatch, capsys):
    from tests.test_cli import run_cli

    code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", "org/tiny-qwen3", "--vram", "8")
    weights = len(stand_in.repos["models/org/tiny-qwen3"]["files"]["model.safetensors"])
    assert code == 0 and f"training fetches {weights / 1e3:.1f} kB of weights" in out.replace("\n", ""), out + err
    assert fetched(stand_in) == {"config.json"}


def test_data_check_fetches_the_tokenizer_not_the_weights(stand_in, monkeypatch, capsys, tmp_path):
    from tests.test_cli import run_cli

    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", tmp_path / "chat.jsonl", "--model", "org/tiny-qwen3")
    assert code == 0 and "<|user|>" in out, out + err  # the model's own chat template
    assert fetched(stand_in) == {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    resolve_model("org/tiny-qwen3")  # a later train fetches what the tokenizer's download left out
    assert "model.safetensors" in fetched(stand_in)


def test_revision_is_the_same_as_naming_it_after_an_at(stand_in, monkeypatch, capsys, tmp_path):
    from tests.test_cli import run_cli

    commit = stand_in.repos["models/org/tiny-qwen3"]["commit"]
    code, out, err = run_cli(
        monkeypatch, capsys, "plan", "--model", "org/tiny-qwen3", "--revision", commit, "--vram", "8"
    )
    assert code == 0 and {p for m, p, _ in stand_in.requests if p.endswith("config.json")} == {
        f"/org/tiny-qwen3/resolve/{commit}/config.json"
    }, out + err  # the revision's, and nothing of main
    for model, says in [("org/tiny-qwen3@main", "names a revision already"), (str(tmp_path), "is not a hub id")]:
        code, out, err = run_cli(monkeypatch, capsys, "plan", "--model", model, "--revision", "v1")
        assert code == 1 and says in err and "Traceback" not in err, err


DATASET_PROBE = """
import json, sys
from qlora_kit.data.dataset import read_records
from qlora_kit.errors import UserError
for name, split in json.loads(sys.argv[1]):
    try:
        loaded = read_records(name, split=split)
        print(json.dumps({"format": loaded.format, "n": len(loaded.records), "where": loaded.where[:2],
                          "path": str(loaded.path)}))
    except UserError as e:
        print(json.dumps({"error": e.message, "hint": e.hint}))
"""


def test_hub_datasets_are_read_as_files_with_their_rows_and_lines(tmp_path):
    """--data org/name (a split, through `datasets`) and org/name:file.jsonl (one file, line numbers kept), gated and
    missing datasets in one sentence, all through the real clients over HTTP from a clean HF_HOME."""
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with HubStandIn() as server:
        server.add_dataset(
            "org/pirate",
            {
                "data/train.jsonl": lines,
                "data/test.jsonl": lines[: lines.index(b"\n") + 1],
                "README.md": b"# pirate chats",
            },
        )
        server.add_dataset("org/broken", {"train.jsonl": lines + b"{oops\n"})
        server.add_dataset("org/gated", {"train.jsonl": lines})
        server.gated.add("org/gated")
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(ROOT),
            "QLORA_KIT_CACHE": str(tmp_path / "cache"),
        }
        cases = [
            ["org/pirate", "train"],
            ["org/pirate", "test"],
            ["org/pirate", "validation"],
            ["org/pirate:data/train.jsonl", "train"],
            ["org/broken:train.jsonl", "train"],
            ["org/pirate:nothing.jsonl", "train"],
            ["org/gated:train.jsonl", "train"],
            ["org/nowhere", "train"],
        ]
        probe = subprocess.run(
            [sys.executable, "-c", DATASET_PROBE, json.dumps(cases)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        model = save_tiny_model(tmp_path / "tiny", "llama")
        trained = subprocess.run(
            [
                sys.executable,
                "-m",
                "qlora_kit",
                "train",
                "--model",
                str(model),
                "--data",
                "org/pirate",
                "--eval-data",
                "org/pirate",
                "--out",
                "runs/x",
                "--steps",
                "2",
                "--checkpoint-every",
                "1",
                "--rank",
                "4",
                "--plain",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert trained.returncode == 0 and "examples/s" not in trained.stderr, trained.stderr  # no library bars
        import yaml

        recipe = yaml.safe_load((tmp_path / "runs/x/recipe.yaml").read_text())
        assert recipe["data"] == "org/pirate" and recipe["data_split"] == "train"
        shutil.rmtree(tmp_path / "runs/x/checkpoints/step-2")  # as if killed after the first checkpoint
        server.add_dataset(
            "org/pirate",
            {"data/train.jsonl": b"".join(sorted(lines.splitlines(keepends=True))[::-1]), "data/test.jsonl": lines},
        )  # the dataset changed on the hub since
        resumed = subprocess.run(
            [sys.executable, "-m", "qlora_kit", "train", "--out", "runs/x", "--resume"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr
        server.add_model("org/tiny-llama", model)  # auto, model and data both from the hub
        chose = subprocess.run(
            [
                sys.executable,
                "-m",
                "qlora_kit",
                "auto",
                "--model",
                "org/tiny-llama",
                "--data",
                "org/pirate",
                "--out",
                "runs/auto",
                "--steps",
                "1",
                "--plain",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert chose.returncode == 0 and (tmp_path / "runs/auto/adapter/adapter_model.safetensors").is_file(), (
            chose.stdout + chose.stderr
        )
        assert (
            json.loads((tmp_path / "runs/auto/adapter/adapter_config.json").read_text())["base_model_name_or_path"]
            == "org/tiny-llama"
        )
        assert (
            resumed.stderr.startswith("Error: The data file's content changed since the checkpoint")
            and "--allow-changed-data" in resumed.stderr
        ), resumed.stderr  # and nothing else on the screen
    assert probe.returncode == 0, probe.stderr
    split, test, unknown, file, broken, missing_file, gated, missing = map(json.loads, probe.stdout.splitlines())
    assert split["format"] == "chat" and split["n"] == 6 and split["where"] == ["row 1", "row 2"]
    assert split["path"].startswith(str(tmp_path / "cache" / "hub-datasets"))  # kept as parquet, named by its data
    assert test["n"] == 1
    assert "validation" in unknown["error"] and "--data-split" in unknown["hint"]
    assert file["n"] == 6 and file["where"] == ["line 1", "line 2"] and "/snapshots/" in file["path"]
    assert re.search(r"train.jsonl has 1 bad example: line 7: not valid JSON", broken["error"])
    assert (
        missing_file["error"] == "The dataset org/pirate has no file nothing.jsonl."
        and "data/train.jsonl" in missing_file["hint"]
    )
    assert gated["error"].startswith("org/gated is a gated dataset") and "hf auth login" in gated["hint"]
    assert missing["error"].startswith("There is no dataset org/nowhere on the Hugging Face hub")


def test_push_uploads_the_adapter_and_its_card_and_a_second_push_updates_it(llama_dir, chat_data, tmp_path):
    """push through the real client (no Xet) to the stand-in: exactly the adapter folder's own files and the card,
    naming the base by its hub id, never this machine's paths; a push cut short sends no large file twice when run
    again; GGUFs only with --gguf, updating only what changed; no token is one sentence."""
    run = tmp_path / "runs" / "first"
    trained = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_kit",
            "train",
            "--model",
            str(llama_dir),
            "--data",
            str(chat_data),
            "--out",
            str(run),
            "--steps",
            "2",
            "--rank",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert trained.returncode == 0, trained.stderr
    (run / "adapter.gguf").write_bytes(b"GGUF" + b"\0" * 100)  # an export beside the adapter
    with HubStandIn() as server:
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("HF_TOKEN", None)

        def push(*flags):
            return subprocess.run(
                [sys.executable, "-m", "qlora_kit", "push", str(run), "--repo", "me/pirate-adapter", *flags],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )

        local = push()  # trained on a folder of this machine: the hub cannot name it
        assert local.returncode == 1 and "local folder" in local.stderr and "--base ORG/NAME" in local.stderr
        assert "Traceback" not in local.stderr and not server.requests
        refused = push("--base", "org/tiny-llama")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "you are not logged in" in refused.stderr and "hf auth login" in refused.stderr
        env["HF_TOKEN"] = server.write_token
        server.failing_commits = 1  # the weights go up, then the commit fails: the push is cut short
        cut = push("--base", "org/tiny-llama")
        assert cut.returncode == 1 and "answered 503" in cut.stderr and "Traceback" not in cut.stderr, cut.stderr
        uploads = [p for m, p, _ in server.requests if m == "PUT"]
        assert len(uploads) == 1 and "models/me/pirate-adapter" in server.repos  # the safetensors, held by the hub
        first = push("--base", "org/tiny-llama")
        assert first.returncode == 0 and "Pushed to" in first.stdout, first.stderr
        assert [p for m, p, _ in server.requests if m == "PUT"] == uploads  # not sent again
        files = server.repos["models/me/pirate-adapter"]["files"]
        own = {p.name for p in (run / "adapter").iterdir()} | {"README.md"}
        assert set(files) == own  # no checkpoints, no optimizer state, no GGUF without --gguf
        assert files["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-llama"
        assert not any(str(tmp_path).encode() in data for data in files.values())  # no path of this machine
        card = files["README.md"].decode()
        assert 'PeftModel.from_pretrained(base, "me/pirate-adapter")' in card and "```yaml" in card
        assert "base_model: org/tiny-llama" in card and not server.private["models/me/pirate-adapter"]
        again = push("--base", "org/tiny-llama", "--gguf")
        assert again.returncode == 0, again.stderr
        assert set(server.repos["models/me/pirate-adapter"]["files"]) == own | {"adapter.gguf"}
        assert (
            "llama-cli -m BASE.gguf --lora adapter.gguf"
            in server.repos["models/me/pirate-adapter"]["files"]["README.md"].decode()
        )
        sent_again = [p for m, p, _ in server.requests if m == "PUT"][len(uploads) :]
        assert len(sent_again) == 1 and server.commits[-1][1] == ["README.md", "adapter.gguf"]  # only what is new
        private = subprocess.run(
            [
                sys.executable,
                "-m",
                "qlora_kit",
                "push",
                str(run / "adapter"),
                "--repo",
                "me/secret-adapter",
                "--base",
                "org/tiny-llama",
                "--private",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert private.returncode == 0 and server.private["models/me/secret-adapter"], private.stderr
        # and anyone gets it back by its name: the adapter from its repo, the base its card names from the hub
        server.add_model("org/tiny-llama", llama_dir)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        answered = subprocess.run(
            [
                sys.executable,
                "-m",
                "qlora_kit",
                "generate",
                "--adapter",
                "me/pirate-adapter",
                "--prompt",
                "Ahoy",
                "--max-new-tokens",
                "3",
            ],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, "HF_HOME": str(tmp_path / "hf-elsewhere")},
        )
        assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
        fetched = [p for m, p, _ in server.requests if m == "GET" and "/resolve/" in p]
        assert any("me/pirate-adapter" in p and p.endswith("adapter_model.safetensors") for p in fetched)
        assert any("org/tiny-llama" in p and p.endswith("model.safetensors") for p in fetched)
