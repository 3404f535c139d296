"""What every task shares: its config, the task registry, careful file reading, images, data sets.

A task (one file each: ``vqa``, ``gqa``, ``nlvr2``, ``caption``, ``retrieval``) owns everything about
itself, so adding a task is one file and one registry entry:

- its reader: the official files of a split → *records* (plain dicts with ``id``, ``images`` — a list
  of paths — and its own fields); bad input is a :class:`DataError` naming file, record and field;
- ``collate``: records + image tensors → a model batch (batch keys: ``vlpeft/models/base.py``);
- ``needs``: the model capability it asks for (``answer``, ``caption``, ``choices``, ``retrieval``);
  a family without it is refused when the training config loads;
- ``predict``: how predictions are made (``predicts``: generate / choices / classify / rank);
- ``score``: its official metric (a function in its file, named in :mod:`evaluation.metrics`;
  task-free pieces from :mod:`evaluation.scoring`) and the headline ``metric``;
  ``reference_scores``: the same predictions by a published reference evaluator's rules where
  they differ (VQA, GQA: VL-Adapter's), recorded beside the headline;
- ``submission``: the official submission file of its predictions;
- ``baseline``: its no-image baseline (scored like a model);
- ``input_texts`` / ``answers``: the text it feeds the model and its training answers (the text
  warm start, the answer vocabulary of a classifier);
- ``path_options``: which of its ``options`` name files (the router resolves them);
- ``synthetic_writer``: its files of the synthetic set (:mod:`tasks.synthetic`).

The registry finds the task files itself (:func:`load_task_modules`): there is no list to edit.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import pkgutil
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vlpeft.config import Config
from vlpeft.registry import Registry

from .files import (  # noqa: F401  (re-exported: the readers' careful file reading)
    DataError,
    file_problem,
    note_source,
    read_json,
    read_jsonl,
    read_text,
    recording_sources,
    regular_file,
)
from .records import Chain, cached_read

log = logging.getLogger(__name__)


TASKS: Registry = Registry("task reader", attribute="name", error=DataError)
register_task = TASKS.register

# a task module is one with a class decorated at its top level: no list of task files to edit
_DEFINES_A_TASK = re.compile(r"^@register_task\(", re.MULTILINE)


@functools.cache
def load_task_modules() -> tuple[str, ...]:
    """Imports every module of this package that defines a task, so the registry holds them all.

    A task module is found by its source (a line starting ``@register_task(``), read without
    importing anything else: the package's other modules (router, synthetic, check, …) stay
    unimported. Adding a task is adding its file.

    Returns:
        The names of the task modules, e.g. ``("tasks.caption", …, "tasks.vqa")``.
    """
    folder = Path(__file__).parent
    found = []
    for info in pkgutil.iter_modules([str(folder)]):
        source = folder / (f"{info.name}/__init__.py" if info.ispkg else f"{info.name}.py")
        if source.is_file() and _DEFINES_A_TASK.search(source.read_text(encoding="utf-8")):
            found.append(importlib.import_module(f"{__package__}.{info.name}").__name__)
    return tuple(found)


def list_tasks() -> list[str]:
    """The registered tasks' names (every task file of this package, and any registered since)."""
    load_task_modules()
    return TASKS.names()


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; an unknown name is a DataError naming the nearest."""
    load_task_modules()
    return TASKS.get(name)


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
class TaskConfig(Config):
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
        num_beams / max_new_tokens: this task's generation settings (None: the ``eval``
            section's), e.g. VL-Adapter's greedy VQA beside its 5-beam captions.
        options: reader-specific settings (e.g. VQA ``num_answers``, ``karpathy``).
        features: a feature cache folder (``python -m launch.features``): images are read from it,
            memory-mapped, instead of decoded (None: from pixels).
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
    num_beams: int | None = None
    max_new_tokens: int | None = None
    options: dict = dataclasses.field(default_factory=dict)
    features: str | None = None

    error: ClassVar[type[Exception]] = DataError

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise DataError(f"task config: {name} must be >= 1, got {value!r}")
        for name in ("num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"task config: {name} must be >= 1 or null, got {value!r}")
        if self.max_records is not None and self.max_records < 1:
            raise DataError(
                f"task config: max_records must be >= 1 or null, got {self.max_records!r}"
            )


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


# 16-bit grey pixels (PNG, TIFF): PIL's convert("RGB") clips them at 255, so nearly every pixel
# of a 16-bit image came out white; they are scaled by their bit depth instead
WIDE_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


def bit_depth(image: Image.Image) -> int | None:
    """The bits of an integer grey image's pixels (mode ``I;16*``, or ``I`` holding 16-bit data as
    older Pillows open 16-bit PNGs), read from the file's raw mode before decoding; None when
    ``image`` is not a 16-bit integer image."""
    if image.mode in WIDE_MODES:
        return WIDE_MODES[image.mode]
    if image.mode == "I" and image.tile:
        args = image.tile[0].args
        raw = args if isinstance(args, str) else (args or [None])[0]
        return WIDE_MODES.get(raw)
    return None


def to_rgb(image: Image.Image, path: str | Path, where: str) -> Image.Image:
    """8-bit RGB of a freshly opened ``image``: 16-bit grey scaled to 0–255 (v·255 / 65535, i.e.
    ÷257, rounded); pixels whose value range a file does not say (32-bit integers, floats) are a
    DataError rather than a guess."""
    bits = bit_depth(image)
    if bits is not None:
        wide = np.asarray(image).astype(np.int64)
        top = (1 << bits) - 1
        narrow = ((wide * 255 + top // 2) // top).clip(0, 255).astype(np.uint8)
        return Image.fromarray(narrow, "L").convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise DataError(
            f"{where}: field 'image': {path} has {image.mode!r} pixels (32-bit integers or "
            "floats) whose value range is unknown: convert it to 8 or 16 bits"
        )
    return image.convert("RGB")


def load_image(path: str | Path, where: str) -> Image.Image:
    """The 8-bit RGB pixels of the image file ``path``; anything else is a one-line DataError
    naming ``where`` (the file and record) and the image: missing, not a regular file (a FIFO is
    never opened), undecodable, a decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels), or pixels of an unknown value range."""
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"{where}: field 'image': {path} {problem}")
    try:
        with warnings.catch_warnings():  # PIL only warns between 1× and 2× its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_rgb(image, path, where)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(
            f"{where}: field 'image': {path} is refused as a decompression bomb ({err})"
        ) from None
    except Exception as err:  # a decoder's failure on a damaged file has no one type
        raise DataError(
            f"{where}: field 'image': {path} is unreadable ({type(err).__name__}: {err})"
        ) from None


def missing_images(records: Sequence[dict]) -> list[Path]:
    """The images of ``records`` that are not regular files, checked once per image with one
    listing per folder — not a ``stat`` per record, which a network file system makes slow (a
    record store lists its distinct images without building its records)."""
    if hasattr(records, "distinct"):
        images = records.distinct("images", text=True)  # strings: no Path per image
    else:
        images = list(dict.fromkeys(str(p) for r in records for p in r["images"]))
    listed: dict[str, set[str]] = {}
    missing = []
    for image in images:
        folder, name = os.path.split(image)
        if folder not in listed:
            try:
                with os.scandir(folder or ".") as entries:
                    listed[folder] = {e.name for e in entries if e.is_file()}
            except OSError:  # no such folder (or unreadable): none of its images is there
                listed[folder] = set()
        if name not in listed[folder]:
            missing.append(Path(image))
    return missing


def readable(path: str | Path) -> bool:
    """Whether the image decodes completely into RGB pixels (:func:`load_image`). ``Image.verify``
    passes a JPEG cut at 50–99 %, so this decodes every pixel: about 5 ms for a 640×480 JPEG on
    one core (10 min for COCO's 123k images) — the price of ``skip_unreadable_images`` and of
    ``python -m tasks.check``."""
    try:
        load_image(path, str(path))
        return True
    except DataError:
        return False


# -- the task base class ---------------------------------------------------------------------------
def most_common(values, what: str):
    """The most frequent of ``values`` (first seen on ties); none is a DataError naming ``what``."""
    counts = Counter(values)
    if not counts:
        raise DataError(f"{what}: none in the training split to take the majority of")
    return counts.most_common(1)[0][0]


PREDICTIONS = ("generate", "choices", "classify", "rank")


class Task:
    """A task: reads records of a split, collates them, predicts, scores and submits.

    Subclasses set the class attributes and implement ``read_split``, ``collate``, ``score`` and
    ``submission``; the defaults below serve short-answer generation tasks.

    Attributes:
        needs: the model capability the task asks for (``VLModel.capabilities``).
        predicts: how predictions are made: ``generate`` (texts), ``choices`` (fixed one-token
            answers), ``classify`` (a classifier's top answer), ``rank`` (a gallery).
        metric: the name of the headline score.
        submission_format: ``json`` or ``csv``, the official submission file's format.
        default_prompt: the task prompt prepended to its text.
        path_options: the ``options`` that name files (relative paths are resolved against the
            router YAML's folder, like ``root``), e.g. VQA's ``("karpathy",)``.
        synthetic_writer: its part of the synthetic set (a :class:`tasks.synthetic.Writer`
            subclass; None: the task has none).
        annotation_key: the field an annotated record has (None: every record is annotated); a
            split without it is for an evaluation server.
        images_per_record: how many images a record shows the model (NLVR²: 2).
        reader_version: the reader's version: a record cache of another version is re-read
            (bump it when the reader changes what its records hold).
        cache_dir: where the task's parsed splits are cached (:mod:`tasks.records`; the router
            sets it, None: no cache).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "answer"
    predicts: ClassVar[str] = "generate"
    metric: ClassVar[str] = "accuracy"
    submission_format: ClassVar[str] = "json"
    default_prompt: ClassVar[str] = ""
    path_options: ClassVar[tuple[str, ...]] = ()
    # the ``options`` that change only how a training batch is made, not the records (left out
    # of the record cache's key)
    training_options: ClassVar[tuple[str, ...]] = ()
    synthetic_writer: ClassVar[type | None] = None
    annotation_key: ClassVar[str | None] = None
    images_per_record: ClassVar[int] = 1
    reader_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.predicts not in PREDICTIONS or cls.submission_format not in ("json", "csv"):
            raise TypeError(
                f"task {cls.__name__}: predicts must be one of {PREDICTIONS} and "
                f"submission_format json or csv"
            )

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self.image_root = Path(config.images or config.root)
        self.prompt = self.default_prompt if config.prompt is None else config.prompt
        self.config_name = self.name  # the router's name for the task (it sets it)
        self.cache_dir: Path | None = None

    @classmethod
    def serves(cls, capabilities) -> bool:
        """Whether a model with ``capabilities`` can train and predict this task."""
        return cls.needs in capabilities

    def split_name(self, split: str) -> str:
        if split not in self.config.splits:
            raise DataError(
                f"task {self.name}: no split {split!r}; configured: {sorted(self.config.splits)}"
            )
        return self.config.splits[split]

    def read(self, split: str, limit: int | None = None) -> list[dict]:
        """Records of ``split`` (checked: non-empty, images present or skipped with a report).

        At most ``limit`` records (default: the config's ``max_records``)."""
        records = self.read_named(self.split_name(split))
        limit = limit or self.config.max_records
        if limit:
            records = records[:limit]  # (a store gives a list of the first records)
        if not records:
            raise DataError(
                f"task {self.name}: split {split!r} ({self.split_name(split)}) is empty under {self.root}"
            )
        return self.check_images(records, split)

    def read_named(self, name: str) -> Sequence[dict]:
        """The records of the data set's split ``name``; ``a+b`` is split ``a``'s records then
        ``b``'s (GQA's ``train+val``, as VL-Adapter trains GQA), each part read and cached once."""
        parts = name.split("+")
        if len(parts) == 1:
            return self.read_cached(name)
        if len(set(parts)) < len(parts) or not all(parts):
            raise DataError(
                f"task {self.name}: split {name!r}: expected distinct names joined by +"
            )
        return Chain([self.read_cached(part) for part in parts])

    def read_cached(self, split: str) -> Sequence[dict]:
        """The records of the data set's split ``split``: from the record cache when the task has
        one (memory-mapped, shared by every process of a node; parsed and written on the first
        read, re-read when a source file changed), else parsed."""
        if self.cache_dir is None or not self.cacheable(split):
            return self.read_split(split)
        identity = {"reader": self.name, "version": self.reader_version, "split": split,
                    "root": str(self.root), "images": str(self.image_root),
                    "options": {k: v for k, v in self.config.options.items()
                                if k not in self.training_options}}  # fmt: skip

        def read() -> tuple[list[dict], list[Path]]:
            with recording_sources() as sources:
                records = self.read_split(split)
            return records, sources

        try:
            store = cached_read(self.cache_dir, identity, read)
        except OSError as err:  # a read-only data folder: read without a cache (said once)
            log.warning("record cache %s unusable (%s): reading without it", self.cache_dir, err)
            self.cache_dir = None
            return self.read_split(split)
        for source in store.sources():  # a split made of this one depends on its files too
            note_source(source)
        return store

    def cacheable(self, split: str) -> bool:
        """Whether the data set's split ``split`` is cached as records (a split that is a view
        of other cached splits is not)."""
        return True

    def check_images(self, records: Sequence[dict], split: str) -> Sequence[dict]:
        if not self.config.skip_unreadable_images:
            missing = missing_images(records)
            if missing:  # the first record that shows it names the file
                record = next(r for r in records if str(missing[0]) in map(str, r["images"]))
                raise DataError(
                    f"{record['source']}: record {record['id']!r}: field 'image': "
                    f"{missing[0]} {file_problem(missing[0]) or 'not found'}"
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

    # -- text the task feeds the model, answers it trains on ----------------------------------------
    def input_texts(self, record: dict) -> list[str]:
        """The text inputs of one record as the model reads them (task prompt applied)."""
        return [self.text(record["question"])]

    def answers(self, records: list[dict]) -> list[str]:
        """The training answers of ``records`` (the target of each record; every caption for
        captioning; none for tasks without answers): a classifier's vocabulary, the baseline."""
        return [r["target"] for r in records if r.get("target")]

    # -- predictions, scores, submissions ------------------------------------------------------------
    def generation(self, settings) -> dict[str, int]:
        """``max_new_tokens`` and ``num_beams`` this task generates with: its own, else
        ``settings``' (a training config's ``eval`` section)."""
        return {
            "max_new_tokens": self.config.max_new_tokens or settings.max_new_tokens,
            "num_beams": self.config.num_beams or settings.num_beams,
        }

    def predict(self, model, records: list[dict], batches: Iterable[dict], settings) -> list:
        """One prediction per record, in order. ``settings`` carries ``max_new_tokens``,
        ``num_beams`` and ``itm_k`` (a training config's ``eval`` section; the task's own
        generation settings take precedence: :meth:`generation`)."""
        answers: list[str] = []
        for batch in batches:
            answers += model.generate(batch, **self.generation(settings))
        return answers

    def annotated(self, record: dict) -> bool:
        """Whether ``record`` carries its answer (``annotation_key``; a test split for a server's
        has none)."""
        return self.annotation_key is None or self.annotation_key in record

    def scorable(self, records: list[dict]) -> bool:
        """Whether ``records`` carry what scoring needs (a test split without annotations does
        not: its submission file is for the evaluation server); a split where some records have
        annotations and some not is an error."""
        if self.annotation_key is not None and hasattr(records, "present"):
            annotated = records.present(self.annotation_key)  # a store: without the records
        else:
            annotated = np.array([self.annotated(r) for r in records], dtype=bool)
        if annotated.any() and not annotated.all():
            missing = next(r for r, a in zip(records, annotated) if not a)
            raise DataError(
                f"{missing['source']}: record {missing['id']!r} has no annotation while "
                f"{sum(annotated)} of the split's {len(records)} records have one"
            )
        return bool(annotated.all())

    def submission_name(self, split: str) -> str:
        """The submission file's name for ``split`` (as an evaluation server expects it)."""
        return f"{self.config_name}_{split}_predictions.{self.submission_format}"

    def score(self, records: list[dict], predictions) -> tuple[dict, float]:
        """(every score, the headline) of ``predictions`` by the official metric."""
        raise NotImplementedError

    def reference_scores(self, records: list[dict], predictions) -> dict[str, float]:
        """Scores of ``predictions`` by the rules of evaluators that published numbers were
        computed with where those rules differ from the official metric, in the headline's units:
        ``{"vladapter": …}`` (VL-Adapter's evaluators, behind the CLIP-BART numbers of VL-Adapter,
        VL-PET, …). Recorded beside the headline (``reference`` of ``<task>_<split>.json``), never
        instead of it; ``{}`` (the default): the reference evaluators score as the official one."""
        return {}

    def training_targets(
        self, records: list[dict], draw: tuple
    ) -> tuple[list[str], list[float]] | None:
        """The targets a training batch of ``records`` trains on and each one's loss weight, when
        they are not the records' own ``target`` (VQA's ``options.target: sampled``); None (the
        default): the collated ones, unweighted. A function of ``draw`` (the sampler's seed, the
        epoch and the step of the batch) and the record: the same in every process and resume."""
        return None

    def submission(self, records: list[dict], predictions) -> Any:
        """The official submission file's content (JSON-able, or CSV text)."""
        raise NotImplementedError

    def baseline_predictions(self, train: list[dict], records: list[dict]) -> tuple[str, list]:
        """(what it does, predictions) of the no-image baseline: the most frequent training answer."""
        answer = most_common(self.answers(train), f"task {self.name}: answers")
        return f"always {answer!r}", [answer] * len(records)

    def baseline(self, split: str = "test", limit: int | None = None) -> tuple[str, dict, float]:
        """(what it does, all scores, headline) of the no-image baseline on ``split`` (its first
        ``limit`` records, as a run's ``eval.max_records`` scores), scored like a model's
        predictions."""
        records = self.read(split, limit)
        note, predictions = self.baseline_predictions(self.read("train"), records)
        if not self.scorable(records):
            return note, None, None
        return (note, *self.score(records, predictions))


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
        where = f"{record['source']}: record {record['id']!r}"
        if self.features is not None:  # a FeatureCache checks the path; a mapping has names
            by_path = getattr(self.features, "by_path", False)
            keys = [Path(p) if by_path else Path(p).name for p in record["images"]]
            try:
                return record, torch.stack([self.features[k] for k in keys])
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
        return record, torch.stack([self.transform(load_image(p, where)) for p in record["images"]])

    def check_features(self) -> None:
        """When the images come from a feature cache with a ``check`` (a
        :class:`tasks.features.FeatureCache`): that every image of the records is cached,
        unchanged since, and every shard intact (a DataError naming the first problem). A run
        calls it once before its first step; without a cache it does nothing."""
        check = getattr(self.features, "check", None)
        if check is not None:
            check(Path(p) for record in self.records for p in record["images"])

    def collate(
        self, items: list[tuple[dict, torch.Tensor]], draw: tuple | None = None
    ) -> dict[str, Any]:
        """The task's batch of ``items``; a training batch (``draw``: sampler seed, epoch, step)
        takes the task's :meth:`Task.training_targets` (``target_weights``: each example's loss
        weight)."""
        records = [r for r, _ in items]
        pixels = torch.stack([x for _, x in items])  # (B, n_images, ...)
        batch = self.task.collate(records, pixels[:, 0] if pixels.shape[1] == 1 else pixels)
        picked = self.task.training_targets(records, draw) if draw is not None else None
        if picked is not None:
            batch["targets"], batch["target_weights"] = picked
        if self.features is not None:
            batch["features"] = batch.pop("images")
        return batch


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose worker processes' DataErrors reach the caller as the
    one-line DataError the worker raised: torch re-raises a worker's error with the worker's
    whole traceback as its message (22 lines for one unreadable image)."""

    def __iter__(self):
        return _one_line_errors(super().__iter__())


def _one_line_errors(batches: Iterable) -> Iterator:
    try:
        yield from batches
    except DataError as err:
        raise DataError(worker_message(str(err))) from None


# torch's message for an error in a worker: "Caught DataError in DataLoader worker process 0.\n
# Original Traceback (most recent call last):\n … \ntasks.base.DataError: <the message>\n"
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")
_LAST_LINE = re.compile(r"^[\w.]+: (.+)$")


def worker_message(text: str) -> str:
    """The message a DataLoader worker's error was raised with (``text`` unchanged when it is not
    a worker's re-raised error)."""
    if not _WORKER_ERROR.match(text):
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    found = _LAST_LINE.match(lines[-1]) if lines else None
    return found.group(1) if found else text
