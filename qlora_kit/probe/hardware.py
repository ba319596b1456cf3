"""probe(): what this machine has for training: GPUs (through nvml where present, else torch), RAM, disk, versions."""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import psutil

from qlora_kit.units import GIB

CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context + cuBLAS workspace: seen by nvidia-smi, not by torch


def check_ram_available(needed: float, doing: str, hint: str, what: str = "") -> None:
    """Refuse work on the CPU that needs more RAM than is available now, in one sentence: "{doing} needs about N GiB
    of RAM{what}, and M GiB is available."."""
    from qlora_kit.errors import UserError

    available = psutil.virtual_memory().available
    if needed > available:
        raise UserError(
            f"{doing} needs about {needed / GIB:.1f} GiB of RAM{what}, and {available / GIB:.1f} GiB is available.",
            hint=hint,
        )


@dataclass
class Gpu:
    index: int
    name: str
    compute_capability: str
    vram_total_gib: float
    vram_free_gib: float  # what nvidia-smi reports as free (nvml), else torch.cuda.mem_get_info
    bf16: bool
    source: str  # "nvml" or "torch"


@dataclass
class Hardware:
    gpus: list[Gpu]
    ram_total_gib: float
    ram_available_gib: float
    swap_total_gib: float
    swap_used_gib: float
    cpu_cores: int
    disk_free_gib: float
    disk_path: str
    driver_version: str | None
    cuda_version: str | None
    versions: dict[str, str | None]
    bnb_4bit: str  # "works", or why not
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self):
        return render(self)


def probe(runs_dir: str | Path = "runs", check_bnb: bool = True) -> Hardware:
    """Read the machine; never fails for lack of a GPU (the GPU list is then empty)."""
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    disk_path = _existing_parent(Path(runs_dir))
    versions = {name: _version(name) for name in ("torch", "bitsandbytes", "transformers", "peft", "datasets")}
    gpus, driver, cuda, notes = _gpus()
    return Hardware(
        gpus=gpus,
        ram_total_gib=memory.total / GIB,
        ram_available_gib=memory.available / GIB,
        swap_total_gib=swap.total / GIB,
        swap_used_gib=swap.used / GIB,
        cpu_cores=os.cpu_count() or 1,
        disk_free_gib=shutil.disk_usage(disk_path).free / GIB,
        disk_path=str(disk_path),
        driver_version=driver,
        cuda_version=cuda,
        versions=versions,
        bnb_4bit=_check_bnb_4bit() if check_bnb else "not checked",
        notes=notes,
    )


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> tuple[list[Gpu], str | None, str | None, list[str]]:
    import torch

    if not torch.cuda.is_available():
        return [], None, None, []
    nvml = _nvml_readings()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = f"{props.major}.{props.minor}"
        if index in nvml:
            total, free = nvml[index]
            source = "nvml"
        else:
            free, total = torch.cuda.mem_get_info(index)
            source = "torch"
        gpus.append(Gpu(index, props.name, capability, total / GIB, free / GIB, props.major >= 8, source))
    driver = _nvml_driver()
    notes = [] if nvml else ["nvml is not available (pip install nvidia-ml-py): free memory comes from torch."]
    return gpus, driver, torch.version.cuda, notes


@functools.cache
def _nvml():
    """The initialised pynvml module, once per process; None where nvml is missing or unusable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no nvml (or no driver): torch's numbers are the fallback
        return None


def _nvml_readings() -> dict[int, tuple[int, int]]:
    nvml = _nvml()
    if nvml is None:
        return {}
    readings = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        readings[index] = (info.total, info.free)
    return readings


def _nvml_driver() -> str | None:
    nvml = _nvml()
    if nvml is None:
        return None
    driver = nvml.nvmlSystemGetDriverVersion()
    return driver.decode() if isinstance(driver, bytes) else driver


def usage_now(device) -> dict:
    """Memory and GPU readings for one metrics line: torch's allocator, nvml (what nvidia-smi shows), the host."""
    import torch

    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    host = {
        "rss_gib": psutil.Process().memory_info().rss / GIB,
        "ram_available_gib": memory.available / GIB,
        "swap_used_gib": swap.used / GIB,
    }
    if device.type != "cuda":
        return {
            "mem_alloc_gib": None,
            "mem_reserved_gib": None,
            "mem_peak_gib": None,
            "nvml_used_gib": None,
            "gpu_util_pct": None,
            "gpu_temp_c": None,
            "cpu_threads": torch.get_num_threads(),
            **host,
        }
    return {
        "mem_alloc_gib": torch.cuda.memory_allocated(device) / GIB,
        "mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
        **gpu_readings(device.index or 0),
        **host,
    }


