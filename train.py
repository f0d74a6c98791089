"""
Train a GPT whose attention is softmax, HyperGLU or HyperMLP and whose residual is plain, HC or mHC.

One process (cuda, mps or cpu, auto-detected):
$ python train.py config/quickstart.py
Any setting, including every GPTConfig field, from the command line:
$ python train.py config/shakespeare_char.py --attn=hyperglu --residual=mhc --op1_rank=8
One node, 8 GPUs (DDP over nccl):
$ torchrun --standalone --nproc_per_node=8 train.py config/fineweb.py
Two nodes (run on each, node_rank 0 and 1; without InfiniBand add NCCL_IB_DISABLE=1):
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 train.py ...
Two CPU processes (DDP over gloo):
$ torchrun --standalone --nproc_per_node=2 train.py config/quickstart.py
Resume a run from its last checkpoint (also after a crash or a kill):
$ python train.py config/quickstart.py --init_from=resume
Every setting, its default and what it does:
$ python train.py --help

The run folder belongs to one run: a scratch run refuses an out_dir that holds checkpoints (resume it, pick a new
out_dir, or --overwrite=True to move the old run aside), and a run holds a lock on its folder while it lives.
"""

import atexit
import glob
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint
from configurator import configure, pick_device
from data import mad
from data.shards import Loader, find_shards, val_batches
from data.tokenizer import load_meta
import diagnostics
from diagnostics import amax_gain, connection_matrices
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# settings: every global below can be overridden by a config file or --key=value
# I/O
out_dir = "out"                  # run folder: config.json, metrics.csv, ckpt_last.pt, ckpt_best.pt, DONE
eval_interval = 250              # evaluate on the fixed val set (and checkpoint) every this many steps
log_interval = 10                # print and write a metrics.csv row every this many steps
eval_iters = 20                  # batches in the fixed val set (its first eval_iters * batch_size windows)
eval_only = False                # evaluate once and exit
init_from = "scratch"            # "scratch" (refused where out_dir holds checkpoints) or "resume" (its ckpt_last.pt)
overwrite = False                # scratch into an out_dir with checkpoints: move that run aside to <out_dir>.old-<time>
trust_checkpoint = False         # resume from a checkpoint older than safe loading (full unpickle: own files only)
seed = 1337
wandb_log = False                # needs `pip install wandb`
wandb_project = "hypergpt"
wandb_run_name = "run"
# data
dataset = "pystdlib"             # a folder under data/ (run its prepare.py first), a path to one, or mad:<task>
mad_size = "lite"                # mad:<task> datasets: "lite" or "original" task settings (data/mad.py)
mad_args = ""                    # mad:<task> overrides, e.g. "seq_len=256,frac_noise=0.4"
data_order = "random"            # "random" (nanoGPT's sampling) or "sequential" (one pass, llm.c style)
gradient_accumulation_steps = 1  # global micro-steps per optimizer step, divided over the processes
batch_size = 12                  # sequences per micro-step per process (split if processes outnumber micro-steps)
block_size = 256
# model: every GPTConfig field in model.py is a setting too; these are the common ones
vocab_size = None                # None = from the dataset (meta.json), GPT-2's 50257 padded to 50304
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = False
attn = "softmax"                 # "softmax" | "hyperglu" | "hypermlp"
residual = "plain"               # "plain" | "hc" | "mhc"
pos = "learned"                  # "learned" | "rope" | "none"
# optimizer: AdamW for every parameter, or Muon for the blocks' hidden matrices and AdamW for the rest (model.py
# GPT.configure_optimizers says which parameter goes where, and why)
optimizer = "adamw"              # "adamw" | "muon"
learning_rate = 6e-4             # AdamW's peak lr (with optimizer="muon", of the parameters AdamW keeps)
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                  # 0 disables clipping
muon_lr = 0.02                   # Muon's peak lr: nanochat's matrix_lr (modded-nanogpt uses 0.05); schedule as learning_rate
muon_momentum = 0.95             # Muon's Nesterov momentum (nanochat and modded-nanogpt)
# learning-rate schedule: linear warmup, then cosine or linear decay to min_lr, or (wsd) constant and then a linear
# warmdown to min_lr over the last warmdown_frac of lr_decay_iters (modded-nanogpt's cooldown: 0.4, to 0.1x)
decay_lr = True
lr_schedule = "cosine"           # "cosine" | "linear" | "wsd"
warmdown_frac = 0.4              # wsd only
warmup_iters = 100
lr_decay_iters = None            # None = max_iters
min_lr = 6e-5
# system
device = None                    # None = cuda, else mps, else cpu; or e.g. "cuda:1", "cpu"
dtype = None                     # None = bfloat16 on cuda where supported, else float16; float32 on cpu/mps
compile = None                   # None = on for cuda when triton imports, off otherwise
grad_ckpt = False                # recompute each block in backward (activation checkpointing)
backend = None                   # DDP backend; None = nccl on cuda, gloo otherwise
# -----------------------------------------------------------------------------
for _f in fields(GPTConfig):  # the rest of GPTConfig (HyperGLU options, HC knobs, ...) at its defaults
    globals().setdefault(_f.name, _f.default)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
