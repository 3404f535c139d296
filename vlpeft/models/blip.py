"""BLIP (Li et al. 2022) through transformers' Blip* modules: retrieval, VQA and captioning.

One model holds the parts its ``heads`` need, named as in transformers: ``vision_model`` (ViT),
``text_encoder`` (BERT with cross-attention: ITC text features, ITM, VQA question encoder),
``text_decoder`` (BERT LM head: VQA answers, captions), and for retrieval ``vision_proj``,
``text_proj``, ``itm_head``. With ``heads=["retrieval"]`` it has exactly the parameters of
``BlipForImageTextRetrieval`` (BLIP-base: 223.7M).

What a batch asks is its ``kind``: ``"retrieval"`` (ITC + ITM loss with hard negatives, as in
BLIP), ``"vqa"`` (question → text encoder over the image; answer → decoder) or ``"caption"``
(``text`` is the prompt, e.g. ``"a picture of"``, ``targets`` the captions; the prompt is not
trained on). x_R for routed adapters is the image [CLS] state. ITC text features are computed
without the image (that is what makes retrieval over a gallery cheap), so routed adapters belong in
the decoder, or in the text encoder only for VQA/ITM. Token masks (ReSoRA): image tokens are all
real; a text component's layers take its text's padding mask, their cross-attention keys/values
the mask of what they read (image states: all real; the VQA question: its padding).

Pretrained weights: ``weights`` maps a head to a checkpoint (hub id or directory) of
``BlipForImageTextRetrieval`` / ``BlipForQuestionAnswering`` / ``BlipForConditionalGeneration``.
A model built for one head loads that head's checkpoint whole — the published model (build one
head per run to compare with a paper). With several heads each shared part comes from the first
listed head's checkpoint that has it, so e.g. captioning would run with the VQA checkpoint's
decoder: ``weight_sources`` says which part came from where (logged, and recorded in the run's
``run.json``). Whether a run starts from pre-trained or task-fine-tuned BLIP weights matters when
comparing with the papers (some anchors start from VQA-fine-tuned weights): the run records it. Original BLIP ``.pth``
checkpoints (``model_base.pth``, ``model_base_retrieval_coco.pth``, … as used by UniAdapter and
Aurora) convert with ``python -m launch.convert_blip CKPT OUT_DIR --head retrieval`` into a
directory the ``weights`` entry can name (:func:`convert_original_state_dict` does the renaming).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.resora import set_token_masks
from ..adapters.routing import routed_layers, set_routing_inputs
from .base import (
    ModelConfig,
    VLModel,
    VLOutput,
    lm_loss,
    missing_weights,
    pad_to_ignore,
    register_family,
)
from .clip_bart import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

HEADS = ("retrieval", "vqa", "caption")
PARTS = {
    "retrieval": ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head"),
    "vqa": ("vision_model", "text_encoder", "text_decoder"),
    "caption": ("vision_model", "text_decoder"),
}
CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
    "caption": "BlipForConditionalGeneration",
}

# original BLIP (salesforce/BLIP, timm-style ViT) → transformers names, applied in order
_VISION_RENAMES = (
    (r"^visual_encoder\.", "vision_model.encoder."),
    (r"^vision_model\.encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^vision_model\.encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^vision_model\.encoder\.norm\.", "vision_model.post_layernorm."),
    (r"\.blocks\.", ".layers."),
    (r"\.attn\.proj\.", ".self_attn.projection."),
    (r"\.attn\.", ".self_attn."),
    (r"\.norm([12])\.", r".layer_norm\1."),
)
CROSS_KV = r"crossattention\.self\.(?:key|value)$"  # text layers that read the other sequence
CAPABILITY = {"retrieval": "retrieval", "vqa": "answer", "caption": "caption"}
# training-only state of the original checkpoints: momentum encoders, queues, temperature
_DROPPED = re.compile(r"(_m\.|_m$|_queue$|^temp$|^idx_queue|^ptr_queue)")


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an original BLIP state dict to transformers' Blip* layout.

    Text encoder/decoder keys are already BERT-named and stay; momentum encoders, queues and the
    contrastive temperature (training state of the original code) are dropped.
    """
    out = {}
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        if key.startswith("visual_encoder."):
            for pattern, replacement in _VISION_RENAMES:
                key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def mask_cross_attention(text_model: nn.Module) -> None:
    """Makes the cross-attention of a transformers BLIP text model apply its encoder mask.

    transformers' ``BlipTextAttention.forward`` hands the encoder mask to its self-attention as
    ``attention_mask``, which for a cross-attention reads ``encoder_attention_mask`` instead — not
    passed, so None: padded positions of what the decoder reads (the VQA question) are attended to,
    and a question's answer depends on the other questions in its batch. Each cross-attention
    block of ``text_model`` gets a forward that passes the mask where it is read.
    """
    for name, block in text_model.named_modules():
        if name.endswith("crossattention"):
            block.forward = types.MethodType(_masked_cross_attention, block)


