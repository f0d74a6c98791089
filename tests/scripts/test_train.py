"""train.py and sample.py end to end, as a user runs them: loss falls, DDP matches one process (README's command
too), a killed run resumes bit for bit, kills mid-checkpoint leave consistent checkpoints and no leftovers, a failed
checkpoint write keeps the last good one, a newcomer's first command prepares its data, sampling prints text."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from data.shards import write_shard
from data.tokenizer import char_spec, save_meta

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
                                        "amax_fwd,amax_bwd,val_acc,val_acc_macro,val_bpb,hellaswag_acc_norm")
    assert abs(float(m[60]["amax_fwd"]) - 1) < 1e-4  # mHC: rows of every H_res sum to 1, so the composite's too
    assert "amax_fwd" not in m[0]  # logged at evals after training steps
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_args"]["attn"] == "hyperglu" and cfg["torch_version"] == torch.__version__ and cfg["git_commit"]
    ck = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)  # only types the safe loader reads
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


@pytest.mark.parametrize("opt", [[], ["--optimizer=muon", "--lr_schedule=wsd"]], ids=["adamw", "muon"])
def test_ddp_two_cpu_processes_match_one(dataset, tmp_path, opt):
    common = [f"--dataset={dataset}", "--max_iters=10", "--eval_interval=5", "--gradient_accumulation_steps=2",
              "--attn=hyperglu", "--residual=hc", *opt]
    one = train(*common, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, *common, f"--out_dir={tmp_path / 'two'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2 | grad accum 1 per process (2 global)" in r.stdout
    a, b = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert sorted(a) == sorted(b)
    # Muon orthogonalizes in bf16, where the all-reduce's other summation order can round the update differently
    tol = 1e-3 if opt else 1e-5
    for s in a:
        for col in ("train_loss", "val_loss"):
            if col in a[s]:
                assert abs(float(a[s][col]) - float(b[s][col])) < tol, (s, col, a[s][col], b[s][col])


@pytest.mark.parametrize("opt", [[], ["--optimizer=muon", "--lr_schedule=wsd"]], ids=["adamw", "muon"])
def test_killed_run_resumes_bitwise(dataset, tmp_path, opt):
    args = [f"--dataset={dataset}", "--max_iters=40", "--eval_interval=6", "--dropout=0.1", "--attn=hyperglu",
            "--residual=mhc", "--n_embd=48", *opt]
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
    a, b = (torch.load(os.path.join(d, "ckpt_last.pt"), weights_only=True) for d in (out, tmp_path / "ref"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert sorted(a["optimizer"]) == (["adamw", "muon"] if opt else ["param_groups", "state"])
    states = lambda ck: [ck["optimizer"][k]["state"] for k in ("adamw", "muon")] if opt else [ck["optimizer"]["state"]]
    for sa, sb in zip(states(a), states(b)):  # both optimizers' moments and momentum buffers, bit for bit
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize("opt", [["--optimizer=adamw"], ["--optimizer=muon", "--lr_schedule=wsd"]],
                         ids=["adamw", "muon"])
def test_each_optimizer_trains_the_quickstart_model(dataset, tmp_path, opt):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "train.py", "config/quickstart.py", f"--dataset={dataset}", "--vocab_size=None",
                        "--batch_size=8", "--block_size=64", "--max_iters=30", "--warmup_iters=5", "--eval_interval=30",
                        "--eval_iters=2", "--log_interval=1", f"--out_dir={out}", *opt], cwd=REPO,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    assert ("num Muon parameter tensors: 40" in r.stdout) == ("--optimizer=muon" in opt)
    m = metrics(out)
    assert float(m[30]["val_loss"]) < float(m[0]["val_loss"]) - 1.0
    assert float(m[30]["train_loss"]) < float(m[1]["train_loss"]) - 1.0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["optimizer"] == opt[0].split("=")[1]
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                            text=True).stdout  # edits to tracked files make the tree dirty; untracked files do not
    assert cfg["git_dirty"] is bool(status.strip())


def test_wsd_schedule_and_muon_learning_rate(dataset, tmp_path):
    """wsd: warmup to learning_rate, constant, then linear to min_lr over the last warmdown_frac of the steps. The
    metrics.csv row of step s holds the lr step s trained with, get_lr(s - 1); Muon's group runs the same shape
    at muon_lr / learning_rate times it."""
    out = str(tmp_path / "run")
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=20", "--warmup_iters=4",
              "--learning_rate=1e-3", "--min_lr=1e-4", "--lr_schedule=wsd", "--warmdown_frac=0.25",
              "--optimizer=muon", "--muon_lr=0.05")
    assert r.returncode == 0, r.stderr
    lr = {s - 1: float(row["lr"]) for s, row in metrics(out).items() if "lr" in row}
    assert lr[0] == pytest.approx(1e-3 / 5) and lr[3] == pytest.approx(1e-3 * 4 / 5)  # warmup (it + 1) / (n + 1)
    assert lr[4] == lr[14] == 1e-3                                                 # constant until 20 - 5
    assert lr[15] == 1e-3 and lr[16] == pytest.approx(1e-4 + 0.8 * 9e-4)           # then linear, 1/5 per step
    assert lr[19] == pytest.approx(1e-4 + 0.2 * 9e-4)                              # min_lr at step 20
    ck = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    assert ck["optimizer"]["muon"]["param_groups"][0]["lr"] == pytest.approx(lr[19] * 50)
    assert [g["lr"] for g in ck["optimizer"]["adamw"]["param_groups"]] == [lr[19]] * 2


def test_resume_keeps_the_optimizer(dataset, tmp_path):
    """A checkpoint from before the optimizer setting (AdamW's state alone, groups without lr_scale, no optimizer
    in its config) resumes as AdamW; resuming with another optimizer than the checkpoint's is an error."""
    out = tmp_path / "run"
    assert train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=4").returncode == 0
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    for group in ck["optimizer"]["param_groups"]:
        del group["lr_scale"]
    for k in ("optimizer", "muon_lr", "muon_momentum", "warmdown_frac"):
        del ck["config"][k]
    torch.save(ck, out / "ckpt_last.pt")
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=6", "--init_from=resume",
              "--optimizer=muon")
    assert r.returncode == 1 and "optimizer: 'adamw' -> 'muon'" in r.stderr and "Traceback" not in r.stderr
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=6", "--init_from=resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert sorted(metrics(str(out))) == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("attn", ["softmax", "hyperglu", "hypermlp"])
@pytest.mark.parametrize("residual", ["plain", "hc", "mhc"])
def test_muon_groups_cover_every_parameter_once(attn, residual):
    """Muon takes the weights of the blocks' nn.Linear layers and nothing else; AdamW the rest; no parameter twice,
    none left out (wte and lm_head are one tensor)."""
    from model import GPT, GPTConfig
    from optim import MuonAdamW
    model = GPT(GPTConfig(attn=attn, residual=residual, n_layer=2, n_head=2, n_embd=32, block_size=16,
                          vocab_size=40, use_kv_conv=True, use_qk_gate=True, use_vo_gate=True))
    opt, _ = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 0.02, 0.95)
    assert isinstance(opt, MuonAdamW)
    muon = [id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]]
    adamw = [id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]]
    everything = [id(p) for p in model.parameters()]
    assert sorted(muon + adamw) == sorted(everything)
    names = {id(p): n for n, p in model.named_parameters()}
    linear = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)}
    assert set(muon) == linear and len(muon) >= 2 * 4
    kept = {names[i].split(".")[-1] for i in adamw}
    assert {"wte", "wpe"} <= {names[i].split(".")[1] for i in adamw}
    if residual == "hc":
        assert {"static_alpha", "static_beta", "W_alpha", "W_beta", "s_alpha", "s_beta"} <= kept
    if residual == "mhc":
        assert {"phi", "alpha_pre", "b_res"} <= kept
    if attn != "softmax":
        assert {"U", "Vt", "d"} <= kept
    assert all(".conv." not in names[i] for i in muon)
    plain, _ = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")  # the default: AdamW alone, as before
    assert isinstance(plain, torch.optim.AdamW)
    assert sorted(id(p) for g in plain.param_groups for p in g["params"]) == sorted(everything)


