"""
Score a run's checkpoint on a downstream task. HellaSwag, as llm.c scores it (hellaswag.py): completion style,
the loss over each ending's tokens only; acc (lowest summed loss) and acc_norm (lowest loss per token).

$ python data/hellaswag/prepare.py                                   # or --input=PATH/hellaswag_val.jsonl offline
$ python eval.py --out_dir=out/fineweb --task=hellaswag              # ckpt_best.pt there, else ckpt_last.pt
$ python eval.py --out_dir=out/quickstart --input=PATH --limit=500   # any jsonl in rowanz's schema, first 500
$ torchrun --standalone --nproc_per_node=8 eval.py --out_dir=out/fineweb   # examples sharded, counts all-reduced
$ python eval.py --help

It prints one line per metric (acc and acc_norm with their standard errors, count), then the same as one JSON line.
"""

import json
import os
import sys
from contextlib import nullcontext

import torch

import distributed
import hellaswag
from checkpoint import find, load_checkpoint, load_model
from configurator import configure, pick_device
from data.tokenizer import encoder
from distributed import fail, finish

# -----------------------------------------------------------------------------
out_dir = "out"           # a run folder: uses its ckpt_best.pt, else ckpt_last.pt
ckpt = ""                 # or an explicit checkpoint path (wins over out_dir)
task = "hellaswag"        # the task; "hellaswag" is the one there is
input = ""                # the task's jsonl; "" = data/hellaswag/hellaswag_val.jsonl (its prepare.py writes it)
limit = 0                 # score the first limit examples only; 0 = all
batch_size = 32           # rows (context + one ending) per forward
device = None             # None = cuda, else mps, else cpu
dtype = None              # None = bfloat16 on cuda where supported, else float32
tokenizer_file = ""       # GPT-2 BPE offline: path to r50k_base.tiktoken
trust_checkpoint = False  # load a checkpoint older than safe loading (a full unpickle: your own files only)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
ddp, rank, local_rank, world = distributed.env()
try:
    configure(globals(), config_keys, sys.argv[1:], dict(device=str, dtype=str))
    _checks = [("task", task in ("hellaswag",), "'hellaswag'"),
               ("limit", limit >= 0, "an int >= 0 (0 = all)"),
               ("batch_size", batch_size >= 1, "an int >= 1"),
               ("dtype", dtype in (None, "float32", "bfloat16", "float16"), "None, float32, bfloat16 or float16")]
    for _k, _ok, _want in _checks:
        if not _ok:
            raise ValueError(f"{_k}={globals()[_k]!r} is not valid; expected {_want}")
    device, device_type = pick_device(device)
except ValueError as e:
    fail(e)
input = input or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hellaswag", "hellaswag_val.jsonl")
try:
    ckpt = find(out_dir, ckpt)
    state = load_checkpoint(ckpt, trust_checkpoint)
    encode, _ = encoder(state["tokenizer"], tokenizer_file)
    examples = hellaswag.load_encoded(input, encode, state["model_args"]["block_size"], limit)  # on every rank
except ValueError as e:
    fail(e)

if ddp:
    device = distributed.setup(device, device_type, None, local_rank, world)
if dtype is None:
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)

try:
    model = load_model(state, ckpt).to(device)
except ValueError as e:  # model_args or weights that do not fit this model.py
    fail(e)
m = hellaswag.score(model, examples, encode, model.config.block_size, device, batch_size, ctx)
if rank == 0:
    print(f"acc       {m['acc']:.4f} ± {m['acc_stderr']:.4f}")
    print(f"acc_norm  {m['acc_norm']:.4f} ± {m['acc_norm_stderr']:.4f}")
    print(f"count     {m['count']}")
    print(json.dumps(dict(task=task, **m, ckpt=ckpt, input=input, step=state.get("step"), world_size=world,
                          dtype=dtype)))
finish(0)
