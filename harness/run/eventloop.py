"""Keeping the worker's event loop free to stamp, and measuring how free it was.

The request loop only sends, reads and stamps. Everything else a finished request causes (its record written to
requests.jsonl, the progress line to the runner's pipe) goes through `BackgroundWriter`, a thread: a slow disk or a
full pipe holds up that thread, never a stamp. `LoopLagProbe` measures what is left: how long a callback that became
ready waits before the loop runs it, which is how late a chunk arriving at that moment would have been stamped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from harness.core.events import now

PROBE_INTERVAL_S = 0.01


class BackgroundWriter:
    """Hands each item to `sink` in a thread of its own, in the order they were put; `close` drains the queue."""

    def __init__(self, sink: Callable[[Any], None]):
        self.sink = sink
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self.thread.start()

    def put(self, item: Any) -> None:
        self.queue.put(item)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.sink(item)
                except BaseException as e:  # kept for close(), which raises it where the cell can fail on it
                    self.error = e

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class LoopLagProbe:
    """Samples the loop's scheduling delay: every PROBE_INTERVAL_S a thread hands the loop a callback, as arriving
    bytes would, and the callback notes how long it waited. (A timer on the loop itself would mostly measure epoll's
    rounding of timeouts up to the millisecond, which arriving bytes do not suffer.) A callback that blocks the loop,
    or a thread holding the GIL, shows here as lag."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = PROBE_INTERVAL_S):
        self.loop, self.interval_s = loop, interval_s
        self.times, self.lags_ms = array("d"), array("d")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-lag-probe", daemon=True)

    def __enter__(self) -> LoopLagProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.loop.call_soon_threadsafe(self._stamp, now())
            except RuntimeError:  # the loop closed
                return

    def _stamp(self, t_ready: float) -> None:
        self.times.append(t_ready)
        self.lags_ms.append((now() - t_ready) * 1e3)

    def lags(self, start: float, end: float) -> list[float]:
        """The lags (ms) of the samples taken from start to end, rounded to the microsecond."""
        lo, hi = bisect_left(self.times, start), bisect_right(self.times, end)
        return [round(v, 3) for v in self.lags_ms[lo:hi]]
