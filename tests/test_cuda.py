"""The GPU path: every attention x residual on CUDA against the same model on the CPU, the chunked HyperGLU paths
on CUDA against dense, decoding with the cache, bf16 autocast and torch.compile. Skipped where CUDA is missing
(CI has no GPU); `TEST_DEVICE=cpu pytest tests/test_cuda.py` runs the same checks on the CPU."""
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, HyperGLU, KVCache
from test_model import ATTNS, RESIDUALS, layer_cfg, randomize, run_layer, tiny

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
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm=norm, aligner_kind=layout))).double().to(DEV)
    x = torch.randn(2, 17, 24, dtype=torch.float64, device=DEV)
    y0, g0 = run_layer(layer, x, impl="dense")
    for impl, chunk in (("chunked", 5), ("fast", 4), ("fast", 17)):
        y1, g1 = run_layer(layer, x, impl=impl, chunk_T=chunk)
        assert (y0 - y1).abs().max() < 1e-12
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() < 1e-12, (impl, chunk, n)


def test_default_chunks_equal_dense():
    """chunk_T=None: the device's default chunk (1024 rows on a GPU), two chunks at T=1100, the last partial."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(block_size=1100, chunk_T=None)), 0.1).double().to(DEV)
    x = torch.randn(1, 1100, 24, dtype=torch.float64, device=DEV)
    y0, g0 = run_layer(layer, x, impl="dense")
    y1, g1 = run_layer(layer, x, impl="fast")
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
