"""The GPU path: every attention x residual on CUDA against the same model on the CPU, the chunked HyperGLU paths
on CUDA against dense, decoding with the cache, bf16 autocast and torch.compile. Skipped where CUDA is missing
(CI has no GPU); `TEST_DEVICE=cpu pytest tests/model/test_cuda.py` runs the same checks on the CPU."""
import copy
import dataclasses
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import ops.dispatch
from model import GPT, HyperGLU, KVCache
from conftest import ATTNS, RESIDUALS, layer_cfg, randomize, run_layer, tiny

DEV = os.environ.get("TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def loss_and_grads(model, idx, run=None):
    """Loss and parameter gradients of model, called through run (e.g. torch.compile(model)) when given."""
    _, loss = (model if run is None else run)(idx, idx)
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("attn,residual", list(itertools.product(ATTNS, RESIDUALS)))
def test_every_combination_matches_cpu(attn, residual):
    """float64 on both sides, so TF32 and kernel choice cannot hide a wrong index or a lost gradient."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, residual=residual, use_kv_conv=True)), 0.05).double()
    idx = torch.randint(0, 61, (2, 24))
    loss0, g0 = loss_and_grads(model, idx)
    loss1, g1 = loss_and_grads(model.to(DEV), idx.to(DEV))
    assert abs(loss0 - loss1) < 1e-10
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() < 1e-10 * max(1.0, g0[n].abs().max().item()), n


@pytest.mark.parametrize("kind,norm,layout", list(itertools.product(["glu", "relu"], ["l2", "out_scale", "none"],
                                                                    ["offset", "identity"])))
def test_chunked_and_fast_equal_dense(kind, norm, layout):
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm=norm, aligner_kind=layout, impl="fast")))
    layer = layer.double().to(DEV)
    x = torch.randn(2, 17, 24, dtype=torch.float64, device=DEV)
    y0, g0 = run_layer(layer, x, impl="dense")
    for impl, chunk in (("chunked", 5), (None, 4), (None, 17)):
        y1, g1 = run_layer(layer, x, impl=impl, chunk_T=chunk)
        assert (y0 - y1).abs().max() < 1e-12
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() < 1e-12, (impl, chunk, n)


def test_default_chunks_equal_dense():
    """chunk_T=None: the device's default chunk (1024 rows on a GPU), two chunks at T=1100, the last partial."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(block_size=1100, chunk_T=None, impl="fast")), 0.1).double().to(DEV)
    x = torch.randn(1, 1100, 24, dtype=torch.float64, device=DEV)
    y0, g0 = run_layer(layer, x, impl="dense")
    y1, g1 = run_layer(layer, x)
    assert (y0 - y1).abs().max() < 1e-12
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() < 1e-12, n


@pytest.mark.parametrize("attn", ATTNS)
def test_kv_cache_equals_full_forward(attn):
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, residual="mhc", pos="rope", use_kv_conv=True)), 0.05)
    model = model.double().to(DEV).eval()
    idx = torch.randint(0, 61, (2, 24), device=DEV)
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = KVCache(2)
        steps = [model(idx[:, :9], cache=cache)[0][:, -1:]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 24)]
    assert (full[:, 8:] - torch.cat(steps, 1)).abs().max() < 1e-10


@pytest.mark.parametrize("attn,residual", [("softmax", "plain"), ("hyperglu", "mhc"), ("hypermlp", "hc")])
def test_bf16_autocast_tracks_fp32(attn, residual):
    """bf16 autocast with fp32 parameters, as train.py runs on a GPU: fp32 gradients, close to fp32's."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, residual=residual)), 0.05).to(DEV)
    idx = torch.randint(0, 61, (2, 24), device=DEV)
    loss0, g0 = loss_and_grads(model, idx)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        loss1, g1 = loss_and_grads(model, idx)
    assert abs(loss1 - loss0) < 2e-2 * abs(loss0)
    for n in g0:
        assert g1[n].dtype == torch.float32 and torch.isfinite(g1[n]).all(), n
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])  # per tensor, bf16 noise swamps the tiny ones
    assert F.cosine_similarity(flat(g1), flat(g0), dim=0) > 0.99


@pytest.mark.parametrize("attn,residual", [("hyperglu", "mhc"), ("hypermlp", "hc"), ("softmax", "mhc")])
def test_torch_compile_matches_eager(attn, residual):
    """The path train.py takes on a GPU (torch.compile with Triton), fp32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    torch.manual_seed(0)
    model = randomize(GPT(tiny(attn=attn, residual=residual, block_size=16, chunk_T=5)), 0.1).to(DEV)
    idx = torch.randint(0, 61, (2, 16), device=DEV)
    loss0, g0 = loss_and_grads(model, idx)
    loss1, g1 = loss_and_grads(model, idx, torch.compile(model))
    assert abs(loss0 - loss1) < 1e-5
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() < 1e-5 * max(1.0, g0[n].abs().max().item()), n


# ---------------------------------------------------------------- the Triton kernels (ops/hyperglu_triton.py)

