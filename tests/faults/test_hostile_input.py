"""Faults 5 and 6: scenario files that once gave tracebacks or hangs, or validated and then broke the run. Every
hostile file is refused by `bench validate` (exit 2, one message naming the file, no traceback) or runs as validated.
Then a property-based fuzz of the loader: whatever the file, validate answers 0 or 2 with a message within 2 s."""

import copy
import json
import subprocess
import sys
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli import app
from tests.conftest import scenario_dict
from tests.faults.conftest import ROOT, cells_by_backend

runner = CliRunner()
W = {"name": "w", "input_tokens": 8, "output_tokens": 2, "num_requests": 1, "warmup_requests": 0}
S = {"name": "s", "kind": "scripted"}


def validate(path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    result = runner.invoke(app, ["validate", str(path)])
    elapsed = time.monotonic() - t0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else ""), elapsed


def base(tiny_model, **extra) -> dict:
    return scenario_dict(tiny_model, [dict(S)], [dict(W)], **extra)


def with_backend(tiny_model, **backend) -> dict:
    return scenario_dict(tiny_model, [{**S, **backend}], [dict(W)])


def billion_laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    return "\n".join(lines) + "\n"


NOT_PASSED = "'%s' is not a llama_cpp.server option the harness passes on"


def llama_server(tiny_model, *server_args: str) -> dict:
    return scenario_dict(tiny_model, [{"name": "l", "kind": "llama_cpp", "options": {
        "mode": "server", "server_args": list(server_args)}}], [dict(W)])


def cases(tiny_model) -> dict[str, tuple[str | dict, str]]:
    """name: (the scenario, dict or raw YAML; what the message must say)."""
    m = str(tiny_model)
    return {
        "port 99999": (with_backend(tiny_model, url="http://127.0.0.1:99999/v1"), "expected a port from 1 to 65535"),
        "port -1": (with_backend(tiny_model, url="http://127.0.0.1:-1/v1"), "expected a port from 1 to 65535"),
        "port abc": (with_backend(tiny_model, url="http://127.0.0.1:abc/v1"), "expected a port from 1 to 65535"),
        "nested 5000 deep": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
        "300-character host": (with_backend(tiny_model, url=f"http://{'a' * 300}:8000/v1"), "expected a host name"),
        "10000-character python": (with_backend(tiny_model, python="/" + "p" * 10_000), "File name too long"),
        "5000-digit vram_budget": (base(tiny_model, resources={"vram_budget": "9" * 5000}), "too large"),
        "5000-digit integer": (f"name: t\nseed: {'9' * 5000}\n", "an integer of 5000 characters is too large"),
        "billion laughs": (billion_laughs(), "more than 100,000 values"),
        "recursive anchor in extra_body": (
            f"name: t\nmodels: {{tiny: {{path: {m}}}}}\nbackends: [{{name: o, kind: openai, url: 'http://127.0.0.1:9',"
            f" options: {{extra_body: &x {{a: [*x]}}}}}}]\nworkloads: [{json.dumps(W)}]\n", "recursive"),
        "250-character backend name": (scenario_dict(tiny_model, [{**S, "name": "b" * 250}], [dict(W)]),
                                       "at most 64 characters"),
        "models a/b and a_b": (scenario_dict(tiny_model, [dict(S)], [dict(W)]) | {"models": {
            "a/b": {"path": m}, "a_b": {"path": m}}}, "models 'a/b' and 'a_b' would share files named 'a_b'"),
        "output_tokens [8, 8]": (scenario_dict(tiny_model, [dict(S)], [{**W, "output_tokens": [8, 8]}]),
                                 "a sweep's values must differ; repeated: 8"),
        "two names, one cell id": (scenario_dict(tiny_model, [dict(S)], [{**W, "name": "w[output_tokens=2]"},
                                                                          {**W, "output_tokens": [2, 3]}]),
                                   "would both be stored as cells/tiny__s__w_output_tokens_2_"),
        "load.concurrency []": (scenario_dict(tiny_model, [dict(S)], [{**W, "load": {"type": "concurrency",
                                                                                      "concurrency": []}}]),
                                "a sweep needs at least one value"),
        "duplicate keys": (f"name: t\nmodels: {{tiny: {{path: {m}}}}}\nname: u\n", "duplicate key 'name'"),
        "infinite timeout": (base(tiny_model, cell_timeout_s=float("inf")), "finite number"),
        "llama.cpp --host 0.0.0.0": (llama_server(tiny_model, "--host", "0.0.0.0"), NOT_PASSED % "--host"),
        "llama.cpp --port=80": (llama_server(tiny_model, "--port=80"), NOT_PASSED % "--port=80"),
        # Issue 25: argparse takes an abbreviation for the flag it abbreviates, and the last value wins.
        "llama.cpp --hos 0.0.0.0": (llama_server(tiny_model, "--n_ctx", "512", "--hos", "0.0.0.0"),
                                    NOT_PASSED % "--hos"),
        "llama.cpp --config_file": (llama_server(tiny_model, "--config_file", "/tmp/any.json"),
                                    NOT_PASSED % "--config_file"),
        "llama.cpp -h": (llama_server(tiny_model, "--n_ctx=512", "-h"), NOT_PASSED % "-h"),
        "llama.cpp a value that is a flag": (llama_server(tiny_model, "--chat_format", "--host=0.0.0.0"),
                                             NOT_PASSED % "--host=0.0.0.0"),
        "vLLM engine_args a secret": (scenario_dict(tiny_model, [{"name": "v", "kind": "vllm", "options": {
            "engine_args": {"ssl_secret": "x"}}}], [dict(W)]), "ssl_secret: a secret would be on the server's command"),
        "a NUL byte in a path": (scenario_dict(tiny_model, [dict(S)], [{**W, "load": {"type": "trace",
                                                                                       "path": "/tmp/a\0b"}}]),
                                 "workloads[0].load.path: holds a NUL byte"),
        # ~400 KB of YAML that expands to ~100 MB: refused before anything is expanded
        "alias bytes bomb": ("a: &a '" + "x" * 100_000 + "'\nb: [" + ", ".join(["*a"] * 1000) + "]\n",
                             "with its aliases expanded this is more than 8 MiB of text"),
        "TGI --hostname": (scenario_dict(tiny_model, [{"name": "t", "kind": "tgi", "options": {"launch": {
            "extra_args": ["--hostname", "0.0.0.0"]}}}], [dict(W)]), "--hostname cannot be set here"),
        "vLLM engine_args host": (scenario_dict(tiny_model, [{"name": "v", "kind": "vllm", "options": {
            "engine_args": {"host": "0.0.0.0"}}}], [dict(W)]), "host cannot be set here"),
    }


