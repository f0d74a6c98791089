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
"""

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from data import mad
from data.shards import Loader, val_batches
from data.tokenizer import load_meta
from model import GPT, GPTConfig
from plots.plot_connections import amax_gain, connection_matrices

# -----------------------------------------------------------------------------
# settings: every global below can be overridden by a config file or --key=value
# I/O
out_dir = "out"                  # run folder: config.json, metrics.csv, ckpt_last.pt, ckpt_best.pt, DONE
eval_interval = 250              # evaluate on the fixed val set (and checkpoint) every this many steps
log_interval = 10                # print and write a metrics.csv row every this many steps
eval_iters = 20                  # batches in the fixed val set (its first eval_iters * batch_size windows)
eval_only = False                # evaluate once and exit
init_from = "scratch"            # "scratch" or "resume" (from out_dir/ckpt_last.pt)
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
batch_size = 12                  # sequences per micro-step per process
block_size = 256
# model: every GPTConfig field in model.py is a setting too; these are the common ones
vocab_size = None                # None = from the dataset (meta.pkl), GPT-2's 50257 padded to 50304
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
bias = False
attn = "softmax"                 # "softmax" | "hyperglu" | "hypermlp"
residual = "plain"               # "plain" | "hc" | "mhc"
pos = "learned"                  # "learned" | "rope" | "none"
# AdamW
learning_rate = 6e-4
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                  # 0 disables clipping
# learning-rate schedule: linear warmup, then cosine or linear decay to min_lr
decay_lr = True
lr_schedule = "cosine"           # "cosine" | "linear"
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
try:
    configure(globals(), config_keys, sys.argv[1:], _types)
    _checks = [("init_from", ("scratch", "resume")), ("lr_schedule", ("cosine", "linear")),
               ("dtype", (None, "float32", "bfloat16", "float16"))]
    for _k, _allowed in _checks:
        if globals()[_k] not in _allowed:
            raise ValueError(f"{_k}={globals()[_k]!r} is not valid; expected one of {list(_allowed)}")
    for _k in ("eval_interval", "log_interval", "eval_iters", "batch_size", "block_size", "gradient_accumulation_steps"):
        if globals()[_k] <= 0:
            raise ValueError(f"{_k}={globals()[_k]} is not valid; expected a positive int")
except ValueError as _e:
    sys.exit(f"error: {_e}")
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------
# processes and devices. A process group exists only under torchrun (RANK set).

ddp = int(os.environ.get("RANK", -1)) != -1
rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
master = rank == 0
if device is None:
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
device_type = torch.device(device).type
if ddp:
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    else:  # share the cores between the local processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
log = print if master else (lambda *a, **k: None)
if gradient_accumulation_steps % world:
    sys.exit(f"error: gradient_accumulation_steps={gradient_accumulation_steps} is global and must divide by the "
             f"world size {world}")
accum = gradient_accumulation_steps // world

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

# -----------------------------------------------------------------------------
# data, model, optimizer, or all of them from the last checkpoint

task = None  # a MAD task (data/mad.py) instead of token shards
if dataset.startswith("mad:"):
    try:
        task = mad.make_task(dataset[4:], mad_size, mad_args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if block_size < task.length:
        sys.exit(f"error: block_size={block_size} is shorter than the {dataset} examples (length {task.length}); "
                 f"pass --block_size={task.length}")
    tokenizer = {"kind": "mad", "vocab_size": task.vocab_size, "task": asdict(task)}
else:
    data_dir = dataset if os.path.isdir(dataset) else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
    if not os.path.isdir(data_dir):
        sys.exit(f"error: dataset '{dataset}' not found: expected a folder data/{dataset}/ with train and val shards "
                 f"(python data/{dataset}/prepare.py), a path to one, or mad:<task> ({', '.join(mad.TASKS)})")
    tokenizer = load_meta(data_dir)
seq_len = task.length if task else block_size  # tokens per training row
tokens_per_step = gradient_accumulation_steps * batch_size * seq_len
log(f"world size {world} | grad accum {accum} per process ({gradient_accumulation_steps} global) | "
    f"batch {batch_size} x {seq_len} | tokens per step {tokens_per_step:,}")
os.makedirs(out_dir, exist_ok=True)
ckpt_last, ckpt_best = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")

ckpt = None
if init_from == "resume":
    if not os.path.isfile(ckpt_last):
        sys.exit(f"error: init_from=resume but {ckpt_last} does not exist")
    ckpt = torch.load(ckpt_last, map_location="cpu", weights_only=False)
    model_args = ckpt["model_args"]  # the architecture comes from the checkpoint
else:
    model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
    model_args["vocab_size"] = vocab_size or (50304 if tokenizer["kind"] == "gpt2" else tokenizer["vocab_size"])
    if model_args["vocab_size"] < tokenizer["vocab_size"]:
        sys.exit(f"error: vocab_size={vocab_size} is smaller than the dataset's vocabulary ({tokenizer['vocab_size']})")
torch.manual_seed(seed)  # the same initial weights on every rank
try:
    gptconf = GPTConfig.from_dict(model_args)
except ValueError as e:
    sys.exit(f"error: {e}")
model_args = asdict(gptconf)  # with the auto fields resolved
model = GPT(gptconf)
if ckpt is not None:
    model.load_state_dict(ckpt["model"])
model.grad_ckpt = grad_ckpt
model.to(device)
log(f"model: {attn} attention, {residual} residual, {model.get_num_params() / 1e6:.2f}M parameters")
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
start_step, best_val, elapsed0 = 0, float("inf"), 0.0
if ckpt is not None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    start_step, best_val, elapsed0 = ckpt["step"], ckpt["best_val_loss"], ckpt["elapsed_s"]
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if device_type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    log(f"resumed from {ckpt_last} at step {start_step} (best val {best_val:.4f})")
else:
    torch.manual_seed(seed + rank)  # dropout differs per rank
row0 = ckpt["loader"]["next_row"] if ckpt is not None else 0
order = ckpt["loader"]["order"] if ckpt is not None else data_order
if task:
    loader = mad.Loader(task, batch_size, accum, rank, world, seed, device, row0)
else:
    loader = Loader(data_dir, batch_size, block_size, accum, rank, world, order, seed, device, row0)
ckpt = None  # free the memory

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
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio)) if lr_schedule == "cosine" else 1.0 - ratio
    return min_lr + coeff * (learning_rate - min_lr)


def val_set(n_batches=None, rank=0, world=1):
    """The fixed validation batches: the first eval_iters batches of val, or a MAD task's whole test split."""
    if task:
        return mad.val_batches(task, batch_size, seed, rank, world, device, n_batches)
    return val_batches(data_dir, batch_size, block_size, n_batches or eval_iters, rank, world, device)


