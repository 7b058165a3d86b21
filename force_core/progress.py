"""The density schedule and the progress report that both contexts (`PruningContext`, `ChannelContext`) share.

Imports the stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[int, int, dict[str, Any]], None]
SCHEDULES = ("exp", "linear")


def density_schedule(density: float, steps: int, schedule: str = "exp") -> list[float]:
    """d_t for t = 1..T: exp d^(t/T), linear 1 - (1 - d) t/T (FORCE.md); d_T = d exactly."""
    if schedule == "exp":
        ds = [density ** (t / steps) for t in range(1, steps + 1)]
    elif schedule == "linear":
        ds = [1.0 - (1.0 - density) * t / steps for t in range(1, steps + 1)]
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    ds[-1] = density
    return ds


def kept_count(density: float, n: int) -> int:
    """k = round(d·N), halves rounded up (one fixed rule, FORCE.md)."""
    return min(n, int(math.floor(density * n + 0.5)))


class ScheduleMixin:
    """`schedule()` and `report()` for a context that sets `density`, `steps`, `schedule_kind` (a name from
    SCHEDULES), `numel` (the N the kept counts are of), `progress` (a `Progress` or None) and `losses`."""

    density: float
    steps: int
    schedule_kind: str
    numel: int
    progress: Progress | None
    losses: list[float]

    def schedule(self) -> Iterator[tuple[int, float, int]]:
        """(t, d_t, k_t) for t = 1..steps; k_t = round(d_t·N)."""
        for t, d in enumerate(density_schedule(self.density, self.steps, self.schedule_kind), start=1):
            yield t, d, kept_count(d, self.numel)

    def report(self, step: int, total: int, **info: Any) -> None:
        """Call `progress(step, total, info)`, with the last step loss as info["loss"] unless given."""
        if self.progress is not None:
            if self.losses:
                info.setdefault("loss", self.losses[-1])
            self.progress(step, total, info)


__all__ = ["SCHEDULES", "Progress", "ScheduleMixin", "density_schedule", "kept_count"]
