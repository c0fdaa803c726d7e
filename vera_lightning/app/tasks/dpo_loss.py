r"""The DPO objective (Rafailov et al. 2023, arXiv 2305.18290): its settings and its loss.

For a prompt :math:`x` with a chosen response :math:`y_w` and a rejected one :math:`y_l`, the policy :math:`\pi` and
the frozen reference :math:`\pi_{ref}` give sequence log-probabilities summed over the response tokens only, and

.. math::

    h = \big(\log\pi(y_w|x) - \log\pi_{ref}(y_w|x)\big) - \big(\log\pi(y_l|x) - \log\pi_{ref}(y_l|x)\big)

* ``sigmoid`` (DPO; with ``label_smoothing`` :math:`\varepsilon`, conservative DPO, cDPO):
  :math:`-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`.
* ``ipo`` (Azar et al. 2023): :math:`(h - \frac{1}{2\beta})^2` with the log-probabilities *averaged* over the
  response tokens (as TRL computes it).

The implicit rewards are :math:`r_w = \beta(\log\pi(y_w|x) - \log\pi_{ref}(y_w|x))` and likewise :math:`r_l`; a pair
is ranked right when :math:`r_w > r_l` (``reward_accuracy``), and ``reward_margin`` is :math:`r_w - r_l`.

:class:`DpoSettings` is the typed ``dpo:`` node of ``conf/objective/dpo.yaml``, checked when the plan is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = ["LOSS_TYPES", "REFERENCES", "DpoSettings", "dpo_loss"]

LOSS_TYPES = ("sigmoid", "ipo")
#: ``auto``: the adapter training starts from (``adapter=``) when given, else the base model; ``adapter``: that
#: adapter (``adapter=`` required); ``base``: the base model (the adapter disabled), even with ``adapter=``.
REFERENCES = ("auto", "adapter", "base")


@dataclass(frozen=True)
class DpoSettings:
    """The ``dpo`` settings (``objective=dpo``).

    Attributes:
        beta: The KL strength β (> 0; 0.1 in the paper).
        label_smoothing: cDPO's ε, the assumed share of flipped labels, in [0, 0.5); ``sigmoid`` only.
        loss_type: ``sigmoid`` (DPO/cDPO) or ``ipo``.
        reference: ``auto``, ``adapter`` or ``base`` (see :data:`REFERENCES`).
        precompute_reference: True: the reference log-probs of every training pair are computed once before training
            and kept in memory; False: computed under ``no_grad`` each step. Both are exact.

    Raises:
        ValueError: Listing every invalid setting (option, value, fix).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    reference: str = "auto"
    precompute_reference: bool = True

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            problems.append(f"dpo.beta={self.beta!r}: must be a number > 0 (0.1 is the paper's; larger keeps the "
                            "policy closer to the reference)")
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls < 0.5:
            problems.append(f"dpo.label_smoothing={ls!r}: must be in [0, 0.5) (0: plain DPO; cDPO uses e.g. 0.1)")
        elif ls and self.loss_type == "ipo":
            problems.append(f"dpo.label_smoothing={ls!r} applies to loss_type=sigmoid (cDPO); IPO has none: set "
                            "dpo.label_smoothing=0")
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"dpo.loss_type={self.loss_type!r}: must be one of {list(LOSS_TYPES)}")
        if self.reference not in REFERENCES:
            problems.append(f"dpo.reference={self.reference!r}: must be one of {list(REFERENCES)} (auto: the adapter "
                            "given with adapter=, else the base model)")
        if not isinstance(self.precompute_reference, bool):
            problems.append(f"dpo.precompute_reference={self.precompute_reference!r}: must be true or false")
        if problems:
            raise ValueError("Invalid dpo settings:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DpoSettings":
        """From the composed ``dpo`` node, refusing unknown keys (a typo would be ignored)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ValueError(f"{', '.join('dpo.' + k for k in unknown)}: not a dpo setting, so it would be ignored "
                             f"(a typo?). Remove it; dpo settings are {', '.join(known)}")
        return cls(**{k: (float(v) if k in ("beta", "label_smoothing") and isinstance(v, int)
                          and not isinstance(v, bool) else v) for k, v in values.items()})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, settings: DpoSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (see the module docstring); inputs are per-pair log-probabilities.

    Returns:
        ``(losses, rewards_chosen, rewards_rejected)``, each of shape ``(pairs,)``; the rewards carry no gradient.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    beta = float(settings.beta)
    if settings.loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = float(settings.label_smoothing)
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
