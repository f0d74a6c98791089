"""
Tiny Shakespeare in GPT-2 BPE (tiktoken), nanoGPT's data/shakespeare: train.bin / val.bin (raw uint16) and
meta.json (kind="gpt2").

$ python data/shakespeare/prepare.py
$ python data/shakespeare/prepare.py --input=PATH --tokenizer_file=PATH/r50k_base.tiktoken    # fully offline

The first 90% of the characters are train, the last 10% val (301,966 / 36,059 tokens).
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.shards import read_text, write_shard  # noqa: E402
from data.tokenizer import gpt2_encoding, save_meta  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="", help="local input.txt (otherwise data/shakespeare/input.txt, downloaded)")
parser.add_argument("--tokenizer_file", default="", help="r50k_base.tiktoken for offline GPT-2 BPE")
parser.add_argument("--out_dir", default=HERE)
args = parser.parse_args()

text = read_text(args.input, os.path.join(HERE, "input.txt"), URL)
enc = gpt2_encoding(args.tokenizer_file)
n = int(len(text) * 0.9)
train, val = np.array(enc.encode_ordinary(text[:n])), np.array(enc.encode_ordinary(text[n:]))
os.makedirs(args.out_dir, exist_ok=True)
write_shard(os.path.join(args.out_dir, "train.bin"), train, header=False)
write_shard(os.path.join(args.out_dir, "val.bin"), val, header=False)
save_meta(args.out_dir, {"kind": "gpt2", "vocab_size": enc.n_vocab})
print(f"{len(train):,} train and {len(val):,} val tokens -> {args.out_dir}")
