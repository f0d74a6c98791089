"""
A static cost model of the GPU kernels, read from their compiled code with no GPU: it compiles every Triton kernel
that one forward + backward launches, for sm_90, with the tiles, constexprs and grids that the ops' own plan
functions choose for the shape, disassembles the cubins with the tools in triton's nvidia backend, counts the
warp-instructions by class, following each runtime loop with its trip count, and bounds the time on an H100 SXM.
A causal flash-attention baseline (scripts/flash_baseline.py, 12 heads x 64) is counted the same way, so the
ratio shares the model's errors. docs/performance.md explains the method; it can prove a kernel slow, never fast.

$ python -m scripts.kernel_cost                        # the table at T=1024 (B=16), 4096 (B=4), 16384 (B=1)
$ python -m scripts.kernel_cost --json=cost.json       # also the JSON
$ python -m scripts.kernel_cost --T=1024 --B=16 --detail   # one shape, launch by launch
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from unittest import mock

if __package__ in (None, ""):  # run as a file, the project's packages would not import
    sys.exit("error: scripts/kernel_cost.py runs from the repository root as a module: python -m scripts.kernel_cost ...")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# -----------------------------------------------------------------------------
# the machine: an H100 SXM5. Throughputs per SM per clock, from NVIDIA's H100 datasheet and the Hopper whitepaper
# (132 SMs, 4 warp schedulers per SM, 128 FP32 lanes per SM, dense BF16 989.4 TFLOP/s at the 1.83 GHz tensor
# clock, i.e. 132 x 4096 FLOP/clock; HBM3 3.35 TB/s), and the FlashAttention-3 paper (Shah et al. 2024, §2:
# "989 TFLOPS of FP16 matmul but only 3.9 TFLOPS of special functions" = 16 MUFU lanes per SM at that clock).
# The L1 / shared-memory data path serves 128 bytes per clock per SM (32 banks x 4 bytes): every shared, local
# (spill) and global access the code issues passes it. Stores reach L2 (L1 is write-through), at 8.99 TB/s (the
# H100 row of Table 3 in Kocher et al. 2023, PMC10448217); a store inside a loop is the kernels' scratch, read back
# at least once, so L2 moves twice the bytes stored.
H100 = dict(sms=132, clock=1.83e9, issue_per_sm=4, mufu_lanes=16, smem_bytes=128, bf16_flops=989.4e12, hbm=3.35e12,
            l2=8.99e12)

CLASSES = ("tensor", "arith", "mufu", "global", "shared", "barrier", "other")
_TENSOR = {"HMMA", "HGMMA", "IMMA", "DMMA", "QMMA", "BMMA", "HMMA16816"}
_GLOBAL = {"LDG", "STG", "LDL", "STL", "LD", "ST", "RED", "REDG", "ATOM", "ATOMG", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP",
           "UTMAREDG"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "REDS"}
_BARRIER = {"BAR", "SYNCS", "MEMBAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "BSSY", "BSYNC", "WARPSYNC", "FENCE",
            "ERRBAR", "CCTL", "ARRIVES"}
_ARITH_PREFIX = ("F", "I", "H", "D", "V")
_ARITH = {"LOP3", "SHF", "SEL", "PRMT", "LEA", "POPC", "FLO", "BREV", "SGXT", "BMSK", "LOP", "IABS", "PLOP3"}
_NOT_ARITH = {"FENCE", "VOTE", "VOTEU"}


def classify(op):
    """The class of a SASS opcode (its first dotted part)."""
    if op in _TENSOR:
        return "tensor"
    if op == "MUFU":
        return "mufu"
    if op in _GLOBAL:
        return "global"
    if op in _SHARED:
        return "shared"
    if op in _BARRIER:
        return "barrier"
    if op in _ARITH or (op.startswith(_ARITH_PREFIX) and op not in _NOT_ARITH):
        return "arith"
    return "other"


def access_bytes(text):
    """Bytes one thread moves with a global or shared load/store, from the width suffix (32-bit without one)."""
    op = text.split()[0]
    for suffix, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return n
    return 4


def mma_flops(text, num_warps):
    """FLOPs per program of one tensor-core instruction: HGMMA.MxNxK runs once per warpgroup, HMMA.MNK once per warp."""
    op = text.split()[0]
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        M, N, K = map(int, m.groups())
        return 2 * M * N * K * max(1, num_warps // 4)
    m = re.match(r"[HDI]MMA\.(\d+)", op)
    if m:
        digits = m.group(1)
        M, N, K = (16, 8, int(digits[3:])) if digits.startswith("168") else (8, 8, int(digits[2:]))
        return 2 * M * N * K * num_warps
    return 0


# -----------------------------------------------------------------------------
# compile and disassemble

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
       torch.int32: "i32", torch.int64: "i64"}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_cache = {}


def _scalar_type(value):
    """Triton's launch-time specialization of a scalar: (type, divisible by 16); ints equal to 1 become constants."""
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    return "fp32", False


