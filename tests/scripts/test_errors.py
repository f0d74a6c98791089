"""Bad input to the real scripts: each case is one `error:` line naming the setting or file, exit code 1, no
traceback, and the run folder exactly as it was (nothing created, nothing written, nothing removed). Then the
files from someone else that must not run code: a crafted checkpoint and a crafted meta.pkl."""
import fcntl
import hashlib
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from data.shards import write_shard
from data.tokenizer import char_spec, save_meta

TINY = ["--device=cpu", "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=16", "--batch_size=2",
        "--eval_iters=1", "--log_interval=1", "--warmup_iters=1"]


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


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
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# ---------------------------------------------------------------- set-ups: each damages a copy of the base

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
    return fd


def a_file(tmp):
    open(os.path.join(tmp, "afile"), "w").write("not a folder")


def empty_dataset(tmp):
    os.makedirs(os.path.join(tmp, "empty"))


CUDA = torch.cuda.is_available()
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
    ("truncated ckpt_last", "train.py", ["--dataset={base}/data", "--out_dir={tmp}/run", "--init_from=resume"],
     truncate("run/ckpt_last.pt"), ["ckpt_last.pt", "truncated", "ckpt_best.pt is there", "cp "]),
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
    ("resume, other model", "train.py", ["--dataset={base}/data", "--out_dir={tmp}/run", "--init_from=resume",
                                         "--n_layer=2", "--block_size=8", "--seed=2"], None,
     ["n_layer: 1 -> 2", "block_size: 16 -> 8", "seed: 1337 -> 2"]),
    ("run folder locked", "train.py", ["--dataset={base}/data", "--out_dir={tmp}/run", "--init_from=resume",
                                       "--max_iters=4"], hold_lock, ["in use by another run", f"pid {os.getpid()}"]),
    ("sample top_k", "sample.py", ["--out_dir={tmp}/run", "--top_k=0"], None, ["top_k=0"]),
    ("sample temperature", "sample.py", ["--out_dir={tmp}/run", "--temperature=-1"], None, ["temperature=-1"]),
    ("sample prompt file", "sample.py", ["--out_dir={tmp}/run", "--start=FILE:{tmp}/no_prompt.txt"], None,
     ["no_prompt.txt", "No such file"]),
]
CASES = [c for c in CASES if not (c[0] == "device cuda" and CUDA)]


@pytest.mark.parametrize("name,script,args,setup,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(finished, tmp_path, name, script, args, setup, names):
    tmp = str(tmp_path)
    shutil.copytree(os.path.join(finished, "data"), os.path.join(tmp, "data"))
    shutil.copytree(os.path.join(finished, "run"), os.path.join(tmp, "run"))
    held = setup(tmp) if setup else None
    before = hashes(tmp)
    r = run(script, *TINY * (script == "train.py"), *[a.format(tmp=tmp, base=finished, new=os.path.join(tmp, "new")) for a in args])
    if isinstance(held, int):
        os.close(held)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for part in names:
        assert part in errors[0], (part, errors[0])
    assert hashes(tmp) == before  # nothing created (no new/ folder), written or removed


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
