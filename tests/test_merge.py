"""merge_task_adapters: one source returns itself, equality with peft's add_weighted_adapter, TIES
and DARE on hand-worked deltas, refusals, and the merged adapter's save / reload / export."""

import pytest
import torch
from conftest import bart_inputs, perturb_adapters, run, text_inputs, tiny_bart, tiny_gpt2
from test_peft_import import peft_checkpoint

import vlpeft
from vlpeft.adapters import AdapterConfig, DoRAConfig, FLoRAConfig, LoRAConfig, NullLoRAConfig
from vlpeft.merge import SVD_METHODS, combine


def two_task_model(make_model=tiny_bart, targets=("q_proj", "v_proj"), r=4, alpha=8, **kw):
    model = make_model()
    vlpeft.add_adapter(model, LoRAConfig(targets=list(targets), r=r, alpha=alpha, **kw), "vqa")
    vlpeft.add_adapter(model, LoRAConfig(targets=list(targets), r=r, alpha=alpha, **kw), "caption")
    perturb_adapters(model, scale=0.2)
    return model


def deltas(model, name):
    return {
        p: layer.delta_weight(name)
        for p, layer in vlpeft.adapted_layers(model)
        if name in layer.adapters
    }


# -- one source at weight 1 ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_one_source_at_weight_one_returns_it(method):
    model = two_task_model(alpha=4)  # α = r: the scale is 1, cat and linear are bit-exact
    vlpeft.merge_task_adapters(model, {"vqa": 1.0}, method=method)
    want, got = deltas(model, "vqa"), deltas(model, "merged")
    assert want.keys() == got.keys()
    for path in want:
        if method == "svd":  # full rank (r = 4 = the source's): exact up to the SVD's rounding
            torch.testing.assert_close(got[path], want[path], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(got[path], want[path]), path
    inputs = bart_inputs()
    vlpeft.set_active_adapter(model, "vqa")
    expected = run(model, inputs)
    vlpeft.set_active_adapter(model, "merged")
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=1e-5)


def test_one_source_with_a_scale_cat_is_exact_linear_and_svd_close():
    model = two_task_model(alpha=10)  # s = 2.5, folded into B
    for method in ("cat", "linear", "svd"):
        vlpeft.merge_task_adapters(model, {"caption": 1.0}, method=method, name=method)
        for path, want in deltas(model, "caption").items():
            got = dict(vlpeft.adapted_layers(model))[path].delta_weight(method)
            if method == "cat":
                assert torch.equal(got, want)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_cat_is_the_exact_weighted_sum_at_the_summed_rank():
    model = two_task_model()
    vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": -0.5})
    for _path, layer in vlpeft.adapted_layers(model):
        assert layer.adapters["merged"].r == 8
        want = layer.delta_weight("vqa") - 0.5 * layer.delta_weight("caption")
        torch.testing.assert_close(layer.delta_weight("merged"), want, atol=1e-6, rtol=1e-5)


def test_svd_truncates_to_the_best_rank_k_approximation():
    model = two_task_model()
    vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 1.0}, method="svd", rank=3)
    for _, layer in vlpeft.adapted_layers(model):
        total = layer.delta_weight("vqa") + layer.delta_weight("caption")
        u, s, vh = torch.linalg.svd(total)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert layer.adapters["merged"].r == 3
        torch.testing.assert_close(layer.delta_weight("merged"), best, atol=1e-6, rtol=1e-5)


