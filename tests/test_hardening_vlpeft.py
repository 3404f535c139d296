"""Numbers that mean nothing are refused where they enter (#25): a NaN or inf in ReSoRA's settings,
in every model family's config and in the shared helper every config uses, each error naming the
field; a damaged adapter checkpoint (config or weights) is one line naming the file and key."""

import dataclasses
import json
import math
import re
import sys

import pytest
import yaml
from conftest import perturb_adapters, tiny_bart
from safetensors.torch import load_file, save_file

import vlpeft
from vlpeft.adapters import LoRAConfig
from vlpeft.adapters.resora import ReSoRAConfig
from vlpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from vlpeft.config import ConfigError, check_finite
from vlpeft.models import list_families, preset_config
from vlpeft.models.blip import BlipConfig

RESORA_FLOATS = [f.name for f in dataclasses.fields(ReSoRAConfig) if f.type == "float"]


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("field", RESORA_FLOATS)
def test_resora_refuses_a_nan_or_inf_naming_the_field(field, bad):
    value = yaml.safe_load(f"{field}: {bad}")
    where = "run.yaml: resora"  # what the launcher passes: the message says where, then what
    message = rf"^{where}: ReSoRAConfig\.{field} must be a finite number"
    with pytest.raises(ConfigError, match=message):
        ReSoRAConfig.from_dict(value, where)


def test_check_finite_names_the_place_inside_nested_fields():
    @dataclasses.dataclass
    class Settings:
        scale: float = 1.0
        per_layer: dict = dataclasses.field(default_factory=dict)
        steps: list = dataclasses.field(default_factory=list)

    check_finite(Settings(per_layer={"a": {"b": 2.0}}, steps=[1, 2.5]))  # finite: no error
    for settings, where in [
        (Settings(scale=math.nan), "Settings.scale"),
        (Settings(per_layer={"a": {"b": math.inf}}), "Settings.per_layer['a']['b']"),
        (Settings(steps=[1.0, -math.inf]), "Settings.steps[1]"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(where) + " must be a finite number"):
            check_finite(settings)


# -- model configs: every family, every float field (nested in dicts and tuples too) ------------


def _float_overrides(family):
    """(override, the field's name in the error) for each place a float sits in ``family``'s
    config: a float field, the first item of a tuple field, a key inside a dict field."""
    config = preset_config(family, "tiny")
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "float":
            yield {f.name: math.nan}, f"{cls}.{f.name}"
        elif isinstance(value, tuple) and value and isinstance(value[0], float):
            yield {f.name: [math.nan, *value[1:]]}, f"{cls}.{f.name}[0]"
        elif isinstance(value, dict) and f.name != "weights":
            yield {f.name: {"layer_norm_eps": math.nan}}, f"{cls}.{f.name}['layer_norm_eps']"


MODEL_FLOATS = [
    pytest.param(family, override, where, id=where)
    for family in list_families()
    for override, where in _float_overrides(family)
]


def test_blip_refuses_a_nan_temperature_or_smoothing_and_every_family_is_checked():
    for field in ("itc_temperature", "label_smoothing"):
        with pytest.raises(ConfigError, match=rf"^BlipConfig\.{field} must be a finite number"):
            BlipConfig(**{field: math.nan})
    assert {row.values[0] for row in MODEL_FLOATS} == set(list_families())  # the table below


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize(("family", "override", "where"), MODEL_FLOATS)
def test_model_config_refuses_a_nan_or_inf_naming_the_field(family, override, where, sign):
    (key, value), *_ = override.items()
    if sign < 0:  # the same place, -inf instead of NaN
        value = json.loads(json.dumps(value).replace("NaN", "-Infinity"))
    message = rf"^{family} preset 'tiny': {re.escape(where)} must be a finite number"
    with pytest.raises(ConfigError, match=message):
        preset_config(family, "tiny", **{key: value})


# -- adapter checkpoints: damaged files give one line naming the file (and the key) -------------


def _checkpoint(tmp_path):
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2))
    perturb_adapters(model)
    vlpeft.save_adapter(model, tmp_path)
    return tmp_path / CONFIG_NAME, tmp_path / WEIGHTS_NAME


def _refused(tmp_path, path, message):
    """load_adapter refuses with one line: ``<path>: <message>``."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: ") + message) as err:
        vlpeft.load_adapter(tiny_bart(), tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text", ["[]", "5", "null", '"adapter_name config"', '["adapter_name", "config"]']
)
def test_adapter_config_that_is_not_an_object(tmp_path, text):
    config, _ = _checkpoint(tmp_path)
    config.write_text(text)
    _refused(tmp_path, config, "expected a JSON object")


def test_adapter_config_that_is_not_utf8(tmp_path):
    config, _ = _checkpoint(tmp_path)
    config.write_bytes(b'{"adapter_name": "caf\xe9"}')
    _refused(tmp_path, config, "not UTF-8 text")


@pytest.mark.parametrize("depth", [100_000, sys.getrecursionlimit() - 10])
def test_adapter_config_nested_too_deeply(tmp_path, depth):
    """Too deep for the JSON parser, or parsed but too deep for the config's checks that walk it
    (near the recursion limit: which of the two depends on the stack's depth)."""
    config, _ = _checkpoint(tmp_path)
    nested = "[" * depth + "1.0" + "]" * depth
    config.write_text(
        '{"adapter_name": "default", "config": {"method": "lora", "targets": ["q_proj"], '
        f'"slices": {{"q_proj": {nested}}}}}}}'
    )
    _refused(tmp_path, config, "(JSON|config) nested too deeply to read")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("adapter_name", 5, "adapter_name must be a non-empty string"),
        ("adapter_name", "", "adapter_name must be a non-empty string"),
        ("extra_trainable", "lm_head.weight", "extra_trainable must be a list of names"),
        ("extra_trainable", None, "extra_trainable must be a list of names"),
        ("resolved", [], "resolved must be an object with 'layers'"),
        ("resolved", {}, "resolved must be an object with 'layers'"),
        ("resolved", {"layers": [1]}, r"resolved\.layers must be a list of names"),
        ("resolved", {"layers": [], "routed": "x"}, r"resolved\.routed must be a list of names"),
        ("resolved", {"layers": [], "slices": []}, r"resolved\.slices must be an object"),
    ],
)
def test_adapter_config_keys_of_the_wrong_type(tmp_path, key, value, message):
    config, _ = _checkpoint(tmp_path)
    data = json.loads(config.read_text())
    data[key] = value
    config.write_text(json.dumps(data))
    _refused(tmp_path, config, message)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_adapter_tensor_with_nan_or_inf_is_refused(tmp_path, bad):
    _, weights = _checkpoint(tmp_path)
    tensors = load_file(str(weights))
    key = sorted(tensors)[1]
    tensors[key][0, 0] = bad
    save_file(tensors, str(weights))
    _refused(tmp_path, weights, re.escape(f"tensor {key!r} has NaN or inf values"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "huge header"])
def test_corrupt_adapter_weights_are_refused(tmp_path, damage):
    _, weights = _checkpoint(tmp_path)
    raw = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": raw[: len(raw) - 64],
            "empty": b"",
            "garbage": b"\x00\x01not a safetensors file at all",
            "huge header": (2**40).to_bytes(8, "little") + b"{}",
        }[damage]
    )
    _refused(tmp_path, weights, "not a readable safetensors file")
