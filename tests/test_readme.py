"""Every ```python block of README.md runs as written (#27), so the README cannot drift from the
library.

Each block is executed on its own, in a fresh namespace holding only the placeholders below — the
data and the model the README's prose talks about (``x``: images, ``batch``: a VL batch,
``inputs``: a transformers batch with labels, ``x_r``/``v``/``h``: visual vectors, ``model``: a
tiny BART with a routed LoRA), all tiny and random — in a temporary working directory. A block
defines or imports everything else itself. A block whose first line is ``# needs: weights``
(pretrained weights, data or a network) is skipped.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_bart

import vlpeft
from vlpeft.adapters import LoRAConfig

README = Path(__file__).resolve().parent.parent / "README.md"
NEEDS = "# needs: weights"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python fenced block, dedented as a list item's are."""
    blocks = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.M | re.S):
        indent = len(match.group(1))
        code = "\n".join(line[indent:] for line in match.group(2).splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, code))
    return blocks


def placeholders() -> dict:
    """The names the README's blocks may use without defining them."""
    g = torch.Generator().manual_seed(0)
    model = tiny_bart()
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj"], r=2, routing="mul"))
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    x_r = torch.randn(2, 32, generator=g)
    x = torch.rand(1, 3, 64, 64, generator=g)  # the tiny CLIP-BART's image size
    return {
        "model": model,
        "inputs": {"input_ids": ids, "labels": ids},
        "attention_mask": torch.ones_like(ids),
        "x_r": x_r,
        "v": x_r,
        "h": x_r,
        "x": x,
        "batch": {"images": x, "text": ["vqa: what color is it?"]},
    }


# Blocks that fail for a reason in README's text, by a line of theirs (strict: once README is
# fixed the mark must go): {a line of the block: (the exception, why)}.
FAILING: dict[str, tuple[type[Exception], str]] = {}  # none today


def _params():
    params = []
    for line, code in python_blocks(README.read_text(encoding="utf-8")):
        marks = [
            pytest.mark.xfail(strict=True, raises=raises, reason=reason)
            for key, (raises, reason) in FAILING.items()
            if key in code
        ]
        padded = "\n" * line + code  # tracebacks name README's own line numbers
        params.append(pytest.param(padded, id=f"README.md:{line}", marks=marks))
    return params


def test_the_readme_has_python_blocks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3 and all(code.strip() for _, code in blocks)


def test_python_blocks_finds_indented_blocks_and_skips_others():
    text = "a\n```python\nx = 1\n```\n- item\n  ```python\n  y = 2\n  ```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "x = 1"), (6, "y = 2")]


@pytest.mark.parametrize("code", _params())
def test_readme_block_runs_as_written(code, tmp_path, monkeypatch):
    if code.lstrip().startswith(NEEDS):
        pytest.skip("needs pretrained weights, data or a network")
    monkeypatch.chdir(tmp_path)
    namespace = placeholders()
    exec(compile(code, str(README), "exec"), namespace)
