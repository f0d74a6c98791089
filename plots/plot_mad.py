"""
The MAD table and figure from a folder of MAD runs (scripts/run_mad.py writes them; any train.py runs on
--dataset=mad:<task> work): per variant and task the final test accuracy on the answer positions, best over
the learning-rate / weight-decay sweep as in mad-lab, and the average over tasks ("MAD Avg").

$ python plots/plot_mad.py out/mad-lite                       # writes out/mad-lite/mad.{md,csv,png,pdf}
$ python plots/plot_mad.py out/mad-lite --out=plots/results/mad

Unfinished runs (no DONE marker) are left out and listed; a variant missing a task gets no average.
"""
import argparse
import csv
import os
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
ORDER = ["S", "S-p", "S-c", "S-pc", "R", "R-cg-q", "R-cg-q-12o", "G-cg-q", "G-cg-q-12o", "R-12!"]


def collect(root):
    """{(label, task): best run summary}, and the list of (folder, reason) left out."""
    best, skipped = {}, []
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
        accs = [(s, r["val_acc"]) for s, r in run["rows"].items() if "val_acc" in r]
        if not accs:
            skipped.append((dirpath, "metrics.csv has no val_acc"))
            continue
        step, acc = accs[-1]
        cfg = run["config"]
        summary = dict(acc=100 * acc, lr=cfg.get("learning_rate"), wd=cfg.get("weight_decay"), step=step,
                       path=dirpath, seconds=run["rows"][max(run["rows"])].get("elapsed_s"))
        key = (run["label"], dataset[4:])
        if key not in best or summary["acc"] > best[key]["acc"]:
            best[key] = summary
    return best, skipped


def write_results(root, out):
    best, skipped = collect(root)
    for path, why in skipped:
        print(f"left out {path}: {why}")
    if not best:
        print(f"no finished MAD runs under {root}")
        return None
    labels = sorted({k[0] for k in best}, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    tasks = [t for t in TASKS if any(k[1] == t for k in best)]
    rows = []
    for lab in labels:
        accs = [best[(lab, t)]["acc"] if (lab, t) in best else None for t in tasks]
        avg = sum(accs) / len(accs) if None not in accs and len(tasks) == len(TASKS) else None
        rows.append((lab, accs, avg))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mad.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", *tasks, "avg", "paper_mad_avg", *[f"{t}_lr" for t in tasks]])
        for lab, accs, avg in rows:
            w.writerow([lab, *["" if a is None else f"{a:.2f}" for a in accs], "" if avg is None else f"{avg:.2f}",
                        PAPER.get(lab, ""), *[best[(lab, t)]["lr"] if (lab, t) in best else "" for t in tasks]])
    short = {"in_context_recall": "recall", "fuzzy_recall": "fuzzy", "noisy_recall": "noisy",
             "selective_copying": "sel. copy", "compression": "compress", "memorization": "memorize"}
    with open(os.path.join(out, "mad.md"), "w") as f:
        f.write("| variant | " + " | ".join(short[t] for t in tasks) + " | avg | paper MAD Avg |\n")
        f.write("|---" * (len(tasks) + 3) + "|\n")
        for lab, accs, avg in rows:
            cells = ["–" if a is None else f"{a:.1f}" for a in accs]
            f.write(f"| {lab} | " + " | ".join(cells) + f" | {'–' if avg is None else f'{avg:.1f}'} | "
                    f"{PAPER.get(lab, '–')} |\n")
        f.write("\nTest accuracy (%) on the answer positions at the end of training, best over the sweep "
                f"(lr {sorted({v['lr'] for v in best.values()})}, weight decay {sorted({v['wd'] for v in best.values()})}).\n")
    plot(rows, tasks, short, out)
    print(f"wrote {out}/mad.md, mad.csv, mad.png, mad.pdf")
    return rows


def plot(rows, tasks, short, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    cols = [short[t] for t in tasks] + ["avg"]
    grid = np.array([[np.nan if a is None else a for a in accs] + [np.nan if avg is None else avg]
                     for _, accs, avg in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.2, 0.5 * len(rows) + 1.4))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.axvline(len(cols) - 1.5, color="white", lw=2)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.0f}", ha="center", va="center",
                    color="black" if not np.isnan(v) and v > 60 else "white", fontsize=9)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    ax.set_title("MAD: accuracy on answer positions (best over lr sweep)")
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
