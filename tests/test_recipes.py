import dataclasses

import pytest

from qlora_kit.errors import UserError
from qlora_kit.plan.recipes import Recipe, load_recipe, recipe_from_dict, with_overrides


def test_recipe_yaml_round_trips_with_a_comment_per_setting(tmp_path):
    recipe = Recipe(model="m", data="d.jsonl", rank=8, lr=1e-4, gradient_checkpointing=False)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    lines = path.read_text().splitlines()
    assert sum(line.startswith("# ") for line in lines) == len(lines) // 2


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rnak": 8}, "unknown setting `rnak`"),
        ({"rank": "eight"}, "`rank` is 'eight', but it must be a int from 1 to 1024"),
        ({"rank": 0}, "`rank` is 0, but it must be int from 1 to 1024"),
        ({"lr": -1.0}, "`lr` is -1.0"),
        ({"optimizer": "sgd"}, "must be one of auto, paged_adamw_8bit"),
        ({"gradient_checkpointing": "yes"}, "must be a bool"),
        ({"micro_batch": True}, "must be a int"),
    ],
)
def test_invalid_settings_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(UserError, match=message) as error:
        recipe_from_dict(values, where="my.yaml")
    assert "my.yaml" in error.value.message


def test_ints_are_accepted_for_float_settings():
    assert recipe_from_dict({"alpha": 16}).alpha == 16.0


def test_overrides_apply_only_what_is_given():
    recipe = with_overrides(Recipe(rank=8), rank=None, lr=1e-3)
    assert recipe.rank == 8 and recipe.lr == 1e-3


def test_recipe_file_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_recipe(bad)


def test_the_optimizer_in_use_is_the_one_memory_disk_and_training_all_assume():
    from qlora_kit.plan.recipes import optimizer_in_use

    assert optimizer_in_use(Recipe(), "cuda") == "paged_adamw_8bit" and optimizer_in_use(Recipe(), "cpu") == "adamw"
    assert optimizer_in_use(Recipe(optimizer="paged_adamw_8bit"), "cpu") == "adamw", "paging needs CUDA"
    assert optimizer_in_use(Recipe(optimizer="adamw_8bit"), "cpu") == "adamw_8bit"
    assert optimizer_in_use(Recipe(parallel="fsdp_offload"), "cuda") == "adamw", "offloaded shards step in host RAM"


def test_shipped_recipes_are_read_from_the_installed_package():
    from importlib import resources

    from qlora_kit.plan.recipes import SHIPPED_RECIPES, card_recipes

    assert list(card_recipes()) == ["4gb", "6gb", "8gb", "12gb", "16gb", "24gb", "cpu"]
    shipped = {f.name for f in resources.files(SHIPPED_RECIPES).iterdir()}
    assert {f"{name}.yaml" for name in card_recipes()} <= shipped
    assert load_recipe("cpu") == load_recipe(card_recipes()["cpu"])


def test_recipes_show_redirected_to_a_file_is_the_recipe_itself(monkeypatch, capsys, tmp_path):
    import yaml

    from tests.test_cli import run_cli

    code, out, _ = run_cli(monkeypatch, capsys, "recipes", "show", "cpu")  # captured: stdout is not a terminal
    assert code in (0, None)
    copy = tmp_path / "cpu.yaml"
    copy.write_text(out)
    assert yaml.safe_load(out)["checkpoint_every"] == 50 and load_recipe(copy) == load_recipe("cpu")


def test_the_recipes_table_in_the_docs_says_what_the_files_say():
    from pathlib import Path

    from qlora_kit.plan.recipes import card_recipes

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    rows = {
        cells[0]: cells[1:5]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in doc.splitlines()
            if line.startswith("| ") and line.count("|") == 7
        )
    }
    for name in card_recipes():
        r = load_recipe(name)
        assert rows[name] == [
            str(r.rank),
            str(r.seq_len),
            f"{r.micro_batch} x {r.grad_accum}",
            f"{r.checkpoint_every} steps",
        ], name


def test_every_recipe_is_checked_however_it_is_made():
    with pytest.raises(UserError, match="`rank` is 0"):
        Recipe(rank=0)
    with pytest.raises(UserError, match="`precision` is 'fp8'"):
        dataclasses.replace(Recipe(), precision="fp8")
    assert Recipe(alpha=16).alpha == 16.0 and isinstance(Recipe(alpha=16).alpha, float)
