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
class Ranks:
    """This process's place among the training processes (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def start() -> Ranks:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            if torch.cuda.device_count() <= ranks.local_rank:
                raise UserError(
                    f"Rank {ranks.rank} needs GPU {ranks.local_rank}, but {torch.cuda.device_count()} are visible.",
                    hint="Start at most one process per GPU (--gpus N with N no more than the GPUs).",
                )
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return ranks


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


def wrap(
    module: torch.nn.Module,
    ranks: Ranks,
    device: torch.device,
    strategy: str = "ddp",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """The loss module made data parallel when distributed: DistributedDataParallel (ddp), or FSDP2's fully_shard on
    every decoder layer and then on the whole (fsdp, fsdp_offload), which shards the 4-bit weights and LoRA state
    across ranks."""
    if not ranks.active:
        return module
    if strategy in ("fsdp", "fsdp_offload"):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from qlora_kit.model import lm_parts

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


def total(value: float, ranks: Ranks) -> float:
    """The sum of value over all ranks (value itself when not distributed)."""
    if not ranks.active:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.item()


def largest(value: int, ranks: Ranks) -> int:
    """The largest value over all ranks: a stop signal seen by one rank stops them all at the same step."""
    if not ranks.active:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather(value, ranks: Ranks) -> list:
    """Every rank's value, in rank order."""
    if not ranks.active:
        return [value]
    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def from_main(value, ranks: Ranks):
    """Rank 0's value, on every rank."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work, ranks: Ranks):
    """work() run on rank 0 only (it may write files), its result or UserError shared with every rank."""
    if not ranks.active:
        return work()
    outcome = None
    if ranks.main:
        try:
            outcome = ("done", work())
        except UserError as e:
            outcome = ("error", e)
    kind, value = from_main(outcome, ranks)
    if kind == "error":
        raise value
    return value


def finish(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
