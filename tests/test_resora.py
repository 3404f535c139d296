"""ReSoRA: every closed form against its naive definition (materialising each Δh_i), values and gradients."""

import re

import pytest
import torch
from conftest import bart_inputs, perturb_adapters, run, tiny_bart, with_x_r
from torch.utils._python_dispatch import TorchDispatchMode

import vlpeft
from bench.resora import naive_penalty as naive
from vlpeft.adapters import (
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LayerwiseConfig,
    LoRAConfig,
    NullLoRAConfig,
    ReSoRAConfig,
)
from vlpeft.adapters.resora import KINDS, recorder_of, subspace_penalty


@pytest.mark.parametrize(("kind", "shared"), [(k, False) for k in KINDS] + [("kernel", True)])
def test_closed_form_equals_naive_with_equal_gradients(kind, shared):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(40, 5, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    params = {"beta": 0.7, "sigma_frac": 0.8, "max_samples": 25, "seed": 3, "shared_sigma": shared}
    fast = subspace_penalty(z, b, kind, **params)
    ref = naive(z, b, kind, **params)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-8)
    g_fast = torch.autograd.grad(fast, (z, b), allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(ref, (z, b), allow_unused=True, materialize_grads=True)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-8)


def test_linear_penalty_is_sum_of_squared_cosines_hand_case():
    z = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # cos(z1,z2)=0, cos(z1,z3)=cos(z2,z3)=1/√2
    assert subspace_penalty(z, torch.randn(4, 3), "linear").item() == pytest.approx(1.0)


def test_independent_subspaces_have_no_redundancy():
    z = torch.eye(4).repeat(3, 1)  # orthogonal, disjoint activation patterns
    b = torch.eye(6)[:, :4]  # orthogonal up-projection columns
    assert subspace_penalty(z, b, "linear").item() == pytest.approx(0.0)
    assert subspace_penalty(z, b, "cosine").item() == pytest.approx(0.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"z \(..., N, r\) and b \(..., d_out, r\)"):
        subspace_penalty(torch.ones(3, 2), torch.ones(4, 3))
    with pytest.raises(ValueError, match="kind must be one of"):
        ReSoRAConfig(kind="gaussian")


METHODS = [
    ("lora", LoRAConfig(targets=["q_proj", "v_proj"], r=4), bart_inputs),
    ("routed-lora", LoRAConfig(targets=["q_proj"], r=4, routing="proj"), with_x_r(bart_inputs)),
    ("null-lora", NullLoRAConfig(targets=["fc1"], min_rank=4), bart_inputs),
    ("flora", FLoRAConfig(targets=["fc2"], r=3), bart_inputs),
    ("adapter", AdapterConfig(targets=["fc2"], bottleneck=4), bart_inputs),
    ("dora", DoRAConfig(targets=["k_proj"], r=3), bart_inputs),
    (
        "layerwise",
        LayerwiseConfig(
            targets=["q_proj"],
            base={"method": "lora", "r": 4},
            ranks={"model.encoder.layers.0.self_attn.q_proj": 2},
        ),
        bart_inputs,
    ),
]


@pytest.mark.parametrize("method", vlpeft.list_methods())
def test_every_registered_method_has_a_recorder_row(method):
    assert any(c.method == method for _, c, _ in METHODS), f"no METHODS row for {method!r}"


def kept_calls(model):
    """[(list of (z, mask) per call, b)] per adapter layer, as the recorder holds them."""
    return [(calls, b) for _, _, calls, b in recorder_of(model).calls.values()]


def training_bart(config):
    model = tiny_bart().train()
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("row", METHODS, ids=[m[0] for m in METHODS])
def test_model_penalty_is_mean_over_layers_of_recorded_components(row, kind):
    """Layers of one shape are penalised in one batch: the result is still the per-layer mean."""
    _, config, make_inputs = row
    model = training_bart(config)
    inputs = make_inputs()
    run(model, inputs)
    assert recorder_of(model) is None  # not enabled: nothing kept, nothing to pay
    vlpeft.enable_resora(model)
    torch.manual_seed(0)  # the same dropout masks in both forwards below
    run(model, inputs)
    calls = kept_calls(model)
    assert len(calls) == len(list(vlpeft.adapted_layers(model)))
    assert all(len(c) == 1 for c, _ in calls)
    expected = torch.stack(
        [subspace_penalty(c[0][0].reshape(-1, c[0][0].shape[-1]), b, kind) for c, b in calls]
    ).mean()
    penalty = vlpeft.resora_penalty(model, ReSoRAConfig(kind=kind, weight=0.5))
    torch.testing.assert_close(penalty, 0.5 * expected)
    penalty.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if ".adapters." in n)
    # consumed: a second call without a forward has nothing left
    assert vlpeft.resora_penalty(model, ReSoRAConfig()).item() == 0
    summed = ReSoRAConfig(kind=kind, weight=0.5, reduction="sum")
    torch.manual_seed(0)
    run(model, inputs)
    torch.testing.assert_close(
        vlpeft.resora_penalty(model, summed).detach(), 0.5 * expected.detach() * len(calls)
    )


