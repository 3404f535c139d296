"""Image-text retrieval on Karpathy splits (COCO 5k test, Flickr30k 1k test; 5 captions per image).

Same files as :mod:`tasks.caption`. Training records are (image, caption) pairs with ``image_id``
(captions of the same image are positives of each other in the contrastive loss); val/test records
are images with their captions, scored as a gallery.

Predictions rank the gallery: ITC similarities of every image and caption, and with ``itm_k`` BLIP's
re-ranking of each direction's top k by the ITM head (:func:`itm_rerank`). Scores
(:func:`retrieval_recall`): R@1/5/10 both ways and their means (``r_mean`` the headline); the
submission lists each image's top-10 captions; the baseline is the exact expected recall of a
uniformly random ranking (:func:`random_ranking_recall`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from evaluation.scoring import best_target_ranks, recall_at_k

from .base import Task, register_task
from .caption import karpathy_records
from .synthetic import Writer


# -- the official metric: R@K both ways ------------------------------------------------------------
def retrieval_recall(
    similarity, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """R@K image→text and text→image (0–100) and their means.

    Args:
        similarity: (n_images, n_texts) scores.
        text_to_image: for each text, the index of its image.

    Returns:
        ``{"i2t_r1", …, "t2i_r1", …, "i2t_mean", "t2i_mean", "r_mean"}`` (image→text: a hit when
        the best-ranked of the image's captions is within K). Ties with a wrong candidate count
        against the model: a constant scorer gets 0.

    Example:
        >>> retrieval_recall(np.eye(2), [0, 1], ks=(1,))["r_mean"]
        100.0
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_to_image)
    bad = np.isnan(sim).any(1)
    if bad.any():  # NaN ≥ x is False: NaN scores would rank first and give R@K = 100
        raise ValueError(
            f"retrieval_recall: {int(bad.sum())} of {len(sim)} image rows have NaN similarities "
            "(a diverged model?); ±inf are scores, NaN is not"
        )
    if sim.ndim != 2 or owner.ndim != 1 or sim.shape[1] != len(owner):
        raise ValueError(
            f"retrieval_recall: similarity of shape {sim.shape} (images, texts) but "
            f"{len(owner)} text→image entries"
        )
    check_owners(owner, len(sim))
    i2t = best_target_ranks(sim, [np.flatnonzero(owner == i) for i in range(sim.shape[0])])
    t2i = best_target_ranks(sim.T, [np.array([i]) for i in owner])
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_r{k}": recall for k, recall in recall_at_k(ranks, ks).items()})
    return with_recall_means(out, ks)


def check_owners(owner: np.ndarray, images: int) -> None:
    """Each text's image must be an integer index in [0, images): a negative one would silently
    score as an image counted from the end (-1: the last)."""
    if owner.size and not np.issubdtype(owner.dtype, np.integer):
        raise TypeError(
            f"retrieval_recall: text→image entries must be integer image indices, got {owner.dtype}"
        )
    bad = np.flatnonzero((owner < 0) | (owner >= images))
    if bad.size:
        raise ValueError(
            f"retrieval_recall: text {int(bad[0])} is mapped to image {int(owner[bad[0]])}, "
            f"expected an index in 0..{images - 1} ({bad.size} such text(s))"
        )


def with_recall_means(recalls: dict, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Adds ``i2t_mean``, ``t2i_mean`` (over R@ks) and ``r_mean`` (their average) to ``recalls``."""
    for name in ("i2t", "t2i"):
        recalls[f"{name}_mean"] = float(np.mean([recalls[f"{name}_r{k}"] for k in ks]))
    recalls["r_mean"] = (recalls["i2t_mean"] + recalls["t2i_mean"]) / 2
    return recalls


def random_ranking_recall(positives: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Expected recall (in %) of a uniformly random ranking, exactly: ``positives[i]`` = captions of
    image i; t2i R@K = K/N images, i2t R@K = 1 − C(T − n, K) / C(T, K) for an image with n of the T
    captions."""
    images, texts = len(positives), sum(positives)
    scores = {}
    for k in ks:
        kk = min(k, texts)
        scores[f"i2t_r{k}"] = (
            100
            * sum(1 - math.comb(texts - n, kk) / math.comb(texts, kk) for n in positives)
            / images
        )
        scores[f"t2i_r{k}"] = 100 * min(k, images) / images
    return with_recall_means(scores, ks)


def itm_rerank(similarity, itm: Callable[[int, np.ndarray], np.ndarray], k: int) -> np.ndarray:
    """BLIP's re-ranking of one direction: for each row, the top-k columns by similarity get
    ``itm(row, columns) + similarity`` and the rest ``-inf``.

    Call it once per direction (image→text rows = images; text→image on the transposed matrix).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    out = np.full_like(sim, -np.inf)
    k = min(k, sim.shape[1])
    for row in range(sim.shape[0]):
        top = np.argsort(-sim[row], kind="stable")[:k]
        out[row, top] = np.asarray(itm(row, top), dtype=np.float64) + sim[row, top]
    return out


class SyntheticRetrieval(Writer):
    """Reads the synthetic set's shared Karpathy file, as captioning does: no files of its own."""

    order = 4
    entry = {"reader": "retrieval", "root": "coco", "images": "coco/images"}


@register_task("retrieval")
class Retrieval(Task):
    needs = "retrieval"
    predicts = "rank"
    default_prompt = ""
    metric = "r_mean"
    synthetic_writer = SyntheticRetrieval

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
            "i2t": itm_rerank(sim, itm_i2t, settings.itm_k),
            "t2i": itm_rerank(sim.T, itm_t2i, settings.itm_k).T,
        }

    def score(self, records, predictions):
        _, owner = self.gallery_texts(records)
        i2t = retrieval_recall(predictions["i2t"], owner)
        t2i = retrieval_recall(predictions["t2i"], owner)
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

    def baseline(self, split: str = "test", limit: int | None = None):
        scores = random_ranking_recall([len(r["captions"]) for r in self.read(split, limit)])
        return "random ranking", scores, scores["r_mean"]
