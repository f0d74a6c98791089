"""scripts/ runs as modules from the repository root; run as a file, a script says so in one error line."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("name", ["run_grid", "run_mad", "kernel_cost"])
def test_a_script_run_as_a_file_says_how_to_run_it(name):
    r = subprocess.run([sys.executable, f"scripts/{name}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"error: scripts/{name}.py runs from the repository root as a module: python -m scripts.{name} ...\n"
