"""Device, DDP and sampler choices a bundle config makes with one flag (``distributed``).

``bundles/multi_gpu.json`` sets ``distributed: true``; every stage builds its networks and samplers through these
functions, so one override serves all stages: DDP around each trainable network, a distributed sampler, the
process group's backend chosen by device (nccl on GPU, gloo on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from torch.utils.data import RandomSampler, WeightedRandomSampler

__all__ = [
    "unwrap_model",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "resolve_device",
    "prepare_network",
    "make_sampler",
    "cleanup_distributed",
    "barrier",
    "all_ranks_agree",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, else ``model`` itself."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed."""
    return get_rank() == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(device: str = "auto") -> torch.device:
    """Initialise the process group from torchrun's environment (nccl on GPU, gloo on CPU); return this rank's device."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device(f"cuda:{local}")
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (a no-op when not running distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (``flag`` itself when not running distributed).

    Ranks that decide something from files they each read (e.g. whether a cache is complete) call this so that all
    of them take the same branch, and none waits at a barrier the others never reach.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    on_gpu = dist.get_backend() == "nccl"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(device: str = "auto", distributed: bool = False) -> torch.device:
    """``"auto"`` picks CUDA when available; with ``distributed`` the process group is initialised here."""
    if distributed:
        return init_distributed(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def prepare_network(network: torch.nn.Module, device: torch.device, distributed: bool = False,
                    channels_last: bool = False, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Move a network to its device (optionally channels-last) and wrap it in DDP when running distributed."""
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        network = torch.nn.parallel.DistributedDataParallel(network, device_ids=ids,
                                                            find_unused_parameters=find_unused_parameters)
    return network


def make_sampler(dataset: Sequence, weights: Sequence[float] | None = None, distributed: bool = False,
                 num_samples: int | None = None, seed: int = 0) -> torch.utils.data.Sampler:
    """A shuffling sampler: weighted (per-item ``sample_weight``) or uniform, distributed or not."""
    n = len(dataset)
    if weights is not None:
        if distributed:
            per_rank = (num_samples or n) // get_world_size()
            return DistributedWeightedRandomSampler(dataset, weights=list(weights), num_samples_per_rank=per_rank)
        return WeightedRandomSampler(list(weights), num_samples=num_samples or n,
                                     generator=torch.Generator().manual_seed(seed))
    if distributed:
        return DistributedSampler(dataset, shuffle=True)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
