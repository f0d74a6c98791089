"""
Any text file, or a folder of them, to header shards (llm.c format) plus meta.json, for train.py --dataset=OUT_DIR.

$ python data/textfile/prepare.py --input=book.txt --out_dir=data/book                       # GPT-2 BPE
$ python data/textfile/prepare.py --input=notes/ --pattern="**/*.md" --tokenizer=char --out_dir=data/notes
$ python data/textfile/prepare.py --input=book.txt --out_dir=data/book --tokenizer_file=r50k_base.tiktoken  # offline

Files are read in sorted order. With GPT-2 BPE every file starts with <|endoftext|>; with char or bytes
files are joined by a newline. The last --val_fraction of the tokens are val. Shards hold at most
--shard_tokens tokens: NAME_val_000000.bin ..., NAME_train_000000.bin ...

--tokenizer=bytes takes the files' bytes as they are. The other tokenizers decode UTF-8 and stop at invalid
UTF-8 with the file and byte offset, unless --errors=replace (bad bytes become U+FFFD). Files that look binary
(a NUL byte in the first 8 KB) are skipped with a warning. Shards already in OUT_DIR (any that train.py would
read) are removed before the new ones are written, so a re-run never mixes old and new data; a file there that is
named like a shard but is not one (not the format its name says) is an error, and nothing is removed.
"""
import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.shards import open_shard, write_shard  # noqa: E402
from data.tokenizer import GPT2_EOT, char_spec, gpt2_encoding, save_meta  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", required=True, help="a text file or a folder")
parser.add_argument("--pattern", default="**/*.txt", help="glob for files inside a folder")
parser.add_argument("--out_dir", required=True)
parser.add_argument("--name", default="", help="shard name prefix (default: the out_dir's name)")
parser.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char", "bytes"])
parser.add_argument("--tokenizer_file", default="", help="r50k_base.tiktoken for offline GPT-2 BPE")
parser.add_argument("--errors", default="strict", choices=["strict", "replace"],
                    help="invalid UTF-8 (char, gpt2): stop with an error, or replace it with U+FFFD")
parser.add_argument("--val_fraction", type=float, default=0.1)
parser.add_argument("--shard_tokens", type=int, default=100_000_000)
args = parser.parse_args()

# train.py reads every shard in the folder, so an earlier prepare's must not stay beside the new ones; but a file
# that is named like a shard and is not one is someone else's: refuse before reading or writing anything
old = [p for pat in ("*_train_*.bin", "*_val_*.bin", "train.bin", "val.bin")
       for p in glob.glob(os.path.join(glob.escape(args.out_dir), pat))]
for p in old:
    try:
        if not os.path.isfile(p):
            raise ValueError(f"{p}: a folder")
        open_shard(p, header=os.path.basename(p) not in ("train.bin", "val.bin"))
    except ValueError as e:
        sys.exit(f"error: {p} is not a shard ({str(e).removeprefix(p + ': ')}); prepare removes the shards of an "
                 f"earlier prepare from --out_dir, and no other file: move it out of {args.out_dir}, or pick another "
                 f"--out_dir")

if os.path.isdir(args.input):
    files = sorted(f for f in glob.glob(os.path.join(args.input, args.pattern), recursive=True) if os.path.isfile(f))
elif os.path.isfile(args.input):
    files = [args.input]
else:
    sys.exit(f"error: --input '{args.input}' is neither a file nor a folder")
if not files:
    sys.exit(f"error: no files match '{args.pattern}' in {args.input}")
texts = []
for path in files:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:8192]:
        print(f"warning: skipping {path}: it looks binary (a NUL byte in its first 8 KB)", file=sys.stderr)
        continue
    if args.tokenizer != "bytes":
        try:
            raw = raw.decode("utf-8", errors=args.errors)
        except UnicodeDecodeError as e:
            sys.exit(f"error: {path}: invalid UTF-8 at byte offset {e.start}; fix the file, pass --errors=replace "
                     f"(bad bytes become U+FFFD), or use --tokenizer=bytes")
    texts.append(raw)
if not texts:
    sys.exit(f"error: every file in {args.input} looks binary; nothing to prepare")

if args.tokenizer == "gpt2":
    enc = gpt2_encoding(args.tokenizer_file)
    spec = {"kind": "gpt2", "vocab_size": enc.n_vocab}
    ids = np.concatenate([np.array([GPT2_EOT] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts])
elif args.tokenizer == "char":
    text = "\n".join(texts)
    spec = char_spec(text)
    if spec["vocab_size"] > 2 ** 16:
        sys.exit(f"error: {spec['vocab_size']} distinct characters do not fit uint16 shards; use --tokenizer=bytes")
    ids = np.array([spec["stoi"][c] for c in text], dtype=np.uint16)
else:
    spec = {"kind": "bytes", "vocab_size": 256}
    ids = np.frombuffer(b"\n".join(texts), dtype=np.uint8).astype(np.uint16)

n_val = max(1, int(len(ids) * args.val_fraction))
if len(ids) - n_val < 2:
    sys.exit(f"error: {len(ids)} tokens are too few to split into train and val")
name = args.name or os.path.basename(os.path.normpath(args.out_dir))
os.makedirs(args.out_dir, exist_ok=True)
for p in old:
    os.remove(p)
if old:
    print(f"removed {len(old)} shards of an earlier prepare from {args.out_dir}")
for split, part in (("val", ids[-n_val:]), ("train", ids[:-n_val])):
    for i, lo in enumerate(range(0, len(part), args.shard_tokens)):
        write_shard(os.path.join(args.out_dir, f"{name}_{split}_{i:06d}.bin"), part[lo:lo + args.shard_tokens])
save_meta(args.out_dir, spec)
print(f"{len(texts)} files, {args.tokenizer} tokens: {len(ids) - n_val:,} train and {n_val:,} val -> {args.out_dir}")
