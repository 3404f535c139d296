"""A split's records in compact, shared, memory-mapped storage, and the on-disk record cache.

A :class:`RecordStore` keeps the records of one split as columns of numpy arrays in ``.npy`` files,
mapped read-only: the pages are the operating system's, shared by every process that maps them (the
DataLoader workers, the ranks of a node), and no Python object is stored — ``store[i]`` builds the
record dict a task's reader returns (same keys, same values, same types) when it is asked for, and
keeps nothing. Nothing is ever pickled: every file is written and read with ``allow_pickle=False``.

A column (one record key) is encoded by the kind of all its values:

========================  ===================================================================
values                    arrays
========================  ===================================================================
int / float / bool        one array (ints in the narrowest integer type that holds them)
str / ``Path``            UTF-8 bytes in one ``uint8`` buffer + offsets, or — when at most half
                          the values are distinct (``source``, image paths, answer types) —
                          categorical: integer codes into a table of the distinct strings
list                      offsets (or one width when every list has the same length) + a column
                          of all the items, encoded by these same rules
dict with str keys        offsets (or a width) + a key column + a value column (VQA's ``label``)
mixed kinds (1 and "a")   each value's JSON text, a str column, decoded by ``json.loads``
========================  ===================================================================

A key some records lack has a ``present`` mask; ``None`` values a ``null`` mask. A column that mixes
kinds JSON cannot carry exactly (a ``Path`` beside a ``str``, a tuple) is a TypeError when written.

:func:`cached_read` keeps a store per (reader, version, split, root, options) under a cache folder,
keyed by the fingerprints of the files it was read from; a changed source, a corrupt or a partial
cache is rebuilt, with one log line saying why.

Example:
    >>> records = [{"id": 1, "images": [Path("a.jpg")]}]
    >>> store = RecordStore.write(records, Path("/tmp/s"))  # doctest: +SKIP
    >>> store[0]  # doctest: +SKIP
    {'id': 1, 'images': [PosixPath('a.jpg')]}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .files import DataError, file_problem
from .provenance import file_fingerprint

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps a cache whole
    fcntl = None

log = logging.getLogger("vlpeft.records")

FORMAT = 1  # the layout of columns.json and meta.json; another value is rebuilt
_PATH = type(Path())
_ABSENT = object()  # a key a record lacks (a presence mask), unlike None (a null mask)
_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


class StoreError(DataError):
    """A record store that does not open cleanly (missing, truncated, inconsistent): rebuild it."""


# -- encoding ------------------------------------------------------------------------------------
def _narrow(values: np.ndarray) -> np.ndarray:
    """Integers in the narrowest type that holds them (read back with ``int()``)."""
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = int(values.min()), int(values.max())
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


def _kind(value: Any) -> str:
    kind = type(value)
    if kind in (bool, int, float, str, list):
        return kind.__name__
    if kind is _PATH:
        return "path"
    if kind is dict and all(type(k) is str for k in value):
        return "dict"
    return "other"


def _json_exact(value: Any) -> bool:
    """Whether ``json.loads(json.dumps(value))`` gives ``value`` back, types included."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return True
    if kind is list:
        return all(map(_json_exact, value))
    return kind is dict and all(type(k) is str and _json_exact(v) for k, v in value.items())


def _encode(values: list, name: str, arrays: dict[str, np.ndarray]) -> dict:
    """The spec of a column of ``values`` (its arrays added to ``arrays`` under ``name.*``)."""
    kinds = {_kind(v) for v in values if v is not None and v is not _ABSENT}
    if len(kinds) > 1 or "other" in kinds:
        return _encode_json(values, name, arrays)
    if not kinds:
        return {"kind": "null"}
    kind = kinds.pop()
    filler = {"bool": False, "int": 0, "float": 0.0, "str": "", "path": "", "list": [], "dict": {}}
    spec: dict = {}
    if any(v is None for v in values):
        arrays[f"{name}.null"] = np.array([v is None for v in values], dtype=bool)
        spec["null"] = f"{name}.null"
    filled = [filler[kind] if v is None or v is _ABSENT else v for v in values]
    if kind in ("str", "path"):
        return {**spec, **_encode_text([str(v) for v in filled], name, arrays, kind == "path")}
    if kind in ("list", "dict"):
        spec.update(kind=kind, **_encode_spans([len(v) for v in filled], name, arrays))
        if kind == "list":
            return {
                **spec,
                "items": _encode([x for v in filled for x in v], f"{name}.items", arrays),
            }
        spec["keys"] = _encode([k for v in filled for k in v], f"{name}.keys", arrays)
        values = [x for v in filled for x in v.values()]
        return {**spec, "values": _encode(values, f"{name}.values", arrays)}
    try:
        data = np.array(filled, dtype={"bool": bool, "int": np.int64, "float": np.float64}[kind])
    except OverflowError:  # an integer beyond 64 bits: JSON keeps it exactly
        return _encode_json(values, name, arrays)
    arrays[f"{name}.data"] = _narrow(data) if kind == "int" else data
    return {**spec, "kind": kind, "data": f"{name}.data"}


