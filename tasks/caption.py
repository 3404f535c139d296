"""Image captioning on Karpathy splits (COCO ``dataset_coco.json``, Flickr30k ``dataset_flickr30k.json``).

``{"images": [{"filepath"?, "filename", "cocoid"?, "imgid", "split", "sentences": [{"raw"}]}]}``;
``restval`` counts as train. Training records are (image, sentence) pairs; val/test records are
images with all their reference captions. Images: ``<images>/<filepath>/<filename>`` (Flickr30k
has no filepath). ``options.file`` picks the file (default ``dataset_coco.json``).

Predictions: generated captions, scored by the COCO caption metrics (CIDEr the headline);
submission ``[{"image_id", "caption"}]``; baseline: the most frequent training caption.
"""

from __future__ import annotations

from evaluation import metrics

from .base import DataError, Task, field, read_json, register_task

SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}


def karpathy_images(task: Task, split: str) -> list[dict]:
    """Image records of a Karpathy split with their raw captions (shared with retrieval)."""
    if split not in SPLITS:
        raise DataError(
            f"task {task.name}: unknown Karpathy split {split!r}; valid: {sorted(SPLITS)}"
        )
    path = task.root / task.config.options.get("file", "dataset_coco.json")
    images = []
    for i, image in enumerate(field(read_json(path), "images", str(path), list)):
        where = f"{path}: images[{i}]"
        if field(image, "split", where, str) not in SPLITS[split]:
            continue
        sentences = field(image, "sentences", where, list)
        captions = [
            field(s, "raw", f"{where}: sentences[{j}]", str).strip()
            for j, s in enumerate(sentences)
        ]
        if not captions:
            raise DataError(f"{where}: field 'sentences' is empty")
        # one rule with the VQA reader: cocoid (COCO) or imgid (Flickr30k) is an integer
        image_id = field(image, "cocoid" if "cocoid" in image else "imgid", where, int)
        folder = task.image_root / image.get("filepath", "")
        images.append(
            {
                "id": image_id,
                "image_id": image_id,
                "captions": captions,
                "images": [folder / field(image, "filename", where, str)],
                "source": str(path),
            }
        )
    return images


def karpathy_records(task: Task, split: str) -> list[dict]:
    """Train: one record per (image, caption) pair; val/test: one per image with all captions."""
    images = karpathy_images(task, split)
    if split != "train":
        return images
    return [
        {**im, "id": f"{im['id']}-{j}", "caption": c}
        for im in images
        for j, c in enumerate(im["captions"])
    ]


@register_task("caption")
class Caption(Task):
    needs = "caption"
    predicts = "generate"
    default_prompt = "caption:"
    metric = "CIDEr"

    def read_split(self, split: str) -> list[dict]:
        return karpathy_records(self, split)

    def collate(self, records, images):
        return {
            "kind": "caption",
            "images": images,
            "text": [self.prompt] * len(records),
            "targets": [r.get("caption", r["captions"][0]) for r in records],
            "ids": [r["image_id"] for r in records],
        }

    def input_texts(self, record):
        return list(record["captions"])  # targets, taken as they are

    def answers(self, records):
        return [c for r in records for c in r["captions"]]

    def submission(self, records, predictions):
        return [{"image_id": r["image_id"], "caption": c} for r, c in zip(records, predictions)]

    def score(self, records, predictions):
        scores = metrics.caption_scores(
            {r["image_id"]: c for r, c in zip(records, predictions)},
            {r["image_id"]: r["captions"] for r in records},
        )
        return scores, scores["CIDEr"]
