"""
FineWeb as GPT-2 token shards in the llm.c format (fineweb_val_000000.bin, fineweb_train_000001.bin, ...),
100M tokens per shard, every document prefixed by <|endoftext|>; shard 0 is val.

Pre-tokenized shards from the Hugging Face hub (dataset kjj0/fineweb10B-gpt2, as modded-nanogpt uses):
$ python data/fineweb/prepare.py --num_shards=9          # val + 8 train shards = 900M tokens (pip install huggingface_hub)
Or tokenize the HF dataset yourself (HuggingFaceFW/fineweb, sample-10BT):
$ python data/fineweb/prepare.py --source=tokenize --num_shards=9   # pip install datasets tqdm
Or tokenize local files (.jsonl/.json with a "text" field, or .txt, one document per file), no network:
$ python data/fineweb/prepare.py --source=tokenize --input=docs/ --tokenizer_file=r50k_base.tiktoken
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from data.shards import open_shard, write_shard  # noqa: E402
from data.tokenizer import GPT2_EOT, gpt2_encoding, save_meta  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--source", default="hub", choices=["hub", "tokenize"])
parser.add_argument("--num_shards", type=int, default=9, help="shards to write, val included (0 = all)")
parser.add_argument("--out_dir", default=HERE)
parser.add_argument("--repo", default="kjj0/fineweb10B-gpt2", help="hub dataset with pre-tokenized shards")
parser.add_argument("--dataset", default="HuggingFaceFW/fineweb", help="HF dataset to tokenize")
parser.add_argument("--subset", default="sample-10BT")
parser.add_argument("--input", default="", help="local .jsonl/.json/.txt file or folder to tokenize instead")
parser.add_argument("--tokenizer_file", default="", help="r50k_base.tiktoken for offline GPT-2 BPE")
parser.add_argument("--shard_tokens", type=int, default=100_000_000)
parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
args = parser.parse_args()
os.makedirs(args.out_dir, exist_ok=True)


def progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="tok", unit_scale=True, desc=desc)
    except ImportError:  # tqdm is optional: a plain line per shard instead
        class Plain:
            def update(self, n):
                pass

            def close(self):
                print(f"{desc}: done")
        return Plain()


def from_hub():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        sys.exit("error: --source=hub needs huggingface_hub: pip install huggingface_hub")
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, 104)]
    for name in names[: args.num_shards or None]:
        if not os.path.isfile(os.path.join(args.out_dir, name)):
            print(f"downloading {args.repo}/{name}")
            hf_hub_download(repo_id=args.repo, filename=name, repo_type="dataset", local_dir=args.out_dir)
        open_shard(os.path.join(args.out_dir, name))  # validate: magic, version, length


def local_docs(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)) if os.path.isdir(path) else [path]
    for f in (f for f in files if os.path.isfile(f)):
        if f.endswith((".jsonl", ".json")):
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)["text"]
        elif f.endswith(".txt"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield fh.read()


def hub_docs():
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: --source=tokenize needs datasets: pip install datasets (or pass --input=PATH)")
    for row in load_dataset(args.dataset, name=args.subset, split="train", streaming=True):
        yield row["text"]


_enc = None


def tokenize(doc):
    global _enc
    if _enc is None:
        _enc = gpt2_encoding(args.tokenizer_file)
    return np.array([GPT2_EOT] + _enc.encode_ordinary(doc), dtype=np.uint16)


def from_docs(docs):
    gpt2_encoding(args.tokenizer_file)  # fail early and clearly when the ranks cannot be loaded
    buf, fill, index, bar = np.empty(args.shard_tokens, dtype=np.uint16), 0, 0, None

    def flush(n):
        nonlocal index, bar
        name = f"fineweb_{'val' if index == 0 else 'train'}_{index:06d}.bin"
        write_shard(os.path.join(args.out_dir, name), buf[:n])
        bar.close()
        index, bar = index + 1, None

    with mp.Pool(args.workers) as pool:
        for toks in pool.imap(tokenize, docs, chunksize=16):
            while len(toks):
                bar = bar or progress(args.shard_tokens, f"shard {index}")
                take = min(len(toks), args.shard_tokens - fill)
                buf[fill:fill + take] = toks[:take]
                fill, toks = fill + take, toks[take:]
                bar.update(take)
                if fill == args.shard_tokens:
                    flush(fill)
                    fill = 0
                    if args.num_shards and index >= args.num_shards:
                        return index
    if fill:
        flush(fill)
    return index


if args.source == "hub":
    from_hub()
else:
    n = from_docs(local_docs(args.input) if args.input else hub_docs())
    if n < 2:
        print(f"warning: only {n} shard written (val); add data or lower --shard_tokens to get a train shard")
save_meta(args.out_dir, {"kind": "gpt2", "vocab_size": 50257})
print(f"shards in {args.out_dir}")
