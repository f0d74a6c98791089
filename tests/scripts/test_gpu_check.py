"""scripts/gpu_check.sh as a dry run on the CPU at toy sizes: every stage runs and exits 0, and every bench stage
writes its tables (markdown and JSON) with a final row in each."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

TOY = ("--batch_size=1 --n_embd=32 --n_head=2 --model_layers=1 --model_embd=32 --model_heads=2 --model_T=16 "
       "--T_list=32 --repeats=1 --warmup=0 --compile=False")
BENCH = ["core", "streams", "streams_compiled", "step", "core_long", "streams_reference"]
STAGES = ["env", "kernel_tests", *BENCH[:4], "core_long", "long_test", "streams_reference", "other_tests"]


@pytest.mark.skipif(shutil.which("timeout") is None, reason="gpu_check.sh needs coreutils' timeout")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, DEVICE="cpu", DTYPE="float32", EXTRA=TOY, PYTHON=sys.executable, BUDGET_S="9000",
               LIMIT_SCALE="20")  # limits for a loaded CPU; the real ones are for a GPU
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| \d+ \|$", (out / "summary.md").read_text(), re.M)
    assert [name for name, _ in rows] == STAGES
    assert all(rc.strip() == "0" for _, rc in rows), rows
    for name in BENCH:
        tables = json.loads((out / f"{name}.json").read_text())["tables"]
        assert tables and all(t["rows"] and not t["partial"] for t in tables), name
        md = (out / f"{name}.md").read_text()
        assert md.count("### ") == len(tables) and all(f"| {r[0]} | {r[1]} |" in md for t in tables
                                                       for r in t["rows"]), name
    core = json.loads((out / "core.json").read_text())["tables"][0]["rows"]
    names = [r[1] for r in core]  # the dispatcher's form (fused where the C++ kernel builds), then chunked torch
    assert names[0] == "softmax (SDPA, cpu, torch's choice)" and names[-1] in ("hyperglu (rows)",
                                                                               "hyperglu (rows: chunked torch)")
    assert "pytest" in (out / "env.log").read_text()
