"""HellaSwag as llm.c scores it (hellaswag.py, eval.py, data/hellaswag/prepare.py), on hand-written examples in
rowanz's public jsonl schema: the batched scoring equals a direct per-ending loss for every attention x residual,
a model that prefers ending k picks k, eval.py prints its metrics and JSON (one process and torchrun alike), and
bad input is one `error:` line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hellaswag
from conftest import BYTES, HELLASWAG, R50K, REPO, VARIANTS, bytes_model, save_run, write_jsonl
from data.tokenizer import char_spec, encoder
from model import GPTConfig


def direct_losses(model, example, encode):
    """The per-ending (summed loss, tokens), one ending at a time, from the full forward's log-softmax."""
    ctx, endings, _ = example
    out = []
    for e in endings:
        c, end = encode(ctx), encode(" " + e)
        tokens = torch.tensor((c + end)[-(model.config.block_size + 1):])
        n = min(len(end), len(tokens) - 1)
        with torch.no_grad():
            logits, _ = model(tokens[None, :-1], tokens[None, 1:])
        logp = F.log_softmax(logits[0].double(), -1)
        nll = -logp[torch.arange(len(tokens) - 1), tokens[1:]]
        out.append((nll[-n:].sum().item(), n))
    return out


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_batched_scoring_equals_direct_per_ending_loss(tmp_path, cfg):
    examples = hellaswag.load(write_jsonl(tmp_path / "hs.jsonl"))
    encode, _ = encoder(BYTES)
    model = bytes_model(**cfg)
    got = hellaswag.ending_losses(model, examples, encode, model.config.block_size, "cpu", batch_size=3)
    assert sorted(got) == list(range(len(examples)))
    for i, ex in enumerate(examples):
        want = direct_losses(model, ex, encode)
        assert [n for _, n in got[i]] == [n for _, n in want]
        for (s, _), (w, _) in zip(got[i], want):
            assert s == pytest.approx(w, rel=1e-5)
    # the fixture's last context is longer than block_size: its rows are cut to block_size + 1 tokens
    assert max(len(t) for t, _ in hellaswag.render(examples[3], encode, 64)) == 65


class Prefers(torch.nn.Module):
    """A stand-in model that prefers ending k of every example: it puts its mass on the next byte of ending k's row
    wherever the row so far is a prefix of it (and spreads it evenly elsewhere). config.block_size as GPT's."""

    def __init__(self, examples, k, block_size=64):
        super().__init__()
        self.config = GPTConfig(vocab_size=256, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.rows = [list((ex[0] + " " + ex[1][k]).encode())[-(block_size + 1):] for ex in examples]

    def forward(self, x, targets=None):
        logits = torch.zeros(*x.shape, 256)
        for b, row in enumerate(x.tolist()):
            for want in self.rows:
                for t in range(len(row)):
                    if row[:t + 1] == want[:t + 1] and t + 1 < len(want):
                        logits[b, t, want[t + 1]] = 20.0
        return logits, None


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_a_model_that_prefers_ending_k_picks_it(tmp_path, k):
    examples = hellaswag.load(write_jsonl(tmp_path / "hs.jsonl"))
    encode, _ = encoder(BYTES)
    losses = hellaswag.ending_losses(Prefers(examples, k), examples, encode, 64, "cpu", batch_size=2)
    assert all(hellaswag.predictions(losses[i]) == (k, k) for i in losses)
    count, acc, norm = hellaswag.tally(examples, losses)
    right = sum(ex[2] == k for ex in examples)  # labels are 1, 3, 0, 2: one example each
    assert (count, acc, norm) == (4, right, right)


def test_acc_sums_and_acc_norm_averages():
    """Ending 0 has the lower sum, ending 1 the lower mean per token: acc picks 0, acc_norm 1 (llm.c's rule)."""
    assert hellaswag.predictions([(6.0, 2), (8.0, 4)]) == (0, 1)
    m = hellaswag.summary(10, 3, 5)
    assert (m["acc"], m["acc_norm"], m["count"]) == (0.3, 0.5, 10)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 / 9))


