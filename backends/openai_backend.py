"""Any OpenAI-compatible endpoint (`kind: openai`), and `OpenAIClient`, the streaming client it shares with every
engine the harness serves (the server variants of llama.cpp and vLLM, each an `EngineServerBackend`: it launches the
server or attaches to one).

The client streams `/v1/completions` or `/v1/chat/completions` over SSE from a pool of kept-alive connections (opened
before the load by `open_connections`) and reads every response to its end, so each connection serves the next
request. Its HTTP/1.1 transport (backends/http1.py) stamps the bytes when the event loop hands them over and the
request just before it is written; the SSE is parsed once the response has ended, every chunk keeping the time its
bytes arrived. With `http2: true` it streams through httpx instead. Other routes (/models, an engine's /metrics)
use `self.http`, an httpx client.

Tokens are counted by what a chunk carries, not by whether its text is empty (a token can decode to no text): its
token ids when the server sends them (`return_token_ids`, which vLLM accepts), else one token per chunk, reconciled
with the server's usage at the end of the stream. The counts themselves come from the usage
(`stream_options.include_usage`) when the server sends one, otherwise from the chunks; the source is recorded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backends.base import Backend, BackendError, Capabilities, Request, RequestSent, TokenEvent, Usage, now
from backends.http1 import HTTP1Pool

# Below the keep-alive timeout of uvicorn and vLLM's server (5 s): the client never reuses a connection the server is
# closing at that moment.
KEEPALIVE_S = 4.0


class OpenAIClientOptions(BaseModel):
    """The client's own options: every backend that speaks to a server through OpenAIClient accepts them."""
    model_config = ConfigDict(extra="forbid")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="merged into every request body")
    timeout_s: float = Field(600, gt=0)
    http2: bool = Field(False, description="HTTP/2 where the server offers it (https); needs the h2 package: "
                                           "pip install 'llmbench[http2]'. Default HTTP/1.1 on kept-alive connections")


class OpenAIOptions(OpenAIClientOptions):
    exact_length: bool = Field(True, description="send ignore_eos and min_tokens (vLLM, llama.cpp, TGI accept them)")
    return_token_ids: bool | None = Field(
        None, description="ask for each chunk's token ids (vLLM accepts return_token_ids), so a chunk whose text is "
                          "empty still counts; null: ask once at start and keep asking if the server answers with ids")


@dataclass
class _Chunk:
    """One choice of a streamed chunk: when it arrived, its tokens (None: one, unless its text is empty)."""
    t: float
    ids: list[int] | None
    text: str  # its text ("" when none)
    finish: str | None  # the finish reason it carries

    @property
    def sure(self) -> bool:
        """It certainly carries tokens (or certainly none): ids, or text."""
        return self.ids is not None or bool(self.text)


def token_events(chunks: list[_Chunk], usage_tokens: int | None) -> list[TokenEvent]:
    """The chunks that carried generated tokens, as events. A chunk with ids has exactly those; one with text, one
    token. A chunk with empty text mid-stream is a token whose text the server's detokenizer held back; an empty one
    with the finish reason is a token only when the usage says a token is still missing (vLLM sends the last token
    with the finish reason; other servers send the reason alone). Empty chunks beyond the usage's count were not
    tokens (an opening chunk), earliest first."""
    tokens = [c for c in chunks if (c.ids if c.ids is not None else not c.finish or c.text)]
    empty_finish = [c for c in chunks if not c.sure and c.finish]
    if usage_tokens is not None:
        counted = sum(len(c.ids) if c.ids is not None else 1 for c in tokens)
        if counted < usage_tokens and empty_finish:
            tokens.append(empty_finish[-1])
        excess = counted - usage_tokens
        for c in [c for c in tokens if not c.sure][:max(0, excess)]:
            tokens.remove(c)
    return [TokenEvent(t=c.t, n_tokens=len(c.ids) if c.ids is not None else 1, token_ids=c.ids, text=c.text)
            for c in sorted(tokens, key=lambda c: c.t)]


def parse_sse(pieces: list[tuple[float, bytes]]) -> tuple[list[_Chunk], dict[str, Any] | None]:
    """The choices of an SSE body that arrived in pieces (each with its arrival time), and the usage it ended with.
    A line arrived when its last byte did."""
    chunks: list[_Chunk] = []
    usage, pending = None, b""
    for t, data in pieces:
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:") or (payload := line[5:].strip()) == b"[DONE]":
                continue
            chunk = json.loads(payload)
            if chunk.get("error"):
                raise BackendError(f"server error mid-stream: {chunk['error']}")
            usage = chunk.get("usage") or usage
            chunks += parse_choices(chunk, t)
    return chunks, usage


def parse_choices(chunk: dict[str, Any], t: float) -> list[_Chunk]:
    out = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if delta is not None and "role" in delta and not delta.get("content"):
            continue  # a chat stream's opening chunk names the role and carries no token
        text = delta.get("content") if delta is not None else choice.get("text")
        out.append(_Chunk(t, choice.get("token_ids"), text or "", choice.get("finish_reason")))
    return out