def _encode_text(texts: list[str], name: str, arrays: dict, path: bool = False) -> dict:
    """Strings as one UTF-8 buffer + offsets, or categorical when at most half are distinct."""
    table: dict[str, int] = {}
    codes = [table.setdefault(t, len(table)) for t in texts]
    if texts and len(table) <= len(texts) // 2:
        arrays[f"{name}.codes"] = _narrow(np.array(codes, dtype=np.int64))
        table_spec = _encode_bytes(list(table), f"{name}.table", arrays, path)
        return {"kind": "cat", "codes": f"{name}.codes", "table": table_spec}
    return _encode_bytes(texts, name, arrays, path)


def _encode_bytes(texts: list[str], name: str, arrays: dict, path: bool) -> dict:
    # surrogatepass: json.loads gives lone surrogates ("\ud800") back, and so must we
    blobs = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)), out=offsets[1:])
    arrays[f"{name}.bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    arrays[f"{name}.offsets"] = _narrow(offsets)
    return {"kind": "str", "path": path, "bytes": f"{name}.bytes", "offsets": f"{name}.offsets"}


def _encode_spans(lengths: list[int], name: str, arrays: dict) -> dict:
    if lengths and len(set(lengths)) == 1:  # every list as long (images: one, or NLVR²'s two)
        return {"width": lengths[0]}
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.array(lengths, dtype=np.int64), out=offsets[1:])
    arrays[f"{name}.offsets"] = _narrow(offsets)
    return {"offsets": f"{name}.offsets"}


def _encode_json(values: list, name: str, arrays: dict) -> dict:
    bad = next((v for v in values if v is not _ABSENT and not _json_exact(v)), _ABSENT)
    if bad is not _ABSENT:
        raise TypeError(
            f"record column {name!r}: mixes kinds ({sorted({type(v).__name__ for v in values})}) "
            f"and holds {type(bad).__name__} {bad!r:.60}, which JSON does not keep exactly"
        )
    texts = ["null" if v is _ABSENT else json.dumps(v, ensure_ascii=False) for v in values]
    return {"kind": "json", "text": _encode_text(texts, f"{name}.json", arrays)}


def _encode_records(records: Sequence[dict]) -> tuple[dict[str, np.ndarray], list[dict]]:
    for i, record in enumerate(records):
        if type(record) is not dict or not all(type(k) is str for k in record):
            raise TypeError(f"record {i}: a record is a dict with str keys, got {record!r:.60}")
    arrays: dict[str, np.ndarray] = {}
    columns, stems = [], set()
    for i, key in enumerate(dict.fromkeys(k for r in records for k in r)):
        safe = _SAFE_KEY.fullmatch(key) and key.lower() not in stems  # case-blind file systems
        stem = key if safe else f"_column{i}"
        stems.add(stem.lower())
        values = [r.get(key, _ABSENT) for r in records]
        present = None
        if any(v is _ABSENT for v in values):
            arrays[f"{stem}.present"] = np.array([v is not _ABSENT for v in values], dtype=bool)
            present = f"{stem}.present"
        columns.append({"key": key, "present": present, "spec": _encode(values, stem, arrays)})
    return arrays, columns


# -- decoding: each value built on access, nothing kept --------------------------------------------
def _check(condition: bool, what: str) -> None:
    if not condition:
        raise StoreError(what)


class _Numbers:
    def __init__(self, data: np.ndarray, cast: type) -> None:
        self.data, self.cast = data, cast

    def get(self, i: int):
        return self.cast(self.data[i])


