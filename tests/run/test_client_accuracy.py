"""The load generator against the scripted server (harness/calibrate.py), whose timing is known exactly: connections
reused, TTFT and TPOT as the server emitted them, every token counted, the client reporting on itself (achieved
rate, dispatch and loop lag, client_limited), and several client processes merged onto one clock.

Timing assertions compare medians with margins a loaded 2-core machine keeps, yet tight enough to catch the bugs
they guard against (a new connection per request, a blocked loop, a stream stamped by text)."""

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import pytest

from backends.base import Request, RequestSent, TokenEvent, Usage
from backends.openai_backend import OpenAIClient, OpenAIOptions
from harness.calibrate import BEHAVIOURS, Behaviour, calibrate, scripted_server
from harness.config.scenario import SLO, ConcurrencyLoad, PoissonLoad
from harness.records import ClientClock, Distribution, RequestRecord
from harness.results.metrics import reduce_cell
from harness.run.clients import measure_offset, to_cell_clock
from harness.run.eventloop import LoopLagProbe
from harness.run.loadgen import Due, run_load
from harness.run.strategies import strategy_for
from harness.run.worker import measure
from tests.conftest import scenario_dict

TTFT_MS, ITL_MS = 5.0, 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with scripted_server(tmp_path_factory.mktemp("server"), TTFT_MS, ITL_MS) as url:
        yield url


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    with scripted_server(tmp_path_factory.mktemp("strict"), TTFT_MS, ITL_MS, token_ids="reject") as url:
        yield url


def server_stats(url: str) -> dict:
    return httpx.get(url + "/scripted/stats").json()


async def stream(url: str, max_tokens: int = 16, token_ids: bool | None = False, **options) -> list:
    client = OpenAIClient(OpenAIOptions(**options), "completions", None, exact_length=True, token_ids=token_ids)
    await client.connect(url + "/v1")
    try:
        return [e async for e in client.stream(Request(0, "hi there", [1, 2], max_tokens=max_tokens))]
    finally:
        await client.close()


# ---- every token counted ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("token_ids", [False, True])
async def test_chunks_with_empty_text_are_counted(server, token_ids):
    """A random-weight model's tokens often decode to no text: 16 tokens, 15 of them empty, the last one carrying
    the finish reason (as vLLM sends it). Counted by the usage, or by the ids when asked for them."""
    httpx.post(server + "/scripted/reset")
    events = await stream(server, 16, token_ids, extra_body={"scripted": {"empty_text": True}})
    sent, tokens, usage = events[0], events[1:-1], events[-1]
    assert isinstance(sent, RequestSent) and isinstance(usage, Usage)
    assert all(isinstance(e, TokenEvent) for e in tokens) and sent.t < tokens[0].t
    assert len(tokens) == 16 and sum(e.n_tokens for e in tokens) == 16 and usage.output_tokens == 16
    assert [e.token_ids for e in tokens] == ([[k] for k in range(16)] if token_ids else [None] * 16)
    # the last stamp is the last token's: first to last as the server wrote them (text-only counting had a single
    # stamp, so E2EL was TTFT and TPOT 0)
    (server_tpot,) = server_stats(server)["tpot_ms"]
    assert (tokens[-1].t - tokens[0].t) * 1e3 == pytest.approx(15 * server_tpot, abs=3)


async def test_a_finish_chunk_without_a_token_is_not_counted(server):
    events = await stream(server, 8)  # the scripted server sends the finish reason in a chunk of its own here
    assert sum(e.n_tokens for e in events if isinstance(e, TokenEvent)) == 8
    no_usage = await stream(server, 8, extra_body={"stream_options": {"include_usage": False}})
    assert sum(e.n_tokens for e in no_usage if isinstance(e, TokenEvent)) == 8
    assert no_usage[-1].output_source == "stream_chunks" and no_usage[-1].output_tokens == 8


async def test_token_ids_are_asked_for_only_where_the_server_sends_them(server, strict_server):
    client = OpenAIClient(OpenAIOptions(), "completions", None, exact_length=True, token_ids=None)
    await client.connect(server + "/v1")
    await client.close()
    assert client.token_ids is True
    # a strict server refuses the unknown field: the client does not ask, and its requests go through
    strict = OpenAIClient(OpenAIOptions(), "completions", None, exact_length=True, token_ids=None)
    await strict.connect(strict_server + "/v1")
    try:
        assert strict.token_ids is False and "return_token_ids" not in strict.body(Request(0, "x", [1], 4))
        events = [e async for e in strict.stream(Request(0, "x", [1], 4))]
        assert events[-1].output_tokens == 4
    finally:
        await strict.close()


