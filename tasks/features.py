"""Frozen visual features at data-set scale: sharded safetensors, an index, memory-mapped reads.

A family whose visual encoder is frozen and outside every adapter (CLIP-BART: the ResNet's pooled
layer-4 grid, the VL-Adapter way; RoBERTa/GPT-2 + ViT: the ViT's [CLS] or pooler feature) can
read ``batch["features"]`` instead of decoding images. BLIP cannot (its recipes adapt the ViT).
``python -m launch.features --config RUN_CONFIG --out DIR`` writes a cache folder::

    DIR/index.json                 what built it, the feature shape and dtype, image → shard,
                                   each shard's size and SHA-256, each image's path, size, mtime
    DIR/shard_00000.safetensors    up to ``shard_images`` images each, keyed by image file name

Shards are written one at a time (atomically) and the index after each, so an interrupted build
continues where it stopped. :class:`FeatureCache` opens shards memory-mapped, lazily in each
process (DataLoader workers included): COCO's 123k images never sit in RAM at once. Nothing in a
cache is trusted blindly:

- a cache built by another model or another preprocessing (``builder``: the family, image size,
  normalisation, grid, the frozen encoder's weights' SHA-256) is refused when a training run opens
  it;
- a shard's size and SHA-256 are checked the first time a process opens it (once per process and
  file: a shard a process verified — :meth:`FeatureCache.check` verifies them all — is not hashed
  again, and DataLoader workers inherit what their parent verified), each tensor read has the
  index's dtype and shape, and a shard named outside the cache folder is refused;
- an image read by path whose file now has another size or modification time than when its
  features were computed is an error naming it (rebuild the cache): the image was replaced.
  Copies that keep modification times (``mv``, ``cp -p``, ``rsync -a``) are the same images.

Format ``vlpeft-features/2``; a cache of format 1 (no checksums, no image sizes) is refused with a
request to rebuild it.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from vlpeft.adapters.base import AdaptedLayer
from vlpeft.checkpoint import write_json, write_safetensors

from .base import DataError, DataLoader, file_problem, load_image, read_json

log = logging.getLogger(__name__)
INDEX = "index.json"
FORMAT = "vlpeft-features/2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def builder_of(model) -> dict:
    """What a cache of ``model``'s frozen visual features depends on (compared on use)."""
    part = getattr(model, "cached_part", None)
    if part is None or not hasattr(model, "visual_features"):
        raise DataError(
            f"{getattr(model, 'family', type(model).__name__)}: no cacheable visual features "
            "(clip-bart, roberta-vit and gpt2-vit have: their frozen ResNet grid / ViT feature); "
            "train it from pixels"
        )
    module = model.get_submodule(part)
    adapted = [
        n
        for n, m in model.named_modules()
        if n.startswith(f"{part}.") and isinstance(m, AdaptedLayer)
    ]
    if adapted:
        raise DataError(
            f"{model.family}: adapters in the visual encoder ({adapted[0]}): its features are "
            "not frozen and cannot be cached"
        )
    moving = [n for n, p in module.named_parameters() if p.requires_grad]
    if moving:
        raise DataError(
            f"{model.family}: the visual encoder trains ({part}.{moving[0]}): its features "
            "change during training and cannot be cached"
        )
    mode = model.training
    model.train()  # what the part does in a training forward: dropout there would not cache
    config = getattr(module, "config", None)  # a transformers part: its functional dropout rates
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    random_in_training = module.training and (
        any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())
        or any("dropout" in k and isinstance(v, float) and v > 0 for k, v in settings.items())
    )
    model.train(mode)
    if random_in_training:
        raise DataError(
            f"{model.family}: the visual encoder ({part}) applies dropout in training: its "
            "features differ at every step and cannot be cached (set its dropout to 0)"
        )
    digest = getattr(model, "_feature_digest", None)
    if digest is None:  # frozen: hashed once per model
        h = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(
                tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            )
        digest = model._feature_digest = h.hexdigest()
    config = model.config
    return {
        "family": model.family,
        "image_size": config.image_size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "visual_grid": getattr(config, "visual_grid", None),
        "visual_feature": getattr(config, "visual_feature", None),
        "vision": dict(getattr(config, "vision", {}) or {}),
        "weights": model.weight_sources.get("vision"),
        "encoder_sha256": digest,
    }


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (read in chunks: a shard holds gigabytes)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def source_stat(path: str | Path) -> list[int]:
    """``[size in bytes, modification time in ns]`` of an image file (what the index records)."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def same_mtime(a: int, b: int) -> bool:
    """Modification times equal to the coarser of their two resolutions (a copy to a file system
    that keeps whole seconds or microseconds only is the same time)."""
    step = 1
    while step < 10**9 and (a % (step * 10) == 0 or b % (step * 10) == 0):
        step *= 10
    return a // step == b // step


# shards this process has hashed: (path, size, mtime) → verified (kept across FeatureCache objects,
# so a cache the launcher checked is not hashed again by the data sets or forked workers)
_VERIFIED: set[tuple[str, int, int]] = set()


class FeatureCache:
    """A cache folder's features by image file name, read memory-mapped (as float32).

    Args:
        directory: the folder ``launch.features`` wrote.
        expected: the builder the features must come from (:func:`builder_of` of the training
            model); a mismatch is an error naming the fields that differ. None: not checked.

    Example:
        >>> cache = FeatureCache("/cache/clip-rn101", builder_of(model))
        >>> cache.check(path for r in records for path in r["images"])  # before the first step
        >>> cache[Path("coco/images/val2014/COCO_val2014_000000000042.jpg")].shape
    """

    def __init__(self, directory: str | Path, expected: dict | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX
        if file_problem(path) is not None:
            raise DataError(
                f"{path}: {file_problem(path)}: build the cache with python -m launch.features "
                f"--out {self.directory}"
            )
        self.index = read_json(path)
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            found = self.index.get("format") if isinstance(self.index, dict) else None
            raise DataError(
                f"{path}: format {found!r}, expected {FORMAT!r} (a cache written before shards "
                f"carried checksums and images their sizes): rebuild it with python -m "
                f"launch.features --out <a new folder>"
            )
        try:
            self.keys: dict[str, int] = self.index["keys"]
            self.shards: list[str] = [shard["file"] for shard in self.index["shards"]]
            self.dtype = DTYPES[self.index["dtype"]]
        except (KeyError, TypeError):
            raise DataError(f"{path}: not a feature-cache index of launch.features") from None
        if not self.index.get("complete"):
            raise DataError(
                f"{path}: the cache is incomplete (run launch.features again to finish it)"
            )
        self._check_index(path)
        if expected is not None:
            built = self.index["builder"]
            differ = sorted(
                k for k in set(built) | set(expected) if built.get(k) != expected.get(k)
            )
            if differ:
                details = "; ".join(
                    f"{k}: cache {built.get(k)!r}, model {expected.get(k)!r}" for k in differ
                )
                raise DataError(
                    f"{self.directory}: built by another model or preprocessing ({details}); "
                    "rebuild it with python -m launch.features for this config"
                )
        self._open: dict[int, object] = {}

    def _check_index(self, path: Path) -> None:
        """Shard files named inside the folder, each image's shard among them, the records each
        image needs: a hand-edited or damaged index is refused before anything is read."""
        for name in self.shards:
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise DataError(
                    f"{path}: shard {name!r} is not a file name inside {self.directory}: "
                    "a cache reads only its own folder"
                )
        sources = self.index.get("sources", {})
        for key, shard in self.keys.items():
            if not isinstance(shard, int) or not 0 <= shard < len(self.shards):
                raise DataError(f"{path}: image {key!r} names shard {shard!r}, which is not there")
            if key not in sources:
                raise DataError(f"{path}: image {key!r} has no recorded size and mtime")

    def __getstate__(self) -> dict:  # worker processes open their own memory maps
        return {**self.__dict__, "_open": {}}

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    by_path = True  # TaskDataset hands over image paths, not bare names

    def __getitem__(self, image: str | Path) -> torch.Tensor:
        """The features of ``image``: a file name, or a path — then checked to be the image the
        cache was built from (its last folders and name; the data may have moved) and unchanged
        since (its size and modification time)."""
        name = image_key(image)
        if name not in self.keys:
            raise DataError(
                f"{self.directory}: no features for image {name!r} (built for other splits?)"
            )
        if isinstance(image, Path):
            self._check_source(name, image)
        tensor = self._shard(self.keys[name]).get_tensor(name)
        if tensor.dtype != self.dtype or list(tensor.shape) != self.index.get("shape"):
            raise DataError(
                f"{self.directory / self.shards[self.keys[name]]}: features of {name!r} are "
                f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, the index "
                f"says {self.index['dtype']} {self.index.get('shape')}: rebuild the cache"
            )
        return tensor.float()

    def _check_source(self, name: str, image: Path) -> None:
        """``image`` is the file ``name``'s features were computed from, unchanged since."""
        built = self.index.get("paths", {}).get(name)
        if built is not None and not same_image(built, image):
            raise DataError(
                f"{self.directory}: image {name!r} was cached from {built}, not {image}: "
                "two data sets share the file name; give each its own cache"
            )
        try:
            size, mtime = source_stat(image)
        except OSError as err:
            raise DataError(f"{image}: cannot stat the cached image ({err.strerror})") from None
        was_size, was_mtime = self.index["sources"][name]
        if size != was_size or not same_mtime(mtime, was_mtime):
            raise DataError(
                f"{image}: changed since its features were cached in {self.directory} (size "
                f"{was_size} → {size} bytes, modified {mtime_text(was_mtime)} → "
                f"{mtime_text(mtime)}): rebuild the cache with python -m launch.features"
            )

    def _shard(self, shard: int):
        """The open shard ``shard``, verified (size, SHA-256) the first time this process opens
        the file."""
        if shard not in self._open:
            from safetensors import safe_open

            path = self.verify_shard(shard)
            self._open[shard] = safe_open(str(path), framework="pt")
        return self._open[shard]

    def verify_shard(self, shard: int) -> Path:
        """Checks shard ``shard``'s file against the index (present, size, SHA-256), hashing it
        unless this process verified the same file (path, size, mtime) already; returns its path."""
        path = self.directory / self.shards[shard]
        recorded = self.index["shards"][shard]
        problem = file_problem(path)
        if problem is not None:
            raise DataError(f"{path}: shard {problem} (the cache is damaged: rebuild it)")
        size, mtime = source_stat(path)
        seen = (str(path.resolve()), size, mtime)
        if seen in _VERIFIED:
            return path
        if size != recorded.get("bytes"):
            raise DataError(
                f"{path}: {size} bytes, the index recorded {recorded.get('bytes')} (the shard "
                "was changed or cut short): rebuild the cache"
            )
        if file_sha256(path) != recorded.get("sha256"):
            raise DataError(
                f"{path}: SHA-256 differs from the one recorded when it was written (the shard "
                "was changed or damaged): rebuild the cache"
            )
        _VERIFIED.add(seen)
        return path

    def check(self, images: Iterable[str | Path]) -> None:
        """Before a run: every image of ``images`` has features here (a path is also checked to
        be the file they were computed from, unchanged since), and every shard file is present
        with its recorded size and SHA-256. Raises a DataError naming the first problem.

        Args:
            images: image paths (as the records name them) or bare file names.
        """
        seen = set()
        for image in images:
            name = image_key(image)
            if name in seen:
                continue
            seen.add(name)
            if name not in self.keys:
                raise DataError(
                    f"{self.directory}: no features for image {image} (built for other splits or "
                    "tasks? rebuild with python -m launch.features for this config)"
                )
            if isinstance(image, Path) or os.sep in str(image):
                self._check_source(name, Path(image))
        for shard in range(len(self.shards)):
            self.verify_shard(shard)


