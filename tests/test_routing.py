"""Routing functions against explicit matrix algebra; routed LoRA/Adapter against their definitions."""

import pytest
import torch
from conftest import perturb_adapters, text_inputs, tiny_bart, tiny_gpt2

import vlpeft
from vlpeft.adapters import AdapterConfig, LoRAConfig
from vlpeft.adapters.routing import KINDS, route

L, R = 5, 4


def explicit(kind, x_t, x_v):
    """The paper's formulas on one example: x_t (L, r), x_v (1, r), written as matrix products."""
    relu = kind.startswith("relu_")
    base = kind[5:] if relu else kind
    t = torch.relu(x_t) if relu else x_t
    v = torch.relu(x_v) if relu else x_v
    ones = torch.ones(1, x_t.shape[0])
    if base == "mul":
        return t * (ones.T @ v)  # x_t ∘ x_v', x_v' = 1ᵀ x_v
    if base == "add":
        return t + ones.T @ v
    if base == "proj":
        return t @ v.T @ x_v  # x_t x_vᵀ x_v
    return t @ (torch.ones(R, 1) @ v)  # x_t x_v'', x_v'' = x_v repeated as r rows


@pytest.mark.parametrize("kind", KINDS)
def test_route_matches_explicit_algebra(kind):
    g = torch.Generator().manual_seed(0)
    x_t, x_v = torch.randn(3, L, R, generator=g), torch.randn(3, R, generator=g)
    out = route(kind, x_t, x_v)
    assert out.shape == x_t.shape
    for i in range(3):
        torch.testing.assert_close(out[i], explicit(kind, x_t[i], x_v[i : i + 1]))


def test_expand_rescales_x_v_by_the_row_sum():
    x_t = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    x_v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(route("expand", x_t, x_v), torch.tensor([[9.0, 12.0], [-3.0, -4.0]]))


def test_several_visual_tokens_are_mean_pooled():
    g = torch.Generator().manual_seed(1)
    x_t, x_vs = torch.randn(2, L, R, generator=g), torch.randn(2, 6, R, generator=g)
    for kind in KINDS:
        torch.testing.assert_close(route(kind, x_t, x_vs), route(kind, x_t, x_vs.mean(1)))


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown routing function 'dot'"):
        route("dot", torch.ones(1, 2, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="routing must be one of"):
        LoRAConfig(targets=["q"], routing="dot")


def routed_linear(config, d_in=6, d_out=5):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    vlpeft.add_adapter(net, config)
    perturb_adapters(net, scale=0.3)
    return net


@pytest.mark.parametrize("separate", [False, True])
def test_routed_lora_is_scaled_b_of_routed_bottleneck(separate):
    config = LoRAConfig(
        targets=["0"],
        r=R,
        alpha=8,
        routing="proj",
        separate_mapping=separate,
        visual_dim=3 if separate else None,
    )
    net = routed_linear(config)
    ad = net[0].adapters["default"]
    x, x_r = torch.randn(2, L, 6), torch.randn(2, 3 if separate else 6)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    a_v = ad.lora_A_visual if separate else ad.lora_A
    x_t, x_v = x @ ad.lora_A.T, x_r @ a_v.T
    routed = route("proj", x_t, x_v)
    if separate:  # the paper's separate mapping: routed at width r/4, then up to r
        assert x_t.shape[-1] == R // 4
        routed = routed @ ad.lora_mid.T
    expected = net[0].base_layer(x) + (8 / R) * routed @ ad.lora_B.T
    torch.testing.assert_close(y, expected)


def test_routed_adapter_routes_down_projections_before_activation():
    net = routed_linear(
        AdapterConfig(targets=["0"], bottleneck=3, routing="mul", activation="gelu")
    )
    ad = net[0].adapters["default"]
    x, x_r = torch.randn(2, L, 6), torch.randn(2, 5)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    h = net[0].base_layer(x)
    expected = h + ad.up(torch.nn.functional.gelu(route("mul", ad.down(h), ad.down(x_r))))
    torch.testing.assert_close(y, expected)


def test_gpt2_qv_slices_route_each_projection_separately():
    model = tiny_gpt2()
    vlpeft.add_adapter(
        model,
        LoRAConfig(
            targets=["c_attn"],
            r=2,
            alpha=2,
            routing="expand",
            slices={"c_attn": {"parts": 3, "use": [0, 2]}},
        ),
    )
    perturb_adapters(model)
    layer = model.transformer.h[0].attn.c_attn
    ad = layer.adapters["default"]
    x, x_r = torch.randn(2, L, 32), torch.randn(2, 32)
    with vlpeft.routing_inputs(model, x_r):
        y = layer(x)
    base = layer.base_layer(x)
    for s, part in enumerate([0, 2]):
        a, b = ad.lora_A[2 * s : 2 * s + 2], ad.lora_B[32 * s : 32 * s + 32]
        expected = base[..., 32 * part : 32 * part + 32] + route("expand", x @ a.T, x_r @ a.T) @ b.T
        torch.testing.assert_close(y[..., 32 * part : 32 * part + 32], expected)
    torch.testing.assert_close(y[..., 32:64], base[..., 32:64])


def test_missing_x_r_is_a_clear_error():
    net = routed_linear(LoRAConfig(targets=["0"], r=2, routing="add"))
    with pytest.raises(RuntimeError, match="called without x_R"):
        net(torch.randn(2, 6))


def test_x_r_by_longest_module_prefix():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Linear(4, 4))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0.0", "1"], r=2, routing="mul"))
    perturb_adapters(net)
    x = torch.randn(1, 3, 4)
    enc, dec = torch.randn(1, 4), torch.randn(1, 4)
    with vlpeft.routing_inputs(net, {"": dec, "0": enc}):
        both = net(x)
    with vlpeft.routing_inputs(net, enc):
        h = net[0](x)
    with vlpeft.routing_inputs(net, dec):
        torch.testing.assert_close(net[1](h), both)
    with vlpeft.routing_inputs(net, {"": dec, "0": enc}):  # the per-model form of the old shim
        torch.testing.assert_close(net(x), both)


