"""Multi-turn sessions at run time (`prompts: {type: conversation}`), in the worker: since turn k + 1's prompt holds
turn k's real answer, it is rendered and tokenized here, with the model's own tokenizer (loaded for these cells
only), once that answer is in.

A Session is the item the load's strategy schedules (concurrency: sessions in flight; poisson: sessions started per
second): its first turn leaves when the strategy says, each later one is due when the answer before it is in and the
user's think time has passed. A turn that fails ends its session (there is no answer to carry); the turns after it,
and those due after max_duration_s, are not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from harness.core.events import Request, now
from harness.inputs.conversation import render_chat
from harness.records import PromptEntry, RequestRecord
from harness.run.loadgen import Due, sleep_until

SendTurn = Callable[[Request, Due], Awaitable[RequestRecord | None]]


class Conversation:
    """A cell's sessions: the tokenizer that renders their later turns, and each answer until its next turn takes it."""

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

    def sessions(self, requests: list[Request]) -> list[Session]:
        """The requests grouped by session, each in turn order; sessions in the order of their first turn."""
        groups: dict[int | None, list[Request]] = {}
        for r in requests:
            groups.setdefault(self.entries[r.id].session, []).append(r)
        return [Session(self, sorted(g, key=lambda r: self.entries[r.id].turn or 0)) for g in groups.values()]


class Session:
    """One user's chat: an item of the load, whose turns follow one another."""

    def __init__(self, conversation: Conversation, turns: list[Request]):
        self.conversation, self.turns = conversation, turns

    def __len__(self) -> int:
        return len(self.turns)

    async def send(self, due: Due, send: SendTurn, deadline: float) -> list[RequestRecord | None]:
        """Send the turns in order, the first when `due` says, each with the history so far and the real answers in
        it; None for a turn not sent."""
        conversation = self.conversation
        history: list[dict[str, str]] = []
        out: list[RequestRecord | None] = []
        for request in self.turns:
            entry = conversation.entries[request.id]
            history += entry.messages or [{"role": "user", "content": entry.text}]
            if out:  # a later turn: its prompt holds the answers so far, and it leaves after the think time
                # Rendered before the think time starts: the client's own work is not the schedule's lag.
                request.prompt, request.prompt_token_ids = await asyncio.to_thread(
                    render_chat, conversation.tokenizer, history)
                t = now() + (entry.think_s or 0.0)
                if t > deadline:
                    break
                await sleep_until(t)
                due = Due(t)  # only the first turn waited for the backend's max_concurrency, when it did
            rec = await send(request, due)
            out.append(rec)
            if rec is None or not rec.ok:
                break
            history.append({"role": "assistant", "content": conversation.answers.pop(request.id, "")})
        return out + [None] * (len(self.turns) - len(out))
