"""Progress of long work (training epochs, scoring a large held-out set): images/s and the time left. A tqdm bar
where stderr is a terminal; elsewhere (CI logs, a Prefect run's log) one line a minute, so a long epoch is never
silent and a short one stays quiet."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 60.0


def say(line: str) -> None:
    """A line about long work, on stderr. Under a Prefect run, `log_prints` puts it in the run's log as well."""
    print(line, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """`total` steps of `images` images in all; `update(steps, images, **figures)` after each step."""

    def __init__(self, desc: str, total: int, images: int, *, enabled: bool = True, every_s: float = LOG_EVERY_S):
        self.desc, self.total, self.images, self.every_s = desc, int(total), int(images), float(every_s)
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()
        self.done = self.seen = 0
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, desc=desc, leave=False) if self.terminal else None

    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.t0, 1e-9)

    def eta(self) -> float:
        return (self.total - self.done) * (time.perf_counter() - self.t0) / max(self.done, 1)

    def update(self, steps: int = 1, images: int = 0, **figures) -> None:
        self.done += steps
        self.seen += images
        if not self.enabled:
            return
        shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in figures.items()}
        if self.bar is not None:
            self.bar.update(steps)
            if self.done % 5 == 0 or self.done == self.total:
                self.bar.set_postfix(**shown, img_s=f"{self.rate():.0f}")
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            extra = "".join(f" {k} {v}" for k, v in shown.items())
            eta = _clock(self.eta())
            say(f"{self.desc}: {self.done}/{self.total} steps, {self.rate():.1f} img/s, ETA {eta}{extra}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
