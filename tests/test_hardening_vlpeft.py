"""Numbers that mean nothing are refused where they enter (#25): a NaN or inf in ReSoRA's settings
and in the shared helper every config uses, each error naming the field."""

import dataclasses
import math
import re

import pytest
import yaml

from vlpeft.adapters.resora import ReSoRAConfig
from vlpeft.config import ConfigError, check_finite

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