_types = {f.name: f.type for f in fields(GPTConfig)}
_types.update(lr_decay_iters=int, device=str, dtype=str, compile=bool, backend=str)


def finish(code=0, wait=True):
    """End the process with exit code `code`. Under DDP: wait for every rank (wait=False where all ranks stop at the
    same error), destroy the group, run the exit handlers (the run folder's lock, wandb), flush, and leave without
    finalizing the interpreter. gloo's worker threads outlive destroy_process_group, because the DDP wrapper keeps
    the group alive even once it is freed, so the interpreter would be finalized with them running, and a thread
    torn down in that window aborts the process (reported: "terminate called without an active exception" from
    rank 1 after done:, in 1 of 8 two-process CPU runs)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def fail(msg):
    """Stop with one `error:` line and exit code 1. Every process meets a settings, data or checkpoint error at the
    same point, and the processes of a node share its terminal, so each node's first process alone prints it."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    finish(1, wait=False)


try:
    configure(globals(), config_keys, sys.argv[1:], _types)
    _checks = [("init_from", ("scratch", "resume")), ("lr_schedule", ("cosine", "linear", "wsd")),
               ("optimizer", ("adamw", "muon")),
               ("data_order", ("random", "sequential")), ("dtype", (None, "float32", "bfloat16", "float16"))]
    for _k, _allowed in _checks:
        if globals()[_k] not in _allowed:
            raise ValueError(f"{_k}={globals()[_k]!r} is not valid; expected one of {list(_allowed)}")
    for _k in ("eval_interval", "log_interval", "eval_iters", "batch_size", "block_size", "gradient_accumulation_steps",
               "learning_rate", "muon_lr") + (("lr_decay_iters",) if lr_decay_iters is not None else ()):
        if globals()[_k] <= 0:
            raise ValueError(f"{_k}={globals()[_k]} is not valid; expected a positive number")
    for _k in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip"):
        if globals()[_k] < 0:
            raise ValueError(f"{_k}={globals()[_k]} is not valid; expected a number >= 0")
    for _k in ("beta1", "beta2", "muon_momentum", "warmdown_frac"):
        if not 0 <= globals()[_k] < 1:
            raise ValueError(f"{_k}={globals()[_k]} is not valid; expected 0 <= {_k} < 1")
    if lr_schedule == "wsd" and warmdown_frac == 0 and decay_lr:
        raise ValueError("warmdown_frac=0 is not valid with lr_schedule='wsd'; expected 0 < warmdown_frac < 1 (or decay_lr=False)")
except ValueError as _e:
    fail(_e)
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------
# processes and devices. A process group exists only under torchrun (RANK set).

ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
master = rank == 0
try:
    device, device_type = pick_device(device)
except ValueError as e:
    fail(e)
if ddp:
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:  # share the cores between the local processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
log = print if master else (lambda *a, **k: None)
# gradient_accumulation_steps * batch_size rows make a step, for any number of processes. Each process runs
# accum micro-steps of proc_batch rows: the micro-steps are divided over the processes, or, where the processes
# outnumber them, each micro-step's rows are.
if gradient_accumulation_steps % world == 0:
    accum, proc_batch = gradient_accumulation_steps // world, batch_size
