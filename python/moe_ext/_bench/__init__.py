"""The benchmark harness behind `moe-ext bench` and bench/run.py (installed with the package).

* ``workload``: the SPEC §6 shapes, their FLOP and byte counts, and the inputs (one set of float32
  arrays shared by every implementation).
* ``peers``: the implementations timed side by side: moe_ext, the NumPy reference, the PyTorch eager
  Mixtral loop, ``torch._grouped_mm`` and the dense FFN of the same active FLOPs.
* ``ceiling``: this machine's compute and bandwidth ceilings, measured in the same run.
* ``harness``: timing, ratios, the terminal table and the JSON document; ``plots``: the PNGs.

torch, tqdm and matplotlib are optional; only NumPy and moe_ext are imported at module import.
"""
