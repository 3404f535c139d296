"""Null-LoRA: the null-space facts of the paper on weights with a planted rank deficiency."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import perturb_adapters

import vlpeft
from vlpeft.adapters import NullLoRAConfig, nulllora_report
from vlpeft.adapters import nulllora as nl


def planted(d_out, d_in, deficiency, seed=0):
    """A Linear whose weight has exactly ``deficiency`` zero singular values (beyond the structural ones)."""
    g = torch.Generator().manual_seed(seed)
    rank = min(d_out, d_in) - deficiency
    w = torch.randn(d_out, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, d_in, generator=g, dtype=torch.float64
    )
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(w / w.abs().max())
    return lin


def adapted(lin, **kw):
    net = torch.nn.Sequential(lin)
    vlpeft.add_adapter(net, NullLoRAConfig(targets=["0"], **kw))
    perturb_adapters(net, scale=0.5)  # random B, A and s
    return net, net[0]


@pytest.mark.parametrize("shape", [(24, 24), (32, 20), (20, 32)])
def test_update_lies_in_the_left_null_space(shape):
    d_out, d_in = shape
    net, layer = adapted(planted(d_out, d_in, deficiency=3), min_rank=2, max_rank=16)
    w0 = layer.base_layer.weight.double()
    delta = layer.delta_weight().double()
    assert delta.abs().max() > 1e-2
    # W0ᵀ ΔW = 0 (Eq. 7), to float tolerance relative to the sizes involved
    assert (w0.T @ delta).abs().max() < 1e-5 * w0.abs().max() * delta.abs().max() * max(shape)
    # the first half's rows lie in the right null space: P·B·S₁·A_f·W0ᵀ = 0
    ad = layer.adapters["default"]
    h = ad.lora_A.shape[0]
    first = ad.projected_b() @ torch.diag(ad.scale[:h]) @ ad.null_right
    assert (first.double() @ w0.T).abs().max() < 1e-5 * max(shape)


def test_rank_is_twice_the_nullity_inside_the_clip_range():
    _, layer = adapted(planted(24, 24, deficiency=3), min_rank=2, max_rank=16)
    report = layer.adapters["default"].report
    assert (report["left_nullity"], report["right_nullity"], report["rank"]) == (3, 3, 6)
    assert report["left_exact"] and report["right_exact"]
    # tall: the structural left null directions do not raise the rank beyond the right nullity
    _, tall = adapted(planted(32, 20, deficiency=3), min_rank=2, max_rank=16)
    assert (tall.adapters["default"].report["left_nullity"], tall.rank) == (15, 6)
    # clipped at max_rank
    _, capped = adapted(planted(24, 24, deficiency=6), min_rank=2, max_rank=8)
    assert capped.rank == 8


def test_near_null_directions_fill_up_to_min_rank_and_are_reported():
    _, layer = adapted(planted(16, 16, deficiency=1), min_rank=6, max_rank=16)
    report = layer.adapters["default"].report
    assert report["rank"] == 6 and report["left_nullity"] == 1 and not report["left_exact"]
    # the directions taken are those of the smallest singular values
    u, s, vh = torch.linalg.svd(layer.base_layer.weight.double())
    ad = layer.adapters["default"]
    overlap = (u[:, -3:].T @ ad.null_left.double()).abs()
    torch.testing.assert_close(
        torch.linalg.svdvals(overlap), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_forward_equals_the_naive_definition_with_a_dense_projector():
    net, layer = adapted(planted(12, 10, deficiency=2), min_rank=2, max_rank=8)
    ad = layer.adapters["default"]
    h = ad.lora_A.shape[0]
    p = ad.null_left @ ad.null_left.T  # dense P, only here as the reference
    s1, s2 = torch.diag(ad.scale[:h]), torch.diag(ad.scale[h:])
    delta = p @ ad.lora_B @ s1 @ ad.null_right + ad.null_left @ s2 @ ad.lora_A
    x = torch.randn(4, 10)
    torch.testing.assert_close(net(x), layer.base_layer(x) + x @ delta.T)
    torch.testing.assert_close(layer.delta_weight(), delta)


def test_frozen_bases_train_nothing_and_start_from_zero_update():
    lin = planted(12, 12, deficiency=2)
    net = torch.nn.Sequential(lin)
    vlpeft.add_adapter(net, NullLoRAConfig(targets=["0"], min_rank=2))
    ad = net[0].adapters["default"]
    assert torch.count_nonzero(net[0].delta_weight()) == 0
    assert torch.equal(ad.scale, torch.ones_like(ad.scale))
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names == {
        "0.adapters.default.lora_A",
        "0.adapters.default.lora_B",
        "0.adapters.default.scale",
    }
    assert {"0.adapters.default.null_left", "0.adapters.default.null_right"} <= set(
        net.state_dict()
    )


def test_svd_cache_is_keyed_by_content_and_skips_the_second_svd(tmp_path, monkeypatch):
    lin = planted(16, 12, deficiency=2)
    config = dict(min_rank=2, max_rank=8, cache_dir=str(tmp_path))
    first = adapted(lin, **config)[1].adapters["default"].null_left.clone()
    assert len(list(tmp_path.glob("nullspace-*.safetensors"))) == 1

    def no_svd(*a, **k):
        raise AssertionError("SVD recomputed despite the cache")

    monkeypatch.setattr(nl, "null_space", no_svd)
    again = adapted(planted(16, 12, deficiency=2), **config)[1].adapters["default"]
    assert torch.equal(again.null_left, first)
    with pytest.raises(AssertionError, match="recomputed"):
        adapted(planted(16, 12, deficiency=2, seed=1), **config)  # other content, other key


def test_rank_report_json_and_png(tmp_path):
    model = torch.nn.Sequential(planted(16, 16, 2), torch.nn.ReLU(), planted(16, 16, 0, seed=3))
    vlpeft.add_adapter(model, NullLoRAConfig(targets=["0", "2"], min_rank=2, max_rank=8))
    rows = nulllora_report.write_rank_report(model, tmp_path)
    assert [r["rank"] for r in rows] == [4, 2]
    assert json.loads((tmp_path / "null_lora_ranks.json").read_text()) == rows
    assert (tmp_path / "null_lora_ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert nulllora_report.rank_report(model) == rows


def test_importing_vlpeft_loads_no_plotting_library():
    """The rank report's plot imports matplotlib when a plot is written, never at import time."""
    code = "import sys, vlpeft; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_exports_as_a_plain_lora_of_rank_r(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = torch.nn.Sequential(planted(10, 8, 2), torch.nn.Tanh(), planted(6, 10, 1, seed=2))
    ref = torch.nn.Sequential(planted(10, 8, 2), torch.nn.Tanh(), planted(6, 10, 1, seed=2))
    ref.load_state_dict(base.state_dict())
    vlpeft.add_adapter(base, NullLoRAConfig(targets=["0", "2"], min_rank=2, max_rank=8))
    perturb_adapters(base)
    x = torch.randn(3, 8)
    vlpeft.export_peft_lora(base, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"0": 4, "2": 2}
    torch.testing.assert_close(PeftModel.from_pretrained(ref, tmp_path)(x), base(x))


