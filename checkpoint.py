"""
train.py's checkpoints: saving them atomically, what a resumed run continues (its settings' differences, the
optimizer, the RNG states), and loading them without running code. A full unpickle (torch.load with
weights_only=False) runs whatever a file from someone else asks for; weights_only=True reads tensors, numbers,
strings, lists and dicts only. train.py stores everything in those types (the numpy and Python RNG states as
lists). Checkpoints written before that hold numpy objects: they load only with trust=True (train.py and sample.py:
--trust_checkpoint=True). Older files' model_args are read as today's GPTConfig takes them (upgrade); load_model
builds the model a checkpoint holds. A file whose model_args this model.py does not take, or whose weights do not fit
them, is a ValueError naming the file (load_model, check_weights): train.py's resume and sample.py say the same.
"""
import os
import pickle
import random
import re
from dataclasses import asdict

import numpy as np
import torch

from model import GPT, GPTConfig


def find(out_dir, ckpt=""):
    """The checkpoint a script reads: ckpt where given, else out_dir's ckpt_best.pt, else its ckpt_last.pt. A
    ValueError says which is missing."""
    if not ckpt:
        found = [p for p in (os.path.join(out_dir, n) for n in ("ckpt_best.pt", "ckpt_last.pt")) if os.path.isfile(p)]
        if not found:
            raise ValueError(f"no ckpt_best.pt or ckpt_last.pt in out_dir '{out_dir}'; train first or pass --ckpt=PATH")
        ckpt = found[0]
    if not os.path.isfile(ckpt):
        raise ValueError(f"checkpoint '{ckpt}' not found")
    return ckpt


def load_checkpoint(path, trust=False, need=()):
    """The checkpoint dict at path, on the CPU, with model, model_args and the keys in need (sample.py needs the
    tokenizer). Any problem is a ValueError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).strip().splitlines()[-1]
        if what.startswith("numpy"):
            raise ValueError(f"{path} predates safe loading: it holds numpy objects ({what}). If you made it, or "
                             f"trust where it came from, pass --trust_checkpoint=True to load it anyway") from None
        raise ValueError(f"{path} holds {what}, which loading would have to run code for; refusing to load it "
                         f"(a checkpoint holds only tensors, numbers, strings, lists and dicts)") from None
    except Exception as e:  # truncated, empty, not a zip: torch raises RuntimeError, OSError, EOFError, KeyError...
        raise ValueError(f"{path} cannot be read: it is truncated or not a checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise ValueError(f"{path} is not a train.py checkpoint (expected a dict with model and model_args)")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; expected a checkpoint that train.py wrote (it records "
                         f"the tokenizer, and the training state a resume needs)")
    state["model_args"] = upgrade(state["model_args"], state["model"])
    return state


def model_config(model_args):
    """The GPTConfig of a checkpoint's model_args; ones this model.py does not take are a ValueError (the caller
    names the file: sample.py through load_model, train.py's resume through resume_differences)."""
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"its model_args do not fit this model.py ({e})") from None


def check_weights(model, weights, path):
    """A ValueError naming path where weights (a state dict) are not the tensors model has, by name and shape."""
    want = model.state_dict()
    bad = [f"{k} has shape {tuple(v.shape)} in the file, {tuple(want[k].shape)} in the model"
           for k, v in weights.items() if k in want and tuple(v.shape) != tuple(want[k].shape)]
    bad += [f"{k} is missing" for k in want if k not in weights]
    bad += [f"{k} is not in the model" for k in weights if k not in want]
    if bad:
        raise ValueError(f"{path}: its weights do not fit its model_args: {'; '.join(bad[:5])}"
                         f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}")


def load_model(state, path):
    """The GPT a loaded checkpoint holds, its weights in (a stray torch.compile '_orig_mod.' prefix stripped)."""
    try:
        model = GPT(model_config(state["model_args"]))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    check_weights(model, weights, path)
    model.load_state_dict(weights)
    return model


RETIRED = ("impl_default", "aligner_impl_train", "aligner_impl_eval", "op1_per_head", "op2_per_head")


def upgrade(args, weights=None):
    """A saved model_args dict (a checkpoint's, or a run's config.json) as today's GPTConfig reads it: without the
    fields older versions wrote and this one dropped (RETIRED). Before softmax had gates, its files said
    use_qk_gate/use_vo_gate=True to no effect; those read as unset. A dict with a RETIRED field is that old; the
    files written between the drop and the gates tell by their weights, when there are weights to look at."""
    if args.get("attn") == "softmax" and (any(k in args for k in RETIRED)
                                          or weights is not None and not any("_gate." in k for k in weights)):
        args = dict(args, use_qk_gate=None, use_vo_gate=None)
    return {k: v for k, v in args.items() if k not in RETIRED}


# -----------------------------------------------------------------------------
# saving and resuming a train.py run

