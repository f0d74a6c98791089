"""Bad input to the real scripts: each case is one `error:` line naming the setting or file, exit code 1, no
traceback, and the run folder exactly as it was (nothing created, nothing written, nothing removed). Then the
cases whose right outcome is not a refusal (a full disk, --overwrite, a diverging resume...), each with what must
hold after it. Then the files from someone else that must not run code (a crafted checkpoint and meta.pkl), and the
fused CPU kernel's build after a kill."""
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from data.shards import open_shard, write_shard
from data.tokenizer import char_spec, save_meta

TINY = ["--device=cpu", "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=16", "--batch_size=2",
        "--eval_iters=1", "--log_interval=1", "--warmup_iters=1"]


SECRET = "precious user data 7f3a"  # in files that are the user's: no command may print, move or change them


def run(script, *args, cwd=REPO, wrap=None, env=None):
    """script (a path in the repository) with args, from cwd; wrap: Python code run first, in the same process."""
    pre = ["-c", WRAP.format(wrap=wrap)] if wrap else []
    return subprocess.run([sys.executable, *pre, os.path.join(REPO, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


WRAP = """
import runpy, sys
{wrap}
sys.argv = sys.argv[1:]
sys.path[0] = __import__("os").path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def chars_dataset(d, n_train=3000, n_val=400):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200))
    spec = char_spec(text)
    ids = np.array([spec["stoi"][c] for c in text])
    os.makedirs(d, exist_ok=True)
    write_shard(os.path.join(d, "train.bin"), ids[:n_train], header=False)
    write_shard(os.path.join(d, "val.bin"), ids[n_train:n_train + n_val], header=False)
    save_meta(d, spec)
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A dataset and a finished run on it (2 steps), to copy per case."""
    root = tmp_path_factory.mktemp("base")
    data = chars_dataset(str(root / "data"))
    r = run("train.py", *TINY, f"--dataset={data}", f"--out_dir={root / 'run'}", "--max_iters=2", "--eval_interval=2")
    assert r.returncode == 0, r.stderr
    return str(root)


def hashes(folder):
    """{relative path: sha256} for every file under folder (through links), 'folder' for every folder and
    'link -> target' beside a link's content: what a command must leave as it found it."""
    out = {}
    for dirpath, dirs, names in os.walk(folder):
        for n in dirs:
            out[os.path.relpath(os.path.join(dirpath, n), folder)] = "folder"
        for n in names:
            p = os.path.join(dirpath, n)
            link = f"link -> {os.readlink(p)} " if os.path.islink(p) else ""
            out[os.path.relpath(p, folder)] = link + hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def mount_tmpfs(path, size):
    """Mount a tmpfs of size bytes at path; False where this process cannot (not root, or not allowed)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode == 0


def umount(path):
    subprocess.run(["umount", path], check=True)


# ---------------------------------------------------------------- set-ups: each damages a copy of the base
# A set-up may return a function that undoes what outlives the command (a held lock, a mount).

def raw_shard(name, data):
    def setup(tmp):
        open(os.path.join(tmp, "data", name), "wb").write(data)
    return setup


def header_shards(magic=20240520, count=None):
    def setup(tmp):
        d = os.path.join(tmp, "hdr")
        os.makedirs(d)
        write_shard(os.path.join(d, "x_val_000000.bin"), np.arange(50) % 30)
        write_shard(os.path.join(d, "x_train_000000.bin"), np.arange(200) % 30)
        with open(os.path.join(d, "x_train_000000.bin"), "r+b") as f:
            f.write(np.int32(magic).tobytes())
            if count is not None:
                f.seek(8)
                f.write(np.int32(count).tobytes())
                f.truncate(1024 + 2 * count)
        save_meta(d, {"kind": "bytes", "vocab_size": 256})
    return setup


def short_split(split):
    def setup(tmp):
        chars_dataset(os.path.join(tmp, "data"), n_train=3000 if split == "val" else 10, n_val=10 if split == "val" else 400)
    return setup


def truncate(path):
    def setup(tmp):
        p = os.path.join(tmp, path)
        data = open(p, "rb").read()
        open(p, "wb").write(data[:len(data) // 2])
    return setup


def hold_lock(tmp):
    """A live holder of the run folder's lock: this test process, as a running train.py would."""
    fd = os.open(os.path.join(tmp, "run", "LOCK"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return lambda: os.close(fd)


def a_file(tmp):
    open(os.path.join(tmp, "afile"), "w").write("not a folder")


def empty_dataset(tmp):
    os.makedirs(os.path.join(tmp, "empty"))


def lock_links_to_a_user_file(tmp):
    open(os.path.join(tmp, "victim.txt"), "w").write(SECRET + "\n")
    os.symlink(os.path.join(tmp, "victim.txt"), os.path.join(tmp, "run", "LOCK"))


def folder(path):
    def setup(tmp):
        os.makedirs(os.path.join(tmp, path))
    return setup


def earlier_prepare_and_a_stray_file(tmp):
    """A folder textfile/prepare.py filled before, with someone's file that only looks like a shard by its name."""
    prep = os.path.join(tmp, "prep")
    os.makedirs(prep)
    write_shard(os.path.join(prep, "prep_train_000000.bin"), np.arange(100) % 50)
    write_shard(os.path.join(prep, "prep_val_000000.bin"), np.arange(20) % 50)
    save_meta(prep, {"kind": "bytes", "vocab_size": 256})
    open(os.path.join(prep, "notes_train_1.bin"), "w").write(SECRET.ljust(100, "."))
    open(os.path.join(tmp, "book.txt"), "w").write("some text to prepare\n" * 50)


def token_ids_beyond_the_vocab(tmp):
    d = os.path.join(tmp, "big")
    shutil.copytree(os.path.join(tmp, "data"), d)
    ids = np.array(open_shard(os.path.join(d, "train.bin"), header=False))
    ids[::50] = 200  # the char vocabulary has about 30 symbols
    write_shard(os.path.join(d, "train.bin"), ids, header=False)


def read_only_run(tmp):
    """The finished run in a folder no write can reach: a tmpfs remounted read-only (EROFS) as root, whom folder
    permissions do not stop; the folder's permissions (EACCES) otherwise."""
    ro = os.path.join(tmp, "ro")
    if os.geteuid() == 0:
        if not mount_tmpfs(ro, 1 << 20):
            pytest.skip("root, whom folder permissions do not stop, and no tmpfs can be mounted to make a read-only one")
        shutil.copytree(os.path.join(tmp, "run"), os.path.join(ro, "run"))
        subprocess.run(["mount", "-o", "remount,ro", ro], check=True)
        return lambda: umount(ro)
    shutil.copytree(os.path.join(tmp, "run"), os.path.join(ro, "run"))
    os.chmod(os.path.join(ro, "run"), 0o555)
    return lambda: os.chmod(os.path.join(ro, "run"), 0o755)


def config_file(text):
    def setup(tmp):
        open(os.path.join(tmp, "my_config.py"), "w").write(text)
    return setup


def edited_checkpoint(edit, to="odd.pt"):
    """ckpt_last.pt of the base run, edited, saved as {tmp}/<to>."""
    def setup(tmp):
        ck = torch.load(os.path.join(tmp, "run", "ckpt_last.pt"), weights_only=True)
        edit(ck)
        torch.save(ck, os.path.join(tmp, to))
    return setup


def wrong_shape(ck):
    ck["model"]["transformer.wpe.weight"] = torch.zeros(3, 16)


CUDA = torch.cuda.is_available()
RESUME = ["--dataset={base}/data", "--out_dir={tmp}/run", "--init_from=resume"]
CASES = [  # id, script, args, set-up, what the message must name
    ("odd-sized shard", "train.py", ["--dataset={tmp}/data", "--out_dir={new}"], raw_shard("train.bin", b"\x01\x00\x02"),
     ["train.bin", "3 bytes"]),
    ("empty shard", "train.py", ["--dataset={tmp}/data", "--out_dir={new}"], raw_shard("val.bin", b""),
     ["val.bin", "0 bytes"]),
    ("empty header shard", "train.py", ["--dataset={tmp}/hdr", "--out_dir={new}"], header_shards(count=0),
     ["x_train_000000.bin", "no tokens"]),
    ("wrong magic", "train.py", ["--dataset={tmp}/hdr", "--out_dir={new}"], header_shards(magic=123),
     ["x_train_000000.bin", "wrong magic 123"]),
    ("train too short", "train.py", ["--dataset={tmp}/data", "--out_dir={new}"], short_split("train"),
     ["train split has 10 tokens", "block_size=16"]),
    ("val too short", "train.py", ["--dataset={tmp}/data", "--out_dir={new}"], short_split("val"),
     ["val split has 10 tokens", "block_size=16"]),
    ("dataset not prepared", "train.py", ["--dataset={tmp}/empty", "--out_dir={new}"], empty_dataset,
     ["not prepared", "empty", "train"]),
    ("truncated ckpt_last", "train.py", RESUME, truncate("run/ckpt_last.pt"),
     ["ckpt_last.pt", "truncated", "ckpt_best.pt is there", "cp "]),
    ("data_order", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--data_order=foo"], None, ["data_order='foo'"]),
    ("device cuda", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--device=cuda"], None, ["device='cuda'"]),
    ("device name", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--device=tpu"], None, ["device='tpu'"]),
    ("out_dir not creatable", "train.py", ["--dataset={tmp}/data", "--out_dir={tmp}/afile/run"], a_file,
     ["out_dir", "afile/run", "cannot be created"]),
    ("learning_rate", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--learning_rate=-1"], None,
     ["learning_rate=-1"]),
    ("max_iters", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--max_iters=-1"], None, ["max_iters=-1"]),
    ("scratch over a run", "train.py", ["--dataset={tmp}/data", "--out_dir={tmp}/run"], None,
     ["run' holds the checkpoints", "--init_from=resume", "--out_dir", "--overwrite=True"]),
    ("resume, other model", "train.py", [*RESUME, "--n_layer=2", "--block_size=8", "--seed=2"], None,
     ["n_layer: 1 -> 2", "block_size: 16 -> 8", "seed: 1337 -> 2"]),
    ("run folder locked", "train.py", [*RESUME, "--max_iters=4"], hold_lock, ["in use by another run", f"pid {os.getpid()}"]),
    ("sample top_k", "sample.py", ["--out_dir={tmp}/run", "--top_k=0"], None, ["top_k=0"]),
    ("sample temperature", "sample.py", ["--out_dir={tmp}/run", "--temperature=-1"], None, ["temperature=-1"]),
    ("sample prompt file", "sample.py", ["--out_dir={tmp}/run", "--start=FILE:{tmp}/no_prompt.txt"], None,
     ["no_prompt.txt", "No such file"]),
    # issue 26: the holes a hostile probe found (its numbers in the ids)
    ("1 LOCK links to a user file", "train.py", [*RESUME, "--max_iters=4"], lock_links_to_a_user_file,
     ["run/LOCK", "symlink", "a regular file"]),
    ("3 textfile prepare over a stray file", "data/textfile/prepare.py",
     ["--input={tmp}/book.txt", "--out_dir={tmp}/prep", "--tokenizer=bytes"], earlier_prepare_and_a_stray_file,
     ["prep/notes_train_1.bin", "not a shard", "move it"]),
    ("5 token ids beyond the vocabulary", "train.py", ["--dataset={tmp}/big", "--out_dir={new}"], token_ids_beyond_the_vocab,
     ["big/train.bin", "token id 200", "vocab_size="]),
    ("7 out_dir read-only", "train.py", ["--dataset={base}/data", "--out_dir={tmp}/ro/run", "--init_from=resume",
                                         "--max_iters=4"], read_only_run, ["out_dir", "ro/run", "not writable"]),
    ("8 a checkpoint temp name is a folder", "train.py", [*RESUME, "--max_iters=4", "--eval_interval=2"],
     folder("run/ckpt_last.pt.tmp-4"), ["run/ckpt_last.pt.tmp-4", "is a folder", "remove or rename it"]),
    ("9 LOCK is a folder", "train.py", [*RESUME, "--max_iters=4"], folder("run/LOCK"),
     ["run/LOCK", "is a folder", "a regular file"]),
    ("11 sample, unknown model_args key", "sample.py", ["--ckpt={tmp}/odd.pt"],
     edited_checkpoint(lambda ck: ck["model_args"].update(n_expert=4)), ["odd.pt", "model_args", "n_expert"]),
    ("11 sample, wrong tensor shape", "sample.py", ["--ckpt={tmp}/odd.pt"],
     edited_checkpoint(wrong_shape), ["odd.pt", "transformer.wpe.weight", "(3, 16)", "(16, 16)"]),
    ("11 sample, no tokenizer", "sample.py", ["--ckpt={tmp}/odd.pt"], edited_checkpoint(lambda ck: ck.pop("tokenizer")),
     ["odd.pt", "tokenizer"]),
    ("11 resume, wrong tensor shape", "train.py", [*RESUME, "--max_iters=4"],
     edited_checkpoint(wrong_shape, "run/ckpt_last.pt"), ["run/ckpt_last.pt", "transformer.wpe.weight", "(3, 16)"]),
    ("12 config file syntax error", "train.py", ["{tmp}/my_config.py", "--dataset={tmp}/data", "--out_dir={new}"],
     config_file("n_layer = 1\nn_head = = 2\n"), ["my_config.py:2", "n_head = = 2"]),
    ("14 HC settings with the plain residual", "train.py",
     ["--dataset={tmp}/data", "--out_dir={new}", "--hc_streams=8", "--hc_dynamic=False"], None,
     ["hc_streams=8", "hc_dynamic=False", "residual='plain'"]),
    ("18 a size override after a budget-matching overlay", "train.py",
     ["config/shakespeare_char.py", "config/hyperglu.py", "--n_head=4", "--n_embd=128", "--dataset={tmp}/data",
      "--out_dir={new}", "--batch_size=2", "--eval_iters=1", "--max_iters=1"], None,
     ["--n_head=4", "config/hyperglu.py", "before config/hyperglu.py", "re-run the match"]),
]
CASES = [c for c in CASES if not (c[0] == "device cuda" and CUDA)]


@pytest.mark.parametrize("name,script,args,setup,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(finished, tmp_path, name, script, args, setup, names):
    tmp = str(tmp_path)
    shutil.copytree(os.path.join(finished, "data"), os.path.join(tmp, "data"))
    shutil.copytree(os.path.join(finished, "run"), os.path.join(tmp, "run"))
    undo = setup(tmp) if setup else None
    try:
        before = hashes(tmp)
        r = run(script, *TINY * (script == "train.py"), *[a.format(tmp=tmp, base=finished, new=os.path.join(tmp, "new"))
                                                          for a in args])
        after = hashes(tmp)
    finally:
        if undo:
            undo()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout and SECRET not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for part in names:
        assert part in errors[0], (part, errors[0])
    assert after == before  # nothing created (no new/ folder), written or removed


# ---------------------------------------------------------------- cases whose right outcome is not a refusal
# Each set-up may return {"cwd": ..., "wrap": Python code to run before the script, "undo": ...}; each check gets the
# folder, the result and the hashes from before the command.

def ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout and SECRET not in r.stderr + r.stdout


def one_error(r, *parts):
    """The command stopped with exit code 1 and one `error:` line on stderr, naming parts; no traceback."""
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert SECRET not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


RUN_FILES = ["DONE", "ckpt_best.pt", "ckpt_last.pt", "config.json", "metrics.csv"]


def moved_aside(tmp, before):
    """The one new folder beside run/ (the earlier run, moved aside): it must hold exactly the run's own files, as
    they were."""
    new = [n for n in os.listdir(tmp) if n.startswith("run.old-") and n not in {p.split("/")[0] for p in before}]
    assert len(new) == 1, os.listdir(tmp)
    assert sorted(os.listdir(os.path.join(tmp, new[0]))) == RUN_FILES
    after = hashes(os.path.join(tmp, new[0]))
    assert all(after[n] == before[f"run/{n}"] for n in RUN_FILES)


def user_files_in_the_run_folder(tmp):
    os.makedirs(os.path.join(tmp, "run", "mine"))
    for p in ("notes.txt", "mine/a.txt"):
        open(os.path.join(tmp, "run", p), "w").write(SECRET)
    return {"cwd": os.path.join(tmp, "run")}


def overwrite_the_current_folder(tmp, r, before):
    ok(r)
    moved_aside(tmp, before)
    after = hashes(tmp)
    assert after["run/notes.txt"] == before["run/notes.txt"] and after["run/mine/a.txt"] == before["run/mine/a.txt"]
    assert sorted(os.listdir(os.path.join(tmp, "run"))) == sorted(RUN_FILES + ["mine", "notes.txt"])


def asides_of_this_minute_taken(tmp):
    """An earlier --overwrite in this second (and the next 60): its folder aside holds a run already."""
    now = time.time()
    for s in range(60):
        d = os.path.join(tmp, time.strftime("run.old-%Y%m%d-%H%M%S", time.localtime(now + s)))
        os.makedirs(d)
        open(os.path.join(d, "notes.txt"), "w").write(SECRET)


def overwrite_again(tmp, r, before):
    ok(r)
    moved_aside(tmp, before)
    after = hashes(tmp)
    assert all(after[p] == h for p, h in before.items() if p.startswith("run.old-"))


def full_disk(tmp):
    """The finished run on a 1 MiB tmpfs with 48 KiB free: a checkpoint (72 KB) does not fit."""
    disk = os.path.join(tmp, "disk")
    if not mount_tmpfs(disk, 1 << 20):
        pytest.skip("no tmpfs can be mounted here (not root, or not allowed to mount); '6 disk full (simulated)' "
                    "covers the write failing")
    shutil.copytree(os.path.join(tmp, "run"), os.path.join(disk, "run"))
    st = os.statvfs(disk)
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(bytes(st.f_bavail * st.f_frsize - 48 * 1024))
    return {"undo": lambda: umount(disk)}


FILLS_UP = """
import errno, io, os
_open = io.open
class Full:
    '''A checkpoint's temp file on a disk that is full after its first 1000 bytes.'''
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        if self.n + len(b) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n += len(b)
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
def open_(file, mode="r", *a, **k):
    f = _open(file, mode, *a, **k)
    name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
    return Full(f) if "w" in mode and ".pt.tmp" in name else f
io.open = __builtins__.open = open_
"""


def disk_full_keeps_the_last_good_checkpoint(folder):
    def check(tmp, r, before):
        one_error(r, f"{tmp}/{folder}/ckpt_", "No space left on device", "ckpt_last.pt (step 2) is the last good",
                  "--init_from=resume")
        after = hashes(tmp)
        assert not [p for p in after if ".tmp" in p]  # the partial file is gone
        assert all(after[f"{folder}/{n}"] == before[f"{folder}/{n}"] for n in ("ckpt_last.pt", "ckpt_best.pt", "DONE"))
    return check


def top_k_none_samples(tmp, r, before):
    ok(r)
    assert r.stdout.count("---------------") == 1


def done_is_json(tmp, r, before):
    ok(r)
    done = json.loads(open(os.path.join(tmp, "new", "DONE")).read(), parse_constant=lambda c: pytest.fail(c))
    assert done["step"] == 0 and done["best_val_loss"] is None


def failed_resume_keeps_done(tmp, r, before):
    assert r.returncode == 1
    after = hashes(tmp)
    assert all(after[f"run/{n}"] == before[f"run/{n}"] for n in ("DONE", "ckpt_last.pt", "ckpt_best.pt"))


def divergence_names_the_last_good_checkpoint(tmp, r, before):
    one_error(r, "step 4: the validation loss is nan", f"{tmp}/run/ckpt_last.pt (step 2) is the last good checkpoint",
              "--init_from=resume")


OUTCOMES = [  # id, script, args, set-up, check
    ("2 overwrite the current folder", "train.py",
     ["--dataset={tmp}/data", "--out_dir=.", "--overwrite=True", "--max_iters=2", "--eval_interval=2"],
     user_files_in_the_run_folder, overwrite_the_current_folder),
    ("6 disk full (tmpfs)", "train.py", ["--dataset={base}/data", "--out_dir={tmp}/disk/run", "--init_from=resume",
                                        "--max_iters=4", "--eval_interval=2"],
     full_disk, disk_full_keeps_the_last_good_checkpoint("disk/run")),
    ("6 disk full (simulated)", "train.py", [*RESUME, "--max_iters=4", "--eval_interval=2"],
     lambda tmp: {"wrap": FILLS_UP}, disk_full_keeps_the_last_good_checkpoint("run")),
    ("10 two overwrites in one second", "train.py",
     ["--dataset={tmp}/data", "--out_dir={tmp}/run", "--overwrite=True", "--max_iters=2", "--eval_interval=2"],
     asides_of_this_minute_taken, overwrite_again),
    ("13 sample --top_k=None", "sample.py", ["--out_dir={tmp}/run", "--top_k=None", "--max_new_tokens=5",
                                             "--num_samples=1"], None, top_k_none_samples),
    ("15 max_iters=0", "train.py", ["--dataset={tmp}/data", "--out_dir={new}", "--max_iters=0"], None, done_is_json),
    ("16 a failed resume keeps DONE", "train.py", [*RESUME, "--max_iters=20", "--eval_interval=2",
                                                   "--learning_rate=1e6"], None, failed_resume_keeps_done),
    ("17 divergence names the last good checkpoint", "train.py", [*RESUME, "--max_iters=20", "--eval_interval=2",
                                                                  "--learning_rate=1e6"], None,
     divergence_names_the_last_good_checkpoint),
]


@pytest.mark.parametrize("name,script,args,setup,check", OUTCOMES, ids=[c[0] for c in OUTCOMES])
def test_what_must_hold_after_a_command(finished, tmp_path, name, script, args, setup, check):
    tmp = str(tmp_path)
    shutil.copytree(os.path.join(finished, "data"), os.path.join(tmp, "data"))
    shutil.copytree(os.path.join(finished, "run"), os.path.join(tmp, "run"))
    opts = (setup(tmp) if setup else None) or {}
    try:
        before = hashes(tmp)
        r = run(script, *TINY * (script == "train.py"), *[a.format(tmp=tmp, base=finished, new=os.path.join(tmp, "new"))
                                                          for a in args], cwd=opts.get("cwd", REPO), wrap=opts.get("wrap"))
        check(tmp, r, before)
    finally:
        if "undo" in opts:
            opts["undo"]()


# ---------------------------------------------------------------- files that must not run code

class RunsCode:
    """Unpickling this writes a marker file: what a crafted checkpoint or meta.pkl could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(finished, tmp_path):
    marker = str(tmp_path / "MARKER")
    ck = torch.load(os.path.join(finished, "run", "ckpt_last.pt"), weights_only=True)
    ck["config"]["note"] = RunsCode(marker)
    torch.save(ck, tmp_path / "shared.pt")
    r = run("sample.py", f"--ckpt={tmp_path / 'shared.pt'}", "--max_new_tokens=2")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "shared.pt holds io.open" in r.stderr and "refusing to load it" in r.stderr
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(finished, "run"), run_dir)
    shutil.copy(tmp_path / "shared.pt", run_dir / "ckpt_last.pt")
    r = run("train.py", *TINY, f"--dataset={finished}/data", f"--out_dir={run_dir}", "--init_from=resume", "--max_iters=4")
    assert r.returncode == 1 and "refusing to load it" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("plots/plot_connections.py", str(tmp_path / "shared.pt"))
    assert r.returncode == 1 and "refusing to load it" in r.stderr, r.stderr
    assert not os.path.exists(marker)


def test_a_checkpoint_from_before_safe_loading_needs_trust(finished, tmp_path):
    """Checkpoints used to hold numpy's RNG state as numpy objects: refused, unless --trust_checkpoint=True."""
    ck = torch.load(os.path.join(finished, "run", "ckpt_last.pt"), weights_only=True)
    ck["rng"][0]["numpy"] = np.random.get_state()
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(finished, "run"), run_dir)
    torch.save(ck, run_dir / "ckpt_last.pt")
    os.remove(run_dir / "ckpt_best.pt")
    r = run("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=2", "--num_samples=1")
    assert r.returncode == 1 and "predates safe loading" in r.stderr and "--trust_checkpoint=True" in r.stderr
    r = run("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=2", "--num_samples=1", "--trust_checkpoint=True")
    assert r.returncode == 0, r.stderr
    r = run("train.py", *TINY, f"--dataset={finished}/data", f"--out_dir={run_dir}", "--init_from=resume",
            "--max_iters=3", "--trust_checkpoint=True")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    torch.load(run_dir / "ckpt_last.pt", weights_only=True)  # the next checkpoint is in the safe types again


def test_a_meta_pkl_that_would_run_code_is_refused(finished, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(finished, "data"), data)
    os.remove(data / "meta.json")
    marker = str(tmp_path / "MARKER")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "stoi": {"a": 0}, "itos": {0: "a"}, "x": RunsCode(marker)}, f)
    r = run("train.py", *TINY, f"--dataset={data}", f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "meta.pkl is not a tokenizer spec that can be read safely" in r.stderr and "io.open" in r.stderr
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------- the fused CPU kernel's first-use build

LOAD = "import ops.hyperglu_cpu as h; print('loaded' if h.load() is not None else 'not loaded', flush=True)"


def test_a_killed_kernel_build_does_not_hang_the_next_and_builds_run_one_at_a_time(tmp_path):
    """The first-use build (ops/hyperglu_cpu.py) killed midway, as Ctrl-C or a SIGKILL would, then two processes
    started at once, then a second checkout sharing the cache: no wait without end, one build, and no rebuild."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), HYPERGLU_FUSED="1")
    start = lambda cwd=REPO: subprocess.Popen([sys.executable, "-c", LOAD], cwd=cwd, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = start()
    deadline = time.time() + 120
    while time.time() < deadline and not any("build.ninja" in names for _, _, names in os.walk(tmp_path / "ext")):
        time.sleep(0.1)
    time.sleep(2)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the build ended before it could be killed"

    both = [start(), start()]
    outs = [p.communicate(timeout=400) for p in both]
    assert all(out.strip() == "loaded" for out, _ in outs), outs
    # the warning itself, not the source line that Python prints under it
    assert sum(err.count("RuntimeWarning: ops/hyperglu_cpu.py: building") for _, err in outs) == 1, outs
    built = {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "ext").rglob("*.so"))}
    assert len(built) == 1

    source = open(os.path.join(REPO, "ops", "csrc", "hyperglu_cpu.cpp"), "rb").read()
    assert hashlib.sha256(source).hexdigest()[:12] in list(built)[0]  # the folder is keyed by the source too
    other = tmp_path / "checkout"  # the same source in another checkout: the same build, not a rebuild
    shutil.copytree(os.path.join(REPO, "ops"), other / "ops", ignore=shutil.ignore_patterns("__pycache__"))
    for cwd in (other, REPO):
        out, err = start(cwd).communicate(timeout=120)
        assert out.strip() == "loaded" and "building" not in err, err
    assert {p: os.stat(p).st_mtime_ns for p in map(str, (tmp_path / "ext").rglob("*.so"))} == built


def test_a_live_build_is_waited_for_a_bounded_time(tmp_path):
    """A process that holds the build lock and does not finish (stopped, hung): the next waits `wait` seconds, then
    gives up (load() then runs the eager steps), rather than waiting for ever."""
    from ops.hyperglu_cpu import build_lock
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "build.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(TimeoutError, match="another process has been building"):
            with build_lock(str(tmp_path), wait=0.5):
                pass
        assert time.time() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    with build_lock(str(tmp_path), wait=5):  # its holder gone, the lock is free at once
        pass
