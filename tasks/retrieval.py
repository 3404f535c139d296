"""Image-text retrieval on Karpathy splits (COCO 5k test, Flickr30k 1k test; 5 captions per image).

Same files as :mod:`tasks.caption`. Training records are (image, caption) pairs with ``image_id``
(captions of the same image are positives of each other in the contrastive loss); val/test records
are images with their captions, scored as a gallery by ``evaluation``.
"""

from __future__ import annotations

from .base import Task, register_task
from .caption import karpathy_records


@register_task("retrieval")
class Retrieval(Task):
    kind = "retrieval"
    default_prompt = ""
    metric = "r_mean"

    def read_split(self, split: str) -> list[dict]:
        return karpathy_records(self, split)

    def collate(self, records, images):
        return {
            "kind": "retrieval",
            "images": images,
            "text": [self.text(r.get("caption", r["captions"][0])) for r in records],
            "image_ids": [r["image_id"] for r in records],
            "ids": [r["id"] for r in records],
        }