# -- equality with peft --------------------------------------------------------------------------
PEFT_METHODS = [
    ("cat", None),
    ("linear", None),
    ("svd", None),
    ("ties", 0.5),
    ("ties_svd", 0.5),
    ("magnitude_prune", 0.6),
    ("magnitude_prune_svd", 0.6),
    ("dare_linear", 0.5),
    ("dare_ties", 0.5),
    ("dare_linear_svd", 0.7),
    ("dare_ties_svd", 0.7),
]
BACKBONES = [
    ("bart", tiny_bart, dict(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"])),
    ("gpt2-conv1d", tiny_gpt2, dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"])),
]


def _peft_and_vlpeft(make_model, config, tmp_path):
    from peft import PeftModel

    for i, task in enumerate(("vqa", "caption")):
        peft_checkpoint(make_model, tmp_path / task, seed=i, **config)
    peft_model = PeftModel.from_pretrained(make_model(), tmp_path / "vqa", adapter_name="vqa")
    peft_model.load_adapter(tmp_path / "caption", adapter_name="caption")
    model = make_model()
    for task in ("vqa", "caption"):
        vlpeft.load_peft_lora(model, tmp_path / task, name=task)
    return peft_model, model


@pytest.mark.parametrize("backbone", BACKBONES, ids=[b[0] for b in BACKBONES])
@pytest.mark.parametrize("method,density", PEFT_METHODS, ids=[m for m, _ in PEFT_METHODS])
def test_equals_peft_add_weighted_adapter(backbone, method, density, tmp_path, monkeypatch):
    from peft.utils import merge_utils

    _, make_model, config = backbone
    peft_model, model = _peft_and_vlpeft(make_model, config, tmp_path)
    seed = 5
    if method.startswith("dare"):
        # peft draws DARE's drops from the global generator after its injection consumed some:
        # seeding it at the first draw is where "the same seed" is possible
        original, first = merge_utils.random_pruning, [True]

        def seeded(*args, **kwargs):
            if first[0]:
                torch.manual_seed(seed)
                first[0] = False
            return original(*args, **kwargs)

        monkeypatch.setattr(merge_utils, "random_pruning", seeded)
    weights = {"vqa": 1.0, "caption": 0.6}
    peft_model.add_weighted_adapter(
        list(weights), list(weights.values()), "merged", combination_type=method, density=density
    )
    vlpeft.merge_task_adapters(model, weights, method=method, density=density, seed=seed)
    theirs = dict(peft_model.base_model.model.named_modules())
    compared = 0
    for path, layer in vlpeft.adapted_layers(model):
        want = theirs[path].get_delta_weight("merged")
        torch.testing.assert_close(layer.delta_weight("merged"), want, atol=1e-5, rtol=1e-4)
        compared += 1
    assert compared and torch.any(want != 0)
    inputs = bart_inputs() if make_model is tiny_bart else text_inputs()
    peft_model.set_adapter("merged")
    vlpeft.set_active_adapter(model, "merged")
    torch.testing.assert_close(
        run(model, inputs), run(peft_model.eval(), inputs), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(
    "patterns",
    [{}, {"fc1": 2}],  # with {"fc1": 2} both sources have rank 2 at fc1: their sum has rank 4
    ids=["r4-r8", "r4-r8-both-rank-2-at-fc1"],
)
def test_svd_default_rank_of_unequal_sources_is_the_largest_as_in_peft(patterns, tmp_path):
    """peft's add_weighted_adapter: new_rank = svd_rank or max(source ranks) for the _svd
    methods, a source's rank its largest (r or a rank_pattern value). r = 4 and r = 8 sum to rank
    12 at a 32-wide q_proj, so rank 8 truncates there; at fc1 with the pattern it is exact."""
    from peft import PeftModel

    for task, r, seed in (("vqa", 4, 0), ("caption", 8, 1)):
        config = dict(r=r, lora_alpha=8, target_modules=["q_proj", "fc1"], rank_pattern=patterns)
        peft_checkpoint(tiny_bart, tmp_path / task, seed=seed, **config)
    peft_model = PeftModel.from_pretrained(tiny_bart(), tmp_path / "vqa", adapter_name="vqa")
    peft_model.load_adapter(tmp_path / "caption", adapter_name="caption")
    model = tiny_bart()
    for task in ("vqa", "caption"):
        vlpeft.load_peft_lora(model, tmp_path / task, name=task)
    weights = {"vqa": 1.0, "caption": 0.6}
    peft_model.add_weighted_adapter(list(weights), list(weights.values()), "merged", "svd")
    vlpeft.merge_task_adapters(model, weights, method="svd")
    assert peft_model.peft_config["merged"].r == 8
    theirs = dict(peft_model.base_model.model.named_modules())
    truncated = []
    for path, layer in vlpeft.adapted_layers(model):
        assert layer.adapters["merged"].r == 8, path
        total = layer.delta_weight("vqa") + 0.6 * layer.delta_weight("caption")
        u, s, vh = torch.linalg.svd(total.double())
        best = (u[:, :8] * s[:8] @ vh[:8]).float()
        got = layer.delta_weight("merged")
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            got, theirs[path].get_delta_weight("merged"), atol=1e-5, rtol=1e-4
        )
        if s[8] > 1e-3 * s[0]:  # rank > 8: the merge is not the exact sum
            assert (got - total).norm() > 1e-3 * total.norm()
            truncated.append(path)
    assert any("q_proj" in p for p in truncated)


def test_dare_depends_on_the_seed_and_only_on_it():
    model = two_task_model()
    w = {"vqa": 1.0, "caption": 1.0}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        vlpeft.merge_task_adapters(
            model, w, method="dare_linear", density=0.5, seed=seed, name=name
        )
    layer = next(layer for _, layer in vlpeft.adapted_layers(model))
    assert torch.equal(layer.delta_weight("a"), layer.delta_weight("b"))
    assert not torch.allclose(layer.delta_weight("a"), layer.delta_weight("c"))


# -- hand-worked -------------------------------------------------------------------------------
def test_ties_on_hand_worked_deltas():
    d1 = torch.tensor([[4.0, -1.0], [0.5, 2.0]])
    d2 = torch.tensor([[-3.0, -2.0], [1.0, -0.1]])
    # density 0.5 keeps 2 of 4 entries by magnitude: d1 -> [[4, 0], [0, 2]], d2 -> [[-3, -2], [0, 0]]
    # elected sign of the sums [[1, -2], [0, 2]]: [[+, -], [+, +]]
    # weights (1, 2): agreeing weighted entries [[4], [-4]], [[], [2]] -> means
    want = torch.tensor([[4.0, -4.0], [0.0, 2.0]])
    torch.testing.assert_close(combine([d1, d2], [1.0, 2.0], "ties", density=0.5), want)
    # merged through a layer: a full-rank LoRA pair, ties_svd at full rank gives the same
    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    for task, d in (("t1", d1), ("t2", d2)):
        vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=2), task)
        ad = net[0].adapters[task]
        with torch.no_grad():
            ad.lora_A.copy_(torch.eye(2))
            ad.lora_B.copy_(d)
    vlpeft.merge_task_adapters(net, {"t1": 1.0, "t2": 2.0}, method="ties_svd", density=0.5)
    torch.testing.assert_close(net[0].delta_weight("merged"), want, atol=1e-6, rtol=1e-6)


def test_dare_on_hand_worked_deltas():
    d1 = torch.tensor([1.0, -2.0, 3.0, -4.0])
    d2 = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    keep1, keep2 = torch.tensor([1.0, 0, 1, 0]), torch.tensor([1.0, 1, 0, 0])

    # the masks a generator seeded with 0 draws, in source order, are what DARE uses
    g = torch.Generator().manual_seed(0)
    m1 = torch.bernoulli(torch.full((4,), 0.5), generator=g)
    m2 = torch.bernoulli(torch.full((4,), 0.5), generator=g)
    lin = combine([d1, d2], [1.0, 0.5], "dare_linear", 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lin, (d1 * m1 + 0.5 * d2 * m2) / 0.5)
    # dare_ties with masks written out by hand: drop, rescale by 2, elect, disjoint mean
    p1, p2 = d1 * keep1 * 2, d2 * keep2 * 2  # [2, 0, 6, 0], [-2, -2, 0, 0]
    sign = torch.tensor([1.0, -1.0, 1.0, 1.0])  # sums [0, -2, 6, 0]: >= 0 is +
    want = torch.tensor([2.0, -2.0 * 0.5, 6.0, 0.0])  # agreeing: 2 | -1 | 6 | none
    got = torch.stack([p1, p2])
    agree = got.sign() == sign
    weighted = got * torch.tensor([1.0, 0.5])[:, None]
    torch.testing.assert_close((weighted * agree).sum(0) / agree.sum(0).clamp(min=1), want)
    # combine's dare_ties: the seeded masks m1, m2, then peft's elect + disjoint mean
    ties = combine([d1, d2], [1.0, 0.5], "dare_ties", 0.5, torch.Generator().manual_seed(0))
    q = torch.stack([d1 * m1 * 2, d2 * m2 * 2])
    elected = q.sign() == torch.where(q.sum(0) >= 0, 1.0, -1.0)
    w = q * torch.tensor([1.0, 0.5])[:, None]
    torch.testing.assert_close(ties, (w * elected).sum(0) / elected.sum(0).clamp(min=1))
    # unbiased: over many seeds DARE's mean is the weighted sum
    big = torch.randn(2000)
    mean = torch.stack(
        [
            combine([big], [1.0], "dare_linear", 0.3, torch.Generator().manual_seed(s))
            for s in range(400)
        ]
    ).mean(0)
    assert (mean - big).abs().mean() < 0.1 * big.abs().mean()


# -- what can be merged ------------------------------------------------------------------------
def test_null_lora_flora_and_lora_sources_merge_exactly_with_cat_and_svd():
    model = tiny_bart()
    vlpeft.add_adapter(model, NullLoRAConfig(targets=["q_proj", "fc1"], min_rank=4), "vqa")
    vlpeft.add_adapter(model, FLoRAConfig(targets=["q_proj", "k_proj"], r=3, scale=0.5), "gqa")
    vlpeft.add_adapter(model, LoRAConfig(targets=["fc1"], r=2, alpha=4), "caption")
    perturb_adapters(model)
    weights = {"vqa": 1.0, "gqa": 0.7, "caption": -0.3}
    vlpeft.merge_task_adapters(model, weights, method="cat")
    vlpeft.merge_task_adapters(model, weights, method="svd", rank=32, name="svd")
    for _path, layer in vlpeft.adapted_layers(model):
        want = sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.adapters)
        torch.testing.assert_close(layer.delta_weight("merged"), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.delta_weight("svd"), want, atol=1e-5, rtol=1e-4)
    assert "k_proj" in " ".join(
        p for p, layer in vlpeft.adapted_layers(model) if "merged" in layer.adapters
    )


