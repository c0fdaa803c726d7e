"""``make_plan(cfg, command) -> RunPlan``: the one place the composed config is read (config -> plan).

Every entry point (``train``, ``evaluate``, ``predict``) calls :func:`make_plan` first; everything below works from
the :class:`~vera_lightning.app.runs.plan.RunPlan` it returns. In order, every problem collected and reported at once
(option, value, fix) before anything is built or written:

1. **Keys and values**: missing (``???``) and invalid values
   (:func:`~vera_lightning.app.commands.checks.check_run_config`); every key of every group against its schema
   (:mod:`~vera_lightning.app.commands.options`: ``+data.max_lenght=5``, ``+optim.momentum``, ``+generate.foo``,
   ``+model.*``, ``+trainer.*`` and unknown top-level keys are refused).
2. **Device**: ``trainer.accelerator`` resolved on this machine (``auto``, the default: the GPU where one exists).
3. **Precision** for that device, once (:func:`~vera_lightning.app.models.precision.decide_precision`): on CUDA,
   bf16 only where native (compute capability >= 8.0); on a CPU, measured over the model's shapes (a meta-device copy
   of the model: no weights are loaded). ``eval``/``predict`` with an adapter from a training run replay the
   precision that run recorded in ``plan.json``; a replay that must differ (an explicit ``model.compute_dtype``, a
   device that cannot run it) says so in one line.
4. **Inputs and outputs**: the adapter, the checkpoint, the data files and the input file it reads; every path it
   writes. An output that is, holds or lies inside an input is refused (:func:`check_outputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from vera_lightning import ADAPTER_CONFIG_NAME
from vera_lightning.app.commands.adapters import resolve_adapter
from vera_lightning.app.commands.checks import check_run_config
from vera_lightning.app.commands.options import check_keys, command_options
from vera_lightning.app.data.schema import check_data_values, data_settings
from vera_lightning.app.models.load import build_tokenizer, resolve_path
from vera_lightning.app.models.precision_choice import decide_precision, replay_precision
from vera_lightning.app.runs.plan import (
    PLAN_FILE,
    BaseSource,
    DevicePlan,
    Replay,
    RunPlan,
    read_recorded_plan,
    recorded_precision,
    run_dir_of,
)
from vera_lightning.app.tasks.dpo_loss import DpoSettings

__all__ = ["make_plan", "resolve_device", "check_outputs", "declared_outputs"]

log = logging.getLogger(__name__)


def _container(node: Any) -> Any:
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True, throw_on_missing=False) if OmegaConf.is_config(node) else node


def resolve_device(trainer: dict[str, Any]) -> DevicePlan:
    """``trainer.accelerator`` resolved on this machine: ``cpu`` or ``cuda`` (``auto``/``gpu``: CUDA where present).

    Raises:
        ValueError: ``trainer.accelerator=gpu|cuda`` where no CUDA device exists (naming the fix).
    """
    requested = str(trainer.get("accelerator") or "auto")
    cuda = torch.cuda.is_available()
    if requested in ("gpu", "cuda") and not cuda:
        raise ValueError(f"trainer.accelerator={requested!r}: this machine has no CUDA GPU; use trainer.accelerator="
                         "auto (the GPU where one exists, else the CPU) or trainer=cpu")
    if requested not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"trainer.accelerator={requested!r}: use auto (the GPU where one exists), cpu or gpu")
    on_cuda = requested in ("gpu", "cuda") or (requested == "auto" and cuda)
    common = {"requested": requested, "devices": trainer.get("devices", 1), "num_nodes": int(trainer.get("num_nodes")
                                                                                            or 1),
              "strategy": trainer.get("strategy", "auto")}
    if on_cuda:
        capability = tuple(torch.cuda.get_device_capability())
        return DevicePlan("cuda", name=torch.cuda.get_device_name(), capability=capability, **common)
    return DevicePlan("cpu", **common)


def _meta_model(model: dict[str, Any], data: dict[str, Any]) -> Optional[torch.nn.Module]:
    """The model's module tree on the meta device (shapes only, no weights read), for the precision measurement."""
    auto = AutoModelForSequenceClassification if model.get("task") == "classification" else AutoModelForCausalLM
    extra = {"num_labels": int(data.get("num_labels") or 2)} if model.get("task") == "classification" else {}
    try:
        if model.get("from_config"):
            fields = dict(model["from_config"])
            model_type = fields.pop("model_type")
            config = AutoConfig.for_model(model_type, **fields, **extra)
        else:
            config = AutoConfig.from_pretrained(resolve_path(str(model["name_or_path"])), **extra)
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception as err:  # the real load reports a broken model with its own message
        log.debug("no meta model for the precision measurement: %s", err)
        return None


