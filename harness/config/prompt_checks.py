"""The checks of what workloads send that need the file system, made when a scenario is loaded (`bench validate`,
`bench run`) so that a mistake costs seconds, not a cell timeout: prompt files that are missing or have no usable
rows, and prompt + output tokens beyond a model's context on a backend."""

from __future__ import annotations

import json
from pathlib import Path

from harness.config.prompts import FilePrompts, length_bounds
from harness.config.scenario import Scenario, TraceLoad
from harness.core.errors import UserError


class PromptCheckError(UserError):
    """Raised as the scenario's error (load.py's ScenarioError): exit code 2, no traceback."""


def resolve_prompt_paths(scenario: Scenario, base: Path) -> None:
    """Paths in prompt sources are relative to the scenario file."""
    for w in scenario.workloads:
        source = w.prompts
        if source.type == "file":
            source.path = (base / source.path.expanduser()).resolve()
        elif source.type == "document" and source.files:
            source.files = [(base / f.expanduser()).resolve() for f in source.files]


def check_prompt_files(scenario: Scenario, source: str) -> None:
    from harness.inputs.files import DataFileError, read_rows

    for i, w in enumerate(scenario.workloads):
        p = w.prompts
        if isinstance(p, FilePrompts):
            try:
                rows = read_rows(p.path)
            except DataFileError as e:
                raise PromptCheckError(f"{source}: workloads[{i}].prompts.path: {e}") from None
            if p.output_from == "data" and not any(r.output_tokens or r.reference for r in rows):
                raise PromptCheckError(f"{source}: workloads[{i}].prompts.output_from: data, but no row of {p.path} "
                                       f"has an output length (an `output_tokens` column, or ShareGPT replies)")
        elif p.type == "document":
            for k, f in enumerate(p.files or []):
                if not f.is_file() or f.stat().st_size == 0:
                    raise PromptCheckError(f"{source}: workloads[{i}].prompts.files[{k}]: expected a text file, "
                                           f"{f} {'is empty' if f.is_file() else 'does not exist'}")


def model_context(scenario: Scenario, model: str) -> tuple[int, str] | None:
    """The model's context length and where it was read, when it is known."""
    spec = scenario.models[model]
    if spec.synthetic is not None:
        from harness.inputs.models import PRESETS

        return PRESETS[spec.synthetic.preset]["max_position_embeddings"], f"preset {spec.synthetic.preset}"
    try:
        config = json.loads((spec.path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (config, config.get("text_config") or {}):
        if not isinstance(c, dict):
            continue
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(c.get(key), int):
                return c[key], f"{key} in {spec.path / 'config.json'}"
    return None


def backend_context(backend) -> tuple[int, str] | None:
    """A launched engine's own context setting (vLLM's max_model_len, llama.cpp's n_ctx, our engine's max_context),
    defaults included."""
    from backends.registry import get_backend_class

    if backend.url is not None:
        return None  # an attached server was started with settings the scenario does not know
    options = get_backend_class(backend.kind, backend.options).Options.model_validate(backend.options)
    for key in ("max_model_len", "n_ctx", "max_context"):
        value = getattr(options, key, None)
        if isinstance(value, int):
            return value, f"backends[{backend.name}].options.{key}"
    return None


def check_context(scenario: Scenario, source: str) -> None:
    """Every request's prompt + output tokens must fit the context of each model on each backend serving it."""
    contexts = {}
    for m in scenario.models:
        for b in scenario.backends:
            if b.models is None or m in b.models:
                known = [c for c in (model_context(scenario, m), backend_context(b)) if c is not None]
                if known:
                    contexts[(m, b.name)] = min(known)
    for i, w in enumerate(scenario.workloads):
        if isinstance(w.load, TraceLoad):
            _check_trace_context(w.load.path, max(w.num_requests) if isinstance(w.num_requests, list)
                                 else w.num_requests, contexts, f"{source}: workloads[{i}].load.path")
            continue
        for concrete in w.expand():
            spec = concrete.spec
            prompt = length_bounds(spec.input_tokens)[1] if spec.input_tokens is not None else 0
            if spec.prompts.type == "file" and not spec.prompts.truncate:
                prompt = 0  # a file's prompts are measured by the tokenizer, when they are built
            output = length_bounds(spec.output_tokens)[1]
            if spec.prompts.type == "conversation":  # the last turn sends every message and answer before it
                turns = length_bounds(spec.prompts.turns)[1]
                prompt = turns * prompt + (turns - 1) * output
            for (m, b), (ctx, where) in contexts.items():
                if prompt + output > ctx:
                    field = "input_tokens" if prompt >= ctx else "output_tokens"
                    tokens = f"{prompt} prompt + {output} output tokens" if prompt else f"{output} output tokens"
                    raise PromptCheckError(
                        f"{source}: workloads[{i}].{field}: {tokens} exceed the "
                        f"{ctx}-token context of model {m!r} on backend {b!r} ({where}); lower {field} or use a "
                        f"model with a longer context")


def _check_trace_context(path: Path, num_requests: int, contexts: dict, where: str) -> None:
    """A trace's requests have its rows' lengths (the workload's input_tokens and output_tokens are not used): the
    longest of the rows replayed (the first num_requests; warm-ups replay the same) must fit every context. The
    trace was read and checked before (load.py's _check_traces)."""
    from harness.inputs.trace import read_trace

    if not contexts:
        return
    row = max(read_trace(path)[:num_requests], key=lambda r: r.input_length + r.output_length)
    for (m, b), (ctx, known_from) in contexts.items():
        if row.input_length + row.output_length > ctx:
            raise PromptCheckError(
                f"{where}: {path}, line {row.line}: {row.input_length} prompt + {row.output_length} output tokens "
                f"exceed the {ctx}-token context of model {m!r} on backend {b!r} ({known_from}); replay fewer rows "
                f"(num_requests), leave out the longer ones or use a model with a longer context")
