"""What crosses the worker-backend boundary: a `Request` in, a stream of timestamped `TokenEvent`s ended by one
`Usage` out (a `RequestSent` first where the backend stamps the send itself). Backends know nothing of metrics; the
reducer computes every metric from these events."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

now = time.perf_counter  # the one clock for every timestamp in a cell: monotonic, sub-microsecond


@dataclass
class Request:
    id: int
    prompt: str
    prompt_token_ids: list[int]
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0


@dataclass
class TokenEvent:
    """A chunk of generated tokens, stamped on arrival as close to the engine as the backend can."""
    t: float
    n_tokens: int = 1
    token_ids: list[int] | None = None
    text: str | None = None  # the chunk's decoded text, where the engine gives it (record_outputs keeps it)


@dataclass
class RequestSent:
    """When the request's first byte was written, where a backend knows it better than the harness's stamp before
    calling it (an HTTP client builds the request first): the record's t_send. Yielded before the first TokenEvent."""
    t: float


@dataclass
class Usage:
    """The last item of every stream: token counts and where each came from."""
    prompt_tokens: int | None
    output_tokens: int | None
    prompt_source: str  # "engine" | "server_usage" | "client_tokenizer" | "stream_chunks"
    output_source: str
    finish_reason: str | None = None
    exact_length: bool = True  # False when the engine could not be told to ignore EOS


@dataclass
class PrefixReuse:
    """Prompt tokens an engine took from its own cache instead of computing them, over the whole cell (warm-up
    requests included), as the engine itself counts them: one field for every engine (results: `prefix_reuse`),
    whatever its unit (blocks, cache hits), so reports compare them."""
    reused_tokens: int | None  # None: the engine may reuse but does not say how much (`source` says why)
    source: str  # where the count was read, or why there is none
    prompt_tokens: int | None = None  # the prompt tokens the cell sent (the harness's count), set by the worker


@dataclass
class Capabilities:
    streaming: bool = True
    exact_output_length: bool = True
    max_concurrency: int | None = None  # None: the engine batches or queues requests itself; else the harness queues
    token_ids: bool = True


@dataclass
class ModelInfo:
    name: str
    path: Path


@dataclass
class CellContext:
    """What a backend may use beside its spec: the cell's folder (logs, offload files), the seed and the budget."""
    dir: Path
    seed: int = 0
    vram_budget: int | None = None
    # The most requests the load keeps in flight at once (a closed loop's concurrency, 1 when sequential); None for
    # an open loop or a capacity search, which have no fixed bound. A server sizes its slots by it.
    concurrency: int | None = None
    # The CPUs the engine runs on when the worker keeps one for its load generator (resources.isolate_client); None:
    # every CPU. An engine sizes its thread pools by it (engine_threads).
    engine_cpus: list[int] | None = None

    def engine_threads(self) -> int | None:
        """Threads for an engine whose user did not say: one per CPU it was given; None where it was not isolated."""
        return len(self.engine_cpus) if self.engine_cpus else None
