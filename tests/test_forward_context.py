"""The forward context: x_R per model (not per process), gradient checkpointing, torch.compile,
routing composed into every bottleneck method, and every VL model's ``model(batch)``."""

import pytest
import torch
from conftest import perturb_adapters, text_inputs, tiny_bart, tiny_gpt2
from torch import nn

import vlpeft
from vlpeft.adapters import FLoRAConfig, LoRAConfig, NullLoRAConfig
from vlpeft.adapters.routing import route
from vlpeft.models import build_model, list_families


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(model, forward, checkpointing: bool, enable):
    """Gradients of the adapter parameters and of x_R after one training forward + backward."""
    enable(checkpointing)
    torch.manual_seed(0)  # the same dropout masks with and without checkpointing
    loss, x_r = forward()
    params = trainable(model)
    return torch.autograd.grad(loss, [*params, x_r])


def hf_checkpointing(model):
    def enable(on: bool):
        if on:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            model.gradient_checkpointing_disable()

    return enable


def assert_checkpointing_changes_no_gradient(model, forward, enable):
    plain = grads_of(model, forward, False, enable)
    ckpt = grads_of(model, forward, True, enable)
    assert plain[-1].abs().sum() > 0  # x_R receives a gradient through the routed branch
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backbone", ["gpt2-qv-slices", "bart"])
def test_routed_lora_with_gradient_checkpointing_equals_plain(backbone):
    """The checkpointed recompute during backward sees the same x_R as the forward (it used to
    fail with "called without x_R")."""
    if backbone == "bart":
        model = tiny_bart().train()
        config = LoRAConfig(targets=["q_proj", "v_proj", "fc1"], r=4, routing="proj")
        inputs = {**text_inputs(), "decoder_input_ids": text_inputs(length=5, seed=2)["input_ids"]}
    else:
        model = tiny_gpt2().train()
        slices = {"c_attn": {"parts": 3, "use": [0, 2]}}
        config = LoRAConfig(targets=["c_attn"], r=4, routing="mul", slices=slices)
        inputs = text_inputs()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model, scale=0.3)

    def forward():
        x_r = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)).requires_grad_()
        vlpeft.set_routing_inputs(model, x_r)
        return model(**inputs).logits.square().mean(), x_r

    assert_checkpointing_changes_no_gradient(model, forward, hf_checkpointing(model))


def test_vl_family_routed_with_gradient_checkpointing_equals_plain():
    """CLIP-BART sets encoder and decoder x_R itself; its gradient reaches the visual projection."""
    model = build_model("clip-bart", "tiny").train()
    config = model.adapter_config(LoRAConfig(r=4, routing="proj", targets=["x"]))
    vlpeft.add_adapter(model, config)
    perturb_adapters(model, scale=0.3)
    batch = {
        "images": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
        "text": ["vqa: what color is the circle?", "vqa: how many?"],
        "targets": ["red", "two squares"],
    }
    features = model.visual_features(batch["images"])

    def forward():
        x = features.clone().requires_grad_()
        return model({**batch, "features": x}).loss, x

    assert_checkpointing_changes_no_gradient(model, forward, hf_checkpointing(model.bart))


class Tower(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.inp(x)))


def routed_tower(seed=0, kind="proj"):
    net = Tower(seed)
    vlpeft.add_adapter(net, LoRAConfig(targets=["inp", "out"], r=4, routing=kind))
    perturb_adapters(net, scale=0.5, seed=seed + 3)
    return net


def test_two_models_route_independently():
    a, b = routed_tower(0), routed_tower(1)
    x = torch.randn(3, 5, 8)
    x_a, x_b = torch.randn(3, 8), torch.randn(3, 8)
    vlpeft.set_routing_inputs(a, x_a)
    alone = a(x)
    vlpeft.set_routing_inputs(b, x_b)
    torch.testing.assert_close(a(x), alone)  # b's x_R is not a's
    with vlpeft.routing_inputs(b, torch.zeros(3, 8)):
        torch.testing.assert_close(a(x), alone)
    fresh = routed_tower(2)
    with pytest.raises(RuntimeError, match="'inp' was called without x_R"):
        fresh(x)  # never a stale x_R of another model


def test_routing_inputs_by_module_path_and_cleared_on_exit():
    net = routed_tower()
    x, first, second = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8)
    with vlpeft.routing_inputs(net, {"": second, "inp": first}):
        both = net(x)
    assert net.inp.routing_input is None and net.out.routing_input is None
    with pytest.raises(RuntimeError, match="without x_R"):
        net(x)
    vlpeft.set_routing_inputs(net, {"inp": first, "out": second})
    torch.testing.assert_close(net(x), both)
    vlpeft.set_routing_inputs(net, None)
    with pytest.raises(RuntimeError, match="without x_R"):
        net(x)


def test_compiled_routed_forward_equals_eager_without_recompiling():
    from torch._dynamo.backends.registry import lookup_backend

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    net = routed_tower(kind="relu_proj")
    compiled = torch.compile(net, backend=counting, fullgraph=True)
    x = torch.randn(2, 5, 8)
    for seed in range(3):  # new x_R values, same shape: one graph
        x_r = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
        vlpeft.set_routing_inputs(net, x_r)
        eager = net(x)
        out = compiled(x)
        torch.testing.assert_close(out, eager)
        g_eager = torch.autograd.grad(eager.square().sum(), trainable(net))
        g_compiled = torch.autograd.grad(out.square().sum(), trainable(net))
        for a, b in zip(g_eager, g_compiled):
            torch.testing.assert_close(a, b)
    assert len(graphs) == 1


