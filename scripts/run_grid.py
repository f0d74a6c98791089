"""
Train a named experiment grid from config/grids.py into out/<grid>/<variant>-s<seed>/.

$ python -m scripts.run_grid --grid=cpu                            # sequentially on this machine
$ python -m scripts.run_grid --grid=cpu --only="S-pc,G-cg-q-12o"   # a subset
$ python -m scripts.run_grid --grid=fineweb --launcher="torchrun --standalone --nproc_per_node=8"   # each run on 8 GPUs
$ python -m scripts.run_grid --grid=cpu --gpus=0,1,2,3             # one run per GPU, four at a time
$ python -m scripts.run_grid --grid=cpu --dry_run                  # print the commands

A run with a DONE marker is skipped; one with a ckpt_last.pt but no DONE resumes, so the grid can simply be
re-run after an interruption. Each run's output goes to its folder's train.log. Extra --key=value arguments
are passed to every run (e.g. --max_iters=200 for a quick look).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file, the project's packages would not import
    sys.exit("error: scripts/run_grid.py runs from the repository root as a module: python -m scripts.run_grid ...")

from config.grids import GRIDS, run_settings, split_tags, variants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/ is one level below the root


def slug(name):
    return name.replace(" + ", "_").replace(" ", "_").replace("!", "nm")


def commands(grid, out, only, launcher, extra):
    base, runs = GRIDS[grid]
    for name, seed in runs:
        if only and name not in only:
            continue
        run_dir = os.path.join(out, grid, f"{slug(name)}-s{seed}")
        settings = dict(base, **run_settings(base, name), seed=seed, out_dir=run_dir)
        if os.path.isfile(os.path.join(run_dir, "ckpt_last.pt")):
            settings["init_from"] = "resume"
        cmd = shlex.split(launcher) if launcher else [sys.executable]
        cmd += [os.path.join(REPO, "train.py")] + [f"--{k}={v}" for k, v in settings.items()] + extra
        yield name, run_dir, cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, choices=sorted(GRIDS))
    parser.add_argument("--out", default="out")
    parser.add_argument("--only", default="", help="comma-separated run names (variants, with tags if any)")
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --standalone --nproc_per_node=8"')
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one run per GPU at a time")
    parser.add_argument("--jobs", type=int, default=1, help="CPU runs at a time (they share the cores)")
    parser.add_argument("--dry_run", action="store_true")
    args, extra = parser.parse_known_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    known = set(variants(GRIDS[args.grid][0])) | {name for name, _ in GRIDS[args.grid][1]}
    unknown = {name for name in only if split_tags(name)[0] not in known}
    if unknown:
        sys.exit(f"error: unknown variants {sorted(unknown)}; known: {sorted(known)}")
    failed = run_all(commands(args.grid, args.out, only, args.launcher, extra), [g for g in args.gpus.split(",") if g],
                     args.jobs, args.dry_run)
    if failed:
        sys.exit(f"failed runs: {failed}")


def run_all(runs, gpus=(), jobs=1, dry_run=False):
    """Skip the (name, run_dir, cmd) runs that have a DONE marker; print the others (dry_run) or launch them.
    Returns the names that failed."""
    todo = []
    for name, run_dir, cmd in runs:
        if os.path.isfile(os.path.join(run_dir, "DONE")):
            print(f"skip {name} ({run_dir}): DONE")
        else:
            todo.append((name, run_dir, cmd))
    if dry_run:
        for _, _, cmd in todo:
            print(shlex.join(cmd))
        return []
    return launch(todo, gpus, jobs)


def launch(todo, gpus=(), jobs=1):
    """Run the (name, run_dir, cmd) list: one run per GPU in gpus at a time, or `jobs` CPU runs at a time
    (sharing the cores). Each run's output goes to run_dir/train.log. Returns the names that failed."""
    slots = list(gpus) or [None] * jobs
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
    todo, running, failed = list(todo), {}, []
    while todo or running:
        for slot in [s for s in range(len(slots)) if s not in running]:
            if not todo:
                break
            name, run_dir, cmd = todo.pop(0)
            os.makedirs(run_dir, exist_ok=True)
            env, gpu = dict(os.environ), slots[slot]
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
                cmd = cmd + ["--device=cuda"]
            elif len(slots) > 1:
                env["OMP_NUM_THREADS"] = threads
            print(f"start {name} -> {run_dir}" + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)
            log = open(os.path.join(run_dir, "train.log"), "a")
            running[slot] = (name, run_dir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        for slot, (name, run_dir, proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[slot]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {run_dir}/train.log)"
                print(f"{status}: {name}", flush=True)
                if proc.returncode:
                    failed.append(name)
        time.sleep(0.5)
    return failed


if __name__ == "__main__":
    main()
