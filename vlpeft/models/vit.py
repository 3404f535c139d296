"""The ViT half shared by ``roberta-vit`` and ``gpt2-vit``: a transformers ViTModel whose [CLS]
feature is the single visual token prepended to the text, and x_R.

Qu et al. 2024, Sec. 4.1 / Fig. 3: "The [CLS] feature from the ViT is prepended to the text inputs
and acts as x_R … The ViT and LMs adopt the same dimensions for their feature spaces, so we do not
need additional mappings", and only the classifier and the PEFT modules train. So by default
(``visual_mapping: false``) the feature goes in as it is, and nothing outside the adapters (and
the VQA classifier) trains — in the no-routing baseline too. The feature is the [CLS] hidden
state (``visual_feature: "cls"``, the paper's "[CLS] feature"; the official code's default feeds
all of ViT's last hidden states, its ``--vit_use_pooler`` the dense+tanh pooler output, which
``"pooler"`` selects). ``visual_mapping: true`` adds a trainable Linear from the ViT's width to
the language model's (declared trainable); it is required, with a clear error, when they differ.
"""

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


FEATURES = ("cls", "pooler")


class VisualToken(nn.Module):
    """The ViT [CLS] hidden state (or pooler output) as one token of the text width: (B, d_text);
    through a trainable Linear only with ``mapping`` (required when the widths differ)."""

    def __init__(
        self, vit: nn.Module, width: int, mapping: bool = False, feature: str = "cls", family=""
    ) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"{family}: visual_feature must be one of {FEATURES}, got {feature!r}")
        d_vit = vit.config.hidden_size
        if not mapping and d_vit != width:
            raise ValueError(
                f"{family}: the ViT's width {d_vit} differs from the language model's {width}; "
                "the paper's setting needs equal widths (no mapping): set visual_mapping: true for "
                "a trainable Linear between them"
            )
        self.feature = feature
        self.proj = nn.Linear(d_vit, width) if mapping else None

    def vit_token(self, vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's feature of each image (B, d_vit): what a feature cache stores."""
        return self.token_of(self.vit_output(vit, images))

    @staticmethod
    def vit_output(vit: nn.Module, images: torch.Tensor):
        """The ViT's forward on ``images`` (its last hidden state and pooler output)."""
        weight = next(vit.parameters())
        set_token_masks(vit, None)  # [CLS] and every patch are real
        return vit(pixel_values=images.to(weight.device, weight.dtype))

    def token_of(self, out) -> torch.Tensor:
        """The configured feature of a ViT output: the pooler's, or the [CLS] state."""
        return out.pooler_output if self.feature == "pooler" else out.last_hidden_state[:, 0]

    def project(self, token: torch.Tensor) -> torch.Tensor:
        return token if self.proj is None else self.proj(token.to(self.proj.weight.dtype))

    def forward(self, vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.vit_token(vit, images))


class CachedViTFeatures:
    """For a family with a frozen ``vit`` and a :class:`VisualToken` ``visual``: its ViT feature
    can be cached (``launch.features``; exact while no adapter sits in the ViT, which the cache
    checks) and read back as ``batch["features"]`` (B, d_vit) instead of ``images``."""

    cached_part = "vit"

    @torch.no_grad()
    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual.vit_token(self.vit, images).float()

    def visual_input(self, batch: dict) -> torch.Tensor:
        """The visual token of a batch, from cached features when it carries them."""
        features = batch.get("features")
        if features is None:
            if "images" not in batch:
                raise KeyError(f"{self.family} batch needs 'images' or cached 'features'")
            return self.visual(self.vit, batch["images"])
        weight = next(self.vit.parameters())
        return self.visual.project(features.to(weight.device, weight.dtype))
