"""Several named VeRA adapters on one model: add, switch, delete, disable, load.

Every adapter of a model shares the one :class:`~vera_lightning.core.adapter.VeraAdapter` (attached as
``model.vera_projections``), which owns the registry (name -> config, the primary and the active
name) and the one stored ``vera_A``/``vera_B``. Choices, and why:

* **Where the λ's live.** The *primary* adapter (the one ``apply_vera`` builds, ``"default"`` unless
  named otherwise) keeps each layer's own ``vera_lambda_b``/``vera_lambda_d``, so a single-adapter
  model, its state dict, its slim checkpoints and PEFT interop are exactly those of 0.1.0. Every other
  adapter ``<name>`` gets two parameters of its own on each adapted layer,
  ``vera_lambda_b_<name>`` (``out``) and ``vera_lambda_d_<name>`` (``r``); no dict of adapters is
  threaded through the forward. A layer reads the *active* adapter's pair through ``layer.lambdas()``
  (the same two attribute reads as before, by name), so every autograd path of :mod:`vera_lightning.forward.dispatch`
  serves every adapter, and the primary adapter's forward is PEFT's, bit for bit.
* **What must match.** Adapters share the primary adapter's projections, so an added adapter must
  have the same ``r`` and ``projection_prng_key`` and adapt exactly the same layers (hence the same
  projection sizes); anything else is refused with the differences listed (give such an adapter its
  own model). Biases and ``modules_to_save`` are base-model tensors every adapter would share, so only
  the primary adapter may train them; added adapters must use ``bias="none"`` and no
  ``modules_to_save`` (per-adapter heads are not supported). Per-adapter options that do fit are kept:
  ``vera_dropout`` (the layers' dropout follows the active adapter), ``d_initial``/``init_weights``
  (used when the λ's are made) and ``save_projection`` (used when saving).
* **Training.** :func:`set_adapter` applies ``apply_vera``'s freezing rule for the adapter it
  activates: its λ's train, every other adapter's λ's are frozen (so they stay bit-identical), and the
  primary adapter's biases/``modules_to_save`` train only while it is active. Build the optimizer
  after ``set_adapter``; ``VeraCallback`` then adopts the active adapter (``adapter.config`` is the
  active adapter's config).
* **States.** ``set_adapter`` refuses while layers are merged (their weights hold the previous
  adapter's update: ``unmerge_vera`` first); ``disable_adapter`` refuses merged layers too (the base
  weights are not recoverable bit for bit). The primary adapter cannot be deleted (``unload_vera``
  removes VeRA altogether), nor can the active one.
* **Open blocks are a state.** While a ``disable_adapter``/``adapter_batch`` block is open,
  ``set_adapter``, ``delete_adapter`` and ``add_adapter`` of a name the model holds refuse (before any
  change, naming the block: close it first), as ``merge_vera``/``unmerge_vera``/``unload_vera`` and
  ``load_adapter`` do (:func:`~vera_lightning.core.adapter.check_no_open_block`); ``add_adapter`` of a
  *new* name is allowed (the block never serves it). See ``docs/reliability.md``, *Open adapter blocks*.
* **The whole model.** The active name and every adapter's λ's belong to the whole model, so
  ``add_adapter``/``set_adapter``/``delete_adapter`` take the module that holds the adapter (the one
  ``apply_vera`` adapted, or one enclosing it); a part of it (a decoder layer) is refused, since a
  module has no link to its parents and switching only its layers would leave the model half switched.
  (PEFT's ``PeftModel.set_adapter`` also acts on the whole model; its per-layer functions keep a state
  per layer, which ours does not have.)
* **Names** are 1-64 characters from ``[A-Za-z0-9_-]`` (they become parameter names and, in PEFT's
  ``save_pretrained`` layout, folder names).

Each operation looks the model's adapter and layers up once (:func:`require_adapter`) and passes them down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from torch import nn

from vera_lightning.config import BiasMode, VeraConfig
from vera_lightning.core.adapter import ADAPTER_ATTR, VeraAdapter, check_adapter_name, check_no_open_block
from vera_lightning.core.layer import initial_lambdas
from vera_lightning.core.lookup import Adapted, find_adapted
from vera_lightning.core.refusals import check_not_merged
from vera_lightning.forward.protocol import VeraPath
from vera_lightning.ops.inject import mark_trainable, resolve_target_names

__all__ = ["add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "compatibility_problems", "forcing",
           "require_adapter", "require_whole_model"]


def require_adapter(model: nn.Module, where: str) -> Adapted:
    """The model's adapter and layers (one lookup), or a ``ValueError`` saying to call ``apply_vera`` first."""
    found = find_adapted(model)
    if found is None:
        raise ValueError(
            f"{where}: {type(model).__name__} carries no VeRA adapter; call apply_vera(model, config) first"
        )
    return found


