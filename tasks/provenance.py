"""What a score was computed on: the files a split came from and the records scored.

A run's ``run.json`` keeps :func:`evaluated_data` for each score, so that the leaderboard compares
only the same evaluation (the same data set split, records and annotation files) and puts
different ones in different columns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_fingerprint(path: str | Path, block: int = 1 << 20) -> dict:
    """A file's size, modification time and the SHA-256 of its first and last ``block`` bytes:
    cheap on gigabyte annotation files, and a changed file almost surely changes one of them."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(block))
        if stat.st_size > block:
            f.seek(max(block, stat.st_size - block))
            digest.update(f.read(block))
    return {"bytes": stat.st_size, "mtime": stat.st_mtime, "head_tail_sha256": digest.hexdigest()}


def evaluated_data(task, split: str, records: list[dict], max_records: int | None) -> dict:
    """The split and the data set's split it names, the annotation files the records came from
    (:func:`file_fingerprint`), the number of records and ``max_records``, and a hash of the
    records' ids in order (a subset, another selection or another order of the same files
    differs)."""
    sources = sorted({str(r["source"]) for r in records if r.get("source")})
    ids = hashlib.sha256(json.dumps([str(r["id"]) for r in records]).encode()).hexdigest()
    return {"split": split, "split_name": task.split_name(split), "records": len(records),
            "max_records": max_records, "ids_sha256": ids,
            "files": {path: file_fingerprint(path) for path in sources}}  # fmt: skip
