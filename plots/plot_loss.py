"""
Loss curves and a results table from run folders (metrics.csv + config.json), like the paper's Figure 5.

$ python plots/plot_loss.py out/cpu/*                                   # -> plots/loss.{png,pdf,md,csv}
$ python plots/plot_loss.py out/cpu/* --layout=families --threshold=1.7 --zoom=0.3 --out=plots/results/cpu/loss
$ python plots/plot_loss.py out/fineweb/* --x=tokens --train --ema=0.9 --logy --ref="3.425=GPT-2 124M" --format=svg
$ python plots/plot_loss.py out/fineweb/* --y=hellaswag_acc_norm --ref="0.2955=GPT-2 124M (llm.c)" --out=plots/hellaswag
$ python plots/plot_loss.py out/quickstart out/fineweb --y=val_bpb      # a bytes run beside a BPE run

Labels come from each run's config by config.grids.label, in the paper's grammar (S-pc, R-12!,
G-cg-q-12o + mHC×4, ...), not from the folder name; a grid run with training-setup tags (config/grids.py: h2,
Muon, lr2e-3) adds them, read from its recorded name and checked against its settings (S-p Muon lr0.04).
--untagged leaves those runs out. --layout=families draws one panel per attention family (softmax, ReLU
attention, HyperMLP, HyperGLU) present, on shared axes. --y picks the curve: val loss (default), val bits per byte
(comparable across tokenizers) or HellaSwag acc_norm (train.py's hellaswag_every). The table gives final and best
val loss, steps and tokens to reach --threshold, parameters, median tok/s, wall time, and the last val bits per
byte and HellaSwag acc_norm. For a step logged twice (a
resumed run) the later entry wins.
"""
import argparse
import csv
import json
import math
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from config.grids import label, tags_of  # noqa: E402  (the one definition of the variant grammar)
from checkpoint import upgrade  # noqa: E402
from config.budget import param_report  # noqa: E402
from model import GPTConfig  # noqa: E402

FAMILIES = ["softmax", "ReLU attention", "HyperMLP", "HyperGLU"]
METRICS = {"val_loss": "val loss", "val_bpb": "val bits per byte", "hellaswag_acc_norm": "HellaSwag acc_norm"}


def family(cfg):
    if cfg["attn"] == "softmax":
        return "softmax"
    if cfg["attn"] == "hyperglu":
        return "HyperGLU"
    return "HyperMLP" if cfg.get("use_op1", True) or cfg.get("use_op2", True) else "ReLU attention"


