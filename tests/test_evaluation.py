import io
import json
import math

from rich.console import Console

from qlora_kit.inference.evaluation import run_eval
from qlora_kit.plan.recipes import Recipe
from qlora_kit.train.run import run_training
from tests.test_cli import run_cli


def test_eval_shows_base_and_adapter_and_matches_the_runs_own_eval_loss(llama_dir, text_data, tmp_path):
    recipe = Recipe(
        model=str(llama_dir),
        data=str(text_data),
        eval_data=str(text_data),
        rank=8,
        lr=1e-2,
        steps=6,
        micro_batch=4,
        dropout=0.0,
    )
    run_training(recipe, tmp_path / "run", Console(file=io.StringIO()))
    result = run_eval(None, tmp_path / "run" / "adapter", text_data)
    assert result.adapter_loss < result.base_loss, "the adapter learned this data"
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert math.isclose(result.adapter_loss, last["eval_loss"], rel_tol=1e-4), "the same loss as training's evaluation"
    assert result.to_dict()["adapter_perplexity"] == math.exp(result.adapter_loss)
    base_only = run_eval(str(llama_dir), None, text_data)
    assert base_only.adapter_loss is None and math.isclose(base_only.base_loss, result.base_loss, rel_tol=1e-5)


def test_eval_through_the_cli(monkeypatch, capsys, llama_dir, text_data):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--model", llama_dir, "--data", text_data, "--json")
    assert code in (0, None), err
    assert json.loads(out)["examples"] == 16
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", llama_dir, "--data", "missing.jsonl")
    assert code == 1 and "does not exist" in err
