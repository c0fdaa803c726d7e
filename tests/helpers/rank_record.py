"""A callback the distributed app tests pass through ``callbacks=``: each rank writes what it trained on and its λ's."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class RankRecord(pl.Callback):
    """Writes ``<out>/rank<r>.json``: every training batch's rows (ids and labels, padding removed) and the λ's."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            keep = mask.bool()
            self.rows.append({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist(),
                              "padding_labels": labels[~keep].tolist()})

    def on_train_end(self, trainer, pl_module):
        lambdas = {n: p.detach().tolist() for n, p in pl_module.named_parameters() if "vera_lambda" in n}
        record = {"rows": self.rows, "lambdas": lambdas, "world_size": trainer.world_size}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record), encoding="utf-8")
