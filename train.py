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

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import diagnostics
import distributed
from configurator import configure, pick_device
from data import mad
from data.dataset import open_dataset
from distributed import fail, finish
from extra_metrics import ExtraMetrics
from model import GPT, GPTConfig
from run_folder import RunFolder

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
hellaswag_every = 0              # score HellaSwag every this many steps, acc_norm into metrics.csv (llm.c's -h); 0 = off
hellaswag_file = ""              # its jsonl; "" = data/hellaswag/hellaswag_val.jsonl (python data/hellaswag/prepare.py)
hellaswag_limit = 0              # score its first hellaswag_limit examples only; 0 = all
tokenizer_file = ""              # GPT-2 BPE offline, for val_bpb and HellaSwag: path to r50k_base.tiktoken
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


try:
    configure(globals(), config_keys, sys.argv[1:], _types, [f.name for f in fields(GPTConfig)])
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

ddp, rank, local_rank, world = distributed.env()
master = rank == 0
try:
    device, device_type = pick_device(device)
except ValueError as e:
    fail(e)
if ddp:
    device = distributed.setup(device, device_type, backend, local_rank, world)
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

# -----------------------------------------------------------------------------
# data, model, optimizer, or all of them from the last checkpoint. Everything here only reads: the run folder is
# claimed after every setting, the data and the checkpoint have been checked.

try:
    data = open_dataset(dataset, block_size, mad_size, mad_args, distributed.on_master)
except ValueError as e:
    fail(e)
tokenizer, task = data.tokenizer, data.task  # task: a MAD task, whose answers are scored; None for text
tokens_per_step = gradient_accumulation_steps * batch_size * data.seq_len
log(f"world size {world} | grad accum {accum} per process ({gradient_accumulation_steps} global) | "
    f"batch {batch_size} x {data.seq_len} | tokens per step {tokens_per_step:,}")
if proc_batch != batch_size:
    log(f"note: {world} processes outnumber the {gradient_accumulation_steps} micro-steps, so each micro-step's "
        f"batch_size={batch_size} rows are split over them: {proc_batch} rows per process")
run = RunFolder(out_dir)

model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
model_args["vocab_size"] = vocab_size or (50304 if tokenizer["kind"] == "gpt2" else tokenizer["vocab_size"])
if model_args["vocab_size"] < tokenizer["vocab_size"]:
    fail(f"vocab_size={vocab_size} is smaller than the dataset's vocabulary ({tokenizer['vocab_size']})")
try:
    model_args = asdict(GPTConfig(**model_args))  # validated
except ValueError as e:
    fail(e)

ckpt = None
if init_from == "resume":  # the model, the data stream and the tokenizer must be the checkpoint's
    try:
        ckpt = checkpoint.load_for_resume(run.ckpt_last, run.ckpt_best, trust_checkpoint)
        fixed, applied = checkpoint.resume_differences(ckpt, config, model_args, tokenizer, data.same)
    except ValueError as e:
        fail(e if ckpt is None else f"{run.ckpt_last}: {e}")
    if fixed:
        fail(f"resume: {run.ckpt_last} was trained with other model, data or tokenizer settings, which a resumed run "
             f"cannot change (checkpoint -> command): {'; '.join(fixed)}. Resume with the run's own settings "
             f"(its config.json records them and the command), or train from scratch into a new --out_dir")
    if applied:
        log(f"resume: these settings differ from the checkpoint's and take effect: {'; '.join(applied)}")
row0, order = (ckpt["loader"]["next_row"], ckpt["loader"]["order"]) if ckpt is not None else (0, data_order)
try:  # the shards are validated here (sizes, headers), and both splits must hold a block_size window
    loader = data.loader(proc_batch, accum, rank, world, seed, device, row0, order)
    extra = ExtraMetrics(data, config, device, ctx, log)  # val_bpb, and HellaSwag every hellaswag_every steps
except ValueError as e:
    fail(e)

torch.manual_seed(seed)  # the same initial weights on every rank
model = GPT(GPTConfig(**model_args))
if ckpt is not None:
    try:
        checkpoint.check_weights(model, ckpt["model"], run.ckpt_last)
    except ValueError as e:
        fail(e)
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
    start_step, best_val, elapsed0 = checkpoint.restore(ckpt, optim, scaler, rank, device)
    run.good_step = start_step
    log(f"resumed from {run.ckpt_last} at step {start_step} (best val {best_val:.4f})")
