"""The model factory: one file per backbone family, one registry, presets as JSON data.

>>> import vlpeft
>>> model = vlpeft.build_model("clip-bart", "tiny")
>>> sorted(vlpeft.models.list_families())
['blip', 'clip-bart', 'gpt2-vit', 'roberta-vit']
"""

from . import blip, clip_bart, gpt2_vit, roberta_vit  # noqa: F401  (each registers its family)
from .base import (
    ModelConfig,
    VLModel,
    build_model,
    get_family,
    list_families,
    list_presets,
    load_preset,
    preset_config,
    register_family,
)

__all__ = [
    "ModelConfig",
    "VLModel",
    "build_model",
    "get_family",
    "list_families",
    "list_presets",
    "load_preset",
    "preset_config",
    "register_family",
]
