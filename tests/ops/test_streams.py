"""ops/streams.py and ops/sinkhorn.py against model.py's HC / mHC reference equations, forward and every gradient, in
float64 (and float32 where the fast path reorders sums)."""
import pytest
import torch

import ops.dispatch
import ops.sinkhorn
import ops.streams
from conftest import assert_close, randomize, tiny
from model import GPT, sinkhorn


def test_sinkhorn_matches_the_reference_and_passes_gradcheck():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.sinkhorn.sinkhorn(t, 20), (logits,))
    for n, dtype, tol in ((4, torch.float64, 1e-12), (2, torch.float64, 1e-12), (4, torch.float32, 1e-6)):
        x = (2 * (2 * torch.eye(n) - 1) + torch.randn(64, n, n)).to(dtype).requires_grad_(True)
        w = torch.randn(n, n, dtype=dtype)
        fast, ref = ops.sinkhorn.sinkhorn(x, 20), sinkhorn(x, 20)
        assert (fast - ref).abs().max() <= tol
        ga, gb = torch.autograd.grad((fast * w).sum(), x)[0], torch.autograd.grad((ref * w).sum(), x)[0]
        assert (ga - gb).abs().max() <= tol * 10


@pytest.mark.parametrize("kind", ["layernorm", "layernorm_nobias", "rmsnorm", "none"])
def test_norm_proj_equals_norm_then_matmul(kind):
    """norm_proj applies the norm after the matmul [mHC Eqs. 14-16]: its output and every gradient equal
    norm(x) @ W through autograd (float64), and in float32 stay within 1e-5 even for rows with a large mean."""
    torch.manual_seed(0)
    D, K = 40, 7
    norm = {"layernorm": torch.nn.LayerNorm(D), "layernorm_nobias": torch.nn.LayerNorm(D, bias=False),
            "rmsnorm": torch.nn.RMSNorm(D, eps=1e-6), "none": None}[kind]
    if norm is not None:
        randomize(norm, 0.5)
    want_fn = ((lambda x, W: (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ W) if norm is None
               else (lambda x, W: norm(x) @ W))
    params = [] if norm is None else list(norm.parameters())
    for dtype, offset, tol in ((torch.float64, 0.0, 1e-12), (torch.float32, 3.0, 1e-5)):
        if norm is not None:
            norm.to(dtype)
        args = ((None, None, True, 1e-6) if norm is None else
                (norm.weight, getattr(norm, "bias", None), kind == "rmsnorm", norm.eps))
        x = (offset + torch.randn(3, 5, D, dtype=dtype)).requires_grad_(True)
        W = torch.randn(D, K, dtype=dtype, requires_grad=True)
        out, want = ops.streams.norm_proj(x, W, *args), want_fn(x, W)
        assert out.shape == want.shape == (3, 5, K)
        assert (out - want).abs().max() < tol * want.abs().max()
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, [x, W, *params], g), torch.autograd.grad(want, [x, W, *params], g)):
            assert_close(a, b, tol)


def test_add_outer_equals_the_out_of_place_update():
    torch.manual_seed(0)
    res = torch.randn(2, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    for w in (torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True),   # dynamic: per token
              torch.randn(4, dtype=torch.float64, requires_grad=True)):        # static HC: shared
        want = res + w[..., None] * y[..., None, :]
        out = ops.streams.add_outer(res * 1.0, w, y)  # a fresh tensor: add_outer writes into it
        assert (out - want).abs().max() < 1e-12
        g = torch.randn_like(out).expand(2, 5, 4, 8)
        for a, b in zip(torch.autograd.grad(out, [res, w, y], g), torch.autograd.grad(want, [res, w, y], g)):
            assert (a - b).abs().max() < 1e-12


def stream_grads(module, H, f, form, monkeypatch):
    """(output, gradients of H, the module's and f's parameters) of module(H, f), in the form given (ops.dispatch)."""
    monkeypatch.setitem(ops.dispatch.override, "streams", form)
    params = [H, *module.parameters(), *f.parameters()]
    out = module(H, f)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return out, torch.autograd.grad(out, params, g, allow_unused=True)


@pytest.mark.parametrize("residual,dynamic,tanh,norm", [
    ("hc", True, True, "layernorm"), ("hc", True, False, "layernorm"), ("hc", True, True, "rmsnorm"),
    ("hc", False, True, "layernorm"), ("mhc", True, True, "layernorm")])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_stream_connections_match_the_reference(residual, dynamic, tanh, norm, n, monkeypatch):
    """HC (dynamic and static, tanh on and off) and mHC away from init: the fast path (StreamPre, norm_proj,
    ops.sinkhorn, add_outer) equals the module's reference equations, output and every gradient, float64, with and
    without grad (the no-grad fast path is the plain-op form)."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny(residual=residual, hc_dynamic=dynamic, hc_tanh=tanh, norm=norm, bias=True,
                               hc_streams=n)), 0.3).double()
    m = model.transformer.h[0].res_attn
    f = torch.nn.Linear(32, 32).double()
    H = torch.randn(2, 5, n, 32, dtype=torch.float64, requires_grad=True)
    out1, g1 = stream_grads(m, H, f, "pre", monkeypatch)
    out0, g0 = stream_grads(m, H, f, "reference", monkeypatch)
    assert (out1 - out0).abs().max() < 1e-12
    for a, b in zip(g1, g0):
        assert_close(a, b, 1e-11)
    monkeypatch.setitem(ops.dispatch.override, "streams", "pre")
    with torch.no_grad():
        assert (m(H, f) - out0).abs().max() < 1e-12
