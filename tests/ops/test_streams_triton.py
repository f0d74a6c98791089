"""ops/streams_triton.py, the fused Triton kernels for HC / mHC sites, against model.py's reference equations.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 on the CPU (numpy, one program at a time, exact
float32 and float64 dots), with token counts that do not divide by the kernels' token blocks. The GPU checks (bf16
autocast, TF32 off, torch.compile with Inductor) are in tests/test_cuda.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before Triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; tests/test_cuda.py on a GPU")

import ops.dispatch  # noqa: E402
import ops.streams_triton as st  # noqa: E402
from model import GPT, sinkhorn  # noqa: E402
from conftest import randomize, tiny  # noqa: E402


def site(residual, n, dtype=torch.float64, dynamic=True, tanh=True, norm="layernorm", bias=True):
    """The first attention site of a tiny GPT (C=32) moved off its init, and a Linear sublayer."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny(residual=residual, hc_dynamic=dynamic, hc_tanh=tanh, norm=norm, bias=bias,
                               hc_streams=n)), 0.3).to(dtype)
    return model.transformer.h[0].res_attn, torch.nn.Linear(32, 32).to(dtype)


def grads(step, H, module, f):
    """(output, gradients of H, the module's and f's parameters) of step(H), against a linspace output gradient."""
    H = H.clone().requires_grad_(True)
    out = step(H)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out, torch.autograd.grad(out, [H, *module.parameters(), *f.parameters()], g, allow_unused=True)


def kernels(module, f):
    """The site through ops.streams_triton.connect, with the arguments the model passes ops.streams.connect."""
    return lambda H: st.connect(H, f, module.kind, **module.fast_args())


def run(module, f, H, use_kernels):
    """grads() of the site through the kernels (on these CPU tensors) or through the module's reference equations."""
    ops.dispatch.override["streams"] = "reference"
    try:
        return grads(kernels(module, f) if use_kernels else lambda H: module(H, f), H, module, f)
    finally:
        del ops.dispatch.override["streams"]


def errors(a, b):
    """max |a - b| / max(1, max |b|) for the output and each gradient of run()'s results (None must match None)."""
    (o1, g1), (o0, g0) = a, b
    assert [x is None for x in g1] == [x is None for x in g0]
    rel = lambda x, y: ((x.double() - y.double()).abs().max() / max(1.0, y.abs().max().item())).item()
    return [rel(o1, o0)] + [rel(x, y) for x, y in zip(g1, g0) if y is not None]


CASES = [("mhc", True, True, "layernorm", True), ("hc", True, True, "layernorm", True),
         ("hc", True, False, "layernorm", False), ("hc", True, True, "rmsnorm", True),
         ("hc", False, True, "layernorm", True)]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("residual,dynamic,tanh,norm,bias", CASES)
def test_kernels_match_the_reference_float64(residual, dynamic, tanh, norm, bias, n):
    """Forward and every gradient (the streams, phi or W_alpha/W_beta and the norm's weight and bias, the gates,
    the biases or static parts, and the sublayer's weights through y), float64: mHC, dynamic HC with tanh on and
    off, LayerNorm with and without bias, RMSNorm, static HC; T = 37, so 74 tokens over blocks of 32 or 16."""
    m, f = site(residual, n, dynamic=dynamic, tanh=tanh, norm=norm, bias=bias)
    H = torch.randn(2, 37, n, 32, dtype=torch.float64)
    assert max(errors(run(m, f, H, True), run(m, f, H, False))) < 1e-12


@pytest.mark.parametrize("residual", ["mhc", "hc"])
def test_streams_that_are_not_a_power_of_two_are_padded(residual):
    """n = 3 runs on 4-wide tiles: the padding rows and columns (Sinkhorn's included) stay out of every result."""
    m, f = site(residual, 3)
    H = torch.randn(2, 13, 3, 32, dtype=torch.float64)
    assert max(errors(run(m, f, H, True), run(m, f, H, False))) < 1e-12


