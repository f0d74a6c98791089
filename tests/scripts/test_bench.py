"""bench.py end to end, at tiny sizes."""
import shutil

import pytest

from conftest import REPO


def run_bench(*args, timeout=300):
    """bench.py with tiny sizes in a subprocess; returns its stdout after checking it exited 0."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "bench.py", "--n_embd=32", "--model_layers=1", "--model_embd=32",
                        "--model_heads=2", "--model_T=16", "--repeats=1", "--warmup=0", "--batch_size=1", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_runs_end_to_end():
    out = run_bench("--T_list=16,32", "--n_layer=1", "--decode_T=32", "--decode_tokens=2")
    for title in ("one attention layer", "training step of the whole model", "decoding at a 32-token context"):
        assert title in out
    assert out.count("| 32 | hyperglu |") == 1 and "| hypermlp | mhc |" in out and "| softmax | plain |" in out
    assert "| softmax | plain |" in out and "1.00x" in out


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_bench_compile_runs():
    """--compile=True times compiled layers and models (warm-up rounds absorb the compiles)."""
    out = run_bench("--sections=layer,model", "--attns=softmax", "--residuals=plain,hc", "--T_list=16",
                    "--compile=True", timeout=600)
    assert ", torch.compile" in out.splitlines()[0]
    assert "| 16 | softmax |" in out and "| softmax | hc |" in out


def test_rows_are_written_as_measured(tmp_path, monkeypatch):
    """bench.put rewrites the json and md files at every row: partial rows (the medians of the rounds so far) stand
    until the final ones replace them, so a run killed mid-table keeps what it measured."""
    import json

    import bench
    monkeypatch.setattr(bench, "tables", [])
    monkeypatch.setattr(bench, "json", str(tmp_path / "b.json"))
    monkeypatch.setattr(bench, "md", str(tmp_path / "b.md"))
    t = bench.table("a table", ["T", "ms"])
    bench.put(t, [["16", "2.0"]], rounds=1)
    assert json.loads((tmp_path / "b.json").read_text())["tables"][0]["partial"] == [["16", "2.0", "(1 of 7 rounds)"]]
    assert "| 16 | 2.0 | (1 of 7 rounds) |" in (tmp_path / "b.md").read_text()
    bench.put(t, [["16", "1.5"]])
    bench.put(t, [["32", "3.0"]], rounds=2)
    saved = json.loads((tmp_path / "b.json").read_text())["tables"][0]
    assert saved["rows"] == [["16", "1.5"]] and saved["partial"] == [["32", "3.0", "(2 of 7 rounds)"]]
    md = (tmp_path / "b.md").read_text()
    assert "### a table" in md and "| 16 | 1.5 |" in md and "2.0" not in md and "| 32 | 3.0 | (2 of 7 rounds) |" in md
