"""PEFT methods, one file each; importing this package registers them all.

The core — :mod:`.base` (the layer protocol, traversal, the method registry) and :mod:`.routing`
(routing functions, x_R per model) — is imported by every method file; methods never import each
other. :mod:`.resora` is the regulariser and its recorder; :mod:`.nulllora_report` is Null-LoRA's
rank report (JSON + plot) and :mod:`.layerwise` a per-layer rank/alpha wrapper of LoRA or DoRA.
"""

from . import nulllora_report, resora, routing
from .adapter import AdapterConfig
from .base import (
    METHODS,
    AdaptedLayer,
    AdapterModule,
    MethodConfig,
    get_method,
    list_methods,
    register_method,
)
from .dora import DoRAConfig
from .flora import FLoRAConfig
from .layerwise import LayerwiseConfig
from .lora import LoRAConfig
from .nulllora import NullLoRAConfig
from .resora import ReSoRAConfig
from .routing import RoutableConfig

__all__ = [
    "METHODS",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterModule",
    "DoRAConfig",
    "FLoRAConfig",
    "LayerwiseConfig",
    "LoRAConfig",
    "MethodConfig",
    "NullLoRAConfig",
    "ReSoRAConfig",
    "RoutableConfig",
    "get_method",
    "list_methods",
    "nulllora_report",
    "register_method",
    "resora",
    "routing",
]