def _usable_cpus() -> list[int]:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_seconds() -> tuple[float, float, float]:
    """(clock, CPU seconds every program has used on the cores this process may run on, CPU seconds of this process)."""
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for times in (per_cpu[i] for i in _usable_cpus() if i < len(per_cpu)):
        # guest time is already counted in user time; steal is time the hypervisor gave to other machines
        counted = sum(getattr(times, name) for name in times._fields if name not in ("guest", "guest_nice"))
        busy += counted - times.idle - getattr(times, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return time.monotonic(), busy, own.user + own.system


@dataclass
class CpuShare:
    """How many threads torch should use on the CPU: as many as the cores other programs leave free.

    With more threads than free cores, each parallel op waits for a thread the system has descheduled while the
    others spin (OpenMP's default wait): on 2 cores beside 1 and 3 busy programs, a training step took 3.3x and 6.2x
    its free-machine time with 2 threads, 1.4x and 2.6x with this (benchmarks/cpu_contention.py, docs/performance.md).
    OMP_NUM_THREADS, when set, is the user's choice and stays as it is."""

    last: tuple[float, float, float] = field(default_factory=_cpu_seconds)
    most: int = 0  # torch's own thread count (its choice for this machine), read at the first call
    MIN_SECONDS = 1.0  # a shorter window says too little about what other programs do

    def use_free_cores(self, device=None) -> int:
        """Before work on the CPU (device None or a CPU device): set torch's threads, for the calling thread's next
        ops, from how busy other programs kept the cores since the last call. Returns the thread count in use."""
        import torch

        self.most = self.most or torch.get_num_threads()
        now = _cpu_seconds()
        on_cpu = device is None or device.type == "cpu"
        if not on_cpu or "OMP_NUM_THREADS" in os.environ or now[0] - self.last[0] < self.MIN_SECONDS:
            return torch.get_num_threads()
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / (now[0] - self.last[0])
        self.last = now
        threads = max(1, min(self.most, int(len(_usable_cpus()) - others + 0.5)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


CPU_SHARE = CpuShare()  # measuring from import, so the first step already knows how busy loading found the machine


def gpu_readings(index: int = 0) -> dict:
    """nvml's view of one GPU: used memory (what nvidia-smi shows, GiB), utilisation and temperature; None without nvml."""
    nvml = _nvml()
    if nvml is None:
        return {"nvml_used_gib": None, "gpu_util_pct": None, "gpu_temp_c": None}
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return {
        "nvml_used_gib": nvml.nvmlDeviceGetMemoryInfo(handle).used / GIB,
        "gpu_util_pct": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "gpu_temp_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    }


def cap_gpu_memory(capacity_bytes: int, device) -> int | None:
    """Hold torch's allocator on `device` to a plan's smaller target (--vram-limit, or auto's choice for another
    card), less the CUDA context it does not count, so the run stays where it was planned and steps down past it;
    returns the cap in bytes, or None when the target is the whole GPU."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    if capacity_bytes >= 0.97 * total:  # the probed card itself: its whole memory, as without a cap
        return None
    cap = max(capacity_bytes - CUDA_CONTEXT_BYTES, GIB // 4)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    return cap


def _check_bnb_4bit() -> str:
    """Quantize a small weight to NF4 and run a matmul through it: the path training depends on."""
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(
            64, 64, bias=False, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32
        ).to(device)
        out = layer(torch.randn(2, 64, device=device))
        return "works" if out.shape == (2, 64) and torch.isfinite(out).all() else "gives non-finite output"
    except Exception as e:  # any failure here is what the user needs to see, not a crash
        return f"fails: {type(e).__name__}: {e}"


def render(hardware: Hardware):
    """The probe as rich tables: GPUs, then host and software."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    if hardware.gpus:
        gpus = Table(title="GPUs")
        for column in ("#", "name", "compute", "VRAM total", "VRAM free", "bf16", "source"):
            gpus.add_column(column)
        for g in hardware.gpus:
            gpus.add_row(
                str(g.index),
                g.name,
                g.compute_capability,
                f"{g.vram_total_gib:.1f} GiB",
                f"{g.vram_free_gib:.1f} GiB",
                "yes" if g.bf16 else "no (fp16)",
                g.source,
            )
        parts.append(gpus)
    else:
        parts.append(Text("No GPU: training will run on the CPU, which works but is slow.", style="bold yellow"))
    host = Table(title="Host and software", show_header=False)
    host.add_column("what")
    host.add_column("value")
    host.add_row("RAM", f"{hardware.ram_available_gib:.1f} GiB available of {hardware.ram_total_gib:.1f} GiB")
    host.add_row("swap", f"{hardware.swap_used_gib:.1f} GiB used of {hardware.swap_total_gib:.1f} GiB")
    host.add_row("CPU cores", str(hardware.cpu_cores))
    host.add_row("free disk", f"{hardware.disk_free_gib:.1f} GiB at {hardware.disk_path}")
    if hardware.driver_version or hardware.cuda_version:
        host.add_row("driver / CUDA", f"{hardware.driver_version or '?'} / {hardware.cuda_version or '?'}")
    for name, version in hardware.versions.items():
        host.add_row(name, version or "[red]not installed[/]")
    colour = "green" if hardware.bnb_4bit == "works" else "red"
    host.add_row("bitsandbytes 4-bit", f"[{colour}]{hardware.bnb_4bit}[/]")
    parts.append(host)
    parts += [Text(note, style="dim") for note in hardware.notes]
    return Group(*parts)
