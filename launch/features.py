"""Feature caches: ``python -m launch.features --config RUN_CONFIG --out DIR [key=value …]``.

Computes the frozen visual features (:mod:`tasks.features`) of every image of every split of the
config's tasks with the config's model, streaming them to sharded safetensors in ``DIR`` with an
index (resumable: run it again after an interruption). Then point the tasks at it in the training
config — one folder may serve several tasks (COCO's images feed VQA and captioning alike)::

    data:
      tasks:
        vqa: {batch_size: 32, features: /cache/clip-rn101}
        caption: {batch_size: 32, features: /cache/clip-rn101}

Relative ``features`` paths resolve like the task file's (against ``data.root`` or its folder).
``--dtype float16`` halves the disk (training then reads fp16-rounded features; float32, the
default, gives exactly the training from pixels).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launch.config import ConfigError, load_config
from launch.distributed import num_workers, resolve_device
from launch.resume import folder_lock
from launch.run import RunError, build_model, build_router
from tasks.base import DataError, image_transform
from tasks.features import DTYPES, unique_images, write_features

log = logging.getLogger("vlpeft.features")


def build_cache(
    config, out: str | Path, tasks=None, splits=None, dtype: str = "float32",
    shard_images: int = 4096, batch_size: int = 64,
) -> Path:  # fmt: skip
    """Writes the cache of ``config``'s tasks (default: all) and splits (default: every split
    each task configures); returns the folder."""
    with folder_lock(Path(out), "building a feature cache"):  # two builds would mix shards
        router = build_router(config)
        model = build_model(config, router)
        records = []
        for name in tasks or list(router.tasks):
            task = router[name]
            for split in splits or list(task.config.splits):
                read = task.read(split)
                log.info("%s/%s: %d records", name, split, len(read))
                records += read
        images = unique_images(records)  # each image once, across tasks and splits
        cfg = model.config
        transform = image_transform(cfg.image_size, cfg.image_mean, cfg.image_std)
        device = resolve_device(config)
        workers = num_workers(config, device)
        return write_features(
            model, images, transform, out, dtype, shard_images, batch_size, workers, device
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cache frozen visual features of a config's data.")
    parser.add_argument("--config", required=True, type=Path, help="training YAML")
    parser.add_argument("--out", required=True, type=Path, help="the cache folder")
    parser.add_argument("--task", action="append", help="only this task (repeatable)")
    parser.add_argument("--split", action="append", help="only this split (repeatable)")
    parser.add_argument("--stage", default=None, help="the stage of a staged recipe")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shard-images", type=int, default=4096, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config, args.overrides, stage=args.stage)
        out = build_cache(
            config, args.out, args.task, args.split, args.dtype, args.shard_images,
            args.batch_size,
        )  # fmt: skip
    except (ConfigError, RunError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"features written to {out}; use it with data.tasks.<task>.features: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
