"""The implementations the benchmark compares (moe_ext, NumPy reference, PyTorch eager Mixtral loop,
torch._grouped_mm, dense equivalent): see moe_ext/_bench/peers.py, installed with the package.

    python bench/peers.py        # which peers run here, in which dtype (or why not)
"""
from moe_ext._bench.peers import *  # noqa: F401,F403
from moe_ext._bench.peers import DTYPES, PEERS, Unavailable

if __name__ == "__main__":
    from moe_ext._bench.workload import Workload, parse_spec

    work = Workload().load(parse_spec("8,32,64,4,2"))
    for peer in PEERS:
        for dtype in DTYPES:
            try:
                peer.prepare(work, dtype)()
                state = "runs"
            except Unavailable as e:
                state = str(e)
            print(f"{peer.name:<17} {dtype:<5} {state}")