def _masked_cross_attention(
    self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_values=None,
    **kwargs,
):  # fmt: skip
    context, probs = self.self(
        hidden_states,
        attention_mask=attention_mask,
        encoder_hidden_states=encoder_hidden_states,
        encoder_attention_mask=attention_mask,
        past_key_values=past_key_values,
    )
    return self.output(context, hidden_states), probs


@dataclasses.dataclass
class BlipConfig(ModelConfig):
    """BLIP configuration (presets: ``presets/blip/*.json``).

    Args:
        blip: ``transformers.BlipConfig`` keyword arguments (``text_config``, ``vision_config``,
            ``image_text_hidden_size``).
        heads: which of ``retrieval``, ``vqa``, ``caption`` the model serves.
        itc_temperature: temperature of the image-text contrastive loss (BLIP: 0.07).
        label_smoothing: of the decoder's LM loss (BLIP's captioner uses 0.1).
        weights: head → checkpoint (hub id or directory).
    """

    blip: dict = dataclasses.field(default_factory=dict)
    heads: list = dataclasses.field(default_factory=lambda: list(HEADS))
    itc_temperature: float = 0.07
    label_smoothing: float = 0.0
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [h for h in self.heads if h not in HEADS]
        if unknown or not self.heads:
            raise ValueError(f"blip heads {self.heads!r}: choose one or more of {list(HEADS)}")

    @property
    def image_size(self) -> int:
        return self.blip.get("vision_config", {}).get("image_size", 384)


