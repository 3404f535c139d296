"""At home in the transformers / peft world (#27): merge-and-unload, unload, delete_adapter, and a
peft export that a peft user with only transformers loads onto the bare backbone."""

import json

import pytest
import torch
from conftest import bart_inputs, perturb_adapters, run, text_inputs, tiny_bart, tiny_gpt2
from safetensors.torch import load_file

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
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"images": images, "text": ["vqa: what color?", "caption:"], "targets": ["red", "a"]}
    with torch.no_grad():
        loss = model(batch).loss
        vlpeft.merge_and_unload(model)
        torch.testing.assert_close(model(batch).loss, loss, atol=1e-5, rtol=1e-5)  # VL forward
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


def test_safe_merge_refuses_a_broken_adapter_and_undoes_its_merges():
    model = adapted(tiny_bart, LoRAConfig(targets=["q_proj"], r=2))
    layers = list(vlpeft.adapted_layers(model))
    with torch.no_grad():
        layers[-1][1].adapters["default"].lora_B[0, 0] = float("nan")
    before = [layer.base_layer.weight.clone() for _, layer in layers]
    with pytest.raises(ValueError, match=f"at {layers[-1][0]}: NaN or inf"):
        vlpeft.merge_and_unload(model, safe_merge=True)
    assert [p for p, _ in vlpeft.adapted_layers(model)] == [p for p, _ in layers]
    for (_, layer), weight in zip(layers, before):  # the broken layer's too: no NaN left
        assert not layer.merged and torch.equal(layer.base_layer.weight, weight)


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


# -- the peft export, per backbone ----------------------------------------------------------------
# (family, backbone attribute, token inputs, LoRA, peft's (r, α), peft task type, wrapper
# tensors in the side file). GPT-2's q and v slices of c_attn are one rank-2r peft LoRA with
# block-structured B: α doubles with r, keeping the configured scale α/r.
VL_ROWS = [
    (
        "clip-bart",
        "bart",
        bart_inputs,
        LoRAConfig(targets=["_"], r=4, alpha=8),
        (4, 8),
        "SEQ_2_SEQ_LM",
        True,
    ),
    (
        "gpt2-vit",
        "gpt2",
        text_inputs,
        LoRAConfig(targets=["_"], r=2, alpha=6),
        (4, 12),
        "CAUSAL_LM",
        False,
    ),
]


def adapted_vl_model(family, config):
    """A tiny VL model with ``config`` on its text backbone (the family's default placement:
    q and v; GPT-2's as c_attn slices) and its declared-trainable wrapper tensors changed."""
    model = vlpeft.build_model(family, "tiny").eval()
    components = [c for c in model.components if c not in model.vision_components]
    vlpeft.add_adapter(model, model.adapter_config(config, components=components))
    perturb_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".adapters." not in name:
                p.mul_(1.5)
    return model


