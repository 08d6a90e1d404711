"""Outputs kept with record_outputs (text from every backend, ids where the engine gives them) and the agreement
table: how often a backend's greedy answer matches the reference backend's. A whole run with two backends and its
agreement row, in results.json and the report: tests/inputs/test_documents_scenario.py."""

import json

import pytest

from backends.openai_backend import parse_sse, token_events
from harness.calibrate import scripted_server
from harness.config.load import load_scenario
from harness.records import CellResult, RequestRecord, load_run, read_requests
from harness.results.agreement import compare, precision
from harness.run.runner import Runner
from tests.conftest import scenario_dict


def rec(i, ids=None, text=None, rep=0):
    return RequestRecord(id=i, repetition=rep, t_send=0.0, chunk_times=[1.0], chunk_tokens=[1],
                         output_token_ids=ids, output_text=text)


def test_tokens_are_compared_when_both_sides_have_ids():
    ref = {(0, i): rec(i, ids=list(range(40))) for i in range(4)}
    other = {(0, 0): rec(0, ids=list(range(40))),  # equal
             (0, 1): rec(1, ids=list(range(32)) + [99] * 8),  # differs after the first 32: counts as matching
             (0, 2): rec(2, ids=[0, 1, 2, 7] + list(range(4, 40))),  # differs at token 3
             (0, 3): rec(3, ids=list(range(10)))}  # a shorter answer is not the same answer
    unit, compared, matching, prefix = compare(ref, other, first_n=32)
    assert (unit, compared, matching) == ("tokens", 4, 2)
    assert prefix == pytest.approx((32 + 32 + 3 + 10) / 4)


def test_words_are_compared_when_a_side_has_no_ids():
    ref = {(0, 0): rec(0, ids=[1, 2, 3], text="the river flows"), (0, 1): rec(1, ids=[4], text="a lake")}
    other = {(0, 0): rec(0, text="the  river\nflows"), (0, 1): rec(1, text="a sea"), (1, 5): rec(5, text="x", rep=1)}
    assert compare(ref, other) == ("words", 2, 1, pytest.approx((3 + 1) / 2))
    assert compare(ref, {}) is None


@pytest.mark.parametrize("engine, expected", [
    ({"dtype": "float32"}, "float32"), ({"compute_dtype": "torch.float16", "dtype": "torch.int8"}, "float16"),
    ({"gguf_file_type": "f32"}, "float32"), ({"gguf_file_type": "q8_0"}, "q8_0"), ({}, None),
])
def test_precision_is_read_from_the_engine(engine, expected):
    cell = CellResult(id="c", model="m", backend="b", workload="w", status="ok", engine=engine)
    assert precision(cell) == expected


def test_a_server_streams_text_into_the_events():
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in [
        {"choices": [{"text": "The", "finish_reason": None}]},
        {"choices": [{"text": " river", "finish_reason": None}]},
        {"choices": [{"text": "", "finish_reason": "length"}], "usage": {"completion_tokens": 2}},
    ]) + b"data: [DONE]\n\n"
    chunks, usage = parse_sse([(1.0, body)])
    events = token_events(chunks, usage["completion_tokens"])
    assert "".join(e.text for e in events) == "The river" and sum(e.n_tokens for e in events) == 2


def test_a_server_that_sends_text_only_has_its_text_recorded(tiny_model, write_scenario, tmp_path):
    with scripted_server(tmp_path / "server", 1.0, 0.5, token_ids="ignore") as url:
        backends = [{"name": "remote", "kind": "openai", "url": url + "/v1"}]
        wl = [{"name": "w", "input_tokens": 8, "output_tokens": 5, "num_requests": 3, "warmup_requests": 0}]
        path = write_scenario(scenario_dict(tiny_model, backends, wl, record_outputs=True))
        out = tmp_path / "out"
        assert Runner(load_scenario(path), str(path), out, write_report=False).run() == 0
    (cell,) = load_run(out).cells
    records = read_requests(cell.requests_path(out))
    # The server's own words (the scripted server says " t0 t1 ..."), not a local decoding of ids it never sent.
    assert [(r.output_text, r.output_token_ids) for r in records] == [(" t0 t1 t2 t3 t4", [])] * 3