@pytest.mark.parametrize("residual,dynamic,norm", [("mhc", True, "layernorm"), ("hc", True, "layernorm"),
                                                   ("hc", True, "rmsnorm"), ("hc", False, "layernorm")])
def test_float32_is_as_accurate_as_the_reference(residual, dynamic, norm):
    """float32 with rows of mean 3 (the norm's cancellation), against float64: every result of the kernels is
    within twice the reference's own float32 error (plus 1e-5), n = 4."""
    m, f = site(residual, 4, dynamic=dynamic, norm=norm)
    H = torch.randn(2, 21, 4, 32, dtype=torch.float64) + 3.0
    exact = run(m, f, H, False)
    m, f, H = m.float(), f.float(), H.float()
    for err, ref in zip(errors(run(m, f, H, True), exact), errors(run(m, f, H, False), exact)):
        assert err <= 2 * ref + 1e-5, (err, ref)


def test_sinkhorn_in_registers_equals_the_reference_and_is_doubly_stochastic():
    """mHC's H_res from the kernel, float32, on logits b_res = 2(2I - 1) plus noise: it equals model.sinkhorn of
    the same logits (20 iterations) within 1e-6, rows sum to 1 within 1e-5, and columns within 1e-5 at init-like
    noise (std ~2e-4). Near the identity, 20 iterations leave column errors of about 0.02 x the noise (model.sinkhorn
    alike: ~2e-3 at std 0.1), so the column bound is checked where the reference meets it."""
    n, C = 4, 32
    torch.manual_seed(0)
    x = torch.randn(3, n, C)
    phi = torch.randn(n * C, n * n + 2 * n) / (n * C) ** 0.5  # h = r x phi ~ N(0, 1)
    b = torch.cat([torch.zeros(2 * n), (2 * (2 * torch.eye(n) - 1)).flatten()])
    for alpha, col_tol in ((2e-4, 1e-5), (0.1, 5e-3)):
        a = torch.tensor([0.0, 0.0, alpha])
        _, res, _, z, r, _ = st.mhc_pre(x, phi, a, b, 20, 1e-6)
        logits = (alpha * r[:, None] * z[:, 2 * n:] + b[2 * n:]).view(-1, n, n)
        assert (res - sinkhorn(logits, 20)).abs().max() < 1e-6
        assert (res.sum(-1) - 1).abs().max() < 1e-5
        assert (res.sum(-2) - 1).abs().max() < col_tol
        assert (logits - b[2 * n:].view(n, n)).std() > alpha / 2  # the noise is there


def test_gpt_through_the_kernels_equals_the_reference(monkeypatch):
    """The model's own dispatch (ops.streams.connect) routed to the kernels on the CPU: a 2-layer GPT with mHC,
    dynamic HC and static HC gives the reference loss and every parameter's gradient (float64), all four sites
    through the kernels; every parameter gets its gradient through autograd (as DDP needs)."""
    calls = []
    monkeypatch.setitem(ops.dispatch.override, "streams", "triton")
    monkeypatch.setattr(st, "connect", lambda *a, _connect=st.connect: calls.append(a[2]) or _connect(*a))
    for residual, dynamic in (("mhc", True), ("hc", True), ("hc", False)):
        torch.manual_seed(0)
        ref = randomize(GPT(tiny(residual=residual, hc_dynamic=dynamic, impl="reference")), 0.05).double()
        fast = GPT(tiny(residual=residual, hc_dynamic=dynamic)).double()
        fast.load_state_dict(ref.state_dict())
        idx = torch.randint(0, 61, (2, 13))
        results = []
        for model in (ref, fast):
            _, loss = model(idx, idx)
            loss.backward()
            results.append((loss.item(), {k: p.grad for k, p in model.named_parameters()}))
        (l0, g0), (l1, g1) = results
        assert abs(l0 - l1) < 1e-12
        assert all(g is not None for g in g1.values()) and g0.keys() == g1.keys()
        for k in g0:
            assert (g1[k] - g0[k]).abs().max() < 1e-11 * max(1.0, g0[k].abs().max().item()), (residual, k)
    assert calls == ["mhc"] * 4 + ["hc"] * 8


