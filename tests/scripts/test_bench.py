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