def test_penalty_without_enabling_is_an_error_naming_enable_resora():
    model = training_bart(LoRAConfig(targets=["q_proj"], r=2))
    run(model, bart_inputs())
    with pytest.raises(RuntimeError, match=r"enable_resora\(model\)"):
        vlpeft.resora_penalty(model, ReSoRAConfig())
    # the weight level needs no recording
    assert vlpeft.resora_penalty(model, ReSoRAConfig(samples="weight")).item() > 0


def test_eval_and_no_grad_passes_record_nothing():
    """An evaluation pass of another adapter set before a training step leaves that step's
    penalty and gradients exactly as without it."""
    model = training_bart(LoRAConfig(targets=["q_proj", "v_proj"], r=3))
    vlpeft.add_adapter(model, LoRAConfig(targets=["q_proj", "v_proj"], r=3), name="other")
    perturb_adapters(model, seed=7)
    vlpeft.enable_resora(model)
    inputs, config = bart_inputs(), ReSoRAConfig(weight=1.0)

    def step(evaluate_first: bool):
        vlpeft.set_active_adapter(model, "default")
        if evaluate_first:
            vlpeft.set_active_adapter(model, "other")
            model.eval()
            run(model, inputs)  # eval mode, grad on
            with torch.no_grad():
                model.train()
                run(model, inputs)  # training mode, no grad
            vlpeft.set_active_adapter(model, "default")
            model.train()
        torch.manual_seed(0)
        run(model, inputs)
        penalty = vlpeft.resora_penalty(model, config)
        params = [p for n, p in model.named_parameters() if ".default." in n]
        grads = torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True)
        return penalty.detach(), grads

    plain, plain_grads = step(False)
    after_eval, eval_grads = step(True)
    assert plain.item() > 0
    torch.testing.assert_close(after_eval, plain)
    for a, b in zip(eval_grads, plain_grads):
        torch.testing.assert_close(a, b)


