"""Latency of two onnxruntime sessions measured side by side: the runs alternate (a, b, a, b, …) so that a
change of machine load hits both alike, and their ratio comes with its spread. One figure per session taken
minutes apart swings with load (2.4 → 4.1 ms for the same computation was measured); a ratio of interleaved
runs does not."""

from __future__ import annotations

import time

import numpy as np

from stages.onnx_convert.scoring import fixed_batch


def paired_latency(a, b, input_shape: tuple, *, batch: int = 1, runs: int = 30, budget_s: float = 6.0,
                   warmup: int = 3) -> dict:
    """{"input": {p50, p90, runs}, "exported": {…}, "ratio": {median, p10, p90, verdict}} in milliseconds for
    sessions `a` (input) and `b` (exported) at `batch` images (a fixed-batch session runs its own batch).
    At least 5 and up to `runs` rounds, fewer once `budget_s` is spent. `ratio` is exported ÷ input per round."""
    first, second = interleaved_latency([a, b], input_shape, batch=batch, runs=runs, budget_s=budget_s,
                                        warmup=warmup)
    return {"input": first, "exported": {k: v for k, v in second.items() if k != "ratio"},
            "ratio": {**second["ratio"], "batch": batch}}


def interleaved_latency(sessions, input_shape: tuple, *, batch: int = 1, runs: int = 30, budget_s: float = 6.0,
                        warmup: int = 3) -> list[dict]:
    """One {p50, p90, runs} per session, timed in rounds that run every session once (the order rotating each
    round); each after the first adds "ratio": its time ÷ the first session's, per round, as median/p10/p90 with
    a verdict."""
    feeds = [_feed(s, input_shape, batch) for s in sessions]
    for s, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    n = len(sessions)
    start = time.perf_counter()
    while len(times[0]) < runs and (time.perf_counter() - start < budget_s or len(times[0]) < 5):
        shift = len(times[0]) % n  # no session always runs first
        for i in (*range(shift, n), *range(shift)):
            t = time.perf_counter()
            sessions[i].run(None, feeds[i])
            times[i].append((time.perf_counter() - t) * 1e3)
    out = [_summary(t) for t in times]
    for summary, t in zip(out[1:], times[1:], strict=True):
        summary["ratio"] = ratio_of(t, times[0])
    return out


def ratio_of(times: list[float], reference: list[float]) -> dict:
    """Per-round time ratios of two sessions timed in the same rounds: median, p10, p90 and a verdict."""
    ratios = np.asarray(times) / np.asarray(reference)
    p10, med, p90 = (float(v) for v in np.percentile(ratios, [10, 50, 90]))
    return {"median": med, "p10": p10, "p90": p90, "verdict": ratio_verdict(med, p10, p90)}


def ratio_verdict(median: float, p10: float, p90: float) -> str:
    """One phrase for a latency ratio: faster/slower only when the spread (p10–p90) stays on one side of 1."""
    if p10 <= 1.0 <= p90:
        return "no measurable difference"
    return f"{1 / median:.2f}x faster" if median < 1.0 else f"{median:.2f}x slower"


def _feed(session, input_shape: tuple, batch: int) -> dict:
    """Images of `input_shape`, or of the session's own shape where it fixes every axis after the batch (a grouped
    layer timed with half its groups reads half the channels)."""
    n = fixed_batch(session) or batch
    own = session.get_inputs()[0].shape[1:]
    shape = tuple(own) if own and all(isinstance(d, int) and d > 0 for d in own) else tuple(input_shape)
    x = np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32)
    return {session.get_inputs()[0].name: x}


def _summary(times: list[float]) -> dict:
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)), "runs": len(times),
            "times": [round(t, 4) for t in times]}
