import json

from rich.console import Console

from qlora_kit.hardware import probe, render


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
