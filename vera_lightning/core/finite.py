"""Non-finite values and untrustworthy tensors are caught, never saved or loaded silently.

* :func:`nonfinite_names` lists tensors holding NaN/inf; ``save_adapter`` refuses to write them,
  ``load_adapter`` refuses to load them.
* :func:`file_problems` checks what an adapter file claims about itself: a file written by
  vera_lightning (any ``vera_lightning.*`` header key) must carry both checksums; a tensor
  stored in a non-floating dtype (int64, bool) is refused. A file without our keys was written
  by PEFT (or had all our metadata stripped): it has no checksum, so only its structure, dtypes
  and values are checked (see ``docs/reliability.md``).
* :class:`NonFiniteGuard` is what :class:`~vera_lightning.VeraCallback` uses during training: it
  accumulates "was any loss non-finite" on the loss's device (no synchronisation per step) and
  checks it, with the λ's, at the end of each training epoch and before any checkpoint or
  adapter is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.core.messages import shorten

__all__ = ["NonFiniteError", "NonFiniteGuard", "all_finite", "nonfinite_names", "file_problems", "warn_dtype_changes",
           "ON_NONFINITE", "META_FORMAT"]

#: Header key marking a file written by vera_lightning (with the checksums of adapter_format).
META_FORMAT = "vera_lightning.format"
_OURS = "vera_lightning."
#: Accepted values of ``VeraCallback(on_nonfinite=...)``.
ON_NONFINITE = ("raise", "warn")


class NonFiniteError(ValueError):
    """A loss or adapter tensor is NaN/inf; nothing was written."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite.

    A finite sum proves it (a NaN or an infinity cannot be cancelled by finite values), and a sum
    is ~100x cheaper than ``isfinite`` on the CPU; only a non-finite sum (NaN/inf, or an overflow
    of large finite values) needs the element-wise check.
    """
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def nonfinite_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name for name, tensor in tensors
        if tensor is not None and tensor.is_floating_point() and tensor.device.type != "meta"
        and tensor.numel() and not all_finite(tensor)
    ]


def file_problems(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], content_key: str,
                  projection_key: str) -> list[str]:
    """Problems of an adapter file as such: stripped checksums, non-floating dtypes, NaN/inf.

    Args:
        tensors: The file's tensors.
        metadata: The safetensors header metadata.
        content_key, projection_key: The header keys of the two checksums vera_lightning writes.
    """
    problems = []
    ours = any(key.startswith(_OURS) for key in metadata)
    stripped = [key for key in (content_key, projection_key) if ours and key not in metadata]
    if stripped:
        problems.append(
            "the file was written by vera_lightning "
            f"(its header has {sorted(k for k in metadata if k.startswith(_OURS))})"
            f" but lacks {stripped}: its integrity cannot be checked (the metadata was edited); re-save the adapter"
        )
    ints = [f"{key} ({tensor.dtype})" for key, tensor in sorted(tensors.items()) if not tensor.is_floating_point()]
    if ints:
        problems.append(
            f"tensors stored in a non-floating dtype: {shorten(ints)}; adapter tensors are floating point (the file "
            "was converted or is not an adapter); re-save it from the trained model"
        )
    bad = nonfinite_names(sorted(tensors.items()))
    if bad:
        problems.append(f"non-finite values (NaN/inf) in {shorten(bad)}; the adapter is broken (training diverged?)")
    return problems


def warn_dtype_changes(changes: list[tuple[str, torch.dtype, torch.dtype]], source: str) -> None:
    """One warning listing tensors converted from the file's floating dtype to the model's."""
    if changes:
        shown = shorten([f"{key} ({stored} -> {target})" for key, stored, target in changes])
        warnings.warn(
            f"load_adapter({source!r}): {len(changes)} tensor(s) are stored in another floating dtype than the "
            f"model's and were converted: {shown}. Values rounded to a narrower dtype lose precision.",
            UserWarning,
            stacklevel=3,
        )


class NonFiniteGuard:
    """Watch the training loss and the λ's for NaN/inf.

    Args:
        on_nonfinite: ``"raise"`` (stop training with :class:`NonFiniteError`, write nothing) or
            ``"warn"`` (warn and go on; adapter directories are still never written with NaN/inf).

    Example::

        >>> guard = NonFiniteGuard("raise")
        >>> guard.observe_loss(torch.tensor(float("nan")))
        >>> guard.check(torch.nn.Linear(2, 2), "at the end of epoch 0")
        Traceback (most recent call last):
        ...
        vera_lightning.core.finite.NonFiniteError: ...
    """

    def __init__(self, on_nonfinite: str = "raise") -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: must be one of {list(ON_NONFINITE)}")
        self.on_nonfinite = on_nonfinite
        self._bad_loss: Optional[torch.Tensor] = None  # a 0-dim bool on the loss's device

    def observe_loss(self, outputs: Any) -> None:
        """Record whether a ``training_step`` output (a loss tensor or a dict with ``"loss"``) is finite."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else (self._bad_loss | bad.to(self._bad_loss.device))

    def problems(self, module: nn.Module) -> list[str]:
        """What is non-finite now: the loss since the last check, and the trainable tensors."""
        problems = []
        if self._bad_loss is not None and bool(self._bad_loss):
            problems.append("the training loss was NaN/inf in at least one step")
        bad = nonfinite_names((n, p) for n, p in module.named_parameters() if p.requires_grad)
        if bad:
            problems.append(f"trainable tensors hold NaN/inf: {shorten(bad)}")
        return problems

    def check(self, module: nn.Module, when: str) -> list[str]:
        """Raise (or warn) if anything is non-finite; resets the loss record.

        Returns:
            The problems found (only with ``on_nonfinite="warn"``; empty when all is finite).

        Raises:
            NonFiniteError: With ``on_nonfinite="raise"``.
        """
        problems = self.problems(module)
        self._bad_loss = None
        if not problems:
            return problems
        message = (
            f"VeraCallback: non-finite values {when}: " + "; ".join(problems) + ". Lower the learning rate "
            "(optim.lr), check the data and d_initial, or use gradient clipping"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message + ". Training stopped; the adapter was not saved.")
        warnings.warn(message + " (on_nonfinite='warn': training goes on)", UserWarning, stacklevel=3)
        return problems