@pytest.mark.parametrize("row", VL_ROWS, ids=[r[0] for r in VL_ROWS])
def test_a_peft_user_loads_the_export_onto_the_bare_backbone(row, tmp_path):
    """Build the VL model, save its text backbone as transformers would, export: peft's
    from_pretrained on a fresh from_pretrained of that backbone gives vlpeft's outputs."""
    from peft import PeftModel

    family, attr, make_inputs, config, r_alpha, task_type, wrapper_tensors = row
    getattr(vlpeft.build_model(family, "tiny"), attr).save_pretrained(tmp_path / "base")
    model = adapted_vl_model(family, config)
    backbone = getattr(model, attr)
    inputs = make_inputs()
    expected = run(backbone, inputs)
    vlpeft.export_peft_lora(model, tmp_path / "peft")

    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["target_modules"] and all(
        not t.startswith(f"{attr}.") for t in saved["target_modules"]
    )
    assert (saved["r"], saved["lora_alpha"]) == r_alpha  # α as configured
    assert not saved["rank_pattern"] and not saved["alpha_pattern"] and not saved["modules_to_save"]
    assert saved["task_type"] == task_type and saved["base_model_name_or_path"] is None
    extra = json.loads((tmp_path / "peft" / "vlpeft_extra.json").read_text())
    assert extra["backbone"] == attr and extra["backbone_class"] == type(backbone).__name__
    trained = [n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n]
    assert extra["names"] == trained and bool(trained) == wrapper_tensors
    assert (tmp_path / "peft" / "vlpeft_extra.safetensors").is_file() == wrapper_tensors

    fresh = type(backbone).from_pretrained(tmp_path / "base").eval()
    assert not torch.allclose(run(fresh, inputs), expected)
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "peft").eval()
    assert type(peft_model).__name__.endswith(
        {"SEQ_2_SEQ_LM": "Seq2SeqLM", "CAUSAL_LM": "CausalLM"}[task_type]
    )
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", VL_ROWS, ids=[r[0] for r in VL_ROWS])
def test_the_export_loads_back_into_the_vl_model_wrapper_tensors_included(row, tmp_path, caplog):
    family, attr, make_inputs, config, *_ = row
    model = adapted_vl_model(family, config)
    vlpeft.export_peft_lora(model, tmp_path)
    back = vlpeft.load_peft_lora(vlpeft.build_model(family, "tiny").eval(), tmp_path)
    assert all(p.startswith(f"{attr}.") for p, _ in vlpeft.adapted_layers(back))
    inputs = make_inputs()
    torch.testing.assert_close(
        run(getattr(back, attr), inputs), run(getattr(model, attr), inputs), atol=1e-6, rtol=1e-5
    )
    state, want = back.state_dict(), model.state_dict()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n]
    assert all(torch.equal(state[n], want[n]) for n in trained)
    assert {
        n for n, p in back.named_parameters() if p.requires_grad and ".adapters." not in n
    } == set(trained)  # declared trainable again, as peft's modules_to_save
    # the recorded prefix given explicitly: the same
    again = vlpeft.load_peft_lora(vlpeft.build_model(family, "tiny").eval(), tmp_path, prefix=attr)
    assert all(torch.equal(again.state_dict()[n], want[n]) for n in trained)
    # onto the bare backbone with vlpeft: the wrapper's tensors are skipped, with a warning
    with caplog.at_level("WARNING", logger="vlpeft.peft_import"):
        bare = vlpeft.load_peft_lora(
            getattr(vlpeft.build_model(family, "tiny"), attr).eval(), tmp_path
        )
    assert ("tensors" in caplog.text and "are not loaded" in caplog.text) == bool(trained)
    torch.testing.assert_close(
        run(bare, inputs), run(getattr(model, attr), inputs), atol=1e-6, rtol=1e-5
    )


def test_the_export_unscales_b_and_names_its_weights_source(tmp_path):
    """B is written as trained (peft applies α/r); per-layer ranks and alphas become patterns;
    base_model_name_or_path is where the backbone's weights came from."""
    from transformers import BartForConditionalGeneration

    tiny_bart().save_pretrained(tmp_path / "weights")
    model = BartForConditionalGeneration.from_pretrained(tmp_path / "weights").eval()
    source = vlpeft.LayerwiseConfig(
        targets=["q_proj", "fc1"],
        base=LoRAConfig(targets=["q_proj"], r=4, alpha=12).to_dict(),
        ranks={"model.encoder.layers.0.fc1": 2},
        alphas={"model.encoder.layers.0.fc1": 5.0},
    )
    vlpeft.add_adapter(model, source)
    perturb_adapters(model)
    vlpeft.export_peft_lora(model, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "weights")
    assert (saved["r"], saved["lora_alpha"]) == (4, 12)
    assert saved["rank_pattern"]["model.encoder.layers.0.fc1"] == 2
    assert saved["alpha_pattern"]["model.encoder.layers.0.fc1"] == 5
    assert saved["alpha_pattern"]["model.encoder.layers.1.fc1"] == 12
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    layer = dict(vlpeft.adapted_layers(model))["model.encoder.layers.1.self_attn.q_proj"]
    key = "base_model.model.model.encoder.layers.1.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(tensors[key], layer.adapters["default"].lora_B.detach())
    assert not (tmp_path / "peft" / "vlpeft_extra.json").exists()  # a bare backbone: no side file


def test_an_adapter_over_several_backbones_is_refused_naming_them(tmp_path):
    model = vlpeft.build_model("blip", "tiny")
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(targets=["_"], r=2)))
    with pytest.raises(ValueError, match="several backbones") as err:
        vlpeft.export_peft_lora(model, tmp_path)
    assert "vision_model" in str(err.value) and "text_encoder" in str(err.value)
