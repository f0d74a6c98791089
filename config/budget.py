"""
Parameter accounting and budget matching, as the paper matches its variants: param_report counts a config's
parameters per component, match_budget solves one width so that a variant's attention parameters match a base's.
Config files call it (config/hyperglu.py, config/hypermlp.py, config/grids.py).
"""
from dataclasses import replace

import torch

from model import GPT


def param_report(config):
    """Parameters per component of a GPTConfig, counted on a model built on the meta device (exact, no memory).
    Keys: embedding (wte, tied to lm_head), position (wpe), attention, mlp, norm, residual (HC/mHC),
    non_embedding (all but wte and wpe) and total."""
    with torch.device("meta"):
        model = GPT(config)
    rep = dict(embedding=0, position=0, attention=0, mlp=0, norm=0, residual=0)
    for n, p in model.named_parameters():
        key = ("embedding" if "wte" in n else "position" if "wpe" in n else "attention" if ".attn." in n
               else "mlp" if ".mlp." in n else "residual" if ".res_" in n else "norm")
        rep[key] += p.numel()
    rep["non_embedding"] = rep["attention"] + rep["mlp"] + rep["norm"] + rep["residual"]
    rep["total"] = rep["non_embedding"] + rep["embedding"] + rep["position"]
    return rep


def match_budget(base, fit="qk_rank", tol=0.06, min_head_dim=8, **changes):
    """replace(base, **changes) with one width, `fit` ("qk_rank" or "vo_rank"), solved so that its attention
    parameters are within `tol` of base's, as the paper matches budgets. "q" variants fit qk_rank: what the
    gates, conv and mixers add is paid for by Q/K compression (if qk_rank alone cannot, the op1/op2 ranks are
    halved together). Compression with nothing to pay for (S-c-q, S-c-v) fixes that width and fits the other.
    Widths keep min_head_dim per head. Example: match_budget(GPTConfig(n_embd=256), attn="hyperglu", n_head=2)."""
    target = param_report(base)["attention"]
    cfg = replace(base, **changes)
    heads = 2 * cfg.n_head if fit == "qk_rank" and cfg.attn == "hyperglu" else cfg.n_head  # GLU: gate + scale heads
    unit = 2 * heads if fit == "qk_rank" and cfg.pos == "rope" else heads  # heads of even dim with RoPE
    lo = -(-min_head_dim * heads // unit)        # smallest width allowed, in units
    mixing = cfg.attn != "softmax" and (cfg.use_op1 or cfg.use_op2)
    r1, r2 = cfg.op1_rank, cfg.op2_rank
    while True:
        sized = lambda k: replace(cfg, **{fit: unit * k}, op1_rank=r1, op2_rank=r2)
        count = lambda k: param_report(sized(k))["attention"]
        k = max(lo, lo + round((target - count(lo)) / (count(lo + 1) - count(lo))))  # linear in the width
        err = abs(count(k) - target) / target
        if err <= tol or not mixing or (r1 == 1 and r2 == 1):
            break
        r1, r2 = max(1, r1 // 2), max(1, r2 // 2)
    if err > tol:
        raise ValueError(f"match_budget: no {fit} brings {cfg.attn} within {tol:.0%} of {target:,} attention "
                         f"parameters (closest is {err:.1%} off); lower block_size, min_head_dim or the heads")
    return sized(k)
