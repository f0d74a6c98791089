"""plots/ and scripts/: labels from configs, the loss figure and table from synthetic run folders, connection
plots, the grid launcher."""
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import plots.plot_loss
from conftest import REPO
from config.grids import CPU_BASE, FINEWEB_BASE, MAD_BASE, budget, label, variants
from config.budget import param_report
from model import GPTConfig
from plots.plot_loss import family, main as plot_main

FIGURE_5 = {  # the paper's Figure 5, panel by panel (../shared/research/hypermlp.md §5.1)
    "softmax": ["S", "S-p", "S-c", "S-pc", "S-g-q", "S-c-q", "S-c-v"],
    "ReLU attention": ["R", "R-p", "R-c", "R-pc", "R-cg-q", "R-c-q", "R-c-v"],
    "HyperMLP": ["R-cg-q-12o", "R-cg-q-1o", "R-pcg-q-12o", "R-g-q-12o", "R-12o!", "R-c-12o!", "R-1o!", "R-2!", "R-12!"],
    "HyperGLU": ["G-cg-q-12o", "G-cg-q-1o", "G-g-q-12o", "G-pcg-q-12o", "G-c-12o!", "G-12o!", "G-1o!", "G-cg-q",
                 "G-2o!", "G-12!"]}
BASES = [CPU_BASE, FINEWEB_BASE, dict(MAD_BASE, block_size=64, vocab_size=16)]


def resolved(base, settings):
    """The GPTConfig of a variant, and its fields as a dict with the auto fields resolved."""
    merged = dict(base, **settings)
    cfg = GPTConfig(**{k: v for k, v in merged.items() if k in GPTConfig.__dataclass_fields__})
    args = dataclasses.asdict(cfg)
    for k in ("use_kv_conv", "use_qk_gate", "use_vo_gate"):
        args[k] = cfg.auto(k)
    return cfg, args


@pytest.mark.parametrize("base", BASES, ids=["cpu", "fineweb", "mad"])
def test_the_grammar_of_every_figure_5_variant(base):
    """Every Figure 5 variant is defined, in its panel, and its name means what the grammar says: q is
    qk_rank < D, v is vo_rank < D, o is the lag layout, ! is mixing without q and so not matched; a matched
    variant is within match_budget's tolerance of S's attention parameters (not only of the total)."""
    table = variants(base)
    D = base["n_embd"]
    s_attn = param_report(resolved(base, table["S"])[0])["attention"]
    for panel, names in FIGURE_5.items():
        for name in names:
            cfg, args = resolved(base, table[name])
            assert label(args) == name and family(args) == panel, name
            fam, *parts = name.split("-")
            comp = next((p for p in parts if set(p) <= set("qv")), "")
            mix = parts[-1] if parts and parts[-1][0] in "12" else ""
            assert ("q" in comp) == ((cfg.qk_rank or D) < D) and ("v" in comp) == ((cfg.vo_rank or D) < D), name
            assert ("o" in mix) == (cfg.attn != "softmax" and cfg.aligner_kind == "offset" and bool(mix)), name
            assert ("1" in mix, "2" in mix) == ((cfg.use_op1, cfg.use_op2) if fam != "S" else (False, False)), name
            assert ("g" in (parts[0] if parts else "")) == (args["use_qk_gate"] and args["use_vo_gate"]), name
            off = param_report(cfg)["attention"] / s_attn - 1
            assert name.endswith("!") == (bool(mix) and "q" not in comp), name
            if not name.endswith("!"):
                assert abs(off) <= 0.06, (name, off)  # match_budget's tolerance
            assert budget(base, table[name]) == pytest.approx(off), name


@pytest.mark.parametrize("base", BASES, ids=["cpu", "fineweb", "mad"])
def test_every_variant_name_is_the_label_of_its_settings(base):
    """The names in variants() and label() are one grammar: label() of a variant's settings merged over the
    base is its name (label() adds the stream count to a residual, " + mHC" -> " + mHC×4")."""
    assert plots.plot_loss.label is label  # plot_loss uses the one definition
    for name, settings in variants(base).items():
        merged = dict(base, **settings)
        got = label(merged)
        if merged.get("residual", "plain") != "plain":
            streams = f"×{merged.get('hc_streams', GPTConfig.hc_streams)}"
            assert got.endswith(streams), (name, got)
            got = got[:-len(streams)]
        assert got == name, (name, got)