class _Text:
    def __init__(self, data: np.ndarray, offsets: np.ndarray, path: bool) -> None:
        self.data, self.offsets, self.path = data, offsets, path

    def text(self, i: int) -> str:
        blob = self.data[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()
        return blob.decode("utf-8", "surrogatepass")

    def get(self, i: int):
        return Path(self.text(i)) if self.path else self.text(i)


class _Categorical:
    def __init__(self, codes: np.ndarray, table: _Text) -> None:
        self.codes, self.table = codes, table

    def get(self, i: int):
        return self.table.get(int(self.codes[i]))


class _Spans:
    def __init__(self, offsets: np.ndarray | None, width: int | None) -> None:
        self.offsets, self.width = offsets, width

    def span(self, i: int) -> range:
        if self.offsets is None:
            return range(i * self.width, (i + 1) * self.width)
        return range(int(self.offsets[i]), int(self.offsets[i + 1]))


class _List(_Spans):
    def get(self, i: int) -> list:
        return [self.items.get(j) for j in self.span(i)]


class _Dict(_Spans):
    def get(self, i: int) -> dict:
        return {self.keys.get(j): self.values.get(j) for j in self.span(i)}


class _Json:
    def __init__(self, text) -> None:
        self.text = text

    def get(self, i: int):
        return json.loads(self.text.get(i))


class _Null:
    def get(self, i: int) -> None:
        return None


class _Nullable:
    def __init__(self, null: np.ndarray, inner) -> None:
        self.null, self.inner = null, inner

    def get(self, i: int):
        return None if self.null[i] else self.inner.get(i)


def _array(load: Callable, name: str, rows: int, kinds: str) -> np.ndarray:
    array = load(name)
    _check(array.ndim == 1 and array.dtype.kind in kinds, f"{name}: a {array.dtype} array")
    _check(len(array) == rows, f"{name}: {len(array)} entries for {rows} rows")
    return array


def _offsets(load: Callable, name: str, rows: int, verify: bool) -> tuple[np.ndarray, int]:
    """Offsets of ``rows`` spans, checked; and how many items they span."""
    offsets = _array(load, name, rows + 1, "iu")
    _check(int(offsets[0]) == 0, f"{name}: offsets start at {offsets[0]}")
    _check(not verify or bool(np.all(np.diff(offsets) >= 0)), f"{name}: offsets decrease")
    return offsets, int(offsets[-1])


def _decoder(spec: dict, load: Callable, rows: int, verify: bool):
    """The decoder of a column spec over ``rows`` rows; an inconsistent one is a StoreError."""
    kind = spec["kind"]
    if kind in ("int", "float", "bool"):
        cast, kinds = {"int": (int, "iu"), "float": (float, "f"), "bool": (bool, "b")}[kind]
        decoder = _Numbers(_array(load, spec["data"], rows, kinds), cast)
    elif kind == "str":
        offsets, size = _offsets(load, spec["offsets"], rows, verify)
        decoder = _Text(_array(load, spec["bytes"], size, "u"), offsets, bool(spec["path"]))
    elif kind == "cat":
        table = spec["table"]
        size = len(load(table["offsets"])) - 1
        codes = _array(load, spec["codes"], rows, "iu")
        inside = not verify or rows == 0 or 0 <= int(codes.min()) <= int(codes.max()) < size
        _check(inside, f"{spec['codes']}: codes outside the table of {size}")
        decoder = _Categorical(codes, _decoder(table, load, size, verify))
    elif kind in ("list", "dict"):
        offsets, width = None, spec.get("width")
        if width is None:
            offsets, items = _offsets(load, spec["offsets"], rows, verify)
        else:
            items = rows * int(width)
        decoder = (_List if kind == "list" else _Dict)(offsets, width)
        for part in ("items",) if kind == "list" else ("keys", "values"):
            setattr(decoder, part, _decoder(spec[part], load, items, verify))
    elif kind == "json":
        decoder = _Json(_decoder(spec["text"], load, rows, verify))
    elif kind == "null":
        return _Null()
    else:
        raise StoreError(f"unknown column kind {kind!r}")
    if spec.get("null"):
        decoder = _Nullable(_array(load, spec["null"], rows, "b"), decoder)
    return decoder


# -- the store -------------------------------------------------------------------------------------
def _write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sibling(folder: Path, what: str) -> Path:
    """A hidden sibling of ``folder`` no other process names alike."""
    return folder.with_name(f".{folder.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _set_aside(folder: Path) -> None:
    """Removes ``folder`` (moved aside first, so nobody ever sees it half deleted)."""
    aside = _sibling(folder, "stale")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


class RecordStore(Sequence):
    """The records of one split, columnar and memory-mapped; ``store[i]`` builds record ``i``.

    Made by :meth:`write` or :meth:`open` (or :func:`cached_read`). A pickled store carries only its
    folder and maps it again when unpickled (a DataLoader worker under ``spawn``).

    Example:
        >>> store = RecordStore.write(task.read("train"), Path("cache/vqa_train"))  # doctest: +SKIP
        >>> len(store), store[0]["question"], store[2:4]  # doctest: +SKIP
    """

    directory: Path

    @classmethod
    def write(
        cls, records: Sequence[dict], directory: str | Path, meta: dict | None = None
    ) -> RecordStore:
        """Writes ``records`` as a store in ``directory`` (atomically) and opens it.

        Args:
            records: the record dicts (str keys; values as the encoding rules of this module).
            directory: the store's folder; written in a temporary sibling, then renamed. When the
                folder exists already (another process built it meanwhile), that one is kept and
                opened, and this one discarded.
            meta: written as ``meta.json`` beside the columns (the record cache's identity).

        Returns:
            The opened store.
        """
        directory = Path(directory)
        arrays, columns = _encode_records(records)
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = _sibling(directory, "tmp")
        temporary.mkdir()
        try:
            files = {}
            for name, array in arrays.items():
                with open(temporary / f"{name}.npy", "wb") as f:
                    np.save(f, array, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                files[name] = (temporary / f"{name}.npy").stat().st_size
            layout = {"format": FORMAT, "records": len(records), "columns": columns, "files": files}
            _write_json(temporary / "columns.json", layout)
            if meta is not None:
                _write_json(temporary / "meta.json", meta)
            if not directory.exists():
                try:
                    os.replace(temporary, directory)
                except OSError:  # it appeared since: another process built it; keep theirs
                    if not directory.exists():
                        raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)  # gone already when it was renamed
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True) -> RecordStore:
        """Maps the store in ``directory`` read-only.

        Args:
            directory: a folder written by :meth:`write`.
            verify: also check every offset array is ordered and every code within its table
                (one pass over those arrays); file sizes, lengths and types are always checked.

        Raises:
            StoreError: (a DataError) the folder or a file is missing, truncated or inconsistent.
        """
        store = cls.__new__(cls)
        store._open(Path(directory), verify)
        return store

    def _open(self, directory: Path, verify: bool) -> None:
        self.directory, self.arrays = directory, {}
        try:
            layout = json.loads((directory / "columns.json").read_text(encoding="utf-8"))
            _check(layout.get("format") == FORMAT, f"format {layout.get('format')!r}")
            self.size, files = int(layout["records"]), layout["files"]

            def load(name: str) -> np.ndarray:
                if name not in self.arrays:
                    path = directory / f"{name}.npy"
                    _check(path.stat().st_size == files[name], f"{path.name}: truncated or grown")
                    self.arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
                return self.arrays[name]

            self.columns = []
            for column in layout["columns"]:
                present = column["present"] and _array(load, column["present"], self.size, "b")
                decoder = _decoder(column["spec"], load, self.size, verify)
                self.columns.append((column["key"], present, decoder))
            _check(set(self.arrays) == set(files), "columns.json lists files no column uses")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise StoreError(
                f"{directory}: record store unreadable ({type(err).__name__}: {err})"
            ) from None
        except StoreError as err:
            raise StoreError(f"{directory}: record store inconsistent ({err})") from None

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory)}  # never the arrays: the worker maps them again

    def __setstate__(self, state: dict) -> None:
        self._open(Path(state["directory"]), verify=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._record(i) for i in range(*index.indices(self.size))]
        i = operator.index(index)
        if not -self.size <= i < self.size:
            raise IndexError(f"record {index} of {self.size}")
        return self._record(i % self.size)

    def __iter__(self) -> Iterator[dict]:
        return map(self._record, range(self.size))

    def __repr__(self) -> str:
        return f"RecordStore({str(self.directory)!r}, {self.size} records)"

    def _record(self, i: int) -> dict:
        return {
            key: decoder.get(i)
            for key, present, decoder in self.columns
            if present is None or present[i]
        }

    def sources(self) -> list[str]:
        """The files the cached split was read from (its ``meta.json``; none without one)."""
        try:
            meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return list(meta.get("sources") or {}) if isinstance(meta, dict) else []

    def keys(self) -> list[str]:
        """Every key some record has, in the order first seen."""
        return [key for key, _, _ in self.columns]

    def nbytes(self) -> int:
        """Bytes of the store's arrays (the ``.npy`` files, headers included)."""
        return sum((self.directory / f"{name}.npy").stat().st_size for name in self.arrays)

    def _column(self, key: str):
        for name, present, decoder in self.columns:
            if name == key:
                return present, decoder
        raise KeyError(f"no record has key {key!r}; keys: {self.keys()}")

    def column(self, key: str) -> np.ndarray:
        """A number column every record has (no None) as its memory-mapped array: selections
        over a split without building its records (VQA's Karpathy splits by image id)."""
        present, decoder = self._column(key)
        if present is not None or not isinstance(decoder, _Numbers):
            raise TypeError(f"column {key!r} is not a number every record has")
        return decoder.data

    def present(self, key: str) -> np.ndarray:
        """Which records have ``key`` (a bool per record), without building them."""
        if key not in self.keys():
            return np.zeros(self.size, dtype=bool)
        present, _ = self._column(key)
        return np.ones(self.size, dtype=bool) if present is None else np.asarray(present, bool)

    def distinct(self, key: str, rows: np.ndarray | None = None, text: bool = False) -> list:
        """The distinct values of a str/``Path`` column or list-of-them column (e.g. ``images``),
        of all records or of ``rows`` (indices), in the order first seen, read from the
        categorical table without building the records: an image-existence check asks once per
        image. ``text``: paths as strings (no ``Path`` objects: cheaper by far for 10⁵ images).

        Raises:
            KeyError: no record has ``key``. TypeError: the column holds other values.
        """
        present, decoder = self._column(key)
        mask = np.ones(self.size, dtype=bool) if present is None else np.array(present, bool)
        if rows is not None:
            chosen = np.zeros(self.size, dtype=bool)
            chosen[np.asarray(rows, dtype=np.int64)] = True
            mask &= chosen
        if isinstance(decoder, _Nullable):
            mask &= ~np.asarray(decoder.null, bool)
            decoder = decoder.inner
        selected = np.flatnonzero(mask)
        if isinstance(decoder, _List):  # the items of the selected lists
            selected, decoder = _items(decoder, selected), decoder.items
            if isinstance(decoder, _Nullable):
                selected = selected[~np.asarray(decoder.null, bool)[selected]]
                decoder = decoder.inner
        if isinstance(decoder, _Categorical):
            codes = np.unique(np.asarray(decoder.codes)[selected])  # codes: first-seen order
            table = decoder.table
            return [table.text(int(c)) if text else table.get(int(c)) for c in codes]
        if isinstance(decoder, _Text):
            get = decoder.text if text else decoder.get
            return list(dict.fromkeys(get(int(i)) for i in selected))
        raise TypeError(f"column {key!r} holds neither strings, paths nor lists of them")


