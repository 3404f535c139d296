"""One table drives every method: each row runs the same battery (zero-init identity, only adapter
parameters train, merge == unmerged, save -> load exact, several named adapters). The battery runs
over the method registry: every registered method needs at least one row, and one without a row
fails ``test_every_registered_method_has_a_battery_row`` with its name."""

import dataclasses
import math
import re

import pytest
import torch
import yaml
from conftest import (
    bart_inputs,
    image_inputs,
    perturb_adapters,
    run,
    text_inputs,
    tiny_bart,
    tiny_convnet,
    tiny_gpt2,
    with_x_r,
)

import vlpeft
from vlpeft.adapters import (
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LayerwiseConfig,
    LoRAConfig,
    NullLoRAConfig,
)
from vlpeft.adapters.base import MethodConfig
from vlpeft.config import ConfigError

QV_SLICES = {"c_attn": {"parts": 3, "use": [0, 2]}}

# (id, config factory, model factory, inputs factory)
ROWS = [
    (
        "lora-bart",
        lambda: LoRAConfig(targets=["q_proj", "v_proj"], r=4, alpha=8),
        tiny_bart,
        bart_inputs,
    ),
    (
        "lora-bart-trainable-ln",
        lambda: LoRAConfig(targets=["q_proj", "fc1"], r=2, trainable=["layernorm_embedding"]),
        tiny_bart,
        bart_inputs,
    ),
    (
        "lora-gpt2-conv1d",
        lambda: LoRAConfig(targets=["c_attn", "c_fc"], r=2),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "lora-gpt2-qv-slices",
        lambda: LoRAConfig(targets=["c_attn"], r=4, slices=QV_SLICES),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "lora-conv2d",
        lambda: LoRAConfig(targets=["conv1", "conv2", "head"], r=2),
        tiny_convnet,
        image_inputs,
    ),
    (
        "dora-bart",
        lambda: DoRAConfig(targets=["q_proj", "v_proj", "fc1"], r=4, alpha=8),
        tiny_bart,
        bart_inputs,
    ),
    (
        "dora-bart-trainable-ln",
        lambda: DoRAConfig(targets=["k_proj"], r=2, trainable=["layernorm_embedding"]),
        tiny_bart,
        bart_inputs,
    ),
    (
        "dora-gpt2-conv1d",
        lambda: DoRAConfig(targets=["c_attn", "c_fc"], r=2),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "dora-conv2d",
        lambda: DoRAConfig(targets=["conv1", "conv2", "head"], r=2),
        tiny_convnet,
        image_inputs,
    ),
    (
        "layerwise-lora-bart",
        lambda: LayerwiseConfig(
            targets=["q_proj", "fc1"],
            base={"method": "lora", "r": 4, "alpha": 8},
            ranks={"model.encoder.layers.0.fc1": 2},
            alphas={"model.decoder.layers.1.self_attn.q_proj": 1.0},
        ),
        tiny_bart,
        bart_inputs,
    ),
    (
        "layerwise-dora-gpt2",
        lambda: LayerwiseConfig(
            targets=["c_attn"],
            base={"method": "dora", "r": 2},
            ranks={"transformer.h.1.attn.c_attn": 3},
        ),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "adapter-bart",
        lambda: AdapterConfig(targets=["self_attn.out_proj", "fc2"], bottleneck=8),
        tiny_bart,
        bart_inputs,
    ),
    (
        "adapter-gpt2",
        lambda: AdapterConfig(
            targets=["attn.c_proj", "mlp.c_proj"], reduction_factor=4, activation="gelu"
        ),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "routed-lora-bart-proj",
        lambda: LoRAConfig(targets=["q_proj", "v_proj"], r=4, routing="proj"),
        tiny_bart,
        with_x_r(bart_inputs),
    ),
    (
        "routed-lora-gpt2-qv-mul-separate",
        lambda: LoRAConfig(
            targets=["c_attn"],
            r=4,
            slices=QV_SLICES,
            routing="mul",
            separate_mapping=True,
            visual_dim=16,
        ),
        tiny_gpt2,
        with_x_r(text_inputs, dim=16, tokens=3),
    ),
    (
        "routed-adapter-gpt2-relu-proj",
        lambda: AdapterConfig(targets=["mlp.c_proj"], bottleneck=8, routing="relu_proj"),
        tiny_gpt2,
        with_x_r(text_inputs),
    ),
    (
        "null-lora-bart",
        lambda: NullLoRAConfig(targets=["q_proj", "fc1", "fc2"], min_rank=4),
        tiny_bart,
        bart_inputs,
    ),
    (
        "null-lora-gpt2",
        lambda: NullLoRAConfig(targets=["c_attn"], min_rank=2, max_rank=4),
        tiny_gpt2,
        text_inputs,
    ),
    (
        "routed-null-lora-bart-add",
        lambda: NullLoRAConfig(targets=["q_proj", "fc1"], min_rank=4, routing="add"),
        tiny_bart,
        with_x_r(bart_inputs),
    ),
    (
        "routed-null-lora-gpt2-proj-separate",
        lambda: NullLoRAConfig(
            targets=["c_fc"], min_rank=4, routing="proj", separate_mapping=True, visual_dim=12
        ),
        tiny_gpt2,
        with_x_r(text_inputs, dim=12),
    ),
    (
        "routed-flora-bart-mul",
        lambda: FLoRAConfig(targets=["k_proj", "fc1"], r=4, scale=0.5, routing="mul"),
        tiny_bart,
        with_x_r(bart_inputs, tokens=3),
    ),
    (
        "routed-flora-gpt2-expand-separate",
        lambda: FLoRAConfig(
            targets=["c_attn"], r=3, routing="expand", separate_mapping=True, visual_dim=10
        ),
        tiny_gpt2,
        with_x_r(text_inputs, dim=10),
    ),
    (
        "flora-bart",
        lambda: FLoRAConfig(targets=["k_proj", "fc2"], r=4, scale=0.5),
        tiny_bart,
        bart_inputs,
    ),
    (
        "flora-conv",
        lambda: FLoRAConfig(targets=["conv1", "conv2", "head"], r=2, r_kernel=2),
        tiny_convnet,
        image_inputs,
    ),
]


