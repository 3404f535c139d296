"""Image-text retrieval on Karpathy splits (COCO 5k test, Flickr30k 1k test; 5 captions per image).

Same files as :mod:`tasks.caption`. Training records are (image, caption) pairs with ``image_id``
(captions of the same image are positives of each other in the contrastive loss); val/test records
are images with their captions, scored as a gallery.

Predictions rank the gallery: ITC similarities of every image and caption, and with ``itm_k`` BLIP's
re-ranking of each direction's top k by the ITM head (:func:`evaluation.metrics.itm_rerank`).
Scores: R@1/5/10 both ways and their means (``r_mean`` the headline); the submission lists each
image's top-10 captions; the baseline is the exact expected recall of a uniformly random ranking.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation import metrics

from .base import Task, register_task
from .caption import karpathy_records


@register_task("retrieval")
class Retrieval(Task):
    needs = "retrieval"
    predicts = "rank"
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

    def input_texts(self, record):
        return [self.text(c) for c in record["captions"]]

    def answers(self, records):
        return []

    @staticmethod
    def gallery_texts(records) -> tuple[list[str], list[int]]:
        """Every caption of the split and the index of its image."""
        texts = [c for r in records for c in r["captions"]]
        return texts, [i for i, r in enumerate(records) for _ in r["captions"]]

    def predict(self, model, records, batches, settings):
        """``{"i2t": (images, texts), "t2i": (images, texts)}`` ranking scores."""
        image_feats, image_states = [], []
        for batch in batches:
            feats, states = model.encode_images(batch["images"])
            image_feats.append(feats.float())
            image_states.append(states)
        texts, _ = self.gallery_texts(records)
        size = self.config.eval_batch_size
        text_feats = torch.cat(
            [model.encode_texts(texts[i : i + size]).float() for i in range(0, len(texts), size)]
        )
        image_states = torch.cat(image_states)
        sim = (torch.cat(image_feats) @ text_feats.T).cpu().numpy()
        if not settings.itm_k:
            return {"i2t": sim, "t2i": sim}

        def itm_i2t(row, cols):
            states = image_states[row : row + 1].expand(len(cols), -1, -1)
            return model.match(states, [texts[c] for c in cols])[:, 1].float().cpu().numpy()

        def itm_t2i(row, cols):
            states = image_states[torch.as_tensor(cols)]
            return model.match(states, [texts[row]] * len(cols))[:, 1].float().cpu().numpy()

        return {
            "i2t": metrics.itm_rerank(sim, itm_i2t, settings.itm_k),
            "t2i": metrics.itm_rerank(sim.T, itm_t2i, settings.itm_k).T,
        }

    def score(self, records, predictions):
        _, owner = self.gallery_texts(records)
        i2t = metrics.retrieval_recall(predictions["i2t"], owner)
        t2i = metrics.retrieval_recall(predictions["t2i"], owner)
        scores = {k: v for k, v in i2t.items() if k.startswith("i2t")}
        scores.update({k: v for k, v in t2i.items() if k.startswith("t2i")})
        scores["r_mean"] = (scores["i2t_mean"] + scores["t2i_mean"]) / 2
        return scores, scores["r_mean"]

    def submission(self, records, predictions):
        texts, _ = self.gallery_texts(records)
        sim = predictions["i2t"]
        return {
            r["image_id"]: [texts[j] for j in np.argsort(-sim[i], kind="stable")[:10]]
            for i, r in enumerate(records)
        }

    def baseline(self, split: str = "test"):
        scores = metrics.random_ranking_recall([len(r["captions"]) for r in self.read(split)])
        return "random ranking", scores, scores["r_mean"]
