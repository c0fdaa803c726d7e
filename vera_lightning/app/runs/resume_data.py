"""A resume continues on the data it started with: :func:`check_resume_data`.

The run's ``.hydra/config.yaml`` (written when it was accepted) is the record of its ``data`` settings; a resume whose
settings differ (another ``data.data_dir``, file, length, template...) is refused naming both values. Keys in
:data:`RESUME_FREE_DATA` may change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vera_lightning.app.data.schema import data_settings

__all__ = ["RESUME_FREE_DATA", "check_resume_data"]

#: ``data`` settings a resumed run may change: they do not change what is trained or how it is scored
#: (``pad_to_multiple_of`` adds masked padding only; a run recorded before it existed has none in its record).
RESUME_FREE_DATA = ("eval_batch_size", "num_workers", "cache", "cache_dir", "pad_to_multiple_of")


def _recorded_data(record: Path) -> dict[str, Any]:
    recorded = OmegaConf.load(record)
    try:
        return OmegaConf.to_container(recorded.data, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation this process cannot resolve: compare as written
        return OmegaConf.to_container(recorded.data, resolve=False)  # type: ignore[return-value]


def _same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key.endswith("_dir") and isinstance(old, str) and isinstance(new, str):
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return False


def check_resume_data(output_dir: Path, data: Any, ckpt_value: Any) -> None:
    """Refuse a resume into ``output_dir`` whose ``data`` settings differ from those the run recorded.

    The run's ``.hydra/config.yaml`` (written when it was accepted) is the record; a directory without one (a
    checkpoint resumed into a new directory) is not checked. Keys in :data:`RESUME_FREE_DATA` may change.

    Args:
        output_dir: The run directory.
        data: This command's ``data`` config (resolved values are compared).
        ckpt_value: ``ckpt_path`` as given (for the message).

    Raises:
        ValueError: Naming every differing ``data.<key>``, the recorded and the given value, and the fixes.
    """
    record = output_dir / ".hydra" / "config.yaml"
    if not record.is_file():
        return
    try:
        old = _recorded_data(record)
    except Exception:  # not a config this app wrote (no data group, not YAML): nothing to compare with
        return
    new = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    if not isinstance(old, dict):
        return
    old, new = data_settings(old), data_settings(new)  # the same keys on both sides; an unset fallback is None
    changed = [f"data.{k}={old.get(k)!r} (recorded) vs {new.get(k)!r} (given)"
               for k in sorted(set(old) | set(new)) if k not in RESUME_FREE_DATA
               and not _same_value(k, old.get(k), new.get(k))]
    if changed:
        raise ValueError(
            f"ckpt_path={ckpt_value}: the run in {output_dir} was trained with other data settings than this command "
            f"gives ({record}): {'; '.join(changed)}. A resumed run continues on the data it started with: give the "
            "recorded values (or leave those overrides out), or start a new run from that checkpoint in another "
            "directory (hydra.run.dir=<new dir> ckpt_path=<the .ckpt file>). Nothing was changed"
        )