def test_dora_merges_through_its_delta_with_the_svd_methods_only():
    model = tiny_bart()
    vlpeft.add_adapter(model, DoRAConfig(targets=["q_proj"], r=2), "vqa")
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), "caption")
    perturb_adapters(model)
    with pytest.raises(TypeError, match="use an _svd method"):
        vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 1.0}, method="cat")
    vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 0.5}, method="svd", rank=32)
    for _, layer in vlpeft.adapted_layers(model):
        want = layer.delta_weight("vqa") + 0.5 * layer.delta_weight("caption")
        torch.testing.assert_close(layer.delta_weight("merged"), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "config,why",
    [
        (LoRAConfig(targets=["q_proj"], r=2, routing="mul"), "routed"),
        (AdapterConfig(targets=["fc2"], bottleneck=4), "not linear"),
    ],
)
def test_routed_and_adapter_sets_are_refused_with_the_reason(config, why):
    model = tiny_bart()
    vlpeft.add_adapter(model, config, "vqa")
    vlpeft.add_adapter(model, config, "caption")
    for method in ("cat", "svd"):
        with pytest.raises(TypeError, match=why):
            vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 1.0}, method=method)
    assert "merged" not in vlpeft.inject.adapter_configs(model)


def test_argument_errors():
    model = two_task_model()
    w = {"vqa": 1.0, "caption": 1.0}
    with pytest.raises(ValueError, match="needs density"):
        vlpeft.merge_task_adapters(model, w, method="ties")
    with pytest.raises(ValueError, match="density is used by"):
        vlpeft.merge_task_adapters(model, w, method="cat", density=0.5)
    with pytest.raises(ValueError, match="rank is the rank of the _svd"):
        vlpeft.merge_task_adapters(model, w, method="linear", rank=2)
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        vlpeft.merge_task_adapters(model, w, method="mean")
    with pytest.raises(KeyError, match="'gqa'"):
        vlpeft.merge_task_adapters(model, {"gqa": 1.0})
    with pytest.raises(ValueError, match="'vqa' already exists"):
        vlpeft.merge_task_adapters(model, w, name="vqa")
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "v_proj"], r=2), "gqa")
    with pytest.raises(ValueError, match="equal rank"):
        vlpeft.merge_task_adapters(model, {"vqa": 1.0, "gqa": 1.0}, method="linear")
    assert SVD_METHODS[0] == "svd"


