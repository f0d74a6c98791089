"""
MAD, the memory-centric synthetic tasks of "Mechanistic Design and Scaling of Hybrid Architectures"
(Poli et al. 2024, github athms/mad-lab), as datasets for train.py. HyperMLP's "MAD Avg" is the mean
accuracy over these six tasks.

    python train.py --dataset=mad:in_context_recall --block_size=63 --n_layer=2 --n_embd=128 --mlp=swiglu
    python train.py --dataset=mad:noisy_recall --mad_size=original --mad_args="frac_noise=0.4,seq_len=256"

Each example is a pair x, y of int64 arrays of length task.length. y holds the answer token at each answer
position and -1 (ignored by the loss) everywhere else, so the training loss, the val loss and the val
accuracy count answers only. The data are a pure function of (task, seed): split s, example i comes from
np.random.default_rng([seed, s, i]).

The tasks (V = vocab_size; "aligned" = y[i] is what the model must output after reading x[:i+1]):
  in_context_recall  key-value pairs k v k v ... over keys [0, V/2) and values [V/2, V); a key's value is fixed
                     within a sequence. Multi-query: every repeat of a key is a question, and the last pair
                     repeats an earlier key. x = tokens[:-1], answers at the repeated keys.
  fuzzy_recall       as recall, but keys (from [0, (V-1)/2)) and values (from [(V-1)/2, V-1)) are motifs of
                     1..motif distinct tokens (keys always `motif` long at test time); left-padded with V-1. Answers: every value token of a repeated key.
  noisy_recall       recall where a frac_noise share of the pairs is replaced by two tokens from a separate noise
                     vocabulary (the last noise_vocab ids); noise is never asked about.
  selective_copying  copy_tokens tokens from [0, V-2) among blanks (V-2), then a copy marker (V-1), then
                     copy_tokens blanks at which the tokens must be written in order (aligned). copy_layout
                     "madlab" (default) places them as mad-lab does: each blank goes in front of one of the
                     tokens, chosen uniformly and independently, so the last token sits right before the marker;
                     "scatter" puts the tokens at a uniformly random set of positions (our earlier layout).
  compression        causal variant (see below): seq_len-1 tokens from [0, V-2), a marker (V-1), then blanks
                     (V-2); from the marker on, the model writes the sequence back (aligned).
  memorization       a fixed key->value map over the vocabulary, the same for every example and split;
                     x = k I k I ... (I = V-1), the value is the answer at each I. Tests what the weights store.

Compression, causal variant. The original encodes the sequence with the backbone, keeps only the last
position's vector and decodes every token from it with a separate MLP (an autoencoder). A causal LM has no
such bottleneck: here the model reproduces the sequence after the marker from its context, so the task
measures exact retrieval of a whole random sequence by position, not compression into one vector.

Deliberate differences from mad-lab: the loss is on answer positions only (the original trains the recall
tasks with the full next-token loss, whose other targets are unpredictable random keys and first values);
every example has its own seeded generator (the original's selective copying draws its blank positions from
numpy's global RNG); noisy recall always keeps one real pair among the first seq_len/2 - 1. Compression draws
its tokens from V-2 symbols [0, V-2) where mad-lab uses V-1, [0, V-1): we need V-2 as the blank the model
writes on, and mad-lab's autoencoder has no such positions. mad-lab also scores all seq_len positions of
compression, the marker included (a trivial answer, and in the macro score a class of its own); here only
the seq_len-1 tokens count.

Scores. answer_hits gives the plain share of answers right (micro, train.py's val_acc). mad-lab reports
torchmetrics' MulticlassAccuracy, whose default is the macro average over classes; macro_accuracy computes it
per batch and train.py averages the batches weighted by their size, as mad-lab's Lightning logging does
(val_acc_macro).
"""
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from data import shards
from data.shards import to_device

TASKS = ("in_context_recall", "fuzzy_recall", "noisy_recall", "selective_copying", "compression", "memorization")
IGNORE = -1


@dataclass
class Task:
    name: str
    vocab_size: int
    seq_len: int
    train_examples: int = 12_800
    test_examples: int = 1_280
    epochs: int = 200            # passes over the training set (the runner turns this into max_iters)
    frac_noise: float = 0.0      # noisy_recall: share of pairs replaced by noise
    noise_vocab: int = 0         # noisy_recall: the last noise_vocab ids are noise tokens
    copy_tokens: int = 0         # selective_copying: tokens to copy
    motif: int = 1               # fuzzy_recall: keys and values are 1..motif tokens
    copy_layout: str = "madlab"  # selective_copying: "madlab" (last token before the marker) | "scatter"

    @property
    def length(self):
        """Length of x and y, i.e. the block_size the model needs."""
        if self.name in ("in_context_recall", "noisy_recall"):
            return self.seq_len - 1  # the pairs, shifted by one for next-token prediction
        if self.name == "compression":
            return 2 * (self.seq_len - 1)
        return self.seq_len


