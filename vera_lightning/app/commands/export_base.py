"""The base model an export merges onto or names, found once and checked against the adapter's training run.

:func:`find_base` decides, before any model is loaded, which base the adapter is exported over, from first to last:

1. ``model=`` (with ``data=``, ``seed=``) given on the command line, or ``train.py``'s own config;
2. the training run's record beside the adapter (``<run dir>/.hydra/config.yaml``: its ``model``, ``data`` and
   ``seed``, so that a ``from_config`` base is drawn again exactly);
3. the ``base_model_name_or_path`` an adapter directory records, when it names a model folder (or a ``pkg://`` /
   ``gguf://`` package model, or a hub id ``org/name``).

When both 1 and 2 exist they are compared: a ``from_config`` base with other fields, or drawn from another seed
than the run's, is another (random) model and is refused, naming both values and the fix (``seed=N``). A
``from_config`` base without any seed to draw it from, and an adapter recording only a model's *name* (what a
``from_config`` run records, e.g. ``tiny_opt``), are refused with the options to pass (``model=... seed=...``),
not left to fail later as a hub download.

:func:`base_architecture` reads a base's ``model_type`` without loading it (``from_config``, the ``config.json``
of a local, package or cached hub model, or a GGUF file's header), so ``format=gguf-lora`` on an architecture
llama.cpp's names are not known for is refused with the other problems. :func:`base_inputs` lists the folders the
base is read from (an output must not replace them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from omegaconf import OmegaConf

from vera_lightning.app.models.gguf_cache import converted_dir, gguf_source, is_gguf_spec
from vera_lightning.app.models.load import PKG_PREFIX, resolve_path

__all__ = ["ExportBase", "plain", "run_record", "find_base", "base_architecture", "base_inputs"]

#: ``seed`` a base is drawn with when nothing names one and the base is not ``from_config`` (its weights do not
#: depend on it); ``train.py``'s default.
DEFAULT_SEED = 42
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ExportBase:
    """The base model of an export, as resolved.

    Attributes:
        model: The ``model`` config it is built from (``compute_dtype`` is overridden to float32 when loading).
        data: The ``data`` config's fields a classifier needs (``num_labels``, ``problem_type``); empty otherwise.
        seed: The seed it is built with (a ``from_config`` base is drawn from it).
        origin: Where it came from, for messages (``model=``, ``its training run (<record>)``, ...).
    """

    model: Mapping[str, Any]
    data: Mapping[str, Any]
    seed: int
    origin: str

    @property
    def source(self) -> str:
        """``name_or_path``, or ``from_config (<model_type>)``."""
        if self.model.get("from_config"):
            return f"from_config ({dict(self.model['from_config']).get('model_type')}), seed {self.seed}"
        return str(self.model.get("name_or_path"))

    def describe(self) -> str:
        """One line: the model's name, its source and where it came from."""
        return f"{self.model.get('name')} ({self.source}; from {self.origin})"


def plain(node: Any) -> dict:
    """A plain ``dict`` of a config node or mapping (``{}`` for ``None``), interpolations resolved where they can be."""
    if node is None:
        return {}
    try:
        config = node if OmegaConf.is_config(node) else OmegaConf.create(dict(node))
    except Exception:  # values OmegaConf does not hold: taken as they are
        return dict(node)
    try:
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation of the training run (e.g. ${hydra:...}) that cannot resolve here
        return OmegaConf.to_container(config, resolve=False)  # type: ignore[return-value]


def run_record(run_dir: Optional[Path]) -> tuple[Optional[Path], Optional[dict]]:
    """``(record file, {model, data, seed})`` of the training run in ``run_dir`` (``(path, None)``: none there)."""
    if run_dir is None:
        return None, None
    record = run_dir / ".hydra" / "config.yaml"
    if not record.is_file():
        return record, None
    try:
        run = OmegaConf.load(record)
        if run.get("model") is None:
            return record, None
        return record, {"model": plain(run.model), "data": plain(run.get("data")), "seed": run.get("seed")}
    except Exception:  # not a config this app wrote
        return record, None


