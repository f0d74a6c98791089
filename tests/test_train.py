"""train.py and sample.py end to end, as a user runs them: loss falls, DDP matches one process, a killed run
resumes bit for bit, a failed checkpoint write keeps the last good one, sampling prints text."""
import csv
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data.shards import write_shard
from data.tokenizer import char_spec, save_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small character-level dataset in nanoGPT's raw format."""
    d = tmp_path_factory.mktemp("chars")
    text = "".join(f"To be, or not to be ({i}): that is the question.\n" for i in range(400))
    spec = char_spec(text)
    ids = np.array([spec["stoi"][c] for c in text])
    write_shard(str(d / "train.bin"), ids[:18000], header=False)
    write_shard(str(d / "val.bin"), ids[18000:], header=False)
    save_meta(str(d), spec)
    return str(d)


def train(*args, timeout=180):
    r = subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    return r


def metrics(out_dir):
    """step -> row, the later entry winning (a resumed run repeats steps)."""
    rows = {}
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    return rows


def losses(out_dir):
    return {s: r["train_loss"] for s, r in metrics(out_dir).items() if "train_loss" in r}


def test_tiny_run_decreases_loss_and_writes_the_run_folder(dataset, tmp_path):
    out = str(tmp_path / "run")
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=60", "--eval_interval=30",
              "--attn=hyperglu", "--residual=mhc", "--op1_rank=4", "--op2_rank=4")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "world size 1 | grad accum 1 per process (1 global) | batch 4 x 32 | tokens per step 128" in r.stdout
    assert "mfu n/a" in r.stdout and "eta" in r.stdout
    m = metrics(out)
    assert float(m[60]["val_loss"]) < float(m[0]["val_loss"]) - 0.5
    assert float(m[60]["train_loss"]) < float(m[1]["train_loss"]) - 0.5
    assert sorted(os.listdir(out)) == ["DONE", "ckpt_best.pt", "ckpt_last.pt", "config.json", "metrics.csv"]
    with open(os.path.join(out, "metrics.csv")) as f:
        assert f.readline().strip() == ("step,tokens,train_loss,val_loss,lr,grad_norm,ms_per_step,tok_per_s,mfu,elapsed_s,"
                                        "amax_fwd,amax_bwd,val_acc")
    assert abs(float(m[60]["amax_fwd"]) - 1) < 1e-4  # mHC: rows of every H_res sum to 1, so the composite's too
    assert "amax_fwd" not in m[0]  # logged at evals after training steps
    import json
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_args"]["attn"] == "hyperglu" and cfg["torch_version"] == torch.__version__ and cfg["git_commit"]
    ck = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in ck["model"]) and ck["step"] == 60
    assert ck["tokenizer"]["kind"] == "char" and ck["loader"]["next_row"] == 60 * 4


def test_sample_prints_text(dataset, tmp_path):
    out = str(tmp_path / "run")
    assert train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=40").returncode == 0
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--start=To be", "--num_samples=2",
                        "--max_new_tokens=30", "--seed=1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("To be") and len(s) >= 35 for s in samples[:2])
    bad = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--start=~~~"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not in the training vocabulary" in bad.stderr


def test_bad_settings_are_clear_errors(dataset, tmp_path):
    r = train(f"--dataset={dataset}", "--n_layr=3")
    assert r.returncode != 0 and "unknown config key 'n_layr'" in r.stderr and "n_layer" in r.stderr
    r = train(f"--dataset={dataset}", "--attn=flash")
    assert r.returncode != 0 and "GPTConfig.attn='flash'" in r.stderr
    r = train("--dataset=no_such_dataset")
    assert r.returncode != 0 and "dataset 'no_such_dataset' not found" in r.stderr
    r = train(f"--dataset={dataset}", "--gradient_accumulation_steps=0")
    assert r.returncode != 0 and "gradient_accumulation_steps=0" in r.stderr


def test_ddp_two_cpu_processes_match_one(dataset, tmp_path):
    common = [f"--dataset={dataset}", "--max_iters=10", "--eval_interval=5", "--gradient_accumulation_steps=2",
              "--attn=hyperglu", "--residual=hc"]
    one = train(*common, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, *common, f"--out_dir={tmp_path / 'two'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2 | grad accum 1 per process (2 global)" in r.stdout
    a, b = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert sorted(a) == sorted(b)
    for s in a:
        for col in ("train_loss", "val_loss"):
            if col in a[s]:
                assert abs(float(a[s][col]) - float(b[s][col])) < 1e-5, (s, col, a[s][col], b[s][col])


def test_killed_run_resumes_bitwise(dataset, tmp_path):
    args = [f"--dataset={dataset}", "--max_iters=40", "--eval_interval=6", "--dropout=0.1", "--attn=hyperglu",
            "--residual=mhc", "--n_embd=48"]
    ref = train(*args, f"--out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "train.py", *TINY, *args, f"--out_dir={out}"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # kill somewhere after the step-18 checkpoint
        if os.path.exists(os.path.join(out, "metrics.csv")) and max(losses(out), default=0) >= 21:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = max(losses(out))
    assert killed_at < 40 and not os.path.exists(os.path.join(out, "DONE"))
    r = train(*args, f"--out_dir={out}", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert losses(out) == losses(str(tmp_path / "ref"))  # the same strings: bit for bit
    assert metrics(out)[40]["val_loss"] == metrics(str(tmp_path / "ref"))[40]["val_loss"]


def test_failed_checkpoint_write_keeps_the_last_good_one(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_last.pt.tmp-20").mkdir()  # the step-20 save cannot create its temp file: a crash mid-save
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=10")
    assert r.returncode != 0 and "ckpt_last.pt.tmp-20" in r.stderr
    ck = torch.load(out / "ckpt_last.pt", weights_only=False)
    assert ck["step"] == 10
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=12", "--eval_interval=10", "--init_from=resume")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 10" in r.stdout


def test_non_finite_loss_stops_with_a_clear_message(dataset, tmp_path):
    out = tmp_path / "run"
    assert train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2").returncode == 0
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=200", "--eval_interval=2", "--init_from=resume",
              "--learning_rate=1e12", "--warmup_iters=0", "--grad_clip=0", "--weight_decay=0")
    assert r.returncode == 1, r.stdout[-2000:]
    # the step-5 update breaks the weights; step 5's own loss was computed before it
    assert "step 6: the training loss is nan" in r.stdout or "step 6: the training loss is inf" in r.stdout
    assert "ckpt_last.pt is the last good checkpoint" in r.stdout
    ck = torch.load(out / "ckpt_last.pt", weights_only=False)
    assert ck["step"] == 4 and math.isfinite(ck["best_val_loss"])
    # an eval right after the breaking update (step 5) must not checkpoint the broken weights either
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=200", "--eval_interval=1", "--init_from=resume",
              "--learning_rate=1e12", "--warmup_iters=0", "--grad_clip=0", "--weight_decay=0")
    assert r.returncode == 1 and "step 5: the validation loss is nan" in r.stdout
    ck = torch.load(out / "ckpt_last.pt", weights_only=False)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
