"""ops/hyperglu.py (and its C++ CPU kernel, ops/hyperglu_cpu.py) against model.HyperGLU's reference rows: forward and
every gradient, in float64 (and float32 where the fast path reorders sums), over every variant switch."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import ops.dispatch
import ops.hyperglu
import ops.hyperglu_cpu
from conftest import layer_cfg, randomize, run_layer, saved_bytes
from model import HyperGLU


def cpu_kernel(monkeypatch, on):
    """Run ops.hyperglu with the fused C++ kernel (ops/hyperglu_cpu.py) or with its eager steps. The kernel gets
    blocks of 2 rows, so a chunk spans several blocks, the last one partial."""
    if on and ops.hyperglu_cpu.load() is None:
        pytest.skip("the fused CPU kernel could not be built here")
    monkeypatch.setitem(ops.dispatch.override, "hyperglu", "fused" if on else "rows")
    monkeypatch.setattr(ops.hyperglu_cpu, "ROWS", 2)


SWITCHES = list(itertools.product([(True, True), (True, False), (False, True), (False, False)],  # op1, op2
                                  [True, False],                                                 # shortcut
                                  [True, False],                                                 # use_diag
                                  [True, False],                                                 # op masks
                                  [True, False],                                                 # do_masking
                                  ["out_scale", "none"]))


@pytest.mark.parametrize("kind,layout,kernel", [(k, la, ke) for k in ("glu", "relu") for la in ("offset", "identity")
                                               for ke in (True, False) if la == "offset" or not ke])
def test_hyperglu_matches_reference_for_every_switch(kind, layout, kernel, monkeypatch):
    """The fast rows (hand-written backward; the C++ kernel or its eager steps) against autograd over the reference
    rows with the same chunks, float64, for every combination of the mixer switches, masks and norms; forward
    under no_grad too (the decoding path)."""
    cpu_kernel(monkeypatch, kernel)
    for op, shortcut, diag, op_mask, do_mask, norm in SWITCHES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # do_masking=False with the lag layout warns
            cfg = layer_cfg(attn_kind=kind, aligner_kind=layout, attn_norm=norm, use_op1=op[0], use_op2=op[1],
                            op1_shortcut=shortcut, op2_shortcut=not shortcut, op1_use_diag=diag,
                            op2_use_diag=not diag, op1_do_masking=op_mask, op2_do_masking=not op_mask,
                            do_masking=do_mask, impl="fast")
        torch.manual_seed(0)
        layer = randomize(HyperGLU(cfg)).double()
        x = torch.randn(2, 13, 24, dtype=torch.float64)
        y0, g0 = run_layer(layer, x, impl="chunked", chunk_T=5)
        y1, g1 = run_layer(layer, x, chunk_T=5)
        with torch.no_grad():
            y2 = layer(x, chunk_T=5)
        case = (op, shortcut, diag, op_mask, do_mask, norm)
        assert (y0 - y1).abs().max() < 1e-12 and (y0 - y2).abs().max() < 1e-12, case
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() < 1e-11, (case, n)


@pytest.mark.parametrize("kind,norm,layout", list(itertools.product(["glu", "relu"], ["l2", "out_scale", "none"],
                                                                    ["offset", "identity"])))
def test_hyperglu_fast_equals_dense_for_any_chunking(kind, norm, layout, monkeypatch):
    """Fast rows with chunks of 4 and of all 17 rows against the dense reference, float64; l2 included."""
    cpu_kernel(monkeypatch, layout == "offset" and ops.hyperglu_cpu.load() is not None)
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm=norm, aligner_kind=layout, impl="fast"))).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    y0, g0 = run_layer(layer, x, impl="dense")
    for chunk in (4, 17):
        y1, g1 = run_layer(layer, x, chunk_T=chunk)
        assert (y0 - y1).abs().max() < 1e-12
        for n in g0:
            assert (g0[n] - g1[n]).abs().max() < 1e-12, (chunk, n)


@pytest.mark.parametrize("kind,norm,op1,op2,layout,kernel", [
    ("glu", "out_scale", True, True, "offset", True), ("glu", "out_scale", True, True, "offset", False),
    ("relu", "l2", True, False, "offset", True), ("relu", "l2", True, False, "offset", False),
    ("glu", "none", False, True, "offset", True), ("glu", "none", False, True, "identity", False),
    ("relu", "out_scale", False, False, "identity", False)])
def test_hyperglu_fast_matches_reference_fp32(kind, norm, op1, op2, layout, kernel, monkeypatch):
    """float32, where the fast path sums in another order: 1e-5 relative, forward and every gradient."""
    cpu_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, attn_norm=norm, use_op1=op1, use_op2=op2,
                                         aligner_kind=layout, impl="fast")), 0.1)
    x = torch.randn(2, 19, 24)
    y0, g0 = run_layer(layer, x, impl="dense")
    y1, g1 = run_layer(layer, x, chunk_T=6)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    assert rel(y1, y0) < 1e-5
    for n in g0:
        assert rel(g1[n], g0[n]) < 1e-5, n


@pytest.mark.parametrize("kind,rope", list(itertools.product(["glu", "relu"], [False, True])))
def test_hyperglu_fast_decoding_equals_full_forward(kind, rope, monkeypatch):
    """The fast rows continuing a cache (one new row against n_past keys) equal the reference full forward."""
    cpu_kernel(monkeypatch, ops.hyperglu_cpu.load() is not None)
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, use_rope=rope, impl="fast"))).double()
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    full = layer(x, impl="dense")
    cache = {}
    with torch.no_grad():
        steps = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_the_cpu_kernel_takes_the_lag_layout_in_fp32_and_fp64_only(monkeypatch):
    """Where the kernel builds, the fast rows go through it for fp32/fp64 CPU chunks in the lag layout, forward
    and backward, and not for bf16 or the identity layout; the "rows" form turns it off."""
    cpu_kernel(monkeypatch, True)
    calls = []
    middle = ops.hyperglu_cpu.middle
    monkeypatch.setattr(ops.hyperglu_cpu, "middle", lambda *a, **kw: calls.append(
        "bwd" if kw.get("gA2") is not None else "fwd") or middle(*a, **kw))
    torch.manual_seed(0)
    x = torch.randn(2, 13, 24, requires_grad=True)
    HyperGLU(layer_cfg(impl="fast"))(x, chunk_T=5).sum().backward()
    assert calls == ["fwd"] * 3 + ["bwd"] * 3
    calls.clear()
    HyperGLU(layer_cfg(aligner_kind="identity", impl="fast"))(x, chunk_T=5).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        HyperGLU(layer_cfg(impl="fast"))(x, chunk_T=5).float().sum().backward()
    monkeypatch.setitem(ops.dispatch.override, "hyperglu", "rows")
    HyperGLU(layer_cfg(impl="fast"))(x, chunk_T=5).sum().backward()
    assert calls == []


def test_chunk_T_none_takes_the_device_default(monkeypatch):
    """chunk_T=None: ops.hyperglu.default_chunk(device) rows per chunk (128 on CPU, 1024 on a GPU), same outputs."""
    assert (ops.hyperglu.default_chunk("cpu"), ops.hyperglu.default_chunk("cuda")) == (128, 1024)
    seen = []
    monkeypatch.setattr(ops.hyperglu, "default_chunk", lambda device: seen.append(torch.device(device).type) or 5)
    monkeypatch.setattr(ops.hyperglu, "chunks", lambda step, *a, _c=ops.hyperglu.chunks: seen.append(step) or _c(
        step, *a))
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(chunk_T=None, impl="fast")), 0.1).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    y0, _ = run_layer(layer, x, impl="dense")
    y1, _ = run_layer(layer, x)
    assert "cpu" in seen and 5 in seen and (y0 - y1).abs().max() < 1e-12


def test_fast_memory_grows_linearly_in_T():
    layer = HyperGLU(layer_cfg(n_embd=32, block_size=512, qk_rank=16, vo_rank=32, chunk_T=32, impl="fast"))
    mem = {}
    for T in (128, 256, 512):
        x = torch.randn(1, T, 32, requires_grad=True)
        mem[T] = {impl: saved_bytes(lambda: layer(x, impl=None if impl == "fast" else impl)) for impl in ("fast", "dense")}
    assert mem[512]["fast"] / mem[256]["fast"] < 2.1  # linear: twice the tokens, twice the bytes
    assert mem[256]["fast"] / mem[128]["fast"] < 2.1
    assert mem[512]["dense"] / mem[256]["dense"] > 3.0  # the reference keeps T x T maps


@pytest.mark.parametrize("kind", ["glu", "relu"])
def test_hyperglu_fast_under_bf16_autocast_tracks_fp32(kind):
    """The hand-written backward under bf16 autocast with fp32 parameters: fp32 gradients, close to fp32's."""
    torch.manual_seed(0)
    layer = randomize(HyperGLU(layer_cfg(attn_kind=kind, block_size=32, chunk_T=7, impl="fast")), 0.1)
    x = torch.randn(2, 32, 24)
    y0, g0 = run_layer(layer, x, impl="dense")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, g1 = run_layer(layer, x)
    assert y1.dtype == torch.bfloat16
    assert ((y1.float() - y0).norm() / y0.norm()) < 2e-2
    for n in g0:
        assert g1[n].dtype == torch.float32
        cos = F.cosine_similarity(g1[n].flatten(), g0[n].flatten(), dim=0)
        assert cos > 0.995, (n, cos.item())  # autograd over the reference rows under bf16 gets 0.998-0.999 here too


def test_a_stale_build_lock_does_not_hang_the_cpu_kernel_build(tmp_path, monkeypatch):
    """torch's extension build holds a lock file; a build killed midway leaves it, and every later load would wait
    on it forever. An old lock is removed (with a message) before loading."""
    import os
    import time
    import torch.utils.cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dirs = []

    def fake_build(name, sources, build_directory, **kw):
        dirs.append((build_directory, os.path.exists(os.path.join(build_directory, "lock"))))
        return "extension"
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_build)
    monkeypatch.setattr(ops.hyperglu_cpu, "_ext", None)
    assert ops.hyperglu_cpu.load() == "extension"
    lock = os.path.join(dirs[0][0], "lock")
    open(lock, "w").close()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setattr(ops.hyperglu_cpu, "_ext", None)
    assert ops.hyperglu_cpu.load() == "extension"
    assert dirs[1] == (dirs[0][0], False)
