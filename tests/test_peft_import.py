"""load_peft_lora against peft.PeftModel.from_pretrained, its errors, and export -> import."""

import json

import pytest
import torch
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
from safetensors.torch import load_file, save_file

import vlpeft
from vlpeft.adapters import DoRAConfig, LayerwiseConfig, LoRAConfig
from vlpeft.peft_import import LayerwiseConfig as ImportedLayerwiseConfig
from vlpeft.peft_import import peft_method


@torch.no_grad()
def peft_checkpoint(make_model, directory, seed=0, **config):
    """A peft adapter with random (nonzero) LoRA tensors and modules_to_save copies, saved."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(directory)
    return model


ROWS = [
    (
        "bart-patterns",
        tiny_bart,
        bart_inputs,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"model.encoder.layers.0.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
    ),
    (
        "bart-rslora-modules-to-save",
        tiny_bart,
        bart_inputs,
        dict(
            r=4,
            lora_alpha=6,
            target_modules=["k_proj", "fc1"],
            use_rslora=True,
            modules_to_save=["layernorm_embedding"],
        ),
    ),
    (
        "gpt2-conv1d-string-target",
        tiny_gpt2,
        text_inputs,
        dict(r=2, lora_alpha=4, target_modules="transformer.h.0.attn.c_attn", fan_in_fan_out=True),
    ),
    (
        "conv2d",
        tiny_convnet,
        image_inputs,
        dict(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "head"]),
    ),
    (
        "bart-dora-patterns",
        tiny_bart,
        bart_inputs,
        dict(
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "fc2"],
            use_dora=True,
            rank_pattern={"fc2": 2},
        ),
    ),
    (
        "gpt2-dora",
        tiny_gpt2,
        text_inputs,
        dict(r=2, lora_alpha=8, target_modules=["c_fc"], use_dora=True),
    ),
    ("conv2d-dora", tiny_convnet, image_inputs, dict(r=2, target_modules=["conv2"], use_dora=True)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_same_outputs_as_peft_from_pretrained(row, tmp_path):
    from peft import PeftModel

    _, make_model, make_inputs, config = row
    peft_checkpoint(make_model, tmp_path, **config)
    inputs = make_inputs()
    reference = run(PeftModel.from_pretrained(make_model(), tmp_path).eval(), inputs)
    model = vlpeft.load_peft_lora(make_model(), tmp_path, name="imported")
    assert not torch.allclose(run(make_model(), inputs), reference)
    torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=1e-5)
    method = "dora" if config.get("use_dora") else "lora"
    cfg = vlpeft.inject.adapter_configs(model)["imported"]
    assert (cfg.base["method"] if isinstance(cfg, LayerwiseConfig) else cfg.method) == method
    if config.get("modules_to_save"):  # declared trainable: they train, as in peft
        trained = [
            n for n, p in model.named_parameters() if p.requires_grad and ".adapters." not in n
        ]
        assert trained and all("layernorm_embedding" in n for n in trained)


def test_rank_and_alpha_patterns_reach_the_layers(tmp_path):
    _, make_model, _, config = ROWS[0]
    peft_checkpoint(make_model, tmp_path, **config)
    model = vlpeft.load_peft_lora(make_model(), tmp_path)
    layers = dict(vlpeft.adapted_layers(model))
    q0 = layers["model.encoder.layers.0.self_attn.q_proj"].adapters["default"]
    q1 = layers["model.encoder.layers.1.self_attn.q_proj"].adapters["default"]
    v0 = layers["model.encoder.layers.0.self_attn.v_proj"].adapters["default"]
    assert (q0.r, q0.scaling) == (2, 4.0)  # rank_pattern, α = 8 -> 8 / 2
    assert (q1.r, q1.scaling) == (4, 2.0)
    assert (v0.r, v0.scaling) == (4, 0.75)  # alpha_pattern 3 / 4


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path):
    _, make_model, _, config = ROWS[1]
    peft_checkpoint(make_model, tmp_path, **config)
    model = vlpeft.load_peft_lora(make_model(), tmp_path)
    adapter = next(layer for _, layer in vlpeft.adapted_layers(model)).adapters["default"]
    assert adapter.scaling == pytest.approx(6 / 4**0.5)


def test_prefix_places_the_adapter_inside_a_wrapper(tmp_path):
    from peft import PeftModel

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bart = tiny_bart()

        def forward(self, **kw):
            return self.bart(**kw)

    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    inputs = bart_inputs()
    reference = run(PeftModel.from_pretrained(tiny_bart(), tmp_path).eval(), inputs)
    wrapper = vlpeft.load_peft_lora(Wrapper(), tmp_path, prefix="bart")
    torch.testing.assert_close(run(wrapper, inputs), reference, atol=1e-5, rtol=1e-5)
    assert all(p.startswith("bart.") for p, _ in vlpeft.adapted_layers(wrapper))
    # without the prefix the tensors name modules the wrapper does not have: an error, no warning
    with pytest.raises(ValueError, match="target_modules does not name"):
        vlpeft.load_peft_lora(Wrapper(), tmp_path)


def test_dropout_is_kept(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"], lora_dropout=0.25)
    model = vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    assert vlpeft.inject.adapter_configs(model)["default"].dropout == 0.25


# -- errors ------------------------------------------------------------------------------------
def _rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "field,value,bad",
    [
        ("target_modules", "q_proj|v_proj", "q_proj|v_proj"),
        ("target_modules", "(a+)+$", "(a+)+$"),
        ("target_modules", [".*q_proj"], ".*q_proj"),
        ("rank_pattern", {"^model.*q_proj$": 2}, "^model.*q_proj$"),
        ("alpha_pattern", {"layers.[01].self_attn.q_proj": 2}, "layers.[01].self_attn.q_proj"),
        ("modules_to_save", ["layernorm_.*"], "layernorm_.*"),
    ],
)
def test_a_pattern_key_with_regex_syntax_is_an_error_naming_it(tmp_path, field, value, bad):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    _rewrite_config(tmp_path, **{field: value})
    model = tiny_bart()
    with pytest.raises(ValueError, match="not a plain module name") as err:
        vlpeft.load_peft_lora(model, tmp_path)
    assert repr(bad) in str(err.value) and field in str(err.value)
    assert not list(vlpeft.adapted_layers(model))  # nothing was changed


def test_peft_all_linear_shorthand_is_refused_by_name(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    _rewrite_config(tmp_path, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"target_modules 'all-linear' .* not supported"):
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_modules", ["q_proj", "no_such_proj"]),
        ("rank_pattern", {"v_proj": 2}),  # a real module, but not a targeted one
        ("alpha_pattern", {"decoder.layers.7.self_attn.q_proj": 2}),
        ("modules_to_save", ["no_such_norm"]),
    ],
)
def test_a_key_matching_no_module_is_an_error(tmp_path, field, value):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    _rewrite_config(tmp_path, **{field: value})
    key = value[-1] if isinstance(value, list) else next(iter(value))
    with pytest.raises(ValueError, match="matches no") as err:
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    assert repr(key) in str(err.value)


def test_a_module_that_gets_no_tensor_is_an_error(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="gets no lora_B") as err:
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    assert gone in str(err.value)


def test_dora_without_magnitudes_is_an_error(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    _rewrite_config(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="gets no magnitude tensor"):
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)


def untrained_peft_checkpoint(directory, **config):
    """What peft saves before training (``init_lora_weights=True``): every lora_B is zero."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_bart(), LoraConfig(**config)).save_pretrained(directory)


