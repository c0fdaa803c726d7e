"""PEFT's VeRA adapter format: file names, key layout, config translation, checksums and checks.

The layout is built structurally, from the model's modules and the config, for a model
with or without VeRA applied, so an adapter can be fully checked before anything is
injected or written (see :func:`vera_lightning.load_adapter`). The helpers take the adapter as
its operation found it (:class:`~vera_lightning.core.lookup.Adapted`); none looks it up again.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.config import BiasMode, VeraConfig
from vera_lightning.core.adapter import PRIMARY_LAMBDAS
from vera_lightning.core.layer import layer_shape
from vera_lightning.core.lookup import Adapted
from vera_lightning.core.messages import shorten
from vera_lightning.core.projection import draw_projections
from vera_lightning.forward.protocol import HALF_DTYPES
from vera_lightning.ops.targets import modules_to_save_of, resolve_target_names

__all__ = ["layout", "config_from_peft_dict", "peft_extra_fields", "compare_configs", "check_tensors",
           "content_sha256", "projection_sha256", "check_projections_match_seed", "META_PROJECTION", "META_CONTENT",
           "PROJECTION_KEY", "PROJECTION_KEYS", "MODEL_PREFIX", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

#: PEFT's file names in an adapter directory.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
META_PROJECTION = "vera_lightning.projection_sha256"
META_CONTENT = "vera_lightning.content_sha256"
#: Prefix of a model tensor's key in PEFT's files (VeRA's and LoRA's alike).
MODEL_PREFIX = "base_model.model."
#: Keys of the shared projections in the file.
PROJECTION_KEY = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
PROJECTION_KEYS = frozenset(PROJECTION_KEY.values())
# PEFT bookkeeping fields of adapter_config.json that are not VeRA options.
_PEFT_META = {"peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision",
              "inference_mode", "peft_version"}
Slot = tuple[tuple[int, ...], Optional[torch.Tensor]]


def layout(
    model: nn.Module, config: VeraConfig, *, found: Optional[Adapted] = None, adapter_name: Optional[str] = None
) -> dict[str, Slot]:
    """PEFT checkpoint key -> (shape, tensor of ``model`` or ``None`` if not injected yet).

    Args:
        model: The model the keys are relative to.
        config: The adapter's options (targets, ``r``, ``bias``, ``modules_to_save``).
        found: ``model``'s adapter as the caller found it (:func:`~vera_lightning.core.lookup.find_adapted`);
            ``None`` for a model without VeRA, whose target layers come from ``config``.
        adapter_name: Whose λ's fill the λ slots (default: the primary adapter's, the layers' own
            ``vera_lambda_b``/``_d``); the keys are the same for every adapter, as in PEFT's files.

    Raises:
        ValueError: If the config's targets match nothing in ``model``.
    """
    injected = found is not None and bool(found.layers)
    if injected:
        layers: dict[str, nn.Module] = dict(found.layers)
    else:
        layers = {name: model.get_submodule(name) for name in resolve_target_names(model, config)}
    slots: dict[str, Slot] = {}
    use_named = found is not None and adapter_name is not None
    lam_names = found.adapter.lambda_names(adapter_name) if use_named else PRIMARY_LAMBDAS
    for name, layer in layers.items():
        lam_b, lam_d = (getattr(layer, lam_names[0]), getattr(layer, lam_names[1])) if injected else (None, None)
        slots[f"{MODEL_PREFIX}{name}.vera_lambda_b"] = ((layer_shape(layer)[1],), lam_b)
        slots[f"{MODEL_PREFIX}{name}.vera_lambda_d"] = ((config.r,), lam_d)
    saved_modules = modules_to_save_of(model, config.modules_to_save)
    in_saved = tuple(name + "." for name, _ in saved_modules)
    if config.bias != BiasMode.none:
        for key, tensor in model.state_dict(keep_vars=True).items():
            owner, _, leaf = key.rpartition(".")
            only_adapted = config.bias == BiasMode.vera_only
            if leaf != "bias" or key.startswith(in_saved) or (only_adapted and owner not in layers):
                continue
            peft_key = f"{MODEL_PREFIX}{owner}.base_layer.bias" if owner in layers else MODEL_PREFIX + key
            slots[peft_key] = (tuple(tensor.shape), tensor)
    for name, module in saved_modules:
        for key, tensor in module.state_dict(keep_vars=True).items():
            slots[f"{MODEL_PREFIX}{name}.{key}"] = (tuple(tensor.shape), tensor)
    adapter = found.adapter if injected else None
    if adapter is not None:
        max_in, max_out = adapter.max_in, adapter.max_out
    else:
        shapes = [layer_shape(m) for m in layers.values()]
        max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    slots[PROJECTION_KEY["vera_A"]] = ((config.r, max_in), adapter.vera_A if adapter is not None else None)
    slots[PROJECTION_KEY["vera_B"]] = ((max_out, config.r), adapter.vera_B if adapter is not None else None)
    return slots


def _ignorable(model: nn.Module, config: VeraConfig) -> set[str]:
    """Duplicates PEFT writes with ``bias="all"`` (the frozen original and the wrapper copy of saved modules)."""
    keys = set()
    for name, module in modules_to_save_of(model, config.modules_to_save):
        for key in module.state_dict(keep_vars=True):
            keys |= {f"{MODEL_PREFIX}{name}.original_module.{key}", f"{MODEL_PREFIX}{name}.modules_to_save.{key}"}
    return keys


# ---------------------------------------------------------------------- config
def peft_extra_fields(base_model_name_or_path: Optional[str], peft_type: str = "VERA") -> dict[str, Any]:
    """The bookkeeping fields PEFT expects next to the options in ``adapter_config.json`` (VeRA's or LoRA's)."""
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "auto_mapping": None}


def config_from_peft_dict(data: Any, source: str) -> VeraConfig:
    """Build a :class:`VeraConfig` from a parsed ``adapter_config.json``.

    Raises:
        ValueError: If it is not a VeRA adapter, or has options this library does not know.
    """
    if not isinstance(data, dict):
        raise ValueError(f"load_adapter: {source} holds {type(data).__name__}, expected a JSON object")
    peft_type = data.get("peft_type")
    if peft_type != "VERA":
        raise ValueError(
            f"load_adapter: {source} has peft_type={peft_type!r}; this library loads VeRA adapters "
            "(peft_type 'VERA') only; load other adapter types with peft.PeftModel.from_pretrained"
        )
    fields = set(VeraConfig.__dataclass_fields__)
    unknown = {k: v for k, v in data.items() if k not in fields and k not in _PEFT_META}
    unsupported = sorted(k for k, v in unknown.items() if v not in (None, False, [], {}, ""))
    if unsupported:
        raise ValueError(
            f"load_adapter: {source} sets option(s) {unsupported} that vera_lightning does not implement "
            f"(values {[unknown[k] for k in unsupported]}); load it with peft.PeftModel.from_pretrained instead"
        )
    try:
        return VeraConfig.from_dict({k: v for k, v in data.items() if k in fields})
    except ValueError as err:
        raise ValueError(f"load_adapter: {source} holds an invalid VeRA config: {err}") from None


def compare_configs(model: nn.Module, existing: VeraConfig, saved: VeraConfig) -> list[str]:
    """Differences that make an adapter unloadable into a model already carrying VeRA."""
    problems = []
    diff = existing.diff(saved)
    for option in ("r", "projection_prng_key", "bias"):
        if option in diff:
            mine, theirs = diff[option]
            problems.append(
                f"{option}: the adapter has {option}={theirs!r} but the model was adapted with "
                f"{mine!r}; load it into the base model without VeRA (it is then injected "
                "from the adapter's config) or re-adapt with the adapter's options"
            )
    if "modules_to_save" in diff:
        problems.append(
            f"modules_to_save: the adapter has {saved.modules_to_save!r}, the model {existing.modules_to_save!r}"
        )
    return problems


# ---------------------------------------------------------------------- checks
def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(hasher: "hashlib._Hash", key: str, tensor: torch.Tensor) -> None:
    hasher.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    hasher.update(_raw(tensor))


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's key, dtype, shape and bytes (sorted by key)."""
    hasher = hashlib.sha256()
    for key in sorted(tensors):
        _digest(hasher, key, tensors[key])
    return hasher.hexdigest()


