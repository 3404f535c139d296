"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed compiles its shared-memory comm op once; keep it in the repository (git-ignored)
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions")
)

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from launch.demo_methods import VOCAB, tiny_backbone  # noqa: E402


def tiny_bart():
    return tiny_backbone("bart", width=32).eval()


def tiny_gpt2():
    return tiny_backbone("gpt2", width=32).eval()


class TinyConvNet(nn.Module):
    """A small conv net: LoRA/FLoRA on Conv2d and Linear without transformers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.norm(h.mean((2, 3))))


def tiny_convnet():
    return TinyConvNet().eval()


def text_inputs(batch=2, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}


def bart_inputs():
    x = text_inputs()
    x["decoder_input_ids"] = text_inputs(length=5, seed=2)["input_ids"]
    return x


def image_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 3, 8, 8, generator=g)}


def run(model, inputs):
    """Forward; an ``x_r`` entry is handed to the model's routed layers for the call."""
    import vlpeft

    inputs = dict(inputs)
    x_r = inputs.pop("x_r", None)
    if x_r is not None:
        with vlpeft.routing_inputs(model, x_r):
            out = model(**inputs)
    else:
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def with_x_r(make_inputs, dim=32, tokens=None):
    """An inputs factory that adds a random x_R (B, dim) or (B, tokens, dim)."""

    def make():
        inputs = make_inputs()
        batch = next(iter(inputs.values())).shape[0]
        shape = (batch, dim) if tokens is None else (batch, tokens, dim)
        inputs["x_r"] = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
        return inputs

    return make


@torch.no_grad()
def perturb_adapters(model, scale=0.1, seed=3):
    """Random values in every adapter tensor, so an adapter visibly changes outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".adapters." in name:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state (torch, numpy, random), whatever ran before
    it and in whatever order: a test's outcome never depends on the draw of the day."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """``VLPEFT_TEST_ORDER=reverse`` runs the suite backwards: the same results in another order
    show that no test leans on what an earlier one left behind (random state, globals)."""
    if os.environ.get("VLPEFT_TEST_ORDER") == "reverse":
        items.reverse()


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
