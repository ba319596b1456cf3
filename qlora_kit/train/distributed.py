"""More than one GPU: data parallel training on torch.distributed, one process per GPU, launched by torchrun.

`qlora-kit train ... --gpus N` re-runs itself under `torchrun --standalone --nproc-per-node N`; a command started
under torchrun directly works the same. Every rank holds the 4-bit base and identical LoRA weights (same seed);
DistributedDataParallel all-reduces the LoRA gradients; each rank takes its share of every step's examples;
only rank 0 writes the run folder. On CPU the gloo backend runs the same code (that is how the tests run it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlora_kit.errors import UserError


@dataclass(frozen=True)
class World:
    """The training processes, as this one sees them (one process, rank 0, when not distributed): every collective
    the run needs is a method here, each doing nothing but return its argument for a single process, so the loop
    reads as single-device code."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def share(self, items: list) -> list:
        """This process's share of what every process drew alike."""
        return items[self.rank :: self.size]

    def total(self, value: float) -> float:
        """The sum of value over all processes."""
        if not self.active:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
        dist.all_reduce(tensor)
        return tensor.item()

    def largest(self, value: int) -> int:
        """The largest value over all processes: a stop signal seen by one stops them all at the same step."""
        if not self.active:
            return value
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, value) -> list:
        """Every process's value, in rank order."""
        if not self.active:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, value):
        """Rank 0's value, on every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work):
        """work() run on rank 0 only (it may write files), its result or UserError shared with every process."""
        if not self.active:
            return work()
        outcome = None
        if self.main:
            try:
                outcome = ("done", work())
            except UserError as e:
                outcome = ("error", e)
        kind, value = self.from_main(outcome)
        if kind == "error":
            raise value
        return value

    def wrap(self, module: torch.nn.Module, device: torch.device, strategy: str, dtype: torch.dtype):
        """The loss module made data parallel (see wrap_for_data_parallel); itself for a single process."""
        return wrap_for_data_parallel(module, device, strategy, dtype) if self.active else module

    def finish(self) -> None:
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def start() -> World:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            if torch.cuda.device_count() <= world.local_rank:
                raise UserError(
                    f"Rank {world.rank} needs GPU {world.local_rank}, but {torch.cuda.device_count()} are visible.",
                    hint="Start at most one process per GPU (--gpus N with N no more than the GPUs).",
                )
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return world


def launch(n_gpus: int, argv: list[str]) -> None:
    """Replace this process with torchrun running the same command (minus --gpus) in n_gpus processes."""
    visible = torch.cuda.device_count()
    if n_gpus > visible:
        raise UserError(
            f"--gpus {n_gpus} asks for more GPUs than the {visible} visible here.",
            hint=f"Use --gpus {visible}" if visible > 1 else "Train on one GPU: drop --gpus.",
        )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n_gpus}",
        "-m",
        "qlora_kit",
        *argv,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def without_gpus_flag(argv: list[str]) -> list[str]:
    """argv with --gpus N (or --gpus=N) removed, for the processes torchrun starts."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            kept.append(arg)
    return kept


def wrap_for_data_parallel(
    module: torch.nn.Module, device: torch.device, strategy: str, dtype: torch.dtype
) -> torch.nn.Module:
    """The loss module made data parallel: DistributedDataParallel (ddp), or FSDP2's fully_shard on every decoder
    layer and then on the whole (fsdp, fsdp_offload), which shards the 4-bit weights and LoRA state across ranks."""
    if strategy in ("fsdp", "fsdp_offload"):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from qlora_kit.model.load import lm_parts

        # One dtype per all-gather: LoRA's fp32 weights are cast to the compute dtype to compute, reduced in fp32.
        policy = (
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            if dtype != torch.float32
            else MixedPrecisionPolicy()
        )
        # fsdp_offload: the shards (and so the optimizer step) live in host RAM; each layer is copied in to compute.
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if strategy == "fsdp_offload" else OffloadPolicy()
        for layer in lm_parts(module.model)[0].layers:
            fully_shard(layer, mp_policy=policy, offload_policy=offload)
        return fully_shard(module, mp_policy=policy, offload_policy=offload)  # the root: embeddings, final norm, head
    from torch.nn.parallel import DistributedDataParallel

    # Every rank loads the same weights and seeds LoRA alike, so rank 0's 4-bit weights need not be broadcast.
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False
    )


def _device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
