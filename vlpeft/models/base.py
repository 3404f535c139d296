"""The VL-model protocol every backbone family implements, its config base and the family registry.

One interface serves every task, whatever the family (the task router only ever calls these):

- ``model(batch) -> VLOutput``: the forward of one batch, with ``.loss`` (so DDP, FSDP or a
  DeepSpeed engine can wrap the model); ``model.loss(batch)`` is a shortcut for ``model(batch).loss``.
- ``model.generate(batch, max_new_tokens=20, num_beams=1) -> list[str]``: one text per example
  (answers, captions; a classifier family returns its top answer).
- ``model.score_choices(batch, choices) -> Tensor (B, len(choices))``: logits of fixed single-token
  answers at the first decoding step (NLVR² compares ``"true"``/``"false"`` this way).
- retrieval (families that list ``"retrieval"`` in ``capabilities``): ``encode_images(images)`` →
  (normalised embeddings, image states), ``encode_texts(texts)`` → normalised embeddings, and
  ``match(image_states, texts)`` → ITM logits of each (image, text) pair.

A batch is a dict: the batch contract between the tasks and the families. Every task's collate
function (``tasks/*.py``) writes ``kind``, ``images`` (or ``features``), ``text`` and ``ids``, and
the keys of its kind; a family reads what its capabilities need and ignores the rest:

===================  ==========================================================================
``kind``             what the batch asks: ``"vqa"`` (VQAv2, GQA), ``"caption"``, ``"nlvr"``,
                     ``"retrieval"``. BLIP picks its head by it (absent: its first head); the
                     other families serve one kind per task and do not read it
``images``           float (B, 3, H, W), or (B, 2, 3, H, W) for two-image tasks (NLVR²)
``features``         instead of ``images``: cached visual features (CLIP-BART's grid; the ViT
                     families' [CLS]/pooler feature; ``tasks.features``); the task's data loader
                     renames ``images`` to it when it reads a feature cache
``text``             list of B input texts, task prompt already applied (captioning: the prompt,
                     e.g. ``"a picture of"``, or ``""``)
``targets``          list of B target texts (generation losses; ``""`` for a record without one:
                     test splits); VQA, GQA, NLVR², captioning
``target_weights``   optional: list of B floats, each example's loss weight (a VQA training batch
                     with ``options.target: sampled``); the generation losses (CLIP-BART, BLIP,
                     GPT2-ViT) multiply each example's token mean by it
``answer_scores``    list of B ``{answer: soft score}`` (classification losses: RoBERTa-ViT);
                     VQA and GQA (``{}`` for a record without answers)
``image_ids``        list of B image ids; equal ids are positives of each other (retrieval only;
                     absent: every example its own image)
``ids``              list of B record ids (question, sentence or image ids). No family reads
                     them: the launcher counts a batch's examples by them (accumulation weights,
                     the step clock's throughput)
``adapter_names``    optional: list of B adapter set names, one per row (a mixed-task batch,
                     peft's ``adapter_names=``; ``"__base__"``: no adapter); absent: the active
                     adapters for every row
``routings``         optional, with ``adapter_names``: list of B routing functions (a task's
                     ``routing``; None: the set's configured one)
===================  ==========================================================================

Adapter placement: each family names its ``components`` (module-path regexes of vision encoder,
text encoder, decoder) and ``module_kinds`` (q, k, v, o, ffn_in, ffn_out, …);
:meth:`VLModel.adapter_config` fills a method config's ``targets`` from them and adds the family's
declared-trainable parameters (visual projection, heads).

The forward context: in each forward a family sets, on its own layers, x_R of the routed adapters
(:func:`vlpeft.set_routing_inputs`, per component; the decoder's as soon as the encoder output
exists) and the padding mask of each component's sequence (:func:`vlpeft.set_token_masks`, for
ReSoRA). Both stay until the next forward, so the backward — gradient-checkpointing recomputes
included — sees what the forward saw (a forward in between, such as a ``generate``, makes the
recompute an error rather than a wrong gradient); nothing is process-global.

What a family can serve is ``capabilities`` (read when a training config loads: a task needs one
of them, see ``tasks``): ``answer`` (short answers: VQA, GQA), ``caption``, ``choices`` (fixed
one-token answers, NLVR²), ``retrieval``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import MethodConfig, adapted_layers
from ..adapters.routing import set_row_adapters
from ..config import Config, check_finite, deep_merge
from ..registry import Registry, nearest_hint
from .tokenizer import PRESETS, load_tokenizer

log = logging.getLogger(__name__)
FAMILIES: Registry = Registry("model family", attribute="family")
register_family = FAMILIES.register
list_families = FAMILIES.names
get_family = FAMILIES.get
IGNORE = -100


def list_presets(family: str) -> list[str]:
    """Preset names shipped for ``family`` (``presets/<family>/<preset>.json``)."""
    return sorted(p.stem for p in (PRESETS / family).glob("*.json"))


def load_preset(family: str, preset: str | Path) -> dict[str, Any]:
    """The preset's JSON as a dict: a shipped name (``tiny``, ``base``) or a path to a JSON file."""
    path = Path(preset)
    if path.suffix != ".json":
        path = PRESETS / family / f"{preset}.json"
        if not path.exists():
            raise ValueError(
                f"unknown preset {preset!r} for family {family!r}; shipped: {list_presets(family)} "
                "(or pass the path of a preset JSON file)"
            )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def preset_config(family: str, preset: str | Path = "tiny", **overrides: Any) -> ModelConfig:
    """The config :func:`build_model` would build from (no weights are touched): a preset plus
    overrides, validated. What a family can serve depends on it (``capabilities_of``)."""
    data = deep_merge(load_preset(family, preset), overrides)
    return get_family(family).config_class.from_dict(data, where=f"{family} preset {str(preset)!r}")


