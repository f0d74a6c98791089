"""
Tiny Shakespeare at character level, as nanoGPT's: train.bin / val.bin (raw uint16) and meta.json
(vocab_size, stoi, itos as nanoGPT's meta.pkl, and kind="char").

$ python data/shakespeare_char/prepare.py                     # downloads input.txt when it is absent
$ python data/shakespeare_char/prepare.py --input=PATH        # a local copy, no network

The first 90% of the characters are train, the last 10% val (65 characters, 1,003,854 / 111,540 tokens).
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.shards import read_text, write_shard  # noqa: E402
from data.tokenizer import char_spec, save_meta  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="", help="local input.txt (otherwise data/shakespeare_char/input.txt, downloaded)")
parser.add_argument("--out_dir", default=HERE)
args = parser.parse_args()

text = read_text(args.input, os.path.join(HERE, "input.txt"), URL)
spec = char_spec(text)
ids = np.array([spec["stoi"][c] for c in text], dtype=np.uint16)
n = int(len(ids) * 0.9)
os.makedirs(args.out_dir, exist_ok=True)
write_shard(os.path.join(args.out_dir, "train.bin"), ids[:n], header=False)
write_shard(os.path.join(args.out_dir, "val.bin"), ids[n:], header=False)
save_meta(args.out_dir, spec)
print(f"{len(text):,} characters, vocab {spec['vocab_size']}: {n:,} train and {len(ids) - n:,} val tokens -> {args.out_dir}")