def mtime_text(mtime_ns: int) -> str:
    """A modification time for a message (UTC, to the microsecond)."""
    stamp = datetime.datetime.fromtimestamp(mtime_ns / 1e9, datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.%f UTC")


TAIL = 3  # path components compared between a cached image and the one asked for


def same_image(built: str | Path, image: Path) -> bool:
    """Whether ``image`` is the file a cache entry was built from: the same file, or (the data
    moved) the same last folders and name — symbolic links and relative paths allowed."""
    built, image = Path(built), Path(image)
    a, b = built.absolute().parts, image.absolute().parts
    n = min(TAIL, len(a), len(b))
    if a[-n:] == b[-n:]:  # the common case, without a system call (it runs for every image read)
        return True
    try:
        return built.resolve() == image.resolve()
    except OSError:
        return False


def image_key(path: str | Path) -> str:
    """The cache key of an image: its file name (COCO, GQA, NLVR², Flickr30k names are unique)."""
    return Path(path).name


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, Path, str]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, path, where = self.items[i]
        return key, self.transform(load_image(path, where))


def unique_images(records: Iterable[dict]) -> dict[str, tuple[Path, str]]:
    """Image key → (path, where it was named); two different files with one key are an error."""
    images: dict[str, tuple[Path, str]] = {}
    for record in records:
        for path in record["images"]:
            key = image_key(path)
            where = f"{record['source']}: record {record['id']!r}"
            if key in images and Path(images[key][0]) != Path(path):
                raise DataError(
                    f"{where}: image {path} and {images[key][0]} ({images[key][1]}) share the "
                    f"file name {key!r}: one feature cache cannot hold both"
                )
            images.setdefault(key, (Path(path), where))
    return images


