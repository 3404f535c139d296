"""FLoRA against the Tucker mode products, on linear, grouped and depthwise convolutions."""

import pytest
import torch
from conftest import perturb_adapters

import vlpeft
from vlpeft.adapters import FLoRAConfig


def mode_product(t, m, mode):
    """t ×_mode m, with m of shape (I_mode, J_mode) mapping the core's J to the tensor's I."""
    moved = t.movedim(mode, -1) @ m.T
    return moved.movedim(-1, mode)


def adapted(layer, **kw):
    net = torch.nn.Sequential(layer)
    vlpeft.add_adapter(net, FLoRAConfig(targets=["0"], **kw))
    perturb_adapters(net, scale=0.3)
    return net, net[0], net[0].adapters["default"]


def test_linear_delta_is_scaled_a_out_g_transpose_a_in():
    torch.manual_seed(0)
    net, layer, ad = adapted(torch.nn.Linear(7, 5), r=3, r_in=2, scale=0.4)
    assert ad.core.shape == (2, 3)
    delta = 0.4 * ad.a_out @ ad.core.T @ ad.a_in.T
    torch.testing.assert_close(layer.delta_weight(), delta)
    x = torch.randn(4, 7)
    torch.testing.assert_close(net(x), layer.base_layer(x) + x @ delta.T)


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2),
        dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
        dict(
            in_channels=4,
            out_channels=4,
            kernel_size=(3, 1),
            padding=(1, 0),
            padding_mode="reflect",
        ),
    ],
    ids=["plain", "grouped", "depthwise", "reflect-3x1"],
)
def test_conv_delta_equals_mode_products_and_merges(conv):
    torch.manual_seed(0)
    net, layer, ad = adapted(torch.nn.Conv2d(**conv), r=2, r_kernel=2, scale=1.5)
    base = layer.base_layer
    c_in = conv["in_channels"] // conv.get("groups", 1)
    assert ad.a_in.shape[0] == c_in
    # G (r_in, r_out, r_h, r_w) ×1 A_in ×2 A_out ×3 A_kh ×4 A_kw gives (in, out, kh, kw); weight layout is (out, in, kh, kw)
    full = ad.core
    for mode, factor in enumerate([ad.a_in, ad.a_out, ad.a_kh, ad.a_kw]):
        full = mode_product(full, factor, mode)
    expected = 1.5 * full.transpose(0, 1)
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(2, conv["in_channels"], 7, 7)
    out = net(x)
    torch.testing.assert_close(out, base._conv_forward(x, base.weight + expected, base.bias))
    vlpeft.merge_adapter(net)
    torch.testing.assert_close(net(x), out, atol=1e-5, rtol=1e-5)


def test_injection_is_identity_and_factors_are_kaiming_normal():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    net = torch.nn.Sequential(lin)
    x = torch.randn(3, 64)
    before = net(x)
    vlpeft.add_adapter(net, FLoRAConfig(targets=["0"], r=16))
    ad = net[0].adapters["default"]
    assert torch.equal(net(x), before) and torch.count_nonzero(ad.core) == 0
    # kaiming_normal(a=√3): std = sqrt(2 / (1 + 3)) / sqrt(fan_in), fan_in = r
    assert abs(ad.a_in.std().item() - (0.5**0.5) / 4) < 0.02


def test_linear_flora_exports_to_peft(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    ref.load_state_dict(model.state_dict())
    vlpeft.add_adapter(model, FLoRAConfig(targets=["0", "2"], r=2, scale=2.0))
    perturb_adapters(model)
    x = torch.randn(4, 6)
    vlpeft.export_peft_lora(model, tmp_path)
    torch.testing.assert_close(PeftModel.from_pretrained(ref, tmp_path)(x), model(x))


def test_conv_flora_refuses_peft_export(tmp_path):
    net, _, _ = adapted(torch.nn.Conv2d(2, 2, 3), r=1)
    with pytest.raises(TypeError, match="plain peft LoRA"):
        vlpeft.export_peft_lora(net, tmp_path)


def test_forward_never_builds_the_linear_delta(monkeypatch):
    from vlpeft.adapters import flora

    net, layer, ad = adapted(torch.nn.Linear(5, 5), r=2)
    monkeypatch.setattr(
        flora.FLoRALinear,
        "delta_weight",
        lambda *a: (_ for _ in ()).throw(AssertionError("dense ΔW")),
    )
    x = torch.randn(2, 5)
    chain = layer.base_layer(x) + ad.s * ((x @ ad.a_in) @ ad.core) @ ad.a_out.T
    torch.testing.assert_close(net(x), chain)  # the chain through the core, not just no error
