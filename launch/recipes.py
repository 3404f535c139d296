"""The papers' recipes as data: finding them, reading their ``paper:`` section (checked), and the
offline checks ``launch.reproduce`` prints — our trainable parameters beside the paper's counts
(``--list --params``) and whether each weight source a recipe loads is on this machine
(``--check-data``). Nothing here trains, reads a data set or downloads.

A recipe's ``paper:`` mapping is free-form for training; :func:`read_paper` checks the keys
``launch.reproduce`` reads::

    paper:
      results: {"<task>/<split>": number}        # the paper's numbers, in run.json's units
      params: {trainable: 7011072, percent: 5.93, note: "…"}   # either count or both
      stand_in: "VSE∞ in the paper, BLIP-base here"  # an experiment this recipe cannot run exactly
      evaluator: official | vladapter           # the rules behind the paper's numbers
      reproduces: "VL-Adapter multitask single LoRA, …"   # the run it reproduces, one line
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from tqdm import tqdm

import vlpeft
from launch.config import ConfigError, load_config, read_recipe, stage_names
from launch.run import adapter_methods, check_offline
from vlpeft.inject import find_targets
from vlpeft.models import get_family, preset_config
from vlpeft.models.base import missing_weights
from vlpeft.models.clip_bart import OPEN_CLIP_HUB, ClipBartConfig
from vlpeft.registry import nearest_hint

RECIPES = Path(__file__).resolve().parent / "configs" / "recipes"
EVALUATORS = ("official", "vladapter")
PARAM_KEYS = ("trainable", "percent", "note")
CLAIM_TOLERANCE = 0.005  # a count the paper gives is reproduced within 0.5 %


def recipe_files() -> list[Path]:
    return sorted(RECIPES.glob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe by path, or by its name among the shipped ones (``routing_tab7_lora_proj``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{path.stem}.yaml"
    if shipped.is_file():
        return shipped
    names = [p.stem for p in recipe_files()]
    raise ConfigError(f"recipe {name!r}: not a file nor a shipped recipe ({len(names)}: --list)")


def stage_configs(path: Path, overrides=()) -> list[tuple[str | None, object]]:
    """(stage name or None, loaded config) of every stage of the recipe, in run order."""
    names = stage_names(read_recipe(path), str(path)) or [None]
    return [(name, load_config(path, overrides, stage=name)) for name in names]


def stage_label(path: Path, stage: str | None) -> str:
    return path.stem + (f" ({stage})" if stage else "")


def stage_where(path: Path, stage: str | None) -> str:
    """How errors name a recipe's stage: ``R.yaml (stage lora)``, as :func:`load_config` does."""
    return f"{path}" + (f" (stage {stage})" if stage else "")


@dataclasses.dataclass(frozen=True)
class Paper:
    """What ``launch.reproduce`` reads of a recipe's ``paper:`` section (:func:`read_paper`).

    Args:
        results: ``"<task>/<split>"`` → the number the paper reported, in run.json's units.
        trainable: the trainable parameters the paper gives, or None.
        percent: those as a percentage of the model's parameters, or None (VL-PET's 5.93 %:
            of the model without the CLIP whose features it pre-extracts, ParamCount.counted).
        params_note: how the paper counted, when it says.
        stand_in: what differs from the paper's experiment this recipe stands in for (None: it
            is that experiment).
        evaluator: the rules that produced the paper's numbers: ``official`` or ``vladapter``.
        reproduces: one line naming the run the recipe reproduces.
    """

    results: dict = dataclasses.field(default_factory=dict)
    trainable: int | None = None
    percent: float | None = None
    params_note: str | None = None
    stand_in: str | None = None
    evaluator: str = "official"
    reproduces: str | None = None

    @property
    def notes(self) -> str:
        """The marks printed beside the paper's numbers (stand-in, scoring rules)."""
        marks = [f"stand-in: {self.stand_in}"] if self.stand_in else []
        return "; ".join(
            marks + ([f"scored by {self.evaluator}"] if self.evaluator != "official" else [])
        )


