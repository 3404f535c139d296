"""What every task shares: its config, the task registry, careful file reading, images, data sets.

A task (one file each: ``vqa``, ``gqa``, ``nlvr2``, ``caption``, ``retrieval``) reads the official
files of a split into *records* — plain dicts with ``id``, ``images`` (list of paths) and its own
fields — and turns a list of records plus their image tensors into a model batch (``collate``;
batch keys: ``vlpeft/models/base.py``). Bad input is a :class:`DataError` naming the file, the
record and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from vlpeft.adapters.base import nearest_hint

log = logging.getLogger(__name__)
_TASKS: dict[str, type[Task]] = {}


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def decorate(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__name__}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorate


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        raise DataError(
            f"unknown task reader {name!r}{nearest_hint(name, _TASKS)}; known: {list_tasks()}"
        )
    return _TASKS[name]


# -- careful reading ------------------------------------------------------------------------------
def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: malformed JSON ({err.msg})") from None
    return rows


def field(record: dict, name: str, where: str, kind: type | tuple = object) -> Any:
    """``record[name]``, or a DataError naming the file/record (``where``) and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} should be {kind}, got {type(value).__name__}")
    return value


# -- configuration ---------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskConfig:
    """One task of a run (a ``tasks:`` entry of the training YAML).

    Args:
        reader: the registered task (``vqa``, ``gqa``, ``nlvr2``, ``caption``, ``retrieval``).
        root: folder of the annotation files.
        images: image root folder (``root`` when empty).
        splits: our split name → the data set's split name.
        prompt: task prompt prepended to the text (default: the reader's, e.g. ``"vqa:"``).
        batch_size / eval_batch_size: per-process batch sizes.
        adapter: the adapter set this task trains (``default`` = one shared set).
        routing: the routing function of this task's routed adapters (None: as configured).
        skip_unreadable_images: drop records whose image is missing/unreadable (reported with a
            count) instead of failing.
        max_records: keep at most this many records per split (quick runs).
        options: reader-specific settings (e.g. VQA ``num_answers``, ``karpathy``).
    """

    reader: str
    root: str
    images: str = ""
    splits: dict = dataclasses.field(
        default_factory=lambda: {"train": "train", "val": "val", "test": "test"}
    )
    prompt: str | None = None
    batch_size: int = 16
    eval_batch_size: int = 32
    adapter: str = "default"
    routing: str | None = None
    skip_unreadable_images: bool = False
    max_records: int | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> TaskConfig:
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in valid:
                raise DataError(
                    f"{where}: unknown key {key!r}{nearest_hint(key, valid)}; valid: {sorted(valid)}"
                )
        for key in ("reader", "root"):
            if key not in data:
                raise DataError(f"{where}: missing key {key!r}")
        return cls(**data)


# -- images ----------------------------------------------------------------------------------------
def image_transform(size: int, mean, std):
    """Resize to ``size``² (bicubic), to tensor, normalise — one backbone's preprocessing."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def load_image(path: str | Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: field 'image': file {path} not found") from None
    except OSError as err:
        raise DataError(f"{where}: field 'image': {path} is unreadable ({err})") from None


def readable(path: str | Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError):
        return False


# -- the task base class ---------------------------------------------------------------------------
class Task:
    """A task: reads records of a split and collates them for the model.

    Subclasses set ``kind`` (what the model is asked: ``generate``, ``choices``, ``classify``,
    ``retrieval``), ``default_prompt``, and implement ``read_split`` and ``collate``.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "generate"
    default_prompt: ClassVar[str] = ""
    metric: ClassVar[str] = "accuracy"

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self.image_root = Path(config.images or config.root)
        self.prompt = self.default_prompt if config.prompt is None else config.prompt

    def split_name(self, split: str) -> str:
        if split not in self.config.splits:
            raise DataError(
                f"task {self.name}: no split {split!r}; configured: {sorted(self.config.splits)}"
            )
        return self.config.splits[split]

    def read(self, split: str, limit: int | None = None) -> list[dict]:
        """Records of ``split`` (checked: non-empty, images present or skipped with a report).

        At most ``limit`` records (default: the config's ``max_records``)."""
        records = self.read_split(self.split_name(split))
        limit = limit or self.config.max_records
        if limit:
            records = records[:limit]
        if not records:
            raise DataError(
                f"task {self.name}: split {split!r} ({self.split_name(split)}) is empty under {self.root}"
            )
        return self.check_images(records, split)

    def check_images(self, records: list[dict], split: str) -> list[dict]:
        if not self.config.skip_unreadable_images:
            for record in records:
                for path in record["images"]:
                    if not Path(path).is_file():
                        raise DataError(
                            f"{record['source']}: record {record['id']!r}: field 'image': {path} not found"
                        )
            return records
        kept = [r for r in records if all(readable(p) for p in r["images"])]
        if len(kept) < len(records):
            log.warning(
                "task %s/%s: skipped %d records with unreadable images",
                self.name,
                split,
                len(records) - len(kept),
            )
        self.skipped = len(records) - len(kept)
        return kept

    def read_split(self, split: str) -> list[dict]:
        raise NotImplementedError

    def text(self, body: str) -> str:
        return f"{self.prompt} {body}".strip() if self.prompt else body

    def collate(self, records: list[dict], images: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError


class TaskDataset(torch.utils.data.Dataset):
    """Records of one split with their images loaded and preprocessed (or cached features)."""

    def __init__(
        self, task: Task, records: list[dict], transform, features: dict | None = None
    ) -> None:
        self.task, self.records, self.transform, self.features = task, records, transform, features

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[dict, torch.Tensor]:
        record = self.records[index]
        if self.features is not None:
            return record, torch.stack([self.features[Path(p).name] for p in record["images"]])
        where = f"{record['source']}: record {record['id']!r}"
        return record, torch.stack([self.transform(load_image(p, where)) for p in record["images"]])

    def collate(self, items: list[tuple[dict, torch.Tensor]]) -> dict[str, Any]:
        records = [r for r, _ in items]
        pixels = torch.stack([x for _, x in items])  # (B, n_images, ...)
        batch = self.task.collate(records, pixels[:, 0] if pixels.shape[1] == 1 else pixels)
        if self.features is not None:
            batch["features"] = batch.pop("images")
        return batch
