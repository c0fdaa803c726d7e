"""`VeraAdapter`: the one object that owns a model's VeRA adapter, and the one way to find it.

An adapted model carries exactly one :class:`VeraAdapter`, attached as ``model.vera_projections``
(the attribute name keeps the state-dict keys of 0.1.0: ``vera_projections.vera_A`` and
``vera_projections.vera_B``). It is created with everything it needs and owns:

* the registry of named adapters (``names`` -> :class:`~vera_lightning.VeraConfig`, private copies,
  read-only), the ``primary`` one (built by ``apply_vera``; its λ's are each layer's own
  ``vera_lambda_b``/``vera_lambda_d``) and the ``active`` one (``config`` is the active adapter's);
  see :mod:`vera_lightning.ops.named`;
* the shared frozen projections ``vera_A`` (``r x max_in``) and ``vera_B`` (``max_out x r``),
  drawn from ``projection_prng_key`` (see :mod:`vera_lightning.core.projection`);
* the cache of their casts to the compute dtype, and the :class:`~vera_lightning.forward.sharing.SiblingCache`
  that lets q/k/v (gate/up) reuse one ``x A_sᵀ``;
* whether a ``disable_adapter``/``adapter_batch`` block is open (``forced_path``, ``batch``,
  :attr:`VeraAdapter.open_block`): an open block is a state, and the operations that would change what it
  serves refuse it with :func:`check_no_open_block` (see ``docs/reliability.md``, *Open adapter blocks*).

Every :class:`~vera_lightning.VeraLinear` holds an unregistered reference to it. An operation finds
"the adapter of this model" and its layers once, with :func:`~vera_lightning.core.lookup.find_adapted`
(or :func:`~vera_lightning.core.lookup.find_adapter` / :func:`~vera_lightning.core.lookup.vera_layers`
for one piece), and passes them down. Nothing else looks adapters up.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.config import VeraConfig
from vera_lightning.core.projection import draw_projections
from vera_lightning.core.refusals import is_meta, materialised
from vera_lightning.forward.protocol import HALF_DTYPES, VeraPath
from vera_lightning.forward.sharing import SiblingCache

__all__ = ["VeraAdapter", "ADAPTER_ATTR", "DEFAULT_ADAPTER", "PRIMARY_LAMBDAS", "check_adapter_name",
           "check_no_open_block"]

#: Attribute of the adapted module that holds its :class:`VeraAdapter` (the state-dict prefix).
ADAPTER_ATTR = "vera_projections"
#: Name of the adapter ``apply_vera`` builds unless told otherwise (PEFT's default name).
DEFAULT_ADAPTER = "default"
#: λ parameter names of the primary adapter (the layer's own); other adapters get ``<name>_<adapter>``.
PRIMARY_LAMBDAS = ("vera_lambda_b", "vera_lambda_d")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: Any, where: str) -> None:
    """Raise unless ``name`` is a valid adapter name (1-64 characters of ``[A-Za-z0-9_-]``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{where}: adapter name {name!r} is not valid; use 1-64 letters, digits, '_' or '-' (it becomes part of "
            "parameter names and of PEFT's folder names), e.g. 'task_a'"
        )


_SERVES = {
    VeraPath.off: "every VeRA layer returns the base model's output",
    VeraPath.mixed: "row i gets adapter names[i], from the λ's the block gathered when it opened",
}


def check_no_open_block(adapter: Optional["VeraAdapter"], operation: str) -> None:
    """Refuse ``operation`` while a ``disable_adapter``/``adapter_batch`` block is open on ``adapter``'s model.

    Merging, unmerging, unloading, loading, deleting, switching or re-adding an adapter inside such a
    block would change what the block serves (or what it promised to restore), so each refuses, before
    any state changes. ``adapter=None`` (a model without VeRA) has no block.

    Args:
        adapter: The model's adapter, or ``None``.
        operation: The operation, as its message starts (e.g. ``"merge_vera"``, ``"load_adapter('dir')"``).

    Raises:
        ValueError: Naming the operation, the open block and the fix (close the block first).
    """
    block = None if adapter is None else adapter.open_block
    if block is None:
        return
    serves = _SERVES.get(adapter.forced_path, "a forced path")
    again = operation.split("(")[0]
    raise ValueError(
        f"{operation} refused, the model was not changed: a `with {block}:` block is open on this model "
        f"({serves}), and {again} would change what it serves. Close the block first (leave the `with` "
        f"statement), then call {again}"
    )


class VeraAdapter(nn.Module):
    """A model's VeRA adapter: its config, the shared projections and their caches.

    Args:
        config: The adapter options (copied: later changes to the caller's object have no effect).
        max_in: Largest ``in_features`` among the adapted layers (width of ``vera_A``).
        max_out: Largest ``out_features`` among the adapted layers (height of ``vera_B``).
        round_to: A half dtype to round the projections through. PEFT moves them to the base
            dtype before upcasting the adapter, so in a float16/bfloat16 model its projections
            hold half-rounded values; passing the model's dtype does the same, bit for bit.
        name: Name of this first (primary) adapter in the registry.

    Example::

        >>> adapter = VeraAdapter(VeraConfig(r=4), max_in=8, max_out=6)
        >>> a, b = adapter.sliced(in_features=5, out_features=3, dtype=torch.float32, device=torch.device("cpu"))
        >>> tuple(a.shape), tuple(b.shape), adapter.config.r
        ((4, 5), (3, 4), 4)
    """

    def __init__(
        self, config: VeraConfig, max_in: int, max_out: int, round_to: Optional[torch.dtype] = None,
        name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(config, VeraConfig):
            raise TypeError(f"VeraAdapter expects a VeraConfig, got {type(config).__name__}")
        self._config = copy.deepcopy(config)
        self.r, self.max_in, self.max_out = config.r, max_in, max_out
        #: The half dtype the draw was rounded through (``None``: float32 values as drawn).
        self.round_dtype: Optional[torch.dtype] = round_to if round_to in HALF_DTYPES else None
        self._configs: dict[str, VeraConfig] = {name: self._config}
        self.primary, self._active = name, name
        #: A path every layer takes while ``disable_adapter``/``adapter_batch`` is open (``None``: chosen per call).
        self.forced_path: Optional[VeraPath] = None
        #: Per-row λ's of the open ``adapter_batch`` (see :mod:`vera_lightning.ops.batching`).
        self.batch: Optional[object] = None
        #: The dtype the projection products run in (``None``: the λ's dtype, PEFT's rule). A half dtype here is
        #: the bf16 training form (:func:`vera_lightning.set_projection_dtype`): ``x·A_sᵀ`` and ``(λ_d ⊙ h)·B_sᵀ``
        #: run in bf16 while the λ's, their gradients and the optimizer state stay float32.
        self.compute_dtype: Optional[torch.dtype] = None
        vera_A, vera_B = self._draw()
        self.register_buffer("vera_A", vera_A, persistent=config.save_projection)
        self.register_buffer("vera_B", vera_B, persistent=config.save_projection)
        self._cast_cache: dict[tuple[torch.dtype, torch.device], tuple] = {}
        self.siblings = SiblingCache()

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        vera_A, vera_B = draw_projections(self.r, self.max_in, self.max_out, self._config.projection_prng_key)
        if self.round_dtype is not None:
            vera_A, vera_B = vera_A.to(self.round_dtype).float(), vera_B.to(self.round_dtype).float()
        return vera_A, vera_B

    @torch.no_grad()
    def redraw_(self) -> None:
        """Draw ``vera_A``/``vera_B`` from ``projection_prng_key`` again, into the buffers (in place)."""
        for buf, fresh in zip((self.vera_A, self.vera_B), self._draw()):
            buf.copy_(fresh)

    @property
    def config(self) -> VeraConfig:
        """The options of the active adapter (a copy owned by the registry; do not modify)."""
        return self._configs[self._active]

    # ------------------------------------------------------------------ registry of named adapters
    @property
    def active(self) -> str:
        """Name of the adapter the layers' forward uses (see :func:`vera_lightning.set_adapter`)."""
        return self._active

    @property
    def names(self) -> list[str]:
        """Names of the adapters the model holds, the primary first, then in the order they were added."""
        return list(self._configs)

    def config_of(self, name: str) -> VeraConfig:
        """The options of adapter ``name``.

        Raises:
            ValueError: If the model holds no adapter of that name (the message lists the names it holds).
        """
        if not isinstance(name, str) or name not in self._configs:
            raise ValueError(f"no VeRA adapter named {name!r}; the model holds {self.names}")
        return self._configs[name]

    def lambda_names(self, name: str) -> tuple[str, str]:
        """Per-layer parameter names of adapter ``name``'s ``(λ_b, λ_d)``.

        The primary adapter's are each layer's own ``vera_lambda_b``/``vera_lambda_d`` (the 0.1.0 and
        PEFT-compatible state-dict layout); any other adapter's are ``vera_lambda_b_<name>`` /
        ``vera_lambda_d_<name>`` on the same layer.
        """
        self.config_of(name)
        if name == self.primary:
            return PRIMARY_LAMBDAS
        return f"{PRIMARY_LAMBDAS[0]}_{name}", f"{PRIMARY_LAMBDAS[1]}_{name}"

    def register(self, name: str, config: VeraConfig) -> None:
        """Add ``name`` to the registry (a copy of ``config``); the layers' λ's are made by the caller."""
        if name in self._configs:
            raise ValueError(f"a VeRA adapter named {name!r} already exists; the model holds {self.names}")
        self._configs[name] = copy.deepcopy(config)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (neither the primary nor the active adapter) from the registry."""
        self.config_of(name)
        if name in (self.primary, self._active):
            raise ValueError(f"cannot unregister the primary or active VeRA adapter {name!r}")
        del self._configs[name]

    def activate(self, name: str) -> None:
        """Record ``name`` as the active adapter (the layers are switched by ``set_adapter``)."""
        self.config_of(name)
        self._active = name

    @property
    def open_block(self) -> Optional[str]:
        """The open ``disable_adapter``/``adapter_batch`` block, as the call that opened it (``None``: none is open)."""
        if self.forced_path is None:
            return None
        if self.forced_path is VeraPath.off:
            return "disable_adapter(model)"
        if self.forced_path is VeraPath.mixed:
            return f"adapter_batch(model, {getattr(self.batch, 'names', '[...]')!r})"
        return f"a block forcing the {self.forced_path.value!r} path"  # pragma: no cover  (no other block exists)

    def extra_repr(self) -> str:
        named = f", adapters={self.names}, active={self._active!r}" if len(self._configs) > 1 else ""
        return (f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, "
                f"prng_key={self._config.projection_prng_key}{named}")

    def full(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(vera_A, vera_B)`` in ``dtype`` on ``device`` (no copy when they already match).

        Casts are cached: a bfloat16 model gets its bfloat16 copy once, not at every forward; the
        cache is dropped when the buffers are moved, replaced or modified in place.
        """
        a, b = self.vera_A, self.vera_B
        if a.dtype == dtype and a.device == device:
            return a, b
        if torch.compiler.is_compiling():  # traced: the cast is part of the graph (versions are not guardable)
            return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        key = (dtype, device)
        stamp = (id(a), a._version, id(b), b._version)
        hit = self._cast_cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            self._cast_cache = {key: hit}  # at most one extra copy is ever kept
        return hit[1], hit[2]

    def sliced(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vera_A[:, :in_features]`` and ``vera_B[:out_features, :]`` as views in ``dtype``."""
        a, b = self.full(dtype, device)
        return a[:, :in_features], b[:out_features, :]

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() drop the cached casts
        self._cast_cache = {}
        self.siblings.clear()
        was_meta = is_meta(self.vera_A)
        out = super()._apply(fn, recurse)
        if materialised([self.vera_A, self.vera_B], was_meta):  # to_empty: meta held no values, draw them
            self.redraw_()
        return out
