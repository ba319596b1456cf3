import io
import json
from pathlib import Path

from rich.console import Console

from qlora_kit.train.dashboard import Dashboard, MetricsLog, RunInfo, memory_bar, sparkline, summary_table
from qlora_kit.train.run import RunSummary

GPU = RunInfo("run-a", "gemma-2b", "cuda", total_steps=40, capacity_gib=8.0, planned_gib=6.0)


def scripted(step: int, total_gib: float = 5.0) -> dict:
    """A metrics line as train_loop writes it on a GPU, with nvml readings."""
    return {
        "step": step,
        "epoch": 0,
        "loss": 3.0 / step,
        "lr": 2e-4,
        "grad_norm": 0.5,
        "tokens": 4096,
        "step_s": 1.5,
        "tokens_per_s": 2730.0,
        "micro_batch": 2,
        "grad_accum": 8,
        "seq_len": 2048,
        "mem_alloc_gib": total_gib - 1,
        "mem_reserved_gib": total_gib - 0.5,
        "mem_peak_gib": total_gib - 0.8,
        "nvml_used_gib": total_gib,
        "gpu_util_pct": 97,
        "gpu_temp_c": 71,
        "rss_gib": 3.2,
        "ram_available_gib": 12.0,
        "swap_used_gib": 0.0,
    }


def screen(dashboard: Dashboard) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(dashboard.render())
    return console.export_text()


def test_live_view_shows_progress_loss_speed_memory_and_events():
    dashboard = Dashboard(Console(file=io.StringIO()), GPU, mode="quiet")  # render() without a live thread
    for step in range(1, 11):
        dashboard.step(scripted(step))
    dashboard.checkpoint(10)
    dashboard.note("Out of memory at step 7: micro-batch 4 -> 2; redoing the step.")
    text = screen(dashboard)
    for expected in (
        "step 10/40",
        "25%",
        "eta",
        "mean of last 4 0.3592",
        "best 0.3000",
        "2.00e-04",
        "2,730 tokens/s",
        "1.50 s/step",
        "allocated 4.00",
        "reserved 4.50",
        "peak 4.20",
        "nvidia-smi 5.00",
        "of 8.0 GiB, plan ^ 6.0",
        "utilisation 97%",
        "temperature 71 C",
        "RAM available 12.00",
        "checkpoint",
        "step 10",
        "micro-batch 4 -> 2",
    ):
        assert expected in text, expected
    assert any(char in text for char in "▁▂▃▄▅▆▇█"), "the loss sparkline"
    assert len(text.splitlines()) <= 20, "one screen"


def test_memory_bar_turns_red_within_five_percent_of_the_card_and_marks_the_plan():
    def styles(bar):
        return {span.style for span in bar.spans}

    assert "red" in styles(memory_bar(7.7, 6.0, 8.0)) and "green" in styles(memory_bar(3.0, 6.0, 8.0))
    assert memory_bar(2.0, 6.0, 8.0, width=8).plain == "██····^·"


def test_sparkline_spans_lowest_to_highest():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█" and sparkline([]) == ""


def test_plain_mode_prints_a_line_every_few_steps_and_events():
    out = io.StringIO()
    dashboard = Dashboard(Console(file=out, width=200), GPU)  # not a terminal: plain lines
    assert dashboard.mode == "plain"
    for step in range(1, 41):
        dashboard.step(scripted(step))
    dashboard.note("Out of memory at step 7: micro-batch 4 -> 2; redoing the step.")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/40  loss 3.0000") and "mem 4.00/4.50 GiB" in lines[0]
    assert [line.split()[1] for line in lines[:-1]] == ["1/40"] + [f"{s}/40" for s in range(2, 41, 2)]
    assert lines[-1].startswith("Out of memory at step 7")


def test_quiet_mode_prints_nothing():
    out = io.StringIO()
    dashboard = Dashboard(Console(file=out), GPU, mode="quiet")
    for step in range(1, 41):
        dashboard.step(scripted(step))
    assert out.getvalue() == ""


def test_summary_table_compares_peak_memory_with_the_plan():
    summary = RunSummary(
        40,
        3.0,
        0.075,
        60.0,
        163840,
        100,
        1000,
        Path("runs/a/adapter"),
        2**20,
        best_loss=0.07,
        peak_memory_gib=4.5,
        padding_pct=12.0,
        step_downs=["micro-batch 4 -> 2"],
        info=GPU,
    )
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(summary_table(summary, GPU))
    text = console.export_text()
    for expected in (
        "run-a: done",
        "40 of 40",
        "163,840",
        "12% padding",
        "best 0.0700",
        "4.50 GiB; planned 6.00 GiB of 8.0",
        "micro-batch 4 -> 2",
        "1.0 MiB, plain PEFT",
    ):
        assert expected in text, expected


def test_metrics_log_writes_one_object_per_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(scripted(1))
    log.write({"event": "out_of_memory_step_down", "step": 2})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["tokens_per_s"] == 2730.0 and lines[1]["event"] == "out_of_memory_step_down"


def test_a_distributed_run_shows_every_ranks_memory():
    dashboard = Dashboard(Console(file=io.StringIO()), GPU, mode="quiet")
    dashboard.step(
        {
            **scripted(1),
            "ranks": 2,
            "rank_memory": [
                {"mem_reserved_gib": 4.5, "nvml_used_gib": 5.0, "rss_gib": 3.0},
                {"mem_reserved_gib": 4.25, "nvml_used_gib": 4.8, "rss_gib": 3.1},
            ],
        }
    )
    assert "0: 4.50 GiB   1: 4.25 GiB  (reserved)" in screen(dashboard) and "every rank" in screen(dashboard)


def test_the_averaged_loss_keeps_up_with_a_short_run():
    dashboard = Dashboard(
        Console(file=io.StringIO()), RunInfo("demo", "smollm2-135m", "cpu", 32, 22.0, 1.4), mode="quiet"
    )
    for step in range(1, 33):  # the loss falls from 3 to 0.01 within the run, as in the demo
        dashboard.step({**scripted(step), "loss": max(0.01, 3.0 - 0.2 * step)})
    text = screen(dashboard)
    assert "mean of last 3 0.0100" in text, "the last tenth of the run, not a slow average that trails it"


def test_the_live_view_stops_the_terminal_echoing_ctrl_c_and_gives_it_back(monkeypatch):
    import os
    import pty
    import sys
    import termios

    from qlora_kit.train.dashboard import hide_control_echo

    leader, follower = pty.openpty()
    with os.fdopen(follower, "r") as terminal:
        monkeypatch.setattr(sys, "stdin", terminal)
        before = termios.tcgetattr(terminal)[3]
        restore = hide_control_echo()
        assert not termios.tcgetattr(terminal)[3] & termios.ECHOCTL, "an echoed ^C would wrap the panel's last line"
        restore()
        assert termios.tcgetattr(terminal)[3] == before
    os.close(leader)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    hide_control_echo()()  # not a terminal: nothing to change