def require_whole_model(model: nn.Module, where: str) -> Adapted:
    """:func:`require_adapter` for an operation on the adapters' registry, which refuses a part of an adapted model.

    Raises:
        ValueError: If ``model`` carries no VeRA, or holds VeRA layers but not their adapter (a decoder
            layer of an adapted model): the message names the fix.
    """
    found = require_adapter(model, where)
    if not found.name:
        raise ValueError(
            f"{where} refused, the model was not changed: {type(model).__name__} is a part of an adapted model (it "
            f"holds {len(found.layers)} of its VeRA layers but not its adapter, `{ADAPTER_ATTR}`). The active "
            f"adapter and every adapter's λ's belong to the whole model, so {where} acts on the whole model: call it "
            f"on the module apply_vera adapted (the one holding `{ADAPTER_ATTR}`, or any module around it, e.g. "
            "your LightningModule), not on one of its parts"
        )
    return found


def compatibility_problems(model: nn.Module, found: Adapted, config: VeraConfig) -> list[str]:
    """Why ``config`` cannot be an added (non-primary) adapter of ``model``, whose adapter is ``found``.

    Returns:
        Every problem (empty when it can).
    """
    adapter = found.adapter
    primary = adapter.config_of(adapter.primary)
    problems, diff = [], primary.diff(config)
    for option in ("r", "projection_prng_key"):
        if option in diff:
            mine, theirs = diff[option]
            problems.append(
                f"{option}={theirs!r}: every adapter of a model shares the projections of the primary adapter "
                f"{adapter.primary!r} ({option}={mine!r}); use {option}={mine!r}, or adapt a separate copy of the "
                "base model for this adapter"
            )
    if config.bias != BiasMode.none:
        problems.append(
            f"bias={config.bias.value!r}: biases are base tensors shared by every adapter, only the primary adapter "
            "may train them; use bias='none'"
        )
    if config.modules_to_save:
        problems.append(
            f"modules_to_save={config.modules_to_save!r}: one set of these modules would be shared by every adapter "
            "(per-adapter heads are not supported); only the primary adapter may carry modules_to_save"
        )
    have = [name for name, _ in found.layers]
    try:
        wanted = resolve_target_names(model, config)
    except ValueError as err:
        problems.append(f"target_modules: {err}")
    else:
        missing, extra = sorted(set(have) - set(wanted)), sorted(set(wanted) - set(have))
        if missing or extra:
            problems.append(
                f"target_modules={_show(config.target_modules)} selects other layers than the primary adapter's "
                f"({_show(primary.target_modules)}): missing {missing[:4]}, extra {extra[:4]}; every adapter "
                "of a model adapts exactly the same layers (same projection sizes)"
            )
    return problems


def _show(targets: Any) -> Any:
    return sorted(targets) if isinstance(targets, (set, frozenset)) else targets


def add_adapter(model: nn.Module, name: str, config: VeraConfig) -> nn.Module:
    """Add a VeRA adapter ``name`` to an adapted ``model`` (frozen and inactive, as in PEFT).

    Args:
        model: A model adapted with :func:`vera_lightning.apply_vera`.
        name: The new adapter's name (1-64 characters of ``[A-Za-z0-9_-]``).
        config: Its options: same ``r``, ``projection_prng_key`` and adapted layers as the primary
            adapter, ``bias="none"``, no ``modules_to_save`` (see the module docstring).

    Returns:
        ``model``.

    Raises:
        ValueError: For an invalid or existing name (an existing one inside an open ``disable_adapter``/
            ``adapter_batch`` block: close it first), a config that does not fit (every problem at once),
            or a part of an adapted model (see :func:`require_whole_model`); the model is not changed.

    Example::

        >>> from vera_lightning import VeraConfig, apply_vera, set_adapter
        >>> net = apply_vera(torch.nn.Sequential(torch.nn.Linear(8, 4)), VeraConfig(r=4, target_modules=["0"]))
        >>> net = set_adapter(add_adapter(net, "task_b", VeraConfig(r=4, target_modules=["0"])), "task_b")
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.vera_lambda_b_task_b', '0.vera_lambda_d_task_b']
    """
    check_adapter_name(name, "add_adapter")
    if not isinstance(config, VeraConfig):
        raise TypeError(f"add_adapter expects a VeraConfig, got {type(config).__name__}")
    found = require_whole_model(model, "add_adapter")
    adapter = found.adapter
    if name in adapter.names:
        check_no_open_block(adapter, f"add_adapter({name!r})")  # a new name is never served by the open block
        raise ValueError(f"add_adapter: the model already holds an adapter named {name!r} (it holds {adapter.names}); "
                         "choose another name, or delete_adapter(model, name) first")
    problems = compatibility_problems(model, found, config)
    if problems:
        raise ValueError(f"add_adapter({name!r}) refused, the model was not changed:\n  - " + "\n  - ".join(problems))
    adapter.register(name, config)
    name_b, name_d = adapter.lambda_names(name)
    for _, layer in found.layers:  # fresh λ's as the layer made its own (same dtype and device), frozen
        like = layer.vera_lambda_b
        fresh = initial_lambdas(layer.out_features, layer.r, config.init_weights, config.d_initial, like.dtype,
                                like.device)
        layer.register_parameter(name_b, nn.Parameter(fresh[0], requires_grad=False))
        layer.register_parameter(name_d, nn.Parameter(fresh[1], requires_grad=False))
    return model


