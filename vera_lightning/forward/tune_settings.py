"""The autotuner's settings: what the code set (:func:`vera_lightning.configure_autotune`), else the environment.

=================================  =========================================================================
``VERA_LIGHTNING_AUTOTUNE``        ``0``/``off``/``false``/``no``: tuning off, the cost model decides (default on)
``VERA_LIGHTNING_AUTOTUNE_CACHE``  the JSON file of measured choices, or ``off`` to keep them in the process only;
                                   default ``$VERA_LIGHTNING_CACHE/autotune.json``
``VERA_LIGHTNING_CACHE``           vera-lightning's cache directory (default ``$XDG_CACHE_HOME/vera-lightning``,
                                   else ``~/.cache/vera-lightning``)
``VERA_LIGHTNING_AUTOTUNE_BUDGET`` seconds of measuring per process (default 30)
=================================  =========================================================================

The variables are read at every decision, so a change takes effect at once; a value set in code wins.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vera_lightning.forward.tune_cache import default_cache_file

__all__ = ["ENV_ENABLE", "ENV_CACHE", "ENV_BUDGET", "DEFAULT_BUDGET_S", "UNSET", "Settings"]

ENV_ENABLE = "VERA_LIGHTNING_AUTOTUNE"
ENV_CACHE = "VERA_LIGHTNING_AUTOTUNE_CACHE"
ENV_BUDGET = "VERA_LIGHTNING_AUTOTUNE_BUDGET"
DEFAULT_BUDGET_S = 30.0
OFF, ON = ("0", "off", "false", "no"), ("1", "on", "true", "yes")
#: "not set in code" for the cache file (where ``None`` means "no file").
UNSET: Any = object()


@dataclass
class Settings:
    """Values set in code (``None``/:data:`UNSET`: not set, the environment decides)."""

    enabled_set: Optional[bool] = None
    cache_set: Any = UNSET
    budget_set: Optional[float] = None

    def enabled(self) -> bool:
        """Whether ``auto`` measures (default on)."""
        if self.enabled_set is not None:
            return self.enabled_set
        value = os.environ.get(ENV_ENABLE, "").strip().lower()
        if value and value not in OFF + ON:
            warnings.warn(f"{ENV_ENABLE}={value!r}: expected one of {ON + OFF}; tuning stays on", stacklevel=4)
        return value not in OFF

    def cache_file(self) -> Optional[Path]:
        """The JSON file, or ``None`` (choices kept in the process only)."""
        if self.cache_set is not UNSET:
            return None if self.cache_set is None else Path(self.cache_set)
        value = os.environ.get(ENV_CACHE)
        if value is None:
            return default_cache_file()
        return None if value.strip().lower() in ("", "none", *OFF) else Path(value).expanduser()

    def budget_s(self) -> float:
        """Seconds of measuring allowed per process."""
        if self.budget_set is not None:
            return self.budget_set
        try:
            return float(os.environ.get(ENV_BUDGET, DEFAULT_BUDGET_S))
        except ValueError:
            warnings.warn(f"{ENV_BUDGET}={os.environ[ENV_BUDGET]!r} is not a number of seconds; using "
                          f"{DEFAULT_BUDGET_S}", stacklevel=4)
            return DEFAULT_BUDGET_S
