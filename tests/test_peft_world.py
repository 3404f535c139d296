"""At home in the transformers / peft world (#27): merge-and-unload, unload, delete_adapter, and a
peft export that a peft user with only transformers loads onto the bare backbone."""

import pytest
import torch
from conftest import bart_inputs, perturb_adapters, run, text_inputs, tiny_bart, tiny_gpt2

import vlpeft
from vlpeft.adapters import AdapterConfig, LoRAConfig

QV = {"c_attn": {"parts": 3, "use": [0, 2]}}
ROWS = [
    ("bart", tiny_bart, bart_inputs, LoRAConfig(targets=["q_proj", "v_proj", "fc1"], r=4, alpha=8)),
    ("gpt2", tiny_gpt2, text_inputs, LoRAConfig(targets=["c_attn", "c_fc"], r=2, slices=QV)),
]


def adapted(make_model, config):
    model = make_model()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    return model


# -- merge_and_unload / unload / delete_adapter ---------------------------------------------------
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_merge_and_unload_gives_a_plain_backbone_that_round_trips_through_save_pretrained(
    row, tmp_path
):
    _, make_model, make_inputs, config = row
    model = adapted(make_model, config)
    inputs = make_inputs()
    expected = run(model, inputs)
    assert not torch.allclose(expected, run(make_model(), inputs))
    plain = vlpeft.merge_and_unload(model)
    assert plain is model and not list(vlpeft.adapted_layers(plain))
    assert not vlpeft.inject.adapter_configs(plain)
    assert set(plain.state_dict()) == set(make_model().state_dict())  # the original names
    torch.testing.assert_close(run(plain, inputs), expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    loaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_of_a_vl_models_text_backbone(tmp_path):
    model = vlpeft.build_model("clip-bart", "tiny").eval()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "v_proj"], r=4, alpha=8))
    perturb_adapters(model)
    inputs = {k: v.clamp(max=model.bart.config.vocab_size - 1) for k, v in bart_inputs().items()}
    expected = run(model.bart, inputs)
    vlpeft.merge_and_unload(model)
    model.bart.save_pretrained(tmp_path)
    loaded = type(model.bart).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_merges_the_named_adapters_and_drops_the_others():
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), name="a")
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "fc1"], r=2), name="b")
    perturb_adapters(model)
    inputs = bart_inputs()
    vlpeft.set_active_adapter(model, "b")
    only_b = run(model, inputs)
    vlpeft.set_active_adapter(model, "a")
    plain = vlpeft.merge_and_unload(model, adapter_names=["b"])  # not the active one
    torch.testing.assert_close(run(plain, inputs), only_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config,why",
    [
        (AdapterConfig(targets=["fc2"], bottleneck=4), "not mergeable"),
        (LoRAConfig(targets=["q_proj"], r=2, routing="mul"), "routed"),
    ],
)
def test_merge_and_unload_refuses_a_non_mergeable_method_with_the_reason(config, why):
    model = adapted(tiny_bart, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=why) as err:
        vlpeft.merge_and_unload(model)
    assert f"({config.method})" in str(err.value)
    assert list(vlpeft.adapted_layers(model))  # nothing changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_unload_restores_the_original_model_untouched():
    model = tiny_bart()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "fc1"], r=2))
    perturb_adapters(model)
    inputs = bart_inputs()
    plain = vlpeft.unload(model)
    assert not list(vlpeft.adapted_layers(plain))
    state = plain.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert torch.equal(run(plain, inputs), run(tiny_bart(), inputs))


def test_delete_adapter_removes_one_set_and_keeps_the_others(caplog):
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "fc1"], r=2), name="a")
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2), name="b")
    perturb_adapters(model)
    inputs = bart_inputs()
    vlpeft.set_active_adapter(model, "b")
    only_b = run(model, inputs)
    vlpeft.set_active_adapter(model, ["a", "b"])
    vlpeft.delete_adapter(model, "a")
    assert set(vlpeft.inject.adapter_configs(model)) == {"b"}
    layers = dict(vlpeft.adapted_layers(model))
    assert layers and all(list(layer.adapters) == ["b"] for layer in layers.values())
    assert not any(p.endswith("fc1") for p in layers)  # a's own layers are plain again
    assert vlpeft.active_adapters(model) == ("b",)
    assert torch.equal(run(model, inputs), only_b)
    # errors, as peft: an unknown name; a merged adapter
    with pytest.raises(ValueError, match="'a' does not exist"):
        vlpeft.delete_adapter(model, "a")
    vlpeft.merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        vlpeft.delete_adapter(model, "b")
    vlpeft.unmerge_adapter(model)
    # the last active adapter deleted: peft makes the first remaining one active, warning
    vlpeft.add_adapter(model, LoRAConfig(targets=["k_proj"], r=2), name="c")
    with caplog.at_level("WARNING", logger="vlpeft.unload"):
        vlpeft.delete_adapter(model, "b")
    assert vlpeft.active_adapters(model) == ("c",)
    assert "'c' is now the active adapter" in caplog.text
    vlpeft.delete_adapter(model, "c")
    assert not list(vlpeft.adapted_layers(model))
    # the base model again (up to the rounding of b's merge and unmerge above)
    torch.testing.assert_close(run(model, inputs), run(tiny_bart(), inputs), atol=1e-6, rtol=0)