@pytest.mark.parametrize("line, says", [
    ("not json", "not JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"]}), "expected an object with ctx, endings and label"),
    (json.dumps({"ctx": "a", "endings": ["b"], "label": 0}), "endings must be a list of at least 2 strings"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2}), "label=2 is not valid; expected an int 0..1"),
    (json.dumps({"ctx": "", "endings": ["b", "c"], "label": 0}), "ctx must be a non-empty string"),
])
def test_load_names_the_file_line_and_problem(tmp_path, line, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HELLASWAG[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        hellaswag.load(str(path))
    assert f"bad.jsonl: line 3: {says}" in str(e.value)


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def expected_metrics(model, examples):
    encode, _ = encoder(BYTES)
    losses = {i: direct_losses(model, ex, encode) for i, ex in enumerate(examples)}
    return hellaswag.summary(*hellaswag.tally(examples, losses))


def test_eval_py_prints_one_line_per_metric_then_json(tmp_path):
    model = bytes_model(attn="hyperglu", residual="mhc")
    run_dir = save_run(tmp_path / "run", model)
    data = write_jsonl(tmp_path / "hs.jsonl")
    r = run("eval.py", f"--out_dir={run_dir}", "--task=hellaswag", f"--input={data}", "--device=cpu", "--batch_size=5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["acc", "acc_norm", "count"]
    got = json.loads(lines[3])
    want = expected_metrics(model, hellaswag.load(data))
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert lines[2].split() == ["count", "4"]
    assert float(lines[1].split()[1]) == pytest.approx(want["acc_norm"], abs=5e-5)


def test_eval_py_under_torchrun_equals_one_process(tmp_path):
    model = bytes_model(attn="softmax", residual="hc")
    run_dir = save_run(tmp_path / "run", model)
    data = write_jsonl(tmp_path / "hs.jsonl", HELLASWAG * 2)  # 8 examples, 4 a rank
    args = ["eval.py", f"--out_dir={run_dir}", f"--input={data}", "--device=cpu"]
    one = run(*args)
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    assert b["world_size"] == 2 and b["count"] == 8
    assert {k: a[k] for k in ("acc", "acc_norm", "count")} == {k: b[k] for k in ("acc", "acc_norm", "count")}
    assert {k: a[k] for k in ("acc", "acc_norm")} == pytest.approx({k: v for k, v in expected_metrics(
        model, hellaswag.load(data)).items() if k in ("acc", "acc_norm")})


def test_eval_py_errors_are_one_line(tmp_path):
    run_dir = save_run(tmp_path / "run", bytes_model(n_layer=1))
    spec = char_spec("to be or not to be")  # a char model whose vocabulary lacks HellaSwag's characters
    chars_run = save_run(tmp_path / "chars", bytes_model(n_layer=1, vocab_size=spec["vocab_size"]), spec)
    data = write_jsonl(tmp_path / "hs.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": "a", "endings": "b"}\n')
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"--out_dir={run_dir}", f"--input={tmp_path / 'missing.jsonl'}"], "missing.jsonl cannot be read"),
        ([f"--out_dir={run_dir}", f"--input={bad}"], "bad.jsonl: line 2: expected an object with ctx, endings"),
        ([f"--out_dir={tmp_path / 'empty'}", f"--input={data}"], "no ckpt_best.pt or ckpt_last.pt in out_dir"),
        ([f"--out_dir={run_dir}", "--task=mmlu"], "task='mmlu' is not valid; expected 'hellaswag'"),
        ([f"--out_dir={run_dir}", "--limit=-1"], "limit=-1 is not valid"),
        ([f"--out_dir={chars_run}", f"--input={data}"], "HellaSwag example 1 cannot be encoded with the model's "
                                                         "tokenizer: characters not in the training vocabulary"),
    ]
    for args, says in cases:
        r = run("eval.py", "--device=cpu", *args)
        assert r.returncode == 1 and r.stdout == "", (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and says in r.stderr, (args, r.stderr)
    r = run("eval.py", "--help")
    assert r.returncode == 0 and "acc_norm" in r.stdout and "input = " in r.stdout


def test_prepare_checks_and_keeps_a_local_copy(tmp_path):
    src = write_jsonl(tmp_path / "hellaswag_val.jsonl")
    out = tmp_path / "data"
    r = run("data/hellaswag/prepare.py", f"--input={src}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "4 examples" in r.stdout
    assert (out / "hellaswag_val.jsonl").read_text() == open(src).read()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HELLASWAG[0]) + "\n{oops\n")
    r = run("data/hellaswag/prepare.py", f"--input={bad}", f"--out_dir={tmp_path / 'other'}")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "line 2: not JSON" in r.stderr, r.stderr
    assert not (tmp_path / "other" / "hellaswag_val.jsonl").exists() and os.listdir(tmp_path / "other") == []
    r = run("data/hellaswag/prepare.py", f"--input={tmp_path / 'nope.jsonl'}", f"--out_dir={tmp_path / 'other'}")
    assert r.returncode == 1 and "error: --input" in r.stderr and "not found" in r.stderr


# ---------------------------------------------------------------- in training: val_bpb, hellaswag_every, plot_loss

