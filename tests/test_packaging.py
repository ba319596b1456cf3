"""The wheel users install holds every file qlora-kit reads at run time (the editable install the other tests use
would read them from the checkout, so only this test and .ci/installed_smoke.sh can see one missing)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_catalogue_the_recipes_and_the_demo_data(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                            "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("qlora_kit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"qlora_kit/catalog/{f}" for f in ("models.yaml", "gpus.yaml")} | {"qlora_kit/demo_data/pirate.jsonl"}
    needed |= {f"qlora_kit/recipe_files/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    assert len(needed) >= 10 and needed <= names, sorted(needed - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
