"""One sequence, from its prompt to its last token: what it asks for, its tokens, its KV blocks and how much of it
is computed, in one object (nano-vllm's engine/sequence.py, plus the prefix cache's block keys).

The block manager fills in `table`, `computed` and `hashes`; the scheduler moves `status` and appends tokens; the
caller reads `output`, `error` and may set `cancelled` from any thread.
"""
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

import torch


class Status(Enum):
    WAITING = auto()  # not admitted yet, or preempted: holds no block
    RUNNING = auto()  # admitted: holds the blocks of its tokens
    FINISHED = auto()


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen and when the sequence stops."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # a seeded sequence samples the same tokens alone or batched
    ignore_eos: bool = False


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams = SamplingParams(), *,
                 on_token: Callable[[int], None] | None = None,
                 on_finish: Callable[["Sequence"], None] | None = None):
        """on_token(token) is called for every token as soon as it is chosen, on_finish(sequence) once it is done
        (`error` says whether it failed); both on the thread that steps the scheduler."""
        self.id = next(Sequence._ids)
        self.tokens = list(prompt)  # the prompt, then every token chosen so far
        self.num_prompt = len(self.tokens)
        self.params = params
        self.on_token, self.on_finish = on_token, on_finish
        self.status = Status.WAITING
        self.table: list[int] = []  # KV block ids, in position order
        self.computed = 0  # leading tokens whose KV is in the cache
        self.hashes: list[bytes] = []  # keys of its leading full blocks (block_manager.block_hash)
        self.generator: torch.Generator | None = None  # the seeded sampler's state
        self.error: Exception | None = None
        self.cancelled = False  # may be set from any thread: the sequence leaves at the next step

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def left(self) -> int:
        """Tokens whose KV is still to compute."""
        return len(self.tokens) - self.computed

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, {self.status.name}, {self.num_prompt}+{self.num_output} tokens, "
                f"{self.computed} computed, {len(self.table)} blocks)")
