"""DoRA against its definition (Liu et al. 2024, Eq. 5), against peft's ``use_dora=True`` (same W0,
A, B, m → same outputs and gradients), and through the peft export."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    bart_inputs,
    image_inputs,
    perturb_adapters,
    run,
    text_inputs,
    tiny_bart,
    tiny_convnet,
    tiny_gpt2,
)

import vlpeft
from vlpeft.adapters import DoRAConfig, LayerwiseConfig, LoRAConfig


def dora_net(out=5, d_in=6, r=3, alpha=6.0, bias=True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, out, bias=bias))
    vlpeft.add_adapter(net, DoRAConfig(targets=["0"], r=r, alpha=alpha))
    perturb_adapters(net, scale=0.3)
    return net


def test_config_defaults_are_loras():
    config = DoRAConfig(targets=["q"])
    assert (config.r, config.alpha, config.dropout) == (8, 8.0, 0.0)
    assert DoRAConfig(targets=["q"], r=4).alpha == 4.0
    assert "dora" in vlpeft.list_methods()
    with pytest.raises(ValueError, match="r must be >= 1"):
        DoRAConfig(targets=["q"], r=0)


def test_dora_names_its_deepspeed_problem_at_zero3_only():
    """The launcher asks the method (``deepspeed_problem``), not its name: DoRA reads the whole W0
    for its norm, which ZeRO-3 partitions; a layerwise DoRA says the same."""
    reason = DoRAConfig(targets=["q"]).deepspeed_problem(3)
    assert "ZeRO-3 partitions the base weights" in reason and "use ZeRO-2" in reason
    assert DoRAConfig(targets=["q"]).deepspeed_problem(2) is None
    assert LoRAConfig(targets=["q"]).deepspeed_problem(3) is None
    layerwise = LayerwiseConfig(targets=["q"], base={"method": "dora", "r": 2}, ranks={"q": 1})
    assert layerwise.deepspeed_problem(3) == reason


def test_linear_equals_eq5_with_norm_per_output():
    net = dora_net()
    layer = net[0]
    ad = layer.adapters["default"]
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    direction = w0 + 2.0 * ad.lora_B @ ad.lora_A  # α / r = 6 / 3
    w = ad.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    x = torch.randn(4, 6)
    torch.testing.assert_close(net(x), x @ w.T + b0)
    torch.testing.assert_close(layer.delta_weight(), w - w0)
    # the norm is per output row: ‖W'‖ per row is exactly m (per input column it is not)
    torch.testing.assert_close((w0 + layer.delta_weight()).norm(dim=1), ad.magnitude)


def test_magnitude_starts_as_the_output_norms_of_w0():
    model = tiny_gpt2()  # Conv1D: weight stored (in, out) -> the norm is over its dim 0
    vlpeft.add_adapter(model, DoRAConfig(targets=["c_attn"], r=2))
    layer = model.transformer.h[0].attn.c_attn
    w = layer.base_layer.weight  # (32, 96)
    m = layer.adapters["default"].magnitude
    assert m.shape == (96,)
    torch.testing.assert_close(m, w.norm(dim=0))
    conv = tiny_convnet()
    vlpeft.add_adapter(conv, DoRAConfig(targets=["conv2"], r=2))
    m = conv.conv2.adapters["default"].magnitude
    torch.testing.assert_close(m, conv.conv2.base_layer.weight.flatten(1).norm(dim=1))


def test_conv2d_equals_conv_with_the_dora_weight():
    model = tiny_convnet()
    vlpeft.add_adapter(model, DoRAConfig(targets=["conv2"], r=2, alpha=3))
    perturb_adapters(model, scale=0.3)
    layer, ad = model.conv2, model.conv2.adapters["default"]
    w0 = layer.base_layer.weight
    lora = (ad.lora_B.flatten(1) @ ad.lora_A.flatten(1)).view(w0.shape) * 1.5
    direction = w0 + lora
    norm = direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    w = ad.magnitude.view(-1, 1, 1, 1) * direction / norm
    x = torch.randn(2, 8, 6, 6)
    expected = F.conv2d(x, w, layer.base_layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_the_norm_is_detached_from_the_gradient():
    net = dora_net()
    layer, ad = net[0], net[0].adapters["default"]
    x = torch.randn(8, 6)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias

    def reference(detach):
        a = ad.lora_A.detach().clone().requires_grad_()
        b = ad.lora_B.detach().clone().requires_grad_()
        m = ad.magnitude.detach().clone().requires_grad_()
        direction = w0 + 2.0 * b @ a
        norm = direction.norm(dim=1, keepdim=True)
        w = m[:, None] * direction / (norm.detach() if detach else norm)
        (x @ w.T + b0).sin().sum().backward()
        return a.grad, b.grad, m.grad

    net(x).sin().sum().backward()
    got = (ad.lora_A.grad, ad.lora_B.grad, ad.magnitude.grad)
    for g, want in zip(got, reference(detach=True)):
        torch.testing.assert_close(g, want)
    # and not the gradient through the norm (the paper's Eq. 5 without Sec. 4.3)
    assert not torch.allclose(got[1], reference(detach=False)[1], atol=1e-4)


def test_merge_unmerge_restores_w0_and_merged_rows_have_norm_m():
    net = dora_net(bias=False)
    layer = net[0]
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 6)
    expected = net(x)
    vlpeft.merge_adapter(net)
    torch.testing.assert_close(
        layer.base_layer.weight.norm(dim=1), layer.adapters["default"].magnitude
    )
    torch.testing.assert_close(net(x), expected)
    # ΔW while merged is still the ΔW against W0 (the merge kept its norm)
    torch.testing.assert_close(layer.delta_weight(), layer.base_layer.weight - w0)
    vlpeft.unmerge_adapter(net)
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    assert layer.adapters["default"].merged_norm is None


# -- parity with peft --------------------------------------------------------------------------
PARITY_ROWS = [
    ("bart", tiny_bart, bart_inputs, ["q_proj", "v_proj", "fc1"], 4, 8),
    ("gpt2-conv1d", tiny_gpt2, text_inputs, ["c_attn", "c_fc"], 2, 2),
    ("conv2d", tiny_convnet, image_inputs, ["conv1", "conv2", "head"], 2, 5),
]


def _peft_dora(make_model, targets, r, alpha, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_dora=True, lora_dropout=dropout
    )
    return get_peft_model(make_model(), config)


def _copy_into_peft(model, peft_model):
    """The same A, B, m in peft's layers; returns layer path → (ours, peft's) parameter pairs."""
    pairs = {}
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in vlpeft.adapted_layers(model):
            ours, theirs = layer.adapters["default"], peft_modules[path]
            mine = {
                "lora_A": ours.lora_A,
                "lora_B": ours.lora_B,
                "magnitude": ours.magnitude,
            }
            peft_params = {
                "lora_A": theirs.lora_A["default"].weight,
                "lora_B": theirs.lora_B["default"].weight,
                "magnitude": theirs.lora_magnitude_vector["default"].weight,
            }
            for key, p in peft_params.items():
                p.copy_(mine[key].reshape(p.shape))
            pairs[path] = (mine, peft_params)
    return pairs


@pytest.mark.parametrize("row", PARITY_ROWS, ids=[r[0] for r in PARITY_ROWS])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_outputs_and_gradients_as_peft_dora(row, dropout):
    _, make_model, make_inputs, targets, r, alpha = row
    model = make_model()
    vlpeft.add_adapter(model, DoRAConfig(targets=targets, r=r, alpha=alpha, dropout=dropout))
    perturb_adapters(model, scale=0.2)
    peft_model = _peft_dora(make_model, targets, r, alpha, dropout)
    pairs = _copy_into_peft(model, peft_model)
    assert pairs
    inputs = make_inputs()
    model.eval(), peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            run(peft_model, inputs), run(model, inputs), atol=1e-5, rtol=1e-5
        )
    model.train(), peft_model.train()
    torch.manual_seed(7)  # the same dropout masks: each layer draws one, in the same order
    run(model, inputs).sin().sum().backward()
    torch.manual_seed(7)
    run(peft_model, inputs).sin().sum().backward()
    for path, (mine, theirs) in pairs.items():
        for key in mine:
            assert mine[key].grad is not None and mine[key].grad.abs().sum() > 0, (path, key)
            torch.testing.assert_close(
                mine[key].grad.reshape(theirs[key].shape),
                theirs[key].grad,
                atol=1e-5,
                rtol=1e-4,
                msg=lambda m, p=path, k=key: f"{p}.{k}: {m}",
            )


@pytest.mark.parametrize("row", PARITY_ROWS, ids=[r[0] for r in PARITY_ROWS])
def test_peft_export_writes_use_dora_and_gives_the_same_outputs(row, tmp_path):
    from peft import PeftModel

    _, make_model, make_inputs, targets, r, alpha = row
    model = make_model()
    vlpeft.add_adapter(model, DoRAConfig(targets=targets, r=r, alpha=alpha))
    perturb_adapters(model, scale=0.2)
    inputs = make_inputs()
    expected = run(model, inputs)
    vlpeft.export_peft_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    peft_model = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    assert not torch.allclose(run(make_model(), inputs), expected)
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
