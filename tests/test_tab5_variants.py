"""Qu et al. (ECCV 2024) Tab. 5 / Tab. B6 variants against their definitions written out with plain
torch ops: x_t X_vᵀ X_v over every visual token, LoRA's "split" separate mapping (Fig. A1(d)),
LoRA with cross-attention in the bottleneck (Fig. A1(c)), the parallel Adapter with a routing
function and with I-Tuning's cross-attention (Fig. A1(b)), GPT-2+ViT without a visual prefix and
with the ViT's last hidden state as x_R; the adapter battery over these variants; every Tab. 5
recipe's trainable parameters on the meta device.

Tolerances: the module and its written-out definition compute the same float32 products in
another association order (a fused attention kernel, transposed GEMMs), so they agree to float32
rounding of sums of tens of terms: atol = rtol = 1e-5 on O(1) values. Identity at injection is
exact (a zero factor gives exact zeros, and y + 0 == y).
"""

import math
from pathlib import Path

import pytest
import test_adapter_battery as battery
import torch
from conftest import perturb_adapters, text_inputs, tiny_gpt2, with_x_r
from torch import nn
from transformers.pytorch_utils import Conv1D

import vlpeft
from launch.config import load_config
from launch.run import check_offline
from vlpeft.adapters import AdapterConfig, LoRAConfig
from vlpeft.adapters.routing import route
from vlpeft.models import build_model
from vlpeft.models.gpt2_vit import Gpt2VitConfig

TOL = {"atol": 1e-5, "rtol": 1e-5}
QV = {"0": {"parts": 3, "use": [0, 2]}}
B, L, K = 2, 5, 4  # batch, text tokens, visual tokens


def seeded(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def softmax_attention(q, k, v, heads):
    """Multi-head attention written out: per head softmax(q kᵀ / √d_h) v, heads concatenated."""
    d_h = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        part = slice(h * d_h, (h + 1) * d_h)
        scores = q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(d_h)
        outs.append(torch.softmax(scores, dim=-1) @ v[..., part])
    return torch.cat(outs, dim=-1)


def adapted(base: nn.Module, config) -> nn.Module:
    net = nn.Sequential(base) if not isinstance(base, Block) else base
    vlpeft.add_adapter(net, config)
    perturb_adapters(net, scale=0.3)  # B / up nonzero, so every factor shows in the output
    return net


def check(net: nn.Module, definition, x: torch.Tensor, x_r: torch.Tensor) -> None:
    """The module's output and its trainable parameters' gradients (for a random cotangent) equal
    the written-out ``definition``'s, evaluated by autograd on copies of the same parameters
    (``w``: short name, e.g. ``lora_A`` or ``down.weight`` → tensor)."""
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    w = {n.split("adapters.default.")[1]: p.detach().clone().requires_grad_()
         for n, p in trainable.items()}  # fmt: skip
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    expected = definition(w)
    torch.testing.assert_close(y, expected, **TOL)
    g = seeded(*y.shape, seed=99)
    y.backward(g)
    expected.backward(g)
    for name, p in trainable.items():
        short = name.split("adapters.default.")[1]
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, w[short].grad, **TOL)


def routed_proj(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_t X_vᵀ X_v per example, as a loop over the batch."""
    return torch.stack([h[b] @ v[b].T @ v[b] for b in range(h.shape[0])])


class Block(nn.Module):
    """A residual-free FFN of equal input and output width (GPT-2's ``mlp`` in small)."""

    def __init__(self, d=6):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))

    def forward(self, x):
        return self.mlp(x)


# -- x_t X_vᵀ X_v over every visual token --------------------------------------------------------
@pytest.mark.parametrize("kind", ["proj", "relu_proj"])
def test_proj_over_all_visual_tokens_is_x_t_xv_transposed_xv(kind):
    x_t, x_v = seeded(B, L, 3, seed=1), seeded(B, K, 3, seed=2)
    t, v = (x_t.relu(), x_v.relu()) if kind == "relu_proj" else (x_t, x_v)
    expected = torch.stack([t[b] @ v[b].T @ x_v[b] for b in range(B)])
    torch.testing.assert_close(route(kind, x_t, x_v, pool=False), expected, **TOL)
    # pooling first is another function: (x_t·x̄) x̄ ≠ Σ_k (x_t·x_k) x_k
    assert not torch.allclose(route(kind, x_t, x_v), expected)


def test_only_proj_is_defined_on_several_visual_tokens():
    with pytest.raises(ValueError, match="defined on one visual vector"):
        route("mul", torch.ones(1, 2, 3), torch.ones(1, 4, 3), pool=False)


