"""CLIP-BART (VL-Adapter, Sung et al. 2022; routing: Qu et al. 2024): every task as text generation.

Vision: an open_clip ModifiedResNet (RN101 for the papers), frozen and kept in eval mode; its layer4
grid (B, 2048, 7, 7 at 224 px) is max-pooled to ``visual_grid``² tokens. These pooled grid features
are what the VL-Adapter feature cache stores: pass them as ``batch["features"]`` instead of
``batch["images"]`` and the numbers are the same. A trainable Linear + LayerNorm maps them to BART's
width and an image-order embedding (0 = first/left image, 1 = second/right) is added.

Encoder input: ``[task prompt + text tokens (with BART's positions)] + [visual tokens]``; visual
tokens carry no text position (VL-T5 convention; the stock encoder's positions are cancelled for
them). NLVR² gives two images: 2 × grid² tokens with order ids 0 and 1, and its prediction compares
the ``"true"``/``"false"`` logits at the first decoding step (:meth:`score_choices`).

x_R for routed adapters: encoder layers get the mean of the visual tokens; decoder layers the mean
of the last encoder hidden state (over non-padding positions), set as soon as the encoder output
exists. Token masks (ReSoRA): the encoder's text + visual mask in the encoder and in the decoder's
cross-attention keys/values; the target mask in the rest of the decoder.
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
from .base import (
    ModelConfig,
    VLModel,
    VLOutput,
    lm_loss,
    masked_mean,
    missing_weights,
    pad_to_ignore,
    register_family,
)

ENCODER = "bart.model.encoder"
DECODER = "bart.model.decoder"
CROSS_KV = r"encoder_attn\.(?:k_proj|v_proj)$"  # decoder layers that read the encoder's sequence
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_EMBEDDINGS = ("vlpeft", "vl_t5")
# VL-T5's object-order embeddings are rows its tokenizer adds to the (frozen) token embedding,
# randomly initialised: not saved with an adapter, so drawn from this fixed seed
OBJECT_ORDER_SEED = 0


@dataclasses.dataclass
class ClipBartConfig(ModelConfig):
    """CLIP-BART configuration (presets: ``presets/clip-bart/*.json``).

    Args:
        vision: ``{"model": "RN101"}`` (an open_clip config name) or ModifiedResNet keyword
            arguments (``layers``, ``width``, ``heads``, ``output_dim``, ``image_size``).
        text: ``transformers.BartConfig`` keyword arguments.
        visual_grid: the layer4 grid is max-pooled to ``visual_grid × visual_grid`` tokens.
        image_size: input resolution; images are normalised with CLIP's mean and std.
        weights: ``{"vision": open_clip tag or checkpoint path, "text": hub id or directory}``.
        visual_embedding: ``"vlpeft"`` (default): the visual tokens (Linear + LayerNorm +
            image-order embedding) go through BART's ``layernorm_embedding`` with the text;
            ``"vl_t5"``: VL-T5's ``VisualEmbedding`` as VL-Adapter runs it — the LayerNorm'd
            projection + the embedding of the zero box (Linear(5 → d) + LayerNorm, trained) +
            image-order + object-order embeddings (the ``<vis_extra_id_k>`` rows VL-T5 adds to
            the frozen token embedding: N(0, init_std) drawn from :data:`OBJECT_ORDER_SEED`),
            outside ``layernorm_embedding`` (``JointEncoder.forward``).
    """

    vision: dict = dataclasses.field(default_factory=dict)
    text: dict = dataclasses.field(default_factory=dict)
    visual_grid: int = 6
    image_size: int = 224
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    visual_embedding: str = "vlpeft"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.visual_embedding in VISUAL_EMBEDDINGS, "clip-bart visual_embedding",
              f"one of {list(VISUAL_EMBEDDINGS)}", self.visual_embedding)  # fmt: skip


# where the Hugging Face hub keeps open_clip's pretrained ResNets (model, tag) → hub id
OPEN_CLIP_HUB = {
    ("RN50", "openai"): "timm/resnet50_clip.openai",
    ("RN101", "openai"): "timm/resnet101_clip.openai",
    ("RN50x4", "openai"): "timm/resnet50x4_clip.openai",
}


def build_resnet(vision: dict, weights: str | None):
    """The open_clip ModifiedResNet of ``vision``; with ``weights``, loaded through open_clip."""
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet

    if "model" in vision:
        name = vision["model"]
        if weights:
            try:
                return open_clip.create_model(name, pretrained=weights).visual
            except (RuntimeError, OSError, ValueError) as err:
                hub = OPEN_CLIP_HUB.get((name, weights))
                raise missing_weights(f"open_clip {name}", weights, err, hub) from err
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None or not isinstance(model_cfg["vision_cfg"].get("layers"), list):
            raise ValueError(f"clip-bart vision.model {name!r} is not an open_clip ResNet config")
        cfg = model_cfg["vision_cfg"]
        return init_random_resnet(
            ModifiedResNet(
                layers=cfg["layers"],
                output_dim=model_cfg["embed_dim"],
                heads=cfg["width"] * 32 // cfg.get("head_width", 64),
                image_size=cfg["image_size"],
                width=cfg["width"],
            )
        )
    if weights:
        raise ValueError(
            f"clip-bart: weights.vision {weights!r} is set, but vision is given as ModifiedResNet "
            "arguments, which load no weights: name an open_clip model (vision: {model: RN101}) "
            "to load them, or drop weights.vision"
        )
    return init_random_resnet(ModifiedResNet(**vision))


def init_random_resnet(resnet: nn.Module) -> nn.Module:
    """torchvision's ResNet initialisation (Kaiming-normal convolutions, BatchNorm 1 / 0) for a
    randomly initialised ModifiedResNet. open_clip's own zero-initialises each block's last
    BatchNorm and leaves the convolutions at PyTorch's default, which in eval mode shrinks the
    signal to ~1e-4 by layer4: every image would give nearly the same frozen features."""
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return resnet


def text_ids_from_tokenizer(tokenizer) -> dict[str, int]:
    """Vocabulary size and special ids for a randomly initialised text model of ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def encoder_output(hidden: torch.Tensor):
    """transformers' encoder-output wrapper of a last hidden state (what BART's decoder takes)."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=hidden)


@register_family("clip-bart")
class ClipBart(VLModel):
    config_class = ClipBartConfig
    capabilities = ("answer", "caption", "choices")
    components = {
        "vision": r"visual\..*",
        "encoder": rf"{ENCODER}\.layers\.\d+",
        "decoder": rf"{DECODER}\.layers\.\d+",
    }
    module_kinds = {
        "q": r"(?:self_attn|encoder_attn)\.q_proj",
        "k": r"(?:self_attn|encoder_attn)\.k_proj",
        "v": r"(?:self_attn|encoder_attn)\.v_proj",
        "o": r"(?:self_attn|encoder_attn)\.out_proj",
        "ffn_in": "fc1",
        "ffn_out": "fc2",
        "ffn": "fc[12]",
        "conv": r"(?:conv[123]|downsample\.0)",
    }
    default_components = ("encoder", "decoder")
    # Qu et al. Sec. 5.1, Fig. 6: adapters in encoder and decoder (VL-Adapter), routing with the
    # pooled last encoder state in the decoder; route_components [encoder, decoder] (launcher) /
    # routed_components (adapter_config) also
    # routes the encoder's on the projected visual features
    default_routed_components = ("decoder",)
    trainable_patterns = (r"^visual_proj\.", r"^image_order\.")
    cached_part = "visual"  # frozen: its visual_features can be cached (launch.features)

    def __init__(self, config: ClipBartConfig) -> None:
        super().__init__(config)
        from transformers import BartConfig, BartForConditionalGeneration  # heavy: lazy

        self.visual = build_resnet(
            config.vision, config.weights.get("vision") if config.pretrained else None
        )
        self.visual.requires_grad_(False).eval()
        text_source = config.weights.get("text") if config.pretrained else None
        if text_source:
            try:
                self.bart = BartForConditionalGeneration.from_pretrained(text_source)
            except OSError as err:
                raise missing_weights("BART", text_source, err) from err
        else:
            text = dict(config.text)
            if config.tokenizer == "tiny":
                text = {**text_ids_from_tokenizer(self.tokenizer), **text}
                text.setdefault("decoder_start_token_id", text["eos_token_id"])
            self.bart = BartForConditionalGeneration(BartConfig(**text))
        d_model = self.bart.config.d_model
        self.visual_proj = nn.Sequential(
            nn.Linear(self.feature_dim, d_model), nn.LayerNorm(d_model)
        )
        self.image_order = nn.Embedding(2, d_model)
        self._visual_count = 0  # trailing visual tokens of the encoder input being embedded
        if config.visual_embedding == "vl_t5":
            self.box_embedding = nn.Sequential(nn.Linear(5, d_model), nn.LayerNorm(d_model))
            self.trainable_patterns = (*self.trainable_patterns, r"^box_embedding\.")
            order = torch.empty(config.visual_grid**2, d_model)
            seeded = torch.Generator().manual_seed(OBJECT_ORDER_SEED)
            order.normal_(0.0, self.bart.config.init_std, generator=seeded)
            self.register_buffer("object_order", order, persistent=False)
            self.bart.model.encoder.layernorm_embedding.register_forward_hook(self._text_only)

    def _text_only(self, module, args, output):
        """``layernorm_embedding`` on the text tokens only (VL-T5 concatenates the visual
        embeddings after it): the trailing visual tokens keep their input."""
        n = self._visual_count
        return torch.cat([output[:, :-n], args[0][:, -n:]], dim=1) if n else output

    @property
    def feature_dim(self) -> int:
        """Channels of the layer4 grid (2048 for RN101)."""
        return self.visual.layer4[-1].conv3.out_channels

    def train(self, mode: bool = True) -> ClipBart:
        super().train(mode)
        self.visual.eval()  # frozen, and its BatchNorm fails on a batch of one in train mode
        return self

    # -- vision -----------------------------------------------------------------------------------
    @torch.no_grad()
    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled layer4 grid features: (B, [2,] grid², C) — the cacheable part of the model."""
        lead = images.shape[:-3]
        x = images.flatten(0, len(lead) - 1)
        out = self.visual.forward_intermediates(x, indices=[4], intermediates_only=True)
        grid = out["image_intermediates"][0]
        grid = F.adaptive_max_pool2d(grid, self.config.visual_grid)
        tokens = grid.flatten(2).transpose(1, 2)
        return tokens.reshape(*lead, *tokens.shape[1:]).float()

    def visual_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Projected visual tokens with image-order embeddings: (B, n_images · grid², d)."""
        features = batch.get("features")
        if features is None:
            if "images" not in batch:
                raise KeyError("clip-bart batch needs 'images' or cached 'features'")
            features = self.visual_features(batch["images"].to(self.device))
        features = features.to(self.device)
        if features.dim() == 3:
            features = features.unsqueeze(1)
        dtype = self.visual_proj[0].weight.dtype
        tokens = self.visual_proj(features.to(dtype))  # (B, n_images, N, d)
        order = torch.arange(tokens.shape[1], device=self.device)
        tokens = tokens + self.image_order(order)[None, :, None, :]
        if self.config.visual_embedding == "vl_t5":  # + the zero box's and each token's order
            box = self.box_embedding(tokens.new_zeros(5))
            tokens = tokens + box + self.object_order[: tokens.shape[2]].to(tokens.dtype)
        return tokens.flatten(1, 2)

    def text_positions(self, max_new_tokens: int, images: int = 1) -> list[tuple[str, int, int]]:
        # the encoder's position table covers text and visual tokens (the visual ones' positions
        # are subtracted again); the decoder starts from one token
        limit = self.bart.config.max_position_embeddings
        visual = images * self.config.visual_grid**2
        return [
            ("encoder: text + visual tokens", self.config.max_text_length + visual, limit),
            ("decoder: generation", max_new_tokens + 1, limit),
            ("decoder: training targets", self.config.max_text_length, limit),
        ]

    # -- encoder ----------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder last hidden state and attention mask of text + visual tokens."""
        text = self.tokenize(batch["text"])
        visual = self.visual_tokens(batch)
        encoder = self.bart.model.encoder
        text_embeds = encoder.embed_tokens(text["input_ids"])
        n_text = text_embeds.shape[1]
        embeds = torch.cat([text_embeds, visual.to(text_embeds.dtype)], dim=1)
        # the stock encoder adds learned positions to every input; visual tokens take none
        positions = encoder.embed_positions(embeds[:, :, -1]).to(embeds.dtype)
        embeds = embeds - F.pad(positions[..., n_text:, :], (0, 0, n_text, 0))
        mask = torch.cat(
            [text["attention_mask"], text["attention_mask"].new_ones(visual.shape[:2])], 1
        )
        set_routing_inputs(encoder, visual.mean(1))
        set_token_masks(encoder, mask)
        self._visual_count = visual.shape[1] if self.config.visual_embedding == "vl_t5" else 0
        try:
            hidden = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        finally:
            self._visual_count = 0
        return hidden, mask

    def _set_decoder_context(
        self, hidden: torch.Tensor, mask: torch.Tensor, target_mask: torch.Tensor | None = None
    ) -> None:
        """x_R (the mean encoder state) and token masks of the decoder's layers."""
        decoder = self.bart.model.decoder
        set_routing_inputs(decoder, masked_mean(hidden, mask))
        cross = dict.fromkeys(self.paths(CROSS_KV, decoder), mask)
        set_token_masks(decoder, {"": target_mask, **cross})

    # -- the task interface -----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> VLOutput:
        from transformers.models.bart.modeling_bart import shift_tokens_right

        self.set_batch_adapters(batch)
        hidden, mask = self.encode(batch)
        target = self.tokenize(batch["targets"])
        labels = pad_to_ignore(target["input_ids"], target["attention_mask"])
        cfg = self.bart.config
        starts = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        self._set_decoder_context(hidden, mask, target["attention_mask"])
        logits = self.bart(
            encoder_outputs=encoder_output(hidden),
            attention_mask=mask,
            decoder_input_ids=starts,
        ).logits
        loss = lm_loss(logits, labels, weights=batch.get("target_weights"))
        return VLOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        self.set_batch_adapters(batch)
        hidden, mask = self.encode(batch)
        self._set_decoder_context(hidden, mask)
        ids = self.bart.generate(
            encoder_outputs=encoder_output(hidden),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
        )
        return self.decode(ids)

    def score_choices(self, batch: dict[str, Any], choices) -> torch.Tensor:
        """Logits of the single-token ``choices`` at the first answer position: (B, len(choices))."""
        ids = self.choice_ids(choices)
        self.set_batch_adapters(batch)
        hidden, mask = self.encode(batch)
        start = self.bart.config.decoder_start_token_id
        lead = [start, *self._leading_specials()]
        decoder_ids = torch.tensor([lead] * hidden.shape[0], device=self.device)
        self._set_decoder_context(hidden, mask, torch.ones_like(decoder_ids))
        logits = self.bart(
            encoder_outputs=encoder_output(hidden),
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
        ).logits
        return logits[:, -1, ids]

    def _leading_specials(self) -> list[int]:
        """Special tokens the tokenizer puts before a target's first word (BART's ``<s>``)."""
        ids = self.tokenizer("x")["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        lead = []
        for i in ids:
            if i not in special:
                break
            lead.append(i)
        return lead