def write_atomic(path, write, mode="w", tmp=None):
    """write(f) into a temp file, fsync it, rename it over path: a crash mid-write leaves the previous file. A failed
    write (a full disk, a read-only or vanished folder) removes the temp file and raises OSError whose strerror names
    path and the cause (torch.save reports a full disk as a RuntimeError, 'unexpected pos', over the OSError it met)."""
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    made = False
    try:
        with open(tmp, mode) as f:
            made = True
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if made:
            try:
                os.remove(tmp)
            except OSError:
                pass
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:  # not the file system's doing: a bug, with its traceback
            raise
        raise OSError(cause.errno, f"writing {path} failed: {cause.strerror or cause}"
                                   f"{' (the partial file is removed)' if made else ''}") from None


def save(state, paths, folder, written=lambda path: None):
    """The training state to each of paths, atomically, then folder's entries to disk; written(path) after each file.
    train.py lists ckpt_best before ckpt_last, so a kill between the two never leaves ckpt_last recording a best that
    ckpt_best.pt does not hold. A failure is an OSError whose strerror says which file and why."""
    for path in paths:
        write_atomic(path, lambda f: torch.save(state, f), "wb", f"{path}.tmp-{state['step']}")
        written(path)
    try:
        dirfd = os.open(folder, os.O_RDONLY)
        os.fsync(dirfd)
        os.close(dirfd)
    except OSError as e:
        raise OSError(e.errno, f"syncing {folder} failed: {e.strerror}") from None


def rng_state(device):
    """This process's RNG states in types the safe loader reads (tensors, lists, ints): no numpy objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next],
            "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None}


def set_rng_state(rng, device):
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]  # stored as a list (a tuple with an array before)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if torch.device(device).type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


TRAINING_STATE = ("optimizer", "scaler", "config", "tokenizer", "step", "best_val_loss", "elapsed_s", "loader",
                  "rng")


def load_for_resume(last, best, trust=False):
    """The checkpoint at `last` (ckpt_last.pt) that init_from=resume continues; a ValueError names the file, and says
    how to resume from `best` (ckpt_best.pt) where that is there."""
    hint = (f"; {best} is there: to resume from it, copy it over ckpt_last.pt (cp {best} {last}) and run again"
            if os.path.isfile(best) else "")
    if not os.path.isfile(last):
        raise ValueError(f"init_from=resume but {last} does not exist{hint}")
    try:
        return load_checkpoint(last, trust, need=TRAINING_STATE)
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None


# On resume, the model, the data stream and the tokenizer must be the checkpoint's; anything else may change.
COMPUTE_ONLY = ("impl", "chunk_T")  # GPTConfig fields that change how the same model is computed, not what it is
DATA = ("dataset", "mad_size", "mad_args", "data_order", "seed", "batch_size", "gradient_accumulation_steps",
        "eval_iters")


def resume_differences(ckpt, config, model_args, tokenizer, same_dataset):
    """(fixed, applied): 'key: checkpoint -> command' for the settings (config, model_args) that differ from the
    checkpoint's. fixed: the model, the data stream (and with it the val set), the optimizer and the tokenizer, which
    a resumed run cannot change (same_dataset(name) tells whether another `dataset` setting names this data). applied:
    the others (schedule, intervals, max_iters, wandb, device, ...), which take effect."""
    old, now = ckpt["config"], {**config, **model_args}
    old_model = asdict(model_config(ckpt["model_args"]))
    fixed = [f"{k}: {old_model[k]!r} -> {v!r}" for k, v in model_args.items()
             if k not in COMPUTE_ONLY and old_model.get(k) != v]
    same = lambda k: old[k] == now[k] or (k == "dataset" and same_dataset(old[k]))  # noqa: E731
    fixed += [f"{k}: {old[k]!r} -> {now[k]!r}" for k in DATA if k in old and not same(k)]
    if old.get("optimizer", "adamw") != config["optimizer"]:  # the optimizer's state is kept (files before it: AdamW)
        fixed.append(f"optimizer: {old.get('optimizer', 'adamw')!r} -> {config['optimizer']!r}")
    spec = lambda t: {k: v for k, v in t.items() if k != "source"}  # noqa: E731  (pystdlib's note of its Python)
    if spec(ckpt["tokenizer"]) != spec(tokenizer):
        fixed.append(f"tokenizer: {ckpt['tokenizer']['kind']} (vocab {ckpt['tokenizer']['vocab_size']}) -> the "
                     f"dataset's {tokenizer['kind']} (vocab {tokenizer['vocab_size']})")
    applied = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in config
               if k in old and old[k] != now[k] and k not in DATA and k != "init_from"
               and (k not in model_args or k in COMPUTE_ONLY)]
    return fixed, applied


def restore(ckpt, optimizer, scaler, rank, device):
    """Continue from ckpt: the optimizer's moments (its hyperparameters, weight decay and betas, stay this command's),
    the GradScaler, and this rank's RNG states (rank 0's for a rank the run did not have). Returns the step, the best
    val loss and the seconds trained so far."""
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
    return ckpt["step"], ckpt["best_val_loss"], ckpt["elapsed_s"]
