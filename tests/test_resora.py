"""ReSoRA: every closed form against its naive definition (materialising each Δh_i), values and gradients."""

import pytest
import torch
from conftest import bart_inputs, perturb_adapters, run, tiny_bart, with_x_r

import vlpeft
from bench.resora import naive_penalty as naive
from vlpeft.adapters import AdapterConfig, FLoRAConfig, LoRAConfig, NullLoRAConfig, ReSoRAConfig
from vlpeft.adapters.resora import KINDS, subspace_penalty


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_equals_naive_with_equal_gradients(kind):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(40, 5, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    params = {"beta": 0.7, "sigma_frac": 0.8, "max_samples": 25, "seed": 3}
    fast = subspace_penalty(z, b, kind, **params)
    ref = naive(z, b, kind, **params)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-8)
    g_fast = torch.autograd.grad(fast, (z, b), allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(ref, (z, b), allow_unused=True, materialize_grads=True)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-8)


def test_linear_penalty_is_sum_of_squared_cosines_hand_case():
    z = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # cos(z1,z2)=0, cos(z1,z3)=cos(z2,z3)=1/√2
    assert subspace_penalty(z, torch.randn(4, 3), "linear").item() == pytest.approx(1.0)


def test_independent_subspaces_have_no_redundancy():
    z = torch.eye(4).repeat(3, 1)  # orthogonal, disjoint activation patterns
    b = torch.eye(6)[:, :4]  # orthogonal up-projection columns
    assert subspace_penalty(z, b, "linear").item() == pytest.approx(0.0)
    assert subspace_penalty(z, b, "cosine").item() == pytest.approx(0.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"z \(..., N, r\) and b \(..., d_out, r\)"):
        subspace_penalty(torch.ones(3, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        ReSoRAConfig(kind="gaussian")


METHODS = [
    ("lora", LoRAConfig(targets=["q_proj", "v_proj"], r=4), bart_inputs),
    ("routed-lora", LoRAConfig(targets=["q_proj"], r=4, routing="proj"), with_x_r(bart_inputs)),
    ("null-lora", NullLoRAConfig(targets=["fc1"], min_rank=4), bart_inputs),
    ("flora", FLoRAConfig(targets=["fc2"], r=3), bart_inputs),
    ("adapter", AdapterConfig(targets=["fc2"], bottleneck=4), bart_inputs),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", METHODS, ids=[m[0] for m in METHODS])
def test_model_penalty_is_mean_over_layers_of_recorded_components(row, kind):
    """Layers of one shape are penalised in one batch: the result is still the per-layer mean."""
    _, config, make_inputs = row
    model = tiny_bart()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    inputs = make_inputs()
    run(model, inputs)
    assert all(
        getattr(a, "recorded", None) is None
        for _, layer in vlpeft.adapted_layers(model)
        for a in layer.adapters.values()
    )
    vlpeft.enable_resora(model)
    run(model, inputs)
    recorded = [
        a.recorded for _, layer in vlpeft.adapted_layers(model) for a in layer.adapters.values()
    ]
    assert all(r is not None for r in recorded)
    expected = torch.stack(
        [subspace_penalty(z.reshape(-1, z.shape[-1]), b, kind) for z, b, _ in recorded]
    ).mean()
    penalty = vlpeft.resora_penalty(model, ReSoRAConfig(kind=kind, weight=0.5))
    torch.testing.assert_close(penalty, 0.5 * expected)
    penalty.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if ".adapters." in n)
    # consumed: a second call without a forward has nothing left
    assert vlpeft.resora_penalty(model, ReSoRAConfig()).item() == 0


def test_two_stage_schedule_and_padding_mask():
    from vlpeft.adapters.resora import token_masks

    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["encoder.layers.0.self_attn.q_proj"], r=3))
    perturb_adapters(model)
    vlpeft.enable_resora(model)
    inputs = bart_inputs()
    mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, 4:] = False
    config = ReSoRAConfig(start_step=10, samples="tokens")
    run(model, inputs)
    assert vlpeft.resora_penalty(model, config, step=9).item() == 0
    with token_masks(mask):
        run(model, inputs)
    z, b, m = next(
        a for _, layer in vlpeft.adapted_layers(model) for a in layer.adapters.values()
    ).recorded
    assert torch.equal(m, mask)
    got = vlpeft.resora_penalty(model, config, step=10)
    torch.testing.assert_close(got, 0.1 * subspace_penalty(z[mask], b, "linear"))
    with token_masks(mask):
        run(model, inputs)
    pooled = vlpeft.resora_penalty(model, ReSoRAConfig(samples="pooled"))
    means = torch.stack([z[0, :4].mean(0), z[1].mean(0)])
    torch.testing.assert_close(pooled, 0.1 * subspace_penalty(means, b, "linear"))


