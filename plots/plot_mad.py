"""
The MAD table and figure from a folder of MAD runs (scripts/run_mad.py writes them; any train.py runs on
--dataset=mad:<task> work). Per variant and task the headline is mad-lab's score, the macro accuracy
(val_acc_macro, data/mad.py macro_accuracy) of the final evaluation, best over the learning-rate / weight-decay
sweep for each seed and then averaged over the seeds; beside it the plain (micro) accuracy on the answer
positions (val_acc), taken the same way; and the average over tasks ("MAD Avg").

$ python plots/plot_mad.py out/mad-lite                       # writes out/mad-lite/mad.{md,csv,png,pdf}
$ python plots/plot_mad.py out/mad-lite --out=plots/results/mad

Unfinished runs (no DONE marker) are left out and listed; a variant missing a task gets no average. Runs made
before train.py logged val_acc_macro leave their cells' macro score empty ("–") rather than mixing the two.
The note column names the tasks where the sweep alone moves the variant's macro score (the range over the
sweep's settings, each averaged over seeds) by more than the median gap between adjacent variants on that task,
and by a point or more (where every variant scores 100 the gap is 0, and a 0.03 wobble is not a finding).
"""
import argparse
import csv
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "plots"))
from data.mad import TASKS  # noqa: E402
from plot_loss import read_run  # noqa: E402

# MAD Avg from the HyperMLP paper's design-study table (Lu & Yang, arXiv 2602.12601, slide p.30): mad-lab's
# full protocol with its 4-layer model, so a reference for the ordering, not for the lite numbers.
PAPER = {"S-pc": 80.15, "R-pc": 80.50, "R-cg-q": 66.78, "R-cg-q-12o": 81.01, "R-12!": 46.27, "R-12o!": 81.82,
         "G-cg-q-12o": 81.12}
ORDER = ["S", "S-p", "S-c", "S-pc", "R", "R-pc", "R-cg-q", "R-cg-q-12o", "G-cg-q", "G-cg-q-12o", "R-12!", "R-12o!"]
SHORT = {"in_context_recall": "recall", "fuzzy_recall": "fuzzy", "noisy_recall": "noisy",
         "selective_copying": "sel. copy", "compression": "compress", "memorization": "memorize"}


def collect(root):
    """{(label, task): [final scores of each finished run]}, and the list of (folder, reason) left out."""
    runs, skipped = {}, []
    for dirpath, _, files in sorted(os.walk(root)):
        if "config.json" not in files:
            continue
        run, why = read_run(dirpath)
        if run is None:
            skipped.append((dirpath, why))
            continue
        dataset = run["config"].get("dataset", "")
        if not dataset.startswith("mad:"):
            skipped.append((dirpath, f"dataset {dataset!r} is not a MAD task"))
            continue
        if not run["done"]:
            skipped.append((dirpath, "not finished (no DONE)"))
            continue
        evals = [r for r in run["rows"].values() if "val_acc" in r]
        if not evals:
            skipped.append((dirpath, "metrics.csv has no val_acc"))
            continue
        last, cfg = evals[-1], run["config"]
        macro = last.get("val_acc_macro")
        runs.setdefault((run["label"], dataset[4:]), []).append(dict(
            micro=100 * last["val_acc"], macro=None if macro is None else 100 * macro, seed=run["seed"],
            lr=cfg.get("learning_rate"), wd=cfg.get("weight_decay"), path=dirpath))
    return runs, skipped


def groups(runs, key):
    out = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out.values()


def score(runs, field):
    """Best over the sweep per seed, then the mean over seeds; None if any run lacks the score."""
    if any(r[field] is None for r in runs):
        return None
    return statistics.mean(max(r[field] for r in g) for g in groups(runs, lambda r: r["seed"]))


def best_lr(runs):
    """The learning rate(s) of the best run per seed, by the macro score (by the micro one where macro is missing)."""
    field = "micro" if any(r["macro"] is None for r in runs) else "macro"
    return "/".join(sorted({f"{max(g, key=lambda r: r[field])['lr']:g}" for g in groups(runs, lambda r: r["seed"])}))


def sweep_spread(runs):
    """Range of the macro score over the sweep's settings (each the mean over its seeds); None below two."""
    if any(r["macro"] is None for r in runs):
        return None
    means = [statistics.mean(r["macro"] for r in g) for g in groups(runs, lambda r: (r["lr"], r["wd"]))]
    return max(means) - min(means) if len(means) > 1 else None


