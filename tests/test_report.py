import builtins
import json
import shutil
import struct
from pathlib import Path

import pytest
from rich.console import Console

from qlora_kit.errors import UserError
from qlora_kit.plan.memory import MemoryPlan
from qlora_kit.plan.planner import PlanReport, Target
from qlora_kit.train.report import load_run, summary_table, write_png
from tests.test_dashboard import scripted

COMMITTED = Path(__file__).parent / "data" / "cpu-run"  # 10 steps of the demo on 2 CPU cores


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def gpu_run(tmp_path: Path) -> Path:
    """A scripted GPU run with an eval loss and an out-of-memory step-down."""
    folder = tmp_path / "gpu-run"
    folder.mkdir()
    lines = [scripted(step) | ({"eval_loss": 1.0 / step} if step % 5 == 0 else {}) for step in range(1, 21)]
    lines.insert(
        3, {"event": "out_of_memory_step_down", "step": 4, "from": {"micro_batch": 4}, "to": {"micro_batch": 2}}
    )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    planned = MemoryPlan("m", "cuda", 512, 4, 8, {"weights": 6 * 2**30}, 0, 0, 0, capacity_bytes=8 * 2**30)
    plan = PlanReport(planned, Target("a card", "cuda", 8 * 2**30), 512, 4, None)
    (folder / "plan.json").write_text(json.dumps(plan.to_dict()))
    return folder


def text_of(table) -> str:
    console = Console(record=True, width=120, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


def test_summary_of_the_committed_run():
    text = text_of(summary_table(load_run(COMMITTED)))
    for expected in (
        "smollm2-135m",
        "10 (rank 16, seq 128)",
        "first 4.2945, final 1.4563, best 1.1454",
        "process peak (RSS)",
        "planned 3.36 GiB",
        "not written yet",
    ):
        assert expected in text, expected


def test_png_of_the_committed_run_has_the_expected_size(tmp_path):
    path = write_png([load_run(COMMITTED)], tmp_path / "run.png")
    assert png_size(path) == (1000, 700)


def test_several_runs_overlay_gpu_memory_and_eval_loss(tmp_path):
    runs = [load_run(COMMITTED), load_run(gpu_run(tmp_path))]
    text = text_of(summary_table(runs[1]))
    assert "GPU peak (reserved)" in text and "4.50 GiB; planned 6.00 GiB" in text
    assert "eval loss" in text and "step 4: micro-batch 4 -> 2" in text
    assert png_size(write_png(runs, tmp_path / "both.png")) == (1000, 700)


def test_bad_run_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"event": "out_of_memory_step_down", "step": 1}\n')
    with pytest.raises(UserError, match="has not finished a step"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{broken\n{"event": "out_of_memory_step_down", "step": 1}\n')
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        load_run(tmp_path)


def test_a_torn_last_metrics_line_is_left_out_as_a_resume_leaves_it(tmp_path):
    """A line being written as report reads, or one a full disk cut short, is not damage."""
    step = {"step": 1, "loss": 2.0, "lr": 1e-4, "tokens": 10, "tokens_per_s": 5.0, "rss_gib": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(step) + '\n{"step": 2, "loss": 1.9, "tok')
    assert [m["step"] for m in load_run(tmp_path).steps] == [1]


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match="needs matplotlib") as error:
        write_png([load_run(COMMITTED)], tmp_path / "x.png")
    assert "qlora-kit[plot]" in error.value.hint


def test_report_through_the_cli(tmp_path, monkeypatch, capsys):
    from tests.test_cli import run_cli

    run = tmp_path / "run"
    shutil.copytree(COMMITTED, run)
    code, out, _ = run_cli(monkeypatch, capsys, "report", run, gpu_run(tmp_path), "--png", tmp_path / "r.png")
    assert code in (0, None) and "Plot written" in out and png_size(tmp_path / "r.png") == (1000, 700)