elif world % gradient_accumulation_steps == 0 and batch_size % (world // gradient_accumulation_steps) == 0:
    accum, proc_batch = 1, batch_size * gradient_accumulation_steps // world
else:
    fail(f"gradient_accumulation_steps={gradient_accumulation_steps} (global) does not split over the world size "
         f"{world}; expected a multiple of {world}, or a divisor of {world} with batch_size={batch_size} a multiple "
         f"of {world} / gradient_accumulation_steps")

if dtype is None:
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
if compile is None:
    try:
        import triton  # noqa: F401
        compile = device_type == "cuda"
    except ImportError:
        compile = False
    if not compile:
        log(f"warning: torch.compile is off (auto: needs CUDA and Triton; device is {device_type}); --compile=True forces it")


def on_master(action):
    """Run action() on rank 0 alone (it prepares data, or claims the run folder) and stop every rank when it
    returns an error message: the other ranks must neither go on nor wait for rank 0 forever."""
    error = action() if master else None
    if ddp:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        fail(error)


# -----------------------------------------------------------------------------
# data, model, optimizer, or all of them from the last checkpoint. Everything here only reads: the run folder is
# claimed after every setting, the data and the checkpoint have been checked.

def unprepared(data_dir):
    """Why data_dir holds no dataset yet (a split without shards), or None."""
    try:
        find_shards(data_dir, "train"), find_shards(data_dir, "val")
    except ValueError as e:
        return str(e)


def prepare_pystdlib():
    """The embedded corpus needs no download, so a missing one is prepared here rather than being an error."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pystdlib", "prepare.py")
    print("dataset pystdlib is not prepared yet; preparing it now (python data/pystdlib/prepare.py)", flush=True)
    r = subprocess.run([sys.executable, script, f"--out_dir={data_dir}"])
    return f"preparing the dataset pystdlib into {data_dir} failed (exit code {r.returncode})" if r.returncode else None


def data_folder(name):
    """A dataset's folder: a path to one, else the folder of that name under data/."""
    return name if os.path.isdir(name) else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)


task = None  # a MAD task (data/mad.py) instead of token shards
if dataset.startswith("mad:"):
    try:
        task = mad.make_task(dataset[4:], mad_size, mad_args)
    except ValueError as e:
        fail(e)
    if block_size < task.length:
        fail(f"block_size={block_size} is shorter than the {dataset} examples (length {task.length}); "
             f"pass --block_size={task.length}")
    tokenizer = {"kind": "mad", "vocab_size": task.vocab_size, "task": asdict(task)}
else:
    data_dir = data_folder(dataset)
    if not os.path.isdir(data_dir):
        fail(f"dataset '{dataset}' not found: expected a folder data/{dataset}/ with train and val shards "
             f"(python data/{dataset}/prepare.py), a path to one, or mad:<task> ({', '.join(mad.TASKS)})")
    if dataset == "pystdlib" and unprepared(data_dir):
        on_master(prepare_pystdlib)
    if missing := unprepared(data_dir):
        fail(f"dataset '{dataset}' is not prepared: {missing}")
    try:
        tokenizer = load_meta(data_dir)
    except ValueError as e:
        fail(e)
seq_len = task.length if task else block_size  # tokens per training row
tokens_per_step = gradient_accumulation_steps * batch_size * seq_len
log(f"world size {world} | grad accum {accum} per process ({gradient_accumulation_steps} global) | "
    f"batch {batch_size} x {seq_len} | tokens per step {tokens_per_step:,}")
if proc_batch != batch_size:
    log(f"note: {world} processes outnumber the {gradient_accumulation_steps} micro-steps, so each micro-step's "
        f"batch_size={batch_size} rows are split over them: {proc_batch} rows per process")
ckpt_last, ckpt_best = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")

model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
model_args["vocab_size"] = vocab_size or (50304 if tokenizer["kind"] == "gpt2" else tokenizer["vocab_size"])
if model_args["vocab_size"] < tokenizer["vocab_size"]:
    fail(f"vocab_size={vocab_size} is smaller than the dataset's vocabulary ({tokenizer['vocab_size']})")
try:
    model_args = asdict(GPTConfig(**model_args))  # validated, with the auto fields resolved
except ValueError as e:
    fail(e)

