"""
Token shards on disk, and the deterministic loader train.py reads them with.

Two formats, both uint16 token ids:
  raw    nanoGPT's train.bin / val.bin: the tokens and nothing else (meta.json beside them names the tokenizer)
  header llm.c / modded-nanogpt shards: 256 x int32 header (magic 20240520, version 1, token count), then the
         tokens; train and val files are matched by glob (*_train_*.bin, *_val_*.bin)

The loader is a pure function of a global row counter: row n of the training stream is the window
tokens[o(n) : o(n) + T + 1], with o(n) = n*T (order="sequential", one pass after another over the
concatenated shards) or a position drawn from a generator seeded by (seed, n) (order="random", nanoGPT's
sampling with replacement). An optimizer step takes the next rows_per_step rows; rank r of W takes every
W-th block of batch_size rows, so ranks are disjoint and the union is the same for any W. Resuming only
needs the counter.
"""

import glob
import os

import numpy as np
import torch

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path, tokens, header=True):
    """Write uint16 tokens to path (header format, or raw when header=False), via a temp file and rename."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ValueError(f"{path}: token ids must fit in uint16 (0..65535), got {tokens.min()}..{tokens.max()}")
    tmp = f"{path}.tmp-{os.getpid()}"  # per process: two prepares into one folder must not share a temp file
    with open(tmp, "wb") as f:
        if header:
            h = np.zeros(HEADER_INTS, dtype=np.int32)
            h[0], h[1], h[2] = MAGIC, VERSION, tokens.size
            f.write(h.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def open_shard(path, header=True):
    """Validated read-only memmap of a shard's tokens. Any problem is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: shard file not found")
    size = os.path.getsize(path)
    if not header:
        if size == 0 or size % 2:
            raise ValueError(f"{path}: raw uint16 shard has {size} bytes; expected a positive even number")
        return np.memmap(path, dtype=np.uint16, mode="r")
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    h = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if h[0] != MAGIC:
        raise ValueError(f"{path}: wrong magic {h[0]}; expected {MAGIC} (llm.c GPT-2 shard)")
    if h[1] != VERSION:
        raise ValueError(f"{path}: wrong version {h[1]}; expected {VERSION}")
    expected = HEADER_BYTES + 2 * int(h[2])
    if size != expected:
        raise ValueError(f"{path}: header says {h[2]} tokens ({expected} bytes) but the file has {size} bytes")
    if h[2] == 0:
        raise ValueError(f"{path}: shard holds no tokens")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(int(h[2]),))


def find_shards(data_dir, split):
    """(paths, header) for split "train" or "val": train.bin / val.bin (raw) if present, else *_{split}_*.bin shards."""
    raw = os.path.join(data_dir, f"{split}.bin")
    if os.path.isfile(raw):
        return [raw], False
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise ValueError(f"{data_dir}: no {split} data; expected {split}.bin or *_{split}_*.bin shards "
                         f"(run the dataset's prepare.py first)")
    return paths, True


def check_vocab(data_dir, vocab_size):
    """Every token id in both splits is below vocab_size (an embedding row), else a ValueError naming the first
    shard with one that is not. One max over each shard, at memory speed (100M tokens in about 15 ms warm)."""
    if vocab_size >= 2 ** 16:
        return  # every uint16 id fits
    for split in ("train", "val"):
        paths, header = find_shards(data_dir, split)
        for path in paths:
            tokens = open_shard(path, header)
            top = max(int(tokens[i:i + 2 ** 24].max()) for i in range(0, len(tokens), 2 ** 24))
            if top >= vocab_size:
                at = int(np.argmax(tokens >= vocab_size))
                raise ValueError(f"{path}: token id {top} (the first such at token {at}) is not below the "
                                 f"tokenizer's vocab_size={vocab_size}; expected the ids of the dataset's tokenizer "
                                 f"(meta.json; GPT-2 BPE without one)")