def _items(spans: _Spans, rows: np.ndarray) -> np.ndarray:
    """The item indices of the lists at ``rows`` (in order)."""
    if spans.offsets is None:
        return (rows[:, None] * spans.width + np.arange(spans.width)).ravel()
    offsets = np.asarray(spans.offsets, dtype=np.int64)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


class Subset(Sequence):
    """Records picked from other stores — a split made of other splits' records (VQA's Karpathy
    splits over train2014 + val2014) without copying them. ``picks`` is a store of two number
    columns: ``part`` (which of ``parts``) and ``index`` (the record there), in the split's order.
    """

    def __init__(self, parts: Sequence[RecordStore], picks: RecordStore) -> None:
        self.parts, self.picks = list(parts), picks
        self.part, self.index = picks.column("part"), picks.column("index")

    def __getstate__(self) -> dict:
        return {"parts": self.parts, "picks": self.picks}  # stores pickle as their folders

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["parts"], state["picks"])

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        return self.parts[int(self.part[i])][int(self.index[i])]

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"Subset({len(self)} records of {self.parts})"

    def _rows(self, part: int) -> np.ndarray:
        return np.asarray(self.index)[np.asarray(self.part) == part]

    def sources(self) -> list[str]:
        """The files the picked records and the picks were read from."""
        found = [*self.picks.sources(), *(f for store in self.parts for f in store.sources())]
        return list(dict.fromkeys(found))

    def present(self, key: str) -> np.ndarray:
        """Which picked records have ``key``."""
        out = np.zeros(len(self), dtype=bool)
        for p, store in enumerate(self.parts):
            out[np.asarray(self.part) == p] = store.present(key)[self._rows(p)]
        return out

    def distinct(self, key: str, text: bool = False) -> list:
        """The distinct values of a (list-of-)str/``Path`` column over the picked records."""
        found = [store.distinct(key, self._rows(p), text) for p, store in enumerate(self.parts)]
        return list(dict.fromkeys(value for values in found for value in values))