@pytest.mark.parametrize("density", ["0.5", True])  # NaN and inf: refused before #25 too
def test_a_density_that_is_no_number_is_refused(density):
    model = two_task_model()
    with pytest.raises(ValueError, match=r"'ties' needs density in \(0, 1\], got "):
        vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 1.0}, "ties", density=density)
    assert "merged" not in vlpeft.inject.adapter_configs(model)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "ties_svd"])
def test_a_density_that_keeps_no_entry_is_an_error_naming_method_density_and_layer(method):
    model = two_task_model()  # the smallest factor has 4·32 = 128 entries: 1e-4 keeps none
    with pytest.raises(ValueError, match="keeps no entry") as err:
        vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 1.0}, method, density=1e-4)
    first = next(p for p, _ in vlpeft.adapted_layers(model))
    assert f"at {first} (method {method!r} at density 0.0001)" in str(err.value)
    assert "merged" not in vlpeft.inject.adapter_configs(model)


@pytest.mark.parametrize(
    "method,density,weights",
    [
        ("dare_linear", 1e-3, {"vqa": 1.0, "caption": 1.0}),  # keeps each entry w.p. 1e-3
        ("cat", None, {"vqa": 0.0, "caption": 0.0}),
        ("svd", None, {"vqa": 1.0, "vqa_copy": -1.0}),  # an adapter minus itself
    ],
)
def test_a_merge_whose_update_is_all_zeros_is_an_error_naming_the_layer(method, density, weights):
    model = two_task_model()
    config = vlpeft.inject.adapter_configs(model)["vqa"]
    vlpeft.add_adapter(model, config, "vqa_copy")
    with torch.no_grad():
        for _, layer in vlpeft.adapted_layers(model):
            for key, t in layer.adapters["vqa"].state_dict().items():
                layer.adapters["vqa_copy"].get_parameter(key).copy_(t)
    with pytest.raises(ValueError, match="all-zero update") as err:
        vlpeft.merge_task_adapters(model, weights, method, density=density)
    first = next(p for p, _ in vlpeft.adapted_layers(model))
    what = f"method {method!r}" + (f" at density {density}" if density else "")
    assert f"at {first}: {what} gives" in str(err.value)
    assert "merged" not in vlpeft.inject.adapter_configs(model)


