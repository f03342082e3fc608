"""Progress of a long loop: a tqdm bar on a terminal or in a notebook, plain lines in a log file.

A bar redraws itself with carriage returns; written to a file (a Slurm or nohup log, CI) every
redraw lands on one ever-growing line, megabytes long over a long run and unreadable. Off a
terminal, `LineProgress` prints one ordinary line at most every `interval` seconds, and a last one
at the end, with what the bar shows: position, rate, elapsed, time left and the postfix.
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def progress(total: Optional[int], desc: str, *, initial: int = 0, unit: str = "it", stream=None):
    """tqdm's bar where it can redraw (a terminal, a notebook), else a LineProgress; same methods used
    here: update(n), set_postfix(**values), close()."""
    stream = sys.stderr if stream is None else stream
    interactive = "ipykernel" in sys.modules or getattr(stream, "isatty", lambda: False)()
    # a loop of no items (nothing left to sample) gets the plain line "0/0": tqdm takes a total of 0 for an unknown
    # one and drew "0prompts [00:00, ?prompts/s]", a rate of nothing and no sign the loop was empty
    if interactive and total != 0:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, initial=initial, unit=unit, stream=stream)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    def __init__(self, total: Optional[int], desc: str, *, initial: int = 0, unit: str = "it", stream=None,
                 interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = sys.stderr if stream is None else stream
        self.n = self._start_n = initial
        self.postfix: dict = {}
        self._start = self._last = time.monotonic()
        self._closed = False
        self._printed_n: Optional[int] = None

    def update(self, n: int = 1):
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def set_postfix(self, **values):
        """Shown from the next printed line on: call it before update() to print a step with its numbers."""
        self.postfix = values

    def _print(self):
        now = time.monotonic()
        self._last = now
        self._printed_n = self.n
        elapsed = now - self._start
        done = self.n - self._start_n
        if self.total is None:   # an unknown total (as tqdm takes it): the count alone, not "5/None"
            parts = [f"{self.desc}: {self.n} {self.unit}"]
        else:
            parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{_clock(elapsed)} elapsed")
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"~{_clock((self.total - self.n) / rate)} left")
        line = ", ".join(parts)
        if self.postfix:
            line += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(line, file=self.stream, flush=True)

    def close(self):
        if not self._closed:
            self._closed = True
            if self._printed_n != self.n:   # the last position, unless just printed
                self._print()
