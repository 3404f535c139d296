"""The ViT half shared by ``roberta-vit`` and ``gpt2-vit``: a transformers ViTModel whose pooled
[CLS] feature, projected to the language model's width, is the single visual token (and x_R)."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.resora import set_token_masks
from .base import missing_weights

VIT_COMPONENT = r"vit\.layers\.\d+"
VIT_KINDS = {
    "q": r"attention\.q_proj",
    "k": r"attention\.k_proj",
    "v": r"attention\.v_proj",
    "o": r"attention\.o_proj",
    "ffn_in": r"mlp\.fc1",
    "ffn_out": r"mlp\.fc2",
    "ffn": r"mlp\.fc[12]",
}
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


def build_pretrained_or_random(model_cls, config_cls, kwargs: dict, source: str | None, what: str):
    """``model_cls.from_pretrained(source)`` when a source is given, else a random model of ``kwargs``."""
    if source:
        try:
            return model_cls.from_pretrained(source)
        except OSError as err:
            raise missing_weights(what, source, err) from err
    return model_cls(config_cls(**kwargs))


def build_vit(kwargs: dict, source: str | None) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return build_pretrained_or_random(ViTModel, ViTConfig, kwargs, source, "ViT")


class VisualToken(nn.Module):
    """Pooled ViT [CLS] (dense + tanh pooler) → trainable Linear to the text width: (B, d_text)."""

    def __init__(self, vit: nn.Module, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vit.config.hidden_size, width)

    def forward(self, vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        dtype = self.proj.weight.dtype
        set_token_masks(vit, None)  # [CLS] and every patch are real
        pooled = vit(pixel_values=images.to(self.proj.weight.device, dtype)).pooler_output
        return self.proj(pooled)
