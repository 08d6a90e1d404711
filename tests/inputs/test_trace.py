"""Trace replay (`load: {type: trace}`, mooncake JSONL) and max_duration_s on any load."""

import asyncio
import json
import subprocess
import sys

import pytest

from harness.config.load import load_scenario
from harness.config.scenario import ConcurrencyLoad, PoissonLoad, TraceLoad
from harness.core.events import now
from harness.records import PROMPT_FILE, read_requests
from harness.run.loadgen import run_load
from harness.run.strategies import strategy_for
from tests.conftest import ROOT, run_scenario, scenario_dict

SCRIPTED = {"name": "s", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}

# Gaps from 60 ms to 300 ms, and a burst of three at one time, as a recorded trace has.
ROWS = [
    {"timestamp": 1000, "input_length": 40, "output_length": 4, "hash_ids": [0, 1]},
    {"timestamp": 1060, "input_length": 30, "output_length": 6, "hash_ids": [0]},
    {"timestamp": 1360, "input_length": 24, "output_length": 3, "hash_ids": [2]},
    {"timestamp": 1360, "input_length": 40, "output_length": 5, "hash_ids": [0, 1]},
    {"timestamp": 1360, "input_length": 12, "output_length": 2},
    {"timestamp": 1500, "input_length": 20, "output_length": 4, "hash_ids": [2]},
    {"timestamp": 1750, "input_length": 36, "output_length": 3, "hash_ids": [0, 1]},
    {"timestamp": 1900, "input_length": 16, "output_length": 2, "hash_ids": [3]},
]