class TokenStream:
    """The concatenation of a split's shards, validated once, re-opened per read (nanoGPT's memmap RSS fix)."""

    def __init__(self, data_dir, split):
        self.paths, self.header = find_shards(data_dir, split)
        self.lengths = [len(open_shard(p, self.header)) for p in self.paths]
        self.starts = np.cumsum([0] + self.lengths)
        self.total = int(self.starts[-1])

    def read(self, start, n, maps=None):
        """n tokens from global position start (wrapping around the end) as an int64 numpy array.
        maps: a dict that keeps the shards opened during one batch."""
        out, pos, maps = [], start % self.total, {} if maps is None else maps
        while n > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            if i not in maps:
                maps[i] = open_shard(self.paths[i], self.header)
            shard = maps[i]
            lo = pos - int(self.starts[i])
            take = min(n, self.lengths[i] - lo)
            out.append(np.asarray(shard[lo:lo + take], dtype=np.int64))
            n -= take
            pos = (pos + take) % self.total
        return np.concatenate(out) if len(out) > 1 else out[0]


class Loader:
    """Batches for one rank. batch(step, micro) returns x, y of shape (batch_size, T) for micro-step `micro`
    of optimizer step `step` (counted from row0, the resume position)."""

    def __init__(self, data_dir, batch_size, block_size, accum, rank=0, world=1, order="random", seed=1337,
                 device="cpu", row0=0):
        if order not in ("random", "sequential"):
            raise ValueError(f"data_order={order!r} is not valid; expected 'random' or 'sequential'")
        self.stream = TokenStream(data_dir, "train")
        if self.stream.total < block_size + 1:
            raise ValueError(f"{data_dir}: train split has {self.stream.total} tokens; block_size={block_size} needs "
                             f"at least {block_size + 1}")
        self.B, self.T, self.accum, self.rank, self.world = batch_size, block_size, accum, rank, world
        self.order, self.seed, self.device, self.row0 = order, seed, device, row0
        self.rows_per_step = batch_size * accum * world

    def rows(self, step, micro):
        first = self.row0 + step * self.rows_per_step + (micro * self.world + self.rank) * self.B
        return range(first, first + self.B)

    def offset(self, n):
        if self.order == "sequential":
            return n * self.T
        return int(np.random.default_rng([self.seed, n]).integers(0, self.stream.total - self.T))

    def batch(self, step, micro):
        maps = {}
        buf = torch.from_numpy(np.stack([self.stream.read(self.offset(n), self.T + 1, maps)
                                         for n in self.rows(step, micro)]))
        return to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), self.device)

    def state(self, next_step):
        """What a checkpoint stores: the global row the next step starts at, and how rows map to tokens."""
        return {"next_row": self.row0 + next_step * self.rows_per_step, "order": self.order, "seed": self.seed}


def to_device(x, y, device):
    if torch.device(device).type == "cuda":  # pinned memory, so the copy overlaps with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def val_batches(data_dir, batch_size, block_size, n_batches, rank=0, world=1, device="cpu"):
    """The fixed validation set: the first n_batches * batch_size windows of block_size + 1 tokens of val
    (stride block_size). Rank r takes every world-th batch. Yields x, y of shape (<= batch_size, T)."""
    stream = TokenStream(data_dir, "val")
    T = block_size
    n_windows = min(n_batches * batch_size, (stream.total - 1) // T)
    if n_windows == 0:
        raise ValueError(f"{data_dir}: val split has {stream.total} tokens; block_size={T} needs at least {T + 1}")
    tokens = stream.read(0, n_windows * T + 1)
    for b in range(rank, -(-n_windows // batch_size), world):
        idx = range(b * batch_size, min((b + 1) * batch_size, n_windows))
        buf = torch.from_numpy(np.stack([tokens[i * T:i * T + T + 1] for i in idx]))
        yield to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), device)


def read_text(input_path, cache_path, url):
    """The text at input_path if given, else cache_path if it exists, else downloaded from url into cache_path.
    Offline with nothing local is a SystemExit that says what to pass."""
    if input_path:
        if not os.path.isfile(input_path):
            raise SystemExit(f"error: --input '{input_path}' not found")
        with open(input_path, encoding="utf-8") as f:
            return f.read()
    if not os.path.isfile(cache_path):
        import urllib.request
        print(f"downloading {url} -> {cache_path}")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
        except OSError as e:
            raise SystemExit(f"error: could not download {url} ({e}).\nOffline? Pass --input=PATH to a local copy "
                             f"(or put it at {cache_path}).") from None
        with open(cache_path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(cache_path + ".tmp", cache_path)
    with open(cache_path, encoding="utf-8") as f:
        return f.read()
