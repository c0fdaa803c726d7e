"""Reading users' text files: the one message for a file that is not UTF-8.

:func:`undecodable_line` finds the file line a ``UnicodeDecodeError`` came from, so the message names the file,
the line, the byte and the fix instead of a codec's offset into the whole file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["undecodable_line"]


def undecodable_line(path: Path, error: UnicodeDecodeError) -> ValueError:
    """A message naming the file, the line and the byte that is not UTF-8."""
    data = path.read_bytes()
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            return ValueError(
                f"{path}:{number}: not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); re-save the "
                "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            )
    return ValueError(f"{path}: not UTF-8 ({error}); re-save the file as UTF-8")
