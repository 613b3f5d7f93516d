"""Live progress of a long job on stderr: a tqdm bar on a terminal, a plain line every ``every_s`` seconds
elsewhere (CI logs, ``kubectl logs``, a file), and one closing line either way.

The driver updates it from what it already receives (the writers' per-shard summaries, the training metrics);
it costs no storage call. ``CASCADE_PROGRESS=plain`` forces plain lines, ``off`` silences it, and
``CASCADE_PROGRESS_EVERY_S`` sets the interval of the plain lines (default 30 s).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``done`` of ``total`` units (shards, steps) with counters (samples, rejects, loss) and their rates.

    Args:
        job: the label at the start of each line (``encode``, ``train-c``).
        total: units in the whole run (None: unknown, no ETA).
        unit: what a unit is (``shards``, ``steps``).
        rate_of: the counter whose rate per second is shown (``samples``).
        initial: units already done before this run (a resumed job).
    """

    def __init__(
        self, job: str, total: int | None, *, unit: str = "shards", rate_of: str = "samples",
        stream: TextIO | None = None, every_s: float | None = None, mode: str | None = None, initial: int = 0,
    ) -> None:  # fmt: skip
        self.job, self.total, self.unit, self.rate_of = job, total, unit, rate_of
        self.stream = stream or sys.stderr
        self.every_s = float(os.environ.get("CASCADE_PROGRESS_EVERY_S", 30)) if every_s is None else every_s
        mode = mode or os.environ.get("CASCADE_PROGRESS") or ("bar" if self.stream.isatty() else "plain")
        self.mode = mode if mode in ("bar", "plain", "off") else "plain"
        self.done = self.initial = initial  # units done before this run (a resumed job): not in the ETA
        self.dirty = True  # changed since the last plain line
        self.counters: dict[str, float] = {}
        self.shown: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=job, unit=f" {unit}", file=self.stream, dynamic_ncols=True,
                            initial=initial)  # fmt: skip

    def update(self, done: int = 0, *, show: dict[str, Any] | None = None, **counts: float) -> None:
        """Add ``done`` units and ``counts`` (running totals grow); ``show`` sets values shown as they are."""
        self.done += done
        for name, value in counts.items():
            self.counters[name] = self.counters.get(name, 0) + value
        self.shown.update(show or {})
        self.dirty = True
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(self._counts(), refresh=False)
            self.bar.refresh()
        elif self.mode == "plain" and time.monotonic() - self.last >= self.every_s:
            self._line()

    def _counts(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        parts = []
        for name, value in self.counters.items():
            text = f"{value:,.0f} {name}"
            if name == self.rate_of:
                text += f" ({value / elapsed:,.1f}/s)"
            parts.append(text)
        parts += [f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                  for name, value in self.shown.items()]  # fmt: skip
        return ", ".join(parts)

    def line(self) -> str:
        """The plain line: ``encode: 12/100 shards, 4,512 samples (38.2/s), 3 rejects, 0:00:42 elapsed, ETA 0:05:08``."""
        elapsed = time.monotonic() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.job}: {self.done}{of} {self.unit}"
        counts = self._counts()
        text += f", {counts}" if counts else ""
        text += f", {_duration(elapsed)} elapsed"
        if self.total and self.initial < self.done < self.total:
            text += f", ETA {_duration(elapsed / (self.done - self.initial) * (self.total - self.done))}"
        return text

    def _line(self) -> None:
        self.last, self.dirty = time.monotonic(), False
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode != "off" and (self.dirty or self.bar is not None):
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def polling(read: Callable[[], None], every_s: float) -> Iterator[None]:
    """Call ``read`` every ``every_s`` seconds on a thread while the block runs (a job whose progress lives in
    files another process writes: training's ``metrics.csv``, img2dataset's ``*_stats.json``), and once after."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            read()

    thread = threading.Thread(target=loop, name="progress-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        read()
