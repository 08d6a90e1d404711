"""`bench serve`: an in-process backend behind an HTTP server, so it can be benchmarked as a server beside the others.

Protocols:
- `openai`: `/v1/completions` and `/v1/chat/completions`, streaming or not, with vLLM's extensions `ignore_eos`,
  `min_tokens` and per-chunk `token_ids`.
- `tgi`: what `text-generation-launcher` serves and the `text-generation` client parses: POST `/` (a list-shaped
  body when not streaming), `/generate`, `/generate_stream` (SSE, `details` on the last event), `/info`; plus the
  OpenAI routes, as the real TGI has them.
Both have `/health` and Prometheus `/metrics`. Binds 127.0.0.1 unless told otherwise. A parameter out of its range
(`max_tokens` of 0, -1 or 1e300, say: RANGES) is answered 400 (TGI's 422) with a message, before the engine sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import harness
from backends.base import Backend, CellContext, ModelInfo, Request, TokenEvent, Usage
from backends.registry import get_backend_class

PROTOCOLS = ("openai", "tgi")


class BadRequest(Exception):
    pass


@dataclass
class Token:
    id: int
    text: str  # this token's own text
    delta: str  # what it adds to the decoded output (held back while a UTF-8 sequence is incomplete)
    special: bool


class EngineServer:
    def __init__(self, backend: Backend, tokenizer, model_name: str, protocol: str = "openai"):
        self.backend, self.tokenizer, self.model_name, self.protocol = backend, tokenizer, model_name, protocol
        self.ids = itertools.count()
        self.special_ids = set(tokenizer.all_special_ids)
        eos = tokenizer.eos_token_id
        self.counters = {"requests_total": 0, "requests_failed_total": 0, "prompt_tokens_total": 0,
                         "generated_tokens_total": 0, "requests_running": 0}
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])

    def app(self) -> Starlette:
        routes = [
            Route("/health", lambda r: Response(status_code=200)),
            Route("/metrics", self.metrics),
            Route("/v1/models", self.models),
            Route("/v1/completions", self.handler(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self.handler(self.chat), methods=["POST"]),
        ]
        if self.protocol == "tgi":
            routes += [
                Route("/", self.handler(self.tgi_compat), methods=["POST"]),
                Route("/generate", self.handler(self.tgi_generate), methods=["POST"]),
                Route("/generate_stream", self.handler(self.tgi_generate_stream), methods=["POST"]),
                Route("/info", self.info),
            ]
        return Starlette(routes=routes, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        await self.backend.start()
        try:
            yield
        finally:
            await self.backend.stop()

    def handler(self, fn):
        async def handle(http: HttpRequest) -> Response:
            try:
                body = await http.json()
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                return await fn(body)
            except (BadRequest, ValueError, TypeError) as e:
                return JSONResponse({"error": str(e), "error_type": "validation",
                                     "object": "error", "message": str(e)}, status_code=422 if self.protocol == "tgi" else 400)
        return handle

    # ---- the one generation path every protocol shares ----------------------------------------------------------

    async def generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int,
                       ignore_eos: bool) -> AsyncIterator[Token | Usage]:
        request = Request(id=next(self.ids), prompt="", prompt_token_ids=ids, max_tokens=max_tokens,
                          ignore_eos=ignore_eos, temperature=temperature, seed=seed)
        detok = Detokenizer(self.tokenizer)
        self.counters["requests_total"] += 1
        self.counters["requests_running"] += 1
        try:
            async for ev in self.backend.generate(request):
                if isinstance(ev, TokenEvent):
                    for tid in ev.token_ids or []:
                        yield Token(tid, self.tokenizer.decode([tid]), detok.add([tid]), tid in self.special_ids)
                else:
                    ev.finish_reason = ev.finish_reason or ("length" if ev.output_tokens >= max_tokens else "stop")
                    self.counters["prompt_tokens_total"] += ev.prompt_tokens or 0
                    self.counters["generated_tokens_total"] += ev.output_tokens or 0
                    yield ev
        except Exception:
            self.counters["requests_failed_total"] += 1
            raise
        finally:
            self.counters["requests_running"] -= 1

    async def metrics(self, _: HttpRequest) -> PlainTextResponse:
        lines = []
        for name, value in self.counters.items():
            kind = "gauge" if name == "requests_running" else "counter"
            lines += [f"# TYPE llmbench_{name} {kind}", f"llmbench_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---- OpenAI -------------------------------------------------------------------------------------------------

    async def models(self, _: HttpRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "llmbench"}]})

    async def completions(self, body: dict[str, Any]) -> Response:
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("'prompt' must be a string")
        return await self.openai_respond(body, self.tokenizer.encode(body["prompt"]), chat=False)

    async def chat(self, body: dict[str, Any]) -> Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens itself.
        return await self.openai_respond(body, self.tokenizer.encode(text, add_special_tokens=False), chat=True)

    async def openai_respond(self, body: dict[str, Any], ids: list[int], chat: bool) -> Response:
        max_tokens = number(body, "max_tokens", int, number(body, "max_completion_tokens", int, 16))
        events = self.generate(ids, max_tokens, number(body, "temperature", float, 1.0), number(body, "seed", int, 0),
                               bool(body.get("ignore_eos")) or number(body, "min_tokens", int, 0) >= max_tokens)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{time.time_ns()}"
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(self.openai_sse(events, rid, chat, usage), media_type="text/event-stream")
        text, finish, n_out = "", None, 0
        async for ev in events:
            if isinstance(ev, Token):
                text += ev.delta
            else:
                finish, n_out = ev.finish_reason, ev.output_tokens
        choice = {"index": 0, "finish_reason": finish,
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": usage_dict(len(ids), n_out)})

    async def openai_sse(self, events, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return sse(data)

        try:
            async for ev in events:
                if isinstance(ev, Token):
                    yield chunk([{"index": 0, "token_ids": [ev.id], "finish_reason": None,
                                  **({"delta": {"content": ev.delta}} if chat else {"text": ev.delta})}])
                else:
                    yield chunk([{"index": 0, "finish_reason": ev.finish_reason,
                                  **({"delta": {}} if chat else {"text": ""})}])
                    if include_usage:
                        yield chunk([], usage_dict(ev.prompt_tokens, ev.output_tokens))
        except Exception as e:  # the status line is already sent: report the failure in the stream, as vLLM does
            yield sse({"error": {"message": f"{type(e).__name__}: {e}"}})
        yield "data: [DONE]\n\n"

    # ---- TGI ----------------------------------------------------------------------------------------------------

    def tgi_parse(self, body: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
        if not isinstance(body.get("inputs"), str):
            raise BadRequest("`inputs` must be a string")
        p = body.get("parameters") or {}
        if p.get("best_of") not in (None, 1):
            raise BadRequest("`best_of` > 1 is not supported")
        ids = self.tokenizer.encode(body["inputs"])
        return ids, p

    def tgi_events(self, ids: list[int], p: dict[str, Any]):
        sampling = bool(p.get("do_sample"))
        return self.generate(ids, number(p, "max_new_tokens", int, 20),
                             number(p, "temperature", float, 1.0) if sampling else 0.0, number(p, "seed", int, 0),
                             ignore_eos=False)

    def tgi_token(self, t: Token) -> dict[str, Any]:
        return {"id": t.id, "text": t.text, "logprob": None, "special": t.special}

    async def tgi_compat(self, body: dict[str, Any]) -> Response:
        """POST /: TGI's compatibility route, the one the `text-generation` client calls: a list when not streaming."""
        if body.get("stream"):
            return await self.tgi_generate_stream(body)
        return JSONResponse([await self.tgi_generate_body(body)])

    async def tgi_generate(self, body: dict[str, Any]) -> Response:
        return JSONResponse(await self.tgi_generate_body(body))

    async def tgi_generate_body(self, body: dict[str, Any]) -> dict[str, Any]:
        ids, p = self.tgi_parse(body)
        tokens, usage = [], None
        async for ev in self.tgi_events(ids, p):
            if isinstance(ev, Token):
                tokens.append(ev)
            else:
                usage = ev
        text = (body["inputs"] if p.get("return_full_text") else "") + "".join(t.delta for t in tokens)
        out: dict[str, Any] = {"generated_text": text}
        if p.get("details"):
            out["details"] = {"finish_reason": tgi_finish(tokens, self.eos_ids),
                              "generated_tokens": usage.output_tokens, "seed": p.get("seed"),
                              "prefill": [], "tokens": [self.tgi_token(t) for t in tokens],
                              "top_tokens": None, "best_of_sequences": None}
        return out

    async def tgi_generate_stream(self, body: dict[str, Any]) -> Response:
        ids, p = self.tgi_parse(body)
        max_new = number(p, "max_new_tokens", int, 20)

        async def events() -> AsyncIterator[str]:
            n, text = 0, ""
            try:
                async for ev in self.tgi_events(ids, p):
                    if not isinstance(ev, Token):
                        continue
                    n, text = n + 1, text + ev.delta
                    # The last event carries the whole text and the details; the engine stops only at EOS or length.
                    last = n >= max_new or ev.id in self.eos_ids
                    yield sse({"index": n, "token": self.tgi_token(ev), "top_tokens": None,
                               "generated_text": text if last else None,
                               "details": {"finish_reason": tgi_finish([ev], self.eos_ids),
                                           "generated_tokens": n, "seed": p.get("seed"), "input_length": len(ids)}
                               if last and p.get("details") else None})
            except Exception as e:
                yield sse({"error": f"{type(e).__name__}: {e}", "error_type": "generation"})

        return StreamingResponse(events(), media_type="text/event-stream")

    async def info(self, _: HttpRequest) -> JSONResponse:
        return JSONResponse({
            "model_id": self.model_name, "model_sha": None, "model_pipeline_tag": "text-generation",
            "model_dtype": str(self.backend.environment().get("dtype")), "model_device_type": "cpu",
            "max_concurrent_requests": 128, "max_best_of": 1, "max_stop_sequences": 0,
            "max_input_tokens": self.tokenizer.model_max_length, "max_total_tokens": self.tokenizer.model_max_length,
            "validation_workers": 1, "version": f"llmbench-{harness.__version__}", "sha": None, "docker_label": None,
            "router": "llmbench serve", "backend": self.backend.kind,
        })


