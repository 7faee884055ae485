"""CUDA build, host-side logic and error handling: everything that runs without a GPU.

* the build reports whether the CUDA kernels were built (moe_ext.info()["cuda"]) and `moe_ext._cuda`
  imports with no GPU or driver (device_count() == 0, never an exception);
* every launcher raises RuntimeError naming the missing device when none is present, after the argument
  checks that need no device (ValueError);
* the grouped GEMM's tile schedule (csrc/cuda/tile_schedule.h, exposed as _cuda.tile_schedule) against a
  plain Python statement of it, on random, empty, clamped and tail-padded offsets;
* moe_ext.cuda's argument validation on CPU tensors (TypeError/ValueError before any device is needed,
  then RuntimeError "no CUDA device").
GPU parity tests are in test_cuda_gpu.py.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moe_ext

PER_TIER = False  # nothing here runs a CPU kernel

HAVE_CUDA_MODULE = importlib.util.find_spec("moe_ext._cuda") is not None
needs_cuda_build = pytest.mark.skipif(not HAVE_CUDA_MODULE, reason="moe_ext built without CUDA (no nvcc)")


def test_info_reports_cuda_build():
    cuda = moe_ext.info()["cuda"]
    assert cuda["built"] is HAVE_CUDA_MODULE
    assert isinstance(cuda["device_count"], int) and cuda["device_count"] >= 0
    assert cuda["available"] == (cuda["device_count"] > 0)
    if os.environ.get("MOE_EXT_REQUIRE_CUDA_BUILD") == "1":  # CI sets it where nvcc is installed
        assert cuda["built"], "nvcc is installed but moe_ext._cuda was not built"


@needs_cuda_build
def test_cuda_module_imports_without_a_device():
    # A fresh process that hides every GPU: importing and counting must work, and count 0.
    code = """
        import moe_ext, moe_ext._cuda as c
        n = c.device_count()
        assert n == 0, n
        info = moe_ext.info()["cuda"]
        assert info["built"] and not info["available"] and info["device_count"] == 0 and info["reason"]
        print("ok", c.runtime_error())
    """
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@needs_cuda_build
def test_build_info():
    from moe_ext import _cuda
    info = _cuda.build_info()
    assert info["built"] and info["static_runtime"]
    # CMAKE_CUDA_ARCHITECTURES as built: "80-real 90" by default, "90" for the device check's build
    archs = [int(a.split("-")[0]) for a in info["architectures"].replace(";", " ").split()]
    assert archs and all(a >= 80 for a in archs), info["architectures"]  # mma.sync bf16, cp.async: sm_80+
    assert info["runtime_version"] >= 11000
    torch = pytest.importorskip("torch")
    if _cuda.device_count() > 0 and torch.cuda.is_available():  # the device's arch is built, or PTX below it
        major, minor = torch.cuda.get_device_capability()
        assert any(a <= 10 * major + minor for a in archs), (info["architectures"], major, minor)


# Valid arguments (null pointers: they must never be reached without a device).
LAUNCHES = {
    "route": lambda c: c.route(0, 0, 4, 8, 4, 0, 2, 0, True, 1.0, 0, 0, 0, 0, 0, 0, 0, 0),
    "permute_plan": lambda c: c.permute_plan(0, 4, 2, 4, -1, 0, 0, 0, 0),
    "gather_rows": lambda c: c.gather_rows(0, 0, 4, 2, 8, 8, 1, 0, 0),
    "grouped_gemm": lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 16, 8, 1, "swiglu", 0, 0, 0),
    "grouped_gemm_bias": lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 16, 8, 0, None, 0, 0, 0),
    "grouped_gemm_description": lambda c: c.grouped_gemm(
        0, 0, 0, 4, 8, 16, 8, 2, moe_ext.Activation("silu", True, interleaved=True, alpha=1.702, limit=7.0,
                                                     up_offset=1.0), 0, 0, 0),
    "grouped_gemm_dw": lambda c: c.grouped_gemm_dw(0, 0, 0, 4, 8, 16, 8, 2, 0, 0),
    "transpose": lambda c: c.transpose(0, 2, 3, 4, 0, 0, 0),
    "unpermute": lambda c: c.unpermute(0, 0, 0, 4, 2, 8, 8, 0, 0, 0),
    "unpermute_backward": lambda c: c.unpermute_backward(0, 0, 0, 0, 4, 2, 8, 8, 0, 0, 0, 0),
    "activate": lambda c: c.activate(0, 8, 4, "swiglu(gate_softcap=4.0,up_softcap=25.0)", 1, 0, 0),
    "activation_backward": lambda c: c.activation_backward(0, 0, 8, 4, "silu(gated=False,alpha=1.702)", 2, 0, 0),
    "bias_grad": lambda c: c.bias_grad(0, 0, 4, 8, 16, 1, 0, 0),
}


@needs_cuda_build
@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_launcher_without_device_raises_runtime_error(name):
    from moe_ext import _cuda
    if _cuda.device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        LAUNCHES[name](_cuda)


@needs_cuda_build
@pytest.mark.parametrize("call, match", [
    (lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 16, 8, 7, None, 0, 0, 0), "dtype"),
    (lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 16, 8, 0, "tanh", 0, 0, 0), "activation"),
    (lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 16, 8, 0, "swiglu(limit=-1.0)", 0, 0, 0), "limit"),
    (lambda c: c.grouped_gemm(0, 0, 0, 4, 8, 15, 8, 0, "geglu(interleaved)", 0, 0, 0), "even N"),
    (lambda c: c.grouped_gemm(0, 0, 0, 4, -1, 16, 8, 0, None, 0, 0, 0), "M"),
    (lambda c: c.bias_grad(0, 0, 0, 8, 16, 1, 0, 0), "E"),
    (lambda c: c.bias_grad(0, 0, 4, 8, -16, 1, 0, 0), "N"),
    (lambda c: c.bias_grad(0, 0, 4, 8, 16, 3, 0, 0), "dtype"),
    (lambda c: c.route(0, 0, 4, 8, 4, 0, 5, 0, True, 1.0, 0, 0, 0, 0, 0, 0, 0, 0), "top_k"),
    (lambda c: c.route(0, 0, 4, 8, 4, 0, 2, 3, True, 1.0, 0, 0, 0, 0, 0, 0, 0, 0), "scoring"),
    (lambda c: c.route(0, 0, 4, 8, 6, 0, 2, 0, True, 1.0, 0, 0, 4, 1, 0, 0, 0, 0), "n_group"),
    (lambda c: c.permute_plan(0, 4, 2, 4, -5, 0, 0, 0, 0), "capacity"),
    (lambda c: c.activate(0, 8, 4, "relu(interleaved)", 1, 0, 0), "interleaved only with a gated"),
    (lambda c: c.activation_backward(0, 0, 8, 4, "gelu(alpha=2.0)", 1, 0, 0), "alpha only with fn 'silu'"),
    (lambda c: c.transpose(0, 2, -3, 4, 0, 0, 0), "R"),
])
def test_launcher_argument_checks(call, match):
    from moe_ext import _cuda
    with pytest.raises(ValueError, match=match):
        call(_cuda)


@needs_cuda_build
def test_launcher_activation_must_be_a_description():
    from moe_ext import _cuda
    with pytest.raises(TypeError, match="activation"):
        _cuda.activate(0, 8, 4, 3, 1, 0, 0)  # the old integer codes are gone


# ------------------------------------------------------------------------------ tile schedule
def schedule_reference(offsets, M, block_m):
    """The rows schedule stated plainly: each expert's rows (offsets clamped to 0..M) in block_m pieces,
    experts in order, then the tail rows offsets[E]..M-1 in block_m pieces as expert E."""
    E = len(offsets) - 1
    clamp = [min(max(int(o), 0), M) for o in offsets]
    tiles = []
    for e in range(E):
        for begin in range(clamp[e], max(clamp[e + 1], clamp[e]), block_m):
            tiles.append((e, begin, min(begin + block_m, max(clamp[e + 1], clamp[e]))))
    for begin in range(clamp[E], M, block_m):
        tiles.append((E, begin, min(begin + block_m, M)))
    return tiles


@needs_cuda_build
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_tile_schedule_matches_reference(block_m):
    from moe_ext import _cuda
    rng = np.random.default_rng(block_m)
    cases = [([0, 0], 0), ([0, 5], 5), ([0, 0, 0, 7], 7), ([0, 64, 128], 128), ([0, 65, 65, 200], 200)]
    for _ in range(200):
        E = int(rng.integers(1, 70))
        counts = rng.integers(0, 150, size=E) * (rng.random(E) < 0.7)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        pad = int(rng.integers(0, 3)) * int(rng.integers(0, 100))  # capacity padding rows past offsets[E]
        cases.append((offsets.tolist(), int(offsets[-1]) + pad))
    for offsets, M in cases:
        got = _cuda.tile_schedule(offsets, M, block_m)
        assert [tuple(t) for t in got] == schedule_reference(offsets, M, block_m), (offsets, M)
        assert len(got) <= _cuda.max_m_tiles(M, len(offsets) - 1, block_m)
        # every row 0..M-1 in exactly one tile, each tile within one expert and at most block_m rows
        covered = sorted(r for _, b, e in got for r in range(b, e))
        assert covered == list(range(M))
        assert all(0 < e - b <= block_m for _, b, e in got)


@needs_cuda_build
def test_tile_schedule_bound_is_tight_enough():
    from moe_ext import _cuda
    # worst case: every expert one row past a tile boundary
    for E, block_m in [(8, 64), (64, 64), (3, 16)]:
        offsets = list(np.cumsum([0] + [block_m + 1] * E))
        M = offsets[-1]
        assert len(_cuda.tile_schedule(offsets, M, block_m)) == 2 * E <= _cuda.max_m_tiles(M, E, block_m)


@needs_cuda_build
@pytest.mark.parametrize("offsets, M", [
    ([0, 10, 5, 20], 20),      # decreasing
    ([-4, 3, 99], 8),          # outside 0..M
    ([5, 2, 1], 4),
    ([0, 2**31 - 1], 3),
])
def test_tile_schedule_never_leaves_the_rows(offsets, M):
    from moe_ext import _cuda
    for e, begin, end in _cuda.tile_schedule(offsets, M, 4):
        assert 0 <= begin < end <= M and 0 <= e <= len(offsets) - 1


@needs_cuda_build
def test_permute_scratch_bytes():
    from moe_ext import _cuda
    assert _cuda.permute_scratch_bytes(0, 2, 8) == 8 * 4  # totals only
    assert _cuda.permute_scratch_bytes(1024, 2, 8) == (2048 // 256 + 1) * 8 * 4
    assert _cuda.permute_scratch_bytes(10, 6, 12288) > 0


# ------------------------------------------------------------------------------ moe_ext.cuda on CPU tensors
torch = pytest.importorskip("torch")


@pytest.fixture
def mcuda():
    from moe_ext import cuda
    return cuda


def test_module_reports_no_device(mcuda):
    if mcuda.device_count() > 0:
        pytest.skip("a CUDA device is present")
    assert mcuda.available() is False


def cpu_case():
    T, d, f, E, k = 5, 8, 6, 4, 2
    x = torch.randn(T, d, dtype=torch.bfloat16)
    return dict(x=x, w13=torch.randn(E, 2 * f, d, dtype=torch.bfloat16), w2=torch.randn(E, d, f, dtype=torch.bfloat16),
                weights=torch.rand(T, k), ids=torch.randint(0, E, (T, k), dtype=torch.int32),
                w_router=torch.randn(E, d, dtype=torch.bfloat16), offsets=torch.tensor([0, 3, 3, 7, 10], dtype=torch.int32))


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, c: m.grouped_gemm([1.0], c["w13"], c["offsets"]), TypeError, "a: expected a torch.Tensor"),
    (lambda m, c: m.grouped_gemm(c["x"].to(torch.float64), c["w13"], c["offsets"]), TypeError, "a: expected dtype"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"].float(), c["offsets"]), TypeError, "w: expected the dtype of a"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"][:, :, :3].contiguous(), c["offsets"]), ValueError, "w: expected shape"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"][:3]), ValueError, "expert_offsets: expected shape"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"].long()), TypeError, "expert_offsets: expected dtype"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"], activation="tanh"), ValueError, "activation"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"], activation=2), TypeError, "activation"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"], activation="swiglu(limit=0.0)"), ValueError,
     "limit > 0"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"][:, :11].contiguous(), c["offsets"], activation="swiglu(interleaved)"),
     ValueError, "w: expected an even number of rows"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"], bias=torch.zeros(4, 11)), ValueError,
     r"bias: expected shape \(4, 12\)"),
    (lambda m, c: m.grouped_gemm(c["x"], c["w13"], c["offsets"], bias=torch.zeros(4, 12, dtype=torch.bfloat16)),
     TypeError, "bias: expected dtype torch.float32"),
    (lambda m, c: m.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"], b13_or_b1=torch.zeros(4, 6)),
     ValueError, r"b13_or_b1: expected shape \(4, 12\)"),
    (lambda m, c: m.experts(c["x"], c["w13"][:, :6].contiguous(), c["w2"], c["weights"], c["ids"], activation="relu2",
                            b13_or_b1=torch.zeros(4, 6), b2=torch.zeros(4, 6)), ValueError,
     r"b2: expected shape \(4, 8\)"),
    (lambda m, c: m.moe(c["x"], c["w_router"], c["w13"], c["w2"], 2, b2=torch.zeros(4, 8).t()), ValueError,
     "b2: expected"),
    (lambda m, c: m.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"], activation="gelu_tanh"), ValueError,
     "w13_or_w1"),
    (lambda m, c: m.activate(c["x"][:, :7].contiguous(), "geglu_tanh(limit=3.0,interleaved)"), ValueError,
     "h: expected an even number of columns"),
    (lambda m, c: m.activation_backward(c["x"], c["x"], "swiglu(interleaved)"), ValueError, "d_act"),
    (lambda m, c: m.bias_grad(c["x"], c["offsets"][:1]), ValueError, "expert_offsets: expected E \\+ 1 >= 2"),
    (lambda m, c: m.bias_grad(c["x"], c["offsets"].long()), TypeError, "expert_offsets: expected dtype"),
    (lambda m, c: m.bias_grad(c["x"][None], c["offsets"]), ValueError, "d_out: expected a 2-D tensor"),
    (lambda m, c: m.grouped_gemm(c["x"].t(), c["w13"], c["offsets"]), ValueError, "x|a"),
    (lambda m, c: m.route(c["x"], c["w_router"], 9), ValueError, "top_k"),
    (lambda m, c: m.route(c["x"], c["w_router"], 2, scoring="max"), ValueError, "scoring"),
    (lambda m, c: m.route(c["x"], c["w_router"], 2, n_group=2), ValueError, "n_group"),
    (lambda m, c: m.route(c["x"], c["w_router"], 2, bias=torch.zeros(3)), ValueError, "bias"),
    (lambda m, c: m.permute(c["x"], c["ids"][:2], 4), ValueError, "topk_ids"),
    (lambda m, c: m.permute(c["x"], c["ids"], 0), ValueError, "num_experts"),
    (lambda m, c: m.permute(c["x"], c["ids"], 4, capacity=-1), ValueError, "capacity"),
    (lambda m, c: m.unpermute(c["x"], c["ids"], c["weights"].double()), TypeError, "topk_weights"),
    (lambda m, c: m.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"], activation="relu"), ValueError,
     "w13_or_w1"),
    (lambda m, c: m.activation_backward(c["x"], c["x"], "swiglu"), ValueError, "d_act"),
    (lambda m, c: m.grouped_gemm_backward(c["x"][:, :4].contiguous(), c["x"], c["w13"], c["offsets"]), ValueError,
     "d_out"),
])
def test_argument_validation(mcuda, call, exc, match):
    with pytest.raises(exc, match=match):
        call(mcuda, cpu_case())


@pytest.mark.parametrize("name", ["route", "permute", "grouped_gemm", "unpermute", "experts", "moe", "activate",
                                  "grouped_gemm_backward", "activation_backward", "unpermute_backward",
                                  "permute_backward", "bias_grad", "grouped_gemm_bias", "experts_gpt_oss",
                                  "moe_biases"])
def test_valid_cpu_call_without_device_is_runtime_error(mcuda, name):
    if mcuda.device_count() > 0:
        pytest.skip("a CUDA device is present (CPU tensors are a ValueError there)")
    c = cpu_case()
    perm_rows = torch.arange(10, dtype=torch.int32).reshape(5, 2)
    calls = {
        "route": lambda: mcuda.route(c["x"], c["w_router"], 2),
        "permute": lambda: mcuda.permute(c["x"], c["ids"], 4),
        "grouped_gemm": lambda: mcuda.grouped_gemm(c["x"].repeat(2, 1), c["w13"], c["offsets"], activation="swiglu"),
        "unpermute": lambda: mcuda.unpermute(c["x"].repeat(2, 1), perm_rows, c["weights"]),
        "experts": lambda: mcuda.experts(c["x"], c["w13"], c["w2"], c["weights"], c["ids"]),
        "moe": lambda: mcuda.moe(c["x"], c["w_router"], c["w13"], c["w2"], 2),
        "activate": lambda: mcuda.activate(c["x"], "geglu"),
        "grouped_gemm_backward": lambda: mcuda.grouped_gemm_backward(
            torch.zeros(10, 12, dtype=torch.bfloat16), c["x"].repeat(2, 1), c["w13"], c["offsets"]),
        "activation_backward": lambda: mcuda.activation_backward(c["x"], c["x"][:, :4].contiguous(), "swiglu"),
        "unpermute_backward": lambda: mcuda.unpermute_backward(c["x"], c["x"].repeat(2, 1), perm_rows, c["weights"]),
        "permute_backward": lambda: mcuda.permute_backward(c["x"].repeat(2, 1), perm_rows),
        "bias_grad": lambda: mcuda.bias_grad(c["x"].repeat(2, 1), c["offsets"]),
        "grouped_gemm_bias": lambda: mcuda.grouped_gemm(c["x"].repeat(2, 1), c["w13"], c["offsets"],
                                                        activation="swiglu(limit=7.0)", bias=torch.zeros(4, 12)),
        "experts_gpt_oss": lambda: mcuda.experts(
            c["x"], c["w13"], c["w2"], c["weights"], c["ids"], b13_or_b1=torch.zeros(4, 12), b2=torch.zeros(4, 8),
            activation=moe_ext.Activation("silu", True, interleaved=True, alpha=1.702, limit=7.0, up_offset=1.0)),
        "moe_biases": lambda: mcuda.moe(c["x"], c["w_router"], c["w13"], c["w2"], 2, activation="geglu_tanh",
                                        b13_or_b1=torch.zeros(4, 12), b2=torch.zeros(4, 8)),
    }
    with pytest.raises(RuntimeError, match="no CUDA device|built without CUDA"):
        calls[name]()


def test_gpu_benchmark_refuses_without_a_device(mcuda):
    if mcuda.device_count() > 0:
        pytest.skip("a CUDA device is present")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr


# ------------------------------------------------------------------------------ loading moe_ext._cuda
def _import_cuda_with_package_dir(tmp_path, extension_bytes):
    """Imports moe_ext.cuda in a fresh process whose moe_ext package directory holds cuda.py and, if given,
    a file in moe_ext._cuda's place with `extension_bytes` (garbage: a module that cannot load)."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "cuda.py").symlink_to(os.path.join(os.path.dirname(moe_ext.__file__), "cuda.py"))
    if extension_bytes is not None:
        import sysconfig
        (package / ("_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))).write_bytes(extension_bytes)
    code = f"""
        import moe_ext
        moe_ext.__path__[:] = [{str(package)!r}]
        from moe_ext import cuda
        print("loaded", cuda._cuda, cuda.device_count(), cuda.available())
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_build_without_cuda_is_silent(tmp_path):
    pytest.importorskip("torch")
    result = _import_cuda_with_package_dir(tmp_path, None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["loaded", "None", "0", "False"]


def test_cuda_module_that_fails_to_load_raises_with_the_loaders_message(tmp_path):
    pytest.importorskip("torch")
    result = _import_cuda_with_package_dir(tmp_path, b"not a shared object")
    assert result.returncode != 0
    assert "moe_ext._cuda is installed" in result.stderr and "failed to load" in result.stderr
    assert "invalid ELF header" in result.stderr or "file too short" in result.stderr  # the loader's own words


def _run_gpu_test(require):
    test = os.path.join(os.path.dirname(__file__), "test_cuda_gpu.py") + "::test_strided_views_are_a_clear_error"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), CUDA_VISIBLE_DEVICES="")
    env.pop("MOE_EXT_REQUIRE_GPU", None)
    if require:
        env["MOE_EXT_REQUIRE_GPU"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsE", test], env=env,
                          capture_output=True, text=True, timeout=300)


def test_gpu_tests_skip_without_a_device_and_fail_under_require_gpu():
    pytest.importorskip("torch")
    skipped = _run_gpu_test(require=False)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout + skipped.stderr
    reason = "no CUDA device" if HAVE_CUDA_MODULE else "moe_ext built without CUDA"
    assert reason in skipped.stdout
    failed = _run_gpu_test(require=True)
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout + failed.stderr
    assert "MOE_EXT_REQUIRE_GPU=1 but " + reason in failed.stdout


# ------------------------------------------------------------------------------ value checks and capture
@pytest.fixture
def fresh_checks(mcuda, monkeypatch):
    monkeypatch.setattr(mcuda, "_capture_errors", {})
    monkeypatch.setattr(mcuda, "_warned_no_counter", set())
    return mcuda


def _capturing(mcuda, monkeypatch, value):
    monkeypatch.setattr(mcuda, "_capturing", lambda: value)


BAD_IDS = [[0, 3], [4, 1]]  # 4 is out of range for E = 4


def test_eager_value_checks_raise_at_once(fresh_checks, monkeypatch):
    m = fresh_checks
    _capturing(m, monkeypatch, False)
    with pytest.raises(ValueError, match=r"topk_ids: expected expert ids in \[0, 3\]; got values in \[0, 4\]"):
        m._check_id_values(torch.tensor(BAD_IDS, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expert_offsets: expected a non-decreasing cover of 0..6"):
        m._check_offset_values(torch.tensor([0, 4, 2, 6], dtype=torch.int32), 6)
    m._check_id_values(torch.tensor([[0, 3], [2, 1]], dtype=torch.int32), 4)
    m._check_offset_values(torch.tensor([0, 2, 2, 6], dtype=torch.int32), 6)
    assert torch.device("cpu") in m._capture_errors  # made eagerly, ready for a later capture
    m.raise_capture_errors("cpu")


def test_value_checks_under_capture_count_on_the_device_and_raise_later(fresh_checks, monkeypatch):
    m = fresh_checks
    m._check_id_values(torch.tensor([[0, 1]], dtype=torch.int32), 4)  # eager warm-up makes the counter
    with monkeypatch.context() as capture:
        _capturing(m, capture, True)
        # no host read-back: int(), .item() or .cpu() of the values would break a capture
        for name in ("item", "cpu", "__int__", "__bool__", "tolist"):
            capture.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read-back under capture"))
        m._check_id_values(torch.tensor(BAD_IDS, dtype=torch.int32), 4)
        m._check_id_values(torch.tensor([[0, 3]], dtype=torch.int32), 4)
        m._check_offset_values(torch.tensor([0, 4, 2, 6], dtype=torch.int32), 6)
        m._check_offset_values(torch.tensor([0, 2, 2, 5], dtype=torch.int32), 6)  # does not end at M
        m._check_offset_values(torch.tensor([0, 2, 2, 6], dtype=torch.int32), 6)
    assert m._capture_errors[torch.device("cpu")].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"1 call\(s\) had topk_ids outside 0..E-1 and 2 had expert_offsets"):
        m.raise_capture_errors("cpu")
    m.raise_capture_errors("cpu")  # read and cleared


def test_capture_before_any_eager_call_skips_the_checks_with_a_warning(fresh_checks, monkeypatch):
    m = fresh_checks
    _capturing(m, monkeypatch, True)
    with pytest.warns(RuntimeWarning, match="value checks of this capture are skipped"):
        m._check_id_values(torch.tensor(BAD_IDS, dtype=torch.int32), 4)
    assert m._capture_errors == {}  # nothing allocated inside the capture
    m.raise_capture_errors("cpu")


def test_torch_permute_with_capacity_refuses_capture(monkeypatch, mcuda):
    pytest.importorskip("moe_ext.torch")
    from moe_ext.torch import _cuda as adapters
    _capturing(mcuda, monkeypatch, True)
    with pytest.raises(RuntimeError, match="cannot be captured"):
        adapters.permute(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.int32), 4, 2)


def test_poisoned_outputs(mcuda, monkeypatch):
    assert mcuda.POISON_OUTPUTS is False
    assert mcuda._new((2, 3), torch.float32, "cpu").shape == (2, 3)
    monkeypatch.setattr(mcuda, "POISON_OUTPUTS", True)
    assert torch.isnan(mcuda._new((2, 3), torch.bfloat16, "cpu")).all()
    assert (mcuda._new(4, torch.int32, "cpu") == 2**31 - 1).all()


# ------------------------------------------------------------------------------ the GPU tests' comparison
def test_row_comparison_catches_what_a_norm_hides():
    from gpu_support import assert_rows_close, row_errors
    rng = np.random.default_rng(0)
    want = rng.standard_normal((500, 64))
    assert_rows_close(torch.from_numpy(want).to(torch.bfloat16), want, 3e-2)  # one bf16 rounding passes
    wrong_row = want.copy()
    wrong_row[17] *= 1.1  # 10% off in one row of 500: the Frobenius norm moves by 0.5% only
    assert np.linalg.norm(wrong_row - want) / np.linalg.norm(want) < 2e-2
    with pytest.raises(AssertionError, match="row 17"):
        assert_rows_close(wrong_row, want, 3e-2)
    unwritten = want.copy()
    unwritten[3, 5] = np.nan
    with pytest.raises(AssertionError, match=r"1 of 32000 elements not finite.*\(3, 5\)"):
        assert_rows_close(unwritten, want, 3e-2)
    zero_row = np.zeros((2, 4))
    assert list(row_errors(np.array([[0, 0, 0, 0], [0, 1e-30, 0, 0]]), zero_row)) == [0, np.inf]


def test_row_floor_for_whole_model_gradients():
    from gpu_support import row_errors
    want = np.array([[100.0, -50.0], [1e-4, 2e-4]])
    noisy = want + np.array([[1e-3, 0.0], [0.0, 1e-4]])  # the small row's noise is 50% of itself
    assert row_errors(noisy, want)[1] == pytest.approx(0.5)
    assert row_errors(noisy, want, floor=1e-2)[1] == pytest.approx(1e-4)  # judged against 1% of 100
