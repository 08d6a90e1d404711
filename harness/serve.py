"""`bench serve`: any in-process backend behind an HTTP server, so it can be benchmarked as a server beside the others.

Speaks the OpenAI completions and chat protocol (streaming and not), with vLLM's extensions `ignore_eos`,
`min_tokens` and per-chunk `token_ids`. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from backends.base import Backend, CellContext, ModelInfo, Request, TokenEvent, Usage
from backends.registry import get_backend_class


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


class OpenAIServer:
    def __init__(self, backend: Backend, tokenizer, model_name: str):
        self.backend, self.tokenizer, self.model_name = backend, tokenizer, model_name
        self.ids = itertools.count()

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", lambda r: Response(status_code=200)),
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        await self.backend.start()
        try:
            yield
        finally:
            await self.backend.stop()

    async def models(self, _: HttpRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "llmbench"}]})

    async def completions(self, http: HttpRequest) -> Response:
        body = await http.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return error(400, "'prompt' must be a string")
        return await self.respond(body, self.tokenizer.encode(prompt), chat=False)

    async def chat(self, http: HttpRequest) -> Response:
        body = await http.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "'messages' must be a non-empty list")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens itself.
        return await self.respond(body, self.tokenizer.encode(text, add_special_tokens=False), chat=True)

    async def respond(self, body: dict[str, Any], ids: list[int], chat: bool) -> Response:
        try:
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            temperature = float(body.get("temperature", 1.0))
        except (TypeError, ValueError):
            return error(400, "max_tokens and temperature must be numbers")
        request = Request(id=next(self.ids), prompt="", prompt_token_ids=ids, max_tokens=max_tokens,
                          ignore_eos=bool(body.get("ignore_eos")) or int(body.get("min_tokens") or 0) >= max_tokens,
                          temperature=temperature, seed=int(body.get("seed") or 0))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request.id}"
        events = self.stream(request)
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(self.sse(events, rid, chat, usage), media_type="text/event-stream")
        text, finish, n_out = "", None, 0
        async for kind, value in events:
            if kind == "text":
                text += value[0]
            else:
                finish, n_out = value.finish_reason, value.output_tokens
        choice = {"index": 0, "finish_reason": finish,
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": usage_dict(len(ids), n_out)})

    async def stream(self, request: Request) -> AsyncIterator[tuple[str, Any]]:
        detok = Detokenizer(self.tokenizer)
        async for ev in self.backend.generate(request):
            if isinstance(ev, TokenEvent):
                yield "text", (detok.add(ev.token_ids or []), ev.token_ids)
            elif isinstance(ev, Usage):
                ev.finish_reason = ev.finish_reason or ("length" if ev.output_tokens >= request.max_tokens else "stop")
                yield "usage", ev

    async def sse(self, events, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            async for kind, value in events:
                if kind == "text":
                    text, ids = value
                    yield chunk([{"index": 0, "token_ids": ids, "finish_reason": None,
                                  **({"delta": {"content": text}} if chat else {"text": text})}])
                else:
                    yield chunk([{"index": 0, "finish_reason": value.finish_reason,
                                  **({"delta": {}} if chat else {"text": ""})}])
                    if include_usage:
                        yield chunk([], usage_dict(value.prompt_tokens, value.output_tokens))
        except Exception as e:  # the status line is already sent: report the failure in the stream, as vLLM does
            yield f"data: {json.dumps({'error': {'message': f'{type(e).__name__}: {e}'}})}\n\n"
        yield "data: [DONE]\n\n"


def usage_dict(n_in: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def build_server(kind: str, model_path: Path, options: dict[str, Any], workdir: Path) -> OpenAIServer:
    from transformers import AutoTokenizer

    from harness.scenario import BackendSpec

    spec = BackendSpec(name="served", kind=kind, options=options)
    backend = get_backend_class(kind)(spec, ModelInfo(model_path.name, model_path), CellContext(dir=workdir))
    return OpenAIServer(backend, AutoTokenizer.from_pretrained(model_path), model_path.name)