else:
    torch.manual_seed(seed + rank)  # dropout differs per rank
ckpt = None  # free the memory

distributed.on_master(lambda: run.claim(init_from, overwrite))
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


@torch.no_grad()
def evaluate():
    """(loss, accuracy, macro accuracy) over the fixed val set, split over the ranks and all-reduced. All count
    the targets that are not -1 only (all of them for text, the answer positions for MAD). Accuracy is the
    share of those the argmax predicts; macro accuracy is mad-lab's score (data/mad.py macro_accuracy), per
    batch and averaged weighted by batch size. Both are reported for MAD tasks only (None otherwise)."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, targets, macro x rows, rows
    for x, y in data.val_batches(batch_size, eval_iters, seed, rank, world, device):
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


def save_checkpoint(paths, step, elapsed):
    """The full training state, written by rank 0 to each of paths (run.save); every rank calls it, so that each
    rank's RNG states are in it, and every rank stops where the write fails."""
    states = distributed.gather(checkpoint.rng_state(device))
    distributed.on_master(lambda: run.save({
        "model": raw_model.state_dict(), "optimizer": optim.state_dict(), "scaler": scaler.state_dict(),
        "model_args": model_args, "config": config, "tokenizer": tokenizer, "step": step, "best_val_loss": best_val,
        "elapsed_s": elapsed, "loader": loader.state(step - start_step), "rng": states}, paths))
    run.good_step = step


distributed.on_master(lambda: run.start(config, init_from == "scratch", wandb_log, wandb_project, wandb_run_name,
                                        model_args=model_args, tokenizer_kind=tokenizer["kind"], world_size=world,
                                        tokens_per_step=tokens_per_step, device=device, dtype=dtype, compile=compile))
write_row = run.write_row if master else (lambda row: None)


def stop_non_finite(what, value):  # every rank sees the same (all-reduced) loss, so every rank stops here
    fail(f"step {step}: the {what} loss is {value}; stopping. {run.last_good()} with a lower learning_rate, "
         f"grad_clip, or dtype=bfloat16/float32")


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def fmt_acc(acc, macro):
    return "" if acc is None else f", accuracy {acc:.4f} (macro {macro:.4f})"


# -----------------------------------------------------------------------------
# the loop. "step s" is the state after s optimizer updates.

val_acc = val_acc_macro = None
if eval_only or start_step == 0:
    val, val_acc, val_acc_macro = evaluate()
    log(f"step {start_step}: val loss {val:.4f}{fmt_acc(val_acc, val_acc_macro)}")
    write_row(dict(step=start_step, tokens=start_step * tokens_per_step, val_loss=val, val_acc=val_acc,
                   val_acc_macro=val_acc_macro, val_bpb=extra.bpb(val), elapsed_s=elapsed0,
                   **extra.hellaswag(raw_model, start_step, force=eval_only)))
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
        row.update(val_loss=val, val_acc=val_acc, val_acc_macro=val_acc_macro, val_bpb=extra.bpb(val))
        if residual != "plain" and master:  # HC/mHC composite Amax gain over all sites on the first val batch
            x, _ = next(iter(data.val_batches(batch_size, eval_iters, seed, device=device, limit=1)))
            row["amax_fwd"], row["amax_bwd"] = diagnostics.amax(raw_model, x, ctx)
        improved = val < best_val
        best_val = min(best_val, val)
        save_checkpoint([run.ckpt_best, run.ckpt_last] if improved else [run.ckpt_last], step, time.time() - t_start)
        log(f"step {step}: val loss {val:.4f} (best {best_val:.4f}){fmt_acc(val_acc, val_acc_macro)}; saved {'ckpt_last, ckpt_best' if improved else 'ckpt_last'}")
    row.update(extra.hellaswag(raw_model, step))
    if row:
        write_row(dict(row, step=step, tokens=step * tokens_per_step, elapsed_s=time.time() - t_start))

if master:
    run.done({"step": step, "best_val_loss": best_val, "val_acc": val_acc, "val_acc_macro": val_acc_macro,
              "elapsed_s": time.time() - t_start})
    log(f"done: {step} steps, best val loss {best_val:.4f}, {fmt_time(time.time() - t_start)}")
finish(0)
