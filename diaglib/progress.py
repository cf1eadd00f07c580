"""Progress on work that takes more than a few seconds: a tqdm bar on a terminal, plain lines in a log,
nothing when turned off (``--json``, ``enabled=False``, ``DIAGLIB_PROGRESS=0``, or a report's kernels).

    from diaglib import progress
    for point in progress.bar(points, desc="sweep", unit="pt", enabled=not args.json):
        ...
    with progress.bar(total=len(pages), desc="report") as bar:
        bar.update()

Everything goes to stderr: the stream set by :func:`use_stream` (the CLI gives its own stderr there while it
routes library output to its log), else ``sys.stderr``. Inside a Jupyter kernel the bar is tqdm's widget.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterable

DELAY_S = 2.0  # nothing is shown for work that ends sooner
LINE_EVERY_S = 10.0  # a log gets one line per this many seconds

_stream: IO[str] | None = None


def use_stream(stream: IO[str] | None) -> None:
    """Send progress to ``stream`` from now on (None: back to ``sys.stderr``)."""
    global _stream
    _stream = stream


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True):
    """An iterable / context manager with ``update(n=1)`` that shows how far ``desc`` has got."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = _stream or sys.stderr
    if not enabled or os.environ.get("DIAGLIB_PROGRESS", "1") == "0":
        return _Silent(iterable)
    tty = getattr(stream, "isatty", lambda: False)()
    if not tty and "ipykernel" in sys.modules:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, delay=DELAY_S)
    if tty:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, delay=DELAY_S, leave=False)
    return _Lines(iterable, total, desc, unit, stream)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lines(_Silent):
    """``desc: 120/804 pt (15%), 12 s`` every LINE_EVERY_S once DELAY_S have passed, and a last line."""

    def __init__(self, iterable, total, desc, unit, stream):
        super().__init__(iterable)
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self.t0 = 0, time.monotonic()
        self.last: float | None = None

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.t0 >= DELAY_S and (self.last is None or now - self.last >= LINE_EVERY_S):
            self._line(now)

    def close(self) -> None:
        if self.last is not None and self.last != -1.0:
            self._line(time.monotonic())
            self.last = -1.0

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{pct}, {now - self.t0:.0f} s", file=self.stream, flush=True)
        self.last = now