# The mad-lab baseline settings (configs/tasks/*.yml, MADConfig): batch 128, 200 epochs, 1,280 test examples.
ORIGINAL = {
    "in_context_recall": Task("in_context_recall", 16, 128),
    "fuzzy_recall": Task("fuzzy_recall", 16, 128, motif=3),
    "noisy_recall": Task("noisy_recall", 32, 128, frac_noise=0.2, noise_vocab=16),
    "selective_copying": Task("selective_copying", 16, 256, copy_tokens=16),
    "compression": Task("compression", 16, 32),
    "memorization": Task("memorization", 256, 32, train_examples=256),
}
# lite: the same tasks at a size a 2-core CPU trains in one to two minutes each with the 2 x 128 model: half
# the sequence length (a quarter for selective copying, with half the tokens to copy), 4,096 training examples
# seen 8 times (memorization: its 256 examples 64 times), 256 test examples. Vocabularies are unchanged.
LITE = {
    "in_context_recall": replace(ORIGINAL["in_context_recall"], seq_len=64),
    "fuzzy_recall": replace(ORIGINAL["fuzzy_recall"], seq_len=64),
    "noisy_recall": replace(ORIGINAL["noisy_recall"], seq_len=64),
    "selective_copying": replace(ORIGINAL["selective_copying"], seq_len=64, copy_tokens=8),
    "compression": replace(ORIGINAL["compression"], seq_len=16),
    "memorization": replace(ORIGINAL["memorization"], epochs=64),
}
for _t in TASKS:
    if _t != "memorization":
        LITE[_t] = replace(LITE[_t], train_examples=4096, epochs=8)
    LITE[_t] = replace(LITE[_t], test_examples=256)
SIZES = {"original": ORIGINAL, "lite": LITE}