class OpenAIClient:
    """One OpenAI-compatible server: `connect` once it answers, then `stream` each request.

    `adapt(body, request)` turns the standard body into an engine's (its own fields, ones it refuses removed);
    `extra_body` is merged after it, so the user has the last word. `token_ids`: ask for each chunk's token ids
    (True), not (False), or find out at connect whether the server sends them (None).
    """

    def __init__(self, options: OpenAIClientOptions, api: str, served_model: str | None, exact_length: bool,
                 adapt: Callable[[dict[str, Any], Request], dict[str, Any]] | None = None,
                 token_ids: bool | None = False):
        self.options, self.api, self.served_model = options, api, served_model
        self.exact_length, self.adapt, self.token_ids = exact_length, adapt, token_ids
        self.base_url: str | None = None  # …/v1
        self.http = None  # the httpx.AsyncClient, also for an engine's other routes (/metrics, /version)
        self.pool: HTTP1Pool | None = None  # the streams' connections (None with http2: httpx streams them)
        # Prompt tokens the server says it took from its cache (usage.prompt_tokens_details.cached_tokens), summed
        # over the requests streamed; None while no usage has carried the field.
        self.cached_tokens: int | None = None

    async def connect(self, base_url: str) -> None:
        """Open the connection pool and learn the served model (unless the spec names it)."""
        import httpx

        headers = {}
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise BackendError(f"options.api_key_env: environment variable {self.options.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        if self.options.http2 and importlib.util.find_spec("h2") is None:
            raise BackendError("options.http2: needs the h2 package, which is not installed: "
                               "pip install 'llmbench[http2]'")
        self.base_url = base_url.rstrip("/")
        # No cap on connections: a request waiting for one inside the client would count as the server's time; and
        # every connection the load opened is kept, so the pool is always at least the load's concurrency.
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.options.timeout_s, connect=10),
                                      http2=self.options.http2,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None,
                                                          keepalive_expiry=KEEPALIVE_S))
        if not self.options.http2:
            self.pool = HTTP1Pool(self.base_url, headers, KEEPALIVE_S)
        self.served_model = self.served_model or await self._first_model()
        if self.token_ids is None:
            self.token_ids = await self._sends_token_ids()

    async def _first_model(self) -> str:
        r = await self.http.get(f"{self.base_url}/models")
        if r.status_code != 200:
            raise BackendError(f"GET {self.base_url}/models answered HTTP {r.status_code}: {r.text[:300]}")
        models = r.json().get("data") or []
        if not models:
            raise BackendError(f"GET {self.base_url}/models lists no model; set served_model")
        return models[0]["id"]

    async def _sends_token_ids(self) -> bool:
        """Whether the server answers a one-token request asking for return_token_ids with ids (a server that does
        not know the field may refuse the request, or ignore the field)."""
        probe = Request(id=-1, prompt="Hello", prompt_token_ids=[], max_tokens=1, ignore_eos=False)
        try:
            _, status, pieces = await self._post(self.body(probe) | {"return_token_ids": True})
            return status == 200 and any(c.ids is not None for c in parse_sse(pieces)[0])
        except (OSError, BackendError, ValueError):
            return False

    async def open_connections(self, n: int) -> None:
        """Have at least n connections in the pool (with httpx: n requests at once each take one of their own)."""
        if self.pool is not None:
            await self.pool.open(n)
        else:
            await asyncio.gather(*(self.http.get(f"{self.base_url}/models") for _ in range(n)))

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def body(self, request: Request) -> dict[str, Any]:
        """Exactly what is POSTed for `request`."""
        body: dict[str, Any] = {
            "model": self.served_model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if request.temperature > 0:
            body["seed"] = request.seed
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.exact_length and request.ignore_eos:
            body |= {"ignore_eos": True, "min_tokens": request.max_tokens}
        if self.token_ids:
            body["return_token_ids"] = True
        if self.adapt is not None:
            body = self.adapt(body, request)
        return body | self.options.extra_body

    def _path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"

    async def _post(self, body: dict[str, Any]) -> tuple[float, int, list[tuple[float, bytes]]]:
        """POST a streaming request; once its response has ended: when it was sent, the status, and the body in the
        pieces it arrived in, each with its arrival time. Read to the end: a connection whose response was left
        unread cannot serve the next request."""
        data = json.dumps(body).encode()
        if self.pool is not None:
            ex = await self.pool.post(self._path(), data, self.options.timeout_s)
            return ex.t_sent, ex.status, ex.pieces
        sent, pieces = [], []

        async def trace(event: str, info: dict) -> None:  # httpcore's hook: the request is about to be written
            if event.endswith(".send_request_headers.started"):
                sent.append(now())

        async with self.http.stream("POST", self.base_url + self._path(), content=data, extensions={"trace": trace},
                                    headers={"Content-Type": "application/json"}) as r:
            async for piece in r.aiter_bytes():
                pieces.append((now(), piece))
        return sent[0], r.status_code, pieces

    async def stream(self, request: Request) -> AsyncIterator[RequestSent | TokenEvent | Usage]:
        t_sent, status, pieces = await self._post(self.body(request))
        if status != 200:
            text = b"".join(p for _, p in pieces).decode(errors="replace")
            raise BackendError(f"HTTP {status} from {self._path()}: {text[:500]}")
        chunks, usage = parse_sse(pieces)
        yield RequestSent(t_sent)
        server_count = usage.get("completion_tokens") if usage else None
        events = token_events(chunks, server_count)
        for event in events:
            yield event
        finish = next((c.finish for c in reversed(chunks) if c.finish), None)
        exact = self.exact_length and request.ignore_eos
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        if isinstance(cached, int):
            self.cached_tokens = (self.cached_tokens or 0) + cached
        if server_count is not None:
            yield Usage(usage.get("prompt_tokens"), server_count, "server_usage", "server_usage", finish, exact)
        else:
            # A chat template adds tokens the client cannot see, so only a completions prompt has a known length.
            n_in = len(request.prompt_token_ids) if self.api == "completions" else None
            yield Usage(n_in, sum(e.n_tokens for e in events), "client_tokenizer", "stream_chunks", finish, exact)

    def environment(self) -> dict[str, Any]:
        return {"url": self.base_url, "served_model": self.served_model, "api": self.api,
                "http": "HTTP/2 where offered (httpx)" if self.options.http2 else "HTTP/1.1 (llmbench's timing client)",
                "chunk_token_ids": "requested (return_token_ids)" if self.token_ids else "not requested"}


class ServedOverHTTP:
    """What every backend speaking through an OpenAIClient (`self.client`) shares: connections opened before the
    load, the spec with which another client process (load.clients) attaches to the same server, and, for a server
    it launched (`self.server`), its stop and the message of a server that died mid-stream."""
    client: OpenAIClient

    async def open_connections(self, n: int) -> None:
        await self.client.open_connections(n)

    async def stop_served(self) -> None:
        """Close the client, then stop the server this backend launched, if it launched one."""
        await self.client.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None

    async def served_stream(self, request: Request) -> AsyncIterator[RequestSent | TokenEvent | Usage]:
        """The client's stream of `request`; a connection a dead server dropped fails with how the server died."""
        import httpx

        try:
            async for item in self.client.stream(request):
                yield item
        except httpx.TransportError:
            # The connection drops a moment before the dead server can be reaped: give it that moment.
            if self.server is not None and await asyncio.to_thread(self.server.wait_exit, 2.0) is not None:
                raise BackendError(self.server.died_message()) from None
            raise

    def attach_spec(self) -> dict[str, Any] | None:
        return {"url": self.client.base_url, "served_model": self.client.served_model}


class EngineServerBackend(ServedOverHTTP, ABC):
    """An engine's own OpenAI-compatible server (vLLM's, llama.cpp's two): attached to at `url:`, else launched by the
    backend's `_launch` (through launch_server); the backend's `_body(body, request)` adapts each request to it and
    `options.startup_timeout_s` bounds its start."""

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.client = OpenAIClient(self.options, spec.api, spec.served_model, self.options.exact_length,
                                   adapt=self._body)

    async def start(self) -> None:
        if self.spec.url is not None:
            await self.client.connect(self.spec.url)
        else:
            await self._launch()

    @abstractmethod
    async def _launch(self) -> None:
        """Start the server (launch_server) on what start() prepared."""

    async def stop(self) -> None:
        await super().stop()  # the engine's own part first (vLLM's metrics watch)
        await self.stop_served()

    async def launch_server(self, name: str, argv: Callable[[int], list[str]], ready_path: str, env: dict[str, str],
                            ready: Callable[[int, str], bool] | None = None) -> None:
        """Start the server on 127.0.0.1 at a port the launcher picks (harness.core.processes.launch: its log in the
        cell's folder as NAME.log), wait until `ready_path` answers, and connect the client to its /v1."""
        from harness.core.processes import launch

        self.server = await launch(name, argv, self.ctx.dir, ready_path, self.options.startup_timeout_s, env=env,
                                   ready=ready)
        await self.client.connect(self.server.url + "/v1")


class OpenAIBackend(ServedOverHTTP, Backend):
    kind = "openai"
    Options = OpenAIOptions
    capabilities = Capabilities(token_ids=False)

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.client = OpenAIClient(self.options, spec.api, spec.served_model, self.options.exact_length,
                                   token_ids=self.options.return_token_ids)

    @classmethod
    def check_spec(cls, spec) -> str | None:
        if spec.url is None:
            return "url: the openai kind attaches to a running server; expected e.g. url: http://127.0.0.1:8000/v1"
        return None

    async def start(self) -> None:
        await self.client.connect(self.spec.url)

    async def stop(self) -> None:
        await self.client.close()

    def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        return self.client.stream(request)

    def attach_spec(self) -> dict[str, Any] | None:
        # The other clients ask for token ids as this one found out, without asking the server again.
        return super().attach_spec() | {"options": self.spec.options | {"return_token_ids": self.client.token_ids}}

    def environment(self) -> dict[str, Any]:
        return {"engine": "openai-compatible", **self.client.environment()}
