"""
The data factory of train.py. Its `dataset` setting names a folder of token shards (a folder under data/, or a path
to one) or a MAD task (mad:<task>, data/mad.py); open_dataset resolves it, checks it, and returns a Dataset with one
interface for both:

  tokenizer      the spec a checkpoint records (data/tokenizer.py), sample.py decodes with it
  seq_len        tokens per training row (block_size, or the task's example length)
  task           the MAD task (its answers are scored: accuracy), None for text
  loader(...)    training batches of one rank: batch(step, micro) -> x, y; state(next_step) for the checkpoint
  val_batches(...)  the fixed validation set: text its first eval_iters batches, a task its whole test split
  same(name)     whether another `dataset` setting names this same data (a resumed run must keep it)
"""
import os
import subprocess
import sys
from dataclasses import asdict

from data import mad, shards
from data.tokenizer import load_meta

HERE = os.path.dirname(os.path.abspath(__file__))  # data/


def open_dataset(name, block_size, mad_size="lite", mad_args="", on_master=lambda action: action()):
    """The Dataset `name` names; a ValueError says what is missing or wrong. on_master(action) runs an action on
    one process (train.py: rank 0 alone, every rank stopping on its error): it prepares the embedded pystdlib corpus
    when it is missing, the one dataset that needs no download."""
    if name.startswith("mad:"):
        task = mad.make_task(name[4:], mad_size, mad_args)
        if block_size < task.length:
            raise ValueError(f"block_size={block_size} is shorter than the {name} examples (length {task.length}); "
                             f"pass --block_size={task.length}")
        return Task(name, task)
    data_dir = folder(name)
    if not os.path.isdir(data_dir):
        raise ValueError(f"dataset '{name}' not found: expected a folder data/{name}/ with train and val shards "
                         f"(python data/{name}/prepare.py), a path to one, or mad:<task> ({', '.join(mad.TASKS)})")
    if name == "pystdlib" and unprepared(data_dir):
        on_master(lambda: prepare_pystdlib(data_dir))
    if missing := unprepared(data_dir):
        raise ValueError(f"dataset '{name}' is not prepared: {missing}")
    return Shards(name, data_dir, block_size)


def folder(name):
    """A dataset's folder: a path to one, else the folder of that name under data/."""
    return name if os.path.isdir(name) else os.path.join(HERE, name)


def unprepared(data_dir):
    """Why data_dir holds no dataset yet (a split without shards), or None."""
    try:
        shards.find_shards(data_dir, "train"), shards.find_shards(data_dir, "val")
    except ValueError as e:
        return str(e)


def prepare_pystdlib(data_dir):
    """Prepare the embedded corpus into data_dir; an error message, or None."""
    script = os.path.join(HERE, "pystdlib", "prepare.py")
    print("dataset pystdlib is not prepared yet; preparing it now (python data/pystdlib/prepare.py)", flush=True)
    r = subprocess.run([sys.executable, script, f"--out_dir={data_dir}"])
    return f"preparing the dataset pystdlib into {data_dir} failed (exit code {r.returncode})" if r.returncode else None


class Shards:
    """Token shards in a folder (data/shards.py), read in windows of block_size + 1 tokens."""
    task = None

    def __init__(self, name, data_dir, block_size):
        self.name, self.dir, self.seq_len = name, data_dir, block_size
        self.tokenizer = load_meta(data_dir)

    def loader(self, batch_size, accum, rank, world, seed, device, row0=0, order="random"):
        """The training loader; the shards are validated here (sizes, headers, token ids below the tokenizer's
        vocab_size), and val must hold a window too."""
        loader = shards.Loader(self.dir, batch_size, self.seq_len, accum, rank, world, order, seed, device, row0)
        next(self.val_batches(batch_size, 1, seed))
        shards.check_vocab(self.dir, self.tokenizer["vocab_size"])
        return loader

    def val_batches(self, batch_size, eval_iters, seed, rank=0, world=1, device="cpu", limit=None):
        """The first eval_iters batches of val (or `limit` of them), rank r taking every world-th."""
        return shards.val_batches(self.dir, batch_size, self.seq_len, limit or eval_iters, rank, world, device)

    def same(self, name):
        return os.path.realpath(folder(name)) == os.path.realpath(self.dir)  # however the folder is written


class Task:
    """A MAD task (data/mad.py): examples generated from the seed, answers scored."""

    def __init__(self, name, task):
        self.name, self.task, self.seq_len = name, task, task.length
        self.tokenizer = {"kind": "mad", "vocab_size": task.vocab_size, "task": asdict(task)}

    def loader(self, batch_size, accum, rank, world, seed, device, row0=0, order=None):
        return mad.Loader(self.task, batch_size, accum, rank, world, seed, device, row0)

    def val_batches(self, batch_size, eval_iters, seed, rank=0, world=1, device="cpu", limit=None):
        """The whole test split (or its first `limit` batches), rank r taking every world-th."""
        return mad.val_batches(self.task, batch_size, seed, rank, world, device, limit)

    def same(self, name):
        return name == self.name
