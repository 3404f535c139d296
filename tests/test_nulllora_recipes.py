"""The Null-LoRA recipes (Zhang et al.) train the parameter counts the paper reports.

LoRA / DoRA r = 32 have no data-dependent size: their counts are checked at BLIP-base size on the
meta device (no weights, no memory), as ``launch.train --validate`` checks them. Null-LoRA's ranks
are 2 × each layer's nullity, which needs the real weights: on the meta device only its targets
are checked, and its count formula, Σ h·(in + out) + 2h over the recipe's layers, is checked on a
tiny BLIP whose every target weight has a planted nullity h.
"""

from pathlib import Path

import pytest
import torch

import vlpeft
from launch import run as launch_run
from launch.config import load_config
from vlpeft.adapters.nulllora import NullLoRALinear
from vlpeft.inject import find_targets

RECIPES = sorted(
    (Path(__file__).resolve().parent.parent / "launch/configs/recipes").glob("nulllora_*.yaml")
)
TOLERANCE = 0.005  # the paper's counts have three significant digits (10.6M: ±0.47 %)


def claimed(recipe: Path) -> int:
    return load_config(recipe).paper["params"]["trainable"]


def test_there_are_the_papers_ten_recipes():
    names = {r.stem for r in RECIPES}
    assert len(names) == 10 and "nulllora_tab3_vqav2_random_halves" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_each_recipe_claims_the_papers_count(recipe):
    """Every Null-LoRA table gives a count: Tab. 1 / 2 LoRA 10.6M, DoRA 10.8M, Null-LoRA 6.0M
    (retrieval) and 9.5M (VQAv2, Tab. 2 and Tab. 3)."""
    config = load_config(recipe)
    method = config.adapters["default"]["method"]
    retrieval = "tab1" in recipe.stem
    want = {"lora": 10_600_000, "dora": 10_800_000}.get(method)
    want = want or (6_000_000 if retrieval else 9_500_000)
    assert claimed(recipe) == want


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_the_count_is_reproduced_on_the_meta_device(recipe):
    config = load_config(recipe)
    report = launch_run.check_offline(config)
    if config.adapters["default"]["method"] == "null_lora":
        # the ranks are the weights': targets only (the planted-nullity test below checks the sum)
        assert report["trainable"] is None
        assert report["sets"]["default"]["checked"].startswith("targets only")
        return
    ours, paper = report["trainable"], claimed(recipe)
    assert abs(ours - paper) <= TOLERANCE * paper, f"{recipe.stem}: ours {ours:,}, paper {paper:,}"


def test_the_baselines_place_the_same_layers_in_both_models_and_null_lora_adds_the_decoder():
    layers = {
        r.stem: launch_run.check_offline(load_config(r))["sets"]["default"]["layers"]
        for r in RECIPES
    }
    baselines = {n: count for n, count in layers.items() if n.endswith("_r32")}
    assert set(baselines.values()) == {132}  # 12 × (ViT qkv, fc1, fc2 + text q, k, v ×2, FFN ×2)
    assert layers["nulllora_tab1_coco"] == layers["nulllora_tab1_flickr30k"] == 132
    assert layers["nulllora_tab2_vqav2"] == layers["nulllora_tab3_vqav2_random_halves"] == 228


def planted_nullity(linear: torch.nn.Linear, h: int, seed: int) -> None:
    """Makes ``linear``'s full-rank weight rank-deficient by exactly ``h`` (h more left and right
    null directions): h orthonormal directions V of its smaller side are projected out,
    W ← W·(I − V·Vᵀ) for a tall or square W, (I − V·Vᵀ)·W for a wide one."""
    g = torch.Generator().manual_seed(seed)
    w = linear.weight.detach().double()
    wide = w.shape[0] < w.shape[1]
    v = torch.linalg.qr(torch.randn(min(w.shape), h, generator=g, dtype=torch.float64)).Q
    with torch.no_grad():
        linear.weight.copy_(w - v @ (v.T @ w) if wide else w - (w @ v) @ v.T)


@pytest.mark.parametrize(
    "stem", ["nulllora_tab1_coco", "nulllora_tab2_vqav2", "nulllora_tab3_vqav2_random_halves"]
)
def test_null_lora_trains_twice_the_nullity_on_the_recipes_layers(stem):
    """On a tiny BLIP with the recipe's heads and placement, every target weight with a planted
    nullity h trains h·(in + out) + 2h — the count the recipe's comment sums (random halves too)."""
    (recipe,) = [r for r in RECIPES if r.stem == stem]
    config = load_config(recipe)
    torch.manual_seed(0)
    model = vlpeft.build_model("blip", "tiny", heads=config.model.overrides["heads"])
    (method,) = launch_run.adapter_methods(config, model).values()
    targets = find_targets(model, method.targets)
    expected = 0
    for i, (_, linear) in enumerate(targets):
        h = 1 + i % 3
        planted_nullity(linear, h, seed=i)
        expected += h * (linear.in_features + linear.out_features) + 2 * h
    vlpeft.add_adapter(model, method)
    assert vlpeft.count_parameters(model)[0] == expected
    adapters = [m for m in model.modules() if isinstance(m, NullLoRALinear)]
    assert len(adapters) == len(targets) == (132 if "tab1" in stem else 228) // 12 * 2
    halves = {a.report["frozen_halves"] for a in adapters}
    assert halves == {"random" if "random" in stem else "null_space"}