def _from_adapter_record(base: str) -> tuple[Optional[dict], Optional[dict], Optional[str]]:
    """``(model, data, why not)`` for the ``base_model_name_or_path`` an adapter directory records."""
    path = Path(base).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return None, None, f"its config.json cannot be read ({err})"
        task, data = "causal_lm", {}
        if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            task, data = "classification", {"num_labels": len(config.get("id2label") or {}) or 2}
        return ({"name": path.name or base, "task": task, "name_or_path": base, "tokenizer": None,
                 "from_config": None}, data, None)
    if is_gguf_spec(base) or base.startswith(PKG_PREFIX) or (_HUB_ID.match(base) and not path.exists()
                                                             and not base.startswith((".", "~"))):
        return ({"name": base.rstrip("/").rsplit("/", 1)[-1], "task": "causal_lm", "name_or_path": base,
                 "tokenizer": None, "from_config": None}, {}, None)
    if base.startswith(("/", ".", "~")) or path.parent != Path("."):
        return None, None, "a model folder that does not exist (any more)"
    return None, None, ("not a model folder but a model's name: what a from_config (randomly initialised) model "
                        "records, e.g. tiny_opt")


def _seed_problem(seed: Any, run_seed: Any, record: Path, given_by: str) -> Optional[str]:
    if seed is None or run_seed is None or int(seed) == int(run_seed):
        return None
    return (f"seed={seed}{given_by}: the adapter's training run drew its from_config base with seed={run_seed} "
            f"({record}); a base drawn with seed {seed} is another random model, and the export would silently be "
            f"wrong. Pass seed={run_seed} (or leave model= and seed= out: the run's record is used)")


def find_base(source_kind: str, source_path: Path, recorded_base: Optional[str], run_dir: Optional[Path],
              given: Optional[Mapping[str, Any]], seed: Optional[int]) -> tuple[Optional[ExportBase], list[str],
                                                                                  list[str]]:
    """The adapter's base (module docstring): ``(base or None, problems, notes)``.

    Args:
        source_kind: ``"adapter"`` or ``"checkpoint"``.
        source_path: The adapter directory or ``.ckpt`` (for messages).
        recorded_base: The ``base_model_name_or_path`` an adapter directory records.
        run_dir: The training run the adapter lies in (``None``: none).
        given: ``{"model": ..., "data": ..., "seed": ...}`` from ``model=`` or ``train.py``; ``None``: not given.
        seed: ``seed=`` on the command line (``None``: not given; ``given["seed"]`` then applies).
    """
    record, run = run_record(run_dir)
    problems: list[str] = []
    notes: list[str] = []
    given_seed = seed if seed is not None else (given or {}).get("seed")
    if given and given.get("model"):
        model, data = plain(given["model"]), plain(given.get("data"))
        from_config = model.get("from_config")
        chosen_seed = given_seed
        if run is not None:
            run_model = run["model"]
            data = data or run["data"] or {}
            if from_config or run_model.get("from_config"):
                if from_config != run_model.get("from_config"):
                    problems.append(
                        f"model={model.get('name')} is not the base the adapter's training run used ({record}: "
                        f"model={run_model.get('name')}, from_config={run_model.get('from_config')}); leave model= "
                        "out (the run's record is used) or give the run's model options")
                elif chosen_seed is None:
                    chosen_seed = run["seed"]
                else:
                    problems += [p for p in [_seed_problem(chosen_seed, run["seed"], record, "")] if p]
            elif str(model.get("name_or_path")) != str(run_model.get("name_or_path")):
                notes.append(f"model.name_or_path={model.get('name_or_path')!r} is not the one the training run "
                             f"recorded ({run_model.get('name_or_path')!r}, {record}); exporting over the one given")
        elif from_config and chosen_seed is None:
            problems.append(
                f"model={model.get('name')} is a from_config (randomly initialised) base, and no training run record "
                f"({record or source_path.parent / '.hydra' / 'config.yaml'}) is beside adapter={str(source_path)!r} "
                "to tell the seed it was drawn with. Pass the training run's seed: seed=N")
        base = ExportBase(MappingProxyType(model), MappingProxyType(data),
                          int(chosen_seed if chosen_seed is not None else DEFAULT_SEED), "model=")
        return (None if problems else base), problems, notes
    if run is not None:
        run_seed = run["seed"] if run["seed"] is not None else DEFAULT_SEED
        if run["model"].get("from_config"):
            problems += [p for p in [_seed_problem(given_seed, run_seed, record, " (given without model=)")] if p]
        base = ExportBase(MappingProxyType(run["model"]), MappingProxyType(run["data"] or {}), int(run_seed),
                          f"its training run ({record})")
        return (None if problems else base), problems, notes
    where = f"no training run record ({record})" if record else "no training run record"
    if source_kind == "adapter" and recorded_base:
        model, data, why = _from_adapter_record(recorded_base)
        if model is not None:
            base = ExportBase(MappingProxyType(model), MappingProxyType(data or {}),
                              int(given_seed if given_seed is not None else DEFAULT_SEED),
                              f"base_model_name_or_path={recorded_base!r}")
            return base, problems, notes
        problems.append(
            f"adapter={str(source_path)!r} records base_model_name_or_path={recorded_base!r}, {why}; and {where} is "
            f"beside it to tell its model and seed. Pass the model options it was trained with: "
            f"model={Path(recorded_base).name or 'NAME'} seed=N (N: the training run's seed; for a classifier also "
            "data=NAME), or model=llama model.name_or_path=DIR for a model folder")
        return None, problems, notes
    what = "a checkpoint holds no base model and records none" if source_kind == "checkpoint" else \
        "adapter_config.json records no usable base_model_name_or_path"
    problems.append(f"adapter={str(source_path)!r}: cannot tell its base model: {what}, and {where} is beside it. "
                    "Pass the model options it was trained with: model=NAME (e.g. model=smollm2, or model=llama "
                    "model.name_or_path=DIR) and, for a classifier, data=NAME; a from_config model (model=tiny_opt) "
                    "also needs the run's seed=N")
    return None, problems, notes


