"""Multi-turn sessions (`prompts: {type: conversation}`): the prompts file holds each turn's new user message
(seeded, `input_tokens` long), its session, turn and think time; the first turn's prompt is rendered here, the later
ones by the worker at run time (harness/run/conversation.py), from the history with the model's real answers.

A chat is rendered with the tokenizer's chat template where it has one, else as `User:` / `Assistant:` lines.
"""

from __future__ import annotations

import numpy as np

from harness.config.conversation import ConversationPrompts, ThinkTime
from harness.inputs.exact import Exact
from harness.inputs.lengths import draw_lengths, same_each_repetition
from harness.records import PromptEntry

ROLES = {"user": "User", "assistant": "Assistant", "system": "System"}


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """The prompt for the model's next answer to `messages`, as text and token ids."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, tokenizer.encode(text, add_special_tokens=False)  # the template wrote its special tokens
    text = "\n".join(f"{ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages) + "\nAssistant:"
    return text, tokenizer.encode(text, add_special_tokens=True)


def draw_think(value: float | ThinkTime, n: int, rng: np.random.Generator) -> list[float]:
    if not isinstance(value, ThinkTime):
        return [float(value)] * n
    if value.dist == "fixed":
        return [value.mean] * n
    hi = value.max if value.max is not None else np.inf
    drawn = rng.uniform(value.min, value.max, n) if value.dist == "uniform" else rng.exponential(value.mean, n)
    return np.clip(drawn, value.min, hi).tolist()


def conversation_entries(exact: Exact, source: ConversationPrompts, segments: list[range], inputs: list[int],
                         rng: np.random.Generator) -> list[PromptEntry]:
    """One entry per turn: each segment (the warm-up, each repetition) cut into sessions of drawn turn counts, in
    order (the last one shorter when the turns run out)."""
    out: list[PromptEntry] = []
    session = 0
    # Every repetition has the same sessions' turn counts and pauses (harness/inputs/lengths.py).
    all_turns = same_each_repetition(lambda n: draw_lengths(source.turns, n, rng), segments)
    all_thinks = same_each_repetition(lambda n: draw_think(source.think_time_s, n, rng), segments)
    for seg in segments:
        turns, thinks = all_turns[seg.start:seg.stop], all_thinks[seg.start:seg.stop]
        i = n = 0
        while i < len(seg):
            for turn in range(min(turns[n], len(seg) - i)):
                k = seg[i]
                message = exact.padded("", inputs[k] + exact.n_special, "a user message")
                messages = [{"role": "user", "content": message}]
                text, ids = render_chat(exact.tokenizer, messages)
                out.append(PromptEntry(text=text, token_ids=ids, messages=messages, session=session, turn=turn,
                                       think_s=thinks[i] if turn else 0.0))
                i += 1
            session, n = session + 1, n + 1
    return out