async def test_http2_needs_h2_or_says_so(server):
    import importlib.util

    from backends.base import BackendError

    client = OpenAIClient(OpenAIOptions(http2=True), "completions", None, exact_length=True)
    if importlib.util.find_spec("h2") is None:
        with pytest.raises(BackendError, match="options.http2: needs the h2 package"):
            await client.connect(server + "/v1")
    else:  # over http:// the server is spoken to in HTTP/1.1 still: requests work
        await client.connect(server + "/v1")
        try:
            assert [e async for e in client.stream(Request(0, "x", [1], 4))][-1].output_tokens == 4
        finally:
            await client.close()


# ---- connections and timing, through `bench run`'s own path -----------------------------------------------------

@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """One `bench calibrate` run against a server without TCP_NODELAY: concurrency 4 (100 requests) and Poisson
    20 req/s (60 requests)."""
    out = tmp_path_factory.mktemp("calibrate")
    return calibrate(out, rates=[20.0], concurrencies=[4], seconds=3.0, ttft_ms=TTFT_MS, itl_ms=ITL_MS,
                     behaviours=["nagle"]), out


def test_connections_are_reused(calibration):
    points, _ = calibration
    c4 = next(p for p in points if p.load == "concurrency 4")
    assert c4.status == "ok" and c4.requests >= 100
    # before: one connection per request (each stream left at [DONE] unread)
    assert c4.connections <= 4 + 1


def test_ttft_and_tpot_match_the_server_at_concurrency_4(calibration):
    points, _ = calibration
    c4 = next(p for p in points if p.load == "concurrency 4")
    assert abs(c4.ttft_error_ms) < 2.0, c4
    assert abs(c4.tpot_error) < 0.01, c4
    assert c4.ttft_ms == pytest.approx(TTFT_MS, abs=3.0)


def test_the_client_reports_its_rates_and_lags(calibration):
    points, out = calibration
    r20 = next(p for p in points if p.nominal_rate == 20.0)
    assert r20.offered_rate == pytest.approx(20.0, rel=1e-6)  # the schedule is rescaled to the nominal rate
    assert r20.achieved_rate == pytest.approx(20.0, rel=0.05) and r20.server_rate == pytest.approx(20.0, rel=0.05)
    cells = {c["workload"]: c for c in json.loads((out / "nagle" / "results.json").read_text())["cells"]}
    m = cells["rate-20"]["metrics"]
    assert m["nominal_rate_rps"] == 20.0 and m["dispatch_lag_ms"]["count"] == 60 and m["loop_lag_ms"]["count"] > 50
    assert m["dispatch_lag_ms"]["p50"] < 5 and m["dispatch_lag_ms"]["min"] >= 0
    assert cells["concurrency-4"]["metrics"]["offered_rate_rps"] is None  # a closed loop offers no rate
    records = [json.loads(line) for line in (out / "nagle" / cells["rate-20"]["requests_file"]).read_text()
               .splitlines()]
    assert all(r["t_scheduled"] is not None and r["t_send"] >= r["t_scheduled"] for r in records)
    calibration_file = json.loads((out / "calibration.json").read_text())
    assert calibration_file["server"] == {"ttft_ms": TTFT_MS, "itl_ms": ITL_MS}
    assert calibration_file["behaviours"] == {"nagle": {"nodelay": False, "coalesce": 1, "keepalive_requests": None,
                                                        "late_headers": False}}
    assert [(p["server"], p["load"]) for p in calibration_file["points"]] == [("nagle", "rate 20"),
                                                                              ("nagle", "concurrency 4")]


def test_calibrate_refuses_an_unknown_server_behaviour():
    from typer.testing import CliRunner

    from harness.cli import app

    r = CliRunner().invoke(app, ["calibrate", "--behaviour", "nagel"])
    assert r.exit_code == 2 and "--behaviour: unknown 'nagel'; known: nodelay, nagle" in r.output