# -- LoRA: "split" separate mapping (Fig. A1(d)) ------------------------------------------------
def test_split_mapping_routes_two_d_m_r_chains_on_a_linear():
    config = LoRAConfig(
        targets=["0"], r=8, alpha=4, routing="proj", separate_mapping="split",
        visual_tokens="all", visual_dim=3, mapping_rank=2,
    )  # fmt: skip
    net = adapted(nn.Linear(6, 5), config)
    ad = net[0].adapters["default"]
    assert (ad.lora_A.shape, ad.lora_up.shape) == ((2, 6), (8, 2))
    assert (ad.lora_A_visual.shape, ad.lora_up_visual.shape) == ((2, 3), (8, 2))
    assert ad.lora_mid is None
    x, x_r = seeded(B, L, 6, seed=3), seeded(B, K, 3, seed=4)

    def definition(w):
        h = x @ w["lora_A"].T @ w["lora_up"].T  # d → m → r
        v = x_r @ w["lora_A_visual"].T @ w["lora_up_visual"].T
        return net[0].base_layer(x) + 0.5 * routed_proj(h, v) @ w["lora_B"].T

    check(net, definition, x, x_r)


def test_split_mapping_on_fused_qv_maps_the_slices_concatenation_then_routes_each_slice():
    """As the reference's MergedLinearSplit on GPT-2's c_attn: A per slice, one up-projection
    S·m → S·r over both slices, routing per slice (q, v), B per slice into the q and v parts."""
    config = LoRAConfig(
        targets=["0"], r=4, slices=QV, routing="proj", separate_mapping="split",
        visual_tokens="all", mapping_rank=2,
    )  # fmt: skip
    net = adapted(Conv1D(3 * 6, 6), config)
    ad = net[0].adapters["default"]
    assert ad.lora_up.shape == (8, 4) and ad.lora_up_visual.shape == (8, 4)
    x, x_r = seeded(B, L, 6, seed=5), seeded(B, K, 6, seed=6)

    def definition(w):
        h = x @ w["lora_A"].T @ w["lora_up"].T  # (B, L, 2·r): q's then v's bottleneck
        v = x_r @ w["lora_A_visual"].T @ w["lora_up_visual"].T
        q_part, v_part = (
            routed_proj(h[..., 4 * s : 4 * s + 4], v[..., 4 * s : 4 * s + 4])
            @ w["lora_B"][6 * s : 6 * s + 6].T
            for s in (0, 1)
        )
        return net[0].base_layer(x) + torch.cat([q_part, torch.zeros(B, L, 6), v_part], -1)

    check(net, definition, x, x_r)


def test_true_still_means_the_merge_mapping_and_split_is_lora_only():
    config = LoRAConfig(targets=["0"], r=8, routing="proj", separate_mapping=True)
    assert config.separate_mapping == "merge" and config.mapping_rank == 2
    with pytest.raises(ValueError, match="separate_mapping must be False, True"):
        LoRAConfig(targets=["0"], r=8, routing="proj", separate_mapping="splt")
    with pytest.raises(ValueError, match="AdapterConfig.separate_mapping='split'.*only LoRA"):
        AdapterConfig(targets=["0"], routing="proj", separate_mapping="split")


# -- LoRA: cross-attention in the bottleneck (Fig. A1(c)) ---------------------------------------
def test_lora_cross_attention_is_attention_in_the_narrow_bottleneck():
    """B·U·W_o·attn(W_q A x, W_k A_v X_R, W_v A_v X_R) over the fused q|v bottleneck (the
    reference's MergedLinearSplitAttn), B per slice."""
    config = LoRAConfig(
        targets=["0"], r=8, alpha=16, slices=QV, routing="cross_attention", attention_heads=2,
        visual_dim=5,
    )  # fmt: skip
    net = adapted(Conv1D(3 * 6, 6), config)
    ad = net[0].adapters["default"]
    assert ad.lora_attn_q.shape == (4, 4) and ad.lora_up.shape == (16, 4)  # m = r/4 per slice
    x, x_r = seeded(B, L, 6, seed=7), seeded(B, K, 5, seed=8)

    def definition(w):
        t, v = x @ w["lora_A"].T, x_r @ w["lora_A_visual"].T
        q, k, val = t @ w["lora_attn_q"].T, v @ w["lora_attn_k"].T, v @ w["lora_attn_v"].T
        h = softmax_attention(q, k, val, heads=2) @ w["lora_attn_o"].T @ w["lora_up"].T
        q_part, v_part = (
            2.0 * h[..., 8 * s : 8 * s + 8] @ w["lora_B"][6 * s : 6 * s + 6].T for s in (0, 1)
        )
        return net[0].base_layer(x) + torch.cat([q_part, torch.zeros(B, L, 6), v_part], -1)

    check(net, definition, x, x_r)


