"""Every bad input of the adapter core gives a clear error naming what is wrong."""

import json

import pytest
import torch
from conftest import perturb_adapters, tiny_bart, tiny_convnet, tiny_gpt2

import vlpeft
from vlpeft.adapters import AdapterConfig, LoRAConfig, MethodConfig
from vlpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME, write_safetensors


def test_target_matching_nothing_lists_closest_names():
    with pytest.raises(ValueError, match=r"match no module.*q_proj"):
        vlpeft.add_adapter(tiny_bart(), LoRAConfig(targets=["q_prj"]))


def test_regex_target_matching_nothing():
    with pytest.raises(ValueError, match="match no module"):
        vlpeft.add_adapter(tiny_bart(), LoRAConfig(targets=r"encoder\.nothing\..*"))


def test_regex_target_matches_whole_name():
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=r".*decoder\.layers\.\d+\.self_attn\.(q|v)_proj"))
    names = [n for n, _ in vlpeft.adapted_layers(model)]
    assert len(names) == 4 and all("decoder" in n and "encoder_attn" not in n for n in names)


def test_trainable_pattern_matching_nothing():
    with pytest.raises(ValueError, match="trainable pattern 'no_such_norm'"):
        vlpeft.add_adapter(tiny_bart(), LoRAConfig(targets=["q_proj"], trainable=["no_such_norm"]))


def test_lora_on_an_unsupported_module_names_it():
    with pytest.raises(TypeError, match=r"self_attn.*BartAttention"):
        vlpeft.add_adapter(tiny_bart(), LoRAConfig(targets=["encoder.layers.0.self_attn"]))


def test_lora_on_grouped_conv_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped Conv2d"):
        vlpeft.add_adapter(net, LoRAConfig(targets=["0"]))


def test_duplicate_adapter_name():
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        vlpeft.add_adapter(model, LoRAConfig(targets=["v_proj"]))


def test_merge_of_a_nonlinear_adapter_is_refused():
    model = tiny_gpt2()
    vlpeft.add_adapter(model, AdapterConfig(targets=["mlp.c_proj"], bottleneck=4))
    with pytest.raises(TypeError, match=r"'default' \(adapter\) .* not mergeable"):
        vlpeft.merge_adapter(model)


def test_switching_adapters_while_merged_is_refused():
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"]))
    vlpeft.merge_adapter(model)
    with pytest.raises(RuntimeError, match="unmerge_adapter first"):
        vlpeft.set_active_adapter(model, None)


def test_export_of_a_nonlinear_adapter_is_refused(tmp_path):
    model = tiny_gpt2()
    vlpeft.add_adapter(model, AdapterConfig(targets=["mlp.c_proj"], bottleneck=4))
    with pytest.raises(TypeError, match="cannot be written as a plain peft LoRA"):
        vlpeft.export_peft_lora(model, tmp_path)


def test_config_unknown_key_names_nearest():
    with pytest.raises(ValueError, match=r"unknown key 'alhpa'.*did you mean 'alpha'"):
        MethodConfig.from_dict({"method": "lora", "targets": ["q"], "alhpa": 3})
    with pytest.raises(KeyError, match=r"unknown method 'lorra'.*did you mean 'lora'"):
        MethodConfig.from_dict({"method": "lorra", "targets": ["q"]})


def test_config_round_trips_through_json():
    config = LoRAConfig(
        targets=["c_attn"], r=3, alpha=5.0, slices={"c_attn": {"parts": 3, "use": [0, 2]}}
    )
    assert MethodConfig.from_dict(json.loads(config.to_json())) == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be >= 1"),
        ({"dropout": 1.0}, "dropout"),
        ({"slices": {"c_attn": {"parts": 3, "use": [3]}}}, "must index parts"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_lora_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**{"targets": ["q"], **kwargs})


def saved(tmp_path, config, make=tiny_bart):
    model = make()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    vlpeft.save_adapter(model, tmp_path)
    return model


def test_load_with_mismatching_shapes_names_layer_and_shapes(tmp_path):
    saved(tmp_path, LoRAConfig(targets=["q_proj"], r=4))
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2))
    with pytest.raises(
        ValueError,
        match=r"shape mismatch at 'model\.encoder\.layers\.0\.self_attn\.q_proj\.lora_A'.*\(4, 32\).*\(2, 32\)",
    ):
        vlpeft.load_adapter(model, tmp_path)


