"""ONNX Runtime speed of exported models: latency at batch 1, throughput at a large batch.

Sessions get the same thread count and run one after the other in the same process, so that the
compressed model and the uncompressed baseline are compared under identical conditions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from autorank.engine.deploy import INPUT_NAME, onnx_session


@dataclass
class Speed:
    latency_ms: float       # median wall time of one batch-1 inference
    throughput: float       # images per second at `batch_size`
    batch_size: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _timed_runs(run, min_runs: int, min_seconds: float) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def benchmark(path: str | Path, input_shape: tuple[int, ...], *, threads: int, batch_size: int = 128,
              seconds: float = 1.0, seed: int = 0) -> Speed:
    """Latency (median of >= 20 batch-1 runs) and throughput (>= 3 batches) after warm-up."""
    session = onnx_session(path, threads)
    rng = np.random.default_rng(seed)
    one = rng.standard_normal((1, *input_shape), dtype=np.float32)
    many = rng.standard_normal((batch_size, *input_shape), dtype=np.float32)
    for _ in range(5):
        session.run(None, {INPUT_NAME: one})
    session.run(None, {INPUT_NAME: many})
    latency = _timed_runs(lambda: session.run(None, {INPUT_NAME: one}), 20, seconds / 2)
    batches = _timed_runs(lambda: session.run(None, {INPUT_NAME: many}), 3, seconds / 2)
    return Speed(statistics.median(latency) * 1000, batch_size / statistics.median(batches), batch_size, threads)