def test_run_name_tags():
    """A grid run name is a variant and tags: h<N> heads (R and G matched again), Muon (+ wsd), lr<X>; tags_of
    reads them back from a run's config and checks each against the settings it records."""
    from config.grids import run_settings, split_tags, tags_of
    assert split_tags("G-cg-q-12o + mHC") == ("G-cg-q-12o + mHC", [])
    assert split_tags("G-cg-q-12o nopos h4 Muon lr0.04") == ("G-cg-q-12o nopos", ["h4", "Muon", "lr0.04"])
    assert run_settings(CPU_BASE, "S-pc") == variants(CPU_BASE)["S-pc"]  # untagged: the variant's own settings
    assert run_settings(CPU_BASE, "S-p lr2e-3") == dict(pos="rope", learning_rate=2e-3, min_lr=2e-4,
                                                        wandb_run_name="S-p lr2e-3")
    assert run_settings(CPU_BASE, "S-p Muon lr0.04") == dict(pos="rope", optimizer="muon", lr_schedule="wsd",
                                                             muon_lr=0.04, wandb_run_name="S-p Muon lr0.04")
    assert run_settings(CPU_BASE, "S-p h2")["n_head"] == 2
    g4 = run_settings(CPU_BASE, "G-cg-q-12o h4")
    assert (g4["n_head"], g4["qk_rank"]) == (4, 64) and abs(budget(CPU_BASE, {k: v for k, v in g4.items()
                                                                             if k != "wandb_run_name"})) <= 0.06
    cfg = dict(CPU_BASE, **run_settings(CPU_BASE, "G-cg-q-12o h4 Muon"))
    cfg["model_args"] = dict(n_head=4)
    assert tags_of(cfg) == ["h4", "Muon"] and tags_of(dict(CPU_BASE, model_args={})) == []
    with pytest.raises(ValueError, match="tag 'lr0.04'"):
        tags_of(dict(cfg, wandb_run_name="G-cg-q-12o h4 Muon lr0.04"))


def test_label_details():
    base = dict(attn="hyperglu", n_embd=64, qk_rank=None, vo_rank=None)
    assert label(base) == "G-cg-q-12o"  # the defaults are the paper's HyperGLU
    assert label(dict(base, use_op2=False)) == "G-cg-q-1o"
    assert label(dict(base, vo_rank=32, pos="rope")) == "G-pcg-qv-12o"
    assert label(dict(base, qk_rank=64, use_kv_conv=False, use_qk_gate=False)) == "G-12o!"
    assert label(dict(base, residual="hc", hc_dynamic=False, hc_streams=2)) == "G-cg-q-12o + SHC×2"
    assert label(dict(base, pos="none")) == "G-cg-q-12o nopos"
    soft = dict(attn="softmax", n_embd=64)
    assert label(soft) == "S" and label(dict(soft, use_qk_gate=True, use_vo_gate=True, qk_rank=16)) == "S-g-q"
    assert label(dict(soft, use_kv_conv=True, vo_rank=16)) == "S-c-v"
    assert family(dict(attn="hypermlp", use_op1=False, use_op2=False)) == "ReLU attention"
    assert family(dict(attn="hypermlp")) == "HyperMLP"


