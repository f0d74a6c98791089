"""
What train.py logs beside the val loss (metrics.csv columns):

  val_bpb             the val loss in bits per byte: the token loss times tokens per byte of the val targets' text,
                      over ln 2, so that runs on different tokenizers compare (a bytes run and a GPT-2 BPE run). For
                      bytes it is loss / ln 2 exactly. The val set is fixed, so its tokens per byte are counted once.
  hellaswag_acc_norm  HellaSwag acc_norm (hellaswag.py) at step 0, every hellaswag_every steps and the last, as llm.c's
                      -h does; hellaswag_every=0 (the default) leaves it out.

Everything is read and checked when train.py starts, before the run folder is claimed.
"""
import math
import os

import torch

import hellaswag
from data.tokenizer import encoder, token_bytes

HELLASWAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hellaswag", "hellaswag_val.jsonl")


class ExtraMetrics:

    def __init__(self, data, config, device, ctx, log=print):
        """data: train.py's Dataset (data/dataset.py); config: train.py's settings (hellaswag_every, hellaswag_file,
        hellaswag_limit, tokenizer_file, block_size, batch_size, eval_iters, seed, max_iters). A bad setting or
        HellaSwag file is a ValueError that names it."""
        for k in ("hellaswag_every", "hellaswag_limit"):
            if config[k] < 0:
                raise ValueError(f"{k}={config[k]} is not valid; expected a number >= 0")
        self.every, self.max_iters, self.log = config["hellaswag_every"], config["max_iters"], log
        self.block_size, self.batch_size, self.device, self.ctx = config["block_size"], config["batch_size"], device, ctx
        self.tokens_per_byte = None
        if data.task is None:  # a MAD task's tokens have no text
            try:
                table = torch.tensor(token_bytes(data.tokenizer, config["tokenizer_file"]), dtype=torch.float64)
            except ValueError as e:  # GPT-2 offline without its ranks: the run goes on without val_bpb
                log(f"warning: val_bpb is off: {e}")
            else:
                self.tokens_per_byte = val_tokens_per_byte(data, table, config["batch_size"], config["eval_iters"],
                                                           config["seed"])
        if self.every:
            if data.task is not None:
                raise ValueError(f"hellaswag_every={self.every} needs a text dataset; {data.name} is a MAD task")
            path = config["hellaswag_file"] or HELLASWAG
            try:  # every example is read and encoded once, here
                self.encode, _ = encoder(data.tokenizer, config["tokenizer_file"])
                self.examples = hellaswag.load_encoded(path, self.encode, self.block_size, config["hellaswag_limit"])
            except ValueError as e:
                raise ValueError(f"hellaswag_every: {e}") from None
            log(f"hellaswag: {len(self.examples):,} examples from {path}, scored every {self.every} steps")

    def bpb(self, val_loss):
        """val_loss (nats per token) in bits per byte; None where the tokenizer has no text."""
        return None if self.tokens_per_byte is None else val_loss * self.tokens_per_byte / math.log(2)

    def hellaswag(self, model, step, force=False):
        """{"hellaswag_acc_norm": ...} at the steps hellaswag_every picks (0, its multiples, the last; any step with
        force), else {}. Every rank calls it: each scores its share of the examples and the counts are all-reduced.
        model: the plain module (a compiled one would recompile for every row length)."""
        if not self.every or not (force or step % self.every == 0 or step == self.max_iters):
            return {}
        m = hellaswag.score(model, self.examples, self.encode, self.block_size, self.device, self.batch_size, self.ctx)
        self.log(f"step {step}: hellaswag acc_norm {m['acc_norm']:.4f} ({m['count']:,} examples)")
        return {"hellaswag_acc_norm": m["acc_norm"]}


def val_tokens_per_byte(data, table, batch_size, eval_iters, seed):
    """Tokens per UTF-8 byte over the targets of the fixed val set (every rank's batches), table (vocab,) the bytes
    of each token id's text."""
    tokens = nbytes = 0
    for _, y in data.val_batches(batch_size, eval_iters, seed):
        y = y[y != -1]
        tokens, nbytes = tokens + y.numel(), nbytes + table[y].sum().item()
    return tokens / nbytes if nbytes else None