def test_config_validation():
    with pytest.raises(ValueError, match="even"):
        NullLoRAConfig(targets=["q"], min_rank=3)
    with pytest.raises(TypeError, match="supports nn.Linear"):
        vlpeft.add_adapter(
            torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1)), NullLoRAConfig(targets=["0"])
        )


@pytest.mark.parametrize("shape", [(48, 12), (12, 48), (20, 16)])
def test_null_space_matches_the_full_svd(shape):
    """The thin SVD + seeded complement spans what a full SVD's trailing directions span."""
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    d_out, d_in = shape
    config = NullLoRAConfig(targets=["x"], min_rank=2 * min(d_out, d_in), max_rank=64)
    ns = nl.null_space(w.float(), config)
    h = ns["half_rank"]
    left, right = ns["left"].double(), ns["right"].double()
    eye = torch.eye(h, dtype=torch.float64)
    torch.testing.assert_close(left.T @ left, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(right @ right.T, eye, atol=1e-6, rtol=0)
    w32 = w.float().double()
    u, _, vh = torch.linalg.svd(w32, full_matrices=True)
    for ours, ref, matrix in ((left, u.flip(1)[:, :h], w32), (right.T, vh.flip(0)[:h].T, w32.T)):
        n, k = matrix.shape[0], min(shape)
        if h >= n - k:  # the subspace is unique (distinct singular values): the same projector
            torch.testing.assert_close(ours @ ours.T, ref @ ref.T, atol=1e-5, rtol=0)
        else:  # some of the structural null space: any basis of it will do
            assert (matrix.T @ ours).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("upcast", [False, True])
def test_rank_is_twice_the_planted_nullity_in_every_storage_format(dtype, upcast):
    """The paper's rank (2 × nullity, no clipping by default) on weights stored in fp32, bf16 and
    fp16 — as the layer's own dtype or upcast to float32 after loading — with W0ᵀΔW = 0 to the
    storage precision. A threshold relative to float32 finds no null space in a bf16 weight."""
    lin = planted(40, 40, deficiency=8, seed=3)
    with torch.no_grad():
        stored = lin.weight.to(getattr(torch, dtype))
        lin = lin.to(torch.float32 if upcast else getattr(torch, dtype))
        lin.weight.copy_(stored.to(lin.weight.dtype))
    net, layer = adapted(lin)
    report = layer.adapters["default"].report
    assert (report["left_nullity"], report["rank"], report["null_leak"]) == (8, 16, 0.0)
    w0, delta = layer.base_layer.weight.double(), layer.delta_weight().double()
    u = nl.ROUNDOFF[dtype]
    assert delta.abs().max() > 1e-2
    assert (w0.T @ delta).norm() <= 4 * u * w0.norm() * delta.norm()
    if dtype == "bfloat16":
        old = nl.null_space(
            layer.base_layer.weight, NullLoRAConfig(targets=["q"], rtol=40 * 2**-23)
        )
        assert old["left_nullity"] == 0


def test_a_layer_without_null_space_gets_no_update(tmp_path):
    full, deficient = planted(12, 12, deficiency=0, seed=1), planted(12, 12, deficiency=2, seed=2)
    x = torch.randn(3, 12)
    before = full(x)
    net = torch.nn.Sequential(full, deficient)
    vlpeft.add_adapter(net, NullLoRAConfig(targets=["0", "1"]))
    perturb_adapters(net, scale=0.5)
    assert (net[0].rank, net[1].rank) == (0, 4)
    assert net[0].adapters["default"].report["rank"] == 0
    torch.testing.assert_close(net[0](x), before)  # no update, no parameters
    assert not [n for n, _ in net[0].named_parameters() if ".adapters." in n]
    vlpeft.export_peft_lora(net, tmp_path / "peft")  # the rank-0 layer is left out
    alone = torch.nn.Sequential(planted(12, 12, deficiency=0, seed=1))
    with pytest.raises(ValueError, match="none of the 1 target layers has a null space"):
        vlpeft.add_adapter(alone, NullLoRAConfig(targets=["0"]))
    assert not any(True for _ in vlpeft.adapted_layers(alone))  # refused before touching it


def test_near_null_fill_reports_how_far_the_update_leaves_the_null_space():
    lin = planted(16, 16, deficiency=1, seed=2)
    _, layer = adapted(lin, min_rank=6)
    report = layer.adapters["default"].report
    s = torch.linalg.svdvals(lin.weight.double())
    assert report["rank"] == 6 and report["null_leak"] == pytest.approx(
        float(s[-3] / s[0]), rel=1e-5
    )
    w0, delta = lin.weight.double(), layer.delta_weight().double()
    bound = (
        report["null_leak"] * torch.linalg.matrix_norm(w0, 2) * torch.linalg.matrix_norm(delta, 2)
    )
    assert (w0.T @ delta).norm(2) > 1e-3 and torch.linalg.matrix_norm(
        w0.T @ delta, 2
    ) <= bound * 1.001


def test_gpt2_conv1d_update_lies_in_the_null_space_of_the_out_in_weight():
    """A Conv1D stores W0 as (in, out): the null space is that of W0 = weightᵀ. Using the weight
    untransposed breaks W0ᵀΔW = 0 silently on a square layer, so the test is on a square one."""
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    layer = model.transformer.h[0].attn.c_proj  # Conv1D 32 → 32
    g = torch.Generator().manual_seed(0)
    low = torch.randn(32, 26, generator=g) @ torch.randn(26, 32, generator=g)  # W0 (out, in)
    with torch.no_grad():
        layer.weight.copy_((low / low.abs().max()).T)  # stored (in, out)
    vlpeft.add_adapter(model, NullLoRAConfig(targets=["h.0.attn.c_proj"]))
    perturb_adapters(model, scale=0.5)
    adapted = model.transformer.h[0].attn.c_proj
    w0 = adapted.base_layer.weight.double().T  # (out, in)
    delta = adapted.delta_weight().double().T  # delta_weight is in the stored (in, out) layout
    assert adapted.rank == 12 and delta.abs().max() > 1e-2
    assert (w0.T @ delta).abs().max() < 1e-5 * w0.abs().max() * delta.abs().max() * 32


@pytest.mark.parametrize("seed", range(12))
def test_the_gap_nearest_the_bound_is_the_null_space_boundary(seed):
    """bf16 noise under a planted nullity can hold a larger ratio between its own tiny values than
    the real gap; the cut is at the topmost clear gap, so the nullity stays the planted one."""
    lin = planted(64, 64, deficiency=12, seed=100 + seed)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.to(torch.bfloat16).float())
    ns = nl.null_space(lin.weight, NullLoRAConfig(targets=["q"]))
    assert ns["left_nullity"] == 12


# -- the fused forward (issue #18): LoRA's two GEMMs, the same parameters, ΔW and checkpoints ------
def naive_delta(ad):
    """Eq. (10) with a dense projector, only here: P·B·S₁·A_f + B_f·S₂·A."""
    h = ad.lora_A.shape[0]
    p = ad.null_left @ ad.null_left.T
    s1, s2 = torch.diag(ad.scale[:h]), torch.diag(ad.scale[h:])
    return p @ ad.lora_B @ s1 @ ad.null_right + ad.null_left @ s2 @ ad.lora_A


def naive_forward_and_grads(net, x):
    """Output, dL/dx and dL/d(A, B, s) of base(x) + x·ΔWᵀ by autograd through ``naive_delta``."""
    layer, ad = net[0], net[0].adapters["default"]
    x = x.clone().requires_grad_()
    y = layer.base_layer(x) + x @ naive_delta(ad).T
    params = (ad.lora_A, ad.lora_B, ad.scale)
    grads = torch.autograd.grad((y.square().sum() + y.sum()), (x, *params))
    return y.detach(), grads


def fused_forward_and_grads(net, x):
    ad = net[0].adapters["default"]
    x = x.clone().requires_grad_()
    y = net(x)
    params = (ad.lora_A, ad.lora_B, ad.scale)
    grads = torch.autograd.grad((y.square().sum() + y.sum()), (x, *params))
    return y.detach(), grads


def assert_matches_naive(net, x, **tol):
    want_y, want_g = naive_forward_and_grads(net, x)
    got_y, got_g = fused_forward_and_grads(net, x)
    torch.testing.assert_close(got_y, want_y, **tol)
    for got, want, name in zip(got_g, want_g, ("x", "lora_A", "lora_B", "scale")):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, msg=name, **tol)


def fused_net(shape=(14, 10), deficiency=3, **kw):
    net, _ = adapted(planted(*shape, deficiency=deficiency, seed=11), **kw)
    return net


@pytest.mark.parametrize("shape", [(14, 10), (10, 14), (12, 12)])
def test_fused_forward_and_gradients_equal_the_naive_formula(shape):
    net = fused_net(shape, min_rank=4)
    ad = net[0].adapters["default"]
    calls, fused = [], ad.fused
    ad.fused = lambda *args: calls.append(1) or fused(*args)
    x = torch.randn(3, 5, shape[1])
    assert_matches_naive(net, x)
    assert calls  # the fused path ran
    torch.testing.assert_close(net[0].delta_weight(), naive_delta(ad))
    assert_matches_naive(net, torch.randn(4, shape[1]))  # 2-D input


def test_fused_keeps_the_parameters_state_dict_and_count():
    net = fused_net(min_rank=4)
    ad = net[0].adapters["default"]
    h, (d_out, d_in) = ad.lora_A.shape[0], net[0].base_layer.weight.shape
    net(torch.randn(2, d_in))  # builds the cache
    assert {n for n, p in ad.named_parameters()} == {"lora_A", "lora_B", "scale"}
    assert vlpeft.count_parameters(net)[0] == h * d_in + d_out * h + 2 * h
    assert set(ad.state_dict()) == {"null_left", "null_right", "lora_A", "lora_B", "scale"}


def test_the_fused_forward_follows_every_change_of_the_parameters():
    """In float64: the parameters grow through the updates and edits below, and the naive and
    fused paths sum in different orders; float32 rounding of the larger gradients then exceeds
    float32's default tolerance on near-cancelling entries, float64's never."""
    net = fused_net(min_rank=4).double()
    ad = net[0].adapters["default"]
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    assert_matches_naive(net, x)
    opt = torch.optim.AdamW(ad.parameters(), lr=0.05)  # in-place updates (version counters)
    for _ in range(2):
        net(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert_matches_naive(net, x)
    for tensor in (ad.lora_A, ad.lora_B, ad.scale, ad.null_right, ad.null_left):
        with torch.no_grad():  # a direct in-place edit of each source, bases included
            tensor.mul_(1.5)
        assert_matches_naive(net, x)
    other = fused_net(min_rank=4).double()
    perturb_adapters(other, scale=1.0, seed=9)
    net.load_state_dict(other.state_dict())  # copy_ into the same tensors
    assert_matches_naive(net, x)
    torch.testing.assert_close(net(x), other(x))
    # writes that bump no version counter: through .data (load_adapter, the ZeRO-3 evaluation
    # replica) and through a view of a flat buffer (DeepSpeed ZeRO-1/2 keeps parameters so)
    ad.lora_B.data.copy_(torch.randn_like(ad.lora_B))
    assert_matches_naive(net, x)
    flat = torch.cat([ad.lora_A.detach().flatten(), ad.lora_B.detach().flatten()])
    ad.lora_A.data = flat[: ad.lora_A.numel()].view_as(ad.lora_A)
    ad.lora_B.data = flat[ad.lora_A.numel() :].view_as(ad.lora_B)
    net(x)
    flat.mul_(0.5)  # the "optimizer" updates the flat buffer
    assert_matches_naive(net, x)


def test_the_cache_follows_dtype_moves_deepcopy_and_pickling():
    import copy
    import pickle

    net = fused_net(min_rank=4)
    x = torch.randn(2, 3, 10)
    before = net(x)
    double = copy.deepcopy(net).double()
    assert_matches_naive(double, x.double())
    torch.testing.assert_close(double(x.double()).float(), before)
    back = double.float()  # a round trip: new storage each time, the same values
    torch.testing.assert_close(back(x), before)
    clone = copy.deepcopy(net)
    with torch.no_grad():
        clone[0].adapters["default"].lora_B.add_(1.0)  # the copy's change stays in the copy
    torch.testing.assert_close(net(x), before)
    assert not torch.allclose(clone(x), before)
    assert_matches_naive(clone, x)
    restored = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(restored(x), before)


def test_fused_under_merge_unmerge_and_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    net = fused_net(min_rank=4)
    x = torch.randn(2, 3, 10)
    unmerged = net(x)
    vlpeft.merge_adapter(net)
    torch.testing.assert_close(net(x), unmerged, rtol=1e-5, atol=1e-5)
    vlpeft.unmerge_adapter(net)
    torch.testing.assert_close(net(x), unmerged)
    want_y, want_g = fused_forward_and_grads(net, x)
    ad = net[0].adapters["default"]
    params = (ad.lora_A, ad.lora_B, ad.scale)
    for reentrant in (False, True):
        xx = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        y = checkpoint(net, xx, use_reentrant=reentrant)
        (y.square().sum() + y.sum()).backward()
        got = (xx.grad, *(p.grad for p in params))
        torch.testing.assert_close(y, want_y)
        for a, b in zip(got, want_g):
            torch.testing.assert_close(a, b)


def test_fused_under_bf16_autocast_matches_the_differentiable_path():
    net = fused_net(min_rank=4)
    ad = net[0].adapters["default"]
    x = torch.randn(4, 6, 10)
    params = (ad.lora_A, ad.lora_B, ad.scale)

    def run(generic):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net[0].base_layer(xx)
            if generic:  # the differentiable formulation, autocast casting each GEMM's inputs
                y = y + torch.nn.functional.linear(ad.bottleneck(xx), ad.up_columns()).to(y.dtype)
            else:
                y = net(xx)
        grads = torch.autograd.grad(y.float().square().sum(), (xx, *params))
        return y, grads

    (y_fused, g_fused), (y_ref, g_ref) = run(False), run(True)
    assert y_fused.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g_fused[1:])
    torch.testing.assert_close(y_fused, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))


