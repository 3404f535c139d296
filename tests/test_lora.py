"""LoRA against its naive definition, and the peft export against peft itself."""

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
from vlpeft.adapters import LoRAConfig


def test_linear_lora_equals_naive_definition():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=3, alpha=6))
    perturb_adapters(net)
    layer = net[0]
    a, b = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    x = torch.randn(4, 6)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w0.T + b0 + (6 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * b @ a)


def test_init_is_kaiming_uniform_a_and_zero_b():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=4))
    adapter = net[0].adapters["default"]
    assert torch.count_nonzero(adapter.lora_B) == 0
    bound = 1 / 64**0.5  # kaiming_uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.std() > bound / 3


def test_conv1d_slices_touch_only_chosen_parts():
    model = tiny_gpt2()
    vlpeft.add_adapter(
        model,
        LoRAConfig(
            targets=["c_attn"], r=2, alpha=4, slices={"c_attn": {"parts": 3, "use": [0, 2]}}
        ),
    )
    perturb_adapters(model)
    layer = model.transformer.h[0].attn.c_attn
    adapter = layer.adapters["default"]
    delta = layer.delta_weight()  # Conv1D layout: (in, out)
    d = 32
    assert delta.shape == (d, 3 * d)
    assert torch.count_nonzero(delta[:, d : 2 * d]) == 0  # k untouched
    a_q, a_v = adapter.lora_A[:2], adapter.lora_A[2:]
    b_q, b_v = adapter.lora_B[:d], adapter.lora_B[d:]
    torch.testing.assert_close(delta[:, :d], 2.0 * (b_q @ a_q).T)
    torch.testing.assert_close(delta[:, 2 * d :], 2.0 * (b_v @ a_v).T)
    x = torch.randn(3, d)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta)


def test_conv2d_lora_equals_conv_with_merged_kernel():
    model = tiny_convnet()
    vlpeft.add_adapter(model, LoRAConfig(targets=["conv2"], r=2))
    perturb_adapters(model)
    layer = model.conv2
    x = torch.randn(2, 8, 6, 6)
    w = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.base_layer.bias, stride=2, padding=1))


def test_dropout_only_in_training():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=2, dropout=0.5))
    perturb_adapters(net)
    x = torch.randn(16, 8)
    net.eval()
    ad = net[0].adapters["default"]
    no_dropout = net[0].base_layer(x) + ad.scaling * x @ ad.lora_A.T @ ad.lora_B.T
    torch.testing.assert_close(net(x), no_dropout)  # eval: the branch sees x itself
    net.train()
    assert not torch.allclose(net(x), no_dropout)


def _lora_branch(layer, x):
    """(α/r)·B·A·x of a Linear's or a Conv2d's LoRA, written out (A a conv, B a 1×1 conv)."""
    ad = layer.adapters["default"]
    if isinstance(layer.base_layer, torch.nn.Linear):
        return ad.scaling * x @ ad.lora_A.T @ ad.lora_B.T
    conv = layer.base_layer
    h = F.conv2d(x, ad.lora_A, stride=conv.stride, padding=conv.padding)
    return ad.scaling * F.conv2d(h, ad.lora_B)


@pytest.mark.parametrize(
    "base,shape",
    [
        (lambda: torch.nn.Linear(16, 12), (6, 16)),
        (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    ],
    ids=["linear", "conv2d"],
)
def test_dropout_acts_on_the_branch_input_only(base, shape):
    net = torch.nn.Sequential(base()).double()  # float64: the two sides round alike to ~1e-15
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=4, alpha=8, dropout=0.5))
    perturb_adapters(net)
    layer = net[0]
    seen = []
    layer.base_layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net.train()
    torch.manual_seed(123)  # the adapter's dropout is the forward's only draw
    y = net(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask, drawn again
    assert 0 < int((dropped == 0).sum()) < x.numel()  # it drops some entries, not all
    assert torch.equal(seen[0], x)  # the base layer sees x itself
    expected = layer.base_layer(x) + _lora_branch(layer, dropped)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    undropped = layer.base_layer(x) + _lora_branch(layer, x)
    assert not torch.allclose(y, undropped)  # the mask did reach the branch


EXPORT_ROWS = [
    (
        "bart",
        tiny_bart,
        bart_inputs,
        LoRAConfig(targets=["q_proj", "v_proj", "fc1"], r=4, alpha=12),
    ),
    (
        "bart+ln",
        tiny_bart,
        bart_inputs,
        LoRAConfig(targets=["q_proj"], r=2, trainable=[r"layernorm_embedding\."]),
    ),
    ("gpt2", tiny_gpt2, text_inputs, LoRAConfig(targets=["c_attn", "c_fc"], r=4)),
    (
        "gpt2-qv",
        tiny_gpt2,
        text_inputs,
        LoRAConfig(targets=["c_attn"], r=4, slices={"c_attn": {"parts": 3, "use": [0, 2]}}),
    ),
    ("conv", tiny_convnet, image_inputs, LoRAConfig(targets=["conv1", "conv2"], r=2)),
]


@pytest.mark.parametrize("row", EXPORT_ROWS, ids=[r[0] for r in EXPORT_ROWS])
def test_peft_export_gives_the_same_outputs_through_peft(row, tmp_path):
    from peft import PeftModel

    _, make_model, make_inputs, config = row
    model = make_model()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    if config.trainable:
        with torch.no_grad():
            model.model.encoder.layernorm_embedding.weight.mul_(1.5)
    inputs = make_inputs()
    expected = run(model, inputs)
    vlpeft.export_peft_lora(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make_model(), tmp_path).eval()
    assert not torch.allclose(run(make_model(), inputs), expected)
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_peft_export_relative_to_a_backbone_prefix(tmp_path):
    from peft import PeftModel

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = tiny_bart()

        def forward(self, **kw):
            return self.language_model(**kw)

    wrapper = Wrapper()
    vlpeft.add_adapter(wrapper, LoRAConfig(targets=["k_proj"], r=2))
    perturb_adapters(wrapper)
    inputs = bart_inputs()
    expected = run(wrapper, inputs)
    vlpeft.export_peft_lora(wrapper, tmp_path, prefix="language_model")
    peft_model = PeftModel.from_pretrained(tiny_bart(), tmp_path).eval()
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
