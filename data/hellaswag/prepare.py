"""
HellaSwag's validation split (10,042 examples) in rowanz's public jsonl schema, checked and kept as
data/hellaswag/hellaswag_val.jsonl, the file eval.py and train.py's hellaswag_every read by default.

$ python data/hellaswag/prepare.py                         # downloads hellaswag_val.jsonl from rowanz/hellaswag
$ python data/hellaswag/prepare.py --input=PATH            # a local copy, no network

Each line is one example: ctx, endings (4 strings), label (0-3), and ind, activity_label, ctx_a, ctx_b,
source_id, split, split_type. Every line is checked (hellaswag.parse) before the file is written.
"""
import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import hellaswag  # noqa: E402

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", default="", help="a local hellaswag_val.jsonl (otherwise downloaded)")
parser.add_argument("--out_dir", default=HERE)
args = parser.parse_args()

os.makedirs(args.out_dir, exist_ok=True)
out = os.path.join(args.out_dir, "hellaswag_val.jsonl")
tmp = f"{out}.tmp-{os.getpid()}"
try:
    if args.input:
        if not os.path.isfile(args.input):
            sys.exit(f"error: --input '{args.input}' not found")
        shutil.copyfile(args.input, tmp)
    else:
        import urllib.request
        print(f"downloading {URL} -> {out}")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            sys.exit(f"error: could not download {URL} ({e}).\nOffline? Pass --input=PATH to a local copy.")
    try:
        examples = hellaswag.load(tmp)
    except ValueError as e:
        sys.exit(f"error: {str(e).replace(tmp, args.input or URL)}")
    os.replace(tmp, out)
finally:
    if os.path.exists(tmp):
        os.remove(tmp)
print(f"{len(examples):,} examples -> {out}")