class Chain(Sequence):
    """Several splits' records one after the other (``train: train+val``), without copying:
    each part is a store, a :class:`Subset` or a list of record dicts."""

    def __init__(self, parts: Sequence[Sequence[dict]]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]

    def __iter__(self) -> Iterator[dict]:
        return (record for part in self.parts for record in part)

    def __repr__(self) -> str:
        return f"Chain({len(self)} records of {len(self.parts)} splits)"

    def sources(self) -> list[str]:
        found = (f for p in self.parts if hasattr(p, "sources") for f in p.sources())
        return list(dict.fromkeys(found))

    def present(self, key: str) -> np.ndarray:
        """Which records have ``key``."""
        return np.concatenate([
            p.present(key) if hasattr(p, "present") else np.array([key in r for r in p], bool)
            for p in self.parts
        ])  # fmt: skip

    def distinct(self, key: str, text: bool = False) -> list:
        """The distinct values of a (list-of-)str/``Path`` column over every part."""
        found = []
        for p in self.parts:
            if hasattr(p, "distinct"):
                found += p.distinct(key, text=text)
            else:
                values = (v for r in p for v in (r[key] if isinstance(r[key], list) else [r[key]]))
                found += [str(v) if text else v for v in values]
        return list(dict.fromkeys(found))


