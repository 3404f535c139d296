"""A directory of computed tensors, keyed by what they were computed from.

Work that depends only on a weight's content and a few settings — Null-LoRA's SVD of each base
weight — is written once as ``<name>-<key>.safetensors`` and read back by the next run (or by the
next copy of the same base in one run) instead of being recomputed. Writes are atomic (a temporary
file renamed onto the name), so concurrent ranks writing the same entry are safe. The caller names
the directory; the library never picks one.

>>> import tempfile, torch
>>> w = torch.eye(3)
>>> key = content_key(w, ["example", 1])
>>> with tempfile.TemporaryDirectory() as d:
...     first = cached(d, "norms", key, lambda: {"norm": w.norm(dim=1), "rows": 3})
...     again = cached(d, "norms", key, lambda: 1 / 0)  # read, not recomputed
>>> again["rows"], torch.equal(again["norm"], first["norm"])
(3, True)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["cached", "content_key"]


def content_key(tensor: torch.Tensor, params: list[Any]) -> str:
    """32 hex digits of SHA-256 over ``tensor``'s values (as float32) and ``params`` (as JSON)."""
    digest = hashlib.sha256(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(json.dumps(params).encode())
    return digest.hexdigest()[:32]


def cached(
    directory: str | os.PathLike,
    name: str,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor | int | float]],
) -> dict[str, torch.Tensor | int | float]:
    """``compute()``, read from ``directory/<name>-<key>.safetensors`` when that file exists and
    written there otherwise.

    Args:
        directory: the cache directory (created on the first write).
        name: what the entries are (the file-name prefix).
        key: the entry's key, e.g. :func:`content_key` of what it is computed from.
        compute: makes the entry: names → tensors or Python ints/floats (stored as 0-d tensors
            and given back as Python numbers).

    Returns:
        The entry, computed or read.
    """
    path = Path(directory) / f"{name}-{key}.safetensors"
    if path.is_file():
        return {k: (v.item() if v.dim() == 0 else v) for k, v in load_file(str(path)).items()}
    result = compute()
    stored = {k: _as_tensor(v) for k, v in result.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(stored, str(tmp))
    os.replace(tmp, path)
    return result


def _as_tensor(value: torch.Tensor | int | float) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").contiguous()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a cache entry holds tensors, ints and floats, not {type(value).__name__}")
    return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