def make_task(name, size="lite", args=""):
    """The Task for `name` at `size`, with overrides args = "field=value,field=value"."""
    if name not in TASKS:
        raise ValueError(f"dataset 'mad:{name}': unknown MAD task; expected one of {', '.join(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"mad_size={size!r} is not valid; expected 'lite' or 'original'")
    task, types = SIZES[size][name], {f.name: f.type for f in fields(Task)}
    for item in filter(None, (s.strip() for s in args.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in types or key == "name":
            raise ValueError(f"mad_args: '{item}' is not field=value with a field among "
                             f"{', '.join(k for k in types if k != 'name')}")
        try:
            task = replace(task, **{key: types[key](raw) if types[key] in (float, str) else int(raw)})
        except ValueError:
            raise ValueError(f"mad_args: {key}={raw!r} is not a number") from None
    check(task)
    return task


def check(t):
    """Clear errors for settings a generator cannot honour."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"mad:{t.name}: {what} (task settings: {asdict(t)})")
    need(t.train_examples > 0 and t.test_examples > 0 and t.epochs > 0, "train_examples, test_examples and epochs must be positive")
    if t.name in ("in_context_recall", "noisy_recall"):
        need(t.seq_len % 2 == 0 and t.seq_len >= 4, "seq_len must be even and at least 4")
        need(t.vocab_size - t.noise_vocab >= 4, "vocab_size - noise_vocab must leave at least 4 key/value tokens")
        need(0 <= t.frac_noise < 1 and (t.frac_noise == 0 or t.noise_vocab > 0), "frac_noise must be in [0, 1), with noise_vocab > 0 when it is > 0")
    if t.name == "fuzzy_recall":
        need(t.motif >= 1 and (t.vocab_size - 1) // 2 >= t.motif, "each half of vocab_size - 1 must hold motif distinct tokens")
        need(t.seq_len >= 4 * t.motif + 1, "seq_len must fit a probe pair twice (4 * motif + 1)")
    if t.name == "selective_copying":
        need(t.vocab_size >= 3 and t.copy_tokens >= 1, "vocab_size must be at least 3 and copy_tokens at least 1")
        need(t.seq_len > 2 * t.copy_tokens + 1, "seq_len must exceed 2 * copy_tokens + 1")
        need(t.copy_layout in ("madlab", "scatter"), "copy_layout must be 'madlab' or 'scatter'")
    if t.name == "compression":
        need(t.vocab_size >= 3 and t.seq_len >= 2, "vocab_size must be at least 3 and seq_len at least 2")
    if t.name == "memorization":
        need(t.vocab_size >= 5 and t.seq_len % 2 == 0, "vocab_size must be at least 5 and seq_len even")


# -----------------------------------------------------------------------------
# generators: one example from a seeded numpy Generator. test=True is the evaluation split (it matters for
# fuzzy recall only, whose test keys are always `motif` tokens long).

def recall(t, rng, test=False):
    V = t.vocab_size - t.noise_vocab
    K, P = V // 2, t.seq_len // 2                 # keys [0, K), values [K, V); P pairs, the last is the probe
    keys = rng.integers(0, K, P)
    table = rng.integers(K, V, K)                 # each key's value in this sequence
    noise = np.zeros(P, dtype=bool)
    if t.frac_noise > 0:
        noise[:-1] = rng.random(P - 1) < t.frac_noise
        noise[rng.integers(P - 1)] = False        # at least one real pair before the probe
    keys[-1] = rng.choice(keys[:-1][~noise[:-1]])  # the probe asks for a key shown earlier
    pairs = np.stack([keys, table[keys]], 1)      # (P, 2)
    pairs[noise] = rng.integers(V, t.vocab_size, (int(noise.sum()), 2))
    seen, asked = set(), np.zeros(P, dtype=bool)
    for j in np.flatnonzero(~noise):
        asked[j] = keys[j] in seen
        seen.add(keys[j])
    tokens = pairs.reshape(-1)                    # (2P,)
    x, y = tokens[:-1], np.full(2 * P - 1, IGNORE)
    y[2 * np.flatnonzero(asked)] = pairs[asked, 1]  # at the key's position, predict its value
    return x, y


def fuzzy_recall(t, rng, test=False):
    pad, K, m = t.vocab_size - 1, (t.vocab_size - 1) // 2, t.motif    # keys [0, K), values [K, pad)
    key_size = (lambda: m) if test else (lambda: int(rng.integers(1, m + 1)))

    def motif(lo, hi, size):                      # `size` distinct tokens from [lo, hi)
        return tuple(int(v) + lo for v in rng.choice(hi - lo, size, replace=False))

    probe = (motif(0, K, key_size()), motif(K, pad, int(rng.integers(1, m + 1))))
    table, n = {probe[0]: probe[1]}, t.seq_len + 1  # n tokens, shifted into x, y of length seq_len
    used, room, pairs = 2 * sum(map(len, probe)), n, []  # the probe appears twice: in the body and last
    while True:
        k = motif(0, K, key_size())
        v = table.setdefault(k, motif(K, pad, int(rng.integers(1, m + 1))))
        if used + len(k) + len(v) > room:
            break
        pairs.append((k, v))
        used += len(k) + len(v)
    pairs.insert(int(rng.integers(0, len(pairs) + 1)), probe)
    pairs.append(probe)
    tokens, answer, seen = [], [], set()
    for k, v in pairs:                            # answers: every value token of a key seen before
        tokens += k + v
        answer += [False] * len(k) + [k in seen] * len(v)
        seen.add(k)
    tokens = np.array([pad] * (n - len(tokens)) + tokens)  # left-padded to n
    answer = np.array([False] * (n - len(answer)) + answer)
    y = np.where(answer[1:], tokens[1:], IGNORE)  # y[i] is tokens[i + 1] where that token is an answer
    return tokens[:-1], y


def selective_copying(t, rng, test=False):
    blank, marker, n = t.vocab_size - 2, t.vocab_size - 1, t.copy_tokens
    region = t.seq_len - n - 1                    # where the n tokens hide among blanks
    content = rng.integers(0, blank, n)
    x = np.full(t.seq_len, blank)
    if t.copy_layout == "madlab":                 # each blank before a uniformly drawn token, none after the last
        x[:region] = np.insert(content, rng.integers(0, n, region - n), blank)
    else:
        x[np.sort(rng.choice(region, n, replace=False))] = content
    x[region] = marker
    y = np.full(t.seq_len, IGNORE)
    y[region + 1:] = content                      # written on the n blanks after the marker, in order
    return x, y


def compression(t, rng, test=False):
    blank, marker, n = t.vocab_size - 2, t.vocab_size - 1, t.seq_len - 1
    content = rng.integers(0, blank, n)
    x = np.concatenate([content, [marker], np.full(n - 1, blank)])
    y = np.concatenate([np.full(n, IGNORE), content])  # from the marker on, write the sequence back
    return x, y


def memorization_table(t, seed):
    """The fixed key -> value map: keys [0, K), distinct values from [K, V-1). Independent of the split."""
    K = (t.vocab_size - 1) // 2
    return K + np.random.default_rng([seed, 99]).permutation(t.vocab_size - 1 - K)[:K]


def memorization(t, rng, test=False, table=None):
    keys = rng.integers(0, len(table), t.seq_len // 2)
    x = np.stack([keys, np.full_like(keys, t.vocab_size - 1)], 1).reshape(-1)
    y = np.stack([np.full_like(keys, IGNORE), table[keys]], 1).reshape(-1)
    return x, y


GENERATORS = {"in_context_recall": recall, "noisy_recall": recall, "fuzzy_recall": fuzzy_recall,
              "selective_copying": selective_copying, "compression": compression, "memorization": memorization}


def generate(t, split, seed):
    """All examples of a split ("train" or "test") as int64 arrays x, y of shape (n, task.length)."""
    test = split == "test"
    n = t.test_examples if test else t.train_examples
    gen = GENERATORS[t.name]
    extra = {"table": memorization_table(t, seed)} if t.name == "memorization" else {}
    pairs = [gen(t, np.random.default_rng([seed, int(test), i]), test, **extra) for i in range(n)]
    return np.stack([p[0] for p in pairs]).astype(np.int64), np.stack([p[1] for p in pairs]).astype(np.int64)


# -----------------------------------------------------------------------------
# loading, with the same interface as data/shards.py

class Loader:
    """Training batches of one rank: global row r is example perm_e[r % N] of epoch e = r // N, with a fresh
    seeded permutation per epoch. A pure function of the row counter, so resuming is exact."""

    def __init__(self, task, batch_size, accum, rank=0, world=1, seed=1337, device="cpu", row0=0):
        self.x, self.y = generate(task, "train", seed)
        self.B, self.accum, self.rank, self.world, self.seed, self.device, self.row0 = (
            batch_size, accum, rank, world, seed, device, row0)
        self.rows_per_step = batch_size * accum * world
        self.perms = {}

    def index(self, row):
        epoch, i = divmod(row, len(self.x))
        if epoch not in self.perms:
            self.perms = {epoch: np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.x))}
        return self.perms[epoch][i]

    rows = shards.Loader.rows  # the same disjoint slice of every global batch per rank

    def batch(self, step, micro):
        idx = [self.index(r) for r in self.rows(step, micro)]
        return to_device(torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx]), self.device)

    def state(self, next_step):
        return {"next_row": self.row0 + next_step * self.rows_per_step, "order": "mad", "seed": self.seed}


def answer_hits(logits, y):
    """(correct, counted) as tensors: argmax hits among the answer positions (y != -1), and their number."""
    counted = y != IGNORE
    return (logits.argmax(-1) == y)[counted].sum(), counted.sum()


def macro_accuracy(logits, y):
    """mad-lab's score of one batch: torchmetrics' MulticlassAccuracy(num_classes=vocab, ignore_index=its ignored
    target) with its default average="macro", as torchmetrics >= 1.0 computes it. Over the answer positions,
    each class's recall tp / (tp + fn), averaged over the classes that are an answer or a prediction there (so
    a class predicted but never an answer counts as 0, and classes absent from both are left out); 0 when the
    batch has no answers."""
    counted = y != IGNORE
    pred, true = logits.argmax(-1)[counted], y[counted]
    C = logits.size(-1)
    support = torch.bincount(true, minlength=C)
    hits = torch.bincount(true[pred == true], minlength=C)
    present = (support + torch.bincount(pred, minlength=C)) > 0
    recall = hits / support.clamp(min=1)
    return recall[present].sum() / present.sum().clamp(min=1)


def val_batches(task, batch_size, seed, rank=0, world=1, device="cpu", n_batches=None):
    """The whole test split (or its first n_batches batches), rank r taking every world-th batch."""
    x, y = generate(task, "test", seed)
    total = -(-len(x) // batch_size) if n_batches is None else min(n_batches, -(-len(x) // batch_size))
    for b in range(rank, total, world):
        s = slice(b * batch_size, (b + 1) * batch_size)
        yield to_device(torch.from_numpy(x[s]), torch.from_numpy(y[s]), device)
