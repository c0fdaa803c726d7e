"""Export a trained adapter for serving: ``python scripts/export.py adapter=PATH format=merged|lora|gguf-lora``.

A thin ``@hydra.main`` wrapper around :func:`vera_lightning.app.commands.export.export` (config
``conf/export.yaml``). It checks everything first (adapter, base, format, rank, output) and then writes the
output beside its target and renames it into place; an existing output is kept unless ``overwrite=true``.
Examples::

    python scripts/export.py adapter=outputs/2026-11-23/10-00-00/adapter format=merged output=smollm2-e2e
    python scripts/export.py adapter=outputs/.../adapter format=lora output=lora-e2e            # vLLM, TGI, PEFT
    python scripts/export.py adapter=outputs/.../adapter format=lora rank=64 output=lora-r64   # a rank limit
    python scripts/export.py adapter=outputs/.../adapter format=gguf-lora output=e2e.gguf      # llama.cpp, Ollama
    python scripts/export.py adapter=outputs/.../checkpoints/last.ckpt format=merged output=m  # a slim .ckpt

Errors the user caused print their message only (``HYDRA_FULL_ERROR=1`` for the traceback). docs/export.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vera_lightning.app import register_configs
from vera_lightning.app.commands.cli import user_errors
from vera_lightning.app.commands.export import export

register_configs()  # VeraConfig as the schema of the `vera` group, before Hydra composes


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> str:
    """Export and return the output path."""
    return str(export(cfg).output)


if __name__ == "__main__":
    main()