@torch.no_grad()
def evaluate():
    """(loss, accuracy) over the fixed val set, split over the ranks and all-reduced. Both count the
    targets that are not -1 only (all of them for text, the answer positions for MAD); accuracy is
    the share of those the argmax predicts, reported for MAD tasks only (None otherwise)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, correct, counted targets
    for x, y in val_set(rank=rank, world=world):
        with ctx:
            logits, loss = model(x, y)
        n = (y != -1).sum()
        correct = mad.answer_hits(logits, y)[0] if task else torch.zeros((), device=device)  # no argmax for text
        sums += torch.stack([loss.double() * n, correct.double(), n.double()])
    if ddp:
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[2]).item(), ((sums[1] / sums[2]).item() if task else None)


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
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}


def save_checkpoint(paths, step, elapsed):
    """Atomically write the full training state (temp file, fsync, rename): a crash mid-write leaves the
    previous file intact. Every rank calls it (the RNG states are gathered); rank 0 writes."""
    states = [None] * world
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if not master:
        return
    state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "model_args": model_args, "config": config, "tokenizer": tokenizer, "step": step,
             "best_val_loss": best_val, "elapsed_s": elapsed, "loader": loader.state(step - start_step), "rng": states}
    for path in paths:
        tmp = f"{path}.tmp-{step}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dirfd = os.open(out_dir, os.O_RDONLY)
    os.fsync(dirfd)
    os.close(dirfd)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s", "mfu", "elapsed_s",
           "amax_fwd", "amax_bwd", "val_acc"]
metrics_path = os.path.join(out_dir, "metrics.csv")
if master:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config, model_args=model_args, tokenizer_kind=tokenizer["kind"], world_size=world,
                       tokens_per_step=tokens_per_step, device=device, dtype=dtype, compile=compile,
                       git_commit=git_commit(), torch_version=torch.__version__,
                       python_version=platform.python_version(), argv=sys.argv), f, indent=2)
    if not os.path.isfile(metrics_path) or os.path.getsize(metrics_path) == 0:
        with open(metrics_path, "w") as f:
            f.write(",".join(COLUMNS) + "\n")
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


def end_ddp():
    """Wait for every rank before tearing down: a rank that destroys its gloo group while rank 0 is still
    writing a checkpoint aborts the process ("terminate called without an active exception")."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def stop_non_finite(what, value):
    last = f"{ckpt_last} is the last good checkpoint" if os.path.isfile(ckpt_last) else "no checkpoint was written yet"
    log(f"error: step {step}: the {what} loss is {value}; stopping. {last}. "
        f"Try a lower learning_rate, grad_clip, or dtype=bfloat16/float32.")
    end_ddp()
    sys.exit(1)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# -----------------------------------------------------------------------------