@pytest.mark.slow
def test_calibrate_writes_under_results_not_into_the_working_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from harness.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["calibrate", "--concurrency", "1", "--seconds", "0.5", "--behaviour", "nodelay"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    assert (tmp_path / "results" / "calibrate" / "calibration.json").is_file()


# ---- every way a server writes ------------------------------------------------------------------------------------

async def drive(url: str, load, n: int, prompt: str = "hi there", max_tokens: int = 32) -> list[RequestRecord]:
    """n requests under `load` through the client and the worker's own measure(), in this process."""
    client = OpenAIClient(OpenAIOptions(), "completions", "scripted", exact_length=True)
    await client.connect(url + "/v1")
    await client.open_connections(4)
    backend = SimpleNamespace(generate=client.stream)
    try:
        async def send(i: int, due: Due) -> RequestRecord:
            return await measure(backend, Request(i, prompt, [1], max_tokens=max_tokens), 0, False, due.t_scheduled)

        httpx.post(url + "/scripted/reset")
        return await run_load(strategy_for(load), list(range(n)), send, seed=1)
    finally:
        await client.close()


def errors(records: list[RequestRecord], url: str) -> tuple[float, float]:
    """The client's TTFT p50 minus the server's (ms), and its TPOT p50 over the server's (relative)."""
    assert all(r.ok for r in records), [r.error for r in records if not r.ok][:3]
    truth = server_stats(url)
    assert truth["requests"] == len(records)
    ttft = Distribution.of([r.ttft * 1e3 for r in records]).p50 - Distribution.of(truth["ttft_ms"]).p50
    tpot = Distribution.of([r.tpot * 1e3 for r in records]).p50 / Distribution.of(truth["tpot_ms"]).p50 - 1
    return ttft, tpot


@pytest.fixture(scope="module", params=list(BEHAVIOURS))
def behaving(request, tmp_path_factory):
    with scripted_server(tmp_path_factory.mktemp(request.param), TTFT_MS, ITL_MS,
                         behaviour=BEHAVIOURS[request.param]) as url:
        yield request.param, url


@pytest.mark.parametrize("load, n", [(PoissonLoad(type="poisson", rate=80), 120),
                                     (ConcurrencyLoad(type="concurrency", concurrency=4), 60)],
                         ids=["poisson-80", "concurrency-4"])
async def test_ttft_and_tpot_are_the_servers_however_it_writes(behaving, load, n):
    """Without TCP_NODELAY a server's first token waited for our delayed ACK of its headers on kept-alive
    connections: +34 ms of TTFT and TPOT 30% low from 40 req/s up, until the client re-armed TCP_QUICKACK on every
    read. Tokens written together, connections closed after 3 requests, headers sent with the first token: the
    client reads what the server wrote."""
    name, url = behaving
    ttft_error, tpot_error = errors(await drive(url, load, n), url)
    assert abs(ttft_error) < 2.0, (name, ttft_error)
    assert abs(tpot_error) < 0.01, (name, tpot_error)
    if name == "keepalive-close":  # every third request on a fresh connection
        assert server_stats(url)["connections"] >= n // 3


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """Nagle on, and a fast stream, so that 4k-token answers take a second."""
    with scripted_server(tmp_path_factory.mktemp("long"), TTFT_MS, 0.25, behaviour=Behaviour(nodelay=False)) as url:
        yield url


@pytest.mark.parametrize("tokens", [32_768, 131_072])
async def test_long_prompts_arrive_without_a_stall(long_server, tokens):
    """Request bodies of 0.16 and 0.64 MB: written in one call and read to the end, the client's TTFT stays the
    server's, upload included (a client once collapsed at 50k-token contexts on a 64 KB read buffer, vLLM issue
    39963). One at a time: two at once, the scripted server reading and parsing one 0.64 MB body stamps the other's
    arrival late, an error of the reference, not of the client."""
    prompt = " ".join(f"w{k % 1000}" for k in range(tokens))
    t0 = time.perf_counter()
    records = await drive(long_server, ConcurrencyLoad(type="concurrency", concurrency=1), 8, prompt, 16)
    assert time.perf_counter() - t0 < 5
    ttft_error, _ = errors(records, long_server)
    assert abs(ttft_error) < 2.0
    assert server_stats(long_server)["prompt_tokens"] == [tokens] * 8


async def test_long_answers_arrive_without_a_stall(long_server):
    """4,096-token answers (~500 KB of SSE each), two at a time: every token counted, no stall."""
    t0 = time.perf_counter()
    records = await drive(long_server, ConcurrencyLoad(type="concurrency", concurrency=2), 4, max_tokens=4096)
    assert time.perf_counter() - t0 < 6  # 2 × ~1.1 s of stream at 0.25 ms a token
    assert [r.n_out for r in records] == [4096] * 4 and all(sum(r.chunk_tokens) == 4096 for r in records)
    ttft_error, tpot_error = errors(records, long_server)
    # a stalled read would stretch the stream by far more; 2%: a busy machine delays a last read by a few ms
    assert abs(ttft_error) < 2.0 and abs(tpot_error) < 0.02


# ---- the client reports on itself ---------------------------------------------------------------------------------

async def test_the_loop_lag_probe_catches_a_blocking_callback():
    loop = asyncio.get_running_loop()
    with LoopLagProbe(loop, interval_s=0.005) as probe:
        await asyncio.sleep(0.2)
        t_block = time.perf_counter()
        loop.call_soon(time.sleep, 0.1)  # a callback that blocks the loop for 100 ms
        await asyncio.sleep(0.2)
    quiet, blocked = probe.lags(0, t_block), probe.lags(t_block, float("inf"))
    assert len(quiet) > 10 and sorted(quiet)[len(quiet) // 2] < 20
    assert max(blocked) > 60  # a sample taken as the block began waited for nearly all of it


def record(i: int, t_scheduled: float, lag: float) -> RequestRecord:
    t = t_scheduled + lag
    return RequestRecord(id=i, repetition=0, t_send=t, t_scheduled=t_scheduled,
                         chunk_times=[t + 0.005 + k * 0.002 for k in range(8)], output_tokens=8)


def test_a_client_that_falls_behind_is_marked_client_limited():
    load = PoissonLoad(type="poisson", rate=100.0)
    on_time = [record(i, i / 100, 0.0002) for i in range(100)]
    fine = reduce_cell(on_time, 1, SLO(), 1.0, load, [[0.1] * 100])
    assert fine["client_limited"] is False and fine["client_limited_reasons"] == []
    assert fine["metrics"].value("offered_rate_rps") == pytest.approx(100) and \
        fine["metrics"].value("achieved_rate_rps") == pytest.approx(100)
    # each request 1 ms later than the one before: the client sends at ~91 req/s and ends 99 ms behind
    behind = reduce_cell([record(i, i / 100, i * 0.001) for i in range(100)], 1, SLO(), 1.0, load, [[0.1] * 100])
    reasons = behind["client_limited_reasons"]
    assert behind["client_limited"] is True and len(reasons) == 2
    assert reasons[0].startswith("achieved rate 90.91 req/s is 91% of the 100.00 offered")
    assert "dispatch lag (schedule → send) p99 98.0 ms exceeds 10 ms" in reasons[1]
    stalled = reduce_cell(on_time, 1, SLO(), 1.0, load, [[0.1] * 98 + [40.0, 50.0]])
    assert stalled["client_limited_reasons"] == ["event-loop lag p99 40.1 ms exceeds 5 ms"]
    # under a concurrency cap the harness held requests back on purpose: not the client's doing
    assert not reduce_cell([record(i, i / 100, i * 0.0001) for i in range(100)], 1, SLO(), 1.0, load,
                           capped=True)["client_limited"]


def test_latency_from_the_schedule_is_read_where_the_client_fell_behind():
    """Coordinated omission: latencies from the actual send hide a client that sent late; beside them, the same from
    the scheduled send (vLLM's e2el_including_client_queue). Where they differ beyond noise, verdicts read these."""
    from harness.results.catalogue import verdict_name

    load = PoissonLoad(type="poisson", rate=100.0)
    on_time = reduce_cell([record(i, i / 100, 0.0002) for i in range(100)], 1, SLO(), 1.0, load)
    m = on_time["metrics"]
    assert m.value("ttft_ms.p50") == pytest.approx(5.0)
    assert m.value("ttft_including_client_queue_ms.p50") == pytest.approx(5.2)
    assert m.value("e2el_including_client_queue_ms.p50") == pytest.approx(m.value("e2el_ms.p50") + 0.2)
    assert on_time["client_queue_shift"] == []  # a timer's jitter is no queue
    behind = reduce_cell([record(i, i / 100, i * 0.001) for i in range(100)], 1, SLO(), 1.0, load)
    m = behind["metrics"]
    assert m.value("ttft_ms.p50") == pytest.approx(5.0)  # from the send, the engine looks as fast as ever
    assert m.value("ttft_including_client_queue_ms.p50") == pytest.approx(5.0 + 49.5)
    assert behind["client_queue_shift"][0].startswith("TTFT from the schedule p50 54.5 ms is outside the 95% CI of "
                                                      "TTFT p50 from the send [5.0, 5.0] ms")
    assert len(behind["client_queue_shift"]) == 4  # TTFT and E2E latency, p50 and p99
    assert verdict_name("ttft_ms.p50", True) == "ttft_including_client_queue_ms.p50"
    assert verdict_name("e2el_ms", True) == "e2el_including_client_queue_ms"
    assert verdict_name("tpot_ms.p50", True) == "tpot_ms.p50" and verdict_name("ttft_ms.p50", False) == "ttft_ms.p50"


def test_a_blocked_worker_loop_is_reported_in_the_results(tiny_model, write_scenario, tmp_path):
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    b = {"name": "blocking", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001, "block_loop_s": 0.03}}
    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 40, "warmup_requests": 0,
           "load": {"type": "poisson", "rate": 50}}]
    path = write_scenario(scenario_dict(tiny_model, [b], wl))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", in_process=True).run() == 0
    (cell,) = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    # 30 ms of blocking per request caps the loop at ~33 req/s against 50 offered
    assert cell["client_limited"] is True
    assert any(r.startswith("achieved rate") for r in cell["client_limited_reasons"])
    assert any(r.startswith("event-loop lag p99") for r in cell["client_limited_reasons"])
    assert cell["metrics"]["achieved_rate_rps"] < 0.9 * cell["metrics"]["offered_rate_rps"]
    assert "client limited" in (tmp_path / "out" / "report.md").read_text()


