"""Keep the shared projections identical across ranks, and out of per-step traffic.

* :func:`broadcast_projections` sends ``vera_A``/``vera_B`` from rank 0 once (after
  injection, after loading an adapter or a checkpoint), on the device the process-group
  backend needs (CPU for gloo, the current CUDA device for NCCL).
* :func:`exclude_projections_from_ddp` lists them in DDP's parameters-and-buffers-to-ignore,
  so ``broadcast_buffers=True`` no longer re-sends ``2·r·max_dim`` floats before every
  forward, while other buffers (BatchNorm statistics) keep DDP's normal behaviour.
* :func:`assert_projections_consistent` compares a checksum across ranks.
* :func:`prepare_ddp` / :func:`sync_projections` apply the two above at the right moments of a
  Lightning run (called by :class:`~vera_lightning.VeraCallback`'s hooks).
* :func:`check_strategy` refuses the Lightning strategies whose parameter handling breaks the shared
  projections (DeepSpeed, unknown parallel strategies) before anything is injected.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vera_lightning.core.adapter import VeraAdapter
from vera_lightning.core.lookup import locate_adapter

__all__ = [
    "check_strategy",
    "prepare_ddp",
    "sync_projections",
    "projection_buffer_names",
    "exclude_projections_from_ddp",
    "broadcast_projections",
    "projection_checksum",
    "assert_projections_consistent",
    "is_distributed",
]


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose parameter handling the callback does not support.

    Supported: single device, the DDP family (``ddp``, ``ddp_spawn``, ``ddp_notebook``),
    ``FSDPStrategy`` and ``ModelParallelStrategy`` (FSDP2; call ``apply_vera`` in
    ``configure_model`` before ``fully_shard``).

    Raises:
        ValueError: Naming the strategy and the supported alternative.
    """
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise ValueError(
            f"VeraCallback does not support Trainer(strategy={name}): DeepSpeed partitions and re-creates "
            "parameters, which breaks the shared VeRA projections and the slim adapter checkpoints. Use "
            "strategy='ddp' (VeRA trains only out+r values per layer, so sharding the optimizer gains little) "
            "or strategy='fsdp' to shard a model too large for one device."
        )
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy)):
        return
    raise ValueError(
        f"VeraCallback does not support Trainer(strategy={name}); use a single device, strategy='ddp' "
        "(DDP, ddp_spawn, ddp_notebook), 'fsdp' or ModelParallelStrategy. VeRA's trainable state is tiny, so "
        "DDP is the recommended way to scale."
    )


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _located(model: nn.Module) -> Optional[tuple[str, VeraAdapter]]:
    located = locate_adapter(model)
    if located is None or located[1] not in set(model.modules()):
        return None  # the adapter lives outside `model`: its owner broadcasts it
    return located


def projection_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the ``vera_A``/``vera_B`` buffers in ``model`` (none without VeRA)."""
    located = _located(model)
    if located is None:
        return []
    prefix = located[0]
    return [f"{prefix}.{b}" if prefix else b for b in ("vera_A", "vera_B")]


def prepare_ddp(strategy: Any, model: nn.Module) -> None:
    """Keep the projections out of DDP's per-forward buffer broadcast (before the DDP wrap).

    Lightning's ``setup`` hook runs before the module is wrapped in DDP, so listing the projections in
    DDP's parameters-and-buffers-to-ignore there means ``broadcast_buffers`` never sends them; other
    buffers (BatchNorm statistics) keep DDP's behaviour. Only λ's and ``modules_to_save`` gradients are
    all-reduced (frozen tensors have no gradient). A no-op for strategies other than DDP.
    """
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(strategy, DDPStrategy):
        exclude_projections_from_ddp(model)


def sync_projections(strategy: Any, model: nn.Module) -> None:
    """Broadcast rank 0's projections to every rank (once per Trainer entry point).

    Runs after injection, ``configure_model``, the checkpoint restore and the DDP wrap, so every rank
    trains against rank 0's projections even if their seeds, RNG states or hardware differ. If the
    adapter was injected in ``configure_model`` (after ``setup``), the already-built DDP wrapper is told
    to skip the projections too.
    """
    wrapper = strategy.model
    if isinstance(wrapper, DistributedDataParallel):
        ignored = getattr(wrapper, "parameters_to_ignore", None)
        names = projection_buffer_names(model)
        if ignored is not None and not set(names) <= ignored:
            ignored.update(names)
    broadcast_projections(model)


def exclude_projections_from_ddp(model: nn.Module) -> list[str]:
    """Mark the projections as ignored by a DDP wrapper built on ``model`` later.

    Must run before ``DistributedDataParallel(model)``. Names already in the ignore list
    (set by the user) are kept. Returns the full ignore list.
    """
    names = projection_buffer_names(model)
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = existing + [n for n in names if n not in existing]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, merged)
    return merged


def _backend_device(tensor: torch.Tensor, group=None) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and tensor.device.type == "cuda":
        return torch.device("cpu")
    return tensor.device


@torch.no_grad()
def broadcast_projections(model: nn.Module, src: int = 0, group=None) -> int:
    """Copy rank ``src``'s ``vera_A``/``vera_B`` into every rank, in place.

    A no-op outside a multi-rank process group. Returns the number of bytes sent per buffer set.
    """
    if not is_distributed():
        return 0
    sent = 0
    located = _located(model)
    for projections in [located[1]] if located is not None else []:
        for name in ("vera_A", "vera_B"):
            buf = getattr(projections, name)
            device = _backend_device(buf, group)
            wire = buf.to(device) if device != buf.device else buf
            dist.broadcast(wire, src=src, group=group)
            if wire is not buf:
                buf.copy_(wire)
            sent += buf.numel() * buf.element_size()
    return sent


def projection_checksum(model: nn.Module) -> float:
    """A float64 checksum of every projection buffer (weighted so permutations differ)."""
    total = 0.0
    located = _located(model)
    for projections in [located[1]] if located is not None else []:
        for buf in (projections.vera_A, projections.vera_B):
            flat = buf.detach().double().flatten().cpu()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
            total += float((flat * weights).sum())
    return total


def assert_projections_consistent(model: nn.Module, group=None) -> None:
    """Raise if any rank's projections differ from rank 0's (a no-op on one process).

    Raises:
        RuntimeError: Naming the ranks whose projections differ.
    """
    if not is_distributed():
        return
    mine = torch.tensor([projection_checksum(model)], dtype=torch.float64)
    probe = torch.empty(0)
    mine = mine.to(_backend_device(probe, group))
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    values = [float(t) for t in gathered]
    bad = [rank for rank, v in enumerate(values) if v != values[0]]
    if bad:
        raise RuntimeError(
            f"VeRA projections differ between rank 0 and rank(s) {bad}; call "
            "vera_lightning.training.distributed.broadcast_projections(model) after injecting or loading"
        )
