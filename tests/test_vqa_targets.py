"""VQA's training target as VL-Adapter draws it (``options.target: sampled``) and the weighted
generation loss it trains with."""

import pytest
import torch
import torch.nn.functional as F

from launch.config import load_config
from launch.run import build_model, build_router
from tasks.base import DataError
from tasks.loader import multitask_loader
from tasks.sampler import MultitaskSampler, SamplerConfig
from tasks.synthetic import generate
from vlpeft.models.base import IGNORE, lm_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, images=20, seed=0, size=32)
    return root


def config(data, target="sampled"):
    spec = {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"default": {"method": "lora", "r": 2}},
        "data": {"file": str(data / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": 4, "options": {"target": target}}}},
    }  # fmt: skip
    return load_config(None, data=spec)


def test_weighted_lm_loss_is_the_weighted_mean_of_example_token_means():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE], [3, 3, 3, 1], [IGNORE] * 4])
    weights = [0.3, 1.0, 0.6]
    means = [
        F.cross_entropy(logits[i][labels[i] != IGNORE], labels[i][labels[i] != IGNORE])
        for i in range(2)  # the third example has no target: left out, weight and all
    ]
    naive = (means[0] * 0.3 + means[1] * 1.0) / 2
    # lm_loss computes in float32 (losses ≈ 2: a few float32 ulps)
    assert torch.allclose(lm_loss(logits, labels, weights=weights).double(), naive, atol=1e-5)
    assert torch.allclose(lm_loss(logits, labels).double(), (means[0] + means[1]) / 2, atol=1e-5)


def test_sampled_targets_follow_the_scores_and_repeat_per_epoch(data):
    task = build_router(config(data))["vqa"]
    record = {"id": 7, "label": {"two": 0.6, "three": 0.3, "four": 0.9, "none": 0.0}}
    first = [task.training_targets([record], (0, epoch, 1)) for epoch in range(3000)]
    assert first == [task.training_targets([record], (0, epoch, 1)) for epoch in range(3000)]
    other_seed = [task.training_targets([record], (1, epoch, 1)) for epoch in range(3000)]
    assert other_seed != first  # another sampler seed draws anew
    counts = {a: sum(t[0][0] == a for t in first) for a in ("two", "three", "four", "none")}
    assert counts["none"] == 0  # score 0: never drawn
    for answer, score in (("two", 0.6), ("three", 0.3), ("four", 0.9)):
        # 3000 draws: the share's standard error is < 0.01; the draws are fixed by their seeds
        assert abs(counts[answer] / 3000 - score / 1.8) < 0.03, (answer, counts)
    assert all(t[1][0] == record["label"][t[0][0]] for t in first)  # weighted by its score
    assert task.training_targets([{"id": 8, "label": {}}], (0, 0, 1)) == ([""], [0.0])
    most_common = build_router(config(data, "most_common"))["vqa"]
    assert most_common.training_targets([record], (0, 0, 1)) is None
    with pytest.raises(DataError, match=r"options.target: expected one of \['most_common', 'sa"):
        build_router(config(data, "random"))  # refused when the task is made, not in a worker


def test_training_batches_carry_the_drawn_targets_and_evaluation_batches_do_not(data):
    cfg = config(data)
    router = build_router(cfg)
    model = build_model(cfg, router)
    dataset = router.dataset("vqa", "train", model)
    sampler = MultitaskSampler({"vqa": len(dataset)}, {"vqa": 4}, SamplerConfig())
    (epoch, step), _, batch = next(iter(multitask_loader({"vqa": dataset}, sampler)))
    records = [dataset.records[i] for i in next(iter(sampler.epoch(0)))[1]]
    expected = router["vqa"].training_targets(records, (sampler.config.seed, epoch, step))
    assert (batch["targets"], batch["target_weights"]) == expected
    assert all(t in r["label"] for t, r in zip(batch["targets"], records))
    assert model(batch).loss.isfinite()
    evaluation = dataset.collate([dataset[0], dataset[1]])
    assert "target_weights" not in evaluation
    assert evaluation["targets"] == [dataset.records[i]["target"] for i in (0, 1)]
