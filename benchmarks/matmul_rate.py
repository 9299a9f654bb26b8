"""
# The speed reference: how fast this machine multiplies two 4096x4096 float32 matrices, now

Shared machines run at different speeds from one hour to the next, so a benchmark's timings are worth comparing only
beside the rate of a fixed piece of arithmetic measured in the same process at the same time: this one (numpy's
BLAS, every core numpy uses).

    python benchmarks/matmul_rate.py    # prints the rate in GFLOP/s
"""

import time

import numpy as np


def matmul_gflops(size=4096, repeats=3):
    """GFLOP/s of a `size` x `size` float32 matrix product: 2 size^3 FLOPs over the fastest of `repeats` products,
    after one untimed product (which starts the BLAS threads)."""
    rng = np.random.default_rng(0)
    left, right = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    np.matmul(left, right)
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.matmul(left, right)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * size**3 / fastest / 1e9


if __name__ == "__main__":
    print(f"4096x4096 float32 matrix product: {matmul_gflops():.0f} GFLOP/s")
