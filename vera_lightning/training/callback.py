"""`VeraCallback`: add VeRA to any Lightning ``Trainer`` without touching the LightningModule.

Hook placement (see Lightning's ``Trainer._run``):

* ``setup`` runs before ``configure_model``, the checkpoint restore, DDP wrapping and
  ``configure_optimizers``: inject and freeze there, and install the loader that lets a slim
  checkpoint (adapter tensors only) be restored into the model's own frozen base.
* ``on_fit_start`` runs after the optimizers exist: check that they hold the λ's.
* ``on_save_checkpoint`` drops the frozen base from the ``.ckpt``, records the named adapters and the
  active one (checked on resume), and can write a PEFT-format adapter directory next to it.

The callback only wires hooks; the work is done by :mod:`vera_lightning.ops.inject` and
:mod:`vera_lightning.io.adapter_dir`.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from vera_lightning.config import INIT_ONLY_OPTIONS, VeraConfig
from vera_lightning.core.finite import NonFiniteGuard
from vera_lightning.core.lookup import Adapted, find_adapted, vera_layers
from vera_lightning.core.messages import shorten
from vera_lightning.io.adapter_dir import adapted_for, save_adapted
from vera_lightning.ops.inject import apply_vera, count_parameters
from vera_lightning.ops.targets import describe_candidates, resolve_target_names
from vera_lightning.training.ckpt_guard import guard_checkpoint_loading
from vera_lightning.training.distributed import check_strategy, prepare_ddp, sync_projections
from vera_lightning.training.slim import install_slim_loading, mark_adapters_, slim_checkpoint_

__all__ = ["VeraCallback", "check_strategy", "check_optimizers"]

log = logging.getLogger(__name__)


class VeraCallback(Callback):
    """Inject VeRA in ``setup``, check the optimizer, keep checkpoints adapter-only.

    Args:
        config: The adapter options. Give either ``config`` or its fields as keywords;
            with neither (``config`` stays ``None`` until ``setup``), a model already adapted
            in ``configure_model`` keeps its own config and any other model gets
            ``VeraConfig()``'s defaults.
        adapter_dir: If set, every time Lightning saves a checkpoint the adapter is also
            written in PEFT's layout to ``<adapter_dir>/epoch=E-step=S/`` (rank 0 only).
        slim_checkpoints: Drop the frozen base weights from Lightning ``.ckpt`` files
            (default). Resuming rebuilds the base from the model's own construction.
        on_nonfinite: What a NaN/inf loss or λ does (checked at the end of each training epoch and
            before any checkpoint or adapter is written): ``"raise"`` (default) stops training with
            :class:`~vera_lightning.core.finite.NonFiniteError` and writes nothing; ``"warn"`` warns and
            goes on (adapter directories are then skipped: NaN/inf is never saved in one).
        **config_fields: :class:`~vera_lightning.VeraConfig` fields (``r``, ``target_modules``, ...).

    Raises:
        TypeError: If both ``config`` and ``config_fields`` are given, or ``config`` is not a VeraConfig.

    Example::

        >>> from vera_lightning import VeraCallback
        >>> cb = VeraCallback(r=256, target_modules=["q_proj", "v_proj"])
        >>> cb.config.r
        256
    """

    def __init__(
        self,
        config: Optional[VeraConfig] = None,
        adapter_dir: Optional[str] = None,
        slim_checkpoints: bool = True,
        on_nonfinite: str = "raise",
        **config_fields: Any,
    ) -> None:
        super().__init__()
        if config is not None and config_fields:
            raise TypeError(
                f"VeraCallback got config={config!r} and fields {sorted(config_fields)}; pass one or the other "
                "(e.g. VeraCallback(VeraConfig(r=256)) or VeraCallback(r=256))"
            )
        if config is not None and not isinstance(config, VeraConfig):
            raise TypeError(
                f"VeraCallback(config=...) expects a VeraConfig, got {type(config).__name__}; pass "
                "VeraCallback(VeraConfig(...)) or the fields as keywords, VeraCallback(r=256, ...)"
            )
        if config is None and config_fields:
            config = VeraConfig(**config_fields)
        #: The adapter options; ``None`` means "adopt the model's own adapter" (resolved in ``setup``).
        self.config: Optional[VeraConfig] = config
        self.adapter_dir = os.fspath(adapter_dir) if adapter_dir is not None else None
        self.slim_checkpoints = slim_checkpoints
        self._guard = NonFiniteGuard(on_nonfinite)
        self._ready = False
        self._synced = False
        self._logged = False
        self._hook_handle: Any = None

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        found = find_adapted(pl_module)  # the one lookup of setup, passed down
        if found is not None:
            self._validate(pl_module, found)
        else:
            self._inject(pl_module)
        if self._hook_handle is None:
            self._hook_handle = install_slim_loading(pl_module)
        guard_checkpoint_loading(trainer.strategy)  # a truncated ckpt_path is named before Lightning reads it
        prepare_ddp(trainer.strategy, pl_module)
        self._synced = False

    def _inject(self, pl_module: pl.LightningModule) -> None:
        config = self.config or VeraConfig()
        try:
            resolve_target_names(pl_module, config)
        except ValueError as err:
            if is_overridden("configure_model", pl_module):
                return  # the model is built in configure_model; checked once it exists (_ensure_ready)
            raise ValueError(
                f"VeraCallback found nothing to adapt in {type(pl_module).__name__}: {err}\nIf your LightningModule "
                "builds its model in configure_model(), call vera_lightning.apply_vera(self.model, config) at the "
                "end of configure_model() and pass the same config to VeraCallback."
            ) from None
        self.config = config
        apply_vera(pl_module, config)
        self._ready = True
        self._log_counts(pl_module)

    def _validate(self, pl_module: pl.LightningModule, found: Adapted) -> None:
        adapter = found.adapter
        if self.config is None:
            self.config = adapter.config
        diff = adapter.config.diff(self.config)
        if diff:
            raise ValueError(
                f"{type(pl_module).__name__} was adapted with a different VeraConfig than VeraCallback's "
                f"(option: (model, callback)) {diff}; pass the same config to apply_vera and VeraCallback, "
                "or construct VeraCallback() without options to adopt the model's"
            )
        if not found.layers:
            raise ValueError(f"{type(pl_module).__name__} has VeRA projections but no VeraLinear layer")
        self._ready = True
        self._log_counts(pl_module, len(found.layers))

    def _ensure_ready(self, pl_module: pl.LightningModule) -> None:
        """After ``configure_model``: the adapter must exist now."""
        if self._ready:
            return
        found = find_adapted(pl_module)
        if found is None:
            config = self.config or VeraConfig()
            raise ValueError(
                f"VeraCallback: {type(pl_module).__name__}.configure_model() ran but the model carries no VeRA "
                f"adapter, and target_modules={config.target_modules!r} matched nothing before it. Call "
                "vera_lightning.apply_vera(self.model, config) at the end of configure_model(). "
                f"{describe_candidates(pl_module)}"
            )
        self._validate(pl_module, found)

    def _log_counts(self, pl_module: pl.LightningModule, layers: Optional[int] = None) -> None:
        """Log the adapted layers (``layers``: their number, when the caller has them) and parameter counts, once."""
        if self._logged:
            return
        self._logged = True
        trainable, total = count_parameters(pl_module)
        if layers is None:  # just injected: count the new layers
            layers = sum(1 for _ in vera_layers(pl_module))
        rank_zero_info(
            f"VeRA: r={self.config.r} on {layers} layers; trainable params {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.4f}%)"
        )

    # ------------------------------------------------------------------ checks
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(pl_module)
        if not self._synced:  # once per Trainer entry point (setup resets it)
            sync_projections(trainer.strategy, pl_module)
            self._synced = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)
        check_optimizers(pl_module, trainer.optimizers)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    # ------------------------------------------------------------------ non-finite values
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._guard.observe_loss(outputs)  # accumulated on the loss's device: no synchronisation per step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._guard.check(pl_module, f"at the end of training epoch {trainer.current_epoch}")

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        finite = not self._guard.check(pl_module, f"before writing the checkpoint at step {trainer.global_step}")
        if not finite and self.adapter_dir is not None:
            warnings.warn(f"VeraCallback: no adapter directory written at step {trainer.global_step} (NaN/inf)",
                          UserWarning, stacklevel=2)
        writes_adapter = self.adapter_dir is not None and trainer.is_global_zero and finite
        # the one lookup of this save, passed down (a refusal reads as the step that needs the adapter first)
        found = (adapted_for(pl_module, "save_adapter") if writes_adapter and not self.slim_checkpoints
                 else find_adapted(pl_module))
        if self.slim_checkpoints:
            slim_checkpoint_(checkpoint, pl_module, found)
        elif found is not None:  # a full checkpoint records its named adapters and the active one too
            mark_adapters_(checkpoint, found)
        if writes_adapter:
            found = found.at_root() if found is not None else None  # PEFT names tensors relative to adapter_root
            model = found.module if found is not None else pl_module
            directory = os.path.join(self.adapter_dir, f"epoch={trainer.current_epoch}-step={trainer.global_step}")
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
            save_adapted(model, found, directory, base_model_name_or_path=name)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()} if self.config is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config")
        diff = (VeraConfig.from_dict(saved).diff(self.config, ignore=INIT_ONLY_OPTIONS)
                if saved is not None and self.config else {})
        if diff:
            warnings.warn(
                "VeraCallback: the checkpoint was written with a different VeraConfig than this callback's "
                f"(option: (checkpoint, callback)) {diff}; the model's adapter was checked "
                "against the checkpoint when it was loaded",
                UserWarning,
                stacklevel=2,
            )


def check_optimizers(pl_module: nn.Module, optimizers: list) -> None:
    """Warn about frozen tensors in the optimizers; raise if no λ is optimized.

    Raises:
        ValueError: If no optimizer holds any VeRA λ (training would change nothing).
    """
    in_optimizer = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    lambdas = [p for _, layer in vera_layers(pl_module) for p in layer.adapter_params().values()]
    if not any(id(p) in in_optimizer for p in lambdas):
        raise ValueError(
            f"No VeRA λ (vera_lambda_b / vera_lambda_d) is in any of the {len(optimizers)} optimizer(s), so "
            "training would change nothing. In configure_optimizers pass the trainable parameters, e.g. "
            "torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=...)"
        )
    frozen = [n for n, p in pl_module.named_parameters() if id(p) in in_optimizer and not p.requires_grad]
    if frozen:
        warnings.warn(
            f"VeraCallback: the optimizer holds {len(frozen)} frozen parameter(s) ({shorten(frozen, 8)}); they will "
            "not train. "
            "Pass only trainable ones: [p for p in self.parameters() if p.requires_grad]",
            UserWarning,
            stacklevel=2,
        )