def test_dispatch_takes_the_kernels_for_cuda_streams_they_cover(monkeypatch):
    """ops.dispatch.streams, on fake CUDA tensors: CUDA fp32 / bf16 / fp16 streams with n <= 4 (mHC) or <= 8
    (HC); not CPU streams, fp64 (StreamPre serves those), wider streams, where triton is missing or with
    STREAMS_TRITON=0; impl="reference" runs the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setitem(ops.dispatch._modules, "streams_triton", st)
    with FakeTensorMode():
        x4, x8 = torch.empty(2, 3, 4, 8, device="cuda"), torch.empty(2, 3, 8, 8, device="cuda")
    usable = lambda x, kind: ops.dispatch.streams("fast", x, kind) == "triton"
    assert usable(x4, "mhc") and usable(x4.bfloat16(), "hc") and usable(x4.half(), "mhc") and usable(x8, "hc")
    assert not (usable(x8, "mhc") or usable(x4.double(), "hc") or usable(torch.empty(2, 3, 4, 8), "hc"))
    assert ops.dispatch.streams("reference", x4, "mhc") == "reference"
    monkeypatch.setattr(ops.dispatch, "OFF", {"STREAMS_TRITON"})
    assert not usable(x4, "mhc")
    monkeypatch.setattr(ops.dispatch, "OFF", set())
    monkeypatch.setitem(ops.dispatch._modules, "streams_triton", None)
    assert not usable(x4, "mhc")


def test_bf16_autocast_keeps_the_streams_and_gradients_fp32():
    """Under bf16 autocast with fp32 parameters the sublayer returns bf16: the update stays fp32, the
    gradients are fp32 (y's is bf16, as y), and the result tracks the fp32 run."""
    m, f = site("mhc", 4, dtype=torch.float32)
    H = torch.randn(2, 13, 4, 32)
    out0, g0 = run(m, f, H, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out1, g1 = run(m, f, H, True)
    assert out1.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g1)
    assert (out1 - out0).norm() / out0.norm() < 1e-2
    for a, b in zip(g1, g0):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on every op, and
    torch.compile (aot_eager: the fake forms and the autograd formulas, traced) of a whole site: one graph, the same
    output and gradients as eager."""
    torch.manual_seed(0)
    N, n, C = 11, 4, 32
    x, y = torch.randn(N, n, C, requires_grad=True), torch.randn(N, C, requires_grad=True)
    rnd = lambda *s: (0.3 * torch.randn(*s)).requires_grad_(True)
    cases = [(st.mhc_pre, (x, rnd(n * C, n * n + 2 * n), rnd(3), rnd(n * n + 2 * n), 20, 1e-6)),
             (st.hc_pre, (x, rnd(C, n + 2), rnd(n + 2), rnd(n + 2), rnd(n, n + 2), rnd(n + 2), True, 1e-5)),
             (st.hc_pre, (x, rnd(C, n + 2), None, None, rnd(n, n + 2), rnd(n + 2), False, 1e-6)),
             (st.static_pre, (x, rnd(n), rnd(n, n))),
             (st.post, (x, rnd(N, n, n), rnd(N, n), y, torch.randn(N, n, C, requires_grad=True))),
             (st.post, (x, rnd(1, n, n), rnd(1, n), y, torch.randn(N, n, C, requires_grad=True)))]
    for op, args in cases:
        torch.library.opcheck(op, args)
    m, f = site("mhc", n, dtype=torch.float32)
    step, H = kernels(m, f), torch.randn(2, 7, n, C)
    assert torch._dynamo.explain(step)(H).graph_break_count == 0
    (o0, g0), (o1, g1) = grads(step, H, m, f), grads(torch.compile(step, backend="aot_eager", fullgraph=True), H, m, f)
    for a, b in zip((o1, *g1), (o0, *g0)):
        assert (a - b).abs().max() < 1e-6