def write_trace(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def trace_scenario(tiny_model, trace, num_requests=len(ROWS), **load):
    return scenario_dict(tiny_model, [SCRIPTED], [{
        "name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": num_requests, "warmup_requests": 1,
        "load": {"type": "trace", "path": str(trace), "block_tokens": 8, **load}}])


@pytest.fixture(scope="module")
def replayed(tiny_model, tmp_path_factory):
    """One run: the trace four times as slow (3.6 s), and a closed loop cut by max_duration_s, two repetitions."""
    tmp = tmp_path_factory.mktemp("trace")
    trace = write_trace(tmp / "trace.jsonl", ROWS)
    data = trace_scenario(tiny_model, trace, speedup=0.25)
    data["workloads"].append({"name": "cut", "input_tokens": 16, "output_tokens": 8, "num_requests": 400,
                              "warmup_requests": 0,
                              "load": {"type": "concurrency", "concurrency": 2, "max_duration_s": 0.5}})
    return run_scenario(data | {"repetitions": 2}, tmp)


def test_a_trace_is_replayed_within_5_percent_of_its_arrival_times(replayed):
    out, cells = replayed
    cell = cells["w"]
    want = [(row["timestamp"] - ROWS[0]["timestamp"]) / 1e3 / 0.25 for row in ROWS]
    for rep in (0, 1):
        records = sorted((r for r in read_requests(cell.requests_path(out)) if r.repetition == rep),
                         key=lambda r: r.id)
        assert [r.output_tokens for r in records] == [row["output_length"] for row in ROWS]
        assert [r.input_tokens for r in records] == [row["input_length"] for row in ROWS]
        # the scheduled times are the trace's exactly, from the repetition's start (row 0's time)
        t0 = records[0].t_scheduled
        assert [r.t_scheduled - t0 for r in records] == pytest.approx(want, abs=1e-6)
        # and each request left within 5% of its time in the trace (the first: within 5% of the first gap)
        sent = [r.t_send - t0 for r in records]
        assert sent[0] < 0.05 * want[1]
        for w, s in zip(want[1:], sent[1:]):
            assert s == pytest.approx(w, rel=0.05), (sent, want)


def test_requests_sharing_a_hash_id_share_that_block_of_prompt(write_scenario, tiny_model, tmp_path):
    from rich.console import Console

    from harness.run.plan import CellPlanner

    trace = write_trace(tmp_path / "trace.jsonl", ROWS)
    scenario = load_scenario(write_scenario(trace_scenario(tiny_model, trace) | {"repetitions": 2}))
    (tmp_path / "out").mkdir()
    plan = CellPlanner(scenario, tmp_path / "out", Console(quiet=True)).plan(scenario.cells()[0])
    entries = PROMPT_FILE.validate_json(plan.prompts_file.read_bytes())
    assert len(entries) == 1 + 2 * len(ROWS)
    rep0, rep1 = entries[1:1 + len(ROWS)], entries[1 + len(ROWS):]
    assert [len(e.token_ids) for e in rep0] == [row["input_length"] for row in ROWS]
    assert [e.max_tokens for e in rep1] == [row["output_length"] for row in ROWS]
    assert rep0[2].arrival_s == pytest.approx(0.36) and rep0[0].arrival_s == 0.0

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    # hash_ids [0, 1] twice: both 8-token blocks (16 tokens, after the BOS); [0] and [0, 1]: the first block
    assert common(rep0[0].token_ids, rep0[3].token_ids) >= 1 + 16
    assert 1 + 8 <= common(rep0[0].token_ids, rep0[1].token_ids) < 1 + 16
    assert common(rep0[2].token_ids, rep0[5].token_ids) >= 1 + 8  # hash 2
    assert common(rep0[0].token_ids, rep0[2].token_ids) < 1 + 4  # no block in common
    # a repetition does not find the one before it in a prefix cache
    assert common(rep0[0].token_ids, rep1[0].token_ids) < 1 + 4


@pytest.mark.parametrize("rows,needle", [
    (None, "no such trace file"),
    ([], "the trace has no rows"),
    ([ROWS[0], {"timestamp": 900, "input_length": 5, "output_length": 5}], "line 2: timestamp 900 is before"),
    ([{"timestamp": 0, "input_length": 0, "output_length": 5}], "line 1: input_length: expected an integer ≥ 1"),
    ([{"timestamp": 0, "input_length": 3, "output_length": 5, "hash_ids": ["a"]}], "hash_ids: expected a list"),
    (ROWS[:3], "the trace has 3 rows, fewer than num_requests (8)"),
    # row 3 of the 8 replayed: 4000 + 200 tokens, beyond tiny-llama's 4096 (the workload's 16 + 8 are not used)
    ([*ROWS[:2], {"timestamp": 1360, "input_length": 4000, "output_length": 200}, *ROWS[3:]],
     "trace.jsonl, line 3: 4000 prompt + 200 output tokens exceed the 4096-token context of model 'tiny'"),
])
def test_a_trace_that_cannot_be_replayed_is_refused_up_front(write_scenario, tiny_model, tmp_path, rows, needle):
    trace = tmp_path / "trace.jsonl"
    if rows is not None:
        write_trace(trace, rows)
    path = write_scenario(trace_scenario(tiny_model, trace))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    text = done.stdout + done.stderr
    assert "workloads[0].load.path" in text and needle in text and "Traceback" not in text


def test_a_trace_alone_gives_each_requests_lengths_on_an_engine(tiny_model, tmp_path):
    """No input_tokens or output_tokens: the rows give every request's lengths, which the engine then produced."""
    rows = ROWS[:4]
    trace = write_trace(tmp_path / "trace.jsonl", rows)
    out, cells = run_scenario(scenario_dict(
        tiny_model, [{"name": "hf", "kind": "transformers", "options": {"dtype": "float32"}}],
        [{"name": "w", "num_requests": len(rows), "warmup_requests": 1,
          "load": {"type": "trace", "path": str(trace), "block_tokens": 8, "speedup": 4}}]), tmp_path)
    records = sorted(read_requests(cells["w"].requests_path(out)), key=lambda r: r.id)
    assert all(r.ok for r in records), [r.error for r in records]
    assert [r.input_tokens for r in records] == [row["input_length"] for row in rows]
    assert [(r.output_tokens, r.n_out) for r in records] == [(row["output_length"],) * 2 for row in rows]
    assert "the trace’s own input and output tokens" in (out / "report.md").read_text()


def test_a_trace_path_is_relative_to_the_scenario_file(write_scenario, tiny_model, tmp_path):
    write_trace(tmp_path / "trace.jsonl", ROWS)
    scenario = load_scenario(write_scenario(trace_scenario(tiny_model, "trace.jsonl")))
    assert scenario.workloads[0].load.path == (tmp_path / "trace.jsonl").resolve()


@pytest.mark.parametrize("load", [PoissonLoad(type="poisson", rate=100.0, max_duration_s=0.2),
                                  ConcurrencyLoad(type="concurrency", concurrency=2, max_duration_s=0.2),
                                  TraceLoad(type="trace", path="t.jsonl", max_duration_s=0.2)])
async def test_max_duration_stops_sending_and_lets_requests_in_flight_finish(load):
    n, started, finished = 100, [], []

    async def send(i, due):
        started.append(due.t_scheduled)
        await asyncio.sleep(0.02)
        finished.append(now())
        return i

    t0 = now()
    out = await run_load(strategy_for(load), list(range(n)), send, t0=t0, arrivals=[i / 100 for i in range(n)])
    sent = [x for x in out if x is not None]
    assert sent == list(range(len(sent)))  # the first ones, in order; the rest not sent
    # 0.2 s at 100 req/s: about 20 (a closed loop of 2 with 20 ms each: about 20 too)
    assert 12 <= len(sent) <= 23 and out[len(sent):] == [None] * (n - len(sent))
    assert max(started) - t0 <= 0.2 + 1e-3  # none was due after the deadline
    assert len(finished) == len(sent)  # and each one sent finished: none was cut


def test_max_duration_is_recorded_per_repetition(replayed):
    cell = replayed[1]["cut"]
    # two at a time, 12 ms each (5 ms to the first token, 7 more 1 ms apart): about 80 in 0.5 s of the 400
    assert len(cell.not_sent) == 2 and all(200 <= n < 400 for n in cell.not_sent), cell.not_sent
    assert [r.value("completed") for r in cell.repetitions] == [400 - n for n in cell.not_sent]
    # every one sent completed (above): in flight at the deadline, they were not cut. The duration runs from the
    # first send, a little after t0, to the last token, a little after the deadline: about 0.5 s, and below it by
    # the first send's lateness where the last token came early (0.4999 s seen on a fresh clone). The upper bound
    # leaves a busy machine room, yet is far below the 2.4 s of all 400 requests uncut.
    assert all(0.5 - 0.05 < r.value("duration_s") < 0.5 + 1.0 for r in cell.repetitions), [r.value("duration_s")
                                                                                          for r in cell.repetitions]
    assert replayed[1]["w"].not_sent == [0, 0]


def test_a_trace_gives_its_own_prompts(tiny_model, tmp_path):
    from pydantic import ValidationError

    from harness.config.scenario import Scenario

    data = trace_scenario(tiny_model, tmp_path / "t.jsonl")
    data["workloads"][0]["prompts"] = {"type": "shared_prefix", "prefix_tokens": 4}
    with pytest.raises(ValidationError, match=r"workloads\[0\].prompts: a trace gives its requests' prompts"):
        Scenario.model_validate(data)