CASE_NAMES = list(cases(__import__("pathlib").Path("/m")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_scenarios_are_refused_with_a_message(name, write_scenario, tiny_model):
    content, needle = cases(tiny_model)[name]
    path = write_scenario(content)
    code, out, elapsed = validate(path)
    assert code == 2, out
    assert "Traceback" not in out and str(path) in out.replace("\n", "")
    assert needle in out.replace("\n", ""), out
    assert elapsed < 2.0, f"{name}: {elapsed:.2f} s"


@pytest.mark.parametrize("name", ["port 99999", "nested 5000 deep", "billion laughs"])
def test_a_real_process_exits_2_without_a_traceback(name, write_scenario, tiny_model):
    content, needle = cases(tiny_model)[name]
    path = write_scenario(content)
    done = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert needle in done.stderr.replace("\n", "")


def test_close_rates_and_duplicate_names_get_a_cell_each(bench, write_scenario, tiny_model, tmp_path):
    """A rate sweep [1.0000001, 1.0000002] once named both cells `rate=1`, and results.json kept one of them."""
    w = {**W, "num_requests": 2, "load": {"type": "poisson", "rate": [1.0000001, 1.0000002]}}
    path = write_scenario(scenario_dict(tiny_model, [{**S, "options": {"ttft_s": 0.001, "itl_s": 0.001}}], [w]))
    code, out, _ = validate(path)
    assert code == 0 and "2 cell(s)" in out
    run = bench("run", str(path), "--out", str(tmp_path / "out"))
    assert run.wait(120) == 0, run.output
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert sorted(c["workload"] for c in cells) == ["w[load.rate=1.0000001]", "w[load.rate=1.0000002]"]
    assert not run.wait_gone(5)
    assert cells_by_backend(tmp_path / "out")  # through the typed loader too


def test_forty_thousand_cells_validate_in_about_a_second(write_scenario, tiny_model):
    w = {**W, "input_tokens": list(range(1, 201)), "output_tokens": list(range(1, 201))}
    path = write_scenario(scenario_dict(tiny_model, [dict(S)], [w]))
    from harness.config.load import load_scenario

    t0 = time.monotonic()
    scenario = load_scenario(path)
    cells = scenario.cells()
    looked_up = [scenario.workload(c.workload) for c in cells]  # what the runner does per cell
    elapsed = time.monotonic() - t0
    assert len(cells) == len(looked_up) == 40_000 and len({c.id for c in cells}) == 40_000
    assert elapsed < 4.0, f"{elapsed:.2f} s for 40,000 cells"  # about 1 s on a quiet 2-core machine


# ---- the fuzz -------------------------------------------------------------------------------------------------------

HOSTILE_STRINGS = ["", " ", "a/b", "a_b", "<script>alert(1)</script>", "--host", "0.0.0.0", "${HOME}", "~", "..",
                   "/" + "p" * 5000, "9" * 400, "8GiB", "1e400", "-1", "nan", "inf", "http://127.0.0.1:99999",
                   "http://127.0.0.1:-1", "http://127.0.0.1:abc", "http://" + "h" * 300, "http://127.0.0.1:1/v1",
                   "\u202e", "\ud7ff", "null", "*x", "&x", "<<"]
KEYS = ["name", "models", "backends", "workloads", "kind", "url", "options", "python", "path", "synthetic", "preset",
        "input_tokens", "output_tokens", "num_requests", "load", "type", "rate", "concurrency", "clients",
        "resources", "vram_budget", "seed", "repetitions", "cell_timeout_s", "env", "HF_TOKEN", "server_args",
        "engine_args", "extra_body", "mode"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**40, 10**40), st.floats(),
                    st.text(max_size=40), st.sampled_from(HOSTILE_STRINGS))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), inner, max_size=4),
                      max_leaves=12)
