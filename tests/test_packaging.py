"""The wheel users install holds every file qlora-kit reads at run time (the editable install the other tests use
would read them from the checkout, so only this test and .ci/installed_smoke.sh can see one missing)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_module_the_catalogue_the_recipes_and_the_demo_data(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("qlora_kit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"qlora_kit/probe/catalog/{f}" for f in ("models.yaml", "gpus.yaml")}
    needed |= {"qlora_kit/demo_data/pirate.jsonl"}
    needed |= {f"qlora_kit/recipe_files/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    # every module, subpackages too: setuptools' package list is explicit (qlora_kit.architectures was once left out)
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "qlora_kit").rglob("*.py")}
    assert len(needed) >= 10 and needed <= names, sorted(needed - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_every_package_of_the_source_tree_is_in_the_wheels_package_list():
    """The same in a second, without a build (a build folder left by an earlier build can hide a missing package)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "qlora_kit").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject.toml's packages: {sorted(found - listed)}"
