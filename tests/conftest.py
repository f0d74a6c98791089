"""Shared test helpers (`from conftest import tiny, ...`); pytest also loads this file first, which puts the repository
root on sys.path so that the tests import the top-level scripts (model.py, train.py, ...) from any working directory.

  tests/model/    model.py's reference: attention, residuals, the GPT, configs, checkpoints' model_args
  tests/ops/      each fast path of ops/ against its reference in model.py (the Triton kernels under TRITON_INTERPRET=1)
  tests/scripts/  train.py, sample.py, eval.py, export_hf.py, bench.py, data/, plots/ and scripts/ as a user runs them
"""
import dataclasses
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import saved_bytes  # noqa: E402,F401  (the one counter of the bytes autograd saves)
from hyperglu import HyperGLUConfig  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ATTNS = ["softmax", "hyperglu", "hypermlp"]
RESIDUALS = ["plain", "hc", "mhc"]
R50K = os.path.join(REPO, "..", "shared", "data", "tokenizers", "r50k_base.tiktoken")  # GPT-2 BPE offline, where present


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


# -----------------------------------------------------------------------------
# HellaSwag and the Hugging Face export (tests/scripts/test_eval.py, test_hf.py)

BYTES = {"kind": "bytes", "vocab_size": 256}
# every attention x residual, and the variants that change what a row reads: RoPE with the KV conv, HyperGLU's
# identity (key-order) layout
VARIANTS = [dict(attn=a, residual=r) for a in ATTNS for r in RESIDUALS]
VARIANTS += [dict(attn="softmax", pos="rope", use_kv_conv=True), dict(attn="hyperglu", aligner_kind="identity")]

# rowanz/hellaswag's schema (data/hellaswag_val.jsonl); the last context is longer than the tiny models' block_size,
# so it is cut from the left, and its label is a string, as in the Hugging Face copy
HELLASWAG = [
    {"ind": 4, "activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she",
     "ctx": "A woman pours flour into a bowl. she", "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["throws the bowl at the dog.", "stirs in two eggs and some sugar.", "paints the ceiling blue.",
                 "drives to the beach."], "source_id": "activitynet~v_0001"},
    {"ind": 9, "activity_label": "Tennis", "ctx_a": "A man bounces a ball on a court.", "ctx_b": "he",
     "ctx": "A man bounces a ball on a court. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["eats the racket.", "reads a newspaper in the rain.", "swims across the net.",
                 "serves the ball over the net."], "source_id": "activitynet~v_0002"},
    {"ind": 13, "activity_label": "Playing piano", "ctx_a": "A boy sits at a piano.", "ctx_b": "he",
     "ctx": "A boy sits at a piano. he", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["plays a short song.", "mails it.", "cooks dinner on the keys while a cat watches.", "flies."],
     "source_id": "activitynet~v_0003"},
    {"ind": 21, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant. [title] Check the "
     "soil. [step] Push a finger into the soil near the stem to feel whether it is dry.", "ctx_b": "",
     "ctx": "[header] How to water a plant. [title] Check the soil. [step] Push a finger into the soil near the "
     "stem to feel whether it is dry.", "split": "val", "split_type": "zeroshot", "label": "2",
     "endings": ["Sing to it.", "Paint it.", "If it is dry, pour water slowly at the base.", "Sell it."],
     "source_id": "wikihow~1"},
]


def write_jsonl(path, examples=HELLASWAG):
    """examples as a jsonl file at path (one JSON object a line); returns the path as a string."""
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    return str(path)


def bytes_model(seed=0, **cfg):
    """A small random GPT over bytes (context 64), its weights moved off their init (HC/mHC start as the plain
    network), in eval mode."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, block_size=64), **cfg)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_run(folder, model, tokenizer=BYTES):
    """A run folder holding model as its ckpt_best.pt (the fields eval.py, sample.py and export_hf.py read)."""
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "tokenizer": tokenizer,
                "step": 5}, os.path.join(folder, "ckpt_best.pt"))
    return str(folder)