def test_an_untrained_adapter_loads_with_a_warning(tmp_path, caplog):
    untrained_peft_checkpoint(tmp_path, r=2, target_modules=["q_proj"])
    inputs = bart_inputs()
    with caplog.at_level("WARNING", logger="vlpeft.peft_import"):
        model = vlpeft.load_peft_lora(tiny_bart(), tmp_path, name="fresh")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "all zeros in 6 of 6 layers" in warned[0]
    assert len(list(vlpeft.adapted_layers(model))) == 6
    assert torch.equal(run(model, inputs), run(tiny_bart(), inputs))  # B = 0: no change yet
    layer = next(layer for _, layer in vlpeft.adapted_layers(model))
    assert torch.any(layer.adapters["fresh"].lora_A)  # A is peft's random init, copied


@pytest.mark.parametrize("prefix", [None, "bart.model"])
def test_a_wrong_prefix_is_caught_by_names_even_for_an_untrained_adapter(tmp_path, prefix):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bart = tiny_bart()

    untrained_peft_checkpoint(tmp_path, r=2, target_modules=["q_proj"])
    wrapper = Wrapper()
    with pytest.raises(ValueError, match="which target_modules does not name in this model"):
        vlpeft.load_peft_lora(wrapper, tmp_path, prefix=prefix)
    assert not list(vlpeft.adapted_layers(wrapper))
    vlpeft.load_peft_lora(wrapper, tmp_path, prefix="bart")  # the right prefix loads