def test_weight_level_variant_uses_the_rank1_weight_components():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=3, alpha=3))
    perturb_adapters(net)
    ad = net[0].adapters["default"]
    got = vlpeft.resora_penalty(net, ReSoRAConfig(samples="weight", kind="cosine", weight=1.0))
    # ΔW_i = b_i a_iᵀ: the increments for the inputs e_k are b_i·A[i, k]
    torch.testing.assert_close(got, naive(ad.lora_A.T.detach(), ad.lora_B.detach(), "cosine"))


def test_vl_models_announce_their_padding_to_resora():
    """Encoder, decoder and cross-attention layers of CLIP-BART record the mask of their own
    sequence (text + visual tokens, targets); outside the collection nothing is announced."""
    from vlpeft.adapters.resora import collect_token_masks
    from vlpeft.models import build_model

    model = build_model("clip-bart", "tiny").eval()
    vlpeft.add_adapter(
        model, model.adapter_config(LoRAConfig(r=2, targets=["x"]), kinds=["q", "v"])
    )
    vlpeft.enable_resora(model)
    batch = {
        "images": torch.randn(2, 3, 64, 64),
        "text": ["vqa: what color is the big circle on the left?", "vqa: how many?"],
        "targets": ["red", "two small blue squares"],
    }
    with collect_token_masks():
        model.loss(batch)
    text = model.tokenize(batch["text"])["attention_mask"].bool()
    encoder = torch.cat([text, torch.ones(2, 4, dtype=torch.bool)], 1)  # 2 × 2 visual tokens
    decoder = model.tokenize(batch["targets"])["attention_mask"].bool()
    assert encoder.shape[1] != decoder.shape[1] and not encoder.all() and not decoder.all()
    seen = {}
    for name, layer in vlpeft.adapted_layers(model):
        _, _, mask = layer.adapters["default"].recorded
        reads_encoder = ".encoder." in name or "encoder_attn.v_proj" in name
        assert torch.equal(mask, encoder if reads_encoder else decoder), name
        seen[reads_encoder] = True
    assert seen == {True: True, False: True}
    model.loss(batch)  # no collection: every position counts
    assert all(
        layer.adapters["default"].recorded[2] is None for _, layer in vlpeft.adapted_layers(model)
    )


def test_ambiguous_announced_masks_are_not_used():
    from vlpeft.adapters.resora import _mask_for, collect_token_masks, register_token_mask

    z = torch.zeros(2, 3, 4)
    a, b = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.ones(2, 3)
    with collect_token_masks():
        register_token_mask(a)
        assert torch.equal(_mask_for(z), a.bool())
        register_token_mask(a.clone())
        assert torch.equal(_mask_for(z), a.bool())  # the same mask twice is no ambiguity
        register_token_mask(b)
        assert _mask_for(z) is None
    assert _mask_for(z) is None


def test_blip_vision_tokens_are_all_real_and_text_skips_padding():
    from vlpeft.adapters.resora import collect_token_masks
    from vlpeft.models import build_model

    model = build_model("blip", "tiny", heads=["retrieval"]).eval()
    config = model.adapter_config(
        LoRAConfig(r=2, targets=["x"]), ["vision", "text_encoder"], ["qkv", "q"]
    )
    vlpeft.add_adapter(model, config)
    vlpeft.enable_resora(model)
    texts = ["a small red circle on the left and a blue square", "two shapes"]
    batch = {
        "kind": "retrieval",
        "images": torch.randn(2, 3, 32, 32),
        "text": texts,
        "image_ids": [0, 1],
    }
    with collect_token_masks():
        model.loss(batch)
    text = model.tokenize(texts)["attention_mask"].bool()
    for name, layer in vlpeft.adapted_layers(model):
        _, _, mask = layer.adapters["default"].recorded
        if name.startswith("vision_model"):
            assert mask.shape == (2, 1 + 16) and mask.all(), name
        elif ".attention." in name:  # the last forward was ITM: positive and negative pairs
            assert mask.shape[1] == text.shape[1] and not mask.all(), name
            assert all(any(torch.equal(row, t) for t in text) for row in mask), name


@pytest.mark.parametrize("kind", KINDS)
def test_float32_keeps_float64_accuracy_at_full_sample_size(kind):
    """At N = 512 (the kernel kind's cap) float32 stays within 1e-3 of float64 (a closed form that
    cancels large terms, e.g. uncentred HSIC Gram sums, loses ~2 % here)."""
    g = torch.Generator().manual_seed(0)
    z, b = torch.randn(3, 512, 8, generator=g), torch.randn(3, 96, 8, generator=g)
    low = subspace_penalty(z, b, kind)
    high = subspace_penalty(z.double(), b.double(), kind)
    torch.testing.assert_close(low.double(), high, rtol=1e-3, atol=1e-6)
