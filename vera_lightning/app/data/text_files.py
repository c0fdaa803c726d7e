"""Reading users' text files: lines split on ``\\n`` only, no UTF-8 BOM, one message for bytes that are not UTF-8.

* :func:`read_lines` gives a file's lines as an editor numbers them: split on ``\\n`` alone (one ``\\r`` before it,
  a CRLF file's, is dropped), so line ``i`` of the result is line ``i + 1`` of the file. ``str.splitlines`` would
  also split on U+2028/U+2029, form feeds, ``\\x1c``-``\\x1e``, ``\\x85`` and a lone ``\\r``, and a file's rows would
  no longer line up with its lines. A UTF-8 byte-order mark (Excel, Notepad) is not part of the first line.
* :func:`undecodable_line` finds the file line a ``UnicodeDecodeError`` came from, so the message names the file,
  the line, the byte and its offset, and the fix, instead of a codec's offset into the whole file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

__all__ = ["read_text", "read_lines", "iter_lines", "undecodable_line"]


def undecodable_line(path: Path, error: UnicodeDecodeError) -> ValueError:
    """A message naming the file, the line and the byte (column and offset in the file) that is not UTF-8."""
    data = path.read_bytes()
    offset = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            return ValueError(
                f"{path}:{number}: not UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}), byte offset "
                f"{offset + err.start} of the file; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)"
            )
        offset += len(line) + 1
    return ValueError(f"{path}: not UTF-8 ({error}); save the file as UTF-8")


def read_text(path: Path) -> str:
    """The text of a UTF-8 file, without a leading byte-order mark.

    Raises:
        ValueError: Naming the file, line and byte that is not UTF-8 (:func:`undecodable_line`).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise undecodable_line(path, err) from None


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on ``\\n`` only (see the module docstring).

    Returns:
        One entry per line, without its ``\\n`` (or CRLF); no entry for the empty text after a final newline.

    Raises:
        ValueError: Naming the file, line and byte that is not UTF-8.
    """
    lines = read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]



def iter_lines(path: Path) -> Iterator[str]:
    """:func:`read_lines`, streamed: one line at a time, never the whole file in memory.

    Raises:
        ValueError: Naming the file, line and byte that is not UTF-8 (when that line is reached).
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle):  # binary lines end at b"\n" only
            if number == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise undecodable_line(path, err) from None
            line = line[:-1] if line.endswith("\n") else line
            yield line[:-1] if line.endswith("\r") else line
