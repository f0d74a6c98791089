"""The Hugging Face export (export_hf.py) and lm-evaluation-harness on it, offline: each tiny model exported to a
temp folder and loaded back by transformers gives the native logits for every attention x residual, generate()
gives sample.py's greedy tokens, the tokenizers encode as the repo's do, and lm-eval's accuracy on a local
multiple-choice task equals eval.py's. Needs the optional extras (requirements-eval.txt): skipped without them."""
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the export and the task are local files
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

import export_hf  # noqa: E402
import hellaswag  # noqa: E402
from checkpoint import load_checkpoint, load_model  # noqa: E402
from conftest import BYTES, HELLASWAG, R50K, REPO, VARIANTS, bytes_model, save_run, write_jsonl  # noqa: E402
from data.tokenizer import char_spec, encoder  # noqa: E402


def export(model, folder, tokenizer=BYTES, tokenizer_file=""):
    """Save model as a run, export it with export_hf.py's export(), load it back with transformers."""
    run_dir = save_run(folder / "run", model, tokenizer)
    path = os.path.join(run_dir, "ckpt_best.pt")
    state = load_checkpoint(path)
    export_hf.export(state, str(folder / "hf"), tokenizer_file, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "hf"), trust_remote_code=True)
    return hf.eval(), load_model(state, path).eval()


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_exported_logits_equal_native(tmp_path, cfg):
    hf, native = export(bytes_model(**cfg), tmp_path)
    assert hf.dtype == torch.float32 and hf.gpt.config.impl == "reference"
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(x).logits
        want, _ = native(x, x)  # every position's logits
    assert got.shape == (2, 64, 256)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    y = x.clone()
    y[:, :10] = -100  # transformers' ignore index, labels unshifted
    with torch.no_grad():
        loss = hf(x, labels=y).loss
    t = torch.cat([y[:, 1:], torch.full_like(y[:, :1], -100)], 1)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(want.flatten(0, 1), t.flatten(), ignore_index=-100).item(), rel=1e-5)


@pytest.mark.parametrize("cfg", [dict(attn="hyperglu", residual="mhc"), dict(attn="softmax", pos="rope"),
                                 dict(attn="hyperglu", aligner_kind="identity")], ids=["G-mhc", "S-p", "G-identity"])
def test_generate_gives_the_native_greedy_tokens_past_block_size(tmp_path, cfg):
    hf, native = export(bytes_model(**cfg), tmp_path)
    prompt = torch.tensor([list(b"A man sits at a piano. he")])
    with torch.no_grad():
        want = native.generate(prompt, 50, temperature=0, vocab_limit=256)  # 25 + 50 > block_size 64: the window slides
        got = hf.generate(prompt, max_new_tokens=50, do_sample=False)
    assert got.tolist() == want.tolist()


def test_generate_gives_sample_py_greedy_tokens(tmp_path):
    hf, _ = export(bytes_model(attn="hyperglu", residual="hc"), tmp_path)
    start = "A boy sits at a piano. he"
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'run'}", f"--start={start}",
                        "--num_samples=1", "--max_new_tokens=50", "--temperature=0", "--device=cpu"],
                       cwd=REPO, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok(start, return_tensors="pt").input_ids
    with torch.no_grad():
        got = hf.generate(ids, max_new_tokens=50, do_sample=False)
    assert r.stdout.decode() == bytes(got[0].tolist()).decode("utf-8", errors="replace") + "\n---------------\n"


TEXTS = ["Hello world", "I'm   here, aren't we?  \n\n  ok", "naïve café 日本語 🙂", "12345 3.14159 x=y+1",
         "def f(x):\n    return x**2\n", " leading space", "tabs\tand\r\nCRLF", "<|endoftext|> after", "a" * 70]


