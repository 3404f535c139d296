"""PEFT methods, one file each; importing this package registers them all."""

from . import resora, routing
from .adapter import AdapterConfig
from .base import (
    AdaptedLayer,
    AdapterModule,
    MethodConfig,
    get_method,
    list_methods,
    register_method,
)
from .flora import FLoRAConfig
from .lora import LoRAConfig
from .nulllora import NullLoRAConfig
from .resora import ReSoRAConfig

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterModule",
    "FLoRAConfig",
    "LoRAConfig",
    "MethodConfig",
    "NullLoRAConfig",
    "ReSoRAConfig",
    "get_method",
    "list_methods",
    "register_method",
    "resora",
    "routing",
]
