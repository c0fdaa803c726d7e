"""What a slim ``.ckpt`` records about the model it was trained on, checked when it is resumed.

A slim checkpoint leaves the frozen base out, so resuming trusts the model to be built the same
way. :func:`resume_record` (stored in the slim marker) makes that checkable, as adapter
directories are:

* ``base``: a fingerprint per frozen tensor: SHA-256 (16 hex digits) of its dtype, shape and 4096
  evenly spaced values. A base built differently (another seed, other pretrained weights, another
  dtype) is refused; a change confined to values between the samples is not seen. Sharded
  parameters (FSDP) are not fingerprinted: their local shards depend on the world size.
* ``projections``: SHA-256 of ``vera_A``/``vera_B``. Checked when ``save_projection=False`` (the
  ``.ckpt`` does not hold them, so the model's own draw must be the one trained with).

:func:`resume_problems` compares a record with the model (checkpoints written before the record
existed are not checked). Configs are compared with ``VeraConfig.diff``, ignoring
:data:`~vera_lightning.config.INIT_ONLY_OPTIONS` (``d_initial``, ``init_weights`` only set the λ's
initial values, which a resumed run takes from the checkpoint). :func:`guard_checkpoint_loading` makes a truncated or
non-regular ``ckpt_path`` fail with a message naming it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["resume_record", "resume_problems", "check_checkpoint_file",
           "guard_checkpoint_loading"]

_SAMPLES = 4096


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta"


def _sharded(module: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()) or any(
        not _plain(p) for p in module.parameters()
    )


def _fingerprint(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].to("cpu").contiguous()
    hasher = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    hasher.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return hasher.hexdigest()[:16]


def _projection_digest(module: nn.Module) -> Optional[str]:
    from vera_lightning.adapter import find_adapter

    adapter = find_adapter(module)
    if adapter is None:
        return None
    hasher = hashlib.sha256()
    for buf in (adapter.vera_A, adapter.vera_B):
        data = buf.detach().to("cpu", torch.float32).contiguous()
        hasher.update(f"{tuple(data.shape)}|".encode() + data.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def resume_record(module: nn.Module) -> dict[str, Any]:
    """Fingerprints of the frozen base and the projections of ``module`` (for the slim marker)."""
    from vera_lightning.slim import kept_state_keys  # (slim imports this module)

    record: dict[str, Any] = {"projections": _projection_digest(module)}
    if not _sharded(module):
        kept = kept_state_keys(module)  # what the checkpoint holds itself (e.g. frozen named adapters' λ's)
        record["base"] = {
            name: _fingerprint(p) for name, p in module.named_parameters(remove_duplicate=False)
            if not p.requires_grad and name not in kept
        }
    return record


def resume_problems(record: Optional[dict[str, Any]], module: nn.Module, save_projection: bool) -> list[str]:
    """Why ``module`` is not the model a checkpoint with ``record`` was trained on (empty: it is)."""
    if not record:
        return []  # written before these records existed
    problems = []
    saved_base = record.get("base")
    if saved_base is not None and not _sharded(module):
        now = resume_record(module)["base"]
        differ = sorted(n for n in set(saved_base) | set(now) if saved_base.get(n) != now.get(n))
        if differ:
            problems.append(
                f"the frozen base differs from the one this checkpoint was trained on ({len(differ)} of "
                f"{len(saved_base)} frozen tensors differ, e.g. {differ[:3]}); the checkpoint holds only the adapter, "
                "so build the model exactly as for training (same from_pretrained weights; the same seed for a "
                "randomly initialised model)"
            )
    if not save_projection and record.get("projections") and record["projections"] != _projection_digest(module):
        problems.append(
            "the model's vera_A/vera_B differ from the ones this checkpoint was trained with (save_projection=False: "
            "the .ckpt does not hold them and the model's own draw from projection_prng_key is not the same); resume "
            "where it was trained, or train with save_projection=True"
        )
    return problems


def check_checkpoint_file(path: Any) -> None:
    """Refuse a local ``ckpt_path`` that cannot be a checkpoint, before Lightning reads it.

    Raises:
        FileNotFoundError: If it does not exist.
        ValueError: If it is not a regular file, is empty, or is a truncated zip archive.
    """
    if not isinstance(path, (str, os.PathLike)) or "://" in str(path) or str(path) in ("last", "best", "hpc",
                                                                                        "registry"):
        return  # remote URLs and Lightning's keywords are resolved by Lightning
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"ckpt_path={path!r} does not exist; pass the path of a saved .ckpt file") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"ckpt_path={path!r} is not a regular file (a directory, FIFO or device); pass a .ckpt file")
    if info.st_size == 0:
        raise ValueError(f"ckpt_path={path!r} is empty (0 bytes): the save was interrupted; use an earlier checkpoint")
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ValueError(
                f"ckpt_path={path!r} is truncated or corrupted ({err}; {info.st_size} bytes): the save was "
                "interrupted or the copy is incomplete; use an earlier checkpoint"
            ) from None


def guard_checkpoint_loading(strategy: Any) -> None:
    """Check ``ckpt_path`` with :func:`check_checkpoint_file` when ``strategy`` loads it (idempotent)."""
    original = strategy.load_checkpoint
    if getattr(original, "_vera_checked", False):
        return

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        check_checkpoint_file(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    load_checkpoint._vera_checked = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint
