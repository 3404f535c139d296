"""compile_model: compiled == eager (outputs and every trainable gradient) for each method, in both
modes, with ``backend="aot_eager"`` (AOT autograd, no code generation: fast on the CPU); the
fallback to eager with a warning where a backend cannot run; one inductor run (slow)."""

import copy
import logging

import pytest
import torch
from conftest import perturb_adapters
from torch import nn

import vlpeft
from vlpeft import compile as vc
from vlpeft.adapters import (
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LayerwiseConfig,
    LoRAConfig,
    NullLoRAConfig,
)


def deficient_linear(d_in, d_out, deficiency, seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(d_in, d_out) - deficiency
    w = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(w / w.abs().max())
    return lin


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        deficient_linear(12, 16, 3, seed=1), nn.GELU(), deficient_linear(16, 12, 2, seed=2)
    )


CONFIGS = {
    "lora": LoRAConfig(targets=["0", "2"], r=4, alpha=8),
    "adapter": AdapterConfig(targets=["0", "2"], bottleneck=4, activation="gelu"),
    "routed-lora": LoRAConfig(targets=["0"], r=4, routing="proj"),
    "routed-lora-separate": LoRAConfig(
        targets=["0"], r=4, routing="mul", separate_mapping=True, visual_dim=5
    ),
    "null-lora": NullLoRAConfig(targets=["0", "2"]),
    "routed-null-lora": NullLoRAConfig(targets=["0"], routing="add"),
    "flora": FLoRAConfig(targets=["0", "2"], r=3, scale=0.5),
    "routed-flora": FLoRAConfig(targets=["0"], r=3, routing="expand"),
    "dora": DoRAConfig(targets=["0", "2"], r=3, alpha=6),
    "layerwise": LayerwiseConfig(
        targets=["0", "2"], base={"method": "dora", "r": 3}, ranks={"2": 2}, alphas={"0": 1.0}
    ),
}


@pytest.mark.parametrize("method", vlpeft.list_methods())
def test_every_registered_method_has_a_compile_row(method):
    assert any(c.method == method for c in CONFIGS.values()), f"no CONFIGS row for {method!r}"


def adapted(name):
    net = tiny_net()
    vlpeft.add_adapter(net, copy.deepcopy(CONFIGS[name]))
    perturb_adapters(net, scale=0.3)
    return net.train()


def x_r_for(name):
    if "routed" not in name:
        return None
    width = 5 if "separate" in name else 12
    return torch.randn(3, width, generator=torch.Generator().manual_seed(7))


def outputs_and_grads(net, x, x_r):
    for p in net.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    if x_r is not None:
        vlpeft.set_routing_inputs(net, x_r)
    y = net(x)
    (y.square().sum() + y.sum()).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", vc.MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_eager(name, mode):
    eager = adapted(name)
    compiled = vc.compile_model(copy.deepcopy(eager), mode=mode, backend="aot_eager", strict=True)
    assert compiled._compiled_call_impl is not None if mode == "model" else True
    if mode == "adapters":
        adapters = [
            a for _, layer in vlpeft.adapted_layers(compiled) for a in layer.adapters.values()
        ]
        assert adapters and all(a._compiled_call_impl is not None for a in adapters)
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3))
    for step in range(2):  # the second call after an optimizer-like update of every parameter
        want = outputs_and_grads(eager, x, x_r_for(name))
        got = outputs_and_grads(compiled, x, x_r_for(name))
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert got[2].keys() == want[2].keys() and want[2]
        for key in want[2]:
            torch.testing.assert_close(got[2][key], want[2][key], msg=f"{name} {key} step {step}")
        assert want[0].abs().sum() > 0 and any(g.abs().sum() > 0 for g in want[2].values())
        with torch.no_grad():
            for net in (eager, compiled):
                for p in net.parameters():
                    if p.requires_grad:
                        p.mul_(0.9).add_(0.01)
    # in place: the same module, the same parameter names as eager
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("name", ["routed-lora", "null-lora", "lora"])
def test_adapters_mode_compiles_one_graph_set_for_all_layers_of_a_shape(name):
    """Layers of one shape share their graphs: nothing layer-specific (a layer name) is guarded,
    so a model with many adapted layers stays under dynamo's recompile limit (8) and compiled."""

    def graphs_for(layers):
        torch._dynamo.reset()
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch.manual_seed(0)
        net = nn.Sequential(*[deficient_linear(12, 12, 3, seed=i) for i in range(layers)])
        config = copy.deepcopy(CONFIGS[name])
        config.targets = [str(i) for i in range(layers)]
        vlpeft.add_adapter(net, config)
        vc.compile_model(net, mode="adapters", backend=counting, strict=True)
        graphs.clear()  # the probe's
        vlpeft.set_routing_inputs(net, torch.randn(3, 12))
        net(torch.randn(3, 5, 12))
        return len(graphs)

    few, many = graphs_for(2), graphs_for(12)
    assert few >= 1 and many == few


def test_unknown_backend_falls_back_to_eager_with_a_warning(caplog):
    net = adapted("lora")
    with caplog.at_level(logging.WARNING, logger="vlpeft.compile"):
        out = vc.compile_model(net, backend="no_such_backend")
    assert out is net and net._compiled_call_impl is None
    assert "unknown torch.compile backend 'no_such_backend'" in caplog.text
    assert "runs eager" in caplog.text
    with pytest.raises(vc.CompileUnavailable, match="no_such_backend"):
        vc.compile_model(net, backend="no_such_backend", strict=True)


def test_missing_cpp_compiler_is_named_and_the_model_stays_eager(caplog, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found (tried g++, clang++)")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert "C++ compiler" in vc.backend_problem("inductor", "cpu")
    net = adapted("lora")
    with caplog.at_level(logging.WARNING, logger="vlpeft.compile"):
        assert vc.compile_model(net, backend="inductor") is net
    assert net._compiled_call_impl is None
    assert "needs a C++ compiler" in caplog.text and "tried g++" in caplog.text


def test_a_backend_that_fails_at_compile_time_is_caught_by_the_probe(caplog):
    net = adapted("lora")
    with caplog.at_level(logging.WARNING, logger="vlpeft.compile"):
        vc.compile_model(net, backend="relu_compile_error_TESTING_ONLY")
    assert net._compiled_call_impl is None
    assert "failed to compile a probe function" in caplog.text


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        vc.compile_model(adapted("lora"), mode="layers")
    with pytest.raises(ValueError, match="no adapters"):
        vc.compile_model(tiny_net(), mode="adapters", backend="aot_eager")


@pytest.mark.slow
def test_inductor_compiled_lora_equals_eager():
    """One inductor graph (about 30 s on the 2-core CPU): generated C++ kernels, same results."""
    problem = vc.backend_problem("inductor", "cpu")
    if problem:
        pytest.skip(problem)
    eager = adapted("null-lora")
    compiled = vc.compile_model(copy.deepcopy(eager), mode="adapters", backend="inductor")
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3))
    want, got = outputs_and_grads(eager, x, None), outputs_and_grads(compiled, x, None)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], rtol=1e-4, atol=1e-5)