def test_a_checkpoint_saved_before_the_fused_forward_loads_unchanged():
    """tests/fixtures/null_lora_unfused was written by vlpeft before the fused forward (commit
    46879a8): the same files load, and the model gives Eq. (10) of the tensors in the file."""
    from pathlib import Path

    from safetensors.torch import load_file

    fixture = Path(__file__).parent / "fixtures" / "null_lora_unfused"
    net = torch.nn.Sequential(
        planted(12, 10, deficiency=2, seed=4),
        torch.nn.Tanh(),
        planted(10, 12, deficiency=3, seed=5),
    )
    bare = torch.nn.Sequential(
        planted(12, 10, deficiency=2, seed=4),
        torch.nn.Tanh(),
        planted(10, 12, deficiency=3, seed=5),
    )
    base_state = load_file(str(fixture / "base_model.safetensors"))
    net.load_state_dict(base_state)
    bare.load_state_dict(base_state)
    vlpeft.load_adapter(net, fixture)
    saved = load_file(str(fixture / "adapter_model.safetensors"))
    x = torch.randn(3, 10)
    h = bare[0](x)
    for i in ("0", "2"):
        ad = net.get_submodule(i).adapters["default"]
        for key in ("lora_A", "lora_B", "scale", "null_left", "null_right"):
            assert torch.equal(getattr(ad, key), saved[f"{i}.{key}"])
        p = saved[f"{i}.null_left"] @ saved[f"{i}.null_left"].T
        k = saved[f"{i}.lora_A"].shape[0]
        s1, s2 = torch.diag(saved[f"{i}.scale"][:k]), torch.diag(saved[f"{i}.scale"][k:])
        delta = p @ saved[f"{i}.lora_B"] @ s1 @ saved[f"{i}.null_right"]
        delta = delta + saved[f"{i}.null_left"] @ s2 @ saved[f"{i}.lora_A"]
        assert delta.abs().max() > 1e-2
        torch.testing.assert_close(net.get_submodule(i).delta_weight(), delta)
        if i == "0":
            expected = h + x @ delta.T
        else:
            expected = bare[2](torch.tanh(expected)) + torch.tanh(expected) @ delta.T
    torch.testing.assert_close(net(x), expected)


