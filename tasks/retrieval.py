"""Image-text retrieval on Karpathy splits (COCO 5k test, Flickr30k 1k test; 5 captions per image).

Same files as :mod:`tasks.caption`. Training records are (image, caption) pairs with ``image_id``
(captions of the same image are positives of each other in the contrastive loss); val/test records
are images with their captions, scored as a gallery.

Predictions rank the gallery: ITC similarities of every image and caption, and with ``itm_k`` BLIP's
re-ranking of each direction's top k by the ITM head (:func:`itm_rerank`). Scores
(:func:`retrieval_recall`): R@1/5/10 both ways and their means (``r_mean`` the headline), a
caption identical to another image's counting as a hit for either image (no model can tell
identical texts apart; a warning gives their count); the submission lists each image's top-10
captions; the baseline is the exact expected recall of a uniformly random ranking
(:func:`random_ranking_recall`), identical captions counted the same way.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from evaluation.scoring import best_target_ranks, recall_at_k

from .base import Task, register_task
from .caption import karpathy_records
from .synthetic import Writer

log = logging.getLogger(__name__)


# -- the official metric: R@K both ways ------------------------------------------------------------
def retrieval_recall(
    similarity, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
    texts: Sequence[str] | None = None, t2i_similarity=None,
) -> dict:  # fmt: skip
    """R@K image→text and text→image (0–100) and their means.

    Args:
        similarity: (n_images, n_texts) scores.
        text_to_image: for each text, the index of its image.
        ks: the K of R@K.
        texts: the gallery's texts, as the model read them. When given, **identical texts are one
            text**: a text that is also a caption of other images counts as a hit for each of them
            (text→image: a hit when any image having that exact text is within K; image→text:
            another image's caption identical to one of this image's is a right answer, not a
            wrong one). No model can tell identical inputs apart — they score the same against
            every image — so under the ground-truth-only rule a perfect model could not reach
            100 (the synthetic test split: 27 of 150 captions shared, r_mean capped at 84), and
            the official scripts' result on them depends on their sort's tie order. On COCO and
            Flickr30k (few identical captions) the two rules differ by little; a gallery with
            identical texts of different images is reported with a warning and the count.
            None: each text's own image only.
        t2i_similarity: (n_images, n_texts) scores for the text→image direction when it is ranked
            differently (ITM re-ranking ranks each direction's top k); None: ``similarity``.

    Returns:
        ``{"i2t_r1", …, "t2i_r1", …, "i2t_mean", "t2i_mean", "r_mean"}`` (image→text: a hit when
        the best-ranked of the image's captions is within K). Ties with a wrong candidate count
        against the model: a constant scorer gets 0.

    Example:
        >>> retrieval_recall(np.eye(2), [0, 1], ks=(1,))["r_mean"]
        100.0
        >>> retrieval_recall(np.ones((2, 2)), [0, 1], ks=(1,), texts=["a dog", "a dog"])["r_mean"]
        100.0
    """
    sim = checked_scores(similarity, text_to_image)
    t2i_sim = sim if t2i_similarity is None else checked_scores(t2i_similarity, text_to_image)
    owner = np.asarray(text_to_image)
    image_targets, text_targets = gallery_targets(owner, len(sim), texts)
    i2t = best_target_ranks(sim, image_targets)
    t2i = best_target_ranks(t2i_sim.T, text_targets)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_r{k}": recall for k, recall in recall_at_k(ranks, ks).items()})
    return with_recall_means(out, ks)


def checked_scores(similarity, text_to_image: Sequence[int]) -> np.ndarray:
    """``similarity`` as float64 (images, texts), checked against ``text_to_image``."""
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_to_image)
    if sim.ndim != 2 or owner.ndim != 1 or sim.shape[1] != len(owner):
        raise ValueError(
            f"retrieval_recall: similarity of shape {sim.shape} (images, texts) but "
            f"{len(owner)} text→image entries"
        )
    bad = np.isnan(sim).any(1)
    if bad.any():  # NaN ≥ x is False: NaN scores would rank first and give R@K = 100
        raise ValueError(
            f"retrieval_recall: {int(bad.sum())} of {len(sim)} image rows have NaN similarities "
            "(a diverged model?); ±inf are scores, NaN is not"
        )
    check_owners(owner, len(sim))
    return sim


def gallery_targets(
    owner: np.ndarray, images: int, texts: Sequence[str] | None = None, warn: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(each image's right texts, each text's right images): its own, and with ``texts`` those
    sharing an identical text (see :func:`retrieval_recall`; ``warn``: a warning with the count
    when there are any)."""
    owner = np.asarray(owner)
    if texts is None:
        return [np.flatnonzero(owner == i) for i in range(images)], [np.array([i]) for i in owner]
    if len(texts) != len(owner):
        raise ValueError(
            f"retrieval_recall: {len(texts)} texts but {len(owner)} text→image entries"
        )
    images_of: dict[str, set[int]] = defaultdict(set)
    indices_of: dict[str, list[int]] = defaultdict(list)
    for j, (text, image) in enumerate(zip(texts, owner.tolist())):
        images_of[text].add(image)
        indices_of[text].append(j)
    shared = sum(len(images_of[t]) > 1 for t in texts)
    if shared and warn:
        log.warning(
            "retrieval gallery: %d of %d texts are identical to a text of another image; each "
            "counts as a hit for every image that has it (tasks.retrieval.retrieval_recall)",
            shared,
            len(texts),
        )
    own: list[set[str]] = [set() for _ in range(images)]
    for text, image in zip(texts, owner.tolist()):
        own[image].add(text)
    image_targets = [np.array(sorted(j for t in own[i] for j in indices_of[t]), dtype=int)
                     for i in range(images)]  # fmt: skip
    text_targets = [np.array(sorted(images_of[t]), dtype=int) for t in texts]
    return image_targets, text_targets


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


def random_ranking_recall(
    positives: Sequence[int], ks: Sequence[int] = (1, 5, 10),
    text_positives: Sequence[int] | None = None,
) -> dict:  # fmt: skip
    """Expected recall (in %) of a uniformly random ranking, exactly: ``positives[i]`` = the right
    texts of image i (its captions), ``text_positives[j]`` = the right images of text j (default
    1 each; more where identical texts count as one, :func:`retrieval_recall`). R@K of a row with
    n of its M candidates right = 1 − C(M − n, K) / C(M, K)."""
    texts = sum(positives) if text_positives is None else len(text_positives)
    images = len(positives)
    text_positives = [1] * texts if text_positives is None else text_positives

    def hit(n: int, total: int, k: int) -> float:
        k = min(k, total)
        return 1 - math.comb(total - n, k) / math.comb(total, k)

    scores = {}
    for k in ks:
        scores[f"i2t_r{k}"] = 100 * sum(hit(n, texts, k) for n in positives) / images
        scores[f"t2i_r{k}"] = 100 * sum(hit(n, images, k) for n in text_positives) / texts
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
        """R@K both ways, identical texts counted as one (:func:`retrieval_recall`)."""
        texts, owner = self.gallery_texts(records)
        scores = retrieval_recall(
            predictions["i2t"], owner, texts=texts, t2i_similarity=predictions["t2i"],
        )  # fmt: skip
        return scores, scores["r_mean"]

    def submission(self, records, predictions):
        texts, _ = self.gallery_texts(records)
        sim = predictions["i2t"]
        return {
            r["image_id"]: [texts[j] for j in np.argsort(-sim[i], kind="stable")[:10]]
            for i, r in enumerate(records)
        }

    def baseline(self, split: str = "test", limit: int | None = None):
        """The exact expected recall of a random ranking, identical texts counted as one (as
        :meth:`score` counts them)."""
        records = self.read(split, limit)
        texts, owner = self.gallery_texts(records)
        image_targets, text_targets = gallery_targets(np.asarray(owner), len(records), texts, False)
        scores = random_ranking_recall(
            [len(t) for t in image_targets], text_positives=[len(t) for t in text_targets]
        )
        return "random ranking", scores, scores["r_mean"]
