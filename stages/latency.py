"""Latency of two onnxruntime sessions measured side by side: the runs alternate (a, b, a, b, …) so that a
change of machine load hits both alike, and their ratio comes with its spread. One figure per session taken
minutes apart swings with load (2.4 → 4.1 ms for the same computation was measured); a ratio of interleaved
runs does not."""

from __future__ import annotations

import time

import numpy as np


def fixed_batch(session) -> int | None:
    """The batch size a session's input hard-codes, or None when it is dynamic."""
    d0 = session.get_inputs()[0].shape[0]
    return d0 if isinstance(d0, int) and d0 > 0 else None


def paired_latency(a, b, input_shape: tuple, *, batch: int = 1, runs: int = 30, budget_s: float = 6.0,
                   warmup: int = 3) -> dict:
    """{"input": {p50, p90, runs}, "exported": {…}, "ratio": {median, p10, p90, verdict}} in milliseconds for
    sessions `a` (input) and `b` (exported) at `batch` images (a fixed-batch session runs its own batch).
    At least 5 and up to `runs` rounds, fewer once `budget_s` is spent. `ratio` is exported ÷ input per round."""
    feeds = [_feed(s, input_shape, batch) for s in (a, b)]
    for s, feed in zip((a, b), feeds, strict=True):
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[], []]
    start = time.perf_counter()
    while len(times[0]) < runs and (time.perf_counter() - start < budget_s or len(times[0]) < 5):
        order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)  # neither always runs first
        for i in order:
            t = time.perf_counter()
            (a, b)[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - t) * 1e3)
    ratios = np.asarray(times[1]) / np.asarray(times[0])
    p10, med, p90 = (float(v) for v in np.percentile(ratios, [10, 50, 90]))
    return {"input": _summary(times[0]), "exported": _summary(times[1]),
            "ratio": {"median": med, "p10": p10, "p90": p90, "batch": batch, "verdict": ratio_verdict(med, p10, p90)}}


def ratio_verdict(median: float, p10: float, p90: float) -> str:
    """One phrase for a latency ratio: faster/slower only when the spread (p10–p90) stays on one side of 1."""
    if p10 <= 1.0 <= p90:
        return "no measurable difference"
    return f"{1 / median:.2f}x faster" if median < 1.0 else f"{median:.2f}x slower"


def _feed(session, input_shape: tuple, batch: int) -> dict:
    n = fixed_batch(session) or batch
    x = np.random.default_rng(0).standard_normal((n, *input_shape), dtype=np.float32)
    return {session.get_inputs()[0].name: x}


def _summary(times: list[float]) -> dict:
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)), "runs": len(times)}