# -- Tab. 3, "w/o null space": random frozen halves -------------------------------------------------
def test_random_frozen_halves_are_random_orthonormal_and_not_the_null_space():
    lin = planted(24, 20, deficiency=3)
    _, paper = adapted(planted(24, 20, deficiency=3))
    _, layer = adapted(lin, frozen_halves="random")
    ad, ref = layer.adapters["default"], paper.adapters["default"]
    w0 = lin.weight.double()
    left, right = ad.null_left.double(), ad.null_right.double()
    assert left.shape == ref.null_left.shape and right.shape == ref.null_right.shape
    eye = torch.eye(left.shape[1], dtype=torch.float64)
    torch.testing.assert_close(left.T @ left, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(right @ right.T, eye, atol=1e-6, rtol=0)
    # not the null space: W0ᵀ·B_f and W0·A_fᵀ are of the size of W0 (the paper's bases: ~0)
    for a, b in (
        (w0.T @ left, w0.T @ ref.null_left.double()),
        (w0 @ right.T, w0 @ ref.null_right.double().T),
    ):
        assert a.norm() > 0.1 * w0.norm() and b.norm() < 1e-5 * w0.norm()
    # nor any rotation of it: the random span is far from the null span
    overlap = torch.linalg.svdvals(ref.null_left.double().T @ left)
    assert overlap.max() < 0.99
    report = ad.report
    assert report["frozen_halves"] == "random" and not report["left_exact"]
    assert report["rank"] == ref.report["rank"] == 6 and report["null_leak"] > 0.1
    # the leak bound holds for the update: |W0ᵀΔW| ≤ leak·|W0|·|ΔW|
    delta = layer.delta_weight().double()
    bound = (
        report["null_leak"]
        * torch.linalg.matrix_norm(w0, ord=2)
        * torch.linalg.matrix_norm(delta, ord=2)
    )
    assert torch.linalg.matrix_norm(w0.T @ delta, ord=2) <= bound * (1 + 1e-5)


def test_random_frozen_halves_train_and_count_like_the_paper_s():
    counts, trainable = [], []
    for halves in ("null_space", "random"):
        net = torch.nn.Sequential(planted(16, 12, deficiency=2))
        vlpeft.add_adapter(net, NullLoRAConfig(targets=["0"], frozen_halves=halves))
        ad = net[0].adapters["default"]
        counts.append(vlpeft.count_parameters(net)[0])
        trainable.append({n for n, p in net.named_parameters() if p.requires_grad})
        assert not ad.null_left.requires_grad and not ad.null_right.requires_grad
        assert {"null_left", "null_right"} <= set(dict(ad.named_buffers()))
        assert torch.count_nonzero(net[0].delta_weight()) == 0  # zero update at the start
        # frozen: a step of training leaves the halves as they were
        left, right = ad.null_left.clone(), ad.null_right.clone()
        perturb_adapters(net, scale=0.5)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        net(torch.randn(5, 12)).square().sum().backward()
        opt.step()
        assert torch.equal(ad.null_left, left) and torch.equal(ad.null_right, right)
    h = 2  # nullity 2: 2h(d_in + d_out)/2 + 2h
    assert counts == [h * (16 + 12) + 2 * h] * 2 and trainable[0] == trainable[1]


def test_random_frozen_halves_are_seeded_per_layer():
    def bases(seed=0, name="0"):
        net = torch.nn.Sequential(planted(16, 12, deficiency=2))
        vlpeft.add_adapter(
            net, NullLoRAConfig(targets=[name], frozen_halves="random", random_seed=seed)
        )
        ad = net[0].adapters["default"]
        return ad.null_left, ad.null_right

    torch.manual_seed(123)  # the global generator plays no part
    first = bases()
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(first, bases()))
    assert not torch.allclose(first[0], bases(seed=1)[0])
    layers = torch.nn.Sequential(planted(16, 12, 2, seed=1), planted(16, 12, 2, seed=1))
    vlpeft.add_adapter(layers, NullLoRAConfig(targets=["0", "1"], frozen_halves="random"))
    a, b = (layers[i].adapters["default"].null_left for i in range(2))
    assert not torch.allclose(a, b)  # the same weight in two layers: two draws


@pytest.mark.parametrize("shape", [(14, 10), (10, 14)])
def test_random_frozen_halves_forward_equals_the_naive_formula(shape):
    """ΔW = P·B·S₁·A_f + B_f·S₂·A with P = B_f·B_fᵀ (Eq. 9–10, Û := the random B_f)."""
    net, layer = adapted(planted(*shape, deficiency=3, seed=11), frozen_halves="random")
    ad = layer.adapters["default"]
    h = ad.lora_A.shape[0]
    p = ad.null_left @ ad.null_left.T
    s1, s2 = torch.diag(ad.scale[:h]), torch.diag(ad.scale[h:])
    delta = p @ ad.lora_B @ s1 @ ad.null_right + ad.null_left @ s2 @ ad.lora_A
    torch.testing.assert_close(layer.delta_weight(), delta)
    x = torch.randn(3, 5, shape[1])
    torch.testing.assert_close(net(x), layer.base_layer(x) + x @ delta.T)
    assert_matches_naive(net, x)  # the fused forward and its written-out backward too


def test_random_frozen_halves_survive_save_and_load(tmp_path):
    base = planted(14, 10, deficiency=3)
    fresh = torch.nn.Sequential(copy.deepcopy(base))
    net, _ = adapted(base, frozen_halves="random", random_seed=5)
    vlpeft.save_adapter(net, tmp_path)
    vlpeft.load_adapter(fresh, tmp_path)
    x = torch.randn(4, 10)
    torch.testing.assert_close(fresh(x), net(x))
    assert fresh[0].adapters["default"].report["frozen_halves"] == "random"


def test_frozen_halves_config_validation():
    with pytest.raises(
        ValueError, match=r"frozen_halves must be one of \['null_space', 'random'\]"
    ):
        NullLoRAConfig(targets=["q"], frozen_halves="gaussian")
    for seed in (-1, True, 1.5):
        with pytest.raises(ValueError, match="random_seed must be an integer >= 0"):
            NullLoRAConfig(targets=["q"], frozen_halves="random", random_seed=seed)
    cfg = NullLoRAConfig(targets=["q"], frozen_halves="random", random_seed=3)
    assert NullLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
