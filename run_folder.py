"""
The run folder (out_dir) of one train.py run: the lock that keeps a second run out while this one lives, the claim
that refuses to overwrite another run's checkpoints, config.json (the settings, where and how the run ran, the
commit), metrics.csv (a row per logged step; wandb too when asked) and DONE. The checkpoints in it are
checkpoint.py's. Rank 0 alone writes here, and only to the run's own files (RUN_FILES, LOCK, partial checkpoints):
what else is in the folder is the user's, and is neither read, moved nor changed.
"""
import atexit
import errno
import fnmatch
import glob
import itertools
import json
import math
import os
import platform
import re
import socket
import stat
import subprocess
import sys
import time

import torch

import checkpoint
from checkpoint import write_atomic
from distributed import fail

RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "config.json", "metrics.csv", "DONE")  # and LOCK, ckpt_*.pt.tmp-*
COLUMNS = ["step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "ms_per_step", "tok_per_s", "mfu",
           "elapsed_s", "amax_fwd", "amax_bwd", "val_acc", "val_acc_macro", "val_bpb", "hellaswag_acc_norm"]


class RunFolder:

    def __init__(self, out_dir):
        self.dir = out_dir
        self.ckpt_last, self.ckpt_best = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")
        self.metrics, self.columns, self.wandb = os.path.join(out_dir, "metrics.csv"), COLUMNS, None
        self.good_step = None  # the step ckpt_last.pt holds, where a resume would start (None: no checkpoint yet)

    def claim(self, init_from, overwrite):
        """Make out_dir and lock it for this run; refuse a scratch run where checkpoints are (or move the earlier run's
        files aside with overwrite=True); clear the partial checkpoint files an interrupted write left. Everything is
        checked before anything changes. Returns an error message, or None."""
        out_dir = self.dir
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            return f"out_dir '{out_dir}' cannot be created: {e.strerror}"
        error = lock(os.path.join(out_dir, "LOCK"))
        if error:
            return error
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt.tmp-*")):
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                what = "a symlink" if os.path.islink(tmp) else "a folder" if os.path.isdir(tmp) else "not a file"
                return (f"{tmp} is {what}, under the name this run writes a checkpoint's temp file to; expected a "
                        f"partial checkpoint file or nothing: remove or rename it")
        if init_from == "scratch" and (os.path.exists(self.ckpt_last) or os.path.exists(self.ckpt_best)):
            if not overwrite:
                return (f"out_dir '{out_dir}' holds the checkpoints of an earlier run, which a scratch run would "
                        f"overwrite; continue that run with --init_from=resume, train into a new --out_dir, or pass "
                        f"--overwrite=True to move it aside")
            error = self.move_aside()
            if error:
                return error
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), "ckpt_*.pt.tmp-*")):
            os.remove(tmp)
            print(f"removed {tmp}, left by an interrupted checkpoint write")
        return None

    def move_aside(self):
        """--overwrite: move the earlier run's own files (RUN_FILES and partial checkpoints, nothing else in out_dir)
        into a new folder beside out_dir, <out_dir>.old-<time> (-2, -3, ... where that is taken). Returns an error
        message, or None."""
        base = f"{os.path.abspath(self.dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in itertools.count(1):
            aside = base if i == 1 else f"{base}-{i}"
            try:
                os.mkdir(aside)
                break
            except FileExistsError:
                continue
            except OSError as e:
                return (f"--overwrite=True: cannot make {aside} to move the earlier run into ({e.strerror}); move it "
                        f"yourself, or train into a new --out_dir")
        if os.stat(aside).st_dev != os.stat(self.dir).st_dev:  # out_dir is a mount point: a move would be a copy
            os.rmdir(aside)
            return (f"--overwrite=True: {self.dir} is a mount point, and its files cannot be moved to {aside} on "
                    f"another file system without copying them; move the earlier run yourself, or train into a new "
                    f"--out_dir")
        moved = sorted(n for n in os.listdir(self.dir) if n in RUN_FILES or fnmatch.fnmatch(n, "ckpt_*.pt.tmp-*"))
        for i, name in enumerate(moved):
            try:
                os.replace(os.path.join(self.dir, name), os.path.join(aside, name))
            except OSError as e:
                return (f"--overwrite=True: moving {os.path.join(self.dir, name)} to {aside} failed ({e.strerror}), "
                        f"after {', '.join(moved[:i]) or 'no file'}; expected a folder whose run files can be moved")
        print(f"overwrite: moved the earlier run in {self.dir} ({', '.join(moved)}) to {aside}")
        return None

    def save(self, state, paths):
        """checkpoint.save, then: once a file is written, a DONE that an earlier run left no longer says what the folder
        holds, and goes (only then, so that a resume that fails before it leaves the finished run as it was). Returns
        an error message where a write fails, or None."""
        def written(path):
            done = os.path.join(self.dir, "DONE")
            if os.path.exists(done):
                os.remove(done)
                print(f"removed {done}: this run trains on, and writes it again when it finishes")
        try:
            checkpoint.save(state, paths, self.dir, written)
        except OSError as e:  # its strerror says which file and why
            return f"{e.strerror}. Free space, or fix {self.dir}; {self.last_good()}"

    def last_good(self):
        """Where a resume would start, as this run knows it."""
        if self.good_step is None:
            return "no checkpoint was written yet; start again"
        return (f"{self.ckpt_last} (step {self.good_step}) is the last good checkpoint; resume from it "
                f"(--init_from=resume)")

    def start(self, config, fresh, wandb_log=False, wandb_project="", wandb_run_name="", **info):
        """Write config.json (config, info, the commit and the environment) and metrics.csv's header (fresh: a new
        run; resuming keeps the file's own columns, so the rows stay aligned with its header), and start wandb.
        Returns an error message where the folder cannot be written, or None."""
        commit = (git("rev-parse", "HEAD") or "").strip() or "unknown"
        try:
            write_atomic(os.path.join(self.dir, "config.json"), lambda f: json.dump(
                dict(config, **info, git_commit=commit, git_dirty=git_dirty(), torch_version=torch.__version__,
                     python_version=platform.python_version(), argv=sys.argv), f, indent=2))
            if fresh or not os.path.isfile(self.metrics) or os.path.getsize(self.metrics) == 0:
                # a new run (the folder holds no checkpoint): rows of an attempt that never saved one do not carry over
                write_atomic(self.metrics, lambda f: f.write(",".join(COLUMNS) + "\n"))
            else:
                with open(self.metrics) as f:
                    self.columns = f.readline().strip().split(",")
        except OSError as e:
            return f"{e.strerror}; expected an out_dir this run can write to"
        if missing := [c for c in COLUMNS if c not in self.columns]:  # a resumed run's older metrics.csv
            print(f"note: {self.metrics} predates the columns {', '.join(missing)}; this run does not log them there")
        if wandb_log:
            import wandb  # optional: pip install wandb
            self.wandb = wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    def write_row(self, row):
        """Append one metrics.csv row (floats at full precision; empty cells for what this step did not measure)."""
        try:
            with open(self.metrics, "a") as f:
                f.write(",".join("" if row.get(c) is None else repr(row[c]) for c in self.columns) + "\n")
        except OSError as e:
            fail(f"appending to {self.metrics} failed: {e.strerror}; {self.last_good()}")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def done(self, summary):
        """DONE: the run finished; summary is its last step, best val loss, ... In strict JSON: a best val loss that is
        still inf (max_iters=0 wrote no checkpoint) is null."""
        summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
        try:
            write_atomic(os.path.join(self.dir, "DONE"), lambda f: json.dump(summary, f, allow_nan=False))
        except OSError as e:
            fail(f"{e.strerror}; the run itself is complete: {self.last_good()}")


