"""MAD tasks (data/mad.py): generators, answer masking, the train.py dataset, the runner's table."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from data import mad
from model import GPT, GPTConfig


def small(name):
    return replace(mad.make_task(name, "lite"), train_examples=64, test_examples=16)


@pytest.mark.parametrize("name", mad.TASKS)
@pytest.mark.parametrize("size", ["lite", "original"])
def test_shapes_ranges_and_determinism(name, size):
    t = replace(mad.make_task(name, size), train_examples=32, test_examples=8)
    x, y = mad.generate(t, "train", seed=3)
    assert x.shape == y.shape == (32, t.length) and x.dtype == y.dtype == np.int64
    assert x.min() >= 0 and x.max() < t.vocab_size
    assert ((y == mad.IGNORE) | ((y >= 0) & (y < t.vocab_size))).all()
    assert ((y != mad.IGNORE).sum(1) > 0).all(), "every example asks something"
    x2, y2 = mad.generate(t, "train", seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = mad.generate(t, "train", seed=4)
    xt, _ = mad.generate(t, "test", seed=3)
    assert not np.array_equal(x, x3) and not np.array_equal(x[:8], xt)


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall"])
def test_recall_answers_are_the_repeated_keys(name):
    t = small(name)
    V = t.vocab_size - t.noise_vocab
    K = V // 2
    x, y = mad.generate(t, "train", seed=0)
    for xs, ys in zip(x, y):
        tokens = np.append(xs, ys[-1])  # the probe's value is the last answer
        assert ys[-1] != mad.IGNORE
        seen = {}
        for i in range(0, len(tokens), 2):
            k, v = tokens[i], tokens[i + 1]
            if k >= V:  # a noise pair: both tokens noise, never asked
                assert v >= V and ys[i] == mad.IGNORE
                continue
            assert k < K and K <= v < V
            asked = k in seen                 # shown before in a real pair
            assert seen.setdefault(k, v) == v, "a key keeps its value within a sequence"
            assert ys[i] == (v if asked else mad.IGNORE), (i, tokens[:i + 2], ys[i])
        assert (ys[1::2] == mad.IGNORE).all(), "value positions are never asked"
    if name == "noisy_recall":
        share = (x >= V).mean()
        assert 0.1 < share < 0.3, share  # frac_noise 0.2 of the pairs


def test_fuzzy_recall_answers_are_value_motifs_of_repeated_keys():
    t = small("fuzzy_recall")
    K, pad = (t.vocab_size - 1) // 2, t.vocab_size - 1
    for split in ("train", "test"):
        x, y = mad.generate(t, split, seed=1)
        for xs, ys in zip(x, y):
            answers = ys[ys != mad.IGNORE]
            assert ((answers >= K) & (answers < pad)).all(), "only value tokens are asked"
            assert ys[-1] != mad.IGNORE, "the final probe's value is asked"
            body = xs[xs != pad]
            assert (xs[:len(xs) - len(body)] == pad).all(), "padding is on the left only"
            # the key right before the final value motif occurred earlier with the same value
            j = len(ys) - 1
            while j >= 0 and ys[j] != mad.IGNORE:
                j -= 1
            value, key, i = [int(v) for v in ys[j + 1:]], [], j + 1   # x[j + 1] is the probe key's last token
            while i >= 0 and xs[i] < K:
                key.insert(0, int(xs[i]))
                i -= 1
            assert 1 <= len(key) <= t.motif and (len(key) == t.motif or split == "train")
            before = " " + " ".join(map(str, xs[:i + 1])) + " "
            assert " " + " ".join(map(str, key + value)) + " " in before, (key, value)


@pytest.mark.parametrize("layout", ["madlab", "scatter"])
def test_selective_copying_answers_are_the_tokens_in_order(layout):
    t = replace(small("selective_copying"), train_examples=200, copy_layout=layout)
    blank, marker, n = t.vocab_size - 2, t.vocab_size - 1, t.copy_tokens
    region = t.seq_len - n - 1
    x, y = mad.generate(t, "train", seed=2)
    for xs, ys in zip(x, y):
        assert xs[region] == marker and (xs[region + 1:] == blank).all()
        content = xs[:region][xs[:region] != blank]
        assert len(content) == n and (content < blank).all()
        assert (ys[:region + 1] == mad.IGNORE).all() and np.array_equal(ys[region + 1:], content)
    # mad-lab inserts every blank in front of one of the tokens, so the last token always precedes the marker
    # (the uniform scatter puts a blank there with probability 1 - n / region, 85% at the lite size)
    last_before_marker = x[:, region - 1] != blank
    assert last_before_marker.all() if layout == "madlab" else last_before_marker.mean() < 0.3
    assert mad.make_task("selective_copying", args=f"copy_layout={layout}").copy_layout == layout


def test_compression_and_memorization_answers():
    t = small("compression")
    x, y = mad.generate(t, "train", seed=5)
    n = t.seq_len - 1
    assert (x[:, n] == t.vocab_size - 1).all() and (x[:, n + 1:] == t.vocab_size - 2).all()
    assert (y[:, :n] == mad.IGNORE).all() and np.array_equal(y[:, n:], x[:, :n])
    t = small("memorization")
    x, y = mad.generate(t, "train", seed=5)
    xt, yt = mad.generate(t, "test", seed=5)
    table = {}
    for xs, ys in ((x, y), (xt, yt)):
        assert (xs[:, 1::2] == t.vocab_size - 1).all() and (ys[:, ::2] == mad.IGNORE).all()
        for k, v in zip(xs[:, ::2].ravel(), ys[:, 1::2].ravel()):
            assert table.setdefault(k, v) == v, "one fixed map for every example and both splits"
    assert len(set(table.values())) == len(table), "distinct values"


def test_answer_masking_on_a_hand_made_example():
    # 1 sequence of 4 positions; answers at positions 1 and 3 only
    y = torch.tensor([[-1, 2, -1, 0]])
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 0, 1] = logits[0, 2, 1] = 5.0   # wrong at the ignored positions: must not count
    logits[0, 1, 2] = 5.0                     # right
    logits[0, 3, 1] = 5.0                     # wrong (answer is 0)
    correct, counted = mad.answer_hits(logits, y)
    assert (correct.item(), counted.item()) == (1, 2)
    # the model's loss is the cross-entropy over the answer positions only
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    y = torch.tensor([[-1, 3, -1, -1, 7, -1]])
    logits, loss = model(x, y)
    manual = (F.cross_entropy(logits[0, 1], torch.tensor(3)) + F.cross_entropy(logits[0, 4], torch.tensor(7))) / 2
    assert torch.allclose(loss, manual)
    y2 = y.clone()
    y2[0, 0] = -1
    _, loss2 = model(x, torch.where(y == -1, -1, y))
    assert torch.equal(loss, loss2)


def test_macro_accuracy_on_hand_made_batches():
    """mad-lab's macro score against the plain (micro) one, both worked out by hand."""
    def logits_for(pred, C=4):
        return F.one_hot(torch.tensor(pred), C).float()[None]
    # 100 answers: 99 of class 0, all right; the one answer of class 1 predicted as 0. Micro 99%; macro averages
    # the recalls of classes 0 (1.0) and 1 (0.0): 50%. Classes 2 and 3 occur nowhere and are left out.
    y = torch.tensor([[0] * 99 + [1]])
    logits = logits_for([0] * 100)
    correct, counted = mad.answer_hits(logits, y)
    assert correct / counted == pytest.approx(0.99)
    assert mad.macro_accuracy(logits, y).item() == pytest.approx(0.5)
    # answers 2, 2, 3 (ignored positions in between, predicted wrong: they must not count), predictions 2, 1, 3:
    # recall 1/2 for class 2, 1 for class 3, and 0 for class 1, predicted but never an answer: macro (0.5 + 1 + 0) / 3
    y = torch.tensor([[2, -1, 2, -1, 3]])
    logits = logits_for([2, 0, 1, 0, 3])
    assert mad.macro_accuracy(logits, y).item() == pytest.approx(0.5)
    assert mad.answer_hits(logits, y)[0].item() == 2
    assert mad.macro_accuracy(logits, torch.full_like(y, -1)).item() == 0.0  # no answers: 0, as torchmetrics


