"""Tokenizers for the families: the shipped ``tiny`` WordPiece vocabulary or a pretrained one.

The ``tiny`` tokenizer needs no download: a lower-casing WordPiece over ``presets/tiny-vocab.txt``
(special tokens, single characters and their ``##`` continuations — so every ASCII text encodes —
plus a few hundred common English words). Every family uses the same roles, whatever the tokenizer:
``pad``, ``bos`` (``[CLS]`` / ``<s>``), ``eos`` (``[SEP]`` / ``</s>``), and BLIP's ``[DEC]``.
"""

from __future__ import annotations

import functools
from pathlib import Path

PRESETS = Path(__file__).parent / "presets"
TINY_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "[CLS]",
    "eos_token": "[SEP]",
}


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(wrap: bool = True):
    """The shipped tiny tokenizer.

    Args:
        wrap: add ``[CLS] … [SEP]`` around each text (BART/BERT/RoBERTa style); ``False`` for GPT-2
            style, which adds nothing (the model appends ``eos`` itself).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tokens = (PRESETS / "tiny-vocab.txt").read_text().split()
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece(prefix="##")
    if wrap:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **TINY_SPECIALS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[DEC]", "[ENC]"]})
    return tokenizer


def load_tokenizer(source: str, wrap: bool = True):
    """``"tiny"`` → :func:`tiny_tokenizer`; otherwise a local directory or hub id via transformers.

    A missing tokenizer is an error that says where it was looked for and what to pass instead.
    """
    if source == "tiny":
        return tiny_tokenizer(wrap)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"tokenizer {source!r} was not found (looked for a local directory of that name and in "
            "the Hugging Face cache; downloads are off when HF_HUB_OFFLINE=1). Download it once with "
            f"`hf download {source}` or pass tokenizer='tiny' for random-weight runs."
        ) from err
