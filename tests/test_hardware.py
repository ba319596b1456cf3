import json

from rich.console import Console

from qlora_kit.probe.hardware import cap_gpu_memory, probe, render


def test_probe_without_a_gpu_reports_the_rest():
    hardware = probe()
    assert hardware.cpu_cores >= 1 and hardware.ram_total_gib > 0 and hardware.disk_free_gib > 0
    assert hardware.versions["torch"] and hardware.versions["bitsandbytes"]
    assert hardware.bnb_4bit == "works"
    data = json.loads(json.dumps(hardware.to_dict()))
    assert data["gpus"] == [] or data["gpus"][0]["vram_total_gib"] > 0
    console = Console(record=True, width=100, file=open("/dev/null", "w"))
    console.print(render(hardware))
    text = console.export_text()
    assert "RAM" in text and "bitsandbytes 4-bit" in text
    if not hardware.gpus:
        assert "No GPU" in text


def test_threads_follow_the_cores_other_programs_leave_free(monkeypatch):
    import os

    import torch

    from qlora_kit.probe import hardware

    cores = len(os.sched_getaffinity(0))
    readings = iter([(10.0, 10.0 * cores, 0.0), (20.0, 20.0 * cores, 10.0 * cores), (20.5, 0.0, 0.0)])
    monkeypatch.setattr(hardware, "_cpu_seconds", lambda: next(readings))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        share = hardware.CpuShare(last=(0.0, 0.0, 0.0), most=cores)
        assert share.use_free_cores() == 1, "other programs kept every core busy: one thread, nothing to wait for"
        assert torch.get_num_threads() == 1
        assert share.use_free_cores() == cores, "only this process was busy: every core"
        assert share.use_free_cores() == cores, "half a second says too little: the count stays"
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        share.last = (0.0, 0.0, 0.0)
        monkeypatch.setattr(hardware, "_cpu_seconds", lambda: (30.0, 30.0 * cores, 0.0))
        assert share.use_free_cores() == cores, "the user's OMP_NUM_THREADS is left as it is"
    finally:
        torch.set_num_threads(before)


def test_cpu_seconds_count_this_process_among_all_programs():
    import time

    from qlora_kit.probe.hardware import _cpu_seconds

    start = _cpu_seconds()
    until = time.process_time() + 0.3
    while time.process_time() < until:  # busy on one core
        pass
    end = _cpu_seconds()
    own = end[2] - start[2]
    assert own >= 0.25 and end[1] - start[1] >= 0.5 * own, "the system's busy time includes this process's"


def test_a_smaller_target_than_the_gpu_holds_torch_to_it_less_the_cuda_context(monkeypatch):
    import types

    import torch

    from qlora_kit.probe.hardware import CUDA_CONTEXT_BYTES
    from qlora_kit.units import GIB

    fractions = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80 * GIB)
    )
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: fractions.append(fraction)
    )
    assert cap_gpu_memory(6 * GIB, "cuda:0") == 6 * GIB - CUDA_CONTEXT_BYTES
    assert fractions == [(6 * GIB - CUDA_CONTEXT_BYTES) / (80 * GIB)]
    assert cap_gpu_memory(int(79.5 * GIB), "cuda:0") is None and len(fractions) == 1, "the probed card itself: no cap"
