"""
The paper's design study (Figure 5) as experiment grids for scripts/run_grid.py: a base recipe plus, per variant,
the settings that differ. Every matched variant gets its qk_rank and op ranks from config.budget.match_budget against
the plain softmax model (S) of the same recipe; residual variants keep the attention of the variant they
extend, so HC/mHC add their own parameters on top, as in their papers.

  python -m scripts.run_grid --grid=cpu                  # the small CPU grid, sequentially
  python -m scripts.run_grid --grid=fineweb --launcher="torchrun --standalone --nproc_per_node=8"

Variant labels follow the paper's grammar, <family>-<options>-<compression>-<mixing>[ + <residual>], with
empty parts and their dash left out. label(cfg) derives it from a config; the names in variants() are
written in it:
  family       S softmax, R ReLU attention / HyperMLP, G GLU attention / HyperGLU
  options      p RoPE, c KV conv, g QK and VO gates (g only for R and G)
  compression  q QK compression (qk_rank < n_embd), v VO compression (vo_rank < n_embd)
  mixing       1 op1, 2 op2, then o for the lag (offset) layout; a trailing ! marks mixing without QK
               compression, i.e. not budget matched (R-12!)
  residual     " + HC", " + SHC" (static HC) or " + mHC"; label() appends the stream count, e.g. " + mHC×4"

A grid run's name is a variant, then optionally training-setup tags (run_settings), e.g. "S-p Muon lr0.04":
  h<N>         N heads: softmax gets n_head=N, R and G are matched again with N heads (variants(n_head_hyper=N))
  Muon         optimizer="muon" with lr_schedule="wsd" (train.py): Muon on the blocks' matrices, a warmdown
  lr<X>        the matrices' peak rate: learning_rate=X (and min_lr=X/10) with AdamW, muon_lr=X with Muon
"""
import re
from dataclasses import fields, replace

from checkpoint import upgrade
from config.budget import match_budget, param_report
from model import GPTConfig


