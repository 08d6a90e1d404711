"""Multi-turn sessions at run time (`prompts: {type: conversation}`), in the worker: since turn k + 1's prompt holds
turn k's real answer, it is rendered and tokenized here, with the model's own tokenizer (loaded for these cells
only), once that answer is in.

Each session is one item of the load (concurrency: sessions in flight; poisson: sessions started per second); its
turns go one after another, the user's think time between. A turn that fails ends its session (there is no answer
to carry); the turns after it, and those due after max_duration_s, are not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from harness.core.events import Request, now
from harness.inputs.conversation import render_chat
from harness.records import PromptEntry, RequestRecord
from harness.run.loadgen import QUEUED_AT, sleep_until


class Conversation:
    def __init__(self, model_path: Path, entries: list[PromptEntry]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.entries = entries
        self.answers: dict[int, str] = {}  # request id -> the text the engine answered

    def note(self, rec: RequestRecord, keep_outputs: bool) -> None:
        """Mark the record with its session and turn, and take its answer for the next turn (the record keeps it
        only with record_outputs)."""
        entry = self.entries[rec.id]
        rec.session, rec.turn = entry.session, entry.turn
        self.answers[rec.id] = rec.output_text or ""
        if not keep_outputs:
            rec.output_text = rec.output_token_ids = None

    def sessions(self, requests: list[Request]) -> list[list[Request]]:
        """The requests grouped by session, each in turn order; sessions in the order of their first turn."""
        groups: dict[int, list[Request]] = {}
        for r in requests:
            groups.setdefault(self.entries[r.id].session, []).append(r)
        return [sorted(g, key=lambda r: self.entries[r.id].turn or 0) for g in groups.values()]

    async def run(self, session: list[Request], t_scheduled: float,
                  send: Callable[[Request, float], Awaitable[RequestRecord | None]],
                  deadline: float) -> list[RequestRecord | None]:
        """Send the session's turns in order, each with the history so far and the real answers in it; None for a
        turn not sent."""
        history: list[dict[str, str]] = []
        out: list[RequestRecord | None] = []
        t = t_scheduled
        for request in session:
            entry = self.entries[request.id]
            history += entry.messages or [{"role": "user", "content": entry.text}]
            if len(history) > 1:
                # Rendered before the think time starts: the client's own work is not the schedule's lag.
                request.prompt, request.prompt_token_ids = await asyncio.to_thread(render_chat, self.tokenizer,
                                                                                   history)
                t = now() + (entry.think_s or 0.0)
                if t > deadline:
                    break
                await sleep_until(t)
            rec = await send(request, t)
            out.append(rec)
            if rec is None or not rec.ok:
                break
            history.append({"role": "assistant", "content": self.answers.pop(request.id, "")})
            QUEUED_AT.set(None)  # a wait for the backend's max_concurrency was the first turn's alone
        return out + [None] * (len(session) - len(out))
