"""
The one place that picks the form each op runs. model.py asks here once per call and runs what it is told.

impl is GPTConfig.impl: "reference" runs model.py's plain-torch forms everywhere; "fast" runs, per op, the first form
below that covers the call:

  op        form        covers                                                               off with
  conv      "shift"     every call (ops/conv.py)
  hyperglu  "triton"    CUDA, fp16/bf16/fp32, the lag layout with every map masked           HYPERGLU_TRITON=0
                        (ops/hyperglu_triton.py)
            "fused"     CPU, fp32/fp64, the lag layout, not under torch.compile, where the   HYPERGLU_FUSED=0
                        C++ kernel builds (ops/hyperglu_cpu.py, inside ops/hyperglu.py's chunks)
            "rows"      every call (ops/hyperglu.py)
  streams   "triton"    CUDA, fp32/bf16/fp16, n <= 8 streams (HC) or n <= 4 (mHC)           STREAMS_TRITON=0
                        (ops/streams_triton.py)
            "pre"       every call (ops/streams.py: StreamPre and add_outer)

The environment is read here, once, at import: NAME=0 turns a form off, and HYPERGLU_BLOCK="BM,DVO,DVC,num_warps"
sets the HyperGLU kernels' tiles (ops/hyperglu_triton.py). Triton modules are imported on first use, so tests can set
TRITON_INTERPRET=1 first.
Tests pin a form with `override` (the pattern of nanochat's flash_attention._override_impl): override[op] = form makes
that form the first choice whatever the device, dtype and environment, for the variants it covers (the Triton
interpreter runs the kernels on CPU tensors; "fused" still needs CPU fp32/fp64 tensors, the lag layout and a build);
override[op] = "reference" runs model.py's form.
"""
import importlib
import os

import torch

from ops import hyperglu_cpu

OFF = {name for name in ("HYPERGLU_TRITON", "HYPERGLU_FUSED", "STREAMS_TRITON") if os.environ.get(name) == "0"}
HYPERGLU_BLOCK = tuple(map(int, os.environ["HYPERGLU_BLOCK"].split(","))) if os.environ.get("HYPERGLU_BLOCK") else ()
override = {}  # tests only: op -> form

_modules = {}


def triton_module(name):
    """ops.<name> (Triton kernels), or None where triton does not import; imported once, on first use."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"ops.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def conv(impl):
    return "reference" if impl == "reference" or override.get("conv") == "reference" else "shift"


def hyperglu(impl, q, mix1, mix2, lag, masks):
    """The form of ops.hyperglu.attend for queries q and the variant: mixers mix1, mix2 (None when off), lag layout or
    key order, masks = (do_masking, op1_do_masking, op2_do_masking)."""
    want = override.get("hyperglu")
    if impl == "reference" or want == "reference":
        return "reference"
    masked = masks[0] and (masks[1] or mix1 is None) and (masks[2] or mix2 is None)
    if want == "triton" or want is None and "HYPERGLU_TRITON" not in OFF and q.is_cuda and q.dtype in (
            torch.float16, torch.bfloat16, torch.float32):
        kernels = triton_module("hyperglu_triton")
        if kernels is not None and kernels.supports(lag, masked):
            return "triton"
    if want != "rows" and (want == "fused" or "HYPERGLU_FUSED" not in OFF) and fused_covers(q, lag):
        return "fused"
    return "rows"


def fused_covers(q, lag):
    """Whether the C++ CPU kernel takes queries q: CPU, fp32 or fp64, the lag layout, not compiling, and it builds."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and lag
            and not torch.compiler.is_compiling() and hyperglu_cpu.load() is not None)


def streams(impl, x, kind):
    """The form of ops.streams.connect for streams x (B,T,n,C) of a site of kind "hc" or "mhc"."""
    want = override.get("streams")
    if impl == "reference" or want == "reference":
        return "reference"
    covered = x.shape[2] <= (4 if kind == "mhc" else 8)  # mHC's register tiles grow as n^4
    if covered and (want == "triton" or want is None and "STREAMS_TRITON" not in OFF and x.is_cuda and x.dtype in (
            torch.float32, torch.bfloat16, torch.float16)) and triton_module("streams_triton") is not None:
        return "triton"
    return "pre"



# With a GPU, the kernels are imported now, outside any torch.compile trace (train.py's first forward is compiled).
# Without one, on first use, so that their tests can set TRITON_INTERPRET=1 before.
if torch.cuda.is_available():
    for _name, _switch in (("hyperglu_triton", "HYPERGLU_TRITON"), ("streams_triton", "STREAMS_TRITON")):
        if _switch not in OFF:
            triton_module(_name)
