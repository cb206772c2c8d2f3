"""Several processes (torchrun + DistributedDataParallel): setup and the few collectives we need.

`torchrun --nproc-per-node N -m randbp_cli finetune ...` starts N copies of the command; the CLI
reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE) and calls
`init_distributed` with the device `--device` resolved to.
NCCL on GPUs, gloo on CPUs, chosen automatically. Everything here is a no-op for one process.

Randomness across ranks: model initialisation and data order come from `--seed` alone, so
they are identical to a single-process run. The global RNG, which draws the sketch seeds (and
dropout masks), is seeded per rank (`rank_seed`): ranks never share a sketch S, so their
gradient errors are independent and average out; rank 0's stream is the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, DeviceError, DistributedError
from .devices import resolve_device

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """The global-RNG seed of this rank: `seed` on rank 0, a different stream elsewhere."""
        return seed + 1_000_003 * self.rank

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = Distributed()


def init_distributed(world_size: int, rank: int, local_rank: int, backend: str = "auto",
                     device: torch.device | None = None,
                     local_world_size: int | None = None) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group. Returns the context and the device this rank runs on:
    `device` itself for one process; with several, cuda:LOCAL_RANK when `device` is a CUDA
    device (one process per GPU), else the CPU. `device` comes from `resolve_device` (the
    default: `auto`). Every check that can fail runs on every rank before the group is
    joined, so rank 0 reports it and none hangs."""
    device = device or resolve_device("auto")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {backend!r}: choose auto, nccl or gloo")
    if world_size <= 1:
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("--backend nccl needs GPUs, and this machine has no CUDA device; use --backend gloo")
        return SINGLE, device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("--backend nccl needs GPUs, and this machine has no CUDA device; use --backend gloo "
                              "(or auto) to train on CPUs")
        if device.type == "cpu":
            raise ConfigError("--backend nccl with --device cpu: NCCL only moves GPU tensors; use --backend gloo")
    run_device = torch.device("cpu")
    if device.type == "cuda":
        per_node = max(local_world_size or 0, local_rank + 1)
        if per_node > torch.cuda.device_count():
            error = DeviceError(f"{per_node} processes on this node but {torch.cuda.device_count()} GPU(s): start at "
                                "most one process per GPU (--nproc-per-node)")
            error.rank_local = local_world_size is None  # without the node's size only this rank knows
            raise error
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"could not join the process group ({backend}): {str(err).splitlines()[0]}; "
                               "launch with torchrun") from None
    return Distributed(world_size, rank, local_rank, backend), run_device


def shutdown(context: Distributed) -> None:
    if context.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(context: Distributed, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a few floats over ranks (one collective)."""
    if not context.enabled:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(context: Distributed, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not context.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, context: Distributed) -> list[int]:
    """This rank's evaluation indices: every example exactly once across ranks (no padding)."""
    return list(range(context.rank, n, context.world_size))