# -- the merged adapter is an adapter like any other -------------------------------------------
def test_merged_adapter_saves_reloads_and_exports(tmp_path):
    from peft import PeftModel

    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), "vqa")
    vlpeft.add_adapter(model, NullLoRAConfig(targets=["q_proj", "fc1"], min_rank=2), "caption")
    perturb_adapters(model)
    vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 0.5})  # ranks differ per layer
    vlpeft.set_active_adapter(model, "merged")
    inputs = bart_inputs()
    expected = run(model, inputs)
    vlpeft.save_adapter(model, tmp_path / "vlpeft", name="merged")
    fresh = vlpeft.load_adapter(tiny_bart(), tmp_path / "vlpeft")
    assert torch.equal(run(fresh, inputs), expected)
    vlpeft.export_peft_lora(model, tmp_path / "peft", name="merged")
    peft_model = PeftModel.from_pretrained(tiny_bart(), tmp_path / "peft").eval()
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
    vlpeft.merge_adapter(model)  # and it folds into W0 like any LoRA
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


# -- python -m launch.export RUN --merge ----------------------------------------------------------
def test_export_merge_command_on_a_two_task_run(tmp_path):
    """A tiny two-task run with one adapter per task; the merged export, loaded into a fresh base
    model, is the in-process merge (vlpeft and peft formats)."""
    from launch.config import load_config
    from launch.export import load_exported, main
    from launch.run import load_run
    from launch.train import train
    from tasks.router import take
    from tasks.synthetic import generate

    generate(tmp_path / "data", images=24, seed=0, size=32)
    lora = {"method": "lora", "r": 4, "dropout": 0.0}
    spec = {
        "model": {"family": "clip-bart", "preset": "tiny", "overrides": {"image_size": 32}},
        "adapters": {"vqa": lora, "gqa": {**lora, "trainable": ["layer_norm"]}},
        "data": {"file": str(tmp_path / "data" / "tasks.yaml"),
                 "tasks": {"vqa": {"batch_size": 4, "adapter": "vqa"},
                           "gqa": {"batch_size": 4, "adapter": "gqa"}}},
        "train": {"steps": 3, "lr": 1e-2, "checkpoint_every": 0, "log_every": 1, "tensorboard": False},
        "eval": {"splits": [], "max_records": 4, "max_new_tokens": 3},
    }  # fmt: skip
    run_dir = tmp_path / "run"
    train(load_config(None, data=spec), run_dir)
    model, router, _ = load_run(run_dir)
    vlpeft.merge_task_adapters(model, {"vqa": 1.0, "gqa": 0.5}, method="ties", density=0.5)
    vlpeft.set_active_adapter(model, "merged")
    batch = take(router.dataset("vqa", "test", model, limit=4), range(4))
    for fmt in ("vlpeft", "peft-lora"):
        out = tmp_path / f"merged-{fmt}"
        argv = [str(run_dir), "--merge", "vqa=1,gqa=0.5", "--method", "ties", "--density", "0.5"]
        main([*argv, "--out", str(out), "--format", fmt])
        fresh, info = load_exported(out)
        assert info["merge"]["method"] == "ties" and sorted(info["tasks"]) == ["gqa", "vqa"]
        with torch.no_grad():
            torch.testing.assert_close(fresh.loss(batch), model.loss(batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="needs density"):
        main(
            [
                str(run_dir),
                "--merge",
                "vqa=1,gqa=1",
                "--method",
                "ties",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(SystemExit, match="not TASK=WEIGHT"):
        main([str(run_dir), "--merge", "vqa=1,gqa", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no task 'caption'"):
        main([str(run_dir), "--merge", "vqa=1,caption=1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):  # --task or --merge, not both
        main([str(run_dir), "--task", "vqa", "--merge", "vqa=1", "--out", str(tmp_path / "x")])


def test_import_vlpeft_does_not_import_peft():
    """peft's merge helpers are imported inside the functions that use them."""
    import subprocess
    import sys

    code = "import sys, vlpeft; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_untrained_sources_merge_to_an_untrained_adapter_with_a_warning(caplog):
    """Initialised LoRAs (B = 0) change nothing: their merge changes nothing either — a warning,
    not the all-zero-update error meant for merges that lose what the sources had."""
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), "vqa")
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), "caption")
    with caplog.at_level("WARNING", logger="vlpeft.merge"):
        vlpeft.merge_task_adapters(model, {"vqa": 1.0, "caption": 0.5})
    assert "change nothing in 6 of 6 layers" in caplog.text
    vlpeft.set_active_adapter(model, "merged")
    inputs = bart_inputs()
    assert torch.equal(run(model, inputs), run(tiny_bart(), inputs))