def test_loader_is_a_pure_function_of_the_row():
    t = small("in_context_recall")
    a = mad.Loader(t, batch_size=8, accum=1, seed=1)
    b = mad.Loader(t, batch_size=8, accum=1, seed=1, row0=5 * 8)
    for step in range(12):  # past the end of an epoch (64 examples = 8 steps)
        xa, ya = a.batch(step + 5, 0)
        xb, yb = b.batch(step, 0)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    rows = torch.cat([a.batch(s, 0)[0] for s in range(8)])  # one epoch sees every example once
    assert len({tuple(r.tolist()) for r in rows}) == len({tuple(r) for r in a.x.tolist()})
    r0, r1 = mad.Loader(t, 4, 1, rank=0, world=2, seed=1), mad.Loader(t, 4, 1, rank=1, world=2, seed=1)
    assert torch.equal(torch.cat([r0.batch(0, 0)[0], r1.batch(0, 0)[0]]), a.batch(0, 0)[0])


def test_bad_task_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown MAD task; expected one of in_context_recall"):
        mad.make_task("recall")
    with pytest.raises(ValueError, match="mad_args: 'seqlen=3' is not field=value"):
        mad.make_task("compression", args="seqlen=3")
    with pytest.raises(ValueError, match="seq_len must exceed 2 \\* copy_tokens \\+ 1"):
        mad.make_task("selective_copying", args="seq_len=16,copy_tokens=8")
    with pytest.raises(ValueError, match="copy_layout must be 'madlab' or 'scatter'"):
        mad.make_task("selective_copying", args="copy_layout=even")
    with pytest.raises(ValueError, match="mad_size='big'"):
        mad.make_task("compression", "big")
    assert mad.make_task("noisy_recall", "original", "frac_noise=0.4,seq_len=256").length == 255