def test_cross_attention_over_one_visual_vector_ignores_the_query():
    """Softmax over one key is 1: the branch is B·U·W_o·W_v·A_v·x_R for every token."""
    config = LoRAConfig(targets=["0"], r=8, routing="cross_attention", attention_heads=1)
    net = adapted(nn.Linear(6, 6), config)
    ad = net[0].adapters["default"]
    x, x_r = seeded(B, L, 6, seed=9), seeded(B, 6, seed=10)
    with vlpeft.routing_inputs(net, x_r):
        y = net(x)
    branch = x_r @ ad.lora_A_visual.T @ ad.lora_attn_v.T @ ad.lora_attn_o.T @ ad.lora_up.T
    expected = net[0].base_layer(x) + (branch @ ad.lora_B.T)[:, None]
    torch.testing.assert_close(y, expected, **TOL)


# -- Adapter: parallel, routed and with cross-attention (Fig. A1(a), (b)) -----------------------
def test_parallel_routed_adapter_reads_the_input_and_adds_to_the_output():
    config = AdapterConfig(
        targets=["mlp"], bottleneck=4, activation="gelu", routing="proj", visual_tokens="all",
        parallel=True,
    )  # fmt: skip
    net = adapted(Block(), config)
    x, x_r = seeded(B, L, 6, seed=11), seeded(B, K, 6, seed=12)

    def definition(w):
        down = lambda t: t @ w["down.weight"].T + w["down.bias"]  # noqa: E731 (shared W_down)
        routed = routed_proj(down(x), down(x_r))
        up = nn.functional.gelu(routed) @ w["up.weight"].T + w["up.bias"]
        return net.mlp.base_layer(x) + up  # parallel: the FFN's input in, its output + adapter

    check(net, definition, x, x_r)


def test_i_tuning_cross_attention_adapter():
    """out = FFN(x) + W_o·attn(W_q x + b_q, W_k X_R + b_k, W_v X_R + b_v) + b_o, no activation."""
    config = AdapterConfig(
        targets=["mlp"], bottleneck=4, routing="cross_attention", attention_heads=2,
        parallel=True, visual_dim=5,
    )  # fmt: skip
    net = adapted(Block(), config)
    x, x_r = seeded(B, L, 6, seed=13), seeded(B, K, 5, seed=14)

    def definition(w):
        q, k, v = (t @ w[f"{n}.weight"].T + w[f"{n}.bias"]
                   for t, n in ((x, "down"), (x_r, "key"), (x_r, "value")))  # fmt: skip
        out = softmax_attention(q, k, v, 2) @ w["up.weight"].T + w["up.bias"]
        return net.mlp.base_layer(x) + out

    check(net, definition, x, x_r)


def test_a_parallel_adapter_needs_equal_input_and_output_widths():
    with pytest.raises(ValueError, match=r"input width 6 differs from the output width 12"):
        vlpeft.add_adapter(
            nn.Sequential(nn.Linear(6, 12)), AdapterConfig(targets=["0"], parallel=True)
        )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LoRAConfig(targets=["0"], routing="mul", visual_tokens="all"),
         r"LoRAConfig.visual_tokens='all' needs routing in \['proj', 'relu_proj'\]"),
        (lambda: LoRAConfig(targets=["0"], routing="proj", visual_tokens="every"),
         r"LoRAConfig.visual_tokens must be one of \['mean', 'all'\]"),
        (lambda: LoRAConfig(targets=["0"], routing="cross_attention", separate_mapping=True),
         "LoRAConfig.separate_mapping: cross-attention maps x_R"),
        (lambda: AdapterConfig(targets=["0"], routing="cross_attention", attention_heads=0),
         "AdapterConfig.attention_heads must be an int >= 1"),
        (lambda: AdapterConfig(targets=["0"], parallel="yes"),
         "AdapterConfig.parallel must be true or false"),
        (lambda: LoRAConfig(targets=["0"], mapping_rank=2),
         "LoRAConfig.mapping_rank is the width of a separate mapping or cross-attention"),
        (lambda: vlpeft.adapters.NullLoRAConfig(targets=["0"], routing="cross_attention"),
         r"NullLoRAConfig.routing must be one of \["),
        (lambda: Gpt2VitConfig(routing_feature="cls"),
         r"Gpt2VitConfig.routing_feature must be one of \['prefix', 'tokens'\]"),
        (lambda: Gpt2VitConfig(visual_prefix="no"), "Gpt2VitConfig.visual_prefix must be true"),
    ],
)  # fmt: skip
def test_new_fields_are_validated_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_heads_must_divide_the_attention_width():
    config = LoRAConfig(targets=["0"], r=8, routing="cross_attention", attention_heads=3)
    with pytest.raises(
        ValueError, match="attention_heads=3 must divide the cross-attention width 2"
    ):
        vlpeft.add_adapter(nn.Sequential(nn.Linear(6, 6)), config)