def build_model(family: str, preset: str | Path = "tiny", **overrides: Any) -> VLModel:
    """Builds a VL model of a registered family from a preset plus overrides.

    Args:
        family: ``"clip-bart"``, ``"blip"``, ``"roberta-vit"`` or ``"gpt2-vit"``.
        preset: ``"tiny"`` (random, built in well under a second; tests and the demo), ``"base"``
            (the papers' sizes), or the path of a preset JSON file.
        **overrides: config fields; dict-valued fields merge into the preset's dict
            (``text={"num_hidden_layers": 4}`` changes one key). Unknown names are errors naming
            the nearest valid field.

    Example:
        >>> model = build_model("gpt2-vit", "tiny")
        >>> model.loss({"images": torch.randn(2, 3, 32, 32), "text": ["", ""],
        ...             "targets": ["a red circle", "two squares"]}).shape
        torch.Size([])
    """
    cls = get_family(family)
    config = preset_config(family, preset, **overrides)
    cls.check_weights(config)
    with torch.random.fork_rng(devices=[]):  # random weights are a function of the seed alone
        torch.manual_seed(config.seed)
        return cls(config)


@dataclasses.dataclass
class ModelConfig(Config):
    """Fields every family config shares.

    Args:
        tokenizer: ``"tiny"`` (shipped) or a local directory / hub id.
        pretrained: load the weights named in ``weights``; ``False`` keeps the random init.
        weights: component → weight source (local path, hub id or open_clip tag).
        max_text_length: texts are truncated to this many tokens.
        seed: seeds the random initialisation (same preset + seed = same weights), without
            touching the caller's RNG state.
    """

    tokenizer: str = "tiny"
    pretrained: bool = False
    weights: dict[str, str] = dataclasses.field(default_factory=dict)
    max_text_length: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite(self)  # a NaN/inf (YAML's .nan) anywhere, nested dicts and tuples included


def missing_weights(
    what: str, source: str, err: Exception, hub_id: str | None = None
) -> FileNotFoundError:
    """The error for absent pretrained weights: which, where they were looked for, and the one
    command that fetches them (``hub_id``: where the hub keeps them, when it is not ``source``,
    e.g. open_clip's ``RN101``/``openai`` is ``timm/resnet101_clip.openai``)."""
    return FileNotFoundError(
        f"{what} weights {source!r} could not be loaded ({type(err).__name__}: {err}). They were "
        f"looked for as a local path named {source!r} and in the Hugging Face / open_clip caches "
        "(downloads are off when HF_HUB_OFFLINE=1). Fetch them once with "
        f"`hf download {hub_id or source}`, point weights.<component> at a local copy, or build "
        "with pretrained=False for random weights (README: Weights)."
    )