# On resume, the model, the data stream and the tokenizer must be the checkpoint's; anything else may change.
COMPUTE_ONLY = ("impl", "chunk_T")  # GPTConfig fields that change how the same model is computed, not what it is
DATA = ("dataset", "mad_size", "mad_args", "data_order", "seed", "batch_size", "gradient_accumulation_steps",
        "eval_iters")


def resume_differences(ckpt):
    """(fixed, applied): 'key: checkpoint -> command' for the settings that differ from the checkpoint's. fixed: the
    model, the data stream (and with it the val set) and the tokenizer, which a resumed run cannot change. applied:
    the others (schedule, intervals, max_iters, wandb, device, ...), which take effect."""
    old, now = ckpt["config"], {**config, **model_args}
    try:
        old_model = asdict(GPTConfig(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        fail(f"{ckpt_last}: its model_args do not fit this model.py ({e})")
    fixed = [f"{k}: {old_model[k]!r} -> {v!r}" for k, v in model_args.items()
             if k not in COMPUTE_ONLY and old_model.get(k) != v]
    same = lambda k: old[k] == now[k] or (k == "dataset"  # the same folder, however it is written
                                          and os.path.realpath(data_folder(old[k])) == os.path.realpath(data_dir))
    fixed += [f"{k}: {old[k]!r} -> {now[k]!r}" for k in DATA if k in old and not same(k)]
    if old.get("optimizer", "adamw") != optimizer:  # the optimizer's state is kept (files before it: AdamW)
        fixed.append(f"optimizer: {old.get('optimizer', 'adamw')!r} -> {optimizer!r}")
    spec = lambda t: {k: v for k, v in t.items() if k != "source"}  # pystdlib's note of the Python it came from
    if spec(ckpt["tokenizer"]) != spec(tokenizer):
        fixed.append(f"tokenizer: {ckpt['tokenizer']['kind']} (vocab {ckpt['tokenizer']['vocab_size']}) -> the "
                     f"dataset's {tokenizer['kind']} (vocab {tokenizer['vocab_size']})")
    applied = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in config_keys
               if k in old and old[k] != now[k] and k not in DATA and k != "init_from"
               and (k not in model_args or k in COMPUTE_ONLY)]
    return fixed, applied


ckpt = None
if init_from == "resume":
    best_hint = (f"; {ckpt_best} is there: to resume from it, copy it over ckpt_last.pt (cp {ckpt_best} {ckpt_last})"
                 f" and run again" if os.path.isfile(ckpt_best) else "")
    if not os.path.isfile(ckpt_last):
        fail(f"init_from=resume but {ckpt_last} does not exist{best_hint}")
    try:
        ckpt = load_checkpoint(ckpt_last, trust_checkpoint)
    except ValueError as e:
        fail(f"{e}{best_hint}")
    fixed, applied = resume_differences(ckpt)
    if fixed:
        fail(f"resume: {ckpt_last} was trained with other model, data or tokenizer settings, which a resumed run "
             f"cannot change (checkpoint -> command): {'; '.join(fixed)}. Resume with the run's own settings "
             f"(its config.json records them and the command), or train from scratch into a new --out_dir")
    if applied:
        log(f"resume: these settings differ from the checkpoint's and take effect: {'; '.join(applied)}")

row0 = ckpt["loader"]["next_row"] if ckpt is not None else 0
order = ckpt["loader"]["order"] if ckpt is not None else data_order
try:  # the shards are validated here (sizes, headers), and both splits must hold a block_size window
    if task:
        loader = mad.Loader(task, proc_batch, accum, rank, world, seed, device, row0)
    else:
        loader = Loader(data_dir, proc_batch, block_size, accum, rank, world, order, seed, device, row0)
        next(val_batches(data_dir, batch_size, block_size, 1))
except ValueError as e:
    fail(e)

torch.manual_seed(seed)  # the same initial weights on every rank
model = GPT(GPTConfig(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.grad_ckpt = grad_ckpt
model.to(device)
log(f"model: {attn} attention, {residual} residual, {model.get_num_params() / 1e6:.2f}M parameters")
optim, summary = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                            muon_lr, muon_momentum)
log(summary)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
start_step, best_val, elapsed0 = 0, float("inf"), 0.0
if ckpt is not None:
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optim.param_groups]
    optim.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optim.param_groups, fresh):  # the moments are the checkpoint's, the
        group.update(settings)                                   # hyperparameters (weight decay, betas) this command's
    scaler.load_state_dict(ckpt["scaler"])
    start_step, best_val, elapsed0 = ckpt["step"], ckpt["best_val_loss"], ckpt["elapsed_s"]
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]  # stored as a list (a tuple with an array before)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device_type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    log(f"resumed from {ckpt_last} at step {start_step} (best val {best_val:.4f})")
else:
    torch.manual_seed(seed + rank)  # dropout differs per rank
