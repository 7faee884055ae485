"""The command line (`python -m moe_ext`) and the README's example, as a user runs them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import moe_ext
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def run_cli(*args, **env):
    package_parent = str(Path(moe_ext.__file__).resolve().parent.parent)
    environment = dict(os.environ, PYTHONPATH=package_parent, **env)
    return subprocess.run([sys.executable, "-m", "moe_ext", *args], capture_output=True, text=True,
                          env=environment, timeout=600)


PER_TIER = False  # the CLI runs in its own processes; once is enough


def test_info_names_build_and_tiers():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for key in ("version", "build_type", "isa_available", "isa", "num_threads", "cuda"):
        assert re.search(rf"^{key}\s", result.stdout, re.M), result.stdout
    assert moe_ext.get_isa() in result.stdout


def test_info_follows_moe_ext_isa():
    result = run_cli("info", "--json", MOE_EXT_ISA="scalar")
    assert result.returncode == 0, result.stderr
    assert '"isa": "scalar"' in result.stdout


def test_check_passes_on_every_tier():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    for tier in moe_ext.available_isas():
        assert re.search(rf"^{tier}\s", result.stdout, re.M)
    assert re.search(r"^\d+ passed, 0 failed$", result.stdout, re.M)


def test_bench_prints_tokens_per_second(tmp_path):
    result = run_cli("bench", "--repeats", "1", "--json", str(tmp_path / "bench.json"), "--png-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and re.search(r"^small\s", result.stdout, re.M)


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_readme_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    y, y2 = scope["y"], scope["y2"]
    assert y.shape == y2.shape and float(abs(y - y2).max()) <= 1e-4 * float(abs(y).max())