def compile_launch(launch, arch=90):
    """Compile one launch as the launcher would specialize it (pointers 16-byte aligned, ints divisible by 16 marked,
    ints equal to 1 folded in). Returns dict(sass=[(address, text)], registers, stack, shared, spills)."""
    sig, consts, attrs = {}, dict(launch.consts), {}
    for i, name in enumerate(launch.fn.arg_names):
        if name in launch.consts:
            sig[name] = "constexpr"
        elif name in launch.tensors:
            sig[name] = "*" + _TY[launch.tensors[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in launch.scalars:
            ty, div = _scalar_type(launch.scalars[name])
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = launch.scalars[name]
            elif div:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{launch.name}: argument {name} has no tensor, scalar or constexpr in its plan")
    key = (launch.name, id(launch.fn), tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
           tuple(sorted(attrs)), launch.num_warps, launch.num_stages, arch)
    if key in _cache:
        return _cache[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cc = triton.compile(ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cc.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        text = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    res = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    sass = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    out = dict(sass=sass, registers=int(res.group(1)), stack=int(res.group(2)), shared=int(cc.metadata.shared))
    _cache[key] = out
    return out


def loops_of(sass):
    """The runtime loops, as (first, last) instruction addresses, ordered by first address: every backward branch
    closes one (a branch to itself, the trap after EXIT, is not a loop)."""
    found = []
    for addr, text in sass:
        m = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            found.append((int(m.group(1), 16), addr))
    return sorted(found)


def count(launch, arch=90):
    """Per-launch totals over the grid: warp-instructions by class, MMA FLOPs, global and shared traffic."""
    c = compile_launch(launch, arch)
    loops = loops_of(c["sass"])
    if len(loops) != len(launch.loops):
        raise RuntimeError(f"{launch.name}: the compiled code has {len(loops)} runtime loops at "
                           f"{[(hex(a), hex(b)) for a, b in loops]}, its plan gives trip counts for "
                           f"{len(launch.loops)}; make every other loop static (tl.static_range)")
    programs = launch.programs()
    warps = launch.num_warps
    tot = dict.fromkeys(CLASSES, 0.0)
    flops = gbytes = sbytes = l1 = mufu = 0.0
    for addr, text in c["sass"]:
        body = [i for i, (a, b) in enumerate(loops) if a <= addr <= b]
        runs = launch.loops[max(body, key=lambda i: loops[i][0])] if body else programs  # the innermost loop
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text else "NOP"
        base = op.split(".")[0]
        cls = classify(base)
        if base == "NOP":
            continue
        tot[cls] += runs * warps
        if cls == "tensor":
            flops += runs * mma_flops(op, warps)
        elif cls == "mufu":
            mufu += runs * warps
        elif cls == "global":
            nbytes = runs * warps * 32 * access_bytes(op)
            gbytes += nbytes
            l1 += max(nbytes, runs * warps * H100["smem_bytes"])  # at least one pass of the data path
            if base in ("STG", "ST", "RED", "ATOM", "ATOMG"):
                sbytes += nbytes
        elif cls == "shared":
            per_warp = 32 * access_bytes(op) if base in ("LDS", "STS") else 512 if ".X4" in op else 256 if ".X2" in op else 128
            l1 += runs * warps * max(per_warp, H100["smem_bytes"])
    return dict(name=launch.name, registers=c["registers"], stack=c["stack"], shared=c["shared"], warps=warps,
                programs=programs, instr=sum(tot.values()), classes=tot, flops=flops, global_bytes=gbytes,
                store_bytes=sbytes, l1_bytes=l1, hbm_bytes=launch.hbm_bytes, mufu=mufu)


def bounds(n, gpu=H100):
    """Seconds each resource needs for the counted work, on every SM at once."""
    per_s = gpu["sms"] * gpu["clock"]
    return dict(issue=n["instr"] / (gpu["issue_per_sm"] * per_s),
                mufu=n["mufu"] * 32 / (gpu["mufu_lanes"] * per_s),
                l1=n["l1_bytes"] / (gpu["smem_bytes"] * per_s),
                tensor=n["flops"] / gpu["bf16_flops"],
                memory=max(n["hbm_bytes"] / gpu["hbm"], 2 * n["store_bytes"] / gpu["l2"]))


def estimate(n, gpu=H100):
    """(seconds, bound): the largest bound. The issue, MUFU and L1 pipes of the SMs are reported as "issue"; HBM and
    L2 as "memory"."""
    b = bounds(n, gpu)
    t = max(b.values())
    kind = max(b, key=b.get)
    return t, ("issue" if kind in ("issue", "mufu", "l1") else kind)


def occupancy(n, regs_per_sm=65536, smem_per_sm=228 * 1024, max_warps=64):
    """Warps resident per SM, from registers (allocated per warp in 256-register units), shared memory and the
    64-warp limit."""
    per_warp = -(-n["registers"] * 32 // 256) * 256
    ctas = min(regs_per_sm // (per_warp * n["warps"]), max_warps // n["warps"],
               smem_per_sm // max(n["shared"], 1) if n["shared"] else 99)
    return ctas * n["warps"]


def total(launches, arch=90):
    """Counts and the estimate of a sequence of launches (their times add)."""
    rows = [count(L, arch) for L in launches]
    t = bound = None
    secs = {}
    for r in rows:
        r["est_s"], r["bound"] = estimate(r)
        r["occupancy"] = occupancy(r)
        secs[r["bound"]] = secs.get(r["bound"], 0.0) + r["est_s"]
    t = sum(r["est_s"] for r in rows)
    bound = max(secs, key=secs.get) if secs else None
    return dict(rows=rows, est_s=t, bound=bound, flops=sum(r["flops"] for r in rows),
                instr=sum(r["instr"] for r in rows))


# -----------------------------------------------------------------------------
# the shapes: the 12 x 768 model, softmax with 12 heads of 64, HyperGLU at config/hyperglu.py's matched width

SHAPES = [(1024, 16), (4096, 4), (16384, 1)]


def hyperglu_shape(T, n_layer=12, n_embd=768):
    """(h, DK, DV, r1, r2) of config/hyperglu.py's budget-matched HyperGLU (2 heads) at block_size T."""
    from config.budget import match_budget
    from model import GPTConfig
    cfg = match_budget(GPTConfig(n_layer=n_layer, n_head=12, n_embd=n_embd, block_size=T, bias=False),
                       attn="hyperglu", n_head=2)
    h = cfg.n_head
    return h, cfg.qk_rank // (2 * h), (cfg.vo_rank or n_embd) // h, cfg.op1_rank, cfg.op2_rank


def flash_cost(B, T, H=12, D=64, dtype=torch.bfloat16, arch=90, configs=None):
    """The flash baseline at the cheapest of its tile configurations by this model (default: CONFIGS[0], which
    --tune shows is the cheapest of them)."""
    from scripts import flash_baseline
    best = None
    for cfg in configs or flash_baseline.CONFIGS[:1]:
        fwd, bwd = flash_baseline.plan(B, H, T, D, dtype, cfg)
        c = total(fwd + bwd, arch)
        if best is None or c["est_s"] < best["est_s"]:
            best = dict(c, cfg=cfg)
    best["useful_flops"] = 3.5 * 2 * B * H * T * T * D  # causal: fwd 4BHT^2D/2, bwd 2.5x fwd
    return best


def hyperglu_cost(B, T, dtype=torch.bfloat16, arch=90):
    from ops import hyperglu_triton
    h, DK, DV, r1, r2 = hyperglu_shape(T)
    fwd, bwd = hyperglu_triton.plan(B, h, T, T, DK, DV, r1, r2, glu=True, op1=True, op2=True, norm=True,
                                    dtype=dtype)
    c = total(fwd + bwd, arch)
    c.update(shape=dict(h=h, DK=DK, DV=DV, r1=r1, r2=r2))
    return c


TUNE = [dict(BM=bm, BN=bn, DVO=dvo, DVC=64, num_warps=w) for bm, bn in ((64, 64), (64, 32), (32, 32), (32, 16))
        for w in (4, 8) for dvo in (128, 512)]


def tune(B, T, dtype=torch.bfloat16, arch=90, candidates=TUNE):
    """Each HyperGLU kernel's cheapest tiles by this model at one shape: {kernel: (est seconds, tiles, registers,
    stack bytes)}. Spills are priced in: their local-memory traffic counts on the L1 path. The kernels are
    independent launches, so each is tuned alone."""
    from ops import hyperglu_triton
    h, DK, DV, r1, r2 = hyperglu_shape(T)
    best = {}
    for cand in candidates:
        block = {k: cand for k in hyperglu_triton.BLOCK}
        fwd, bwd = hyperglu_triton.plan(B, h, T, T, DK, DV, r1, r2, glu=True, op1=True, op2=True, norm=True,
                                        dtype=dtype, block=block)
        times = {}
        for L in fwd + bwd:
            n = count(L, arch)
            t, regs, stack = times.get(L.block, (0.0, 0, 0))
            times[L.block] = (t + estimate(n)[0], max(regs, n["registers"]), max(stack, n["stack"]))
        for kernel, (t, regs, stack) in times.items():
            if kernel not in best or t < best[kernel][0]:
                best[kernel] = (t, dict(cand), regs, stack)
    return best


def chunked_cost(B, T, dtype=torch.bfloat16):
    """The roofline of ops/hyperglu.py's chunked torch path (the GPU path with HYPERGLU_TRITON=0): its FLOPs and the
    bytes its ops move, counted by running it on the meta device under a dispatch mode, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode
    from config.budget import match_budget
    from model import GPTConfig
    from ops import hyperglu

    class Bytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.ops = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.t,
                                           torch.ops.aten.transpose, torch.ops.aten.as_strided,
                                           torch.ops.aten.slice, torch.ops.aten.expand, torch.ops.aten.unsqueeze,
                                           torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten.permute,
                                           torch.ops.aten.select, torch.ops.aten.narrow, torch.ops.aten.split,
                                           torch.ops.aten.reshape, torch.ops.aten.squeeze):
                self.ops += 1
                for t in [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]:
                    if isinstance(t, torch.Tensor):
                        self.bytes += t.numel() * t.element_size()
            return out

    cfg = match_budget(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=T, bias=False), attn="hyperglu",
                       n_head=2)
    h, H1 = cfg.n_head, 2 * cfg.n_head
    DK, DV = cfg.qk_rank // H1, 768 // h
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, H1, T, DK, **meta, requires_grad=True)
    k = torch.empty(B, H1, T, DK, **meta, requires_grad=True)
    v = torch.empty(B, h, T, DV, **meta, requires_grad=True)
    c1 = torch.empty(B, H1, T, cfg.op1_rank, **meta, requires_grad=True)
    c2 = torch.empty(B, h, T, cfg.op2_rank, **meta, requires_grad=True)
    params = tuple(torch.empty(*s, **meta, requires_grad=True) for s in
                   ((H1, T, cfg.op1_rank), (H1, cfg.op1_rank, T), (H1, T), (h, T, cfg.op2_rank),
                    (h, cfg.op2_rank, T), (h, T)))
    step = hyperglu.default_chunk("cuda")
    no_autocast = lambda *a, **kw: contextlib.nullcontext()  # noqa: E731 (autocast has no meta device)
    with mock.patch("torch.autocast", no_autocast), FlopCounterMode(display=False) as fc, Bytes() as mem:
        spec = hyperglu.Spec(glu=True, norm=True, eps=cfg.norm_eps, lag=True, mask=True, mask1=True, mask2=True,
                             shortcut1=True, shortcut2=True, fused=False)
        out = hyperglu.RecomputeRows.apply(spec, 0, step, True, q, k, v, c1, c2, *params)
        out.backward(torch.empty_like(out))
    flops, nbytes = fc.get_total_flops(), mem.bytes
    t_tensor, t_mem = flops / H100["bf16_flops"], nbytes / H100["hbm"]
    return dict(flops=flops, bytes=nbytes, ops=mem.ops, est_s=max(t_tensor, t_mem),
                bound="tensor" if t_tensor > t_mem else "memory")


STREAMS = dict(n=4, C=768, tokens=8 * 1024, sites=24, plain_step_s=27e-3, h200_hbm=4.8e12)


def streams_cost(kind, n=STREAMS["n"], C=STREAMS["C"], N=STREAMS["tokens"], arch=90):
    """One HC ("hc", dynamic) or mHC site's kernels, forward + backward, at n streams of width C over N tokens (fp32
    streams, TF32 projections): the bytes per token of per-token tensors they move (each launch's reads and
    writes of the streams, u, y, their gradients and the per-token coefficients, plus the backward's weight-
    gradient GEMM, which reads x), in passes over the streams (X = n C 4 bytes), beyond a plain residual's
    (x + f(x): read x and y, write the sum; in backward autograd adds two gradients: 6 C 4 bytes per token), and
    the estimated overhead on the 12 x 768 compiled step: the extra bytes of 24 sites at the H200's 4.8 TB/s over
    the measured plain step (27 ms at B=8, T=1024 on the H200, docs/performance.md). Also the model's time of the
    site's kernels on an H100 (their instructions, counted as for HyperGLU)."""
    from ops import streams_triton
    launches, torch_bytes = streams_triton.site_plan(kind, N, n, C, torch.float32, prec="tf32")
    rows = total(launches, arch)["rows"]
    est = sum(r["est_s"] for r in rows) + torch_bytes / H100["hbm"]
    X = n * C * 4
    per_token = (sum(L.hbm_bytes for L in launches) + torch_bytes) / N
    plain = 6 * C * 4
    extra = (per_token - plain) * STREAMS["sites"] * N
    return dict(residual=kind, n=n, C=C, bytes_per_token_site=per_token, passes=per_token / X,
                passes_beyond_plain=(per_token - plain) / X,
                est_step_overhead=1 + extra / STREAMS["h200_hbm"] / STREAMS["plain_step_s"],
                est_ms_per_site=est * 1e3, rows=rows)


# -----------------------------------------------------------------------------

def fmt_ms(s):
    return f"{s * 1e3:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--T", type=int, default=None, help="one sequence length (with --B) instead of the three shapes")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--detail", action="store_true", help="launch by launch, with the instruction classes")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--tune", action="store_true", help="each HyperGLU kernel's cheapest tiles among TUNE, at --T/--B "
                   "(default T=1024, B=16); ops/hyperglu_triton.BLOCK holds the choice")
    args = p.parse_args()
    if args.tune:
        T, B = args.T or 1024, args.B or 16
        from scripts import flash_baseline
        fl = flash_cost(B, T, arch=args.arch, configs=flash_baseline.CONFIGS)
        print(f"flash baseline, T={T} B={B}: {fmt_ms(fl['est_s'])} ms with {fl['cfg']} "
              f"(CONFIGS[0] is {flash_baseline.CONFIGS[0]})")
        print(f"tiles by the model, T={T} B={B}, triton {triton.__version__}:")
        for kernel, (t, cand, regs, stack) in tune(B, T, arch=args.arch).items():
            print(f"  {kernel}: {fmt_ms(t)} ms with {cand} ({regs} registers, {stack} stack bytes)")
        return
    shapes = [(args.T, args.B or 1)] if args.T else SHAPES
    t0 = time.time()
    print(f"static cost model: sm_{args.arch}, bf16, triton {triton.__version__}, torch {torch.__version__}; "
          f"H100 SXM constants {H100}\n")
    out = dict(triton=triton.__version__, gpu=H100, hyperglu=[], flash=[], chunked=[], kernels=[])
    table = ["| T | B | HyperGLU (h, DK, DV, r) | est ms | bound | flash est ms | flash TFLOP/s | ratio | "
             "chunked torch est ms | chunked / flash |", "|---|---|---|---|---|---|---|---|---|---|"]
    kernels = {}
    for T, B in shapes:
        fl = flash_cost(B, T, arch=args.arch)
        hg = hyperglu_cost(B, T, arch=args.arch)
        ch = chunked_cost(B, T)
        ratio = hg["est_s"] / fl["est_s"]
        s = hg["shape"]
        table.append(f"| {T} | {B} | {s['h']}, {s['DK']}, {s['DV']}, {s['r1']} | {fmt_ms(hg['est_s'])} | "
                     f"{hg['bound']} | {fmt_ms(fl['est_s'])} | {fl['useful_flops'] / fl['est_s'] / 1e12:.0f} | "
                     f"{ratio:.2f}x | {fmt_ms(ch['est_s'])} | {ch['est_s'] / fl['est_s']:.2f}x |")
        out["hyperglu"].append(dict(T=T, B=B, est_ms=hg["est_s"] * 1e3, flash_est_ms=fl["est_s"] * 1e3,
                                    ratio=ratio, bound=hg["bound"], shape=s, flops=hg["flops"],
                                    instr=hg["instr"]))
        out["flash"].append(dict(T=T, B=B, est_ms=fl["est_s"] * 1e3, bound=fl["bound"], cfg=fl["cfg"],
                                 useful_tflops=fl["useful_flops"] / fl["est_s"] / 1e12))
        out["chunked"].append(dict(T=T, B=B, est_ms=ch["est_s"] * 1e3, flops=ch["flops"], bytes=ch["bytes"],
                                   ops=ch["ops"], bound=ch["bound"]))
        for r in hg["rows"] + fl["rows"]:
            kernels.setdefault(r["name"], r)
        if args.detail:
            for what, c in (("HyperGLU", hg), ("flash", fl)):
                print(f"{what} T={T} B={B}: {fmt_ms(c['est_s'])} ms ({c['bound']})")
                print("| kernel | programs | warps | regs | stack | shared | occ warps | Minstr | tensor% | "
                      "GFLOP | MUFU M | L1 GB | issue ms | mufu ms | l1 ms | tensor ms | mem ms | est ms |")
                print("|" + "---|" * 18)
                for r in c["rows"]:
                    b = bounds(r)
                    print(f"| {r['name']} | {r['programs']} | {r['warps']} | {r['registers']} | {r['stack']} | "
                          f"{r['shared']} | {r['occupancy']} | {r['instr'] / 1e6:.1f} | "
                          f"{100 * r['classes']['tensor'] / r['instr']:.1f} | {r['flops'] / 1e9:.1f} | "
                          f"{r['mufu'] / 1e6:.2f} | {r['l1_bytes'] / 1e9:.1f} | " +
                          " | ".join(fmt_ms(b[k]) for k in ("issue", "mufu", "l1", "tensor", "memory")) +
                          f" | {fmt_ms(r['est_s'])} |")
                    print("|  classes: " + ", ".join(f"{k} {v / r['instr'] * 100:.0f}%" for k, v in
                                                      r["classes"].items() if v) + " |")
                print()
    print("\n".join(table))
    print(f"\nHC / mHC sites (n={STREAMS['n']}, C={STREAMS['C']}, {STREAMS['tokens']} tokens, fp32 streams; a pass is "
          f"n C 4 bytes per token):\n\n| residual | bytes / token / site | passes | beyond plain | est. step overhead "
          f"(24 sites, H200 bytes) | kernels est ms / site (H100) |\n|---|---|---|---|---|---|")
    out["streams"] = []
    for kind in ("hc", "mhc"):
        sc = streams_cost(kind, arch=args.arch)
        print(f"| {kind} | {sc['bytes_per_token_site']:,.0f} | {sc['passes']:.1f} | {sc['passes_beyond_plain']:.1f} | "
              f"{sc['est_step_overhead']:.3f}x | {sc['est_ms_per_site']:.3f} |")
        out["streams"].append({k: v for k, v in sc.items() if k != "rows"})
        for r in sc["rows"]:
            kernels.setdefault(r["name"], r)
    print("\n| kernel | registers | stack bytes | shared bytes (dynamic) | warps | resident warps/SM |\n|---|---|---|---|---|---|")
    for r in kernels.values():
        print(f"| {r['name']} | {r['registers']} | {r['stack']} | {r['shared']} | {r['warps']} | {r['occupancy']} |")
        out["kernels"].append(dict(name=r["name"], registers=r["registers"], stack_bytes=r["stack"],
                                   shared_bytes=r["shared"], warps=r["warps"]))
    print(f"\n({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
