"""Shard formats, the loader, the configurator, and every prepare script on small local inputs."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import R50K, REPO
from configurator import configure
from data.shards import HEADER_BYTES, Loader, TokenStream, check_vocab, open_shard, val_batches, write_shard
from data.tokenizer import encoder, load_meta

needs_r50k = pytest.mark.skipif(not os.path.isfile(R50K), reason="needs the r50k_base.tiktoken ranks file (offline BPE)")


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- configurator

def settings():
    return dict(batch_size=12, dropout=0.1, attn="softmax", compile=None, out_dir="out", n_embd=64, decay_lr=True)


def test_config_overrides_in_order(tmp_path):
    g = settings()
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 32\nattn = 'hyperglu'\nout_dir = out_dir + '-x'\n_private = 5\nimport math\n")
    configure(g, list(g), [str(cfg), "--batch_size=8", "--dropout=0", "--compile=True", "--decay_lr=False"])
    assert g == dict(batch_size=8, dropout=0.0, attn="hyperglu", compile=True, out_dir="out-x", n_embd=64, decay_lr=False)
    assert isinstance(g["dropout"], float)
    g = settings()  # None is accepted where the default is None ("auto")
    configure(g, list(g), ["--compile=True", "--compile=None", "--attn=hypermlp"], {"compile": bool})
    assert g["compile"] is None and g["attn"] == "hypermlp"


def test_config_unknown_key_lists_closest():
    g = settings()
    with pytest.raises(ValueError, match="unknown config key 'batchsize'.*batch_size"):
        configure(g, list(g), ["--batchsize=3"])


def test_config_unknown_key_in_file(tmp_path):
    g = settings()
    cfg = tmp_path / "c.py"
    cfg.write_text("n_emdb = 3\n")
    with pytest.raises(ValueError, match="c.py.*n_emdb.*n_embd"):
        configure(g, list(g), [str(cfg)])


@pytest.mark.parametrize("arg,msg", [("--batch_size=1.5", "batch_size' expects int"),
                                     ("--dropout=abc", "dropout' expects float"),
                                     ("--decay_lr=1", "decay_lr' expects bool"),
                                     ("--compile=yes", "compile' expects bool")])
def test_config_type_errors(arg, msg):
    g = settings()
    with pytest.raises(ValueError, match=msg):
        configure(g, list(g), [arg], {"compile": bool})


def test_config_missing_file():
    g = settings()
    with pytest.raises(ValueError, match="nope.py"):
        configure(g, list(g), ["nope.py"])


def test_config_overlay_that_matched_the_budget_freezes_what_it_read(tmp_path):
    """config/hyperglu.py reads the model's size: changing it afterwards would unmatch the budget silently, so it is
    refused; what it did not read (dropout, out_dir, the residual overlays after it) stays free, and so do the
    settings of an overlay that reads nothing (config/hc.py) and what a base file derives from its own values."""
    from dataclasses import fields
    from model import GPTConfig
    model_keys = [f.name for f in fields(GPTConfig)]

    def train_globals():
        g = {f.name: f.default for f in fields(GPTConfig)}
        g.update(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, out_dir="out", dataset="d", eval_interval=1,
                 eval_iters=1, log_interval=1, gradient_accumulation_steps=1, batch_size=1, learning_rate=0.1,
                 max_iters=1, lr_decay_iters=1, min_lr=0.1, beta2=0.9, warmup_iters=1)
        return g
    recipe = ["config/shakespeare_char.py", "config/hyperglu.py", "config/mhc.py", "--dropout=0.0", "--out_dir=o"]
    g = train_globals()
    configure(g, list(g), [os.path.join(REPO, a) if a.endswith(".py") else a for a in recipe], None, model_keys)
    assert g["attn"] == "hyperglu" and g["residual"] == "mhc" and g["out_dir"] == "o" and g["n_head"] == 2
    for late in ("--n_embd=64", "--n_head=4", "--qk_rank=64", "--block_size=32", "--use_kv_conv=False"):
        g = train_globals()
        with pytest.raises(ValueError, match=f"{late} changes .* after .*config/hyperglu.py.*Put {late} before"):
            configure(g, list(g), [os.path.join(REPO, "config/hyperglu.py"), late], None, model_keys)
    g = train_globals()
    configure(g, list(g), ["--n_embd=256", "--n_head=8", os.path.join(REPO, "config/hyperglu.py")], None, model_keys)
    assert g["n_embd"] == 256 and g["n_head"] == 2
    g = train_globals()
    configure(g, list(g), [os.path.join(REPO, "config/hc.py"), "--hc_streams=8", "--hc_dynamic=False"], None, model_keys)
    assert g["hc_streams"] == 8
    base = tmp_path / "base.py"
    base.write_text("n_layer = 8\nn_embd = n_layer * 32\n")
    g = train_globals()
    configure(g, list(g), [str(base), "--n_layer=2"], None, model_keys)
    assert (g["n_layer"], g["n_embd"]) == (2, 256)


def test_config_file_errors_give_file_line_and_line(tmp_path):
    g = settings()
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 4\ndropout = (0.1\n")
    with pytest.raises(ValueError, match=r"c.py:2: .*: dropout = \(0.1$"):
        configure(g, list(g), [str(cfg)])
    cfg.write_text("batch_size = 4\ndropout = 1 / 0\n")
    with pytest.raises(ValueError, match=r"c.py:2: ZeroDivisionError: division by zero \(in: dropout = 1 / 0\)"):
        configure(g, list(g), [str(cfg)])


# ---------------------------------------------------------------- shards

def test_shard_round_trip_both_formats(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, 1000)
    write_shard(tmp_path / "a_train_000.bin", toks)
    write_shard(tmp_path / "train.bin", toks, header=False)
    assert os.path.getsize(tmp_path / "a_train_000.bin") == HEADER_BYTES + 2000
    assert np.array_equal(open_shard(str(tmp_path / "a_train_000.bin")), toks)
    assert np.array_equal(open_shard(str(tmp_path / "train.bin"), header=False), toks)


def corrupt(path, fn):
    data = bytearray(open(path, "rb").read())
    fn(data)
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage,msg", [
    (lambda d: d.__setitem__(slice(0, 4), (123).to_bytes(4, "little")), "wrong magic 123"),
    (lambda d: d.__setitem__(slice(4, 8), (7).to_bytes(4, "little")), "wrong version 7"),
    (lambda d: d.__delitem__(slice(len(d) - 10, len(d))), "header says 100 tokens"),
    (lambda d: d.__delitem__(slice(500, len(d))), "shorter than the 1024-byte header"),
])
def test_bad_shards_name_the_file_and_problem(tmp_path, damage, msg):
    path = str(tmp_path / "x_train_000000.bin")
    write_shard(path, np.arange(100))
    corrupt(path, damage)
    with pytest.raises(ValueError, match=f"x_train_000000.bin.*{msg}"):
        open_shard(path)
    with pytest.raises(ValueError, match=msg):
        TokenStream(str(tmp_path), "train")


def test_token_ids_beyond_the_vocabulary_name_the_shard(tmp_path):
    write_shard(str(tmp_path / "x_train_000000.bin"), np.arange(100) % 50)
    write_shard(str(tmp_path / "x_train_000001.bin"), np.r_[np.arange(70) % 50, 64, np.arange(29)])
    write_shard(str(tmp_path / "x_val_000000.bin"), np.arange(100) % 50)
    check_vocab(str(tmp_path), 65)
    with pytest.raises(ValueError, match="x_train_000001.bin: token id 64 \\(the first such at token 70\\) is not below "
                                         "the tokenizer's vocab_size=64"):
        check_vocab(str(tmp_path), 64)


def test_missing_shard_and_split(tmp_path):
    with pytest.raises(ValueError, match="nothere.bin: shard file not found"):
        open_shard(str(tmp_path / "nothere.bin"))
    with pytest.raises(ValueError, match="no val data"):
        TokenStream(str(tmp_path), "val")


# ---------------------------------------------------------------- loader

@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):  # three shards, so windows cross shard boundaries
        write_shard(str(tmp_path / f"d_train_{i:06d}.bin"), np.arange(i * 700, i * 700 + 700) % 60000)
    write_shard(str(tmp_path / "d_val_000000.bin"), np.arange(500))
    return str(tmp_path)


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_ranks_are_disjoint_and_cover_the_single_process_batch(shard_dir, order):
    one = Loader(shard_dir, 4, 16, accum=2, order=order)
    ranks = [Loader(shard_dir, 4, 16, accum=1, rank=r, world=2, order=order) for r in range(2)]
    for step in range(5):
        rows_one = {n for m in range(2) for n in one.rows(step, m)}
        rows_r = [set(ranks[r].rows(step, 0)) for r in range(2)]
        assert not rows_r[0] & rows_r[1]
        assert rows_r[0] | rows_r[1] == rows_one
        x1 = np.concatenate([one.batch(step, m)[0].numpy() for m in range(2)])
        x2 = np.concatenate([ranks[r].batch(step, 0)[0].numpy() for r in range(2)])
        assert np.array_equal(x1, x2)
    x, y = one.batch(0, 0)
    assert x.shape == (4, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_sequential_loader_reads_the_stream_in_order(shard_dir):
    ld = Loader(shard_dir, 2, 10, accum=1, order="sequential")
    stream = np.concatenate([np.arange(i * 700, i * 700 + 700) % 60000 for i in range(3)])
    x, y = ld.batch(34, 0)  # rows 68, 69: tokens 680..700 cross into the second shard
    assert np.array_equal(x.numpy().ravel(), stream[680:700])
    assert np.array_equal(y[1].numpy(), stream[691:701])


def test_loader_position_round_trips(shard_dir):
    ld = Loader(shard_dir, 3, 8, accum=2, seed=5)
    state = ld.state(next_step=7)
    resumed = Loader(shard_dir, 3, 8, accum=2, seed=state["seed"], order=state["order"], row0=state["next_row"])
    for step in range(3):
        for m in range(2):
            assert np.array_equal(ld.batch(7 + step, m)[0], resumed.batch(step, m)[0])
    other = Loader(shard_dir, 3, 8, accum=2, seed=6)
    assert not np.array_equal(ld.batch(0, 0)[0], other.batch(0, 0)[0])


def test_val_set_is_fixed_and_split_over_ranks(shard_dir):
    full = [x.numpy() for x, _ in val_batches(shard_dir, 4, 10, 3)]
    parts = [[x.numpy() for x, _ in val_batches(shard_dir, 4, 10, 3, rank=r, world=2)] for r in range(2)]
    assert np.array_equal(np.concatenate(full), np.concatenate(parts[0][:1] + parts[1][:1] + parts[0][1:]))
    assert np.array_equal(full[0][0], np.arange(10))


# ---------------------------------------------------------------- prepare scripts

def test_prepare_pystdlib(tmp_path):
    r = run("data/pystdlib/prepare.py", f"--out_dir={tmp_path}", "--max_bytes=50000")
    assert r.returncode == 0, r.stderr
    train = open_shard(str(tmp_path / "train.bin"), header=False)
    assert len(train) == 45000 and load_meta(str(tmp_path))["kind"] == "bytes"
    assert bytes(np.asarray(train[:8], dtype=np.uint8)).startswith(b"# file: ")


def test_prepare_shakespeare_char(tmp_path):
    (tmp_path / "in.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    r = run("data/shakespeare_char/prepare.py", f"--input={tmp_path / 'in.txt'}", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "meta.pkl").exists()
    meta = json.load(open(tmp_path / "meta.json"))
    assert set(meta) >= {"vocab_size", "stoi", "itos"}  # nanoGPT's meta.pkl keys, as JSON
    encode, decode = encoder(load_meta(str(tmp_path)))
    train = open_shard(str(tmp_path / "train.bin"), header=False)
    assert decode(train[:14].tolist()) == "First Citizen:"
    assert len(train) + len(open_shard(str(tmp_path / "val.bin"), header=False)) == 1220


@needs_r50k
def test_prepare_shakespeare_bpe(tmp_path):
    (tmp_path / "in.txt").write_text("Hello world. " * 100)
    r = run("data/shakespeare/prepare.py", f"--input={tmp_path / 'in.txt'}", f"--tokenizer_file={R50K}",
            f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert open_shard(str(tmp_path / "train.bin"), header=False)[:2].tolist() == [15496, 995]


@pytest.mark.parametrize("tok", ["char", "bytes"] + (["gpt2"] if os.path.isfile(R50K) else []))
def test_prepare_textfile_folder(tmp_path, tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha beta gamma\n" * 50)
    (src / "sub" / "b.txt").write_text("delta epsilon\n" * 50)
    (src / "skip.md").write_text("not matched")
    out = tmp_path / "out"
    r = run("data/textfile/prepare.py", f"--input={src}", f"--out_dir={out}", f"--tokenizer={tok}",
            f"--tokenizer_file={R50K}", "--shard_tokens=300")
    assert r.returncode == 0, r.stderr
    train, val = TokenStream(str(out), "train"), TokenStream(str(out), "val")
    assert len(train.paths) > 1 and all(p.endswith(".bin") for p in train.paths)
    encode, decode = encoder(load_meta(str(out)), R50K)
    text = decode(train.read(0, train.total).tolist() + val.read(0, val.total).tolist())
    assert "alpha beta gamma" in text and "delta epsilon" in text and "not matched" not in text


@needs_r50k
def test_prepare_fineweb_tokenizes_local_jsonl(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i}. " + "Some web text. " * 30}) + "\n" for i in range(60)))
    r = run("data/fineweb/prepare.py", "--source=tokenize", f"--input={docs}", f"--tokenizer_file={R50K}",
            "--shard_tokens=2000", "--workers=1", f"--out_dir={tmp_path / 'fw'}")
    assert r.returncode == 0, r.stderr
    val = open_shard(str(tmp_path / "fw" / "fineweb_val_000000.bin"))
    assert len(val) == 2000 and val[0] == 50256  # every document starts with <|endoftext|>
    assert len(TokenStream(str(tmp_path / "fw"), "train").paths) >= 2


def test_prepare_textfile_bytes_invalid_utf8_binary_files_and_reruns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"caf\xe9 latin-1, not UTF-8\n" * 20)
    (src / "b.txt").write_text("plain text\n" * 20)
    (src / "c.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))  # a binary file
    out = tmp_path / "out"
    r = run("data/textfile/prepare.py", f"--input={src}", f"--out_dir={out}", "--tokenizer=bytes", "--shard_tokens=200")
    assert r.returncode == 0, r.stderr
    assert f"skipping {src / 'c.txt'}: it looks binary" in r.stderr
    train, val = TokenStream(str(out), "train"), TokenStream(str(out), "val")
    data = bytes(np.concatenate([train.read(0, train.total), val.read(0, val.total)]).astype(np.uint8))
    assert data == b"caf\xe9 latin-1, not UTF-8\n" * 20 + b"\n" + b"plain text\n" * 20  # the bytes as they are
    n_shards = len(train.paths) + len(val.paths)

    r = run("data/textfile/prepare.py", f"--input={src}", f"--out_dir={out}", "--tokenizer=char")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {src / 'a.txt'}: invalid UTF-8 at byte offset 3" in r.stderr and "--errors=replace" in r.stderr
    assert len(os.listdir(out)) == n_shards + 1  # a failed prepare leaves the earlier one as it was

    r = run("data/textfile/prepare.py", f"--input={src}", f"--out_dir={out}", "--tokenizer=char", "--errors=replace",
            "--name=again")
    assert r.returncode == 0, r.stderr
    assert f"removed {n_shards} shards of an earlier prepare" in r.stdout
    assert sorted(os.listdir(out)) == ["again_train_000000.bin", "again_val_000000.bin", "meta.json"]
    meta = load_meta(str(out))
    assert meta["kind"] == "char" and "\ufffd" in meta["stoi"] and meta["itos"][meta["stoi"]["\ufffd"]] == "\ufffd"


def test_nanogpt_meta_pkl_is_read_and_anything_else_refused(tmp_path):
    stoi = {c: i for i, c in enumerate("abc\n")}
    with open(tmp_path / "meta.pkl", "wb") as f:  # what nanoGPT's shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": 4, "itos": {i: c for c, i in stoi.items()}, "stoi": stoi}, f)
    meta = load_meta(str(tmp_path))
    assert meta["kind"] == "char" and encoder(meta)[1]([0, 1, 3]) == "ab\n"
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 4, "when": __import__("datetime").date(2024, 1, 1)}, f)
    with pytest.raises(ValueError, match="meta.pkl is not a tokenizer spec that can be read safely.*datetime.date"):
        load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not a tokenizer spec"):
        load_meta(str(tmp_path))


@pytest.mark.parametrize("script,flag,setting", [("train.py", "--help", "max_iters = 5000"),
                                                 ("train.py", "-h", "hc_streams = 4  # n, residual streams for hc/mhc"),
                                                 ("sample.py", "--help", "top_k = 200"),
                                                 ("bench.py", "--help", "repeats = 7")])
def test_help_lists_the_settings_with_defaults_and_comments(script, flag, setting):
    r = run(script, flag, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert setting in r.stdout and "settings and their defaults" in r.stdout
    if script == "train.py":
        assert "out_dir = \"out\"                  # run folder" in r.stdout and "overwrite = False" in r.stdout
