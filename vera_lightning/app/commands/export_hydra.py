"""``scripts/export.py``'s Hydra callback: the run directory is checked first and left as it was found.

An export writes only its output (``output=``), never into Hydra's run directory: ``conf/export.yaml`` sets
``hydra.output_subdir: null`` (no ``.hydra/``) and logs to the console only (no job log file). Hydra still creates
``hydra.run.dir`` (``outputs/export/<date>/<time>/`` by default) before the task runs; :class:`ExportRunDir` notes
which of its folders did not exist yet (``on_run_start``) and removes them again when the run ends, accepted or
refused, if they are still empty (``on_run_end``). Like
:class:`~vera_lightning.app.runs.run_dirs.RunDirCheck`, it first refuses a ``hydra.run.dir`` that is, or lies
inside, an existing file, in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vera_lightning.app.runs.run_dirs import RunDirCheck

__all__ = ["ExportRunDir"]


class ExportRunDir(RunDirCheck):
    """Refuse a ``hydra.run.dir`` inside a file; remove the folders Hydra created for it if still empty at the end."""

    def __init__(self) -> None:
        self.created: list[Path] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_run_start(config, **kwargs)
        run_dir = Path(os.path.abspath(Path(str(config.hydra.run.dir)).expanduser()))
        self.created = [p for p in (run_dir, *run_dir.parents) if not os.path.lexists(p)]  # deepest first

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        for path in self.created:
            try:
                path.rmdir()  # only an empty folder goes; a folder something was written into stays
            except OSError:
                break
        self.created = []