def train(*args):
    return subprocess.run([sys.executable, "train.py", "--device=cpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180)


def test_trivial_task_reaches_full_accuracy_and_is_logged(tmp_path):
    """Memorising a 4-key map: a tiny model gets every answer right in seconds; untrained, it does not."""
    out = str(tmp_path / "run")
    r = train("--dataset=mad:memorization", "--mad_args=vocab_size=9,seq_len=8,train_examples=64,test_examples=32",
              "--block_size=8", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=16", "--max_iters=80",
              "--eval_interval=40", "--learning_rate=1e-2", "--warmup_iters=5", "--min_lr=1e-3",
              "--weight_decay=0", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr + r.stdout
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["val_acc"]]
    assert [int(row["step"]) for row in rows] == [0, 40, 80]
    assert float(rows[0]["val_acc"]) < 0.6 and float(rows[-1]["val_acc"]) == 1.0
    assert float(rows[0]["val_acc_macro"]) < 0.6 and float(rows[-1]["val_acc_macro"]) == 1.0
    assert "accuracy 1.0000 (macro 1.0000)" in r.stdout
    with open(os.path.join(out, "DONE")) as f:
        assert json.load(f)["val_acc_macro"] == 1.0
    bad = train("--dataset=mad:compression", "--block_size=8", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "block_size=8 is shorter than the mad:compression examples (length 30)" in bad.stderr
    bad = train("--dataset=mad:copying", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "unknown MAD task" in bad.stderr
    s = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert s.returncode != 0 and "MAD task memorization" in s.stderr


def test_ddp_two_processes_match_one_on_a_mad_task(tmp_path):
    # 22 test examples in batches of 4: the last batch holds 2, so the macro score's batch weights matter
    common = ["--dataset=mad:compression", "--mad_args=seq_len=9,train_examples=64,test_examples=22", "--block_size=16",
              "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--gradient_accumulation_steps=2",
              "--max_iters=6", "--eval_interval=3", "--attn=hyperglu", "--op1_rank=2", "--op2_rank=2",
              "--warmup_iters=0", "--learning_rate=3e-2"]  # moved enough for scores above 0
    one = train(*common, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--device=cpu", *common, f"--out_dir={tmp_path / 'two'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = []
    for run in ("one", "two"):
        with open(tmp_path / run / "metrics.csv") as f:
            rows.append([r for r in csv.DictReader(f) if r["val_acc"]])
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == ["0", "3", "6"]
    for a, b in zip(*rows):
        assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-5
        assert abs(float(a["val_acc"]) - float(b["val_acc"])) < 1e-9
        assert abs(float(a["val_acc_macro"]) - float(b["val_acc_macro"])) < 1e-9
    # the logged macro score is the per-batch score averaged with batch-size weights (mad-lab's Lightning logging)
    from checkpoint import load_checkpoint, load_model
    path = str(tmp_path / "one" / "ckpt_last.pt")
    model = load_model(load_checkpoint(path), path).eval()
    task = mad.make_task("compression", "lite", "seq_len=9,train_examples=64,test_examples=22")
    with torch.no_grad():
        scores = [(mad.macro_accuracy(model(x, y)[0], y).item(), len(x)) for x, y in mad.val_batches(task, 4, 1337)]
    assert [n for _, n in scores] == [4, 4, 4, 4, 4, 2]
    weighted = sum(m * n for m, n in scores) / 22
    assert float(rows[0][-1]["val_acc_macro"]) == pytest.approx(weighted, abs=1e-6)
    assert abs(sum(m for m, _ in scores) / len(scores) - weighted) > 1e-4  # the plain mean would differ


def test_resumed_mad_run_matches_an_uninterrupted_one(tmp_path):
    common = ["--dataset=mad:in_context_recall", "--mad_args=seq_len=16,train_examples=24,test_examples=16",
              "--block_size=15", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=8", "--eval_interval=5",
              "--lr_decay_iters=20", "--attn=hyperglu", "--op1_rank=2", "--op2_rank=2", "--dropout=0.1"]
    full = train(*common, "--max_iters=20", f"--out_dir={tmp_path / 'full'}")
    first = train(*common, "--max_iters=10", f"--out_dir={tmp_path / 'part'}")
    rest = train(*common, "--max_iters=20", "--init_from=resume", f"--out_dir={tmp_path / 'part'}")
    assert full.returncode == first.returncode == rest.returncode == 0, rest.stderr
    rows = []
    for run in ("full", "part"):
        with open(tmp_path / run / "metrics.csv") as f:
            rows.append({r["step"]: r for r in csv.DictReader(f)})
    for step in ("15", "20"):  # past an epoch boundary (24 examples = 3 steps)
        assert rows[0][step]["val_loss"] == rows[1][step]["val_loss"]
        assert rows[0][step]["val_acc"] == rows[1][step]["val_acc"]


def fake_run(root, variant, task, lr, acc, macro=None, seed=1337, done=True, **model):
    d = os.path.join(root, variant, task, f"lr{lr}-s{seed}")
    os.makedirs(d)
    args = {"attn": "softmax", "n_embd": 128, "residual": "plain", **model}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"dataset": f"mad:{task}", "learning_rate": lr, "weight_decay": 0.0, "seed": seed,
                   "model_args": args}, f)
    scores = {"val_acc": acc} if macro is None else {"val_acc": acc, "val_acc_macro": macro}  # older runs: no macro
    with open(os.path.join(d, "metrics.csv"), "w") as f:
        f.write("step,val_loss," + ",".join(scores) + "\n" + "0,2.0" + ",0.1" * len(scores) + "\n")
        f.write("10,1.0," + ",".join(map(str, scores.values())) + "\n")
    if done:
        open(os.path.join(d, "DONE"), "w").close()


def test_table_scores_macro_best_per_seed_then_mean_with_micro_beside(tmp_path, capsys):
    from plots.plot_mad import main
    root = str(tmp_path / "runs")
    for i, task in enumerate(mad.TASKS):
        for seed, shift in ((1337, 0.0), (1338, 0.1)):
            fake_run(root, "S", task, 1e-3, 0.6, macro=0.5 + shift, seed=seed)
            fake_run(root, "S", task, 3e-3, 0.6 + 0.05 * i, macro=0.4 + shift, seed=seed)
    # R: its sweep moves selective copying by 50 points, more than the gap to S there (35); elsewhere it does not
    # move R, and S's spread (10) stays below the gap (15)
    for task in mad.TASKS:
        copy = task == "selective_copying"
        fake_run(root, "R", task, 1e-3, 0.9, macro=0.9 if copy else 0.7, attn="hypermlp", qk_rank=32)
        fake_run(root, "R", task, 3e-3, 0.4, macro=0.4 if copy else 0.7, attn="hypermlp", qk_rank=32)
    fake_run(root, "G", "memorization", 1e-3, 0.9, attn="hyperglu", qk_rank=32)   # predates val_acc_macro
    fake_run(root, "S", "memorization", 1e-2, 0.99, macro=0.99, done=False)       # unfinished: left out
    main([root])
    assert "not finished" in capsys.readouterr().out
    with open(os.path.join(root, "mad.csv")) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    s, r, g = rows["S"], rows["R-cg-q-12o"], rows["G-cg-q-12o"]
    assert float(s["memorization"]) == pytest.approx(55.0)        # best per seed (50, 60), then the mean
    assert float(s["memorization_micro"]) == pytest.approx(100 * (0.6 + 0.05 * 5))
    assert float(s["avg"]) == pytest.approx(55.0) and s["seeds"] == "2" and s["memorization_lr"] == "0.001"
    assert float(s["avg_micro"]) == pytest.approx(100 * (0.6 + 0.05 * 2.5))
    assert g["memorization"] == "" and float(g["memorization_micro"]) == pytest.approx(90.0), "no macro: missing"
    assert g["avg"] == g["avg_micro"] == "" and g["in_context_recall"] == ""
    assert r["note"] == "sel. copy (50.0)" and s["note"] == ""
    md = open(os.path.join(root, "mad.md")).read()
    assert "| G-cg-q-12o | 1 | – | – | – | – | – | – (90.0) | – |" in md
    assert "| 55.0 (60.0) |" in md and "sel. copy (50.0)" in md
    assert os.path.getsize(os.path.join(root, "mad.png")) > 0


def test_runner_builds_the_sweep(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scripts.run_mad", "--dry_run", "--tasks=compression,memorization",
                        "--variants=S,G-cg-q-12o", f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 * 2 * 2  # tasks x variants x lite learning rates
    comp = [ln for ln in lines if "--dataset=mad:compression" in ln]
    assert len(comp) == 4 and all("--block_size=30" in ln and "--max_iters=512" in ln for ln in comp)
    mem = [ln for ln in lines if "--dataset=mad:memorization" in ln]
    assert all("--max_iters=256" in ln and "--mlp=swiglu" in ln and "--n_embd=128" in ln for ln in mem)
    hyper = [ln for ln in lines if "--attn=hyperglu" in ln]
    assert len(hyper) == 4 and all("--qk_rank=" in ln and "--n_head=2" in ln for ln in hyper)
    assert {ln.split("--learning_rate=")[1].split()[0] for ln in lines} == {"0.001", "0.003"}
    bad = subprocess.run([sys.executable, "-m", "scripts.run_mad", "--dry_run", "--variants=Q"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown variants ['Q']" in bad.stderr
    r = subprocess.run([sys.executable, "-m", "scripts.run_mad", "--dry_run", "--tasks=compression", "--variants=S",
                        "--lrs=1e-3", "--seeds=1337,1338", f"--out={tmp_path}"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    runs = sorted((ln.split("--seed=")[1].split()[0], ln.split("--out_dir=")[1].split()[0])
                  for ln in r.stdout.strip().splitlines())
    assert runs == [("1337", f"{tmp_path}/mad-lite/S/compression/lr0.001-wd0"),
                    ("1338", f"{tmp_path}/mad-lite/S/compression/lr0.001-wd0-s1338")]
    bad = subprocess.run([sys.executable, "-m", "scripts.run_mad", "--dry_run", "--seeds=1,x"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "error: --seeds='1,x' is not a comma-separated list of integers" in bad.stderr
