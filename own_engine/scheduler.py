"""Continuous batching in the spirit of nano-vllm's scheduler: sequences join and leave between steps.

A step is one pass over the weights with at most plan.step_tokens rows while a sequence decodes (it waits behind the
pass), else plan.prefill_chunk if that is more: one token for every running sequence that is decoding, then the
rest of the prompts of running sequences still in prefill, then new sequences while rows, sequence slots
(max_batch) and KV blocks remain; a prompt longer than the rows left goes on in the next step. When
a decoding sequence needs a block and none is free, the most recently admitted sequence is preempted: its blocks go
back (its full ones stay in the prefix cache) and it waits at the head of the queue to be recomputed, prompt and
output so far.
"""
from collections import deque
from typing import Protocol

import torch

from .block_manager import BlockManager
from .config import ModelConfig
from .errors import EngineError
from .planner import Plan
from .sampling import sample
from .sequence import Sequence, Status
from .stats import EngineStats


class EngineForScheduler(Protocol):
    """What the scheduler uses of the engine it steps (engine.Engine)."""
    blocks: BlockManager
    plan: Plan
    config: ModelConfig
    device: torch.device
    max_batch: int
    stats: EngineStats

    def forward(self, work: list[tuple[Sequence, int]], phase: str) -> torch.Tensor: ...

    def persist(self, wait: bool = False, idle: bool = True) -> None: ...

    def admit(self, seq: Sequence) -> None: ...

    def release(self, seqs: list[Sequence]) -> None: ...


class Scheduler:
    def __init__(self, engine: EngineForScheduler) -> None:
        self.engine, self.blocks = engine, engine.blocks
        self.budget, self.max_running = engine.plan.step_tokens, engine.max_batch
        self.solo_budget = max(engine.plan.step_tokens, engine.plan.prefill_chunk)  # when no sequence decodes
        self.eos = set(engine.config.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.last_pass = 0  # sequences in the last pass over the weights (batch occupancy)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        p = seq.params
        if p.seed is not None:
            seq.generator = torch.Generator(self.engine.device).manual_seed(p.seed)
        need = self.blocks.blocks_for(seq.num_prompt + p.max_new_tokens)
        if need > self.blocks.num_blocks:
            self._finish(seq, EngineError(f"a prompt of {seq.num_prompt} tokens + {p.max_new_tokens} new tokens "
                                          f"need {need} KV blocks, the cache has {self.blocks.num_blocks} "
                                          f"(raise max_context)"))
        else:
            self.waiting.append(seq)

    def step(self) -> None:
        """Run one pass over the weights for what can run now, then hand out the tokens it chose."""
        for s in [s for s in (*self.running, *self.waiting) if s.cancelled]:
            self._finish(s)
        work = self._schedule()
        self.last_pass = len(work)
        if not work:
            return
        decoding = all(n == 1 and s.num_output for s, n in work)
        try:
            logits = self.engine.forward(work, "decode" if decoding else "prefill")
        except Exception as e:  # the pass failed: so did the sequences in it; the others go on
            for s, _ in work:
                self._finish(s, e)
            return
        greedy = logits.argmax(-1).tolist()  # one call for the whole pass: most requests are greedy
        for j, (s, _) in enumerate(work):
            if s.left:
                continue  # more of its prompt next step
            p = s.params
            token = greedy[j] if p.temperature <= 0 else int(sample(logits[j:j + 1], p.temperature, p.top_k, p.top_p,
                                                                    s.generator))
            s.tokens.append(token)
            if s.on_token:
                s.on_token(token)
            if s.num_output == p.max_new_tokens or (token in self.eos and not p.ignore_eos):
                self._finish(s)
        self.engine.persist(idle=not self.busy)  # full blocks to prefix_cache_dir, once nothing else runs

    def fail_all(self, error: Exception) -> None:
        for s in [*self.running, *self.waiting]:
            self._finish(s, error)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, rows) for the next pass: decodes first, then prefills, then admissions."""
        work, rows = [], 0
        budget = self.budget if any(s.left == 1 for s in self.running) else self.solo_budget
        for s in list(self.running):
            if s.status is not Status.RUNNING or rows == budget or s.left != 1:
                continue
            while not self._room(s) and s.status is Status.RUNNING:
                self._preempt(self.running[-1])
            if s.status is Status.RUNNING:
                work.append((s, 1))
                rows += 1
        for s in self.running:
            if s.left > 1 and rows < budget:
                work.append((s, min(s.left, budget - rows)))
                rows += work[-1][1]
        while self.waiting and rows < budget and len(self.running) < self.max_running:
            s = self.waiting[0]
            try:
                self.engine.admit(s)
            except EngineError:  # not enough free blocks for its prompt yet
                break
            self.running.append(self.waiting.popleft())
            work.append((s, min(s.left, budget - rows)))
            rows += work[-1][1]
        return work

    def _room(self, s: Sequence) -> bool:
        try:
            self.blocks.reserve(s, len(s.tokens))
            return True
        except EngineError:
            return False

    def _preempt(self, s: Sequence) -> None:
        self.engine.release([s])
        self.running.remove(s)
        self.waiting.appendleft(s)
        self.engine.stats.preemptions += 1

    def _finish(self, s: Sequence, error: Exception | None = None) -> None:
        if s.status is Status.RUNNING:
            self.engine.release([s])
        if s in self.running:
            self.running.remove(s)
        elif s in self.waiting:
            self.waiting.remove(s)
        s.status, s.error = Status.FINISHED, error
        if s.on_finish:
            s.on_finish(s)