def rows_of(method: str) -> list[tuple]:
    """The rows whose config is of registered method ``method``."""
    return [row for row in ROWS if row[1]().method == method]


# the battery's rows in registry order, method by method
BATTERY = [row for method in vlpeft.list_methods() for row in rows_of(method)]
params = pytest.mark.parametrize("row", BATTERY, ids=[r[0] for r in BATTERY])


@pytest.mark.parametrize("method", vlpeft.list_methods())
def test_every_registered_method_has_a_battery_row(method):
    assert rows_of(method), f"method {method!r} is registered but has no row in the battery's ROWS"


def test_every_row_is_in_the_battery():
    assert sorted(r[0] for r in BATTERY) == sorted(r[0] for r in ROWS)


def adapted(row, name="default", perturb=True):
    _, make_config, make_model, make_inputs = row
    model = make_model()
    vlpeft.add_adapter(model, make_config(), name)
    if perturb:
        perturb_adapters(model)
    return model, make_inputs()


@params
def test_injection_changes_no_output(row):
    _, make_config, make_model, make_inputs = row
    model, inputs = make_model(), make_inputs()
    before = run(model, inputs)
    vlpeft.add_adapter(model, make_config())
    assert torch.equal(run(model, inputs), before)
    assert any(True for _ in vlpeft.adapted_layers(model))


@params
def test_only_adapter_and_declared_parameters_get_gradients(row):
    model, inputs = adapted(row)
    model.train()
    run(model, inputs).square().mean().backward()
    declared = row[1]().trainable
    for name, p in model.named_parameters():
        is_adapter = ".adapters." in name
        is_declared = any(pat in name for pat in declared)
        assert p.requires_grad == (is_adapter or is_declared), name
        if is_adapter or is_declared:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    trainable, total = vlpeft.count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < total