@dataclasses.dataclass
class VLOutput:
    """What a VL model's forward returns: the training loss of the batch (and, where a family has
    them, its logits)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None


class VLModel(nn.Module):
    """Base class of the families: tokenisation, adapter placement, the shared losses.

    Subclasses set the class attributes below and implement ``forward`` and ``generate``.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    capabilities: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[dict[str, str]] = {}
    module_kinds: ClassVar[dict[str, str]] = {}
    default_components: ClassVar[tuple[str, ...]] = ()
    default_kinds: ClassVar[dict[str, tuple[str, ...]]] = {
        "lora": ("q", "v"),
        "adapter": ("o", "ffn_out"),
    }
    vision_components: ClassVar[tuple[str, ...]] = ("vision",)
    default_routed_components: ClassVar[tuple[str, ...]] = ()  # () = every adapted component
    classifies_answers: ClassVar[bool] = False  # needs an answer vocabulary (config ``answers``)
    trainable_patterns: ClassVar[tuple[str, ...]] = ()
    wrap_text: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self._tokenizer = None

    # -- text ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer, self.wrap_text)
        return self._tokenizer

    weight_keys: ClassVar[tuple[str, ...]] = ("vision", "text")

    @classmethod
    def check_weights(cls, config: ModelConfig) -> None:
        """With ``pretrained: true`` a weight source for a component the family does not have is
        an error (it would load nothing); with ``pretrained: false`` the sources are unused by
        design, said once in the log."""
        if not config.weights:
            return
        if not config.pretrained:
            log.info(
                "%s: pretrained is false: weights %s are not loaded", cls.family, config.weights
            )
            return
        unknown = [k for k in config.weights if k not in cls.weight_keys]
        if unknown:
            raise ValueError(
                f"{cls.family}: weights.{unknown[0]}{nearest_hint(unknown[0], cls.weight_keys)} "
                f"names no component; valid: {list(cls.weight_keys)}"
            )

    @property
    def weight_sources(self) -> dict[str, str]:
        """Component → the pretrained weights it was loaded from (empty for random weights)."""
        return dict(self.config.weights) if self.config.pretrained else {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded ids and attention mask on the model's device."""
        out = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_text_length,
            return_tensors="pt",
        )
        mask = out["attention_mask"].to(self.device)
        return {"input_ids": out["input_ids"].to(self.device), "attention_mask": mask}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # -- adapter placement ---------------------------------------------------------------------
    @classmethod
    def default_kinds_for(cls, config: MethodConfig) -> tuple[str, ...]:
        """The module kinds a method takes when none are named (``default_kinds[placement]``)."""
        return cls.default_kinds[config.placement]

    @classmethod
    def routed_components_of(
        cls, components: Sequence[str], routed: Sequence[str] | None = None
    ) -> list[str]:
        """The components whose adapters route: ``routed`` when given, else the family's
        ``default_routed_components`` among ``components`` (all of them when it names none)."""
        if routed is not None:
            return list(routed)
        return [c for c in cls.default_routed_components if c in components] or list(components)

    @classmethod
    def check_placement(
        cls,
        components: Sequence[str],
        kinds: Sequence[str],
        routed: bool = False,
        routed_components: Sequence[str] | None = None,
    ) -> None:
        """Refuses unknown components or module kinds (naming the nearest) and routed adapters in
        a vision component (x_R comes from the vision encoder's output). A classmethod, so a
        training config is checked when it loads, before any model is built."""
        unknown = [c for c in routed_components or () if c not in components]
        if routed and unknown:
            raise ValueError(
                f"{cls.family}: routed components {unknown} are not among the adapted components "
                f"{list(components)}"
            )
        for what, chosen, valid in (
            ("component", components, cls.components),
            ("module kind", kinds, cls.module_kinds),
        ):
            for name in chosen:
                if name not in valid:
                    raise ValueError(
                        f"{cls.family}: unknown {what} {name!r}{nearest_hint(name, valid)}; "
                        f"valid: {sorted(valid)}"
                    )
        chosen = cls.routed_components_of(components, routed_components) if routed else []
        bad = [c for c in chosen if c in cls.vision_components]
        if bad:
            raise ValueError(
                f"{cls.family}: routed adapters cannot go into {bad}: x_R comes from the vision "
                "encoder's output; route the text components only"
            )

    def adapter_targets(
        self, components: Sequence[str] | None = None, kinds: Sequence[str] | None = None
    ) -> str:
        """A regex (for a config's ``targets``) selecting ``kinds`` inside ``components``."""
        components = list(components or self.default_components)
        kinds = list(kinds or self.default_kinds["lora"])
        self.check_placement(components, kinds)
        where = "|".join(self.components[c] for c in components)
        what = "|".join(self.module_kinds[k] for k in kinds)
        return rf"(?:{where})\.(?:{what})"

    def adapter_config(
        self,
        config: MethodConfig,
        components: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        routed_components: Sequence[str] | None = None,
    ) -> MethodConfig:
        """``config`` with targets set from components × kinds and the family's trainable params.

        Defaults: the family's ``default_components``; kinds q, v for LoRA-like methods and o,
        ffn_out for the bottleneck Adapter. A routed config routes in ``routed_components``
        (default: the family's ``default_routed_components``, e.g. CLIP-BART's decoder; all
        adapted components when it names none) and is the plain method elsewhere. Routing needs
        x_R, which the vision encoder produces, so no vision component routes.
        """
        if kinds is None:
            kinds = self.default_kinds_for(config)
        components = list(components or self.default_components)
        routed = bool(getattr(config, "routing", None))
        self.check_placement(components, kinds, routed, routed_components)
        trainable = list(dict.fromkeys([*config.trainable, *self.trainable_patterns]))
        changes: dict[str, Any] = {
            "targets": self.adapter_targets(components, kinds),
            "trainable": trainable,
        }
        chosen = self.routed_components_of(components, routed_components)
        if routed and set(chosen) != set(components):
            changes["route_targets"] = rf"(?:{'|'.join(self.components[c] for c in chosen)})\..*"
        changes.update(self.placement_changes(config, components, kinds))
        return dataclasses.replace(config, **changes)

    def placement_changes(
        self, config: MethodConfig, components: Sequence[str], kinds: Sequence[str]
    ) -> dict[str, Any]:
        """Method-config fields a family sets for a placement (GPT-2: the q/v slices of its fused
        ``c_attn``); none by default."""
        return {}

    @classmethod
    def capabilities_of(cls, config: ModelConfig | dict | None = None) -> tuple[str, ...]:
        """What a model of this family built from ``config`` (a config or its override dict) can
        serve; the family's ``capabilities`` unless a config narrows them (BLIP's heads)."""
        return cls.capabilities

    def paths(self, pattern: str, within: nn.Module | None = None) -> list[str]:
        """Adapted-layer paths (relative to ``within``, default the model) matching the regex
        ``pattern`` (a family's own constant): where a component reads another sequence."""
        return [p for p, _ in adapted_layers(within or self) if re.search(pattern, p)]

    # -- the task interface --------------------------------------------------------------------
    def set_batch_adapters(self, batch: dict[str, Any]) -> None:
        """A mixed-task batch's adapter set per row (``batch["adapter_names"]``, with
        ``batch["routings"]``: :func:`vlpeft.set_row_adapters`) on this model's layers until the
        next forward, or none (the active adapters for every row): each family's ``forward``,
        ``generate`` and ``score_choices`` call it first."""
        names = batch.get("adapter_names")
        rows = len(batch["text"]) if batch.get("text") else None
        if names is not None and rows is not None and len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {rows} rows")
        set_row_adapters(self, names, batch.get("routings"))

    def forward(self, batch: dict[str, Any]) -> VLOutput:
        raise NotImplementedError

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of ``batch``: ``model(batch).loss``."""
        return self(batch).loss

    def generate(
        self, batch: dict[str, Any], max_new_tokens: int = 20, num_beams: int = 1
    ) -> list[str]:
        raise NotImplementedError

    def text_positions(self, max_new_tokens: int, images: int = 1) -> list[tuple[str, int, int]]:
        """(sequence, positions it needs at least, positions the model has) for each text
        sequence the model builds: texts are cut to ``max_text_length`` tokens and generation
        adds ``max_new_tokens``; ``images`` per example (NLVR²: 2) where visual tokens take
        positions. A longer sequence would fail in the middle of a run, so configs are checked
        against it first (a task's short prompt is not counted: never a false refusal). A family
        lists its own; none by default."""
        return []

    def score_choices(self, batch: dict[str, Any], choices: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} does not score fixed choices")

    def choice_ids(self, choices: Sequence[str]) -> list[int]:
        """The single token id of each choice word; a multi-token choice is an error."""
        ids = []
        for choice in choices:
            pieces = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(
                    f"choice {choice!r} is {len(pieces)} tokens; choices must be one token"
                )
            ids.append(pieces[0])
        return ids


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, weights=None
) -> torch.Tensor:
    """Cross entropy of next-token ``logits`` (B, L, V) against ``labels`` (B, L): the mean over
    examples of each example's token mean (VL-T5's reduction), each example's mean times its
    ``weights`` entry when given (B floats: VL-T5's VQA weights an answer by its score).

    ``labels`` are already aligned with ``logits`` (label t is predicted by logit t); positions
    equal to -100 (padding, prefixes) are ignored. Averaging per example first makes the loss of a
    batch the mean of its halves' losses, so data-parallel training (gradients averaged over
    processes) equals one process on the whole batch.
    """
    tokens = F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE,
        label_smoothing=smoothing,
        reduction="none",
    ).view(labels.shape)
    counts = (labels != IGNORE).sum(1)
    kept = counts > 0
    means = tokens.sum(1)[kept] / counts[kept]
    if weights is not None:
        means = means * torch.as_tensor(weights, dtype=means.dtype, device=means.device)[kept]
    return means.mean()


def pad_to_ignore(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Label ids with padding positions set to -100."""
    return ids.masked_fill(mask == 0, IGNORE)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of (B, L, d) where ``mask`` (B, L) is 1."""
    if mask is None:
        return hidden.mean(1)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
