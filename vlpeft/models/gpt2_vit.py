"""GPT-2 + ViT for captioning (the Qu et al. 2024 decoder-only setting).

The ViT's [CLS] feature (as it is by default; see :mod:`vlpeft.models.vit`) is a one-token prefix; then ``bos``, an
optional prompt (``batch["text"]``), the caption and one ``eos``. The LM loss covers caption and
``eos`` only: prefix, prompt and padding positions are ignored (the reference code also trained on
the padded ``eos`` positions). Greedy or beam generation continues from prefix + ``bos`` + prompt.

x_R for routed adapters in GPT-2: the prefix vector. Trained by default: the adapters only.

Qu et al.'s comparison with cross-attention (Sec. 4.3, after I-Tuning) changes both:
``visual_prefix=False`` drops the visual token from the input (the recipe's prompt, ``"<s>"``,
follows ``bos``), and ``routing_feature="tokens"`` makes x_R the ViT's last hidden state, every
token ((B, 1 + patches, d): keys/values of cross-attention, X_v of x_t X_vᵀ X_v), so the image
reaches GPT-2 through the adapters only. That x_R is computed from pixels (a feature cache holds
one vector per image).

``text_layout="reference"`` is the sequence and loss of Qu et al.'s reference code
(tingyu215/Routing_VLPEFT ``data/coco_dataset.py``, ``train_vit_gpt.py``), which produced their
Tab. 4-6 numbers: [prefix] + the tokens of prompt + caption (one string, no ``bos``, cut to
``max_text_length``) + ``eos`` padding to exactly ``max_text_length`` (attention on the text only);
every text position but the first is a target — the first caption word (the first prompt token)
never is, every padding ``eos`` is — except token id 0 (GPT-2's ``"!"``: ``ignore_index=0``).
Generation starts from the prefix (+ prompt) alone. The reference averages over the batch's
tokens, ``lm_loss`` over each example's tokens, then the examples: with every row padded to the
same width the two differ only where a row holds token 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.resora import set_token_masks
from ..adapters.routing import set_routing_inputs
from ..config import check
from .base import IGNORE, ModelConfig, VLModel, VLOutput, lm_loss, register_family
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

ROUTING_FEATURES = ("prefix", "tokens")
TEXT_LAYOUTS = ("vlpeft", "reference")
REFERENCE_IGNORED_ID = 0  # train_vit_gpt.py: cross_entropy(..., ignore_index=0), GPT-2's "!"


@dataclasses.dataclass
class Gpt2VitConfig(ModelConfig):
    """GPT-2+ViT configuration (presets: ``presets/gpt2-vit/*.json``).

    Args:
        vision: ``transformers.ViTConfig`` keyword arguments.
        text: ``transformers.GPT2Config`` keyword arguments.
        visual_mapping: a trainable Linear from the ViT's width to the LM's (default: none, the
            paper's; required when the widths differ). See :mod:`vlpeft.models.vit`.
        visual_feature: ``"cls"`` (the [CLS] hidden state, default) or ``"pooler"``.
        weights: ``{"vision": ViT hub id / directory, "text": GPT-2 hub id / directory}``.
        visual_prefix: prepend the visual feature to the text as one token (default); False:
            the text alone (Qu et al. Sec. 4.3: the image reaches GPT-2 through x_R only).
        routing_feature: x_R of routed adapters: ``"prefix"`` (the visual feature, one vector)
            or ``"tokens"`` (the ViT's last hidden state, every token; Sec. 4.3).
        text_layout: ``"vlpeft"`` (bos + prompt + caption + eos, loss on caption and eos;
            default) or ``"reference"`` (Qu et al.'s code: no bos, eos-padded to
            ``max_text_length``, loss on all but the first token and on the padding, not on id 0).
    """

    vision: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    image_mean: tuple = VIT_MEAN
    image_std: tuple = VIT_STD
    visual_mapping: bool = False
    visual_feature: str = "cls"
    visual_prefix: bool = True
    routing_feature: str = "prefix"
    text_layout: str = "vlpeft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.visual_prefix, bool):
            raise ValueError(
                f"Gpt2VitConfig.visual_prefix must be true or false, got {self.visual_prefix!r}"
            )
        for name, allowed in (("routing_feature", ROUTING_FEATURES), ("text_layout", TEXT_LAYOUTS)):
            value = getattr(self, name)
            check(value in allowed, f"Gpt2VitConfig.{name}", f"one of {list(allowed)}", value)

    @property
    def image_size(self) -> int:
        return self.vision.get("image_size", 224)


@register_family("gpt2-vit")
class Gpt2Vit(CachedViTFeatures, VLModel):
    config_class = Gpt2VitConfig
    capabilities = ("caption", "answer")
    components = {"vision": VIT_COMPONENT, "decoder": r"gpt2\.transformer\.h\.\d+"}
    module_kinds = {
        **VIT_KINDS,
        # GPT-2's q, k and v are the three equal parts of the fused c_attn (a LoRA adapts the
        # chosen parts only, see placement_changes); qkv is the whole of it
        "q": rf"(?:attn\.c_attn|{VIT_KINDS['q']})",
        "k": rf"(?:attn\.c_attn|{VIT_KINDS['k']})",
        "v": rf"(?:attn\.c_attn|{VIT_KINDS['v']})",
        "qkv": r"attn\.c_attn",
        "o": rf"(?:attn\.c_proj|{VIT_KINDS['o']})",
        "ffn_in": rf"(?:mlp\.c_fc|{VIT_KINDS['ffn_in']})",
        "ffn_out": rf"(?:mlp\.c_proj|{VIT_KINDS['ffn_out']})",
        "ffn": rf"(?:mlp\.c_fc|mlp\.c_proj|{VIT_KINDS['ffn']})",
        "mlp": r"mlp",  # the whole FFN block: a parallel adapter beside it (I-Tuning's place)
    }
    default_components = ("decoder",)
    default_kinds = {"lora": ("q", "v"), "adapter": ("o", "ffn_out")}  # LoRA on q, v (Sec. 2.1)
    trainable_patterns = ()  # the visual mapping when configured
    wrap_text = False

    def __init__(self, config: Gpt2VitConfig) -> None:
        super().__init__(config)
        from transformers import GPT2Config, GPT2LMHeadModel

        weights = config.weights if config.pretrained else {}
        self.vit = build_vit(config.vision, weights.get("vision"))
        self.vit.requires_grad_(False)
        text = dict(config.text)
        if config.tokenizer == "tiny" and not weights.get("text"):
            tok = self.tokenizer
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
            text = {"vocab_size": len(tok), **ids, **text}
        self.gpt2 = build_pretrained_or_random(
            GPT2LMHeadModel, GPT2Config, text, weights.get("text"), "GPT-2"
        )
        self.visual = VisualToken(
            self.vit, self.gpt2.config.n_embd, config.visual_mapping, config.visual_feature,
            self.family,
        )  # fmt: skip
        self.trainable_patterns = (r"^visual\.",) if config.visual_mapping else ()
        if config.routing_feature == "tokens":
            self.cached_part = None  # x_R needs every ViT token; a cache holds one per image

    @classmethod
    def default_kinds_for(cls, config) -> tuple[str, ...]:
        """LoRA: q and v (Sec. 2.1, as slices of c_attn); a LoRA-like method without slices
        (Null-LoRA, FLoRA): the whole c_attn; a parallel Adapter: beside the whole FFN."""
        kinds = super().default_kinds_for(config)
        if config.placement == "lora" and not config.supports_slices:
            return ("qkv",)
        if getattr(config, "parallel", False):
            return ("mlp",)
        return kinds

    def placement_changes(self, config, components, kinds) -> dict:
        """q/k/v kinds in the decoder adapt those parts of the fused ``c_attn`` only: LoRA
        ``slices`` (one rank-r LoRA per part); another method can only take the whole (``qkv``)."""
        parts = [i for i, kind in enumerate(("q", "k", "v")) if kind in kinds]
        if "decoder" not in components or "qkv" in kinds or not parts or parts == [0, 1, 2]:
            return {}
        if not config.supports_slices:
            raise ValueError(
                f"gpt2-vit: kinds {[k for k in kinds if k in 'qkv']} adapt parts of GPT-2's fused "
                f"c_attn, which only LoRA can (slices); use kind 'qkv' for {config.method}"
            )
        return {"slices": {**config.slices, "c_attn": {"parts": 3, "use": parts}}}

    def _ids(self, texts) -> list[list[int]]:
        return [
            self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts
        ]

    def _sequences(self, batch: dict[str, Any]):
        """Right-padded ``bos + prompt + caption + eos`` ids, mask and labels (caption + eos only)."""
        if self.config.text_layout == "reference":
            return self._reference_sequences(batch)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        prompts = self._ids(batch.get("text") or [""] * len(batch["targets"]))
        rows, labels = [], []
        for prompt, target in zip(prompts, self._ids(batch["targets"])):
            target = target[: self.config.max_text_length] + [eos]
            rows.append([bos, *prompt, *target])
            labels.append([IGNORE] * (1 + len(prompt)) + target)
        width = max(map(len, rows))
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
        )
        labels = torch.tensor(
            [lab + [IGNORE] * (width - len(lab)) for lab in labels], device=self.device
        )
        return ids, mask, labels

    def _reference_sequences(self, batch: dict[str, Any]):
        """The reference's ``prompt + caption`` ids (no bos) cut to and ``eos``-padded to
        ``max_text_length``, the mask of the text, labels: every id but ``REFERENCE_IGNORED_ID``
        (the forward drops the first position)."""
        eos, width = self.tokenizer.eos_token_id, self.config.max_text_length
        prompts = batch.get("text") or [""] * len(batch["targets"])
        texts = [(p or "") + t for p, t in zip(prompts, batch["targets"])]
        rows = [ids[:width] for ids in self._ids(texts)]
        ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device
        )
        return ids, mask, ids.masked_fill(ids == REFERENCE_IGNORED_ID, IGNORE)

    def text_positions(self, max_new_tokens: int, images: int = 1) -> list[tuple[str, int, int]]:
        # one sequence: visual prefix + bos + the task's prompt (a few words, not counted) +
        # the caption (cut to max_text_length) + eos, or the generated tokens
        limit, p = self.gpt2.config.n_positions, int(self.config.visual_prefix)
        if self.config.text_layout == "reference":
            return [
                ("prefix + prompt + caption + eos padding", p + self.config.max_text_length, limit),
                ("prefix + prompt + generation", p + max_new_tokens, limit),
            ]
        return [
            ("prefix + bos + caption + eos", p + 2 + self.config.max_text_length, limit),
            ("prefix + bos + generation", p + 1 + max_new_tokens, limit),
        ]

    def _visual(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the visual feature (B, d), x_R): x_R is that feature, or with ``routing_feature=
        "tokens"`` the ViT's last hidden state (B, T, d), both from one ViT forward."""
        if self.config.routing_feature == "prefix":
            prefix = self.visual_input(batch)
            return prefix, prefix
        if batch.get("features") is not None or "images" not in batch:
            raise KeyError(
                "gpt2-vit with routing_feature='tokens' needs batch['images']: x_R is every ViT "
                "token, which cached features (one vector per image) do not hold"
            )
        out = self.visual.vit_output(self.vit, batch["images"])
        feature, tokens = self.visual.token_of(out), out.last_hidden_state
        return self.visual.project(feature), self.visual.project(tokens)

    def _embed(self, batch: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor):
        """(x_R, input embeddings, attention mask): the visual token first unless
        ``visual_prefix`` is off."""
        prefix, x_r = self._visual(batch)
        embeds = self.gpt2.transformer.wte(ids)
        if not self.config.visual_prefix:
            return x_r, embeds, mask
        return (
            x_r,
            torch.cat([prefix[:, None].to(embeds.dtype), embeds], 1),
            F.pad(mask, (1, 0), value=1),
        )

    def forward(self, batch: dict[str, Any]) -> VLOutput:
        self.set_batch_adapters(batch)
        ids, mask, labels = self._sequences(batch)
        x_r, embeds, mask = self._embed(batch, ids, mask)
        set_routing_inputs(self.gpt2, x_r)
        set_token_masks(self.gpt2, mask)
        logits = self.gpt2(inputs_embeds=embeds, attention_mask=mask).logits
        # logit t predicts token t+1: a prefix position predicts bos (ignored), so align on ids
        # (the reference layout: the prefix's logit is dropped and the first text token is no target)
        p = int(self.config.visual_prefix)
        loss = lm_loss(logits[:, p:-1], labels[:, 1:], weights=batch.get("target_weights"))
        return VLOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        self.set_batch_adapters(batch)
        prompts = self._ids(
            batch.get("text")
            or [""]
            * len(batch["features"] if batch.get("features") is not None else batch["images"])
        )
        if len({tuple(p) for p in prompts}) > 1:
            raise ValueError("gpt2-vit generation: one prompt per batch")
        bos = [] if self.config.text_layout == "reference" else [self.tokenizer.bos_token_id]
        if not bos and not prompts[0] and not self.config.visual_prefix:
            raise ValueError(
                "gpt2-vit generation with text_layout='reference' and no visual prefix starts "
                "from the prompt: give the task a prompt (Qu et al.'s '<s>')"
            )
        start = torch.tensor(  # (B, 0) when generation starts from the prefix alone
            [[*bos, *prompts[0]]] * len(prompts), dtype=torch.long, device=self.device
        )
        x_r, embeds, mask = self._embed(batch, start, torch.ones_like(start))
        set_routing_inputs(self.gpt2, x_r)
        ids = self.gpt2.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        return self.decode(ids)
