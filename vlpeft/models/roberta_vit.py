"""RoBERTa + ViT for VQA as classification (the Qu et al. 2024 encoder-only setting).

The ViT's [CLS] feature (as it is by default; see :mod:`vlpeft.models.vit`) is prepended as the
first token of RoBERTa's input embeddings (the text is embedded once; positions and LayerNorm are RoBERTa's own). The
``<s>`` state (position 1) feeds a 2-layer MLP classifier over the answer vocabulary (Linear →
GELU → LayerNorm → Linear, as in VL-T5/LXMERT), trained with binary cross-entropy on the soft VQA
scores (× the number of answers, the usual scaling). Answers outside the vocabulary have target 0:
that is what the classifier formulation means, and the task reports the coverage of its vocabulary.

x_R for routed adapters in RoBERTa: the visual token. Trained by default: the adapters and the
classifier only (Sec. 4.1).

Three options reproduce Qu et al.'s reference code (tingyu215/Routing_VLPEFT ``models/vit_roberta.py``
``RobertaVQAVLRoutingVisPre``, ``train_vit_roberta.py``), whose Tab. 1 / 6 numbers they produced:
``head="reference"`` classifies RoBERTa's pooler output — tanh(dense(h[:, 0])) over position 0, the
visual token; the pooler frozen and, as roberta-base ships no pooler weights, random — with Linear →
LayerNorm → GELU → Linear, initialised N(0, 0.02) as transformers' ``_init_weights`` does;
``answer_loss="mean"`` averages the BCE over the answers too (``BCEWithLogitsLoss()``);
``text_embedding="twice"`` passes the text through RoBERTa's embeddings (positions from the ids,
LayerNorm, dropout) before the whole sequence goes through them again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.resora import set_token_masks
from ..adapters.routing import set_routing_inputs
from ..config import check
from .base import ModelConfig, VLModel, VLOutput, register_family
from .vit import (
    VIT_COMPONENT,
    VIT_KINDS,
    VIT_MEAN,
    VIT_STD,
    CachedViTFeatures,
    VisualToken,
    build_pretrained_or_random,
    build_vit,
)

HEADS = ("cls_mlp", "reference")
ANSWER_LOSSES = ("sum", "mean")
TEXT_EMBEDDINGS = ("once", "twice")
# the reference head's pooler is random (roberta-base has no pooler weights) and frozen, so a saved
# adapter (trainable tensors only) does not hold it: it is drawn from this fixed seed instead
POOLER_SEED = 0


@dataclasses.dataclass
class RobertaVitConfig(ModelConfig):
    """RoBERTa+ViT configuration (presets: ``presets/roberta-vit/*.json``).

    Args:
        vision: ``transformers.ViTConfig`` keyword arguments.
        text: ``transformers.RobertaConfig`` keyword arguments.
        answers: the answer vocabulary (the task sets it from its training split); when empty,
            ``num_answers`` unnamed classes.
        num_answers: classifier size when ``answers`` is empty (VQAv2: 3129).
        visual_mapping: a trainable Linear from the ViT's width to the LM's (default: none, the
            paper's; required when the widths differ). See :mod:`vlpeft.models.vit`.
        visual_feature: ``"cls"`` (the [CLS] hidden state, default) or ``"pooler"``.
        weights: ``{"vision": ViT hub id / directory, "text": RoBERTa hub id / directory}``.
        head: ``"cls_mlp"`` (the ``<s>`` state → Linear → GELU → LayerNorm → Linear, default) or
            ``"reference"`` (the frozen random pooler over the visual token → Linear → LayerNorm →
            GELU → Linear: Qu et al.'s code).
        answer_loss: the BCE ``"sum"`` over the answers (default) or their ``"mean"`` (the
            reference's ``BCEWithLogitsLoss()``: 1 / num_answers of the sum).
        text_embedding: the text through RoBERTa's embeddings ``"once"`` (default) or ``"twice"``
            (the reference's: embedded from the ids, then again with the visual token).
    """

    vision: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    answers: list = dataclasses.field(default_factory=list)
    num_answers: int = 3129
    image_mean: tuple = VIT_MEAN
    image_std: tuple = VIT_STD
    visual_mapping: bool = False
    visual_feature: str = "cls"
    head: str = "cls_mlp"
    answer_loss: str = "sum"
    text_embedding: str = "once"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (
            ("head", HEADS),
            ("answer_loss", ANSWER_LOSSES),
            ("text_embedding", TEXT_EMBEDDINGS),
        ):
            value = getattr(self, name)
            check(value in allowed, f"RobertaVitConfig.{name}", f"one of {list(allowed)}", value)

    @property
    def image_size(self) -> int:
        return self.vision.get("image_size", 224)


@register_family("roberta-vit")
class RobertaVit(CachedViTFeatures, VLModel):
    config_class = RobertaVitConfig
    capabilities = ("answer",)  # by classification over the answer vocabulary
    components = {"vision": VIT_COMPONENT, "text": r"roberta\.encoder\.layer\.\d+"}
    module_kinds = {
        "q": rf"(?:attention\.self\.query|{VIT_KINDS['q']})",
        "k": rf"(?:attention\.self\.key|{VIT_KINDS['k']})",
        "v": rf"(?:attention\.self\.value|{VIT_KINDS['v']})",
        "o": rf"(?:attention\.output\.dense|{VIT_KINDS['o']})",
        "ffn_in": rf"(?:intermediate\.dense|{VIT_KINDS['ffn_in']})",
        "ffn_out": rf"(?:output\.dense|{VIT_KINDS['ffn_out']})",
        "ffn": rf"(?:intermediate\.dense|output\.dense|{VIT_KINDS['ffn']})",
    }
    default_components = ("text",)
    trainable_patterns = (r"^classifier\.",)  # + the visual mapping when configured
    classifies_answers = True

    def __init__(self, config: RobertaVitConfig) -> None:
        super().__init__(config)
        from transformers import RobertaConfig, RobertaModel

        weights = config.weights if config.pretrained else {}
        self.vit = build_vit(config.vision, weights.get("vision"))
        self.vit.requires_grad_(False)
        text = dict(config.text)
        if config.tokenizer == "tiny" and not weights.get("text"):
            tok = self.tokenizer
            text = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **text}
        self.roberta = build_pretrained_or_random(
            RobertaModel, RobertaConfig, text, weights.get("text"), "RoBERTa"
        )
        width = self.roberta.config.hidden_size
        self.visual = VisualToken(
            self.vit, width, config.visual_mapping, config.visual_feature, self.family
        )
        self.trainable_patterns = (r"^classifier\.",) + (
            (r"^visual\.",) if config.visual_mapping else ()
        )
        self.answers = list(config.answers) or [str(i) for i in range(config.num_answers)]
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self.classifier = self.build_classifier(width, len(self.answers))

    def build_classifier(self, width: int, answers: int) -> nn.Sequential:
        """VL-T5's Linear → GELU → LayerNorm → Linear, or with ``head="reference"`` the reference
        code's Linear → LayerNorm → GELU → Linear initialised as its ``_init_weights`` (and its
        pooler redrawn from :data:`POOLER_SEED`)."""
        if self.config.head == "cls_mlp":
            return nn.Sequential(
                nn.Linear(width, 2 * width),
                nn.GELU(),
                nn.LayerNorm(2 * width),
                nn.Linear(2 * width, answers),
            )
        classifier = nn.Sequential(
            nn.Linear(width, 2 * width),
            nn.LayerNorm(2 * width),
            nn.GELU(),
            nn.Linear(2 * width, answers),
        )
        std = self.roberta.config.initializer_range
        init_normal(self.roberta.pooler.dense, std, torch.Generator().manual_seed(POOLER_SEED))
        init_normal(classifier[0], std)
        init_normal(classifier[3], std)
        return classifier

    def text_positions(self, max_new_tokens: int, images: int = 1) -> list[tuple[str, int, int]]:
        # RoBERTa's positions start after the padding index (max_position_embeddings - 2 usable)
        cfg = self.roberta.config
        limit = cfg.max_position_embeddings - cfg.pad_token_id - 1
        return [("visual token + text", 1 + self.config.max_text_length, limit)]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Answer logits (B, num_answers)."""
        self.set_batch_adapters(batch)
        visual = self.visual_input(batch)
        text = self.tokenize(batch["text"])
        if self.config.text_embedding == "twice":  # positions from the ids, LayerNorm, dropout
            embeds = self.roberta.embeddings(input_ids=text["input_ids"])
        else:
            embeds = self.roberta.embeddings.word_embeddings(text["input_ids"])
        embeds = torch.cat([visual[:, None].to(embeds.dtype), embeds], dim=1)
        mask = F.pad(text["attention_mask"], (1, 0), value=1)
        set_routing_inputs(self.roberta, visual)
        set_token_masks(self.roberta, mask)
        out = self.roberta(inputs_embeds=embeds, attention_mask=mask)
        if self.config.head == "reference":  # tanh(dense(h[:, 0])): the visual token
            return self.classifier(out.pooler_output)
        return self.classifier(out.last_hidden_state[:, 1])

    def targets(self, answer_scores) -> torch.Tensor:
        """Soft score vectors (B, num_answers) from ``[{answer: score}]``."""
        out = torch.zeros(len(answer_scores), len(self.answers), device=self.device)
        for row, scores in enumerate(answer_scores):
            for answer, score in scores.items():
                if answer in self.answer_index:
                    out[row, self.answer_index[answer]] = score
        return out

    def forward(self, batch: dict[str, Any]) -> VLOutput:
        logits = self.logits(batch).float()
        target = self.targets(batch["answer_scores"])
        loss = F.binary_cross_entropy_with_logits(logits, target)  # mean over batch and answers
        if self.config.answer_loss == "sum":
            loss = loss * target.shape[1]
        return VLOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        """The top answer of each example (generation arguments do not apply to a classifier)."""
        return [self.answers[i] for i in self.logits(batch).argmax(-1).tolist()]


@torch.no_grad()
def init_normal(linear: nn.Linear, std: float, generator: torch.Generator | None = None) -> None:
    """transformers' ``_init_weights`` for a Linear: weight N(0, std), bias 0 (from ``generator``
    when given, drawn on the CPU, so the values do not depend on the device or the global seed)."""
    if linear.weight.is_meta:
        return
    weight = torch.randn(linear.weight.shape, generator=generator) * std
    linear.weight.copy_(weight)
    linear.bias.zero_()