def _set_dropout(layer: nn.Module, p: float) -> None:
    current = layer.vera_dropout
    if (p == 0 and isinstance(current, nn.Identity)) or (isinstance(current, nn.Dropout) and current.p == p):
        return
    layer.vera_dropout = (nn.Dropout(p) if p > 0 else nn.Identity()).train(layer.training)


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the adapter every layer's forward uses, and the only one that trains.

    Applies ``apply_vera``'s freezing rule for ``name``: its λ's (and, for the primary adapter, its
    trainable biases and ``modules_to_save``) get ``requires_grad=True``, everything else ``False``.
    Build the optimizer afterwards.

    Returns:
        ``model``.

    Raises:
        ValueError: For an unknown name, while layers are merged with another adapter, inside an open
            ``disable_adapter``/``adapter_batch`` block, or for a part of an adapted model (see
            :func:`require_whole_model`); the model is not changed.
    """
    found = require_whole_model(model, "set_adapter")
    adapter = found.adapter
    check_no_open_block(adapter, "set_adapter")
    config = adapter.config_of(name)
    if name != adapter.active:
        check_not_merged(found.layers, "set_adapter", f"their weights hold adapter {adapter.active!r}'s update")
    names = adapter.lambda_names(name)
    for _, layer in found.layers:
        layer.active_lambda_names = names
        _set_dropout(layer, config.vera_dropout)
    adapter.activate(name)
    adapter.siblings.clear()
    mark_trainable(model, config, found.layers)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` and its λ's from every layer.

    Raises:
        ValueError: For an unknown name, the primary adapter (``unload_vera`` removes VeRA altogether)
            or the active one (``set_adapter`` to another first); inside an open ``disable_adapter``/
            ``adapter_batch`` block; for a part of an adapted model (see :func:`require_whole_model`).
    """
    found = require_whole_model(model, "delete_adapter")
    adapter = found.adapter
    check_no_open_block(adapter, "delete_adapter")
    adapter.config_of(name)
    if name == adapter.primary:
        raise ValueError(
            f"delete_adapter: {name!r} is the primary adapter (its λ's are the layers' own vera_lambda_b/_d) and stays "
            "while the model carries VeRA; vera_lightning.unload_vera(model, merge=False) removes VeRA altogether"
        )
    if name == adapter.active:
        raise ValueError(f"delete_adapter: {name!r} is the active adapter; call set_adapter(model, <another>) first "
                         f"(the model holds {adapter.names})")
    for attr in adapter.lambda_names(name):
        for _, layer in found.layers:
            delattr(layer, attr)
    adapter.unregister(name)
    return model


@contextmanager
def forcing(adapter: VeraAdapter, path: VeraPath, where: str, batch: Optional[object] = None) -> Iterator[None]:
    """Force ``path`` on every layer of ``adapter`` (with ``batch`` as its state) for the ``with`` block."""
    if adapter.open_block is not None:
        raise ValueError(f"{where} cannot be opened while another disable_adapter/adapter_batch block is open "
                         f"(`with {adapter.open_block}:`); close that block first")
    adapter.forced_path, adapter.batch = path, batch
    adapter.siblings.clear()
    try:
        yield
    finally:
        adapter.forced_path, adapter.batch = None, None
        adapter.siblings.clear()


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model): ...`` runs the base model: every VeRA layer returns ``W0 x + b`` exactly.

    Raises:
        ValueError: If layers are merged (their base weights cannot be recovered bit for bit), or
            inside another ``disable_adapter``/``adapter_batch`` block.
    """
    found = require_adapter(model, "disable_adapter")
    check_not_merged(found.layers, "disable_adapter", "the base weights cannot be recovered bit for bit")
    with forcing(found.adapter, VeraPath.off, "disable_adapter"):
        yield model
