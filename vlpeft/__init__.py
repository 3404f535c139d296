"""vlpeft: parameter-efficient fine-tuning of vision-language models.

The library takes modules and tensors; it never reads argv, environment variables or data-set paths.
"""

from . import adapters
from .adapters import (
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LayerwiseConfig,
    LoRAConfig,
    NullLoRAConfig,
    ReSoRAConfig,
    list_methods,
)
from .adapters.base import disable_adapters
from .adapters.resora import enable_resora, resora_penalty, set_token_masks
from .adapters.routing import routing_inputs, set_routing, set_routing_inputs, set_row_adapters
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
from .merge import merge_task_adapters
from .models import build_model
from .peft_import import load_peft_lora
from .unload import delete_adapter, merge_and_unload, unload

__version__ = "0.1.0"

__all__ = [
    "build_model",
    "AdapterConfig",
    "DoRAConfig",
    "FLoRAConfig",
    "LayerwiseConfig",
    "LoRAConfig",
    "NullLoRAConfig",
    "ReSoRAConfig",
    "enable_resora",
    "resora_penalty",
    "routing_inputs",
    "set_routing",
    "set_routing_inputs",
    "set_token_masks",
    "active_adapters",
    "adapted_layers",
    "adapters",
    "add_adapter",
    "count_parameters",
    "delete_adapter",
    "export_peft_lora",
    "list_methods",
    "load_adapter",
    "load_peft_lora",
    "merge_adapter",
    "merge_and_unload",
    "merge_task_adapters",
    "save_adapter",
    "set_active_adapter",
    "unload",
    "unmerge_adapter",
    "disable_adapters",
    "set_row_adapters",
]
