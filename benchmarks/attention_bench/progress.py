"""The progress bar on stderr and the relative work estimates behind its ETA.

A one-line bar when stderr is a terminal, else one line per labelled step; `--no-progress`
turns it off. Notes (skips, worker messages) go to stdout between redraws.
"""

import os
import sys
import time


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: float, enabled: bool = True) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.start = time.perf_counter()
        self.label = ""
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0

    def _eta(self) -> str:
        if self.done <= 0:
            return "--:--"
        elapsed = time.perf_counter() - self.start
        return fmt_duration(elapsed / self.done * max(self.total - self.done, 0.0))

    def render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = fmt_duration(time.perf_counter() - self.start)
        if self.tty:
            width = 28
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            line = f"[{bar}] {frac * 100:5.1f}% {elapsed} ETA {self._eta()} | {self.label}"
            cols = 160
            try:
                cols = os.get_terminal_size(2).columns
            except OSError:
                pass
            sys.stderr.write("\r\x1b[2K" + line[: cols - 1])
            sys.stderr.flush()
        elif force:
            sys.stderr.write(f"[{frac * 100:5.1f}% {elapsed} ETA {self._eta()}] {self.label}\n")
            sys.stderr.flush()

    def set_label(self, label: str) -> None:
        self.label = label
        self.render(force=True)

    def advance(self, work: float) -> None:
        self.done += work
        self.render()

    def note(self, message: str) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        print(message, flush=True)
        self.render()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        if self.enabled:
            print(
                f"finished in {fmt_duration(time.perf_counter() - self.start)}",
                file=sys.stderr,
            )


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def est_seconds(flops: float, calls: int) -> float:
    """Relative work estimate for the ETA (only ratios matter)."""
    return flops / 5e10 + 0.003 * calls
