"""
Score model variants on the MAD memory tasks (data/mad.py): train every variant on every task over a small
learning-rate (x weight-decay) sweep, then write the table and figure with plots/plot_mad.py.

$ python -m scripts.run_mad                                        # the lite suite for config.grids.MAD_VARIANTS
$ python -m scripts.run_mad --variants="S-pc,G-cg-q-12o" --tasks=in_context_recall,memorization --jobs=2
$ python -m scripts.run_mad --size=original --gpus=0,1,2,3         # mad-lab's settings and sweep, one run per GPU
$ python -m scripts.run_mad --tasks=fuzzy_recall --mad_args=epochs=16 --out=out/long   # longer training
$ python -m scripts.run_mad --variants=S-pc --seeds=1337,1338     # two seeds (data and weights both follow it)
$ python -m scripts.run_mad --dry_run                              # print the commands

Runs go to <out>/mad-<size>/<variant>/<task>/lr<lr>-wd<wd>/ (train.py run folders), with a -s<seed> suffix for
seeds other than 1337 so that earlier single-seed suites keep their folders; the table and figure to
<out>/mad-<size>/mad.{md,csv,png,pdf}. Variant names are those of the plots grid (config/grids.py), matched
to S per task. A run with a DONE marker is skipped, so an interrupted suite can simply be re-run. Extra
--key=value arguments go to every run (e.g. --device=cpu).
"""
import argparse
import itertools
import math
import os
import sys

if __package__ in (None, ""):  # run as a file, the project's packages would not import
    sys.exit("error: scripts/run_mad.py runs from the repository root as a module: python -m scripts.run_mad ...")

from config.grids import MAD_BASE, MAD_SWEEP, MAD_VARIANTS, variants
from data.mad import TASKS, make_task
from plots.plot_mad import write_results
from scripts.run_grid import REPO, run_all, slug


def commands(size, out, names, tasks, lrs, wds, extra, mad_args="", seeds=(1337,)):
    batch = MAD_SWEEP[size]["batch_size"]
    for task_name in tasks:
        task = make_task(task_name, size, mad_args)
        base = dict(MAD_BASE, dataset=f"mad:{task_name}", mad_size=size, mad_args=mad_args, block_size=task.length,
                    vocab_size=task.vocab_size, batch_size=batch)
        iters = math.ceil(task.epochs * task.train_examples / batch)
        base.update(max_iters=iters, eval_interval=max(1, iters // 4))
        table = variants(base)
        for name, seed, lr, wd in itertools.product(names, seeds, lrs, wds):
            tail = "" if seed == 1337 else f"-s{seed}"
            run_dir = os.path.join(out, slug(name), task_name, f"lr{lr:g}-wd{wd:g}{tail}")
            settings = dict(base, **table[name], seed=seed, learning_rate=lr, weight_decay=wd, out_dir=run_dir)
            if os.path.isfile(os.path.join(run_dir, "ckpt_last.pt")):
                settings["init_from"] = "resume"
            cmd = [sys.executable, os.path.join(REPO, "train.py")] + [f"--{k}={v}" for k, v in settings.items()] + extra
            yield f"{name} {task_name} seed={seed} lr={lr:g} wd={wd:g}", run_dir, cmd


def floats(s):
    return tuple(float(v) for v in s.split(",") if v.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="lite", choices=sorted(MAD_SWEEP))
    parser.add_argument("--variants", default=",".join(MAD_VARIANTS), help="comma-separated grid variant names")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lrs", default="", help="comma-separated; default: the size's sweep (config/grids.py)")
    parser.add_argument("--wds", default="", help="comma-separated weight decays; default: the size's sweep")
    parser.add_argument("--seeds", default="1337", help="comma-separated; each sets train.py's seed (data and weights)")
    parser.add_argument("--mad_args", default="", help='task overrides for every task, e.g. "epochs=16"')
    parser.add_argument("--out", default="out")
    parser.add_argument("--jobs", type=int, default=1, help="CPU runs at a time (they share the cores)")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    parser.add_argument("--dry_run", action="store_true")
    args, extra = parser.parse_known_args()
    names = [s.strip() for s in args.variants.split(",") if s.strip()]
    tasks = [s.strip() for s in args.tasks.split(",") if s.strip()]
    known = variants(dict(MAD_BASE, block_size=64, vocab_size=16))
    if set(names) - set(known):
        sys.exit(f"error: unknown variants {sorted(set(names) - set(known))}; known: {sorted(known)}")
    if set(tasks) - set(TASKS):
        sys.exit(f"error: unknown tasks {sorted(set(tasks) - set(TASKS))}; known: {list(TASKS)}")
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"error: --seeds={args.seeds!r} is not a comma-separated list of integers")
    if not seeds:
        sys.exit("error: --seeds is empty")
    lrs = floats(args.lrs) or MAD_SWEEP[args.size]["lrs"]
    wds = floats(args.wds) or MAD_SWEEP[args.size]["wds"]
    out = os.path.join(args.out, f"mad-{args.size}")
    try:
        runs = list(commands(args.size, out, names, tasks, lrs, wds, extra, args.mad_args, seeds))
    except ValueError as e:
        sys.exit(f"error: {e}")
    failed = run_all(runs, [g for g in args.gpus.split(",") if g], args.jobs, args.dry_run)
    if not args.dry_run:
        write_results(out, out)
    if failed:
        sys.exit(f"failed runs: {failed}")


if __name__ == "__main__":
    main()