@params
def test_merge_equals_unmerged(row):
    model, inputs = adapted(row)
    layers = dict(vlpeft.adapted_layers(model))
    mergeable = all(layer.mergeable for layer in layers.values())
    if not mergeable:
        with pytest.raises(TypeError, match="not mergeable"):
            vlpeft.merge_adapter(model)
        return
    base_weights = {k: layer.base_layer.weight.detach().clone() for k, layer in layers.items()}
    for layer in layers.values():
        assert layer.delta_weight().shape == layer.base_layer.weight.shape
    expected = run(model, inputs)
    vlpeft.merge_adapter(model)
    assert not torch.allclose(
        layers[next(iter(layers))].base_layer.weight, next(iter(base_weights.values()))
    )
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    vlpeft.unmerge_adapter(model)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    for k, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[k], atol=1e-6, rtol=0)


@params
def test_save_load_round_trip_is_exact(row, tmp_path):
    model, inputs = adapted(row)
    expected = run(model, inputs)
    vlpeft.save_adapter(model, tmp_path)
    fresh = row[2]()
    assert not torch.equal(run(fresh, inputs), expected)
    vlpeft.load_adapter(fresh, tmp_path)
    assert torch.equal(run(fresh, inputs), expected)
    saved = dict(model.state_dict())
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[key]), key


@params
def test_several_named_adapters(row):
    model, inputs = adapted(row, "task_a")
    base_out = None
    vlpeft.set_active_adapter(model, None)
    base_out = run(model, inputs)
    vlpeft.add_adapter(model, row[1](), "task_b")
    perturb_adapters(model, seed=11)  # changes both; remember a's output after this
    vlpeft.set_active_adapter(model, "task_a")
    out_a = run(model, inputs)
    vlpeft.set_active_adapter(model, "task_b")
    out_b = run(model, inputs)
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_a, base_out)
    vlpeft.set_active_adapter(model, None)
    assert torch.equal(run(model, inputs), base_out)
    vlpeft.set_active_adapter(model, "task_a")
    assert torch.equal(run(model, inputs), out_a)
    with pytest.raises(KeyError, match="task_c"):
        vlpeft.set_active_adapter(model, "task_c")


# -- config values -----------------------------------------------------------------------------
def number_fields(config) -> list[dataclasses.Field]:
    """The fields of a method config that hold numbers: int or float, alone or as dict values."""
    return [f for f in dataclasses.fields(config) if re.search(r"\b(int|float)\b", str(f.type))]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", vlpeft.list_methods())
def test_a_nan_or_inf_in_any_number_field_is_refused_naming_it(method, bad):
    config = rows_of(method)[0][1]()
    fields = number_fields(config)
    assert fields, f"{method}: no number field found to check"
    for f in fields:
        value = {"layer": bad} if str(f.type).startswith("dict") else bad
        name = re.escape(f"{type(config).__name__}.{f.name}")
        with pytest.raises(ConfigError, match=rf"^{name}(\['layer'\])? must be a finite number"):
            dataclasses.replace(config, **{f.name: value})


@pytest.mark.parametrize(
    "text,field",
    [
        ("{method: lora, targets: [q], alpha: .nan}", "LoRAConfig.alpha"),
        ("{method: lora, targets: [q], alpha: .inf}", "LoRAConfig.alpha"),
        ("{method: lora, targets: [q], dropout: .nan}", "LoRAConfig.dropout"),
        ("{method: dora, targets: [q], alpha: -.inf}", "DoRAConfig.alpha"),
        ("{method: flora, targets: [q], scale: .nan}", "FLoRAConfig.scale"),
        ("{method: null_lora, targets: [q], rtol: .nan}", "NullLoRAConfig.rtol"),
        (
            "{method: layerwise, targets: [q], base: {method: lora, alpha: .nan}}",
            "LayerwiseConfig.base['alpha']",
        ),
        (
            "{method: layerwise, targets: [q], base: {method: dora}, alphas: {q: .inf}}",
            "LayerwiseConfig.alphas['q']",
        ),
    ],
)
def test_a_nan_or_inf_read_from_yaml_is_refused_naming_file_and_field(text, field):
    data = yaml.safe_load(text)
    where = f"run.yaml: adapters.vqa (method {data['method']!r})"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{where}: {field} must be a finite")):
        MethodConfig.from_dict(data, where="run.yaml: adapters.vqa")
