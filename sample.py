"""
Sample from a trained model, with the KV-cache generate and the tokenizer recorded in the checkpoint.

$ python sample.py --out_dir=out/quickstart                      # ckpt_best.pt there, else ckpt_last.pt
$ python sample.py --ckpt=out/run/ckpt_last.pt --start="def " --num_samples=3 --max_new_tokens=200
$ python sample.py --out_dir=out/run --start=FILE:prompt.txt --temperature=0.8 --top_k=200 --seed=7
$ python sample.py --help                                        # every setting, its default and what it does
"""

import sys
from contextlib import nullcontext

import torch

from checkpoint import find, load_checkpoint, load_model
from configurator import configure, pick_device
from data.tokenizer import encoder

# -----------------------------------------------------------------------------
out_dir = "out"           # a run folder: uses its ckpt_best.pt, else ckpt_last.pt
ckpt = ""                 # or an explicit checkpoint path (wins over out_dir)
start = "\n"              # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8         # 0 = greedy
top_k = 200               # None = no top-k filtering, else >= 1
seed = 1337
device = None             # None = cuda, else mps, else cpu
dtype = None              # None = bfloat16 on cuda where supported, else float32
use_cache = True          # KV-cache decoding (exact); False recomputes the window every token
tokenizer_file = ""       # GPT-2 BPE offline: path to r50k_base.tiktoken
trust_checkpoint = False  # load a checkpoint older than safe loading (a full unpickle: your own files only)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
try:
    configure(globals(), config_keys, sys.argv[1:], dict(top_k=int, device=str, dtype=str))
    _checks = [("num_samples", num_samples >= 1, "an int >= 1"),
               ("max_new_tokens", max_new_tokens >= 0, "an int >= 0"),
               ("temperature", temperature >= 0, "a number >= 0 (0 = greedy)"),
               ("top_k", top_k is None or top_k >= 1, "None or an int >= 1"),
               ("dtype", dtype in (None, "float32", "bfloat16", "float16"), "None, float32, bfloat16 or float16")]
    for _k, _ok, _want in _checks:
        if not _ok:
            raise ValueError(f"{_k}={globals()[_k]!r} is not valid; expected {_want}")
except ValueError as e:
    sys.exit(f"error: {e}")
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: --start={start}: the prompt file cannot be read ({getattr(e, 'strerror', None) or e})")

try:
    ckpt = find(out_dir, ckpt)
except ValueError as e:
    sys.exit(f"error: {e}")
try:
    device, device_type = pick_device(device)
except ValueError as e:
    sys.exit(f"error: {e}")
if dtype is None:
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)

try:
    state = load_checkpoint(ckpt, trust_checkpoint, need=("tokenizer",))
    model = load_model(state, ckpt).eval().to(device)
except ValueError as e:
    sys.exit(f"error: {e}")
tokenizer = state["tokenizer"]
try:
    encode, decode = encoder(tokenizer, tokenizer_file)
except ValueError as e:
    sys.exit(f"error: {ckpt}: {e}")

try:
    ids = encode(start)
except ValueError as e:
    sys.exit(f"error: the prompt cannot be encoded: {e}")
if not ids:
    sys.exit("error: the prompt is empty; pass --start=TEXT (or FILE:path)")
x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        # vocab_limit: a padded vocabulary (50304 > 50257) must never produce an id the tokenizer lacks
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache,
                           vocab_limit=tokenizer["vocab_size"])
        print(decode(y[0].tolist()))
        print("---------------")