def read_paper(config, where: str) -> Paper:
    """The checked ``paper:`` section of a loaded recipe; ``where`` (the recipe file, and the
    stage) starts every error, which names the key: ``R.yaml: paper.params.trainable: …``."""
    paper = config.paper or {}
    if not isinstance(paper, dict):
        raise ConfigError(f"{where}: paper: expected a mapping, got {type(paper).__name__}")
    results = paper.get("results") or {}
    if not isinstance(results, dict) or not all(_number(v) for v in results.values()):
        raise ConfigError(f"{where}: paper.results: expected a mapping '<task>/<split>': number")
    evaluator = paper.get("evaluator", "official")
    if evaluator not in EVALUATORS:
        raise ConfigError(
            f"{where}: paper.evaluator: {evaluator!r}{nearest_hint(str(evaluator), EVALUATORS)} "
            f"is not one of {list(EVALUATORS)}"
        )
    params = _read_params(paper.get("params"), where)
    return Paper(results=results, stand_in=_line(paper, "stand_in", where), evaluator=evaluator,
                 reproduces=_line(paper, "reproduces", where), **params)  # fmt: skip


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _line(paper: dict, key: str, where: str) -> str | None:
    value = paper.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\n" in value.strip():
        raise ConfigError(f"{where}: paper.{key}: expected one line of text, got {value!r}")
    return value.strip()


def _read_params(params, where: str) -> dict:
    if params is None:
        return {}
    key = f"{where}: paper.params"
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{key}: expected {{trainable: <int>}} and/or {{percent: <float>}}")
    for name in params:
        if name not in PARAM_KEYS:
            raise ConfigError(
                f"{key}.{name}{nearest_hint(str(name), PARAM_KEYS)}: unknown; valid: {list(PARAM_KEYS)}"
            )
    trainable, percent, note = (params.get(k) for k in PARAM_KEYS)
    if trainable is None and percent is None:
        raise ConfigError(f"{key}: give trainable (a count) and/or percent (of the model)")
    if trainable is not None and (not isinstance(trainable, int) or isinstance(trainable, bool)
                                  or trainable <= 0):  # fmt: skip
        raise ConfigError(f"{key}.trainable: expected a positive integer, got {trainable!r}")
    if percent is not None and not (_number(percent) and 0 < percent <= 100):
        raise ConfigError(f"{key}.percent: expected a number in (0, 100], got {percent!r}")
    if note is not None and not isinstance(note, str):
        raise ConfigError(f"{key}.note: expected text, got {note!r}")
    percent = None if percent is None else float(percent)
    return {"trainable": trainable, "percent": percent, "params_note": note}


def recipe_stages(paths=None, overrides=()) -> list[tuple[str, Path, str | None, object, Paper]]:
    """(label, recipe file, stage, config, paper) of every stage of the recipes (default: all)."""
    rows = []
    for path in recipe_files() if paths is None else paths:
        for stage, config in stage_configs(path, overrides):
            paper = read_paper(config, stage_where(path, stage))
            rows.append((stage_label(path, stage), path, stage, config, paper))
    return rows


def list_recipes() -> str:
    """A Markdown table: every recipe (and stage) with its source table and numbers."""
    lines = ["| recipe | paper | table | reported | notes |", "|---|---|---|---|---|"]
    for label, _, _, config, paper in recipe_stages():
        numbers = ", ".join(f"{k} {v}" for k, v in paper.results.items())
        source = str(config.paper.get("source", "")).split(".")[0]
        table = config.paper.get("table", "")
        lines.append(f"| {label} | {source} | {table} | {numbers} | {paper.notes} |")
    return "\n".join(lines)


# -- parameters -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamCount:
    """A config's parameter counts on the meta device (:func:`count_parameters`).

    Args:
        trainable: what trains (None: a set's ranks come from the weights, Null-LoRA).
        total: every parameter of the model, adapters included.
        cached: those of a frozen encoder whose features a run may cache (0: none).
        why: why ``trainable`` is None.
    """

    trainable: int | None
    total: int
    cached: int = 0
    why: str = ""

    @property
    def counted(self) -> int:
        """The model as VL-Adapter / VL-PET count it: without the frozen encoder whose features
        they pre-extract (CLIP), which a feature cache (``launch.features``) leaves out too."""
        return self.total - self.cached

    @property
    def percent(self) -> float | None:
        """Trainable as a percentage of :attr:`counted` (VL-PET's 5.93 % for LoRA)."""
        return None if self.trainable is None else 100.0 * self.trainable / self.counted


