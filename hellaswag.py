"""
HellaSwag scored as llm.c (and build-nanogpt) score it: zero-shot, completion style. An example is a context and
its endings (4 in HellaSwag); the model reads context + " " + ending, and only the ending's tokens are scored:

  acc       right when the true ending has the lowest summed loss (lm-evaluation-harness's acc too)
  acc_norm  right when it has the lowest mean loss per token (llm.c's headline; GPT-2 124M: 0.2955)

The file is rowanz's public jsonl (hellaswag_val.jsonl, one example a line: ctx, endings, label, and ind,
activity_label, ctx_a, ctx_b, source_id, split, split_type, which are not read). Used by eval.py and by train.py's
hellaswag_every. The rows of a batch have equal length, so there is no padding and no mask: a row's loss is the
one it gets alone, for every attention (HyperGLU's identity layout reads the sequence length) and residual.
"""

import json
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F


def load(path, limit=0):
    """The examples of a HellaSwag jsonl: a list of (ctx, endings, label). Anything else is a ValueError naming the
    file and line: a missing file, bad JSON, a missing field, fewer than 2 endings, a label out of range."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}); expected a HellaSwag jsonl "
                         f"(python data/hellaswag/prepare.py writes one)") from None
    examples = []
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                examples.append(parse(line, f"{path}: line {n}"))
                if limit and len(examples) == limit:
                    break
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise ValueError(f"{path}: no examples; expected one JSON object a line (ctx, endings, label)")
    return examples


def parse(line, where):
    """One jsonl line -> (ctx, endings, label). The label is an int, or a string of one (the Hugging Face copy)."""
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(ex, dict) or not {"ctx", "endings", "label"} <= ex.keys():
        raise ValueError(f"{where}: expected an object with ctx, endings and label (HellaSwag's jsonl schema)")
    ctx, endings, label = ex["ctx"], ex["endings"], ex["label"]
    if not isinstance(ctx, str) or not ctx:
        raise ValueError(f"{where}: ctx must be a non-empty string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: endings must be a list of at least 2 strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: label={ex['label']!r} is not valid; expected an int 0..{len(endings) - 1}")
    return ctx, endings, label


def render(example, encode, block_size):
    """The example's rows, one per ending: (tokens, n), tokens = encode(ctx) + encode(" " + ending) and n the
    ending's token count. A row longer than block_size + 1 loses its oldest context tokens (as lm-eval truncates);
    the model reads tokens[:-1] and is scored on the last n of tokens[1:]."""
    ctx, endings, _ = example
    c = encode(ctx)
    rows = []
    for e in endings:
        end = encode(" " + e)  # the space before the ending is part of it: GPT-2 BPE merges it into the first word
        tokens = (c + end)[-(block_size + 1):]
        rows.append((tokens, min(len(end), len(tokens) - 1)))
    return rows


def load_encoded(path, encode, block_size, limit=0):
    """load(), then every example rendered once, so that a text the tokenizer cannot encode (a char vocabulary
    lacks a character) is a ValueError before any model runs, on every rank alike."""
    examples = load(path, limit)
    for i in range(len(examples)):
        render_checked(examples, i, encode, block_size)
    return examples


def render_checked(examples, i, encode, block_size):
    """render() of example i, a text the tokenizer cannot encode being a ValueError that names the example."""
    try:
        return render(examples[i], encode, block_size)
    except ValueError as e:  # a char tokenizer meets a character outside its vocabulary
        raise ValueError(f"HellaSwag example {i + 1} cannot be encoded with the model's tokenizer: {e}") from None


@torch.no_grad()
def ending_losses(model, examples, encode, block_size, device, batch_size=32, autocast=None, rank=0, world=1):
    """{example index: [(summed loss, token count) per ending]} for this rank's share of the examples (index % world
    == rank). Rows of one length go through the model together, batch_size at a time; the losses are in fp32
    whatever autocast context the model runs in."""
    rows = {}  # length -> [(example, ending, tokens, n)]
    for i in range(rank, len(examples), world):
        for j, (tokens, n) in enumerate(render_checked(examples, i, encode, block_size)):
            rows.setdefault(len(tokens), []).append((i, j, tokens, n))
    out = {i: [None] * len(examples[i][1]) for i in range(rank, len(examples), world)}
    was_training = model.training
    model.eval()
    for length in sorted(rows):
        group = rows[length]
        for lo in range(0, len(group), batch_size):
            batch = group[lo:lo + batch_size]
            seq = torch.tensor([t for _, _, t, _ in batch], dtype=torch.long, device=device)  # (B, length)
            x, y = seq[:, :-1], seq[:, 1:].clone()
            n = torch.tensor([k for _, _, _, k in batch], device=device)[:, None]
            y[torch.arange(length - 1, device=device)[None, :] < length - 1 - n] = -1  # score the ending only
            with autocast or nullcontext():
                logits, _ = model(x, y)  # targets given: logits at every position
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
            sums = loss.view(len(batch), -1).double().sum(1).tolist()
            for (i, j, _, k), s in zip(batch, sums):
                out[i][j] = (s, k)
    model.train(was_training)
    return out


def predictions(losses):
    """(pred, pred_norm) from one example's [(summed loss, tokens)]: the lowest summed and the lowest mean loss,
    the first ending on a tie."""
    pred = min(range(len(losses)), key=lambda j: losses[j][0])
    pred_norm = min(range(len(losses)), key=lambda j: losses[j][0] / losses[j][1])
    return pred, pred_norm


def tally(examples, losses):
    """[count, acc hits, acc_norm hits] over the examples in losses (a dict from ending_losses), as floats so
    that ranks can add theirs up."""
    hits = [0.0, 0.0, 0.0]
    for i, per_ending in losses.items():
        pred, pred_norm = predictions(per_ending)
        label = examples[i][2]
        hits[0] += 1
        hits[1] += pred == label
        hits[2] += pred_norm == label
    return hits


def score(model, examples, encode, block_size, device, batch_size=32, autocast=None):
    """The metrics (summary) of the model on the examples. Under torch.distributed each rank scores its share
    and the counts are all-reduced, so every rank returns the same metrics."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    losses = ending_losses(model, examples, encode, block_size, device, batch_size, autocast, rank, world)
    counts = torch.tensor(tally(examples, losses), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return summary(*counts.tolist())


def summary(count, acc_hits, norm_hits):
    """The metrics dict: acc and acc_norm with their standard errors, sqrt(p (1 - p) / (n - 1)) (the sample
    standard deviation of the 0/1 scores over sqrt(n), as lm-evaluation-harness reports it), and the count."""
    n = int(count)
    se = lambda p: math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    acc, norm = acc_hits / n, norm_hits / n
    return {"acc": acc, "acc_stderr": se(acc), "acc_norm": norm, "acc_norm_stderr": se(norm), "count": n}
