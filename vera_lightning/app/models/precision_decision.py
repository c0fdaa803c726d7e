"""The record of a run's precision: :class:`PrecisionDecision`, what
:func:`~vera_lightning.app.models.precision_choice.decide_precision` returns, written into the run's plan and the
adapter's metadata (:meth:`~PrecisionDecision.to_dict`) and read back by every later command
(:meth:`~PrecisionDecision.from_dict`, checked: a record that contradicts itself is refused).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import torch

__all__ = ["COMPUTE_DTYPES", "COMPUTE_DTYPE_CHOICES", "SCHEMES", "PrecisionDecision"]

#: ``model.compute_dtype`` values and the dtype each stores the model in (``auto``: decided, see the module doc).
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: The values ``model.compute_dtype`` accepts.
COMPUTE_DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES)
#: Each scheme and the Lightning Trainer precision it runs under.
SCHEMES = {"fp32": "32-true", "bf16-base": "32-true", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed"}


@dataclass(frozen=True)
class PrecisionDecision:
    """What a run trains in, and why; JSON-recordable (:meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        requested: ``model.compute_dtype`` as asked: ``auto``, ``fp32`` or ``bf16``.
        device: The device type decided for (``cpu``, ``cuda``).
        dtype: The dtype the model is stored in, ``fp32`` or ``bf16`` (``bf16`` only for ``bf16-base``): the value
            to replay as ``build_model(..., compute_dtype=)``.
        scheme: ``fp32``, ``bf16-base``, ``bf16-mixed`` or ``fp16-mixed`` (see
            :mod:`~vera_lightning.app.models.precision_choice`).
        trainer_precision: The Lightning Trainer ``precision`` the scheme needs.
        reason: One line: why (``requested``, ``CUDA compute capability 8.0 (native bf16)``, ``measured ...``).
        shape: ``(tokens, in, out)`` of the timed linear, where timed.
        ms_fp32, ms_bf16: Its milliseconds per forward + backward, where timed.
    """

    requested: str
    device: str
    dtype: str
    scheme: str
    trainer_precision: str
    reason: str
    shape: Optional[tuple[int, int, int]] = None
    ms_fp32: Optional[float] = None
    ms_bf16: Optional[float] = None

    def __post_init__(self) -> None:
        problems = []
        if self.requested not in COMPUTE_DTYPE_CHOICES:
            problems.append(f"requested={self.requested!r} (one of {list(COMPUTE_DTYPE_CHOICES)})")
        if self.dtype not in COMPUTE_DTYPES:
            problems.append(f"dtype={self.dtype!r} (one of {list(COMPUTE_DTYPES)})")
        if self.scheme not in SCHEMES:
            problems.append(f"scheme={self.scheme!r} (one of {list(SCHEMES)})")
        elif SCHEMES[self.scheme] != self.trainer_precision:
            problems.append(f"trainer_precision={self.trainer_precision!r} (scheme {self.scheme} runs under "
                            f"{SCHEMES[self.scheme]})")
        elif (self.dtype == "bf16") != (self.scheme == "bf16-base"):
            problems.append(f"dtype={self.dtype!r} with scheme={self.scheme!r} (a bf16-stored model is bf16-base)")
        if problems:
            raise ValueError("Invalid precision decision: " + "; ".join(problems))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a ``torch.dtype``."""
        return COMPUTE_DTYPES[self.dtype]

    @property
    def compute(self) -> str:
        """The dtype the products run in: ``bf16`` (``bf16-base``, ``bf16-mixed``), ``fp16`` or ``fp32``."""
        return {"bf16-base": "bf16", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(self.scheme, "fp32")

    def describe(self) -> str:
        """One log line: ``precision: bf16-base (model.compute_dtype=auto on cpu: measured ...)``."""
        return (f"precision: {self.scheme} (model.compute_dtype={self.requested} on {self.device}, "
                f"trainer.precision={self.trainer_precision}: {self.reason})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``shape`` as a list)."""
        record = asdict(self)
        record["shape"] = list(self.shape) if self.shape is not None else None
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "PrecisionDecision":
        """The decision :meth:`to_dict` recorded.

        Raises:
            ValueError: For a record with missing, unknown or invalid fields (naming them).
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(record) - set(names))
        missing = [n for n in names[:6] if n not in record]
        if unknown or missing:
            raise ValueError(f"Invalid precision record: unknown fields {unknown}, missing {missing} (it holds "
                             f"{names})")
        return cls(**{n: record[n] for n in names if n in record})
