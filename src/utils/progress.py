"""Progress reporting for long loops: rates, ETA, and a one-line bar when a terminal is attached."""
import sys
import time
from typing import Optional, TextIO


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    return f"{hours}:{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """Tracks steps done out of ``total``; ``rate`` excludes the first ``warmup`` steps (compilation)."""

    def __init__(self, total: int, items_per_step: int = 1, warmup: int = 1, stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.items_per_step = items_per_step
        self.warmup = warmup
        self.stream = stream or sys.stdout
        self.done = 0
        self._t0 = time.perf_counter()
        self._t_warm = None
        self._warm_done = 0
        self._last = self._t0

    def step(self, n: int = 1) -> float:
        """Record n finished steps; returns the seconds the last call took."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.done += n
        if self._t_warm is None and self.done >= self.warmup:
            self._t_warm, self._warm_done = now, self.done
        return elapsed

    def seconds_per_step(self) -> float:
        if self._t_warm is None or self.done <= self._warm_done:
            return (self._last - self._t0) / max(self.done, 1)
        return (self._last - self._t_warm) / (self.done - self._warm_done)

    def items_per_second(self) -> float:
        return self.items_per_step / max(self.seconds_per_step(), 1e-9)

    def eta(self) -> str:
        return format_seconds(self.seconds_per_step() * (self.total - self.done))

    def bar(self, prefix: str = "") -> None:
        """Redraw a one-line bar when the stream is a terminal (logs stay clean otherwise)."""
        if not getattr(self.stream, "isatty", lambda: False)():
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        self.stream.write(f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{self.items_per_second():.1f} img/s ETA {self.eta()}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
