"""The `bench` command. User mistakes print one clear message and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from harness.results import ResultsError
from harness.scenario import ScenarioError

app = typer.Typer(help="Benchmark LLM inference engines side by side: latency, throughput and resources.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Build and list local models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

USER_ERRORS = (ScenarioError, ResultsError)


def user_errors(fn):
    """Turn the user's mistakes into a message and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


@app.command()
@user_errors
def run(
    scenario: Annotated[Path, typer.Argument(help="the scenario YAML file")],
    out: Annotated[Path | None, typer.Option("--out", help="results folder (overrides the scenario's `output`)")] = None,
    backend: Annotated[list[str] | None, typer.Option("--backend", help="run only this backend (repeatable)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="re-run only the cells missing or failed in --out")] = False,
) -> None:
    """Run every model × backend × workload cell of SCENARIO and write results.json, requests.jsonl and summary.md."""
    from harness.runner import Runner
    from harness.scenario import load_scenario

    s = load_scenario(scenario)
    out = out or s.output or Path("results") / s.name
    raise typer.Exit(Runner(s, str(scenario), out, backend, resume).run())


@app.command()
@user_errors
def validate(scenario: Annotated[Path, typer.Argument(help="the scenario YAML file")]) -> None:
    """Check SCENARIO (schema, references, backend options, reachable URLs) without running anything."""
    from harness.scenario import check_reachable, load_scenario

    s = load_scenario(scenario)
    check_reachable(s, str(scenario))
    typer.echo(f"{scenario}: ok: {len(s.cells())} cell(s) = {len(s.models)} model(s) × {len(s.backends)} backend(s) "
               f"× {len(s.workloads)} workload(s), {s.repetitions} repetition(s)")


@app.command()
def schema() -> None:
    """Print the scenario's JSON Schema (for editor completion and validation)."""
    from harness.scenario import Scenario

    typer.echo(json.dumps(Scenario.model_json_schema(), indent=2))


@models_app.command("list")
def models_list() -> None:
    """List the synthetic model presets and their sizes."""
    from harness.models import PRESETS, hf_config, parameter_count

    for name, p in PRESETS.items():
        n = parameter_count(hf_config(name))
        typer.echo(f"{name:14s} {p['model_type']:8s} {n / 1e9:6.3f}B params  {p['num_hidden_layers']:3d} layers  "
                   f"hidden {p['hidden_size']:5d}  vocab {p['vocab_size']:6d}  {p['torch_dtype']}")


@models_app.command("synth")
def models_synth(
    preset: Annotated[str, typer.Argument(help="a preset from `bench models list`")],
    out_dir: Annotated[Path, typer.Argument(help="the folder to write (must not exist or be empty)")],
    seed: Annotated[int, typer.Option("--seed", help="random seed of the weights and tokenizer")] = 0,
) -> None:
    """Build a random-weight HF model folder: config, safetensors, a tokenizer trained offline, a chat template."""
    from rich.progress import Progress

    from harness.models import PRESETS, synth_model

    if preset not in PRESETS:
        err.print(f"[red]error:[/red] unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        raise typer.Exit(2)
    if out_dir.exists() and any(out_dir.iterdir()):
        err.print(f"[red]error:[/red] {out_dir} exists and is not empty")
        raise typer.Exit(2)
    with Progress() as progress:
        task = progress.add_task(f"{preset} tensors", total=None)
        synth_model(preset, out_dir, seed, lambda i, n: progress.update(task, completed=i, total=n))
    typer.echo(f"wrote {out_dir}")


def main() -> None:
    app(prog_name="bench")


if __name__ == "__main__":
    sys.exit(main())