def lock(path):
    """Hold an advisory lock (flock) on the file at path for this process's life. The kernel drops it on any exit,
    SIGKILL included, so a lock file that a killed run left behind is stale, and is taken over. Returns None once
    locked, else why not: who holds it (the pid and host the holder wrote into the file), or what is at path instead
    of a lock file. path is never followed as a link, and a file that holds anything but a lock's text is not ours
    to rewrite."""
    import fcntl
    out_dir = os.path.dirname(path)
    ours = lambda text: not text or re.fullmatch(r"pid \d+ on [\w.-]+", text)  # noqa: E731
    while True:
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                what = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else
                        "a file with other names (a hard link)" if stat.S_ISREG(st.st_mode) else "not a regular file")
                return (f"{path} is {what}; expected a regular file, the run folder's lock, which train.py creates "
                        f"and removes: remove it, if no run is using this out_dir")
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:  # a link or folder made since the lstat is caught the next time round
            if e.errno in (errno.ELOOP, errno.EISDIR):
                continue
            return (f"out_dir '{out_dir}' is not writable ({e.strerror}); expected a folder this run can write its "
                    f"lock, checkpoints and logs to")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            who = holder if holder and ours(holder) else "a process" if holder else "a run that is starting"
            return (f"out_dir '{out_dir}' is in use by another run ({who}); wait for it to end, or pick another "
                    f"--out_dir")
        except OSError as e:  # a file system without flock
            os.close(fd)
            print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run from using this out_dir")
            return None
        if os.path.exists(path) and os.lstat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    stale = os.read(fd, 200).decode(errors="replace").strip()
    if not ours(stale):
        size = os.fstat(fd).st_size
        os.close(fd)
        return (f"{path} holds something other than a run's lock ({size} bytes that do not read 'pid N on HOST'); "
                f"expected the run folder's lock file: move that file elsewhere")
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