def _config_json(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def base_architecture(model_cfg: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """``(model_type, architecture class)`` of the base a ``model`` config names, read without loading it, or
    ``None`` where that cannot be told without loading (a hub model not in the local cache)."""
    from_config = model_cfg.get("from_config")
    if from_config:
        model_type = str(dict(from_config).get("model_type"))
        return model_type, model_type
    name = str(model_cfg.get("name_or_path") or "")
    config = None
    try:
        if is_gguf_spec(name):
            folder = converted_dir(gguf_source(name))
            config = _config_json(folder)
            if config is None:
                import gguf  # the reader the conversion uses; the header is read, not the tensors

                field = gguf.GGUFReader(str(gguf_source(name))).fields["general.architecture"]
                arch = field.contents()
                return str(arch), str(arch)
        elif name.startswith(PKG_PREFIX) or Path(name).expanduser().is_dir():
            config = _config_json(Path(resolve_path(name)).expanduser())
        elif _HUB_ID.match(name):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            config = _config_json(Path(cached).parent) if isinstance(cached, str) else None
    except Exception:  # a package or reader that is missing: known only once loaded (and reported then)
        return None
    if not config or not config.get("model_type"):
        return None
    return str(config["model_type"]), str((config.get("architectures") or [config["model_type"]])[0])


def base_inputs(model_cfg: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """The local folders and files the base is read from (model, tokenizer, GGUF file and its converted folder)."""
    found = []
    for key in ("name_or_path", "tokenizer"):
        name = str(model_cfg.get(key) or "")
        if not name:
            continue
        try:
            if is_gguf_spec(name):
                source = gguf_source(name)
                found += [(source, f"the base model's GGUF file ({key}={name})"),
                          (converted_dir(source), f"the base model's converted folder ({key}={name})")]
                continue
            path = Path(resolve_path(name)).expanduser() if name.startswith(PKG_PREFIX) else Path(name).expanduser()
        except Exception:  # a missing package: nothing local to protect
            continue
        if path.exists():
            found.append((path, f"the base model's folder ({key}={name})"))
    return found
