"""PEFT methods, one file each; importing this package registers them all."""

from .adapter import AdapterConfig
from .base import (
    AdaptedLayer,
    AdapterModule,
    MethodConfig,
    get_method,
    list_methods,
    register_method,
)
from .lora import LoRAConfig

__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterModule",
    "LoRAConfig",
    "MethodConfig",
    "get_method",
    "list_methods",
    "register_method",
]