def make_run(root, name, attn, rows, header=None, resid="plain", done=True, seed=1, **model):
    d = root / name
    d.mkdir()
    model_args = {k: getattr(GPTConfig(), k) for k in GPTConfig.__dataclass_fields__}
    model_args.update(attn=attn, residual=resid, n_layer=2, n_embd=64, n_head=2, vocab_size=65, block_size=64, **model)
    json.dump({"model_args": model_args, "seed": seed, "tokens_per_step": 100}, open(d / "config.json", "w"))
    header = header or ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s",
                        "mfu", "elapsed_s"]
    with open(d / "metrics.csv", "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else str(r[c]) for c in header) + "\n")
    if done:
        (d / "DONE").write_text("{}")
    return str(d)


def test_figure_and_table_from_synthetic_runs(tmp_path, capsys):
    a = make_run(tmp_path, "a", "softmax", [
        dict(step=0, tokens=0, val_loss=4.0, elapsed_s=0),
        dict(step=10, tokens=1000, train_loss=3.0, tok_per_s=100, elapsed_s=60),
        dict(step=20, tokens=2000, train_loss=2.6, val_loss=2.9, tok_per_s=300, elapsed_s=120),
        dict(step=30, tokens=3000, train_loss=2.5, val_loss=2.5, tok_per_s=200, elapsed_s=180),
        # the run was resumed from step 20: these later entries win
        dict(step=30, tokens=3000, train_loss=2.4, val_loss=2.45, tok_per_s=200, elapsed_s=190),
        dict(step=40, tokens=4000, train_loss=2.3, val_loss=2.6, tok_per_s=200, elapsed_s=240)])
    b = make_run(tmp_path, "b", "hyperglu", [dict(step=0, tokens=0, val_loss=4.1), dict(step=10, tokens=1000, val_loss=2.0)],
                 header=["step", "tokens", "val_loss"])  # a shorter run with missing columns
    c = make_run(tmp_path, "c", "hypermlp", [dict(step=5, tokens=500, train_loss=3.3)], done=False)  # no val yet
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "fig")
    summ = plot_main([a, b, c, str(empty), "--layout=families", "--threshold=2.5", "--train", "--ema=0.5", "--logy",
                      "--zoom=0.5", "--ref=2.2=target", f"--out={out}", "--x=tokens"])
    msg = capsys.readouterr().out
    assert "skip" in msg and "no metrics.csv" in msg and "no val point yet" in msg
    for ext in ("png", "pdf", "md", "csv"):
        assert os.path.getsize(f"{out}.{ext}") > 100
    rows = {r["run"]: r for r in csv.DictReader(open(f"{out}.csv"))}
    assert float(rows["a"]["final_val"]) == 2.6 and float(rows["a"]["best_val"]) == 2.45
    assert rows["a"]["steps_to_threshold"] == "30" and rows["a"]["tokens_to_threshold"] == "3000"
    assert float(rows["a"]["tok_per_s"]) == 200 and abs(float(rows["a"]["wall_min"]) - 4.0) < 1e-9
    assert rows["b"]["steps_to_threshold"] == "10" and rows["b"]["tok_per_s"] == "" and rows["b"]["wall_min"] == ""
    assert rows["c"]["final_val"] == "" and rows["c"]["done"] == "False"
    cfg = GPTConfig(**json.load(open(os.path.join(a, "config.json")))["model_args"])
    assert int(rows["a"]["params"]) == param_report(cfg)["total"]
    md = open(f"{out}.md").read()
    assert "| S | 1 | 2.6000 | 2.4500 | 30 | 3,000 |" in md and "steps to val ≤ 2.5" in md
    assert [s["label"] for s in summ] == ["S", "R-cg-q-12o", "G-cg-q-12o"]  # family order, labels from config
    t = plot_main([a, "--x=time", f"--out={out}-t"])  # minutes on the x axis
    assert t[0]["steps"] == 40


def test_seed_statistics_and_headline_pairs(tmp_path):
    """Per variant: mean ± sample std of the final val loss over its finished seeds; per headline pair: the
    difference of means over the common seeds, and whether it exceeds twice its standard error."""
    spc = dict(pos="rope", use_kv_conv=True)
    rpc = dict(spc, qk_rank=64, use_qk_gate=False, use_vo_gate=False, use_op1=False, use_op2=False)
    runs = [("S-pc", "softmax", spc, {1: 1.70, 2: 1.72, 3: 1.74}), ("G", "hyperglu", {}, {1: 1.60, 2: 1.61, 3: 1.62}),
            ("R", "hypermlp", {}, {1: 1.71}), ("R-pc", "hypermlp", rpc, {1: 1.719, 2: 1.721})]
    paths = [make_run(tmp_path, f"{n}-{seed}", attn, [dict(step=0, val_loss=4.0), dict(step=10, val_loss=v)],
                      header=["step", "val_loss"], seed=seed, **model)
             for n, attn, model, finals in runs for seed, v in finals.items()]
    paths.append(make_run(tmp_path, "G-4", "hyperglu", [dict(step=5, val_loss=1.0)], header=["step", "val_loss"],
                          seed=4, done=False))  # unfinished: drawn, but not in the statistics
    out = str(tmp_path / "fig")
    plot_main(paths + ["--layout=families", f"--out={out}"])
    md = open(f"{out}.md").read()
    assert "| S-pc | 3 | 1 2 3 | 1.7200 ± 0.0200 |" in md and "| G-cg-q-12o | 3 | 1 2 3 | 1.6100 ± 0.0100 |" in md
    assert "| R-cg-q-12o | 1 | 1 | 1.7100 | 1.7100 |" in md  # one seed: no std
    # paired: d = -0.10, -0.11, -0.12, sd 0.01, 2 SE = 2 x 0.01 / sqrt(3); p from t = -19.05 at 2 df
    assert "| G-cg-q-12o | S-pc | 1 2 3 | -0.1100 | 0.0115 | yes | 0.003 | 3/3 | 0.004 |" in md
    assert "| R-cg-q-12o | S-pc | 1 | +0.0100 | n/a | n/a (one seed) | n/a | 0/1 | n/a |" in md
    assert "| R-pc | S-pc | 1 2 | +0.0100 | 0.0180 | no | 0.467 | 0/2 | 0.499 |" in md  # over seeds 1 and 2 only
    rows = {r["variant"]: r for r in csv.DictReader(open(f"{out}_variants.csv"))}
    assert rows["S-pc"]["n"] == "3" and abs(float(rows["S-pc"]["final_val_std"]) - 0.02) < 1e-12