ckpt = None  # free the memory


def lock_run_folder(path):
    """Hold an advisory lock (flock) on the file at path for this process's life. The kernel drops it on any exit,
    SIGKILL included, so a lock file that a killed run left behind is stale, and is taken over. Returns None once
    locked, else who holds it (the pid and host the holder wrote into the file)."""
    import fcntl
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return holder or "a run that is starting"
        except OSError as e:  # a file system without flock
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run from using this out_dir")
            return None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    stale = os.read(fd, 200).decode(errors="replace").strip()
    if stale:
        print(f"note: {path} was left by a run that ended without releasing it ({stale}); taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    atexit.register(lambda: (os.remove(path), os.close(fd)))  # remove before unlocking: no one locks a dead file
    return None


def claim_run_folder():
    """Rank 0: make out_dir and lock it for this run; refuse a scratch run where checkpoints are (or move them aside
    with overwrite=True); clear what an interrupted run left: partial checkpoint files, and a DONE that this run
    makes stale by training on (DONE means finished). Returns an error message, or None."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"out_dir '{out_dir}' cannot be created: {e.strerror}"
    holder = lock_run_folder(os.path.join(out_dir, "LOCK"))
    if holder:
        return f"out_dir '{out_dir}' is in use by another run ({holder}); wait for it to end, or pick another --out_dir"
    if init_from == "scratch" and (os.path.exists(ckpt_last) or os.path.exists(ckpt_best)):
        if not overwrite:
            return (f"out_dir '{out_dir}' holds the checkpoints of an earlier run, which a scratch run would "
                    f"overwrite; continue that run with --init_from=resume, train into a new --out_dir, or pass "
                    f"--overwrite=True to move it aside")
        aside = f"{os.path.normpath(out_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.makedirs(aside)
        for name in os.listdir(out_dir):
            if name != "LOCK":
                os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
        print(f"overwrite: moved the earlier run in {out_dir} to {aside}")
    for tmp in filter(os.path.isfile, glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt.tmp-*"))):
        os.remove(tmp)
        print(f"removed {tmp}, left by an interrupted checkpoint write")
    done = os.path.join(out_dir, "DONE")
    if os.path.exists(done) and not eval_only:
        os.remove(done)
        print(f"removed {done}: this run trains on, and writes it again when it finishes")
    return None


on_master(claim_run_folder)

raw_model = model  # checkpoints and MFU use the plain module: no _orig_mod. prefix
if compile:
    log("compiling the model...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    decay_iters = lr_decay_iters or max_iters
    if not decay_lr:
        return learning_rate
    if it >= decay_iters:
        return min_lr
    start = decay_iters - round(warmdown_frac * decay_iters) if lr_schedule == "wsd" else warmup_iters
    if it < start:  # wsd's constant part
        return learning_rate
    ratio = (it - start) / max(1, decay_iters - start)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if lr_schedule == "cosine" else 1.0 - ratio
    return min_lr + coeff * (learning_rate - min_lr)


def val_set(n_batches=None, rank=0, world=1):
    """The fixed validation batches: the first eval_iters batches of val, or a MAD task's whole test split."""
    if task:
        return mad.val_batches(task, batch_size, seed, rank, world, device, n_batches)
    return val_batches(data_dir, batch_size, block_size, n_batches or eval_iters, rank, world, device)


@torch.no_grad()
def evaluate():
    """(loss, accuracy, macro accuracy) over the fixed val set, split over the ranks and all-reduced. All count
    the targets that are not -1 only (all of them for text, the answer positions for MAD). Accuracy is the
    share of those the argmax predicts; macro accuracy is mad-lab's score (data/mad.py macro_accuracy), per
    batch and averaged weighted by batch size. Both are reported for MAD tasks only (None otherwise)."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, targets, macro x rows, rows
    for x, y in val_set(rank=rank, world=world):
        with ctx:
            logits, loss = model(x, y)
        n = (y != -1).sum()
        sums[0] += loss.double() * n
        sums[2] += n
        if task:  # no argmax for text
            sums[1] += mad.answer_hits(logits, y)[0]
            sums[3] += mad.macro_accuracy(logits, y) * len(x)
            sums[4] += len(x)
    if ddp:
        dist.all_reduce(sums)
    model.train()
    loss = (sums[0] / sums[2]).item()
    return (loss, (sums[1] / sums[2]).item(), (sums[3] / sums[4]).item()) if task else (loss, None, None)


def amax():
    """HC/mHC composite Amax gain over all sites on the first val batch (None, None for the plain residual)."""
    if residual == "plain" or not master:
        return None, None
    x, _ = next(iter(val_set(1)))
    raw_model.eval()
    with ctx:
        mats = connection_matrices(raw_model, x)
    raw_model.train()
    fwd, bwd = amax_gain([res for _, _, res in mats])
    return fwd[-1], bwd[-1]


def rng_state():
    """This process's RNG states in types the safe loader reads (tensors, lists, ints): no numpy objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}


def write_atomic(path, write, mode="w", tmp=None):
    """write(f) into a temp file, fsync it, rename it over path: a crash mid-write leaves the previous file."""
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(paths, step, elapsed):
    """Write the full training state to each of paths, atomically. Every rank calls it (the RNG states are
    gathered); rank 0 writes. paths lists ckpt_best before ckpt_last, so a kill between the two never leaves
    ckpt_last recording a best that ckpt_best.pt does not hold yet."""
    states = [None] * world
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if not master:
        return
    state = {"model": raw_model.state_dict(), "optimizer": optim.state_dict(), "scaler": scaler.state_dict(),
             "model_args": model_args, "config": config, "tokenizer": tokenizer, "step": step,
             "best_val_loss": best_val, "elapsed_s": elapsed, "loader": loader.state(step - start_step), "rng": states}
    for path in paths:
        write_atomic(path, lambda f: torch.save(state, f), "wb", f"{path}.tmp-{step}")
    dirfd = os.open(out_dir, os.O_RDONLY)
    os.fsync(dirfd)
    os.close(dirfd)


def git(*args):
    """git's output in this file's repository, or None where git or the repository is missing."""
    try:
        r = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_dirty():
    """Whether tracked files differ from git_commit (edited, staged, deleted, renamed); None without git.
    Untracked files (run folders, data, notes) do not count."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s", "mfu", "elapsed_s",
           "amax_fwd", "amax_bwd", "val_acc", "val_acc_macro"]
metrics_path = os.path.join(out_dir, "metrics.csv")
if master:
    write_atomic(os.path.join(out_dir, "config.json"), lambda f: json.dump(
        dict(config, model_args=model_args, tokenizer_kind=tokenizer["kind"], world_size=world,
             tokens_per_step=tokens_per_step, device=device, dtype=dtype, compile=compile,
             git_commit=(git("rev-parse", "HEAD") or "").strip() or "unknown", git_dirty=git_dirty(),
             torch_version=torch.__version__, python_version=platform.python_version(), argv=sys.argv), f, indent=2))
    if init_from == "scratch" or not os.path.isfile(metrics_path) or os.path.getsize(metrics_path) == 0:
        # a new run (the folder holds no checkpoint): rows of an attempt that never saved one do not carry over
        write_atomic(metrics_path, lambda f: f.write(",".join(COLUMNS) + "\n"))
    else:  # resuming: keep the file's own columns, so the rows stay aligned with its header
        with open(metrics_path) as f:
            COLUMNS = f.readline().strip().split(",")
    if wandb_log:
        import wandb  # optional: pip install wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)


def write_row(row):
    """Append one metrics.csv row (floats at full precision; empty cells for what this step did not measure)."""
    if not master:
        return
    with open(metrics_path, "a") as f:
        f.write(",".join("" if row.get(c) is None else repr(row[c]) for c in COLUMNS) + "\n")
    if wandb_log:
        wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])


def stop_non_finite(what, value):
    last = f"{ckpt_last} is the last good checkpoint" if os.path.isfile(ckpt_last) else "no checkpoint was written yet"
    log(f"error: step {step}: the {what} loss is {value}; stopping. {last}. "
        f"Try a lower learning_rate, grad_clip, or dtype=bfloat16/float32.")
    finish(1)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# -----------------------------------------------------------------------------
# the loop. "step s" is the state after s optimizer updates.

def fmt_acc(acc, macro):
    return "" if acc is None else f", accuracy {acc:.4f} (macro {macro:.4f})"


val_acc = val_acc_macro = None
if eval_only or start_step == 0:
    val, val_acc, val_acc_macro = evaluate()
    log(f"step {start_step}: val loss {val:.4f}{fmt_acc(val_acc, val_acc_macro)}")
    write_row(dict(step=start_step, tokens=start_step * tokens_per_step, val_loss=val, val_acc=val_acc,
                   val_acc_macro=val_acc_macro, elapsed_s=elapsed0))
    if eval_only:
        finish(0)
step, t_start, dt_avg = start_step, time.time() - elapsed0, None
while step < max_iters:
    t0 = time.time()
    lr = get_lr(step)
    for group in optim.param_groups:  # one schedule shape, scaled to each group's peak (configure_optimizers)
        group["lr"] = lr * group["lr_scale"]
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        x, y = loader.batch(step - start_step, micro)
        if ddp:  # sync gradients on the last micro-step only; set before the forward (build-nanogpt #30)
            model.require_backward_grad_sync = micro == accum - 1
        with ctx:
            _, loss = model(x, y)
            loss = loss / accum
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optim)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip).item()
    scaler.step(optim)
    scaler.update()
    optim.zero_grad(set_to_none=True)
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    train_loss = loss_sum.item()
    step += 1
    dt = time.time() - t0
    if not math.isfinite(train_loss):
        stop_non_finite("training", train_loss)
    dt_avg = dt if dt_avg is None else 0.9 * dt_avg + 0.1 * dt
    row = {}
    if step % log_interval == 0 or step == max_iters:
        mfu = diagnostics.mfu(raw_model, proc_batch * accum, dt, device)
        row = dict(train_loss=train_loss, lr=lr, grad_norm=grad_norm, ms_per_step=dt * 1000,
                   tok_per_s=tokens_per_step / dt, mfu=mfu)
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        log(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm} | {dt * 1000:.1f} ms | "
            f"{tokens_per_step / dt:,.0f} tok/s | mfu {f'{mfu * 100:.1f}%' if mfu is not None else 'n/a'} | "
            f"eta {fmt_time(dt_avg * (max_iters - step))}")
    if step % eval_interval == 0 or step == max_iters:
        val, val_acc, val_acc_macro = evaluate()
        if not math.isfinite(val):  # the last update broke the weights: do not checkpoint them
            stop_non_finite("validation", val)
        row["val_loss"], row["val_acc"], row["val_acc_macro"] = val, val_acc, val_acc_macro
        row["amax_fwd"], row["amax_bwd"] = amax()
        improved = val < best_val
        best_val = min(best_val, val)
        save_checkpoint([ckpt_best, ckpt_last] if improved else [ckpt_last], step, time.time() - t_start)
        log(f"step {step}: val loss {val:.4f} (best {best_val:.4f}){fmt_acc(val_acc, val_acc_macro)}; saved {'ckpt_last, ckpt_best' if improved else 'ckpt_last'}")
    if row:
        write_row(dict(row, step=step, tokens=step * tokens_per_step, elapsed_s=time.time() - t_start))

if master:
    write_atomic(os.path.join(out_dir, "DONE"), lambda f: json.dump(
        {"step": step, "best_val_loss": best_val, "val_acc": val_acc, "val_acc_macro": val_acc_macro,
         "elapsed_s": time.time() - t_start}, f))
    log(f"done: {step} steps, best val loss {best_val:.4f}, {fmt_time(time.time() - t_start)}")
finish(0)
