"""Convert an original BLIP checkpoint (salesforce/BLIP ``.pth``) to a transformers directory.

    python -m launch.convert_blip model_base_retrieval_coco.pth blip-retrieval --head retrieval

The ``.pth`` is read with ``torch.load(weights_only=True)`` only (tensors and plain containers; a
file that needs arbitrary unpickling is refused). The output directory is what
``transformers.BlipFor*.from_pretrained`` reads (config + safetensors), so the ``blip`` family's
``weights`` can name it. The image size is read from the checkpoint's position embedding.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from vlpeft.models.blip import CLASSES, PARTS, convert_original_state_dict


class ConversionError(ValueError):
    """An original BLIP checkpoint that cannot be converted; the message names the file."""


def load_original(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such checkpoint file") from None
    except Exception as err:  # an unpickling refusal or a corrupt file
        raise ConversionError(
            f"{path}: not a tensors-only checkpoint ({type(err).__name__}: {err})"
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(
            f"{path}: expected a state dict (or {{'model': state dict}}) of tensors"
        )
    return state


def vision_config_of(state: dict[str, torch.Tensor]) -> dict:
    """ViT sizes read off the converted state dict (heads = width / 64, as in BLIP base/large)."""
    positions = state["vision_model.embeddings.position_embedding"].shape[1]
    hidden = state["vision_model.embeddings.class_embedding"].shape[-1]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    layers = {k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")}
    return {
        "image_size": int(math.isqrt(positions - 1)) * patch,
        "patch_size": patch,
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
    }


def convert(
    path: Path,
    out: Path,
    head: str,
    text_config: dict | None = None,
    vision_config: dict | None = None,
) -> list[str]:
    """Writes the converted model to ``out``; returns the original keys that were not used.

    ``text_config``/``vision_config`` override transformers' BLIP-base defaults and the sizes read
    off the checkpoint."""
    import transformers

    state = convert_original_state_dict(load_original(path))
    vision = {**vision_config_of(state), **(vision_config or {})}
    config = transformers.BlipConfig(text_config=text_config or {}, vision_config=vision)
    model = getattr(transformers, CLASSES[head])(config)
    wanted = {k: v for k, v in state.items() if k.split(".")[0] in PARTS[head]}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(
            f"{path}: does not fit {CLASSES[head]} (missing {missing[:5]}…, unexpected {unexpected[:5]}…); "
            "is --head right?"
        )
    model.save_pretrained(out)
    return sorted(set(state) - set(wanted))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="original BLIP .pth file")
    parser.add_argument("out", type=Path, help="output directory (transformers layout)")
    parser.add_argument(
        "--head", choices=sorted(CLASSES), required=True, help="which Blip* model it is"
    )
    args = parser.parse_args(argv)
    try:
        unused = convert(args.checkpoint, args.out, args.head)
    except ConversionError as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"wrote {CLASSES[args.head]} to {args.out}"
        + (f"; not used: {len(unused)} keys" if unused else "")
    )


if __name__ == "__main__":
    main()
