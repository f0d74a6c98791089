"""
Compile the HyperGLU Triton kernels for a GPU target without a GPU, and print each kernel's registers and spills
(the stack frame): what ptxas made of them, at no device time.

$ python scripts/kernel_report.py                       # sm_90 (H100/H200), bf16, the default tile sizes
$ python scripts/kernel_report.py --tiles=32,32,64,4 --dtype=fp32 --arch=90

A kernel at 255 registers with a stack frame spills to local memory; the tile sizes (ops/hyperglu_triton.BLOCK,
HYPERGLU_BLOCK in the environment) trade registers against tensor-core tile size.
"""
import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ops.hyperglu_triton as kernels  # noqa: E402

INTS = {"h", "TQ", "TK", "W", "row0", "DK", "DV", "R1", "R2"}
INPUTS = {"q", "k", "v", "c1", "c2", "OUT", "DY"}  # in the input dtype; every other pointer is fp32


def report(fn, consts, dtype, arch, num_warps):
    sig = {}
    for name in fn.arg_names:
        sig[name] = ("constexpr" if name in consts else "i32" if name in INTS else "fp32" if name == "eps"
                     else f"*{dtype}" if name in INPUTS else "*fp32")
    t0 = time.time()
    cc = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=num_warps))
    path = os.path.join("/tmp", f"{fn.__name__}.cubin")
    with open(path, "wb") as f:
        f.write(cc.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    return f"| {fn.__name__} | {m.group(1)} | {m.group(2)} | {m.group(3)} | {time.time() - t0:.1f} |"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", default=None, help="BM,BN,DVB,num_warps (default: ops/hyperglu_triton.BLOCK)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--glu", type=int, default=1)
    args = p.parse_args()
    BM, BN, DVB, warps = (map(int, args.tiles.split(",")) if args.tiles else
                          (kernels.BLOCK[k] for k in ("BM", "BN", "DVB", "num_warps")))
    base = dict(DKP=32, R1P=16, R2P=16, GLU=bool(args.glu), OP1=True, OP2=True, ACC=tl.float32, BM=BM, BN=BN,
                PREC=None if args.dtype != "fp32" else "tf32")
    print(f"sm_{args.arch}, {args.dtype}, tiles {BM} x {BN}, value blocks {DVB}, {warps} warps, triton "
          f"{triton.__version__}\n")
    print("| kernel | registers | stack bytes | shared bytes | compile s |\n|---|---|---|---|---|")
    for fn, extra in ((kernels._fwd_stats, dict(NORM=True)), (kernels._fwd_out, dict(NORM=True, DVB=DVB)),
                      (kernels._bwd_rows, dict(DVB=DVB)), (kernels._bwd_keys, dict(DVB=DVB)),
                      (kernels._bwd_params, dict(DVB=DVB)), (kernels._bwd_values, dict(DVB=DVB))):
        print(report(fn, dict(base, **extra), args.dtype, args.arch, warps), flush=True)


if __name__ == "__main__":
    main()