def test_module_less_routing_inputs_is_an_error_naming_the_per_model_call():
    """The process-wide ``routing_inputs(x_r)`` is gone: calling it fails at once, saying what to
    call instead, and no routed call reads a global."""
    x_r = torch.randn(1, 4)
    for old in (x_r, {"": x_r}):
        with pytest.raises(TypeError, match=r"vlpeft\.routing_inputs\(model, x_r\)") as err:
            vlpeft.routing_inputs(old)
        assert "vlpeft.set_routing_inputs(model, x_r)" in str(err.value)
    assert not hasattr(vlpeft.adapters.routing, "_LEGACY")


def test_routed_layers_refuse_merge_and_export(tmp_path):
    net = routed_linear(LoRAConfig(targets=["0"], r=2, routing="proj"))
    with pytest.raises(TypeError, match="not mergeable"):
        vlpeft.merge_adapter(net)
    with pytest.raises(TypeError, match="cannot be written as a plain peft LoRA"):
        vlpeft.export_peft_lora(net, tmp_path)


def test_beam_expanded_batch_repeats_x_r_per_beam():
    net = routed_linear(LoRAConfig(targets=["0"], r=2, routing="proj"))
    x, x_r = torch.randn(2, L, 6), torch.randn(2, 6)
    with vlpeft.routing_inputs(net, x_r), torch.no_grad():  # generation
        single = net(x)
        beams = net(x.repeat_interleave(3, dim=0))
    torch.testing.assert_close(beams, single.repeat_interleave(3, dim=0))
    with vlpeft.routing_inputs(net, x_r), pytest.raises(ValueError, match="does not match"):
        net(x.repeat_interleave(3, dim=0))  # in training a batch mismatch is an error
    with vlpeft.routing_inputs(net, x_r), torch.no_grad(), pytest.raises(ValueError):
        net(torch.randn(3, L, 6))


