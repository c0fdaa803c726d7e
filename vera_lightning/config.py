"""`VeraConfig`: the one source of truth for VeRA options.

The same dataclass is taken by :func:`vera_lightning.apply_vera`, by
:class:`vera_lightning.VeraCallback` and, through Hydra's ConfigStore, by the
``vera`` config group. Field names and defaults follow PEFT's ``VeraConfig`` so
that adapters travel between the two libraries.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

__all__ = ["VeraConfig", "BiasMode", "ALL_LINEAR", "INIT_ONLY_OPTIONS"]

ALL_LINEAR = "all-linear"

#: Options that only set the λ's initial values: a resumed run (whose λ's come from the checkpoint)
#: may differ in them (``VeraConfig.diff(..., ignore=INIT_ONLY_OPTIONS)``).
INIT_ONLY_OPTIONS = ("d_initial", "init_weights")


class BiasMode(str, Enum):
    """Which biases train alongside the λ vectors (compares equal to its string)."""

    none = "none"
    all = "all"
    vera_only = "vera_only"

    def __str__(self) -> str:  # "none", not "BiasMode.none", in messages and JSON
        return self.value


_F32_MAX = 3.4028234663852886e38


def _finite_f32(value: Any) -> bool:
    """Finite and representable in float32 (what the λ's are stored in)."""
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= _F32_MAX
    except OverflowError:  # an int beyond float's range
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


@dataclass
class VeraConfig:
    """Options of a VeRA adapter (Kopiczko et al., ICLR 2024).

    Args:
        r: Rank of the shared random projections (VeRA uses much larger ranks than LoRA).
        target_modules: Module names (matched as a full name or a ``.``-suffix), one regex
            string (full-match on the module name), or ``"all-linear"``. ``None`` uses the
            defaults known for the Hugging Face model type (e.g. ``q_proj``/``v_proj`` for OPT).
        projection_prng_key: Seed of the CPU ``torch.Generator`` that draws ``vera_A``/``vera_B``.
        save_projection: Store the projections with the adapter (recommended) instead of
            regenerating them from ``projection_prng_key`` when loading.
        vera_dropout: Dropout probability on the adapter input, ``0 <= p < 1``.
        d_initial: Initial value of every ``vera_lambda_d`` entry.
        fan_in_fan_out: Layer weights are stored ``(in, out)``; set automatically for
            ``transformers``' ``Conv1D`` (GPT-2).
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"vera_only"`` (biases of adapted layers).
        modules_to_save: Extra modules (e.g. a classification head) trained in full and saved
            with the adapter.
        init_weights: ``True``: λ_b = 0, λ_d = ``d_initial`` (adapter starts as a no-op).
            ``False``: λ_b = 1, λ_d ~ N(0, 1), as PEFT does, for testing.
        layers_to_transform: Only adapt the layers with these indices (needs a list of names
            in ``target_modules``).
        layers_pattern: Name of the ``nn.ModuleList`` holding the layers (``"layers"``, ``"h"``).

    Raises:
        ValueError: Listing every invalid option at once, with the value and the fix.

    Example::

        >>> cfg = VeraConfig(r=256, target_modules=["q_proj", "v_proj"])
        >>> sorted(cfg.target_modules)
        ['q_proj', 'v_proj']
    """

    r: int = 256
    target_modules: Any = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: BiasMode = BiasMode.none
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r={self.r!r}: must be a positive integer (e.g. r=256)")
        if not _is_number(self.vera_dropout) or not 0.0 <= self.vera_dropout < 1.0:
            problems.append(f"vera_dropout={self.vera_dropout!r}: must be a number with 0 <= vera_dropout < 1")
        if not _is_number(self.d_initial) or not _finite_f32(self.d_initial):
            problems.append(
                f"d_initial={self.d_initial!r}: must be a number, finite, with |d_initial| <= {_F32_MAX:.3g} "
                "(the λ's are float32; the paper recommends <= 0.1)"
            )
        if not _is_int(self.projection_prng_key) or not -(2**63) <= self.projection_prng_key < 2**64:
            problems.append(
                f"projection_prng_key={self.projection_prng_key!r}: must be an integer seed in [-2**63, 2**64) "
                "(torch.Generator's range; a negative key k draws the same projections as 2**64 + k), e.g. 0"
            )
        for flag in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag}={getattr(self, flag)!r}: must be True or False")
        try:
            self.bias = BiasMode(self.bias)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in BiasMode)
            problems.append(f"bias={self.bias!r}: must be one of {choices}")

        targets = self.target_modules
        if targets is not None and not isinstance(targets, str) and not _str_list(targets):
            problems.append(
                f"target_modules={targets!r}: must be a list of module names, a regex string or 'all-linear'"
            )
        elif isinstance(targets, str) and targets.lower() != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                problems.append(
                    f"target_modules={targets!r}: not a valid regular expression ({err}); a single string is a regex "
                    "matched against full module names (e.g. '.*(q_proj|v_proj)'); pass a list for plain names"
                )
        elif _str_list(targets):
            if len(targets) == 0:
                problems.append("target_modules=[]: empty; name at least one module, e.g. ['q_proj', 'v_proj']")
            self.target_modules = frozenset(targets)
        if self.modules_to_save is not None:
            if not _str_list(self.modules_to_save):
                problems.append(f"modules_to_save={self.modules_to_save!r}: must be a list of module names")
            else:
                self.modules_to_save = list(self.modules_to_save)

        layers = self.layers_to_transform
        if layers is not None:
            if not (_is_int(layers) or (isinstance(layers, (list, tuple)) and all(_is_int(i) for i in layers))):
                problems.append(f"layers_to_transform={layers!r}: must be an int or a list of ints")
            elif isinstance(layers, tuple):
                self.layers_to_transform = list(layers)
            if isinstance(targets, str):
                problems.append(
                    f"layers_to_transform={layers!r} with target_modules={targets!r}: layer indices only apply "
                    "to a list of module names; encode the layers in the regex instead "
                    r"(e.g. '.*layers\.(0|1)\..*q_proj') or pass target_modules as a list"
                )
        pattern = self.layers_pattern
        if pattern is not None:
            if not (isinstance(pattern, str) or _str_list(pattern)):
                problems.append(f"layers_pattern={pattern!r}: must be a string or a list of strings")
            if layers is None:
                problems.append(
                    f"layers_pattern={pattern!r} requires layers_to_transform: set the layer indices too "
                    "(e.g. layers_to_transform=[0, 1]) or drop layers_pattern"
                )
        if problems:
            raise ValueError("Invalid VeraConfig:\n  - " + "\n  - ".join(problems))
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: vera_A/vera_B will not be stored with the adapter; restoring it then "
                "depends on regenerating them from projection_prng_key with torch's CPU PRNG. Set "
                "save_projection=True to make adapters portable across torch versions and platforms.",
                UserWarning,
                stacklevel=3,
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (sets become sorted lists, the bias mode its string)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, BiasMode):
                value = value.value
            out[f.name] = value
        return out

    def diff(self, other: "VeraConfig", ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """The options on which ``self`` and ``other`` differ: ``{option: (self's value, other's value)}``.

        The one comparison of configs in the library (injection, the callback, slim checkpoints, adapter
        files and named adapters all use it). Values are compared in their JSON form, lists of names or
        layer indices as sets, and an empty list equals ``None`` (``modules_to_save=[]`` means none).

        Args:
            other: The config to compare with.
            ignore: Options left out of the comparison.

        Example::

            >>> VeraConfig(r=8).diff(VeraConfig(r=16))
            {'r': (8, 16)}
        """
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (v, theirs[k]) for k, v in mine.items()
                if k not in ignore and _comparable(theirs[k]) != _comparable(v)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "VeraConfig", warn: bool = False) -> "VeraConfig":
        """Build from a dict, rejecting unknown keys with the list of valid ones.

        Args:
            data: Option name -> value.
            source: How the options are named in the message (``"vera"`` for the app's config node).
            warn: Show the ``save_projection=False`` warning (off for configs read back from files).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            example = f" (e.g. +vera.{unknown[0]}=...)" if source == "vera" else ""
            raise ValueError(f"Unknown {source} option(s) {unknown}{example}; valid options are {names}")
        if warn:
            return cls(**data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the save_projection warning was shown when the config was made
            return cls(**data)


def _comparable(value: Any) -> Any:
    """A config value as :meth:`VeraConfig.diff` compares it: lists are unordered, ``[]`` is ``None``."""
    if isinstance(value, list):
        return frozenset(value) or None
    return value
