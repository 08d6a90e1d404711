"""Progress of `bench run` where stdout is not a terminal (CI logs, `| tee`, nohup): plain lines, since rich's bar
draws nothing there until the run ends. The same calls as rich.progress.Progress: add_task, advance, remove_task."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

EVERY_S = 10.0  # a line per task at most this often, besides its start and end


class LineProgress:
    def __init__(self, console: Console, every_s: float = EVERY_S):
        self.console, self.every_s = console, every_s
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None) -> int:
        task = len(self.tasks)
        now = time.monotonic()
        self.tasks[task] = {"name": description.strip(), "total": total, "done": 0, "start": now, "said": now}
        if task:  # the first task counts the cells; each cell's start gets a line
            self._say(task, "started")
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        t = self.tasks[task]
        t["done"] += advance
        if time.monotonic() - t["said"] >= self.every_s or t["done"] == t["total"]:
            self._say(task, "")

    def remove_task(self, task: int) -> None:
        self._say(task, "ended")
        del self.tasks[task]

    def _say(self, task: int, event: str) -> None:
        t = self.tasks[task]
        t["said"] = time.monotonic()
        count = f"{t['done']:g}/{t['total']:g}" if t["total"] else f"{t['done']:g}"
        what = "cells done" if task == 0 else "requests"
        parts = [event, f"{count} {what}", f"{t['said'] - t['start']:.0f} s"]
        self.console.print(f"{escape(t['name'])}: {', '.join(p for p in parts if p)}", highlight=False)
