"""Careful reading of the files a data set is made of, and which files a reader read.

Every reader goes through :func:`read_json` / :func:`read_jsonl` / :func:`read_text`: a bad file is
one :class:`DataError` naming it (never a traceback from deep inside, never a FIFO that blocks),
and :func:`recording_sources` lists the files read meanwhile — what a split's record cache
(:mod:`tasks.records`) is keyed on.
"""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


_RECORDERS: list[list[Path]] = []  # the open recording_sources() blocks of this process


@contextlib.contextmanager
def recording_sources() -> Iterator[list[Path]]:
    """The files read (through this module) while the block runs, in order, once each; blocks
    nest (an outer block sees what the inner ones saw)."""
    found: list[Path] = []
    _RECORDERS.append(found)
    try:
        yield found
    finally:
        _RECORDERS.remove(found)


def note_source(path: str | Path) -> None:
    """Adds ``path`` to every open :func:`recording_sources` block (a file a split depends on,
    also when it came from a cache of another split)."""
    for found in _RECORDERS:
        if Path(path) not in found:
            found.append(Path(path))


# -- careful reading ------------------------------------------------------------------------------
def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is no regular file to read (``"not found"``, ``"is not a regular file (a
    FIFO)"``, …), or None when it is one. A FIFO, device or folder is never opened: reading a FIFO
    blocks until a writer comes."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as err:
        return f"cannot be opened ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
    return f"is not a regular file ({kind}): not read"


def regular_file(path: str | Path) -> Path:
    """``path`` when it names a regular file; otherwise a one-line DataError naming it."""
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"{path}: file {problem}")
    return Path(path)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a regular file, or a DataError naming it."""
    path = regular_file(path)
    note_source(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or a one-line DataError naming the file (missing, not a regular
    file, not UTF-8, malformed, or nested too deeply for the parser)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON Lines file (lines end at ``\\n`` only: a U+2028 inside a string is
    text), or a one-line DataError naming the file and line."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: malformed JSON ({err.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: line {number}: JSON nested too deeply to read") from None
    return rows