# Runs train.py with the writes to one file failing (EIO) after 1000 bytes: FAIL_AT names the file's end
FAILING = """
import errno, io, os, runpy, sys
_open = io.open
class Failing:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        if self.n + len(b) > 1000:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
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
    return Failing(f) if "w" in mode and str(file).endswith(os.environ["FAIL_AT"]) else f
io.open = __builtins__.open = open_
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_failed_checkpoint_write_keeps_the_last_good_one(dataset, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", FAILING, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out}",
                        "--max_iters=30", "--eval_interval=10"], cwd=REPO, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, FAIL_AT="ckpt_last.pt.tmp-20"))  # the step-20 save fails midway
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"error: writing {out}/ckpt_last.pt failed: Input/output error (the partial file is "
                                f"removed). Free space, or fix {out}; {out}/ckpt_last.pt (step 10) is the last good "
                                f"checkpoint; resume from it (--init_from=resume)")
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert ck["step"] == 10
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=12", "--eval_interval=10", "--init_from=resume")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 10" in r.stdout


def test_non_finite_loss_stops_with_a_clear_message(dataset, tmp_path):
    out = tmp_path / "run"
    assert train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2").returncode == 0
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=200", "--eval_interval=2", "--init_from=resume",
              "--learning_rate=1e12", "--warmup_iters=0", "--grad_clip=0", "--weight_decay=0")
    assert r.returncode == 1, r.stdout[-2000:]
    # the step-5 update breaks the weights; step 5's own loss was computed before it: one error line
    assert r.stderr.startswith(("error: step 6: the training loss is nan", "error: step 6: the training loss is inf"))
    assert f"{out}/ckpt_last.pt (step 4) is the last good checkpoint" in r.stderr and len(r.stderr.splitlines()) == 1
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert ck["step"] == 4 and math.isfinite(ck["best_val_loss"])
    # an eval right after the breaking update (step 5) must not checkpoint the broken weights either
    r = train(f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=200", "--eval_interval=1", "--init_from=resume",
              "--learning_rate=1e12", "--warmup_iters=0", "--grad_clip=0", "--weight_decay=0")
    assert r.returncode == 1 and "step 5: the validation loss is nan" in r.stderr
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------- README's commands, kills, leftovers

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
QUICK = ["--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--n_layer=1", "--block_size=32"]


def test_readme_ddp_command_works_and_matches_one_process(tmp_path):
    """README's CPU DDP command as written (gradient_accumulation_steps=1 under 2 processes: the micro-batch of 16 is
    split 8 + 8), shortened by overrides; it reproduces one process and prints model.py's lines once."""
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "config/quickstart.py", *QUICK,
                        f"--out_dir={tmp_path / 'two'}"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "each micro-step's batch_size=16 rows are split over them: 8 rows per process" in r.stdout
    assert r.stdout.count("num decayed parameter tensors") == 1
    assert "terminate called" not in r.stderr and os.path.isfile(tmp_path / "two" / "DONE")
    one = subprocess.run([sys.executable, "train.py", "config/quickstart.py", *QUICK, f"--out_dir={tmp_path / 'one'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    a, b = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for s in a:
        for col in ("train_loss", "val_loss"):
            if col in a[s]:
                assert abs(float(a[s][col]) - float(b[s][col])) < 1e-5, (s, col, a[s][col], b[s][col])
    # rank 0 refuses the folder (a scratch run over checkpoints): one error line, and rank 1 stops cleanly with it
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "config/quickstart.py", *QUICK,
                        f"--out_dir={tmp_path / 'two'}"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: out_dir") and "holds the checkpoints" in errors[0]
    assert 'train.py", line' not in r.stderr  # no traceback from either rank (torchrun prints its own summary)
    # an accumulation that cannot split over 2 processes: one error line, not one per rank on a shared line
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "config/quickstart.py", *QUICK,
                        "--gradient_accumulation_steps=3", f"--out_dir={tmp_path / 'three'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode != 0 and len(errors) == 1 and errors[0].startswith("error: gradient_accumulation_steps=3")
    assert not os.path.exists(tmp_path / "three")


def test_quickstart_prepares_the_embedded_dataset_when_missing(tmp_path):
    """A newcomer's first command in a fresh checkout, without the prepare step."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", "out", "*.bin", "*.pkl", "meta.json", "results",
                                                              "__pycache__", ".pytest_cache"))
    assert not os.path.exists(tree / "data" / "pystdlib" / "train.bin")
    r = subprocess.run([sys.executable, "train.py", "config/quickstart.py", *QUICK, "--out_dir=out/q"], cwd=tree,
                       capture_output=True, text=True, timeout=240, env=dict(os.environ, HYPERGLU_FUSED="0"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "dataset pystdlib is not prepared yet; preparing it now" in r.stdout
    assert os.path.isfile(tree / "data" / "pystdlib" / "train.bin") and os.path.isfile(tree / "out" / "q" / "DONE")


# Runs train.py and SIGKILLs it at a chosen moment of a checkpoint write: KILL_AT=save:N dies inside the N-th
# torch.save, after half a file went to its temp file; KILL_AT=replace:N dies right after the N-th rename onto a .pt.
KILLER = """
import os, runpy, signal, sys, torch
what, at = os.environ["KILL_AT"].split(":")
seen = [0]
def nth():
    seen[0] += 1
    return seen[0] == int(at)
real_save, real_replace = torch.save, os.replace
def save(obj, f, *a, **k):
    if what == "save" and nth():
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
def replace(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if what == "replace" and str(dst).endswith(".pt") and nth():
        os.kill(os.getpid(), signal.SIGKILL)
torch.save, os.replace = save, replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kills_during_checkpoint_writes_leave_a_consistent_resumable_run(dataset, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"--dataset={dataset}", f"--out_dir={out}", "--eval_interval=2"]

    def killed(kill_at, *more):
        r = subprocess.run([sys.executable, "-c", KILLER, "train.py", *args, *more], cwd=REPO, capture_output=True,
                           text=True, timeout=180, env=dict(os.environ, KILL_AT=kill_at))
        assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
        return r

    def ckpts():
        return [torch.load(out / f"ckpt_{n}.pt", weights_only=True) for n in ("last", "best")]

    def leftovers():
        return sorted(n for n in os.listdir(out) if ".tmp-" in n or n in ("DONE", "LOCK"))

    killed("save:3", "--max_iters=8")  # step 2 wrote best and last; step 4 dies writing ckpt_best
    assert leftovers() == ["LOCK", "ckpt_best.pt.tmp-4"]  # a stale lock (its process is gone) and half a file
    r = killed("replace:1", "--max_iters=8", "--init_from=resume")  # step 4: dies between ckpt_best and ckpt_last
    assert f"removed {out}/ckpt_best.pt.tmp-4, left by an interrupted checkpoint write" in r.stdout
    assert "was left by a run that ended without releasing it" in r.stdout
    last, best = ckpts()
    assert (last["step"], best["step"]) == (2, 4)
    assert best["best_val_loss"] <= last["best_val_loss"]  # whatever ckpt_last records is already on disk

    r = train(*args[len(TINY):], "--max_iters=8", "--init_from=resume")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at step 2" in r.stdout, r.stderr
    assert leftovers() == ["DONE"]
    last, best = ckpts()
    assert last["step"] == 8 and last["best_val_loss"] == best["best_val_loss"]
    vals = {s: float(row["val_loss"]) for s, row in metrics(str(out)).items() if "val_loss" in row}
    assert best["step"] == min(vals, key=vals.get) and best["best_val_loss"] == min(vals.values())

    r = killed("save:1", "--max_iters=12", "--init_from=resume")  # a finished run goes on, and dies at step 10
    assert "max_iters: 8 -> 12" in r.stdout
    # before its first checkpoint file: the folder still holds the finished 8-step run, and its DONE
    assert leftovers() in (["DONE", "LOCK", "ckpt_best.pt.tmp-10"], ["DONE", "LOCK", "ckpt_last.pt.tmp-10"])
    assert json.load(open(out / "DONE"))["step"] == 8 and ckpts()[0]["step"] == 8
    r = train(*args[len(TINY):], "--max_iters=12", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert leftovers() == ["DONE"] and json.load(open(out / "DONE"))["step"] == 12
    last, best = ckpts()
    assert last["step"] == 12 and last["best_val_loss"] == best["best_val_loss"]


def test_overwrite_moves_the_earlier_run_aside(dataset, tmp_path):
    out = tmp_path / "run"
    args = [f"--dataset={dataset}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"]
    assert train(*args).returncode == 0
    first = torch.load(out / "ckpt_last.pt", weights_only=True)["model"]
    r = train(*args, "--seed=7", "--overwrite=True")
    assert r.returncode == 0 and "overwrite: moved the earlier run" in r.stdout, r.stderr
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == ["DONE", "ckpt_best.pt", "ckpt_last.pt",
                                                                            "config.json", "metrics.csv"]
    kept = torch.load(tmp_path / aside[0] / "ckpt_last.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], kept[k]) for k in first)
    assert sorted(metrics(str(out))) == [0, 1, 2]  # the new run's rows alone