# ---- several client processes -------------------------------------------------------------------------------------

def test_clock_offsets_are_measured_and_records_moved_onto_the_cell_clock():
    offset, error = measure_offset(lambda: time.perf_counter() + 100.0)
    assert offset == pytest.approx(100.0, abs=max(error, 1e-4)) and 0 <= error < 0.01
    rec = to_cell_clock(RequestRecord(id=1, repetition=0, t_send=105.0, t_scheduled=104.5, chunk_times=[106.0]),
                        ClientClock(index=2, pid=1, offset_s=100.0, offset_error_s=error))
    assert (rec.t_send, rec.t_scheduled, rec.chunk_times, rec.client) == (5.0, 4.5, [6.0], 2)


def test_two_client_processes_share_the_schedule(server, tiny_model, write_scenario, tmp_path):
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    httpx.post(server + "/scripted/reset")
    b = {"name": "remote", "kind": "openai", "url": server + "/v1"}
    wl = [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 40, "warmup_requests": 1,
           "load": {"type": "poisson", "rate": 20, "clients": 2}}]
    path = write_scenario(scenario_dict(tiny_model, [b], wl))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", write_report=False).run() == 0
    (cell,) = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    (clock,) = cell["clients"]
    # one machine, one monotonic clock: the measured offset is zero within its own error bound
    assert clock["index"] == 1 and clock["offset_error_s"] < 0.005
    assert abs(clock["offset_s"]) <= clock["offset_error_s"] + 1e-4
    records = [json.loads(line) for line in (tmp_path / "out" / cell["requests_file"]).read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(1, 41))
    assert {r["client"] for r in records if r["id"] % 2} == {0} and {r["client"] for r in records if r["id"] % 2 == 0} \
        == {1}  # request ids start at 1 after the warm-up: ids 1, 3, ... are client 0's
    m = cell["metrics"]
    assert m["completed"] == 40 and m["offered_rate_rps"] == pytest.approx(20.0, rel=1e-6)
    assert m["achieved_rate_rps"] == pytest.approx(20.0, rel=0.05)
    assert abs(m["ttft_ms"]["p50"] - TTFT_MS) < 3
    assert server_stats(server)["requests"] >= 41


def test_clients_need_an_engine_served_over_http(tiny_model, write_scenario, tmp_path):
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 4, "warmup_requests": 0,
           "load": {"type": "poisson", "rate": 50, "clients": 2}}]
    path = write_scenario(scenario_dict(tiny_model, [{"name": "inproc", "kind": "scripted"}], wl))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", in_process=True,
                  write_report=False).run() == 1
    (cell,) = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert cell["error"].startswith("load.clients: 2 client processes need an engine served over HTTP")
