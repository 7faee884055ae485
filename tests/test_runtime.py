"""Runtime controls: info(), ISA tiers (set_isa / MOE_EXT_ISA), thread count. docs/api.md "Runtime"."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moe_ext
from conftest import random_expert_weights, random_router, random_x

TIERS = ("scalar", "avx2", "avx512")
PYTHONPATH = os.path.dirname(os.path.dirname(os.path.abspath(moe_ext.__file__)))


def run_python(code, timeout=60, **env_vars):
    """Runs `code` in a fresh interpreter importing moe_ext from the same place as this process."""
    env = {key: v for key, v in os.environ.items() if key not in ("MOE_EXT_ISA", "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=PYTHONPATH, **env_vars)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info(isa):
    info = moe_ext.info()
    expected = {"version", "build_type", "compiler", "cxx_flags", "openmp", "isa_compiled", "isa_available",
                "isa", "num_threads", "cuda"}
    assert expected <= set(info)
    assert isinstance(info["version"], str) and info["version"] == moe_ext.__version__
    assert isinstance(info["build_type"], str) and isinstance(info["compiler"], str)
    assert isinstance(info["cxx_flags"], str) and isinstance(info["openmp"], bool)
    assert info["isa"] == isa == moe_ext.get_isa()
    assert info["isa"] in info["isa_available"]
    assert "scalar" in info["isa_available"]
    assert set(info["isa_available"]) <= set(info["isa_compiled"]) <= set(TIERS)
    assert info["isa_available"] == moe_ext.available_isas()
    # lowest first
    assert info["isa_available"] == [t for t in TIERS if t in info["isa_available"]]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert info["num_threads"] == moe_ext.get_num_threads()
    cuda = info["cuda"]
    assert isinstance(cuda["built"], bool) and cuda["available"] == (cuda["device_count"] > 0)


def test_set_isa_roundtrip(isa):
    for name in moe_ext.available_isas():
        moe_ext.set_isa(name)
        assert moe_ext.get_isa() == name and moe_ext.info()["isa"] == name
    # a tier this CPU lacks (none on a machine with AVX-512) is a ValueError and changes nothing
    for name in (t for t in TIERS if t not in moe_ext.available_isas()):
        with pytest.raises(ValueError, match="isa"):
            moe_ext.set_isa(name)
    moe_ext.set_isa(isa)  # the fixture restores the original tier as well
    assert moe_ext.get_isa() == isa


@pytest.mark.parametrize("name", ["bogus", "AVX2", "", "sse4", "avx512 "])
def test_set_isa_unknown_name(name):
    before = moe_ext.get_isa()
    with pytest.raises(ValueError, match="isa"):
        moe_ext.set_isa(name)
    assert moe_ext.get_isa() == before


@pytest.mark.parametrize("value", [123, None, b"scalar", 1.0])
def test_set_isa_not_a_string(value):
    before = moe_ext.get_isa()
    with pytest.raises(TypeError, match="isa"):
        moe_ext.set_isa(value)
    assert moe_ext.get_isa() == before


@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), ("2", TypeError), (2.0, TypeError),
                                         (True, TypeError), (None, TypeError)])
def test_set_num_threads_bad(value, error):
    before = moe_ext.get_num_threads()
    with pytest.raises(error, match="^n:"):
        moe_ext.set_num_threads(value)
    assert moe_ext.get_num_threads() == before


def test_set_num_threads_roundtrip():
    before = moe_ext.get_num_threads()
    try:
        for n in (1, 3, np.int64(2)):
            moe_ext.set_num_threads(n)
            assert moe_ext.get_num_threads() == int(n) and moe_ext.info()["num_threads"] == int(n)
    finally:
        moe_ext.set_num_threads(before)


def test_set_isa_changes_kernels_not_results_shape(rng, isa):
    """Every tier computes the same op: results agree across tiers to rounding."""
    T, d, f, E, k = 40, 45, 23, 8, 2
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    outputs = {}
    try:
        for name in moe_ext.available_isas():
            moe_ext.set_isa(name)
            outputs[name] = moe_ext.moe(x, wr, w13, w2, k)
    finally:
        moe_ext.set_isa(isa)
    base = outputs["scalar"]
    for name, y in outputs.items():
        np.testing.assert_allclose(y, base, rtol=1e-4, atol=1e-5 * np.abs(base).max(), err_msg=name)


# The subprocess tests below run once per tier like every test; each uses its tier where that means
# something (MOE_EXT_ISA=<tier>) and otherwise costs one interpreter start per tier.
def test_env_var_selects_tier(isa):
    """MOE_EXT_ISA=<tier> picks that tier at import."""
    proc = run_python("import moe_ext; print(moe_ext.get_isa(), moe_ext.info()['isa'])", MOE_EXT_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [isa, isa]


def test_env_var_empty_gives_best_tier():
    proc = run_python("import moe_ext; print(moe_ext.get_isa())", MOE_EXT_ISA="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == moe_ext.available_isas()[-1]


def test_env_var_bogus_fails_import():
    """An unknown MOE_EXT_ISA fails the import with a message naming the variable."""
    code = """
        import sys
        try:
            import moe_ext
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
            sys.exit(3)
        print("imported", moe_ext.get_isa())
    """
    proc = run_python(code, MOE_EXT_ISA="bogus")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "MOE_EXT_ISA" in proc.stdout and "bogus" in proc.stdout, proc.stdout
    assert proc.stdout.split(":")[0] in ("ImportError", "ValueError"), proc.stdout


def test_default_threads_follow_omp_num_threads(isa):
    """OMP_NUM_THREADS sets the default thread count (1, 2 or 3 depending on the tier's position, so
    the suite covers several values without more interpreter starts)."""
    omp = str(1 + moe_ext.available_isas().index(isa) % 3)
    proc = run_python("import moe_ext; print(moe_ext.get_num_threads())", OMP_NUM_THREADS=omp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == omp


def test_defaults_without_environment():
    """Neither MOE_EXT_ISA nor OMP_NUM_THREADS: the best tier, and between 1 and the core count threads."""
    proc = run_python("import os, moe_ext; print(moe_ext.get_isa(), moe_ext.get_num_threads(), os.cpu_count())")
    assert proc.returncode == 0, proc.stderr
    tier, n, cores = proc.stdout.split()
    assert tier == moe_ext.available_isas()[-1]
    assert 1 <= int(n) <= int(cores)


def test_large_batch_with_two_omp_threads_does_not_hang(isa):
    """A large-ish T on 2 OpenMP threads finishes (no deadlock), and its result equals 1 thread's."""
    code = """
        import numpy as np, moe_ext
        assert moe_ext.get_num_threads() == 2
        rng = np.random.default_rng(5)
        T, d, f, E, k = 4096, 64, 48, 16, 4
        x = rng.standard_normal((T, d)).astype(np.float32)
        wr = (rng.standard_normal((E, d)) / 8).astype(np.float32)
        w13 = (rng.standard_normal((E, 2 * f, d)) / 8).astype(np.float32)
        w2 = (rng.standard_normal((E, d, f)) / 7).astype(np.float32)
        y2 = moe_ext.moe(x, wr, w13, w2, k)
        for _ in range(3):
            assert moe_ext.moe(x, wr, w13, w2, k).tobytes() == y2.tobytes()
        moe_ext.set_num_threads(1)
        y1 = moe_ext.moe(x, wr, w13, w2, k)
        assert y1.tobytes() == y2.tobytes()
        assert np.isfinite(y2).all()
        print("ok", moe_ext.get_isa())
    """
    try:
        proc = run_python(code, timeout=120, OMP_NUM_THREADS="2", MOE_EXT_ISA=isa)
    except subprocess.TimeoutExpired:
        pytest.fail("moe with T=4096 on 2 OpenMP threads did not finish in 120 s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", isa]


def test_workspace_is_reused(rng):
    """Scratch memory grows to the largest call and is then reused (SPEC §5)."""
    T, d, f, E, k = 64, 32, 24, 8, 2
    x, wr = random_x(rng, T, d), random_router(rng, E, d)
    w13, w2 = random_expert_weights(rng, E, d, f)
    moe_ext.moe(x, wr, w13, w2, k)
    held = moe_ext._core.workspace_bytes()
    assert held > 0
    for _ in range(5):
        moe_ext.moe(x, wr, w13, w2, k)
        moe_ext.moe(np.ascontiguousarray(x[:10]), wr, w13, w2, k)
    assert moe_ext._core.workspace_bytes() == held
