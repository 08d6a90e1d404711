"""The `bench` command. User mistakes print one clear message and exit 2, never a traceback."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from harness.config.load import ScenarioError
from harness.core.errors import UserError

app = typer.Typer(help="Benchmark LLM inference engines side by side: latency, throughput and resources.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Build and list local models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

def user_errors(fn):
    """Turn the user's mistakes into a message and exit code 2; secrets in it (a URL's password, a token of the
    environment) are masked. SIGINT and SIGTERM take one path, as in `bench run`: the processes the command started
    are stopped on the way out (servers, workers, probes) and it exits with 130."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        from harness.core.redact import Redactor
        from harness.run.process import Interrupted, interruptible

        try:
            with interruptible():
                return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[red]error:[/red] {escape(Redactor()(str(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Interrupted as e:
            err.print(f"[red]interrupted[/red] ({e.signal.name}): what it started was stopped", highlight=False)
            raise typer.Exit(130) from None
    return wrapper


# The runs `bench report`, `guide` and `export` read.
RunsArgument = Annotated[list[Path], typer.Argument(help="results folders or results.json files (one per run)")]


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """A command's output folder that cannot be written (read-only, full, a file in the way) is the user's to fix:
    one line and exit code 2, not a traceback."""
    from harness.results.store import OutputError

    try:
        yield
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write {e.filename or out}: {e.strerror or e}") from None


@app.command()
@user_errors
def run(
    scenario: Annotated[Path, typer.Argument(help="the scenario YAML file")],
    out: Annotated[Path | None, typer.Option("--out", help="results folder (overrides the scenario's `output`)")] = None,
    backend: Annotated[list[str] | None, typer.Option("--backend", help="run only this backend (repeatable)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="re-run only the cells missing or failed in --out")] = False,
    force: Annotated[bool, typer.Option("--force", help="with --resume: resume although the scenario changed since "
                                                        "--out was measured (recorded in results.json)")] = False,
    executor: Annotated[str, typer.Option("--executor", help="local: cells one after another here; ray: across a Ray "
                                                              "cluster (docs/scale-out.md)")] = "local",
    address: Annotated[str | None, typer.Option("--address", help="with --executor ray: the cluster, auto or "
                                                                  "ray://HOST:10001 (default RAY_ADDRESS; bench "
                                                                  "never starts a cluster)")] = None,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", help="with --executor ray: at most this many "
                                                                            "cells at once")] = None,
    max_retries: Annotated[int, typer.Option("--max-retries", help="with --executor ray: a failed cell is tried again "
                                                                   "this many times, on another node")] = 1,
    rerun: Annotated[list[str] | None, typer.Option("--rerun", help="run this cell (its id) again into --out, whatever "
                                                                    "its status, keeping the others (repeatable; "
                                                                    "bench gate's on_unstable: rerun uses it)")] = None,
) -> None:
    """Run every model × backend × workload cell of SCENARIO; write results.json, requests.jsonl, summary.md, the report.

    Exit codes: 0 every cell ok, 1 some cells failed, 2 a mistake in the input or an --out that cannot be written,
    130 interrupted (SIGINT or SIGTERM)."""
    from harness.run.runner import Runner
    from harness.config.load import load_scenario

    if force and not (resume or rerun):
        raise ScenarioError("--force: only goes with --resume or --rerun")
    cells_executor = None
    if executor == "ray":
        from harness.run.ray_executor import RayExecutor, import_ray

        if max_parallel is not None and max_parallel < 1:
            raise ScenarioError(f"--max-parallel: expected a positive number, got {max_parallel}")
        if max_retries < 0:
            raise ScenarioError(f"--max-retries: expected 0 or more, got {max_retries}")
        import_ray()  # said before the scenario is loaded and the run begins
        cells_executor = RayExecutor(address, max_parallel, max_retries)
    elif executor != "local":
        raise ScenarioError(f"--executor: expected local or ray, got {executor!r}")
    elif address is not None or max_parallel is not None or max_retries != 1:
        raise ScenarioError("--address, --max-parallel and --max-retries: only go with --executor ray")
    s = load_scenario(scenario)
    out = out or s.output or Path("results") / s.name
    raise typer.Exit(Runner(s, str(scenario), out, backend, resume, force=force, executor=cells_executor,
                            rerun=rerun).run())


@app.command()
@user_errors
def validate(scenario: Annotated[Path, typer.Argument(help="the scenario YAML file")]) -> None:
    """Check SCENARIO (schema, references, backend options, reachable URLs) without running anything."""
    from harness.config.load import check_reachable, load_scenario
    from harness.config.scenario import CapacityLoad

    s = load_scenario(scenario)
    check_reachable(s, str(scenario))
    for warning in s.warnings():
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    cells = s.cells()
    # A capacity search runs once per cell (its steps are its runs): repetitions apply to the other cells only.
    searches = sum(isinstance(s.workload(c.workload).spec.load, CapacityLoad) for c in cells)
    runs = (f"{s.repetitions} repetition(s)" if not searches else
            "capacity cells: one search each" if searches == len(cells) else
            f"{s.repetitions} repetition(s) for {len(cells) - searches} cell(s); {searches} capacity cell(s): one "
            f"search each")
    typer.echo(f"{scenario}: ok: {len(cells)} cell(s) = {len(s.models)} model(s) × {len(s.backends)} backend(s) "
               f"× {len(s.workloads)} workload(s), {runs}")


@app.command()
def schema() -> None:
    """Print the scenario's JSON Schema (for editor completion and validation)."""
    from harness.config.scenario import Scenario

    typer.echo(json.dumps(Scenario.model_json_schema(), indent=2))


@models_app.command("list")
def models_list() -> None:
    """List the synthetic model presets and their sizes."""
    from harness.inputs.models import PRESETS, hf_config, parameter_count

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

    from harness.inputs.models import PRESETS, synth_model

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


@app.command()
@user_errors
def serve(
    backend: Annotated[str, typer.Option("--backend", help="the in-process backend kind to serve, e.g. transformers")],
    model: Annotated[Path, typer.Option("--model", help="an HF model folder")],
    protocol: Annotated[str, typer.Option("--protocol", help="wire protocol: openai or tgi (TGI's routes plus OpenAI's)")] = "openai",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8000,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="backend option KEY=VALUE (YAML value), repeatable")] = None,
) -> None:
    """Serve an in-process backend over HTTP (OpenAI or TGI protocol, streaming), to benchmark it as a server."""
    import tempfile

    import yaml
    from pydantic import ValidationError

    from backends.registry import get_backend_class, known_kinds
    from harness.config.load import format_validation_error, load_yaml
    from harness.serve import PROTOCOLS, build_server, serve as serve_engine

    if protocol not in PROTOCOLS:
        raise ScenarioError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not (model / "config.json").is_file():
        raise ScenarioError(f"--model: expected an HF model folder with config.json, got {model}")
    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ScenarioError(f"--option: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = load_yaml(value)
        except (yaml.YAMLError, ValueError) as e:  # load_yaml raises ValueError for a value YAML cannot hold
            raise ScenarioError(f"--option {key}: not valid YAML: {e}") from None
    try:
        get_backend_class(backend, options).Options.model_validate(options)
    except KeyError:
        raise ScenarioError(f"--backend: unknown backend kind {backend!r}; known: {', '.join(known_kinds())}") from None
    except ValidationError as e:
        raise ScenarioError(format_validation_error("--option", e, prefix="options")) from None
    server = build_server(backend, model, options, Path(tempfile.mkdtemp(prefix="bench-serve-")), protocol)
    typer.echo(f"loading the {backend} engine on {model}")
    serve_engine(server, port, lambda line: typer.echo(line))


@app.command()
@user_errors
def calibrate(
    rate: Annotated[list[float] | None, typer.Option("--rate", help="Poisson rate to try, req/s (repeatable; "
                                                                     "default 10 20 40 80 160)")] = None,
    concurrency: Annotated[list[int] | None, typer.Option("--concurrency", help="closed-loop concurrency to try "
                                                                                "(repeatable)")] = None,
    clients: Annotated[int, typer.Option("--clients", help="client processes (load.clients)")] = 1,
    seconds: Annotated[float, typer.Option("--seconds", help="how long each point sends (at least 50 requests)")] = 5.0,
    ttft_ms: Annotated[float, typer.Option("--ttft-ms", help="the scripted server's time to first token")] = 5.0,
    itl_ms: Annotated[float, typer.Option("--itl-ms", help="the scripted server's time between tokens")] = 2.0,
    output_tokens: Annotated[int, typer.Option("--output-tokens", help="tokens per request")] = 32,
    behaviour: Annotated[list[str] | None, typer.Option("--behaviour", help="how the scripted server writes "
                         "(repeatable; default every one): nodelay, nagle, coalesced, keepalive-close, "
                         "late-headers")] = None,
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("results/calibrate"),
) -> None:
    """Measure this machine's client against a scripted server of known timing (127.0.0.1), written the ways servers
    write (with and without TCP_NODELAY, tokens coalesced, keep-alive closed, late headers): its TTFT, TPOT and ITL
    error and achieved rate at each load, and the highest rate within 1 ms TTFT and 1% TPOT. Run it before trusting a
    high-rate result."""
    from rich.console import Console

    from harness.calibrate import (BEHAVIOURS, DEFAULT_RATES, TPOT_TOLERANCE, TTFT_TOLERANCE_MS,
                                   calibrate as run_calibration, highest_rate_within, print_points)

    for name, values in (("--rate", rate or []), ("--concurrency", concurrency or []),
                         ("--seconds", [seconds]), ("--ttft-ms", [ttft_ms]), ("--itl-ms", [itl_ms]),
                         ("--clients", [clients]), ("--output-tokens", [output_tokens])):
        if any(v <= 0 for v in values):
            raise ScenarioError(f"{name}: expected a positive number, got {min(values):g}")
    if concurrency and clients > min(concurrency):
        raise ScenarioError(f"--clients: {clients} clients need a concurrency of at least {clients}")
    if unknown := [b for b in behaviour or [] if b not in BEHAVIOURS]:
        raise ScenarioError(f"--behaviour: unknown {', '.join(map(repr, unknown))}; known: {', '.join(BEHAVIOURS)}")
    console = Console(width=None if sys.stdout.isatty() else 200)
    rates = list(rate or ([] if concurrency else DEFAULT_RATES))
    behaviours = list(dict.fromkeys(behaviour or BEHAVIOURS))
    points = run_calibration(out, rates, list(concurrency or []), clients, seconds, ttft_ms, itl_ms,
                             output_tokens=output_tokens, console=console, behaviours=behaviours)
    print_points(points, console)
    within = f"within {TTFT_TOLERANCE_MS:g} ms TTFT and {TPOT_TOLERANCE:.0%} TPOT"
    for name in behaviours if rates else []:
        best = highest_rate_within([p for p in points if p.server == name])
        console.print(f"{name}: highest rate {within}: {best:g} req/s" if best is not None
                      else f"{name}: no rate tried kept the client {within}")
    console.print(f"results: {out}/BEHAVIOUR/results.json, {out / 'calibration.json'}")


@app.command()
@user_errors
def gate(
    baseline: Annotated[Path, typer.Option("--baseline", help="baseline results.json or folder (e.g. results/baselines/NAME)")],
    current: Annotated[Path, typer.Option("--current", help="the run to judge: results.json or its folder")],
    policy: Annotated[Path | None, typer.Option("--policy", help="gate policy YAML (default: the packaged one)")] = None,
    allow_env_change: Annotated[bool, typer.Option("--allow-env-change", help="compare despite a different GPU, CPU or engine version")] = False,
    reference: Annotated[str | None, typer.Option("--reference", help="normalize by this backend of the same run (overrides the policy)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="where gate.md and gate.json go (default: the current results folder)")] = None,
) -> None:
    """Compare CURRENT with BASELINE cell by cell: exit 1 on a significant regression beyond the policy, 2 if incomparable."""
    from harness.analyze.gate import run_gate

    with writing(out or current):
        code = run_gate(baseline, current, policy, allow_env_change, reference, out)
    raise typer.Exit(code)


baseline_app = typer.Typer(help="Store gate baselines.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("update")
@user_errors
def baseline_update(
    results: Annotated[Path, typer.Argument(help="a results.json or results folder")],
    name: Annotated[str | None, typer.Option("--name", help="baseline name (default: the scenario's name)")] = None,
    directory: Annotated[Path, typer.Option("--dir", help="where baselines live")] = Path("results/baselines"),
    force: Annotated[bool, typer.Option("--force", help="replace a baseline of that name (refused without it)")] = False,
) -> None:
    """Store RESULTS as the baseline DIR/NAME: results.json, the cells' requests files and metadata."""
    from harness.analyze.baselines import store_baseline

    typer.echo(f"stored baseline {store_baseline(results, directory, name, force)}")


@models_app.command("gguf")
@user_errors
def models_gguf(
    hf_dir: Annotated[Path, typer.Argument(help="an HF model folder (Llama family, safetensors, tokenizer.json)")],
    out: Annotated[Path, typer.Argument(help="the GGUF file to write")],
    gguf_type: Annotated[str, typer.Option("--type", help="f32, f16, bf16, q8_0, or a llama.cpp quantizer type (q4_k_m, ...)")] = "f32",
) -> None:
    """Convert HF_DIR to a GGUF file for llama.cpp."""
    from backends.llama_cpp.gguf import GGUF_TYPES, GGUFError, convert

    if gguf_type not in GGUF_TYPES:
        raise ScenarioError(f"--type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    try:
        convert(hf_dir, out, gguf_type)
    except GGUFError as e:
        raise ScenarioError(str(e)) from None
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {gguf_type})")


@app.command()
@user_errors
def report(
    results: RunsArgument,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default: the results folder of a "
                                                           "single run, ./report for several)")] = None,
    format: Annotated[str, typer.Option("--format", help="comma-separated: md, html")] = "md,html",
) -> None:
    """Write report.md (plots in plots/) and a self-contained report.html from one or several runs."""
    from harness.analyze.report import parse_formats, write_report
    from harness.results.runs import run_folder

    try:
        formats = parse_formats(format)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--format") from None
    out = out or (Path("report") if len(results) > 1 else run_folder(results[0]))
    with writing(out):
        written = write_report(results, out, formats)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
@user_errors
def guide(
    results: RunsArgument,
    out: Annotated[Path | None, typer.Option("--out", help="guide.md or guide.html (default: guide.md in the results "
                                                           "folder; with several, results/guide.md)")] = None,
    rules: Annotated[list[Path] | None, typer.Option("--rules", help="extra use cases (YAML, repeatable); "
                                                                     "an id already known replaces it")] = None,
) -> None:
    """Write a framework-selection guide: per use case, backends ranked from measured cells, and where it flips."""
    from harness.analyze.guide import write_guide
    from harness.results.runs import run_folder

    # Beside the results it comes from (as the report), never loose in the working folder.
    if out is None:
        out = run_folder(results[0]) / "guide.md" if len(results) == 1 else Path("results") / "guide.md"
    with writing(out):
        written = write_guide(results, out, rules)
    typer.echo(f"wrote {written}")


@app.command()
@user_errors
def export(
    results: RunsArgument,
    format: Annotated[str, typer.Option("--format", help="csv, parquet or jsonl")] = "csv",
    out: Annotated[Path, typer.Option("--out", help="folder for statistics.FORMAT and requests.FORMAT")] = Path("export"),
) -> None:
    """Write the results as tables: one row per cell, metric and statistic (with CIs), and one row per request."""
    from harness.results.frame import FORMATS, export as write

    if format not in FORMATS:
        raise ScenarioError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    with writing(out):
        written = write(results, out, format)
    for path in written:
        typer.echo(f"wrote {path}")


engine_app = typer.Typer(help="Our offloading engine (own_engine).", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


def _engine_help(option: str) -> str:
    """An engine option's description, from the one place it is written (own_engine.engine_config)."""
    from own_engine.engine_config import EngineConfig

    return EngineConfig.model_fields[option].description or option


@engine_app.command("plan")
def engine_plan(
    model: Annotated[str, typer.Option("--model", help="an HF model folder, or a preset of `bench models list`")],
    context: Annotated[int | None, typer.Option("--context", "--max-context", help=_engine_help("max_context"))] = None,
    vram_budget: Annotated[str | None, typer.Option("--vram-budget", help=_engine_help("vram_budget"))] = None,
    device: Annotated[str | None, typer.Option("--device", help=_engine_help("device") + " (default: cpu)")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "--max-batch", help=_engine_help("max_batch"))] = None,
    weights: Annotated[str | None, typer.Option("--weights", help=_engine_help("weights"))] = None,
    kv: Annotated[str | None, typer.Option("--kv", help=_engine_help("kv"))] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help=_engine_help("dtype"))] = None,
    compute_dtype: Annotated[str | None, typer.Option("--compute-dtype", help=_engine_help("compute_dtype"))] = None,
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help=_engine_help("kv_dtype"))] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help=_engine_help("block_size"))] = None,
) -> None:
    """Explain where the engine would put weights and KV for MODEL under a VRAM budget, which dtype it would compute
    in and why (the CPU's instruction set, or a micro-benchmark cached per machine). Loads no weights. Every option
    left out takes the engine's default (own_engine.engine_config.EngineConfig)."""
    from harness.inputs.models import PRESETS, hf_config
    from own_engine.config import EngineError, ModelConfig
    from own_engine.engine_config import EngineConfig
    from harness.plan_estimate import estimate
    from own_engine.planner import Machine, make_plan
    from llmbench.units import fmt_bytes

    given = dict(max_context=context, vram_budget=vram_budget, device=device, max_batch=batch, weights=weights, kv=kv,
                 dtype=dtype, compute_dtype=compute_dtype, kv_dtype=kv_dtype, block_size=block_size)
    try:
        if model in PRESETS:
            cfg = ModelConfig.from_dict(hf_config(model), source=f"preset {model}")
        elif (Path(model) / "config.json").is_file():
            cfg = ModelConfig.load(model)
        else:
            raise EngineError(f"--model: {model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder with config.json")
        config = EngineConfig.of(**{k: v for k, v in given.items() if v is not None})
        machine = Machine.here(cfg, config)
        plan = make_plan(cfg, config, machine)
    except EngineError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    typer.echo(plan.explain())
    typer.echo(f"read from this machine: {fmt_bytes(machine.ram)} of RAM available, {fmt_bytes(machine.disk)} free "
               f"on the filesystem of {machine.disk_at}")
    for line in estimate(plan, machine):
        typer.echo(line)


@app.command()
@user_errors
def doctor(
    python: Annotated[list[Path] | None, typer.Option("--python", help="also look for vLLM in this interpreter "
                                                                         "(an engine's own venv), repeatable")] = None,
    address: Annotated[str | None, typer.Option("--address", help="also list this Ray cluster's nodes and their "
                                                                  "resources: auto or ray://HOST:10001 (default "
                                                                  "RAY_ADDRESS when set)")] = None,
) -> None:
    """Which engines can be imported or launched here, and why not where one cannot; with --address, the Ray
    cluster's nodes."""
    from rich.table import Table

    from harness.doctor import run_checks

    console = Console(width=None if sys.stdout.isatty() else 160)
    with console.status("probing engines (vLLM takes a few seconds per interpreter)"):
        checks = run_checks(python or [], address)
    table = Table("component", "status", "details", title="bench doctor")
    colors = {"ok": "green", "limited": "yellow", "missing": "red"}
    for c in checks:
        table.add_row(c.component, f"[{colors[c.status]}]{c.status}[/]", c.detail)
    console.print(table)


def main() -> None:
    app(prog_name="bench")


if __name__ == "__main__":
    sys.exit(main())