def test_paired_statistics_on_a_hand_made_example():
    """a = 1.0, 1.2, 1.1 and b = 1.1, 1.25, 1.3 over three seeds: d = -0.1, -0.05, -0.2, mean -0.11667, sd
    0.076376, SE 0.044096, t = -2.6458 at 2 df, where the two-sided p is 1 - |t| / sqrt(t² + 2) = 0.11808.
    Welch: SE sqrt(0.01/3 + 0.010833/3) = 0.083333, t = -1.4 at 3.9936 df (Welch-Satterthwaite); its p is checked
    against the t density integrated numerically."""
    from plots.plot_loss import paired, t_p
    diff, se, p, welch = paired([1.0, 1.2, 1.1], [1.1, 1.25, 1.3])
    assert diff == pytest.approx(-0.116667, abs=1e-6) and se == pytest.approx(0.0440959, abs=1e-7)
    t = diff / se
    assert p == pytest.approx(1 - abs(t) / (t * t + 2) ** 0.5, abs=1e-12) and p == pytest.approx(0.118083, abs=1e-6)
    df = (0.01 / 3 + 0.0108333333 / 3) ** 2 / ((0.01 / 3) ** 2 / 2 + (0.0108333333 / 3) ** 2 / 2)
    dens = lambda x: (1 + x * x / df) ** (-(df + 1) / 2)  # unnormalized t density; p = 1 - 2 F(1.4) / F(inf)
    simpson = lambda f, lo, hi, n=20000: (hi - lo) / (3 * n) * sum(
        f(lo + i * (hi - lo) / n) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1))
    total = simpson(lambda u: dens(math.tan(u)) / math.cos(u) ** 2, 0, math.pi / 2 - 1e-9)  # x = tan u
    assert welch == pytest.approx(1 - simpson(dens, 0, 1.4) / total, abs=1e-6)
    assert t_p(2.776445, 4) == pytest.approx(0.05, abs=1e-6) and t_p(12.7062, 1) == pytest.approx(0.05, abs=1e-5)
    assert paired([1.0], [1.1])[1:] == (None, None, None)  # one seed: no SE, no p


def test_no_runs_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "plots/plot_loss.py", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "none of the given folders holds a run" in r.stderr and "Traceback" not in r.stderr


def test_connection_plot_from_a_checkpoint(tmp_path):
    from data.shards import write_shard
    import numpy as np
    write_shard(str(tmp_path / "val.bin"), np.arange(500) % 65, header=False)
    from model import GPT
    for res in ("hc", "mhc"):
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, residual=res)
        ck = tmp_path / f"{res}.pt"
        torch.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg), "config": {"dataset": str(tmp_path)},
                    "step": 0}, ck)
        r = subprocess.run([sys.executable, "plots/plot_connections.py", str(ck), f"--out={tmp_path / res}"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "final composite Amax forward 1.0000, backward 1.0000" in r.stdout  # identity-like at init
        assert os.path.getsize(tmp_path / f"{res}.png") > 1000


def test_grid_runner_dry_run(tmp_path):
    done = tmp_path / "cpu" / "S-pc-s1337"
    done.mkdir(parents=True)
    (done / "DONE").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "scripts.run_grid", "--grid=cpu", "--only=S-pc,G-cg-q-12o + mHC",
                        f"--out={tmp_path}", "--dry_run", "--max_iters=7"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("skip S-pc") and len(lines) == 6  # S-pc s1337 is DONE; s1338-s1341, G + mHC left
    cmds = lines[1:]
    assert all(os.path.join(REPO, "train.py") in ln and ln.endswith("--max_iters=7") for ln in cmds)
    assert f"--out_dir={tmp_path / 'cpu' / 'S-pc-s1338'}" in cmds[0]
    assert "--residual=mhc" in cmds[1] and "G-cg-q-12o_mHC-s1337" in cmds[1]
    assert f"--out_dir={tmp_path / 'cpu' / 'S-pc-s1339'}" in cmds[2] and "S-pc-s1341" in cmds[4]
    r = subprocess.run([sys.executable, "-m", "scripts.run_grid", "--grid=cpu", "--only=S-p Muon lr0.04",
                        f"--out={tmp_path}", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    cmd = r.stdout.strip()  # a tagged run: its own folder, its tags' settings, its name recorded
    assert r.returncode == 0 and len(cmd.splitlines()) == 1, r.stderr
    assert f"--out_dir={tmp_path / 'cpu' / 'S-p_Muon_lr0.04-s1337'}" in cmd and "--pos=rope" in cmd
    assert "--optimizer=muon --lr_schedule=wsd --muon_lr=0.04 '--wandb_run_name=S-p Muon lr0.04'" in cmd
    bad = subprocess.run([sys.executable, "-m", "scripts.run_grid", "--grid=cpu", "--only=Q", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown variants ['Q']" in bad.stderr