def test_wrong_rank_existing_name_pickle_and_unsupported_fields(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    model = vlpeft.load_peft_lora(tiny_bart(), tmp_path, name="a")
    with pytest.raises(ValueError, match="'a' already exists"):
        vlpeft.load_peft_lora(model, tmp_path, name="a")
    vlpeft.load_peft_lora(model, tmp_path, name="b")  # a second name is fine
    _rewrite_config(tmp_path, r=3)
    with pytest.raises(ValueError, match=r"expected \(3, 32\)"):
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    _rewrite_config(tmp_path, r=2, bias="all")
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    _rewrite_config(tmp_path, bias="none", init_lora_weights="pissa")
    with pytest.raises(ValueError, match="modified base weight"):
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    _rewrite_config(tmp_path, init_lora_weights=True)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never loads"):
        vlpeft.load_peft_lora(tiny_bart(), pickled)


NAN, INF = float("nan"), float("inf")  # json.dumps writes them as NaN / Infinity


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"lora_alpha": NAN}, "lora_alpha"),
        ({"lora_alpha": INF}, "lora_alpha"),
        ({"r": NAN}, "r"),
        ({"alpha_pattern": {"q_proj": NAN}}, "alpha_pattern['q_proj']"),
        ({"alpha_pattern": {"q_proj": INF}}, "alpha_pattern['q_proj']"),
        ({"alpha_pattern": {"q_proj": "2"}}, "alpha_pattern['q_proj']"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj']"),
        ({"alpha_pattern": {"q_proj": True}}, "alpha_pattern['q_proj']"),
        ({"rank_pattern": {"q_proj": NAN}}, "rank_pattern['q_proj']"),
        ({"rank_pattern": {"q_proj": INF}}, "rank_pattern['q_proj']"),
        ({"lora_dropout": NAN}, "lora_dropout"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"use_dora": "false"}, "use_dora"),  # a truthy string would have selected DoRA
        ({"use_rslora": "no"}, "use_rslora"),  # ... and scaled by α/√r
        ({"init_lora_weights": ["gaussian"]}, "init_lora_weights"),
    ],
)
def test_a_non_finite_or_mistyped_config_value_is_an_error_naming_file_and_key(
    tmp_path, changes, key
):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    _rewrite_config(tmp_path, **changes)
    model = tiny_bart()
    with pytest.raises(ValueError) as err:
        vlpeft.load_peft_lora(model, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'adapter_config.json'}: {key} must be ")
    assert "\n" not in message
    assert not list(vlpeft.adapted_layers(model))