def read_run(path):
    """(run dict, None) or (None, reason). The run dict has label, family, config and per-step rows."""
    cfg_path, met_path = os.path.join(path, "config.json"), os.path.join(path, "metrics.csv")
    if not os.path.isdir(path):
        return None, "not a folder"
    if not os.path.isfile(met_path):
        return None, "no metrics.csv (not started?)"
    if not os.path.isfile(cfg_path):
        return None, "no config.json"
    with open(cfg_path) as f:
        config = json.load(f)
    model_args = config.get("model_args")
    if not model_args or "attn" not in model_args:
        return None, "config.json has no model_args (not written by train.py?)"
    rows = {}
    with open(met_path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            return None, "metrics.csv has no step column"
        for row in reader:
            try:
                step = int(row["step"])
            except (TypeError, ValueError):
                continue
            cells = {}
            for k, v in row.items():
                if k and k != "step" and v not in ("", None):
                    try:
                        cells[k] = float(v)
                    except ValueError:
                        pass
            rows.setdefault(step, {}).update(cells)  # a later entry for the same step wins
    if not rows:
        return None, "metrics.csv has no rows yet"
    try:
        tags = tags_of(config)
    except ValueError as e:
        return None, str(e)
    return dict(path=path, name=os.path.basename(os.path.normpath(path)),
                label=" ".join([label(model_args), *tags]), tags=tags,
                family=family(model_args), config=config, model_args=model_args, seed=config.get("seed"),
                rows=dict(sorted(rows.items())), done=os.path.isfile(os.path.join(path, "DONE"))), None


def series(run, col, x):
    """(xs, ys) of the steps that have col; x is step, tokens or time (elapsed_s in minutes)."""
    xs, ys = [], []
    for step, r in run["rows"].items():
        if col not in r:
            continue
        if x == "step":
            xv = step
        elif x == "tokens":
            xv = r.get("tokens", step * run["config"].get("tokens_per_step", float("nan")))
        else:
            if "elapsed_s" not in r:
                continue
            xv = r["elapsed_s"] / 60
        xs.append(xv)
        ys.append(r[col])
    return xs, ys


def ema(ys, beta):
    out, m = [], None
    for y in ys:
        m = y if m is None else beta * m + (1 - beta) * y
        out.append(m)
    return out


def summarize(run, threshold):
    """One table row for a run."""
    rows = run["rows"]
    val = [(s, r["val_loss"]) for s, r in rows.items() if "val_loss" in r]
    tps = [r["tok_per_s"] for r in rows.values() if "tok_per_s" in r]
    elapsed = [r["elapsed_s"] for r in rows.values() if "elapsed_s" in r]
    hit = next(((s, rows[s].get("tokens")) for s, v in val if threshold is not None and v <= threshold), None)
    last = lambda col: next((r[col] for r in reversed(rows.values()) if col in r), None)
    try:
        cfg = GPTConfig(**upgrade(run["model_args"]))
        params = param_report(cfg)["total"]
        plain = GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=1,
                          n_embd=cfg.n_embd, bias=cfg.bias)  # S: 4 n_embd^2 attention weights a layer, any heads
        attn_vs_s = param_report(cfg)["attention"] / param_report(plain)["attention"] - 1
    except (TypeError, ValueError):
        params = attn_vs_s = None
    return dict(label=run["label"], variant=run["variant"], seed=run["seed"], run=run["name"], steps=max(rows),
                final_val=val[-1][1] if val else None, best_val=min(v for _, v in val) if val else None,
                steps_to_threshold=hit[0] if hit else None,
                tokens_to_threshold=int(hit[1]) if hit and hit[1] is not None else None,
                params=params, attn_vs_s=attn_vs_s, tok_per_s=statistics.median(tps) if tps else None,
                wall_min=max(elapsed) / 60 if elapsed else None, final_bpb=last("val_bpb"),
                hellaswag=last("hellaswag_acc_norm"), done=run["done"])