class Detokenizer:
    """Text deltas from a growing list of ids; holds back an incomplete UTF-8 sequence until it completes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def tgi_finish(tokens: list[Token], eos_ids: set[int]) -> str:
    return "eos_token" if tokens and tokens[-1].id in eos_ids else "length"


MAX_TOKENS = 1 << 20
# What a request may ask for; anything else is answered 400 with a message before it reaches the engine.
RANGES: dict[str, tuple[float, float]] = {
    "max_tokens": (1, MAX_TOKENS), "max_completion_tokens": (1, MAX_TOKENS), "max_new_tokens": (1, MAX_TOKENS),
    "min_tokens": (0, MAX_TOKENS), "temperature": (0, 100), "seed": (0, 2**63 - 1)}


def number(body: dict[str, Any], key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (kind is int and value != int(value))):
        raise BadRequest(f"`{key}` must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}")
    low, high = RANGES.get(key, (-math.inf, math.inf))
    if not low <= value <= high:
        raise BadRequest(f"`{key}` must be from {low:g} to {high:g}, got {value!r:.40}")
    return kind(value)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage_dict(n_in: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def serve(server: EngineServer, port: int, say: Callable[[str], None]) -> None:
    """Serve on 127.0.0.1:port until SIGINT or SIGTERM; `say` tells when it listens (once the engine is loaded and
    the port bound) and when it stopped, with what it served."""
    import uvicorn

    class Announced(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                say(f"listening on http://127.0.0.1:{port} ({server.protocol} protocol; the "
                    f"{server.backend.kind} engine on {server.model_name}); Ctrl-C or SIGTERM stops it")

    # Loopback only, never overridable; uvicorn's own lines below warnings (each request would be one).
    try:
        Announced(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning")).run()
    finally:  # uvicorn raises the signal again once it has shut down: the command exits 130, as bench run does
        c = server.counters
        say(f"stopped: {c['requests_total']} request(s) served ({c['requests_failed_total']} failed), "
            f"{c['generated_tokens_total']} tokens generated; the engine is unloaded")


def build_server(kind: str, model_path: Path, options: dict[str, Any], workdir: Path, protocol: str) -> EngineServer:
    from transformers import AutoTokenizer

    from harness.core.spec import BackendSpec

    spec = BackendSpec(name="served", kind=kind, options=options)
    backend = get_backend_class(kind, options)(spec, ModelInfo(model_path.name, model_path), CellContext(dir=workdir))
    return EngineServer(backend, AutoTokenizer.from_pretrained(model_path), model_path.name, protocol)
