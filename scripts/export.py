"""Export a trained adapter for serving: ``python scripts/export.py adapter=PATH format=merged|lora|gguf-lora``.

A thin ``@hydra.main`` wrapper around :func:`vera_lightning.app.commands.export.export` (config
``conf/export.yaml``, schema ``export_schema``). It checks everything first (adapter, base and seed, format, rank,
dtype, output) and then writes only the output, beside its target, renamed into place under its lock; an existing
output is replaced only if it is an earlier export of the same format and ``overwrite=true``. Hydra writes nothing.
Examples::

    python scripts/export.py adapter=outputs/2026-11-23/10-00-00/adapter format=merged output=smollm2-e2e
    python scripts/export.py adapter=outputs/.../adapter format=lora output=lora-e2e            # vLLM, TGI, PEFT
    python scripts/export.py adapter=outputs/.../adapter format=lora rank=64 output=lora-r64   # a rank limit
    python scripts/export.py adapter=outputs/.../adapter format=gguf-lora output=e2e.gguf      # llama.cpp, Ollama
    python scripts/export.py adapter=outputs/.../checkpoints/last.ckpt format=merged output=m  # a slim .ckpt
    python scripts/export.py adapter=outputs/.../adapter format=merged dtype=bf16 output=m16  # bf16 weights

Errors the user caused print their message only (``HYDRA_FULL_ERROR=1`` for the traceback). docs/export.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vera_lightning.app import register_configs
from vera_lightning.app.commands.cli import user_errors
from vera_lightning.app.commands.export import export
from vera_lightning.app.commands.export_plan import register_export_schema

register_configs()  # VeraConfig as the schema of the `vera` group, before Hydra composes
register_export_schema()  # conf/export.yaml's keys and types (export_schema)


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> str:
    """Export and return the output path."""
    return str(export(cfg).output)


if __name__ == "__main__":
    main()