def variants(base, n_head_hyper=2):
    """{name: settings} for every variant of the paper's Figure 5 (and the residual ones), for the softmax model
    described by base (train.py settings). R and G variants use n_head_hyper heads. Matched variants get the
    width that match_budget solves for; unmatched ("!") ones keep full Q/K width (see budget())."""
    gpt = GPTConfig(**{f.name: base[f.name] for f in fields(GPTConfig) if f.name in base})
    D = gpt.n_embd

    def matched(fit="qk_rank", **kw):  # softmax keeps base's heads (16 on MAD), so its heads may get narrow
        cfg = match_budget(gpt, fit=fit, min_head_dim=8 if "attn" in kw else 2, **kw)
        return dict(kw, **{k: getattr(cfg, k) for k in ("qk_rank", "vo_rank", "op1_rank", "op2_rank")
                           if getattr(cfg, k) != getattr(gpt, k)})

    off = dict(use_kv_conv=False, use_qk_gate=False, use_vo_gate=False)
    conv = dict(off, use_kv_conv=True)
    on = dict(use_kv_conv=True, use_qk_gate=True, use_vo_gate=True)
    no_mix = dict(use_op1=False, use_op2=False)
    pos = {"": {}, "p": dict(pos="rope")}
    v = {}
    for p in ("", "p"):  # softmax: "S", "S-p", "S-c", "S-pc" (RoPE, conv), gates and compression
        v[f"S{'-' * bool(p)}{p}"] = dict(pos[p])
        v[f"S-{p}c"] = dict(pos[p], use_kv_conv=True)
    v["S-g-q"] = matched(use_qk_gate=True, use_vo_gate=True)
    v["S-c-q"] = matched("vo_rank", use_kv_conv=True, qk_rank=D // 4)  # the Q/K saved goes to V/O
    v["S-c-v"] = matched("qk_rank", use_kv_conv=True, vo_rank=D // 4)
    for fam, attn in (("R", "hypermlp"), ("G", "hyperglu")):
        hyper = dict(attn=attn, n_head=n_head_hyper)
        full = dict(hyper, qk_rank=D)  # no Q/K compression
        if fam == "R":                 # ReLU attention: the HyperMLP layer without mixing
            for p in ("", "p"):
                v[f"R{'-' * bool(p)}{p}"] = dict(full, **pos[p], **off, **no_mix)
                v[f"R-{p}c"] = dict(full, **pos[p], **conv, **no_mix)
            v["R-c-q"] = matched("vo_rank", **hyper, **conv, qk_rank=D // 4, **no_mix)
            v["R-c-v"] = matched("qk_rank", **hyper, **conv, vo_rank=D // 4, **no_mix)
        v[f"{fam}-cg-q"] = matched(**hyper, **on, **no_mix)
        v[f"{fam}-cg-q-12o"] = matched(**hyper, **on)                       # HyperMLP / HyperGLU
        v[f"{fam}-cg-q-1o"] = matched(**hyper, **on, use_op2=False)
        v[f"{fam}-pcg-q-12o"] = matched(**hyper, **on, pos="rope")
        v[f"{fam}-g-q-12o"] = matched(**hyper, **dict(on, use_kv_conv=False))
        v[f"{fam}-12o!"] = dict(full, **off)
        v[f"{fam}-c-12o!"] = dict(full, **conv)
        v[f"{fam}-1o!"] = dict(full, **off, use_op2=False)
        v[f"{fam}-12!"] = dict(full, **off, aligner_kind="identity")
        v[f"{fam}-{'2!' if fam == 'R' else '2o!'}"] = dict(full, **off, use_op1=False,
                                                         **({"aligner_kind": "identity"} if fam == "R" else {}))
    v["G-cg-q-12o nopos"] = dict(v["G-cg-q-12o"], pos="none")  # no wpe: the conv and the lag layout give order
    for name in ("S-pc", "G-cg-q-12o"):
        v[f"{name} + HC"] = dict(v[name], residual="hc")
        v[f"{name} + mHC"] = dict(v[name], residual="mhc")
    return v


def budget(base, settings):
    """A variant's attention parameters relative to S's for the same base, e.g. +0.127 for R-12! on the CPU grid."""
    gpt = GPTConfig(**{f.name: base[f.name] for f in fields(GPTConfig) if f.name in base})
    return param_report(replace(gpt, **settings))["attention"] / param_report(gpt)["attention"] - 1


def label(cfg):
    """The variant label (the grammar above) of a GPTConfig as a dict, e.g. a run's model_args. Only reads
    attn, n_embd, pos, use_kv_conv, use_qk_gate, use_vo_gate, qk_rank, vo_rank, use_op1, use_op2,
    aligner_kind, residual, hc_dynamic and hc_streams; a missing one takes GPTConfig's default (None gates
    and conv are on for R and G, off for S; None qk_rank is n_embd // 4 for R and G, n_embd for S; None
    vo_rank is n_embd)."""
    cfg = upgrade(cfg)
    attn, D = cfg.get("attn", "softmax"), cfg["n_embd"]
    fam = {"softmax": "S", "hypermlp": "R", "hyperglu": "G"}[attn]
    auto = lambda k: attn != "softmax" if cfg.get(k) is None else cfg[k]
    opts = ("p" if cfg.get("pos") == "rope" else "") + ("c" if auto("use_kv_conv") else "")
    opts += "g" if auto("use_qk_gate") and auto("use_vo_gate") else ""
    qk = cfg.get("qk_rank") or (D if attn == "softmax" else D // 4)
    vo = cfg.get("vo_rank") or D
    comp = ("q" if qk < D else "") + ("v" if vo < D else "")
    mix = ""
    if attn != "softmax":
        mix = ("1" if cfg.get("use_op1", True) else "") + ("2" if cfg.get("use_op2", True) else "")
        if mix:
            mix += "o" if cfg.get("aligner_kind", "offset") == "offset" else ""
            if "q" not in comp:
                mix += "!"
    name = "-".join(p for p in (fam, opts, comp, mix) if p) + (" nopos" if cfg.get("pos") == "none" else "")
    res = cfg.get("residual", "plain")
    if res == "hc":
        name += f" + {'' if cfg.get('hc_dynamic', True) else 'S'}HC×{cfg.get('hc_streams', 4)}"
    elif res == "mhc":
        name += f" + mHC×{cfg.get('hc_streams', 4)}"
    return name


TAG = re.compile(r"^(h\d+|Muon|lr\d[\d.e-]*)$")


_tables = {}


def _variants(base, n_head_hyper=2):
    """variants(base, n_head_hyper), computed once per base (a grid names dozens of runs)."""
    key = (tuple(sorted(base.items())), n_head_hyper)
    if key not in _tables:
        _tables[key] = variants(base, n_head_hyper)
    return _tables[key]


def split_tags(name):
    """(variant, [tags]) of a grid run name: the trailing words that are tags, e.g. "S-p Muon lr0.04"."""
    words = name.split(" ")
    n = len(words)
    while n > 1 and TAG.match(words[n - 1]):
        n -= 1
    return " ".join(words[:n]), words[n:]


def run_settings(base, name):
    """The settings (over base) of a grid run name: its variant's, then its tags'. A tagged run also gets
    wandb_run_name=name, which train.py records in config.json and plot_loss reads its tags from."""
    variant, tags = split_tags(name)
    heads = [int(t[1:]) for t in tags if t.startswith("h")]
    if heads:
        settings = dict(_variants(dict(base, n_head=heads[0]), heads[0])[variant], n_head=heads[0])
    else:
        settings = dict(_variants(base)[variant])
    muon = "Muon" in tags
    if muon:
        settings.update(optimizer="muon", lr_schedule="wsd")
    for t in tags:
        if t.startswith("lr"):
            lr = float(t[2:])
            settings.update(muon_lr=lr) if muon else settings.update(learning_rate=lr, min_lr=lr / 10)
    return dict(settings, wandb_run_name=name) if tags else settings


def tags_of(config):
    """The tags of a run's config.json (its wandb_run_name's), each checked against the settings it records;
    [] for an untagged run. Raises ValueError where a tag and the settings disagree."""
    _, tags = split_tags(config.get("wandb_run_name") or "")
    for t in tags:
        ok = {"h": lambda: config["model_args"]["n_head"] == int(t[1:]),
              "M": lambda: config.get("optimizer") == "muon" and config.get("lr_schedule") == "wsd",
              "l": lambda: float(t[2:]) == config.get("muon_lr" if "Muon" in tags else "learning_rate")}[t[0]]()
        if not ok:
            raise ValueError(f"tag {t!r} of run name {config['wandb_run_name']!r} does not match its settings")
    return tags


# ---------------------------------------------------------------------------------------------------------
# cpu: tiny Shakespeare characters, 4 x 256, T=128, 2M tokens; each run takes 4-10 minutes on 2 cores.
# T=128 rather than 256 halves HyperGLU's T^2 work, and width 256 leaves the mixers rank 16 at the matched
# budget (at width 128 they would drop to rank 1-4, see README).
CPU_BASE = dict(dataset="shakespeare_char", device="cpu", n_layer=4, n_head=4, n_embd=256, block_size=128,
                bias=False, dropout=0.0, batch_size=16, gradient_accumulation_steps=1, max_iters=1000,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=50, beta2=0.99, weight_decay=0.1,
                eval_interval=50, eval_iters=20, log_interval=10, seed=1337, vocab_size=65)
CPU_RUNS = [("S-pc", 1337), ("S-pc", 1338), ("S", 1337), ("R-cg-q-12o", 1337), ("G-cg-q-12o", 1337),
            ("G-cg-q-12o", 1338), ("R-12!", 1337), ("G-cg-q-12o + mHC", 1337), ("S-pc + mHC", 1337),
            ("S-pc + HC", 1337), ("G-cg-q", 1337),
            ("S-pc", 1339), ("G-cg-q-12o", 1339), ("R-cg-q-12o", 1338), ("R-cg-q-12o", 1339),
            ("R-pc", 1337), ("R-pc", 1338), ("R-pc", 1339), ("R", 1337), ("R-p", 1337), ("R-c", 1337),
            ("R-cg-q", 1337), ("R-c-q", 1337), ("R-12o!", 1337), ("G-12o!", 1337), ("R-cg-q-1o", 1337),
            ("G-cg-q-1o", 1337), ("G-pcg-q-12o", 1337), ("G-g-q-12o", 1337), ("G-cg-q-12o nopos", 1337),
            ("G-pcg-q-12o", 1338), ("G-pcg-q-12o", 1339), ("G-g-q-12o", 1338), ("G-g-q-12o", 1339),
            ("G-cg-q-12o nopos", 1338), ("G-cg-q-12o nopos", 1339), ("G-12!", 1337), ("S-p", 1337), ("S-c", 1337),
            ("S-p", 1338), ("S-p", 1339)]
# issue 25: against the strongest softmax. (1) a learning-rate sweep per optimizer on S-p and G-cg-q-12o at seed
# 1337 (AdamW's lr 1e-3 is the runs above; Muon's lr0.02 is train.py's default muon_lr); (2) seeds 1340 and 1341
# of the AdamW recipe for S-p, S-pc, G-cg-q-12o, G-g-q-12o; (3) head-count controls: S-p with G's 2 heads (head
# dim 128) and G-cg-q-12o with S's 4 heads (matched again: qk_rank 64, op ranks 4), five seeds each
CPU_RUNS += [(name, 1337) for name in ("S-p lr5e-4", "G-cg-q-12o lr5e-4", "S-p lr2e-3", "G-cg-q-12o lr2e-3",
                                       "S-p Muon lr0.01", "G-cg-q-12o Muon lr0.01", "S-p Muon",
                                       "G-cg-q-12o Muon", "S-p Muon lr0.04", "G-cg-q-12o Muon lr0.04",
                                       "S-p lr4e-3", "G-cg-q-12o lr4e-3")]  # lr 2e-3 beat 1e-3: past the edge
CPU_RUNS += [(name, seed) for seed in (1340, 1341) for name in ("S-p", "S-pc", "G-cg-q-12o", "G-g-q-12o")]
CPU_RUNS += [(name, seed) for seed in range(1337, 1342) for name in ("S-p h2", "G-cg-q-12o h4")]

# fineweb: GPT-2 124M scale on 8 GPUs (config/fineweb.py's recipe, shortened to 5,000 steps = 2.6B tokens).
FINEWEB_BASE = dict(dataset="fineweb", data_order="sequential", n_layer=12, n_head=12, n_embd=768,
                    block_size=1024, bias=False, dropout=0.0, batch_size=16, gradient_accumulation_steps=32,
                    max_iters=5000, lr_decay_iters=5000, learning_rate=6e-4, min_lr=6e-5, warmup_iters=700,
                    beta2=0.95, weight_decay=0.1, eval_interval=250, eval_iters=40, log_interval=10,
                    seed=1337, vocab_size=50304)
FINEWEB_RUNS = [(name, 1337) for name in ("S", "S-p", "S-c", "S-pc", "R", "R-cg-q", "R-cg-q-12o", "G-cg-q",
                                          "G-cg-q-12o", "R-12!", "S-pc + HC", "S-pc + mHC", "G-cg-q-12o + HC",
                                          "G-cg-q-12o + mHC")]

GRIDS = {"cpu": (CPU_BASE, CPU_RUNS), "fineweb": (FINEWEB_BASE, FINEWEB_RUNS)}

# ---------------------------------------------------------------------------------------------------------
# mad: the MAD memory tasks (data/mad.py) as in mad-lab: 2 blocks of (mixer + SwiGLU MLP) at width 128, softmax
# with 16 heads (mad-lab's mh-attention), AdamW with cosine decay to 1e-6, scored by the best final test
# accuracy over a small sweep. Per task, block_size is the task's length and the variants are re-matched to
# S at that block_size (HyperGLU's lag parameters grow with it). scripts/run_mad.py runs it.
MAD_BASE = dict(n_layer=2, n_head=16, n_embd=128, mlp="swiglu", bias=False, dropout=0.0,
                gradient_accumulation_steps=1, min_lr=1e-6, warmup_iters=20, beta2=0.99, grad_clip=1.0,
                seed=1337, log_interval=25)
# mad-lab's sweep is lr {1e-4, 5e-4, 1e-3} x weight decay {0, 0.1} at batch 128 for 200 epochs; the lite suite
# trains 8 epochs (64 for memorization), where the higher rates are the useful ones.
MAD_SWEEP = {"original": dict(batch_size=128, lrs=(1e-4, 5e-4, 1e-3), wds=(0.0, 0.1)),
             "lite": dict(batch_size=64, lrs=(1e-3, 3e-3), wds=(0.0,))}
MAD_VARIANTS = ("S", "S-p", "S-pc", "R-pc", "R-cg-q-12o", "G-cg-q-12o", "R-12!", "R-12o!")