def test_beam_search_generation_through_a_routed_model():
    """Beam search of a batch equals beam search of each example alone: x_R rows follow their beams."""
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "v_proj", "fc1"], r=4, routing="proj"))
    perturb_adapters(model, scale=0.5)
    ids = text_inputs(batch=2, length=6)["input_ids"]
    x_r = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    kw = {"num_beams": 3, "max_new_tokens": 6, "do_sample": False, "early_stopping": True}
    with vlpeft.routing_inputs(model, x_r):
        batch_out = model.generate(input_ids=ids, **kw)
    for i in range(2):
        with vlpeft.routing_inputs(model, x_r[i : i + 1]):
            alone = model.generate(input_ids=ids[i : i + 1], **kw)
        n = alone.shape[1]
        assert torch.equal(batch_out[i, :n], alone[0])
    with vlpeft.routing_inputs(model, torch.zeros_like(x_r)):
        assert not torch.equal(model.generate(input_ids=ids, **kw), batch_out)


def test_separate_mapping_has_the_papers_structure_and_parameter_count():
    """``separate_mapping: merge`` (True): d → r/4 for x_H and for x_R, route, r/4 → r, r → d per
    slice. GPT-2 base, LoRA on q and v of 12 layers, r = 128: 24 × (2·768·32 + 32·128 + 128·768)
    = 3,637,248 (shared mapping: 24 × 2·768·128 = 4,718,592). The paper's 3.932M is the
    reference's *split* module (``separate_mapping: split``) and its 4.746M the shared mapping
    plus c_attn's trainable bias: tests/test_tab5_variants.py."""
    from transformers import GPT2Config, GPT2LMHeadModel

    slices = {"c_attn": {"parts": 3, "use": [0, 2]}}
    counts = {}
    for separate in (True, False):
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config())
            config = LoRAConfig(
                targets=["c_attn"], r=128, slices=slices, routing="proj", separate_mapping=separate
            )
            vlpeft.add_adapter(model, config)
        counts[separate] = vlpeft.count_parameters(model)[0]
    assert counts == {True: 3_637_248, False: 4_718_592}


def test_separate_mapping_routes_in_the_narrow_space_then_maps_up():
    config = LoRAConfig(
        targets=["0"], r=8, alpha=8, routing="proj", separate_mapping=True, visual_dim=3
    )
    net = routed_linear(config)
    ad = net[0].adapters["default"]
    assert (
        ad.lora_A.shape == (2, 6)
        and ad.lora_A_visual.shape == (2, 3)
        and ad.lora_mid.shape == (8, 2)
    )
    x, x_r = torch.randn(2, L, 6), torch.randn(2, 3)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    routed = route("proj", x @ ad.lora_A.T, x_r @ ad.lora_A_visual.T)
    expected = net[0].base_layer(x) + routed @ ad.lora_mid.T @ ad.lora_B.T
    torch.testing.assert_close(y, expected)
    wide = LoRAConfig(targets=["0"], r=8, routing="proj", separate_mapping=True, mapping_rank=8)
    assert routed_linear(wide)[0].adapters["default"].lora_mid is None  # the earlier structure


def test_routed_adapter_with_a_separate_mapping_of_another_width():
    net = routed_linear(
        AdapterConfig(
            targets=["0"], bottleneck=3, routing="proj", separate_mapping=True, visual_dim=7
        )
    )
    ad = net[0].adapters["default"]
    assert ad.down_visual.in_features == 7
    x, x_r = torch.randn(2, L, 6), torch.randn(2, 7)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    h = net[0].base_layer(x)
    expected = h + ad.up(torch.relu(route("proj", ad.down(h), ad.down_visual(x_r))))
    torch.testing.assert_close(y, expected)


# -- the fused routed LoRA (issue #18): one autograd function, the same outputs and gradients -------
def explicit_routed(net, x, x_r, kind):
    """base(x) + (α/r)·B·route(A·x, A_v·x_R), composed from ``route`` by autograd."""
    ad = net[0].adapters["default"]
    mapping = ad.lora_A if ad.lora_A_visual is None else ad.lora_A_visual
    x_v, x_t = x_r @ mapping.T, x @ ad.lora_A.T
    routed = (
        route(kind, x_t.unsqueeze(1), x_v).squeeze(1) if x.dim() == 2 else route(kind, x_t, x_v)
    )
    return net[0].base_layer(x) + ad.scaling * routed @ ad.lora_B.T