class TwiceCalled(torch.nn.Module):
    """One layer applied to two sequences in one forward (as BLIP's text encoder: ITC, then ITM)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 6)

    def forward(self, a, b):
        return self.proj(a).sum() + self.proj(b).sum()


def test_both_calls_of_a_twice_called_layer_count():
    net = TwiceCalled().train()
    vlpeft.add_adapter(net, LoRAConfig(targets=["proj"], r=3))
    perturb_adapters(net)
    vlpeft.enable_resora(net)
    a, b = torch.randn(2, 4, 6), torch.randn(3, 5, 6)
    net(a, b)
    ad = net.proj.adapters["default"]
    z = torch.cat([(a @ ad.lora_A.T).reshape(-1, 3), (b @ ad.lora_A.T).reshape(-1, 3)])
    got = vlpeft.resora_penalty(net, ReSoRAConfig(weight=1.0))
    torch.testing.assert_close(got, subspace_penalty(z, ad.lora_B * ad.scaling, "linear"))


def test_gradient_checkpointing_recompute_is_not_recorded_twice():
    from torch.utils.checkpoint import checkpoint

    net = TwiceCalled().train()
    vlpeft.add_adapter(net, LoRAConfig(targets=["proj"], r=3))
    perturb_adapters(net)
    vlpeft.enable_resora(net)
    a, b = torch.randn(2, 4, 6), torch.randn(3, 5, 6)
    config = ReSoRAConfig(weight=1.0)
    grads = []
    for checkpointed in (False, True):
        out = checkpoint(net, a, b, use_reentrant=False) if checkpointed else net(a, b)
        assert len(recorder_of(net)) == 2
        total = out + vlpeft.resora_penalty(net, config)
        grads.append(torch.autograd.grad(total, [p for p in net.parameters() if p.requires_grad]))
        assert len(recorder_of(net)) == 0  # the recompute during backward kept nothing
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(plain, ckpt)


def test_two_stage_schedule_and_padding_mask():
    model = training_bart(LoRAConfig(targets=["encoder.layers.0.self_attn.q_proj"], r=3))
    vlpeft.enable_resora(model)
    inputs = bart_inputs()
    mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, 4:] = False
    config = ReSoRAConfig(start_step=10, samples="tokens")
    run(model, inputs)
    assert vlpeft.resora_penalty(model, config, step=9).item() == 0
    assert len(recorder_of(model)) == 0  # released before start_step too
    vlpeft.set_token_masks(model, mask)
    torch.manual_seed(0)  # the same dropout in both forwards
    run(model, inputs)
    ((calls, b),) = kept_calls(model)
    z, m = calls[0]
    assert torch.equal(m, mask)
    got = vlpeft.resora_penalty(model, config, step=10)
    torch.testing.assert_close(got, 0.1 * subspace_penalty(z[mask], b, "linear"))
    torch.manual_seed(0)
    run(model, inputs)
    pooled = vlpeft.resora_penalty(model, ReSoRAConfig(samples="pooled"))
    means = torch.stack([z[0, :4].mean(0), z[1].mean(0)])
    torch.testing.assert_close(pooled, 0.1 * subspace_penalty(means, b, "linear"))


def test_a_mask_of_another_sequence_is_an_error_naming_the_layer():
    model = training_bart(LoRAConfig(targets=["encoder.layers.0.self_attn.q_proj"], r=3))
    vlpeft.enable_resora(model)
    vlpeft.set_token_masks(model, torch.ones(2, 5))  # the decoder's length, not the encoder's
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.q_proj.*\(2, 5\)"):
        run(model, bart_inputs())


def test_weight_level_variant_uses_the_rank1_weight_components():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=3, alpha=3))
    perturb_adapters(net)
    ad = net[0].adapters["default"]
    got = vlpeft.resora_penalty(net, ReSoRAConfig(samples="weight", kind="cosine", weight=1.0))
    # ΔW_i = b_i a_iᵀ: the increments for the inputs e_k are b_i·A[i, k]
    torch.testing.assert_close(got, naive(ad.lora_A.T.detach(), ad.lora_B.detach(), "cosine"))


def vl_batch():
    return {
        "images": torch.randn(2, 3, 64, 64),
        "text": ["vqa: what color is the big circle on the left?", "vqa: how many?"],
        "targets": ["red", "two small blue squares"],
    }


def test_clip_bart_sets_each_components_padding_mask():
    """Encoder, decoder and cross-attention layers of CLIP-BART record the mask of their own
    sequence (text + visual tokens, targets); an evaluation pass records nothing."""
    from vlpeft.models import build_model

    model = build_model("clip-bart", "tiny").train()
    vlpeft.add_adapter(
        model, model.adapter_config(LoRAConfig(r=2, targets=["x"]), kinds=["q", "k", "v"])
    )
    vlpeft.enable_resora(model)
    batch = vl_batch()
    model(batch)
    text = model.tokenize(batch["text"])["attention_mask"].bool()
    encoder = torch.cat([text, torch.ones(2, 4, dtype=torch.bool)], 1)  # 2 × 2 visual tokens
    decoder = model.tokenize(batch["targets"])["attention_mask"].bool()
    assert encoder.shape[1] != decoder.shape[1] and not encoder.all() and not decoder.all()
    seen = set()
    for layer, _, calls, _ in recorder_of(model).calls.values():
        ((_, mask),) = calls
        name = layer.layer_name
        reads_encoder = ".encoder." in name or re.search(r"encoder_attn\.[kv]_proj", name)
        assert torch.equal(mask, encoder if reads_encoder else decoder), name
        seen.add(bool(reads_encoder))
    assert seen == {True, False}
    vlpeft.resora_penalty(model, ReSoRAConfig())
    model.eval()
    model(batch)
    assert len(recorder_of(model)) == 0


def test_blip_records_both_text_encoder_calls_with_their_masks():
    """Retrieval runs the text encoder twice (ITC texts, then ITM pairs): both calls count, each
    with its own padding mask; image tokens are all real."""
    from vlpeft.models import build_model

    model = build_model("blip", "tiny", heads=["retrieval"]).train()
    config = model.adapter_config(
        LoRAConfig(r=2, targets=["x"]), ["vision", "text_encoder"], ["qkv", "q", "v"]
    )
    vlpeft.add_adapter(model, config)
    vlpeft.enable_resora(model)
    texts = ["a small red circle on the left and a blue square", "two shapes"]
    batch = {
        "kind": "retrieval",
        "images": torch.randn(2, 3, 32, 32),
        "text": texts,
        "image_ids": [0, 1],
    }
    model(batch)
    text = model.tokenize(texts)["attention_mask"].bool()
    for layer, _, calls, _ in recorder_of(model).calls.values():
        name = layer.layer_name
        if name.startswith("vision_model"):
            assert len(calls) == 1 and calls[0][1] is None, name
        elif re.search(r"crossattention\.self\.(key|value)", name):  # ITM, on image states
            assert len(calls) == 1 and calls[0][1] is None, name
        elif "crossattention" in name:  # ITM only: the pairs' texts
            assert len(calls) == 1 and calls[0][0].shape[0] == 6 and not calls[0][1].all(), name
        else:  # ITC on the texts, then ITM on positive and negative pairs
            assert len(calls) == 2, name
            (z_itc, itc), (z_itm, itm) = calls
            assert torch.equal(itc, text) and z_itc.shape[0] == 2, name
            assert z_itm.shape[0] == 6 and not itm.all(), name
            assert all(any(torch.equal(row, t) for t in text) for row in itm), name


@pytest.mark.parametrize("kind", KINDS)
def test_float32_keeps_float64_accuracy_at_full_sample_size(kind):
    """At N = 512 (the kernel kind's cap) float32 stays within 1e-3 of float64 (a closed form that
    cancels large terms, e.g. uncentred HSIC Gram sums, loses ~2 % here)."""
    g = torch.Generator().manual_seed(0)
    z, b = torch.randn(3, 512, 8, generator=g), torch.randn(3, 96, 8, generator=g)
    low = subspace_penalty(z, b, kind)
    high = subspace_penalty(z.double(), b.double(), kind)
    torch.testing.assert_close(low.double(), high, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_components_without_an_increment_contribute_nothing(kind):
    """B = 0 (a LoRA at initialisation): Δh_i = b_i z_i = 0, Eq. 7 is 0/0; every kind gives 0, and
    a zero column leaves the penalty of the other columns."""
    g = torch.Generator().manual_seed(0)
    z, b = torch.randn(30, 4, generator=g), torch.randn(9, 4, generator=g)
    assert subspace_penalty(z, torch.zeros(9, 4), kind).item() == 0
    dead = b.clone()
    dead[:, 1] = 0
    keep = [0, 2, 3]
    params = {"max_samples": 30}
    torch.testing.assert_close(
        subspace_penalty(z, dead, kind, **params),
        subspace_penalty(z[:, keep], b[:, keep], kind, **params),
    )
    silent = z.clone()
    silent[:, 2] = 0  # a component that never activates
    keep = [0, 1, 3]
    torch.testing.assert_close(
        subspace_penalty(silent, b, kind, **params),
        subspace_penalty(z[:, keep], b[:, keep], kind, **params),
    )
    net = torch.nn.Sequential(torch.nn.Linear(6, 5)).train()
    vlpeft.add_adapter(net, LoRAConfig(targets=["0"], r=3))
    vlpeft.enable_resora(net)
    net(torch.randn(4, 6))
    assert vlpeft.resora_penalty(net, ReSoRAConfig(kind=kind)).item() == 0


def test_conv_adapters_record_or_refuse():
    """LoRA on a Conv2d records every output position as a sample (it used to add a silent 0);
    FLoRA on a Conv2d has no rank-1 components and is refused when ReSoRA is enabled."""
    from conftest import tiny_convnet

    net = tiny_convnet().train()
    vlpeft.add_adapter(net, LoRAConfig(targets=["conv1"], r=3))
    perturb_adapters(net)
    vlpeft.enable_resora(net)
    x = torch.randn(2, 3, 8, 8)
    net(x)
    ad = net.conv1.adapters["default"]
    z = torch.nn.functional.conv2d(x, ad.lora_A, None, 1, 1).permute(0, 2, 3, 1).reshape(-1, 3)
    got = vlpeft.resora_penalty(net, ReSoRAConfig(weight=1.0))
    torch.testing.assert_close(
        got, subspace_penalty(z, ad.lora_B.flatten(1) * ad.scaling, "linear")
    )
    assert got.item() > 0
    other = tiny_convnet()
    vlpeft.add_adapter(other, FLoRAConfig(targets=["conv1"], r=2))
    with pytest.raises(TypeError, match="ReSoRA cannot regularise adapter 'default' at conv1"):
        vlpeft.enable_resora(other)


# -- issue #18: padding as 0/1 sample weights, batched by shape, nothing that waits for the device --
SYNCING = {"nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique2"}


class SyncDetector(TorchDispatchMode):
    """The operators that read a device value on the host: those in SYNCING and indexing with a
    boolean mask (its output size is the mask's count)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = [a for arg in args for a in (arg if isinstance(arg, list | tuple) else [arg])]
        boolean = any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat)
        if name in SYNCING or (name in ("index", "index_put", "index_put_") and boolean):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("kind", "shared"), [(k, False) for k in KINDS] + [("kernel", True)])
