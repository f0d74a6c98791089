"""
Loading a train.py checkpoint without running code. A full unpickle (torch.load with weights_only=False) runs
whatever a file from someone else asks for; weights_only=True reads tensors, numbers, strings, lists and dicts
only. train.py stores everything in those types (the numpy and Python RNG states as lists). Checkpoints written
before that hold numpy objects: they load only with trust=True (train.py and sample.py: --trust_checkpoint=True).
Older files' model_args are read as today's GPTConfig takes them (upgrade); load_model builds the model a checkpoint
holds.
"""
import pickle
import re

import torch

from model import GPT, GPTConfig


def load_checkpoint(path, trust=False):
    """The checkpoint dict at path, on the CPU. Any problem is a ValueError naming the file."""
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
    state["model_args"] = upgrade(state["model_args"], state["model"])
    return state


def load_model(state):
    """The model saved in a checkpoint dict as load_checkpoint reads it (a stray torch.compile '_orig_mod.' prefix is
    stripped)."""
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
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