PATHS = [(), ("name",), ("models",), ("models", "tiny"), ("models", "tiny", "path"), ("backends",), ("backends", 0),
         ("backends", 0, "kind"), ("backends", 0, "name"), ("backends", 0, "options"), ("backends", 0, "url"),
         ("backends", 0, "python"), ("backends", 0, "models"), ("backends", 0, "resources"), ("workloads",),
         ("workloads", 0), ("workloads", 0, "name"), ("workloads", 0, "input_tokens"),
         ("workloads", 0, "output_tokens"), ("workloads", 0, "num_requests"), ("workloads", 0, "load"),
         ("workloads", 0, "warmup_requests"), ("workloads", 0, "temperature"), ("repetitions",), ("seed",),
         ("resources",), ("resources", "vram_budget"), ("cell_timeout_s",), ("slo",), ("output",), ("extra",)]
LOADS = st.fixed_dictionaries({"type": st.sampled_from(["sequential", "concurrency", "poisson", "other"])},
                              optional={"concurrency": values, "rate": values, "clients": values})


def put(doc, path, value):
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        if isinstance(target, dict) and key in target or isinstance(target, list) and isinstance(key, int) \
                and key < len(target):
            target = target[key]
        else:
            return doc
    if isinstance(target, dict) or (isinstance(target, list) and isinstance(path[-1], int) and path[-1] < len(target)):
        target[path[-1]] = value
    return doc


@st.composite
def mutated_scenarios(draw, tiny_model) -> str:
    doc = base(tiny_model)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        value = draw(LOADS if path[-1:] == ("load",) else values)
        doc = put(copy.deepcopy(doc), path, value)
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@st.composite
def yaml_traps(draw) -> str:
    kind = draw(st.sampled_from(["nest", "aliases", "recursive", "duplicate", "bigint", "tags"]))
    n = draw(st.integers(1, 9000))
    if kind == "nest":
        return "name: " + "[" * n + "]" * n + "\n"
    if kind == "aliases":
        width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 9))
        lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
        return "\n".join(lines) + "\n"
    if kind == "recursive":
        return draw(st.sampled_from(["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a [1, [2, *a]]\n"]))
    if kind == "duplicate":
        key = draw(st.sampled_from(KEYS))
        return f"{key}: 1\n{key}: 2\n"
    if kind == "bigint":
        return f"seed: {'9' * min(n, 6000)}\n"
    return draw(st.sampled_from(["a: !!python/object:os.system x\n", "a: !!float abc\n", "a: 2001-02-30\n",
                                 "a: !!binary '%%%'\n", "a: !!int 0x\n", "? [a, b]\n: c\n", "a: *undefined\n"]))


@pytest.fixture(scope="module")
def every_backend_imported():
    """Import every backend kind once, so the fuzz times the loader and not first imports."""
    from backends.registry import get_backend_class, known_kinds

    for kind in known_kinds():
        for mode in ({}, {"mode": "server"}):
            try:
                get_backend_class(kind, mode)
            except Exception:
                pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_every_file_validates_or_exits_2_within_2_s(data, tiny_model, tmp_path, every_backend_imported):
    text = data.draw(st.one_of(mutated_scenarios(tiny_model), yaml_traps(), st.text(max_size=300)))
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, out, elapsed = validate(path)
    assert code in (0, 2), out
    assert "Traceback" not in out
    if code == 2:
        assert "error: " in out and str(path) in out.replace("\n", "")
    assert elapsed < 2.0, f"{elapsed:.2f} s for:\n{text[:500]}"


