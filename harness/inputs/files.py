"""The user's prompt files, read through `datasets`: a .txt file (one prompt per line), a .jsonl file (rows with
`prompt` or `messages`, optionally `output_tokens`), ShareGPT JSON (rows with `conversations`: the first human turn
is the prompt, the reply after it gives the output length), or a folder written by `Dataset.save_to_disk` (the
same columns). Used by `bench validate` (a missing file or one without usable rows is refused up front) and by the
prompt builder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataFileError(ValueError):
    """The file cannot give prompts: the message says why, the caller names the field."""


@dataclass
class DataRow:
    prompt: str | None = None  # plain text, or else
    messages: list[dict[str, str]] | None = None  # a chat, rendered with the model's chat template
    output_tokens: int | None = None  # the row's own output length
    reference: str | None = None  # a recorded reply, whose length in tokens is the output length (ShareGPT)


def read_rows(path: Path) -> list[DataRow]:
    """The usable rows of the file, in order; raises DataFileError when there are none or the file is unreadable."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if not path.exists():
        raise DataFileError(f"{path} does not exist")
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data["train"] if "train" in data else next(iter(data.values()))
        else:
            kind = {".txt": "text", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
            if kind is None:
                raise DataFileError(f"{path}: expected a .txt, .jsonl or .json file, or a folder saved by datasets")
            # keep_in_memory: no Arrow cache beside the user's file or in the HF cache for a benchmark's inputs
            data = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    except DataFileError:
        raise
    except Exception as e:  # datasets raises many types for a file it cannot parse
        raise DataFileError(f"{path}: cannot read it: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") \
            from None
    rows = [r for r in map(_row, data) if r is not None]
    if not rows:
        raise DataFileError(f"{path}: no usable rows (expected non-empty `text` lines, or `prompt`, `messages` or "
                            f"ShareGPT `conversations` columns; it has {', '.join(data.column_names) or 'none'})")
    return rows


def _row(d: dict[str, Any]) -> DataRow | None:
    if isinstance(d.get("conversations"), list):
        turns = [t for t in d["conversations"] if isinstance(t, dict)]
        for i, t in enumerate(turns):
            if SHAREGPT_ROLES.get(t.get("from")) == "user" and str(t.get("value") or "").strip():
                reply = turns[i + 1].get("value") if i + 1 < len(turns) else None
                return DataRow(prompt=t["value"], reference=reply or None)
        return None
    out = d.get("output_tokens")
    out = out if isinstance(out, int) and out > 0 else None
    if isinstance(d.get("messages"), list) and d["messages"]:
        messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")}
                    for m in d["messages"] if isinstance(m, dict)]
        return DataRow(messages=messages, output_tokens=out) if messages else None
    text = d.get("prompt", d.get("text"))
    if isinstance(text, str) and text.strip():
        return DataRow(prompt=text, output_tokens=out)
    return None
