"""vlpeft: parameter-efficient fine-tuning of vision-language models.

The library takes modules and tensors; it never reads argv, environment variables or data-set paths.
"""

from . import adapters
from .adapters import AdapterConfig, LoRAConfig, list_methods
from .checkpoint import export_peft_lora, load_adapter, save_adapter
from .inject import (
    active_adapters,
    adapted_layers,
    add_adapter,
    count_parameters,
    merge_adapter,
    set_active_adapter,
    unmerge_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "LoRAConfig",
    "active_adapters",
    "adapted_layers",
    "adapters",
    "add_adapter",
    "count_parameters",
    "export_peft_lora",
    "list_methods",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "set_active_adapter",
    "unmerge_adapter",
]