@pytest.mark.parametrize(
    "text,says",
    [
        (b"\xff\xfe{}", "not valid JSON"),  # not UTF-8
        (b"3", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b'["LORA"]', "expected a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ],
)
def test_a_config_that_is_no_json_object_is_a_one_line_error_naming_the_file(tmp_path, text, says):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    (tmp_path / "adapter_config.json").write_bytes(text)
    with pytest.raises(ValueError, match=says) as err:
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    assert str(err.value).startswith(str(tmp_path / "adapter_config.json"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("kind", ["lora_A", "lora_B", "layernorm_embedding"])  # a saved module
def test_a_non_finite_tensor_is_an_error_naming_file_and_key(tmp_path, kind, value):
    peft_checkpoint(
        tiny_bart, tmp_path, r=2, target_modules=["q_proj"], modules_to_save=["layernorm_embedding"]
    )
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if kind in k)[-1]
    tensors[key].view(-1)[1] = value
    save_file(tensors, path)
    model = tiny_bart()
    with pytest.raises(ValueError, match="NaN or inf") as err:
        vlpeft.load_peft_lora(model, tmp_path)
    assert str(err.value).startswith(f"{path}: tensor {key!r}")
    assert not list(vlpeft.adapted_layers(model))


def test_an_unreadable_weights_file_is_an_error_naming_it(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        vlpeft.load_peft_lora(tiny_bart(), tmp_path)
    assert str(err.value).startswith(str(path))


def test_load_adapter_on_a_peft_directory_points_to_load_peft_lora(tmp_path):
    peft_checkpoint(tiny_bart, tmp_path, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="vlpeft.load_peft_lora"):
        vlpeft.load_adapter(tiny_bart(), tmp_path)


# -- export -> import ----------------------------------------------------------------------------
ROUND_TRIP = [
    ("lora-bart", tiny_bart, bart_inputs, LoRAConfig(targets=["q_proj", "fc1"], r=4)),
    (
        "lora-gpt2-slices",
        tiny_gpt2,
        text_inputs,
        LoRAConfig(targets=["c_attn"], r=2, slices={"c_attn": {"parts": 3, "use": [0, 2]}}),
    ),
    ("lora-conv", tiny_convnet, image_inputs, LoRAConfig(targets=["conv1", "head"], r=2)),
    ("dora-bart", tiny_bart, bart_inputs, DoRAConfig(targets=["q_proj", "v_proj"], r=2)),
]


@pytest.mark.parametrize("row", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_export_then_import_is_exact(row, tmp_path):
    _, make_model, make_inputs, config = row
    model = make_model()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    inputs = make_inputs()
    expected = run(model, inputs)
    vlpeft.export_peft_lora(model, tmp_path)
    back = vlpeft.load_peft_lora(make_model(), tmp_path)
    assert torch.equal(run(back, inputs), expected)
    layers = dict(vlpeft.adapted_layers(back))
    for path, layer in vlpeft.adapted_layers(model):
        assert torch.equal(layers[path].delta_weight(), layer.delta_weight()), path


def test_export_then_import_with_folded_scale_and_per_layer_ranks(tmp_path):
    """α ≠ r (the export folds the scale into B) and per-layer ranks: the imported adapter is a
    LayerwiseConfig that saves and reloads in the vlpeft format too."""
    model = tiny_bart()
    source = LayerwiseConfig(
        targets=["q_proj", "fc1"],
        base=LoRAConfig(targets=["q_proj"], r=4, alpha=12).to_dict(),
        ranks={"model.encoder.layers.0.fc1": 2, "model.decoder.layers.1.self_attn.q_proj": 3},
        alphas={"model.encoder.layers.0.fc1": 5.0},
    )
    vlpeft.add_adapter(model, source)
    layers = dict(vlpeft.adapted_layers(model))
    assert layers["model.encoder.layers.0.fc1"].adapters["default"].scaling == 2.5
    perturb_adapters(model)
    inputs = bart_inputs()
    expected = run(model, inputs)
    vlpeft.export_peft_lora(model, tmp_path / "peft")
    back = vlpeft.load_peft_lora(tiny_bart(), tmp_path / "peft")
    assert isinstance(vlpeft.inject.adapter_configs(back)["default"], LayerwiseConfig)
    ranks = {p: layer.rank for p, layer in vlpeft.adapted_layers(back)}
    assert ranks == {p: layer.rank for p, layer in layers.items()} and len(set(ranks.values())) == 3
    torch.testing.assert_close(run(back, inputs), expected, atol=1e-6, rtol=1e-5)
    vlpeft.save_adapter(back, tmp_path / "vlpeft")
    again = vlpeft.load_adapter(tiny_bart(), tmp_path / "vlpeft")
    assert torch.equal(run(again, inputs), run(back, inputs))


def test_the_methods_say_which_peft_flags_select_them():
    """The method a checkpoint loads as is the one whose ``peft_flags`` the file sets; the old
    import path of LayerwiseConfig still works."""
    assert peft_method({"use_dora": True}) is DoRAConfig
    assert peft_method({"use_dora": False}) is LoRAConfig
    assert peft_method({}) is LoRAConfig
    assert ImportedLayerwiseConfig is LayerwiseConfig is vlpeft.LayerwiseConfig