# ---- issue 25: tracebacks that became exit 2 ------------------------------------------------------------------------

def command(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def small_results(tmp_path_factory):
    from tests.report_fixtures import ResultsBuilder, workload

    b = ResultsBuilder(tmp_path_factory.mktemp("results") / "run")
    b.add("a", workload("w", num_requests=4), 0.05, 0.01)
    return b.write()


def test_a_model_config_that_is_not_an_object_is_refused(write_scenario, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for config, needle in (("[1, 2]", "expected a JSON object (an HF model config), got a list"),
                           ("\xff{", "is not valid JSON")):
        (model / "config.json").write_bytes(config.encode("latin-1"))
        path = write_scenario({"name": "t", "models": {"m": {"path": str(model)}}, "backends": [dict(S)],
                               "workloads": [dict(W)]})
        code, out, _ = validate(path)
        assert code == 2 and "models.m.path" in out and needle in out.replace("\n", "") and "Traceback" not in out


def test_an_output_folder_that_cannot_be_written_is_exit_2(small_results, tmp_path):
    """A file where the output folder should be (root ignores permissions, not that)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("in the way")
    out = blocked / "out"
    for args in (("report", small_results, "--out", out), ("guide", small_results, "--out", out / "guide.md"),
                 ("export", small_results, "--out", out),
                 ("gate", "--baseline", small_results, "--current", small_results, "--out", out)):
        code, text = command(*args)
        assert code == 2 and "cannot write" in text and "Traceback" not in text, (args, text)


@pytest.mark.parametrize("content", [b"metrics:\n  ttft_ms.p50: {max_regression: \xff}\n",
                                     b"metrics: " + b"[" * 3000 + b"]" * 3000 + b"\n",
                                     b"a: &a '" + b"x" * 100_000 + b"'\nb: [" + b", ".join([b"*a"] * 1000) + b"]\n"])
def test_policy_and_rules_files_take_the_scenarios_loader_and_limits(small_results, tmp_path, content):
    """Non-UTF-8, deeply nested and alias-bomb policy (`bench gate --policy`) and rules (`bench guide --rules`)
    files: exit 2 naming the file, never a traceback or a 100 MB expansion."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    for args in (("gate", "--baseline", small_results, "--current", small_results, "--policy", bad,
                  "--out", tmp_path / "g"),
                 ("guide", small_results, "--rules", bad, "--out", tmp_path / "guide.md")):
        code, text = command(*args)
        assert code == 2 and str(bad) in text.replace("\n", "") and "Traceback" not in text, (args, text)
        assert any(n in text for n in ("not UTF-8", "nested deeper", "MiB of text")), text


def test_an_offload_dir_whose_subfolder_is_not_ours_is_refused_at_validate(write_scenario, tiny_model, tmp_path):
    mine = tmp_path / "mine"
    (mine / "own_engine").mkdir(parents=True)
    (mine / "own_engine" / "thesis.tex").write_text("mine")
    path = write_scenario(scenario_dict(tiny_model, [{"name": "o", "kind": "own", "options": {
        "weights": "disk", "offload_dir": str(mine)}}], [dict(W)]))
    code, out, _ = validate(path)
    assert code == 2 and "options.offload_dir" in out and "holds files of yours" in out.replace("\n", "")
    assert (mine / "own_engine" / "thesis.tex").read_text() == "mine"


def test_a_run_never_empties_a_folder_of_the_users_under_its_out(write_scenario, tiny_model, tmp_path):
    """`--out` given by the user may hold anything: the runner replaces a cell's folder only when it made it."""
    from harness.config.load import load_scenario
    from harness.core.errors import UserError
    from harness.run.runner import Runner

    out = tmp_path / "out"
    theirs = out / "cells" / "tiny__s__w"
    theirs.mkdir(parents=True)
    (theirs / "data.csv").write_text("mine")
    path = write_scenario(scenario_dict(tiny_model, [{**S, "options": {"ttft_s": 0.001, "itl_s": 0.001}}], [dict(W)]))
    with pytest.raises(UserError, match="was not made by bench, so it is not removed"):
        Runner(load_scenario(path), str(path), out).run()
    assert (theirs / "data.csv").read_text() == "mine"
    (theirs / "data.csv").unlink()
    theirs.rmdir()
    assert Runner(load_scenario(path), str(path), out).run() == 0
    again = Runner(load_scenario(path), str(path), out).store.fresh_cell_dir("tiny__s__w")  # its own: replaced
    assert again == theirs and [p.name for p in again.iterdir()] == [".llmbench-made"]