def test_load_with_mismatching_layer_names(tmp_path):
    saved(tmp_path, LoRAConfig(targets=["q_proj"], r=2))
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["encoder.layers.0.self_attn.q_proj"], r=2))
    with pytest.raises(ValueError, match=r"no matching layer"):
        vlpeft.load_adapter(model, tmp_path)
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "k_proj"], r=2))
    with pytest.raises(ValueError, match=r"no tensor for '.*k_proj\.lora_A'"):
        vlpeft.load_adapter(model, tmp_path)


def test_load_into_a_model_without_the_target_layers(tmp_path):
    saved(tmp_path, LoRAConfig(targets=["q_proj"], r=2))
    with pytest.raises(ValueError, match="match no module"):
        vlpeft.load_adapter(tiny_convnet(), tmp_path)


def test_load_from_missing_or_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        vlpeft.load_adapter(tiny_bart(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vlpeft.load_adapter(tiny_bart(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"adapter_name": "default"}))
    with pytest.raises(ValueError, match="missing key 'config'"):
        vlpeft.load_adapter(tiny_bart(), tmp_path)
    saved(tmp_path, LoRAConfig(targets=["q_proj"], r=2))
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter weights missing"):
        vlpeft.load_adapter(tiny_bart(), tmp_path)


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import vlpeft.checkpoint as ckpt

    path = tmp_path / WEIGHTS_NAME
    write_safetensors(path, {"x": torch.ones(2)})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(path, {"x": torch.zeros(2)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]


def test_named_adapters_round_trip_through_subdirectories(tmp_path):
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2))
    vlpeft.add_adapter(model, AdapterConfig(targets=["fc2"], bottleneck=4), "vqa")
    perturb_adapters(model)
    vlpeft.save_adapter(model, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "vqa" / CONFIG_NAME).is_file()
    fresh = vlpeft.load_adapter(tiny_bart(), tmp_path)
    assert sorted(vlpeft.inject.adapter_configs(fresh)) == ["default", "vqa"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[key]), key
    # one adapter alone, loaded under a new name
    vlpeft.save_adapter(model, tmp_path / "single", name="vqa")
    other = vlpeft.load_adapter(tiny_bart(), tmp_path / "single", name="task7")
    assert list(vlpeft.inject.adapter_configs(other)) == ["task7"]


def test_named_adapters_without_a_default_round_trip(tmp_path):
    model = tiny_gpt2()
    vlpeft.add_adapter(model, LoRAConfig(targets=["c_attn"], r=2), "vqa")
    vlpeft.add_adapter(model, AdapterConfig(targets=["mlp.c_proj"], bottleneck=4), "caption")
    perturb_adapters(model)
    vlpeft.save_adapter(model, tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()
    fresh = vlpeft.load_adapter(tiny_gpt2(), tmp_path)
    assert sorted(vlpeft.inject.adapter_configs(fresh)) == ["caption", "vqa"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[key]), key


def test_a_crafted_pattern_in_a_checkpoint_is_never_compiled(tmp_path):
    """A catastrophic-backtracking ``targets`` regex in adapter_config.json used to hang
    load_adapter; loading places the adapter by the exact names the checkpoint recorded, and a
    format-1 file with a regex is refused."""
    import json
    import time

    import vlpeft
    from vlpeft.adapters import LoRAConfig

    def make():  # a long module name: the crafted pattern backtracks 2^len on it
        return torch.nn.ModuleDict(
            {"a_long_layer_name_that_backtracks_badly": torch.nn.Linear(4, 4)}
        )

    net = make()
    vlpeft.add_adapter(net, LoRAConfig(targets="a_long.*", r=2))
    vlpeft.save_adapter(net, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    assert data["resolved"]["layers"] == ["a_long_layer_name_that_backtracks_badly"]
    data["config"]["targets"] = "([a-z_.0-9]+)+X"  # hangs re.fullmatch on that name
    path.write_text(json.dumps(data))
    fresh = make()
    start = time.perf_counter()
    vlpeft.load_adapter(fresh, tmp_path)
    assert time.perf_counter() - start < 5
    assert [p for p, _ in vlpeft.adapted_layers(fresh)] == [
        "a_long_layer_name_that_backtracks_badly"
    ]
    del data["resolved"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="patterns from a file are not compiled"):
        vlpeft.load_adapter(make(), tmp_path)