def write_table(summaries, threshold, out):
    cols = ["label", "seed", "final_val", "best_val", "steps_to_threshold", "tokens_to_threshold", "steps",
            "params", "attn_vs_s", "tok_per_s", "wall_min", "final_bpb", "hellaswag", "done", "run"]
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for s in summaries:
            w.writerow({k: ("" if s[k] is None else s[k]) for k in cols})

    def fmt(k, v):
        if v is None:
            return "n/a"
        if k in ("final_val", "best_val", "final_bpb", "hellaswag"):
            return f"{v:.4f}"
        if k in ("params", "tok_per_s", "tokens_to_threshold"):
            return f"{v:,.0f}"
        if k == "wall_min":
            return f"{v:.1f}"
        if k == "attn_vs_s":
            return f"{v:+.1%}"
        return str(v)
    thr = f"steps to val ≤ {threshold}" if threshold is not None else "steps to threshold"
    heads = ["variant", "seed", "final val", "best val", thr, "tokens to threshold", "steps", "params",
             "attention params vs S", "tok/s", "wall (min)", "final val bpb", "HellaSwag acc_norm", "done", "run"]
    groups, pairs = variant_stats(summaries), pair_stats(summaries)
    lines = ["Per variant: final val loss over its seeds (mean ± sample std; one seed has no std).", "",
             "| variant | n | seeds | final val | best val (mean) | attention params vs S |", "|---|---|---|---|---|---|"]
    for g in groups:
        std = f" ± {g['std']:.4f}" if g["std"] is not None else ""
        lines.append(f"| {g['label']} | {g['n']} | {' '.join(map(str, g['seeds']))} | {g['mean']:.4f}{std} | "
                     f"{g['best']:.4f} | {fmt('attn_vs_s', g['attn_vs_s'])} |")
    if pairs:
        lines += ["", "Headline pairs, paired over the seeds both have (a seed sets the init and the data order): the "
                  "mean of the per-seed differences of final val loss (a - b; negative: a is lower), twice its "
                  "standard error sd(d)/sqrt(n), the paired t test's two-sided p, the seeds where a is lower, and "
                  "beside them Welch's unpaired t test's p.", "",
                  "| a | b | seeds | a - b | 2 SE (paired) | beyond 2 SE | paired p | a lower | Welch p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            na = lambda v, f: "n/a" if v is None else f.format(v)
            lines.append(f"| {p['a']} | {p['b']} | {' '.join(map(str, p['seeds']))} | {p['diff']:+.4f} | "
                         f"{na(p['se'] and 2 * p['se'], '{:.4f}')} | {p['verdict']} | {na(p['p'], '{:.3f}')} | "
                         f"{p['lower']}/{len(p['seeds'])} | {na(p['welch_p'], '{:.3f}')} |")
    lines += ["", "Per run:", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for s in summaries:
        lines.append("| " + " | ".join(fmt(k, s[k]) for k in cols) + " |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + "_variants.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "n", "seeds", "final_val_mean", "final_val_std", "best_val_mean", "attn_vs_s"])
        for g in groups:
            w.writerow([g["label"], g["n"], " ".join(map(str, g["seeds"])), g["mean"],
                        "" if g["std"] is None else g["std"], g["best"], g["attn_vs_s"]])


HEADLINE = [("G-cg-q-12o", "S-pc"), ("R-cg-q-12o", "S-pc"), ("G-cg-q-12o", "R-cg-q-12o"), ("R-pc", "S-pc"),
            # issue 25: against the strongest softmax, with either optimizer, and the head-count controls
            ("S-pc", "S-p"), ("G-cg-q-12o", "S-p"), ("G-g-q-12o", "S-p"), ("G-pcg-q-12o", "S-p"),
            ("R-cg-q-12o", "S-p"), ("R-pc", "S-p"), ("G-pcg-q-12o", "G-cg-q-12o"), ("G-g-q-12o", "G-cg-q-12o"),
            ("G-cg-q-12o nopos", "G-cg-q-12o"),
            ("S-p Muon", "S-p"), ("S-pc Muon", "S-pc"), ("G-cg-q-12o Muon", "G-cg-q-12o"),
            ("G-g-q-12o Muon", "G-g-q-12o"), ("S-pc Muon", "S-p Muon"), ("G-cg-q-12o Muon", "S-p Muon"),
            ("G-g-q-12o Muon", "S-p Muon"), ("G-cg-q-12o Muon", "S-pc Muon"),
            ("S-p h2", "S-p"), ("G-cg-q-12o h4", "G-cg-q-12o"), ("G-cg-q-12o", "S-p h2"), ("G-cg-q-12o h4", "S-p")]


def finals(summaries, lab):
    """{seed: final val} of a variant's finished runs."""
    return {s["seed"]: s["final_val"] for s in summaries
            if s["variant"] == lab and s["done"] and s["final_val"] is not None}


def variant_stats(summaries):
    """One dict per variant (in table order): n, seeds, mean and sample std of the final val loss, mean best."""
    out = []
    for lab in dict.fromkeys(s["variant"] for s in summaries):
        f = finals(summaries, lab)
        if not f:
            continue
        mine = [s for s in summaries if s["variant"] == lab and s["seed"] in f]
        out.append(dict(label=lab, n=len(f), seeds=sorted(f), mean=statistics.mean(f.values()),
                        std=statistics.stdev(f.values()) if len(f) > 1 else None,
                        best=statistics.mean(s["best_val"] for s in mine if s["best_val"] is not None),
                        attn_vs_s=mine[0]["attn_vs_s"]))
    return out


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (evaluated with Lentz's
    method), on the side of x where the fraction converges fast; I_x(a, b) = 1 - I_(1-x)(b, a) gives the other."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):  # f = 1 / (1 + d1 / (1 + d2 / (1 + ...))), d_(2m+1) and d_(2m) as below
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * (f - 1)


def t_p(t, df):
    """Two-sided p of Student's t with df degrees of freedom: P(|T| >= |t|) = I_(df / (df + t²))(df/2, 1/2)."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def paired(xa, xb):
    """(mean difference, its standard error, paired t test's two-sided p, Welch's t test's two-sided p) of two
    samples over the same seeds, in the same order; the SE and p values are None for one seed (or no spread)."""
    d = [a - b for a, b in zip(xa, xb)]
    n, mean = len(d), statistics.mean(d)
    if n < 2:
        return mean, None, None, None
    se = statistics.stdev(d) / math.sqrt(n)
    p = t_p(mean / se, n - 1) if se > 0 else None
    va, vb = statistics.variance(xa) / n, statistics.variance(xb) / n
    welch = None
    if va + vb > 0:  # Welch-Satterthwaite degrees of freedom
        df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
        welch = t_p((statistics.mean(xa) - statistics.mean(xb)) / math.sqrt(va + vb), df)
    return mean, se, p, welch


def pair_stats(summaries, pairs=HEADLINE):
    """The headline pairs present, paired over their common seeds: mean difference, its standard error, whether
    the difference exceeds twice it ("consistent with" a direction is all a smaller one supports), the paired and
    Welch p values, and at how many seeds a is lower."""
    out = []
    for a, b in pairs:
        fa, fb = finals(summaries, a), finals(summaries, b)
        seeds = sorted(set(fa) & set(fb))
        if not seeds:
            continue
        xa, xb = [fa[k] for k in seeds], [fb[k] for k in seeds]
        diff, se, p, welch = paired(xa, xb)
        verdict = "n/a (one seed)" if se is None else "yes" if abs(diff) > 2 * se else "no"
        out.append(dict(a=a, b=b, seeds=seeds, diff=diff, se=se, verdict=verdict, p=p, welch_p=welch,
                        lower=sum(x < y for x, y in zip(xa, xb))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=os.path.join(REPO, "plots", "loss"), help="output path without extension")
    p.add_argument("--x", default="step", choices=["step", "tokens", "time"])
    p.add_argument("--y", default="val_loss", choices=list(METRICS), help="the curve: val loss, val bits per byte, "
                   "or HellaSwag acc_norm (train.py's hellaswag_every)")
    p.add_argument("--train", action="store_true", help="also draw the train loss (thin lines; with --y=val_loss)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA smoothing of the train loss, e.g. 0.9")
    p.add_argument("--logy", action="store_true")
    p.add_argument("--zoom", type=float, default=0.0, help="inset on the last fraction of the x range, e.g. 0.3")
    p.add_argument("--ref", action="append", default=[], help='reference line "VALUE=LABEL", e.g. "3.425=GPT-2 124M"')
    p.add_argument("--layout", default="single", choices=["single", "families"])
    p.add_argument("--threshold", type=float, default=None, help="val loss for the steps/tokens-to-threshold columns")
    p.add_argument("--format", default="pdf", choices=["pdf", "svg"], help="vector format written beside the PNG")
    p.add_argument("--title", default="")
    p.add_argument("--untagged", action="store_true", help="leave out runs with training-setup tags (Muon, lr, h)")
    args = p.parse_args(argv)
    if args.train and args.y != "val_loss":
        p.error(f"--train draws the train loss, which has no {METRICS[args.y]} counterpart; use it with --y=val_loss")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in args.runs:
        run, why = read_run(path)
        if run is None:
            print(f"skip {path}: {why}")
            continue
        if args.untagged and run["tags"]:
            continue
        if args.y != "val_loss" and not any(args.y in r for r in run["rows"].values()):
            print(f"note {path}: no {args.y} in its metrics.csv; it has no {METRICS[args.y]} curve")
        elif not any("val_loss" in r for r in run["rows"].values()):
            print(f"note {path}: no val point yet; only its train loss is drawn" if args.train else
                  f"note {path}: no val point yet (add --train to draw its train loss)")
        if args.x == "time" and not any("elapsed_s" in r for r in run["rows"].values()):
            print(f"note {path}: metrics.csv has no elapsed_s column; it is left out of the --x=time plot")
        runs.append(run)
    if not runs:
        sys.exit("error: none of the given folders holds a run (metrics.csv + config.json)")
    runs.sort(key=lambda r: (FAMILIES.index(r["family"]), r["label"], r["seed"] or 0))
    for r in runs:  # a variant's seeds share a color and one legend entry
        r["variant"] = r["label"]
    for r in runs:
        if sum(q["variant"] == r["variant"] for q in runs) > 1:
            r["label"] = f"{r['variant']} (seed {r['seed']})"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {v: colors[i % len(colors)] for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs))}

    panels = [f for f in FAMILIES if any(r["family"] == f for r in runs)] if args.layout == "families" else [None]
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.6 * nrows), sharex=True, sharey=True, squeeze=False)
    xlabel = {"step": "step", "tokens": "tokens", "time": "wall-clock (min)"}[args.x]
    for ax, fam in zip(axes.flat, panels):
        members = [r for r in runs if fam is None or r["family"] == fam]
        drawn = []  # (variant, xs, ys, band): a val curve, the mean and min-max band where a variant has seeds
        for v in dict.fromkeys(r["variant"] for r in members):
            seeds = [series(r, args.y, args.x) for r in members if r["variant"] == v]
            seeds = [c for c in seeds if c[0]]
            if len(seeds) == 1:
                xs, ys = seeds[0]
                ax.plot(xs, ys, color=color[v], lw=1.8, marker="o" if len(xs) < 3 else None, ms=3, label=v)
                drawn.append((v, xs, ys, None))
            elif seeds:  # the mean over the seeds at the x values all of them reached, and their min-max band
                common = sorted(set.intersection(*(set(xs) for xs, _ in seeds)))
                at = [dict(zip(xs, ys)) for xs, ys in seeds]
                band = [[a[x] for a in at] for x in common]
                mean = [statistics.mean(b) for b in band]
                band = ([min(b) for b in band], [max(b) for b in band])
                ax.fill_between(common, *band, color=color[v], alpha=0.2, lw=0)
                ax.plot(common, mean, color=color[v], lw=1.8, label=f"{v} ({len(seeds)} seeds: mean, min-max)")
                drawn.append((v, common, mean, band))
            if args.train:
                for r in (r for r in members if r["variant"] == v):
                    tx, ty = series(r, "train_loss", args.x)
                    if tx:
                        ax.plot(tx, ema(ty, args.ema) if args.ema else ty, color=color[v], lw=0.7, alpha=0.5,
                                label=None if seeds else f"{r['label']} (train)")
        for ref in args.ref:
            value, _, name = ref.partition("=")
            ax.axhline(float(value), color="k", ls="--", lw=1, label=name or None)
        if args.logy:
            ax.set_yscale("log")
        ax.set_title(fam or args.title or {"val_loss": "validation loss"}.get(args.y, METRICS[args.y]))
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRICS[args.y] + (" (thin: train)" if args.train else ""))
        if members:
            ax.legend(fontsize=7, loc="lower right" if args.y == "hellaswag_acc_norm" else "upper right")
        else:
            ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="gray")
        if args.zoom and drawn:
            xmax = max(max(xs) for _, xs, _, _ in drawn)
            x0 = xmax * (1 - args.zoom)
            tail = [y for _, xs, ys, band in drawn for x, *y in zip(xs, *(band or (ys,))) if x >= x0]
            tail = [v for y in tail for v in y]
            if tail:
                low = 0.27 if len(drawn) > 6 else 0.36  # below the legend (longer with more variants)
                ins = ax.inset_axes([0.45, low, 0.5, 0.3])  # and above the curves' tails
                for v, xs, ys, band in drawn:
                    ins.plot(xs, ys, color=color[v], lw=1.5)
                    if band:
                        ins.fill_between(xs, *band, color=color[v], alpha=0.2, lw=0)
                pad = (max(tail) - min(tail)) * 0.1 or 0.01
                ins.set_xlim(x0, xmax)
                ins.set_ylim(min(tail) - pad, max(tail) + pad)
                ins.tick_params(labelsize=7)
                ins.grid(alpha=0.3)
    if args.title and len(panels) > 1:
        fig.suptitle(args.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out + ".png", dpi=150)
    fig.savefig(f"{args.out}.{args.format}")
    plt.close(fig)
    summaries = [summarize(r, args.threshold) for r in runs]
    write_table(summaries, args.threshold, args.out)
    print(f"wrote {args.out}.png, {args.out}.{args.format}, {args.out}.md, {args.out}.csv ({len(runs)} runs)")
    return summaries


if __name__ == "__main__":
    main()
