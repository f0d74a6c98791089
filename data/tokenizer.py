"""
Tokenizers, described by a small dict that prepare.py writes into meta.json and train.py copies into every
checkpoint, so sample.py decodes with the tokenizer the model was trained on:

  {"kind": "bytes", "vocab_size": 256}                      raw UTF-8 bytes
  {"kind": "char", "vocab_size": V, "stoi": {...}, "itos": {...}}   characters (nanoGPT's shakespeare_char)
  {"kind": "gpt2", "vocab_size": 50257}                     GPT-2 BPE (tiktoken r50k_base)

GPT-2 BPE offline: pass tokenizer_file=PATH to an r50k_base.tiktoken file (the ranks tiktoken downloads), or
set TIKTOKEN_CACHE_DIR to a folder holding it under the name 0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4.

nanoGPT's meta.pkl (vocab_size, stoi, itos) is still read, by an unpickler that allows dict, list, str and int
only: a pickle can run code when it is loaded, and a dataset folder may come from someone else.
"""

import builtins
import hashlib
import json
import os
import pickle

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256


def gpt2_encoding(tokenizer_file=""):
    """tiktoken's GPT-2 encoding, from a local ranks file when given, else tiktoken's own (cached) download."""
    try:
        import tiktoken
        import tiktoken.load
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        raise SystemExit("GPT-2 BPE needs tiktoken: pip install tiktoken") from None
    if tokenizer_file:
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"tokenizer_file '{tokenizer_file}' not found; expected an r50k_base.tiktoken file")
        with open(tokenizer_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != R50K_SHA256:
            raise ValueError(f"tokenizer_file '{tokenizer_file}' is not tiktoken's r50k_base ranks file "
                             f"(sha256 {digest[:12]}..., expected {R50K_SHA256[:12]}...)")
        ranks = tiktoken.load.load_tiktoken_bpe(tokenizer_file)
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": GPT2_EOT})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, and nothing in the cache
        raise SystemExit(f"could not load the GPT-2 BPE ranks ({type(e).__name__}: {e}).\n"
                         f"Offline? Pass --tokenizer_file=PATH/r50k_base.tiktoken, or set TIKTOKEN_CACHE_DIR to a "
                         f"folder holding that file as 0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4") from None


def char_spec(text):
    chars = sorted(set(text))
    return {"kind": "char", "vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)},
            "itos": {i: c for i, c in enumerate(chars)}}


class _MetaUnpickler(pickle.Unpickler):
    """Reads nanoGPT's meta.pkl (dicts of str and int) and refuses every other class: a pickle from someone else
    could otherwise run code when it is loaded."""
    SAFE = {"dict", "list", "str", "int"}

    def find_class(self, module, name):
        if module == "builtins" and name in self.SAFE:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only dict, list, str and int are allowed")


def load_meta(data_dir):
    """The tokenizer spec in data_dir/meta.json, else in nanoGPT's meta.pkl (read by a restricted unpickler); GPT-2
    when there is neither. A file that is not a tokenizer spec is a ValueError naming it."""
    path = os.path.join(data_dir, "meta.json")
    try:
        if os.path.isfile(path):
            with open(path) as f:
                meta = json.load(f)
        elif os.path.isfile(path := os.path.join(data_dir, "meta.pkl")):
            with open(path, "rb") as f:
                meta = _MetaUnpickler(f).load()
        else:
            return {"kind": "gpt2", "vocab_size": 50257}
        if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
            raise ValueError("expected a dict with an int vocab_size (and kind, stoi, itos)")
        if "itos" in meta:  # JSON keys are strings
            meta["itos"] = {int(i): c for i, c in meta["itos"].items()}
    except (ValueError, AttributeError, pickle.UnpicklingError, EOFError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a tokenizer spec that can be read safely: {e}") from None
    if "kind" not in meta:  # nanoGPT's own meta.pkl: vocab_size, stoi, itos
        meta = dict(meta, kind="char")
    return meta


def save_meta(data_dir, spec):
    """Write the spec as data_dir/meta.json (atomically), and drop a meta.pkl an older prepare left there."""
    path = os.path.join(data_dir, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f)
    os.replace(path + ".tmp", path)
    if os.path.isfile(os.path.join(data_dir, "meta.pkl")):
        os.remove(os.path.join(data_dir, "meta.pkl"))


def token_bytes(spec, tokenizer_file=""):
    """The UTF-8 byte count of each token id's text, a list over the spec's vocabulary, for bits per byte: 1 for
    every byte, the character's for char, the piece's for GPT-2 BPE, whose <|endoftext|> counts 0 (it separates
    documents; its text is not the data's). None for a tokenizer without text (mad)."""
    kind = spec["kind"]
    if kind == "bytes":
        return [1] * 256
    if kind == "char":
        return [len(spec["itos"][i].encode("utf-8")) for i in range(spec["vocab_size"])]
    if kind == "gpt2":
        enc = gpt2_encoding(tokenizer_file)
        return [0 if i == GPT2_EOT else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return None


def encoder(spec, tokenizer_file=""):
    """(encode, decode) for a tokenizer spec. encode: str -> list[int]; decode: list[int] -> str."""
    kind = spec["kind"]
    if kind == "bytes":
        return (lambda s: list(s.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    if kind == "char":
        stoi, itos = spec["stoi"], spec["itos"]

        def encode(s):
            missing = sorted(set(s) - set(stoi))
            if missing:
                raise ValueError(f"characters not in the training vocabulary: {missing[:10]}")
            return [stoi[c] for c in s]
        return encode, (lambda ids: "".join(itos[i] for i in ids))
    if kind == "gpt2":
        enc = gpt2_encoding(tokenizer_file)
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode
    if kind == "mad":
        raise ValueError(f"this checkpoint was trained on the MAD task {spec['task']['name']}, whose tokens are task "
                         f"symbols, not text; score it with: python train.py --dataset=mad:{spec['task']['name']} "
                         f"--out_dir=<its run folder> --init_from=resume --eval_only=True (plus the run's mad_size/mad_args)")
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected bytes, char, gpt2 or mad")
