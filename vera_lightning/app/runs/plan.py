"""The run plan: every setting of one command resolved once, checked, recorded in ``plan.json`` and replayed.

A command (``train``, ``eval``, ``predict``; ``export`` has its own plan,
:mod:`~vera_lightning.app.commands.export`) turns its composed config into one immutable :class:`RunPlan`
(:func:`~vera_lightning.app.commands.planning.make_plan`): the device it runs on, the precision resolved for that
device, the base model's source and seed, the adapter, the data files it reads and **every path it writes**. Below
the entry points nothing reads the composed config again and nothing decides again.

The plan is written into the run as ``plan.json`` once the run is accepted (a training run: beside
``summary.json``; ``eval``/``predict``: in their record folder ``.hydra-<command>-<time>/``). A later command on the
run's adapter (``eval``, ``predict``, ``export``, a resume) reads :func:`read_recorded_plan` and replays its
precision instead of measuring again (:class:`Replay`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open

from vera_lightning.app.models.precision_decision import PrecisionDecision
from vera_lightning.app.tasks.finetune import PRECISION_META

__all__ = ["PLAN_FILE", "DevicePlan", "BaseSource", "Replay", "RunPlan", "plan_json",
           "read_recorded_plan", "recorded_precision", "run_dir_of"]

#: The plan's file name in a run directory (and in an eval/predict record folder).
PLAN_FILE = "plan.json"
#: Bumped when the file's layout changes incompatibly.
PLAN_VERSION = 1


@dataclass(frozen=True)
class DevicePlan:
    """Where the command runs.

    Attributes:
        accelerator: ``"cpu"`` or ``"cuda"`` (what ``trainer.accelerator`` resolved to on this machine).
        requested: ``trainer.accelerator`` as given (``auto`` by default: the GPU where one exists).
        devices, num_nodes, strategy: The Trainer's, as given.
        name: The device's name (the GPU's, or ``cpu``).
        capability: CUDA compute capability ``(major, minor)``; ``None`` on a CPU.
    """

    accelerator: str
    requested: str
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    name: str = "cpu"
    capability: Optional[tuple[int, int]] = None

    @property
    def torch_device(self) -> str:
        """The ``torch.device`` string a single-process command (``predict``) runs on."""
        return "cuda" if self.accelerator == "cuda" else "cpu"

    def describe(self) -> str:
        """One line: what was asked and what it resolved to."""
        cap = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"device: {self.accelerator} ({self.name}{cap}; trainer.accelerator={self.requested})"


@dataclass(frozen=True)
class BaseSource:
    """The base model a command builds.

    Attributes:
        name: The ``model`` config's name (``tiny_opt``, ``smollm2``).
        source: ``name_or_path`` as resolved (a folder, a hub id) or ``from_config`` (drawn from ``seed``).
        seed: The seed the run draws with (a ``from_config`` base is drawn from it).
        origin: Where the command got it (``model=`` / ``the training run's plan``).
    """

    name: str
    source: str
    seed: int
    origin: str = "model="


@dataclass(frozen=True)
class Replay:
    """What a command took from the run that wrote its adapter (``None`` fields: nothing recorded).

    Attributes:
        plan_file: The recorded ``plan.json`` read.
        precision: The recorded precision decision (a dict, see ``PrecisionDecision.to_dict``).
        differs: One line saying why this command does not replay the record exactly (empty: it does).
    """

    plan_file: Optional[str] = None
    precision: Optional[dict[str, Any]] = None
    differs: str = ""


@dataclass(frozen=True)
class RunPlan:
    """One command's resolved settings (see the module docstring). Built by ``make_plan``; never mutated.

    Attributes:
        command: ``train``, ``eval`` or ``predict``.
        run_dir: The command's run directory (``hydra.run.dir``).
        task: ``classification`` or ``causal_lm``.
        seed: The run's seed.
        method: ``finetune`` (``vera``, ``head``, ``full``; ``vera`` for eval/predict).
        model: The ``model`` settings (:class:`~vera_lightning.app.models.schema.ModelSchema`'s keys), with
            ``compute_dtype`` the *resolved* dtype (``fp32`` or ``bf16``) and the requested one in
            ``precision['requested']``.
        data: The ``data`` settings (:class:`~vera_lightning.app.data.schema.DataSchema`'s keys).
        optim: The optimiser settings (train).
        generate: The decoding settings (a causal LM).
        vera: The VeRA config as a dict (train).
        trainer: The Trainer's arguments, ``accelerator`` and ``precision`` resolved (``_target_`` kept).
        callbacks, loggers: What to instantiate (``_target_`` specs), in order.
        device: Where it runs.
        precision: The precision decision (``PrecisionDecision.to_dict()``): dtype, scheme, reason.
        base: The base model's source and seed.
        adapter: ``adapter=`` as resolved (``kind``, ``path``, ``base``), or ``None``.
        replay: What was taken from the adapter's training run.
        inputs: Every path the command reads (data files, the adapter, the checkpoint, the input file).
        outputs: Every path the command writes (files and directories).
        options: The command's own options (``overwrite``, ``ckpt_path``, ``export``, ``input``, ``output``, ...).
        dpo: ``objective=dpo``'s settings (``DpoSettings``' fields) and ``reference_adapter``, the adapter directory
            whose λ's are the reference (``None``: the base model); ``None`` for any other objective.
        record: The composed config as YAML (the ``.hydra/config.yaml`` the run writes once accepted).
    """

    command: str
    run_dir: Path
    task: str
    seed: int
    method: str
    model: dict[str, Any]
    data: dict[str, Any]
    device: DevicePlan
    precision: dict[str, Any]
    base: BaseSource
    optim: dict[str, Any] = field(default_factory=dict)
    generate: Optional[dict[str, Any]] = None
    vera: Optional[dict[str, Any]] = None
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: tuple[dict[str, Any], ...] = ()
    loggers: tuple[dict[str, Any], ...] = ()
    adapter: Optional[dict[str, Any]] = None
    replay: Replay = Replay()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    dpo: Optional[dict[str, Any]] = None
    optimized_metric: str = "val/loss"
    monitor_mode: str = "min"
    record: str = ""

    @property
    def dtype(self) -> str:
        """The dtype the products run in: ``bf16`` (``bf16-base``, ``bf16-mixed``), ``fp16`` or ``fp32``."""
        return PrecisionDecision.from_dict(self.precision).compute

    @property
    def scheme(self) -> str:
        """The precision scheme: ``fp32``, ``bf16-base`` (bf16 base, trained tensors float32) or ``bf16-mixed``."""
        return str(self.precision.get("scheme", "fp32"))

    @property
    def base_dtype(self) -> str:
        """The dtype the base model is stored in: ``bf16`` only in the ``bf16-base`` scheme (autocast keeps float32)."""
        return str(self.precision.get("dtype", "fp32"))

    def describe_precision(self) -> str:
        """One line: the precision this command runs in and why (the replay's difference, if any)."""
        line = f"precision: {self.dtype} ({self.scheme}; model.compute_dtype={self.precision.get('requested')}: " \
               f"{self.precision.get('reason')})"
        return line + (f"; {self.replay.differs}" if self.replay.differs else "")

    def option(self, key: str, default: Any = None) -> Any:
        """A command option (``overwrite``, ``ckpt_path``, ...)."""
        value = self.options.get(key, default)
        return default if value is None else value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def plan_json(plan: RunPlan) -> str:
    """The plan as ``plan.json``'s text (the composed config itself is in ``.hydra/config.yaml``)."""
    record = {key: value for key, value in asdict(plan).items() if key != "record"}
    record["version"] = PLAN_VERSION
    return json.dumps(_jsonable(record), indent=2, sort_keys=True) + "\n"


def run_dir_of(adapter_kind: str, path: Path) -> Path:
    """The training run directory an adapter or ``.ckpt`` lives in (``<run>/adapter``, ``<run>/checkpoints/x.ckpt``)."""
    parent = path.parent
    return parent.parent if adapter_kind == "checkpoint" and parent.name == "checkpoints" else parent


def read_recorded_plan(run_dir: Path) -> Optional[dict[str, Any]]:
    """The ``plan.json`` a training run recorded in ``run_dir`` (``None``: none, or unreadable)."""
    path = run_dir / PLAN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("command") != "train":
        return None
    record["_file"] = str(path)
    return record


def recorded_precision(safetensors_file: str) -> Optional[dict[str, Any]]:
    """The precision an adapter file records in its header (:data:`PRECISION_META`), or ``None``."""
    try:
        with safe_open(safetensors_file, "pt") as handle:
            value = (handle.metadata() or {}).get(PRECISION_META)
        record = json.loads(value) if value else None
    except Exception:  # no file, not safetensors, not JSON: nothing recorded
        return None
    return record if isinstance(record, dict) else None
