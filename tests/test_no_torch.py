"""torch stays optional: `import moe_ext` (and its NumPy backward API) works when torch cannot be
imported; `import moe_ext.torch` then fails with ImportError."""
import os
import subprocess
import sys

PER_TIER = False

SCRIPT = """
import sys
sys.modules["torch"] = None  # makes `import torch` raise ImportError
import numpy as np
import moe_ext
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
g = moe_ext.grouped_gemm_backward(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32),
                                  np.ones((1, 3, 4), np.float32), np.array([0, 2], np.int32))
assert g[1].shape == (1, 3, 4)
try:
    import moe_ext.torch
except ImportError:
    print("ok")
"""


def test_import_without_torch():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
