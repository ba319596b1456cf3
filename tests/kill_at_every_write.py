"""Kill a training run at each of its write points in turn, then do what a user would, and check the run finishes
exactly as the uninterrupted one did.

A write point is any call that changes the run folder: Python's audit events for opening a file to write, making,
renaming or removing files and folders (not a makedirs of a folder that is there, nor removing what is not), plus
torch.save and each metrics.jsonl line (neither raises an audit event); the same event twice in a row counts once.
The kill is os._exit(137) in the process, before that call runs: no `finally`, no flush, as SIGKILL. Each run is a
fork of this process, so torch, transformers and peft load once. tests/test_reliability.py runs this file:

    python tests/kill_at_every_write.py MODEL DATA WORK_FOLDER [EVERY_NTH [TRAIN FLAGS ...]]

and reads one JSON line per write point from stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
KILLED = 137


def start_child(work) -> int:
    """Start work() in a forked child, without waiting for it; the child's pid. Its exit code is work()'s."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = work()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def in_child(work, log: Path) -> int:
    """Run work() in a forked child with its output in log; its exit code."""

    def logged() -> int:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        return work()

    return os.waitstatus_to_exitcode(os.waitpid(start_child(logged), 0)[1])


def run_cli(*args) -> int:
    from qlora_kit.cli.app import main

    sys.argv = ["qlora-kit", *map(str, args)]
    main()
    return 0


def watch_writes(run_dir: Path, kill_at: int | None, seen: list) -> None:
    """Record each write point under run_dir in `seen`; at number kill_at, die as SIGKILL would."""
    import torch

    from qlora_kit.train import dashboard

    root = str(run_dir)

    def point(what: str) -> None:
        if seen and seen[-1] == what:
            return
        seen.append(what)
        if len(seen) == kill_at:
            os._exit(KILLED)

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        elif event in WRITE_EVENTS:
            path = args[0]
            there = isinstance(path, (str, bytes, os.PathLike)) and os.path.lexists(path)
            writes = there != (event == "os.mkdir")  # making what is there, or removing what is not, changes nothing
        else:
            return
        if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
            point(f"{event} {os.path.relpath(os.fsdecode(path), root)}")

    sys.addaudithook(audit)
    save, write_line = torch.save, dashboard.MetricsLog.write
    torch.save = lambda obj, f, *a, **k: (point(f"torch.save {os.path.relpath(f, root)}"), save(obj, f, *a, **k))[1]
    dashboard.MetricsLog.write = lambda self, record: (
        point(f"metrics line {record.get('step', record.get('event'))}"),
        write_line(self, record),
    )[1]


def killed_run(command: list, run_dir: Path, kill_at: int | None, log: Path, seen_file: Path | None = None) -> int:
    def work() -> int:
        seen: list = []
        watch_writes(run_dir, kill_at, seen)
        try:
            return run_cli(*command)
        finally:
            if seen_file:
                seen_file.write_text(json.dumps(seen))

    return in_child(work, log)


def recover(command: list, run_dir: Path, log: Path) -> tuple[str, int]:
    """What a user does after the kill: --resume, or the first command again when the folder holds no run yet (as the
    refusal's hint says)."""
    code = in_child(lambda: run_cli("train", "--out", run_dir, "--resume", "--quiet"), log)
    if code == 1 and "holds no run to resume" in log.read_text():
        return "again", in_child(lambda: run_cli(*command), log)
    return "resume", code


def same_run(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def losses(run: Path) -> dict:
        return {
            m["step"]: m["loss"]
            for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in m
        }

    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (a, b))
    return losses(a) == losses(b) and x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def main(model: str, data: str, work: Path, every_nth: int = 1, flags: list[str] = ()) -> None:
    # Imported once, before the forks, so that each child starts with them loaded (seconds each otherwise); qlora_kit
    # first, as it quiets a bitsandbytes logger.
    from qlora_kit.train import run as train  # noqa: F401, I001
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    # Every run on one thread, the reference too (results are compared bit for bit, and the thread count can change
    # a sum's rounding): a tiny model gains nothing from more, and the killed runs go side by side, one per core.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # qlora-kit's own thread choice then leaves it so

    def command(out: Path) -> list:
        return [
            "train",
            "--out",
            out,
            "--model",
            model,
            "--data",
            data,
            "--rank",
            "4",
            "--steps",
            "6",
            "--micro-batch",
            "2",
            "--checkpoint-every",
            "2",
            "--quiet",
            *flags,
        ]

    reference = work / "reference"  # watched, not killed: the uninterrupted run, and the list of its write points
    code = killed_run(command(reference), reference, None, work / "reference.log", work / "points.json")
    assert code == 0, (work / "reference.log").read_text()
    points = json.loads((work / "points.json").read_text())

    def kill_and_recover(number: int) -> int:
        run_dir, log = work / f"killed-{number}", work / f"killed-{number}.log"
        killed = killed_run(command(run_dir), run_dir, number, log)
        then, code = recover(command(run_dir), run_dir, log)
        said = log.read_text()
        (work / f"row-{number}.json").write_text(
            json.dumps(
                {
                    "point": number,
                    "of": len(points),
                    "write": points[number - 1],
                    "killed": killed,
                    "then": then,
                    "code": code,
                    "same": code == 0 and same_run(run_dir, reference),
                    "traceback": "Traceback" in said,
                    "said": said[-600:] if code else "",
                }
            )
        )
        return 0

    # The points are independent runs in folders of their own: one per core at a time.
    numbers, running = range(1, len(points) + 1, every_nth), 0
    for number in numbers:
        if running == len(os.sched_getaffinity(0)):
            os.wait()
            running -= 1
        start_child(lambda number=number: kill_and_recover(number))
        running += 1
    for _ in range(running):
        os.wait()
    for number in numbers:
        print((work / f"row-{number}.json").read_text(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1, sys.argv[5:])
