"""A cell's prompts file: one `PromptEntry` per request, in order (the warm-ups, then each repetition's
num_requests), built with the model's own tokenizer from the workload's prompt source (harness/config/prompts.py).
Two runs with the same seed send the same prompts to every backend.

Every repetition gets fresh prompts (fresh documents and prefixes too): a prefix cache must not make later
repetitions look faster. Lengths drawn from a distribution are drawn here, seeded, once for a repetition and the same
for every repetition (their spread then measures the machine, not the draw), and kept in the file (the prompt's own
token_ids, and max_tokens).

They are built in a subprocess of the runner (`python -m harness.inputs.prompts`), under the cell's timeout once the
tokenizer is loaded: the runner never loads a tokenizer, so it stays small, and a huge num_requests cannot stall it
outside any timeout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from harness.config.prompts import LengthDist
from harness.config.scenario import TraceLoad, Workload
from harness.core.files import atomic_write
from harness.inputs import documents
from harness.inputs.exact import Exact, PromptError
from harness.inputs.files import DataFileError, DataRow, read_rows
from harness.inputs.lengths import draw_lengths, same_each_repetition
from harness.inputs.conversation import conversation_entries
from harness.inputs.trace import trace_prompts
from harness.records import PROMPT_FILE, PromptEntry

__all__ = ["PromptError", "make_prompts", "write_prompts"]


def segments(workload: Workload, count: int) -> list[range]:
    """The requests of the warm-up, then of each repetition: what shares a document or prefix stays inside one."""
    w, n = workload.warmup_requests, workload.num_requests
    starts = [0, *range(w, count, n)] if w else list(range(0, count, n))
    return [range(a, b) for a, b in zip(starts, [*starts[1:], count]) if b > a]


def make_prompts(tokenizer, workload: Workload, count: int, seed: int) -> list[PromptEntry]:
    """`count` entries for the workload; raises PromptError when they cannot be built."""
    # One stream per purpose: changing how texts are drawn must not change the lengths drawn, and back.
    lengths_rng, text_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    exact = Exact(tokenizer, text_rng)
    source = workload.prompts
    if isinstance(workload.load, TraceLoad):  # the trace gives each request's lengths and send time
        return trace_prompts(exact, workload.load, workload.warmup_requests, workload.num_requests, count, seed)
    segs = segments(workload, count)

    def lengths(value) -> list[int]:
        return same_each_repetition(lambda n: draw_lengths(value, n, lengths_rng), segs)

    if source.type == "file":
        entries = _from_file(exact, workload, count, lengths(workload.input_tokens) if source.truncate else None)
    else:
        inputs = lengths(workload.input_tokens)
        build = {"synthetic": _synthetic, "document": _documents, "shared_prefix": _shared_prefix,
                 "conversation": _conversation}[source.type]
        entries = build(exact, workload, count, inputs)
    if isinstance(workload.output_tokens, LengthDist):
        for e, n in zip(entries, lengths(workload.output_tokens)):
            if e.max_tokens is None:  # a length from the data comes first
                e.max_tokens = n
    return entries


def _entry(exact: Exact, text: str, **kw) -> PromptEntry:
    return PromptEntry(text=text, token_ids=exact.encode(text), **kw)


def _conversation(exact: Exact, workload: Workload, count: int, inputs: list[int]) -> list[PromptEntry]:
    return conversation_entries(exact, workload.prompts, segments(workload, count), inputs, exact.rng)


def _synthetic(exact: Exact, workload: Workload, count: int, inputs: list[int]) -> list[PromptEntry]:
    return [_entry(exact, exact.padded("", n, "a prompt")) for n in inputs]


def _shared_prefix(exact: Exact, workload: Workload, count: int, inputs: list[int]) -> list[PromptEntry]:
    source, out = workload.prompts, []
    for seg in segments(workload, count):
        base = len(out) and (out[-1].group + 1)
        groups = min(source.prefixes, len(seg))
        prefixes = [exact.padded("", source.prefix_tokens + exact.n_special, "a prefix") for _ in range(groups)]
        for j, i in enumerate(seg):
            g = j % groups
            out.append(_entry(exact, exact.padded(prefixes[g], inputs[i], "a prompt"), group=base + g))
    return out


QUESTION = "\n\nQuestion: {}\nAnswer:"
QUESTION_TOKENS = 24  # about the longest question: the document is generated to what remains
CHARS_PER_TOKEN = 4.0  # a first guess at how long a generated document must be; checked, and doubled when short


def _documents(exact: Exact, workload: Workload, count: int, inputs: list[int]) -> list[PromptEntry]:
    source, rng, out = workload.prompts, exact.rng, []
    user_docs = [Path(f).read_text(errors="replace") for f in source.files or []]
    group = 0
    for seg in segments(workload, count):
        for first in range(seg.start, seg.stop, source.questions_per_document):
            members = range(first, min(first + source.questions_per_document, seg.stop))
            total = inputs[first]
            room = total - exact.n_special - QUESTION_TOKENS
            if room < 1:
                raise PromptError(f"input_tokens={total} leaves no room for a document before its question")
            if user_docs:
                doc = user_docs[group % len(user_docs)]
            else:
                chars = room * CHARS_PER_TOKEN
                while exact.count_plain(doc := documents.generate(source.kind, rng, int(chars))) < room + 64:
                    chars *= 2
            # The questions name what this document has (its clauses, visit dates, error times).
            asked = documents.questions(source.kind, rng, len(members), exact.cut(doc, room))
            suffixes = [QUESTION.format(q) for q in asked]
            room = total - exact.n_special - exact.count_plain(suffixes[0])
            if user_docs and exact.count_plain(doc) < room:
                text = doc  # the user's document is shorter than input_tokens: sent whole
            else:
                # Cut so that the first question's prompt has exactly input_tokens; the others differ by the
                # length of their question, and all share the document as their prefix.
                text = exact.fit(lambda k: exact.cut(doc, k) + suffixes[0], total, room, "a document")
                text = text[:len(text) - len(suffixes[0])]
            out += [_entry(exact, text + s, group=group) for s in suffixes]
            group += 1
    return out


def _from_file(exact: Exact, workload: Workload, count: int, limits: list[int] | None) -> list[PromptEntry]:
    """The file's rows in order, from the top again once they run out; each cut to its limit (truncate)."""
    source = workload.prompts
    try:
        rows = read_rows(Path(source.path))
    except DataFileError as e:
        raise PromptError(f"prompts.path: {e}") from None
    out = []
    for i in range(count):
        row = rows[i % len(rows)]
        text, special = _render(exact.tokenizer, row)
        messages = row.messages
        ids = exact.tokenizer.encode(text, add_special_tokens=special)
        if limits is not None and len(ids) > limits[i]:
            # Cut as text (what is sent), then encoded again: the cut prompt is the rendered chat's head.
            text, messages = exact.cut(text, limits[i] - (exact.n_special if special else 0)), None
            ids = exact.tokenizer.encode(text, add_special_tokens=special)
        out.append(PromptEntry(text=text, token_ids=ids, messages=messages,
                               max_tokens=_data_output(exact, row) if source.output_from == "data" else None))
    return out


def _render(tokenizer, row: DataRow) -> tuple[str, bool]:
    """The prompt as text, and whether encoding it should add the special tokens (a chat template adds its own)."""
    if row.messages is None:
        return row.prompt, True
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=True), False
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.messages) + "\nassistant:", True


def _data_output(exact: Exact, row: DataRow) -> int | None:
    if row.output_tokens is not None:
        return row.output_tokens
    return max(exact.count_plain(row.reference), 1) if row.reference else None


def write_prompts(path: Path, model_path: Path, count: int, seed: int, workload: Workload) -> None:
    """Build the prompts with the model's own tokenizer and write them to `path`; says "tokenizer loaded" on stdout
    before building (the runner times building apart from loading)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        print("tokenizer loaded", flush=True)
        entries = make_prompts(tokenizer, workload, count, seed)
    except (OSError, ValueError) as e:
        raise PromptError(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, PROMPT_FILE.dump_json(entries, exclude_none=True).decode())


if __name__ == "__main__":  # python -m harness.inputs.prompts PATH MODEL_PATH COUNT SEED WORKLOAD_JSON
    try:
        write_prompts(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                      Workload.model_validate_json(sys.argv[5]))
    except PromptError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