@torch.no_grad()
def write_features(
    model, images: dict[str, tuple[Path, str]], transform, directory: str | Path,
    dtype: str = "float32", shard_images: int = 4096, batch_size: int = 64, num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Path:  # fmt: skip
    """Computes ``model.visual_features`` of ``images`` into the cache folder ``directory``,
    continuing an interrupted build of the same builder and adding images that are new."""
    if dtype not in DTYPES:
        raise DataError(f"feature dtype {dtype!r}: one of {sorted(DTYPES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    builder = builder_of(model)
    path = directory / INDEX
    index = {"format": FORMAT, "builder": builder, "dtype": dtype, "shards": [], "keys": {},
             "paths": {}, "sources": {}, "complete": False}  # fmt: skip
    if path.exists():
        earlier = read_json(path)
        if not isinstance(earlier, dict) or earlier.get("format") != FORMAT:
            found = earlier.get("format") if isinstance(earlier, dict) else None
            raise DataError(
                f"{path}: a cache of format {found!r}, not {FORMAT!r}: choose another --out "
                "(or delete the folder) to build it anew"
            )
        if earlier.get("builder") != builder or earlier.get("dtype") != dtype:
            raise DataError(
                f"{directory}: holds features of another builder or dtype "
                f"({earlier.get('builder')}, {earlier.get('dtype')}); choose another --out"
            )
        index = {**earlier, "complete": False}
        log.info("%s: %d images cached already; continuing", directory, len(index["keys"]))
        for key, (image, where) in images.items():
            built = index.get("paths", {}).get(key)
            if built is not None and not same_image(built, Path(image)):
                raise DataError(
                    f"{where}: image {image} has the file name of {built}, cached in "
                    f"{directory} already: one feature cache cannot hold both"
                )
    todo = [(k, p, w) for k, (p, w) in images.items() if k not in index["keys"]]
    sources = {}  # size and mtime before the image is read: a later change is seen on use
    for key, image, where in todo:
        problem = file_problem(image)
        if problem is not None:
            raise DataError(f"{where}: field 'image': {image} {problem}")
        sources[key] = source_stat(image)
    loader = DataLoader(
        _Images(todo, transform), batch_size=batch_size, num_workers=num_workers,
        collate_fn=lambda items: ([k for k, _ in items], torch.stack([x for _, x in items])),
    )  # fmt: skip
    model.eval().to(device)
    buffer: dict[str, torch.Tensor] = {}

    def flush(count: int) -> None:
        """Writes the first ``count`` buffered images as the next shard, then the index."""
        keys = list(buffer)[:count]
        if not keys:
            return
        shard = len(index["shards"])
        name = f"shard_{shard:05d}.safetensors"
        write_safetensors(directory / name, {k: buffer[k] for k in keys})
        written = directory / name  # hashed as written: what a reader must find
        index["shards"].append(
            {"file": name, "bytes": written.stat().st_size, "sha256": file_sha256(written)}
        )
        index["keys"].update(dict.fromkeys(keys, shard))
        index["paths"].update({k: str(Path(images[k][0]).absolute()) for k in keys})
        index["sources"].update({k: sources[k] for k in keys})
        index["shape"] = list(buffer[keys[0]].shape)
        write_json(path, index)  # after the shard: an interrupted build loses one shard at most
        for key in keys:
            del buffer[key]

    for keys, pixels in tqdm(loader, desc="features", unit="batch"):
        features = model.visual_features(pixels.to(device)).to("cpu", DTYPES[dtype])
        for key, value in zip(keys, features):
            buffer[key] = value.clone()  # its own storage (safetensors refuses shared ones)
        while len(buffer) >= shard_images:
            flush(shard_images)
    flush(len(buffer))
    index["complete"] = True
    write_json(path, index)
    return directory