def write_results(root, out):
    runs, skipped = collect(root)
    for path, why in skipped:
        print(f"left out {path}: {why}")
    if not runs:
        print(f"no finished MAD runs under {root}")
        return None
    labels = sorted({k[0] for k in runs}, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    tasks = [t for t in TASKS if any(k[1] == t for k in runs)]
    empty = dict(macro=None, micro=None, spread=None, seeds=None, lr="")
    cell = {k: dict(macro=score(v, "macro"), micro=score(v, "micro"), spread=sweep_spread(v),
                    seeds=len({r["seed"] for r in v}), lr=best_lr(v))
            for k, v in runs.items()}
    gap = {}  # per task: the median gap between adjacent variants' macro scores
    for t in tasks:
        vals = sorted(c["macro"] for c in (cell.get((lab, t), empty) for lab in labels) if c["macro"] is not None)
        if len(vals) > 1:
            gap[t] = statistics.median(b - a for a, b in zip(vals, vals[1:]))
    rows = []
    for lab in labels:
        cs = [cell.get((lab, t), empty) for t in tasks]
        full = len(tasks) == len(TASKS)
        avg = {f: sum(c[f] for c in cs) / len(cs) if full and all(c[f] is not None for c in cs) else None
               for f in ("macro", "micro")}
        n = sorted({c["seeds"] for c in cs if c["seeds"]})
        note = ", ".join(f"{SHORT[t]} ({c['spread']:.1f})" for t, c in zip(tasks, cs)
                         if c["spread"] is not None and t in gap and c["spread"] >= 1 and c["spread"] > gap[t])
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        rows.append(dict(label=lab, cells=cs, avg=avg, seeds=seeds, note=note))
    os.makedirs(out, exist_ok=True)

    def num(v):
        return "" if v is None else f"{v:.2f}"
    with open(os.path.join(out, "mad.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seeds", *tasks, "avg", *[f"{t}_micro" for t in tasks], "avg_micro", "paper_mad_avg",
                    *[f"{t}_lr" for t in tasks], "note"])
        for r in rows:
            w.writerow([r["label"], r["seeds"], *[num(c["macro"]) for c in r["cells"]], num(r["avg"]["macro"]),
                        *[num(c["micro"]) for c in r["cells"]], num(r["avg"]["micro"]), PAPER.get(r["label"], ""),
                        *[c["lr"] for c in r["cells"]], r["note"]])

    def both(d):  # "macro (micro)"
        if d["micro"] is None:
            return "–"
        return ("–" if d["macro"] is None else f"{d['macro']:.1f}") + f" ({d['micro']:.1f})"
    every = [r for v in runs.values() for r in v]
    gaps = ", ".join(f"{SHORT[t]} {g:.1f}" for t, g in gap.items())
    with open(os.path.join(out, "mad.md"), "w") as f:
        head = ["variant", "seeds", *[SHORT[t] for t in tasks], "avg", "paper MAD Avg", "sweep > gaps"]
        f.write("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n")
        for r in rows:
            cells = [r["label"], r["seeds"], *[both(c) for c in r["cells"]], both(r["avg"]),
                     PAPER.get(r["label"], "–"), r["note"] or "–"]
            f.write("| " + " | ".join(map(str, cells)) + " |\n")
        f.write(f"\nmad-lab's macro accuracy (%) at the end of training, the plain accuracy on the answer positions "
                f"in brackets; each best over the sweep (lr {sorted({r['lr'] for r in every})}, weight decay "
                f"{sorted({r['wd'] for r in every})}) per seed, then averaged over the seeds. –: no finished run, "
                "or (macro) runs from before train.py logged val_acc_macro. sweep > gaps: the tasks where the sweep "
                "alone moves the variant's macro score (range over the settings, in brackets) by more than the median "
                "gap between adjacent variants" + (f" ({gaps})" if gaps else "") + ", and by a point or more.\n")
    plot(rows, tasks, out)
    print(f"wrote {out}/mad.md, mad.csv, mad.png, mad.pdf")
    return rows


def plot(rows, tasks, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    cols = [SHORT[t] for t in tasks] + ["avg"]
    grid = np.array([[np.nan if d["macro"] is None else d["macro"] for d in r["cells"] + [r["avg"]]] for r in rows],
                    dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.2, 0.5 * len(rows) + 1.4))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.axvline(len(cols) - 1.5, color="white", lw=2)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.0f}", ha="center", va="center",
                    color="black" if not np.isnan(v) and v > 60 else "white", fontsize=9)
    fig.colorbar(im, ax=ax, label="macro accuracy (%)")
    ax.set_title("MAD: mad-lab's macro accuracy (best over the sweep, mean over seeds)")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"mad.{ext}"), dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder holding MAD run folders (searched recursively)")
    parser.add_argument("--out", default=None, help="where to write mad.*; default: root")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        sys.exit(f"error: '{args.root}' is not a folder")
    if write_results(args.root, args.out or args.root) is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
