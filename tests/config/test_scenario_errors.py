"""Every kind of bad scenario stops before anything runs: exit 2, the file and field named, no traceback."""

import pytest
from typer.testing import CliRunner

from harness.cli import app
from tests.conftest import free_port, scenario_dict

runner = CliRunner()
HF = {"name": "hf", "kind": "transformers"}


def bench(*args):
    result = runner.invoke(app, list(map(str, args)))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def expect_error(path, *needles, command="validate"):
    code, out = bench(command, path)
    assert code == 2, out
    assert "Traceback" not in out
    assert str(path) in out.replace("\n", "")
    for n in needles:
        assert n in out, f"{n!r} not in:\n{out}"


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.yaml", "no such scenario file")


def test_empty_file(write_scenario):
    expect_error(write_scenario(""), "empty")


def test_bad_yaml(write_scenario):
    expect_error(write_scenario("name: [unclosed\n"), "not valid YAML")


def test_top_level_not_mapping(write_scenario):
    expect_error(write_scenario("- a\n- b\n"), "top level must be a mapping", "list")


def test_unknown_key(write_scenario, tiny_model):
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], repetitons=3)), "repetitons", "unknown key")


def test_unknown_nested_key(write_scenario, tiny_model):
    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 1, "load": {"type": "poisson", "rate": 1, "burst": 2}}]
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], wl)), "workloads[0].load.burst", "unknown key")


def test_wrong_type(write_scenario, tiny_model):
    wl = [{"name": "w", "input_tokens": "many", "output_tokens": 4, "num_requests": 1}]
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], wl)), "workloads[0].input_tokens", "integer")


def test_a_union_says_one_thing_the_branch_that_fits_the_values_type(write_scenario, tiny_model):
    """input_tokens is a number, a length distribution or a list (a sweep): a bad distribution gets the
    distribution's complaint alone, not "should be a valid integer ... or ... or should be a valid list"; a value
    no member takes gets one line of what would be."""
    wl = [{"name": "w", "input_tokens": {"dist": "uniform", "min": 32, "max": 8}, "output_tokens": 8,
           "num_requests": 2},
          {"name": "w2", "input_tokens": "lots", "output_tokens": 4, "num_requests": 2,
           "load": {"type": "concurrency", "concurrency": "four"}}]
    code, out = bench("validate", write_scenario(scenario_dict(tiny_model, [HF], wl)))
    lines = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in out.splitlines()[1:] if ": " in line}
    assert code == 2 and lines["workloads[0].input_tokens"].startswith("max (8) is below min (32)"), out
    assert lines["workloads[1].input_tokens"].startswith(
        "expected an integer or a length distribution ({dist: ..., ...}) or a list (a sweep over its values)")
    assert lines["workloads[1].load.concurrency"].startswith("expected an integer or a list")
    assert "valid integer" not in out and "valid list" not in out and "Traceback" not in out


def test_output_tokens_are_required_unless_a_trace_gives_them(write_scenario, tiny_model):
    wl = [{"name": "w", "input_tokens": 8, "num_requests": 1, "load": {"type": "concurrency", "concurrency": 2}}]
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], wl)), "workloads[0]: output_tokens is required with "
                 "a load of type concurrency")


def test_negative_count(write_scenario, tiny_model):
    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": -3}]
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], wl)), "workloads[0].num_requests", "greater than 0")


def test_unknown_backend_kind(write_scenario, tiny_model):
    expect_error(write_scenario(scenario_dict(tiny_model, [{"name": "x", "kind": "tensorrt"}])),
                 "backends[0].kind", "tensorrt", "transformers", "openai")


def test_bad_backend_option(write_scenario, tiny_model):
    b = {"name": "hf", "kind": "transformers", "options": {"dtype": "float8"}}
    expect_error(write_scenario(scenario_dict(tiny_model, [b])), "backends[0].options.dtype", "float32")


def test_unknown_model_reference(write_scenario, tiny_model):
    b = {"name": "hf", "kind": "transformers", "models": ["huge"]}
    expect_error(write_scenario(scenario_dict(tiny_model, [b])), "unknown model 'huge'")


def test_missing_model_path(write_scenario, tmp_path):
    s = {"name": "t", "models": {"big": {"path": str(tmp_path / "no-such-model")}}, "backends": [HF],
         "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 1}]}
    expect_error(write_scenario(s), "models.big.path", "does not exist")


def test_unknown_preset(write_scenario):
    s = {"name": "t", "models": {"m": {"synthetic": {"preset": "gpt-5"}}}, "backends": [HF],
         "workloads": [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 1}]}
    expect_error(write_scenario(s), "models.m.synthetic.preset", "tiny-llama")


def test_openai_without_url(write_scenario, tiny_model):
    expect_error(write_scenario(scenario_dict(tiny_model, [{"name": "r", "kind": "openai"}])), "backends[0]: url")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_unreachable_url(write_scenario, tiny_model, tmp_path, command):
    url = f"http://127.0.0.1:{free_port()}/v1"
    path = write_scenario(scenario_dict(tiny_model, [{"name": "r", "kind": "openai", "url": url}],
                                        output=str(tmp_path / "out")))
    expect_error(path, "backends[0].url", "cannot reach", url, command=command)
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_backend_on_command_line(write_scenario, tiny_model, tmp_path):
    path = write_scenario(scenario_dict(tiny_model, [HF]))
    code, out = bench("run", path, "--backend", "nope", "--out", tmp_path / "o")
    assert code == 2 and "--backend" in out and "nope" in out and "Traceback" not in out


def test_valid_scenario_validates(write_scenario, tiny_model):
    code, out = bench("validate", write_scenario(scenario_dict(tiny_model, [HF])))
    assert code == 0 and "1 cell(s)" in out


def test_schema_is_json_schema():
    import json

    code, out = bench("schema")
    schema = json.loads(out)
    assert code == 0 and "workloads" in schema["properties"] and schema["additionalProperties"] is False