def projection_sha256(vera_A: torch.Tensor, vera_B: torch.Tensor, checkpoint: bool = False) -> str:
    """SHA-256 of the two projections, in the format of the file that records it.

    The two formats are those of 0.1.0, and the digests already written keep their meaning (a hash cannot
    be derived from the other, so the one function takes the format as a parameter):

    * ``checkpoint=False``, adapter files (header key :data:`META_PROJECTION`, of the seed's float32 draw):
      per tensor ``"vera_A|<dtype>|<shape>|"`` then its bytes, as :func:`content_sha256` hashes a tensor;
    * ``checkpoint=True``, slim ``.ckpt`` markers (``resume.projections``, of the model's buffers, see
      :mod:`vera_lightning.training.slim`): per tensor ``"<shape>|"`` then its bytes as float32.
    """
    hasher = hashlib.sha256()
    for key, tensor in (("vera_A", vera_A), ("vera_B", vera_B)):
        if checkpoint:
            tensor = tensor.detach().to("cpu", torch.float32)
            hasher.update(f"{tuple(tensor.shape)}|".encode())
            hasher.update(_raw(tensor))
        else:
            _digest(hasher, key, tensor)
    return hasher.hexdigest()


def _seed_draw(config: VeraConfig, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return draw_projections(config.r, max_in, max_out, config.projection_prng_key)


def check_projections_match_seed(config: VeraConfig, slots: dict[str, Slot]) -> str:
    """SHA-256 of the projections ``projection_prng_key`` draws on this machine (:func:`projection_sha256`).

    Args:
        config: The adapter's options.
        slots: The model's :func:`layout` for ``config`` (the projection slots are read).

    Raises:
        ValueError: If ``save_projection=False`` but the model's projections are not that draw
            (they would be lost: the adapter could not be restored).
    """
    (shape_a, a), (shape_b, b) = slots[PROJECTION_KEY["vera_A"]], slots[PROJECTION_KEY["vera_B"]]
    fresh = _seed_draw(config, shape_a[1], shape_b[0])
    if not config.save_projection and a is not None:
        candidates = [fresh]
        for half in HALF_DTYPES:  # half-precision models hold rounded projections
            candidates.append((fresh[0].to(half).float(), fresh[1].to(half).float()))
        if not any(torch.equal(a.cpu().float(), x) and torch.equal(b.cpu().float(), y) for x, y in candidates):
            raise ValueError(
                f"save_adapter: save_projection=False but the model's vera_A/vera_B are not the ones "
                f"projection_prng_key={config.projection_prng_key} draws here, so the adapter could not be "
                "restored from the seed; adapt with save_projection=True"
            )
    return projection_sha256(*fresh)


def check_tensors(
    model: nn.Module, config: VeraConfig, tensors: dict, metadata: dict[str, str], found: Optional[Adapted]
) -> list[str]:
    """Every problem that prevents loading ``tensors`` into ``model`` (empty list: all fine).

    ``found`` is ``model``'s adapter as the caller found it (``None`` for a model without VeRA).
    """
    try:
        slots = layout(model, config, found=found)
    except ValueError as err:
        return [f"target layers: {err}"]
    problems = []
    if META_CONTENT in metadata and content_sha256(tensors) != metadata[META_CONTENT]:
        problems.append("content checksum mismatch: the safetensors data was corrupted after saving; re-save it")
    projections = set(PROJECTION_KEYS)
    required = set(slots) - (set() if config.save_projection else projections)
    missing_proj = sorted(projections & required - set(tensors))
    if missing_proj:
        problems.append(
            f"save_projection=True but {missing_proj} are missing from the file; re-save the adapter with its "
            "projections (or set save_projection=false in adapter_config.json to regenerate them from the seed)"
        )
    missing = sorted(required - set(tensors) - projections)
    unexpected = sorted(set(tensors) - set(slots) - _ignorable(model, config))
    if missing:
        problems.append("the model expects tensors the adapter lacks (target names/options differ): "
                        + shorten(missing, 8, as_list=True))
    if unexpected:
        problems.append("the adapter holds tensors with no place in the model (target names differ): "
                        + shorten(unexpected, 8, as_list=True))
    for key in sorted(set(tensors) & set(slots)):
        shape = tuple(tensors[key].shape)
        if shape != slots[key][0]:
            problems.append(f"shape of {key}: adapter {shape}, model {slots[key][0]} (r or layer sizes differ)")
    if not config.save_projection and not projections & set(tensors) and META_PROJECTION in metadata:
        (_, max_in), (max_out, _) = slots[PROJECTION_KEY["vera_A"]][0], slots[PROJECTION_KEY["vera_B"]][0]
        if projection_sha256(*_seed_draw(config, max_in, max_out)) != metadata[META_PROJECTION]:
            problems.append(
                f"the projections regenerated from projection_prng_key={config.projection_prng_key} differ from "
                "the ones the adapter was trained with (checksum recorded at save time); torch's CPU PRNG gives "
                "other numbers here. Load the adapter where it was trained and re-save it with save_projection=True"
            )
    return problems