TRAIN = ["--device=cpu", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=64", "--batch_size=4",
         "--eval_iters=2", "--log_interval=2", "--warmup_iters=1", "--learning_rate=3e-3"]


@pytest.fixture(scope="module")
def bytes_data(tmp_path_factory):
    """A bytes dataset (header shards) from a text with HellaSwag's words, and the fixture jsonl."""
    root = tmp_path_factory.mktemp("bytes")
    text = " ".join(ex["ctx"] + " " + e for ex in HELLASWAG for e in ex["endings"]) * 12
    (root / "t.txt").write_text(text)
    r = run("data/textfile/prepare.py", f"--input={root / 't.txt'}", f"--out_dir={root / 'data'}", "--tokenizer=bytes")
    assert r.returncode == 0, r.stderr
    return str(root / "data"), write_jsonl(root / "hs.jsonl")


def rows(out_dir):
    import csv
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def test_val_bpb_is_loss_over_ln2_for_bytes_and_hellaswag_every_logs_eval_py_acc_norm(tmp_path, bytes_data):
    data, hs = bytes_data
    out = str(tmp_path / "run")
    r = run("train.py", *TRAIN, f"--dataset={data}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3",
            "--hellaswag_every=4", f"--hellaswag_file={hs}")
    assert r.returncode == 0, r.stderr
    assert "hellaswag: 4 examples" in r.stdout and "step 4: hellaswag acc_norm" in r.stdout
    m = rows(out)
    evals = [s for s, row in m.items() if row["val_loss"]]
    assert evals == [0, 3, 6]
    for s in evals:  # one byte a token: bits per byte is the loss over ln 2, exactly
        assert float(m[s]["val_bpb"]) == float(m[s]["val_loss"]) / math.log(2)
    assert [s for s, row in m.items() if row["hellaswag_acc_norm"]] == [0, 4, 6]  # 0, every 4th step, the last
    e = run("eval.py", f"--ckpt={out}/ckpt_last.pt", f"--input={hs}")
    assert e.returncode == 0, e.stderr
    assert float(m[6]["hellaswag_acc_norm"]) == json.loads(e.stdout.splitlines()[-1])["acc_norm"]


def test_token_bytes_count_the_utf8_bytes_of_the_text():
    from data.tokenizer import token_bytes
    text = "naïve café, 日本語 and plain ASCII\n"
    spec = char_spec(text)
    encode, _ = encoder(spec)
    table = token_bytes(spec)
    assert sum(table[i] for i in encode(text)) == len(text.encode("utf-8")) and max(table) == 3
    assert token_bytes(BYTES) == [1] * 256
    if os.path.isfile(R50K):  # GPT-2 BPE offline; <|endoftext|> separates documents and counts no bytes
        gpt2 = {"kind": "gpt2", "vocab_size": 50257}
        encode, _ = encoder(gpt2, R50K)
        table = token_bytes(gpt2, R50K)
        assert sum(table[i] for i in encode(text + "<|endoftext|>")) == len(text.encode("utf-8"))


def test_hellaswag_every_errors_before_the_run_folder_is_made(tmp_path, bytes_data):
    data, hs = bytes_data
    cases = [([f"--dataset={data}", f"--hellaswag_file={tmp_path / 'nope.jsonl'}"], "hellaswag_every: "),
             (["--dataset=mad:in_context_recall"], "needs a text dataset"),
             ([f"--dataset={data}", "--hellaswag_every=-1"], "hellaswag_every=-1 is not valid")]
    for args, says in cases:
        r = run("train.py", *TRAIN, "--hellaswag_every=2", *args, f"--out_dir={tmp_path / 'run'}")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_plot_loss_draws_bpb_and_hellaswag(tmp_path, bytes_data):
    from plots.plot_loss import main as plot_main
    data, hs = bytes_data
    out = str(tmp_path / "run")
    r = run("train.py", *TRAIN, f"--dataset={data}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2",
            "--hellaswag_every=2", f"--hellaswag_file={hs}")
    assert r.returncode == 0, r.stderr
    m = rows(out)
    for y, col in (("val_bpb", "final_bpb"), ("hellaswag_acc_norm", "hellaswag")):
        fig = str(tmp_path / y)
        summary = plot_main([out, f"--y={y}", f"--out={fig}"])
        assert os.path.getsize(fig + ".png") > 1000
        assert summary[0][col] == float(m[4][y])
        assert f"{float(m[4][y]):.4f}" in open(fig + ".md").read()
    with pytest.raises(SystemExit):
        plot_main([out, "--y=val_bpb", "--train", f"--out={tmp_path / 'x'}"])