@pytest.mark.parametrize("shape", ["tokens", "one-token", "visual-tokens"])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_routed_lora_equals_the_composed_formula(kind, separate, shape):
    config = LoRAConfig(
        targets=["0"], r=R, alpha=6, routing=kind, separate_mapping=separate,
        visual_dim=3 if separate else None, mapping_rank=R if separate else None,
    )  # fmt: skip
    net = routed_linear(config)
    ad = net[0].adapters["default"]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*((2, 6) if shape == "one-token" else (2, L, 6)), generator=g)
    x_r = torch.randn(
        *((2, 4) if shape == "visual-tokens" else (2,)), 3 if separate else 6, generator=g
    )
    x, x_r = x.requires_grad_(), x_r.requires_grad_()
    assert ad.fusable(x, net[0].base_layer(x), net[0])
    params = [p for p in ad.parameters() if p.requires_grad]
    inputs = [x, x_r, *params]
    with vlpeft.routing_inputs(net, x_r):
        got = net(x)
    want = explicit_routed(net, x, x_r.mean(1) if shape == "visual-tokens" else x_r, kind)
    torch.testing.assert_close(got, want)
    weights = torch.randn(got.shape, generator=g)
    got_g = torch.autograd.grad((got * weights).sum() + got.square().sum(), inputs)
    want_g = torch.autograd.grad((want * weights).sum() + want.square().sum(), inputs)
    for a, b, name in zip(got_g, want_g, ["x", "x_r", *[n for n, _ in ad.named_parameters()]]):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, msg=name)


def test_routed_lora_paths_that_stay_composed():
    """Slices, dropout, a narrower separate mapping and ReSoRA recording take the composed path."""
    net = routed_linear(LoRAConfig(targets=["0"], r=R, routing="mul", dropout=0.1))
    x = torch.randn(2, L, 6)
    assert not net[0].adapters["default"].fusable(x, x[..., :5], net[0])
    net = routed_linear(LoRAConfig(targets=["0"], r=R, routing="mul", separate_mapping=True))
    assert net[0].adapters["default"].lora_mid is not None
    assert not net[0].adapters["default"].fusable(x, x[..., :5], net[0])
    net = routed_linear(LoRAConfig(targets=["0"], r=R, routing="mul"))
    vlpeft.enable_resora(net)
    net.train()
    assert not net[0].adapters["default"].fusable(x, x[..., :5], net[0])


def test_fused_routed_lora_under_bf16_autocast_matches_the_composed_path():
    """Under autocast (the GPU benchmark's bf16) the fused path is taken, computes in bf16 like
    autocast's F.linear, and returns float32 gradients to the float32 parameters."""
    net = routed_linear(LoRAConfig(targets=["0"], r=R, alpha=8, routing="proj"))
    ad = net[0].adapters["default"]
    x, x_r = torch.randn(3, L, 6), torch.randn(3, 6)
    params = list(ad.parameters())

    def run(fused):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net[0].base_layer(xx)
            assert ad.fusable(xx, y, net[0])
            if fused:
                with vlpeft.routing_inputs(net, x_r):
                    y = net(xx)
            else:
                z = route("proj", torch.nn.functional.linear(xx, ad.lora_A),
                          torch.nn.functional.linear(x_r, ad.lora_A))  # fmt: skip
                y = y + (ad.scaling * torch.nn.functional.linear(z, ad.lora_B)).to(y.dtype)
        return y, torch.autograd.grad(y.float().square().sum(), [xx, *params])

    (y_f, g_f), (y_c, g_c) = run(True), run(False)
    assert y_f.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g_f[1:])
    torch.testing.assert_close(y_f, y_c, rtol=3e-2, atol=3e-2)
    for a, b in zip(g_f, g_c):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))
