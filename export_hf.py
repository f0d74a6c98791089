"""
Export a run's checkpoint as a Hugging Face model folder that transformers loads offline:

$ python export_hf.py --out_dir=out/fineweb --to=out/fineweb-hf        # ckpt_best.pt there, else ckpt_last.pt
$ python export_hf.py --ckpt=out/run/ckpt_last.pt --to=DIR --tokenizer_file=r50k_base.tiktoken   # offline BPE
$ python export_hf.py --help

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

DIR holds model.safetensors (fp32), config.json (the checkpoint's GPTConfig fields as model_args), the tokenizer
(tokenizer.json: GPT-2 BPE built from the tiktoken ranks, bytes, or characters), the modeling files and a README.
The modeling files are this repo's model.py and the ops/ modules it imports, copied with their imports made
relative (ops/conv.py becomes ops_conv.py: transformers copies remote code file by file, and loads none from a
package), next to hf/modeling_hypergpt.py, a thin wrapper. The export runs model.py's reference forms
(impl="reference"), and generate() recomputes the window each step (no cache). Needs transformers and safetensors
(pip install -r requirements-eval.txt); the training path never imports them.
"""

import ast
import json
import os
import re
import shutil
import sys

from checkpoint import find, load_checkpoint
from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out"           # a run folder: uses its ckpt_best.pt, else ckpt_last.pt
ckpt = ""                 # or an explicit checkpoint path (wins over out_dir)
to = ""                   # the folder to write (must not exist, or be empty)
overwrite = False         # replace an earlier export in `to` (a folder holding anything else is never touched)
tokenizer_file = ""       # GPT-2 BPE offline: path to r50k_base.tiktoken
trust_checkpoint = False  # load a checkpoint older than safe loading (a full unpickle: your own files only)
# -----------------------------------------------------------------------------
REPO = os.path.dirname(os.path.abspath(__file__))
MODEL_TYPE = "hypergpt"


def repo_module(name):
    """The repo file of a dotted module name (model, ops.conv, ops), or None when it is not this repo's."""
    path = os.path.join(REPO, *name.split("."))
    for f in (path + ".py", os.path.join(path, "__init__.py")):
        if os.path.isfile(f):
            return f
    return None


def flat(name):
    """ops.conv -> ops_conv: the file name (without .py) of a repo module in the flat export folder."""
    return name.replace(".", "_")


def relative_source(name):
    """The source of repo module `name` with every import of a repo module made relative to the flat folder:
    `import ops.conv` -> `from . import ops_conv` (and ops.conv.f -> ops_conv.f), `from ops import conv` ->
    `from . import ops_conv as conv`, `from model import f` -> `from .model import f`. transformers copies only the
    files that a `from .NAME import` line names, so each module-level one gets such a line too. Returns (source,
    the repo modules it imports at module level: the files to ship; those imported inside functions, the fast
    paths' kernels, are not shipped and fail if reached, which impl="reference" never does)."""
    src = open(repo_module(name)).read()
    tree = ast.parse(src)
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
    lines = src.splitlines(keepends=True)
    edits, dotted, ship = [], set(), []
    for node in ast.walk(tree):
        stmts = None  # [(the new statement, the repo module it imports, or None)]
        if isinstance(node, ast.Import) and any(repo_module(a.name) for a in node.names):
            stmts = []
            for a in node.names:
                alias = f" as {a.asname}" if a.asname else ""
                if not repo_module(a.name):
                    stmts.append((f"import {a.name}{alias}", None))
                    continue
                if not a.asname and "." in a.name:
                    dotted.add(a.name)
                stmts.append((f"from . import {flat(a.name)}{alias}", a.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and repo_module(node.module):
            stmts, names = [], []
            for a in node.names:
                if repo_module(f"{node.module}.{a.name}"):  # a module of a package
                    stmts.append((f"from . import {flat(node.module + '.' + a.name)} as {a.asname or a.name}",
                                  f"{node.module}.{a.name}"))
                else:
                    names.append(a.name + (f" as {a.asname}" if a.asname else ""))
            if names:
                stmts.append((f"from .{flat(node.module)} import {', '.join(names)}", node.module))
        if stmts is None:
            continue
        text = [s for s, _ in stmts]
        if id(node) not in lazy:
            mods = [m for s, m in stmts if m and s.startswith("from . import")]
            text = [f"from .{flat(m)} import __name__ as _  # names {flat(m)}.py, for transformers to copy it"
                    for m in mods] + text
            ship += [m for _, m in stmts if m]
        edits.append((node.lineno, node.end_lineno, "".join(" " * node.col_offset + t + "\n" for t in text)))
    for lo, hi, text in sorted(edits, reverse=True):
        lines[lo - 1:hi] = [text]
    out = "".join(lines)
    for n in sorted(dotted, key=len, reverse=True):  # ops.conv.shift_conv -> ops_conv.shift_conv
        out = re.sub(rf"(?<![\w.]){re.escape(n)}\b", flat(n), out)
    return out, ship


def model_files():
    """{file name: source}: model.py and every repo module it imports at module level, flattened, relative imports."""
    files, todo = {}, ["model"]
    while todo:
        name = todo.pop()
        if f"{flat(name)}.py" in files:
            continue
        src, imports = relative_source(name)
        for node in ast.walk(ast.parse(src)):  # nothing of the repo may still be imported by its absolute name
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad = [m for m in mods if m and repo_module(m)]
            if bad:
                raise RuntimeError(f"export_hf.py: {name}: import of {bad} left absolute")
        files[f"{flat(name)}.py"] = src
        todo += imports
    return files


def byte_chars():
    """GPT-2's printable stand-in for each byte: the alphabet of byte-level BPE vocabularies (tokenizers' ByteLevel)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def hf_tokenizer(spec, block_size, tokenizer_file=""):
    """A transformers fast tokenizer that encodes as data/tokenizer.py's encoder(spec) does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import GPT2_EOT, gpt2_encoding
    kind, special = spec["kind"], {}
    if kind in ("bytes", "gpt2"):
        chars = byte_chars()
        text = lambda b: "".join(chars[c] for c in b)
        if kind == "bytes":
            vocab, merges = {chars[b]: b for b in range(256)}, []
            # byte 0 as bos (lm-eval's prefix for an empty context) and pad (right padding, which a causal model's
            # real tokens never see); no eos, so generate() runs on as sample.py does
            special = dict(bos_token=chars[0], pad_token=chars[0])
        else:
            enc = gpt2_encoding(tokenizer_file)
            pieces = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != GPT2_EOT}
            vocab = {text(b): i for b, i in pieces.items()}
            vocab["<|endoftext|>"] = GPT2_EOT
            # BPE merges from the ranks: every split of a token into two tokens, ranked by the token it makes, so
            # that the lowest-ranked adjacent pair merges first, as tiktoken does
            merges = sorted((i, text(b[:k]), text(b[k:])) for b, i in pieces.items() for k in range(1, len(b))
                            if b[:k] in pieces and b[k:] in pieces)
            merges = [(a, b) for _, a, b in merges]
            special = dict(eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                           pad_token="<|endoftext|>")
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "gpt2")
        tok.decoder = decoders.ByteLevel()
        if kind == "gpt2":
            tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    elif kind == "char":
        tok = Tokenizer(models.BPE({c: i for c, i in spec["stoi"].items()}, []))
        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"a {kind!r} tokenizer has no Hugging Face form here; expected bytes, char or gpt2")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False, **special)


