"""Shared test helpers (`from conftest import tiny, ...`); pytest also loads this file first, which puts the repository
root on sys.path so that the tests import the top-level scripts (model.py, train.py, ...) from any working directory.

  tests/model/    model.py's reference: attention, residuals, the GPT, configs, checkpoints' model_args
  tests/ops/      each fast path of ops/ against its reference in model.py (the Triton kernels under TRITON_INTERPRET=1)
  tests/scripts/  train.py, sample.py, bench.py, data/, plots/ and scripts/ as a user runs them
"""
import dataclasses
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import saved_bytes  # noqa: E402,F401  (the one counter of the bytes autograd saves)
from hyperglu import HyperGLUConfig  # noqa: E402
from model import GPTConfig  # noqa: E402

ATTNS = ["softmax", "hyperglu", "hypermlp"]
RESIDUALS = ["plain", "hc", "mhc"]


def tiny(**kw):
    """A 2-layer GPT config small enough for float64 checks of every path (HyperGLU rows in chunks of 7)."""
    base = dict(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                qk_rank=8, op1_rank=4, op2_rank=4, chunk_T=7)
    base.update(kw)
    return GPTConfig(**base)


def layer_cfg(impl="reference", **kw):
    """One HyperGLU layer's config, from the official fields (HyperGLUConfig), running impl."""
    base = dict(n_embd=24, n_head=2, block_size=20, qk_rank=8, vo_rank=12, op1_rank=3, op2_rank=3, chunk_T=6)
    base.update(kw)
    return dataclasses.replace(HyperGLUConfig(**base), impl=impl)


def randomize(module, std=0.3):
    """Move every parameter off its init so mixers, diagonals and HC coefficients all matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def run_layer(layer, x, **kw):
    """(output, gradients of x and of every parameter) of layer(x, **kw) against a fixed linspace output gradient."""
    x = x.clone().requires_grad_(True)
    y = layer(x, **kw)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["x"] = x.grad.clone()
    layer.zero_grad()
    return y.detach(), grads


def assert_close(actual, expected, tol, what=None):
    """max |actual - expected| <= tol * max(1, max |expected|): absolute up to 1, relative beyond. None must match
    None. A dict compares key by key."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), what
        for k in expected:
            assert_close(actual[k], expected[k], tol, (what, k) if what is not None else k)
        return
    assert (actual is None) == (expected is None), what
    if expected is not None:
        err = (actual.double() - expected.double()).abs().max().item()
        assert err <= tol * max(1.0, expected.abs().max().item()), (what, err)
