"""
The fused C++ CPU kernel for the middle of HyperGLU's training path (ops/hyperglu.py): per chunk of query rows in the
lag layout, q k^T, op1, the GLU and the norm, and op2, forward and backward, on blocks of ROWS rows that stay in
cache. The source is ops/csrc/hyperglu_cpu.cpp.

It is compiled on first use with torch.utils.cpp_extension (a C++ compiler with OpenMP, and ninja; about 30 s,
then cached) for fp32 and fp64 CPU tensors. Where it cannot be built, for other dtypes (bf16 autocast), under
torch.compile and on GPUs, ops/hyperglu.py runs its eager steps, which compute the same numbers (ops.dispatch
decides; HYPERGLU_FUSED=0 in the environment turns the kernel off).

The build folder, under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, is keyed by a hash of the source and
one of the torch it links against (version, install path, flags), and it builds a copy of the source kept there:
checkouts and venvs that share the cache build once per distinct source and torch, never over each other. Builds
into one folder take turns under an flock, which the kernel drops when its holder dies (a SIGKILL mid-build
included): a build killed midway never blocks the next, and a live one is waited for BUILD_WAIT seconds at most.
"""

import contextlib
import fcntl
import hashlib
import os
import sys
import time
import warnings

import torch

ROWS = 64  # query rows per block: a block's maps stay in L2 (32, 64 and 128 within 2% of each other at T=1024)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "hyperglu_cpu.cpp")
BUILD_WAIT = 600  # seconds to wait for another process's build before running the eager steps instead

_ext = None