@pytest.mark.parametrize("batched", [False, True])
def test_weighted_samples_equal_the_selected_rows(kind, shared, batched):
    """A padding mask as weights gives the penalty (and the gradients) of the real rows alone."""
    g = torch.Generator().manual_seed(1)
    layers = 3 if batched else 1
    z = (torch.randn(layers, 30, 5, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(layers, 12, 5, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    mask = torch.rand(layers, 30, generator=g) > 0.35
    mask[:, :3] = True
    params = {"beta": 0.7, "sigma_frac": 0.8, "max_samples": 64, "seed": 3, "shared_sigma": shared}
    for i in range(layers):  # every row of the batch against its own selection
        assert mask[i].sum() < 30
    got = subspace_penalty(z if batched else z[0], b if batched else b[0], kind,
                           mask if batched else mask[0], **params)  # fmt: skip
    want = torch.stack(
        [subspace_penalty(z[i][mask[i]], b[i], kind, **params) for i in range(layers)]
    )
    torch.testing.assert_close(got, want if batched else want[0], rtol=1e-7, atol=1e-10)
    unused = {"allow_unused": True, "materialize_grads": True}  # linear: b only masks pairs
    g_got = torch.autograd.grad(got.sum(), (z, b), **unused)
    g_want = torch.autograd.grad(want.sum(), (z, b), **unused)
    assert any(r.abs().max() > 0 for r in g_want)  # linear has none in b, cosine none in z
    for a, r in zip(g_got, g_want):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-10)


def test_weighted_kernel_subsample_draws_real_rows_only():
    """Over max_samples real rows, the weighted kernel kind keeps max_samples of the real rows:
    the same penalty as the unweighted kind on those rows."""
    from vlpeft.adapters.resora import _subsample_weighted

    g = torch.Generator().manual_seed(2)
    z = torch.randn(50, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(50, generator=g) > 0.3
    kept, w = _subsample_weighted(z, mask.double(), cap=20, seed=5)
    assert kept.shape == (20, 4) and bool((w == 1).all())
    real = {tuple(row.tolist()) for row in z[mask]}
    assert all(tuple(row.tolist()) in real for row in kept)
    b = torch.randn(9, 4, generator=g, dtype=torch.float64)
    got = subspace_penalty(z, b, "kernel", mask, max_samples=20, seed=5)
    torch.testing.assert_close(got, subspace_penalty(kept, b, "kernel", max_samples=20))


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_penalty_with_padding_dispatches_nothing_that_synchronises(kind):
    """No operator that reads a device value on the host (boolean indexing's nonzero, .item())
    runs in resora_penalty, padding masks included: on a GPU it only queues kernels."""

    # the encoder's q and v of every layer: one shape, one batched call, one padding mask
    model = training_bart(
        LoRAConfig(targets=r"model\.encoder\.layers\.\d+\.self_attn\.[qv]_proj", r=3)
    )
    vlpeft.enable_resora(model)
    inputs = bart_inputs()
    mask = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, 4:] = False
    vlpeft.set_token_masks(model, mask)
    run(model, inputs)
    assert len(recorder_of(model)) >= 4
    config = ReSoRAConfig(kind=kind, samples="tokens", max_samples=8)
    with SyncDetector() as detector:
        penalty = vlpeft.resora_penalty(model, config)
    assert penalty.requires_grad and torch.isfinite(penalty)
    assert not detector.found
    with SyncDetector() as detector:  # the detector sees what it is meant to
        torch.randn(4)[torch.tensor([True, False, True, False])]
    assert detector.found == ["index"]
