"""A Lightning callback that appends ``{"step", "rss_gib", "t_s"}`` to a JSON-lines file after every training step,
for ``bench_rss_steps.py --app`` (the app's own training loop, run as a user runs it)::

    PYTHONPATH=benchmarks python scripts/train.py experiment=e2e_smollm2 \\
        +callbacks.rss_trace._target_=rss_trace.RssTrace +callbacks.rss_trace.path=/tmp/trace.jsonl
"""

from __future__ import annotations

import json
import os
import time

import lightning.pytorch as pl

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gib() -> float:
    """This process's resident set size (``/proc/self/statm``), GiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**30


class RssTrace(pl.Callback):
    """Append the RSS after each training step to ``path`` (one JSON object per line)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "rss_gib": round(rss_gib(), 4),
                                 "t_s": round(time.perf_counter() - self.start, 2),
                                 "width": int(batch["input_ids"].shape[1])}) + "\n")
