"""Measured path choice for ``auto``: time the candidate paths once per sibling-group shape, keep the fastest.

The idea of ``torch.backends.cudnn.benchmark`` and Triton's autotuner. The first time a group
leader (:func:`vera_lightning.forward.cost.group_of`) meets a :class:`Signature` (device, dtype,
threads, ``in``, ``outs``, ``r``, tokens bucketed to two sizes per octave by :func:`bucket_tokens`
so that dynamic padding does not tune again and again, whether ``x`` needs a gradient, memory
preference), the :class:`Tuner`:

1. takes the paths :func:`~vera_lightning.forward.cost.allowed_paths` admits for the memory
   preference (a path that breaks it is never a candidate), orders them by the cost model's
   estimate and drops those estimated above ``prune`` (3) times the best estimate;
2. times forward + backward of the whole group on each (:class:`~vera_lightning.forward.probe.GroupProbe`:
   the real path table on synthetic tensors of the bucket's size, in a worker thread so the caller's
   saved-tensor hooks, e.g. activation checkpointing, never see it), ``warmup`` (1) + ``repeats`` (3)
   rounds, round-robin, dropping after each round a candidate slower than ``drop`` (1.5) times the
   fastest; keeps the fastest minimum;
3. remembers the choice in the process and in the JSON file of :mod:`vera_lightning.forward.tune_cache`.

Tuning time is bounded by a budget in seconds per process (after it, new shapes get the cost model's
choice) and reported in one log line (logger ``vera_lightning.forward.autotune``, INFO) once a burst
of tuning ends. Forwards inside backward (activation checkpointing's recomputation) never measure:
a leader replays the path its forward took (the cost model's where that forward ran without grad,
as reentrant checkpointing's does). Every path computes the same values, so
tuning changes speed only, not results beyond float rounding.

Settings (on/off, the cache file, the budget): :func:`configure_autotune` in code, else the
environment variables of :mod:`vera_lightning.forward.tune_settings` (``VERA_LIGHTNING_AUTOTUNE=0``
turns tuning off, ``VERA_LIGHTNING_AUTOTUNE_CACHE`` points the file elsewhere or ``off``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from vera_lightning.forward import cost
from vera_lightning.forward.probe import Apply, GroupProbe
from vera_lightning.forward.protocol import AdaptedLayer
from vera_lightning.forward.sharing import in_backward
from vera_lightning.forward.tune_cache import Signature, TuneFile, machine_key
from vera_lightning.forward.tune_settings import ENV_BUDGET, UNSET, Settings

__all__ = ["Choice", "Tuner", "TUNER", "configure_autotune", "autotune_report", "choose_path"]

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    """A remembered choice: the path, the measured times (ms, per candidate) and where it came from."""

    path: str
    ms: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # measured | disk | only candidate | cost model (...)


class Tuner:
    """Measures and remembers path choices (one per process: :data:`TUNER`).

    Args:
        timer: Seconds, monotonic (injectable: tests pass a fake clock).
        warmup, repeats: Untimed and timed rounds per candidate.
        prune: Candidates estimated above this many times the best estimate are not measured.
        drop: After each timed round, a candidate slower than this many times the fastest is dropped.

    Attributes:
        settings: On/off, cache file, budget (:class:`~vera_lightning.forward.tune_settings.Settings`).
        spent_s: Seconds spent measuring so far (against the budget).
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter, warmup: int = 1, repeats: int = 3,
                 prune: float = 3.0, drop: float = 1.5) -> None:
        self.timer, self.warmup, self.repeats, self.prune, self.drop = timer, warmup, repeats, prune, drop
        self.settings = Settings()
        self._lock = threading.RLock()
        self.clear()

    def clear(self) -> None:
        """Forget every choice, the time spent and the files read (not the files themselves)."""
        self._choices: dict[tuple[str, str], Choice] = {}
        self._disk: dict[tuple[Path, str], dict] = {}
        self._files: dict[Path, TuneFile] = {}
        self._pending: list[str] = []
        self.spent_s, self.burst_s, self._budget_warned = 0.0, 0.0, False

    def remembered(self, group: cost.Group) -> Optional[str]:
        """The choice remembered (in the process or the file) for ``group``'s signature, without measuring."""
        sig = Signature.of(group)
        machine = machine_key(group.device, sig.threads)
        with self._lock:
            choice = self._choices.get((machine, sig.key())) or self._from_file(machine, sig, group)
        return choice.path if choice is not None else None

    # ------------------------------------------------------------------ choosing
    def choose(self, group: cost.Group, prepare: Callable[[int], Callable[[], Callable[[str], None]]]) -> str:
        """The path for ``group``: remembered, read from the file, or measured.

        ``prepare(tokens)`` is called in the caller's thread on a miss and returns ``build``;
        ``build()`` (in the worker thread) allocates and returns ``run(path)``, one timed forward +
        backward of the group on ``path``.
        """
        sig = Signature.of(group)
        machine = machine_key(group.device, sig.threads)
        with self._lock:
            choice = self._choices.get((machine, sig.key())) or self._from_file(machine, sig, group)
            if choice is not None:
                self._flush_report()
                return choice.path
            if in_backward():  # recomputation under checkpointing: never measure, never remember here
                return group.best()
            choice = self._decide(group, sig, prepare)
            self._choices[(machine, sig.key())] = choice
            if choice.source == "measured":
                self._pending.append(f"{sig.key()} -> {choice.path} ("
                                     + ", ".join(f"{p} {t:.1f} ms" for p, t in choice.ms.items()) + ")")
                path = self.settings.cache_file()
                if path is not None:
                    self._file(path).store(machine, sig.key(), {"path": choice.path, "ms": choice.ms})
            return choice.path

    def _file(self, path: Path) -> TuneFile:
        if path not in self._files:
            self._files[path] = TuneFile(path)
        return self._files[path]

    def _from_file(self, machine: str, sig: Signature, group: cost.Group) -> Optional[Choice]:
        path = self.settings.cache_file()
        if path is None:
            return None
        if (path, machine) not in self._disk:
            self._disk[(path, machine)] = self._file(path).load(machine)
        entry = self._disk[(path, machine)].get(sig.key())
        if entry is None or entry["path"] not in group.allowed():  # a rule changed since: measure again
            return None
        ms = entry.get("ms") if isinstance(entry.get("ms"), dict) else {}
        choice = Choice(entry["path"], ms, "disk")
        self._choices[(machine, sig.key())] = choice
        return choice

    def candidates(self, group: cost.Group) -> list[str]:
        """The admissible paths, best estimate first, those estimated above ``prune`` x the best left out."""
        estimate = group.costs()
        allowed = sorted(group.allowed(), key=estimate.get)
        best = estimate[allowed[0]]
        return [p for p in allowed if estimate[p] <= self.prune * best]

    def _decide(self, group: cost.Group, sig: Signature, prepare) -> Choice:
        candidates = self.candidates(group)
        if len(candidates) == 1:
            return Choice(candidates[0], source="only candidate")
        budget = self.settings.budget_s()
        if self.spent_s >= budget:
            if not self._budget_warned:
                self._budget_warned = True
                logger.warning("vera-lightning autotune: the budget of %.1f s is spent; shapes not measured yet "
                               "get the cost model's choice (raise %s to measure more)", budget, ENV_BUDGET)
            return Choice(group.best(), source="cost model (budget spent)")
        try:
            times = self._measure(candidates, prepare(sig.tokens), budget)
        except Exception as err:  # e.g. out of memory: never fail a training step for a measurement
            warnings.warn(f"vera-lightning autotune: measuring {sig.key()} failed ({type(err).__name__}: {err}); "
                          "using the cost model's choice", RuntimeWarning, stacklevel=4)
            return Choice(group.best(), source="cost model (measurement failed)")
        if not times:
            return Choice(group.best(), source="cost model (budget spent)")
        return Choice(min(times, key=times.get), {p: 1e3 * t for p, t in times.items()})

    def _measure(self, candidates: list[str], build, budget: float) -> dict[str, float]:
        """Best seconds per candidate timed, in a worker thread (its own autograd state, no caller hooks)."""
        out: dict[str, Any] = {}
        threads = torch.get_num_threads()

        def work() -> None:
            try:
                # a new thread starts with OpenMP's default team size, not the caller's: measure as the caller runs
                torch.set_num_threads(threads)
                out["times"] = self._time(candidates, build, budget)
            except BaseException as err:  # noqa: B036 - re-raised in the caller's thread
                out["error"] = err

        worker = threading.Thread(target=work, name="vera-lightning-autotune", daemon=True)
        worker.start()
        worker.join()
        if "error" in out:
            raise out["error"]
        return out["times"]

    def _time(self, candidates: list[str], build, budget: float) -> dict[str, float]:
        start = self.timer()
        samples: dict[str, list[float]] = {c: [] for c in candidates}
        try:
            run, alive, last = build(), list(candidates), {}
            for rnd in range(self.warmup + self.repeats):
                for c in list(alive):
                    t0 = self.timer()
                    if self.spent_s + (t0 - start) + last.get(c, 0.0) > budget:
                        return {c: min(v) for c, v in samples.items() if v}
                    run(c)
                    last[c] = self.timer() - t0
                    if rnd >= self.warmup:
                        samples[c].append(last[c])
                if rnd >= self.warmup:
                    fastest = min(min(v) for v in samples.values() if v)
                    alive = [c for c in alive if samples[c] and min(samples[c]) <= self.drop * fastest]
            return {c: min(v) for c, v in samples.items() if v}
        finally:
            spent = self.timer() - start
            self.spent_s += spent
            self.burst_s += spent

    def _flush_report(self) -> None:
        if self._pending:
            logger.info("vera-lightning autotune: measured %d sibling-group shape(s) in %.2f s (%.2f s of the %.0f s "
                        "budget in all; cache %s): %s", len(self._pending), self.burst_s, self.spent_s,
                        self.settings.budget_s(), self.settings.cache_file() or "off", "; ".join(self._pending))
            self._pending, self.burst_s = [], 0.0

    def report(self) -> dict[str, Any]:
        """Settings, time spent and every remembered choice (``{signature key: {path, ms, source}}``)."""
        return {"enabled": self.settings.enabled(), "spent_s": self.spent_s, "budget_s": self.settings.budget_s(),
                "cache_file": str(self.settings.cache_file() or ""), "threads": torch.get_num_threads(),
                "choices": {sig: {"path": c.path, "ms": dict(c.ms), "source": c.source, "machine": machine}
                            for (machine, sig), c in self._choices.items()}}


