"""What a served engine says about itself on its Prometheus `/metrics` page (vLLM, TGI): how much its counters grew
over a cell and what its gauges (KV-cache usage, queue lengths) read, scraped when the engine is ready, every
`interval_s` during the cell and at its end.

These are the engine's own numbers, kept beside the harness's metrics, never mixed into them. Gauges are read only at
scrape times, so their `max` is a lower bound of the true peak.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from backends.base import now


@dataclass(frozen=True)
class Watched:
    sample: str  # the sample's name as exposed, e.g. "vllm:num_preemptions_total"
    kind: Literal["counter", "gauge"]
    across_labels: Literal["sum", "max"] = "sum"  # how series that differ only in labels (engine, reason) combine


def parse(text: str, watched: Mapping[str, Watched]) -> dict[str, float]:
    """{key: value} for every watched sample present in an exposition text, combined over its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    by_sample = {w.sample: (key, w) for key, w in watched.items()}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in by_sample:
                key, w = by_sample[s.name]
                if key not in values:
                    values[key] = s.value
                else:
                    values[key] = values[key] + s.value if w.across_labels == "sum" else max(values[key], s.value)
    return values


def summarize(scrapes: list[tuple[float, dict[str, float]]], watched: Mapping[str, Watched]) -> dict[str, Any]:
    """Counters: growth from the first scrape to the last. Gauges: max and mean over scrapes, and the timeline."""
    counters, gauges, missing = {}, {}, []
    for key, w in watched.items():
        series = [(t, v[key]) for t, v in scrapes if key in v]
        if not series:
            missing.append(key)
        elif w.kind == "counter":
            counters[key] = series[-1][1] - series[0][1]
        else:
            values = [v for _, v in series]
            gauges[key] = {"max": max(values), "mean": sum(values) / len(values), "last": values[-1]}
    timeline = {"t": [t for t, _ in scrapes]} | {
        key: [v.get(key) for _, v in scrapes] for key, w in watched.items() if w.kind == "gauge" and key in gauges}
    return {"scrapes": len(scrapes), "counters": counters, "gauges": gauges, "timeline": timeline,
            "missing": missing}


class MetricsWatch:
    """Scrapes `fetch()` (an exposition text) at `start`, every `interval_s` in the background, and at `finish`."""

    def __init__(self, fetch: Callable[[], Awaitable[str]], watched: Mapping[str, Watched], source: str,
                 interval_s: float | None):
        self.fetch, self.watched, self.source, self.interval_s = fetch, watched, source, interval_s
        self.scrapes: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []  # the first few
        self.failed = 0
        self._task: asyncio.Task | None = None
        self._summary: dict[str, Any] | None = None

    async def start(self) -> None:
        await self._scrape()
        if self.interval_s:
            self._task = asyncio.create_task(self._every())

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._scrape()

    async def _scrape(self) -> None:
        try:
            text = await self.fetch()
            self.scrapes.append((now(), parse(text, self.watched)))
        except Exception as e:  # a missed scrape loses one sample, not the cell
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        """Stop the background sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def finish(self) -> dict[str, Any]:
        """Stop sampling, scrape a last time and summarize (once: later calls return the same summary)."""
        if self._summary is None:
            await self.close()
            await self._scrape()
            self._summary = {"source": self.source, "interval_s": self.interval_s,
                             **summarize(self.scrapes, self.watched)}
            if self.failed:
                self._summary |= {"failed_scrapes": self.failed, "errors": self.errors}
        return self._summary