def export(state, to, tokenizer_file="", path="the checkpoint"):
    """Write the export of a checkpoint dict (checkpoint.load_checkpoint's, read from path) into the folder `to`,
    through a temp folder renamed at the end; an earlier export there is replaced."""
    import torch
    from safetensors.torch import save_file

    from checkpoint import load_model
    model = load_model(state, path)
    spec = state["tokenizer"]
    model_args = dict(state["model_args"], impl="reference")
    tmp = f"{os.path.normpath(to)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        weights = {f"gpt.{k}": v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, src in model_files().items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(src)
        for name in ("configuration_hypergpt.py", "modeling_hypergpt.py"):
            shutil.copyfile(os.path.join(REPO, "hf", name), os.path.join(tmp, name))
        tokenizer = hf_tokenizer(spec, model_args["block_size"], tokenizer_file)
        tokenizer.save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer_config.json")  # the class's name in transformers 4 and 5 alike
        tok_config = dict(json.load(open(path)), tokenizer_class="PreTrainedTokenizerFast")
        with open(path, "w") as f:
            json.dump(tok_config, f, indent=2)
        config = {
            "model_type": MODEL_TYPE, "architectures": ["HyperGPTForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_hypergpt.HyperGPTConfig",
                         "AutoModelForCausalLM": "modeling_hypergpt.HyperGPTForCausalLM"},
            "model_args": model_args, "tokenizer": {k: v for k, v in spec.items() if k in ("kind", "vocab_size")},
            "torch_dtype": "float32", "tie_word_embeddings": True,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "step": state.get("step"),
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        # generate() never picks an id the tokenizer lacks (GPT-2's 50257 padded to 50304), as sample.py's vocab_limit
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        generation["suppress_tokens"] = list(range(spec["vocab_size"], model_args["vocab_size"])) or None
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card(model_args, spec, state))
        if os.path.isdir(to):  # empty, or an earlier export that --overwrite=True replaces
            shutil.rmtree(to)
        os.replace(tmp, to)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def card(a, spec, state):
    return f"""# hyperGPT export

A {a['attn']} attention, {a['residual']} residual GPT ({a['n_layer']} layers x {a['n_embd']}, context {a['block_size']},
vocab {a['vocab_size']}, {spec['kind']} tokenizer), step {state.get('step')}, exported by hyperGPT's export_hf.py.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(DIR)
```

model.py and the ops_*.py files are hyperGPT's model, its imports made relative; modeling_hypergpt.py wraps it.
It runs model.py's reference forms (plain torch). The model has no padding mask: pass unpadded or right-padded
rows. generate() recomputes the newest {a['block_size']} tokens each step (no KV cache), which gives the tokens
hyperGPT's sample.py gives.
"""


if __name__ == "__main__":
    config_keys = [k for k, v in globals().items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str))]
    try:
        configure(globals(), config_keys, sys.argv[1:])
        if not to:
            raise ValueError("to='' is not valid; expected --to=DIR, the folder to write the export to")
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        ckpt = find(out_dir, ckpt)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if os.path.exists(to) and not os.path.isdir(to):
        sys.exit(f"error: --to={to} is a file; expected a folder to write the export to")
    if os.path.isdir(to) and os.listdir(to):
        try:
            earlier = json.load(open(os.path.join(to, "config.json"))).get("model_type") == MODEL_TYPE
        except (OSError, ValueError):
            earlier = False
        if not (overwrite and earlier):
            sys.exit(f"error: --to={to} is not empty; " + ("pass --overwrite=True to replace the export there"
                     if earlier else "it does not hold a hyperGPT export, so nothing there is replaced; pick a new folder"))
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: export_hf.py needs transformers and safetensors ({e}); pip install -r requirements-eval.txt")
    try:
        state = load_checkpoint(ckpt, trust_checkpoint)
        export(state, to, tokenizer_file, ckpt)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"exported {ckpt} (step {state.get('step')}, {state['tokenizer']['kind']} tokenizer) -> {to}")
