"""The CLIP-BART visual-feature cache (the VL-Adapter way): frozen CNN features computed once.

    cache = write_feature_cache(model, router, "vqa", ["train", "val"], "cache/vqa.safetensors")
    dataset = router.dataset("vqa", "train", model, features=read_feature_cache(cache))

Keys are image file names; values are ``model.visual_features`` of one image (grid², C). A batch
then carries ``features`` instead of ``images`` and the model gives the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from vlpeft.checkpoint import write_safetensors

from .base import DataError, load_image


@torch.no_grad()
def write_feature_cache(
    model, router, task: str, splits: list[str], path: str | Path, batch: int = 32
) -> Path:
    """Computes and stores the pooled grid features of every image of ``task``'s ``splits``."""
    if not hasattr(model, "visual_features"):
        raise DataError(f"{model.family} has no cacheable visual features (clip-bart has)")
    dataset = router.dataset(task, splits[0], model)
    images = {
        Path(p).name: (p, r) for s in splits for r in router[task].read(s) for p in r["images"]
    }
    names, features = list(images), {}
    for start in tqdm(range(0, len(names), batch), desc=f"features {task}", leave=False):
        chunk = names[start : start + batch]
        pixels = torch.stack([
            dataset.transform(load_image(images[n][0], f"{images[n][1]['source']}: record {images[n][1]['id']!r}"))
            for n in chunk
        ])  # fmt: skip
        for name, value in zip(chunk, model.eval().visual_features(pixels)):
            features[name] = value
    write_safetensors(path, features)
    return Path(path)


def read_feature_cache(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DataError(f"{path}: feature cache not found")
    return load_file(path)