def count_parameters(config) -> ParamCount:
    """The parameter counts of a config's model with its adapters, built on the meta device
    (:func:`launch.run.check_offline`; no weights, no memory)."""
    report = check_offline(config)
    why = next((info["checked"] for info in report["sets"].values() if "checked" in info), "")
    if report["trainable"] is None:
        return ParamCount(None, report["total"], 0, why)
    return ParamCount(report["trainable"], report["total"], cached_encoder_parameters(config))


def cached_encoder_parameters(config) -> int:
    """Parameters of the model's frozen encoder whose features can be cached (``cached_part``:
    CLIP-BART's CLIP ResNet, the ViT of ViT + RoBERTa / GPT-2); 0 when the family has none or an
    adapter set adapts or trains a parameter inside it."""
    model = bare_meta_model(config.model.family, config.model.preset,
                            json.dumps(config.model.overrides, sort_keys=True))  # fmt: skip
    part = getattr(model, "cached_part", None)
    if part is None:
        return 0
    inside = f"{part}."
    names = [name for name, _ in model.named_parameters() if name.startswith(inside)]
    for method in adapter_methods(config, model).values():
        adapted = [name for name, _ in find_targets(model, method.targets)]
        # a trainable pattern may name an adapted layer's base_layer: the targets cover those
        trained = [n for n in names if any(re.search(p, n) for p in method.trainable)]
        if trained or any(name.startswith(inside) for name in adapted):
            return 0
    return sum(p.numel() for p in getattr(model, part).parameters())


@functools.lru_cache(maxsize=16)
def bare_meta_model(family: str, preset: str, overrides: str):
    """The model without adapters on the meta device, once per (family, preset, overrides):
    read only, by :func:`cached_encoder_parameters`."""
    kwargs = {**json.loads(overrides), "pretrained": False}  # the size, not the weights
    kwargs.pop("weights", None)
    with torch.device("meta"):
        return vlpeft.build_model(family, preset, **kwargs)


def claim_holds(ours: float, claimed: float, decimals: int | None = None) -> bool:
    """Ours within 0.5 % of a count the paper gives — or, for a number printed with few digits
    (0.35 %), within the rounding of its last printed digit (``decimals``, default from repr)."""
    if decimals is None:
        text = repr(float(claimed))
        decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return abs(ours - claimed) <= max(CLAIM_TOLERANCE * claimed, 0.5 * 10.0**-decimals)


