"""
The run folder (out_dir) of one train.py run: the lock that keeps a second run out while this one lives, the claim
that refuses to overwrite another run's checkpoints, config.json (the settings, where and how the run ran, the
commit), metrics.csv (a row per logged step; wandb too when asked) and DONE. The checkpoints in it are
checkpoint.py's. Rank 0 alone writes here.
"""
import atexit
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import time

import torch

from checkpoint import write_atomic

COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s", "mfu",
           "elapsed_s", "amax_fwd", "amax_bwd", "val_acc", "val_acc_macro", "val_bpb", "hellaswag_acc_norm"]


class RunFolder:

    def __init__(self, out_dir):
        self.dir = out_dir
        self.ckpt_last, self.ckpt_best = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")
        self.metrics, self.columns, self.wandb = os.path.join(out_dir, "metrics.csv"), COLUMNS, None

    def claim(self, init_from, overwrite, eval_only):
        """Make out_dir and lock it for this run; refuse a scratch run where checkpoints are (or move them aside
        with overwrite=True); clear what an interrupted run left: partial checkpoint files, and a DONE that this run
        makes stale by training on (DONE means finished). Returns an error message, or None."""
        out_dir = self.dir
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            return f"out_dir '{out_dir}' cannot be created: {e.strerror}"
        holder = lock(os.path.join(out_dir, "LOCK"))
        if holder:
            return (f"out_dir '{out_dir}' is in use by another run ({holder}); wait for it to end, or pick another "
                    f"--out_dir")
        if init_from == "scratch" and (os.path.exists(self.ckpt_last) or os.path.exists(self.ckpt_best)):
            if not overwrite:
                return (f"out_dir '{out_dir}' holds the checkpoints of an earlier run, which a scratch run would "
                        f"overwrite; continue that run with --init_from=resume, train into a new --out_dir, or pass "
                        f"--overwrite=True to move it aside")
            aside = f"{os.path.normpath(out_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.makedirs(aside)
            for name in os.listdir(out_dir):
                if name != "LOCK":
                    os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
            print(f"overwrite: moved the earlier run in {out_dir} to {aside}")
        for tmp in filter(os.path.isfile, glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt.tmp-*"))):
            os.remove(tmp)
            print(f"removed {tmp}, left by an interrupted checkpoint write")
        done = os.path.join(out_dir, "DONE")
        if os.path.exists(done) and not eval_only:
            os.remove(done)
            print(f"removed {done}: this run trains on, and writes it again when it finishes")
        return None

    def start(self, config, fresh, wandb_log=False, wandb_project="", wandb_run_name="", **info):
        """Write config.json (config, info, the commit and the environment) and metrics.csv's header (fresh: a new
        run; resuming keeps the file's own columns, so the rows stay aligned with its header), and start wandb."""
        commit = (git("rev-parse", "HEAD") or "").strip() or "unknown"
        write_atomic(os.path.join(self.dir, "config.json"), lambda f: json.dump(
            dict(config, **info, git_commit=commit, git_dirty=git_dirty(), torch_version=torch.__version__,
                 python_version=platform.python_version(), argv=sys.argv), f, indent=2))
        if fresh or not os.path.isfile(self.metrics) or os.path.getsize(self.metrics) == 0:
            # a new run (the folder holds no checkpoint): rows of an attempt that never saved one do not carry over
            write_atomic(self.metrics, lambda f: f.write(",".join(COLUMNS) + "\n"))
        else:
            with open(self.metrics) as f:
                self.columns = f.readline().strip().split(",")
            if missing := [c for c in COLUMNS if c not in self.columns]:
                print(f"note: {self.metrics} predates the columns {', '.join(missing)}; this run does not log them there")
        if wandb_log:
            import wandb  # optional: pip install wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def write_row(self, row):
        """Append one metrics.csv row (floats at full precision; empty cells for what this step did not measure)."""
        with open(self.metrics, "a") as f:
            f.write(",".join("" if row.get(c) is None else repr(row[c]) for c in self.columns) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def done(self, summary):
        """DONE: the run finished; summary is its last step, best val loss, ..."""
        write_atomic(os.path.join(self.dir, "DONE"), lambda f: json.dump(summary, f))


def lock(path):
    """Hold an advisory lock (flock) on the file at path for this process's life. The kernel drops it on any exit,
    SIGKILL included, so a lock file that a killed run left behind is stale, and is taken over. Returns None once
    locked, else who holds it (the pid and host the holder wrote into the file)."""
    import fcntl
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return holder or "a run that is starting"
        except OSError as e:  # a file system without flock
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run from using this out_dir")
            return None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    stale = os.read(fd, 200).decode(errors="replace").strip()
    if stale:
        print(f"note: {path} was left by a run that ended without releasing it ({stale}); taking it over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    atexit.register(lambda: (os.remove(path), os.close(fd)))  # remove before unlocking: no one locks a dead file
    return None


def git(*args):
    """git's output in this file's repository, or None where git or the repository is missing."""
    try:
        r = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_dirty():
    """Whether tracked files differ from the commit (edited, staged, deleted, renamed); None without git.
    Untracked files (run folders, data, notes) do not count."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())