def test_routed_null_lora_is_b_eq_of_the_routed_bottleneck():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    vlpeft.add_adapter(net, NullLoRAConfig(targets=["0"], min_rank=4, routing="proj"))
    perturb_adapters(net, scale=0.3)
    ad = net[0].adapters["default"]
    x, x_r = torch.randn(2, 4, 6), torch.randn(2, 6)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    a_eq = torch.cat([ad.null_right, ad.lora_A]) * ad.scale[:, None]
    b_eq = torch.cat([ad.null_left @ (ad.null_left.T @ ad.lora_B), ad.null_left], 1)
    expected = net[0].base_layer(x) + route("proj", x @ a_eq.T, x_r @ a_eq.T) @ b_eq.T
    torch.testing.assert_close(y, expected)
    assert not ad.mergeable and not ad.lora_reducible


@pytest.mark.parametrize("separate", [False, True])
def test_routed_flora_linear_routes_through_the_core(separate):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    config = FLoRAConfig(
        targets=["0"], r=3, scale=0.7, routing="add", separate_mapping=separate,
        visual_dim=4 if separate else None,
    )  # fmt: skip
    vlpeft.add_adapter(net, config)
    perturb_adapters(net, scale=0.3)
    ad = net[0].adapters["default"]
    x, x_r = torch.randn(2, 4, 6), torch.randn(2, 4 if separate else 6)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    a_v = ad.a_in_visual if separate else ad.a_in
    routed = route("add", x @ ad.a_in @ ad.core, x_r @ a_v @ ad.core)
    torch.testing.assert_close(y, net[0].base_layer(x) + 0.7 * routed @ ad.a_out.T)
    with pytest.raises(TypeError, match="routed FLoRA supports Linear"):
        vlpeft.add_adapter(
            nn.Sequential(nn.Conv2d(3, 3, 3)), FLoRAConfig(targets=["0"], routing="mul")
        )


FAMILY_BATCHES = {
    "clip-bart": {"images": torch.randn(2, 3, 64, 64), "text": ["vqa: a?", "vqa: b c?"],
                  "targets": ["red", "two"]},
    "blip": {"kind": "retrieval", "images": torch.randn(2, 3, 32, 32), "text": ["a b", "c"],
             "image_ids": [0, 1]},
    "roberta-vit": {"images": torch.randn(2, 3, 32, 32), "text": ["what?", "how many?"],
                    "answer_scores": [{"1": 1.0}, {"2": 0.3}]},
    "gpt2-vit": {"images": torch.randn(2, 3, 32, 32), "text": ["", ""], "targets": ["a", "b c"]},
}  # fmt: skip


@pytest.mark.parametrize("family", list_families())
def test_model_call_returns_the_loss(family):
    """``model(batch).loss`` equals ``model.loss(batch)`` (under one RNG state: BLIP samples hard
    negatives), so engines that wrap ``forward`` (DDP, FSDP, DeepSpeed) can wrap the model. Runs
    over the family registry: a family without a FAMILY_BATCHES entry fails here, named."""
    assert family in FAMILY_BATCHES, f"family {family!r} is registered but has no FAMILY_BATCHES"
    model = build_model(family, "tiny").train()
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=2, targets=["x"])))
    perturb_adapters(model)
    batch = FAMILY_BATCHES[family]
    torch.manual_seed(0)
    out = model(batch)
    torch.manual_seed(0)
    assert torch.equal(out.loss, model.loss(batch))
    assert out.loss.dim() == 0 and out.loss.requires_grad


def test_a_forward_between_forward_and_checkpointed_backward_is_an_error():
    """The recompute would route on the other forward's x_R: wrong gradients, so it refuses."""
    from torch.utils.checkpoint import checkpoint

    net = routed_tower().train()
    x = torch.randn(2, 5, 8)
    vlpeft.set_routing_inputs(net, torch.randn(2, 8))
    out = checkpoint(net, x, use_reentrant=False)
    with torch.no_grad():  # e.g. a generate for a metric, with its own x_R
        vlpeft.set_routing_inputs(net, torch.randn(2, 8))
        net(x)
    with pytest.raises(RuntimeError, match="x_R was set again between the forward"):
        out.sum().backward()


def test_routing_inputs_block_restores_the_models_own_x_r():
    net = routed_tower()
    x, own, other = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8)
    vlpeft.set_routing_inputs(net, own)
    before = net(x)
    with vlpeft.routing_inputs(net, other):
        assert not torch.allclose(net(x), before)
    torch.testing.assert_close(net(x), before)


def test_reentrant_checkpointing_cannot_feed_resora_and_says_so():
    from torch.utils.checkpoint import checkpoint

    from vlpeft.adapters import ReSoRAConfig

    net = routed_tower().train()
    vlpeft.enable_resora(net)
    vlpeft.set_routing_inputs(net, torch.randn(2, 8))
    x = torch.randn(2, 5, 8, requires_grad=True)
    checkpoint(net, x, use_reentrant=True).sum().backward()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        vlpeft.resora_penalty(net, ReSoRAConfig())


def test_a_trained_model_deep_copies_without_its_forward_context():
    import copy

    from vlpeft.adapters import ReSoRAConfig

    model = build_model("clip-bart", "tiny").train()
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=2, routing="mul", targets=["x"])))
    perturb_adapters(model)  # B ≠ 0: the penalty has something to regularise
    vlpeft.enable_resora(model)
    model(FAMILY_BATCHES["clip-bart"]).loss.backward()
    twin = copy.deepcopy(model)  # an EMA or best-model copy after a training step
    layers = [layer for _, layer in vlpeft.adapted_layers(twin)]
    assert all(layer.routing_input is None and layer.recorder is None for layer in layers)
    assert vlpeft.resora_penalty(model, ReSoRAConfig()).item() > 0  # the original keeps its own
    twin.eval()
    assert twin.generate(FAMILY_BATCHES["clip-bart"], max_new_tokens=2)