def test_a_task_routing_function_does_not_switch_cross_attention():
    config = LoRAConfig(targets=["0"], r=8, routing="cross_attention", attention_heads=1)
    assert vlpeft.set_routing(adapted(nn.Linear(6, 6), config), "mul") == 0


# -- the battery over the new variants ------------------------------------------------------------
QV_SLICES = battery.QV_SLICES
ROWS = [
    ("lora-gpt2-qv-split-proj-tokens",
     lambda: LoRAConfig(targets=["c_attn"], r=8, slices=QV_SLICES, routing="proj",
                        separate_mapping="split", visual_tokens="all", visual_dim=16),
     tiny_gpt2, with_x_r(text_inputs, dim=16, tokens=3)),
    ("lora-gpt2-qv-cross-attention",
     lambda: LoRAConfig(targets=["c_attn"], r=8, slices=QV_SLICES, routing="cross_attention",
                        attention_heads=2, visual_dim=16),
     tiny_gpt2, with_x_r(text_inputs, dim=16, tokens=3)),
    ("adapter-gpt2-parallel-proj-tokens",
     lambda: AdapterConfig(targets=["mlp"], bottleneck=8, activation="gelu", routing="proj",
                           visual_tokens="all", parallel=True),
     tiny_gpt2, with_x_r(text_inputs, tokens=3)),
    ("adapter-gpt2-parallel-cross-attention",
     lambda: AdapterConfig(targets=["mlp"], bottleneck=8, routing="cross_attention",
                           attention_heads=2, parallel=True),
     tiny_gpt2, with_x_r(text_inputs, tokens=3)),
]  # fmt: skip
rows = pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])


@rows
def test_battery_injection_changes_no_output(row):
    battery.test_injection_changes_no_output(row)


@rows
def test_battery_only_adapter_parameters_get_gradients(row):
    battery.test_only_adapter_and_declared_parameters_get_gradients(row)


@rows
def test_battery_routed_adapters_refuse_merging(row):
    battery.test_merge_equals_unmerged(row)


@rows
def test_battery_save_load_round_trip_is_exact(row, tmp_path):
    battery.test_save_load_round_trip_is_exact(row, tmp_path)


@rows
def test_battery_several_named_adapters(row):
    battery.test_several_named_adapters(row)


# -- GPT-2 + ViT: "<s>" instead of the visual prefix, the last hidden state as x_R --------------
def i_tuning_model(adapter):
    model = build_model("gpt2-vit", "tiny", visual_prefix=False, routing_feature="tokens").eval()
    vlpeft.add_adapter(model, model.adapter_config(adapter))
    return model


def caption_batch(n=2):
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "text": ["<s>"] * n,
            "targets": ["a red circle", "two blue squares on grey"][:n]}  # fmt: skip


TAB5_ADAPTERS = {  # the five rows' methods at the tiny preset's size
    "lora-cross-attention": LoRAConfig(targets=["x"], r=8, routing="cross_attention"),
    "lora-split-proj": LoRAConfig(
        targets=["x"], r=8, routing="proj", separate_mapping="split", visual_tokens="all"
    ),
    "lora-proj": LoRAConfig(targets=["x"], r=8, routing="proj", visual_tokens="all"),
    "adapter-cross-attention": AdapterConfig(
        targets=["x"], bottleneck=8, routing="cross_attention", parallel=True
    ),
    "adapter-proj": AdapterConfig(
        targets=["x"], bottleneck=8, routing="proj", visual_tokens="all", parallel=True
    ),
}
tab5_adapters = pytest.mark.parametrize("adapter", TAB5_ADAPTERS.values(), ids=list(TAB5_ADAPTERS))