def test_bytes_tokenizer_encodes_utf8_bytes(tmp_path):
    export(bytes_model(n_layer=1), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encode, _ = encoder(BYTES)
    for s in TEXTS:
        assert tok(s)["input_ids"] == encode(s)
        assert tok.decode(encode(s)) == s


def test_char_tokenizer_encodes_as_the_run_did(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    spec = char_spec(text)
    export(bytes_model(n_layer=1, vocab_size=spec["vocab_size"]), tmp_path, spec)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encode, decode = encoder(spec)
    assert tok(text)["input_ids"] == encode(text)
    assert tok.decode(encode(text)) == text


@pytest.mark.skipif(not os.path.isfile(R50K), reason="needs the r50k_base.tiktoken ranks file (offline BPE)")
def test_gpt2_tokenizer_from_tiktoken_ranks_encodes_as_tiktoken(tmp_path):
    spec = {"kind": "gpt2", "vocab_size": 50257}
    model = bytes_model(n_layer=1, n_embd=16, vocab_size=50304)
    with torch.no_grad():  # every position's argmax is the padded id 50300, which generate() must never pick
        model.transformer.ln_f.weight.zero_()
        model.lm_head.weight[50300] = 10 * model.transformer.ln_f.bias / model.transformer.ln_f.bias.norm() ** 2
    hf, native = export(model, tmp_path, spec, R50K)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    encode, _ = encoder(spec, R50K)
    words = "the of and to in is was he for it with as his on be at by I had not are but from or have an they".split()
    g = torch.Generator().manual_seed(0)
    texts = TEXTS + [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g)) for _ in range(20)]
    for s in texts:
        assert tok(s)["input_ids"] == encode(s), s
        assert tok.decode(tok(s)["input_ids"]) == s
    assert (tok.eos_token_id, len(tok)) == (50256, 50257)
    x = torch.tensor([encode("Hello world, this is a test")])
    with torch.no_grad():
        assert hf(x).logits[0].argmax(-1).eq(50300).all()
        got = hf.generate(x, max_new_tokens=10, do_sample=False)
        assert got.tolist() == native.generate(x, 10, temperature=0, vocab_limit=50257).tolist()
    assert got.max() < 50257


def test_export_py_command_line(tmp_path):
    run_dir = save_run(tmp_path / "run", bytes_model(n_layer=1))
    cmd = lambda *a: subprocess.run([sys.executable, "export_hf.py", *a], cwd=REPO, capture_output=True, text=True,
                                    timeout=300)
    r = cmd("--help")
    assert r.returncode == 0 and "--to=" in r.stdout and "trust_remote_code=True" in r.stdout
    r = cmd(f"--out_dir={run_dir}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "modeling_hypergpt.py", "model.py", "tokenizer.json"} <= \
        set(os.listdir(tmp_path / "hf"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"--out_dir={tmp_path / 'empty'}", f"--to={tmp_path / 'x'}"], "no ckpt_best.pt or ckpt_last.pt in out_dir"),
        ([f"--out_dir={run_dir}"], "to='' is not valid; expected --to=DIR"),
        ([f"--out_dir={run_dir}", f"--to={tmp_path / 'mine'}", "--overwrite=True"], "does not hold a hyperGPT export"),
        ([f"--out_dir={run_dir}", f"--to={tmp_path / 'hf'}"], "pass --overwrite=True"),
    ]
    for args, says in cases:
        r = cmd(*args)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert says in r.stderr, r.stderr
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not (tmp_path / "x").exists()
    r = cmd(f"--out_dir={run_dir}", f"--to={tmp_path / 'hf'}", "--overwrite=True")
    assert r.returncode == 0, r.stderr


def test_lm_eval_accuracy_equals_eval_py(tmp_path):
    """lm-eval's hf model on the export, a local multiple-choice task in the llm.c formulation (context, then " " +
    ending; acc = the highest summed log-likelihood), against eval.py on the same jsonl. The labels make half the
    examples right for this model, so a different choice on any example changes the accuracy."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    model = bytes_model(attn="hyperglu", residual="mhc")
    hf_dir = tmp_path / "hf"
    export(model, tmp_path)
    encode, _ = encoder(BYTES)
    examples = [hellaswag.parse(json.dumps(ex), "") for ex in HELLASWAG * 2]
    losses = hellaswag.ending_losses(model, examples, encode, 64, "cpu")
    fixture = []
    for i, ex in enumerate(HELLASWAG * 2):
        pred = hellaswag.predictions(losses[i])[0]
        fixture.append(dict(ex, ind=i, label=pred if i % 2 == 0 else (pred + 1) % 4))
    data = write_jsonl(tmp_path / "hs.jsonl", fixture)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_hellaswag.yaml").write_text(f"""task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                                  tasks=["tiny_hellaswag"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  batch_size=4, device="cpu", log_samples=True)
    acc = out["results"]["tiny_hellaswag"]["acc,none"]
    r = subprocess.run([sys.executable, "eval.py", f"--out_dir={tmp_path / 'run'}", f"--input={data}", "--device=cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert acc == json.loads(r.stdout.splitlines()[-1])["acc"] == 0.5
    for s in out["samples"]["tiny_hellaswag"]:  # each ending's log-likelihood is minus eval.py's summed loss
        lls = [ll for ll, _ in s["filtered_resps"]]
        assert lls == pytest.approx([-loss for loss, _ in losses[s["doc_id"]]], rel=1e-5)
