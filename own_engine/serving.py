"""Serving: the engine's scheduler stepped on one thread of its own, sequences submitted from any thread.

New sequences join between steps (continuous batching); with nothing to run, the thread sleeps until one comes.
Each sequence's on_token and on_finish are called on that thread, as soon as its tokens are chosen.
"""
import queue
import threading

from .scheduler import EngineForScheduler, Scheduler
from .sequence import Sequence


class ServingLoop:
    def __init__(self, engine: EngineForScheduler) -> None:
        self.scheduler = Scheduler(engine)
        self.inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="own_engine_scheduler", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue seq; it joins the running batch at the next step. Set seq.cancelled to make it leave early."""
        self.inbox.put(seq)

    def close(self) -> None:
        """Stop after the step in flight; sequences still queued or running are left as they are."""
        self.inbox.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            while not self.inbox.empty() or not self.scheduler.busy:
                seq = self.inbox.get()
                if seq is None:
                    return
                self.scheduler.add(seq)
            try:
                self.scheduler.step()
            except Exception as e:  # a bug, not a failed pass (the scheduler fails those sequences itself)
                self.scheduler.fail_all(e)