@tab5_adapters
def test_gpt2_vit_without_a_visual_prefix_routes_the_vits_last_hidden_state(adapter):
    model, batch = i_tuning_model(adapter), caption_batch()
    first = dict(vlpeft.adapted_layers(model.gpt2))
    layer = next(iter(first.values()))
    with torch.no_grad():
        states = model.vit(pixel_values=batch["images"]).last_hidden_state
        out = model(batch)
    assert torch.equal(layer.routing_input, states)  # (B, 1 + patches, d), not pooled
    ids, _, _ = model._sequences(batch)
    assert out.logits.shape[1] == ids.shape[1]  # no prefix position
    # zero-initialised: the same loss as GPT-2 alone on bos + "<s>" + caption
    with torch.no_grad():
        vlpeft.set_active_adapter(model, None)
        plain = model(batch)
    torch.testing.assert_close(out.loss, plain.loss, atol=0, rtol=0)
    vlpeft.set_active_adapter(model, "default")
    perturb_adapters(model)
    assert len(model.generate(batch, max_new_tokens=3, num_beams=2)) == 2
    with pytest.raises(KeyError, match="routing_feature='tokens' needs batch\\['images'\\]"):
        model({**batch, "features": torch.zeros(2, 32)})


@tab5_adapters
def test_gpt2_vit_trains_each_variant_under_bf16_autocast(adapter):
    """One step's loss and gradients are finite under bf16 autocast (the recipes' precision) and
    reach every trainable tensor once the zero-initialised factors are perturbed."""
    model, batch = i_tuning_model(adapter).train(), caption_batch()
    perturb_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gpt2_vit_parallel_adapter_defaults_to_beside_the_ffn():
    model = i_tuning_model(AdapterConfig(targets=["x"], bottleneck=8, parallel=True))
    paths = [p for p, _ in vlpeft.adapted_layers(model)]
    assert paths == [f"gpt2.transformer.h.{i}.mlp" for i in range(2)]
    assert model.cached_part is None  # a feature cache holds one vector per image


# -- Tab. 5 recipes: trainable parameters on the meta device ---------------------------------------
RECIPES = Path(__file__).parents[1] / "launch" / "configs" / "recipes"
D, R, M, LAYERS = 768, 128, 32, 12  # GPT-2 base width, r, r/4, layers
OURS = {  # the arithmetic in each recipe's comment
    "routing_tab5_lora_separate_crossattn": LAYERS * (2 * D * 2 * M + 4 * (2 * M) ** 2
                                                     + 2 * M * 2 * R + 2 * D * R),
    "routing_tab5_lora_separate_proj": LAYERS * (2 * D * 2 * M + 2 * (2 * M * 2 * R) + 2 * D * R),
    "routing_tab5_lora_shared_proj": LAYERS * (2 * 2 * D * R + 3 * D),  # + c_attn's bias
    "routing_tab5_adapter_separate_crossattn": LAYERS * (3 * (D * R + R) + R * D + D),
    "routing_tab5_adapter_shared_proj": LAYERS * (D * R + R + R * D + D),
}  # fmt: skip
PAPER = {  # Tab. 5's column "Param."
    "routing_tab5_lora_separate_crossattn": 4_786_000,
    "routing_tab5_lora_separate_proj": 3_932_000,
    "routing_tab5_lora_shared_proj": 4_746_000,
    "routing_tab5_adapter_separate_crossattn": 4_732_000,
    "routing_tab5_adapter_shared_proj": 1_830_000,
}
NOT_REPRODUCED = {  # no structure of the released code gives the paper's count (recipe comments)
    "routing_tab5_lora_separate_crossattn", "routing_tab5_adapter_shared_proj",
}  # fmt: skip


def test_every_tab5_recipe_is_counted():
    assert sorted(p.stem for p in RECIPES.glob("routing_tab5_*.yaml")) == sorted(OURS)


@pytest.mark.parametrize("name", sorted(OURS))
def test_tab5_recipe_trainable_parameters(name):
    config = load_config(RECIPES / f"{name}.yaml")
    trainable = check_offline(config)["trainable"]
    assert trainable == OURS[name]
    claim = (config.paper.get("params") or {}).get("trainable")
    if name in NOT_REPRODUCED:
        assert claim is None  # the recipe does not claim a count it does not reproduce
        assert abs(trainable / PAPER[name] - 1) > 0.005
        pytest.xfail(f"{name}: ours {trainable:,} vs the paper's {PAPER[name]:,}")
    assert claim == PAPER[name]
    assert abs(trainable / claim - 1) <= 0.005, (trainable, claim)
