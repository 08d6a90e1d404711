"""What a workload sends: its prompt sources (`workloads[].prompts`, told apart by `type`) and the length
distributions `input_tokens` and `output_tokens` accept. Schema only: the prompts are built by
`harness.inputs.prompts` in a subprocess, with the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from harness.core.spec import Strict


class LengthDist(Strict):
    """A token length drawn per request (seeded: the scenario's seed), clipped to [min, max]."""
    dist: Literal["normal", "uniform", "lognormal", "fixed"] = Field(
        description="normal and lognormal: mean and std (of the lengths themselves), bounded by min and max; "
                    "uniform: any length from min to max; fixed: mean")
    mean: float | None = Field(None, gt=0, description="the mean length (normal, lognormal, fixed)")
    std: float | None = Field(None, ge=0, description="the standard deviation of the lengths (normal, lognormal)")
    min: int = Field(1, gt=0, description="no request is shorter")
    max: int | None = Field(None, gt=0, description="no request is longer; required except for fixed: the check "
                                                    "against the model's context needs a bound")

    @model_validator(mode="after")
    def _parameters(self) -> LengthDist:
        need = {"normal": ("mean", "std", "max"), "lognormal": ("mean", "std", "max"), "uniform": ("max",),
                "fixed": ("mean",)}[self.dist]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"dist {self.dist} needs {' and '.join(missing)}")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        if self.dist == "fixed" and self.mean != int(self.mean):
            raise ValueError(f"a fixed length is a whole number of tokens, got mean {self.mean}")
        return self

    @property
    def low(self) -> int:
        return int(self.mean) if self.dist == "fixed" else self.min

    @property
    def high(self) -> int:
        return int(self.mean) if self.dist == "fixed" else self.max


def length_bounds(value: int | LengthDist) -> tuple[int, int]:
    """The shortest and longest length a request may get."""
    return (value.low, value.high) if isinstance(value, LengthDist) else (value, value)


class SyntheticPrompts(Strict):
    """Seeded prompts, each exactly `input_tokens` long in the model's tokenizer: common words where they are single
    tokens, else tokens drawn from the tokenizer's own vocabulary."""
    type: Literal["synthetic"] = "synthetic"


class FilePrompts(Strict):
    """The user's own prompts, in order, from a file or a dataset saved on disk (loaded with `datasets`)."""
    type: Literal["file"]
    path: Path = Field(description="a .txt file (one prompt per line), a .jsonl file (rows with `prompt` or "
                                   "`messages`, optionally `output_tokens`), a ShareGPT .json file (rows with "
                                   "`conversations`), or a folder written by datasets' save_to_disk (same columns); "
                                   "relative to the scenario file")
    truncate: bool = Field(False, description="cut prompts longer than input_tokens to input_tokens")
    output_from: Literal["workload", "data"] = Field(
        "workload", description="each request's output length: the workload's output_tokens, or the data's "
                                "(`output_tokens` of a row; a ShareGPT reply's length in tokens)")


DOCUMENT_KINDS = ("contract", "medical", "log")


class DocumentPrompts(Strict):
    """Long documents, each asked `questions_per_document` questions in a row: consecutive requests share the
    document as their prefix. A request is the document, then its question, `input_tokens` long in all."""
    type: Literal["document"]
    kind: Literal["contract", "medical", "log"] = Field(
        "contract", description="the documents generated (seeded): a commercial contract with numbered clauses, a "
                                "medical record with visits, labs and medications, or an application log with "
                                "timestamps and stack traces; the questions asked fit the kind")
    files: list[Path] | None = Field(None, min_length=1, description="your own documents (text files, used in "
                                     "turn, cut to input_tokens) instead of generated ones; relative to the scenario")
    questions_per_document: int = Field(4, gt=0, description="requests per document, one question each")


class SharedPrefixPrompts(Strict):
    """`prefixes` system prompts of `prefix_tokens` tokens, each shared by a group of requests (request i uses
    prefix i mod prefixes), followed by a seeded suffix to `input_tokens` in all."""
    type: Literal["shared_prefix"]
    prefixes: int = Field(4, gt=0, description="how many distinct shared prefixes")
    prefix_tokens: int = Field(gt=0, description="each prefix's length in tokens; below input_tokens")


def input_files(workload) -> list[Path]:
    """The user's files a workload's prompts are built from: what decides them beside the scenario itself."""
    source, trace = workload.prompts, getattr(workload.load, "path", None)
    files = [source.path] if source.type == "file" else list(getattr(source, "files", None) or [])
    return files + ([trace] if trace is not None else [])
