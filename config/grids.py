"""
The paper's design study (Figure 5) as experiment grids for scripts/run_grid.py: a base recipe plus, per variant,
the settings that differ. Every matched variant gets its qk_rank and op ranks from model.match_budget against
the plain softmax model (S) of the same recipe; residual variants keep the attention of the variant they
extend, so HC/mHC add their own parameters on top, as in their papers.

  python scripts/run_grid.py --grid=cpu                  # the small CPU grid, sequentially
  python scripts/run_grid.py --grid=fineweb --launcher="torchrun --standalone --nproc_per_node=8"

Variant labels follow the paper's grammar, <family>-<options>-<compression>-<mixing>[ + <residual>], with
empty parts and their dash left out. label(cfg) derives it from a config; the names in variants() are
written in it:
  family       S softmax, R ReLU attention / HyperMLP, G GLU attention / HyperGLU
  options      p RoPE, c KV conv, g QK and VO gates (g only for R and G)
  compression  q QK compression (qk_rank < n_embd), v VO compression (vo_rank < n_embd)
  mixing       1 op1, 2 op2, then o for the lag (offset) layout; a trailing ! marks mixing without QK
               compression, i.e. not budget matched (R-12!)
  residual     " + HC", " + SHC" (static HC) or " + mHC"; label() appends the stream count, e.g. " + mHC×4"
"""
from dataclasses import fields

from model import GPTConfig, match_budget


def variants(base, n_head_hyper=2):
    """{name: settings} for the study, matched to the softmax model described by base (train.py settings)."""
    gpt = GPTConfig(**{f.name: base[f.name] for f in fields(GPTConfig) if f.name in base})
    D = gpt.n_embd

    def matched(attn, **kw):
        cfg = match_budget(gpt, attn=attn, n_head=n_head_hyper, **kw)
        return dict(attn=attn, n_head=n_head_hyper, qk_rank=cfg.qk_rank, op1_rank=cfg.op1_rank,
                    op2_rank=cfg.op2_rank, **kw)

    no_mix = dict(use_op1=False, use_op2=False)
    bare = dict(use_kv_conv=False, use_qk_gate=False, use_vo_gate=False)
    v = {
        "S": dict(),
        "S-p": dict(pos="rope"),
        "S-c": dict(use_kv_conv=True),
        "S-pc": dict(pos="rope", use_kv_conv=True),
        "R": dict(attn="hypermlp", n_head=n_head_hyper, qk_rank=D, **bare, **no_mix),   # ReLU attention
        "R-cg-q": matched("hypermlp", **no_mix),
        "R-cg-q-12o": matched("hypermlp"),                                              # HyperMLP
        "G-cg-q": matched("hyperglu", **no_mix),
        "G-cg-q-12o": matched("hyperglu"),                                              # HyperGLU
        "R-12!": dict(attn="hypermlp", n_head=n_head_hyper, qk_rank=D, aligner_kind="identity", **bare),
    }
    for name in ("S-pc", "G-cg-q-12o"):
        v[f"{name} + HC"] = dict(v[name], residual="hc")
        v[f"{name} + mHC"] = dict(v[name], residual="mhc")
    return v


def label(cfg):
    """The variant label (the grammar above) of a GPTConfig as a dict, e.g. a run's model_args. Only reads
    attn, n_embd, pos, use_kv_conv, use_qk_gate, use_vo_gate, qk_rank, vo_rank, use_op1, use_op2,
    aligner_kind, residual, hc_dynamic and hc_streams; a missing one takes GPTConfig's default (None
    qk_rank is n_embd // 4, None vo_rank is n_embd, None use_kv_conv is on for R and G)."""
    attn, D = cfg.get("attn", "softmax"), cfg["n_embd"]
    fam = {"softmax": "S", "hypermlp": "R", "hyperglu": "G"}[attn]
    conv = cfg.get("use_kv_conv")
    conv = attn != "softmax" if conv is None else conv
    opts = ("p" if cfg.get("pos") == "rope" else "") + ("c" if conv else "")
    comp = mix = ""
    if attn != "softmax":
        opts += "g" if cfg.get("use_qk_gate", True) and cfg.get("use_vo_gate", True) else ""
        qk = cfg.get("qk_rank") or D // 4
        vo = cfg.get("vo_rank") or D
        comp = ("q" if qk < D else "") + ("v" if vo < D else "")
        mix = ("1" if cfg.get("use_op1", True) else "") + ("2" if cfg.get("use_op2", True) else "")
        if mix:
            mix += "o" if cfg.get("aligner_kind", "offset") == "offset" else ""
            if "q" not in comp:
                mix += "!"
    name = "-".join(p for p in (fam, opts, comp, mix) if p)
    res = cfg.get("residual", "plain")
    if res == "hc":
        name += f" + {'' if cfg.get('hc_dynamic', True) else 'S'}HC×{cfg.get('hc_streams', 4)}"
    elif res == "mhc":
        name += f" + mHC×{cfg.get('hc_streams', 4)}"
    return name


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
            ("S-pc + HC", 1337), ("G-cg-q", 1337)]

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
MAD_VARIANTS = ("S", "S-pc", "R-cg-q-12o", "G-cg-q-12o", "R-12!")
