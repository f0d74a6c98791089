"""
The embedded default corpus: the source of the Python standard library of the running interpreter, as
UTF-8 bytes (vocab 256). It ships with every Python, so the quick start needs no download and no file
from outside the project.

$ python data/pystdlib/prepare.py                 # writes data/pystdlib/{train.bin, val.bin, meta.json}

The top-level Lib/*.py files, sorted by name, each after a "# file: NAME" line, up to --max_bytes; the
last 10% of the bytes are val. Deterministic for a given Python version (recorded in meta.json), so
compare runs made with the same Python.
"""
import argparse
import glob
import os
import platform
import sys
import sysconfig

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.shards import write_shard  # noqa: E402
from data.tokenizer import save_meta  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
parser.add_argument("--max_bytes", type=int, default=4_000_000, help="stop after this many bytes (0 = all files)")
parser.add_argument("--val_fraction", type=float, default=0.1)
args = parser.parse_args()

lib = sysconfig.get_paths()["stdlib"]
files = sorted(glob.glob(os.path.join(lib, "*.py")))
if not files:
    sys.exit(f"error: no *.py files in the standard library folder {lib}")
chunks, total = [], 0
for path in files:
    with open(path, "rb") as f:
        chunk = f"# file: {os.path.basename(path)}\n".encode() + f.read() + b"\n"
    chunks.append(chunk)
    total += len(chunk)
    if args.max_bytes and total >= args.max_bytes:
        break
data = np.frombuffer(b"".join(chunks), dtype=np.uint8)[: args.max_bytes or None]
n_val = int(len(data) * args.val_fraction)
os.makedirs(args.out_dir, exist_ok=True)
write_shard(os.path.join(args.out_dir, "train.bin"), data[:-n_val], header=False)
write_shard(os.path.join(args.out_dir, "val.bin"), data[-n_val:], header=False)
save_meta(args.out_dir, {"kind": "bytes", "vocab_size": 256, "source": f"Python {platform.python_version()} stdlib"})
print(f"{len(chunks)} files from {lib}: {len(data) - n_val:,} train and {n_val:,} val bytes -> {args.out_dir}")