def _replayed(adapter: Optional[dict[str, Any]], run_dir: Path, options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The plan recorded by the training run this command continues (a resume) or whose adapter it uses."""
    ckpt = options.get("ckpt_path")
    if ckpt:  # a resume replays the run it continues (ckpt_path=last: this run directory)
        return read_recorded_plan(run_dir if ckpt == "last" else run_dir_of("checkpoint", Path(str(ckpt))))
    if not adapter or adapter["kind"] == "merged":
        return None
    run = run_dir_of(adapter["kind"], Path(adapter["path"]))
    recorded = read_recorded_plan(run)
    if recorded is None and (run / PLAN_FILE).exists():
        log.warning("%s cannot be read (not this app's plan.json); the precision comes from the adapter's own record, "
                    "else it is decided afresh", run / PLAN_FILE)
    if recorded is None and adapter["kind"] == "adapter":  # the adapter's header records its precision too
        precision = recorded_precision(str(Path(adapter["path"]) / "adapter_model.safetensors"))
        if precision is not None:
            return {"precision": precision, "_file": str(Path(adapter["path"]) / "adapter_model.safetensors")}
    return recorded


def _set_on_command_line(key: str) -> bool:
    """Whether the command line set ``key`` (a model file's own default is not an override of a recorded run)."""
    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def _precision(model: dict[str, Any], data: dict[str, Any], device: DevicePlan, trainer: dict[str, Any],
               recorded: Optional[dict[str, Any]], method: str) -> tuple[dict[str, Any], Replay]:
    """The precision decided once for this command, or replayed from the run it continues or whose adapter it uses."""
    requested = str(model.get("compute_dtype") or "fp32")
    if recorded is not None and isinstance(recorded.get("precision"), dict):
        try:
            decision, note = replay_precision(recorded["precision"], device.accelerator,
                                              override=requested if _set_on_command_line("model.compute_dtype")
                                              else None, cuda_capability=device.capability)
        except ValueError as err:  # a plan.json this version cannot read: decided afresh, and said so
            log.warning("%s: %s; deciding the precision afresh", recorded["_file"], err)
        else:
            if device.accelerator == "cpu" and decision.scheme == "fp16-mixed":  # no fp16 autocast on a CPU
                decision = decide_precision("fp32", "cpu", finetune=method)
                note = (f"the run trained with fp16 autocast on {recorded['precision'].get('device')}; a CPU has no "
                        "fp16 autocast, so this command runs in fp32 (results can differ slightly)")
            return decision.to_dict(), Replay(recorded["_file"], recorded["precision"], note or "")
    meta = _meta_model(model, data) if requested == "auto" and device.accelerator == "cpu" else None
    if meta is None and requested == "auto" and device.accelerator == "cpu":
        build_tokenizer(model)  # a model that cannot be loaded: its own message (offline hub id, missing package)
        requested = "fp32"  # nothing to measure (no linear shape known): float32, and plan.json says so
    decision = decide_precision(requested, device.accelerator, model=meta, cuda_capability=device.capability,
                                trainer_precision=trainer.get("precision") or "32-true", finetune=method)
    return decision.to_dict(), Replay()


def _within(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_outputs(outputs: list[Path], inputs: list[Path], what: str) -> list[str]:
    """Problems: an output that is, holds or lies inside an input (the adapter, a ``.ckpt``, a run's record)."""
    problems = []
    for out in outputs:
        o = out.expanduser().resolve()
        for inp in inputs:
            i = inp.expanduser().resolve()
            if _within(o, i) or _within(i, o):
                relation = "is" if o == i else ("lies inside" if _within(o, i) else "holds")
                problems.append(f"{what}={str(out)!r} {relation} an input of this command ({i}); it would be "
                                "written over. Choose a path apart from every input")
                break
    return problems


def declared_outputs(command: str, run_dir: Path, options: dict[str, Any]) -> list[Path]:
    """Every path ``command`` may write (its outputs; the job log ``<command>.log`` included)."""
    if command == "train":
        names = ["adapter", "checkpoints", "csv", "tensorboard", "wandb", "mlruns", ".hydra", "summary.json",
                 "plan.json", "plan.resume.*.json", "train.log", "merged", "lora", "adapter-lora.gguf"]
        return [run_dir / n for n in names]
    base = [run_dir / f"{command}.log", run_dir / f".hydra-{command}-*"]
    if command == "eval":
        return base + [run_dir / "metrics.json", run_dir / "generations.jsonl"]
    return base + [Path(str(options["output"]))] if options.get("output") else base


def _adapter(cfg: DictConfig, command: str) -> Optional[dict[str, Any]]:
    if not cfg.get("adapter"):
        return None
    given = Path(str(cfg.adapter)).expanduser()
    inner = given / "adapter"
    if given.is_dir() and not (given / ADAPTER_CONFIG_NAME).exists() and (inner / ADAPTER_CONFIG_NAME).is_file():
        print(f"[vera] adapter={str(cfg.adapter)!r} is a training run; using its adapter {inner}", flush=True)
        given = inner
    source = resolve_adapter(given)
    if command == "train" and source.kind != "adapter":
        raise ValueError(f"adapter={str(cfg.adapter)!r} is a {source.kind}; train.py adapter= names the adapter "
                         "directory training starts from (e.g. <an SFT run>/adapter). Resume a run with ckpt_path=, "
                         "train over a merged model with model.name_or_path=")
    return {"kind": source.kind, "path": str(source.path), "base": source.base}


def _dpo(cfg: DictConfig, command: str, adapter: Optional[dict[str, Any]], recorded: Optional[dict[str, Any]],
         data: dict[str, Any], method: str) -> tuple[Optional[dict[str, Any]], list[str]]:
    """``objective=dpo``'s settings with the reference resolved (see :mod:`~vera_lightning.app.tasks.dpo`)."""
    node = _container(cfg.get("dpo")) if command != "predict" else None
    preference = data.get("format") == "preference" and data.get("preference_target") != "chosen"
    if node is None:
        return None, ([f"data={data.get('name')} holds preference pairs (data.format=preference), which only "
                       "objective=dpo trains and evaluates: add objective=dpo (or data.preference_target=chosen: SFT "
                       "on the chosen responses)"] if preference and command != "predict"
                      else [])
    problems = []
    if not preference:
        problems.append(f"objective=dpo trains on preference pairs but data={data.get('name')} is "
                        f"data.format={data.get('format')!r}: use data=preference (or an hh_* experiment)")
    if method != "vera":
        problems.append(f"finetune={method!r}: objective=dpo trains a VeRA adapter (its reference is the base or a "
                        "frozen adapter over the same projections); use finetune=vera")
    try:
        settings = DpoSettings.from_dict(node)
    except ValueError as err:
        return None, problems + [str(err).replace("Invalid dpo settings:\n  - ", "")]
    reference = None
    if command == "train" and adapter is not None and settings.reference != "base":
        reference = adapter["path"]  # the adapter training starts from
    elif command == "eval" and recorded is not None and settings.reference != "base":
        reference = (recorded.get("dpo") or {}).get("reference_adapter")  # the reference its training run used
    if settings.reference == "adapter" and reference is None:
        problems.append("dpo.reference=adapter needs the adapter training starts from: adapter=<an SFT run>/adapter "
                        "(eval.py: an adapter whose training run recorded one); or dpo.reference=auto|base")
    return {**settings.as_dict(), "reference_adapter": reference}, problems


def _base(model: dict[str, Any], seed: int) -> BaseSource:
    name = model.get("name_or_path")
    return BaseSource(str(model.get("name")), str(name) if name else "from_config", seed)


def make_plan(cfg: DictConfig, command: str) -> RunPlan:
    """The immutable plan of ``command`` for the composed ``cfg`` (see the module docstring).

    Raises:
        ValueError: Listing every problem found (option, value, fix); nothing has been built or written.
        FileNotFoundError: ``adapter=`` names nothing.
    """
    check_run_config(cfg)
    problems = check_keys(cfg, command)
    problems += check_data_values(_container(cfg.data) or {},
                                  (_container(cfg.trainer) or {}) if command == "train" else None)
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    run_dir = Path(str(cfg.paths.output_dir))
    model = _container(cfg.model)
    data = data_settings(_container(cfg.data))
    trainer = _container(cfg.trainer) or {}
    options = command_options(cfg, command)
    method = str(options.get("finetune") or "vera")
    device = resolve_device(trainer)
    adapter = _adapter(cfg, command)
    recorded = _replayed(adapter if command != "train" else None, run_dir, options)
    dpo, problems = _dpo(cfg, command, adapter, recorded, data, method)
    if command == "train" and adapter is not None and method != "vera":
        problems.append(f"adapter={adapter['path']!r} with finetune={method!r}: training starts from a VeRA adapter "
                        "only with finetune=vera; drop adapter= or use finetune=vera")
    if command == "train" and adapter is not None:  # training starts from it: never among the run's outputs
        problems += check_outputs(declared_outputs(command, run_dir, options), [Path(adapter["path"])], "adapter")
    if problems:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    precision, replay = _precision(model, data, device, trainer, recorded, method)
    trainer = {**trainer, "accelerator": "gpu" if device.accelerator == "cuda" else "cpu",
               "precision": precision.get("trainer_precision", trainer.get("precision", "32-true"))}
    inputs = [str(Path(adapter["path"]))] if adapter else []
    data_dir = data.get("data_dir")
    if data_dir and command != "predict":
        for key in ("train_file", "val_file") if command == "train" else ("val_file",):
            if data.get(key):
                inputs.append(str(Path(str(data_dir)) / str(data[key])))
    if command == "predict" and options.get("input"):
        inputs.append(str(options["input"]))
    outputs = [str(p) for p in declared_outputs(command, run_dir, options)]
    generate = _container(cfg.get("generate")) if model.get("task") == "causal_lm" else None
    return RunPlan(
        command=command, run_dir=run_dir, task=str(model.get("task")), seed=int(cfg.seed), method=method,
        model={**model, "compute_dtype": precision["dtype"]}, data=data,
        optim=_container(cfg.get("optim")) or {}, generate=generate,
        vera=_container(cfg.get("vera")) if command == "train" else None, trainer=trainer,
        callbacks=tuple(v for v in (_container(cfg.get("callbacks")) or {}).values() if v is not None),
        loggers=tuple(v for v in (_container(cfg.get("logger")) or {}).values() if v is not None),
        device=device, precision=precision, base=_base(model, int(cfg.seed)), adapter=adapter, replay=replay,
        inputs=tuple(inputs), outputs=tuple(outputs), options=options, dpo=dpo,
        optimized_metric=str(cfg.optimized_metric), monitor_mode=str(cfg.monitor_mode),
        record=OmegaConf.to_yaml(cfg),
    )