TRITON_VARIANTS = [dict(attn_kind="glu"), dict(attn_kind="relu"), dict(attn_kind="glu", attn_norm="l2", use_op2=False),
                   dict(attn_kind="glu", attn_norm="none", use_op1=False, op2_use_diag=False, op2_shortcut=False)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(DEV != "cuda", reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", range(len(TRITON_VARIANTS)))
def test_triton_kernels_against_float64(T, dtype, variant):
    """The layer's fast path (the Triton kernels) against the float64 chunked reference on the same weights: fp32
    with TF32 off (1e-4 relative), and bf16 autocast with fp32 parameters (3e-2; gradients stay fp32)."""
    import ops.dispatch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = layer_cfg(n_embd=128, qk_rank=32, vo_rank=128, op1_rank=8, op2_rank=8, block_size=T, chunk_T=1024,
                    **TRITON_VARIANTS[variant])
    assert ops.dispatch.hyperglu("fast", torch.zeros(1, device="cuda"), (), (), True, (True,) * 3) == "triton"
    layer = randomize(HyperGLU(dataclasses.replace(cfg, impl="fast")), 0.05).to(DEV)
    ref = randomize(HyperGLU(cfg), 0.0).to(DEV).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, T, 128, device=DEV)
    y0, g0 = run_layer(ref, x.double(), impl="chunked")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        y1, g1 = run_layer(layer, x)
    tol = 1e-4 if dtype == "float32" else 3e-2
    assert rel(y1, y0) < tol
    for n in g0:
        assert g1[n].dtype == torch.float32 and rel(g1[n], g0[n]) < 3 * tol, (n, rel(g1[n], g0[n]))


@pytest.mark.skipif(DEV != "cuda", reason="the Triton kernels run on CUDA")
def test_triton_decoding_and_long_context():
    """One row at a time against a cache (the kernels' row offset) equals the full forward, and T=16384 at batch 1
    runs forward + backward with memory linear in T (no T x T buffer)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(n_embd=64, qk_rank=16, vo_rank=64, block_size=16384, impl="fast")), 0.05)
    layer = layer.to(DEV)
    x = torch.randn(1, 300, 64, device=DEV)
    with torch.no_grad():
        full = layer(x)
        cache = {}
        steps = [layer(x[:, :290], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(290, 300)]
    assert rel(torch.cat(steps, 1), full) < 1e-5
    peaks = []
    for T in (4096, 16384):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        xl = torch.randn(1, T, 64, device=DEV, requires_grad=True)
        layer(xl).sum().backward()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        assert torch.isfinite(xl.grad).all()
    assert peaks[1] / peaks[0] < 6  # 4x the tokens; a T x T map would make it 16x


@pytest.mark.parametrize("residual,dynamic,norm", [("mhc", True, "layernorm"), ("hc", True, "layernorm"),
                                                   ("hc", True, "rmsnorm"), ("hc", False, "layernorm")])
def test_stream_kernels_match_float64(residual, dynamic, norm, monkeypatch):
    """The HC / mHC Triton kernels (ops/streams_triton.py, what impl="fast" runs for CUDA streams) against the
    module's float64 reference, n = 4, C = 96, 1,200 tokens, output and every gradient: fp32 with TF32 off within
    twice the reference's own fp32 error (+1e-5); bf16 autocast (the sublayer in bf16) fp32 results, close."""
    if ops.dispatch.streams("fast", torch.empty(1, 1, 4, 1, device=DEV), residual) != "triton":
        pytest.skip("the Triton stream kernels do not run on this device")
    calls = []
    kernels = ops.dispatch.triton_module("streams_triton")
    monkeypatch.setattr(kernels, "connect", lambda *a, _connect=kernels.connect: calls.append(1) or _connect(*a))
    torch.manual_seed(0)
    model = randomize(GPT(tiny(residual=residual, hc_dynamic=dynamic, norm=norm, n_embd=96, hc_streams=4)), 0.3)
    m, f = model.transformer.h[0].res_attn.to(DEV), torch.nn.Linear(96, 96).to(DEV)
    H = torch.randn(4, 300, 4, 96, device=DEV) + 1.0

    def run(module, f, H, fast):
        monkeypatch.setitem(ops.dispatch.override, "streams", None if fast else "reference")
        H = H.clone().requires_grad_(True)
        out = module(H, f)
        g = torch.linspace(-1, 1, out.numel(), device=DEV, dtype=out.dtype).view_as(out)
        return [out.detach(), *torch.autograd.grad(out, [H, *module.parameters(), *f.parameters()], g)]

    rel = lambda a, b: ((a.double() - b).abs().max() / max(1.0, b.abs().max().item())).item()
    exact = run(copy.deepcopy(m).double(), copy.deepcopy(f).double(), H.double(), False)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        reference, fp32 = run(m, f, H, False), run(m, f, H, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b, c in zip(fp32, reference, exact):
        assert rel(a, c) <= 2 * rel(b, c) + 1e-5, (rel(a, c), rel(b, c))
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        bf16 = run(m, f, H, True)
    assert len(calls) == 2  # the fp32 and bf16 runs, not the reference's
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in bf16)
    assert rel(bf16[0], exact[0]) < 2e-2
    flat = lambda ts: torch.cat([t.double().flatten() for t in ts])
    assert F.cosine_similarity(flat(bf16[1:]), flat(exact[1:]), dim=0) > 0.99
