"""Any OpenAI-compatible endpoint (`kind: openai`), and `OpenAIClient`, the streaming client it shares with every
engine the harness serves (the server variants of llama.cpp and vLLM).

The client streams `/v1/completions` or `/v1/chat/completions` over SSE and stamps each chunk that carries generated
text on arrival. Token counts come from the server's usage (`stream_options.include_usage`) when it sends one,
otherwise from counting chunks; the source of each count is recorded.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backends.base import Backend, BackendError, Capabilities, Request, TokenEvent, Usage, now


class OpenAIClientOptions(BaseModel):
    """The client's own options: every backend that speaks to a server through OpenAIClient accepts them."""
    model_config = ConfigDict(extra="forbid")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="merged into every request body")
    timeout_s: float = Field(600, gt=0)


class OpenAIOptions(OpenAIClientOptions):
    exact_length: bool = Field(True, description="send ignore_eos and min_tokens (vLLM, llama.cpp, TGI accept them)")


class OpenAIClient:
    """One OpenAI-compatible server: `connect` once it answers, then `stream` each request.

    `adapt(body, request)` turns the standard body into an engine's (its own fields, ones it refuses removed);
    `extra_body` is merged after it, so the user has the last word.
    """

    def __init__(self, options: OpenAIClientOptions, api: str, served_model: str | None, exact_length: bool,
                 adapt: Callable[[dict[str, Any], Request], dict[str, Any]] | None = None):
        self.options, self.api, self.served_model = options, api, served_model
        self.exact_length, self.adapt = exact_length, adapt
        self.base_url: str | None = None  # …/v1
        self.http = None  # the httpx.AsyncClient, also for an engine's other routes (/metrics, /version)

    async def connect(self, base_url: str) -> None:
        """Open the connection pool and learn the served model (unless the spec names it)."""
        import httpx

        headers = {}
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise BackendError(f"options.api_key_env: environment variable {self.options.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.options.timeout_s, connect=10),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.served_model = self.served_model or await self._first_model()

    async def _first_model(self) -> str:
        r = await self.http.get(f"{self.base_url}/models")
        if r.status_code != 200:
            raise BackendError(f"GET {self.base_url}/models answered HTTP {r.status_code}: {r.text[:300]}")
        models = r.json().get("data") or []
        if not models:
            raise BackendError(f"GET {self.base_url}/models lists no model; set served_model")
        return models[0]["id"]

    async def close(self) -> None:
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
        if self.adapt is not None:
            body = self.adapt(body, request)
        return body | self.options.extra_body

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        path = "/chat/completions" if self.api == "chat" else "/completions"
        n_chunks_tokens, usage, finish = 0, None, None
        async with self.http.stream("POST", self.base_url + path, json=self.body(request)) as r:
            if r.status_code != 200:
                raise BackendError(f"HTTP {r.status_code} from {path}: {(await r.aread()).decode(errors='replace')[:500]}")
            async for line in r.aiter_lines():
                t = now()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise BackendError(f"server error mid-stream: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                    text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    ids = choice.get("token_ids")
                    if text or ids:
                        n = len(ids) if ids else 1
                        n_chunks_tokens += n
                        yield TokenEvent(t=t, n_tokens=n, token_ids=ids)
        exact = self.exact_length and request.ignore_eos
        if usage and usage.get("completion_tokens") is not None:
            yield Usage(usage.get("prompt_tokens"), usage["completion_tokens"], "server_usage", "server_usage",
                        finish, exact)
        else:
            # A chat template adds tokens the client cannot see, so only a completions prompt has a known length.
            n_in = len(request.prompt_token_ids) if self.api == "completions" else None
            yield Usage(n_in, n_chunks_tokens, "client_tokenizer", "stream_chunks", finish, exact)

    def environment(self) -> dict[str, Any]:
        return {"url": self.base_url, "served_model": self.served_model, "api": self.api}


class OpenAIBackend(Backend):
    kind = "openai"
    Options = OpenAIOptions
    capabilities = Capabilities(token_ids=False)

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.client = OpenAIClient(self.options, spec.api, spec.served_model, self.options.exact_length)

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

    def environment(self) -> dict[str, Any]:
        return {"engine": "openai-compatible", **self.client.environment()}
