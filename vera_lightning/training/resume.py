"""What a Lightning checkpoint records about the model it was trained on, and the checks of that record on resume.

:func:`resume_record` (in a slim checkpoint's marker, see :mod:`vera_lightning.training.slim`), checked by
:func:`resume_problems`:

* ``base``: a fingerprint per frozen tensor: SHA-256 (16 hex digits) of its dtype, shape and 4096
  evenly spaced values. A base built differently (another seed, other pretrained weights, another
  dtype) is refused; a change confined to values between the samples is not seen. Sharded
  parameters (FSDP) are not fingerprinted: their local shards depend on the world size.
* ``base_bf16``: the same samples rounded to bf16, without the dtype: a base that differs only by its storage
  precision (a run trained in bf16 resumed in float32, or the other way round) is the same base. The λ's are
  float32 in both, so the optimizer state carries over unchanged.
* ``projections``: SHA-256 of ``vera_A``/``vera_B``. Checked when ``save_projection=False`` (the
  ``.ckpt`` does not hold them, so the model's own draw must be the one trained with).

:func:`adapters_record` (in every checkpoint ``VeraCallback`` writes, slim or full, at
``state_dict._metadata[""]["vera_lightning.adapters"]``), checked by :func:`adapter_problems` before anything
loads: the named adapters the model held (``configs``, name -> config), the ``primary`` one (whose λ's are the
layers' own) and the ``active`` one, the adapter the run trained. A model restored from the checkpoint must
hold the same adapters with the same one active: resuming into another active adapter would train it with the
checkpoint's optimizer state of the other. A checkpoint written before this record existed names its added
adapters only through its keys (``<layer>.vera_lambda_b_<name>``): those are checked, the active one cannot be.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.core.adapter import PRIMARY_LAMBDAS, check_adapter_name
from vera_lightning.core.lookup import Adapted
from vera_lightning.io.peft_format import projection_sha256

__all__ = ["ADAPTERS_MARK", "kept_state_keys", "resume_record", "resume_problems", "adapters_record",
           "adapter_problems"]

#: Key of the adapters record in a checkpoint's ``state_dict._metadata[""]``.
ADAPTERS_MARK = "vera_lightning.adapters"
_SAMPLES = 4096


def kept_state_keys(module: nn.Module, found: Optional[Adapted]) -> set[str]:
    """State-dict keys a slim checkpoint keeps.

    Trainable parameters, every persistent buffer, and the λ's of every named adapter (frozen while
    another one trains, but not part of the base model the loader fills in). ``found`` is ``module``'s
    adapter as the caller found it.
    """
    keys = set(module.state_dict(keep_vars=True))
    lambdas = set() if found is None else {
        id(getattr(layer, attr)) for _, layer in found.layers for name in found.adapter.names
        for attr in found.adapter.lambda_names(name)
    }
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad and id(p) not in lambdas}
    return keys - frozen


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta"


def _sharded(module: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()) or any(
        not _plain(p) for p in module.parameters()
    )


def _fingerprint(tensor: torch.Tensor, rounded: bool = False) -> str:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES)
    sample = flat[::step][:_SAMPLES].to("cpu").contiguous()
    if rounded and sample.dtype.is_floating_point:  # precision-neutral: the values as bf16, no dtype
        sample = sample.to(torch.bfloat16)
    hasher = hashlib.sha256((f"{tuple(tensor.shape)}|" if rounded else f"{tensor.dtype}|{tuple(tensor.shape)}|")
                            .encode())
    hasher.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return hasher.hexdigest()[:16]


def _projection_digest(found: Optional[Adapted]) -> Optional[str]:
    if found is None:
        return None
    return projection_sha256(found.adapter.vera_A, found.adapter.vera_B, checkpoint=True)


def resume_record(module: nn.Module, found: Optional[Adapted], kept: set[str]) -> dict[str, Any]:
    """Fingerprints of the frozen base and the projections of ``module`` (for the slim marker).

    ``found`` is ``module``'s adapter as the caller found it; ``kept`` is :func:`kept_state_keys` (what the
    checkpoint holds itself, e.g. frozen named adapters' λ's).
    """
    record: dict[str, Any] = {"projections": _projection_digest(found)}
    if not _sharded(module):
        frozen = [(name, p) for name, p in module.named_parameters(remove_duplicate=False)
                  if not p.requires_grad and name not in kept]
        record["base"] = {name: _fingerprint(p) for name, p in frozen}
        record["base_bf16"] = {name: _fingerprint(p, rounded=True) for name, p in frozen}
    return record


def resume_problems(record: Optional[dict[str, Any]], module: nn.Module, found: Adapted) -> list[str]:
    """Why ``module`` (whose adapter is ``found``) is not the model a checkpoint with ``record`` was trained on
    (empty: it is)."""
    if not record:
        return []  # written before these records existed
    problems = []
    saved_base = record.get("base")
    if saved_base is not None and not _sharded(module):
        current = resume_record(module, found, kept_state_keys(module, found))
        now = current["base"]
        differ = sorted(n for n in set(saved_base) | set(now) if saved_base.get(n) != now.get(n))
        saved_rounded = record.get("base_bf16")
        if differ and saved_rounded is not None and saved_rounded == current["base_bf16"]:
            differ = []  # the same base stored in another precision (bf16 <-> float32)
        if differ:
            problems.append(
                f"the frozen base differs from the one this checkpoint was trained on ({len(differ)} of "
                f"{len(saved_base)} frozen tensors differ, e.g. {differ[:3]}); the checkpoint holds only the adapter, "
                "so build the model exactly as for training (same from_pretrained weights; the same seed for a "
                "randomly initialised model)"
            )
    if (not found.adapter.config.save_projection and record.get("projections")
            and record["projections"] != _projection_digest(found)):
        problems.append(
            "the model's vera_A/vera_B differ from the ones this checkpoint was trained with (save_projection=False: "
            "the .ckpt does not hold them and the model's own draw from projection_prng_key is not the same); resume "
            "where it was trained, or train with save_projection=True"
        )
    return problems


# ---------------------------------------------------------------------- named adapters
def adapters_record(found: Adapted) -> dict[str, Any]:
    """The named adapters of the model ``found`` serves: ``{"primary", "active", "configs": {name: config dict}}``."""
    adapter = found.adapter
    return {"primary": adapter.primary, "active": adapter.active,
            "configs": {name: adapter.config_of(name).to_dict() for name in adapter.names}}


def _named_in_keys(state_dict: dict, prefix: str, found: Adapted) -> set[str]:
    """Names of the added adapters whose λ's ``state_dict`` holds for ``found``'s layers (``vera_lambda_b_<name>``)."""
    names = set()
    for layer_name, _ in found.layers:
        lead = f"{prefix}{layer_name}.{PRIMARY_LAMBDAS[0]}_"
        for key in state_dict:
            if key.startswith(lead):
                try:
                    check_adapter_name(key[len(lead):], "")
                except ValueError:
                    continue
                names.add(key[len(lead):])
    return names


def adapter_problems(
    record: Optional[dict[str, Any]], state_dict: dict, prefix: str, found: Adapted, module_name: str, strict: bool
) -> list[str]:
    """Why the adapters of the model ``found`` serves are not those a checkpoint trained (empty: they are).

    Args:
        record: The checkpoint's :func:`adapters_record` (``None``: written before it existed; the adapters are
            then read from ``state_dict``'s keys, and the active one is not checked).
        state_dict: The state dict being loaded, its keys under ``prefix``.
        found: The model's adapter, as the caller found it.
        module_name: How the model is named in the messages.
        strict: Whether the load is strict (only then is an adapter the checkpoint lacks a problem).
    """
    adapter = found.adapter
    if not record:
        missing = sorted(_named_in_keys(state_dict, prefix, found) - set(adapter.names))
        return [] if not missing else [
            f"it holds the λ's of adapter(s) {missing} that {module_name} does not (the model holds {adapter.names}): "
            f"add each before resuming, with the config it was trained with, add_adapter(model, {missing[0]!r}, "
            "config), and set_adapter(model, <the adapter the checkpoint trained>)"
        ]
    primary, active, saved = record.get("primary"), record.get("active"), list(record.get("configs") or ())
    problems = []
    if primary != adapter.primary:
        problems.append(
            f"its primary adapter (the layers' own vera_lambda_b/_d) is {primary!r}, the model's is "
            f"{adapter.primary!r}: build the model with apply_vera(model, config, adapter_name={primary!r})"
        )
    missing = [n for n in saved if n not in adapter.names and n != primary]
    if missing:
        then = f", then set_adapter(model, {active!r}) (the adapter it trained)" if active in missing else ""
        problems.append(
            f"it holds adapter(s) {missing} that {module_name} does not (the model holds {adapter.names}): add each "
            f"before resuming, with the config it was trained with: add_adapter(model, {missing[0]!r}, config){then}"
        )
    extra = [n for n in adapter.names if n not in saved and n != adapter.primary]
    if extra and strict:
        problems.append(
            f"{module_name} holds adapter(s) {extra} that it does not: delete_adapter(model, {extra[0]!r}) before "
            "resuming, or build the model with the adapters it was trained with"
        )
    if active != adapter.active and active in adapter.names:
        problems.append(
            f"it trained adapter {active!r} but the model's active adapter is {adapter.active!r}: resuming would train "
            f"{adapter.active!r} with the optimizer state of {active!r}. Call set_adapter(model, {active!r}) before "
            "trainer.fit/validate (or load_state_dict), and build the optimizer after it"
        )
    return problems