# -- the record cache ------------------------------------------------------------------------------
def _canonical(identity: Any) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


def cache_folder(cache_dir: str | Path, identity: dict) -> Path:
    """The folder of the cached split ``identity``: ``cache_dir / <sha256 of its JSON>[:16]``."""
    return Path(cache_dir) / hashlib.sha256(_canonical(identity).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (one builder at a time; the others then find its
    cache); a file system without locks goes on unlocked: the atomic rename keeps caches whole."""
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(open(path, "a+b"))
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("record cache: no lock on %s (%s)", path, err)
        yield


def _stale(folder: Path, identity: dict) -> str | None:
    """Why the cache in ``folder`` cannot serve ``identity`` (None: its meta and sources match)."""
    if not folder.exists():
        return "no cache yet"
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "its meta.json is missing"
    except (OSError, ValueError) as err:
        return f"its meta.json is unreadable ({type(err).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "it was written in another format"
    if _canonical(meta.get("identity")) != _canonical(identity):
        return "its identity differs"
    sources = meta.get("sources")
    if not isinstance(sources, dict):
        return "its meta.json names no sources"
    for path, then in sources.items():
        problem = file_problem(path)  # a FIFO is never opened: it would block
        if problem is not None:
            return f"source {path} {problem}"
        now = file_fingerprint(path)
        if now != then:
            changed = [k for k in now if not isinstance(then, dict) or now[k] != then.get(k)]
            return f"source {path} changed ({', '.join(changed)})"
    return None


def cached_read(
    cache_dir: str | Path, identity: dict, read: Callable[[], tuple[Sequence[dict], list[Path]]]
) -> RecordStore:
    """The records of a split from the cache, or read, cached and returned.

    Args:
        cache_dir: the cache's folder (made when missing); the split lives in
            :func:`cache_folder` under it, with a ``meta.json`` of ``identity`` and the
            fingerprints (size, mtime, SHA-256 of the first and last MiB) of its source files.
        identity: what the records depend on besides the files (JSON-able): the reader's name and
            version, the split, the task's root and options.
        read: reads the split: ``(records, the files it read)``; called only when the cache is
            missing, another identity's, older than a source, corrupt or partial — which is logged
            in one line. Its DataErrors (bad input) pass through, and nothing is cached.

    Returns:
        The memory-mapped store (the same whether it was warm or just built).

    Example:
        >>> store = cached_read(root / ".vlpeft_cache", {"reader": "gqa", "version": 1,
        ...     "split": "train", "root": str(root), "options": {}}, read)  # doctest: +SKIP
    """
    folder = cache_folder(cache_dir, identity)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(f"{folder.name}.lock")):
        why = _stale(folder, identity)
        if why is None:
            try:
                return RecordStore.open(folder)
            except StoreError as err:
                why = f"its columns do not open ({err})"
        log.info("record cache %s: %s: reading the split", folder, why)
        records, sources = read()
        meta = {
            "format": FORMAT,
            "identity": json.loads(_canonical(identity)),
            "sources": {str(p): file_fingerprint(p) for p in dict.fromkeys(map(str, sources))},
        }
        _set_aside(folder)  # a stale or broken cache: write() keeps an existing folder
        return RecordStore.write(records, folder, meta=meta)
