"""Multi-process training with torchrun and DistributedDataParallel.

Launch: ``torchrun --nproc_per_node K -m service.cli train ...`` (one process per GPU; on CPU,
gloo). The model's per-frame network ``model.net`` and its fusion layer ``model.fusion`` are each
wrapped in DDP, so every call the ACCEL wrapper makes (``model(...)``, ``model.frame``,
``model.fuse``) goes through DDP and the gradients of both are averaged across ranks; a method's own
modules (discriminators) are wrapped through ``method.distribute(wrap)``. ``find_unused_parameters``
stays off: every method's loss reaches every parameter of the network and fusion in each step
(the source term uses the fused main and aux heads; I2VDA never calls the fusion with gradients), and
discriminators are frozen while the generator's adversarial term is built, so their gradients come
from one backward only. Several forwards per step are fine under these conditions (checked by
tests/adaptation/test_distributed.py). Logging, evaluation and checkpoints happen on rank 0 with the
unwrapped model (no collective calls), the other ranks wait at a barrier. Each rank reads its own
share of every epoch (``batch_indices``: DistributedSampler order, resumable at any step).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from models.accel import AccelSegmenter

if TYPE_CHECKING:
    from .contract import Method


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/LOCAL_RANK), or run single-process.

    ``device``: "cpu", "cuda" or None (CUDA when available). NCCL on CUDA, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local, dev)


def make_wrapper(env: DistEnv):
    """A function that wraps a module in DDP for this process (identity when not distributed)."""
    def wrap(module: nn.Module) -> nn.Module:
        if not env.enabled:
            return module
        ids = [env.local_rank] if env.device.type == "cuda" else None
        # Buffers (BN running statistics) are synced from rank 0 at every forward (the default).
        return DDP(module, device_ids=ids, find_unused_parameters=False, forward_sync_buffers=True)
    return wrap


def distribute(model: AccelSegmenter, method: Method, env: DistEnv) -> AccelSegmenter:
    """Wrap ``model.net``, ``model.fusion`` and the method's own modules in DDP (in place)."""
    if not env.enabled:
        return model
    wrap = make_wrapper(env)
    model.net = wrap(model.net)
    model.fusion = wrap(model.fusion)
    method.distribute(wrap)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """An ACCEL model whose parts are the plain modules inside any DDP wrappers (shares parameters)."""
    net, fusion = getattr(model, "net", None), getattr(model, "fusion", None)
    if not isinstance(net, DDP) and not isinstance(fusion, DDP):
        return model
    plain = AccelSegmenter.__new__(AccelSegmenter)
    nn.Module.__init__(plain)
    plain.net = net.module if isinstance(net, DDP) else net
    plain.fusion = fusion.module if isinstance(fusion, DDP) else fusion
    plain.num_classes = model.num_classes
    plain.source_stats = model.source_stats
    plain.train(model.training)
    return plain


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def batch_indices(n: int, batch: int, seed: int, env: DistEnv, start_step: int = 0) -> Iterator[list[int]]:
    """Endless per-rank batches of indices (DistributedSampler order, reshuffled each epoch), from ``start_step``."""
    if n == 0:
        raise ValueError("dataset is empty")
    sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    pending: list[int] = []
    epoch, step = 0, 0
    while True:
        while len(pending) < batch:
            sampler.set_epoch(epoch)
            pending += list(sampler)
            epoch += 1
        chunk, pending = pending[:batch], pending[batch:]
        if step >= start_step:
            yield chunk
        step += 1


class BatchIndices:
    """Iterable of ``batch_indices`` for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, n: int, batch: int, seed: int, env: DistEnv, start_step: int = 0) -> None:
        self.n, self.batch, self.seed, self.env, self.start_step = n, batch, seed, env, start_step

    def __iter__(self) -> Iterator[list[int]]:
        return batch_indices(self.n, self.batch, self.seed, self.env, self.start_step)