@contextlib.contextmanager
def build_lock(folder, wait=None):
    """Hold an flock on folder/build.lock while the block runs: one build per folder at a time across processes.
    A holder that died released it; a live one is polled every 0.2 s for `wait` seconds (BUILD_WAIT), then
    TimeoutError. Where the file system has no flock, the block runs without it."""
    wait = BUILD_WAIT if wait is None else wait
    path = os.path.join(folder, "build.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.time() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise TimeoutError(f"another process has been building in {folder} for over {wait} s") from None
                if not told:
                    warnings.warn(f"ops/hyperglu_cpu.py: waiting for another process's build in {folder}",
                                  RuntimeWarning)
                    told = True
                time.sleep(0.2)
            except OSError:  # no flock here
                break
        yield
    finally:
        os.close(fd)  # and with it the lock


def load():
    """The compiled extension, or None where it cannot be built."""
    global _ext
    if _ext is None:
        _ext = False
        cap = torch.backends.cpu.get_cpu_capability()  # vectorise exp/log for what this CPU has
        flags = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
                            "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
                 "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]}.get(cap, [])
        name = f"hyperglu_cpu_{cap.lower()}"
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "torch_extensions")
        try:
            from torch.utils.cpp_extension import load as build_extension
            with open(SOURCE, "rb") as f:
                source = f.read()
            key = hashlib.sha256(source).hexdigest()[:12]
            env = "\0".join([torch.__version__, os.path.dirname(torch.__file__), sys.version, *flags])
            env = hashlib.sha256(env.encode()).hexdigest()[:8]
            build = os.path.join(root, f"{name}_{key}_torch{torch.__version__.replace('+', '_')}_{env}")
            os.makedirs(build, exist_ok=True)
            with build_lock(build):
                copy = os.path.join(build, "hyperglu_cpu.cpp")  # the folder's own: the same path for every checkout
                if not os.path.exists(copy):
                    with open(f"{copy}.tmp-{os.getpid()}", "wb") as f:
                        f.write(source)
                    os.replace(f"{copy}.tmp-{os.getpid()}", copy)
                baton = os.path.join(build, "lock")  # torch's own build lock: under ours, one left there is stale (a
                if os.path.exists(baton):           # build killed midway), and torch would wait on it for ever
                    os.remove(baton)
                if not os.path.exists(os.path.join(build, f"{name}.so")):
                    warnings.warn("ops/hyperglu_cpu.py: building the fused HyperGLU CPU kernel (first use, about 30 s; "
                                  "then cached)", RuntimeWarning)
                _ext = build_extension(name=name, sources=[copy], build_directory=build, verbose=False,
                                       extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, ...: the eager path computes the same thing
            warnings.warn(f"ops/hyperglu_cpu.py: the fused CPU kernel could not be built ({type(e).__name__}: {e}); "
                          f"HyperGLU runs its eager steps", RuntimeWarning)
    return _ext or None


def middle(q, k, c1, c2, mix1, mix2, base, glu, use_norm, eps, mask1, mask2, gA2=None):
    """The fused middle of one chunk: q (B,H1,M,dk) and k (B,H1,W,dk), whose product in lag order is op1's input;
    mix1 = (U1 (H1,W,r1), Vt1 (H1,r1,W), scale (H1,W)) and mix2 likewise for op2, each cut to the chunk's W lags
    (None when the mixer is off); base = W-1-row_start; glu (else ReLU), use_norm (1/max(n, eps) per row), and
    whether op1's and op2's outputs are masked.
    Returns Ab (B,h,M,W+base), op2's output in lag order with `base` zero columns after it (key_view reads it),
    and inv = 1/max(n, eps) (B,h,M) (None for attn_norm="none"). With gA2 (B,h,M,W), the gradient of op2's
    output, it also returns dq (B,H1,M,dk), dk (B,H1,W,dk), dc1, dc2 and the mixers' (dU, dVt, dd) summed over
    the batch. gA2 is taken as dout v^T, before the norm's per-row inv, and is scaled in place."""
    (B, H1, M, _), W = q.shape, k.shape[2]
    h = H1 // 2 if glu else H1
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    Ab = q.new_empty(B, h, M, W + base)
    Ab[..., W:].zero_()
    t = dict(q=q, k=k, A2=Ab[..., :W], n=q.new_empty(B, h, M), inv=q.new_empty(B, h, M))
    for i, (mix, c) in enumerate(((mix1, c1), (mix2, c2)), 1):
        if mix is not None:
            t.update({f"U{i}": mix[0], f"Vt{i}": mix[1], f"s{i}": mix[2],
                      f"c{i}": c if c.stride(-1) == 1 else c.contiguous()})
    if gA2 is not None:
        r1, r2 = (mix1[0].shape[2] if mix1 else 0), (mix2[0].shape[2] if mix2 else 0)
        nb = -(-M // ROWS)  # the mixers' and k's gradients accumulate per (block of rows, batch, head)
        z = lambda *shape: q.new_zeros(nb, B, *shape)
        t.update(gA2=gA2, gq=q.new_empty(q.shape), gk=z(H1, W, q.shape[3]),
                 gc1=q.new_empty(B, H1, M, r1), gVt1=z(H1, r1, W), gU1T=z(H1, r1, W), gd1=z(H1, W),
                 gc2=q.new_empty(B, h, M, r2), gVt2=z(h, r2, W), gU2T=z(h, r2, W), gd2=z(h, W))
    load().middle(t, glu=glu, use_norm=use_norm, op1=mix1 is not None, op2=mix2 is not None, mask1=mask1,
                  mask2=mask2, eps=eps, base=base, rows=ROWS, backward=gA2 is not None)
    out = dict(Ab=Ab, inv=t["inv"] if use_norm else None)
    if gA2 is not None:
        grads = lambda i: (t[f"gU{i}T"].sum((0, 1)).transpose(1, 2), t[f"gVt{i}"].sum((0, 1)), t[f"gd{i}"].sum((0, 1)))
        out.update(gq=t["gq"], gk=t["gk"].sum(0), gc1=t["gc1"] if mix1 else None, gc2=t["gc2"] if mix2 else None,
                   mix1=grads(1) if mix1 else None, mix2=grads(2) if mix2 else None)
    return out
