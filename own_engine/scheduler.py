"""Continuous batching in the spirit of nano-vllm's scheduler: requests join and leave between steps.

A step is one pass over the weights with at most plan.step_tokens rows: one token for every running sequence that
is decoding, then the rest of the prompts of running sequences still in prefill, then new requests while rows,
sequence slots (max_batch) and KV blocks remain; a prompt longer than the rows left goes on in the next step. When a decoding sequence needs
a block and none is free, the most recently admitted sequence is preempted: its blocks go back (its full ones stay
in the prefix cache) and it waits at the head of the queue to be recomputed, prompt and output so far.
"""
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import EngineError
from .sampling import sample


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    on_token: Callable[[int], None] | None = None  # each token as soon as it is chosen, on the stepping thread
    on_finish: Callable[["GenerationRequest"], None] | None = None
    output: list[int] = field(default_factory=list)
    error: Exception | None = None
    cancelled: bool = False  # may be set from any thread: the request leaves at the next step


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    generator: torch.Generator | None
    seq: int | None = None  # the block manager's id while admitted


class Scheduler:
    def __init__(self, engine):
        self.engine, self.blocks = engine, engine.blocks
        self.budget, self.max_running = engine.plan.step_tokens, engine.max_batch
        self.eos = set(engine.config.eos_token_ids)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # in admission order

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: GenerationRequest):
        generator = None if request.seed is None else torch.Generator(self.engine.device).manual_seed(request.seed)
        s = _Sequence(request, generator)
        need = self.blocks.blocks_for(len(request.prompt) + request.max_new_tokens)
        if need > self.blocks.num_blocks:
            self._finish(s, EngineError(f"a prompt of {len(request.prompt)} tokens + {request.max_new_tokens} new "
                                        f"tokens need {need} KV blocks, the cache has {self.blocks.num_blocks} "
                                        f"(raise max_context)"))
        else:
            self.waiting.append(s)

    def step(self):
        """Run one pass over the weights for what can run now, then hand out the tokens it chose."""
        for s in [s for s in (*self.running, *self.waiting) if s.request.cancelled]:
            self._finish(s)
        work = self._schedule()
        if not work:
            return
        decoding = all(n == 1 and s.request.output for s, n in work)
        try:
            logits = self.engine.forward([(s.seq, n) for s, n in work], "decode" if decoding else "prefill")
        except Exception as e:  # the pass failed: so did the requests in it; the others go on
            for s, _ in work:
                self._finish(s, e)
            return
        for (s, _), row in zip(work, logits):
            tokens, r = self.blocks.tokens[s.seq], s.request
            if self.blocks.computed[s.seq] < len(tokens):
                continue  # more of its prompt next step
            token = int(sample(row[None], r.temperature, r.top_k, r.top_p, s.generator))
            r.output.append(token)
            tokens.append(token)
            if r.on_token:
                r.on_token(token)
            if len(r.output) == r.max_new_tokens or (token in self.eos and not r.ignore_eos):
                self._finish(s)

    def fail_all(self, error: Exception):
        for s in [*self.running, *self.waiting]:
            self._finish(s, error)

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """(sequence, rows) for the next pass: decodes first, then prefills, then admissions."""
        work, rows = [], 0
        for s in list(self.running):
            if s.seq is None or rows == self.budget or self._left(s) != 1:
                continue
            while not self._room(s) and s.seq is not None:
                self._preempt(self.running[-1])
            if s.seq is not None:
                work.append((s, 1))
                rows += 1
        for s in self.running:
            if self._left(s) > 1 and rows < self.budget:
                work.append((s, min(self._left(s), self.budget - rows)))
                rows += work[-1][1]
        while self.waiting and rows < self.budget and len(self.running) < self.max_running:
            s = self.waiting[0]
            try:
                s.seq = self.engine.admit(s.request.prompt + s.request.output)
            except EngineError:  # not enough free blocks for its prompt yet
                break
            self.running.append(self.waiting.popleft())
            work.append((s, min(self._left(s), self.budget - rows)))
            rows += work[-1][1]
        return work

    def _left(self, s: _Sequence) -> int:
        return len(self.blocks.tokens[s.seq]) - self.blocks.computed[s.seq]

    def _room(self, s: _Sequence) -> bool:
        try:
            self.blocks.reserve(s.seq, len(self.blocks.tokens[s.seq]))
            return True
        except EngineError:
            return False

    def _preempt(self, s: _Sequence):
        self.blocks.free_sequence(s.seq)
        s.seq = None
        self.running.remove(s)
        self.waiting.appendleft(s)
        self.engine.stats.preemptions += 1

    def _finish(self, s: _Sequence, error: Exception | None = None):
        if s.seq is not None:
            self.blocks.free_sequence(s.seq)
            s.seq = None
        if s in self.running:
            self.running.remove(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        s.request.error = error
        if s.request.on_finish:
            s.request.on_finish(s.request)
