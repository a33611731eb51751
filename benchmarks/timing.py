"""Timing helpers shared by the benchmarks; jax only, so any device image has them."""

import statistics
import time
from typing import Any, Callable, List

import jax
import jax.numpy as jnp


def time_calls(call: Callable[[], Any], steps: int, warmup: int) -> List[float]:
  """Seconds of each of `steps` synchronised calls, after `warmup` untimed ones."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def median_seconds(call: Callable[[], Any], steps: int, warmup: int = 2) -> float:
  """The median of `time_calls`."""
  return statistics.median(time_calls(call, steps, warmup))


def matmul_gflops(dtype: Any, n: int, steps: int = 10) -> float:
  """The rate of an n x n x n matmul in `dtype`, in GFLOP/s (the machine's limit)."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2 * n**3 / median_seconds(lambda: matmul(a, b), steps) / 1e9
