"""ops/hyperglu_triton.py, the fused Triton kernels for HyperGLU / HyperMLP, against model.py's reference rows.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 on the CPU (numpy, one program at a time,
exact float32 and float64 dots), on 16 x 16 tiles with sequence lengths that do not divide by 16. The GPU checks
(bf16, TF32, T = 1024 and 4096) are in tests/test_cuda.py."""
import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():  # before Triton decorates the kernels
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; tests/test_cuda.py on a GPU")

import ops.hyperglu  # noqa: E402
import ops.hyperglu_triton  # noqa: E402
from model import GPT, HyperGLU  # noqa: E402
from test_model import layer_cfg, randomize, run_layer, tiny  # noqa: E402
from test_ops import saved_bytes  # noqa: E402


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Route impl="fast" through the kernels on the CPU, on 16 x 16 tiles, 16 value channels per program and per step."""
    monkeypatch.setattr(ops.hyperglu, "use_triton", lambda cfg, q: ops.hyperglu_triton.supports(cfg))
    monkeypatch.setattr(ops.hyperglu_triton, "BLOCK", {k: dict(BM=16, DVO=16, DVC=16, num_warps=4)
                                                       for k in ops.hyperglu_triton.BLOCK})


def worst(a, b):
    """max |a - b| / max(1, max |b|) over the output and every gradient."""
    (y0, g0), (y1, g1) = a, b
    errs = [(y1 - y0).abs().max().item()] + [((g1[n] - g0[n]).abs().max() / max(1.0, g0[n].abs().max())).item()
                                             for n in g0]
    return max(errs)


CASES = [(kind, norm, ops_, shortcut, diag) for kind in ("glu", "relu")
         for norm, ops_, shortcut, diag in [
             ("out_scale", (True, True), True, True), ("out_scale", (True, True), False, False),
             ("out_scale", (True, False), True, False), ("out_scale", (False, True), False, True),
             ("out_scale", (False, False), True, True), ("l2", (True, True), True, True),
             ("none", (True, True), True, False), ("none", (False, True), True, True),
             ("none", (True, False), False, True), ("none", (False, False), False, False)]]


@pytest.mark.parametrize("kind,norm,op,shortcut,diag", CASES)
def test_kernels_match_the_reference_float64(kind, norm, op, shortcut, diag):
    """Forward and every gradient (x, q/k/v/gates/controls, convs, U/Vt/d of both mixers) against autograd over the
    dense reference rows, float64: glu/relu, out_scale/l2/none, op1/op2 on or off, shortcut and use_diag on or off
    (op1 and op2 get opposite settings), T = 21 on 16 x 16 tiles (two row and key blocks, the second partial)."""
    torch.manual_seed(0)
    cfg = layer_cfg(attn_kind=kind, attn_norm=norm, use_op1=op[0], use_op2=op[1], op1_shortcut=shortcut,
                    op2_shortcut=not shortcut, op1_use_diag=diag, op2_use_diag=not diag, block_size=24)
    layer = randomize(HyperGLU(cfg)).double()
    x = torch.randn(1, 21, 24, dtype=torch.float64)
    assert worst(run_layer(layer, x, impl="dense"), run_layer(layer, x, impl="fast")) < 1e-12


@pytest.mark.parametrize("kind", ["glu", "relu"])
def test_kernels_match_the_reference_float32(kind):
    """float32 (the interpreter's float32 dots are exact): 1e-5 relative at T = 37, batch 2, ranks 3 and 5."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, block_size=40, op2_rank=5)), 0.1)
    x = torch.randn(2, 37, 24)
    (y0, g0), (y1, g1) = run_layer(layer, x, impl="dense"), run_layer(layer, x, impl="fast")
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    assert rel(y1, y0) < 1e-5
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-5, n


def test_decoding_with_a_cache_equals_the_full_forward():
    """row0 > 0: a prefill of 19 rows, then one new row at a time against the cached keys, no grad."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(block_size=24), fast=True)).double()
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    full = layer(x, impl="dense")
    cache = {}
    with torch.no_grad():
        steps = [layer(x[:, :19], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(19, 23)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_gpt_with_the_kernels_equals_reference():
    """A whole GPT, HyperGLU + mHC and HyperMLP + HC: loss and every parameter's gradient, float64."""
    for attn, residual in (("hyperglu", "mhc"), ("hypermlp", "hc")):
        torch.manual_seed(0)
        ref = randomize(GPT(tiny(attn=attn, residual=residual, impl="reference", block_size=20)), 0.05).double()
        fast = GPT(tiny(attn=attn, residual=residual, block_size=20)).double()
        fast.load_state_dict(ref.state_dict())
        idx = torch.randint(0, 61, (2, 20))
        losses = []
        for model in (ref, fast):
            _, loss = model(idx, idx)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-12
        for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
            assert (p.grad - q.grad).abs().max() < 1e-10 * max(1.0, p.grad.abs().max().item()), n


def test_the_identity_layout_stays_on_the_pytorch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(ops.hyperglu_triton, "attend", lambda *a, **kw: calls.append(1))
    torch.manual_seed(0)
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    for layout, masking in (("identity", True), ("offset", False)):
        with pytest.warns(RuntimeWarning) if not masking else torch.no_grad():
            cfg = layer_cfg(aligner_kind=layout, do_masking=masking)
        HyperGLU(cfg, fast=True).double()(x)
    assert calls == []


def test_saved_activations_grow_linearly_in_T():
    """What the op keeps for backward is O(T d): inputs, output, the norm and the rank-r row vectors."""
    layer = HyperGLU(layer_cfg(n_embd=32, block_size=128, qk_rank=16, vo_rank=32), fast=True)
    mem = {}
    for T in (32, 64, 128):
        x = torch.randn(1, T, 32, requires_grad=True)
        mem[T] = saved_bytes(lambda: layer(x))
    assert mem[128] / mem[64] < 2.1 and mem[64] / mem[32] < 2.1


def test_torch_compile_keeps_the_custom_op_in_one_graph():
    """fullgraph=True fails on any graph break: the kernels are one custom op with a fake (shape) function and a
    registered backward. aot_eager traces forward and backward without compiling them further."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(block_size=24), fast=True), 0.1).double()
    x = torch.randn(1, 21, 24, dtype=torch.float64)
    y0, g0 = run_layer(layer, x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y1, g1 = run_layer(compiled, x)
    assert worst((y0, g0), (y1, {n.removeprefix("_orig_mod."): g for n, g in g1.items()})) < 1e-12


def test_lag_major_maps_parameter_rows_to_lags():
    """Row l of the lag-major form is U's row L-1-l and Vt's column L-1-l (model.LagMix: row L-1 is lag 0)."""
    U, Vt, d = torch.randn(2, 10, 3), torch.randn(2, 3, 10), torch.randn(2, 10)
    UL, VL, S = ops.hyperglu_triton.lag_major(U, Vt, d, True, 7)
    assert UL.shape == VL.shape == (2, 7, 3)
    for lag in range(7):
        assert torch.equal(UL[:, lag], U[:, 9 - lag]) and torch.equal(VL[:, lag], Vt[:, :, 9 - lag])
        assert torch.equal(S[:, lag], d[:, 9 - lag] + 1)
    assert torch.equal(ops.hyperglu_triton.lag_major(U, Vt, None, False, 7)[2], torch.zeros(2, 7))