def params_table(stages=None) -> str:
    """A Markdown table: per recipe (and stage), our trainable parameters (meta device) beside
    every count the paper gives, and the ratio ours / paper. Progress goes to stderr."""
    stages = recipe_stages() if stages is None else stages
    lines = [
        "| recipe | ours: trainable | of (+ cached encoder) | ours % | paper: trainable "
        "| ours/paper | paper % | ours/paper | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, _, config, paper in tqdm(stages, desc="counting", file=sys.stderr, disable=None):
        count = count_parameters(config)
        note = paper.params_note and f"paper: {paper.params_note}"
        notes = "; ".join(n for n in (paper.notes, note) if n)
        of = f"{count.counted:,}" + (f" (+ {count.cached:,})" if count.cached else "")
        if count.trainable is None:
            ours, ratios = ["needs the weights", of, "–"], ["–", "–"]
        else:
            ours = [f"{count.trainable:,}", of, f"{count.percent:.2f}"]
            ratios = [
                _ratio(count.trainable, paper.trainable),
                _ratio(count.percent, paper.percent),
            ]
        claimed = [f"{paper.trainable:,}" if paper.trainable else "–",
                   f"{paper.percent:g}" if paper.percent else "–"]  # fmt: skip
        cells = [label, *ours, claimed[0], ratios[0], claimed[1], ratios[1], notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(ours: float, paper: float | None) -> str:
    return "–" if paper is None else f"{ours / paper:.3f}"


# -- weights ----------------------------------------------------------------------------------
MODEL_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json"))  # fmt: skip
OPEN_CLIP_FILES = (("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),)
TOKENIZER_FILES = (("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt"),)


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """One source of pretrained weights a config's model loads.

    Args:
        part: the ``weights`` key (``vision``, ``text``, a BLIP head) or ``tokenizer``.
        what: the part as the family's error message names it (``open_clip RN101``).
        source: as configured: a local path, a hub id or an open_clip tag.
        hub_id: where the hub keeps it when that is not ``source`` (an open_clip tag's repo).
        files: groups of file names; one of each group must be present.
        checkpoint_file: a local file of that name is the checkpoint (open_clip reads one).
    """

    part: str
    what: str
    source: str
    hub_id: str | None = None
    files: tuple = MODEL_FILES
    checkpoint_file: bool = False

    @property
    def repo(self) -> str:
        return self.hub_id or self.source


def weight_sources(config) -> list[WeightSource]:
    """The weight sources of a training config's model (``model.family``/``preset``/
    ``overrides``, as the family resolves them); none for random weights."""
    family = get_family(config.model.family)
    model = preset_config(config.model.family, config.model.preset, **config.model.overrides)
    sources = []
    if model.pretrained:
        used = getattr(model, "heads", family.weight_keys)  # BLIP loads the built heads only
        for part, source in model.weights.items():
            if part not in used or part not in family.weight_keys:
                continue
            what = f"{config.model.family} {part}"
            if isinstance(model, ClipBartConfig) and part == "vision" and "model" in model.vision:
                name = model.vision["model"]
                sources.append(WeightSource(part, f"open_clip {name}", source,
                                            open_clip_hub(name, source), OPEN_CLIP_FILES, True))  # fmt: skip
            else:
                sources.append(WeightSource(part, what, source))
    if model.tokenizer != "tiny":
        sources.append(
            WeightSource("tokenizer", "tokenizer", model.tokenizer, None, TOKENIZER_FILES)
        )
    return sources


def open_clip_hub(name: str, tag: str) -> str | None:
    """The hub repo an open_clip (model, pretrained tag) downloads from (None: a file path)."""
    if (name, tag) in OPEN_CLIP_HUB:
        return OPEN_CLIP_HUB[(name, tag)]
    import open_clip

    return (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "").rstrip("/") or None


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def locate_weights(weights: WeightSource) -> tuple[bool, str]:
    """(present, where / what is missing) of one weight source: a local file or folder of that
    name, else its files in the Hugging Face cache. Never downloads."""
    path = Path(weights.source).expanduser()
    if path.is_file() and weights.checkpoint_file:
        return True, f"local file {path}"
    if path.is_dir():
        lacking = [group for group in weights.files if not any((path / f).is_file() for f in group)]
        if not lacking:
            return True, f"local folder {path}"
        return False, f"folder {path} lacks {' or '.join(lacking[0])}"
    cache = hub_cache()
    if all(any(_cached(weights.repo, f, cache) for f in group) for group in weights.files):
        return True, f"{weights.repo} in the Hugging Face cache {cache}"
    reason = FileNotFoundError(f"no local folder of that name; {weights.repo} is not in {cache}")
    text = str(missing_weights(weights.what, weights.source, reason, weights.hub_id))
    if weights.what.startswith("blip "):
        text += (f" A converted original BLIP checkpoint: `python -m launch.convert_blip CKPT "
                 f"{weights.source} --head {weights.part}`.")  # fmt: skip
    return False, text


def _cached(repo: str, filename: str, cache: Path) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache), str)
    except ValueError:  # not a valid repo id (a path): not in the cache
        return False


def check_weights(config) -> list[tuple[str, str]]:
    """(``weights/<part>``, ``ok (…)`` or ``missing: …`` naming the command that fetches it)
    for every weight source of the config's model."""
    rows = []
    for weights in weight_sources(config):
        present, text = locate_weights(weights)
        rows.append((f"weights/{weights.part}", f"ok ({text})" if present else f"missing: {text}"))
    return rows