@register_family("blip")
class Blip(VLModel):
    config_class = BlipConfig
    capabilities = ("answer", "caption", "retrieval")
    components = {
        "vision": r"vision_model\.encoder\.layers\.\d+",
        "text_encoder": r"text_encoder\.encoder\.layer\.\d+",
        "text_decoder": r"text_decoder\.bert\.encoder\.layer\.\d+",
    }
    module_kinds = {
        "q": r"(?:attention|crossattention)\.self\.query",
        "k": r"(?:attention|crossattention)\.self\.key",
        "v": r"(?:attention|crossattention)\.self\.value",
        "qkv": r"self_attn\.qkv",
        "o": r"(?:(?:attention|crossattention)\.output\.dense|self_attn\.projection)",
        "ffn_in": r"(?:intermediate\.dense|mlp\.fc1)",
        "ffn_out": r"(?:output\.dense|mlp\.fc2)",
        "ffn": r"(?:intermediate\.dense|output\.dense|mlp\.fc[12])",
    }
    default_components = ("vision", "text_encoder", "text_decoder")
    default_kinds = {"lora": ("q", "v", "qkv"), "adapter": ("o", "ffn_out")}

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        import transformers

        blip = dict(config.blip)
        if config.tokenizer == "tiny":
            tok = self.tokenizer
            ids = {
                "vocab_size": len(tok),
                "pad_token_id": tok.pad_token_id,
                "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
                "sep_token_id": tok.sep_token_id,
                "eos_token_id": tok.sep_token_id,
            }
            blip["text_config"] = {**ids, **blip.get("text_config", {})}
        # transformers' BlipVisionConfig initialises with std 1e-10 (its weights are always
        # loaded): a random ViT would give every image the same features and no gradient
        blip["vision_config"] = {"initializer_range": 0.02, **blip.get("vision_config", {})}
        cfg = transformers.BlipConfig(**blip)
        self.text_config = cfg.text_config
        needed = {part for head in config.heads for part in PARTS[head]}
        self.part_sources: dict[str, str] = {}
        parts = self._pretrained_parts(needed) if config.pretrained else {}
        builders = {
            "vision_model": lambda: transformers.BlipVisionModel(cfg.vision_config),
            "text_encoder": lambda: transformers.BlipTextModel(
                cfg.text_config, add_pooling_layer=False
            ),
            "text_decoder": lambda: transformers.BlipTextLMHeadModel(cfg.text_config),
            "vision_proj": lambda: nn.Linear(
                cfg.vision_config.hidden_size, cfg.image_text_hidden_size
            ),
            "text_proj": lambda: nn.Linear(cfg.text_config.hidden_size, cfg.image_text_hidden_size),
            "itm_head": lambda: nn.Linear(cfg.text_config.hidden_size, 2),
        }
        for part in [p for p in builders if p in needed]:  # a fixed order: reproducible init
            setattr(self, part, parts[part] if part in parts else builders[part]())
        for part in ("text_encoder", "text_decoder"):
            if hasattr(self, part):
                mask_cross_attention(getattr(self, part))

    weight_keys = HEADS

    @classmethod
    def check_weights(cls, config) -> None:
        super().check_weights(config)
        unused = [h for h in config.weights if h not in config.heads]
        if config.pretrained and unused:
            log.info(
                "blip: weights for heads %s not built (heads: %s) are unused", unused, config.heads
            )

    @classmethod
    def capabilities_of(cls, config=None) -> tuple[str, ...]:
        """Those of the configured ``heads`` (all three by default)."""
        heads = (
            config.get("heads", HEADS)
            if isinstance(config, dict)
            else getattr(config, "heads", HEADS)
        )
        return tuple(CAPABILITY[h] for h in heads if h in CAPABILITY)

    def _pretrained_parts(self, needed: set[str]) -> dict[str, nn.Module]:
        import transformers

        parts: dict[str, nn.Module] = {}
        for head in self.config.heads:
            source = self.config.weights.get(head)
            if source is None:
                raise ValueError(
                    f"blip: pretrained=True but weights has no entry for head {head!r}"
                )
            try:
                loaded = getattr(transformers, CLASSES[head]).from_pretrained(source)
            except OSError as err:
                raise missing_weights(f"BLIP {head}", source, err) from err
            for part in PARTS[head]:
                if part not in parts:
                    parts[part] = getattr(loaded, part)
                    self.part_sources[part] = f"{source} ({CLASSES[head]})"
        if len(self.config.heads) > 1:
            log.info("blip: %s", ", ".join(f"{p} from {s}" for p, s in self.part_sources.items()))
        return parts

    @property
    def weight_sources(self) -> dict[str, str]:
        """Which checkpoint each pretrained part came from (a run records it)."""
        return dict(self.part_sources)

    # -- encoders -----------------------------------------------------------------------------
    def image_states(self, images: torch.Tensor) -> torch.Tensor:
        """ViT last hidden state (B, 1 + patches, d); [CLS] first."""
        dtype = next(self.vision_model.parameters()).dtype
        set_token_masks(self.vision_model, None)  # [CLS] and every patch are real
        return self.vision_model(pixel_values=images.to(self.device, dtype)).last_hidden_state

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised ITC image embeddings (B, e), image states for :meth:`match`)."""
        states = self.image_states(images)
        return F.normalize(self.vision_proj(states[:, 0]), dim=-1), states

    def encode_texts(self, texts) -> torch.Tensor:
        """Normalised ITC text embeddings (B, e); the image is not seen (unimodal text encoder)."""
        routed = routed_layers(self.text_encoder)
        if routed:
            raise ValueError(
                f"blip ITC text features see no image, but routed adapters are active in the text "
                f"encoder ({routed[0]}, …): they need x_R. Route only the text decoder, or use "
                "another adapter set for retrieval (vlpeft.set_active_adapter)"
            )
        text = self.tokenize(texts)
        set_token_masks(self.text_encoder, text["attention_mask"])
        hidden = self.text_encoder(**text).last_hidden_state
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def _set_context(
        self,
        part: nn.Module,
        image_states: torch.Tensor,
        text_mask: torch.Tensor,
        read_mask: torch.Tensor | None = None,
    ) -> None:
        """x_R (the image [CLS]) and token masks of a text part's layers for one call; their
        cross-attention keys/values read a sequence with mask ``read_mask`` (None: all real)."""
        set_routing_inputs(part, image_states[:, 0])
        set_token_masks(
            part, {"": text_mask, **dict.fromkeys(self.paths(CROSS_KV, part), read_mask)}
        )

    def _encode_text_over(
        self, image_states: torch.Tensor, texts
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder over ``texts`` cross-attending to the images: (hidden, text mask)."""
        text = self.tokenize(texts)
        self._set_context(self.text_encoder, image_states, text["attention_mask"])
        mask = image_states.new_ones(image_states.shape[:2], dtype=torch.long)
        hidden = self.text_encoder(
            **text, encoder_hidden_states=image_states, encoder_attention_mask=mask
        ).last_hidden_state
        return hidden, text["attention_mask"]

    def match(self, image_states: torch.Tensor, texts) -> torch.Tensor:
        """ITM logits (B, 2) of pairs (image_states[i], texts[i]); column 1 = "match"."""
        return self.itm_head(self._encode_text_over(image_states, texts)[0][:, 0])

    def _decoder_context(self, batch: dict[str, Any], states: torch.Tensor):
        """What the decoder cross-attends to: image states (caption) or the question (VQA)."""
        if self._kind(batch) == "caption":
            return states, states.new_ones(states.shape[:2], dtype=torch.long)
        return self._encode_text_over(states, batch["text"])

    def _kind(self, batch: dict[str, Any]) -> str:
        kind = batch.get("kind") or self.config.heads[0]
        if kind not in self.config.heads:
            raise ValueError(
                f"blip: batch kind {kind!r} needs head {kind!r}; heads: {self.config.heads}"
            )
        return kind

    def _decoder_inputs(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """[DEC] + (caption prompt) + target + [SEP]; labels ignore [DEC], the prompt and padding."""
        caption = self._kind(batch) == "caption"
        prompts = batch["text"] if caption else [""] * len(batch["targets"])
        texts = [f"{p} {t}".strip() for p, t in zip(prompts, batch["targets"])]
        tokens = self.tokenize(texts)
        ids = tokens["input_ids"].clone()
        ids[:, 0] = self.text_config.bos_token_id
        labels = pad_to_ignore(ids, tokens["attention_mask"])
        labels[:, 0] = -100
        for i, prompt in enumerate(prompts):
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
            labels[i, 1 : 1 + n] = -100
        return {"input_ids": ids, "attention_mask": tokens["attention_mask"]}, labels

    def _decoder_read_mask(self, batch: dict[str, Any], context_mask: torch.Tensor):
        return None if self._kind(batch) == "caption" else context_mask

    # -- the task interface -------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> VLOutput:
        if self._kind(batch) == "retrieval":
            if batch.get("adapter_names") is not None:  # its ITM pairs rows with other rows
                raise ValueError("blip: a retrieval batch takes one adapter set, not adapter_names")
            self.set_batch_adapters(batch)
            return VLOutput(loss=self.retrieval_loss(batch))
        self.set_batch_adapters(batch)
        states = self.image_states(batch["images"])
        context, context_mask = self._decoder_context(batch, states)
        inputs, labels = self._decoder_inputs(batch)
        read = self._decoder_read_mask(batch, context_mask)
        self._set_context(self.text_decoder, states, inputs["attention_mask"], read)
        logits = self.text_decoder(
            **inputs, encoder_hidden_states=context, encoder_attention_mask=context_mask
        ).logits
        loss = lm_loss(logits[:, :-1], labels[:, 1:], self.config.label_smoothing,
                       batch.get("target_weights"))  # fmt: skip
        return VLOutput(loss=loss, logits=logits)

    def retrieval_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """ITC (positives = same ``image_ids``) + ITM on positives and similarity-sampled hard
        negatives, as BLIP trains retrieval."""
        image_feat, states = self.encode_images(batch["images"])
        text_feat = self.encode_texts(batch["text"])
        n = image_feat.shape[0]
        ids = batch.get("image_ids")
        ids = (
            torch.as_tensor(ids, device=self.device)
            if ids is not None
            else torch.arange(n, device=self.device)
        )
        positive = ids[:, None] == ids[None, :]
        sim = image_feat @ text_feat.T / self.config.itc_temperature
        if not torch.isfinite(sim).all():  # hard-negative sampling below cannot take them
            raise FloatingPointError(
                "blip retrieval: non-finite image-text similarities (a diverged model?)"
            )
        target = positive.float() / positive.sum(1, keepdim=True)
        itc = (
            -(
                (F.log_softmax(sim, 1) * target).sum(1).mean()
                + (F.log_softmax(sim.T, 1) * target.T).sum(1).mean()
            )
            / 2
        )
        has_negative = (~positive).any(1)
        if not has_negative.any():
            return itc
        with torch.no_grad():  # hard negatives: sampled in proportion to similarity
            w_i2t = F.softmax(sim.float(), 1).masked_fill(positive, 0)[has_negative]
            w_t2i = F.softmax(sim.T.float(), 1).masked_fill(positive, 0)[has_negative]
            neg_text = torch.multinomial(w_i2t + 1e-12 * (~positive[has_negative]), 1).squeeze(1)
            neg_image = torch.multinomial(w_t2i + 1e-12 * (~positive[has_negative]), 1).squeeze(1)
        texts = list(batch["text"])
        keep = has_negative.nonzero().squeeze(1).tolist()
        pair_states = torch.cat([states, states[keep], states[neg_image]])
        pair_texts = texts + [texts[j] for j in neg_text.tolist()] + [texts[i] for i in keep]
        labels = torch.cat([torch.ones(n), torch.zeros(2 * len(keep))]).long().to(self.device)
        itm = F.cross_entropy(self.match(pair_states, pair_texts).float(), labels)
        return itc + itm

    def text_positions(self, max_new_tokens: int, images: int = 1) -> list[tuple[str, int, int]]:
        # the text encoder and decoder share one text config; the decoder adds [DEC]/[SEP]
        limit = self.text_config.max_position_embeddings
        text = self.config.max_text_length
        return [
            ("text", text, limit),
            ("decoder: [DEC] + text + [SEP]", text + 2, limit),
            ("decoder: [DEC] + generation", 1 + max_new_tokens, limit),  # + the prompt
        ]

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        kind = self._kind(batch)
        if kind == "retrieval":
            raise ValueError(
                "blip: retrieval batches are scored with encode_images/encode_texts/match"
            )
        self.set_batch_adapters(batch)
        states = self.image_states(batch["images"])
        context, context_mask = self._decoder_context(batch, states)
        n = states.shape[0]
        prompt = []
        if kind == "caption":
            prompts = set(batch["text"])
            if len(prompts) > 1:
                raise ValueError(f"blip captioning: one prompt per batch, got {sorted(prompts)}")
            prompt = self.tokenizer(prompts.pop(), add_special_tokens=False)["input_ids"]
        start = torch.tensor([[self.text_config.bos_token_id, *prompt]] * n, device=self.device)
        set_routing_inputs(self.text_decoder, states[:, 0])
        ids = self.text_decoder.generate(
            input_ids=start,
            encoder_hidden_states=context,
            encoder_attention_mask=context_mask,
            eos_token_id=self.text_config.sep_token_id,
            pad_token_id=self.text_config.pad_token_id,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
        )
        return self.decode(ids[:, start.shape[1] :])
