"""An export's one output: where it may go, what it may replace, and the check under the lock before it is published.

An export owns only its output (``docs/export.md``, *What export writes*). :func:`output_problems` refuses, before
any model is loaded:

* an output that **is, contains or lies inside an input** (:class:`Inputs`): the adapter, the ``.ckpt``, the
  training run's records (``.hydra``, ``adapter``, ``checkpoints``, ...), the base model's folders; and one that
  **is or contains** the training run's directory, the ``.ckpt``'s folder or the current directory (a new output
  inside them is fine: that is where the default output goes);
* an existing output that is not an **earlier export of the same format**, recognisable by its own files
  (:func:`output_kind`): ``merged``, a folder holding only a Hugging Face model's files (``config.json``,
  ``*.safetensors``, ``generation_config.json``, tokenizer files, the chat template); ``lora``, a folder holding
  ``adapter_config.json`` with ``peft_type`` ``LORA`` and ``adapter_model.safetensors`` (and PEFT's ``README.md``);
  ``gguf-lora``, a GGUF file whose header says it is a LoRA adapter. ``overwrite=true`` replaces only such an earlier
  export; anything else is refused, naming the files that are not the format's;
* a folder it cannot write in (read-only, no permission), naming ``output=`` and the fix.

The same existence check runs again under the output's save lock (:func:`check_before_publish`, the ``check`` of
:func:`vera_lightning.publish`), so a second export to the same output waits for the first and is then refused
(or, with ``overwrite=true``, replaces it): never silently. Staging leftovers of exports killed by earlier versions
(``.<name>.export-XXXX/``, ``.<name>.export-old-<pid>``, ``.<name>.XXXX.partial``) are removed there too, when
recognisably an export's; the current staging area (``.<name>.vera-tmp/``) is cleaned by ``publish`` itself.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vera_lightning import ADAPTER_CONFIG_NAME, is_gguf_lora_file

__all__ = ["GGUF_MAGIC", "MERGED_FILES", "Inputs", "output_kind", "output_problems", "existing_output_problem",
           "check_before_publish", "clean_export_leftovers"]

GGUF_MAGIC = b"GGUF"
#: The files a ``merged`` export writes (``save_pretrained`` of a model and its tokenizer), as name patterns.
MERGED_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.*.model",
                "chat_template.jinja", "chat_template.json")
LORA_FILES = (ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "README.md")


@dataclass(frozen=True)
class Inputs:
    """What an export reads, which its output must leave alone.

    Attributes:
        holders: ``(path, what)``: the output may not be, contain or lie inside these (the adapter, the ``.ckpt``,
            a run's records, the base's folders).
        containers: ``(path, what)``: the output may not be or contain these (a run's directory, the ``.ckpt``'s
            folder, the current directory); a new output inside them is fine.
    """

    holders: tuple[tuple[Path, str], ...] = ()
    containers: tuple[tuple[Path, str], ...] = ()


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(output: Path, path: Path) -> Optional[str]:
    if output == path:
        return "is"
    if output in path.parents:
        return "contains"
    if path in output.parents:
        return "lies inside"
    return None


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _foreign(fmt: str, directory: Path) -> list[str]:
    """Entries of ``directory`` that a ``fmt`` export does not write (sub-folders, links, other names)."""
    patterns = MERGED_FILES if fmt == "merged" else LORA_FILES
    return [name for name in _listing(directory)
            if not (directory / name).is_file() or (directory / name).is_symlink()
            or not any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def output_kind(path: Path) -> tuple[Optional[str], str]:
    """``(format, description)`` of an earlier export at ``path`` (``format`` ``None``: not an export's output)."""
    if path.is_symlink():
        return None, "a symbolic link"
    if path.is_file():
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError:
            magic = b""
        if magic != GGUF_MAGIC:
            return None, "a file that is not a GGUF file"
        if not is_gguf_lora_file(str(path)):
            return None, "a GGUF file that is not a LoRA adapter (general.type=adapter, adapter.type=lora)"
        return "gguf-lora", "a GGUF LoRA adapter"
    if not path.is_dir():
        return None, "not a file nor a folder"
    names = _listing(path)
    if ADAPTER_CONFIG_NAME in names and not _foreign("lora", path):
        try:
            kind = json.loads((path / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")).get("peft_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == "LORA" and "adapter_model.safetensors" in names:
            return "lora", f"a LoRA adapter ({', '.join(names)})"
        return None, f"a {kind or 'non-PEFT'} adapter ({', '.join(names)}), not an exported LoRA"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names) and not _foreign("merged", path):
        return "merged", f"a model folder ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
    return None, f"a folder holding {names[:6]}"


def existing_output_problem(fmt: str, output: Path, overwrite: bool) -> Optional[str]:
    """Why the existing ``output`` may not be written (``None``: absent, an empty folder, or an earlier ``fmt``
    export and ``overwrite``)."""
    shown = str(output)
    if not os.path.lexists(output):
        return None
    if output.is_dir() and not output.is_symlink() and not _listing(output):
        return None  # an empty folder: nothing in it is lost
    kind, what = output_kind(output)
    if kind == fmt:
        if overwrite:
            return None
        return (f"output={shown!r} already holds an earlier {fmt} export ({what}); pass overwrite=true to replace that "
                "export (nothing else is there), or choose another path")
    if kind is not None:
        return (f"output={shown!r} holds a {kind} export ({what}), not a {fmt} one; overwrite=true replaces only an "
                f"earlier {fmt} export. Choose another path")
    if fmt == "gguf-lora" and output.is_dir():
        return (f"output={shown!r} is a folder; format=gguf-lora writes one file: give a .gguf file path, e.g. "
                f"output={str(output / 'adapter-lora.gguf')!r}")
    if output.is_symlink() or not output.is_dir():
        expects = "one .gguf file" if fmt == "gguf-lora" else "a folder"
        return (f"output={shown!r} is {what}, which export did not write (format={fmt} writes {expects}); it is "
                "never replaced, not even with overwrite=true. Choose another path")
    foreign = _foreign(fmt, output) or _listing(output)
    return (f"output={shown!r} holds {foreign[:5]}, which format={fmt} does not write ({what}); export never "
            "replaces a folder holding files it did not write, not even with overwrite=true. Choose a new or empty "
            "folder, or move those files away")


def _writable_problem(output: Path) -> Optional[str]:
    parent = output.parent
    if not parent.is_dir():
        return (f"output={str(output)!r}: its folder {str(parent)!r} does not exist" +
                (" (it is a file)" if parent.exists() else "") + "; create it first, or choose another output=")
    if os.access(parent, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    return (f"output={str(output)!r}: its folder {str(parent)!r} {why}, so the export could not be written there; "
            "nothing was loaded or written. Choose output= in a folder you can write")


def output_problems(fmt: str, output: Path, overwrite: bool, inputs: Inputs) -> list[str]:
    """Every reason ``output`` may not be written by a ``fmt`` export (module docstring), with the fix."""
    real = _real(output)
    problems = []
    for path, what in inputs.holders:
        relation = _relation(real, _real(path))
        if relation:
            problems.append(f"output={str(output)!r} {relation} {what} ({path}), which this export reads; choose a "
                            "path outside it")
    for path, what in inputs.containers:
        relation = _relation(real, _real(path))
        if relation in ("is", "contains"):
            problems.append(f"output={str(output)!r} {relation} {what} ({path}); the export would replace what it "
                            f"holds. Choose a new path, e.g. output={str(path / _default_name(fmt))!r}")
    if problems:
        return problems
    if fmt == "gguf-lora" and output.suffix != ".gguf" and not output.is_dir():
        return [f"output={str(output)!r}: format=gguf-lora writes one file; give a path ending in .gguf, e.g. "
                f"output={str(output.with_suffix('.gguf'))!r}"]
    existing = existing_output_problem(fmt, output, overwrite)
    if existing:
        return [existing]
    writable = _writable_problem(output)
    return [writable] if writable else []


def _default_name(fmt: str) -> str:
    return {"merged": "merged", "lora": "lora", "gguf-lora": "adapter-lora.gguf"}.get(fmt, "export")


def clean_export_leftovers(output: Path) -> list[str]:
    """Remove what exports killed by earlier versions left beside ``output`` (call under its save lock).

    ``.<name>.export-XXXX/`` staging folders holding only ``adapter/``/``model/``; ``.<name>.export-old-<pid>``, an
    earlier output parked during a replace (renamed back if ``output`` is missing, else removed), and
    ``.<name>.XXXX.partial`` GGUF files. Anything else is left alone.

    Returns:
        The names removed or restored.
    """
    parent, name = output.parent, output.name
    done = []
    for entry in sorted(os.listdir(parent)) if parent.is_dir() else ():
        path = parent / entry
        if path.is_symlink():
            continue
        if entry.startswith(f".{name}.export-old-"):
            if output_kind(path)[0] is None:
                continue
            if not os.path.lexists(output):
                os.rename(path, output)
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif entry.startswith(f".{name}.export-") and path.is_dir():
            if not set(os.listdir(path)) <= {"adapter", "model"}:
                continue
            shutil.rmtree(path)
        elif entry.startswith(f".{name}.") and entry.endswith(".partial") and path.is_file():
            with open(path, "rb") as handle:
                magic = handle.read(4)
            if magic not in (b"", GGUF_MAGIC):
                continue
            path.unlink()
        else:
            continue
        done.append(entry)
    return done


def check_before_publish(fmt: str, output: Path, overwrite: bool) -> None:
    """The check under ``output``'s save lock: clean old leftovers, then refuse an output that appeared or changed
    meanwhile (another export was faster).

    Raises:
        FileExistsError: Naming the output, what it holds now and the fix; nothing was written.
    """
    clean_export_leftovers(output)
    problem = existing_output_problem(fmt, output, overwrite)
    if problem:
        raise FileExistsError(f"{problem}. It was written while this export ran (by another process); nothing was "
                              "written by this one")