#: The process's tuner.
TUNER = Tuner()
#: Leader -> the path its last forward outside backward took (replayed when checkpointing recomputes it).
_LAST_PATH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Restore:
    """What :func:`configure_autotune` returns: use it in ``with`` to restore the previous settings on exit."""

    def __init__(self, previous: tuple) -> None:
        self._previous = previous

    def __enter__(self) -> Tuner:
        return TUNER

    def __exit__(self, *exc: object) -> None:
        TUNER.settings, TUNER.timer = self._previous


def configure_autotune(enabled: Optional[bool] = None, cache_file: Union[str, os.PathLike, None] = UNSET,
                       budget_s: Optional[float] = None, timer: Optional[Callable[[], float]] = None,
                       clear: bool = False) -> _Restore:
    """Set how ``auto`` measures paths, for the process (or, used in ``with``, for the block).

    Args:
        enabled: ``False`` lets the cost model decide (as with ``VERA_LIGHTNING_AUTOTUNE=0``), ``True``
            measures even if the variable says off; ``None`` keeps the current setting.
        cache_file: The JSON file of measured choices, or ``None`` for the process only (default: keep;
            ``VERA_LIGHTNING_AUTOTUNE_CACHE`` or ``~/.cache/vera-lightning/autotune.json``).
        budget_s: Seconds of measuring per process (``VERA_LIGHTNING_AUTOTUNE_BUDGET``, default 30).
        timer: The clock measurements read (tests pass a fake one).
        clear: Forget the choices made so far and the time spent (the file is kept).

    Returns:
        A context manager restoring the previous settings on exit (choices made inside are kept).

    Example::

        >>> import vera_lightning
        >>> with vera_lightning.configure_autotune(enabled=False):
        ...     pass  # "auto" takes the cost model's choice here
    """
    previous = (dataclasses.replace(TUNER.settings), TUNER.timer)
    if enabled is not None:
        TUNER.settings.enabled_set = bool(enabled)
    if cache_file is not UNSET:
        TUNER.settings.cache_set = cache_file
    if budget_s is not None:
        TUNER.settings.budget_set = float(budget_s)
    if timer is not None:
        TUNER.timer = timer
    if clear:
        TUNER.clear()
    return _Restore(previous)