# the loop. "step s" is the state after s optimizer updates.

def fmt_acc(acc):
    return "" if acc is None else f", accuracy {acc:.4f}"


val_acc = None
if eval_only or start_step == 0:
    val, val_acc = evaluate()
    log(f"step {start_step}: val loss {val:.4f}{fmt_acc(val_acc)}")
    write_row(dict(step=start_step, tokens=start_step * tokens_per_step, val_loss=val, val_acc=val_acc,
                   elapsed_s=elapsed0))
    if eval_only:
        end_ddp()
        sys.exit(0)
step, t_start, dt_avg = start_step, time.time() - elapsed0, None
while step < max_iters:
    t0 = time.time()
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
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
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
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
        mfu = raw_model.estimate_mfu(batch_size * accum, dt, device)
        row = dict(train_loss=train_loss, lr=lr, grad_norm=grad_norm, ms_per_step=dt * 1000,
                   tok_per_s=tokens_per_step / dt, mfu=mfu)
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        log(f"step {step}/{max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | norm {norm} | {dt * 1000:.1f} ms | "
            f"{tokens_per_step / dt:,.0f} tok/s | mfu {f'{mfu * 100:.1f}%' if mfu is not None else 'n/a'} | "
            f"eta {fmt_time(dt_avg * (max_iters - step))}")
    if step % eval_interval == 0 or step == max_iters:
        val, val_acc = evaluate()
        if not math.isfinite(val):  # the last update broke the weights: do not checkpoint them
            stop_non_finite("validation", val)
        row["val_loss"], row["val_acc"] = val, val_acc
        row["amax_fwd"], row["amax_bwd"] = amax()
        improved = val < best_val
        best_val = min(best_val, val)
        save_checkpoint([ckpt_last, ckpt_best] if improved else [ckpt_last], step, time.time() - t_start)
        log(f"step {step}: val loss {val:.4f} (best {best_val:.4f}){fmt_acc(val_acc)}; saved {'ckpt_last, ckpt_best' if improved else 'ckpt_last'}")
    if row:
        write_row(dict(row, step=step, tokens=step * tokens_per_step, elapsed_s=time.time() - t_start))

if master:
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        json.dump({"step": step, "best_val_loss": best_val, "val_acc": val_acc, "elapsed_s": time.time() - t_start}, f)
    log(f"done: {step} steps, best val loss {best_val:.4f}, {fmt_time(time.time() - t_start)}")
end_ddp()