def autotune_report() -> dict[str, Any]:
    """:meth:`Tuner.report` of the process's tuner."""
    return TUNER.report()


def choose_path(layer: AdaptedLayer, x: torch.Tensor, apply: Apply) -> str:
    """The path ``"auto"`` takes for this forward of ``layer``: a sibling's, the tuner's, or the cost model's.

    ``apply`` runs one path of the path table (:mod:`vera_lightning.forward.dispatch` passes it, so
    the measured code is the code that runs).
    """
    group = cost.group_of(layer, x)
    if isinstance(group, str):
        return group
    if in_backward():  # checkpointing's recomputation: exactly the path this leader's forward took
        replay = _LAST_PATH.get(layer)  # (reentrant checkpointing ran the forward without grad: none)
        if replay is None and TUNER.settings.enabled():
            replay = TUNER.remembered(group)
        return replay if replay is not None else group.best()
    if not group.learned or x.device.type == "meta" or not TUNER.settings.enabled():
        path = group.best()  # a leader's first forward does not know its siblings yet: tune from the second
    else:
        def prepare(tokens: int) -> Callable[[], Callable[[str], None]]:
            probe = GroupProbe.of(layer, x, tokens, group.outs)  # here: autocast is per thread
            return lambda: probe.build(apply)

        path = TUNER.choose(group, prepare)
    _LAST_PATH[layer] = path
    return path
